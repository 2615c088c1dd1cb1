"""Build the dataset named in params.yaml (data.*) into split .npy arrays plus manifest.json.

Outputs: data/prepared/ (train/val/test images and labels, manifest.json with classes, counts, mean/std and a
content hash). Same params and input → byte-identical files.
"""

from __future__ import annotations

import argparse

from resnet.cli import run_stage, stage_config

STAGE = "prepare"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="data/prepared", help="prepared dataset directory (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> None:
    cfg = stage_config(args)
    from resnet.data.prepare import write_prepared
    from resnet.data.sources import load_source

    print(f"prepare: loading {cfg.data.source} at {cfg.data.image_size}px", flush=True)
    raw = load_source(cfg.data.source, cfg.data.image_size, **cfg.data.source_options())
    manifest = write_prepared(
        raw,
        args.out,
        val=cfg.data.split.val,
        test=cfg.data.split.test,
        seed=cfg.data.seed,
        source=cfg.data.source,
    )
    counts = manifest["counts"]
    print(f"prepare: {len(manifest['classes'])} classes → {args.out}")
    for split in ("train", "val", "test"):
        print(f"  {split:<5} {counts[split]['total']:>6} images")
    print(f"  content hash {manifest['content_hash'][:16]}…")


def main(argv=None) -> int:
    return run_stage(STAGE, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
