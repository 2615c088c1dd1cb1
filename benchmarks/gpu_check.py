"""The checks behind `benchmarks/gpu_check.sh`: one GPU machine, a few minutes, PASS/FAIL per check.

    python benchmarks/gpu_check.py env     --out DIR [--device cuda|cpu]
    python -m torch.distributed.run --standalone --nproc_per_node=N \\
           benchmarks/gpu_check.py ddp     --out DIR [--device cuda|cpu] [--train N --val N --epochs 2]
    python benchmarks/gpu_check.py recipe  --out DIR --name recipe  --variants fp32,fp32+cl,bf16,...
    python benchmarks/gpu_check.py recipe  --out DIR --name compile --variants compile
    python benchmarks/gpu_check.py summary --out DIR --mode gpu|cpu-smoke --json FILE

Each check writes DIR/<name>.json ({"status": "PASS"|"FAIL", "figures": ..., "error": ...}) and exits 1 when
it failed; `summary` folds those (plus the shell's DIR/<name>.rc, and gpu_resnet50's own JSON) into one file
and exits 1 if any check failed. `--device cpu` runs the same code on gloo and the CPU (a smoke test).

The training runs go through `resnet.engine.fit`, the loop every stage uses, on a synthetic in-memory
`PreparedData` (one noisy random template per class: learnable, so accuracy should rise above chance).
Imports only torch and our torch-only modules: no Ray, no MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

try:
    import torch
    import torch.distributed as dist

    from resnet.config import AugmentConfig, PretrainConfig
    from resnet.data.loading import PreparedData, Split
    from resnet.engine import fit
    from resnet.models import build_model
    from resnet.pretrained import state_dict_digest

    IMPORT_ERROR: ImportError | None = None
except ImportError as err:  # `summary` needs none of these; each check reports the error as its result
    IMPORT_ERROR = err

NUM_CLASSES = 10
LOSS_KEYS = ("train_loss", "val_loss")
GLOBAL_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")  # all-reduced: equal on every rank
# name -> (precision, channels_last, compile)
VARIANTS = {
    "fp32": ("fp32", False, False),
    "fp32+cl": ("fp32", True, False),
    "bf16": ("bf16", False, False),
    "bf16+cl": ("bf16", True, False),
    "fp16": ("fp16", False, False),
    "fp16+cl": ("fp16", True, False),
    "compile": ("bf16", True, True),
}


# ---------------------------------------------------------------- shared


def synthetic_data(n_train: int, n_val: int, *, size: int = 32, seed: int = 0) -> PreparedData:
    """A `PreparedData` in memory: uint8 images = a fixed random template per class + noise (`size`: a
    multiple of 8)."""
    gen = torch.Generator().manual_seed(seed)
    # 8×8-pixel blocks: a 4-pixel random crop shift leaves most of a class's pattern in place.
    blocks = torch.randint(0, 256, (NUM_CLASSES, 3, size // 8, size // 8), generator=gen, dtype=torch.int16)
    templates = blocks.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)

    def split(n: int) -> Split:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        noise = torch.randint(-64, 65, (n, 3, size, size), generator=gen, dtype=torch.int16)
        return Split((templates[labels] + noise).clamp_(0, 255).to(torch.uint8), labels)

    return PreparedData(
        classes=[f"class{i}" for i in range(NUM_CLASSES)],
        mean=(0.5, 0.5, 0.5),
        std=(0.3, 0.3, 0.3),
        content_hash=f"synthetic-{seed}",
        splits={"train": split(n_train), "val": split(n_val)},
    )


def finite(metrics: list[dict[str, float]], keys=LOSS_KEYS) -> bool:
    return bool(metrics) and all(math.isfinite(m[key]) for m in metrics for key in keys)


def write_result(
    out: Path, name: str, status: str, figures: dict[str, Any], error: str | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    blob = {"status": status, "figures": figures}
    if error:
        blob["error"] = error
    (out / f"{name}.json").write_text(json.dumps(blob, indent=2, default=str) + "\n")
    print(f"{status} {name}" + (f": {error}" if error else ""), flush=True)


def short_error(err: BaseException) -> str:
    """The exception in one line plus the innermost frames (what a report needs, not the whole traceback)."""
    frames = traceback.extract_tb(err.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    first_line = (str(err).strip().splitlines() or [""])[0][:400]
    return f"{type(err).__name__}: {first_line} (at {where})"


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    except Exception as err:  # no usable GPU: the result still gets written
        return f"unknown ({short_error(err)})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- 1. environment


def check_env(args: argparse.Namespace) -> int:
    figures: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_count": os.cpu_count(),
    }
    try:
        import torchvision

        figures["torchvision"] = torchvision.__version__
    except ImportError as err:
        figures["torchvision"] = f"missing ({err})"
    if figures["cuda_available"]:
        figures["devices"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(figures["device_count"])
        ]
        figures["bf16_supported"] = torch.cuda.is_bf16_supported()
        figures["cudnn"] = torch.backends.cudnn.version()
        try:
            figures["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:  # a build without NCCL
            figures["nccl"] = f"unavailable ({err})"
    try:
        from importlib.metadata import version

        figures["triton"] = version("triton")
    except Exception:
        figures["triton"] = None  # torch.compile on a GPU needs it
    # Triton builds a small C launcher on first use: torch.compile on a GPU needs a C compiler too.
    figures["c_compiler"] = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    figures["nccl_backend_available"] = dist.is_available() and dist.is_nccl_available()
    if args.device == "cuda":
        smi = shutil.which("nvidia-smi")
        commands = [["nvidia-smi"]] + ([["nvidia-smi", "topo", "-m"]] if figures["device_count"] > 1 else [])
        for command in commands:
            key = "_".join(command).replace("-", "_")
            if smi is None:
                figures[key] = "nvidia-smi not found"
                continue
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=60)
                figures[key] = done.stdout + done.stderr
            except (OSError, subprocess.SubprocessError) as err:
                figures[key] = f"failed: {err}"
            print(f"$ {' '.join(command)}\n{figures[key]}", flush=True)
    loaded = sorted(name for name in ("ray", "mlflow") if name in sys.modules)
    figures["ray_or_mlflow_imported"] = loaded
    for key, value in figures.items():
        if not key.startswith("nvidia_smi"):
            print(f"  {key}: {value}", flush=True)
    problems = []
    if args.device == "cuda" and not figures["cuda_available"]:
        problems.append("CUDA is not available to torch")
    if args.device == "cuda" and not figures["nccl_backend_available"]:
        problems.append("torch.distributed has no NCCL backend")
    if loaded:
        problems.append(f"importing our training modules imported {', '.join(loaded)}")
    write_result(args.out, "env", "FAIL" if problems else "PASS", figures, "; ".join(problems) or None)
    return 1 if problems else 0


# ---------------------------------------------------------------- 2. DDP


def check_ddp(args: argparse.Namespace) -> int:
    """One rank under torchrun: fit resnet20 for `epochs` epochs with DDP, then compare ranks."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = args.device == "cuda"
    figures: dict[str, Any] = {"rank": rank, "world_size": world_size, "backend": "nccl" if cuda else "gloo"}
    name = f"ddp.rank{rank}"
    try:
        if cuda:
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            figures["gpu"] = torch.cuda.get_device_name(device)
            dist.init_process_group(
                "nccl",
                timeout=datetime.timedelta(seconds=120),
                device_id=device,
                rank=rank,
                world_size=world_size,
            )
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        figures["pid"] = os.getpid()
        torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
        model = build_model("resnet20", NUM_CLASSES)
        data = synthetic_data(args.train, args.val)
        optim = PretrainConfig(batch_size=args.batch_size, lr=0.05, epochs=args.epochs)
        metrics: list[dict[str, float]] = []
        started = time.perf_counter()
        model = fit(
            model,
            data,
            optim,
            AugmentConfig(),
            device=device,
            rank=rank,
            world_size=world_size,
            on_epoch_end=lambda m, state: metrics.append(dict(m)),
        )
        sync(device)
        figures["fit_seconds"] = round(time.perf_counter() - started, 2)
        figures["epochs"] = metrics
        figures["param_sha256"] = state_dict_digest(dict(model.named_parameters()))
    except Exception as err:
        # Written before any further collective: a rank that failed must not wait on the others.
        write_result(args.out, name, "FAIL", figures, short_error(err))
        traceback.print_exc()
        return 1
    write_result(args.out, name, "PASS", figures)

    # Compare the ranks: the gather itself is one more collective on the backend under test.
    problems: list[str] = []
    try:
        flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        figures["max_abs_param_diff_vs_rank0"] = float((flat - reference).abs().max())
        gathered: list[dict[str, Any] | None] = [None] * world_size
        dist.all_gather_object(gathered, figures)
        if cuda and rank == 0 and shutil.which("nvidia-smi"):
            # Which processes hold a context on which GPU: each rank should be on its own GPU only.
            apps = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            pids = {str(g["pid"]) for g in gathered}
            contexts: dict[str, int] = {}
            for line in apps.splitlines():
                pid = line.split(",")[0].strip()
                if pid in pids:
                    contexts[pid] = contexts.get(pid, 0) + 1
            figures["contexts_per_rank_pid"] = contexts
            if any(count > 1 for count in contexts.values()):
                figures["warning"] = "a rank holds a CUDA context on more than one GPU (memory wasted)"
        dist.barrier()
    except Exception as err:  # this rank's file; `summary` reports the ranks' errors when ddp.json is missing
        write_result(args.out, name, "FAIL", figures, f"comparing ranks: {short_error(err)}")
        traceback.print_exc()
        return 1
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    if rank != 0:
        return 0

    per_rank = {g["rank"]: g for g in gathered}
    for r, g in sorted(per_rank.items()):
        if len(g["epochs"]) != args.epochs:
            problems.append(f"rank {r} completed {len(g['epochs'])} of {args.epochs} epochs")
        elif not finite(g["epochs"]):
            problems.append(f"rank {r} has a non-finite loss")
    digests = {g["param_sha256"] for g in per_rank.values()}
    params_identical = len(digests) == 1
    if not params_identical:
        problems.append(f"parameters differ across ranks ({len(digests)} distinct sha256)")
    reference_epochs = per_rank[0]["epochs"]
    metrics_identical = all(
        len(g["epochs"]) == len(reference_epochs)
        and all(
            math.isclose(a[key], b[key], rel_tol=1e-9, abs_tol=1e-12)
            for a, b in zip(g["epochs"], reference_epochs, strict=True)
            for key in GLOBAL_KEYS
        )
        for g in per_rank.values()
    )
    if not metrics_identical:
        problems.append("the all-reduced metrics differ across ranks")
    summary = {
        "world_size": world_size,
        "backend": figures["backend"],
        "gpus": [g.get("gpu") for g in per_rank.values()],
        "epochs": reference_epochs,
        "train_loss_per_epoch": [round(m["train_loss"], 4) for m in reference_epochs],
        "val_acc_per_epoch": [round(m["val_acc"], 4) for m in reference_epochs],
        "images_per_sec_rank0": [round(m["images_per_sec"], 1) for m in reference_epochs],
        "params_identical": params_identical,
        "param_sha256": sorted(digests),
        "max_abs_param_diff_vs_rank0": max(g["max_abs_param_diff_vs_rank0"] for g in per_rank.values()),
        "metrics_identical_across_ranks": metrics_identical,
        "fit_seconds": max(g["fit_seconds"] for g in per_rank.values()),
        "contexts_per_rank_pid": figures.get("contexts_per_rank_pid"),
    }
    if "warning" in figures:
        summary["warning"] = figures["warning"]
    write_result(args.out, "ddp", "FAIL" if problems else "PASS", summary, "; ".join(problems) or None)
    return 1 if problems else 0


