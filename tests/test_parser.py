"""StreamParser: Claude Code stream-json lines -> TaskEvents (contract sections 2, 3).

The sample is the contract's real CLI run (shared/contract/samples/
claude-stream-json.jsonl), copied here verbatim so the suite does not depend on
a path outside the repository.
"""
# The sample lines are kept verbatim, however long.
# ruff: noqa: E501

from __future__ import annotations

import datetime
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shepherd_runner as sr

SAMPLE = r"""
{"type":"system","subtype":"init","cwd":"/workspace/repo","session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","tools":["Task","Bash","CronCreate","CronDelete","CronList","Edit","EnterWorktree","ExitWorktree","NotebookEdit","Read","ReportFindings","ScheduleWakeup","SendMessage","Skill","TaskCreate","TaskGet","TaskList","TaskOutput","TaskStop","TaskUpdate","WebFetch","WebSearch","Workflow","Write"],"mcp_servers":[],"model":"claude-opus-4-8[1m]","permissionMode":"bypassPermissions","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"1ce53aae-fdc6-4a9c-89b2-8fd290a22f1d","memory_paths":{"auto":"/home/shepherd/.claude/projects/-workspace-repo/memory/"},"fast_mode_state":"off"}
{"type":"assistant","message":{"id":"msg_2","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Let me look at the README first."}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1},"context_management":null},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"313e1675-105f-4090-aa0e-00385970957d"}
{"type":"assistant","message":{"id":"msg_2","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"tool_use","id":"toolu_0","name":"Read","input":{"file_path":"README.md"}}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1},"context_management":null},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"4314ac34-ec6a-47b4-ba24-45b4ec9a310a"}
{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_0","type":"tool_result","content":"1\thello\n2\t"}]},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"314e7ac7-b371-45eb-b4a1-0e28f489e526","timestamp":"2026-11-23T23:39:56.074Z","tool_use_result":{"type":"text","file":{"filePath":"README.md","content":"hello\n","numLines":2,"startLine":1,"totalLines":2}}}
{"type":"assistant","message":{"id":"msg_2","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"tool_use","id":"toolu_1","name":"Edit","input":{"replace_all":false,"file_path":"README.md","old_string":"hello","new_string":"hello world"}}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1},"context_management":null},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"ab56746d-c8d5-4e14-af2e-9d0cf520de11"}
{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_1","type":"tool_result","content":"The file README.md has been updated successfully. (file state is current in your context — no need to Read it back)"}]},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"70205e24-d6c0-4e10-8e2b-9e6cd9836a8a","timestamp":"2026-11-23T23:39:56.167Z","tool_use_result":{"filePath":"README.md","oldString":"hello","newString":"hello world","originalFile":"hello\n","structuredPatch":[{"oldStart":1,"oldLines":1,"newStart":1,"newLines":1,"lines":["-hello","+hello world"]}],"userModified":false,"replaceAll":false}}
{"type":"assistant","message":{"id":"msg_2","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"tool_use","id":"toolu_2","name":"Bash","input":{"command":"cat nonexistent-file","description":"fails"}}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1},"context_management":null},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"d4720362-6c90-45a2-8266-a18119180a3b"}
{"type":"user","message":{"role":"user","content":[{"type":"tool_result","content":"Exit code 1\ncat: nonexistent-file: No such file or directory","is_error":true,"tool_use_id":"toolu_2"}]},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"17e011e8-cb42-4701-a5e2-ecce5de6a4e5","timestamp":"2026-11-23T23:39:56.300Z","tool_use_result":"Error: Exit code 1\ncat: nonexistent-file: No such file or directory"}
{"type":"assistant","message":{"id":"msg_2","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"tool_use","id":"toolu_3","name":"Bash","input":{"command":"git add -A && git commit -qm 'Update greeting' && git log --oneline | head -3","description":"commit"}}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1},"context_management":null},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"dfd0e79a-4150-4e4e-8731-595356fa4d9d"}
{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_3","type":"tool_result","content":"52dbd13 Update greeting\n4a640c9 init","is_error":false}]},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"e39c84f1-5113-487d-9f17-009a86064ae4","timestamp":"2026-11-23T23:39:56.459Z","tool_use_result":{"stdout":"52dbd13 Update greeting\n4a640c9 init","stderr":"","interrupted":false,"isImage":false,"noOutputExpected":false}}
{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"I updated the greeting in README.md and committed it."}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1},"context_management":null},"parent_tool_use_id":null,"session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","uuid":"8515c7e6-7c8e-4923-b9fb-244bfb45a53f"}
{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":729,"duration_api_ms":407,"ttft_ms":169,"ttft_stream_ms":167,"time_to_request_ms":133,"num_turns":5,"result":"I updated the greeting in README.md and committed it.","stop_reason":"end_turn","session_id":"68c5f753-288e-4eec-b8cc-904845d89cd9","total_cost_usd":0.000875,"usage":{"input_tokens":50,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":25,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{"claude-opus-4-8[1m]":{"inputTokens":50,"outputTokens":25,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.000875,"contextWindow":1000000,"maxOutputTokens":64000}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"56989524-46fc-4fef-b2ca-89368b17ba8b"}
""".strip().splitlines()

