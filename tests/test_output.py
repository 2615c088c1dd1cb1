"""What a person sees: Ray's worker-pool warning stays in the log, every other raylet message is printed."""

from __future__ import annotations

import ray._private.worker as ray_worker

from resnet.distributed import _keep_worker_pool_warnings_in_the_log


def test_only_the_worker_pool_warning_is_kept_out_of_the_output(monkeypatch, capsys):
    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data))
    _keep_worker_pool_warnings_in_the_log()
    _keep_worker_pool_warnings_in_the_log()  # idempotent: one filter, not a chain
    pool = "WARNING: 8 PYTHON worker processes have been started on node: abc with address: 10.0.0.1, ..."
    memory = "Task was killed due to the node running low on memory."
    ray_worker.print_to_stdstream({"lines": [pool], "pid": "raylet", "is_err": False}, False)
    ray_worker.print_to_stdstream({"lines": [memory], "pid": "raylet", "is_err": False}, False)
    ray_worker.print_to_stdstream({"lines": [pool], "pid": 1234, "is_err": False}, False)  # a worker's own
    assert [(data["pid"], data["lines"]) for data in printed] == [("raylet", [memory]), (1234, [pool])]
