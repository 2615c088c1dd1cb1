"""Build one dataset of params.yaml (datasets.NAME) into Parquet shards plus manifest.json.

Outputs: data/prepared/NAME/ (train/val/test shards; manifest.json with classes, counts per split and class,
mean/std, file hashes, a content hash and every rejected input file with its reason) and a metrics file.
Same params and input → byte-identical files, so a second `dvc repro` changes nothing.
"""

from __future__ import annotations

import argparse

from resnet.cli import run_stage, stage_config

STAGE = "prepare"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        action="append",
        dest="datasets",
        metavar="NAME",
        help="a key of `datasets` in params.yaml (repeatable; default: every dataset)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="prepared dataset directory (default: data/prepared/NAME; only with one --dataset)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help="metrics file (default: metrics/prepare/NAME.json; only with one --dataset)",
    )


def run(args: argparse.Namespace) -> None:
    cfg = stage_config(args)
    from resnet.data.prepare import default_prepared_dir, prepare_dataset, summary_metrics, summary_table
    from resnet.errors import PipelineError
    from resnet.io import write_json
    from resnet.progress import progress

    names = args.datasets or list(cfg.datasets)
    if len(names) > 1 and (args.out or args.metrics):
        raise PipelineError("--out and --metrics name one dataset's outputs: give exactly one --dataset")
    unknown = [name for name in names if name not in cfg.datasets]
    if unknown:  # before preparing any: a typo in the second name should not cost the first one's run
        raise PipelineError(
            f"{args.params}: --dataset {unknown[0]}: no such dataset in datasets "
            f"(expected one of {', '.join(sorted(cfg.datasets))})"
        )
    for name in names:
        dataset = cfg.datasets[name]
        out = args.out or default_prepared_dir(name)
        where = f" from {dataset.path}" if dataset.path else ""
        print(f"prepare {name}: {dataset.source}{where} at {dataset.image_size}px", flush=True)
        manifest = prepare_dataset(name, dataset, out, progress=progress)
        write_json(args.metrics or f"metrics/prepare/{name}.json", summary_metrics(manifest))
        print(summary_table(manifest))
        print(
            f"prepare {name}: {len(manifest['files'])} shards → {out}, content hash {manifest['content_hash'][:16]}…"
        )


def main(argv=None) -> int:
    return run_stage(STAGE, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