SYSTEM, TEXT, READ, READ_RESULT, EDIT, EDIT_RESULT = SAMPLE[:6]
BASH_FAIL, BASH_FAIL_RESULT, BASH_COMMIT, BASH_COMMIT_RESULT, FINAL_TEXT, RESULT = SAMPLE[6:]

EVENT_TYPES = {"thinking", "tool_call", "tool_result", "error"}
EVENT_KEYS = {"sequence", "timestamp", "type", "summary", "tool", "input", "output", "metadata"}
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")


def validate(event: dict) -> None:
    """Asserts `event` is a TaskEvent the API accepts (OpenAPI `TaskEvent`)."""
    assert set(event) <= EVENT_KEYS, event
    seq = event["sequence"]
    assert type(seq) is int and 0 < seq < 2**63, event  # bool is no JSON integer
    stamp = event["timestamp"]
    assert isinstance(stamp, str) and RFC3339.fullmatch(stamp), event
    datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # a real date
    assert event["type"] in EVENT_TYPES, event
    summary = event["summary"]
    assert isinstance(summary, str) and summary.strip(), event
    assert len(summary) <= sr.SUMMARY_LIMIT, event
    if "tool" in event:
        assert isinstance(event["tool"], str), event
    for key in ("input", "metadata"):
        if key in event:
            assert isinstance(event[key], dict), event
    if "output" in event:
        out = event["output"]
        assert isinstance(out, dict) and type(out.get("success")) is bool, event
        if "summary" in out:
            assert isinstance(out["summary"], str), event
    # The API is written in Go: its decoder refuses NaN and Infinity.
    json.dumps(event, allow_nan=False)


def validate_all(events: list[dict], after: int = 0) -> None:
    for event in events:
        validate(event)
    sequences = [e["sequence"] for e in events]
    assert sequences == sorted(set(sequences)), sequences
    assert all(s > after for s in sequences)


def parser(*secrets: str) -> sr.StreamParser:
    return sr.StreamParser(sr.Redactor(secrets))


def feed_all(p: sr.StreamParser, lines) -> list[dict]:
    events = []
    for line in lines:
        events.extend(p.feed(line))
    return events


def one(events: list[dict]) -> dict:
    assert len(events) == 1, events
    return events[0]


def assistant(*blocks) -> str:
    return json.dumps({"type": "assistant", "message": {"content": list(blocks)}})


def user(*blocks) -> str:
    return json.dumps({"type": "user", "message": {"content": list(blocks)}})


def tool_use(name: str, args: dict, tool_id: str = "toolu_x") -> dict:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": args}


def tool_result(content, tool_id: str = "toolu_x", is_error: bool = False) -> dict:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": content, "is_error": is_error}


# ---------------------------------------------------------------------------
# the real sample, line by line
# ---------------------------------------------------------------------------


def test_system_init_line_yields_no_event():
    assert parser().feed(SYSTEM) == []


def test_assistant_text_becomes_a_thinking_event():
    event = one(parser().feed(TEXT))
    assert event["type"] == "thinking"
    assert event["summary"] == "Let me look at the README first."
    assert event["metadata"]["text"] == "Let me look at the README first."
    validate(event)


def test_read_tool_use_becomes_a_tool_call_reading_the_file():
    event = one(parser().feed(READ))
    assert event["type"] == "tool_call"
    assert event["summary"] == "Reading README.md"
    assert event["tool"] == "Read"
    assert event["input"] == {"file_path": "README.md"}
    assert event["metadata"]["tool_use_id"] == "toolu_0"
    validate(event)


def test_edit_tool_call_is_condensed_without_the_file_contents():
    event = one(parser().feed(EDIT))
    assert event["summary"] == "Editing README.md"
    assert event["tool"] == "Edit"
    assert event["input"] == {"file_path": "README.md", "edits": 1, "old_chars": 5, "new_chars": 11}
    # Neither the old nor the new text reaches the UI.
    assert "hello world" not in json.dumps(event)
    validate(event)


