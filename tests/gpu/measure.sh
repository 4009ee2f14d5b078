#!/usr/bin/env bash
# The GPU measurements quoted in the README ("Performance", "Determinism"), on one CUDA machine:
#   OUT=gpu-results bash tests/gpu/measure.sh [STEP ...]
# (a machine without tensorly, PyWavelets or jsonschema and without pip access: tests/gpu/wheels.sh)
# STEPs (default: all, in this order): graphs epochs56 epochs20 concurrent grid ablation tucker
# methods spread compile mps overlap mps-jobs profile cudnn cohort cohort56 mps-cohort priority
# stack stack56 state solvers samplewise thread thread-cohort profile-tucker jacobi resume
# recomp56 teacher.
# Each step has its own time limit and writes its JSON to $OUT; a failed or cut-off step does
# not stop the others, and an epochs step cut off keeps the rows it finished (its JSON says
# "complete": false). Everything printed goes to $OUT/log.txt as well. SET adds `--set
# KEY=VALUE` settings to the epochs, ablation, tucker, concurrent and compile steps and to the
# default runs of spread (default: none, the defaults: CUDA graphs, prefetched targets, the
# teacher overlapped and pipelined, torch.compile, cuDNN autotuning); each epochs row records how
# its steps ran ("steps": whole/split graphs, or eager and why). epochs56 and epochs20 time every
# method of config/config.yaml's grid, so `grid` (CPU only, seconds) can estimate its GPU-hours
# from them; every row compiles in its warm-up epoch: 5-10 s a student row on an H200 once the
# inductor cache ($TORCHINDUCTOR_CACHE_DIR) holds the pair's graphs, the first row of a pair
# about 30 s, and the teacher's training (epochs56 --teachers; epochs20 leaves it out, the same
# resnet110) over 3 minutes cold. The limits add up to over 90 minutes, more than the 10 of one
# call: choose (a KD row of 45,000 images takes over 55 s cold; in the fifth session a resnet56 row
# took about 55 s cold, its warm-up included). After the nine H200 sessions of 2026-11-26 to 28
# (their JSON: docs/perf; the sixth timed stack, stack56 and priority: stacked cohorts are the
# default on CUDA since, and priority_targets gave no gain; the seventh solvers, samplewise,
# spread, state and mps-cohort: the SVD is the sample-wise default on CUDA since, 1.14x
# featuremap on resnet20; the eighth thread and thread-cohort: train.targets_thread 1.24-1.36x
# slower, off, and sample-wise Tucker 1.07x featuremap on resnet56; the ninth solvers, jacobi,
# resume, profile-tucker and recomp56: train.samplewise_solver: jacobi graphs exactly and is the
# fastest solver alone, but slower in training, 1.28x featuremap on resnet20 against the SVD's
# 1.20x, its one long kernel crowding out the student's; resumed runs equal uninterrupted ones on
# the GPU; the recompositions on resnet56 1.02-1.03x) the open questions are, most telling
# first: teacher (the grid's last rows from before cuDNN autotuning), mps again with autotuning,
# and every target on an H100, which no session has had.
set -u
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/kdbench-inductor}
log="$OUT/log.txt"
sets=()
for kv in ${SET-}; do sets+=(--set "$kv"); done
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | grep -v -i "warning\|warnings.warn\|triton_mm\|autotune" |
        tee -a "$log"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}
