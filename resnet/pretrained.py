"""Where fine-tuning starts: one entry point from a source string (``finetune.pretrained`` in params.yaml) to
a ready model, one of our ``resnet.models.ResNet``.

Sources:

- ``pretrain``: the pretrain stage's model file (``models/pretrain/model.pt`` by default).
- ``none``: a random init of ``finetune.model`` (the from-scratch baseline).
- ``torchvision:<model>.<WEIGHTS>``, e.g. ``torchvision:resnet50.IMAGENET1K_V2``: torchvision's published
  ImageNet weights, through torch hub's cache (see ``resnet.weights``, also for air-gapped sites).
- ``s3://bucket/key``: a model file or state dict in S3 (credentials and endpoint as in ``resnet.data.s3``); a
  key ending in ``/`` (a checkpoint directory) means its ``model.pt``.
- An MLflow model URI, ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or ``runs:/<run_id>/<path>``,
  of a model logged by ``resnet.registry`` (a ``resnet.predict.Classifier``) or any module holding one of our
  ResNets' weights. The tracking server is mlflow's own choice (MLFLOW_TRACKING_URI).
- Anything else is a local path: our model file (``{"meta", "model"}``, see ``resnet.engine.save_model_file``),
  a raw state dict (torchvision's ``.pth`` layout; ``{"state_dict": ...}`` and DDP's ``module.`` prefix are
  accepted), or a directory holding ``model.pt`` (a Ray checkpoint directory).

For a raw state dict the architecture is ``finetune.model`` when given, else the one registered model whose
state-dict keys and shapes match (the head's class count aside). When the weights' class count differs from
the task's, the head is replaced by a freshly initialised ``nn.Linear``.

Every failure raises ``PipelineError`` with one line, ``finetune.pretrained: <source>: <what was expected>``.
This module imports torch only; boto3 and mlflow are imported when a source needs them.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from resnet import weights as tv_weights
from resnet.errors import PipelineError, first_line, one_line
from resnet.finetune import replace_head
from resnet.models import MODELS, ResNet, available_models, build_model, load_torchvision_state_dict

__all__ = [
    "KINDS",
    "MODEL_FILE",
    "TORCHVISION_PREFIX",
    "WEIGHTS_DIGEST",
    "Pretrained",
    "check_weights",
    "describe_source",
    "load_pretrained",
    "state_dict_digest",
    "validate_source_syntax",
]

KINDS = ("pretrain", "none", "torchvision", "s3", "mlflow", "file")
TORCHVISION_PREFIX = "torchvision:"
MLFLOW_PREFIXES = ("models:/", "runs:/")
MODEL_FILE = "model.pt"  # the model file in a checkpoint directory (resnet.distributed.MODEL_FILE)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
_FIELD = "finetune.pretrained"


@dataclass(frozen=True)
class Pretrained:
    """A model ready to fine-tune and where it came from.

    - ``model``: our ResNet on the CPU, in training mode, its head sized for the task's class count (a fresh
      ``nn.Linear`` when the weights had another count; the pretrained head when the count already fits).
    - ``model_name``: the registered architecture name (``resnet.models.MODELS``).
    - ``source``: the source string as given.
    - ``digest``: sha256 (hex) of the loaded weights' tensor bytes in state-dict order, before the head swap:
      the fingerprint of the starting point (the same weights give the same digest from any source).
    - ``num_pretrained_classes``: the loaded head's class count (for ``none``: the task's).
    """

    model: ResNet
    model_name: str
    source: str
    digest: str
    num_pretrained_classes: int

    @property
    def kind(self) -> str:
        return describe_source(self.source)

    @property
    def head_replaced(self) -> bool:
        return self.num_pretrained_classes != self.model.fc.out_features


def describe_source(source: str) -> str:
    """The kind of source: "pretrain", "none", "torchvision", "s3", "mlflow" or "file" (no I/O, no checks)."""
    if source == "pretrain":
        return "pretrain"
    if source == "none":
        return "none"
    if source.startswith(TORCHVISION_PREFIX):
        return "torchvision"
    if source.startswith("s3://"):
        return "s3"
    if source.startswith(MLFLOW_PREFIXES):
        return "mlflow"
    return "file"


def validate_source_syntax(source: str) -> None:
    """ValueError for a source that is wrong whatever the files, servers and registries hold."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(
            "empty source: expected pretrain, none, torchvision:MODEL.WEIGHTS, a path, "
            "s3://BUCKET/KEY or an MLflow model URI"
        )
    if source != source.strip():
        raise ValueError(f"{source!r}: leading or trailing whitespace")
    kind = describe_source(source)
    if kind == "torchvision":
        tv_weights.get_weights(source[len(TORCHVISION_PREFIX) :])
    elif kind == "s3":
        bucket, _, key = source[len("s3://") :].partition("/")
        if not bucket or not key:
            raise ValueError(f"{source}: expected s3://BUCKET/KEY (an object, or a prefix ending in /)")
    elif kind == "mlflow":
        _check_mlflow_uri(source)


