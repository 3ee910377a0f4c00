#!/usr/bin/env bash
# Everything that needs two or more GPUs of one machine, in one command (NCCL; ranks one per GPU):
#
#   bash benchmarks/multi_gpu.sh [PART ...] [--out DIR]
#
# PART (default: all, in this order; each under its own time limit, so one that hangs cannot eat the rest):
#   tests   the GPU tests that need 2 GPUs: every layout in bf16 against one GPU with evaluation and checkpoints
#           (dp=2 ZeRO-1/2/3, tp=2 with and without sequence parallelism, pp=2 with data workers, cp=2), checkpoints
#           continued in other layouts, and the float32 gradient reduction over NCCL
#   fp8     the 7B's width at 2 layers, FP8 tensorwise at tp=2 with sequence parallelism against bf16 in that layout
#   cp      context parallelism at seq 8k, 64k and 128k (cp=2) beside data parallelism at 8k
#   7b      the full 7B (32 layers) in each layout that fits the GPUs: dp ZeRO-1 and ZeRO-3, tp=2, pp=2
# Each part's log goes to DIR (default: runs/multi-gpu/) and a summary of every part's exit status to the terminal;
# record the tables in benchmarks/RESULTS.md with the date, the device and the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
out=runs/multi-gpu
parts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    tests|fp8|cp|7b) parts+=("$1"); shift ;;
    *) echo "multi_gpu.sh: unknown argument '$1': parts are tests, fp8, cp, 7b; --out DIR" >&2; exit 2 ;;
  esac
done
[ ${#parts[@]} -gt 0 ] || parts=(tests fp8 cp 7b)
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${gpus:-0}" -lt 2 ]; then
  echo "multi_gpu.sh: this machine shows $gpus GPU(s); it needs 2 or more" >&2
  exit 2
fi
mkdir -p "$out"
echo "multi_gpu.sh: $gpus GPUs ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)), commit" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown), logs in $out"

run_part() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=30 "$limit" "$@" >"$out/$name.log" 2>&1
  local status=$?
  echo "  $name: exit $status in $((SECONDS - start)) s ($out/$name.log)"
  summary+=("$name $status")
}

summary=()
for part in "${parts[@]}"; do
  case "$part" in
    tests)
      run_part tests 1800 python3 -m pytest -q -m gpu tests/test_training_gpu.py tests/test_zero_stages_gpu.py \
        tests/test_tensor_parallel.py tests/test_context_parallel.py tests/test_gradient_reduction.py
      ;;
    fp8)
      run_part fp8 900 python3 benchmarks/train_step.py --nproc 2 --layers 2 --seq-lens 8192 --layouts tp2sp \
        --fp8 off tensorwise --steps 10 --warmup 3
      ;;
    cp)
      run_part cp 1500 python3 benchmarks/train_step.py --nproc 2 --layers 8 --layouts zero1 cp2 \
        --seq-lens 8192 65536 131072 --accum 2 --steps 6 --warmup 2
      ;;
    7b)
      run_part 7b 2400 python3 benchmarks/train_step.py --nproc "$gpus" --layers 32 --layouts zero1 zero3 tp2 pp2 \
        --steps 6 --warmup 2
      ;;
  esac
done
failed=0
for entry in "${summary[@]}"; do
  [ "${entry##* }" = 0 ] || failed=1
done
exit $failed
