"""What the pages show, built from the control plane's read views and filtered to what the viewer may see."""

from __future__ import annotations

import os
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from ballast.control import ControlPlane
from ballast.control.keys import KeyStore
from ballast.control.logs import tail_lines
from ballast.dashboard.session import Viewer

SEARCH_LINES = 200_000
HEALTH = {"healthy": "all replicas ready", "degraded": "some replicas not ready", "starting": "no replica ready yet",
          "idle": "scaled to zero (starts on the first request)", "failing": "replicas failing to start"}


def health(replicas: list[dict[str, Any]]) -> str:
    """One word for a deployment's replicas (from `describe`)."""
    states = [r["state"] for r in replicas if r["state"] != "stopping"]
    ready = states.count("ready")
    if not states:
        return "idle"
    if ready == len(states):
        return "healthy"
    if ready:
        return "degraded"
    return "failing" if "crashloop" in states else "starting"


def deployments(control: ControlPlane, viewer: Viewer) -> list[dict[str, Any]]:
    out = []
    for d in control.list_deployments():
        if not viewer.may_see(d["name"]):
            continue
        info = control.describe(d["name"])
        d["health"] = health(info["replicas"])
        d["health_text"] = HEALTH[d["health"]]
        out.append(d)
    return out


def deployment(control: ControlPlane, name: str) -> dict[str, Any]:
    info = control.describe(name)
    info["health"] = health(info["replicas"])
    info["health_text"] = HEALTH[info["health"]]
    return info


def events(control: ControlPlane, viewer: Viewer, deployment: str, kind: str, limit: int = 200
           ) -> list[dict[str, Any]]:
    """The newest audit events, filtered by deployment and kind (a substring), newest first."""
    rows = control.events(deployment or None, 2000 if kind else limit)
    rows = [e for e in rows if (not kind or kind in e["kind"])
            and ((e["deployment"] is None and viewer.admin) or (e["deployment"] and viewer.may_see(e["deployment"])))]
    return list(reversed(rows))[:limit]


def logs(control: ControlPlane, name: str, request_id: str, tail: int) -> list[str]:
    """The last `tail` lines of a deployment's replicas, or every line that mentions `request_id`."""
    if request_id:
        # Search the last SEARCH_LINES lines of each replica's current log file (rotated files are not searched).
        return [line for line in tail_lines(control.logs_dir, name, None, SEARCH_LINES) if request_id in line][-tail:]
    return tail_lines(control.logs_dir, name, None, tail)


def prices() -> tuple[float, float]:
    """USD per million prompt and completion tokens for the cost estimate (BALLAST_PRICE_IN/OUT)."""
    try:
        return (float(os.environ.get("BALLAST_PRICE_IN", "0.10")), float(os.environ.get("BALLAST_PRICE_OUT", "0.40")))
    except ValueError:
        return 0.10, 0.40


def usage(keys: KeyStore, viewer: Viewer, days: int) -> dict[str, Any]:
    """Usage by day, key and deployment over the last `days` days, with totals and a cost estimate."""
    since = datetime.now(UTC) - timedelta(days=days)
    rows = keys.usage(key=None if viewer.admin else viewer.key_id, since=since, group="hour")
    names = {k["id"]: k["name"] or k["prefix"] for k in keys.list(include_revoked=True)} if viewer.admin else {
        viewer.key_id: viewer.name}
    price_in, price_out = prices()
    days_: dict[tuple[str, str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        if not viewer.may_see(r["deployment"]):
            continue
        acc = days_[(r["hour"][:10], r["key_id"], r["deployment"])]
        for c in ("requests", "prompt_tokens", "completion_tokens", "errors"):
            acc[c] += r[c]
    table: list[dict[str, Any]] = []
    for (day, key_id, dep), acc in sorted(days_.items(), reverse=True):
        cost = acc["prompt_tokens"] * price_in / 1e6 + acc["completion_tokens"] * price_out / 1e6
        table.append({"day": day, "key": names.get(key_id, key_id), "key_id": key_id, "deployment": dep,
                      **{k: int(v) for k, v in acc.items()}, "cost": cost})
    totals = {c: sum(r[c] for r in table) for c in ("requests", "prompt_tokens", "completion_tokens", "errors",
                                                     "cost")}
    return {"rows": table, "totals": totals, "price_in": price_in, "price_out": price_out, "days": days}
