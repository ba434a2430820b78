"""Evaluation and forecasting, shared by training and the `evaluate` / `forecast` commands.

    dist-gru evaluate --model runs/adding/model --data adding
    dist-gru evaluate --model runs/files/model --data data/val
    dist-gru forecast --model runs/forecast/model --data data/series --out forecast.npy
    dist-gru evaluate --model runs/bytes/model --data data/bytes/val      # stream mode: bits_per_token

Evaluation runs on every rank over disjoint shards (sample r, r + W, ...), sums per-sample errors in
float64 and reduces the sums once: every sample counts exactly once, and the metrics equal the
1-process ones whatever the world size. Which metrics depends on the model's head and output
(`dist_gru.tasks`).
"""

from __future__ import annotations

from typing import Any

import torch

from dist_gru.data.sources import evaluation_batches
from dist_gru.infer.load import (
    batch_to,
    command_parser,
    json_line,
    load_for_inference,
)
from dist_gru.tasks import task_for


def loss_fn(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of a batch of a head-`last` point model: MSE (regression) or cross-entropy.

    Every other head and output: `Task.loss_sum` (`dist_gru.tasks`), which the trainer divides by
    the global number of units."""
    total, units = task_for({"task": task}).loss_sum(output, target)
    return total / units


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Any, accelerator: Any, season: int = 1, breakdowns: bool = False
) -> dict[str, Any]:
    """Metrics of the model's task over every unit of `batches`, the one evaluator of every kind of
    data: samples (`SampleEvalBatches`) or streams (`StreamEvalBatches`), which say what state a
    batch starts from (`carried`) and take the state after it (`keep`).

    All ranks participate (one reduce of float64 sums at the end). `season` is `data.season`: the
    seasonal-naive baseline of head `forecast`. `breakdowns`: also the list-valued metrics (a
    forecast's `mae_by_step`), for reports; training logs numbers only."""
    was_training = model.training
    model.eval()
    task = task_for(model.config)
    sums = task.metric_sums(season, accelerator.device)
    for batch in batches:
        inputs, y = batch_to(batch, accelerator.device)
        with accelerator.autocast():
            out, state = model(**inputs, state=batches.carried(batch))
        batches.keep(state)
        units = task.loss_units(model, inputs["x"], inputs["lengths"])  # None: the loss in the data's units
        sums.update(out, y, inputs["lengths"], inputs["x"], units)
    reduced = accelerator.reduce(sums.sums, reduction="sum") if accelerator.num_processes > 1 else sums.sums
    model.train(was_training)
    return sums.results(reduced, breakdowns)


def evaluate_main(argv: list[str] | None = None) -> int:
    """`dist-gru evaluate`: one JSON line of metrics on the last line of stdout. Works under torchrun too."""
    from dist_gru.runtime import exit_process, make_accelerator

    args = command_parser("dist-gru evaluate").parse_intermixed_args(argv)
    cfg, model, dataset = load_for_inference(args)
    accelerator = make_accelerator(cfg)
    model = model.to(accelerator.device)
    model.flatten_parameters()
    batches = evaluation_batches(cfg, dataset, model, accelerator, args.batch_size)
    metrics = evaluate(model, batches, accelerator, season=cfg.data.season, breakdowns=True)
    if accelerator.is_main_process:
        print(json_line(metrics), flush=True)
    exit_process(0)
    return 0
