"""The pipeline's model as PyTorch fp32, ONNX fp32 and ONNX int8: file size, CPU latency and test accuracy.

    uv run python benchmarks/export_int8.py [--model models/tune/model.pt] [--data data/prepared/digits]
        [--calibration 256] [--runs 30] [--activations uint8|int8] [--out-dir DIR] [--json PATH]

Trains nothing. Exports the model file with `resnet.export.export_onnx` (checked against PyTorch), quantizes
that with `resnet.export.quantize_int8` (static QDQ int8, per-channel weights, calibrated on `--calibration`
images drawn from the train split; it says if it had to fall back to dynamic), and measures the three in the
same run:

- size: the file's bytes (the PyTorch model file holds the weights and the meta; the ONNX files the graph too);
- latency: one thread each (torch.set_num_threads(1); ONNX Runtime intra_op_num_threads=1, sequential), the
  median ms per batch of float [0, 1] images at batch 1 and 64 over `--runs` batches after one warm-up, the
  three timed in turn batch by batch so that load from other processes falls on all of them alike;
- accuracy: on the whole test split, pixels divided by 255 as every user of the model does.

Ratios are against PyTorch fp32 from the same run. The ONNX files go to a temporary directory unless
`--out-dir` is given. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import QuantType

from resnet import export
from resnet.data.loading import load_prepared
from resnet.predict import load_classifier

BATCHES = (1, 64)


def interleaved_median_ms(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median ms of each of `fns`, called in turn `runs` times after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(runs + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/tune/model.pt")
    parser.add_argument("--data", default="data/prepared/digits")
    parser.add_argument("--calibration", type=int, default=256, help="train images to calibrate int8 on")
    parser.add_argument("--runs", type=int, default=30, help="timed batches per model and batch size")
    parser.add_argument(
        "--activations",
        choices=("uint8", "int8"),
        default="uint8",
        help="int8 model's activations: uint8 (resnet.export's choice) or int8 (ONNX Runtime's default)",
    )
    parser.add_argument("--out-dir", default=None, help="keep the ONNX files here (default: a temporary dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    export.ACTIVATIONS = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[args.activations]

    with tempfile.TemporaryDirectory(prefix="export-int8-") as tmp:
        out_dir = Path(args.out_dir or tmp)
        fp32_path, int8_path = out_dir / "model.onnx", out_dir / "model.int8.onnx"
        exported = export.export_onnx(args.model, fp32_path)
        calibration = export.calibration_sample(args.data, args.model, args.calibration)
        quantized = export.quantize_int8(fp32_path, int8_path, calibration)

        classifier, meta = load_classifier(args.model)
        test = load_prepared(args.data, splits=("test",)).splits["test"]
        images, labels = export.as_float_images(test.images), test.labels.numpy()
        sessions = {
            "onnx_fp32": export.ort_session(fp32_path, 1),
            "onnx_int8": export.ort_session(int8_path, 1),
        }

        def torch_logits(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return classifier(torch.from_numpy(batch)).numpy()

        def predictor(name: str) -> Callable[[np.ndarray], np.ndarray]:
            if name == "pytorch_fp32":
                return torch_logits
            return lambda batch: sessions[name].run([export.OUTPUT_NAME], {export.INPUT_NAME: batch})[0]

        names = ("pytorch_fp32", "onnx_fp32", "onnx_int8")
        sizes = {
            "pytorch_fp32": Path(args.model).stat().st_size,
            "onnx_fp32": exported["bytes"],
            "onnx_int8": quantized["bytes"],
        }
        predicted = {
            name: np.concatenate(
                [predictor(name)(images[i : i + 256]) for i in range(0, len(images), 256)]
            ).argmax(1)
            for name in names
        }
        latency = {}
        for batch_size in BATCHES:
            batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
            fns = {name: partial(predictor(name), batch) for name in names}
            latency[batch_size] = interleaved_median_ms(fns, args.runs)

    results = {
        name: {
            "bytes": sizes[name],
            "size_ratio": sizes[name] / sizes["pytorch_fp32"],
            "accuracy": float((predicted[name] == labels).mean()),
            "agreement_with_pytorch": float((predicted[name] == predicted["pytorch_fp32"]).mean()),
            **{f"batch{b}_ms": latency[b][name] for b in BATCHES},
            **{f"batch{b}_speedup": latency[b]["pytorch_fp32"] / latency[b][name] for b in BATCHES},
        }
        for name in names
    }
    report = {
        "model": args.model,
        "model_name": meta["model_name"],
        "image_size": meta["image_size"],
        "test_images": len(labels),
        "export": exported,
        "quantization": quantized,
        "activations": args.activations,
        "runs": args.runs,
        "threads": 1,
        "results": results,
    }

    print(
        f"{args.model} ({meta['model_name']}, {meta['image_size']} px), {len(labels)} test images, "
        f"1 thread, median of {args.runs} batches"
    )
    print(f"ONNX export: max |onnx - torch| {exported['max_abs_diff']:.1e} (tolerance {export.ATOL:.0e})")
    print(
        f"int8: {quantized['method']}, {args.activations} activations, calibrated on "
        f"{quantized['calibration_images']} train images"
        + (f" ({quantized['reason']})" if "reason" in quantized else "")
    )
    print(
        f"{'model':13s} {'size KB':>8s} {'÷ torch':>8s} {'b1 ms':>7s} {'speed-up':>9s} {'b64 ms':>8s} "
        f"{'speed-up':>9s} {'test acc':>9s} {'agrees':>7s}"
    )
    for name, r in results.items():
        print(
            f"{name:13s} {r['bytes'] / 1e3:8.0f} {r['size_ratio']:7.2f}x {r['batch1_ms']:7.2f} "
            f"{r['batch1_speedup']:8.2f}x {r['batch64_ms']:8.1f} {r['batch64_speedup']:8.2f}x "
            f"{r['accuracy']:9.4f} {r['agreement_with_pytorch']:7.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
