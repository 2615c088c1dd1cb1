"""`mlflow models serve -m models:/NAME@champion --env-manager local` of a model logged by resnet.serving: one
server for the module (its start is the cost), then requests with base64 images, float tensors and malformed
input. Answers are checked against the Classifier on the same pixels (images decoded by `decode_image`)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import CLASSES, SIZE, image_bytes, tiny_model_file

from resnet.data.images import decode_image
from resnet.predict import load_classifier

pytestmark = pytest.mark.integration

NAME = "serve-test-model"
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.tracking import MlflowClient

    from resnet import serving

    root = tmp_path_factory.mktemp("serve")
    model_file = tiny_model_file(root / "model.pt")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setattr(tracking_utils, "_tracking_uri", None)
        client = MlflowClient(uri)
        experiment = client.create_experiment("serve", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = serving.log_model(model_file, registered_model_name=NAME)
        client.set_registered_model_alias(NAME, "champion", info.registered_model_version)

    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its `uvicorn`
    log = (root / "server.log").open("w")
    command = [
        *(sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion"),
        *("--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    # Its own process group: the CLI starts uvicorn as a child, and both go at the end.
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{_tail(root / 'server.log')}")
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping after {START_TIMEOUT_S} s:\n{_tail(root / 'server.log')}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        yield {"url": url, "model_file": model_file, "root": root}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:]


def invoke(server, payload) -> tuple[int, object]:
    request = urllib.request.Request(
        f"{server['url']}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def softmax(model_file: Path, pixels: torch.Tensor) -> np.ndarray:
    classifier, _ = load_classifier(model_file)
    with torch.no_grad():
        return torch.softmax(classifier(pixels), dim=1).numpy()


def assert_predictions(predictions, expected: np.ndarray) -> None:
    assert len(predictions) == len(expected)
    for prediction, probs in zip(predictions, expected, strict=True):
        assert prediction["class"] == CLASSES[int(probs.argmax())]
        assert prediction["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert [prediction["probabilities"][c] for c in CLASSES] == pytest.approx(probs, abs=1e-5)
        assert list(prediction["probabilities"]) == [CLASSES[i] for i in np.argsort(-probs, kind="stable")]


def test_base64_images_are_decoded_as_prepare_decodes_them(server):
    files = [image_bytes(30, 18, "PNG", seed=1), image_bytes(14, 25, "JPEG", seed=2)]
    payload = {"inputs": {"image": [base64.b64encode(f).decode() for f in files]}}
    status, body = invoke(server, payload)
    assert status == 200, body
    images = np.stack([decode_image(f, image_size=SIZE, resize="center_crop") for f in files])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert_predictions(body["predictions"], softmax(server["model_file"], pixels))

    status, body = invoke(server, {**payload, "params": {"top_k": 2}})
    assert status == 200 and [len(p["probabilities"]) for p in body["predictions"]] == [2, 2], body


def test_a_float_tensor_batch(server):
    pixels = np.random.default_rng(3).random((3, 3, SIZE, SIZE), dtype=np.float32)
    status, body = invoke(server, {"inputs": pixels.tolist()})
    assert status == 200, body
    assert_predictions(body["predictions"], softmax(server["model_file"], torch.from_numpy(pixels)))


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"inputs": {"image": ["*** not base64 ***"]}}, "image 0 (0-based): not valid base64"),
        (
            {"inputs": {"image": [base64.b64encode(b"plain text").decode()]}},
            "image 0 (0-based): not an image",
        ),
        (
            {"inputs": np.zeros((1, 3, 8, 8)).tolist()},
            f"(N, 3, {SIZE}, {SIZE}) for this model; got shape (1, 3, 8, 8)",
        ),
        ({"inputs": np.full((1, 3, SIZE, SIZE), 255.0).tolist()}, "values in [0, 1]"),
    ],
)
def test_a_malformed_request_is_a_400_with_the_reason(server, payload, words):
    status, body = invoke(server, payload)
    assert status == 400, body
    assert words in json.loads(body)["message"]
