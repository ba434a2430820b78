"""Atomic checkpoints: `checkpoints/step-NNNNNN/`, written under a temporary name, renamed when complete.

A checkpoint folder holds
    model.safetensors   the model weights (unwrapped)
    optimizer.pt        the optimizer state, read back with torch.load(weights_only=True): no pickle code
    state.json          step, epoch, samples seen, world size, config digest, model config, task,
                        tracker run id, gradient-scaler state, training data fingerprint: a
                        person can read it
    lanes.safetensors   stream mode only: every lane's carried hidden state [lanes, layers, H],
                        indexed by global lane (its positions are in state.json)
    COMPLETE            written last: size and sha256 of every file above

Only global rank 0 writes (weights and optimizer state are identical on every rank under DDP);
every rank reads. Everything else a resume needs is a function of the step: the learning rate
(a schedule of the step), the data position (the sampler's contract) and the RNG (reseeded from
(seed, step, rank) each step), so a checkpoint saved on W ranks resumes on any other W.
Measured (tests/test_resume.py, CPU fp32): resumed on the same W, the final weights equal the
uninterrupted run's exactly (max abs diff 0); resumed on another W, within 1.2e-7 (the gradient
all-reduce sums in another order). Dropout masks are keyed by (seed, step, sample), not drawn
from a rank's RNG (dist_gru/model/dropout.py), so this holds with dropout too.

A folder without a valid COMPLETE marker (a crash mid-save, a truncated or edited file) is never
loaded: `auto` resume warns and falls back to the previous complete one; an explicit path fails.
Saving a step that exists already moves the old folder aside (`.replaced-step-N-PID`, which counts
as step N while no `step-N` exists), renames the new one into place, then deletes the old one: a
crash at any point leaves a complete checkpoint of that step, even with keep=1. state.json also
holds the whole resolved config, so a resume can name every key in which a new job differs
(dist_gru/train/run_folder.py decides whether the run folder's run may continue).
Loading uses safe loaders only: safetensors for the weights, torch.load(weights_only=True) for the
optimizer state (a pickled object that would run code is refused), JSON for the rest.

Preemption contract (what a scheduler wrapper relies on). A preemption signal (checkpoint.signals,
default SIGUSR1 and SIGTERM) sent to any one rank makes every rank save `step-N` at the next step
boundary; then global rank 0 writes `<run_dir>/PREEMPTED` (JSON: step, checkpoint, signal,
exit_code) and every training process exits with EXIT_PREEMPTED = 75 (sysexits EX_TEMPFAIL). The
marker is removed when a run starts, so after the launcher exits:

    exit 0                      finished
    exit 75 (one process)       preempted, checkpoint saved: requeue (resume=auto continues it)
    other, PREEMPTED present    preempted under torchrun: requeue
    other, no PREEMPTED         failed

torchrun reports the workers' 75 as a failure and exits 1, so under torchrun only the marker tells
the two apart (a wrapper should `rm -f <run_dir>/PREEMPTED` before it launches, so a marker from an
earlier attempt is never mistaken for this one's). Signal the torchrun agent (SIGTERM, as Slurm
does at a time limit or preemption): it forwards TERM to its workers, which save and exit well
inside the agent's 30 s grace, and the agent does not restart them. A signal sent to workers
directly under `--max-restarts K > 0` is a "checkpoint, then restart": the agent restarts the
workers, they resume from that checkpoint, remove the marker and train on.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dist_gru.data.files import follow_umask

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_ASIDE = ".replaced-step-"  # + step + "-" + pid: the old copy of a step being saved again
_FILES = ("model.safetensors", "optimizer.pt", "state.json")
LANES_FILE = "lanes.safetensors"  # optional; listed in the marker when present
PREEMPTED = "PREEMPTED"
# "Preempted, checkpoint saved: run me again" (sysexits EX_TEMPFAIL), distinct from 0 and from failures.
EXIT_PREEMPTED = 75


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded; the message names the folder and the reason."""


class ModelFolderError(CheckpointError):
    """A saved model folder whose files are damaged: every rank that loads it finds the same, so
    rank 0 alone reports it."""

    same_on_every_rank = True


