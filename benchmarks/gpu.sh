#!/usr/bin/env bash
# Every GPU figure of issue 12 in one call, on a machine with only torch, transformers, h5py, einops and pandas:
#   1. the CUDA-marked tests (pytest -m gpu; pytest from PYTEST_PATH when it is not installed),
#   2. training-step throughput (TopK with AuxK, ReLU, BatchTopK, JumpReLU, Gated) at d=576/F=18432 and
#      d=1536/F=16384, batch 4096, bf16 autocast, eager and torch.compile'd TopK,
#   3. the trainer fed by the streaming ActivationStore from an fp16 HDF5 file vs the step-only rate,
#   4. caching a SmolLM2-shaped model (random weights, no download) at layer 15 into an fp16 HDF5 file,
# then one table. JSON lines go to $OUT (default: a new temp dir). Step timeouts add up to < 8 minutes.
#
#   bash benchmarks/gpu.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --dry-run    # CPU, tiny shapes: checks that every step runs (a few minutes here)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export TQDM_DISABLE=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
# the GPU machine's own python; a dry run on a development machine takes the project's venv when it has one
PY=${PYTHON:-python}
[ -z "${PYTHON:-}" ] && [ $DRY = 1 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
start=$(date +%s)
say() { echo "== $* ($(( $(date +%s) - start )) s)"; }
# run NAME TIMEOUT CMD...: stdout (JSON lines) to $OUT/NAME.jsonl, stderr to $OUT/NAME.log; never stops the script
run() {
    local name=$1 limit=$2; shift 2
    say "$name"
    timeout "$limit" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.log"
    local rc=$?
    [ $rc -ne 0 ] && { echo "   $name exited $rc; tail of $OUT/$name.log:"; tail -5 "$OUT/$name.log"; }
    echo "{\"step\": \"$name\", \"rc\": $rc}" >> "$OUT/steps.jsonl"
}

if [ $DRY = 1 ]; then
    DEV=cpu
    TRAIN_A=(--d-in 32 --d-sae 256 --batch 128 --rounds 3 --warmup 1 --compile-backend aot_eager)
    TRAIN_B=(--d-in 48 --d-sae 256 --batch 128 --rounds 3 --warmup 1)
    STORE=(--d 32 --batch 256 --seqs 64 --rounds 3 --batches-per-round 2 --train --d-sae 256 --train-batch 128)
    CACHE=(--model tiny-llama --hookpoint mlp_out.2 --context-size 64 --tokens 4k --forward-batches 2)
else
    DEV=cuda
    TRAIN_A=(--d-in 576 --d-sae 18432 --batch 4096 --rounds 20 --warmup 3)
    TRAIN_B=(--d-in 1536 --d-sae 16384 --batch 4096 --rounds 20 --warmup 3)
    STORE=(--d 576 --batch 4096 --seqs 2048 --rounds 9 --batches-per-round 8 --train --d-sae 18432
           --train-batch 4096)
    CACHE=(--model random:smollm2-135m --hookpoint mlp_out.15 --context-size 1024 --tokens 8M --forward-batches 5)
fi

# 1. CUDA tests (skipped, not failed, on a machine without CUDA: the dry run only checks the command)
if ! $PY -c "import pytest" 2>/dev/null && [ -n "${PYTEST_PATH:-}" ]; then
    export PYTHONPATH=$PYTHONPATH:$PYTEST_PATH
fi
if $PY -c "import pytest" 2>/dev/null; then
    say "pytest -m gpu"
    timeout 90 $PY -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
    echo "{\"step\": \"gpu_tests\", \"rc\": $?, \"summary\": \"$(tail -1 "$OUT/gpu_tests.txt" | tr -d '"')\"}" \
        >> "$OUT/steps.jsonl"
    tail -3 "$OUT/gpu_tests.txt"
else
    echo "{\"step\": \"gpu_tests\", \"rc\": -1, \"summary\": \"pytest not importable (set PYTEST_PATH)\"}" \
        >> "$OUT/steps.jsonl"
    echo "   pytest is not importable: CUDA tests not run (set PYTEST_PATH to a directory holding pytest)"
fi

# 2. training step throughput
run train_576 70 $PY benchmarks/train_throughput.py --device $DEV "${TRAIN_A[@]}" \
    --only matmul_floor topk_dead10 topk_nodead batchtopk_dead10 relu_fresh relu_sparse2 jumprelu_fresh gated_fresh
# compiled apart: a slow first compilation must not cost the eager figures
run train_576_compiled 90 $PY benchmarks/train_throughput.py --device $DEV "${TRAIN_A[@]}" --compile \
    --only topk_dead10 topk_dead10_compiled
run train_1536 50 $PY benchmarks/train_throughput.py --device $DEV "${TRAIN_B[@]}" \
    --only matmul_floor topk_dead10 topk_nodead
# 3. training fed from an fp16 HDF5 file (streaming) vs step-only; store vs raw h5py
run store 80 $PY benchmarks/store_throughput.py --device $DEV "${STORE[@]}"
# 4. caching SmolLM2-shaped layer 15 → fp16 HDF5
run cache 90 $PY benchmarks/cache_throughput.py --device $DEV --dtype float16 "${CACHE[@]}"

say "table"
$PY benchmarks/gpu_table.py "$OUT" | tee "$OUT/table.md"
echo "JSON lines and logs: $OUT"
