"""The agent of one Ray pool: `python -m ballast.backends.ray_agent --address ADDR ...`.

Ray connects a process to one cluster, so the platform connects to none: each Ray pool's backend
(`ballast.backends.ray.RayBackend`) starts one of these as its child, and it holds that pool's connection
(`RayCluster`). It answers the backend's calls, one JSON line each on stdin and stdout (`ray_wire`), each in a
thread of its own so a slow start never holds an inspection back. Only the parent holds the pipe: when the
parent goes, even by kill -9, stdin ends and the agent exits; the replicas' detached actors keep running, for
the next agent to re-adopt. Anything Ray prints goes to stderr, never into the protocol.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from ballast.backends import ray_wire as wire
from ballast.backends.ray_cluster import RayCluster

WORKERS = 32


def _call(cluster: RayCluster, op: str, args: dict[str, Any]) -> Any:
    if op == "ping":
        cluster.ping()
        return None
    if op == "fits":
        return cluster.fits(wire.spec_of(args["spec"]))
    if op == "start":
        return wire.handle_to(cluster.start(wire.spec_of(args["spec"])))
    if op == "stop":
        cluster.stop(wire.handle_of(args["handle"]), float(args["grace_s"]))
        return None
    if op == "list":
        return [wire.handle_to(h) for h in cluster.list()]
    if op == "inspect":
        return wire.status_to(cluster.inspect(wire.handle_of(args["handle"])))
    if op == "logs":
        return cluster.logs(wire.handle_of(args["handle"]), int(args["tail"]))
    raise ValueError(f"unknown call {op!r}")


class Agent:
    def __init__(self, cluster: RayCluster, out: IO[bytes]):
        self.cluster = cluster
        self.out = out
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = wire.encode(message)
        with self.lock:
            self.out.write(data)
            self.out.flush()

    def answer(self, message: dict[str, Any]) -> None:
        try:
            self.send({"id": message["id"], "ok": _call(self.cluster, str(message.get("op")),
                                                        dict(message.get("args") or {}))})
        except Exception as e:
            self.send({"id": message["id"], "error": f"{type(e).__name__}: {e}"})

    def serve(self, calls: IO[bytes]) -> None:
        """Until stdin ends; calls still running then are abandoned (the caller is gone)."""
        pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="ballast-ray-call")
        # Pings apart: a pool busy with slow stops must still say it is alive, or it would be failed over.
        pings = ThreadPoolExecutor(2, thread_name_prefix="ballast-ray-ping")
        for line in calls:
            try:
                message = wire.decode(line)
            except ValueError as e:
                logging.getLogger("ballast.backends.ray_agent").warning("bad call: %s", e)
                continue
            (pings if message.get("op") == "ping" else pool).submit(self.answer, message)


def _watch_parent() -> None:
    """Leave when the parent is gone, even while connecting (stdin is not read yet then)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="ballast-ray-agent-parent").start()


def reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once when nothing listens at a HOST:PORT address (Ray itself would retry for a minute and more)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", ray://...: left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--address", required=True)
    ap.add_argument("--instance", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--logs-dir", required=True)
    ap.add_argument("--command", required=True, help="the replica command, a JSON list")
    ap.add_argument("--extra-args", default="[]", help="JSON list")
    ap.add_argument("--start-timeout", type=float, default=None)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the platform's to handle
    _watch_parent()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else writes to stdout lands in the agent's log
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        reachable(a.address)
        cluster = RayCluster(a.instance, address=a.address, logs_dir=Path(a.logs_dir), command=json.loads(a.command),
                             extra_args=json.loads(a.extra_args), name=a.name, start_timeout_s=a.start_timeout)
    except Exception as e:
        out.write(wire.encode({"id": wire.HELLO, "error": f"{type(e).__name__}: {e}"}))
        out.flush()
        os._exit(1)
    agent = Agent(cluster, out)
    agent.send({"id": wire.HELLO, "ok": {"pid": os.getpid()}})
    agent.serve(sys.stdin.buffer)
    os._exit(0)  # the parent is gone: leave at once (Ray's shutdown hooks may wait on a lost cluster)


if __name__ == "__main__":
    main()