def test_bash_tool_call_summary_is_the_command():
    p = parser()
    fail = one(p.feed(BASH_FAIL))
    assert fail["summary"] == "cat nonexistent-file"
    assert fail["tool"] == "Bash"
    assert fail["input"]["command"] == "cat nonexistent-file"
    commit = one(p.feed(BASH_COMMIT))
    assert commit["summary"] == (
        "git add -A && git commit -qm 'Update greeting' && git log --oneline | head -3"
    )


def test_tool_result_is_named_after_its_tool_use():
    p = parser()
    feed_all(p, [READ, EDIT])
    read = one(p.feed(READ_RESULT))
    assert read["type"] == "tool_result"
    assert read["tool"] == "Read"
    assert read["output"] == {"success": True, "summary": "1\thello\n2"}
    assert read["summary"].startswith("Read ok: ")
    assert read["metadata"]["tool_use_id"] == "toolu_0"
    edit = one(p.feed(EDIT_RESULT))
    assert edit["tool"] == "Edit" and edit["output"]["success"] is True
    validate_all([read, edit])


def test_tool_result_with_is_error_has_success_false():
    p = parser()
    p.feed(BASH_FAIL)
    event = one(p.feed(BASH_FAIL_RESULT))
    assert event["tool"] == "Bash"
    assert event["output"]["success"] is False
    assert "No such file or directory" in event["output"]["summary"]
    assert event["summary"] == "Bash failed: Exit code 1"
    validate(event)


def test_tool_result_without_a_known_tool_use_still_validates():
    event = one(parser().feed(user(tool_result("output", tool_id="toolu_unknown"))))
    assert event["type"] == "tool_result"
    validate(event)


def test_tool_result_content_as_text_blocks_is_joined():
    content = [{"type": "text", "text": "first"}, {"type": "image"}, {"type": "text", "text": "x"}]
    p = parser()
    p.feed(assistant(tool_use("Bash", {"command": "ls"})))
    event = one(p.feed(user(tool_result(content))))
    assert event["output"]["summary"] == "first\nx"
    assert event["summary"] == "Bash ok: first"


def test_empty_tool_result_says_no_output():
    p = parser()
    p.feed(assistant(tool_use("Bash", {"command": "true"})))
    ok = one(p.feed(user(tool_result(""))))
    failed = one(p.feed(user(tool_result("", is_error=True))))
    validate_all([ok, failed])
    assert "no output" in ok["summary"] and ok["output"]["success"] is True
    assert "no output" in failed["summary"] and failed["output"]["success"] is False


def test_long_tool_result_summaries_are_cut_at_summary_limit():
    text = ("x" * 1000 + "\n") * 100  # 100 KB, with a 1000-character first line
    p = parser()
    p.feed(assistant(tool_use("Bash", {"command": "cat big"})))
    event = one(p.feed(user(tool_result(text))))
    assert len(event["summary"]) <= sr.SUMMARY_LIMIT
    assert len(event["output"]["summary"]) <= sr.SUMMARY_LIMIT
    assert event["metadata"]["chars"] == len(text)
    assert len(json.dumps(event)) < 5000  # the 100 KB stay out of the event
    validate(event)


def test_long_text_is_cut_in_summary_and_metadata():
    text = "word " * 10_000
    event = one(parser().feed(assistant({"type": "text", "text": text})))
    assert len(event["summary"]) <= sr.SUMMARY_LIMIT
    assert len(event["metadata"]["text"]) <= sr.TEXT_LIMIT
    validate(event)


def test_success_result_line_fills_metrics_and_yields_no_event():
    p = parser()
    assert p.feed(RESULT) == []
    m = p.metrics
    assert m is not None
    assert (m.subtype, m.is_error, m.num_turns, m.duration_ms) == ("success", False, 5, 729)
    assert m.total_cost_usd == pytest.approx(0.000875)
    assert m.session_id == "68c5f753-288e-4eec-b8cc-904845d89cd9"
    assert m.result == "I updated the greeting in README.md and committed it."
    assert m.details() == {
        "cost_usd": pytest.approx(0.000875), "num_turns": 5,
        "session_id": "68c5f753-288e-4eec-b8cc-904845d89cd9", "duration_ms": 729,
    }  # fmt: skip


