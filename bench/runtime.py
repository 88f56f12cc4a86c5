"""Runtime overhead: examples/echo under `ballast serve` vs a bare Starlette app vs BentoML.

One command: `python bench/runtime.py [--quick]`. All servers run at once, pinned to CPU 0; wrk
(one thread, pinned to CPU 1) drives them in interleaved rounds (A B C D A B C D ...) with the same
payload, concurrency and duration. Reports requests/s and p50/p99 latency, medians and min-max
over rounds, and ratios against the bare app and BentoML.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, VENVS, Proc, free_port, print_table, running, summarize, write_results  # noqa: E402

PAYLOAD = {"text": "hello ballast", "numbers": [1, 2, 3, 4, 5], "nested": {"a": True, "b": None}}
LUA = """
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("JSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, "
    .. "\\"errors\\": %d}}\\n", summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def bentoml_python() -> Path:
    py = VENVS / "bentoml" / "bin" / "python"
    if not py.exists():
        print("installing BentoML into bench/.venvs/bentoml ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENVS / "bentoml")], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "bentoml"], check=True)
    return py


def wrk(url: str, script: Path, conns: int, seconds: float) -> dict:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    m = re.search(r"^JSON (\{.*\})$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "errors": r["errors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="about a minute")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--no-bentoml", action="store_true")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")
    rounds = a.rounds or (3 if a.quick else 5)
    seconds = a.seconds or (3 if a.quick else 8)
    conc = [32] if a.quick else [16, 64]
    tmp = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    body = json.dumps(PAYLOAD)
    scripts = {"plain": tmp / "plain.lua", "bentoml": tmp / "bentoml.lua"}
    scripts["plain"].write_text(LUA.format(body=body))
    scripts["bentoml"].write_text(LUA.format(body=json.dumps({"inputs": PAYLOAD})))
    uv = [sys.executable, "-m", "uvicorn", "--no-access-log", "--log-level", "warning", "--app-dir", str(ROOT / "bench")]
    ports = {k: free_port() for k in ("ballast", "bare-threadpool", "bare-inline", "bentoml")}
    procs = {
        "ballast": Proc([sys.executable, "-m", "ballast.cli.main", "serve", str(ROOT / "examples" / "echo"),
                         "--port", str(ports["ballast"]), "--no-isolation"], cpu="0", env={"BALLAST_LOG_LEVEL": "WARNING"},
                        log=tmp / "ballast.log"),
        "bare-threadpool": Proc([*uv, "peers.bare_echo:threadpool", "--port", str(ports["bare-threadpool"])], cpu="0",
                                log=tmp / "bare-threadpool.log"),
        "bare-inline": Proc([*uv, "peers.bare_echo:inline", "--port", str(ports["bare-inline"])], cpu="0",
                            log=tmp / "bare-inline.log"),
    }
    ready = {"ballast": "/health/ready", "bare-threadpool": "/ready", "bare-inline": "/ready"}
    if not a.no_bentoml:
        py = bentoml_python()
        procs["bentoml"] = Proc([str(py), "-m", "bentoml", "serve", "bentoml_echo:Echo", "--port", str(ports["bentoml"]),
                                 "--host", "127.0.0.1"], cpu="0", cwd=ROOT / "bench" / "peers",
                                log=tmp / "bentoml.log", env={"BENTOML_DO_NOT_TRACK": "true"})
        ready["bentoml"] = "/readyz"
    samples: dict[tuple[str, int], list[dict]] = {}
    with running(list(procs.values())):
        for name, p in procs.items():
            p.wait_http(f"http://127.0.0.1:{ports[name]}{ready[name]}", timeout=300)
        for name in procs:  # warm up
            wrk(f"http://127.0.0.1:{ports[name]}/predict", scripts["bentoml" if name == "bentoml" else "plain"], 8, 1)
        for r in range(rounds):
            for c in conc:
                for name in procs:
                    res = wrk(f"http://127.0.0.1:{ports[name]}/predict",
                              scripts["bentoml" if name == "bentoml" else "plain"], c, seconds)
                    samples.setdefault((name, c), []).append(res)
                    print(f"round {r + 1}/{rounds} c={c} {name}: {res['rps']:.0f} req/s p50 {res['p50_ms']:.2f} ms "
                          f"p99 {res['p99_ms']:.2f} ms errors {res['errors']}", flush=True)
    rows = []
    med: dict[tuple[str, int, str], float] = {}
    for (name, c), rs in samples.items():
        for metric, unit in (("rps", "req/s"), ("p50_ms", "ms"), ("p99_ms", "ms")):
            s = summarize([x[metric] for x in rs])
            med[(name, c, metric)] = s["median"]
            rows.append({"system": name, "metric": f"{metric}@c{c}", **s, "unit": unit})
        rows.append({"system": name, "metric": f"errors@c{c}", **summarize([x["errors"] for x in rs]), "unit": "count"})
    ratios = {}
    for c in conc:
        for peer in ("bare-threadpool", "bare-inline", "bentoml"):
            if (peer, c, "rps") in med:
                ratios[f"ballast/{peer} rps@c{c}"] = med[("ballast", c, "rps")] / med[(peer, c, "rps")]
                ratios[f"ballast/{peer} p50@c{c}"] = med[("ballast", c, "p50_ms")] / med[(peer, c, "p50_ms")]
    params = {"rounds": rounds, "seconds": seconds, "concurrency": conc, "payload": PAYLOAD, "wrk_threads": 1,
              "pinning": "servers on CPU 0, wrk on CPU 1", "uvicorn": "same uvicorn, auto loop/http (uvloop, httptools)",
              "bentoml_workers": 1}
    out = write_results("runtime", params, rows, ratios)
    print()
    print_table(rows)
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
