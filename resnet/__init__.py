"""resnet-pipeline: ResNets from scratch, trained with Ray, tracked in MLflow, versioned with DVC."""

import os as _os

# Process-wide defaults, set before any module of ours imports Ray or MLflow (both read them at import time).
# An explicit setting in the environment wins.
ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # a pipeline sends no usage reports
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Under `uv run` Ray would make every worker `uv run` a copy of the working directory (data, checkpoints and
    # all) in a fresh environment. Ours is already the locked environment: workers use this interpreter.
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    # Tune's console output engine prints its experiment table whatever the verbosity; the previous engine
    # is silent at verbose=0, which the sweep uses (it prints its own lines: resnet.sweep.SweepReporter).
    "RAY_AIR_NEW_OUTPUT": "0",
    # Ray Train's controller looks at its workers every 2 s by default: each reported epoch waited up to that
    # long to be registered (a worker's next report blocks until then), and each run's start and end too.
    # 0.5 s took 35.7 → 30.8 s off every sweep trial's fixed cost (benchmarks/trial_overhead.py, RESULTS.md).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Each node's log monitor lists its log directory again on every pass (ten a second) until it holds 1000
    # files; with the logs of a few hundred workers that pass cost ~4% of a core on an idle node, 1.4% once it
    # lists every LOG_NAME_UPDATE_INTERVAL_S (0.5 s), as it does above that many. New logs are found within 0.5 s.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
}
for _name, _value in ENV_DEFAULTS.items():
    _os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