# ---------------------------------------------------------------- 3. precision and memory format


def run_variant(
    name: str, data: PreparedData, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    precision, channels_last, compile_ = VARIANTS[name]
    figures: dict[str, Any] = {"precision": precision, "channels_last": channels_last, "compile": compile_}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model("resnet20", NUM_CLASSES)
    optim = PretrainConfig(
        batch_size=args.batch_size,
        lr=0.05,
        epochs=args.epochs,
        precision=precision,
        channels_last=channels_last,
        compile=compile_,
    )
    metrics: list[dict[str, float]] = []
    started = time.perf_counter()
    fit(
        model,
        data,
        optim,
        AugmentConfig(),
        device=device,
        on_epoch_end=lambda m, state: metrics.append(dict(m)),
    )
    sync(device)
    figures["wall_seconds"] = round(time.perf_counter() - started, 2)
    figures["epoch_seconds"] = [round(m["epoch_seconds"], 3) for m in metrics]
    figures["images_per_sec"] = [round(m["images_per_sec"], 1) for m in metrics]
    figures["train_loss"] = [round(m["train_loss"], 4) for m in metrics]
    figures["val_loss"] = [round(m["val_loss"], 4) for m in metrics]
    figures["val_acc"] = [round(m["val_acc"], 4) for m in metrics]
    figures["peak_memory_gib"] = peak_memory_gib(device)
    if compile_ and len(metrics) > 1:
        # The first epoch pays tracing and compiling (train and eval graphs); the later ones do not.
        figures["compile_seconds_estimate"] = round(
            metrics[0]["epoch_seconds"] - metrics[-1]["epoch_seconds"], 2
        )
    figures["ok"] = len(metrics) == args.epochs and finite(metrics)
    if not figures["ok"]:
        figures["error"] = f"{len(metrics)} of {args.epochs} epochs, losses {figures['train_loss']}"
    return figures


def check_recipe(args: argparse.Namespace) -> int:
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    data = synthetic_data(args.train, args.val)
    results: dict[str, Any] = {}
    for name in args.variants.split(","):
        print(f"-- {name}: {VARIANTS[name]} (precision, channels_last, compile)", flush=True)
        try:
            results[name] = run_variant(name, data, device, args)
        except Exception as err:
            results[name] = {"ok": False, "error": short_error(err)}
            traceback.print_exc()
        r = results[name]
        line = f"{'PASS' if r['ok'] else 'FAIL'} {name}"
        if "images_per_sec" in r:
            line += (
                f": {r['images_per_sec'][-1]:,.0f} img/s (last epoch; first {r['images_per_sec'][0]:,.0f}), "
                f"train loss {r['train_loss']}, val acc {r['val_acc']}, {r['wall_seconds']} s"
            )
            if "compile_seconds_estimate" in r:
                line += f", compile ≈ {r['compile_seconds_estimate']} s"
        if r.get("error"):
            line += f"  [{r['error']}]"
        print(line, flush=True)
    failed = [name for name, r in results.items() if not r["ok"]]
    figures = {
        "device": device_name(device),
        "batch_size": args.batch_size,
        "train_images": args.train,
        "epochs": args.epochs,
        "variants": results,
    }
    error = "; ".join(f"{name}: {str(results[name].get('error'))[:200]}" for name in failed)
    write_result(args.out, args.name, "FAIL" if failed else "PASS", figures, error or None)
    return 1 if failed else 0


# ---------------------------------------------------------------- 5. summary


def resnet50_result(out: Path, rc: int | None) -> dict[str, Any]:
    """gpu_resnet50.py writes its own JSON and text; judge them here."""
    text_path, json_path = out / "resnet50.out", out / "resnet50.raw.json"
    text = text_path.read_text(errors="replace") if text_path.exists() else ""
    figures: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    figures["printed"] = [
        line
        for line in text.splitlines()
        if line.split(" ")[0] in ("device", "setup", "result", "anchor", "goal", "imports", "warning:")
    ]
    problems = []
    if rc != 0:
        problems.append(f"exit status {rc}")
    rate = figures.get("images_per_sec")
    if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
        problems.append("no images/s figure")
    if "loss is not finite" in text:
        problems.append("the loss is not finite")
    return {
        "status": "FAIL" if problems else "PASS",
        "figures": figures,
        "error": "; ".join(problems) or None,
    }


def one_line(name: str, figures: dict[str, Any]) -> str:
    if name == "ddp" and "world_size" not in figures:
        return ""
    if name == "env":
        devices = ", ".join(d["name"] for d in figures.get("devices", [])) or "no GPU"
        return f"torch {figures.get('torch')} (CUDA {figures.get('torch_cuda')}), {devices}, NCCL {figures.get('nccl', '-')}"
    if name == "ddp":
        return (
            f"{figures.get('world_size')} rank(s) over {figures.get('backend')}, train loss "
            f"{figures.get('train_loss_per_epoch')}, val acc {figures.get('val_acc_per_epoch')}, params identical "
            f"{figures.get('params_identical')}, metrics identical {figures.get('metrics_identical_across_ranks')}"
        )
    if name in ("recipe", "compile"):
        parts = []
        for variant, r in figures.get("variants", {}).items():
            rate = f"{r['images_per_sec'][-1]:,.0f} img/s" if "images_per_sec" in r else "error"
            extra = (
                f" (compile ≈ {r['compile_seconds_estimate']} s)" if "compile_seconds_estimate" in r else ""
            )
            parts.append(f"{variant} {rate}{extra}")
        return "; ".join(parts)
    if name == "resnet50":
        rate = figures.get("images_per_sec")
        return f"{rate:,.0f} img/s" if isinstance(rate, int | float) else "no figure"
    return ""


def summarize(args: argparse.Namespace) -> int:
    out: Path = args.out
    checks: dict[str, Any] = {}
    for name in args.checks.split(","):
        rc_file = out / f"{name}.rc"
        rc, seconds = None, None
        if rc_file.exists():
            fields = rc_file.read_text().split()
            rc, seconds = int(fields[0]), float(fields[1])
        if (out / f"{name}.skipped").exists():
            checks[name] = {"status": "SKIP", "reason": (out / f"{name}.skipped").read_text().strip()}
            continue
        if name == "resnet50":
            result = resnet50_result(out, rc)
        elif (out / f"{name}.json").exists():
            result = json.loads((out / f"{name}.json").read_text())
        else:
            # The process died before writing its result (crash, hang, time limit): say so, with the ranks' errors.
            why = "timed out (killed)" if rc in (124, 137) else f"no result written (exit status {rc})"
            rank_errors = [
                f"rank {p.stem.removeprefix('ddp.rank')}: {json.loads(p.read_text()).get('error')}"
                for p in sorted(out.glob(f"{name}.rank*.json"))
                if json.loads(p.read_text()).get("error")
            ]
            text = (out / f"{name}.out").read_text(errors="replace") if (out / f"{name}.out").exists() else ""
            if not rank_errors:  # the last line printed says most often why (an import, a launcher error)
                last = [line.strip() for line in text.splitlines() if line.strip()][-1:]
                rank_errors = [f"last output: {last[0][:300]}"] if last else []
            result = {
                "status": "FAIL",
                "figures": {"output_tail": text.splitlines()[-15:]},
                "error": "; ".join([why, *rank_errors]),
            }
        if result["status"] == "PASS" and rc not in (0, None):
            late = " (killed at its time limit while exiting)" if rc in (124, 137) else ""
            result["status"], result["error"] = "FAIL", f"wrote PASS but exited with status {rc}{late}"
        result["rc"], result["seconds"] = rc, seconds
        checks[name] = result
    passed = all(c["status"] in ("PASS", "SKIP") for c in checks.values())
    report = {
        "mode": args.mode,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "passed": passed,
        "checks": checks,
    }
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n=== summary ({args.mode}) ===")
    for name, c in checks.items():
        took = f" [{c['seconds']:.0f} s]" if c.get("seconds") is not None else ""
        line = f"{c['status']:4}  {name:9}{took}  {one_line(name, c.get('figures', {}))}"
        if c.get("error"):
            line += f"\n      error: {c['error']}"
        if c.get("reason"):
            line += f"  ({c['reason']})"
        warning = c.get("figures", {}).get("warning")
        if warning:
            line += f"\n      warning: {warning}"
        print(line)
    print(f"{'ALL PASSED' if passed else 'SOME CHECKS FAILED'}; details in {args.json}")
    return 0 if passed else 1


# ---------------------------------------------------------------- command line


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("check", choices=("env", "ddp", "recipe", "summary"))
    parser.add_argument("--out", type=Path, required=True, help="directory for each check's result")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--train", type=int, default=4096, help="synthetic training images")
    parser.add_argument("--val", type=int, default=1024, help="synthetic validation images")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch per optimiser step")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--variants", default="fp32,fp32+cl,bf16,bf16+cl,fp16,fp16+cl", help="for recipe")
    parser.add_argument("--name", default="recipe", help="recipe: the result's name")
    parser.add_argument("--mode", default="gpu", help="summary: gpu or cpu-smoke")
    parser.add_argument("--checks", default="env,ddp,recipe,compile,resnet50", help="summary: in order")
    parser.add_argument("--json", type=Path, help="summary: the combined report")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; expected some of {', '.join(VARIANTS)}")
    if args.check == "summary" and args.json is None:
        parser.error("summary needs --json")
    args.out.mkdir(parents=True, exist_ok=True)
    if IMPORT_ERROR is not None and args.check != "summary":
        name = {"ddp": f"ddp.rank{os.environ.get('RANK', 0)}", "recipe": args.name}.get(
            args.check, args.check
        )
        figures = {"python": sys.version.split()[0], "executable": sys.executable}
        write_result(args.out, name, "FAIL", figures, f"cannot import torch or our modules: {IMPORT_ERROR!r}")
        return 1
    return {"env": check_env, "ddp": check_ddp, "recipe": check_recipe, "summary": summarize}[args.check](
        args
    )


if __name__ == "__main__":
    sys.exit(main())
