"""The KubeRay and service manifests of infra/k8s, checked offline (no cluster, no kubectl).

Schemas: every YAML document against Kubernetes' strict schemas or the vendored KubeRay CRDs
(infra/k8s/validate.py). Then the rules only the operator enforces, and the project's own: images of this
version, GPUs where the CUDA image runs, credentials only from Secrets, resources and non-root everywhere.
Each check is also shown to reject a broken manifest.
"""

from __future__ import annotations

import configparser
import copy
import importlib.util
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from resnet.stack import AUTH_CACHE_S

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
NAMESPACE = "resnet-pipeline"
IMAGE = "ghcr.io/resnet-pipeline/resnet-pipeline"
SECRETISH = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL", re.I)


def _load_validator():
    spec = importlib.util.spec_from_file_location("k8s_validate", K8S / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _load_validator()


def all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [d for path in validate.manifest_files() for d in validate.documents(path)]


DOCS = all_documents()


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return copy.deepcopy(doc)


@pytest.fixture(scope="module")
def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def locked() -> dict[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {p["name"]: p.get("version", "") for p in lock["package"]}


# --- walking pods and containers ------------------------------------------------------------------------------


def cluster_pods(spec: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield f"{where} head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{where} group {group['groupName']}", group["template"]["spec"]


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield name, spec["template"]["spec"]
    elif doc["kind"] == "RayCluster":
        yield from cluster_pods(spec, name)
    elif doc["kind"] == "RayJob":
        if spec.get("rayClusterSpec"):
            yield from cluster_pods(spec["rayClusterSpec"], name)
        if spec.get("submitterPodTemplate"):
            yield f"{name} submitter", spec["submitterPodTemplate"]["spec"]


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container of `doc`, the KubeRay autoscaler sidecar included (autoscalerOptions)."""
    for where, pod in pod_specs(doc):
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            yield f"{where} {c['name']}", c
    for cluster in (doc.get("spec", {}), doc.get("spec", {}).get("rayClusterSpec") or {}):
        if doc["kind"] in ("RayCluster", "RayJob") and cluster.get("enableInTreeAutoscaling"):
            yield f"{doc['kind']}/{doc['metadata']['name']} autoscaler", cluster.get("autoscalerOptions", {})


# --- project rules (each returns what is wrong; [] when all is well) -------------------------------------------


def gpu_errors(doc: dict[str, Any]) -> list[str]:
    """GPU worker groups ask for nvidia.com/gpu as requests and limits (as many as Ray's num-gpus), tolerate the
    GPU nodes' taint and run the CUDA image; nothing else runs the CUDA image."""
    errs = []
    specs = [doc["spec"]] if doc["kind"] == "RayCluster" else [doc["spec"].get("rayClusterSpec") or {}]
    for spec in specs if doc["kind"] in ("RayCluster", "RayJob") else []:
        groups = [("head", spec["headGroupSpec"])] + [
            (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
        ]
        for name, group in groups:
            pod = group["template"]["spec"]
            ray = pod["containers"][0]
            gpus = group.get("rayStartParams", {}).get("num-gpus", "0")
            res = ray.get("resources", {})
            asked = {k: str(res.get(k, {}).get("nvidia.com/gpu", "0")) for k in ("requests", "limits")}
            cuda = ray["image"].endswith("-cuda")
            if name == "head" and (gpus != "0" or cuda or asked["limits"] != "0"):
                errs.append("the head is a CPU node")
                continue
            if gpus == "0" and not cuda:
                continue
            if not (gpus == asked["requests"] == asked["limits"] != "0"):
                errs.append(
                    f"group {name}: num-gpus {gpus}, nvidia.com/gpu requests {asked['requests']}, limits {asked['limits']}"
                )
            if not cuda:
                errs.append(f"group {name}: a GPU group runs the CUDA image")
            tolerates = [
                t
                for t in pod.get("tolerations", [])
                if t.get("key") == "nvidia.com/gpu"
                and t.get("operator") == "Exists"
                and t.get("effect") in (None, "NoSchedule")
            ]
            if not tolerates:
                errs.append(f"group {name}: no toleration for the nvidia.com/gpu taint")
    for where, c in containers(doc):
        if c.get("image", "").endswith("-cuda") and "group" not in where:
            errs.append(f"{where}: the CUDA image outside a GPU group")
    return errs


def image_errors(doc: dict[str, Any], version: str) -> list[str]:
    errs = []
    for where, c in containers(doc):
        image = c.get("image")
        if image is None:
            continue  # the autoscaler runs the head's image
        repo, _, tag = image.rpartition(":")
        if repo == IMAGE:
            if tag not in (version, f"{version}-cuda"):
                errs.append(f"{where}: {image} is not version {version}")
        elif not tag or tag == "latest" or "/" in tag:
            errs.append(f"{where}: {image} has no pinned tag")
    return errs


def secret_errors(doc: dict[str, Any]) -> list[str]:
    """Credentials only by secretKeyRef: no literal value under a secret-looking name, in env or ConfigMap, and
    no Secret objects in the manifests."""
    errs = []
    if doc["kind"] == "Secret":
        errs.append(
            f"Secret/{doc['metadata']['name']}: secrets are created by hand (README.md), not committed"
        )
    if doc["kind"] == "ConfigMap":
        errs += [f"ConfigMap key {k}" for k in doc.get("data", {}) if SECRETISH.search(k)]
    for where, c in containers(doc):
        for env in c.get("env", []):
            if SECRETISH.search(env["name"]):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if "value" in env or not ref or not ref.get("name") or not ref.get("key"):
                    errs.append(f"{where}: {env['name']} is not a secretKeyRef")
        for arg in c.get("command", []) + c.get("args", []):
            if re.search(r"://[^/@\s:]+:[^/@\s]+@", arg) or re.search(
                r"(password|secret|token)=\S", arg, re.I
            ):
                errs.append(f"{where}: a credential on the command line: {arg}")
    return errs


def hygiene_errors(doc: dict[str, Any]) -> list[str]:
    """Requests and limits for CPU and memory on every container; pods and containers that cannot become root."""
    errs = []
    for where, c in containers(doc):
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(res.get(part, {}))
            if missing:
                errs.append(f"{where}: no {part} for {', '.join(sorted(missing))}")
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != [
            "ALL"
        ]:
            errs.append(f"{where}: allowPrivilegeEscalation false and capabilities drop ALL")
        if sc.get("runAsUser") == 0 or sc.get("privileged"):
            errs.append(f"{where}: runs as root")
    for where, pod in pod_specs(doc):
        sc = pod.get("securityContext", {})
        if sc.get("runAsNonRoot") is not True or not sc.get("runAsUser"):
            errs.append(f"{where}: runAsNonRoot with a non-zero runAsUser")
        if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errs.append(f"{where}: seccompProfile RuntimeDefault")
    return errs


# --- schemas -------------------------------------------------------------------------------------------------


def test_every_manifest_has_documents():
    names = {p.name for p in validate.manifest_files()}
    assert {
        "raycluster.yaml",
        "rayjob.yaml",
        "mlflow.yaml",
        "postgres.yaml",
        "config.yaml",
        "namespace.yaml",
    } <= names
    kinds = sorted(d["kind"] for _, d in DOCS)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "Deployment",
            "Namespace",
            "PersistentVolumeClaim",
            "RayCluster",
            "RayJob",
        ]
        + ["Service", "Service"]
    )


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_manifest_matches_its_schema(where, doc):
    assert validate.schema_errors(doc) == []


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_manifest_keeps_the_operators_rules(where, doc):
    assert validate.operator_rule_errors(doc) == []


def test_the_validator_command_passes(capsys):
    assert validate.main([]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_a_typoed_field_is_rejected():
    doc = one("RayCluster")
    group = doc["spec"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")
    assert any("'rayStartParam' was unexpected" in e for e in validate.schema_errors(doc))
    doc = one("RayJob")
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolic"] = (
        "Always"
    )
    assert any("imagePullPolic" in e for e in validate.schema_errors(doc))
    doc = one("RayJob")
    doc["metadata"]["label"] = {"a": "b"}  # ObjectMeta is strict too
    assert any("'label' was unexpected" in e for e in validate.schema_errors(doc))
    doc = one("Deployment", "mlflow")
    doc["spec"]["replica"] = 1
    assert any("'replica' was unexpected" in e for e in validate.schema_errors(doc))


def test_a_wrong_type_is_rejected():
    doc = one("RayCluster")
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert validate.schema_errors(doc) == ["spec.workerGroupSpecs.0.replicas: 'two' is not of type 'integer'"]
    doc = one("RayJob")
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert validate.schema_errors(doc)
    doc = one("Service", "mlflow")
    doc["spec"]["ports"][0]["port"] = "five thousand"
    assert validate.schema_errors(doc)


def test_int_or_string_fields_take_both_and_nothing_else():
    doc = one("RayCluster")
    limits = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 8
    assert validate.schema_errors(doc) == []
    limits["cpu"] = [8]
    assert validate.schema_errors(doc)


def test_an_impossible_replica_range_is_rejected():
    doc = one("RayCluster")
    group = doc["spec"]["workerGroupSpecs"][0]
    group.update(minReplicas=3, replicas=1, maxReplicas=2)
    assert validate.schema_errors(doc) == []  # only the operator catches it
    errs = validate.operator_rule_errors(doc)
    assert any("minReplicas 3 > maxReplicas 2" in e for e in errs)
    assert any("replicas 1 outside [3, 2]" in e for e in errs)
    doc = one("RayJob")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=0, replicas=5, maxReplicas=4)
    assert any("replicas 5 outside [0, 4]" in e for e in validate.operator_rule_errors(doc))


def test_an_unknown_kind_is_rejected():
    doc = one("RayCluster")
    doc["kind"] = "RayService"  # a real KubeRay kind, but its CRD is not vendored
    assert validate.schema_errors(doc)[0].startswith("no schema for ray.io/v1 RayService")
    doc = one("RayCluster")
    doc["apiVersion"] = "ray.io/v1alpha1"
    assert validate.schema_errors(doc)[0].startswith("no schema")
    assert validate.schema_errors({"apiVersion": "v1", "kind": "Sercet", "metadata": {"name": "x"}})[
        0
    ].startswith("no schema for v1 Sercet")
    assert validate.schema_errors({"kind": "Service"}) == ["not a Kubernetes object (apiVersion and kind)"]


def test_ttl_needs_shutdown_after_the_job():
    doc = one("RayJob")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["ttlSecondsAfterFinished"] > 0
    doc["spec"]["shutdownAfterJobFinishes"] = False
    assert validate.schema_errors(doc) == []
    assert "ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true" in validate.operator_rule_errors(
        doc
    )


def test_other_operator_rules_are_caught():
    doc = one("RayJob")
    doc["spec"]["clusterSelector"] = {"ray.io/cluster": "resnet-ray"}
    assert "exactly one of rayClusterSpec and clusterSelector" in validate.operator_rule_errors(doc)
    doc = one("RayCluster")
    doc["spec"]["rayVersion"] = "2.51.0"
    assert any("token auth needs Ray >= 2.52.0" in e for e in validate.operator_rule_errors(doc))
    doc = one("RayCluster")
    doc["spec"]["workerGroupSpecs"][0]["resources"] = {"GPU": "1"}
    assert any("both rayStartParams and resources" in e for e in validate.operator_rule_errors(doc))
    doc = one("RayJob")
    doc["metadata"]["name"] = "resnet-pipeline-repro-job-with-a-name-far-too-long"
    assert any("DNS-1035" in e for e in validate.operator_rule_errors(doc))


# --- the Ray cluster -----------------------------------------------------------------------------------------


def test_the_rayjob_runs_on_the_clusters_spec():
    assert one("RayJob")["spec"]["rayClusterSpec"] == one("RayCluster")["spec"]


def test_ray_cluster_shape(locked):
    spec = one("RayCluster")["spec"]
    assert spec["rayVersion"] == locked["ray"], "the Ray of the image, from uv.lock"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    (group,) = spec["workerGroupSpecs"]
    assert (
        0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 2
    )
    assert int(group["rayStartParams"]["num-gpus"]) >= 1


def test_the_rayjob_entrypoint():
    """What the job runs: `resnet-pipeline repro-job --job-id ID -S KEY=VALUE...`, in the image's /app."""
    spec = one("RayJob")["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:4] == ["resnet-pipeline", "repro-job", "--job-id", "$RAY_JOB_SUBMISSION_ID"]
    assert all(w == "-S" for w in words[4::2]) and len(words) % 2 == 0
    overrides = dict(w.split("=", 1) for w in words[5::2])
    assert overrides == {"ray.use_gpu": "true", "ray.controller_failure_limit": "-1"}
    assert spec["submissionMode"] == "K8sJobMode", "KubeRay sets RAY_JOB_SUBMISSION_ID in the submitter"
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/app"}, "the image's pipeline files"
    # the rest comes from the head's environment: the DVC remote and Ray's storage, both on S3
    config = one("ConfigMap", "resnet-pipeline-config")["data"]
    assert (
        urlparse(config["RESNET_DVC_REMOTE"]).scheme == urlparse(config["RESNET_RAY_STORAGE"]).scheme == "s3"
    )
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": one("ConfigMap", "resnet-pipeline-config")["metadata"]["name"]}} in head[
        "envFrom"
    ]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_gpu_workers_ask_for_and_tolerate_gpus(kind):
    assert gpu_errors(one(kind)) == []


def test_the_gpu_rules_catch_mistakes():
    doc = one("RayCluster")
    pod = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["tolerations"] = []
    assert gpu_errors(doc) == ["group gpu: no toleration for the nvidia.com/gpu taint"]
    doc = one("RayCluster")
    del doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "nvidia.com/gpu"
    ]
    assert gpu_errors(doc) == ["group gpu: num-gpus 1, nvidia.com/gpu requests 0, limits 1"]
    doc = one("RayCluster")
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = f"{IMAGE}:0.1.0"
    assert gpu_errors(doc) == ["group gpu: a GPU group runs the CUDA image"]
    doc = one("RayJob")
    doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] = f"{IMAGE}:0.1.0-cuda"
    assert gpu_errors(doc) == [
        "RayJob/resnet-repro submitter ray-job-submitter: the CUDA image outside a GPU group"
    ]


# --- images, secrets, resources ------------------------------------------------------------------------------


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_images_are_this_version(where, doc, version):
    assert image_errors(doc, version) == []


def test_the_image_rule_catches_a_stale_tag(version):
    doc = one("Deployment", "mlflow")
    doc["spec"]["template"]["spec"]["containers"][0]["image"] = f"{IMAGE}:0.0.9"
    assert image_errors(doc, version) == [f"Deployment/mlflow mlflow: {IMAGE}:0.0.9 is not version {version}"]
    doc["spec"]["template"]["spec"]["containers"][0]["image"] = "postgres:latest"
    assert image_errors(doc, version) == ["Deployment/mlflow mlflow: postgres:latest has no pinned tag"]


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_credentials_come_only_from_secrets(where, doc):
    assert secret_errors(doc) == []


def test_the_secret_rule_catches_literals():
    doc = one("Deployment", "mlflow")
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "MLFLOW_TRACKING_TOKEN", "value": "abc"})
    container["args"][0] = "--backend-store-uri=postgresql://mlflow:hunter2@postgres:5432/mlflow"
    assert len(secret_errors(doc)) == 2
    doc = one("ConfigMap", "resnet-pipeline-config")
    doc["data"]["AWS_SECRET_ACCESS_KEY"] = "x"
    assert secret_errors(doc) == ["ConfigMap key AWS_SECRET_ACCESS_KEY"]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"a": "b"}}
    assert secret_errors(secret)


