"""Request traces: arrival time, prompt and output lengths, and a shared prefix, one request a line.

JSONL: `{"t": 0.25, "prompt": 900, "output": 120, "prefix": "sys-3", "prefix_tokens": 600}`; CSV: a header
`t,prompt,output,prefix,prefix_tokens` and one row each (`prefix` and `prefix_tokens` may be empty). Held as
columns (plain lists) rather than one object per request, so a million requests stay cheap.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TraceError(ValueError):
    pass


@dataclass
class Trace:
    t: list[float] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    prefix: list[int] = field(default_factory=list)  # interned prefix id, -1: none
    prefix_tokens: list[int] = field(default_factory=list)
    names: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.t)

    def append(self, t: float, prompt: int, output: int, prefix: str | None = None, prefix_tokens: int = 0) -> None:
        if not (math.isfinite(t) and t >= 0) or prompt < 0 or output < 0 or not 0 <= prefix_tokens <= prompt:
            raise TraceError(f"request {len(self.t) + 1}: bad values (t={t}, prompt={prompt}, output={output}, "
                             f"prefix_tokens={prefix_tokens})")
        self.t.append(t)
        self.prompt.append(prompt)
        self.output.append(output)
        self.prefix.append(self.names.setdefault(prefix, len(self.names)) if prefix else -1)
        self.prefix_tokens.append(prefix_tokens if prefix else 0)

    def sorted(self) -> Trace:
        """The same requests in order of arrival (a trace file need not be)."""
        if all(a <= b for a, b in zip(self.t, self.t[1:], strict=False)):
            return self
        order = sorted(range(len(self.t)), key=self.t.__getitem__)
        return Trace([self.t[i] for i in order], [self.prompt[i] for i in order], [self.output[i] for i in order],
                     [self.prefix[i] for i in order], [self.prefix_tokens[i] for i in order], self.names)


def _row(tr: Trace, d: dict[str, Any]) -> None:
    try:
        tr.append(float(d["t"]), int(d["prompt"]), int(d["output"]), str(d["prefix"]) if d.get("prefix") else None,
                  int(d.get("prefix_tokens") or 0))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, TraceError):
            raise
        raise TraceError(f"request {len(tr) + 1}: needs t, prompt and output ({e})") from None


def read_trace(path: Path) -> Trace:
    tr = Trace()
    with path.open(newline="") as f:
        if path.suffix == ".csv":
            for d in csv.DictReader(f):
                _row(tr, dict(d))
        else:
            for line in f:
                if line.strip():
                    try:
                        _row(tr, json.loads(line))
                    except json.JSONDecodeError as e:
                        raise TraceError(f"request {len(tr) + 1}: not JSON ({e.msg})") from None
    if not tr.t:
        raise TraceError(f"{path}: no requests")
    return tr.sorted()


def write_trace(tr: Trace, path: Path) -> None:
    names = {v: k for k, v in tr.names.items()}
    with path.open("w") as f:
        for i in range(len(tr)):
            d: dict[str, Any] = {"t": round(tr.t[i], 4), "prompt": tr.prompt[i], "output": tr.output[i]}
            if tr.prefix[i] >= 0:
                d["prefix"], d["prefix_tokens"] = names[tr.prefix[i]], tr.prefix_tokens[i]
            f.write(json.dumps(d) + "\n")


def generate(kind: str, requests: int, duration_s: float, seed: int = 0, prefixes: int = 16) -> Trace:
    """`diurnal`: one smooth day-like wave over `duration_s` (trough at 10% of the peak); `bursty`: a quiet base
    with bursts of 3x for five minutes of every twenty. Poisson arrivals, `requests` of them in all."""
    rng = random.Random(seed)
    if kind == "diurnal":
        def rate(t: float) -> float:
            return 0.55 - 0.45 * math.cos(2 * math.pi * t / duration_s)
    elif kind == "bursty":
        def rate(t: float) -> float:
            return 3.0 if (t % 1200.0) < 300.0 else 1.0
    else:
        raise TraceError(f"unknown trace kind {kind!r} (diurnal or bursty)")
    peak = max(rate(duration_s * i / 1000) for i in range(1000))
    mean = sum(rate(duration_s * i / 1000) for i in range(1000)) / 1000
    lam = requests / duration_s / mean * peak  # thinning: candidates at the peak rate, kept with rate/peak
    tr, t = Trace(), 0.0
    while len(tr) < requests:
        t += rng.expovariate(lam)
        if rng.random() * peak > rate(t % duration_s):
            continue
        shared = rng.random() < 0.6
        prompt = int(rng.lognormvariate(6.2, 0.8)) + 1
        head = rng.randrange(prefixes)
        tr.append(t, prompt + (400 if shared else 0), max(1, int(rng.lognormvariate(4.6, 0.7))),
                  f"sys-{head}" if shared else None, 400 if shared else 0)
    return tr
