"""EventSender: ordered, batched, never blocking the agent's output.

`post` is a local function that records batches and answers from a state the
test controls (an answer function, a gate). Tests synchronise on Conditions
and Events set by `post`, never on sleeps.
"""

from __future__ import annotations

import threading
import time

import pytest

import shepherd_runner as sr

WAIT = 10  # seconds; only reached when something is broken


class Recorder:
    """The API side of the sender: records every attempt and every accepted batch.

    `answer(batch)` decides the status code from the batch's content and the
    server's state; `gate` (when cleared) holds every post until it is set.
    """

    def __init__(self, answer=lambda batch: 200):
        self.answer = answer
        self.attempts: list[list[dict]] = []
        self.accepted: list[list[dict]] = []
        self.cond = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a post has started

    def __call__(self, batch: list[dict]) -> int:
        with self.cond:
            self.attempts.append(list(batch))
            self.cond.notify_all()
        self.entered.set()
        self.gate.wait()
        status = self.answer(batch)
        with self.cond:
            if status == 200:
                self.accepted.append(list(batch))
            self.cond.notify_all()
        return status

    def events(self) -> list[dict]:
        with self.cond:
            return [e for batch in self.accepted for e in batch]

    def wait_accepted(self, count: int) -> None:
        with self.cond:
            done = self.cond.wait_for(lambda: sum(len(b) for b in self.accepted) >= count, WAIT)
        assert done, f"only {self.events()} accepted"

    def wait_attempts(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.attempts) >= count, WAIT)


def event(seq: int, kind: str = "tool_call") -> dict:
    return {"sequence": seq, "timestamp": "2026-11-23T10:00:00.000Z", "type": kind,
            "summary": f"event {seq}"}  # fmt: skip


@pytest.fixture
def senders():
    """Makes senders and closes them (and releases their posts) after the test."""
    made: list[tuple[sr.EventSender, Recorder]] = []

    def make(recorder: Recorder, **kwargs) -> sr.EventSender:
        kwargs.setdefault("backoff", 0.01)
        kwargs.setdefault("batch_max", kwargs.get("batch", sr.EVENT_BATCH))
        sender = sr.EventSender(recorder, **kwargs)
        made.append((sender, recorder))
        return sender

    yield make
    for sender, recorder in made:
        recorder.gate.set()
        sender.close(timeout=1)


def test_events_arrive_in_order_across_batches(senders):
    rec = Recorder()
    sender = senders(rec, batch=7, interval=0.01)
    for seq in range(1, 101):
        sender.put(event(seq))
    result = sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == list(range(1, 101))
    assert all(len(b) <= 7 for b in rec.accepted)
    assert len(rec.accepted) >= 100 // 7
    assert result == {"events_sent": 100, "events_dropped": 0}


def test_sequences_strictly_increase_across_batches_with_the_parser(senders):
    # The real pairing: the parser numbers, the sender keeps the order.
    rec = Recorder()
    sender = senders(rec, batch=3, interval=0.01)
    parser = sr.StreamParser(sr.Redactor())
    for i in range(20):
        for ev in parser.feed(f'{{"type":"assistant","message":{{"content":"step {i}"}}}}'):
            sender.put(ev)
    sender.close(timeout=WAIT)
    sequences = [e["sequence"] for e in rec.events()]
    assert sequences == list(range(1, 21))
    # Each batch continues where the previous one stopped.
    for before, after in zip(rec.accepted, rec.accepted[1:], strict=False):
        assert after[0]["sequence"] == before[-1]["sequence"] + 1


def test_full_batch_is_posted_without_waiting_for_the_interval(senders):
    rec = Recorder()
    sender = senders(rec, batch=5, interval=3600)  # the interval can never be what flushes
    for seq in range(1, 6):
        sender.put(event(seq))
    rec.wait_accepted(5)
    assert [len(b) for b in rec.accepted] == [5]


def test_partial_batch_is_posted_after_the_interval(senders):
    rec = Recorder()
    interval = 0.05
    sender = senders(rec, batch=50, interval=interval)
    start = time.monotonic()
    sender.put(event(1))
    sender.put(event(2))
    rec.wait_accepted(2)
    elapsed = time.monotonic() - start
    assert [[e["sequence"] for e in b] for b in rec.accepted] == [[1, 2]]
    assert elapsed >= interval * 0.9  # not before the interval ...
    assert elapsed < WAIT  # ... and not only at close()