def test_every_secret_referenced_is_created_in_the_readme():
    readme = (K8S / "README.md").read_text()
    created: dict[str, set[str]] = {}
    for line in re.sub(r"\\\n", " ", readme).splitlines():  # continuation lines joined: one command a line
        m = re.search(r"create secret generic ([\w-]+)(.*)", line)
        if m:
            keys = re.findall(r"--from-(?:literal|file)=([\w.-]+)=", m.group(2))
            created.setdefault(m.group(1), set()).update(keys)
    used = set()
    for _, doc in DOCS:
        for _, c in containers(doc):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.add((ref["name"], ref["key"]))
    assert used, "the manifests read credentials from Secrets"
    for name, key in sorted(used):
        assert key in created.get(name, set()), f"README.md does not create secret {name} with key {key}"
    assert "-n resnet-pipeline create secret" in readme


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_resources_and_non_root_everywhere(where, doc):
    assert hygiene_errors(doc) == []


def test_the_hygiene_rule_catches_mistakes():
    doc = one("RayJob")
    del doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"]
    doc["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"] = {}
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = (
        False
    )
    assert hygiene_errors(doc) == [
        "RayJob/resnet-repro submitter ray-job-submitter: no limits for cpu, memory",
        "RayJob/resnet-repro autoscaler: allowPrivilegeEscalation false and capabilities drop ALL",
        "RayJob/resnet-repro head: runAsNonRoot with a non-zero runAsUser",
    ]


