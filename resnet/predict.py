"""Inference: the deployable model takes images as float [0, 1] (N, 3, H, W) and returns class logits. torch only.

Normalisation travels inside the model, so that whoever loads it from the registry needs no side information
beyond "pixels divided by 255".

`resnet-pipeline predict MODEL INPUT... [--out predictions.csv] [--top-k 3]` (`main`) writes the most probable
classes of image files as CSV: file, then class_i, prob_i (softmax) for i = 1..k, most probable first.

- MODEL: a model file (``model.pt``, or a directory holding one), or a registered model
  ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (also a logged model's ``models:/m-ID``) in the project's tracking
  store (``mlflow.tracking_uri`` of --params, else MLFLOW_TRACKING_URI, else the embedded ``mlruns.db`` beside
  the params file); its class names, image size and resize policy come from the MLmodel's metadata.
- INPUT: image files (taken whatever their extension), folders (searched recursively for the extensions of
  `resnet.data.images.IMAGE_EXTENSIONS`; hidden files and folders skipped), ``s3://BUCKET/PREFIX`` (the same
  inside the prefix; or one object) and ``@LIST``, a text file of such inputs, one per line (blank lines and
  ``#`` comments skipped; paths as they would be typed here; a listed file that is missing counts as
  unreadable instead of stopping the run).

Every image goes through the prepare stage's own decoding (`resnet.data.images.decode_image` with the model's
image size and resize policy) and is divided by 255. A file that is not a usable image is reported on stderr
(one line: file and reason) and skipped. The CSV is written to a temporary file renamed at the end: a failure
(a missing or unknown model, no image that could be read) leaves no CSV and exits 2 with one line.

This module imports torch, numpy and Pillow; mlflow and boto3 only for a model or an input that needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnet.data.images import IMAGE_EXTENSIONS, RESIZE_POLICIES, RejectedImage, decode_image, one_line
from resnet.data.loading import Normalize
from resnet.engine import load_model_file
from resnet.errors import PipelineError

PROG = "resnet-pipeline predict"
DEFAULT_RESIZE = "center_crop"  # model files and MLflow models that do not record their resize policy
MLFLOW_PREFIXES = ("models:/", "runs:/")
MODEL_FILE = "model.pt"  # the model file in a checkpoint directory


class Classifier(nn.Module):
    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def load_classifier(model_path: str | Path) -> tuple[Classifier, dict]:
    """A model file → (Classifier in eval mode, meta with class names). A missing file, or one that is not a
    model file of this project, is a `PipelineError` naming it."""
    if not Path(model_path).is_file():
        raise PipelineError(f"{model_path}: no such model file")
    try:
        model, meta = load_model_file(model_path)
        return Classifier(model, tuple(meta["mean"]), tuple(meta["std"])).eval(), meta
    # What torch.load and rebuilding the model raise for a file that is not one of ours: a truncated archive
    # or weights of another shape (RuntimeError), other bytes (UnpicklingError), an empty file (EOFError),
    # other keys (KeyError), an unknown architecture (ValueError).
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        raise PipelineError(f"{model_path}: not a model file of this project ({_reason(exc)})") from None


def pixels_from_images(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB (N, H, W, 3), as `decode_image` gives them (and the prepared shards hold them) → float32
    (N, 3, H, W) in [0, 1], what the Classifier takes."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().float() / 255


def class_probabilities(model: nn.Module, pixels: torch.Tensor) -> np.ndarray:
    """Softmax of `model` (float [0, 1] NCHW → logits) on `pixels`: float32 (N, classes)."""
    with torch.inference_mode():
        return torch.softmax(model(pixels).float(), dim=1).numpy()


# --- the model -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictor:
    """A model ready to predict: float [0, 1] NCHW → logits, its class names, and how images are brought to
    its input size (`decode_image`'s image_size and resize)."""

    model: nn.Module
    classes: list[str]
    image_size: int
    resize: str

    def decode(self, data: bytes) -> np.ndarray:
        """One file's bytes → uint8 (S, S, 3), as the prepare stage decodes; RejectedImage if unusable."""
        return decode_image(data, image_size=self.image_size, resize=self.resize)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) → float32 (N, classes)."""
        return class_probabilities(self.model, pixels_from_images(images))


def load_predictor(source: str, *, tracking_uri: str | None = None) -> Predictor:
    """The model `source` names (see the module docstring). `tracking_uri`: the store a models:/ URI is
    resolved in (None: `resnet.tracking.resolve_tracking_uri` of no params, i.e. MLFLOW_TRACKING_URI or
    ./mlruns.db). PipelineError with one line naming `source` when it cannot be loaded."""
    if source.startswith(MLFLOW_PREFIXES):
        if tracking_uri is None:
            from resnet.tracking import resolve_tracking_uri

            tracking_uri = resolve_tracking_uri(None)
        model, meta = _load_mlflow(source, tracking_uri)
    else:
        model, meta = _load_file(source)
    return _predictor(source, model, meta)


def _load_file(source: str) -> tuple[nn.Module, dict]:
    path = Path(source).expanduser()
    if path.is_dir() and (path / MODEL_FILE).is_file():
        path = path / MODEL_FILE
    return load_classifier(path)


def _predictor(source: str, model: nn.Module, meta: dict) -> Predictor:
    missing = [key for key in ("classes", "image_size") if not meta.get(key)]
    if missing:
        raise PipelineError(
            f"{source}: the model's meta has no {' and no '.join(missing)} (a trained model has them: the "
            "tune stage's models/tune/model.pt, or a registered version)"
        )
    resize = meta.get("resize") or DEFAULT_RESIZE
    if resize not in RESIZE_POLICIES:
        raise PipelineError(f"{source}: resize {resize!r}: expected one of {', '.join(RESIZE_POLICIES)}")
    return Predictor(model, [str(c) for c in meta["classes"]], int(meta["image_size"]), resize)


def _load_mlflow(source: str, tracking_uri: str) -> tuple[nn.Module, dict]:
    """A models:/ URI, resolved in `tracking_uri` (also the registry), downloaded to a temporary
    directory and loaded from there (`resnet.serving.load_model_dir`)."""
    if tracking_uri.startswith("sqlite:///"):
        # MLflow would create an empty store and then not find the model in it.
        database = Path(tracking_uri[len("sqlite:///") :])
        if not database.is_file():
            raise PipelineError(
                f"{source}: no MLflow store at {database} (tracking URI {tracking_uri}); register a model "
                "first, or name the store in --params (mlflow.tracking_uri) or MLFLOW_TRACKING_URI"
            )
    import mlflow
    import mlflow.artifacts

    import resnet.tracking  # noqa: F401  (quiets MLflow's INFO chatter)
    from resnet.serving import load_model_dir

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    location = _registered_location(source, client, tracking_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="predict-") as tmp, _no_download_bar():
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
            return load_model_dir(local)
    except PipelineError as exc:
        raise PipelineError(f"{source}: {exc}") from exc
    except Exception as exc:  # MlflowException, OSError of an artifact store, torch.export's load errors
        raise PipelineError(
            f"{source}: MLflow (tracking URI {tracking_uri}) cannot load it: {_reason(exc)}"
        ) from exc


def _registered_location(source: str, client, tracking_uri: str) -> str:
    """models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-ID → where the model's files are, asked of
    `client`: MLflow 3.17 downloads a models:/ or runs:/ URI from its global store whatever store it is given
    (and creates ./mlflow.db looking there), a location it does not. One line naming what is missing (the
    registered model, the alias, the version, the logged model); runs:/ URIs are refused."""
    from mlflow.exceptions import MlflowException

    expected = "expected models:/NAME@ALIAS or models:/NAME/VERSION (a registered model)"
    reference = source.removeprefix("models:/").rstrip("/")
    if not source.startswith("models:/"):
        raise PipelineError(f"{source}: {expected}")
    if "@" not in reference and "/" not in reference and reference.startswith("m-"):
        try:
            return client.get_logged_model(reference).artifact_location
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise PipelineError(f"{source}: no logged model {reference!r} in {tracking_uri}") from None
            raise PipelineError(f"{source}: MLflow (tracking URI {tracking_uri}): {_reason(exc)}") from exc
    name, at, alias = reference.partition("@")
    name, slash, version = name.partition("/") if not at else (name, "", "")
    if not name or not (at or slash) or (at and not alias) or (slash and not version.isdigit()):
        raise PipelineError(f"{source}: {expected}")
    try:
        registered = client.get_registered_model(name)
        if at:
            aliases = dict(registered.aliases or {})
            if alias not in aliases:
                known = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
                raise PipelineError(
                    f"{source}: registered model {name!r} has no alias @{alias} (aliases: {known})"
                )
            version = str(aliases[alias])
        else:
            try:
                client.get_model_version(name, version)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise PipelineError(f"{source}: registered model {name!r} has no version {version}") from None
        return client.get_model_version_download_uri(name, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise PipelineError(f"{source}: no registered model {name!r} in {tracking_uri}") from None
        raise PipelineError(f"{source}: MLflow (tracking URI {tracking_uri}): {_reason(exc)}") from exc


@contextlib.contextmanager
def _no_download_bar():
    """MLflow's artifact download bar: this command shows its own progress."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# --- the inputs ------------------------------------------------------------------------------------------------


