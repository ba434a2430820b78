#!/usr/bin/env bash
# Train with `accelerate launch` and a config file from launch/accelerate_configs/.
#
#   launch/accelerate.sh                          # cpu.yaml: 2 gloo processes (gpu_bf16.yaml if GPUs)
#   ACCELERATE_CONFIG=launch/accelerate_configs/gpu_bf16.yaml launch/accelerate.sh train.max_steps=100
#   # multinode.yaml: the same command on every node, with that node's MACHINE_RANK
#   ACCELERATE_CONFIG=launch/accelerate_configs/multinode.yaml MACHINE_RANK=0 MAIN_PROCESS_IP=node001 launch/accelerate.sh
#
# Arguments go to `dist-gru train` (overrides, --quiet). dist-gru passes its own precision to
# Accelerate, which beats the accelerate config's, so this script turns the config's
# mixed_precision into train.precision (fp32 for 'no'); arguments still win. A config with
# use_cpu: true also hides the GPUs. Every variable can be set from the environment:
#   ACCELERATE_CONFIG  accelerate config file (default: accelerate_configs/gpu_bf16.yaml if there are GPUs,
#                      else accelerate_configs/cpu.yaml)
#   CONFIG             dist-gru YAML config (default: configs/adding.yaml)
#   NUM_PROCESSES      processes over all machines (default: the config's; for a GPU config, the GPUs
#                      on this node x num_machines)
#   MACHINE_RANK       this machine's rank, 0 .. num_machines - 1 (required when num_machines > 1)
#   MAIN_PROCESS_IP    address of machine 0 (required when num_machines > 1)
#   MAIN_PROCESS_PORT  port on machine 0 (default: the config's; 0 = any free port, one machine only)
#   PRECISION          train.precision: fp32 | bf16 | fp16 (default: from the config's mixed_precision)
#   ACCELERATE         the accelerate command (default: accelerate)
set -euo pipefail

here=$(dirname "${BASH_SOURCE[0]}")
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$here/accelerate_configs/$( ((gpus > 0)) && echo gpu_bf16 || echo cpu).yaml}
CONFIG=${CONFIG:-configs/adding.yaml}
ACCELERATE=${ACCELERATE:-accelerate}

# A top-level `key: value` of the accelerate config, without quotes or comment.
setting() { sed -n "s/^$1:[[:space:]]*\([^#]*\).*/\1/p" "$ACCELERATE_CONFIG" | tr -d "'\" "; }

use_cpu=$(setting use_cpu)
num_machines=$(setting num_machines)
if [[ "$use_cpu" == true ]]; then
    export CUDA_VISIBLE_DEVICES=""
elif [[ -z "${NUM_PROCESSES:-}" && "$gpus" -gt 0 ]]; then
    NUM_PROCESSES=$((gpus * ${num_machines:-1}))
fi
mixed=$(setting mixed_precision)
PRECISION=${PRECISION:-$([[ "${mixed:-no}" == no ]] && echo fp32 || echo "$mixed")}

cmd=("$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG")
if [[ "${num_machines:-1}" -gt 1 ]]; then
    : "${MACHINE_RANK:?set MACHINE_RANK (0 .. $num_machines - 1) for $ACCELERATE_CONFIG}"
    : "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP to the address of machine 0 for $ACCELERATE_CONFIG}"
    cmd+=(--machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP")
fi
if [[ -n "${NUM_PROCESSES:-}" ]]; then
    cmd+=(--num_processes "$NUM_PROCESSES")
fi
if [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then
    cmd+=(--main_process_port "$MAIN_PROCESS_PORT")
fi
cmd+=(-m dist_gru train --config "$CONFIG" "train.precision=$PRECISION" "$@")
printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
exec "${cmd[@]}"
