#!/usr/bin/env bash
# GPU check: train a few seconds on one GPU in each precision and print a table of throughput,
# peak GPU memory and loss. Without a CUDA GPU it says so and exits 0.
#
#   launch/gpu_check.sh
#   STEPS=500 HIDDEN=512 PRECISIONS="bf16 fp16" launch/gpu_check.sh model.num_layers=2
#
# Arguments go to every `dist-gru train` run as overrides. Every variable can be set from the environment:
#   PRECISIONS  precisions to compare             (default: "fp32 bf16 fp16")
#   HIDDEN      GRU hidden size                   (default: 256)
#   SEQ_LEN     adding-problem sequence length    (default: 100)
#   BATCH       global batch size                 (default: 256)
#   STEPS       optimizer steps per precision     (default: 200)
#   CONFIG      dist-gru YAML config              (default: configs/adding.yaml)
#   OUT_DIR     where the runs go                 (default: a temporary folder, removed at the end)
#   PYTHON      Python with dist-gru installed    (default: python3)
set -euo pipefail

read -ra precisions <<<"${PRECISIONS:-fp32 bf16 fp16}"
HIDDEN=${HIDDEN:-256}
SEQ_LEN=${SEQ_LEN:-100}
BATCH=${BATCH:-256}
STEPS=${STEPS:-200}
CONFIG=${CONFIG:-configs/adding.yaml}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import dist_gru, torch' 2>/dev/null; then
    echo "gpu_check.sh: $PYTHON cannot import dist_gru and torch: set PYTHON (e.g. PYTHON=.venv/bin/python)" >&2
    exit 1
fi
if ! device=$("$PYTHON" -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())' 2>/dev/null); then
    echo "gpu_check.sh: no CUDA GPU visible to PyTorch on $(hostname): nothing to check (run it on a GPU machine)"
    exit 0
fi
if [[ -z "${OUT_DIR:-}" ]]; then
    OUT_DIR=$(mktemp -d)
    trap 'rm -rf "$OUT_DIR"' EXIT
fi
echo "gpu_check.sh: $device; adding problem T=$SEQ_LEN, hidden $HIDDEN, batch $BATCH, $STEPS steps; runs in $OUT_DIR"

for precision in "${precisions[@]}"; do
    cmd=("$PYTHON" -m dist_gru train --config "$CONFIG" --quiet "train.precision=$precision"
        "model.hidden_size=$HIDDEN" "data.seq_len=$SEQ_LEN" "train.global_batch_size=$BATCH"
        "train.max_steps=$STEPS" "train.log_every=$(((STEPS + 9) / 10))" train.eval_every=0 checkpoint.every=0
        log.mode=disabled train.resume=overwrite "train.run_dir=$OUT_DIR/$precision" "$@")
    printf '+'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    "${cmd[@]}" > "$OUT_DIR/$precision.log" 2>&1 || { tail -n 30 "$OUT_DIR/$precision.log"; exit 1; }
done

# samples/s: mean over the logged intervals after the first (cuDNN autotuning, allocator warm-up).
"$PYTHON" - "$OUT_DIR" "${precisions[@]}" <<'PY'
import json, sys
from pathlib import Path

root, precisions = Path(sys.argv[1]), sys.argv[2:]
print(f"{'precision':<10}{'samples/s':>12}{'peak MiB':>10}{'final loss':>12}{'eval mse':>10}{'skipped':>9}")
for p in precisions:
    rows = [json.loads(line) for line in (root / p / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in rows if "train/loss" in r]
    rates = [r["perf/samples_per_s"] for r in train[1:]] or [train[0]["perf/samples_per_s"]]
    peak = max(r.get("mem/cuda_max_alloc_mb", float("nan")) for r in train)
    mse = next((r["eval/mse"] for r in reversed(rows) if "eval/mse" in r), float("nan"))
    skipped = train[-1].get("amp/skipped_steps", 0)
    print(f"{p:<10}{sum(rates) / len(rates):>12.0f}{peak:>10.1f}{train[-1]['train/loss']:>12.4g}{mse:>10.4g}{skipped:>9}")
PY
