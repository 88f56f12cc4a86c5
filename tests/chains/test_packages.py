"""`ballast chains deploy`'s packages: one valid package per step, carrying the step's own config."""

from __future__ import annotations

import textwrap
from pathlib import Path

from ballast.chains.deploy import StepPackage, build_packages
from ballast.chains.serve import deployment_name
from ballast.package.package import load_package
from tests.chains.test_local import PIPELINE


def test_deployment_names_follow_the_platforms_rules() -> None:
    assert deployment_name("demo", "EmbedText") == "demo-embed-text"
    assert deployment_name("demo", "Pipeline") == "demo-pipeline"


def test_each_step_becomes_a_valid_package_with_its_config(tmp_path: Path) -> None:
    chain = tmp_path / "chain.py"
    chain.write_text(PIPELINE.read_text().replace(
        "config = ChainletConfig(idempotent=True)",
        "config = ChainletConfig(idempotent=True, resources={'cpu': 0.5}, autoscaling={'max_replicas': 3})"))
    deployed: list[str] = []

    def deploy(pkg: StepPackage) -> int:
        deployed.append(pkg.deployment)
        return len(deployed) + 6

    built = build_packages(chain, "demo", tmp_path / "out", "http://127.0.0.1:9", deploy)
    pkgs = [p for p, _ in built]
    assert [(p.step, p.deployment, p.entry) for p in pkgs] == [
        ("Split", "demo-split", False), ("Embed", "demo-embed", False), ("Pipeline", "demo-pipeline", True)]
    assert deployed == ["demo-split", "demo-embed", "demo-pipeline"] and [v for _, v in built] == [7, 8, 9]
    embed = load_package(pkgs[1].path).config
    assert (embed.name, embed.resources.cpu, embed.autoscaling.max_replicas) == ("demo-embed", 0.5, 3)
    assert embed.environment_variables == {"BALLAST_CHAIN_GATEWAY": "http://127.0.0.1:9", "BALLAST_CHAIN": "demo"}
    # No credential in any package; the entry pins the versions of the steps it calls.
    assert not any(f.name.startswith(".") for p in pkgs for f in p.path.iterdir())
    assert "versions = {'Embed': 8, 'Split': 7}" in (pkgs[2].path / "model.py").read_text()


def test_a_streaming_step_is_packaged_like_any_other(tmp_path: Path) -> None:
    chain = tmp_path / "chain.py"
    chain.write_text(textwrap.dedent('''
        from collections.abc import AsyncIterator

        from ballast.chains import Chainlet, entrypoint


        @entrypoint
        class Tokens(Chainlet):
            async def run(self, n: int) -> AsyncIterator[int]:
                for i in range(n):
                    yield i
    '''))
    built = build_packages(chain, "demo", tmp_path / "out", "http://127.0.0.1:9", lambda p: 1)
    assert [(p.step, p.entry) for p, _ in built] == [("Tokens", True)]
    assert load_package(built[0][0].path).config.name == "demo-tokens"
