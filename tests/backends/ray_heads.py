"""Ray head nodes started by tests: each on its own free ports and temp dir, and stopped by killing exactly its
own processes (those whose environment carries its token: Ray's, its workers' and the replicas they started),
never with `ray stop`, which would stop every Ray cluster on the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

PORT_OPTIONS = ("--node-manager-port", "--object-manager-port",
                "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                "--metrics-export-port")


def marked_pids(token: str) -> list[int]:
    """Processes whose environment carries `token`: one cluster's and nothing else on the machine."""
    out = []
    needle = f"BALLAST_TEST_RAY={token}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


class RayHead:
    """One single-node Ray cluster on loopback."""

    def __init__(self, num_cpus: int = 1, memory_gib: int = 4, resources: dict[str, float] | None = None):
        self.token = os.urandom(6).hex()
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths stay under 108 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.num_cpus, self.memory_gib = num_cpus, memory_gib
        self.resources = dict(resources or {})  # custom resources its node declares

    def start(self) -> RayHead:
        # TMPDIR: the replica actors' private directories (package copy, replica.log) go inside `temp`, so actors
        # killed with the cluster leave nothing in the system temp directory.
        env = {**os.environ, "BALLAST_TEST_RAY": self.token, "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": self.temp}
        cmd = [shutil.which("ray") or "ray", "start", "--head", f"--port={self.port}", f"--num-cpus={self.num_cpus}",
               "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp}",
               f"--memory={self.memory_gib * 2**30}", f"--object-store-memory={100 * 2**20}", "--disable-usage-stats",
               *[f"{opt}={free_port()}" for opt in PORT_OPTIONS]]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        out = subprocess.run(cmd, env=env, capture_output=True, timeout=180)
        if out.returncode:
            self.close()
            raise AssertionError(f"ray start failed ({out.returncode}):\n{out.stderr.decode()[-3000:]}")
        return self

    def kill(self) -> None:
        """The whole cluster goes at once, as when its machine is lost (SIGKILL, no goodbye)."""
        for _ in range(3):
            pids = marked_pids(self.token)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.5)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


LIST_ACTORS = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="ballast", log_to_driver=False, logging_level="ERROR")
print(json.dumps(sorted(a for a in ray.util.list_named_actors() if a.startswith("ballast-"))))
"""


def ballast_actors(address: str) -> list[str]:
    """The named Ballast actors of a cluster, read by a Ray driver of its own (a process per cluster)."""
    out = subprocess.run([sys.executable, "-c", LIST_ACTORS, address], capture_output=True, timeout=120, check=True,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    return list(json.loads(out.stdout.decode().strip().splitlines()[-1]))
