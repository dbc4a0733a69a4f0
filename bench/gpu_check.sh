#!/usr/bin/env bash
# One pass on a lent GPU machine, within about 8.5 minutes (one 10-minute device call): install ptd,
# run the CUDA tests, a short bf16 training run, TRL's GRPO steps (stock vs ptd's kernels vs
# PTDGRPOTrainer), then the CUDA benchmark set (bf16, H=4096, V in {128256, 151936}, N in
# {2048, 8192, 32768}: every op against its peers, TRL 1.16's fused kernels among them, and the
# soft-cap / logit-scale rows) with whatever time is left, and write the JSON, table and plot.
# Not here: the vocabulary-parallel and 2-process trainer runs (one GPU cannot host two NCCL
# ranks; bench/vocab_parallel.py and bench/train_step_time.py measure them on CPU).
#
#   bash bench/gpu_check.sh            # on the GPU machine (results under $OUT, else bench/results/)
#   bash bench/gpu_check.sh --dry      # rehearsal on a CPU machine (or PTD_GPU_DRY=1): nothing is
#                                      # installed, tiny shapes, CUDA-only rows skip, tests are only
#                                      # collected, a 1-step CPU training run, 3 TRL steps on CPU;
#                                      # results under $OUT, else ${TMPDIR:-/tmp}/ptd_gpu_dry
#                                      # (never bench/results/)
#
# Environment: PYTHON (default python3, or python in an active venv), PTD_GPU_BUDGET_S (510),
# PTD_GPU_TEST_S (cap on the tests, 120), PTD_GPU_TRAIN_S (cap on the training run, 75),
# PTD_GPU_TRL_S (cap on the TRL steps, 75), PTD_WHEELS (a folder of wheels for an offline machine,
# default .whl), and the PTD_BENCH_* variables of bench/conftest.py (PTD_BENCH_SHAPES narrows the
# shape set).
#
# The lent GPU machines of this workplace (Python 3.12) have CUDA torch, triton, transformers,
# accelerate, pandas, pyarrow, pytest and pytest-benchmark but no registry, and neither
# liger-kernel, cut-cross-entropy, trl nor trl's datasets (with dill and multiprocess). All are
# pure-Python wheels; carry them (from the repository root, here):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
#       multiprocess==0.70.19
# then run this script there with .whl carried (device tool: carry=[".whl"], timeout_s=590).
# Without them their rows skip (and the TRL steps are skipped). datasets 5.2 needs pyarrow >= 24.
# Files written (at most 8, flat, as the device tool brings back): gpu_check.log, tests.log,
# <label>.json, <label>.md, <label>.png, train.log, train_metrics.jsonl, trl_step_time-cuda.json.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=${PTD_GPU_DRY:-0}
[[ "${1:-}" == "--dry" ]] && DRY=1
START=$(date +%s)
BUDGET=${PTD_GPU_BUDGET_S:-510}
if [[ -n "${OUT:-}" ]]; then
    OUT_DIR=$OUT
elif [[ "$DRY" == 1 ]]; then
    OUT_DIR=${TMPDIR:-/tmp}/ptd_gpu_dry
else
    OUT_DIR=$ROOT/bench/results
fi
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then PY=python
else PY=python3
fi
export PYTHONUNBUFFERED=1

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(elapsed))); }
phase() { echo; echo "== [$(elapsed)s] $*"; }
STATUS=0

phase "environment (dry=$DRY, out=$OUT_DIR)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
uptime
$PY - <<'EOF'
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
EOF
HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
if [[ "$DRY" != 1 && "$HAS_CUDA" != 1 ]]; then
    echo "no CUDA device here: run with --dry (PTD_GPU_DRY=1) for the CPU rehearsal"
    exit 2
fi
unset TRITON_INTERPRET

phase "install"
if [[ "$DRY" == 1 ]]; then
    echo "dry: skipping 'pip install -e .[dev]' (the project is used as it is installed here)"
else
    WHEELS=${PTD_WHEELS:-.whl}
    if [[ -d "$WHEELS" ]] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        # Offline machine: carried wheels (pure-Python peers), never touching its CUDA torch.
        $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || echo "wheels from $WHEELS: install failed"
    fi
    # Everything ptd needs already there (the GPU image plus carried wheels): install ptd alone,
    # offline. Else the README's route (keeps a CUDA torch that satisfies torch<2.14), capped, and
    # without dependencies if the registry cannot be reached.
    if $PY -c "import torch, triton, transformers, liger_kernel, numpy, matplotlib, tqdm, pytest, pytest_benchmark" \
            2>/dev/null; then
        echo "dependencies present: pip install --no-deps --no-build-isolation -e ."
        $PY -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    elif ! timeout 150 $PY -m pip install -q --retries 1 --timeout 10 -e ".[dev]"; then
        echo "pip install -e .[dev] failed (offline?): installing without dependencies"
        $PY -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
$PY - <<'EOF'
import importlib
for name in ("ptd_kernels", "ptd_train", "triton", "liger_kernel", "cut_cross_entropy", "pytest_benchmark", "trl",
             "trl.kernels.chunked_divergence"):
    try:
        module = importlib.import_module(name)
        print(f"  {name}: {getattr(module, '__version__', 'ok')}")
    except Exception as exc:  # a missing peer skips its rows
        print(f"  {name}: MISSING ({type(exc).__name__}: {exc})")
EOF

phase "tests"
# CUDA-marked tests when there are any, else the whole suite (no interpreter: Triton runs on the GPU).
if $PY -m pytest tests -m cuda --collect-only -q -p no:cacheprovider 2>/dev/null | grep -q "::"; then
    TEST_ARGS=(tests -m cuda)