@pytest.mark.parametrize(
    "subtype", ["error_max_turns", "error_max_budget_usd", "error_during_execution"]
)
def test_error_result_line_fills_metrics_and_yields_one_error_event(subtype):
    line = json.loads(RESULT)
    line.update(subtype=subtype, is_error=True, result="stopped early")
    p = parser()
    event = one(p.feed(json.dumps(line)))
    assert event["type"] == "error"
    assert subtype in event["summary"]
    assert p.metrics.subtype == subtype and p.metrics.is_error
    validate(event)


# Claude Code 2.1.332 with the model answering 500 (CLAUDE_CODE_MAX_RETRIES=0), verbatim:
# a synthetic assistant line, then a result that says "success" and is an error.
API_ERROR_LINES = r"""
{"type":"assistant","message":{"diagnostics":null,"id":"ac534655-9cde-44a0-ac10-b62db6690421","container":null,"model":"<synthetic>","role":"assistant","stop_details":null,"stop_reason":"stop_sequence","stop_sequence":"","type":"message","usage":{"output_tokens_details":null,"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":null,"cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":null,"iterations":null,"speed":null,"fallback_credit":null},"content":[{"type":"text","text":"API Error: 500 the model is down. This is a server-side issue, usually temporary — try again in a moment. If it persists, check your inference gateway (127.0.0.1:45459)."}],"context_management":null},"parent_tool_use_id":null,"session_id":"a8bf2efd-fefb-4441-b2ae-c6c6ffb85d2b","uuid":"fe1bf72d-8a7c-4e89-849d-a6cdd2365af1","timestamp":"2026-12-04T20:23:40.521Z","error":"server_error","request_id":"req_fake_e5faa054cbf54577","is_api_error_message":true,"api_error_status":500,"api_error_type":"api_error"}
{"duration_api_ms":0,"stop_reason":"stop_sequence","session_id":"a8bf2efd-fefb-4441-b2ae-c6c6ffb85d2b","total_cost_usd":0,"usage":{"output_tokens_details":{"thinking_tokens":0},"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard","fallback_credit":null},"modelUsage":{},"permission_denials":[],"terminal_reason":"api_error","fast_mode_state":"off","fast_mode_disabled_reason":"sdk_opt_in_required","subagent_stats":{"spawned":0,"requested":{"background":0,"foreground":0,"unset":0},"started_in_background":0,"max_depth":0,"spawned_by_subagents":0,"completed":0,"failed":0,"killed":{"parent":0,"user":0,"system":0},"refused":{"depth_limit":0,"concurrency_limit":0,"budget":0},"by_type":{}},"safety_stops":0,"is_error":true,"num_turns":1,"subtype":"success","api_error_status":500,"api_error_type":"api_error","result":"API Error: 500 the model is down. This is a server-side issue, usually temporary — try again in a moment. If it persists, check your inference gateway (127.0.0.1:45459).","type":"result","duration_ms":120,"uuid":"39793712-45ed-4ea9-a741-536cc0df60c8","queued_turn_count":0,"result_index":0,"model_usage_since_last_result":{}}
""".strip().splitlines()


def test_api_error_result_with_subtype_success_is_a_failure_in_the_clis_words():
    p = parser()
    events = feed_all(p, API_ERROR_LINES)
    validate_all(events)
    words = "API Error: 500 the model is down. This is a server-side issue, usually temporary"
    assert [e["type"] for e in events] == ["thinking", "error"]
    assert events[1]["summary"].startswith(f"agent stopped: success {words}")
    assert (p.metrics.subtype, p.metrics.is_error) == ("success", True)
    for code in (1, 0):  # is_error decides, whatever the exit code
        failure = sr.agent_failure(sr.AgentRun(exit_code=code, metrics=p.metrics), None)
        assert failure.startswith(f"the agent failed: {words}"), failure


