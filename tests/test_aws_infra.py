"""infra/aws/: the Ray cluster launcher config and the Terraform, checked offline.

- cluster.yaml: Ray's own checks (`prepare_config` + `validate_config`, the schema inside the Ray wheel; a private
  API, so this relies on the Ray version pinned in uv.lock) without touching AWS, plus each node_config against
  EC2's RunInstances parameters from botocore's service model (the schema does not look inside node_config).
- Terraform: `fmt`, `validate`, an offline `plan -refresh=false` (fake keys, skip_* flags) read back with
  `terraform show -json`, checkov in its own tool environment, and an apply/destroy of the buckets module against
  the session's SeaweedFS.

Terraform runs with a CLI config of its own: providers from the filesystem mirror only (no network). One
`terraform init` per module directory, shared by the module's tests. Without terraform (or its provider mirror)
these tests skip, except under CI=true, where they fail instead.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
AWS = REPO / "infra" / "aws"
CLUSTER_YAML = AWS / "cluster.yaml"
TERRAFORM = AWS / "terraform"

CHECKOV = "checkov==3.3.30"  # runs in its own tool environment (uvx): it pins old boto3/packaging
# Every check the Terraform skips, each with its reason next to it in the .tf file (#checkov:skip=ID:reason).
# A new skip must be added here on purpose.
CHECKOV_SKIPS = {
    "CKV_AWS_18",  # S3 access logging: needs a log bucket, costs per request
    "CKV_AWS_144",  # cross-region replication: doubles storage; the content is reproducible
    "CKV_AWS_145",  # KMS by default: SSE-S3 by design, KMS one variable away
    "CKV2_AWS_62",  # S3 event notifications: nothing consumes them
    "CKV2_AWS_5",  # security group attached by the Ray launcher, not by Terraform
    "CKV_AWS_382",  # open egress: images, S3, package indexes
}

# Inputs of the offline plan.
PREFIX = "acme-resnet"
ACCOUNT = "123456789012"
VPC = "vpc-0123456789abcdef0"
SSH_CIDR = "203.0.113.7/32"
BUCKET_ROLES = ("data", "dvc", "mlflow", "ray")

GPU_FAMILIES = {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p5"}  # EC2 instance families with NVIDIA GPUs

CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str):
    """Skip where a tool is missing; under CI=true that is a failure instead."""
    if CI:
        pytest.fail(f"CI=true, and {reason}")
    pytest.skip(reason)


# ---- cluster.yaml -------------------------------------------------------------------------------------------


def load_cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check_cluster_config(config: dict) -> dict:
    """What `ray up` checks before it calls AWS, plus node_config against RunInstances. Returns the prepared
    config; raises jsonschema.ValidationError, ValueError (Ray's own rules) or NodeConfigError."""
    import botocore.session
    from botocore.validate import ParamValidator
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)

    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    for name, node_type in prepared["available_node_types"].items():
        params = copy.deepcopy(node_type["node_config"])
        params.pop("SubnetIds", None)  # Ray's own key: resolved to SubnetId before the call
        # What Ray adds at launch (ImageId: the launcher's default Deep Learning AMI when absent).
        params.update(MinCount=1, MaxCount=1)
        params.setdefault("ImageId", "ami-0123456789abcdef0")
        report = ParamValidator().validate(params, run_instances.input_shape)
        if report.has_errors():
            raise NodeConfigError(f"{name}.node_config: {report.generate_report()}")
    return prepared


