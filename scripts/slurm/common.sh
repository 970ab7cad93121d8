# Shared by the sbatch scripts: builds the open_clip_safe.main argument list from the environment.
#
#   TRAIN_DATA   training shards or CSV (required)         MODEL       model config (RN50)
#   EPOCHS       epochs (32)                                BATCH_SIZE  per-process batch (128)
#   WORKERS      data-loader workers per process (4)        LOGS        log folder (./logs)
#   NAME         experiment name (safeclip-$SLURM_JOB_ID: stable across requeues, so the job resumes)
#   PRECISION    amp on GPUs, fp32 on CPU                    SAFECLIP_ARGS  extra flags, e.g. "--safeclip ..."
# Every argument given to sbatch after the script's name is appended as well.
# DRY_RUN=1 prints the launch command instead of running it.

if [ -z "${TRAIN_DATA:-}" ]; then
    echo "error: set TRAIN_DATA to the training shards or CSV (e.g. TRAIN_DATA='/data/cc3m/{00000..00331}.tar')" >&2
    exit 2
fi

GPUS=${SLURM_GPUS_ON_NODE:-0}
GPUS=${GPUS##*:}  # "a100:4" -> "4"
if [ "$GPUS" -gt 0 ] 2>/dev/null; then
    DEVICE=cuda
    DEFAULT_PRECISION=amp
else
    GPUS=0
    DEVICE=cpu
    DEFAULT_PRECISION=fp32
fi

TRAIN_ARGS=(
    --train-data "$TRAIN_DATA"
    --model "${MODEL:-RN50}"
    --epochs "${EPOCHS:-32}"
    --batch-size "${BATCH_SIZE:-128}"
    --workers "${WORKERS:-4}"
    --precision "${PRECISION:-$DEFAULT_PRECISION}"
    --device "$DEVICE"
    --logs "${LOGS:-./logs}"
    --name "${NAME:-safeclip-${SLURM_JOB_ID:-local}}"
    --save-frequency 1
    --resume latest
)
# shellcheck disable=SC2206  # word splitting of SAFECLIP_ARGS is intended
TRAIN_ARGS+=(${SAFECLIP_ARGS:-} "$@")

# SafeCLIP's host collectives run on a gloo group beside NCCL (docs/cluster.md#networks). gloo takes
# its interface from GLOO_SOCKET_IFNAME (exact names, comma-separated) or else from the hostname, which on
# many clusters resolves to a network the nodes cannot reach each other on: given only NCCL's setting,
# gloo gets the same interfaces. NCCL's prefixes ("ib" for ib0, ib1) become this node's matching names.
gloo_interfaces() {
    local item items names=() found
    IFS=, read -ra items <<< "${1#=}"
    for item in "${items[@]}"; do
        if [ -e "/sys/class/net/$item" ] || [ "${1:0:1}" = "=" ]; then
            names+=("$item")
        else
            found=$(cd /sys/class/net 2>/dev/null && ls -d "$item"* 2>/dev/null | paste -sd, -) || true
            names+=("${found:-$item}")
        fi
    done
    (IFS=,; echo "${names[*]}")
}
if [ -n "${NCCL_SOCKET_IFNAME:-}" ] && [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
    if [ "${NCCL_SOCKET_IFNAME:0:1}" = "^" ]; then
        echo "note: NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME excludes interfaces, which gloo cannot; set" \
             "GLOO_SOCKET_IFNAME to the interface the nodes reach each other on" >&2
    else
        GLOO_SOCKET_IFNAME=$(gloo_interfaces "$NCCL_SOCKET_IFNAME")
        export GLOO_SOCKET_IFNAME
    fi
fi

launch() {
    if [ -n "${DRY_RUN:-}" ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}