# Claude Code 2.1.332, verbatim: the answer's result, then, once the agent's background
# command ended, the result of the turn the CLI started for it.
TWO_RESULTS = r"""
{"duration_api_ms":1834,"stop_reason":"end_turn","session_id":"ca01c950-e13c-4ef1-8901-c89f2edaedf9","total_cost_usd":0.00028000000000000003,"usage":{"input_tokens":20,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":10,"output_tokens_details":{"thinking_tokens":0},"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard","fallback_credit":null},"modelUsage":{"claude-opus-5-5":{"inputTokens":20,"outputTokens":10,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.00028000000000000003,"contextWindow":1000000,"maxOutputTokens":128000,"thinkingTokens":0,"cacheCreationEphemeral5mInputTokens":0,"cacheCreationEphemeral1hInputTokens":0,"canonicalModel":"claude-opus-5-5","provider":"firstParty","costBasis":"list"}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","fast_mode_disabled_reason":"sdk_opt_in_required","subagent_stats":{"spawned":0,"requested":{"background":0,"foreground":0,"unset":0},"started_in_background":0,"max_depth":0,"spawned_by_subagents":0,"completed":0,"failed":0,"killed":{"parent":0,"user":0,"system":0},"refused":{"depth_limit":0,"concurrency_limit":0,"budget":0},"by_type":{}},"safety_stops":0,"is_error":false,"num_turns":2,"subtype":"success","api_error_status":null,"result":"Started it.","ttft_ms":1527,"type":"result","duration_ms":2579,"uuid":"dfd5f4de-1228-44a9-8772-67f22385660c","ttft_stream_ms":1474,"time_to_request_ms":541,"first_content_frame_ms":1495,"queued_turn_count":0,"result_index":0,"model_usage_since_last_result":{"claude-opus-5-5":{"inputTokens":20,"outputTokens":10,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.00028000000000000003,"contextWindow":1000000,"maxOutputTokens":128000,"thinkingTokens":0,"cacheCreationEphemeral5mInputTokens":0,"cacheCreationEphemeral1hInputTokens":0,"canonicalModel":"claude-opus-5-5","provider":"firstParty","costBasis":"list"}}}
{"duration_api_ms":1852,"stop_reason":"end_turn","session_id":"ca01c950-e13c-4ef1-8901-c89f2edaedf9","total_cost_usd":0.00042,"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":5,"output_tokens_details":{"thinking_tokens":0},"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard","fallback_credit":null},"modelUsage":{"claude-opus-5-5":{"inputTokens":30,"outputTokens":15,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.00042,"contextWindow":1000000,"maxOutputTokens":128000,"thinkingTokens":0,"cacheCreationEphemeral5mInputTokens":0,"cacheCreationEphemeral1hInputTokens":0,"canonicalModel":"claude-opus-5-5","provider":"firstParty","costBasis":"list"}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","fast_mode_disabled_reason":"sdk_opt_in_required","origin":{"kind":"task-notification","producer":"session-task","runId":"0mx9frvxd-2c3cda6e"},"subagent_stats":{"spawned":0,"requested":{"background":0,"foreground":0,"unset":0},"started_in_background":0,"max_depth":0,"spawned_by_subagents":0,"completed":0,"failed":0,"killed":{"parent":0,"user":0,"system":0},"refused":{"depth_limit":0,"concurrency_limit":0,"budget":0},"by_type":{}},"safety_stops":0,"is_error":false,"num_turns":1,"subtype":"success","api_error_status":null,"result":"Done.","ttft_ms":60,"type":"result","duration_ms":110,"uuid":"29dc9d6d-44d7-4f10-b58a-6e426f4807fa","ttft_stream_ms":59,"time_to_request_ms":52,"first_content_frame_ms":59,"queued_turn_count":0,"result_index":1,"model_usage_since_last_result":{"claude-opus-5-5":{"inputTokens":10,"outputTokens":5,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.00014000000000000001,"contextWindow":1000000,"maxOutputTokens":128000,"thinkingTokens":0,"cacheCreationEphemeral5mInputTokens":0,"cacheCreationEphemeral1hInputTokens":0,"canonicalModel":"claude-opus-5-5","provider":"firstParty","costBasis":"list"}}}
""".strip().splitlines()


def test_a_second_result_line_adds_its_turns_and_usage_and_gives_the_sessions_cost():
    p = parser()
    assert feed_all(p, TWO_RESULTS) == []
    m = p.metrics
    assert (m.subtype, m.is_error, m.result) == ("success", False, "Done.")
    assert (m.num_turns, m.duration_ms) == (2 + 1, 2579 + 110)
    assert m.usage == {"input_tokens": 30, "output_tokens": 15, "cache_creation_input_tokens": 0,
                       "cache_read_input_tokens": 0}  # fmt: skip
    assert m.total_cost_usd == pytest.approx(0.00042)  # the session's, not the turn's


def test_a_second_result_line_without_usage_leaves_the_parsers_own_count():
    p = parser()
    second = json.loads(TWO_RESULTS[1])
    del second["usage"], second["num_turns"]
    feed_all(p, [TWO_RESULTS[0], json.dumps(second)])
    assert p.metrics.usage is None and p.metrics.num_turns is None
    assert p.report(5)["usage"] == p.usage  # what the assistant lines said


