"""What mid-stream resume costs the gateway while nothing fails: relaying one SSE event of an LLM stream.

One command: `python bench/resume_relay.py [--quick]`. Side by side, in the same process and rounds (order
alternating), the gateway's two relays of a streamed chat answer are fed the same chunk stream: the plain one
(`proxy._UsageStripper`, what a stream used before resume: it takes the usage chunk out) and the resumable one
(`resume.StreamLog`: also strips each event's token report and keeps the events it would need to continue the
answer). Each round relays N events (one event per network chunk, the common case, with a usage chunk and
`[DONE]` at the end); the metric is microseconds per event. Rows: median over rounds with min-max; the ratio is
per round. Results: bench/results/resume_relay.json and a table. This is the gateway's own CPU per token; the
replica's extra cost (one JSON comment line per chunk) is not in it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ballast.gateway.proxy import Outcome, _UsageStripper
from ballast.gateway.resume import StreamLog, resume_plan
from bench._common import print_ratios, print_table, ratio_stats, summarize, write_results


def _events(n: int, report: bool) -> list[bytes]:
    base = {"id": "chatcmpl-0123456789abcdef01234567", "object": "chat.completion.chunk", "created": 1764660000,
            "model": "smollm2", "usage": None}
    out = []
    for i in range(n):
        chunk = {**base, "choices": [{"index": 0, "delta": {"content": f" word{i % 97}"}, "logprobs": None,
                                      "finish_reason": None}]}
        head = f': ballast {{"ids":[{1000 + i % 500}],"p":57}}\n'.encode() if report else b""
        out.append(head + b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    usage = {**base, "choices": [], "usage": {"prompt_tokens": 57, "completion_tokens": n, "total_tokens": 57 + n}}
    tail = b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n"
    out.append((b': ballast {"ids":[]}\n' if report else b"") + tail)
    out.append(b"data: [DONE]\n\n")
    return out


def _plain(events: list[bytes]) -> float:
    relay = _UsageStripper(Outcome())
    t = time.perf_counter()
    for e in events:
        relay.feed(e)
    return (time.perf_counter() - t) / len(events) * 1e6


def _resumable(events: list[bytes]) -> float:
    plan = resume_plan("chat_completions", {"stream": True, "messages": []}, True, 3, {})
    assert plan is not None
    log = StreamLog(plan, Outcome(), strip_usage=True)
    t = time.perf_counter()
    for e in events:
        log.feed(e)
    took = (time.perf_counter() - t) / len(events) * 1e6
    assert log.done and log.outcome.usage is not None
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and events")
    args = ap.parse_args()
    rounds, n = (5, 2000) if args.quick else (15, 20000)
    plain_events, report_events = _events(n, False), _events(n, True)
    plain: list[float] = []
    resumable: list[float] = []
    for r in range(rounds):
        order = [(_plain, plain_events, plain), (_resumable, report_events, resumable)]
        for fn, events, into in (order if r % 2 == 0 else order[::-1]):
            into.append(fn(events))
    rows = [{"system": "plain relay (usage stripped)", "metric": "relay per event", **summarize(plain), "unit": "us"},
            {"system": "resumable relay", "metric": "relay per event", **summarize(resumable), "unit": "us"}]
    ratios = {"resumable / plain": ratio_stats(resumable, plain)}
    print_table(rows)
    print_ratios(ratios, {})
    out = write_results("resume_relay", {"rounds": rounds, "events": n + 2}, rows, ratios)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