# --- how the pieces fit ----------------------------------------------------------------------------------------


def test_everything_is_in_one_namespace():
    assert one("Namespace")["metadata"]["name"] == NAMESPACE
    for where, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, where


def test_one_bucket_everywhere():
    config = one("ConfigMap", "resnet-pipeline-config")["data"]
    args = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    artifacts = next(a.split("=", 1)[1] for a in args if a.startswith("--artifacts-destination="))
    storage = config["RESNET_RAY_STORAGE"]
    buckets = {urlparse(u).netloc for u in (config["RESNET_DVC_REMOTE"], artifacts, storage)}
    assert len(buckets) == 1 and all(urlparse(u).scheme == "s3" for u in (artifacts, storage)), buckets


def test_mlflow_server_answers_its_clients():
    config = one("ConfigMap", "resnet-pipeline-config")["data"]
    container = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.split("=", 1) for a in container["args"])
    service = one("Service", "mlflow")
    port = service["spec"]["ports"][0]["port"]
    allowed = args["--allowed-hosts"].split(",")
    tracking = urlparse(config["MLFLOW_TRACKING_URI"])
    assert tracking.netloc == f"{service['metadata']['name']}:{port}"
    for host in (
        "mlflow",
        f"mlflow.{NAMESPACE}",
        f"mlflow.{NAMESPACE}.svc",
        f"mlflow.{NAMESPACE}.svc.cluster.local",
    ):
        assert f"{host}:{port}" in allowed
    assert "localhost:*" in allowed and "127.0.0.1:*" in allowed, "for kubectl port-forward"
    assert args["--host"] == "0.0.0.0" and args["--port"] == str(port)
    db = urlparse(args["--backend-store-uri"])
    assert db.scheme == "postgresql" and db.password is None, "the password comes as PGPASSWORD"
    assert db.hostname == one("Service", "postgres")["metadata"]["name"]
    pg = {
        e["name"]: e
        for e in one("Deployment", "postgres")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert db.username == pg["POSTGRES_USER"]["value"] and db.path == "/" + pg["POSTGRES_DB"]["value"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"] == pg["POSTGRES_PASSWORD"]["valueFrom"]


def test_mlflow_needs_a_user_and_the_pipelines_pods_have_one():
    """The server runs MLflow's basic-auth app with the configuration file of a Secret (README.md writes it: no
    rights by default, its users in the database postgres.yaml makes, no password in any URI); every Ray
    container signs in as that file's admin with the password of the same Secret."""
    container = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    pod = one("Deployment", "mlflow")["spec"]["template"]["spec"]
    assert "--app-name=basic-auth" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "resnet-mlflow-auth",
        "key": "session_key",
    }
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "resnet-mlflow-auth"
    assert volume["secret"]["items"] == [{"key": config_path.name, "path": config_path.name}]

    readme = (K8S / "README.md").read_text()
    ini = configparser.ConfigParser()
    ini.read_string(re.search(r"<<INI\n(.*?)\nINI\n", readme, re.S).group(1))
    auth = ini["mlflow"]
    assert auth["default_permission"] == "NO_PERMISSIONS"
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert auth.getint("auth_cache_ttl_seconds") == AUTH_CACHE_S  # as the local stack's server
    users = urlparse(auth["database_uri"])
    assert users.password is None and users.hostname == one("Service", "postgres")["metadata"]["name"]
    made = one("ConfigMap", "postgres-init")["data"]
    assert any(f"CREATE DATABASE {users.path.lstrip('/')};" in sql for sql in made.values())
    created = re.search(r"create secret generic resnet-mlflow-auth((?:.*\\\n)*.*)", readme).group(1)
    keys = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", created))
    assert keys == {config_path.name, "admin_password", "session_key"}

    ray = [
        (where, c)
        for _, doc in DOCS
        if doc["kind"] in ("RayJob", "RayCluster")
        for where, c in containers(doc)
    ]
    ray = [(where, c) for where, c in ray if c.get("name") in ("ray-head", "ray-worker")]
    assert len(ray) == 4, [where for where, _ in ray]  # head and workers of the RayJob's and the RayCluster's
    for where, c in ray:
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_TRACKING_USERNAME"]["value"] == auth["admin_username"], where
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "resnet-mlflow-auth",
            "key": "admin_password",
        }, where


