"""Package directories: loading with clear errors, the files a deploy copies, the content fingerprint,
and the cached requirement environments (all on real, small directories)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ballast.package import (
    EnvironmentError_,
    PackageError,
    ensure_environment,
    load_package,
    requirements_hash,
)
from ballast.package.environment import site_dir
from tests.conftest import EXAMPLES, write_package

MODEL = "class Model:\n    def predict(self, x):\n        return x\n"


def test_load_accepts_the_directory_or_its_yaml(tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "p", "name: p\n", MODEL, **{"notes.txt": "hi"})
    assert load_package(pkg).name == "p"
    assert load_package(pkg / "ballast.yaml").path == pkg.resolve()
    assert load_package(pkg).data_dir == pkg.resolve() / "data"


def test_load_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no such directory"):
        load_package(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(PackageError, match="a package is a directory"):
        load_package(tmp_path / "file.txt")
    pkg = write_package(tmp_path / "nomodel", "name: nomodel\n")
    with pytest.raises(PackageError, match=r"model.py, which is not in the package"):
        load_package(pkg)


def test_files_leave_out_caches(tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "p", "name: p\n", MODEL)
    for junk in ("__pycache__/model.cpython-311.pyc", ".git/HEAD", ".venv/bin/python", "stale.pyc"):
        (pkg / junk).parent.mkdir(parents=True, exist_ok=True)
        (pkg / junk).write_text("junk")
    (pkg / "data").mkdir()
    (pkg / "data" / "w.bin").write_bytes(b"\0" * 10)
    names = [f.relative_to(pkg.resolve()).as_posix() for f in load_package(pkg).files()]
    assert names == ["ballast.yaml", "data/w.bin", "model.py"]


def test_fingerprint_follows_content_and_names_only(tmp_path: Path) -> None:
    a = shutil.copytree(EXAMPLES / "echo", tmp_path / "a")
    b = shutil.copytree(EXAMPLES / "echo", tmp_path / "b")
    (b / "__pycache__").mkdir()
    (b / "__pycache__" / "x.pyc").write_bytes(b"cache")
    assert load_package(a).fingerprint == load_package(b).fingerprint
    (b / "extra.txt").write_text("")
    assert load_package(a).fingerprint != load_package(b).fingerprint
    (b / "extra.txt").rename(b / "other.txt")
    fp = load_package(b).fingerprint
    assert fp != load_package(a).fingerprint and len(fp) == 64


def test_requirements_hash_ignores_order_and_blanks() -> None:
    assert requirements_hash(["numpy>=1.26", "rich"]) == requirements_hash([" rich ", "", "numpy>=1.26"])
    assert requirements_hash(["rich"]) != requirements_hash(["rich<13"])


def test_environments_are_reused_and_failures_leave_nothing(tmp_home: Path, tmp_path: Path) -> None:
    assert ensure_environment([]) is None
    reqs = ["some-package==1.0"]
    ready = tmp_home / "envs" / requirements_hash(reqs)
    ready.mkdir(parents=True)
    (ready / ".ready").write_text("0\n")
    assert ensure_environment(reqs) == site_dir(ready)  # built once, never installed again
    missing = str(tmp_path / "no-such-project")
    with pytest.raises(EnvironmentError_, match="installing requirements failed"):
        ensure_environment([missing], timeout_s=120)
    assert [p.name for p in (tmp_home / "envs").iterdir()] == [ready.name]
