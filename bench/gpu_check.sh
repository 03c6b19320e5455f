#!/usr/bin/env bash
# One GPU run, about 8 minutes on one H100: CUDA tests, then the SD 1.5-architecture comparison of every available
# method at batch 1 and 4, then the TI ablations and torch.compile, then the SDXL-architecture comparison at 1024 px,
# then one table. Everything lands in $OUT (or /tmp/tea-gpu-check when OUT is unset): gpu_check.log, pytest.txt,
# bench.jsonl, summary.md.
#
# Before the run, where pip can reach PyPI (the GPU machine cannot): bash bench/gpu_wheels.sh   (fills .whl/)
# The run, from the repository root:                                  bash bench/gpu_check.sh   (carry: .whl)
#
# Each stage has its own timeout and the whole script a deadline (BUDGET_S, default 480 s): a stage that fails or
# times out is recorded and the next one runs; stages that no longer fit are reported as skipped.
# Overrides for a dry run on a CPU machine: ARCH=tiny XL_ARCH=tiny-sdxl STEPS=2 BATCHES=1 ALLOW_CPU=1 PYTHON=.venv/bin/python
# SDXL only (its own session, about 8 minutes; building and saving the random SDXL weights takes 1-2 of them): ONLY=sdxl
# (also: XL_METHODS="ti lora" to leave Custom Diffusion out, XL_STEPS for the timed steps)
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/tea-gpu-check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

PYTHON="${PYTHON:-python3}"
ARCH="${ARCH:-sd15}"
XL_ARCH="${XL_ARCH:-sdxl}"
ONLY="${ONLY:-}"
STEPS="${STEPS:-30}"
BATCHES="${BATCHES:-1 4}"
BUDGET_S="${BUDGET_S:-480}"
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BENCH=("$PYTHON" bench/train_step.py --arch "$ARCH" --cache-dir /tmp/tea-bench-cache --json "$OUT/bench.jsonl")
XL_BENCH=("$PYTHON" bench/train_step.py --arch "$XL_ARCH" --cache-dir /tmp/tea-bench-cache --json "$OUT/bench.jsonl")
STATUS=()

stage() {  # stage NAME MAX_SECONDS COMMAND...: run with the smaller of MAX_SECONDS and the time left
  local name=$1 max=$2 left rc=0
  shift 2
  left=$((DEADLINE - SECONDS))
  if ((left < 20)); then
    echo "=== $name: SKIPPED (only ${left}s left of ${BUDGET_S}s)"
    STATUS+=("$name: skipped, no time left")
    return 0
  fi
  if ((max > left)); then max=$left; fi
  echo "=== $name (timeout ${max}s, $((SECONDS))s elapsed)"
  timeout -k 10 "$max" "$@" || rc=$?
  case $rc in
    0) STATUS+=("$name: ok") ;;
    124 | 137) STATUS+=("$name: TIMED OUT after ${max}s") ;;
    *) STATUS+=("$name: FAILED (exit $rc)") ;;
  esac
  return 0
}

echo "=== environment ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PYTHON" - <<'EOF'
import importlib
for name in ("torch", "lightning", "diffusers", "transformers", "peft", "xformers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as error:
        print(name, "MISSING", error)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && [ -z "${ALLOW_CPU:-}" ]; then
  echo "No CUDA device: this script is for a GPU machine (ALLOW_CPU=1 for a dry run)."
  exit 2
fi
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
  echo "diffusers is missing: run bash bench/gpu_wheels.sh where pip works, and carry .whl."
  exit 2
fi

stage "cuda tests" 150 bash -c "set -o pipefail; $PYTHON -m pytest tests/test_speed_cuda.py -q -rs -p no:cacheprovider \
  2>&1 | tee '$OUT/pytest.txt'"

if [ "$ONLY" != sdxl ]; then
  # ours vs reference, TI first: it is the method that exists on every branch.
  read -r -a batches <<<"$BATCHES"
  for method in ti lora cd; do
    stage "compare $method" 110 "${BENCH[@]}" --method "$method" --batch "${batches[@]}" --steps "$STEPS" --warmup 5
  done

  # each speed-up off (or on, for the opt-in ones), side by side with the defaults
  stage "ablate ti" 120 "${BENCH[@]}" --method ti --batch 1 --steps 20 --warmup 5 --ablate --no-reference

  # torch.compile: the load + warm-up column holds the compile time, steps/s the steady speed
  stage "compile ti" 150 "${BENCH[@]}" --method ti --batch 1 --steps 20 --warmup 10 --no-reference \
    --variant compile_unet=default --variant compile_unet=reduce-overhead
fi

# SDXL's architecture (random weights) at 1024 px, batch 1: ours vs the reference SDXL scripts. The random weights
# are built and saved once (fp16, 7 GB) in their own stage, so a timeout there is not charged to a comparison.
stage "sdxl weights" 240 "$PYTHON" -c "from pathlib import Path; from bench.models import model_folder; \
print(model_folder('$XL_ARCH', Path('/tmp/tea-bench-cache')))"
for method in ${XL_METHODS:-ti lora cd}; do
  stage "compare sdxl $method" 150 "${XL_BENCH[@]}" --method "$method" --batch 1 --steps "${XL_STEPS:-9}" --warmup 3
done

echo "=== summary"
if [ -s "$OUT/bench.jsonl" ]; then
  "$PYTHON" bench/train_step.py --summarize "$OUT/bench.jsonl" | tee "$OUT/summary.md"
fi
printf '%s\n' "${STATUS[@]}" | tee -a "$OUT/summary.md"
echo "total ${SECONDS}s"
