"""Evaluation and prediction, shared by training and the `evaluate` / `predict` commands.

    dist-gru evaluate --model runs/adding/model --data adding
    dist-gru evaluate --model runs/files/model --data data/val
    dist-gru predict  --model runs/files/model --data data/val --out preds.npy

Evaluation runs on every rank over disjoint shards (sample r, r + W, ...), sums per-sample errors in
float64 and reduces the sums once: every sample counts exactly once, and the metrics equal the
1-process ones whatever the world size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dist_gru.config import ConfigError, load_config
from dist_gru.data.loading import build_dataset, eval_batches, make_loader


def loss_fn(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of a batch: MSE for regression, cross-entropy for classification."""
    output = output.float()
    if task == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def _batch_to(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return (
        batch["x"].to(device, non_blocking=non_blocking),
        batch["lengths"],
        batch["y"].to(device, non_blocking=non_blocking),
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, accelerator, batch_size: int, num_workers: int = 0) -> dict[str, float]:
    """Metrics over the whole dataset. All ranks participate (one reduce at the end)."""
    was_training = model.training
    model.eval()
    task = dataset.task
    batches = eval_batches(len(dataset), batch_size, accelerator.process_index, accelerator.num_processes)
    # sums: loss, squared error, absolute error (regression) / correct (classification), samples
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    for batch in make_loader(dataset, batches, num_workers):
        x, lengths, y = _batch_to(batch, accelerator.device)
        with accelerator.autocast():
            out = model(x, lengths).float()
        if task == "classification":
            sums[0] += F.cross_entropy(out, y, reduction="sum").double()
            sums[2] += (out.argmax(-1) == y).sum()
        else:
            err = (out - y).double()
            per_sample = (err**2).mean(-1)
            sums[0] += per_sample.sum()
            sums[1] += per_sample.sum()
            sums[2] += err.abs().mean(-1).sum()
        sums[3] += len(y)
    sums = accelerator.reduce(sums, reduction="sum")  # all ranks participate
    model.train(was_training)
    n = float(sums[3])
    metrics = {"loss": float(sums[0]) / n, "num_samples": int(n)}
    if task == "classification":
        metrics["accuracy"] = float(sums[2]) / n
    else:
        metrics.update(mse=float(sums[1]) / n, mae=float(sums[2]) / n)
    return metrics


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, batch_size: int, device: torch.device) -> np.ndarray:
    """Model outputs for every sample, in dataset order (one process)."""
    model.eval()
    outputs = []
    for batch in make_loader(dataset, eval_batches(len(dataset), batch_size, 0, 1), 0):
        x, lengths, _ = _batch_to(batch, device)
        outputs.append(model(x, lengths).float().cpu().numpy())
    return np.concatenate(outputs)


def _load_for_inference(args: argparse.Namespace):
    """Model from `--model`, dataset from `--data` (a seq folder or a synthetic name)."""
    from dist_gru.model import GRUModel

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise ConfigError(f"--model {model_dir}: expected a folder with config.json and model.safetensors")
    model = GRUModel.from_pretrained(str(model_dir))
    run_config = args.config or (
        model_dir.parent / "config.yaml" if (model_dir.parent / "config.yaml").is_file() else None
    )
    overrides = list(args.overrides)
    if Path(args.data).exists():
        overrides += ["data.name=files", f"data.val_path={args.data}", f"data.train_path={args.data}"]
    else:
        overrides += [f"data.name={args.data}"]
    cfg = load_config(run_config, overrides)
    dataset = build_dataset(cfg.data, "val")
    if dataset.num_features != model.rnn.input_size:
        raise ConfigError(
            f"--data {args.data}: sequences have {dataset.num_features} features, the model expects {model.rnn.input_size}"
        )
    return cfg, model, dataset


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--model", required=True, help="a saved model folder (config.json + model.safetensors)")
    parser.add_argument(
        "--data", required=True, help="a dist_gru.seq/v1 folder, or a synthetic dataset name (uses its val split)"
    )
    parser.add_argument("--config", help="config for synthetic data parameters (default: the run's config.yaml)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.seq_len=100")
    return parser


def evaluate_main(argv: list[str] | None = None) -> int:
    """`dist-gru evaluate`: one JSON line of metrics on the last line of stdout. Works under torchrun too."""
    from dist_gru.runtime import make_accelerator

    args = _parser("dist-gru evaluate").parse_intermixed_args(argv)
    cfg, model, dataset = _load_for_inference(args)
    accelerator = make_accelerator(cfg)
    model = model.to(accelerator.device)
    model.flatten_parameters()
    metrics = evaluate(model, dataset, accelerator, args.batch_size)
    if accelerator.is_main_process:
        print(json.dumps(metrics), flush=True)
    return 0


def predict_main(argv: list[str] | None = None) -> int:
    """`dist-gru predict`: writes model outputs for every sample as .npy (dataset order)."""
    parser = _parser("dist-gru predict")
    parser.add_argument("--out", required=True, help="output .npy path")
    args = parser.parse_intermixed_args(argv)
    _, model, dataset = _load_for_inference(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outputs = predict(model.to(device), dataset, args.batch_size, device)
    if dataset.task == "classification":
        outputs = outputs.argmax(-1)
    np.save(args.out, outputs)
    print(json.dumps({"out": str(args.out), "shape": list(outputs.shape)}), file=sys.stdout)
    return 0
