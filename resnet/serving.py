"""The registered model as MLflow loads and serves it. One logged model has two flavours:

- ``pytorch``: the `resnet.predict.Classifier` exported with torch.export ("pt2", no pickle): float32 RGB in
  [0, 1], shape (N, 3, H, W) → logits. ``mlflow.pytorch.load_model("models:/NAME@ALIAS")`` returns it.
- ``python_function`` (loader: this module): images in, class probabilities out. It is what
  ``mlflow.pyfunc.load_model`` returns and what ``mlflow models serve -m models:/NAME@ALIAS --env-manager local``
  serves.

Requests (``POST /invocations``, ``Content-Type: application/json``)::

    images:  {"inputs": {"image": ["<base64 of a JPEG/PNG/... file>", ...]}}
    tensors: {"inputs": [[[[0.12, ...], ...], ...], ...]}    float RGB in [0, 1], shape (N, 3, H, W)

optionally with ``"params": {"top_k": 3}`` (only the 3 most probable classes in "probabilities"; default: all).
A DataFrame with an "image" column of base64 strings (``{"dataframe_records": [{"image": "..."}]}``) is accepted
too, and so are raw bytes in that column from Python (``mlflow.pyfunc.load_model(...).predict``). Response, one
prediction per input in order, "probabilities" most probable first::

    {"predictions": [{"class": "cat", "probability": 0.91, "probabilities": {"cat": 0.91, "dog": 0.09}}, ...]}

An image is decoded exactly as the prepare stage decodes a dataset's files (`resnet.data.images.decode_image`
with the model's image size and resize policy, stored in the MLmodel's metadata), then divided by 255. A
malformed request (bad base64, bytes that are not an image, a tensor of the wrong shape or outside [0, 1]) is
answered with HTTP 400 and a message saying which input and why.

The pyfunc imports this module, hence this project's package: ``--env-manager local`` in this environment
serves it; the pip requirements name ``resnet-pipeline`` for environments that install them.

torch, numpy and Pillow at import time; mlflow and pandas only inside the functions that need them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet.data.images import RESIZE_POLICIES, RejectedImage, decode_image
from resnet.errors import PipelineError
from resnet.predict import DEFAULT_RESIZE, class_probabilities, load_classifier, pixels_from_images

__all__ = [
    "REQUEST_FORMATS",
    "ImageClassifierModel",
    "load_model_dir",
    "log_model",
    "model_metadata",
    "pip_requirements",
    "save_model",
]

# What a request looks like, also stored in the MLmodel's metadata ("request_formats") for whoever finds the
# model in the registry.
REQUEST_FORMATS = {
    "images": '{"inputs": {"image": ["<base64 of a JPEG/PNG file>", ...]}}',
    "tensors": '{"inputs": [[[[...]]]]}: float RGB in [0, 1], shape (N, 3, image_size, image_size)',
    "params": '{"top_k": K}: only the K most probable classes in "probabilities" (default: all)',
    "response": '{"predictions": [{"class": str, "probability": float, "probabilities": {class: float}}, ...]}',
}
# The distributions the pyfunc imports (pip names), pinned to the versions installed here.
REQUIREMENTS = ("torch", "numpy", "pillow", "pandas", "mlflow", "resnet-pipeline")
_META_KEYS = ("model_name", "num_classes", "classes", "image_size", "resize", "mean", "std", "data_hash")
_CHUNK = 64  # images per forward pass inside one request


# --- logging ---------------------------------------------------------------------------------------------------


def log_model(
    model_path: str | Path,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    extra_files: Sequence[str | Path] | None = None,
):
    """Log the model file `model_path` (see `resnet.engine.save_model_file`) to the active MLflow run as the
    logged model `name` (both flavours, see the module docstring), registering a new version of
    `registered_model_name` if given. `extra_files` (local paths or URIs, e.g. an ONNX export) travel with it,
    under ``extra_files/``. Returns MLflow's ModelInfo (``registered_model_version`` when registered)."""
    from mlflow.models import Model

    with _environment_warning_kept_out():
        return Model.log(
            artifact_path=None,
            flavor=_flavor_module(),
            name=name,
            registered_model_name=registered_model_name,
            model_path=str(model_path),
            extra_files=[str(f) for f in extra_files] if extra_files else None,
        )


