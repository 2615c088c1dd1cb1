"""`resnet-pipeline <stage> [options]`: the stages of dvc.yaml as subcommands, plus `all` to run them in order.

Each stage lives in `pipelines/<stage>.py` (what `dvc repro` runs); this module only dispatches to them and
holds what they share: the common options and the error handling. A `PipelineError` (bad params, bad data)
prints one line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from resnet.config import DEFAULT_PARAMS, Config, load_config
from resnet.errors import PipelineError

STAGES = ("prepare", "pretrain", "tune", "evaluate", "register")
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
    return parser


def stage_config(args: argparse.Namespace) -> Config:
    return load_config(args.params, dict(args.overrides))


def run_stage(
    stage: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None,
) -> int:
    """Parse `argv` for `stage` and run it; a `PipelineError` becomes one line on stderr and exit code 2."""
    parser = stage_parser(stage, description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except PipelineError as err:
        print(f"{PROG} {stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _stage_module(stage: str):
    return importlib.import_module(f"pipelines.{stage}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        return _stage_module(argv[0]).main(argv[1:])
    if argv and argv[0] == "all":
        # The whole pipeline in one process (one Ray connection), every stage with its default paths.
        stage_parser("all", "Run every stage in order, with default paths.").parse_args(argv[1:])
        for stage in STAGES:
            code = _stage_module(stage).main(argv[1:])
            if code:
                return code
        return 0
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="From an image dataset to a registered ResNet: the DVC stages of this project.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages, in order:\n"
        + "\n".join(f"  {s:<10}{(_stage_module(s).__doc__ or '').strip().splitlines()[0]}" for s in STAGES)
        + f"\n  {'all':<10}every stage in order, with default paths"
        + f"\n\n'{PROG} STAGE --help' shows a stage's options.",
    )
    parser.add_argument("stage", choices=(*STAGES, "all"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.parse_args(argv)
    return 2  # unreachable: an accepted stage returned above, anything else exited in parse_args


def _version() -> str:
    from resnet import __version__

    return __version__


if __name__ == "__main__":
    raise SystemExit(main())
