"""The run folder is a contract: what `dist-gru train` does with `train.run_dir`, decided before it writes.

    dist-gru train --config configs/adding.yaml train.run_dir=runs/adding                        # auto
    dist-gru train --config configs/adding.yaml train.run_dir=runs/adding train.resume=overwrite

`resolve` runs every check on global rank 0 (reads only) and hands the decision to every rank;
only then does `commit` (rank 0) remove or write anything. So a refused command leaves the folder
as it was, byte for byte. The cases (README, "The run folder"):

- no checkpoint (a new or empty folder, or only broken checkpoints): a fresh run from step 0;
- `train.resume=auto` with a complete checkpoint: resume the newest one, but only when this job's
  trajectory-defining config (`config.trajectory`) equals the one the checkpoint was trained with;
  otherwise a ConfigError names every differing key with both values and the ways forward;
- that checkpoint is at `train.max_steps` and `model/` holds its weights: the run is finished;
  exit 0 with nothing written (a larger `train.max_steps` continues it);
- `train.resume=overwrite`: the earlier run's files (RUN_FILES) are removed, then a fresh run;
- `train.resume=none`: a fresh run, refused in a folder that holds checkpoints (a later `auto`
  would pick the old run's);
- `train.resume=PATH`: that checkpoint (it must be complete and fit), into its own run folder or
  one without checkpoints, so two runs' checkpoints never share a folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import broadcast_object_list
from pydantic import ValidationError
from safetensors.torch import load_file

from dist_gru import checkpoint as ckpt_lib
from dist_gru import finetune
from dist_gru.checkpoint import Checkpoint, CheckpointError
from dist_gru.config import Config, ConfigError, trajectory

log = logging.getLogger(__name__)

OVERWRITE = "overwrite"
# What a run writes into its folder, and so what `train.resume=overwrite` removes. checkpoints/
# goes first: until it is gone, an interrupted overwrite still leaves the whole old run. W&B's own
# folder stays: its runs are named by run id (the new run gets a new one) and may not be uploaded yet.
RUN_FILES = (
    "checkpoints",
    "model",
    "metrics.jsonl",
    ckpt_lib.PREEMPTED,
    "wandb_run_id",
    "samples",
    "tensorboard",
    "plots",
    "best",
    finetune.RECORD,
    "config.yaml",
)
_START_OVER = (
    f"start over in this folder with train.resume={OVERWRITE} (it removes the earlier run's checkpoints/, "
    f"model/, metrics.jsonl, {ckpt_lib.PREEMPTED} and wandb_run_id; wandb/ is kept), or use another train.run_dir"
)


@dataclass
class Plan:
    """What rank 0 decided for the run folder; every rank receives it."""

    resume: Checkpoint | None = None  # the checkpoint to resume (verified on the rank that holds it)
    finished: bool = False  # nothing to train and nothing to write
    remove: list[str] = field(default_factory=list)  # RUN_FILES entries to remove first (overwrite)
    message: str = ""  # what rank 0 prints about the decision


def saved_config(ckpt: Checkpoint) -> tuple[dict[str, Any] | None, str]:
    """The config a checkpoint was trained with and where it came from.

    Checkpoints store it in state.json. Older ones do not; their run folder's config.yaml stands in.
    Keys added to the config after the checkpoint was written take their defaults (a new key's
    default keeps the old behaviour), so a resume across such an upgrade compares like with like.
    """
    tree, source = ckpt.state.get("config"), "its state.json"
    if tree is None:
        legacy = ckpt.path.parent.parent / "config.yaml"
        try:
            tree, source = yaml.safe_load(legacy.read_text()), str(legacy)
        except (OSError, yaml.YAMLError):
            return None, ""
    try:
        return Config.model_validate(tree).to_dict(), source
    except ValidationError:
        return tree if isinstance(tree, dict) else None, source


def trajectory_differences(ckpt: Checkpoint, cfg: Config) -> list[str]:
    """`key: checkpoint has A, this job has B` for every trajectory-defining key that differs."""
    tree, _ = saved_config(ckpt)
    if tree is None:
        return []
    saved, wanted = trajectory(tree), trajectory(cfg.to_dict())
    return [
        f"{key}: checkpoint has {_show(saved.get(key, _MISSING))}, this job has {_show(wanted.get(key, _MISSING))}"
        for key in sorted(saved.keys() | wanted.keys())
        if saved.get(key, _MISSING) != wanted.get(key, _MISSING)
    ]


_MISSING = object()


def _show(value: Any) -> str:
    return "(no such key)" if value is _MISSING else repr(value)


def _model_is_from(run_dir: Path, ckpt: Checkpoint) -> bool:
    """Whether `<run_dir>/model` holds exactly the checkpoint's weights (the run reached its end)."""
    try:
        final, saved = load_file(run_dir / "model" / "model.safetensors"), load_file(ckpt.path / "model.safetensors")
    except Exception:  # noqa: BLE001 - missing or unreadable: the end of the run has to be redone
        return False
    return final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)