def test_put_never_blocks_while_post_is_stuck(senders):
    rec = Recorder()
    rec.gate.clear()  # the API hangs
    no_limit = {"soft": 20_000, "hard": 20_000, "soft_bytes": 1 << 30, "hard_bytes": 1 << 30}
    sender = senders(rec, batch=50, interval=0.01, **no_limit)
    sender.put(event(0))
    assert rec.entered.wait(WAIT)  # the sender's thread is now inside post
    start = time.monotonic()
    for seq in range(1, 10_001):
        sender.put(event(seq))
    assert time.monotonic() - start < 1.0
    rec.gate.set()
    result = sender.close(timeout=WAIT)
    assert result == {"events_sent": 10_001, "events_dropped": 0}
    assert [e["sequence"] for e in rec.events()] == list(range(10_001))


def test_soft_limit_drops_thinking_and_tool_results_first(senders):
    rec = Recorder()
    rec.gate.clear()
    sender = senders(rec, batch=1, interval=0.01, soft=10, hard=20)
    sender.put(event(0))
    assert rec.entered.wait(WAIT)  # event 0 is in flight; the queue is empty
    for seq in range(1, 11):
        sender.put(event(seq, "tool_call"))  # fills the queue up to the soft limit
    sender.put(event(11, "thinking"))  # dropped: low value, past the soft limit
    sender.put(event(12, "tool_result"))  # dropped
    sender.put(event(13, "tool_call"))  # kept: below the hard limit
    sender.put(event(14, "error"))  # kept
    assert sender.dropped == 2
    rec.gate.set()
    result = sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == [0, *range(1, 11), 13, 14]
    assert result == {"events_sent": 13, "events_dropped": 2}


def test_hard_limit_drops_everything_and_counts_it(senders):
    rec = Recorder()
    rec.gate.clear()
    sender = senders(rec, batch=1, interval=0.01, soft=5, hard=8)
    sender.put(event(0))
    assert rec.entered.wait(WAIT)
    for seq in range(1, 9):
        sender.put(event(seq, "error"))  # fills the queue to the hard limit
    for seq in range(9, 14):
        sender.put(event(seq, "error"))  # all dropped
    sender.put(event(14, "thinking"))  # dropped too
    assert sender.dropped == 6
    rec.gate.set()
    result = sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == list(range(0, 9))
    assert result == {"events_sent": 9, "events_dropped": 6}


def big(seq: int, kind: str = "tool_call", chars: int = 10_000) -> dict:
    """An event that holds about `chars` bytes more than event()."""
    return event(seq, kind) | {"metadata": {"text": "x" * chars}}


def test_soft_byte_limit_drops_thinking_and_tool_results_first(senders):
    rec = Recorder()
    rec.gate.clear()
    sender = senders(rec, batch=1, interval=0.01, soft_bytes=25_000, hard_bytes=45_000)
    sender.put(event(0))
    assert rec.entered.wait(WAIT)  # event 0 is in flight; the queue is empty
    sender.put(big(1))
    sender.put(big(2))  # ~21 KB queued: under the soft limit, far under the count limits
    sender.put(big(3, "thinking"))  # dropped: low value, past the soft limit
    sender.put(big(4, "tool_result"))  # dropped
    sender.put(big(5))  # kept: under the hard limit
    sender.put(event(6, "error"))  # kept
    assert sender.dropped == 2
    rec.gate.set()
    result = sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == [0, 1, 2, 5, 6]
    assert result == {"events_sent": 5, "events_dropped": 2}


def test_hard_byte_limit_drops_what_does_not_fit_and_counts_it(senders):
    rec = Recorder()
    rec.gate.clear()
    sender = senders(rec, batch=1, interval=0.01, soft_bytes=10_000, hard_bytes=45_000)
    sender.put(event(0))
    assert rec.entered.wait(WAIT)
    for seq in range(1, 5):
        sender.put(big(seq, "error"))  # ~43 KB queued
    sender.put(big(5, "error"))  # dropped: it does not fit
    sender.put(big(6, "tool_call"))  # dropped
    sender.put(event(7, "error"))  # a small one still fits
    assert sender.dropped == 2
    rec.gate.set()
    result = sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == [0, 1, 2, 3, 4, 7]
    assert result == {"events_sent": 6, "events_dropped": 2}


