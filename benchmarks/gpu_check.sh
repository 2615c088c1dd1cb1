#!/usr/bin/env bash
# One prepared check of the training loop on a GPU machine: about 3-5 minutes on one H200, PASS/FAIL per check.
#
# Through the device tool (`run`), from the repository root, with timeout_s 600:
#     bash benchmarks/gpu_check.sh
# The script stops its checks by itself after about 540 s (GPU_CHECK_BUDGET_S) and always writes its summary;
# read $OUT/gpu_check.log and $OUT/gpu_check.json ($OUT: the tool's folder; default ./gpu-check-out).
# A CPU smoke test of the same code (gloo instead of NCCL, tiny sizes, no nvidia-smi), on any machine:
#     OUT=/tmp/gpucheck uv run --frozen bash benchmarks/gpu_check.sh --cpu-smoke
# Options: --cpu-smoke | --skip-compile | --skip-resnet50 | --with-compile (compile also in --cpu-smoke).
#
# Checks, in this order (each in its own process under a time limit; a failure does not stop the next one):
#   env       nvidia-smi, torch/CUDA/cuDNN/NCCL/Triton versions, device count and names
#   ddp       torchrun --standalone --nproc_per_node=min(2, GPUs): resnet.engine.fit on NCCL for 2 epochs
#             (the end-of-epoch metric all-reduce), finite losses on every rank, identical parameters
#   recipe    fit, 1 process: fp32/bf16/fp16 x channels_last off/on, images/s and finite losses
#   resnet50  benchmarks/gpu_resnet50.py with its defaults (batch 256, 20 + 100 steps, 224 px, bf16)
#   compile   fit with compile: true (bf16 + channels_last), compile time estimated; last, it gets what is left
# Exit status: 0 when every check passed (or was skipped), 1 otherwise.
#
# Python: $PYTHON if set; else a `python` that already imports torch (as under `uv run`); else .venv/bin/python;
# else `uv sync --frozen` + `uv run --frozen python` (uv from `python3 -m pip install uv` if missing); else python3.
# The repository root goes on PYTHONPATH, so `resnet` imports without being installed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=gpu
COMPILE=1
RESNET50=1
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) MODE=cpu-smoke ;;
        --skip-compile) COMPILE=0 ;;
        --with-compile) COMPILE=2 ;;
        --skip-resnet50) RESNET50=0 ;;
        -h | --help) sed -n '2,23p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done
if [[ $MODE == cpu-smoke && $COMPILE == 1 ]]; then
    COMPILE=0  # inductor on a small CPU takes minutes; --with-compile runs it anyway
fi

OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CHECKS="$OUT/checks"
rm -rf "$CHECKS"
mkdir -p "$CHECKS"
LOG="$OUT/gpu_check.log"
rm -f "$OUT/gpu_check.json"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

echo "gpu_check: mode $MODE, repository $ROOT, results in $OUT, started $(date -u +%FT%TZ) on $(hostname)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # `resnet` importable whichever Python runs
export PYTHONUNBUFFERED=1

imports_torch() { "$@" -c 'import torch, torchvision, pydantic, yaml' >/dev/null 2>&1; }
if [[ -n ${PYTHON:-} ]]; then
    read -r -a PY <<<"$PYTHON"
elif command -v python >/dev/null && imports_torch python; then
    PY=(python)
elif [[ -x .venv/bin/python ]] && imports_torch .venv/bin/python; then
    PY=(.venv/bin/python)
else
    if ! command -v uv >/dev/null && command -v python3 >/dev/null; then
        python3 -m pip install --quiet uv || python3 -m pip install --quiet --user uv || true
        export PATH="$HOME/.local/bin:$PATH"
    fi
    if command -v uv >/dev/null && uv sync --frozen && imports_torch uv run --frozen python; then
        PY=(uv run --frozen python)
    else
        PY=(python3)
    fi
fi
echo "python: ${PY[*]} -> $("${PY[@]}" -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1 || true)"

if [[ $MODE == cpu-smoke ]]; then
    DEVICE=cpu
    NPROC=2
    DDP_SIZES=(--train 256 --val 128 --batch-size 64 --epochs 2)
    RECIPE_SIZES=(--train 128 --val 64 --batch-size 32 --epochs 2)
    R50_ARGS=(--device cpu --batch-size 4 --image-size 64 --steps 2 --warmup 1)
    export OMP_NUM_THREADS=1
    LIMIT_ENV=120 LIMIT_DDP=300 LIMIT_RECIPE=300 LIMIT_R50=180 LIMIT_COMPILE=600
    BUDGET=${GPU_CHECK_BUDGET_S:-1800}  # seconds for the whole script