def save_model(
    model_path: str | Path,
    path: str | Path,
    *,
    mlflow_model=None,
    extra_files: Sequence[str | Path] | None = None,
) -> None:
    """Write the MLflow model of the model file `model_path` to the new directory `path` (what `log_model`
    logs; also `mlflow models serve -m PATH`). `mlflow_model`: the `mlflow.models.Model` to fill in (given by
    `Model.log`)."""
    import mlflow.pytorch
    from mlflow.models import Model, ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types.schema import ColSpec, DataType, Map, ParamSchema, ParamSpec, Schema, TensorSpec

    if not Path(model_path).is_file():
        raise PipelineError(f"{model_path}: no such model file")
    classifier, meta = load_classifier(model_path)
    missing = [key for key in ("classes", "image_size") if not meta.get(key)]
    if missing:
        raise PipelineError(f"{model_path}: the model's meta has no {' and no '.join(missing)}")
    size, classes = int(meta["image_size"]), list(meta["classes"])
    metadata = model_metadata(meta)
    if mlflow_model is None:
        mlflow_model = Model()
    # The pytorch flavour first: torch.export traces the Classifier on a batch of 2 (a batch of 1 would fix the
    # batch dimension) and needs the tensor signature. A constant example keeps input_example.json small.
    example = np.full((2, 3, size, size), 0.5, dtype=np.float32)
    tensors = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)))]),
    )
    with _environment_warning_kept_out():
        mlflow.pytorch.save_model(
            classifier,
            str(path),
            mlflow_model=mlflow_model,
            signature=tensors,
            input_example=example,
            serialization_format="pt2",
            pip_requirements=pip_requirements(),
            extra_files=[str(f) for f in extra_files] if extra_files else None,
        )
    # Then the pyfunc: this module's loader (no `data`: it gets the model directory and reads both the MLmodel
    # and the pytorch flavour from there), in place of mlflow.pytorch's tensor-only one. Its signature has no
    # input schema, because MLflow's schemas cannot say "base64 strings or float tensors" and would refuse
    # one of the two before the model sees it; the input formats are in the metadata and checked by the
    # model itself. The saved input example is the tensor batch above (a valid request).
    add_to_model(mlflow_model, loader_module=__name__, conda_env="conda.yaml", python_env="python_env.yaml")
    mlflow_model.signature = ModelSignature(
        outputs=Schema(
            [
                ColSpec(DataType.string, "class"),
                ColSpec(DataType.double, "probability"),
                ColSpec(Map(DataType.double), "probabilities"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", DataType.long, len(classes))]),
    )
    mlflow_model.metadata = {**(mlflow_model.metadata or {}), **metadata}
    mlflow_model.save(os.path.join(path, "MLmodel"))


def model_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """What the MLmodel's metadata keeps of a model file's meta: how to feed the model and what it answers."""
    kept = {key: meta[key] for key in _META_KEYS if key in meta}
    kept["resize"] = meta.get("resize") or DEFAULT_RESIZE
    # YAML-safe: lists, plain ints and floats.
    return {
        **{k: list(v) if isinstance(v, tuple | list) else v for k, v in kept.items()},
        "input": "float32 RGB in [0, 1], shape (N, 3, H, W)",  # what the pytorch flavour takes
        "request_formats": dict(REQUEST_FORMATS),
    }


def pip_requirements() -> list[str]:
    """`REQUIREMENTS` pinned to the installed versions (without local labels such as +cu132: the same
    release from the index)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def _flavor_module():
    """This module, as `Model.log` wants a flavour: something with `save_model(path=, mlflow_model=, ...)`."""
    import sys

    return sys.modules[__name__]


@contextlib.contextmanager
def _environment_warning_kept_out():
    """MLflow warns that an environment without pip has no pip version to record (uv's venvs have no pip);
    nothing a user can act on."""
    log = logging.getLogger("mlflow.utils.environment")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --- loading ---------------------------------------------------------------------------------------------------


def load_model_dir(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A downloaded MLflow model directory → (the pytorch flavour's module: float [0, 1] NCHW → logits,
    {"classes", "image_size", "resize", ...}). Models logged before the metadata held the image size and the
    resize policy (``mlflow.pytorch.log_model`` with classes only) give the size from their tensor signature
    and resize by the default policy."""
    import mlflow.pytorch
    from mlflow.models import Model

    mlmodel = Model.load(os.path.join(path, "MLmodel"))
    module = mlflow.pytorch.load_model(str(path))
    meta = dict(mlmodel.metadata or {})
    signature = mlmodel.signature
    tensor_input = _tensor_shape(signature.inputs if signature else None)
    if not meta.get("image_size"):
        if not tensor_input or len(tensor_input) != 4:
            raise PipelineError(
                f"{path}: the MLflow model's metadata has no image_size and no image signature"
            )
        meta["image_size"] = int(tensor_input[-1])
    if not meta.get("classes"):
        tensor_output = _tensor_shape(signature.outputs if signature else None)
        if not tensor_output or tensor_output[-1] < 1:
            raise PipelineError(f"{path}: the MLflow model's metadata names no classes")
        meta["classes"] = [str(i) for i in range(tensor_output[-1])]
    meta["resize"] = meta.get("resize") or DEFAULT_RESIZE
    if meta["resize"] not in RESIZE_POLICIES:
        raise PipelineError(
            f"{path}: resize {meta['resize']!r}: expected one of {', '.join(RESIZE_POLICIES)}"
        )
    meta["image_size"] = int(meta["image_size"])
    meta["classes"] = [str(c) for c in meta["classes"]]
    return module, meta


def _tensor_shape(schema) -> tuple[int, ...] | None:
    if schema is None or not schema.is_tensor_spec() or len(schema.inputs) != 1:
        return None
    return tuple(schema.inputs[0].shape)


def _load_pyfunc(path: str, model_config: dict | None = None) -> ImageClassifierModel:
    """MLflow's hook (``loader_module: resnet.serving`` in the MLmodel): `path` is the model directory."""
    module, meta = load_model_dir(path)
    return ImageClassifierModel(module, meta)


# --- prediction ------------------------------------------------------------------------------------------------


class ImageClassifierModel:
    """The pyfunc's implementation: `predict(data, params)` as MLflow calls it (see the module docstring for
    the inputs it takes), returning a pandas DataFrame with the columns class, probability, probabilities."""

    def __init__(self, module: torch.nn.Module, meta: dict[str, Any]):
        self.module = module
        self.classes = list(meta["classes"])
        self.image_size = int(meta["image_size"])
        self.resize = meta.get("resize") or DEFAULT_RESIZE
        self.meta = meta

    def predict(self, data: Any, params: dict[str, Any] | None = None):
        import pandas as pd

        top_k = _top_k((params or {}).get("top_k"), len(self.classes))
        pixels = self.pixels(data)
        probs = np.concatenate(
            [class_probabilities(self.module, pixels[i : i + _CHUNK]) for i in range(0, len(pixels), _CHUNK)]
        )
        rows = []
        for row in probs.astype(np.float64):
            order = np.argsort(-row, kind="stable")[:top_k]
            rows.append(
                {
                    "class": self.classes[order[0]],
                    "probability": float(row[order[0]]),
                    "probabilities": {self.classes[i]: float(row[i]) for i in order},
                }
            )
        return pd.DataFrame(rows, columns=["class", "probability", "probabilities"])

    def pixels(self, data: Any) -> torch.Tensor:
        """Any accepted input → float32 (N, 3, S, S) in [0, 1]; MlflowException (HTTP 400) if malformed."""
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            if "image" not in data.columns:
                raise _invalid(
                    f"a table input needs an 'image' column of base64-encoded image files; got columns "
                    f"{[str(c) for c in data.columns]}"
                )
            return self.decode(list(data["image"]))
        if isinstance(data, dict):
            if set(data) != {"image"}:
                raise _invalid(
                    f'expected {{"image": [base64 strings]}} (or a float tensor); got keys {sorted(map(str, data))}'
                )
            values = np.asarray(data["image"], dtype=object)
            if values.ndim > 1:
                raise _invalid(f'"image" must be a flat list of base64 strings; got shape {values.shape}')
            return self.decode(list(values.reshape(-1)))
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        if isinstance(data, list | tuple):
            try:
                data = np.asarray(data)
            except ValueError as exc:  # ragged nested lists
                raise _invalid(f"the input is not a rectangular tensor nor a list of images: {exc}") from None
        if isinstance(data, np.ndarray):
            if data.dtype.kind in "USO" and data.ndim <= 1:
                return self.decode(list(data.reshape(-1)))
            if data.dtype.kind in "fiub":
                return self.tensor(data)
        raise _invalid(
            f"unsupported input {type(data).__name__}"
            + (f" of {data.dtype} {data.shape}" if isinstance(data, np.ndarray) else "")
            + f": send {REQUEST_FORMATS['images']} or {REQUEST_FORMATS['tensors']}"
        )

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        size = self.image_size
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != (3, size, size) or len(array) == 0:
            raise _invalid(
                f"a tensor input must be float RGB in [0, 1] of shape (N, 3, {size}, {size}) for this model; "
                f"got shape {tuple(array.shape)}"
            )
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise _invalid(
                f"a tensor input must hold values in [0, 1] (uint8 pixels divided by 255); got "
                f"{np.nanmin(array):.4g}..{np.nanmax(array):.4g}"
                + ("" if np.isfinite(array).all() else " and non-finite values")
            )
        return torch.from_numpy(np.ascontiguousarray(array))

    def decode(self, values: Iterable[Any]) -> torch.Tensor:
        images = []
        for index, value in enumerate(values):
            try:
                data = _image_bytes(value)
                images.append(decode_image(data, image_size=self.image_size, resize=self.resize))
            except (ValueError, RejectedImage) as exc:
                raise _invalid(f"image {index} (0-based): {exc}") from None
        if not images:
            raise _invalid("no images in the request")
        return pixels_from_images(np.stack(images))


def _image_bytes(value: Any) -> bytes:
    """A base64 string (whitespace and a data: URL prefix allowed) or raw bytes → the file's bytes."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a base64 string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # data:image/png;base64,....
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64 ({exc})") from None


def _top_k(value: Any, num_classes: int) -> int:
    if value is None:
        return num_classes
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise _invalid(f"params.top_k must be an integer >= 1, got {value!r}")
    return min(int(value), num_classes)


def _invalid(message: str):
    """MLflow's scoring server answers an INVALID_PARAMETER_VALUE MlflowException with HTTP 400."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)