def test_bytes_are_freed_as_batches_leave(senders):
    rec = Recorder()
    rec.gate.clear()
    sender = senders(rec, batch=1, interval=0.01, soft_bytes=25_000, hard_bytes=25_000)
    sender.put(event(0))
    assert rec.entered.wait(WAIT)
    for seq in range(1, 4):
        sender.put(big(seq))  # the third does not fit
    assert sender.dropped == 1
    rec.gate.set()
    rec.wait_accepted(3)  # events 0-2: the queue is empty again
    sender.put(big(4))
    sender.put(big(5))
    result = sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == [0, 1, 2, 4, 5]
    assert result == {"events_sent": 5, "events_dropped": 1}


def test_default_limits_hold_a_queue_of_big_events_to_bytes_not_count(senders):
    rec = Recorder()
    rec.gate.clear()  # the API hangs
    sender = senders(rec)
    sender.put(event(0))
    assert rec.entered.wait(WAIT)
    made = 5000  # below EVENT_QUEUE_HARD: only the byte limit can drop
    for seq in range(1, made + 1):
        sender.put(big(seq, "tool_call", chars=sr.TEXT_LIMIT))
    # Each event holds its text at least, so no more than this many fit.
    assert made - sender.dropped <= sr.EVENT_QUEUE_HARD_BYTES // sr.TEXT_LIMIT
    assert sender.dropped > 0
    rec.gate.set()
    result = sender.close(timeout=WAIT)
    assert result["events_sent"] + result["events_dropped"] == made + 1
    sequences = [e["sequence"] for e in rec.events()]
    assert sequences == sorted(sequences)


def test_a_backlog_goes_in_requests_of_at_most_batch_bytes(senders):
    rec = Recorder()
    rec.gate.clear()  # a backlog builds up behind the first request
    unbounded = {"soft_bytes": 1 << 30, "hard_bytes": 1 << 30}
    sender = senders(rec, batch=5, batch_max=40, batch_bytes=35_000, interval=0.01, **unbounded)
    for seq in range(1, 21):
        sender.put(big(seq))  # ~10.5 KB each: three fit in 35 KB, four do not
    rec.gate.set()
    result = sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == list(range(1, 21))
    assert max(len(b) for b in rec.accepted) == 3
    assert result == {"events_sent": 20, "events_dropped": 0}


def test_an_event_bigger_than_batch_bytes_still_goes_alone(senders):
    rec = Recorder()
    sender = senders(rec, batch=5, batch_max=40, batch_bytes=1_000, interval=0.01)
    for seq in range(1, 4):
        sender.put(big(seq))
    result = sender.close(timeout=WAIT)
    assert [[e["sequence"] for e in b] for b in rec.accepted] == [[1], [2], [3]]
    assert result == {"events_sent": 3, "events_dropped": 0}


@pytest.mark.parametrize("status", [410, 404])
def test_task_gone_stops_streaming_and_counts_the_rest_as_dropped(senders, status):
    rec = Recorder(answer=lambda batch: status)
    rec.gate.clear()
    sender = senders(rec, batch=5, interval=0.01)
    for seq in range(1, 13):
        sender.put(event(seq))
    assert rec.entered.wait(WAIT)
    rec.gate.set()  # the API answers `status` to the first batch
    # Wait until the sender has given up: its thread ends by itself.
    sender.thread.join(WAIT)
    assert not sender.thread.is_alive()
    for seq in range(13, 16):
        sender.put(event(seq))  # after the stop: dropped at once
    result = sender.close(timeout=WAIT)
    assert len(rec.attempts) == 1  # the API is not asked again
    assert result == {"events_sent": 0, "events_dropped": 15}


def test_5xx_is_retried_until_accepted(senders):
    # The API fails the first two posts it sees (a restart), then recovers.
    failures = {"left": 2}
    lock = threading.Lock()

    def answer(batch):
        with lock:
            if failures["left"] > 0:
                failures["left"] -= 1
                return 500
        return 200

    rec = Recorder(answer)
    sender = senders(rec, batch=3, interval=0.01)
    for seq in range(1, 4):
        sender.put(event(seq))
    rec.wait_accepted(3)
    result = sender.close(timeout=WAIT)
    assert len(rec.attempts) == 3
    assert all(a == rec.attempts[0] for a in rec.attempts)  # the same batch each time
    assert result == {"events_sent": 3, "events_dropped": 0}


