"""A tracking server that cannot be reached fails the stage's first MLflow request in one line, at once or
within the probe's timeout, instead of MLflow's minutes of retries (refusals by a real server, 401 and 403:
tests/test_stack.py::test_the_mlflow_server_refuses_requests_without_its_user). A server that goes away during
training: its epochs are kept and delivered when it answers again, or counted as dropped."""

from __future__ import annotations

import os
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


def test_a_database_that_cannot_be_reached_is_one_line_at_once_without_its_password():
    """mlflow.tracking_uri naming a database directly: MLflow would retry for ~100 s, warning each time; the
    stage says in one line, at once, which database it could not reach, its password masked."""
    from localservers import free_ports

    [closed] = free_ports(1)
    uri = f"postgresql+psycopg2://mlflow:planted-s3cret@127.0.0.1:{closed}/mlflow"
    started = time.monotonic()
    with pytest.raises(PipelineError) as refused:
        start_stage_run(MlflowConfig(tracking_uri=uri), "evaluate", "0" * 16)
    assert time.monotonic() - started < 10
    message = str(refused.value)
    assert message.startswith(
        f"MLflow's database at postgresql+psycopg2://mlflow:***@127.0.0.1:{closed}/mlflow: cannot connect ("
    )
    assert "Connection refused" in message and "planted-s3cret" not in message and "\n" not in message


def test_stores_without_a_server_are_not_probed(tmp_path):
    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlruns"), "databricks"):
        check_reachable(uri)  # nothing to connect to, nothing raised


def test_fail_fast_turns_mlflows_minutes_of_retries_into_one_quick_failure():
    import mlflow

    from resnet.tracking import RunHandle, fail_fast

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        handle = RunHandle(f"http://127.0.0.1:{sock.getsockname()[1]}", "0" * 32)
        started = time.monotonic()
        with fail_fast(), pytest.raises(mlflow.exceptions.MlflowException, match="Connection refused"):
            handle.log_metrics({"train_loss": 1.0}, step=1)
    assert time.monotonic() - started < 3
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # restored after the block


class _ComingAndGoing:
    """Stands for a RunHandle whose tracking server stops answering and comes back."""

    tracking_uri = "http://mlflow.example:5000"

    def __init__(self):
        self.up, self.logged = True, []

    def log_metrics(self, metrics, step, timestamp_ms):
        if not self.up:
            raise ConnectionError("HTTPConnectionPool(host='mlflow.example'): [Errno 111] Connection refused")
        self.logged.append((step, timestamp_ms, dict(metrics)))


class _Lines(list):
    put = list.append


def _epoch(epoch: int) -> list[dict]:
    metrics = {"train_loss": 1 / epoch, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "lr": 0.1}
    return [{"epoch": epoch, "start_epoch": 0, **metrics, "images_per_sec": 100.0, "epoch_seconds": 1.0}]


def test_epochs_logged_while_mlflow_is_away_are_kept_and_delivered_in_order_when_it_answers():
    from resnet.distributed import EpochReporter

    run, lines = _ComingAndGoing(), _Lines()
    reporter = EpochReporter("pretrain", 4, run, lines)
    reporter.after_report(None, _epoch(1), None)
    run.up = False
    reporter.after_report(None, _epoch(2), None)
    reporter.after_report(None, _epoch(3), None)
    assert [step for step, _, _ in run.logged] == [1]
    back_ms = time.time() * 1000
    run.up = True
    reporter.after_report(None, _epoch(4), None)

    assert [step for step, _, _ in run.logged] == [1, 2, 3, 4]
    assert [metrics["train_loss"] for _, _, metrics in run.logged] == [1, 1 / 2, 1 / 3, 1 / 4]
    assert all(timestamp <= back_ms for step, timestamp, _ in run.logged if step in (2, 3))
    assert [line for line in lines if "MLflow" in line] == [
        "pretrain: warning: MLflow at http://mlflow.example:5000 does not answer (connection refused); "
        "training goes on and keeps its metrics until it answers",
        "pretrain: MLflow answers again: delivered the metrics kept for epochs 2, 3",
    ]


def test_epochs_mlflow_never_took_are_counted_as_dropped_after_the_last_epoch():
    from resnet.distributed import EpochReporter

    run, lines = _ComingAndGoing(), _Lines()
    reporter = EpochReporter("finetune", 3, run, lines)
    reporter.after_report(None, _epoch(1), None)
    run.up = False
    reporter.after_report(None, _epoch(2), None)
    reporter.after_report(None, _epoch(3), None)

    assert [step for step, _, _ in run.logged] == [1]
    assert reporter.unsent == []
    assert [line for line in lines if "MLflow" in line] == [
        "finetune: warning: MLflow at http://mlflow.example:5000 does not answer (connection refused); "
        "training goes on and keeps its metrics until it answers",
        "finetune: warning: MLflow still does not answer after the last epoch: dropped the metrics of 2 epochs "
        "(epochs 2, 3)",
    ]


def test_a_server_that_fails_every_request_is_one_line_within_seconds():
    """An MLflow server that answers 500 (its database gone, say): MLflow's client would retry each request for
    minutes; the stage's first request gives up after two quick retries, in one line."""
    import http.server
    import threading

    class Failing(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            status = 200 if self.path == "/health" else 500
            body = (
                b"OK" if status == 200 else b'{"error_code": "INTERNAL_ERROR", "message": "database is gone"}'
            )
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(PipelineError) as failed:
            start_stage_run(MlflowConfig(tracking_uri=url), "evaluate", "0" * 64)
    finally:
        server.shutdown()
    assert time.monotonic() - started < 15
    assert str(failed.value) == (
        f"MLflow at {url} failed the stage's requests (500, a server error, after retries): expected a working "
        "tracking server (its own log says what failed)"
    )
