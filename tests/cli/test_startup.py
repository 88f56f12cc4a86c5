"""The `ballast` command starts light: a command that only talks HTTP must not pay for the control plane, the
database layer, the engine or aiohttp (each CLI call once loaded all of them: 1.8 s of CPU per `ballast show`)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("sqlalchemy", "alembic", "aiohttp", "torch", "ballast.control", "ballast.store", "ballast.sim.engine",
         "ballast.chains", "ballast.platform", "ballast.engine", "ballast.config.models")

SCRIPT = """
import sys
from ballast.cli.main import app
loaded = sorted({m for m in sys.modules for h in sys.argv[1:] if m == h or m.startswith(h + ".")})
print("HEAVY", loaded)
"""


def test_importing_the_cli_loads_no_heavy_module() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *HEAVY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout
