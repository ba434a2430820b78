"""`dist-gru predict`: a saved model's outputs for every sample, in one process or under torchrun.

    dist-gru predict --model runs/files/model --data data/val --out preds.npy
    dist-gru predict --model runs/files/model --data data/val --out probs.npy --probabilities
    torchrun --nproc-per-node 2 -m dist_gru predict --model runs/files/model --data data/val --out preds.npy

The output is one `.npy` in dataset order, written once: global rank 0 creates it under a
temporary name with its final shape, every rank opens it as a memory map and writes the rows of
its own batches, and after a barrier rank 0 renames it into place. No rank holds the whole output
or reads the whole dataset. The batches are contiguous runs of the dataset order, batch k on rank
k mod W (`predict_batches`): a batch holds the same samples, padded the same way, on any world
size, so the file equals the 1-process one byte for byte (with equal per-process thread counts).
The file must be on storage every rank can write (one node, or a shared file system).

What a row holds, by model:
- classification: the predicted label (int64), or with `--probabilities` the class probabilities
  (float32 [C], a softmax of the logits);
- regression: the outputs as `GRUModel.forward` gives them (float32): values [O], gaussian
  (mean, scale) [O, 2], quantiles [O, Q] (levels in the JSON line), forecasts [horizon, ...];
- head `step`: one row per valid step, sequences concatenated along time, and
  `<out>.offsets.npy` (sequence i is rows offsets[i]:offsets[i + 1]).
The last line of stdout is JSON: the file, its shape and dtype, what the last axes mean, and the
throughput (`samples_per_s`, all ranks together, over the forward passes and the writes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_gru.config import ConfigError
from dist_gru.data.loading import make_loader, predict_batches
from dist_gru.infer.load import batch_to, checked_out, command_parser, json_line, load_for_inference, load_model
from dist_gru.infer.tables import TABLES, prediction_frames, write_table
from dist_gru.tasks import task_for


def row_layout(model: torch.nn.Module, probabilities: bool) -> tuple[tuple[int, ...], np.dtype, dict[str, Any]]:
    """(shape of one row, dtype, description of the last axes) of the model's predictions (its task's)."""
    return task_for(model.config).row_layout(probabilities)


def _rows(model: torch.nn.Module, out: torch.Tensor, lengths: torch.Tensor, probabilities: bool) -> np.ndarray:
    """A batch's outputs as rows of the file: labels or probabilities, valid steps only (head step)."""
    return task_for(model.config).rows(out, lengths, probabilities)


def _inputs(argv: list[str] | None) -> tuple[argparse.Namespace, Path, Any, torch.nn.Module, Any]:
    """(args, --out, config, model, dataset) of a `dist-gru predict` command line, every input checked."""
    parser = command_parser("dist-gru predict")
    parser.add_argument(
        "--out", required=True, help="output file: .npy (the rows), or a table (.csv / .parquet) keyed by series id and time"
    )
    parser.add_argument(
        "--probabilities", action="store_true", help="classification: class probabilities instead of labels"
    )
    args = parser.parse_intermixed_args(argv)
    out = checked_out(args, (".npy", *TABLES))
    model = load_model(Path(args.model))
    if args.probabilities and model.task != "classification":
        raise ConfigError(
            f"--probabilities: the model at --model {args.model} is a regression model; class probabilities "
            "need a classification model (its outputs are written as they are)"
        )
    if out.suffix in TABLES and model.head_kind == "forecast":  # a row holds a whole horizon
        raise ConfigError(
            f"--out {out}: a forecast model's rows are whole horizons; write them as .npy, or use dist-gru forecast "
            "(the horizon after each series, as a table) or dist-gru backtest (scored origins)"
        )
    # Whole sequences, not training windows: per-step outputs line up with the stored steps.
    extra = ["data.window=null"] if model.head_kind == "step" else []
    cfg, model, dataset = load_for_inference(args, extra, unlabelled=True)
    if cfg.train.tbptt:
        raise ConfigError(
            f"--model {args.model}: a stream-mode model (train.tbptt); dist-gru predict reads whole sequences: use "
            "dist-gru evaluate (streaming metrics) or dist-gru sample (token streams)"
        )
    return args, out, cfg, model, dataset