class NonFiniteError(CheckpointError):
    """Weights that must not be saved, exported or trained on: they hold NaN or infinity."""


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming the floating-point tensors that hold NaN or infinity.

    The one check before every save (checkpoints, `best/`, `model/`) and every export: a model
    that diverged must never be written where a resume, `dist-gru predict` or a deployment would
    pick it up as if it were trained."""
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:
        shown = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
        raise NonFiniteError(f"{what}: {len(bad)} of {len(tensors)} tensors hold NaN or infinity ({shown})")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer state's tensors by `parameter/key` (Adam's moments), for `require_finite`."""
    state = optimizer.state_dict()["state"]
    return {f"optimizer {i}/{k}": v for i, entry in state.items() for k, v in entry.items() if torch.is_tensor(v)}


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    lanes: torch.Tensor | None = None,
) -> Path:
    """Write `checkpoints/step-<step>/` atomically and prune to the newest `keep`. Main rank only.

    `lanes`: stream mode's carried state of every lane, written to lanes.safetensors. Refuses
    (NonFiniteError, nothing written) weights, optimizer state or lanes that hold NaN or infinity."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    checked = {**weights, **optimizer_tensors(optimizer), **({"lanes": lanes} if lanes is not None else {})}
    require_finite(checked, f"refusing to save checkpoint {final}")
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    with _writing(tmp, final, "checkpoint"):
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "saved_at": time.time()}, indent=2) + "\n")
        files = _FILES
        if lanes is not None:
            save_file({"lane_state": lanes.detach().contiguous().cpu()}, tmp / LANES_FILE)
            files = (*_FILES, LANES_FILE)
        for name in files:
            _fsync_file(tmp / name)
            follow_umask(tmp / name)  # safetensors writes its files 0600
        marker = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _fsync_file(tmp / MARKER)
    # A re-save of the same step (a signal right after a periodic save, a run completed at its last
    # step) moves the old folder aside under a name `list_checkpoints` still finds: a crash at any
    # point leaves a complete checkpoint of this step.
    replace_folder(tmp, final, root / f"{_ASIDE}{step:06d}-{os.getpid()}")
    prune(run_dir, keep, newest=final)
    return final


def save_model_folder(model: torch.nn.Module, final: Path, extra: dict[str, str] | None = None) -> Path:
    """`model.save_pretrained` into `final` (e.g. RUN/model, RUN/best) atomically, with `extra` text
    files beside it. Main rank only. Non-finite weights are refused (NonFiniteError) and a failed
    write (a full disk) is a CheckpointError; either way nothing changes at `final`."""
    final = Path(final)
    require_finite(model.state_dict(), f"refusing to save {final}")
    tmp = final.with_name(f".{final.name}-tmp-{os.getpid()}")
    with _writing(tmp, final, "the model folder"):
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        replace_folder(tmp, final, final.with_name(f".{final.name}-old-{os.getpid()}"))
    return final


@contextlib.contextmanager
def _writing(tmp: Path, final: Path, what: str) -> Iterator[None]:
    """Writes into the temporary folder `tmp` on the way to `final`: any failure (OSError,
    safetensors' SafetensorError, torch.save's RuntimeError: all I/O) removes `tmp` at once, since
    on a full disk it holds the space a retry needs, and becomes a CheckpointError (`save_failure`)."""
    try:
        yield
    except Exception as exc:
        message = save_failure(final, exc, what)  # measured before the partial folder goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(message) from exc


def save_failure(final: Path, exc: Exception, what: str = "checkpoint") -> str:
    """Why writing checkpoint `final` failed, with the free space of its disk (the usual cause),
    measured before the partial folder is removed.

    safetensors and torch.save report a full disk without its errno (`file write failed`, an
    `inline_container.cc` line), so the free space is what tells."""
    # The first line that says something: some messages open with a blank line (safetensors' refusal
    # of tensors that share memory), and an empty reason would leave only the free space to blame.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else (lines or [repr(exc)])[0]
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        return f"cannot save {what} {final}: {reason}"
    if free < (1 << 20) and os.strerror(errno.ENOSPC) not in reason:
        reason += f" ({os.strerror(errno.ENOSPC)})"
    return (
        f"cannot save {what} {final}: {reason}; the disk that holds {final.parent} has {free} bytes free now. "
        "Free space there (or lower checkpoint.keep, or use a train.run_dir on a larger disk), then run again: "
        "train.resume=auto resumes from the last complete checkpoint"
    )


def replace_folder(tmp: Path, final: Path, aside: Path) -> None:
    """Rename the complete folder `tmp` to `final`, durably, replacing any folder there.

    A folder cannot be renamed onto a non-empty one, and deleting the old one first would leave
    none for a moment; so the old one is renamed to `aside` first and deleted only once the new
    one is in place."""
    moved = False
    if final.exists():
        os.replace(final, aside)
        _fsync_dir(final.parent)
        moved = True
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if moved:
        # The new folder is in place: an old copy that cannot be deleted (unreadable, say) is
        # reported, not fatal; `prune` tries again after the next save.
        shutil.rmtree(aside, ignore_errors=True)
        if aside.exists():
            log.warning("could not remove %s (the replaced copy of %s); remove it by hand", aside, final)


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (a crash after it cannot bring back the old names)."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def verify(path: Path) -> Checkpoint:
    """Check the COMPLETE marker against every file; raise CheckpointError naming what is wrong.

    Anything but a readable, sealed folder whose state.json is an object with an integer step is
    refused the same way, however it got so (a crash, an edit, a permission, a file for a folder)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a folder")
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no {MARKER} marker (an interrupted save?)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} marker ({exc})") from None
    if not isinstance(marker, dict):
        raise CheckpointError(f"checkpoint {path}: its {MARKER} marker holds a JSON {type(marker).__name__}, not an object of files")
    for name in (*_FILES, *([LANES_FILE] if LANES_FILE in marker else [])):
        try:
            _check_sealed(path, name, marker.get(name))
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: {name} is unreadable ({exc.strerror or exc})") from None
    return Checkpoint(path, _read_state(path))


