"""DVC's entry point of the tune stage (dvc.yaml runs `python -m pipelines.tune`): the stage itself, its options
and its outputs are resnet.stages.tune; `resnet-pipeline tune` runs the same."""

from resnet.cli import stage_main
from resnet.stages import tune

if __name__ == "__main__":
    raise SystemExit(stage_main(tune))