class NodeConfigError(ValueError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails, and there are no AWS credentials or metadata service to find."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)

    def refuse(self, address):
        raise AssertionError(f"network access to {address} while checking the cluster config")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_cluster_yaml_valid_offline(no_network):
    prepared = check_cluster_config(load_cluster_config())
    assert prepared["provider"]["type"] == "aws"
    # Listed empty on purpose: the launcher's defaults would pip-install a nightly Ray wheel.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], key


def test_cluster_yaml_node_types():
    config = load_cluster_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    (worker_name,) = set(types) - {config["head_node_type"]}
    worker = types[worker_name]

    # Scoped instance profiles on both (left out, the launcher grants the head EC2+S3 full access).
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "resnet-pipeline-ray-head"}
    assert worker["node_config"]["IamInstanceProfile"] == {"Name": "resnet-pipeline-ray-worker"}

    # The worker is a GPU node, declared as such, with the GPUs handed to its container; the head has none.
    assert worker["resources"]["GPU"] >= 1
    assert worker["node_config"]["InstanceType"].split(".")[0] in GPU_FAMILIES
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    assert head.get("resources", {}).get("GPU", 0) == 0
    docker = config["docker"]
    assert docker["worker_image"] == "ghcr.io/resnet-pipeline/resnet-pipeline:0.1.0-cuda"
    assert docker["head_image"].startswith("ghcr.io/resnet-pipeline/resnet-pipeline:0.1.0")
    assert "--gpus all" in docker["worker_run_options"]
    assert not any(
        "--gpus" in option for option in docker.get("run_options", []) + docker.get("head_run_options", [])
    )

    for node in (head, worker):
        assert node["node_config"]["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2
        assert all(device["Ebs"]["Encrypted"] for device in node["node_config"]["BlockDeviceMappings"])


def test_cluster_yaml_token_auth_and_closed_ports():
    config = load_cluster_config()
    token_files = {f"$HOME/{remote[2:]}" for remote in config["file_mounts"] if remote.startswith("~/")}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [command for command in config[key] if "ray start" in command]
        assert "RAY_AUTH_MODE=token" in start, key
        path = start.split("RAY_AUTH_TOKEN_PATH=")[1].split(";")[0].split()[0]
        assert path in token_files, f"{key}: the token at {path} is not one of the file_mounts"
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    # The security group is Terraform's (SSH from chosen addresses only): the launcher adds no rules of its own.
    group = config["provider"]["security_group"]
    assert group == {"GroupName": "resnet-pipeline-ray"}


def _worker(config: dict) -> dict:
    return config["available_node_types"]["ray.worker.gpu"]


def _head(config: dict) -> dict:
    return config["available_node_types"]["ray.head.cpu"]


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _set(mapping: dict, key: str, value) -> None:
    mapping[key] = value


def _more_min_than_max(config: dict) -> None:
    _worker(config)["min_workers"] = 2
    config["max_workers"] = 1


# case: (which check refuses it, how the config is broken)
BROKEN = {
    "typo in a top-level key": (
        "jsonschema",
        lambda c: _rename(c, "idle_timeout_minutes", "idle_timeout_minute"),
    ),
    "typo in a node type key": ("jsonschema", lambda c: _rename(_worker(c), "min_workers", "min_worker")),
    "max_workers not an integer": ("jsonschema", lambda c: _set(c, "max_workers", "four")),
    "GPU count as a string": ("jsonschema", lambda c: _set(_worker(c)["resources"], "GPU", "1")),
    "typo in docker options": (
        "jsonschema",
        lambda c: _rename(c["docker"], "worker_run_options", "worker_run_option"),
    ),
    "run_options not a list": ("jsonschema", lambda c: _set(c["docker"], "run_options", "--gpus all")),
    "head type not defined": ("ray", lambda c: _set(c, "head_node_type", "ray.head.default")),
    "more min_workers than the cluster's max_workers": ("ray", lambda c: _more_min_than_max(c)),
    "typo in node_config": (
        "ec2",
        lambda c: _rename(_worker(c)["node_config"], "IamInstanceProfile", "IamInstanceProfil"),
    ),
    "wrong type in node_config": (
        "ec2",
        lambda c: _set(_head(c)["node_config"]["BlockDeviceMappings"][0]["Ebs"], "VolumeSize", "100 GB"),
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_cluster_yaml_is_refused(case, no_network):
    import jsonschema

    layer, breaks = BROKEN[case]
    config = load_cluster_config()
    breaks(config)
    expected = {"jsonschema": jsonschema.ValidationError, "ray": ValueError, "ec2": NodeConfigError}[layer]
    with pytest.raises(expected):
        check_cluster_config(config)


# ---- Terraform ----------------------------------------------------------------------------------------------


def terraform_binary() -> str:
    found = shutil.which("terraform")
    if not found:
        _unavailable("terraform is not installed (https://developer.hashicorp.com/terraform/install)")
    return found


def provider_mirror() -> Path | None:
    """The filesystem mirror holding hashicorp/aws (TF_PROVIDER_MIRROR, else /opt/tf-plugins); None: none here."""
    for candidate in (os.environ.get("TF_PROVIDER_MIRROR"), "/opt/tf-plugins"):
        if candidate and (Path(candidate) / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def tf_env(tmp_path_factory) -> dict[str, str]:
    """Environment for terraform: its own CLI config (the mirror only, no network), no AWS settings from outside."""
    terraform_binary()
    config = tmp_path_factory.mktemp("tfcli") / "terraform.rc"
    mirror = provider_mirror()
    if mirror is not None:
        config.write_text(
            "provider_installation {\n"
            f'  filesystem_mirror {{ path = "{mirror}" }}\n'
            '  direct { exclude = ["*/*"] }\n'
            "}\n"
        )
    elif CI:
        config.write_text("")  # CI without a mirror: the registry (network) it is
    else:
        pytest.skip(
            "no hashicorp/aws provider mirror (set TF_PROVIDER_MIRROR to the folder holding registry.terraform.io)"
        )
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "TF_"))}
    env.update(
        TF_CLI_CONFIG_FILE=str(config),
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
        CHECKPOINT_DISABLE="1",  # no version check against checkpoint.hashicorp.com
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    return env


def terraform(env: dict[str, str], cwd: Path, *args: str, timeout: float = 600, check: bool = True):
    """Run `terraform ARGS` (plain output: -no-color right after the command words, where they take it)."""
    words = 2 if args[0] == "state" else 1
    plain = [] if args[0] in ("fmt", "show") else ["-no-color"]
    result = subprocess.run(
        [terraform_binary(), *args[:words], *plain, *args[words:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"terraform {' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def copy_module(source: Path, destination: Path) -> Path:
    """A clean copy: no local .terraform, state or plans from whoever ran terraform in the source tree."""
    shutil.copytree(
        source,
        destination,
        ignore=shutil.ignore_patterns(
            ".terraform", "*.tfstate", "*.tfstate.*", "*.tfplan", "terraform.tfvars"
        ),
    )
    return destination


# Offline: fake keys and nothing looked up. Only the tests' copy gets this file.
OFFLINE_PROVIDER = """
provider "aws" {
  access_key                  = "AKIAFAKEFAKEFAKEFAKE"
  secret_key                  = "not-a-secret"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
}
"""

PLAN_VARS = (
    "-var",
    f"prefix={PREFIX}",
    "-var",
    f"account_id={ACCOUNT}",
    "-var",
    f"vpc_id={VPC}",
    "-var",
    f'ssh_ingress_cidrs=["{SSH_CIDR}"]',
)


@pytest.fixture(scope="module")
def root_module(tf_env, tmp_path_factory) -> Path:
    """infra/aws/terraform copied to tmp, with the offline provider override, initialised once."""
    directory = copy_module(TERRAFORM, tmp_path_factory.mktemp("tf") / "root")
    (directory / "offline_override.tf").write_text(OFFLINE_PROVIDER)
    terraform(tf_env, directory, "init", "-input=false", "-lockfile=readonly", timeout=300)
    return directory


@pytest.fixture(scope="module")
def plan(tf_env, root_module) -> dict:
    terraform(
        tf_env,
        root_module,
        "plan",
        "-refresh=false",
        "-lock=false",
        "-input=false",
        "-out=plan.bin",
        *PLAN_VARS,
    )
    shown = terraform(tf_env, root_module, "show", "-json", "plan.bin")
    return json.loads(shown.stdout)


def planned(plan: dict, resource_type: str) -> dict[str, dict]:
    """Planned values of every resource of a type, by address."""
    found = {}
    modules = [plan["planned_values"]["root_module"]]
    while modules:
        module = modules.pop()
        modules.extend(module.get("child_modules", []))
        for resource in module.get("resources", []):
            if resource["type"] == resource_type and resource["mode"] == "managed":
                found[resource["address"]] = resource.get("values", {})
    return found


def by_role(plan: dict, resource_type: str) -> dict[str, dict]:
    """A module.buckets resource type by bucket role (its for_each key: data, dvc, ...); the bucket attribute
    itself is only known after apply."""
    return {
        address.split('["')[1].rstrip('"]'): values
        for address, values in planned(plan, resource_type).items()
    }


def statements(policy_json: str) -> list[dict]:
    def listed(value):
        return value if isinstance(value, list) else [value]

    return [
        {**statement, "Action": listed(statement["Action"]), "Resource": listed(statement["Resource"])}
        for statement in json.loads(policy_json)["Statement"]
    ]


def role_policy(plan: dict, name: str) -> list[dict]:
    return statements(planned(plan, "aws_iam_role_policy")[f"aws_iam_role_policy.{name}"]["policy"])


BUCKETS = {role: f"{PREFIX}-{role}" for role in BUCKET_ROLES}
BUCKET_ARN = {role: f"arn:aws:s3:::{name}" for role, name in BUCKETS.items()}
WORKER_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/resnet-pipeline-ray-worker"


def test_terraform_fmt(tf_env):
    result = terraform(tf_env, TERRAFORM, "fmt", "-check", "-recursive", "-diff", check=False)
    assert result.returncode == 0, f"run `terraform fmt -recursive infra/aws/terraform`:\n{result.stdout}"


@pytest.mark.integration
def test_terraform_validate(tf_env, root_module):
    result = json.loads(terraform(tf_env, root_module, "validate", "-json").stdout)
    assert result["valid"], result
    assert result["warning_count"] == 0, result["diagnostics"]


@pytest.mark.integration
def test_plan_buckets_protected(plan):
    assert {values["bucket"] for values in planned(plan, "aws_s3_bucket").values()} == set(BUCKETS.values())
    versioning = by_role(plan, "aws_s3_bucket_versioning")
    encryption = by_role(plan, "aws_s3_bucket_server_side_encryption_configuration")
    lifecycle = by_role(plan, "aws_s3_bucket_lifecycle_configuration")
    public = by_role(plan, "aws_s3_bucket_public_access_block")
    ownership = by_role(plan, "aws_s3_bucket_ownership_controls")
    policies = by_role(plan, "aws_s3_bucket_policy")
    for table in (versioning, encryption, lifecycle, public, ownership, policies):
        assert set(table) == set(BUCKET_ROLES)
    for role, bucket in BUCKETS.items():
        assert versioning[role]["versioning_configuration"][0]["status"] == "Enabled", bucket
        (sse,) = encryption[role]["rule"]
        assert sse["apply_server_side_encryption_by_default"][0]["sse_algorithm"] == "AES256", bucket

        rules = {rule["id"]: rule for rule in lifecycle[role]["rule"]}
        assert all(rule["status"] == "Enabled" for rule in rules.values()), bucket
        abort = rules["abort-incomplete-multipart-uploads"]["abort_incomplete_multipart_upload"][0]
        assert abort["days_after_initiation"] == 7
        assert (
            rules["expire-noncurrent-versions"]["noncurrent_version_expiration"][0]["noncurrent_days"] == 30
        )
        if role == "ray":  # checkpoints expire; everything else is kept
            assert rules["expire-current-objects"]["expiration"][0]["days"] == 30
        else:
            assert "expire-current-objects" not in rules, bucket

        block = public[role]
        assert all(
            block[key] is True
            for key in (
                "block_public_acls",
                "block_public_policy",
                "ignore_public_acls",
                "restrict_public_buckets",
            )
        ), block
        assert ownership[role]["rule"][0]["object_ownership"] == "BucketOwnerEnforced"

        (deny_http, deny_old_tls) = statements(policies[role]["policy"])
        arn = BUCKET_ARN[role]
        assert deny_http["Effect"] == "Deny" and deny_http["Condition"] == {
            "Bool": {"aws:SecureTransport": "false"}
        }
        assert set(deny_http["Resource"]) == {arn, f"{arn}/*"}
        assert deny_old_tls["Effect"] == "Deny" and deny_old_tls["Condition"] == {
            "NumericLessThan": {"s3:TlsVersion": "1.2"}
        }


@pytest.mark.integration
def test_plan_worker_policy_names_only_its_buckets(plan):
    allowed = {BUCKET_ARN["data"], f"{BUCKET_ARN['data']}/*", BUCKET_ARN["ray"], f"{BUCKET_ARN['ray']}/*"}
    policy = role_policy(plan, "worker")
    for statement in policy:
        assert statement["Effect"] == "Allow"
        assert all(action.startswith("s3:") and "*" not in action for action in statement["Action"]), (
            statement
        )
        assert set(statement["Resource"]) <= allowed, statement
    # data: read only
    data_objects = [s for s in policy if f"{BUCKET_ARN['data']}/*" in s["Resource"]]
    assert {a for s in data_objects for a in s["Action"]} == {"s3:GetObject"}
    # ray: read-write (checkpoints, Tune state)
    ray_objects = {a for s in policy if f"{BUCKET_ARN['ray']}/*" in s["Resource"] for a in s["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= ray_objects


@pytest.mark.integration
def test_plan_head_policy_scoped(plan):
    policy = role_policy(plan, "head")
    bucket_resources = set(BUCKET_ARN.values()) | {f"{arn}/*" for arn in BUCKET_ARN.values()}
    for statement in policy:
        assert statement["Effect"] == "Allow"
        services = {action.split(":")[0] for action in statement["Action"]}
        assert len(services) == 1, statement
        (service,) = services
        assert all("*" not in action for action in statement["Action"]), statement
        if service == "s3":
            assert set(statement["Resource"]) <= bucket_resources, statement
        elif service == "iam":
            # PassRole, of the worker role only, to EC2 only
            assert statement["Action"] == ["iam:PassRole"]
            assert statement["Resource"] == [WORKER_ROLE_ARN]
            assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
        else:
            assert service == "ec2", statement
        if statement["Resource"] == ["*"]:
            assert all(action.startswith("ec2:Describe") for action in statement["Action"]), statement
    assert {r for s in policy for r in s["Resource"] if r.startswith("arn:aws:s3")} == bucket_resources

    def granting(action, resource_suffix):
        return [
            s
            for s in policy
            if action in s["Action"] and any(r.endswith(resource_suffix) for r in s["Resource"])
        ]

    # Launch: only tagged as this cluster's, with the worker profile, of an allowed type.
    (launch,) = granting("ec2:RunInstances", ":instance/*")
    assert launch["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"] == "resnet-pipeline"
    assert launch["Condition"]["ArnEquals"]["ec2:InstanceProfile"].endswith(
        ":instance-profile/resnet-pipeline-ray-worker"
    )
    assert "g5.xlarge" in launch["Condition"]["StringEquals"]["ec2:InstanceType"]
    # Stop/start/terminate: only instances already tagged as this cluster's.
    for action in ("ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"):
        (grant,) = granting(action, ":instance/*")
        assert grant["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": "resnet-pipeline"}}


@pytest.mark.integration
def test_plan_security_group_only_ssh_from_operators(plan):
    (group,) = planned(plan, "aws_security_group").values()
    assert group["name"] == "resnet-pipeline-ray" and group["vpc_id"] == VPC
    outside = [rule for rule in group["ingress"] if not rule["self"]]
    assert [
        (rule["from_port"], rule["to_port"], rule["protocol"], rule["cidr_blocks"]) for rule in outside
    ] == [(22, 22, "tcp", [SSH_CIDR])]
    assert all(not rule["ipv6_cidr_blocks"] for rule in group["ingress"])


@pytest.mark.integration
def test_plan_refuses_ssh_from_anywhere(tf_env, root_module):
    variables = [*PLAN_VARS[:-1], 'ssh_ingress_cidrs=["0.0.0.0/0"]']
    result = terraform(
        tf_env, root_module, "plan", "-refresh=false", "-lock=false", "-input=false", *variables, check=False
    )
    assert result.returncode != 0
    assert "never the whole internet" in result.stderr


@pytest.mark.integration
def test_cluster_yaml_matches_terraform(plan):
    """The names cluster.yaml uses are the ones Terraform creates."""
    config = load_cluster_config()
    variables = plan["configuration"]["root_module"]["variables"]
    assert config["cluster_name"] == variables["cluster_name"]["default"]
    assert config["provider"]["region"] == variables["region"]["default"]
    (group,) = planned(plan, "aws_security_group").values()
    assert config["provider"]["security_group"]["GroupName"] == group["name"]
    profiles = {
        address.split(".")[-1]: values["name"]
        for address, values in planned(plan, "aws_iam_instance_profile").items()
    }
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"] == profiles["head"]
    (worker,) = (node for name, node in types.items() if name != config["head_node_type"])
    assert worker["node_config"]["IamInstanceProfile"]["Name"] == profiles["worker"]
    assert worker["node_config"]["InstanceType"] in variables["worker_instance_types"]["default"]


def checkov_command() -> list[str]:
    if shutil.which("uvx"):
        return ["uvx", "--from", CHECKOV, "checkov"]
    if shutil.which("uv"):
        return ["uv", "tool", "run", "--from", CHECKOV, "checkov"]
    _unavailable("neither uvx nor uv is on PATH (checkov runs in its own tool environment)")


@pytest.mark.integration
def test_checkov(tmp_path):
    # A clean copy (checkov reads every .tf below the folder, a local .terraform included). Not --quiet: the JSON
    # then lists the skipped checks (with their reasons) and the passed ones too.
    source = copy_module(TERRAFORM, tmp_path / "terraform")
    result = subprocess.run(
        [
            *checkov_command(),
            "-d",
            str(source),
            "--skip-download",
            "--framework",
            "terraform",
            "--compact",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.stdout.strip(), result.stderr[-4000:]
    report = json.loads(result.stdout)
    summary, results = report["summary"], report["results"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for c in results["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert summary["parsing_errors"] == 0 and result.returncode == 0, (summary, result.stderr[-2000:])

    skipped = results.get("skipped_checks", [])
    assert {c["check_id"] for c in skipped} == CHECKOV_SKIPS
    for check in skipped:
        reason = (check["check_result"].get("suppress_comment") or "").strip()
        assert len(reason) > 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"

    # The policies were evaluated for real (checkov silently leaves out a check it cannot resolve).
    passed = {(c["check_id"], c["resource"]) for c in results["passed_checks"]}
    for document in ("aws_iam_policy_document.head", "aws_iam_policy_document.worker"):
        for check_id in (
            "CKV_AWS_107",
            "CKV_AWS_108",
            "CKV_AWS_109",
            "CKV_AWS_110",
            "CKV_AWS_111",
            "CKV_AWS_356",
        ):
            assert (check_id, document) in passed, (check_id, document)
    for check_id in ("CKV_AWS_21", "CKV2_AWS_6", "CKV2_AWS_61"):  # versioning, public access block, lifecycle
        assert (check_id, "module.buckets.aws_s3_bucket.this") in passed, check_id


# ---- the buckets module against a real S3 server -------------------------------------------------------------

LOCAL_ROOT = """
terraform {{
  required_providers {{
    aws = {{ source = "hashicorp/aws", version = "~> 5.100" }}
  }}
}}

# SeaweedFS: path-style requests, nothing else of AWS (keys from the environment).
provider "aws" {{
  region                      = "us-east-1"
  s3_use_path_style           = true
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  endpoints {{
    s3 = "{endpoint}"
  }}
}}

module "buckets" {{
  source = "{module}"

  prefix        = "{prefix}"
  force_destroy = true
  tags          = {{ purpose = "test" }}
  # SeaweedFS answers 501 to PublicAccessBlock, and a TLS-only policy over plain HTTP locks a bucket for good.
  enable_public_access_block = false
  enforce_tls                = false
}}

output "names" {{
  value = module.buckets.names
}}
"""


@pytest.mark.integration
def test_buckets_module_applies_and_destroys_on_s3(tf_env, s3_server, tmp_path):
    import boto3
    from botocore.config import Config

    prefix = f"tftest-{uuid.uuid4().hex[:8]}"
    module = copy_module(TERRAFORM / "modules" / "buckets", tmp_path / "buckets")
    root = tmp_path / "root"
    root.mkdir()
    (root / "main.tf").write_text(
        LOCAL_ROOT.format(endpoint=s3_server.endpoint, module=module, prefix=prefix)
    )
    shutil.copy(TERRAFORM / ".terraform.lock.hcl", root)
    env = {**tf_env, "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    names = {role: f"{prefix}-{role}" for role in BUCKET_ROLES}

    terraform(env, root, "init", "-input=false", "-lockfile=readonly", timeout=300)
    try:
        # (about a minute: the provider polls a new lifecycle configuration until it reads back the same
        # several times in a row, whatever the server)
        terraform(env, root, "apply", "-auto-approve", "-input=false")
        outputs = json.loads(terraform(env, root, "output", "-json").stdout)
        assert outputs["names"]["value"] == names

        for role, bucket in names.items():
            assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
            (sse,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
            assert sse["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
            rules = {
                rule["ID"]: rule for rule in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
            }
            expected = {"abort-incomplete-multipart-uploads", "expire-noncurrent-versions"}
            assert set(rules) == expected | ({"expire-current-objects"} if role == "ray" else set())
            assert (
                rules["abort-incomplete-multipart-uploads"]["AbortIncompleteMultipartUpload"][
                    "DaysAfterInitiation"
                ]
                == 7
            )
            assert rules["expire-noncurrent-versions"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 30
            tags = {tag["Key"]: tag["Value"] for tag in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}
            assert tags == {"purpose": "test", "resnet-pipeline/bucket": role}
            ownership = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
            assert ownership == [{"ObjectOwnership": "BucketOwnerEnforced"}]
            if role == "ray":
                assert rules["expire-current-objects"]["Expiration"]["Days"] == 30

        # Versioning at work, and something for force_destroy to delete.
        for body in (b"one", b"two"):
            s3.put_object(Bucket=names["ray"], Key="runs/checkpoint", Body=body)
        versions = s3.list_object_versions(Bucket=names["ray"], Prefix="runs/")["Versions"]
        assert len(versions) == 2

        # SeaweedFS keeps answering BucketOwnerEnforced after DeleteBucketOwnershipControls (it is its default),
        # and the provider would wait for it to disappear: forget those (the bucket's deletion takes them along).
        terraform(env, root, "state", "rm", "module.buckets.aws_s3_bucket_ownership_controls.this")
        terraform(env, root, "destroy", "-auto-approve", "-input=false")
        remaining = {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}
        assert not remaining & set(names.values())
    finally:
        _remove_buckets(s3, names.values())


def _remove_buckets(s3, names) -> None:
    """Leave the session's server as it was, whatever failed above."""
    existing = {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}
    for name in set(names) & existing:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
            for version in page.get("Versions", []) + page.get("DeleteMarkers", []):
                s3.delete_object(Bucket=name, Key=version["Key"], VersionId=version["VersionId"])
        s3.delete_bucket(Bucket=name)
