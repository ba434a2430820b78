"""The trial's side of a search: report each evaluation to the study and ask its pruner.

A trial run (`tune.study` and `tune.trial` set by `dist-gru tune`) builds a `TrialReporter` on
global rank 0 only; `Selection` calls it after every evaluation and broadcasts rank 0's answer, so
every rank of the trial stops at the same step (as early stopping does). The decision is also
written to the study (`pruned_step`), so the worker that reads the finished run knows it was
pruned even when the run ended in another worker's hands.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dist_gru.config import Config

PRUNED_STEP = "pruned_step"  # the trial's user attribute: the step its pruner stopped it at


class TrialReporter:
    """Intermediate values of one trial into the study; `report` says whether to prune."""

    def __init__(self, study_dir: Path, number: int):
        from dist_gru.tune.study import open_existing

        self.folder = open_existing(study_dir)
        self.number = number
        self.storage = self.folder.storage()
        self.study = self.folder.study(self.storage)
        self.trial_id = self.folder.trial_id(self.storage, number)

    @property
    def metric(self) -> str:
        return self.folder.metric

    def report(self, metrics: dict[str, float], step: int, can_prune: bool) -> str | None:
        """Record the evaluation at `step`; the reason to stop the trial now, or None."""
        value = float(metrics[self.metric.removeprefix("eval/")])
        if not math.isfinite(value):
            reason = f"{self.metric}={value} is not finite"
        else:
            self.storage.set_trial_intermediate_value(self.trial_id, step, value)
            if not can_prune or not self.study.pruner.prune(self.study, self.storage.get_trial(self.trial_id)):
                return None
            reason = f"{self.metric}={value:.6g} at step {step}"
        if not can_prune:
            return None
        self.storage.set_trial_user_attr(self.trial_id, PRUNED_STEP, step)
        return f"pruned by study {self.folder.name} (trial {self.number}): {reason}; stopped at step {step}"


def trial_reporter(cfg: Config, is_main_process: bool) -> Any:
    """The reporter of a trial run on global rank 0; None elsewhere and outside a study."""
    if cfg.tune.study is None or not is_main_process:
        return None
    return TrialReporter(Path(cfg.tune.study), int(cfg.tune.trial))
