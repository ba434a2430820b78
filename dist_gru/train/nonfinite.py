"""`train.nonfinite`: no NaN or infinity reaches the weights, and a diverging loss is named.

The training loop calls `LossGuard.check` once per optimizer step, after the gradients are
all-reduced and before `optimizer.step`. When the step's gradient norm is NaN or infinite:

- `train.nonfinite=stop` (default): one message on stderr names the step, the quantity (the loss
  and, when a batch's inputs or targets are the cause, the sample and its data file, or the
  gradient norm) and the ways on; the run saves nothing at that step (the weights are those of
  the step before, the last periodic checkpoint stays the newest) and every process exits with
  EXIT_NONFINITE = 3.
- `train.nonfinite=skip`: the step's update is dropped (the gradients are zeroed, the optimizer
  and its moments untouched; in stream mode a lane whose carried state is not finite restarts
  from zero), one warning line says why, and training goes on; more than
  `train.nonfinite_max_skips` such steps in a row stop the run as with `stop`.

One decision for all ranks, without a collective of its own: `spread` adds to each micro-batch's
loss a term that is exactly 0 when the loss is finite and NaN when it is not, on one parameter's
gradient, so DDP's gradient all-reduce carries a non-finite loss on any rank into every rank's
gradients (a loss can be NaN while its gradients are finite: the pinball loss of a NaN target).
The global gradient norm is then the same on every rank, and so is whether it is finite. Reading
that is one host sync per step (free on a CPU; on a GPU it waits for the step's kernels, which
the optimizer step queued behind them would wait for anyway). Only after a non-finite step do the
ranks gather (one collective) what each saw: its loss and, if that is not finite, the first
sample of its batches with non-finite inputs or targets; no batch is scanned otherwise.

With `train.precision=fp16` the gradient scaler already skips steps with non-finite gradients
and lowers its scale (`amp/skipped_steps`): an overflow is routine there, so the guard stands
aside. Whatever the precision, `checkpoint.require_finite` refuses to save non-finite weights.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dist_gru.data.windows import describe
from dist_gru.train import checkpoint as ckpt_lib

# Exit code of a run stopped at a non-finite step: distinct from 0 (finished), 1 (crashed),
# 2 (bad input) and 75 (preempted, checkpoint saved). Nothing was saved at that step.
EXIT_NONFINITE = 3
OK, SKIP, STOP = "ok", "skip", "stop"
# A logged loss this many times the lowest logged so far is a divergence worth a warning; the
# next warning waits until the loss has grown as much again (one line per two orders of magnitude).
DIVERGENCE_FACTOR = 100.0


class LossGuard:
    """The per-step check of `train.nonfinite` and the divergence warning (module docstring)."""

    def __init__(self, job: Any):
        cfg = job.cfg
        self.job = job
        self.mode, self.max_skips = cfg.train.nonfinite, cfg.train.nonfinite_max_skips
        self.active = job.accelerator.scaler is None  # fp16: the gradient scaler's business
        self.params = [p for p in job.model.parameters() if p.requires_grad]
        self.in_a_row = 0  # non-finite steps in a row
        self.skipped = 0  # steps skipped since this process started
        self.lowest: tuple[float, int] | None = None  # lowest logged loss and its step
        self.warned_at = 0.0  # the loss of the last divergence warning (the next needs 100x it)

    def spread(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, with a non-finite value carried into the gradients (0 added when finite)."""
        if not self.active:
            return loss
        return loss + (loss.detach() * 0) * self.params[0].reshape(-1)[0]

    def norm(self, grad_norm: torch.Tensor | None) -> torch.Tensor | None:
        """The global gradient norm: clipping's (`grad_norm`), or computed here without clipping."""
        if grad_norm is not None or not self.active:
            return grad_norm
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def check(self, step: int, grad_norm: torch.Tensor, batches: list[dict], loss: torch.Tensor, lr: float) -> str:
        """OK, SKIP or STOP for optimizer step `step` (1-based), the same on every rank.

        `loss` is this rank's loss of the step, `batches` its micro-batches (read only when the
        step is not finite). All ranks participate."""
        if not self.active or bool(torch.isfinite(grad_norm)):
            self.in_a_row = 0
            return OK
        self.in_a_row += 1
        cause, data_cause = self._diagnose(float(grad_norm), batches, float(loss))  # all ranks participate
        stop = self.mode == STOP or self.in_a_row > self.max_skips
        if not stop:
            self.skipped += 1
            self.job.source.restart_nonfinite()  # stream mode: lanes carrying a NaN restart from zero
        if self.job.accelerator.is_main_process:
            if stop:
                tqdm.write(self._stop_message(step, cause, data_cause, lr), file=sys.stderr)
            else:
                tqdm.write(
                    f"dist-gru: warning: non-finite values at optimizer step {step}: {cause}; its update is skipped "
                    f"(train.nonfinite=skip: {self.in_a_row} in a row, at most train.nonfinite_max_skips="
                    f"{self.max_skips}; {self.skipped} skipped so far)"
                )
        return STOP if stop else SKIP

    def _diagnose(self, grad_norm: float, batches: list[dict], loss: float) -> tuple[str, bool]:
        """What was not finite, as one phrase, and whether a batch's data is the cause."""
        from accelerate.utils import gather_object

        acc = self.job.accelerator
        sample = None if math.isfinite(loss) else first_nonfinite_sample(batches)
        seen = gather_object([(acc.process_index, loss, sample)])  # all ranks participate
        bad = [(rank, value, where) for rank, value, where in seen if not math.isfinite(value)]
        with_data = [entry for entry in bad if entry[2] is not None]
        if with_data:
            rank, value, (index, part) = with_data[0]
            return f"the loss is {value} on rank {rank}: {self._where(index, part)}", True
        if bad:
            rank, value, _ = bad[0]
            return (
                f"the loss is {value} on rank {rank} (the inputs and targets of its batch are finite: the model's "
                "outputs overflowed)",
                False,
            )
        return f"the gradient norm is {grad_norm} (the loss is finite on every rank)", False

    def _where(self, index: int, part: str) -> str:
        """`sample I of the training data has non-finite inputs (FILE)`, by dataset kind."""
        dataset = self.job.source.train_set
        source = getattr(dataset, "source", dataset)  # windows and streams read a stored folder
        folder = getattr(source, "path", None)
        file = f"{folder}/{'features.npy' if part == 'inputs' else 'targets.npy'}" if folder else describe(source)
        if hasattr(dataset, "locate"):  # windows: the index is a window number
            seq, start = (int(v[0]) for v in dataset.locate(np.array([index])))
            what = f"window {index} (sequence {seq} from step {start})"
        elif hasattr(dataset, "read"):  # streams: the index is the chunk's first stored row
            what = f"the chunk from stored row {index}"
        else:
            what = f"sample {index}"
        return f"{what} of the training data has non-finite {part} ({file})"

    def _stop_message(self, step: int, cause: str, data_cause: bool, lr: float) -> str:
        cfg = self.job.cfg
        latest = ckpt_lib.find_latest(self.job.run_dir)
        last = f"the last good checkpoint is {latest.path}" if latest else "no checkpoint was saved before it"
        skip = "set train.nonfinite=skip to drop such steps" + (
            f" (train.resume=auto then resumes from {latest.path})" if latest else ""
        )
        if data_cause:
            ways = f"fix or remove that sample, or {skip}"
        else:
            clip = "" if cfg.optim.grad_clip else ", or set optim.grad_clip (e.g. 1.0)"
            keep = f"; train.init_from={latest.path} in a new train.run_dir keeps its weights" if latest else ""
            ways = (
                f"lower optim.lr (now {cfg.optim.lr:g}, {lr:.3g} at this step){clip} and start again "
                f"(train.resume=overwrite){keep}; or {skip}"
            )
        reason = "" if self.mode == STOP else f" ({self.in_a_row} in a row, more than train.nonfinite_max_skips={self.max_skips})"
        return (
            f"dist-gru: non-finite values at optimizer step {step}{reason}: {cause}. Stopped before the optimizer "
            f"step (the weights hold no NaN or infinity); nothing was saved at this step, {last}. To go on: {ways}. "
            f"Exit code {EXIT_NONFINITE}."
        )

    def watch_loss(self, loss: float, step: int, lr: float) -> None:
        """Warn (main rank, at log steps) when the logged loss grows far above its lowest value.

        Only a positive lowest value is a scale to compare with (a Gaussian NLL may go negative)."""
        if not math.isfinite(loss) or not self.job.accelerator.is_main_process:
            return
        if self.lowest is None or loss < self.lowest[0]:
            self.lowest = (loss, step)
            return
        low, low_step = self.lowest
        if low <= 0 or loss < DIVERGENCE_FACTOR * max(low, self.warned_at):
            return
        self.warned_at = loss
        optim = self.job.cfg.optim
        clip = "" if optim.grad_clip else "; optim.grad_clip=0 clips nothing (e.g. optim.grad_clip=1.0)"
        tqdm.write(
            f"dist-gru: warning: loss {loss:.4g} at step {step} is {loss / low:.3g}x the lowest so far ({low:.4g} at "
            f"step {low_step}): optim.lr={optim.lr:g} ({lr:.3g} now) may be too high{clip}"
        )


def first_nonfinite_sample(batches: list[dict]) -> tuple[int, str] | None:
    """(dataset index, "inputs" | "targets") of the first sample with a NaN or infinity, or None."""
    for batch in batches:
        for part, key in (("inputs", "x"), ("targets", "y")):
            values = batch[key]
            if not values.is_floating_point():
                continue  # token ids and class labels are integers
            bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
            if bool(bad.any()):
                return int(batch["index"][int(bad.nonzero()[0, 0])]), part
    return None
