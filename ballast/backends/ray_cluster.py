"""One Ray cluster's replicas, as seen from the process connected to it (the pool's agent, `ray_agent`):
one detached, named actor per replica (namespace `ballast`).

The actor asks Ray for what the package's `resources` ask (cpu -> num_cpus, memory -> memory, an
accelerator -> num_gpus plus Ray's `accelerator_type:KIND`, or a custom resource named KIND when
nodes declare one), so Ray places it on a node that has them; `fits` says why not when no node has
them free (or has them at all), and the replica stays pending with that reason, as a local one does,
instead of waiting in Ray's queue. The package travels
as tar.gz bytes through the object store. Actors are detached and named
`ballast-<instance>-<replica>-<nonce>`: a platform that was killed finds them again by the name kept
in the replica's handle (`ray.get_actor`). Each inspection also copies the replica's new log lines
into `<logs_dir>/<deployment>/v<version>-<replica>.log`, so `ballast logs` reads Ray replicas as it
reads local ones.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import tarfile
import time
from pathlib import Path
from typing import Any

from ballast.backends.base import ReplicaHandle, ReplicaSpec, ReplicaStatus
from ballast.backends.local import default_command, rotate_file, tail_file
from ballast.backends.ray_actor import ReplicaActor
from ballast.backends.resources import GENERIC_ACCELERATORS
from ballast.config import ResourcesConfig
from ballast.home import ballast_home

log = logging.getLogger("ballast.backends.ray_cluster")
NAMESPACE = "ballast"
CALL_TIMEOUT_S = 15.0
RECENT_S = 5.0


def _requirements(req: ResourcesConfig, custom: bool) -> dict[str, float]:
    """Ray resources for one replica; `custom`: the accelerator as a custom resource named after its kind."""
    need: dict[str, float] = {"CPU": req.cpu}
    if req.memory_bytes:
        need["memory"] = float(req.memory_bytes)
    if req.accelerator:
        kind = req.accelerator.partition(":")[0]
        if custom:
            need[kind] = float(req.accelerator_count)
        else:
            need["GPU"] = float(req.accelerator_count)
            if kind.lower() not in GENERIC_ACCELERATORS:
                need[f"accelerator_type:{kind}"] = 0.001
    return need


def _pack(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", dereference=True) as tar:
        for p in sorted(path.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=p.relative_to(path).as_posix(), recursive=False)
    return buf.getvalue()


class RayCluster:
    """Replicas as detached actors of a Ray cluster, each running `ballast serve` on its node. Ray connects
    a process to one cluster only: this lives in the pool's agent process, never in the platform's."""

    def __init__(self, instance_id: str, *, address: str | None = None, logs_dir: Path | None = None,
                 command: list[str] | None = None, extra_args: list[str] | None = None, name: str = "ray",
                 start_timeout_s: float | None = None):
        try:
            import ray
        except ImportError:
            raise ValueError("the Ray backend needs Ray: pip install 'ballast[ray]'") from None
        self._ray: Any = ray
        self.name = name
        self.instance_id = instance_id
        self.prefix = f"ballast-{instance_id}-"
        self.logs_dir = logs_dir or ballast_home() / "logs"
        self.command = command or default_command()
        self.extra_args = list(extra_args or [])
        self.start_timeout_s = start_timeout_s or float(os.environ.get("BALLAST_RAY_START_TIMEOUT_S") or 120)
        address = address or os.environ.get("RAY_ADDRESS") or "auto"
        ray.init(address=address, namespace=NAMESPACE, ignore_reinit_error=True, log_to_driver=False,
                 logging_level=logging.WARNING)
        self._actor_class = self._ray.remote(max_concurrency=4)(ReplicaActor)
        self._packages: dict[str, Any] = {}  # package path -> object ref of its tar.gz
        self._offsets: dict[str, int] = {}  # actor name -> bytes of its log already copied here
        self._recent: list[tuple[float, dict[str, float]]] = []  # (when, resources) of recent starts

    # ---- placement -----------------------------------------------------------------------------
    def _nodes(self) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        """Each live node's total resources, and what is free on each now (less what this backend asked
        for in the last few seconds: Ray's view of free resources lags behind actor creation)."""
        totals = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        try:
            from ray._private.state import available_resources_per_node

            free = [dict(r) for r in available_resources_per_node().values()]
        except Exception:  # private API moved: fall back to the cluster-wide view
            free = [dict(self._ray.available_resources())]
        now = time.monotonic()
        self._recent = [(t, need) for t, need in self._recent if now - t < RECENT_S]
        for _t, need in self._recent:
            for node in free:
                for k, v in need.items():
                    node[k] = node.get(k, 0.0) - v
        return totals, free

    def _placement(self, req: ResourcesConfig) -> tuple[dict[str, float] | None, str | None]:
        totals, free = self._nodes()
        options = [False, True] if req.accelerator else [False]
        for custom in options:
            need = _requirements(req, custom)
            if any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in free):
                return need, None
        for custom in options:
            need = _requirements(req, custom)
            if any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in totals):
                return None, self._reason(req, free, " free")
        return None, self._reason(req, totals, "")

    def _reason(self, req: ResourcesConfig, nodes: list[dict[str, float]], free: str) -> str:
        where = f"no node of the Ray cluster ({self.name}, {len(nodes)} nodes)"
        if not any(n.get("CPU", 0.0) >= req.cpu for n in nodes):
            return f"{where} has {req.cpu:g} CPUs{free}"
        if req.memory_bytes and not any(n.get("memory", 0.0) >= req.memory_bytes for n in nodes):
            return f"{where} has {req.memory} of memory{free}"
        kind = (req.accelerator or "").partition(":")[0]
        return f"{where} has {req.accelerator_count} x {kind}{free}"

    def fits(self, spec: ReplicaSpec) -> str | None:
        try:
            return self._placement(spec.resources)[1]
        except Exception as e:  # the cluster is unreachable: wait (pending, with why) rather than fail the tick
            return f"the Ray cluster ({self.name}) did not answer: {type(e).__name__}: {e}"

    # ---- lifecycle -----------------------------------------------------------------------------
    def _package_ref(self, path: Path) -> Any:
        key = str(path)
        if key not in self._packages:
            self._packages[key] = self._ray.put(_pack(path))
        return self._packages[key]

    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        need, reason = self._placement(spec.resources)
        if need is None:
            raise RuntimeError(reason)
        self._recent.append((time.monotonic(), dict(need)))
        actor_name = f"{self.prefix}{spec.replica_id}-{os.urandom(3).hex()}"
        options: dict[str, Any] = {"name": actor_name, "namespace": NAMESPACE, "lifetime": "detached",
                                   "num_cpus": need.pop("CPU"), "max_restarts": 0}
        if "memory" in need:
            options["memory"] = int(need.pop("memory"))
        if "GPU" in need:
            options["num_gpus"] = need.pop("GPU")
        if need:
            options["resources"] = need
        otel = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}  # traces: as for local replicas
        env = {**otel, **spec.env, "BALLAST_INSTANCE": f"ray:{self.instance_id}", "BALLAST_REPLICA_ID": spec.replica_id,
               "BALLAST_DEPLOYMENT": spec.deployment, "BALLAST_VERSION": str(spec.version)}
        host = os.environ.get("BALLAST_RAY_REPLICA_HOST") or self._ray.util.get_node_ip_address()
        actor = self._actor_class.options(**options).remote(
            spec.replica_id, self._package_ref(spec.package_path), self.command, self.extra_args, env, host)
        try:
            info = self._ray.get(actor.info.remote(), timeout=self.start_timeout_s)
        except Exception:
            self._ray.kill(actor, no_restart=True)
            raise
        log_path = self.logs_dir / spec.deployment / f"v{spec.version}-{spec.replica_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as f:
            f.write(f"--- replica {spec.replica_id} runs in Ray actor {actor_name} on {info['node']}\n".encode())
        self._offsets[actor_name] = 0
        return ReplicaHandle(spec.replica_id, info["url"], info["pid"], info["port"], str(log_path), self.name,
                             {"actor": actor_name, "node": info["node"]})

    def _actor(self, handle: ReplicaHandle) -> Any | None:
        name = handle.data.get("actor")
        if not name:
            return None
        try:
            return self._ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # no actor of that name: it is gone
            return None

    def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        actor = self._actor(handle)
        if actor is None:
            return
        try:
            self._ray.get(actor.stop.remote(grace_s), timeout=grace_s + CALL_TIMEOUT_S)
        except Exception as e:  # the actor or its node is gone: killing it below is all there is to do
            log.warning("Ray actor %s did not stop cleanly: %s", handle.data.get("actor"), e)
        self._ray.kill(actor, no_restart=True)
        self._offsets.pop(str(handle.data.get("actor")), None)

    def ping(self) -> None:
        """Raises when the cluster does not answer or has no live node (the pool's health check)."""
        if not any(n.get("Alive") for n in self._ray.nodes()):
            raise RuntimeError("no live node")

    def list(self) -> list[ReplicaHandle]:
        out = []
        try:
            names = self._ray.util.list_named_actors()
        except Exception as e:
            log.warning("cannot list the Ray cluster's actors: %s", e)
            return []
        for name in names:
            if not isinstance(name, str) or not name.startswith(self.prefix):
                continue
            handle = ReplicaHandle(name.removeprefix(self.prefix).rsplit("-", 1)[0], pool=self.name,
                                   data={"actor": name})
            actor = self._actor(handle)
            if actor is None:
                continue
            try:
                info = self._ray.get(actor.info.remote(), timeout=CALL_TIMEOUT_S)
            except Exception:
                out.append(handle)  # unreachable but named: still ours (an orphan to stop)
                continue
            out.append(ReplicaHandle(info["replica_id"], info["url"], info["pid"], info["port"], None, self.name,
                                     {"actor": name, "node": info["node"]}))
        return out

    def inspect(self, handle: ReplicaHandle) -> ReplicaStatus:
        try:
            actor = self._actor(handle)
        except Exception as e:  # the cluster, not the replica, is unreachable: HTTP probes decide meanwhile
            return ReplicaStatus(True, None, f"the Ray cluster did not answer: {type(e).__name__}")
        if actor is None:
            return ReplicaStatus(False, None, "its Ray actor is gone")
        name = str(handle.data["actor"])
        try:
            st = self._ray.get(actor.poll.remote(self._offsets.get(name, -1)), timeout=CALL_TIMEOUT_S)
        except self._ray.exceptions.GetTimeoutError:
            return ReplicaStatus(True, None, "its Ray actor did not answer in time")
        except self._ray.exceptions.RayError as e:
            return ReplicaStatus(False, None, f"its Ray actor died: {type(e).__name__}")
        self._mirror(handle, name, st)
        if st["alive"]:
            return ReplicaStatus(True)
        self.stop(handle, 0.0)  # the replica exited: free the actor's reservation on its node
        return ReplicaStatus(False, st["exit_code"], f"exited with code {st['exit_code']}")

    def _mirror(self, handle: ReplicaHandle, name: str, st: dict[str, Any]) -> None:
        readopted = name not in self._offsets
        self._offsets[name] = int(st["offset"])
        if not handle.log_path or not (st["log"] or readopted):
            return
        path = Path(handle.log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            if readopted:
                f.write(f"--- re-adopted Ray actor {name} (lines written meanwhile stay on its node)\n".encode())
            f.write(st["log"])

    def logs(self, handle: ReplicaHandle, tail: int) -> builtins.list[str]:
        actor = self._actor(handle)
        if actor is not None:
            try:
                return [str(line) for line in self._ray.get(actor.tail.remote(tail), timeout=CALL_TIMEOUT_S)]
            except self._ray.exceptions.RayError:
                pass
        return tail_file(handle.log_path, tail)  # the copy made here

    def rotate(self, handle: ReplicaHandle) -> None:
        """The copied log is rotated as a local replica's is."""
        rotate_file(handle.log_path)
