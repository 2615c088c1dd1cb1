"""`resnet-pipeline submit`: the whole pipeline as a Ray job on the local stack (tests/conftest.py `local_stack`:
SeaweedFS, an MLflow server, a head and two worker nodes), its results back in the user's checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stagerun import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "datasets": {
        "fractals": {
            "source": "fractals",
            "image_size": 16,
            "split": {"val": 0.2, "test": 0.2},
            "fractals": {"num_classes": 4, "per_class": 20, "points": 300},
        }
    },
    "pretrain": {"dataset": "fractals", "epochs": 1, "warmup_epochs": 0},
    "finetune": {"dataset": "fractals", "epochs": 1},
    "tune": {"num_samples": 1, "search_space": {"strategy": {"distribution": "choice", "values": ["full"]}}},
    "register": {"model_name": "resnet-submitted"},
    # One DDP rank on each worker node (the head has no CPUs): gloo all-reduce across the namespaces' bridge.
    "ray": {"placement_strategy": "STRICT_SPREAD"},
}


# What the stack hands every node and client, and nothing the pipeline writes may hold.
SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        replace = key == "datasets" or not isinstance(value, dict)
        out[key] = value if replace else _merge(base.get(key, {}), value)
    return out


def _checkout(root: Path) -> Path:
    """A user's git checkout of the project (the files git would commit, as they are now), tiny params."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        source = REPO / rel
        if source.is_file() and not rel.startswith(("tests/", "benchmarks/", "infra/")) and rel != "dvc.lock":
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(source.read_bytes())
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "tiny"]):
        subprocess.run([*git, *command], cwd=root, check=True)
    return root


def _files(checkout: Path) -> dict[str, bytes]:
    return {
        path.relative_to(checkout).as_posix(): path.read_bytes()
        for path in checkout.rglob("*")
        if path.is_file() and ".git" not in path.relative_to(checkout).parts
    }


def _submit_and_stop(checkout: Path, env: dict, log: Path, when: str) -> dict:
    """`submit`, and `ray job stop` on its job once its log shows `when`: what the command said and did."""
    before = _files(checkout)
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "resnet.cli", "submit"],
            cwd=checkout,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            text = wait_for(lambda: when in log.read_text() and log.read_text(), 600, when, 0.5)
            job_id = next(
                line.split()[2]
                for line in text.splitlines()
                if line.startswith("submit: job ") and "submitted" in line
            )
            ray = Path(sys.executable).parent / "ray"
            subprocess.run(
                [str(ray), "job", "stop", "--address", env["RAY_ADDRESS"], job_id],
                env=env,
                check=True,
                timeout=120,
                capture_output=True,
            )
            returncode = process.wait(timeout=300)
        finally:
            process.kill()
    return {
        "job_id": job_id,
        "returncode": returncode,
        "output": log.read_text(),
        "checkout_unchanged": _files(checkout) == before,
    }


