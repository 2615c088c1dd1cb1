"""Build one dataset of params.yaml (datasets.NAME) into Parquet shards plus manifest.json.

Outputs: data/prepared/NAME/ (train/val/test shards; manifest.json with classes, counts per split and class,
mean/std, file hashes, a content hash and every rejected input file with its reason) and a metrics file.
Same params and input → byte-identical files, so a second `dvc repro` changes nothing.
"""

from __future__ import annotations

import argparse

from resnet.config import Config
from resnet.errors import PipelineError

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


def run(
    cfg: Config, datasets: list[str] | None = None, out: str | None = None, metrics: str | None = None
) -> dict[str, dict]:
    """Prepare `datasets` (default: every one in cfg); returns each one's manifest by name."""
    from resnet.data.prepare import default_prepared_dir, prepare_dataset, summary_metrics, summary_table
    from resnet.io import write_json
    from resnet.progress import progress

    names = datasets or list(cfg.datasets)
    if len(names) > 1 and (out or metrics):
        raise PipelineError("--out and --metrics name one dataset's outputs: give exactly one --dataset")
    unknown = [name for name in names if name not in cfg.datasets]
    if unknown:  # before preparing any: a typo in the second name should not cost the first one's run
        raise PipelineError(
            f"--dataset {unknown[0]}: no such dataset in datasets (expected one of {', '.join(sorted(cfg.datasets))})"
        )
    manifests = {}
    for name in names:
        dataset = cfg.datasets[name]
        target = out or default_prepared_dir(name)
        where = f" from {dataset.path}" if dataset.path else ""
        print(f"prepare {name}: {dataset.source}{where} at {dataset.image_size}px", flush=True)
        manifest = prepare_dataset(name, dataset, target, progress=progress)
        write_json(metrics or f"metrics/prepare/{name}.json", summary_metrics(manifest))
        print(summary_table(manifest))
        print(
            f"prepare {name}: {len(manifest['files'])} shards → {target}, content hash {manifest['content_hash'][:16]}…"
        )
        manifests[name] = manifest
    return manifests
