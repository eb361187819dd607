#!/usr/bin/env bash
# Claim: bigbatch's GPU path works on one GPU and is as fast as a bare PyTorch loop.
#
# One prepared run, <= 9 minutes on one H100/H200, everything under one output folder, one JSON
# summary on stdout (also OUT/summary.json). The checks, in order:
#   pytest_gpu          tests/gpu and every other test marked gpu (NCCL + bf16/fp16, DALI sharding)
#   allreduce_1rank     `bigbatch bench allreduce --backend nccl --nproc 1`, every algorithm, correct sums
#   throughput          ResNet-50, synthetic 224 px images, bf16 autocast, channels_last: img/s of a
#                       bare PyTorch loop vs bigbatch's loop vs `bigbatch train --nproc 1` (DDP over
#                       NCCL, one rank); FLOPs per example, MFU, bigbatch's step-time breakdown
#   fp16_scaler         300 steps of fp16 autocast with the grad scaler (MNIST-1D CNN): finite losses,
#                       the loss falls, the run completes
#   dali                the DALI GPU pipeline (nvJPEG) training on a generated JPEG folder, if DALI imports
#   optimizer_step      LARS / LARC / LAMB step time vs torch's foreach SGD / AdamW on ResNet-50's parameters
#   input_pipeline      images/s at 224 px: torchvision's bare loop, bigbatch's torch backend, DALI with CPU
#                       operators and DALI on the GPU (nvJPEG), at 1 and 4 worker threads
#   throughput_compile  the same bare vs bigbatch with torch.compile (last: the slowest step)
# Targets reported (not pass/fail): bigbatch >= 0.98x the bare loop; ResNet-50 bf16 >= 3,000 img/s;
# LARS/LAMB <= 1.5x the foreach step; input backends >= 0.9x the bare loop, DALI >= 1.0x torch.
#
# --cpu-smoke runs the same steps tiny on the CPU (ResNet-18 at 32 px, gloo instead of NCCL, bf16
# instead of fp16, torch.compile's eager backend, DALI expected to refuse without a GPU); the test
# suite runs it (tests/gpu/test_gpu_check.py) so the script cannot rot.
#
#   benchmarks/gpu_check.sh [--cpu-smoke] [--out DIR] [--budget SECONDS]
#   exit 0: every check passed (or was skipped for a stated reason); 1: a check failed; 2: bad arguments
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
OUT=""
BUDGET=540
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=cpu-smoke ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: error: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift ;;
    --budget) [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: error: --budget: expected seconds, got '${2:-}'" >&2; exit 2; }
              BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$1'; expected --cpu-smoke, --out DIR or --budget SECONDS" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "gpu_check.sh: error: --out: '$OUT' exists and is not empty" >&2
  exit 2
fi
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export BIGBATCH_CACHE="${BIGBATCH_CACHE:-$OUT/cache}"  # generated datasets
DEADLINE=$((SECONDS + BUDGET))

# step NAME SECONDS CMD...: run CMD with its output in OUT/logs/NAME.log, bounded by SECONDS and by
# what is left of the budget; its exit code and duration go to OUT/steps.tsv.
step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE)) left=$((DEADLINE - SECONDS)) t0=$SECONDS rc
  shift 2
  if [ "$left" -lt 15 ]; then
    printf '%s\tbudget\t0\n' "$name" >> "$OUT/steps.tsv"
    echo "gpu_check: $name skipped: the ${BUDGET}s budget is spent" >&2
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu_check: $name (at most ${limit}s)" >&2
  timeout --kill-after=15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  echo "gpu_check: $name exit $rc after $((SECONDS - t0))s" >&2
}

LIMIT_SCALE=1
if [ "$MODE" = gpu ]; then
  BACKEND=nccl AMP16=fp16 COMPILE_BACKEND=inductor
  THROUGHPUT=(--model resnet50 --image-size 224 --batch 256 --steps 100 --warmup 20 --log-every 10 --samples 2048)
  FP16_STEPS=300 FP16_SAMPLES=10000 DALI_STEPS=30 ALLREDUCE=(--sizes 8,1M,64M --iters 10 --warmup 3)
  OPTIM=(--device cuda --repeats 7 --steps 9)
  INPUT=(--device cuda --threads 1,4 --repeats 3 --images 512 --batches 6)
  command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