@pytest.fixture(scope="module")
def submitted(local_stack, tmp_path_factory) -> dict:
    """The pipeline submitted, its job stopped (`ray job stop`) as its sweep begins, and submitted again: the
    second job resumes after the stages the first finished. The tests below check the second one's results."""
    checkout = _checkout(tmp_path_factory.mktemp("checkout"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "AWS_"))}
    env |= local_stack.env() | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path_factory.mktemp("stopped") / "submit.log"
    stopped = _submit_and_stop(checkout, env, log, when="Running stage 'tune'")
    done = subprocess.run(
        [sys.executable, "-m", "resnet.cli", "submit"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    job_id = next(
        line.split()[2]
        for line in done.stdout.splitlines()
        if line.startswith("submit: job ") and "submitted" in line
    )
    return {
        "checkout": checkout,
        "env": env,
        "output": done.stdout,
        "job_id": job_id,
        "stack": local_stack,
        "stopped": stopped,
    }


def _s3(env: dict):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_a_job_stopped_mid_pipeline_fails_the_command_and_submitting_again_resumes_after_its_last_stage(
    submitted,
):
    """`ray job submit` exits 0 for a STOPPED job; `submit` must not: stopped as its sweep began, it exits 2
    naming the status and writes nothing into the checkout. The stopped job had pushed each stage it finished
    with its run: the next job restores those from DVC's run cache and runs the rest."""
    stopped, out, job_id = submitted["stopped"], submitted["output"], submitted["job_id"]
    assert stopped["returncode"] == 2, stopped["output"][-3000:]
    last = stopped["output"].strip().splitlines()[-1]
    assert last.startswith(f"resnet-pipeline submit: error: job {stopped['job_id']} ended STOPPED"), last
    assert stopped["checkout_unchanged"]
    for stage in ("prepare@fractals", "pretrain"):
        assert f"Running stage '{stage}'" in stopped["output"]
        assert (
            f"repro-job {stopped['job_id']}: {stage.split('@')[0]}: outputs and run cache pushed"
            in (stopped["output"])
        )
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out
        assert f"Running stage '{stage}'" not in out
    assert "pretrain: connected to the Ray cluster" in stopped["output"]
    for stage in ("tune", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    assert f"repro-job {job_id}: register: outputs and run cache pushed to s3://dvc/store" in out
    assert (
        f"submit: job {job_id} SUCCEEDED\nsubmit: back in this checkout from job {job_id}: dvc.lock," in out
    )


def test_pretrain_put_one_ddp_rank_on_each_worker_node_and_kept_the_replicas_identical(submitted):
    import torch

    stack = submitted["stack"]
    blob = torch.load(
        submitted["checkout"] / "models/pretrain/model.pt", map_location="cpu", weights_only=True
    )
    replicas = blob["meta"]["replicas"]
    assert sorted(replica["rank"] for replica in replicas) == [0, 1]
    workers = {
        node["node_id"]: node["ip"]
        for node in stack.nodes()["nodes"]
        if node["alive"] and not node["is_head"]
    }
    assert len(workers) == 2 and {replica["node_id"] for replica in replicas} == set(workers)
    if stack.network_mode == "netns":  # the ranks talked across the bridge, one namespace each
        assert sorted(workers.values()) == [stack.net.worker_ip(1), stack.net.worker_ip(2)]
    # the cross-node all-reduce kept the replicas bit-identical
    assert len({replica["params_sha256"] for replica in replicas}) == 1


def test_checkpoints_are_in_the_ray_bucket(submitted):
    keys = _keys(_s3(submitted["env"]), "ray", "runs/")
    pretrain = {key.split("/")[1] for key in keys if key.split("/")[1].startswith("pretrain-")}
    assert len(pretrain) == 1
    assert any("/checkpoint_" in key and key.endswith("model.pt") for key in keys)


def test_the_model_is_registered_as_champion_on_the_mlflow_server(submitted, monkeypatch):
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the server's basic auth
        monkeypatch.setenv(name, submitted["env"][name])
    record = json.loads((submitted["checkout"] / "registry/registered.json").read_text())
    assert record["name"] == "resnet-submitted" and record["alias"] == "champion"
    client = MlflowClient(submitted["env"]["MLFLOW_TRACKING_URI"])
    assert client.get_model_version_by_alias("resnet-submitted", "champion").version == str(record["version"])
    assert not (submitted["checkout"] / "mlruns.db").exists()  # nothing went to an embedded store
    # Lineage over HTTP, as in the embedded store: one pipeline run id (pretrain's run is the stopped job's),
    # DVC's digest on the inputs.
    run = client.get_run(record["run_id"])
    stage_runs = client.search_runs(
        [run.info.experiment_id], f"tags.`pipeline.run_id` = '{run.data.tags['pipeline.run_id']}'"
    )
    stages = {r.data.tags["pipeline.stage"] for r in stage_runs if "mlflow.parentRunId" not in r.data.tags}
    assert stages == {"pretrain", "tune", "evaluate", "register"}
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == f"{run.data.params['finetune.dataset']}-test"
    assert used.dataset.digest.endswith(".dir")  # DVC's hash of the prepared directory
    version = client.get_model_version_by_alias("resnet-submitted", "champion")
    assert version.description.startswith(f"# resnet-submitted version {record['version']} (@champion)")


def test_dvc_outputs_are_in_the_remote_and_the_checkout_is_up_to_date(submitted):
    checkout, env = submitted["checkout"], submitted["env"]
    lock = yaml.safe_load((checkout / "dvc.lock").read_text())
    tune_model = next(out for out in lock["stages"]["tune"]["outs"] if out["path"] == "models/tune")
    md5 = tune_model["md5"]
    assert f"store/files/md5/{md5[:2]}/{md5[2:]}" in _keys(_s3(env), "dvc", "store/files/md5/")
    assert (checkout / "models/tune/model.pt").is_file()  # pulled
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout.strip() == "Data and pipelines are up to date."
    handed = _s3(env).get_object(
        Bucket="dvc", Key=f"store/jobs/{submitted['job_id']}/files/metrics/eval.json"
    )
    assert (checkout / "metrics/eval.json").read_bytes() == handed["Body"].read()


_JOB_RECORD = """
import json, sys
from ray.job_submission import JobSubmissionClient
jobs = JobSubmissionClient(sys.argv[1]).list_jobs()
print(json.dumps([job.dict() for job in jobs], default=str))
"""


def test_no_secret_reaches_the_job_record(submitted):
    """What Ray keeps of the jobs, shown on the dashboard and by `ray job list`: no key and no token (the stages'
    own drivers forward no credentials either: tests/test_storage.py). Read in a process of its own, with the
    token (Ray reads RAY_AUTH_MODE once, at import)."""
    env = submitted["env"]
    record = subprocess.run(
        [sys.executable, "-c", _JOB_RECORD, env["RAY_ADDRESS"], submitted["job_id"]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    jobs = {job["submission_id"] or job["job_id"]: job for job in json.loads(record)}
    submitted_job = jobs[submitted["job_id"]]
    assert submitted_job["runtime_env"]["env_vars"] == {"PYTHONUNBUFFERED": "1", "RESNET_PROGRESS": "0"}
    for name in SECRETS:
        assert env[name] not in record, name
        assert env[name] not in submitted["output"]


def test_no_secret_is_in_mlflow_the_buckets_the_logs_or_the_checkout(submitted, monkeypatch):
    """The stack's secrets (S3 keys, the Ray token, the MLflow password), present on every node while the whole
    pipeline ran, are nowhere it wrote: no MLflow param or tag of any run, no object in any bucket (artifacts,
    models, checkpoints, the DVC store, the hand-back), no log of the stack's services or Ray's nodes, no file
    handed back to the checkout."""
    from mlflow.tracking import MlflowClient

    from resnet.stack import BUCKETS

    env, stack = submitted["env"], submitted["stack"]
    planted = {name: env[name].encode() for name in SECRETS}

    def found_in(data: bytes) -> list[str]:
        """The secrets in `data`, each with the line around it (the secret itself masked)."""
        found = []
        for name, secret in planted.items():
            at = data.find(secret)
            if at >= 0:
                start, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
                line = data[start : end if end >= 0 else len(data)][:400].replace(secret, b"***")
                found.append(f"{name} in: {line.decode(errors='replace')}")
        return found

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, env[name])
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id], max_results=5000)
    ]
    assert len(runs) >= 5  # the four stage runs and a trial
    for run in runs:
        assert not found_in(json.dumps([run.data.params, run.data.tags]).encode()), run.info.run_name
    for version in client.search_model_versions():
        assert not found_in(json.dumps([version.tags, version.description]).encode())

    s3, objects = _s3(env), 0
    for bucket in BUCKETS:
        for key in _keys(s3, bucket):
            objects += 1
            assert not found_in(s3.get_object(Bucket=bucket, Key=key)["Body"].read()), f"s3://{bucket}/{key}"
    assert objects >= 20

    logs = [
        *stack.state_dir.glob("*.log"),
        *(p for p in stack._ray_temp_root().rglob("*") if "logs" in p.parts),
    ]
    logs = [path for path in logs if path.is_file()]
    assert len(logs) >= 10
    for path in logs:
        assert not (where := found_in(path.read_bytes())), (path, where)
    checkout = submitted["checkout"]
    for path in checkout.rglob("*"):
        if path.is_file() and ".git" not in path.parts and ".venv" not in path.parts:
            assert not (where := found_in(path.read_bytes())), (path, where)
    assert not found_in(submitted["output"].encode())


def test_a_job_that_fails_on_the_cluster_fails_the_command_in_one_line(submitted):
    done = _submit(submitted["checkout"], submitted["env"], "--stage", "no-such-stage", "--no-pull")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet-pipeline submit: error: job pipeline-") and " ended FAILED" in last


def _submit(checkout: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnet.cli", "submit", *args],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_another_checkout_fetches_a_finished_jobs_results(submitted, tmp_path):
    """`submit --fetch JOB_ID`: what a KubeRay RayJob's user runs in a checkout of the same commit."""
    other = _checkout(tmp_path)
    done = _submit(other, submitted["env"], "--fetch", submitted["job_id"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("dvc.lock", "metrics/eval.json", "registry/registered.json", "models/tune/model.pt"):
        assert (other / name).read_bytes() == (submitted["checkout"] / name).read_bytes(), name
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"],
        cwd=other,
        env=submitted["env"],
        capture_output=True,
        text=True,
    )
    assert status.stdout.strip() == "Data and pipelines are up to date."


def test_submitting_again_unchanged_reruns_nothing(submitted):
    """The job pulls what is already computed: with the handed-back dvc.lock, no stage runs again."""
    done = _submit(submitted["checkout"], submitted["env"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage" not in done.stdout
    assert "Data and pipelines are up to date." in done.stdout + done.stderr
