"""DVC's entry point of the pretrain stage (dvc.yaml runs `python -m pipelines.pretrain`): the stage itself, its options
and its outputs are resnet.stages.pretrain; `resnet-pipeline pretrain` runs the same."""

from resnet.cli import stage_main
from resnet.stages import pretrain

if __name__ == "__main__":
    raise SystemExit(stage_main(pretrain))
