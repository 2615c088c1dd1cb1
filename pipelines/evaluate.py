"""DVC's entry point of the evaluate stage (dvc.yaml runs `python -m pipelines.evaluate`): the stage itself, its options
and its outputs are resnet.stages.evaluate; `resnet-pipeline evaluate` runs the same."""

from resnet.cli import stage_main
from resnet.stages import evaluate

if __name__ == "__main__":
    raise SystemExit(stage_main(evaluate))
