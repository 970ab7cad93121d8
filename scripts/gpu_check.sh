#!/usr/bin/env bash
# The checks a CPU machine cannot make, on one CUDA GPU in under 10 minutes:
#   1. SafeCLIP through all phases on a poisoned generated world with --device cuda --precision amp
#      (in-modal warm-up, cross-modal warm-up, two mixed epochs with the similarity pass and split);
#   2. the benchmark at a GPU size (RN50 at 224 px, batch 256, amp) with peak GPU memory per phase,
#      faithful and fast (--safeclip-fast) SafeCLIP against plain open_clip, and the second signal (--safeclip-score neighbours) on 1M synthetic embeddings against the
#      default 1M reference;
#   3. OUT/gpu_check.md: the GPU's name, the run's phases and split, and the benchmark table that
#      docs/benchmark.md quotes.
#
#   scripts/gpu_check.sh [OUT]                       (OUT defaults to gpu_check_out)
#
# GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=toy runs the same steps at toy size on the CPU (a test does).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu_check_out}")
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "${GPU_CHECK_SIZE:-gpu}" = toy ]; then
    NUM_TRAIN=128 SHARD=32 BATCH=16 WORKERS=1 PRECISION=fp32 SAFE_MODEL=safeclip-micro
    BENCH=(--model safeclip-micro --num-train 128 --batch-size 32 --workers 1 --fractions 0.25,0.75 --fast)
    NEIGHBOURS=2000
else
    NUM_TRAIN=12800 SHARD=800 BATCH=256 WORKERS=8 PRECISION=amp SAFE_MODEL=safeclip-tiny
    BENCH=(--model RN50 --num-train 25600 --batch-size 256 --workers 12 --fast)
    NEIGHBOURS=1000000
fi
if [ "$DEVICE" = cuda ]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
fi
mkdir -p "$OUT"
started=$(date +%s)
echo "[1/3] SafeCLIP through all phases on $DEVICE ($PRECISION)"
python -m open_clip_safe.world --out "$OUT/world" --num-train "$NUM_TRAIN" --num-test 64 --shard-size "$SHARD" \
    --format wds --overwrite --quiet >/dev/null
python -m open_clip_safe.attacks --train-data "$OUT/world/train/{000000..$(printf %06d $((NUM_TRAIN / SHARD - 1)))}.tar" \
    --out "$OUT/poisoned" --overwrite --attack badnets --poison-rate 0.05 --patch-size 42 \
    --patch-location bottom-right --quiet
rm -rf "$OUT/logs/safeclip"
python -m open_clip_safe.main --train-data "$OUT/poisoned/{000000..$(printf %06d $((NUM_TRAIN / SHARD - 1)))}.tar" \
    --model "$SAFE_MODEL" --device "$DEVICE" --precision "$PRECISION" --batch-size "$BATCH" --workers "$WORKERS" \
    --epochs 4 --lr 1e-3 --warmup 10 --logs "$OUT/logs" --name safeclip --save-frequency 1 \
    --safeclip --safeclip-inmodal-epochs 1 --safeclip-crossmodal-epochs 1 --safeclip-filter-lr 1e-3 \
    --safeclip-crossmodal-warmup 10 --safeclip-safe-fraction-step 0.25 --safeclip-memory-bank-size 512 \
    > "$OUT/safeclip.log" 2>&1 || { tail -n 30 "$OUT/safeclip.log"; exit 1; }
python -m open_clip_safe.evaluate --similarity-logs "$OUT/logs/safeclip" --output "$OUT/split.json" --quiet \
    > "$OUT/split.txt"
echo "[2/3] benchmark (${BENCH[*]})"
python -m open_clip_safe.bench --out "$OUT/bench" --device "$DEVICE" --precision "$PRECISION" "${BENCH[@]}" \
    > "$OUT/bench.log" 2>&1 || { tail -n 30 "$OUT/bench.log"; exit 1; }
python -m open_clip_safe.bench --out "$OUT/neighbours" --device "$DEVICE" --neighbour-scale "$NEIGHBOURS" \
    > "$OUT/neighbours.log" 2>&1 || { tail -n 30 "$OUT/neighbours.log"; exit 1; }
echo "[3/3] $OUT/gpu_check.md"
{
    echo "# GPU check, $(date -u +%Y-%m-%d) ($(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
    echo
    echo "Command: \`scripts/gpu_check.sh\` ($(( $(date +%s) - started )) s in all)"
    echo
    python -c "import torch; print('Device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', '| torch', torch.__version__)"
    echo
    echo "## SafeCLIP on $DEVICE ($PRECISION), $SAFE_MODEL, batch $BATCH: phases and split"
    echo
    echo '```'
    grep -E "SafeCLIP epoch [0-9]+: (.* phase|similarity pass)" "$OUT/safeclip.log" | sed 's/^.*| INFO | //'
    cat "$OUT/split.txt"
    echo '```'
    echo
    echo "## Benchmark"
    echo
    cat "$OUT/bench/bench.md"
    echo
    echo "## Second signal (\`--neighbour-scale $NEIGHBOURS\`)"
    echo
    cat "$OUT/neighbours/neighbour_scale.md"
} > "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