@pytest.mark.parametrize("status", [0, 429, 502, 503])
def test_unreachable_or_throttled_api_is_retried(senders, status):
    seen = {"count": 0}
    lock = threading.Lock()

    def answer(batch):
        with lock:
            seen["count"] += 1
            return status if seen["count"] == 1 else 200

    rec = Recorder(answer)
    sender = senders(rec, batch=2, interval=0.01)
    sender.put(event(1))
    sender.put(event(2))
    rec.wait_accepted(2)
    assert sender.close(timeout=WAIT) == {"events_sent": 2, "events_dropped": 0}


def test_400_drops_only_that_batch(senders):
    # The API refuses any batch holding the malformed event, takes the others.
    rec = Recorder(lambda batch: 400 if any(e["summary"] == "poison" for e in batch) else 200)
    sender = senders(rec, batch=1, interval=0.01)
    sender.put(event(1))
    poison = event(2)
    poison["summary"] = "poison"
    sender.put(poison)
    sender.put(event(3))
    result = sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == [1, 3]
    assert sum(1 for a in rec.attempts if a[0]["sequence"] == 2) == 1  # not retried
    assert result == {"events_sent": 2, "events_dropped": 1}


def test_close_flushes_what_is_queued(senders):
    rec = Recorder()
    sender = senders(rec, batch=50, interval=3600)  # only close() can flush these
    for seq in range(1, 8):
        sender.put(event(seq))
    result = sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == list(range(1, 8))
    assert result == {"events_sent": 7, "events_dropped": 0}


def test_close_with_nothing_sent_returns_zero_counts(senders):
    sender = senders(Recorder())
    assert sender.close(timeout=WAIT) == {"events_sent": 0, "events_dropped": 0}


def test_close_respects_its_timeout_when_post_hangs(senders):
    rec = Recorder()
    rec.gate.clear()  # the API never answers (until teardown)
    sender = senders(rec, batch=1, interval=0.01)
    for seq in range(1, 4):
        sender.put(event(seq))
    assert rec.entered.wait(WAIT)
    timeout = 0.2
    start = time.monotonic()
    result = sender.close(timeout=timeout)
    elapsed = time.monotonic() - start
    # close() joins the thread with a one-second margin past the timeout.
    assert elapsed < timeout + 1.5
    assert set(result) == {"events_sent", "events_dropped"}
    assert result["events_sent"] == 0


def test_close_counts_the_unanswered_batch_as_dropped(senders):
    # The counts go into the terminal status: every event put must be either
    # sent (the API said 200) or dropped. The batch stuck in a post that never
    # answered was not delivered as far as anyone can tell.
    rec = Recorder()
    rec.gate.clear()
    sender = senders(rec, batch=1, interval=0.01)
    for seq in range(1, 4):
        sender.put(event(seq))
    assert rec.entered.wait(WAIT)
    result = sender.close(timeout=0.2)
    assert result == {"events_sent": 0, "events_dropped": 3}


def test_close_gives_up_retrying_at_its_deadline(senders):
    # The API is down for good: close() must not retry past its timeout.
    rec = Recorder(lambda batch: 503)
    sender = senders(rec, batch=1, interval=0.01, backoff=0.05)
    for seq in range(1, 4):
        sender.put(event(seq))
    rec.wait_attempts(1)
    start = time.monotonic()
    result = sender.close(timeout=0.3)
    assert time.monotonic() - start < 0.3 + 1.5
    assert result == {"events_sent": 0, "events_dropped": 3}


def test_a_backlog_goes_in_bigger_requests_up_to_batch_max(senders):
    rec = Recorder()
    rec.gate.clear()  # the API is slow: a backlog builds up behind the first request
    sender = senders(rec, batch=5, batch_max=40, interval=0.01)
    for seq in range(1, 101):
        sender.put(event(seq))
    rec.gate.set()
    sender.close(timeout=WAIT)
    assert [e["sequence"] for e in rec.events()] == list(range(1, 101))
    assert max(len(b) for b in rec.accepted) == 40
    assert len(rec.accepted) < 100 / 5