def find_inputs(inputs: Sequence[str]) -> list[str]:
    """The image files the INPUT arguments name (see the module docstring), each once, in the order given
    (a folder's and a prefix's files sorted): local paths as typed, S3 objects as s3:// URIs."""
    found: list[str] = []
    for item in inputs:
        if item.startswith("@"):
            for entry in _read_list(item[1:]):
                found.extend(_expand(entry, listed=True))
        else:
            found.extend(_expand(item, listed=False))
    return list(dict.fromkeys(found))


def _read_list(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"@{path}: no such list file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"@{path}: cannot read the list ({_reason(exc)})") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _expand(item: str, *, listed: bool) -> list[str]:
    if item.startswith("s3://"):
        return _s3_images(item)
    path = Path(item)
    if path.is_dir():
        return _folder_images(item)
    if path.exists() or listed:
        return [item]
    raise PipelineError(f"{item}: no such file or directory")


def _is_image_name(relative: str) -> bool:
    parts = relative.split("/")
    return not any(part.startswith(".") for part in parts) and relative.lower().endswith(IMAGE_EXTENSIONS)


def _folder_images(root: str) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(os.path.join(directory, f) for f in files if _is_image_name(f))
    return sorted(found)


def _s3_images(uri: str) -> list[str]:
    from resnet.data import s3  # boto3 only when an input is in S3

    bucket, key = s3.split_s3_uri(uri)
    objects = s3.list_objects(uri)
    if not objects:
        if key and not key.endswith("/"):
            return [uri]  # one object (read_object says if it is not there)
        raise PipelineError(f"{uri}: no objects under this prefix")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    return [f"s3://{bucket}/{k}" for k, _ in objects if _is_image_name(k[len(prefix) :])]


def read_inputs(names: Sequence[str]) -> Iterator[tuple[str, bytes | Exception]]:
    """(name, bytes) of every input in order, or (name, the exception) for one that cannot be read. S3 objects
    are downloaded by read_objects' threads, a run of consecutive ones of a bucket at a time; a failure that
    every object would meet (credentials, no such bucket) is raised."""
    i = 0
    while i < len(names):
        if names[i].startswith("s3://"):
            from resnet.data import s3

            bucket = s3.split_s3_uri(names[i])[0]
            j = i
            while j < len(names) and names[j].startswith(f"s3://{bucket}/"):
                j += 1
            keys = [name[len(f"s3://{bucket}/") :] for name in names[i:j]]
            for name, (_, result) in zip(names[i:j], s3.read_objects(bucket, keys), strict=True):
                yield name, result
            i = j
        else:
            try:
                data: bytes | Exception = Path(names[i]).read_bytes()
            except OSError as exc:
                data = exc
            yield names[i], data
            i += 1


# --- predicting ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    images: int  # predicted
    unreadable: list[tuple[str, str]]  # (name, reason), skipped
    out: str


def predict(
    model: str,
    inputs: Sequence[str],
    *,
    out: str | Path = "predictions.csv",
    top_k: int = 3,
    batch_size: int = 64,
    tracking_uri: str | None = None,
    report: Callable[[str], None] | None = None,
) -> Summary:
    """Predict every image of `inputs` with `model` and write the CSV `out` (see the module docstring).
    `report` gets one line per skipped file (default: stderr)."""
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    predictor = load_predictor(model, tracking_uri=tracking_uri)
    names = find_inputs(inputs)
    if not names:
        raise PipelineError(
            f"no image files in {' '.join(inputs)} (extensions: {' '.join(IMAGE_EXTENSIONS)})"
        )
    k = min(top_k, len(predictor.classes))
    from resnet.io import atomic_path
    from resnet.progress import progress

    unreadable: list[tuple[str, str]] = []
    count = 0
    try:
        with (
            progress(desc="predict", total=len(names), unit="img") as bar,
            atomic_path(out) as tmp,
            tmp.open("w", newline="") as handle,
        ):

            def skip(name: str, reason: str) -> None:
                unreadable.append((name, reason))
                line = f"{PROG}: skipped {name}: {reason}"
                if report is not None:
                    report(line)
                else:
                    bar.write(line, file=sys.stderr)  # above the progress bar

            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["file", *(f"{col}_{i}" for i in range(1, k + 1) for col in ("class", "prob"))])
            for name, probs in predict_probabilities(predictor, names, batch_size, skip, bar.update):
                order = np.argsort(-probs, kind="stable")[:k]
                writer.writerow(
                    [name, *(v for i in order for v in (predictor.classes[i], f"{probs[i]:.6f}"))]
                )
                count += 1
            if count == 0:
                raise PipelineError(
                    f"none of the {len(names)} input files is an image this model can read; nothing written"
                )
    except OSError as exc:  # the CSV's folder or file (an input that cannot be read is skipped, not raised)
        raise PipelineError(f"{out}: cannot write the predictions ({_reason(exc)})") from exc
    return Summary(count, unreadable, str(out))