else
    TEST_ARGS=(tests)
fi
if [[ "$DRY" == 1 ]]; then
    echo "dry: collecting only: pytest ${TEST_ARGS[*]}"
    $PY -m pytest "${TEST_ARGS[@]}" --collect-only -q -p no:cacheprovider >"$OUT_DIR/tests.log" 2>&1
    tail -n 3 "$OUT_DIR/tests.log"
else
    TEST_S=${PTD_GPU_TEST_S:-120}
    echo "pytest ${TEST_ARGS[*]} (at most ${TEST_S}s)"
    timeout "$TEST_S" $PY -m pytest "${TEST_ARGS[@]}" -q -p no:cacheprovider -rfE --durations=5 \
        >"$OUT_DIR/tests.log" 2>&1
    rc=$?
    [[ $rc == 124 ]] && echo "tests: stopped at the ${TEST_S}s cap (see tests.log)"
    [[ $rc != 0 ]] && STATUS=1
    tail -n 15 "$OUT_DIR/tests.log"
fi

phase "training run"
if $PY -m ptd_train.run --help 2>/dev/null | grep -q -- "--max_steps"; then
    TRAIN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/ptd_train.XXXXXX")
    if [[ "$DRY" == 1 ]]; then STEPS=1; DEV=cpu; else STEPS=5; DEV=cuda; fi
    TRAIN_ARGS=(--max_steps "$STEPS" --device "$DEV" --warmstart_max_steps 0 --eval_size 8 --no_progress
                --output_dir "$TRAIN_DIR")
    echo "python -m ptd_train.run ${TRAIN_ARGS[*]} (at most ${PTD_GPU_TRAIN_S:-75}s)"
    timeout "${PTD_GPU_TRAIN_S:-75}" $PY -m ptd_train.run "${TRAIN_ARGS[@]}" >"$OUT_DIR/train.log" 2>&1
    rc=$?
    tail -n 8 "$OUT_DIR/train.log"
    [[ -f "$TRAIN_DIR/metrics.jsonl" ]] && cp "$TRAIN_DIR/metrics.jsonl" "$OUT_DIR/train_metrics.jsonl"
    [[ $rc != 0 ]] && { echo "training run: exit $rc"; STATUS=1; }
    rm -rf "$TRAIN_DIR"
else
    echo "ptd_train.run has no --max_steps: skipped"
fi

phase "TRL integration steps"
if $PY -c "import trl.kernels.chunked_divergence, datasets" 2>/dev/null; then
    if [[ "$DRY" == 1 ]]; then TRL_ARGS=(--device cpu --reps 1 --steps 3); else TRL_ARGS=(--device cuda --reps 1 --steps 8); fi
    TRL_TMP=$(mktemp -d "${TMPDIR:-/tmp}/ptd_trl.XXXXXX")
    echo "python bench/trl_step_time.py ${TRL_ARGS[*]} (at most ${PTD_GPU_TRL_S:-75}s)"
    timeout "${PTD_GPU_TRL_S:-75}" $PY bench/trl_step_time.py "${TRL_ARGS[@]}" --out "$TRL_TMP" >"$TRL_TMP/log" 2>&1
    rc=$?
    grep -v -i "warn" "$TRL_TMP/log" | tail -n 8
    cp "$TRL_TMP"/trl_step_time*.json "$OUT_DIR/" 2>/dev/null
    [[ $rc != 0 ]] && { echo "TRL steps: exit $rc"; STATUS=1; }
    rm -rf "$TRL_TMP"
else
    echo "trl (with datasets) not importable: skipped (carry the wheels, see the top of this script)"
fi

phase "benchmarks"
if [[ "$DRY" == 1 ]]; then
    # Two tiny shapes (two N, so the plot has lines), the CUDA set's logic otherwise.
    export PTD_BENCH_SHAPES=${PTD_BENCH_SHAPES:-"256,64,2048;512,64,2048"}
    export PTD_BENCH_SCALING=0 PTD_BENCH_LABEL=${PTD_BENCH_LABEL:-cpu-dry}
fi
LABEL=$($PY -c "import sys; sys.path.insert(0, 'bench'); import conftest; print(conftest.LABEL)")
# What is left of the budget, less the report's share and a margin for the last row started in time.
REPORT_RESERVE=45
export PTD_BENCH_BUDGET_S=${PTD_BENCH_BUDGET_S:-$(( $(left) - REPORT_RESERVE ))}
if (( PTD_BENCH_BUDGET_S < 30 )); then PTD_BENCH_BUDGET_S=30; fi
echo "label $LABEL, benchmark budget ${PTD_BENCH_BUDGET_S}s (rows that would start later are recorded 'not run')"
# The per-row budget is enforced inside the session; the hard cap only guards against a hang.
timeout $((PTD_BENCH_BUDGET_S + 120)) $PY -m pytest bench --benchmark-only -q -p no:cacheprovider -rs \
    --benchmark-json "$OUT_DIR/$LABEL.json" --benchmark-columns=median,rounds --benchmark-sort=name
rc=$?
[[ $rc != 0 ]] && { echo "benchmarks: pytest exit $rc"; STATUS=1; }

phase "report"
if [[ -f "$OUT_DIR/$LABEL.json" ]]; then
    $PY bench/report.py "$OUT_DIR/$LABEL.json" --out-dir "$OUT_DIR" && sed -n '/^## Targets/,/^## All rows/p' "$OUT_DIR/$LABEL.md"
else
    echo "no benchmark JSON"; STATUS=1
fi

phase "done in $(elapsed)s (budget ${BUDGET}s), status $STATUS; files in $OUT_DIR:"
ls -la "$OUT_DIR"
exit $STATUS
