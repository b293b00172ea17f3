#!/bin/bash
# A stand-in for the Claude Code CLI (SHEPHERD_CLAUDE_BIN) for bench/pipeline.py.
# First thing, it writes the wall-clock time of its exec to $BENCH_EXEC_STAMP
# (bash's $EPOCHREALTIME needs no fork, unlike `date`), then prints the
# stream-json of a run that changed nothing and exits.
printf '%s\n' "$EPOCHREALTIME" >"$BENCH_EXEC_STAMP"
printf '%s\n' \
    '{"type":"system","subtype":"init","session_id":"bench"}' \
    '{"type":"assistant","message":{"content":[{"type":"text","text":"Nothing to change."}]}}' \
    '{"type":"result","subtype":"success","is_error":false,"num_turns":1,"result":"Nothing to change.","session_id":"bench"}'
