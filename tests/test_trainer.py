"""The trainer's pieces in-process: one optimizer step's forward/backward against a hand-written
one, and the checkpointer's registry of resumable state."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import save_file

from dist_gru.config import load_config
from dist_gru.train import build
from dist_gru.train.checkpoint import LANES_FILE, Checkpoint, CheckpointError
from dist_gru.train.meter import Meter
from dist_gru.train.nonfinite import LossGuard
from dist_gru.train.stateful import Checkpointer, Count
from dist_gru.train.trainer import forward_backward

IN_PROCESS = [
    *[arg for arg in TINY if arg != "--quiet"],
    "log.mode=disabled",
    "log.quiet=true",
    "checkpoint.signals=[]",  # no handlers installed in the test process
    "train.grad_accum_steps=2",
]


@pytest.fixture
def job(tmp_path: Path):
    job = build(load_config(None, [*IN_PROCESS, f"train.run_dir={tmp_path / 'run'}"]))
    yield job
    job.tracker.finish()
    job.lock.release()


def test_one_step_in_process_equals_a_hand_written_step(job):
    model = job.accelerator.unwrap_model(job.model)
    reference = copy.deepcopy(model)
    epoch, loss, seen = forward_backward(job, 0, job.source.batches(0), LossGuard(job), Meter(job))
    assert epoch == 0 and len(seen) == 2  # two micro-batches of 8: the global batch of 16

    # By hand: the sampling contract's micro-batches of step 0, the mean squared error over the
    # 16 samples of the global batch.
    sampler, train_set = job.source.sampler, job.source.train_set
    total = 0.0
    for j in range(2):
        batch = train_set.__getitems__(sampler.rank_slice(sampler.micro_batch(0, j)))
        assert batch["index"].tolist() == seen[j]["index"].tolist()
        out, _ = reference(batch["x"], batch["lengths"])
        total = total + ((out - batch["y"]) ** 2).sum() / 16
    total.backward()
    assert float(loss) == pytest.approx(float(total.detach()), rel=1e-6)
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_job_registers_every_piece_of_resumable_state(job):
    assert sorted(job.checkpointer.parts) == ["scaler", "selection", "skipped_steps", "tracker_run_id"]
    state = job.checkpointer.state_dict()
    assert state["skipped_steps"] == 0 and state["scaler"] is None  # fp32: no gradient scaler
    assert state["selection"]["evaluated_step"] == -1


def test_a_registered_part_gets_its_state_back_on_resume(tmp_path: Path):
    resume = Checkpoint(tmp_path / "step-000010", {"step": 10, "skipped_steps": 4})
    checkpointer = Checkpointer(resume)
    count = Count()
    checkpointer.register("skipped_steps", count)
    assert count.value == 4
    fresh = Count()
    checkpointer.register("other", fresh)  # the checkpoint has nothing of it: the default
    assert fresh.value == 0
    with pytest.raises(ValueError, match="'other' is registered already"):
        checkpointer.register("other", Count())
    assert Checkpointer(None).state_dict() == {}


class Lanes:
    """A part with a tensor file of its own, whose saved positions do not fit this job."""

    def state_dict(self):
        return {"positions": [[0, 0]]}

    def gather(self, accelerator):
        return torch.zeros(1, 1, 1)

    def load_state_dict(self, state, step, every_lane):
        raise ValueError(f"its lanes stand at other stream positions than this job's at step {step}")


def test_a_part_that_does_not_fit_is_a_checkpoint_error_naming_the_checkpoint(tmp_path: Path):
    (tmp_path / "step-000010").mkdir()
    save_file({"lane_state": torch.zeros(1, 1, 1)}, str(tmp_path / "step-000010" / LANES_FILE))
    checkpointer = Checkpointer(Checkpoint(tmp_path / "step-000010", {"step": 10, "lanes": {}}))
    with pytest.raises(CheckpointError) as info:
        checkpointer.register("lanes", Lanes())
    assert str(info.value) == (
        f"checkpoint {tmp_path / 'step-000010'}: its lanes stand at other stream positions than this job's at step 10"
    )
