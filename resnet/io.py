"""Atomic writes of files and directories: a reader (or DVC) never sees half an output, and a failed stage leaves no
partial output (a killed one leaves a temporary, removed by the next writer of the same output)."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block succeeds it becomes `path` (mode 0644) in one
    rename, and if the block fails it is removed (a writer killed outright leaves it: the next writer of `path`
    removes it, `remove_stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; once the block succeeds it takes the place of `path` (mode
    0755), and if the block fails it is removed. `path` is at every moment absent, its old contents or its new
    ones, never a mixture: the old directory is renamed aside before the new one is renamed in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        aside = tmp.with_name(f"{tmp.name}-old")
        if path.exists():
            path.rename(aside)
        tmp.rename(path)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp{os.getpid()}."


_TEMPORARY = re.compile(r"\.tmp(\d+)\.")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of `path` (`atomic_path`, `atomic_dir`) whose writer is no longer running: what a
    writer killed outright (SIGKILL, a lost machine) could not clean up. A live writer's are left alone.
    Returns what was removed."""
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        found = _TEMPORARY.match(leftover.name[len(path.name) + 1 :])
        if found is None or _running(int(found[1])):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Rows of dicts as CSV; columns default to every key seen, in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())