else
  BACKEND=gloo AMP16=bf16 COMPILE_BACKEND=eager
  THROUGHPUT=(--device cpu --model resnet18 --image-size 16 --batch 4 --steps 6 --warmup 2 --log-every 2 --samples 32)
  FP16_STEPS=30 FP16_SAMPLES=2000 DALI_STEPS=2 ALLREDUCE=(--sizes 8,64K --iters 3 --warmup 1)
  OPTIM=(--device cpu --model resnet18 --repeats 1 --steps 1 --warmup 1)
  INPUT=(--threads 1 --repeats 1 --images 16 --batch 4 --warmup 1 --batches 1)
  # one thread per process: on a shared CPU two OpenMP threads spin-wait on each other (10x slower here)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  LIMIT_SCALE=4  # a shared CPU is slow by a varying factor: only --budget bounds the smoke run
fi
THROUGHPUT+=(--compile-backend "$COMPILE_BACKEND")
# no peak table entry for a CPU: a nominal 0.1 TFLOP/s (2 cores x AVX2 FMA, roughly) exercises the MFU path
[ "$MODE" = cpu-smoke ] && THROUGHPUT+=(--peak-tflops 0.1)

mapfile -t GPU_TEST_FILES < <(grep -rl --include='test_*.py' 'mark.gpu' tests | sort)
step pytest_gpu 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" "${GPU_TEST_FILES[@]}"

step allreduce_1rank 60 "$PY" -m bigbatch bench allreduce --backend "$BACKEND" --nproc 1 --algo all "${ALLREDUCE[@]}" \
  --json "$OUT/allreduce.jsonl" --plot "$OUT/allreduce-busbw.png"

step throughput 150 "$PY" benchmarks/gpu_throughput.py "${THROUGHPUT[@]}" --out "$OUT/throughput" \
  --json "$OUT/throughput.json"

step fp16_scaler 90 "$PY" -m bigbatch train configs/mnist1d-cnn.toml --out "$OUT/fp16-run" \
  --set "train.amp='$AMP16'" --set "train.steps=$FP16_STEPS" --set "data.num_samples=$FP16_SAMPLES" \
  --set train.log_every=10 --set train.eval_every=0 --set data.train_eval_samples=1000 --set "track.progress='off'"

if "$PY" -c "import nvidia.dali" > "$OUT/logs/dali-import.log" 2>&1; then
  step dali_folder 60 "$PY" benchmarks/gpu_check_steps.py jpegs "$OUT/jpegs"
  step dali 90 "$PY" -m bigbatch train configs/mnist1d-mlp.toml --out "$OUT/dali-run" \
    --set "data.name='imagefolder'" --set "data.root='$OUT/jpegs'" --set "data.backend='dali'" \
    --set data.image_size=64 --set "model.name='resnet18'" --set batch.global_batch=16 \
    --set "train.steps=$DALI_STEPS" --set train.log_every=1 --set train.eval_every=0 \
    --set data.train_eval_samples=16 --set "track.progress='off'"
else
  printf 'dali\tnot-installed\t0\n' >> "$OUT/steps.tsv"
fi

step optimizer_step 45 "$PY" benchmarks/optimizer_step.py "${OPTIM[@]}" --json "$OUT/optimizer_step.json"

step input_pipeline 90 "$PY" benchmarks/input_pipeline.py "${INPUT[@]}" --root "$OUT/input-jpegs" \
  --json "$OUT/input_pipeline.json"

# last: inductor compiles ResNet-50 twice (bare, bigbatch; the second mostly from inductor's cache),
# the slowest step, so it gets what the correctness checks left of the budget
step throughput_compile 240 "$PY" benchmarks/gpu_throughput.py "${THROUGHPUT[@]}" --compile --no-ddp \
  --out "$OUT/throughput-compile" --json "$OUT/throughput-compile.json"

"$PY" benchmarks/gpu_check_steps.py summary "$OUT" --mode "$MODE" --budget "$BUDGET" --elapsed "$SECONDS"
