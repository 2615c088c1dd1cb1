"""`resnet-pipeline <stage> [options]`: the stages of dvc.yaml as subcommands, plus `all` to run them in order,
and the commands that take the pipeline off the laptop (`stack`, `submit`).

Each stage is a library function in `resnet/stages/<stage>.py`; `pipelines/<stage>.py` (what `dvc repro` runs)
and this CLI (what the wheel installs) both call it through `stage_main`, which holds what they share: the
common options and the error handling. A `PipelineError` (bad params, bad data) prints one line and exits 2
(with its traceback before it under `--debug` or RESNET_DEBUG=1); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import yaml

from resnet.config import DEFAULT_PARAMS, load_config
from resnet.errors import PipelineError
from resnet.stages import STAGES

PROG = "resnet-pipeline"


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. pretrain.epochs=2), got {text!r}")
    return key, yaml.safe_load(value)


def stage_parser(stage: str, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {stage}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override a param for this run, e.g. -S pretrain.epochs=2 (repeatable; VALUE is YAML)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("RESNET_DEBUG", "") not in ("", "0"),
        help="on an error, print its traceback too (also RESNET_DEBUG=1, e.g. for `dvc repro`)",
    )
    return parser


def stage_module(stage: str) -> ModuleType:
    """resnet.stages.<stage>, imported only when asked for (each stage imports what it needs lazily)."""
    return importlib.import_module(f"resnet.stages.{stage}")


def stage_main(stage: ModuleType, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` for the stage module `stage`, load params.yaml with the overrides, and run the stage; a
    `PipelineError` becomes one line on stderr and exit code 2."""
    name = stage.STAGE
    parser = stage_parser(name, stage.__doc__)
    stage.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    options = {k: v for k, v in vars(args).items() if k not in ("params", "overrides", "debug")}
    try:
        stage.run(load_config(args.params, dict(args.overrides)), **options)
    except PipelineError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG} {name}: error: {err}", file=sys.stderr)
        return 2
    return 0


# Commands besides the stages: (module, its function taking argv and returning the exit code, help line).
COMMANDS = {
    "stack": ("resnet.stack", "main", "the local stack: S3, MLflow server, a Ray cluster (up, down, status)"),
    "submit": (
        "resnet.jobs",
        "main",
        "run the pipeline on a Ray cluster as a job; its results come back here",
    ),
    "repro-job": ("resnet.jobs", "repro_job_main", "what a submitted job runs: dvc pull, repro, push"),
    "predict": ("resnet.predict", "main", "class probabilities of images (files, folders, s3://) as CSV"),
    "export": ("resnet.export", "main", "the model as ONNX, checked against PyTorch; --int8: quantized too"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        return stage_main(stage_module(argv[0]), argv[1:])
    if argv and argv[0] in COMMANDS:
        module, function, _ = COMMANDS[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    if argv and argv[0] == "all":
        # The whole pipeline in one process (one Ray connection), every stage with its default paths.
        stage_parser("all", "Run every stage in order, with default paths.").parse_args(argv[1:])
        for stage in STAGES:
            code = stage_main(stage_module(stage), argv[1:])
            if code:
                return code
        return 0
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="From an image dataset to a registered ResNet: the DVC stages of this project.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages, in order:\n"
        + "\n".join(f"  {s:<10}{(stage_module(s).__doc__ or '').strip().splitlines()[0]}" for s in STAGES)
        + f"\n  {'all':<10}every stage in order, with default paths"
        + "\n\ncommands:\n"
        + "\n".join(f"  {c:<10}{doc}" for c, (*_, doc) in COMMANDS.items())
        + f"\n\n'{PROG} STAGE --help' shows a stage's options.",
    )
    parser.add_argument("stage", choices=(*STAGES, "all", *COMMANDS))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.parse_args(argv)
    return 2  # unreachable: an accepted stage returned above, anything else exited in parse_args


def _version() -> str:
    from resnet import __version__

    return __version__


if __name__ == "__main__":
    raise SystemExit(main())
