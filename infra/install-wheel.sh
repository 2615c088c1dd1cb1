#!/usr/bin/env bash
# Install resnet-pipeline as a wheel, with the dependency versions of uv.lock, into the virtualenv VENV.
# The one install command of the project outside a checkout: the container image (infra/docker) runs it, and
# tests/test_wheel.py runs it to prove that the installed CLI works outside the repository.
# Needs uv; run from anywhere. Usage: infra/install-wheel.sh VENV [PYTHON]
set -euo pipefail
venv=${1:?usage: infra/install-wheel.sh VENV [PYTHON]}
python=${2:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
uv=${UV:-$(command -v uv || echo "python3 -m uv")}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT

$uv build --wheel --quiet --out-dir "$build" "$root"
$uv export --frozen --no-dev --no-emit-project --no-hashes --quiet --project "$root" -o "$build/requirements.txt"
$uv venv --quiet --python "$python" "$venv"
$uv pip install --quiet --python "$venv/bin/python" -r "$build/requirements.txt" "$build"/resnet_pipeline-*.whl
echo "installed $(basename "$build"/resnet_pipeline-*.whl) into $venv"
