"""The deployable model as ONNX, and its int8 post-training quantization. torch, onnx and onnxruntime only.

    resnet-pipeline export --model models/tune/model.pt --out models/export/model.onnx [--int8 --data DIR]

What is exported is `resnet.predict.Classifier`: normalisation inside, float32 RGB in [0, 1] of shape
(N, 3, H, W) in ("images"), logits out ("logits"), any N. The class names, image size and architecture travel
in the ONNX file's metadata_props, so a user of the file needs neither PyTorch nor this package.

`export_onnx` checks ONNX Runtime's logits against PyTorch's before it writes the file. `quantize_int8`
quantizes weights (int8, per output channel) and activations (uint8, ranges calibrated on training images) in
QDQ format; `compare` scores an fp32 and an int8 file side by side (benchmarks/export_int8.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from resnet.data.loading import load_prepared
from resnet.errors import PipelineError, first_line
from resnet.io import atomic_path
from resnet.predict import load_classifier

PROG = "resnet-pipeline export"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# ONNX Runtime and PyTorch compute the same float32 graph with different kernels (convolution algorithms,
# summation orders, BatchNorm folded into the convolutions by the exporter), so their logits differ by rounding:
# ~1e-6 on a resnet20 with logits of size ~10. 1e-4 leaves two orders of magnitude for larger logits and deeper
# models, and is still far below what a wrong export gives (a missing normalisation, BatchNorm in training
# mode, a wrong padding: differences of 1e-1 and more) or what could flip a prediction.
ATOL = 1e-4
CHECK_BATCHES = (1, 5)  # batch sizes checked: 1 and one that the export's example (2) did not have
CALIBRATION_IMAGES = 256  # training images the int8 activations' ranges are calibrated on (the CLI's default)
CALIBRATION_BATCH = 32
# uint8 activations with int8 weights (U8S8), not ONNX Runtime's default int8 activations (S8S8): on x86 its
# graph optimiser fuses every Conv and Add of a U8S8 resnet20 into QLinearConv/QLinearAdd, but only 9 of its 19
# Convs at S8S8, whose model ran slower than fp32 (benchmarks/RESULTS.md). Same accuracy on digits. (On x86
# CPUs without VNNI, U8S8 can saturate; ORT's remedy there is reduce_range. compare() measures agreement.)
ACTIVATIONS = QuantType.QUInt8


def export_onnx(model_path: str | Path, out_path: str | Path, *, opset: int | None = None) -> dict:
    """Export the model file's `Classifier` to ONNX at `out_path` (one file, dynamic batch dimension), after
    checking ONNX Runtime's logits against PyTorch's on random images at batch sizes 1 and 5.

    Returns {"path", "max_abs_diff", "tolerance", "opset", "bytes"}; raises `PipelineError` (and writes
    nothing) if the logits differ by more than `ATOL`. `opset`: None for torch's default."""
    classifier, meta = load_classifier(model_path)
    size = int(meta["image_size"])
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # The torch.export-based exporter (dynamo=True), torch's default since 2.9 (the TorchScript one is
    # deprecated); an example batch of 2, so that the batch dimension is not specialised to 1.
    program = torch.onnx.export(
        classifier,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    model = program.model_proto
    _set_metadata(
        model,
        {
            "classes": json.dumps(list(meta["classes"])),
            "image_size": str(size),
            "model_name": str(meta["model_name"]),
            "data_hash": str(meta.get("data_hash", "")),
            **(
                {"resize": str(meta["resize"])} if "resize" in meta else {}
            ),  # how new images reach image_size
            "input": "float32 RGB in [0, 1], shape (N, 3, image_size, image_size); output: logits (N, classes)",
        },
    )
    blob = model.SerializeToString()
    max_diff = max_abs_diff(classifier, ort_session(blob), size)
    if not max_diff <= ATOL:  # (also catches NaN)
        raise PipelineError(
            f"{out_path}: not written: ONNX Runtime's logits differ from PyTorch's by up to {max_diff:.2e} "
            f"(tolerance {ATOL:.0e})"
        )
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(blob)
    return {
        "path": str(out_path),
        "max_abs_diff": max_diff,
        "tolerance": ATOL,
        "opset": _opset(model),
        "bytes": len(blob),
    }


def max_abs_diff(classifier: torch.nn.Module, session: ort.InferenceSession, image_size: int) -> float:
    """Largest |ONNX Runtime - PyTorch| over the logits of seeded random images, at each of `CHECK_BATCHES`."""
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for batch in CHECK_BATCHES:
        images = torch.rand(batch, 3, image_size, image_size, generator=generator)
        with torch.inference_mode():
            expected = classifier(images).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        if got.shape != expected.shape:
            raise PipelineError(
                f"the ONNX model returned logits of shape {got.shape}, PyTorch {expected.shape}"
            )
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def quantize_int8(
    onnx_path: str | Path, out_path: str | Path, calibration_images: torch.Tensor | np.ndarray | None
) -> dict:
    """An int8 copy of the fp32 ONNX model at `out_path`, its metadata kept.

    Static quantization (QDQ: int8 weights per output channel, uint8 activations per tensor, their ranges the
    min/max seen on `calibration_images`: a sample of the training split, uint8 or float [0, 1], (N, 3, H, W)).
    When that is impossible (no calibration images, or ONNX Runtime cannot quantize or run the model) the
    weights alone are quantized, activations at run time (dynamic). Returns {"path", "method": "static" | "dynamic",
    "calibration_images", "bytes"}, and "reason" when the method is dynamic."""
    metadata = {p.key: p.value for p in _load_onnx(onnx_path).metadata_props}
    images = np.zeros((0,)) if calibration_images is None else as_float_images(calibration_images)
    with tempfile.TemporaryDirectory(prefix="quantize-") as work:
        # ONNX Runtime's recommended pre-processing (shape inference, graph optimisation). Its symbolic shape
        # inference is skipped: it is for shapes computed inside the graph (transformers); here only the batch
        # is symbolic and ONNX's own inference knows every other shape (0.1 s instead of 12 s on a resnet20).
        prepared, quantized = Path(work) / "prepared.onnx", Path(work) / "int8.onnx"
        quant_pre_process(onnx_path, prepared, skip_symbolic_shape=True)
        method, reason = "static", None
        if len(images) == 0:
            method, reason = "dynamic", "no calibration images"
        else:
            try:
                quantize_static(
                    prepared,
                    quantized,
                    _Calibration(images),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=ACTIVATIONS,
                    weight_type=QuantType.QInt8,
                )
                _run_once(quantized, images[:1])
            # Whatever the quantizer or ONNX Runtime refuses (an operator without an int8 kernel, a graph it
            # cannot calibrate) makes static quantization impossible for this model: fall back, and say why.
            except Exception as err:  # noqa: BLE001
                method, reason = "dynamic", f"static quantization failed: {first_line(err, limit=160)}"
        if method == "dynamic":
            quantize_dynamic(prepared, quantized, per_channel=True)
            _run_once(quantized, np.zeros(_input_shape(onnx.load(prepared)), dtype=np.float32))
        model = onnx.load(quantized)
    _set_metadata(model, metadata | {"quantization": f"int8 {method}"})
    blob = model.SerializeToString()
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(blob)
    result = {"path": str(out_path), "method": method, "calibration_images": len(images), "bytes": len(blob)}
    return result | ({"reason": reason} if reason else {})


def compare(
    fp32_onnx: str | Path,
    int8_onnx: str | Path,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 64,
    runs: int = 10,
) -> dict:
    """Accuracy of both models on `images` (uint8 or float [0, 1]) and `labels`, how often they agree, their
    file sizes and their CPU latency: the median ms per batch of `batch_size` over `runs` runs, one thread.
    Returns {"fp32": {...}, "int8": {...}, "accuracy_change", "agreement", "size_ratio", "speedup"}."""
    images = as_float_images(images)
    labels = np.asarray(labels)
    batch = np.resize(images, (batch_size, *images.shape[1:]))  # the first images, repeated if too few
    out, predicted = {}, {}
    for name, path in (("fp32", fp32_onnx), ("int8", int8_onnx)):
        session = ort_session(path, threads=1)
        predicted[name] = onnx_logits(session, images).argmax(1)
        out[name] = {
            "path": str(path),
            "accuracy": float((predicted[name] == labels).mean()),
            "bytes": Path(path).stat().st_size,
            "latency_ms": median_ms(lambda s=session: s.run([OUTPUT_NAME], {INPUT_NAME: batch}), runs),
        }
    return out | {
        "images": len(labels),
        "batch_size": batch_size,
        "accuracy_change": out["int8"]["accuracy"] - out["fp32"]["accuracy"],
        "agreement": float((predicted["int8"] == predicted["fp32"]).mean()),
        "size_ratio": out["int8"]["bytes"] / out["fp32"]["bytes"],
        "speedup": out["fp32"]["latency_ms"] / out["int8"]["latency_ms"],
    }


def read_metadata(onnx_path: str | Path) -> dict:
    """The metadata `export_onnx` stores: classes as a list, image_size as an int, the rest as strings."""
    props = {p.key: p.value for p in _load_onnx(onnx_path).metadata_props}
    if "classes" in props:
        props["classes"] = json.loads(props["classes"])
    if "image_size" in props:
        props["image_size"] = int(props["image_size"])
    return props


def ort_session(model: str | Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; `threads` intra-op threads (and sequential execution), or ONNX Runtime's default."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of float [0, 1] `images`, in batches."""
    parts = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[start : start + batch_size]})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of `fn()` in milliseconds over `runs` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def as_float_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 or float (N, 3, H, W) images as a contiguous float32 array in [0, 1]."""
    array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    return np.ascontiguousarray(array, dtype=np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/tune/model.pt", help="model file (default: %(default)s)")
    parser.add_argument("--out", default="models/export/model.onnx", help="ONNX file (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    parser.add_argument("--int8", action="store_true", help="also write an int8 copy, OUT with .int8.onnx")
    parser.add_argument(
        "--data",
        help="prepared dataset whose train split calibrates the int8 copy (without it: dynamic quantization)",
    )
    parser.add_argument(
        "--calibration",
        type=int,
        default=CALIBRATION_IMAGES,
        help="training images to calibrate on (default: %(default)s)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        # The calibration data first: a dataset that is not the model's stops the command before it writes.
        calibration = None
        if args.int8 and args.data is not None:
            calibration = calibration_sample(args.data, args.model, args.calibration)
        exported = export_onnx(args.model, args.out, opset=args.opset)
        print(
            f"{exported['path']}: {_megabytes(exported['bytes'])}, opset {exported['opset']}, "
            f"max |onnx - torch| {exported['max_abs_diff']:.1e} (tolerance {ATOL:.0e})"
        )
        if args.int8:
            out = Path(args.out)
            int8_path = out.with_name(f"{out.name.removesuffix('.onnx')}.int8.onnx")
            quantized = quantize_int8(args.out, int8_path, calibration)
            how = f"calibrated on {quantized['calibration_images']} train images"
            print(
                f"{quantized['path']}: {_megabytes(quantized['bytes'])}, int8 {quantized['method']} "
                f"({quantized.get('reason', how)})"
            )
    except PipelineError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


def calibration_sample(
    data_dir: str | Path, model_path: str | Path, count: int, seed: int = 0
) -> torch.Tensor:
    """`count` images drawn at random (seeded) from the prepared dataset's train split, uint8 (N, 3, H, W);
    the dataset must have the model's classes and image size."""
    _, meta = load_classifier(model_path)
    data = load_prepared(data_dir, splits=("train",))
    images = data.splits["train"].images
    if list(data.classes) != list(meta["classes"]) or images.shape[-1] != meta["image_size"]:
        raise PipelineError(
            f"{data_dir}: {len(data.classes)} classes at {images.shape[-1]} px, the model "
            f"{model_path} has {len(meta['classes'])} at {meta['image_size']} px: not its dataset"
        )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:count]]


class _Calibration(CalibrationDataReader):
    """The calibration images as ONNX Runtime asks for them: input feeds, one batch at a time, then None."""

    def __init__(self, images: np.ndarray):
        self._batches = iter(
            [
                {INPUT_NAME: images[i : i + CALIBRATION_BATCH]}
                for i in range(0, len(images), CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def _run_once(model_path: Path, images: np.ndarray) -> None:
    ort_session(model_path).run([OUTPUT_NAME], {INPUT_NAME: images})


def _load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path)
    except DecodeError as err:
        raise PipelineError(f"{path}: not an ONNX model ({first_line(err, limit=160)})") from None
    if not model.graph.node:  # (what an empty file parses as)
        raise PipelineError(f"{path}: not an ONNX model (no graph)")
    return model


def _input_shape(model: onnx.ModelProto) -> list[int]:
    """The model input's shape with a batch of 1 (and 1 for any other symbolic dimension)."""
    return [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]


def _set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


if __name__ == "__main__":
    raise SystemExit(main())