on_and_off() {  # on_and_off NAME SETTING METHOD...: resnet110 -> resnet20, 3 timed epochs,
    # train.SETTING true, then false
    local name=$1 setting=$2 on
    shift 2
    for on in true false; do
        step "$name-$on" 200 $B epochs --no-reference --epochs 3 --pair resnet110:resnet20 \
            --methods "$@" "${sets[@]}" --set "$setting=$on" --json "$OUT/${name}3-$on.json"
    done
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$log"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$log"
B="$PY -m kdbench.bench"
# the methods of config/config.yaml's grid (one rank each: the rank does not change the cost)
GRID=(vanilla kd featuremap ft "tucker full-teacher-r32" "tucker_recomp teacher-r32"
    "tucker_recomp student-r32" "tucker_recomp both-r32")
for s in ${*:-graphs epochs56 epochs20 concurrent grid ablation tucker methods spread compile mps \
    overlap mps-jobs profile cudnn cohort cohort56 mps-cohort priority stack stack56 state \
    solvers samplewise thread thread-cohort profile-tucker jacobi resume recomp56 teacher}; do
    case $s in
    # CUDA graphs (and prefetched targets) train as eager steps do, and nothing fell back; the
    # checked methods as one cohort too, its members on CUDA streams of their own
    # (train.cohort_streams), against an eager cohort without them
    graphs) step graphs 100 $B graphs --cohort --set cohort_streams=true \
        --json "$OUT/graphs.json" ;;
    # resnet110 → resnet56: the teacher, and the grid's methods against the reference loop
    epochs56) step epochs56 330 $B epochs --teachers --epochs 1 --warmup 1 \
        --reference-steps 10 --methods "${GRID[@]}" "${sets[@]}" --json "$OUT/epochs56.json" ;;
    # KD resnet110 → resnet56 with the speed switches on one at a time (15,000 images: the
    # first rungs are the slow eager ones)
    ablation) step ablation 90 $B epochs --methods kd --ablation --no-reference \
        --train-size 15000 --epochs 1 --warmup 1 "${sets[@]}" --json "$OUT/ablation.json" ;;
    # the Tucker methods against featuremap on resnet110 -> resnet20 (where their wait for the
    # teacher's eigh shows most): the defaults (eigendecompositions on the GPU), on the host
    # (train.eigh_on_host), and pipelined (train.pipeline_targets: the teacher two batches
    # ahead, the decomposition one, on streams of their own), after the graphs check with it
    # (TUCKER_SETTINGS: the settings compared, a space-separated list)
    tucker) step graphs-pipeline 60 $B graphs --set pipeline_targets=true \
            --json "$OUT/graphs-pipeline.json"
        for setting in ${TUCKER_SETTINGS:-eigh_on_host=false eigh_on_host=true pipeline_targets=true}; do
            step "tucker-$setting" 200 $B epochs --no-reference --epochs 1 \
                --pair resnet110:resnet20 --methods featuremap "tucker full-teacher-r32" \
                "tucker sample-teacher-r32" "tucker_recomp teacher-r32" "${sets[@]}" \
                --set "$setting" --json "$OUT/tucker-${setting/=/-}.json"
        done ;;
    # one eager step of every method (resnet110 → resnet56, interleaved), and the Tucker
    # decomposition of a stage-3 batch alone (kdbench and tensorly): where a Tucker step's
    # extra time over featuremap goes
    methods) step methods 90 $B methods --steps 10 --json "$OUT/methods.json" ;;
    # the sample-wise decomposition of a stage-3 batch (128 × 64 × 8 × 8, ranks (32, 8, 8)) with
    # each train.samplewise_solver: eigh (block Jacobi), svd (cuSOLVER's batched gesvda, one
    # call; the default on CUDA, train.samplewise_solver: auto) and jacobi (kdbench.jacobi's
    # kernel, with its sweeps), each against LAPACK's in double precision
    solvers) step solvers 90 $B methods --decomposition-only --json "$OUT/solvers.json" ;;
    # sample-wise Tucker's epochs against featuremap's on resnet110 -> resnet20 with each
    # train.samplewise_solver (SOLVERS, default "svd eigh"), each run with its own featuremap row
    samplewise) for solver in ${SOLVERS:-svd eigh}; do
            step "samplewise-$solver" 150 $B epochs --no-reference --epochs 2 \
                --pair resnet110:resnet20 --methods featuremap "tucker sample-teacher-r32" \
                "${sets[@]}" --set samplewise_solver="$solver" \
                --json "$OUT/samplewise-$solver.json"
        done ;;
    # run-to-run and seed spread (default with SET's switches, plain, deterministic), digits,
    # KD resnet20 → resnet8; and each seed's KD student in a stacked cohort (train.cohort_stack)
    # against its default run
    spread) step spread 180 $B spread --epochs 15 --teacher-epochs 15 --cohort "${sets[@]}" \
        --json "$OUT/spread.json" ;;
    # KD, featuremap and full-tensor Tucker epochs without train.overlap_teacher (on by
    # default: with it, epochs56; `graphs` checks it against eager steps)
    overlap) step overlap 200 $B epochs --no-reference --epochs 1 --methods kd featuremap \
            "tucker full-teacher-r32" "${sets[@]}" --set overlap_teacher=false \
            --json "$OUT/overlap.json" ;;
    # 1, 2, 4, 8 concurrent KD runs on the GPU under an MPS daemon (their kernels side by
    # side; without it, graphed runs took turns and 2-8 gave 0.99x of one)
    mps) step mps 110 $B concurrent --mps --train-size 20000 --epochs 1 "${sets[@]}" \
        --json "$OUT/mps.json" ;;
    # the workflow's own training jobs (kdbench.runs.run_job) under KDBENCH_MPS=1: 4 digits
    # teachers at once without MPS, then joining the daemon the first starts; same weights?
    mps-jobs) step mps-jobs 240 "$PY" tests/gpu/mps_jobs.py --jobs 4 --epochs 5 \
        --json "$OUT/mps-jobs.json" ;;
    # where the Tucker methods' graphed steps spend their time over featuremap's (resnet110 ->
    # resnet20, 10,000 images): wall, busy and kernel time per step, and each CUDA stream's
    # busy time (the student's, the teacher's and the decomposition's)
    # (the last row with train.samplewise_solver: jacobi, kdbench.jacobi's kernel, which never
    # waits for the host; on 2026-11-28 the student's stream 0.84 ms a step busier beside it)
    profile-tucker) step profile-tucker 240 "$PY" tests/gpu/profile_step.py --student resnet20 \
        --train-size 10000 --row featuremap --row "tucker full-teacher-r32" \
        --row "tucker sample-teacher-r32" \
        --row "tucker sample-teacher-r32:samplewise_solver=jacobi" \
        --json "$OUT/profile-tucker.json" ;;
    # train.samplewise_solver: jacobi (kdbench.jacobi's Triton kernel, no host synchronisation;
    # 1.28x featuremap against svd's 1.20x on 2026-11-28): graphed training with it against
    # eager steps, then sample-wise Tucker's epochs with it and with svd (the default on CUDA)
    # against featuremap's on resnet110 -> resnet20, 3 timed epochs (the decomposition of a
    # stage-3 batch alone, with every solver: solvers)
    jacobi) step graphs-jacobi 100 $B graphs --set samplewise_solver=jacobi \
            --json "$OUT/graphs-jacobi.json"
        for solver in jacobi svd; do
            step "samplewise3-$solver" 200 $B epochs --no-reference --epochs 3 \
                --pair resnet110:resnet20 --methods featuremap "tucker sample-teacher-r32" \
                "${sets[@]}" --set samplewise_solver="$solver" \
                --json "$OUT/samplewise3-$solver.json"
        done ;;
    # a resumed run against an uninterrupted one on the GPU (resnet8, 8x8 digits, deterministic
    # kernels; the CUDA defaults, fused SGD and channels_last, then with fused=false):
    # the same weights? (tests/gpu/resume.py; exit status 1 if not)
    resume) step resume 120 "$PY" tests/gpu/resume.py --json "$OUT/resume.json" ;;
    # where a graphed step's GPU time goes (resnet110 -> resnet56, 5,000 images): wall, busy
    # and kernel time per step, and the costliest kernels, for vanilla and KD (the defaults),
    # vanilla uncompiled and vanilla without channels_last
    profile) step profile 200 "$PY" tests/gpu/profile_step.py --train-size 5000 --row vanilla \
        --row kd --row vanilla:compile=none --row vanilla:channels_last=false \
        --json "$OUT/profile.json" ;;
    # 1, 2, 4, 8 concurrent KD runs on the GPU
    concurrent) step concurrent 110 $B concurrent --train-size 20000 --epochs 1 "${sets[@]}" \
        --json "$OUT/concurrent.json" ;;
    # resnet110 → resnet20 (the grid's second pair), no reference (the teacher: epochs56)
    epochs20) step epochs20 240 $B epochs --pair resnet110:resnet20 --no-reference \
        --epochs 1 --methods "${GRID[@]}" "${sets[@]}" --json "$OUT/epochs20.json" ;;
    # GPU-hours of the full CIFAR-100 grid from the two epochs files (and the runs per GPU of
    # mps, else concurrent, if there; and in cohorts of COHORT_SIZE, default 8, from cohort's
    # row, if there)
    grid) files=("$OUT/epochs56.json" "$OUT/epochs20.json") opts=(--config config/config.yaml)
        [ -s "$OUT/concurrent.json" ] && opts+=(--concurrency "$OUT/concurrent.json")
        [ -s "$OUT/mps.json" ] && opts+=(--concurrency "$OUT/mps.json")
        # what saving the training state adds, apart (`state` run before `grid`)
        states=()
        for f in state-resnet20 state-resnet56; do
            [ -s "$OUT/$f.json" ] && states+=("$OUT/$f.json")
        done
        [ ${#states[@]} -gt 0 ] && opts+=(--state "${states[@]}")
        [ -s "$OUT/cohort.json" ] &&
            files+=("$OUT/cohort.json") opts+=(--cohort-size "${COHORT_SIZE:-8}")
        # and in cohorts without member streams (cohort.json's first row; the default, and
        # mps-cohort's cohorts, have them)
        [ -s "$OUT/cohort.json" ] && step grid-plain 30 $B grid "${files[@]}" "${opts[@]}" \
            --no-cohort-streams --json "$OUT/grid-plain.json"
        [ -s "$OUT/cohort.json" ] && [ -s "$OUT/mps-cohort.json" ] &&
            opts+=(--cohort-concurrency "$OUT/mps-cohort.json")
        step grid 30 $B grid "${files[@]}" "${opts[@]}" --json "$OUT/grid.json"
        # and in stacked cohorts (train.cohort_stack), from stack's and stack56's rows
        stacked=()
        for f in stack stack56; do [ -s "$OUT/$f.json" ] && stacked+=("$OUT/$f.json"); done
        [ ${#stacked[@]} -gt 0 ] && step grid-stack 30 $B grid "${files[@]}" "${stacked[@]}" \
            --config config/config.yaml --cohort-size "${COHORT_SIZE:-8}" --cohort-stack \
            --json "$OUT/grid-stack.json" ;;
    # KD uncompiled (train.compile: none), against the compiled default of epochs56: what
    # torch.compile adds on top of the graphs (compiled steps captured as CUDA graphs)
    compile) step compile 150 $B epochs --methods kd --no-reference --train-size 20000 \
        --epochs 1 "${sets[@]}" --set compile=none --json "$OUT/compile.json" ;;
    # KD and vanilla resnet110 -> resnet56 with cuDNN autotuning (the default) and without, each
    # in a process of its own: cuDNN keeps, per process, the algorithm it first chose for each
    # convolution, whatever the switch says later
    cudnn) for b in true false; do
            step "cudnn-$b" 150 $B epochs --no-reference --epochs 1 --methods kd vanilla \
                "${sets[@]}" --set cudnn_benchmark=$b --json "$OUT/cudnn-$b.json"
        done ;;
    # the grid's methods that learn from the teacher on resnet20 one by one, then all of them
    # as one cohort (one teacher pass per batch for all, the recompositions sharing the Tucker
    # decomposition: kdbench.cohort), as the workflow's cohorts train: what they save the grid;
    # then that cohort again with each member on a CUDA stream of its own
    # (train.cohort_streams: the members' kernels side by side); both unstacked (stack: stacked)
    cohort) step cohort 360 $B epochs --pair resnet110:resnet20 --no-reference --epochs 1 \
        --methods "${GRID[@]:1}" --cohort-streams "${sets[@]}" --set cohort_stack=false \
        --json "$OUT/cohort.json" ;;
    # the resnet20 Tucker rows over featuremap with the decomposition's stream at a high
    # priority (train.priority_targets), after the graphs check with it, then without it; three
    # timed epochs (one epoch's rows scatter by up to 0.15 of featuremap's time between runs)
    priority) step graphs-priority 60 $B graphs --set priority_targets=true \
            --json "$OUT/graphs-priority.json"
        on_and_off priority priority_targets featuremap "tucker full-teacher-r32" \
            "tucker_recomp teacher-r32" "tucker_recomp both-r32" ;;
    # the methods' targets made on a host thread of their own (train.targets_thread), so that
    # the decomposition's host synchronisation stops holding up the graphs' launches: the
    # graphs check with it (a cohort too), then the Tucker methods against featuremap on
    # resnet110 -> resnet20 over 3 epochs, with it and without
    thread) step graphs-thread 100 $B graphs --cohort --set cohort_streams=true \
            --set targets_thread=true --json "$OUT/graphs-thread.json"
        on_and_off thread targets_thread featuremap "tucker sample-teacher-r32" \
            "tucker full-teacher-r32" "tucker_recomp teacher-r32" ;;
    # the grid's 7 taught resnet20 methods as one stacked cohort (the default on CUDA), whose
    # full-tensor Tucker members wait for eigh every step, with train.targets_thread and without
    thread-cohort) for on in true false; do
            step "thread-cohort-$on" 240 $B epochs --pair resnet110:resnet20 --no-reference \
                --epochs 1 --methods "${GRID[@]:1}" --cohort-stack --only-cohort "${sets[@]}" \
                --set targets_thread=$on --json "$OUT/thread-cohort-$on.json"
        done ;;
    # 1, 2 and 4 cohorts of the grid's 7 taught resnet20 methods at once under an MPS daemon
    # (each on member streams and stacked, the defaults): does MPS add to what the cohorts save?
    # (`bench grid --cohort-concurrency` takes the file)
    mps-cohort) step mps-cohort 360 $B concurrent --mps --runs 1 2 4 --pair resnet110:resnet20 \
        --train-size 20000 --epochs 1 --cohort "${GRID[@]:1}" "${sets[@]}" \
        --json "$OUT/mps-cohort.json" ;;
    # the two resnet110 -> resnet56 rows of the grid that predate cuDNN autotuning (the fifth
    # session's cohort56.json was cut off before them), with featuremap's as their base, one by
    # one: what `bench grid` needs of them, in about 3 minutes cold on an H200
    recomp56) step recomp56 240 $B epochs --no-reference --epochs 1 --methods featuremap \
        "tucker_recomp student-r32" "tucker_recomp both-r32" "${sets[@]}" \
        --json "$OUT/recomp56.json" ;;
    # the resnet110 teacher's training and vanilla resnet20, the grid's last rows from before
    # cuDNN autotuning (the teacher compiles cold in over 3 minutes; `bench grid` then takes
    # teacher.json beside docs/perf's files)
    teacher) step teacher 330 $B epochs --teachers --no-reference --epochs 1 \
        --pair resnet110:resnet20 --methods vanilla "${sets[@]}" --json "$OUT/teacher.json" ;;
    # the same on resnet110 -> resnet56, the cohort as the settings say (on member streams,
    # stacked on CUDA), the rows the fifth session lost first (its cohort56.json, cut off)
    cohort56) step cohort56 540 $B epochs --no-reference --epochs 1 --methods \
        "tucker_recomp student-r32" "tucker_recomp both-r32" "${GRID[@]:1:5}" --cohort \
        "${sets[@]}" --json "$OUT/cohort56.json" ;;
    # the grid's 7 taught resnet20 methods as one cohort (on member streams, the default), then
    # as one stacked cohort (train.cohort_stack: the 7 students as one network of grouped
    # convolutions), after the graphs check of a stacked cohort; stack56: resnet56's alike (a
    # step of its own: cold, the two together outlast one 10-minute call). The cohorts alone:
    # `bench grid` takes their members' seconds from the files' rows of them (docs/perf's
    # cohort.json and cohort56.json)
    stack) step graphs-stack 100 $B graphs --cohort --set cohort_stack=true \
            --json "$OUT/graphs-stack.json"
        step stack 300 $B epochs --pair resnet110:resnet20 --no-reference --epochs 1 \
            --methods "${GRID[@]:1}" --cohort-stack --only-cohort "${sets[@]}" \
            --json "$OUT/stack.json" ;;
    stack56) step stack56 420 $B epochs --no-reference --epochs 1 --methods "${GRID[@]:1}" \
        --cohort-stack --only-cohort "${sets[@]}" --json "$OUT/stack56.json" ;;
    # what saving the training state after every epoch costs the loop, from the GPU, for one
    # student and a cohort of 8 (the snapshot it waits for; before the background writer, the
    # whole write), on the machine's disk ($STATE_DIR, default a temporary directory)
    state) for arch in resnet20 resnet56; do
            step "state-$arch" 60 $B state --arch "$arch" --students 1 8 \
                ${STATE_DIR:+--dir "$STATE_DIR"} --json "$OUT/state-$arch.json"
        done ;;
    *) echo "measure.sh: unknown step $s" >&2 ;;
    esac
done
