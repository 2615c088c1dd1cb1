"""ResNet-50 training throughput on one GPU: our `build_model("resnet50", 1000)` at 224 px, bf16 autocast,
channels_last, SGD, synthetic data already on the GPU. Goal ≥ 3,500 img/s on one H100.

    uv run python benchmarks/gpu_resnet50.py [--batch-size 256] [--steps 100] [--warmup 20]
        [--precision bf16|fp16|fp32] [--no-channels-last] [--compile] [--device cuda] [--json PATH]
    # smoke check on a CPU:
    uv run python benchmarks/gpu_resnet50.py --device cpu --batch-size 4 --image-size 64 --steps 2 --warmup 1

Each step is the training loop's own update without its data path: a uint8 batch (resident on the device)
normalised on the device, forward under `engine.autocast`, cross-entropy on fp32 logits, backward and an SGD
update through `engine.Stepper` (fp16 gradient scaler, `engine.param_groups` weight decay, constant LR).
`--warmup` steps (cuDNN autotuning, `--compile`'s compilation) are timed apart from the `--steps` steps that
count, with `torch.cuda.synchronize()` on both sides of the timed region.

Anchor: NVIDIA's published 2,470 img/s for ResNet-50 v1.5 AMP training on one A100 (DeepLearningExamples).
Imports only torch and our torch-only modules (`resnet.models`, `resnet.engine`): no Ray, no MLflow.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resnet.engine import Stepper, autocast, param_groups, set_determinism, warmup_constant
from resnet.models import build_model

ANCHOR = 2470  # img/s, NVIDIA ResNet-50 v1.5 AMP training, 1× A100
GOAL = 3500  # img/s, 1× H100
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100, help="timed steps (default: 100)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (default: 20)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    set_determinism(False)  # cuDNN autotuning, as training does
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    model = build_model("resnet50", args.num_classes).to(device, memory_format=fmt).train()
    net = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(param_groups(model, 5e-5), lr=args.lr, momentum=0.9)
    stepper = Stepper(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(0)),
        scaler=torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"),
    )
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def step() -> torch.Tensor:
        inputs = ((images.float() / 255 - mean) / std).contiguous(memory_format=fmt)
        with autocast(device, args.precision):
            logits = net(inputs)
        loss = F.cross_entropy(logits.float(), labels)
        stepper.backward(loss)
        stepper.step(1)
        return loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - started
    rate = args.steps * args.batch_size / seconds

    if cuda:
        name = torch.cuda.get_device_name(device)
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f"peak {peak_gib:.1f} GiB allocated ({torch.cuda.max_memory_reserved(device) / 2**30:.1f} reserved)"
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
        memory = f"peak {peak_gib:.1f} GiB process RSS"
    loaded = [m for m in ("ray", "mlflow", "torchvision", "numpy", "PIL", "tqdm") if m in sys.modules]
    print(f"device  {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(
        f"setup   resnet50, {args.image_size} px, batch {args.batch_size}, {args.precision}, "
        f"channels_last {'on' if args.channels_last else 'off'}, compile {'on' if args.compile else 'off'}, "
        f"SGD; {args.warmup} warm-up steps ({warmup_seconds:.1f} s), {args.steps} timed steps ({seconds:.2f} s)"
    )
    print(f"result  {rate:,.1f} img/s   {memory}   last loss {float(loss):.3f}")
    if not torch.isfinite(loss):
        print("warning: the loss is not finite (fp16 skips such updates): lower --lr and measure again")
    print(f"anchor  {ANCHOR:,} img/s (NVIDIA, ResNet-50 v1.5 AMP training, 1× A100): {rate / ANCHOR:.2f}×")
    verdict = ("met" if rate >= GOAL else "NOT met") if "H100" in name else "not an H100: no verdict"
    print(f"goal    >= {GOAL:,} img/s on one H100: {verdict}")
    print(
        f"imports besides torch: {', '.join(loaded) or 'none'} (no ray, no mlflow: {'ray' not in loaded and 'mlflow' not in loaded})"
    )
    if args.json:
        figures = {
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "precision": args.precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "warmup_steps": args.warmup,
            "warmup_s": warmup_seconds,
            "steps": args.steps,
            "seconds": seconds,
            "images_per_sec": rate,
            "peak_memory_gib": peak_gib,
            "anchor_a100_images_per_sec": ANCHOR,
            "goal_h100_images_per_sec": GOAL,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
