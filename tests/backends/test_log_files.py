"""Replica log files (local replicas write them, the Ray backend copies into them): tail and rotation."""

from __future__ import annotations

from pathlib import Path

from ballast.backends.local import LOG_BACKUPS, rotate_file, tail_file


def test_tail_and_copy_truncate_rotation(tmp_path: Path) -> None:
    log = tmp_path / "v1-r-1.log"
    assert tail_file(str(log), 5) == [] and tail_file(None, 5) == []
    with open(log, "ab") as writer:  # the writer keeps its append handle across rotations
        for round_ in range(LOG_BACKUPS + 2):
            writer.write(b"".join(f"round {round_} line {i}\n".encode() for i in range(50)))
            writer.flush()
            rotate_file(str(log), max_bytes=100)
            assert log.stat().st_size == 0
        writer.write(b"after\n")
        writer.flush()
    assert tail_file(str(log), 5) == ["after"]
    assert tail_file(str(log.with_name(log.name + ".1")), 1) == [f"round {LOG_BACKUPS + 1} line 49"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [log.name] + [f"{log.name}.{i}" for i in
                                                                       range(1, LOG_BACKUPS + 1)]
    rotate_file(str(log), max_bytes=100)  # under the limit: untouched
    assert tail_file(str(log), 5) == ["after"]
