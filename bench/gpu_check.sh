#!/usr/bin/env bash
# One device call on a lent GPU that measures everything and cannot waste itself: at most ~9 minutes of
# work (PTD_GPU_BUDGET_S, 540 s) inside a 10-minute call, in this order:
#
#   1. environment  GPU, driver, versions, the carried wheels installed (offline), and the work model's two
#                   ceilings measured in a few seconds (bf16 GEMM TFLOP/s, copy GB/s)
#   2. tier         the CUDA correctness tier (bench/cuda_tier.py): every public function x bf16/fp32 x every
#                   backend that runs on CUDA, against ptd_kernels.reference on the GPU, values and
#                   gradients, awkward shapes; <= 90 s, worker processes, a hung or crashed case recorded
#   3. train        python -m ptd_train.run, a few bf16 steps on each CUDA backend (triton, cublas)
#   4. trl          bench/trl_step_time.py: stock GRPOTrainer vs ptd's kernels vs PTDGRPOTrainer
#   5. bench        pytest bench: both ptd CUDA paths, the one-sweep loss, the peers and the GEMM floor, the
#                   target shape (N=8192, H=4096, V=151936) first, then V=128256 and other N as time allows
#   6. report       <label>.json (for bench/results/) and <label>.md: measured times beside the work model's
#                   predictions, auto's pick against the faster backend, working memory, the tier, the steps
#
# Every result is written as it is produced: JSON lines appended and flushed per case and per row (the
# tier's and the benchmarks' journals), the TRL JSON after each trainer, so a hang or a time-out loses only
# what was in flight. Each phase runs under `timeout`; the tier has a per-case watchdog and the benchmarks a
# per-row one (a row that hangs, or an error that breaks the CUDA context, is recorded and a fresh process
# resumes after the rows in the journal). The report needs no matplotlib.
#
#   bash bench/gpu_check.sh           # on the GPU machine: files under $OUT (else bench/results/)
#   bash bench/gpu_check.sh --dry     # rehearsal on a CPU (or PTD_GPU_DRY=1): the same phases, the tier
#                                     # under Triton's interpreter, tiny shapes, CPU training and TRL steps,
#                                     # a hang and a broken CUDA context injected into the tier and the
#                                     # benchmarks to prove the watchdogs; the carried wheels checked
#                                     # against the lent image; files under $OUT, else
#                                     # ${TMPDIR:-/tmp}/ptd_gpu_dry (never bench/results/)
#
# Files (at most 8, flat; <label> is the GPU's name, e.g. nvidia-h100-80gb-hbm3; commit them to
# bench/results/ and run `python bench/report.py --docs`):
#   <label>-check.log     this console output (every phase's summary and the logs' tails)
#   <label>-env.json      the environment and the measured ceilings
#   <label>-tier.jsonl    the correctness tier, one line per case
#   <label>-train.jsonl   the training steps' metrics (one line per step, with its backend)
#   <label>-trl_steps.json  the TRL step times
#   <label>.jsonl         the benchmark journal, one line per row as it finished
#   <label>.json          the same rows as pytest-benchmark JSON (what bench/results/ keeps)
#   <label>.md            the report
#
# Offline wheels. The lent machines (Python 3.12, torch 2.11, triton 3.6, transformers 5.17, pytest and
# pytest-benchmark) reach no registry and lack the peers and TRL's stack. All are pure Python; download them
# once, here, from the repository root, into the folder .whl (.gitignore leaves it out of the repository):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# (bench/gpu_env.py holds the list: `python bench/gpu_env.py download-command`), then run there with .whl
# carried (device tool: carry=[".whl"], timeout_s=600). Without them their rows skip and the TRL phase is
# skipped; `--dry` says which are missing. datasets 5.2 needs pyarrow >= 24 there (the environment phase
# checks every requirement of the carried wheels against what is installed).
#
# Environment: PYTHON (default python3, or python in an active venv); PTD_GPU_BUDGET_S (540);
# PTD_GPU_PHASES (default "env tier train trl bench report"); PTD_GPU_TIER_S (90); PTD_GPU_TIER_ARGS (more
# arguments of bench/cuda_tier.py, e.g. "--match linear_jsd"); PTD_GPU_TRAIN_S (cap on each training run,
# 45); PTD_GPU_TRL_S (75); PTD_GPU_BENCH_ARGS (what pytest runs, default bench); PTD_GPU_ROW_TIMEOUT_S (a
# benchmark row's watchdog, 90);
# PTD_GPU_RESUME=1 (keep the journals already in the output folder and run only what they lack: a second
# call that completes a first, with the first's files carried back into its output folder); PTD_WHEELS
# (.whl); and the PTD_BENCH_* variables of bench/conftest.py (PTD_BENCH_SHAPES narrows the shapes).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=${PTD_GPU_DRY:-0}
[[ "${1:-}" == "--dry" ]] && DRY=1
START=$(date +%s)
BUDGET=${PTD_GPU_BUDGET_S:-540}
DEADLINE=$((START + BUDGET))
PHASES=" ${PTD_GPU_PHASES:-env tier train trl bench report} "
WHEELS=${PTD_WHEELS:-.whl}
if [[ -n "${OUT:-}" ]]; then
    OUT_DIR=$OUT
