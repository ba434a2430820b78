"""Every piece of a run's resumable state, registered by name with one checkpointer.

A checkpoint is the model's and optimizer's files plus `state.json`, which holds, under its name,
`state_dict()` of every registered part: the gradient scaler ("scaler"), the steps it skipped
("skipped_steps"), best-model selection and early stopping ("selection"), the tracker's run id
("tracker_run_id"), stream mode's lanes ("lanes", whose carried hidden state is a tensor file of its
own). Everything else a run needs (data position, learning rate, dropout RNG) is a pure function of
the optimizer step. A resumed job gives each part its own state back when the part is registered, so
a part made late (the gradient scaler exists only after Accelerate's `prepare`) is restored then,
and there is one place where restoring happens.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from dist_gru.train.checkpoint import Checkpoint, CheckpointError, load_lanes


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class Checkpointer:
    """The registry; `resume` is the checkpoint this job continues from, or None."""

    def __init__(self, resume: Checkpoint | None):
        self.resume = resume
        self.parts: dict[str, Any] = {}

    def register(self, name: str, part: Any) -> None:
        if name in self.parts:
            raise ValueError(f"{name!r} is registered already")
        self.parts[name] = part
        if self.resume is None:
            return
        state = self.resume.state.get(name)
        try:
            if hasattr(part, "gather"):  # state with a tensor file of its own: stream lanes
                part.load_state_dict(state, self.resume.step, load_lanes(self.resume))
            else:
                part.load_state_dict(state)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {self.resume.path}: {exc}") from None

    def state_dict(self) -> dict[str, Any]:
        """What state.json holds of the registered parts (on global rank 0)."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def gather(self, accelerator: Any) -> torch.Tensor | None:
        """The tensor a part keeps in a file of its own, from every rank. All ranks participate."""
        tensors = [part.gather(accelerator) for part in self.parts.values() if hasattr(part, "gather")]
        return tensors[0] if tensors else None


class Count:
    """A counter that a resume carries on (the gradient scaler's skipped steps)."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> int:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        self.value = int(state or 0)


class ScalerState:
    """fp16's gradient scaler (None in every other precision): the loss scale carries on."""

    def __init__(self, scaler: Any):
        self.scaler = scaler

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
