"""Model selection over a run's evaluations: the best checkpoint (`checkpoint.best`) and early stopping.

    dist-gru train --config configs/adding.yaml train.eval_every=100 checkpoint.best=eval/loss \\
        train.early_stopping.metric=eval/loss train.early_stopping.patience=3

After every evaluation (the periodic ones and the final one) `Selection.update` compares the
watched metrics with the best so far. `checkpoint.best` keeps the model of the best evaluation in
`<run_dir>/best/` (`config.json` + `model.safetensors`, like `model/`, plus `best.json`: metric,
value, step), replaced atomically. `train.early_stopping` counts evaluations in a row that do not
beat its metric's best by more than `min_delta`; at `patience` of them the run stops at that
evaluation step. The metrics are reduced across ranks before they get here, so every rank computes
the same decision; still, the decision is global rank 0's, broadcast to all (all ranks
participate), so no rounding difference can ever leave one rank training alone.

The best values, their steps and the count of evaluations without improvement are training state:
they go into every checkpoint's state.json and come back on resume, so a resumed run stops where
the uninterrupted one does. A run that stopped early records why in its last checkpoint and is
finished: a resume of it writes nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_gru.config import Config, ConfigError
from dist_gru.train import checkpoint as ckpt_lib

BEST = "best"
# Metrics where a larger value is better; every other metric (losses, errors) is better smaller.
HIGHER_IS_BETTER = ("accuracy", "macro_f1")


def direction(metric: str, mode: str) -> str:
    """`min` or `max` for a metric name and a mode of `auto | min | max`."""
    if mode != "auto":
        return mode
    return "max" if metric.removeprefix("eval/") in HIGHER_IS_BETTER else "min"


@dataclass
class Watch:
    """The best value of one metric so far, where it was reached, and evaluations since then."""

    metric: str
    mode: str
    min_delta: float = 0.0
    value: float | None = None
    step: int | None = None
    since_best: int = 0

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record one evaluation; True if it is a new best (a NaN never is)."""
        value = float(metrics[self.metric.removeprefix("eval/")])
        better = math.isfinite(value) and (
            self.value is None
            or (value < self.value - self.min_delta if self.mode == "min" else value > self.value + self.min_delta)
        )
        if better:
            self.value, self.step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        return better

    def state(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "value": self.value,
            "step": self.step,
            "since_best": self.since_best,
        }

    def load(self, state: dict[str, Any] | None) -> None:
        """Carry on from a checkpoint's state, if it watched the same metric the same way."""
        if state and (state.get("metric"), state.get("mode")) == (self.metric, self.mode):
            self.value, self.step, self.since_best = state["value"], state["step"], int(state["since_best"])


class Selection:
    """`checkpoint.best` and `train.early_stopping` of one run (see the module docstring)."""

    def __init__(self, cfg: Config, reporter: Any = None):
        best, stopping = cfg.checkpoint.best, cfg.train.early_stopping
        self.best = Watch(best, direction(best, cfg.checkpoint.best_mode)) if best else None
        self.stopping = (
            Watch(stopping.metric, direction(stopping.metric, stopping.mode), stopping.min_delta)
            if stopping.metric
            else None
        )
        self.patience = stopping.patience
        # A trial of `dist-gru tune`: every rank takes part in the decision, global rank 0 alone
        # holds the `reporter` that asks the study's pruner (dist_gru.tune.prune).
        self.trial = cfg.tune.study is not None
        self.reporter = reporter
        self.pruned = False
        self.stopped: str | None = None  # why the run stopped early
        self.evaluated_step = -1  # the last evaluation counted (a resume may evaluate its step again)

    @property
    def active(self) -> bool:
        return self.best is not None or self.stopping is not None or self.trial

    def check(self, metric_names: list[str], has_val_set: bool) -> None:
        """Refuse, before anything is written, a watched metric this model never logs."""
        problems = []
        for key, watch in (("checkpoint.best", self.best), ("train.early_stopping.metric", self.stopping)):
            if watch is None:
                continue
            if not has_val_set:
                problems.append(f"{key}={watch.metric}: there is no validation split to evaluate (set data.val_path)")
            elif watch.metric.removeprefix("eval/") not in metric_names:
                logged = ", ".join(f"eval/{name}" for name in metric_names)
                problems.append(f"{key}={watch.metric}: this model does not log it; its eval metrics are {logged}")
        if problems:
            raise ConfigError("\n  ".join(problems))

    def update(
        self, metrics: dict[str, float], step: int, device: torch.device, can_stop: bool = True
    ) -> tuple[bool, bool]:
        """(save best/, stop now) after the evaluation at `step`; all ranks participate (one broadcast).

        `can_stop` is False at the last step, where the run ends anyway."""
        from accelerate.utils import broadcast

        new_best = stop = pruned = False
        if step > self.evaluated_step:  # every rank holds the same evaluated_step: all skip or none
            self.evaluated_step = step
            new_best = self.best.update(metrics, step) if self.best is not None else False
            if self.stopping is not None:
                self.stopping.update(metrics, step)
                stop = can_stop and self.stopping.since_best >= self.patience
            if self.reporter is not None:
                self.stopped = self.reporter.report(metrics, step, can_stop and not stop)
                pruned = self.stopped is not None
        decision = torch.tensor([int(new_best), int(stop), int(pruned)], device=device)
        new_best, stop, pruned = (bool(v) for v in broadcast(decision, from_process=0).tolist())  # rank 0's
        if pruned:
            self.stopped = self.stopped or f"pruned by the study at step {step}"  # ranks > 0 hold no reporter
            self.pruned = True
            return new_best, True
        if stop:
            watch = self.stopping
            self.stopped = (
                f"early stopping: {watch.metric} did not improve for {watch.since_best} evaluations "
                f"(patience {self.patience}; best {watch.value:.6g} at step {watch.step}); stopped at step {step}"
            )
        return new_best, stop

    def stop_record(self) -> dict[str, float]:
        """What the trackers log at the step the run stopped early."""
        if self.pruned:
            return {"tune/pruned": 1}
        watch = self.stopping
        return {"early_stopping/stopped": 1, "early_stopping/best": watch.value, "early_stopping/best_step": watch.step}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint's state.json holds of this (training state)."""
        return {
            "best": self.best.state() if self.best else None,
            "early_stopping": self.stopping.state() if self.stopping else None,
            "stopped": self.stopped,
            "evaluated_step": self.evaluated_step,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.evaluated_step = int(state.get("evaluated_step", -1))
        if self.best is not None:
            self.best.load(state.get("best"))
        if self.stopping is not None:
            self.stopping.load(state.get("early_stopping"))


def save_best(run_dir: Path, model: torch.nn.Module, watch: Watch) -> Path:
    """Write `<run_dir>/best/` (model + best.json) under a temporary name, then swap it in. Main rank only.

    Weights holding NaN or infinity are refused (checkpoint.NonFiniteError)."""
    about = {key: watch.state()[key] for key in ("metric", "mode", "value", "step")}
    return ckpt_lib.save_model_folder(model, Path(run_dir) / BEST, {"best.json": json.dumps(about, indent=2) + "\n"})
