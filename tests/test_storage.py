"""`ray.storage_path` in each form a user writes — a local path, `s3://` on AWS itself, `s3://` on an
S3-compatible server, `gs://` — resolves to a path and a filesystem on which the checkpoint paths Ray reports
(without their scheme) open again. Offline: no filesystem here is asked anything over the network."""

from __future__ import annotations

import pyarrow.fs
import pytest

from resnet.config import RayConfig
from resnet.distributed import RetryingS3FileSystem, storage_path


def _s3_settings(filesystem: pyarrow.fs.S3FileSystem) -> dict:
    return filesystem.__reduce__()[1][0]  # the filesystem's construction arguments


def _checkpoint_of(storage, run: str = "pretrain-abc/checkpoint_2026-11-30_00-00-00.000000"):
    """What the tune and pretrain stages open: the checkpoint path Ray reports for a run under `storage`."""
    return storage.checkpoint(f"{storage.path}/{run}")


def test_a_local_storage_path_is_made_absolute_from_the_repository_root(tmp_path):
    storage = storage_path(RayConfig(storage_path="runs"), root=tmp_path)
    assert storage.path == str(tmp_path / "runs") and storage.filesystem is None
    checkpoint = _checkpoint_of(storage)
    assert checkpoint.path.startswith(str(tmp_path / "runs") + "/")
    assert checkpoint.filesystem.type_name == "local"


def test_s3_on_aws_keeps_its_filesystem_so_reported_checkpoint_paths_stay_on_s3(aws_isolated):
    """Real AWS (no endpoint variable): the checkpoint path Ray reports, `bucket/prefix/...`, is on S3. Before,
    no filesystem was named for this form, and the tune stage opened that path on the local disk."""
    aws_isolated.setenv("AWS_REGION", "eu-west-1")
    storage = storage_path(RayConfig(storage_path="s3://team-ray/runs/"))
    assert storage.path == "team-ray/runs"
    settings = _s3_settings(storage.filesystem)
    assert settings["region"] == "eu-west-1" and settings["endpoint_override"] == ""
    checkpoint = _checkpoint_of(storage)
    assert checkpoint.filesystem.type_name == "s3"
    assert checkpoint.path == "team-ray/runs/pretrain-abc/checkpoint_2026-11-30_00-00-00.000000"


def test_s3_on_a_compatible_server_uses_the_endpoint_from_the_environment(aws_isolated):
    aws_isolated.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8333")
    storage = storage_path(RayConfig(storage_path="s3://ray"))
    assert storage.path == "ray"
    settings = _s3_settings(storage.filesystem)
    assert settings["endpoint_override"] == "http://127.0.0.1:8333" and settings["region"] == "us-east-1"
    assert _checkpoint_of(storage).filesystem.type_name == "s3"


def test_the_general_endpoint_variable_and_default_region_count_too(aws_isolated):
    aws_isolated.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    aws_isolated.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    settings = _s3_settings(storage_path(RayConfig(storage_path="s3://ray/x")).filesystem)
    assert (settings["endpoint_override"], settings["region"]) == ("http://127.0.0.1:9000", "ap-south-1")


def test_gcs_gets_pyarrows_filesystem_for_its_scheme():
    storage = storage_path(RayConfig(storage_path="gs://team-ray/runs"))
    assert storage.path == "team-ray/runs"
    assert storage.filesystem.type_name == "gcs"
    checkpoint = _checkpoint_of(storage)
    assert checkpoint.filesystem.type_name == "gcs" and checkpoint.path.startswith(
        "team-ray/runs/pretrain-abc/"
    )


def test_s3_with_no_region_configured_asks_aws_for_the_buckets_region(aws_isolated, monkeypatch):
    """Without AWS_REGION, pyarrow resolves the bucket's region (a request to AWS, as Ray itself makes): the
    only form that needs the network, so here pyarrow's resolver is replaced to record the question."""
    asked = []

    class Resolver:
        @staticmethod
        def from_uri(uri):
            asked.append(uri)
            return pyarrow.fs.S3FileSystem(region="us-west-2"), "team-ray/runs"

    monkeypatch.setattr(pyarrow.fs, "FileSystem", Resolver)
    storage = storage_path(RayConfig(storage_path="s3://team-ray/runs"))
    assert asked == ["s3://team-ray/runs"] and storage.path == "team-ray/runs"
    assert _s3_settings(storage.filesystem)["region"] == "us-west-2"
    assert type(storage.filesystem) is RetryingS3FileSystem  # the run's retries, as in every s3:// form


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_REGION"])
def test_the_s3_filesystem_keeps_its_retries_when_ray_pickles_it_for_the_workers(aws_isolated, variable):
    """Ray pickles a run's storage filesystem to its controller and workers, which upload the checkpoints;
    pyarrow's own pickling drops the retry strategy (its 3 attempts rode out ~2 s of an S3 server restarting, and
    a worker group was lost: tests/test_distributed.py's S3 restart)."""
    import ray.cloudpickle

    aws_isolated.setenv(
        variable, "http://127.0.0.1:8333" if variable == "AWS_ENDPOINT_URL_S3" else "eu-west-1"
    )
    filesystem = storage_path(RayConfig(storage_path="s3://ray/runs")).filesystem
    assert type(filesystem) is RetryingS3FileSystem
    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(filesystem))
    assert type(copy) is RetryingS3FileSystem
    assert _s3_settings(copy) == _s3_settings(filesystem)


@pytest.mark.parametrize("uri", ["s3://", "s3:///runs"])
def test_an_s3_uri_without_a_bucket_is_refused_in_one_line(uri):
    from resnet.errors import PipelineError

    with pytest.raises(PipelineError, match="names no bucket"):
        storage_path(RayConfig(storage_path=uri))


def test_the_driver_forwards_the_endpoint_to_its_workers_but_never_credentials(aws_isolated):
    """runtime_env is shown on the dashboard and kept in Ray's job records: keys stay on the nodes."""
    from resnet.distributed import forwarded_env

    planted = {
        "AWS_ACCESS_KEY_ID": "AKIAPLANTED",
        "AWS_SECRET_ACCESS_KEY": "planted-secret",
        "AWS_SESSION_TOKEN": "planted-token",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:8333",
        "AWS_REGION": "eu-west-1",
    }
    for name, value in planted.items():
        aws_isolated.setenv(name, value)
    assert forwarded_env() == {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:8333", "AWS_REGION": "eu-west-1"}


def test_tune_copies_no_credentials_into_its_trials(aws_isolated):
    """Ray Tune copies the driver's AWS keys into every trial actor's runtime_env (found by
    tests/test_submit.py's secret grep in a node's runtime_env_agent.log); the sweep stops it."""
    from ray.tune.execution.class_cache import _ActorClassCache

    from resnet.sweep import keep_credentials_out_of_trials

    aws_isolated.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTED")
    aws_isolated.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret")

    class Trial:
        pass

    def trial_env() -> dict:
        return _ActorClassCache().get(Trial)._default_options["runtime_env"]["env_vars"]

    assert trial_env()["AWS_SECRET_ACCESS_KEY"] == "planted-secret"  # what Ray Tune does by itself
    keep_credentials_out_of_trials()
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(trial_env())