elif [[ "$DRY" == 1 ]]; then
    OUT_DIR=${TMPDIR:-/tmp}/ptd_gpu_dry
else
    OUT_DIR=$ROOT/bench/results
fi
mkdir -p "$OUT_DIR"

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then PY=python
else PY=python3
fi
export PYTHONUNBUFFERED=1
# ptd runs from this tree (no install: nothing is written into the repository, no build backend needed)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET

if [[ "$DRY" == 1 ]]; then
    LABEL=${PTD_BENCH_LABEL:-cpu-dry}
else
    LABEL=${PTD_BENCH_LABEL:-$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))" 2>/dev/null || echo gpu)}
fi
export PTD_BENCH_LABEL=$LABEL
LOG=$OUT_DIR/$LABEL-check.log
ENV_JSON=$OUT_DIR/$LABEL-env.json
TIER=$OUT_DIR/$LABEL-tier.jsonl
TRAIN=$OUT_DIR/$LABEL-train.jsonl
TRL_JSON=$OUT_DIR/$LABEL-trl_steps.json
JOURNAL=$OUT_DIR/$LABEL.jsonl
if [[ "${PTD_GPU_RESUME:-0}" != 1 ]]; then
    rm -f "$LOG" "$ENV_JSON" "$TIER" "$TRAIN" "$TRL_JSON" "$JOURNAL" "$OUT_DIR/$LABEL.json" "$OUT_DIR/$LABEL.md"
fi
exec > >(tee -a "$LOG") 2>&1

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((DEADLINE - $(date +%s))); }
phase() { echo; echo "== [$(elapsed)s, $(left)s left] $*"; }
wanted() { [[ "$PHASES" == *" $1 "* ]]; }
# cap SECONDS: the smaller of SECONDS and what is left of the budget less RESERVE (default 0)
cap() { local c=$1 l; l=$(( $(left) - ${2:-0} )); (( l < c )) && c=$l; (( c < 1 )) && c=1; echo $c; }
STATUS=0

phase "gpu check: label $LABEL, dry=$DRY, budget ${BUDGET}s, out $OUT_DIR, phases:$PHASES"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
uptime
HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "$DRY" != 1 && "$HAS_CUDA" != 1 ]]; then
    echo "no CUDA device here: run with --dry (PTD_GPU_DRY=1) for the CPU rehearsal"
    exit 2
fi
DEVICE=cuda; [[ "$DRY" == 1 ]] && DEVICE=cpu

# ----------------------------------------------------------------------------- 1. environment
if wanted env; then
    phase "environment: wheels, versions, ceilings"
    if [[ "$DRY" == 1 ]]; then
        echo "dry: the wheels in $WHEELS/ checked against the lent image as described (nothing installed)"
        $PY bench/gpu_env.py wheels --dir "$WHEELS" --against image || echo "(dry: carry what is missing)"
    elif ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        SITE=${TMPDIR:-/tmp}/ptd_site
        timeout "$(cap 60)" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl && export PYTHONPATH=$PYTHONPATH:$SITE \
            || echo "wheels from $WHEELS: install failed"
        $PY bench/gpu_env.py wheels --dir "$WHEELS" --against installed || echo "(some requirement is not met)"
    else
        echo "no wheels in $WHEELS/: the peers' rows and the TRL phase will skip (see the top of this script)"
    fi
    timeout "$(cap 60)" $PY bench/gpu_env.py report --out "$ENV_JSON" --device $DEVICE || { echo "environment: failed"; STATUS=1; }
fi

