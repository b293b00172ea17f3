"""A stand-in for `claude -p ... --output-format stream-json`: writes a synthetic
stream built from the real sample, and measures how long its writes block.

    fake_agent.py --lines N [--rate LINES_PER_S] [--big-every 500] [--big-bytes 1048576]
                  [--stats PATH]

Cycles the sample's assistant/user lines (tool_use ids made unique), replaces
every `--big-every`th line by a tool_result of `--big-bytes`, stamps each text
block and string tool_result with `@t=<time.time()>` taken just before the
write, and writes the `system`/`init` line first and the `result` line last
(N lines in all). `--rate 0` writes as fast as the reader takes them. Each
write+flush is timed; the totals go to `--stats` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The contract's real CLI run, in the shared/ folder beside the checkout.
SAMPLE = os.environ.get("SHEPHERD_SAMPLE") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..", "..", "shared", "contract", "samples", "claude-stream-json.jsonl",
)  # fmt: skip
STAMP = "@@T@@"


def templates(path: str) -> tuple[str, list[str], str, str]:
    """init line, body templates (tool ids -> toolu_@@C@@_N), big tool_result, result."""
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    init = next(m for m in lines if m["type"] == "system")
    result = next(m for m in lines if m["type"] == "result")
    body = []
    for m in lines:
        if m["type"] not in ("assistant", "user"):
            continue
        for block in m["message"]["content"]:
            if block.get("type") == "tool_use":
                block["id"] = block["id"].replace("toolu_", "toolu_@@C@@_")
            elif block.get("type") == "tool_result":
                block["tool_use_id"] = block["tool_use_id"].replace("toolu_", "toolu_@@C@@_")
                if isinstance(block.get("content"), str):
                    block["content"] = f"{STAMP} {block['content']}"
            elif block.get("type") == "text":
                block["text"] = f"{STAMP} {block['text']}"
        body.append(json.dumps(m, separators=(",", ":")))
    big = next(m for m in lines if m["type"] == "user")
    big["message"]["content"][0]["tool_use_id"] = "@@ID@@"
    big["message"]["content"][0]["content"] = STAMP + " @@BIG@@"
    dump = lambda m: json.dumps(m, separators=(",", ":"))  # noqa: E731
    return dump(init), body, dump(big), dump(result)


def big_text(size: int) -> str:
    """Realistic bulky tool output: numbered source lines."""
    row = "    def handler(self, request):  # a typical line of a large file read back\\n"
    text = "".join(f"{i:6d}\\t{row}" for i in range(size // (len(row) + 7) + 1))
    return text[:size]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, required=True)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--big-every", type=int, default=500)
    ap.add_argument("--big-bytes", type=int, default=1 << 20)
    ap.add_argument("--stats", default="")
    args = ap.parse_args()

    init, body, big_tpl, result = templates(SAMPLE)
    big_tpl = big_tpl.replace("@@BIG@@", big_text(args.big_bytes))
    out = sys.stdout.buffer
    waits = []  # seconds each write+flush blocked
    last_id = "toolu_none"
    start = time.monotonic()
    for i in range(args.lines):
        if args.rate > 0:
            pause = start + i / args.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        if i == 0:
            line = init
        elif i == args.lines - 1:
            line = result
        elif args.big_every and i % args.big_every == 0:
            line = big_tpl.replace("@@ID@@", last_id)
        else:
            cycle, k = divmod(i - 1, len(body))
            line = body[k].replace("@@C@@", str(cycle))
            if '"tool_use","id":"' in line:
                last_id = line.split('"tool_use","id":"', 1)[1].split('"', 1)[0]
        data = line.replace(STAMP, f"@t={time.time():.6f}", 1).encode() + b"\n"
        t0 = time.perf_counter()
        out.write(data)
        out.flush()
        waits.append(time.perf_counter() - t0)
    elapsed = time.monotonic() - start
    if args.stats:
        stats = {
            "lines": args.lines,
            "seconds": elapsed,
            "write_max_s": max(waits, default=0.0),
            "write_total_s": sum(waits),
            "writes_over_50ms": sum(w > 0.05 for w in waits),
        }
        with open(args.stats + ".tmp", "w") as f:
            json.dump(stats, f)
        os.replace(args.stats + ".tmp", args.stats)


if __name__ == "__main__":
    main()