else
    DEVICE=cuda
    GPUS=$("${PY[@]}" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    NPROC=$((GPUS >= 2 ? 2 : 1))  # NCCL refuses two ranks on one GPU ("Duplicate GPU detected")
    DDP_SIZES=(--train 8192 --val 2048 --batch-size 64 --epochs 2)
    RECIPE_SIZES=(--train 16384 --val 4096 --batch-size 256 --epochs 2)
    R50_ARGS=()  # its defaults: batch 256, 20 warm-up + 100 timed steps, 224 px, bf16, channels_last
    CORES=$(nproc 2>/dev/null || echo 2)
    export OMP_NUM_THREADS=$((CORES / NPROC > 0 ? CORES / NPROC : 1))  # the CPU-side augmentation
    LIMIT_ENV=60 LIMIT_DDP=150 LIMIT_RECIPE=120 LIMIT_R50=120 LIMIT_COMPILE=240  # compile last: gets what is left
    # Seconds for the whole script: the summary is written before a 600 s limit of the device tool ends it.
    BUDGET=${GPU_CHECK_BUDGET_S:-540}
fi

run_check() {  # run_check NAME LIMIT_S COMMAND...: output to the log and CHECKS/NAME.out, "rc seconds" to NAME.rc
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - 25))  # 25 s: the kill grace and the summary
    if ((left < limit)); then
        limit=$((left > 10 ? left : 10))
    fi
    echo
    echo "=== $name (limit ${limit} s): $*"
    local started=$SECONDS rc
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$CHECKS/$name.out"
    rc=${PIPESTATUS[0]}
    set -e
    echo "$rc $((SECONDS - started))" >"$CHECKS/$name.rc"
    echo "=== $name: exit status $rc after $((SECONDS - started)) s"
}
skip_check() {  # skip_check NAME REASON
    echo "$2" >"$CHECKS/$1.skipped"
    echo "0 0" >"$CHECKS/$1.rc"
    echo
    echo "=== $1: skipped ($2)"
}

HELPER=benchmarks/gpu_check.py
run_check env "$LIMIT_ENV" "${PY[@]}" "$HELPER" env --out "$CHECKS" --device "$DEVICE"
run_check ddp "$LIMIT_DDP" "${PY[@]}" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    "$HELPER" ddp --out "$CHECKS" --device "$DEVICE" "${DDP_SIZES[@]}"
run_check recipe "$LIMIT_RECIPE" "${PY[@]}" "$HELPER" recipe --out "$CHECKS" --device "$DEVICE" \
    --name recipe --variants fp32,fp32+cl,bf16,bf16+cl,fp16,fp16+cl "${RECIPE_SIZES[@]}"
if [[ $RESNET50 == 1 ]]; then
    run_check resnet50 "$LIMIT_R50" "${PY[@]}" benchmarks/gpu_resnet50.py "${R50_ARGS[@]}" \
        --json "$CHECKS/resnet50.raw.json"
else
    skip_check resnet50 "--skip-resnet50"
fi
if [[ $COMPILE != 0 ]]; then
    run_check compile "$LIMIT_COMPILE" "${PY[@]}" "$HELPER" recipe --out "$CHECKS" --device "$DEVICE" \
        --name compile --variants compile "${RECIPE_SIZES[@]}"
else
    skip_check compile "--skip-compile, or --cpu-smoke without --with-compile"
fi

set +e
"${PY[@]}" "$HELPER" summary --out "$CHECKS" --mode "$MODE" --json "$OUT/gpu_check.json" \
    --checks env,ddp,recipe,resnet50,compile
status=$?
set -e
if [[ ! -s $OUT/gpu_check.json ]]; then  # the summary itself failed: still leave a verdict
    printf '{"mode": "%s", "passed": false, "error": "the summary step failed (exit status %s); see gpu_check.log"}\n' \
        "$MODE" "$status" >"$OUT/gpu_check.json"
    status=1
fi
echo "gpu_check: finished $(date -u +%FT%TZ), exit status $status; log $LOG"
exit "$status"
