"""Atomic writes (resnet/io.py): an output is at every moment absent, whole and old, or whole and new; what a
writer killed outright leaves behind is removed by the next writer of the same output, never a live writer's."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from resnet.io import atomic_dir, atomic_path, remove_stale_temporaries, write_text


def test_a_failed_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("stage failed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "figures"
    with atomic_dir(target) as tmp:
        (tmp / "a.png").write_bytes(b"a")
        (tmp / "b.png").write_bytes(b"b")
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "b.png"]
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "c.png").write_bytes(b"c")
        raise RuntimeError("stage failed")
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "b.png"]  # the old one, whole
    with atomic_dir(target) as tmp:
        (tmp / "c.png").write_bytes(b"c")
    assert sorted(p.name for p in target.iterdir()) == ["c.png"]  # the new one only: nothing stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures"]


def _killed_writer(tmp_path, target) -> None:
    """A process that starts writing `target` (a file and a directory beside it) and is SIGKILLed mid-write."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from resnet.io import atomic_dir, atomic_path
        with atomic_path({str(target)!r}) as tmp, atomic_dir({str(target) + "-dir"!r}) as tmp_dir:
            tmp.write_text("half")
            (tmp_dir / "shard-0").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=60)
    assert done.returncode == -signal.SIGKILL


def test_what_a_killed_writer_left_is_removed_by_the_next_writer(tmp_path):
    target = tmp_path / "model.pt"
    _killed_writer(tmp_path, target)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(name.startswith((".model.pt.tmp", ".model.pt-dir.tmp")) for name in left), (
        left
    )
    write_text(target, "whole\n")
    with atomic_dir(tmp_path / "model.pt-dir") as tmp:
        (tmp / "shard-0").write_text("whole\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt-dir"]
    assert target.read_text() == "whole\n" and (tmp_path / "model.pt-dir/shard-0").read_text() == "whole\n"


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    target = tmp_path / "model.pt"
    with atomic_path(target) as tmp:  # this (live) process is writing it
        assert remove_stale_temporaries(target) == []
        assert tmp.exists()
        tmp.write_text("whole\n")
    assert target.read_text() == "whole\n"
    # The temporary of another output whose name begins with this one's is not this output's, even dead.
    dead = subprocess.Popen(["true"])
    dead.wait()
    other = tmp_path / f".model.pt.bak.tmp{dead.pid}.x"
    other.write_text("x")
    assert remove_stale_temporaries(target) == [] and other.exists()
    assert remove_stale_temporaries(tmp_path / "model.pt.bak") == [other] and not other.exists()
