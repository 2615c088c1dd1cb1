"""A tracking server that cannot be reached fails the stage's first MLflow request in one line, at once or
within the probe's timeout, instead of MLflow's minutes of retries (refusals by a real server, 401 and 403:
tests/test_stack.py::test_the_mlflow_server_refuses_requests_without_its_user)."""

from __future__ import annotations

import socket
import time

import pytest

from resnet.config import MlflowConfig
from resnet.errors import PipelineError
from resnet.tracking import check_reachable, start_stage_run


def test_a_closed_port_is_one_line_at_once():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        started = time.monotonic()
        with pytest.raises(PipelineError) as refused:
            start_stage_run(MlflowConfig(tracking_uri=f"http://127.0.0.1:{port}"), "evaluate", "0" * 64)
    assert time.monotonic() - started < 5
    assert str(refused.value) == (
        f"MLflow at http://127.0.0.1:{port}: no answer ([Errno 111] Connection refused): expected a tracking "
        "server there (MLFLOW_TRACKING_URI or mlflow.tracking_uri)"
    )


def test_a_server_that_never_answers_times_out_in_one_line():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # accepts, never answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(PipelineError) as silent:
            check_reachable(url, timeout=1.0)
    assert time.monotonic() - started < 5
    message = str(silent.value)
    assert message.startswith(f"MLflow at {url}: no answer (") and "timed out" in message


def test_stores_without_a_server_are_not_probed(tmp_path):
    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlruns"), "databricks"):
        check_reachable(uri)  # nothing to connect to, nothing raised
