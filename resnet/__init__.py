"""resnet-pipeline: ResNets from scratch, trained with Ray, tracked in MLflow, versioned with DVC."""

import os as _os

# Process-wide defaults, set before any module of ours imports Ray or MLflow (both read them at import time).
# An explicit setting in the environment wins.
for _name, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",  # a pipeline sends no usage reports
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Under `uv run` Ray would make every worker `uv run` a copy of the working directory (data, checkpoints and
    # all) in a fresh environment. Ours is already the locked environment: workers use this interpreter.
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}.items():
    _os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