def _check_sealed(path: Path, name: str, expected: Any) -> None:
    """One file of a checkpoint against its marker entry: size, then sha256."""
    file = path / name
    if not isinstance(expected, dict):
        raise CheckpointError(f"checkpoint {path}: its {MARKER} marker has no entry for {name}")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: {name} is missing")
    size = file.stat().st_size
    if size != expected.get("bytes"):
        raise CheckpointError(
            f"checkpoint {path}: {name} has {size} bytes, the marker says {expected.get('bytes')} (truncated?)"
        )
    if sha256_file(file) != expected.get("sha256"):
        raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 in {MARKER} (corrupt)")


def _read_state(path: Path) -> dict[str, Any]:
    """state.json, which must be an object with an integer step (a sealed file can still be an
    edited one: the marker is updated by whoever edits it)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable state.json ({exc})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(
            f"checkpoint {path}: state.json is not a checkpoint state (expected a JSON object with an integer "
            f"step >= 0; got {json.dumps(state)[:80]})"
        )
    wrong = [key for key, kind in _STATE_TYPES.items() if key in state and not isinstance(state[key], kind)]
    if wrong:
        raise CheckpointError(f"checkpoint {path}: state.json has {', '.join(wrong)} of the wrong type (edited?)")
    return state


# The JSON types of the state.json fields a resume reads (absent fields are older checkpoints').
_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "epoch": int,
    "config": dict,
    "model_config": dict,
    "data": dict,
    "selection": (dict, type(None)),
    "scaler": (dict, type(None)),
    "skipped_steps": int,
    "lanes": dict,
}


def _step_of(path: Path) -> int | None:
    """The step of a checkpoint folder name: `step-N`, or `.replaced-step-N-PID` (a re-save's old copy)."""
    name = path.name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    if name.startswith(_ASIDE):
        step, _, pid = name[len(_ASIDE) :].partition("-")
        if step.isdigit() and pid.isdigit():
            return int(step)
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders by step, oldest first (complete or not; temporary folders excluded).

    The old copy a re-save moved aside counts only while its step has no `step-N` folder: then a
    crash came between the two renames of `save_checkpoint`, and it is the checkpoint of that step.
    """
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    try:
        entries = list(root.iterdir())
    except OSError as exc:
        raise CheckpointError(f"cannot list the checkpoints in {root}: {exc.strerror or exc}") from None
    by_step: dict[int, Path] = {}
    for path in sorted(entries, key=lambda p: p.name.startswith(_ASIDE)):  # `step-N` first
        step = _step_of(path)
        if step is not None and path.is_dir():
            by_step.setdefault(step, path)
    return [by_step[step] for step in sorted(by_step)]


def find_latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint; newer broken ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return verify(path)
        except CheckpointError as exc:
            log.warning("skipping %s", exc)
    return None


def prune(run_dir: Path, keep: int, newest: Path | None = None) -> None:
    """Keep the newest `keep` complete checkpoints; never delete the newest complete one, nor `newest`.

    `newest` is the checkpoint just saved. It is not always the highest step: a run resumed from an
    older checkpoint (past a corrupt newer one, or from an explicit path) saves below folders of
    higher steps, and pruning by step alone could then delete the only loadable checkpoint.
    """
    complete = [p for p in list_checkpoints(run_dir) if (p / MARKER).is_file()]
    for path in complete[: max(0, len(complete) - max(keep, 1))]:
        if newest is None or path != Path(newest):
            shutil.rmtree(path, ignore_errors=True)
    remove_unfinished(run_dir, older_than_s=3600)  # left by a crash long ago, not a save in flight
    listed = set(list_checkpoints(run_dir))
    for aside in checkpoint_dir(run_dir).glob(f"{_ASIDE}*"):
        if aside not in listed:  # a crash after a re-save completed: its step-N folder replaces it
            shutil.rmtree(aside, ignore_errors=True)


def remove_unfinished(run_dir: Path, older_than_s: float = 0.0) -> None:
    """Remove `.tmp-step-*` folders older than `older_than_s`: saves cut short by a crash, a kill or
    a second Ctrl-C (never loaded: they have no place in `list_checkpoints`). A job that holds the
    run folder's lock knows no save is in flight and removes them all."""
    for tmp in checkpoint_dir(run_dir).glob(".tmp-step-*"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if time.time() - tmp.stat().st_mtime >= older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)


def check_compatible(ckpt: Checkpoint, expected: dict[str, Any]) -> None:
    """Refuse a checkpoint of another model shape or task, naming every mismatched field.

    A field the checkpoint does not record is newer than the checkpoint: it was trained with that
    field's default, which the trajectory check (run_folder) compares, so it is not a mismatch here.
    The model's `data` (what inference needs to know of the data) is no part of its shape: the
    trajectory check compares the config it comes from.
    """
    saved = {"task": ckpt.state.get("task"), **ckpt.state.get("model_config", {})}
    wrong = [
        f"{k}: checkpoint has {saved.get(k)!r}, this job has {v!r}"
        for k, v in expected.items()
        if k in saved and k != "data" and saved[k] != v
    ]
    if wrong:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this job:\n  " + "\n  ".join(wrong))


def load_weights(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model and optimizer state in place (safe loaders only); CheckpointError names what failed."""
    try:
        weights = load_file(ckpt.path / "model.safetensors")
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad header or size
        raise CheckpointError(f"checkpoint {ckpt.path}: model.safetensors is unreadable ({exc})") from None
    try:
        # weights_only: tensors and plain containers only; a pickled callable (os.system ...) is refused.
        optim_state = torch.load(ckpt.path / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {ckpt.path}: optimizer.pt refused by torch.load(weights_only=True) "
            f"(not plain tensor data): {str(exc).splitlines()[0]}"
        ) from None
    try:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this model/optimizer: {exc}") from None


def load_lanes(ckpt: Checkpoint) -> torch.Tensor:
    """Stream mode's lane state [lanes, layers, H] of a checkpoint; CheckpointError if it has none."""
    file = ckpt.path / LANES_FILE
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint {ckpt.path}: has no {LANES_FILE} (no carried lane state), so it cannot resume stream mode"
        )
    try:
        return load_file(file)["lane_state"]
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: {LANES_FILE} is unreadable ({exc})") from None


def mark_preempted(run_dir: Path, checkpoint: Path, step: int, signum: int) -> Path:
    """Write `<run_dir>/PREEMPTED` after a preemption checkpoint is complete (main rank; see the docstring)."""
    marker = Path(run_dir) / PREEMPTED
    info = {
        "step": step,
        "checkpoint": str(checkpoint),
        # 0: this rank saw no signal itself; a peer's was agreed on.
        "signal": signal.Signals(signum).name if signum else None,
        "exit_code": EXIT_PREEMPTED,
        "time": time.time(),
    }
    tmp = marker.with_name(f".{PREEMPTED}.{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, marker)
    return marker


def clear_preempted(run_dir: Path) -> None:
    """Remove a preemption marker left by an earlier attempt (main rank, when a run starts)."""
    (Path(run_dir) / PREEMPTED).unlink(missing_ok=True)


def read_preempted(run_dir: Path) -> dict[str, Any] | None:
    """The preemption marker's contents, or None when the last attempt was not preempted."""
    marker = Path(run_dir) / PREEMPTED
    return json.loads(marker.read_text()) if marker.is_file() else None
