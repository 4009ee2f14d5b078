#!/usr/bin/env bash
# The GPU measurements quoted in the README ("Performance", "Determinism"), on one CUDA machine:
#   OUT=gpu-results bash tests/gpu/measure.sh
# Each step has its own time limit and writes its JSON to $OUT; a failed step does not stop the
# others. Everything printed goes to $OUT/log.txt as well.
set -u
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/kdbench-inductor}
log="$OUT/log.txt"
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$log"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$log"
B="$PY -m kdbench.bench"
# 1. resnet110 → resnet56: every method and the teacher against the reference loop; ablation
step epochs56 150 $B epochs --teachers --ablation --reference-steps ${REF_STEPS:-20} \
    --json "$OUT/epochs56.json"
# 2. run-to-run and seed spread (fast, plain, deterministic), digits, KD resnet20 → resnet8
step spread 90 $B spread --json "$OUT/spread.json"
# 3. resnet110 → resnet20 (the grid's second pair), no reference
step epochs20 50 $B epochs --pair resnet110:resnet20 --no-reference --json "$OUT/epochs20.json"
# 4. 1, 2, 4, 8 concurrent KD runs on the GPU
step concurrent 100 $B concurrent --train-size 20000 --json "$OUT/concurrent.json"
# 5. torch.compile of student and teacher (first epoch compiles; cache in TORCHINDUCTOR_CACHE_DIR)
step compile 90 $B epochs --methods kd tucker --no-reference --set compile=default \
    --json "$OUT/compile.json"