# ----------------------------------------------------------------------------- 2. correctness tier
if wanted tier; then
    TIER_S=$(cap "${PTD_GPU_TIER_S:-90}" 60)
    phase "CUDA correctness tier (at most ${TIER_S}s)"
    TIER_ARGS=(--device $DEVICE --out "$TIER" --budget-s "$TIER_S")
    if [[ "$DRY" == 1 ]]; then
        # rehearse the watchdog: one case hangs, and its worker is replaced
        TIER_ARGS+=(--workers 3 --case-timeout-s 15)
        export PTD_TIER_FAULT=${PTD_TIER_FAULT-hang:linear_jsd-torch-fp32-main}
    else
        TIER_ARGS+=(--workers 6 --case-timeout-s 60)
    fi
    # shellcheck disable=SC2206  # PTD_GPU_TIER_ARGS: more arguments, e.g. "--match linear_jsd"
    TIER_ARGS+=(${PTD_GPU_TIER_ARGS:-})
    [[ "${PTD_GPU_RESUME:-0}" == 1 && -f "$TIER" ]] && echo "resume: the tier runs again (its journal gains a second pass)"
    timeout $((TIER_S + 30)) $PY bench/cuda_tier.py "${TIER_ARGS[@]}"
    rc=$?
    unset PTD_TIER_FAULT
    [[ $rc != 0 ]] && { echo "tier: exit $rc"; STATUS=1; }
fi

# ----------------------------------------------------------------------------- 3. training steps
if wanted train; then
    phase "training steps (python -m ptd_train.run, bf16 autocast on CUDA)"
    if [[ "$DRY" == 1 ]]; then RUNS=(torch); STEPS=1; else RUNS=(triton cublas); STEPS=6; fi
    for BACKEND in "${RUNS[@]}"; do
        RUN_S=$(cap "${PTD_GPU_TRAIN_S:-45}" 300)
        if (( RUN_S < 15 )); then echo "training ($BACKEND): skipped, too little time left"; continue; fi
        RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/ptd_train.XXXXXX")
        ARGS=(--max_steps $STEPS --device $DEVICE --backend "$BACKEND" --warmstart false --eval_size 0 --no_progress
              --no_plot --save_steps 0 --output_dir "$RUN_DIR")
        echo "python -m ptd_train.run ${ARGS[*]} (at most ${RUN_S}s)"
        timeout "$RUN_S" $PY -m ptd_train.run "${ARGS[@]}" >"$RUN_DIR.log" 2>&1
        rc=$?
        tail -n 4 "$RUN_DIR.log"
        if [[ -f "$RUN_DIR/metrics.jsonl" ]]; then
            $PY -c "import json, sys
for line in open(sys.argv[1]):
    print(json.dumps({'backend': sys.argv[2], **json.loads(line)}))" "$RUN_DIR/metrics.jsonl" "$BACKEND" >>"$TRAIN"
        fi
        [[ $rc != 0 ]] && { echo "training ($BACKEND): exit $rc"; tail -n 20 "$RUN_DIR.log"; STATUS=1; }
        rm -rf "$RUN_DIR" "$RUN_DIR.log"
    done
fi

# ----------------------------------------------------------------------------- 4. TRL steps
if wanted trl; then
    phase "TRL steps (bench/trl_step_time.py)"
    TRL_S=$(cap "${PTD_GPU_TRL_S:-75}" 240)
    if ! $PY -c "import trl.kernels.chunked_divergence, datasets" 2>/dev/null; then
        echo "trl (with datasets) not importable: skipped (carry the wheels, see the top of this script)"
    elif (( TRL_S < 20 )); then
        echo "skipped: too little time left"
    else
        if [[ "$DRY" == 1 ]]; then TRL_ARGS=(--device cpu --reps 1 --steps 3); else TRL_ARGS=(--device cuda --reps 1 --steps 8); fi
        TRL_TMP=$(mktemp -d "${TMPDIR:-/tmp}/ptd_trl.XXXXXX")
        echo "python bench/trl_step_time.py ${TRL_ARGS[*]} (at most ${TRL_S}s)"
        timeout "$TRL_S" $PY bench/trl_step_time.py "${TRL_ARGS[@]}" --json "$TRL_JSON" >"$TRL_TMP/log" 2>&1
        rc=$?
        grep -v -i "warn" "$TRL_TMP/log" | tail -n 8
        [[ $rc != 0 ]] && { echo "TRL steps: exit $rc"; STATUS=1; }
        rm -rf "$TRL_TMP"
    fi
fi

