"""What the test servers (tests/s3server.py, the MLflow server) share: finding their binaries and free ports."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path


def binary(name: str, install_hint: str) -> str:
    """The command-line tool `name` beside this interpreter (the project's environment), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"`{name}` not found ({install_hint})")
    return found


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` ("" for every interface) right now: all sockets are held open
    together, so there are no duplicates."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
