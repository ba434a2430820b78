"""When to save and stop, decided at a step boundary by every rank together.

Three things ask for a checkpoint outside the step count of `checkpoint.every`:
- a preemption signal (`checkpoint.signals`: SIGUSR1, SIGTERM and SIGINT by default) sent to any
  one rank: every rank saves at the same step and the run exits with the preemption code;
- Ctrl-C is SIGINT, so the first one is such a preemption, announced in one line; a second one
  aborts at once, without a checkpoint (the last complete one stays; saves are atomic);
- the checkpoint clock (`checkpoint.every_minutes`, rank 0's clock): a periodic save, so a crash or
  power cut loses bounded work whatever the step time.

Signal handlers only set a flag (Lightning's handler that saved inside the signal handler failed
intermittently). The agreement costs no blocking collective per step: the all-reduce of the flags
started at one step boundary runs in the background (gloo's worker thread) while the next step
computes, and is read at the next boundary. Every rank reads the same reduced value at the same
step, so all of them save the same step; a signal is acted on one or two steps after it arrives.
The flags travel as a CPU tensor over gloo (a side group next to NCCL on GPUs), so the check never
waits for the GPU's queue of work.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

EXIT_ABORTED = 128 + signal.SIGINT  # what a shell reports for a process ended by Ctrl-C
_received: list[int] = []  # every signal a StepBoundary handled in this process


def signals_received() -> list[int]:
    """The signals this process's step boundary was sent so far (a launcher's stop among them)."""
    return list(_received)


class StepBoundary:
    """Signal flags and the checkpoint clock, agreed on by all ranks at optimizer-step boundaries."""

    def __init__(self, signals: list[str], every_minutes: float):
        self.signum = 0
        self.interrupts = 0
        self.every_s = every_minutes * 60
        self.last_save = time.monotonic()
        self._group = None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._is_main = os.environ.get("RANK", "0") == "0"
        for name in signals:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame) -> None:
        _received.append(signum)
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                _say("dist-gru: interrupted again: stopping now, without a checkpoint (the last complete one stays)")
                os._exit(EXIT_ABORTED)
            if self._is_main:
                _say("dist-gru: interrupted: saving a checkpoint at the next step, then exiting (Ctrl-C again aborts)")
        self.signum = signum

    def saved(self) -> None:
        """A checkpoint was just written: the clock starts again."""
        self.last_save = time.monotonic()

    def agreed(self) -> tuple[bool, bool]:
        """(stop, save): the same on every rank at the same step. All ranks participate.

        stop: some rank was signalled (save, then exit with the preemption code); save: rank 0's
        checkpoint clock ran out."""
        if not dist.is_initialized():
            return bool(self.signum), self._clock_ran_out()
        if self._group is None:  # first call: every rank is here at the same step
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        stop = save = False
        if self._pending is not None:
            work, reduced = self._pending
            self._pending = None
            work.wait()
            stop, save = bool(reduced[0]), bool(reduced[1])
            if stop:
                return True, True  # every rank returns here, so no rank starts another all-reduce
            if save:
                self.saved()  # the save happens now: the clock must not ask for it again below
        flags = torch.tensor([1 if self.signum else 0, 1 if self._is_main and self._clock_ran_out() else 0])
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags)
        return False, save

    def _clock_ran_out(self) -> bool:
        return bool(self.every_s) and time.monotonic() - self.last_save >= self.every_s

    def drain(self) -> None:
        """Wait for the all-reduce in flight (all ranks started it), before the process group goes."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def _say(line: str) -> None:
    """One line on stderr from a signal handler: os.write, since print may be mid-write on this thread."""
    os.write(2, (line + "\n").encode())
