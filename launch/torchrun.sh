#!/usr/bin/env bash
# Train on this node with torchrun: one process per GPU (NCCL), or 2 gloo processes without GPUs.
#
#   launch/torchrun.sh                                               # configs/adding.yaml
#   NPROC=4 CONFIG=configs/sine.yaml launch/torchrun.sh train.max_steps=100 --quiet
#
# Arguments go to `dist-gru train`: section.key=value overrides and options such as --quiet.
# Every variable can be set from the environment:
#   NPROC          processes on this node                 (default: the GPUs on this node, else 2)
#   CONFIG         dist-gru YAML config                   (default: configs/adding.yaml)
#   NNODES         nodes in the job                       (default: 1; launch/torchrun_multinode.sh sets it)
#   RDZV_ENDPOINT  c10d rendezvous host:port              (default: localhost:0, any free port here)
#   RDZV_ID        rendezvous id, the same on every node  (default: dist-gru)
#   MAX_RESTARTS   times torchrun restarts failed workers (default: 0)
#   LOG_RANKS      local ranks whose output is shown, e.g. 0 or 0,1 (default: 0; empty: every rank,
#                  unprefixed). Only rank 0 prints the summary and progress; show all when debugging.
#   TORCHRUN       the torchrun command                   (default: python -m dist_gru.torchrun, torchrun
#                  ending in one line, not a traceback, when the workers stop on a user error)
set -euo pipefail

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC=${NPROC:-$(((gpus > 0) ? gpus : 2))}
CONFIG=${CONFIG:-configs/adding.yaml}
NNODES=${NNODES:-1}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:0}
RDZV_ID=${RDZV_ID:-dist-gru}
MAX_RESTARTS=${MAX_RESTARTS:-0}
LOG_RANKS=${LOG_RANKS-0}
read -ra launcher <<< "${TORCHRUN:-python -m dist_gru.torchrun}"

cmd=("${launcher[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS"
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
if [[ -n "$LOG_RANKS" ]]; then
    # --tee 3 routes both streams through torchrun, which then shows only these ranks, prefixed.
    cmd+=(--local-ranks-filter "$LOG_RANKS" --role rank --tee 3)
fi
cmd+=(-m dist_gru train --config "$CONFIG" "$@")
printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
exec "${cmd[@]}"