def predict_probabilities(
    predictor: Predictor,
    names: Sequence[str],
    batch_size: int,
    skip: Callable[[str, str], None],
    done: Callable[[int], object] = lambda n: None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float64 class probabilities) of every input that is a usable image, in order; skip(name, reason)
    for the others. Files are read by `read_inputs`, decoded by a few threads (Pillow releases the GIL) and
    predicted `batch_size` at a time; done(n) after every n inputs."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode") as pool:
        for batch in _batches(read_inputs(names), batch_size):
            good = []
            for name, result in pool.map(lambda item: _decode(predictor, *item), batch):
                if isinstance(result, str):
                    skip(name, result)
                else:
                    good.append((name, result))
            if good:
                probs = predictor.probabilities(np.stack([image for _, image in good]))
                yield from zip((name for name, _ in good), probs.astype(np.float64), strict=True)
            done(len(batch))


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decode(predictor: Predictor, name: str, data: bytes | Exception) -> tuple[str, np.ndarray | str]:
    """(name, pixels), or (name, why it is skipped)."""
    if isinstance(data, FileNotFoundError):
        return name, "no such file"
    if isinstance(data, Exception):
        reason = _reason(data)
        return name, reason.removeprefix(f"{name}: ")  # an S3 error names the URI itself
    try:
        return name, predictor.decode(data)
    except RejectedImage as exc:
        return name, str(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return one_line(exc) or type(exc).__name__


# --- the command -----------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _tracking_uri(params: str | None) -> str:
    """The project's tracking store: `mlflow.tracking_uri` of the params file (`params`, else params.yaml if
    there is one), else MLFLOW_TRACKING_URI, else the embedded store beside the params file."""
    from resnet.config import DEFAULT_PARAMS, load_config
    from resnet.tracking import resolve_tracking_uri

    path = Path(params or DEFAULT_PARAMS)
    configured = load_config(path).mlflow.tracking_uri if params is not None or path.is_file() else None
    return resolve_tracking_uri(configured, root=path.parent)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Class probabilities of image files, with a model file or a registered model, as CSV.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        f"  {PROG} models/tune/model.pt photos/ --out predictions.csv\n"
        f"  {PROG} models:/resnet-digits@champion s3://bucket/incoming/ @more.txt --top-k 5",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a model file, or models:/NAME@ALIAS, models:/NAME/VERSION"
    )
    parser.add_argument(
        "inputs",
        metavar="INPUT",
        nargs="+",
        help="an image file, a folder (recursive), s3://BUCKET/PREFIX, or @LIST (a file of inputs, one a line)",
    )
    parser.add_argument("--out", default="predictions.csv", help="the CSV to write (default: %(default)s)")
    parser.add_argument(
        "--top-k", type=_positive_int, default=3, help="classes per image (default: %(default)s)"
    )
    parser.add_argument(
        "--params",
        default=None,
        help="params file whose mlflow.tracking_uri holds a models:/ MODEL (default: params.yaml if present)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=64, help="images per forward pass (default: %(default)s)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        tracking_uri = _tracking_uri(args.params) if args.model.startswith(MLFLOW_PREFIXES) else None
        summary = predict(
            args.model,
            args.inputs,
            out=args.out,
            top_k=args.top_k,
            batch_size=args.batch_size,
            tracking_uri=tracking_uri,
        )
    except PipelineError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    skipped = f" ({len(summary.unreadable)} unreadable, skipped)" if summary.unreadable else ""
    noun = "image" if summary.images == 1 else "images"
    print(f"predict: {summary.images} {noun} → {summary.out}{skipped}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