def test_the_image_has_a_driver_for_the_mlflow_database(locked):
    """`mlflow server --backend-store-uri postgresql://…` needs a driver in the image's locked environment."""
    assert "psycopg2-binary" in locked or "psycopg2" in locked or "psycopg" in locked


def test_every_pod_volume_claim_exists():
    claims = {d["metadata"]["name"] for _, d in DOCS if d["kind"] == "PersistentVolumeClaim"}
    for _, doc in DOCS:
        for where, pod in pod_specs(doc):
            for vol in pod.get("volumes", []):
                if "persistentVolumeClaim" in vol:
                    assert vol["persistentVolumeClaim"]["claimName"] in claims, where


def test_services_select_their_pods():
    for _, svc in DOCS:
        if svc["kind"] != "Service":
            continue
        targets = [
            d
            for _, d in DOCS
            if d["kind"] == "Deployment"
            and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, svc["metadata"]["name"]
        ports = {
            p["name"]
            for c in targets[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def test_the_vendored_crds_are_the_ones_the_readme_names():
    import hashlib

    readme = (K8S / "schemas" / "README.md").read_text()
    for name in validate.CRDS.values():
        digest = hashlib.sha256((K8S / "schemas" / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in readme, f"schemas/README.md lists the sha256 of {name}"
