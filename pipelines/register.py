"""DVC's entry point of the register stage (dvc.yaml runs `python -m pipelines.register`): the stage itself, its options
and its outputs are resnet.stages.register; `resnet-pipeline register` runs the same."""

from resnet.cli import stage_main
from resnet.stages import register

if __name__ == "__main__":
    raise SystemExit(stage_main(register))
