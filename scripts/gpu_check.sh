#!/usr/bin/env bash
# The checks a CPU machine cannot make, on one CUDA GPU in under 8 minutes of wall time, each step under
# its own `timeout`:
#   1. SafeCLIP through all phases on a poisoned generated world with --device cuda --precision amp
#      (in-modal warm-up, cross-modal warm-up, two mixed epochs with the similarity pass and split), the
#      views' photometric part on the GPU (--safeclip-augment-on auto);
#   2. the data path at 224 px: samples/s per data-loader worker core of open_clip's view and SafeCLIP's
#      two views (workers' part; the device part on the GPU) (bench --data-path);
#   3. the benchmark at a GPU size (RN50 at 224 px, batch 256, amp) with peak GPU memory per phase,
#      faithful and fast (--safeclip-fast) SafeCLIP against plain open_clip;
#   4. the second signal (--safeclip-score neighbours) on 1M synthetic embeddings against the 1M reference;
#   then OUT/gpu_check.md: the GPU's name and every table, which docs/benchmark.md quotes.
#
#   scripts/gpu_check.sh [OUT]                       (OUT defaults to gpu_check_out)
#
# EDA captions need WordNet: NLTK's data ($NLTK_DATA), a WordNet database ($WNSEARCHDIR, /usr/share/wordnet),
# or a copy of one in the ignored folder gpu_check_wordnet/ (cp -r /usr/share/wordnet gpu_check_wordnet, and
# carry it to the GPU machine). With none, the runs use --safeclip-text-aug none and the report says so.
#
# GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=toy runs the same steps, with the same worker and shard arithmetic,
# at toy size on the CPU (a test does).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu_check_out}")
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "${GPU_CHECK_SIZE:-gpu}" = toy ]; then
    NUM_TRAIN=128 WORKERS=1 BATCH=16 PRECISION=fp32 SAFE_MODEL=safeclip-micro BENCH_MODEL=safeclip-micro
    BENCH_TRAIN=128 BENCH_BATCH=32 FRACTIONS=0.25,0.75 IMAGE_SIZE=32 DATA_SAMPLES=192 NEIGHBOURS=2000
    LIMITS=(300 120 600 120)
else
    NUM_TRAIN=12800 WORKERS=8 BATCH=256 PRECISION=amp SAFE_MODEL=safeclip-tiny BENCH_MODEL=RN50
    BENCH_TRAIN=12800 BENCH_BATCH=256 FRACTIONS=0.15,0.5,0.85 IMAGE_SIZE=224 DATA_SAMPLES=4000 NEIGHBOURS=1000000
    LIMITS=(90 90 210 60)   # seconds a step: 450 in all
fi
SHARDS=$((2 * WORKERS))   # the bench's world has max(8, 2 x workers) shards; main needs one a worker at least
SHARD=$((NUM_TRAIN / SHARDS))
LAST=$(printf %06d $((SHARDS - 1)))
if [ "$DEVICE" = cuda ]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
fi
if [ -z "${WNSEARCHDIR:-}" ] && [ -d gpu_check_wordnet ]; then
    export WNSEARCHDIR=$PWD/gpu_check_wordnet
fi
if python -c "from open_clip_safe.augment import load_wordnet; load_wordnet()" 2>/dev/null; then
    TEXT_AUG=eda CAPTIONS="EDA (WordNet found)"
else
    TEXT_AUG=none CAPTIONS="--safeclip-text-aug none: no WordNet on this machine (see the script's header)"
fi
echo "captions: $CAPTIONS"
mkdir -p "$OUT"
started=$(date +%s)

step() {  # step SECONDS LOG COMMAND...: one step under its own time limit, its log's tail on failure
    local limit=$1 log=$2
    shift 2
    if ! timeout "$limit" "$@" > "$log" 2>&1; then
        tail -n 30 "$log"
        echo "gpu_check: step failed or ran past ${limit}s: $*" >&2
        exit 1
    fi
}

echo "[1/4] SafeCLIP through all phases on $DEVICE ($PRECISION)"
rm -rf "$OUT/logs/safeclip"
step "${LIMITS[0]}" "$OUT/safeclip.log" bash -c "
    set -e
    python -m open_clip_safe.world --out '$OUT/world' --num-train $NUM_TRAIN --num-test 64 --shard-size $SHARD \
        --format wds --overwrite --quiet
    python -m open_clip_safe.attacks --train-data '$OUT/world/train/{000000..$LAST}.tar' --out '$OUT/poisoned' \
        --overwrite --attack badnets --poison-rate 0.05 --patch-size 42 --patch-location bottom-right --quiet
    python -m open_clip_safe.main --train-data '$OUT/poisoned/{000000..$LAST}.tar' --model $SAFE_MODEL \
        --device $DEVICE --precision $PRECISION --batch-size $BATCH --workers $WORKERS --epochs 4 --lr 1e-3 \
        --warmup 10 --logs '$OUT/logs' --name safeclip --save-frequency 1 --safeclip --safeclip-inmodal-epochs 1 \
        --safeclip-crossmodal-epochs 1 --safeclip-filter-lr 1e-3 --safeclip-crossmodal-warmup 10 \
        --safeclip-safe-fraction-step 0.25 --safeclip-memory-bank-size 512 --safeclip-text-aug $TEXT_AUG \
        --safeclip-image-aug safeclip
    python -m open_clip_safe.evaluate --similarity-logs '$OUT/logs/safeclip' --output '$OUT/split.json' --quiet \
        > '$OUT/split.txt'"
echo "[2/4] data path at $IMAGE_SIZE px, $WORKERS worker(s)"
step "${LIMITS[1]}" "$OUT/data_path.log" python -m open_clip_safe.bench --data-path --out "$OUT/data_path" \
    --device "$DEVICE" --workers "$WORKERS" --image-size "$IMAGE_SIZE" --data-samples "$DATA_SAMPLES" \
    --batch-size "$BENCH_BATCH" --text-aug "$TEXT_AUG"
echo "[3/4] benchmark ($BENCH_MODEL, $BENCH_TRAIN samples, batch $BENCH_BATCH, $WORKERS worker(s))"
step "${LIMITS[2]}" "$OUT/bench.log" python -m open_clip_safe.bench --out "$OUT/bench" --device "$DEVICE" \
    --precision "$PRECISION" --model "$BENCH_MODEL" --num-train "$BENCH_TRAIN" --batch-size "$BENCH_BATCH" \
    --workers "$WORKERS" --fractions "$FRACTIONS" --fast --text-aug "$TEXT_AUG"
echo "[4/4] second signal on $NEIGHBOURS embeddings"
step "${LIMITS[3]}" "$OUT/neighbours.log" python -m open_clip_safe.bench --out "$OUT/neighbours" --device "$DEVICE" \
    --neighbour-scale "$NEIGHBOURS"
{
    echo "# GPU check, $(date -u +%Y-%m-%d) ($(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
    echo
    echo "Command: \`scripts/gpu_check.sh\` ($(( $(date +%s) - started )) s in all); captions: $CAPTIONS"
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
    echo "## Data path"
    echo
    cat "$OUT/data_path/data_path.md"
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
