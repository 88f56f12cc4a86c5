"""Run several policies over one trace and the same pools (what `ballast simulate` prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import yaml

from ballast.sim.engine import Simulation
from ballast.sim.names import DEFAULT_POLICIES, NAMES
from ballast.sim.policies import make_policy
from ballast.sim.spec import SimSpec, load_spec
from ballast.sim.traces import Trace, TraceError, read_trace


class SimError(ValueError):
    """A pools file, trace or policy the simulator cannot use (one line for the person who wrote it)."""


def load(trace: Path, pools: Path) -> tuple[Trace, SimSpec]:
    try:
        return read_trace(trace), load_spec(pools)
    except TraceError as e:
        raise SimError(f"trace {trace}: {e}") from None
    except (pydantic.ValidationError, yaml.YAMLError) as e:
        raise SimError(f"pools file {pools}: {str(e).splitlines()[0]} ({e.__class__.__name__})"
                       if not isinstance(e, pydantic.ValidationError) else
                       f"pools file {pools}: {'; '.join(_where(x) for x in e.errors()[:3])}") from None
    except OSError as e:
        raise SimError(f"cannot read {e.filename}: {e.strerror}") from None


def _where(err: Any) -> str:
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def simulate(trace: Trace, spec: SimSpec, policies: list[str] | tuple[str, ...] = DEFAULT_POLICIES,
             slo_ttft_ms: float = 1000.0) -> list[dict[str, Any]]:
    out = []
    for name in policies:
        try:
            policy = make_policy(name, spec)
        except ValueError as e:
            raise SimError(str(e)) from None
        out.append(Simulation(spec, policy, slo_ttft_ms=slo_ttft_ms).run(trace))
    return out


__all__ = ["NAMES", "SimError", "load", "simulate"]