@pytest.mark.parametrize(
    "line",
    [
        '{"type": "result", "subtype": "success", "num_turns": 1e999}',
        '{"type": "result", "subtype": "success", "duration_ms": -1e999}',
        '{"type": "result", "subtype": "success", "total_cost_usd": 1' + "0" * 400 + "}",
    ],
    ids=["num_turns-1e999", "duration_ms--1e999", "cost-400-digit-integer"],
)
def test_result_line_with_out_of_range_numbers_does_not_raise(line):
    # Valid JSON (RFC 8259 puts no bound on numbers): Python reads 1e999 as
    # inf and the 400-digit integer as an int no float can hold.
    p = parser()
    events = p.feed(line)
    validate_all(events)
    assert p.metrics is not None or len(events) == 1


def test_deeply_nested_tool_use_id_does_not_raise():
    # json.loads accepts nesting close to the recursion limit; the parser
    # must not then fail on the structure it was given.
    nested = "[" * 600 + "]" * 600
    line = (
        '{"type": "assistant", "message": {"content": [{"type": "tool_use", "id": '
        + nested
        + ', "name": "Bash", "input": {"command": "ls"}}]}}'
    )
    validate_all(parser().feed(line))


def test_invalid_json_line_yields_one_error_event():
    event = one(parser().feed(b'{"type": "assistant", "message": '))
    assert event["type"] == "error"
    validate(event)


def test_invalid_utf8_line_yields_one_error_event():
    event = one(parser().feed(b'{"type": "assistant"}\xff\xfe'))
    assert event["type"] == "error"
    validate(event)


@pytest.mark.parametrize("line", [b"", b"\n", "   \n", b"[1, 2]", b'"text"', b"42", b"null"])
def test_blank_or_non_object_lines_yield_nothing(line):
    assert parser().feed(line) == []


@pytest.mark.parametrize(
    "line",
    [
        json.dumps({"type": "stream_event", "event": {}}),
        json.dumps({"type": "assistant"}),
        json.dumps({"type": "assistant", "message": "text"}),
        json.dumps({"type": "user", "message": {"content": "plain prompt text"}}),
        json.dumps({"type": "assistant", "message": {"content": [1, None, "x", {"type": "?"}]}}),
    ],
    ids=["unknown-type", "no-message", "message-string", "user-string", "odd-blocks"],
)
def test_unknown_or_odd_lines_yield_nothing(line):
    assert parser().feed(line) == []


def test_whole_sample_gives_events_in_order_with_increasing_sequences():
    p = parser()
    events = feed_all(p, SAMPLE)
    assert [e["type"] for e in events] == [
        "thinking",
        "tool_call", "tool_result",
        "tool_call", "tool_result",
        "tool_call", "tool_result",
        "tool_call", "tool_result",
        "thinking",
    ]  # fmt: skip
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    validate_all(events)
    assert p.last_text == "I updated the greeting in README.md and committed it."
    assert p.metrics is not None and p.metrics.subtype == "success"


def test_sequence_keeps_increasing_across_errors_and_skipped_lines():
    p = parser()
    events = feed_all(p, [TEXT, b"garbage", SYSTEM, b"", READ, b"{", RESULT, FINAL_TEXT])
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    validate_all(events)


# ---------------------------------------------------------------------------
# redaction
# ---------------------------------------------------------------------------

TOKEN = "ghs_" + "0123456789abcdef" * 2 + "a1b2"


def assert_absent(events: list[dict], secret: str, window: int = 8) -> None:
    """Neither `secret` nor any `window`-character piece of it is in any field."""
    dumped = json.dumps(events, ensure_ascii=False)
    assert secret not in dumped
    for i in range(len(secret) - window + 1):
        piece = secret[i : i + window]
        assert piece not in dumped, f"{piece!r} of the secret leaked: {dumped[:2000]}"


def lines_carrying(text: str) -> list[str]:
    """Every place agent output can carry `text` into an event."""
    return [
        assistant({"type": "text", "text": f"I will use {text} now"}),
        assistant({"type": "thinking", "thinking": f"maybe {text}"}),
        assistant(
            tool_use(
                "Bash",
                {"command": f"curl -H 'x: {text}' https://h", "description": text},
                "toolu_1",
            )
        ),
        user(tool_result(f"Exit code 1\nerror near {text}", "toolu_1", is_error=True)),
        assistant(tool_use("Write", {"file_path": "/tmp/x", "content": text}, "toolu_2")),
        user(tool_result([{"type": "text", "text": f"wrote {text}"}], "toolu_2")),
        assistant(tool_use("Grep", {"pattern": text, "path": "."}, "toolu_3")),
        assistant(tool_use("WebFetch", {"url": f"https://h/?t={text}"}, "toolu_4")),
        json.dumps(
            {
                "type": "result",
                "subtype": "error_during_execution",
                "is_error": True,
                "result": f"failed with {text}",
            }
        ),
    ]


