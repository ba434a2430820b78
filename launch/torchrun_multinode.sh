#!/usr/bin/env bash
# Train on several nodes: run the same command on every node. torchrun's c10d rendezvous at
# RDZV_ENDPOINT assigns the node ranks (no NODE_RANK), and only global rank 0 writes the run folder
# (a path on a shared file system, or the first node's disk).
#
#   RDZV_ENDPOINT=node001:29500 launch/torchrun_multinode.sh train.max_steps=1000   # on each of 2 nodes
#   # two "nodes" on one machine, e.g. to try it out:
#   RDZV_ENDPOINT=127.0.0.1:29500 NPROC_PER_NODE=1 launch/torchrun_multinode.sh &
#   RDZV_ENDPOINT=127.0.0.1:29500 NPROC_PER_NODE=1 launch/torchrun_multinode.sh
#
# Arguments go to `dist-gru train`. Every variable can be set from the environment:
#   RDZV_ENDPOINT   host:port every node can reach, e.g. the first node and a port free there (required)
#   NNODES          nodes in the job, or MIN:MAX for an elastic job    (default: 2)
#   NPROC_PER_NODE  processes per node                                  (default: as NPROC in torchrun.sh:
#                   the GPUs on the node, else 2)
#   RDZV_ID         job id, the same on every node                      (default: $SLURM_JOB_ID, else dist-gru)
#   CONFIG, LOG_RANKS, TORCHRUN: as in launch/torchrun.sh (this script runs it); MAX_RESTARTS must be 0.
set -euo pipefail

: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous (the first node and a free port), the same on every node}"
export RDZV_ENDPOINT
# torchrun's restart count is per node, and workers key their store by it: after one node's worker
# fails, the nodes would wait for each other until the peer timeout. slurm/train.sbatch sets an
# attempt number all nodes agree on; this plain launcher cannot, so it runs without restarts.
if [[ "${MAX_RESTARTS:-0}" != 0 ]]; then
    echo "error: MAX_RESTARTS=$MAX_RESTARTS: launch/torchrun_multinode.sh runs without worker restarts" \
        "(expected MAX_RESTARTS=0; restarts on several nodes need slurm/train.sbatch, or resubmit the" \
        "job: it resumes from the last checkpoint)" >&2
    exit 2
fi
export NNODES=${NNODES:-2}
export RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-dist-gru}}
if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    export NPROC=$NPROC_PER_NODE
fi
echo "torchrun_multinode.sh: $NNODES nodes, rendezvous $RDZV_ENDPOINT (id $RDZV_ID)"
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$@"
