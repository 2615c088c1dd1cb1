"""DVC's entry points, one per stage: `python -m pipelines.<stage>` parses the stage's options and runs
resnet.stages.<stage> (the library function the installed CLI and a Ray job run too)."""