def test_task_token_never_appears_in_any_event():
    p = parser(TOKEN)
    events = feed_all(p, lines_carrying(TOKEN))
    assert len(events) == 9
    validate_all(events)
    assert_absent(events, TOKEN)


CREDENTIALS = {
    "ghp": ("ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", None),
    "github_pat": ("github_pat_11ABCDEFG0" + "x7Yz" * 20 + "Qq", None),
    "sk-ant": ("sk-ant-api03-" + "Zx9_Yw8-Vu7" * 8 + "AA", None),
    "bearer": ("Authorization: Bearer s3cr3tBearerValue42", "s3cr3tBearerValue42"),
    "url-credentials": ("https://deploy:hunter2hunter2@git.example.com/r", "deploy:hunter2hunter2"),
}


@pytest.mark.parametrize("credential", CREDENTIALS.values(), ids=CREDENTIALS.keys())
def test_credential_shaped_strings_never_appear_in_any_event(credential):
    text, secret = credential
    events = feed_all(parser(), lines_carrying(text))
    validate_all(events)
    assert_absent(events, secret or text)


def pad(width: int) -> str:
    """`width` characters ending in a space, as before a word in a command line."""
    return "y" * (width - 1) + " "


LONG_LIMITS = {
    # where a long value is cut, and a line that puts `text` at character `at` of it
    "tool-result-output": (
        sr.SUMMARY_LIMIT,
        lambda text, at: user(tool_result(pad(at) + text + "z" * 100_000, "toolu_1")),
    ),
    "tool-result-second-line": (
        sr.SUMMARY_LIMIT,
        lambda text, at: user(
            tool_result("head\n" + pad(at - 5) + text + "z" * 100_000, "toolu_1")
        ),
    ),
    "thinking-text": (
        sr.TEXT_LIMIT,
        lambda text, at: assistant({"type": "text", "text": pad(at) + text + "z" * 100_000}),
    ),
    "bash-command": (
        sr.INPUT_STRING_LIMIT,
        lambda text, at: assistant(tool_use("Bash", {"command": pad(at) + text}, "toolu_1")),
    ),
    "bash-description": (
        sr.INPUT_STRING_LIMIT,
        lambda text, at: assistant(
            tool_use("Bash", {"command": "ls", "description": pad(at) + text}, "toolu_1")
        ),
    ),
}


@pytest.mark.parametrize("kept", [9, 12, 20, 30])
@pytest.mark.parametrize("where", LONG_LIMITS.values(), ids=LONG_LIMITS.keys())
def test_token_at_the_cut_position_does_not_leak_a_piece(where, kept):
    # The token starts `kept` characters before the cut: a cut made before
    # redacting would leave a prefix the redactor no longer recognises.
    limit, make = where
    p = parser(TOKEN)
    p.feed(assistant(tool_use("Bash", {"command": "cat big"}, "toolu_1")))
    events = p.feed(make(TOKEN, limit - 1 - kept))
    assert events
    validate_all(events)
    assert_absent(events, TOKEN)


@pytest.mark.parametrize("kept", [12, 20])
@pytest.mark.parametrize("credential", ["ghp", "sk-ant"])
def test_credential_at_the_bash_input_cut_position_does_not_leak_a_piece(credential, kept):
    text, _ = CREDENTIALS[credential]
    at = sr.INPUT_STRING_LIMIT - 1 - kept
    events = parser().feed(assistant(tool_use("Bash", {"command": pad(at) + text})))
    validate_all(events)
    assert_absent(events, text)


# ---------------------------------------------------------------------------
# describe_tool
# ---------------------------------------------------------------------------


def test_describe_grep_names_the_pattern():
    summary, condensed = sr.describe_tool("Grep", {"pattern": "TODO", "path": "src"})
    assert summary == "Searching for TODO"
    assert condensed == {"pattern": "TODO", "path": "src"}


def test_describe_glob_names_the_pattern():
    summary, condensed = sr.describe_tool("Glob", {"pattern": "**/*.py"})
    assert summary == "Finding files **/*.py"
    assert condensed == {"pattern": "**/*.py"}