def _check_mlflow_uri(uri: str) -> None:
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :]
        name, at, alias = rest.partition("@")
        name, slash, version = name.partition("/")
        if not name or (at and not alias) or (slash and not version) or (at and slash):
            raise ValueError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    else:
        run_id, _, path = uri[len("runs:/") :].partition("/")
        if not run_id or not path.strip("/"):
            raise ValueError(f"{uri}: expected runs:/RUN_ID/PATH (e.g. runs:/RUN_ID/model)")


# --- loading --------------------------------------------------------------------------------------------------


class _SourceError(Exception):
    """Internal: a problem with the source; load_pretrained turns it into the one-line PipelineError."""


def load_pretrained(
    source: str,
    num_classes: int | None,
    *,
    model: str | None = None,
    pretrain_path: str | Path = "models/pretrain/model.pt",
    tracking_uri: str | None = None,
) -> Pretrained:
    """The model ``source`` describes (see the module docstring), with a head for ``num_classes`` (None: the
    head the weights come with; ``none`` needs a count).

    ``model``: the architecture for ``none`` (required) and for a raw state dict (else inferred from its
    keys); for a source that names its architecture (a model file, torchvision weights) it must agree.
    ``tracking_uri``: the store a ``models:/`` or ``runs:/`` source lives in (the stages pass the project's:
    ``mlflow.tracking_uri``, else MLFLOW_TRACKING_URI, else the embedded store); None: MLflow's default.
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be an integer >= 1 or None, got {num_classes!r}")
    if model is not None and model not in MODELS:
        raise _error(
            source,
            f"unknown model {model!r} (finetune.model): expected one of {', '.join(available_models())}",
        )
    try:
        validate_source_syntax(source)
        kind = describe_source(source)
        if kind == "none":
            if model is None:
                raise _SourceError("needs finetune.model, the architecture to initialise at random")
            if num_classes is None:
                raise ValueError("a random init needs a class count for its head")
            net = build_model(model, num_classes)
            name = model
        elif kind == "pretrain":
            path = Path(pretrain_path)
            if not path.exists():
                raise _SourceError(f"no such file {path}; run the pretrain stage first")
            net, name = _load_path(path, model, source)
        elif kind == "torchvision":
            net, name = _load_torchvision(source[len(TORCHVISION_PREFIX) :], model)
        elif kind == "s3":
            net, name = _load_s3(source, model)
        elif kind == "mlflow":
            net, name = _load_mlflow(source, model, tracking_uri)
        else:
            net, name = _load_path(Path(source).expanduser(), model, source)
    except (_SourceError, ValueError, PipelineError) as exc:
        raise _error(source, _strip_prefix(str(exc), source)) from exc

    digest = state_dict_digest(net.state_dict())
    num_pretrained = net.fc.out_features
    if num_classes is not None:
        replace_head(net, num_classes)
    net.train()
    return Pretrained(
        model=net, model_name=name, source=source, digest=digest, num_pretrained_classes=num_pretrained
    )


# The meta key of a model file (engine.save_model_file) holding the sha256 of its weights (`state_dict_digest`).
WEIGHTS_DIGEST = "weights_sha256"


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of the tensors' raw bytes, in the mapping's order (keys, dtypes and shapes not included)."""
    digest = hashlib.sha256()
    for tensor in state_dict.values():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def check_weights(path: str | Path, meta: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """A model file's weights must be those it was saved with: a file altered or damaged since (bits flipped,
    a tensor replaced) is refused before it is used. Files saved before the digest was recorded pass."""
    recorded = meta.get(WEIGHTS_DIGEST)
    if recorded is None:
        return
    found = state_dict_digest(weights)
    if found != recorded:
        raise PipelineError(
            f"{path}: its weights do not match the sha256 saved with them ({recorded[:12]}…, now {found[:12]}…): "
            "the file was altered or is damaged; expected the file as the pipeline wrote it"
        )


def _error(source: str, message: str) -> PipelineError:
    return PipelineError(f"{_FIELD}: {source}: {one_line(message)}")


def _strip_prefix(message: str, source: str) -> str:
    """DataError's "<uri>: problem" → "problem" (the source is already named)."""
    return message[len(source) + 2 :] if message.startswith(f"{source}: ") else message


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_hint(hint: str | None, name: str, what: str) -> None:
    if hint is not None and hint != name:
        raise _SourceError(f"{what} {name}, but finetune.model is {hint} (leave finetune.model unset)")


# torchvision ------------------------------------------------------------------------------------------------


def _load_torchvision(weights_name: str, hint: str | None) -> tuple[ResNet, str]:
    entry = tv_weights.get_weights(weights_name)
    _check_hint(hint, entry.model, "the weights are for")
    state_dict = _complete_bn_counters(tv_weights.download_state_dict(weights_name))
    net = build_model(entry.model, entry.num_classes)
    try:
        load_torchvision_state_dict(net, state_dict)
    except ValueError as exc:
        raise _SourceError(f"the downloaded {entry.file_name} does not fit {entry.model}: {exc}") from exc
    return net, entry.model


# S3 ---------------------------------------------------------------------------------------------------------


def _load_s3(uri: str, hint: str | None) -> tuple[ResNet, str]:
    from resnet.data.s3 import download_file  # boto3, only when needed

    key_uri = uri + MODEL_FILE if uri.endswith("/") else uri
    with tempfile.TemporaryDirectory(prefix="pretrained-") as tmp:
        local = Path(tmp) / "model.pt"
        download_file(key_uri, local)  # DataError "<uri>: <problem>"
        return _load_file(local, hint, where="" if key_uri == uri else f"{key_uri}: ")


# MLflow -----------------------------------------------------------------------------------------------------


def _load_mlflow(uri: str, hint: str | None, tracking_uri: str | None) -> tuple[ResNet, str]:
    """`uri` resolved in the tracking store `tracking_uri` (also the registry's; None: MLflow's own default),
    downloaded to a temporary directory and loaded from there, so MLflow's global settings stay as they were."""
    import mlflow  # only when needed
    import mlflow.artifacts
    import mlflow.pytorch

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    try:
        location = _registered_model_location(
            uri, mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
        )
        with tempfile.TemporaryDirectory(prefix="pretrained-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
            loaded = mlflow.pytorch.load_model(local, map_location="cpu")
    except Exception as exc:  # MlflowException, OSError from artifact stores, unpickling errors
        raise _SourceError(f"MLflow (tracking URI {tracking_uri}) cannot load it: {one_line(exc)}") from exc
    inner = getattr(loaded, "model", loaded)  # resnet.predict.Classifier wraps our ResNet as .model
    if isinstance(inner, ResNet):
        state_dict = inner.state_dict()
    elif isinstance(loaded, torch.nn.Module):
        state_dict = loaded.state_dict()
        nested = {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
        state_dict = nested or state_dict
    else:
        raise _SourceError(
            f"the MLflow model is a {type(loaded).__name__}, not a torch module holding a ResNet"
        )
    return _build_from_state_dict(_clean(state_dict), hint, where="")


def _registered_model_location(uri: str, client) -> str:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` → where that version's files are, asked of `client`'s
    registry (MLflow 3.17 resolves a `models:/` URI in its global registry, whatever registry it is given).
    Any other URI (`runs:/…`, a logged model's `models:/m-…`) is returned as it is."""
    reference = uri.removeprefix("models:/").rstrip("/")
    if not uri.startswith("models:/") or ("@" not in reference and "/" not in reference):
        return uri
    if "@" in reference:
        name, alias = reference.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = reference.rpartition("/")
    return client.get_model_version_download_uri(name, version)


# local files ------------------------------------------------------------------------------------------------


def _load_path(path: Path, hint: str | None, source: str) -> tuple[ResNet, str]:
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise _SourceError(
                f"a directory without {MODEL_FILE} (expected a model file, a state dict or a checkpoint "
                f"directory holding {MODEL_FILE})"
            )
        path = path / MODEL_FILE
    elif not path.exists():
        raise _SourceError("no such file or directory")
    return _load_file(path, hint, where="" if str(path) == source else f"{path}: ")


def _load_file(path: Path, hint: str | None, *, where: str) -> tuple[ResNet, str]:
    """``where``: "" when ``path`` is what the source names, else "<what it is>: " to prefix messages with."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError, OSError
        raise _SourceError(f"{where}not a model file or state dict: {_load_failure(path, exc)}") from exc
    if isinstance(blob, Mapping) and "meta" in blob and "model" in blob:
        meta, state_dict = blob["meta"], blob["model"]
        name = meta.get("model_name") if isinstance(meta, Mapping) else None
        if not isinstance(name, str) or not _is_state_dict(state_dict):
            raise _SourceError(
                f"{where}not a model file: its meta names no model_name or its weights are not a state dict"
            )
        if name not in MODELS:
            raise _SourceError(
                f"{where}a model file of an unknown model {name!r}: expected one of {', '.join(available_models())}"
            )
        _check_hint(hint, name, f"{where}a model file of")
        try:
            check_weights(path, meta, state_dict)
        except PipelineError as exc:
            raise _SourceError(where + str(exc).removeprefix(f"{path}: ")) from None
        return _build_from_state_dict(_clean(state_dict), name, where=where)
    if isinstance(blob, Mapping) and _is_state_dict(blob.get("state_dict")):
        blob = blob["state_dict"]
    if not _is_state_dict(blob):
        if isinstance(blob, Mapping):
            keys = ", ".join(map(str, list(blob)[:6])) + (", ..." if len(blob) > 6 else "")
            found = f"a dict with keys {keys}" if blob else "an empty dict"
        else:
            found = f"a {type(blob).__name__}"
        raise _SourceError(
            f"{where}not a model file or state dict (found {found}; expected {{'meta', 'model'}} as "
            "written by the pipeline, or a state dict of tensors)"
        )
    return _build_from_state_dict(_clean(blob), hint, where=where)


def _load_failure(path: Path, exc: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in a few words."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read it: {exc.strerror}"
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as error:
        return f"cannot read it: {error.strerror or error}"
    if not head:
        return "an empty file"
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        return "not a file written by torch.save (neither a zip archive nor a pickle)"
    text = str(exc)
    if "Weights only load failed" in text:
        # torch's message is a paragraph; what matters is the type that is not plain data
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return f"it pickles Python objects{what}, not only tensors (a whole module? save its state_dict())"
    return f"torch.load failed: {first_line(exc, typed=True)}"


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _clean(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes every key carries (DDP's "module.", torch.compile's "_orig_mod."), and add the
    BatchNorm batch counters that state dicts saved before PyTorch 0.4.1 lack (BN itself does the same when it
    loads such an old state dict; their value is unused unless BN momentum is None)."""
    state_dict = dict(state_dict)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped = True
    return _complete_bn_counters(state_dict)


def _complete_bn_counters(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    completed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        completed[key] = value
        if key.endswith(".running_var"):
            counter = key[: -len("running_var")] + "num_batches_tracked"
            if counter not in state_dict:
                completed[counter] = torch.tensor(0, dtype=torch.long)
    return completed


# architectures ----------------------------------------------------------------------------------------------


class _NoRandomInit(TorchFunctionMode):
    """Skips the random fills of weight init. On the meta device they are pointless, and ``normal_`` there
    goes through torch's Python reference implementation, whose first call imports torch._dynamo (seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.normal_, torch.Tensor.uniform_):
            return args[0]
        return func(*args, **(kwargs or {}))


@cache
def _signature(name: str) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of a registered model, head excepted (built on the meta device: no
    memory, no init; all registered models take ~0.2 s)."""
    with torch.device("meta"), _NoRandomInit():
        net = MODELS[name](num_classes=1)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    shapes["fc.weight"] = (-1, shapes["fc.weight"][1])  # any class count; the feature width must match
    shapes["fc.bias"] = (-1,)
    return shapes


def _differences(name: str, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps ``state_dict`` from loading into model ``name``: missing/unexpected keys, other shapes."""
    expected = _signature(name)
    out = [f"missing {k}" for k in expected if k not in state_dict]
    out += [f"unexpected {k}" for k in state_dict if k not in expected]
    for key, shape in expected.items():
        if key in state_dict:
            given = tuple(state_dict[key].shape)
            if len(given) != len(shape) or any(e not in (-1, g) for e, g in zip(shape, given, strict=True)):
                out.append(
                    f"{key} has shape {list(given)}, expected {['*' if e == -1 else e for e in shape]}"
                )
    return out


def _infer_architecture(state_dict: Mapping[str, torch.Tensor], where: str) -> str:
    diffs = {name: _differences(name, state_dict) for name in MODELS}
    matches = [name for name, d in diffs.items() if not d]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise _SourceError(
            f"{where}the state dict fits several models ({', '.join(matches)}); set finetune.model"
        )
    closest = min(diffs, key=lambda name: len(diffs[name]))
    raise _SourceError(
        f"{where}the state dict's keys match no known ResNet ({len(state_dict)} keys, first "
        f"{next(iter(state_dict))}; expected one of {', '.join(available_models())}; closest {closest}: "
        f"{_count(len(diffs[closest]), 'difference')}, e.g. {diffs[closest][0]})"
    )


def _build_from_state_dict(
    state_dict: dict[str, torch.Tensor], name: str | None, *, where: str
) -> tuple[ResNet, str]:
    if name is None:
        name = _infer_architecture(state_dict, where)
    else:
        diffs = _differences(name, state_dict)
        if diffs:
            raise _SourceError(
                f"{where}the state dict does not fit {name} ({_count(len(diffs), 'difference')}, e.g. "
                f"{'; '.join(diffs[:3])})"
            )
    num_pretrained = int(state_dict["fc.weight"].shape[0])
    if num_pretrained < 1 or tuple(state_dict["fc.bias"].shape) != (num_pretrained,):
        raise _SourceError(f"{where}the head fc.weight/fc.bias has inconsistent shapes")
    net = build_model(name, num_pretrained)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise _SourceError(
            f"{where}the state dict does not load into {name}: {first_line(exc, typed=True)}"
        ) from exc
    return net, name
