"""DVC's entry point of the prepare stage (dvc.yaml runs `python -m pipelines.prepare`): the stage itself, its options
and its outputs are resnet.stages.prepare; `resnet-pipeline prepare` runs the same."""

from resnet.cli import stage_main
from resnet.stages import prepare

if __name__ == "__main__":
    raise SystemExit(stage_main(prepare))