def test_describe_write_gives_path_and_size_not_contents():
    content = "secret file contents\n" * 100
    summary, condensed = sr.describe_tool("Write", {"file_path": "src/a.py", "content": content})
    assert summary == "Writing src/a.py"
    assert condensed == {"file_path": "src/a.py", "chars": len(content)}


def test_describe_multiedit_sums_the_edits_without_contents():
    edits = [{"old_string": "a", "new_string": "bb"}, {"old_string": "ccc", "new_string": ""}]
    summary, condensed = sr.describe_tool("MultiEdit", {"file_path": "f.py", "edits": edits})
    assert summary == "Editing f.py"
    assert condensed == {"file_path": "f.py", "edits": 2, "old_chars": 4, "new_chars": 2}


def test_describe_unknown_tool_says_using_it_and_condenses_the_input():
    args = {"text": "t" * 1000, "nested": {"a": {"b": {"c": {"d": 1}}}}, "many": list(range(100))}
    summary, condensed = sr.describe_tool("Frobnicate", args)
    assert summary == "Using Frobnicate"
    assert len(condensed["text"]) == sr.INPUT_STRING_LIMIT
    assert len(condensed["many"]) == 20
    assert "{…}" in json.dumps(condensed, ensure_ascii=False)


def test_describe_tool_with_non_string_arguments_does_not_raise():
    for name in ("Read", "Edit", "Write", "Bash", "Grep", "Glob", "WebFetch", "Task", "X"):
        summary, condensed = sr.describe_tool(
            name, {"file_path": 3, "command": ["x"], "pattern": None}
        )
        assert isinstance(summary, str) and isinstance(condensed, dict)


# ---------------------------------------------------------------------------
# properties: whatever the agent prints, feed never raises and events validate
# ---------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


def shaped(key_values: dict) -> st.SearchStrategy:
    """A dict that has the keys of stream-json messages, with any values."""
    return st.fixed_dictionaries({}, optional={k: v for k, v in key_values.items()})


BLOCKS = shaped(
    {
        "type": st.sampled_from(["text", "thinking", "tool_use", "tool_result", "image"])
        | JSON_VALUES,
        "text": st.text() | JSON_VALUES,
        "thinking": st.text() | JSON_VALUES,
        "id": st.sampled_from(["toolu_0", "toolu_1"]) | JSON_VALUES,
        "tool_use_id": st.sampled_from(["toolu_0", "toolu_1"]) | JSON_VALUES,
        "name": st.sampled_from(["Read", "Edit", "MultiEdit", "Write", "Bash", "Grep", "Task"])
        | JSON_VALUES,
        "input": st.dictionaries(
            st.sampled_from(
                [
                    "file_path",
                    "command",
                    "old_string",
                    "new_string",
                    "edits",
                    "content",
                    "pattern",
                    "description",
                ]
            ),
            JSON_VALUES,
        )
        | JSON_VALUES,
        "content": st.text()
        | st.lists(shaped({"type": st.just("text"), "text": JSON_VALUES}))
        | JSON_VALUES,
        "is_error": JSON_VALUES,
    }
)
MESSAGES = shaped(
    {
        "type": st.sampled_from(["assistant", "user", "result", "system"]) | JSON_VALUES,
        "message": shaped({"content": st.lists(BLOCKS, max_size=4) | JSON_VALUES}) | JSON_VALUES,
        "subtype": st.sampled_from(["success", "error_max_turns"]) | JSON_VALUES,
        "is_error": JSON_VALUES,
        "result": JSON_VALUES,
        "num_turns": JSON_VALUES,
        "total_cost_usd": JSON_VALUES,
        "duration_ms": JSON_VALUES,
        "session_id": JSON_VALUES,
    }
)

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.lists(st.binary(max_size=300), max_size=5))
def test_feeding_arbitrary_bytes_never_raises_and_events_validate(lines):
    p = parser(TOKEN)
    events = feed_all(p, lines)
    validate_all(events)


@PROPERTY
@given(st.lists(MESSAGES | JSON_VALUES, max_size=6))
def test_feeding_arbitrary_json_never_raises_and_events_validate(messages):
    p = parser(TOKEN)
    events = feed_all(p, [json.dumps(m) for m in messages])
    validate_all(events)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))


@PROPERTY
@given(st.lists(st.sampled_from(SAMPLE) | st.binary(max_size=50), max_size=12))
def test_sample_lines_mixed_with_garbage_keep_sequences_and_validate(lines):
    events = feed_all(parser(), lines)
    validate_all(events)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