def decide(cfg: Config, run_dir: Path) -> Plan:
    """Every check of the run folder, reading only (global rank 0). Raises ConfigError / CheckpointError."""
    mode, max_steps = cfg.train.resume, cfg.train.max_steps
    existing = ckpt_lib.list_checkpoints(run_dir)
    if mode == OVERWRITE:
        remove = [name for name in RUN_FILES if os.path.lexists(run_dir / name)]
        if not {"checkpoints", "config.yaml", "metrics.jsonl", "wandb_run_id"} & set(remove):
            remove = []  # not a run folder: a `model/` or `plots/` there is someone else's
        remove += sorted(p.name for p in Path(run_dir).glob(".overwritten-*"))  # an overwrite interrupted
        message = f"dist-gru: train.resume={OVERWRITE}: removing the earlier run in {run_dir} ({', '.join(remove)})"
        return Plan(remove=remove, message=message if remove else "")
    if mode == "none":
        if existing:
            raise ConfigError(
                f"train.resume=none, but {run_dir} holds checkpoints of an earlier run "
                f"({', '.join(p.name for p in existing)}): a later train.resume=auto would resume them "
                f"instead of this run's. To train from step 0: {_START_OVER}"
            )
        return Plan()
    if mode == "auto":
        chosen = ckpt_lib.find_latest(run_dir)
        if chosen is None:
            return Plan()
    else:
        chosen = ckpt_lib.verify(Path(mode))
        if existing and chosen.path.resolve().parent.parent != Path(run_dir).resolve():
            raise ConfigError(
                f"train.resume={mode} is a checkpoint of another run folder, but {run_dir} holds checkpoints "
                f"of its own ({', '.join(p.name for p in existing)}): the two runs would mix. Resume it into a "
                f"train.run_dir without checkpoints, or {_START_OVER}"
            )

    if saved_config(chosen)[0] is None:
        log.warning("checkpoint %s records no config (an older version wrote it): only its model shape is checked", chosen.path)
    differences = trajectory_differences(chosen, cfg)
    if differences:
        _, source = saved_config(chosen)
        raise ConfigError(
            f"checkpoint {chosen.path} does not fit this job: it was trained with another configuration "
            f"(from {source}), and resuming it would mix two runs:\n  "
            + "\n  ".join(differences)
            + f"\nTo continue that run, give these keys the checkpoint's values. To train this configuration, "
            f"{_START_OVER}."
        )
    if chosen.step > max_steps:
        raise ConfigError(
            f"train.max_steps={max_steps}, but checkpoint {chosen.path} is at step {chosen.step} already: a run "
            f"cannot be shortened. Give train.max_steps >= {chosen.step} to continue it, or {_START_OVER}"
        )
    if chosen.step == max_steps and _model_is_from(run_dir, chosen):
        return Plan(
            resume=chosen,
            finished=True,
            message=(
                f"dist-gru: {run_dir} holds a finished run: checkpoint {chosen.path} is at train.max_steps="
                f"{max_steps} and {run_dir / 'model'} holds its weights. Nothing to do, nothing written. "
                f"A larger train.max_steps continues it; to train it again, {_START_OVER}."
            ),
        )
    stopped = (chosen.state.get("selection") or {}).get("stopped")
    if stopped and _model_is_from(run_dir, chosen):
        return Plan(
            resume=chosen,
            finished=True,
            message=(
                f"dist-gru: {run_dir} holds a finished run: it ended at checkpoint {chosen.path} ({stopped}) and "
                f"{run_dir / 'model'} holds its weights. Nothing to do, nothing written. To train on from its "
                f"weights, start a new run with train.init_from={run_dir / 'model'}; to train it again, {_START_OVER}."
            ),
        )
    return Plan(resume=chosen)


def resolve(cfg: Config, run_dir: Path, accelerator) -> Plan:
    """Global rank 0 decides (`decide`); every rank gets the same plan or the same error (all ranks
    participate). Every rank then reads the chosen checkpoint itself, so the run folder must be on
    storage every node can read; rank 0 has verified it already (sha256 of every file): not twice."""
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            payload[0] = decide(cfg, run_dir)
        except (ConfigError, CheckpointError) as exc:
            payload[0] = exc  # an error must stop every rank, not only this one
    if accelerator.num_processes > 1:
        broadcast_object_list(payload)
    plan = payload[0]
    if isinstance(plan, Exception):
        raise plan
    if plan.resume is not None and not accelerator.is_main_process:
        try:
            plan.resume = ckpt_lib.verify(plan.resume.path)
        except CheckpointError as exc:
            raise CheckpointError(f"rank {accelerator.process_index} cannot read {exc}") from None
    return plan


def commit(plan: Plan, cfg: Config, run_dir: Path) -> None:
    """Carry out the plan (global rank 0, after every check has passed): remove what an overwrite
    removes, clear an earlier attempt's preemption marker, save the resolved config."""
    if plan.message:
        print(plan.message, flush=True)
    if plan.remove:
        # Each entry is renamed away first (atomic), then deleted: an interrupted overwrite never
        # leaves half a checkpoint folder behind, and a rerun finishes the removal.
        trash = run_dir / f".overwritten-{os.getpid()}"
        trash.mkdir()
        for name in plan.remove:
            os.replace(run_dir / name, trash / name)
        shutil.rmtree(trash)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_lib.clear_preempted(run_dir)  # a marker left by an earlier attempt is not this one's
    tmp = run_dir / f".config.yaml.{os.getpid()}"
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, run_dir / "config.yaml")
    print(cfg.to_yaml(), end="", flush=True)