def _write_rows(
    path: str, model: torch.nn.Module, dataset: Any, offsets: np.ndarray, args: argparse.Namespace,
    rank: int, world_size: int, device: torch.device,
) -> int:
    """Write this rank's batches into the memory-mapped file at `path`; returns how many of its rows
    hold NaN or infinity (a model with non-finite weights). Samples [i, j) are rows
    [offsets[i], offsets[j])."""
    rows = np.load(path, mmap_mode="r+")
    dtype = rows.dtype
    batches = predict_batches(len(dataset), args.batch_size, rank, world_size)
    nonfinite = 0
    with torch.no_grad():
        for batch in make_loader(dataset, batches, 0):
            inputs, _ = batch_to(batch, device)
            first, last = int(offsets[int(batch["index"][0])]), int(offsets[int(batch["index"][-1]) + 1])
            written_rows = _rows(model, model(**inputs)[0], inputs["lengths"], args.probabilities)
            rows[first:last] = written_rows
            if dtype.kind == "f":
                nonfinite += int((~np.isfinite(written_rows.reshape(len(written_rows), -1))).any(axis=1).sum())
    rows.flush()
    del rows
    return nonfinite


def _publish(out: Path, partial: str, offsets: np.ndarray | None, written: dict[str, Any]) -> None:
    """Global rank 0, once every row is written: the offsets file (head step), then the output,
    each renamed into place; the JSON line, and a warning for rows that are not finite."""
    if offsets is not None:
        offsets_path = out.with_name(out.name.removesuffix(".npy") + ".offsets.npy")
        tmp = offsets_path.with_name(f".{offsets_path.name}.partial-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, offsets)
        os.replace(tmp, offsets_path)
        written["offsets"] = str(offsets_path)
    os.replace(partial, out)
    _report(out, written)


def _publish_table(out: Path, partial: str, offsets: np.ndarray, dataset: Any, model: Any, args, written: dict) -> None:
    """Global rank 0, once every row is written: the rows as a table keyed by series and time."""
    rows = np.load(partial, mmap_mode="r")
    write_table(out, prediction_frames(rows, offsets, dataset, model, args.probabilities))
    del rows
    os.unlink(partial)
    _report(out, written)


def _report(out: Path, written: dict[str, Any]) -> None:
    nonfinite, num_rows = written["nonfinite_rows"], written["shape"][0]
    if nonfinite:
        print(f"dist-gru: warning: {nonfinite} of {num_rows} rows of {out} hold NaN or infinity", file=sys.stderr)
    print(json_line(written), flush=True)


def predict_main(argv: list[str] | None = None) -> int:
    """`dist-gru predict` (see the module docstring). Works under torchrun: all ranks participate."""
    from accelerate.utils import broadcast_object_list

    from dist_gru.runtime import exit_process, make_accelerator

    args, out, cfg, model, dataset = _inputs(argv)
    accelerator = make_accelerator(cfg)
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    model = model.to(device).eval()
    model.flatten_parameters()

    trailing, dtype, about = row_layout(model, args.probabilities)
    offsets = task_for(model.config).row_offsets(dataset.lengths)  # a row per sample, or per valid step
    shape = (int(offsets[-1]), *trailing)

    partial = [None]
    if accelerator.is_main_process:
        partial[0] = str(out.with_name(f".{out.name}.partial-{os.getpid()}"))
        np.lib.format.open_memmap(partial[0], mode="w+", dtype=dtype, shape=shape).flush()
    if world_size > 1:
        broadcast_object_list(partial)  # all ranks participate: the file exists from here on
    start = time.perf_counter()
    nonfinite = _write_rows(partial[0], model, dataset, offsets, args, rank, world_size, device)
    # All ranks participate: every row is written, and the counts are summed.
    nonfinite = int(accelerator.reduce(torch.tensor([nonfinite], device=device), reduction="sum").item())
    elapsed = time.perf_counter() - start

    if accelerator.is_main_process:
        written: dict[str, Any] = {"out": str(out), "shape": list(shape), "dtype": dtype.name, **about}
        written.update(
            world_size=world_size,
            num_samples=len(dataset),
            nonfinite_rows=nonfinite,
            seconds=round(elapsed, 4),
            samples_per_s=round(len(dataset) / max(elapsed, 1e-9), 1),
        )
        if out.suffix in TABLES:
            _publish_table(out, partial[0], offsets, dataset, model, args, written)
        else:  # rows per valid step need the offsets file to find each sequence's rows
            _publish(out, partial[0], offsets if task_for(model.config).per_step else None, written)
    accelerator.wait_for_everyone()  # all ranks participate: the file is in place when any rank exits
    exit_process(0)
    return 0