# ----------------------------------------------------------------------------- 5. benchmarks
REPORT_RESERVE=30
if wanted bench; then
    phase "benchmarks (pytest bench)"
    if [[ "$DRY" == 1 ]]; then
        # Two tiny shapes (two N, so the plot has lines), the CUDA set's logic otherwise; one row hangs and
        # one breaks its "CUDA context", to prove the watchdog and the resumption.
        export PTD_BENCH_SHAPES=${PTD_BENCH_SHAPES:-"256,64,2048;512,64,2048"}
        export PTD_BENCH_SCALING=0
        export PTD_BENCH_FAULT=${PTD_BENCH_FAULT-hang:test_eager_jsd[N256}
        ROW_TIMEOUT=${PTD_GPU_ROW_TIMEOUT_S:-20}
    else
        export PTD_BENCH_ROW_S=${PTD_BENCH_ROW_S:-2}
        ROW_TIMEOUT=${PTD_GPU_ROW_TIMEOUT_S:-90}
    fi
    # Rows that would start in the last LAST_ROW seconds before the report's reserve are recorded 'not run'
    # (a GPU row takes seconds); the hard cap ends the session at the reserve whatever runs then, so the
    # report always has its time (the row in flight is the only one lost).
    LAST_ROW=15
    export PTD_BENCH_JOURNAL=$JOURNAL PTD_BENCH_RESUME=1 PTD_BENCH_ROW_TIMEOUT_S=$ROW_TIMEOUT
    export PTD_BENCH_DEADLINE=$((DEADLINE - REPORT_RESERVE - LAST_ROW)) PTD_BENCH_ENV=$ENV_JSON
    echo "journal $JOURNAL; rows that would start after $((BUDGET - REPORT_RESERVE - LAST_ROW))s are recorded" \
         "'not run'; a row is stopped after ${ROW_TIMEOUT}s; the session at $((BUDGET - REPORT_RESERVE))s"
    # shellcheck disable=SC2206  # PTD_GPU_BENCH_ARGS: what pytest runs instead of the whole of bench/
    BENCH_ARGS=(${PTD_GPU_BENCH_ARGS:-bench})
    for attempt in 1 2 3 4 5 6; do
        HARD=$(( $(left) - REPORT_RESERVE ))
        (( HARD < 20 )) && break
        (( attempt > 1 )) && echo "-- resuming in a fresh process (attempt $attempt, $(left)s left)"
        timeout "$HARD" $PY -m pytest "${BENCH_ARGS[@]}" --benchmark-only -q -p no:cacheprovider -rs \
            --benchmark-columns=median,rounds --benchmark-sort=name
        rc=$?
        if [[ $rc == 75 || $rc == 76 ]]; then
            [[ $rc == 75 ]] && echo "a row hung: recorded as a timeout" || echo "a row broke the CUDA context: recorded"
            if [[ "$DRY" == 1 && $attempt == 1 ]]; then
                export PTD_BENCH_FAULT="cuda_error:test_eager_jsd[N512"
            else
                unset PTD_BENCH_FAULT
            fi
            continue
        fi
        [[ $rc == 124 ]] && echo "benchmarks: stopped at the hard cap (${HARD}s)"
        [[ $rc == 5 ]] && { echo "benchmarks: every row is in the journal already"; rc=0; }
        [[ $rc != 0 ]] && { echo "benchmarks: pytest exit $rc"; STATUS=1; }
        break
    done
    unset PTD_BENCH_FAULT
fi

# ----------------------------------------------------------------------------- 6. report
if wanted report; then
    phase "report"
    if [[ -f "$JOURNAL" ]]; then
        timeout "$(cap 60 -60)" $PY bench/report.py "$JOURNAL" --out-dir "$OUT_DIR" --json-out "$OUT_DIR/$LABEL.json" \
            --no-plots || { echo "report: failed"; STATUS=1; }
        if [[ -f "$OUT_DIR/$LABEL.md" ]]; then
            # the sections a reader needs first (the tail of this output is what the device tool returns)
            sed -n '/^## Targets/,/^## All rows/p' "$OUT_DIR/$LABEL.md" | grep -v "^## All rows" | head -n 150
        fi
    else
        echo "no benchmark journal"; STATUS=1
    fi
    [[ -f "$TIER" ]] && $PY -c "import sys; sys.path.insert(0, 'bench'); import cuda_tier; print(cuda_tier.summary(sys.argv[1]))" "$TIER"
fi

phase "done in $(elapsed)s (budget ${BUDGET}s), status $STATUS; files in $OUT_DIR:"
ls -la "$OUT_DIR"
COUNT=$(find "$OUT_DIR" -type f | wc -l)
(( COUNT > 8 )) && echo "note: $COUNT files in $OUT_DIR; the device tool brings back 8"
exit $STATUS
