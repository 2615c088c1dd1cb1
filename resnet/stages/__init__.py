"""The five stages of the pipeline as library functions: each takes the validated config and its paths, writes
exactly its declared outputs and returns a summary. The installed CLI (`resnet-pipeline <stage>`), DVC's entry
points (`python -m pipelines.<stage>`) and a Ray job all call these.

Each module holds its stage's docstring (the CLI's help), `add_arguments(parser)` (its paths as options) and
`run(cfg, **paths)`. Nothing is imported here, so a stage's import closure is its own module's.
"""

STAGES = ("prepare", "pretrain", "tune", "evaluate", "register")
