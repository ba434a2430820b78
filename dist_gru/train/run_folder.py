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
- in every mode, a folder holding entries of RUN_FILES' names that its manifest (`.dist-gru-run`,
  which `commit` writes first) does not list is refused: they are someone else's files;
- a resume onto training data other than the checkpoint's (its fingerprint in state.json) is refused;
- `train.resume=none`: a fresh run, refused in a folder that holds checkpoints (a later `auto`
  would pick the old run's);
- `train.resume=PATH`: that checkpoint (it must be complete and fit), into its own run folder or
  one without checkpoints, so two runs' checkpoints never share a folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

from dist_gru.config import Config, ConfigError, trajectory
from dist_gru.data.files import DataFormatError
from dist_gru.data.loading import training_data_fingerprint
from dist_gru.runtime import main_decides
from dist_gru.train import checkpoint as ckpt_lib
from dist_gru.train import finetune
from dist_gru.train.checkpoint import Checkpoint, CheckpointError

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
# A run claims its folder first: `<run_dir>/.dist-gru-run` lists the RUN_FILES names the run owns.
# An entry of those names that no run owns is someone else's, and no run writes over it or removes it.
MANIFEST = ".dist-gru-run"
MANIFEST_FORMAT = "dist_gru.run/v1"
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
    owns: list[str] = field(default_factory=lambda: list(RUN_FILES))  # what the manifest lists


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


def data_differences(ckpt: Checkpoint, cfg: Config) -> list[str]:
    """`data.train: KEY was A, is B` for every field of the data fingerprint that differs between the
    checkpoint's state.json and the data now at the job's path. A checkpoint without a fingerprint
    (an older release) or data that cannot be read now (the dataset loader names the problem) is
    not compared."""
    saved = ckpt.state.get("data")
    if not isinstance(saved, dict):
        return []
    try:
        now = training_data_fingerprint(cfg.data)
    except DataFormatError:
        return []
    lines = []
    for split in sorted(saved.keys() | now.keys()):
        old, new = saved.get(split), now.get(split)
        old, new = old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}
        lines += [
            f"data.{split}: {key} was {_show(old.get(key, _MISSING))}, is {_show(new.get(key, _MISSING))}"
            for key in sorted(old.keys() | new.keys())
            if old.get(key, _MISSING) != new.get(key, _MISSING)
        ]
    return lines


def check_same_data(ckpt: Checkpoint, cfg: Config) -> None:
    """Refuse to resume a checkpoint onto other training data than it was trained on (ConfigError)."""
    changed = data_differences(ckpt, cfg)
    if changed:
        raise ConfigError(
            f"checkpoint {ckpt.path} was trained on other data than this job's (the fingerprint in its "
            f"state.json: meta.json and file sizes), and resuming it would mix two datasets:\n  "
            + "\n  ".join(changed)
            + f"\nTo continue that run, put its data back at that path. To train on this data, {_START_OVER}."
        )


def _model_is_from(run_dir: Path, ckpt: Checkpoint) -> bool:
    """Whether `<run_dir>/model` holds exactly the checkpoint's weights (the run reached its end)."""
    try:
        final, saved = load_file(run_dir / "model" / "model.safetensors"), load_file(ckpt.path / "model.safetensors")
    except Exception:  # noqa: BLE001 - missing or unreadable: the end of the run has to be redone
        return False
    return final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)


def check_run_dir(run_dir: Path) -> None:
    """The run folder is a folder, or can be made as one: a ConfigError before anything is written."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir={run_dir}: not a folder (a file is in the way); give a folder's path")
    parent = run_dir
    while not parent.exists() and parent != parent.parent:  # a path under a file "does not exist" either
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"train.run_dir={run_dir}: {parent} is not a folder, so the run folder cannot be made there; "
            "give a path under a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"train.run_dir={run_dir}: {parent} is not writable; give a run folder you can write to")


def owned_entries(run_dir: Path) -> tuple[list[str], list[str]]:
    """(RUN_FILES names this folder's run owns, names present that no dist-gru run wrote here).

    With a manifest, what it lists is owned, and so is every name absent now (the run may write
    it). Without one (a new folder, or a run of an older release), a folder that holds a checkpoint
    or a metrics record of an older run is a run folder, and all RUN_FILES are its run's; in any
    other folder, the names present belong to someone else."""
    run_dir = Path(run_dir)
    present = {name for name in RUN_FILES if os.path.lexists(run_dir / name)}
    listed = read_manifest(run_dir)
    if listed is None and _written_by_an_older_run(run_dir):
        listed = list(RUN_FILES)
    foreign = sorted(present - set(listed or ()))
    return [name for name in RUN_FILES if name not in foreign], foreign


def read_manifest(run_dir: Path) -> list[str] | None:
    """The names `<run_dir>/.dist-gru-run` lists (None: no manifest); a broken one is a ConfigError."""
    path = Path(run_dir) / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        manifest = json.loads(path.read_text())
        owns = manifest["owns"] if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None
    except (OSError, ValueError, KeyError) as exc:
        owns, manifest = None, f"{type(exc).__name__}: {exc}"
    if not isinstance(owns, list) or not all(isinstance(name, str) for name in owns):
        raise ConfigError(
            f"{path}: not a dist-gru run manifest ({str(manifest)[:80]}); it should list what the run in "
            f"{run_dir} wrote (JSON: format {MANIFEST_FORMAT!r}, owns [names]). Restore it, or delete it if "
            "that folder holds no files of yours, or use another train.run_dir"
        )
    return owns


def _written_by_an_older_run(run_dir: Path) -> bool:
    """A checkpoint whose state.json has a step, or a metrics.jsonl whose first line is a record:
    only dist-gru writes those, so the folder is a run folder (of a release without manifests)."""
    for path in ckpt_lib.list_checkpoints(run_dir):
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and isinstance(state.get("step"), int):
            return True
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as f:
            record = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("step"), int)


def decide(cfg: Config, run_dir: Path) -> Plan:
    """Every check of the run folder, reading only (global rank 0). Raises ConfigError / CheckpointError."""
    check_run_dir(run_dir)
    owns, foreign = owned_entries(run_dir)
    if foreign:
        shown = ", ".join(name + ("/" if (Path(run_dir) / name).is_dir() else "") for name in foreign)
        raise ConfigError(
            f"train.run_dir={run_dir} holds {shown}, which no dist-gru run wrote (its {MANIFEST} manifest does not "
            f"list them, or it has none), and a run writes entries of these names. Nothing was changed. Move them "
            f"out of the folder, or use another train.run_dir (a new or empty folder)"
        )
    plan = _decide(cfg, Path(run_dir))
    plan.owns = owns
    return plan


def _decide(cfg: Config, run_dir: Path) -> Plan:
    mode, max_steps = cfg.train.resume, cfg.train.max_steps
    existing = ckpt_lib.list_checkpoints(run_dir)
    if mode == OVERWRITE:
        # Every RUN_FILES name present is the run's own here: `decide` refused a folder with any other.
        remove = [name for name in RUN_FILES if os.path.lexists(run_dir / name)]
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
    check_same_data(chosen, cfg)
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
    plan: Plan | Exception | None = None
    if accelerator.is_main_process:
        try:
            plan = decide(cfg, run_dir)
        except (ConfigError, CheckpointError) as exc:
            plan = exc  # an error must stop every rank, not only this one
    plan = main_decides(accelerator, plan)
    if plan.resume is not None and not accelerator.is_main_process:
        try:
            plan.resume = ckpt_lib.verify(plan.resume.path)
        except CheckpointError as exc:
            raise CheckpointError(f"this rank cannot read {exc}") from None  # printed by this rank, named
    return plan


def commit(plan: Plan, cfg: Config, run_dir: Path) -> None:
    """Carry out the plan (global rank 0, after every check has passed): claim the folder (its
    manifest, first), remove what an overwrite removes, clear an earlier attempt's preemption
    marker, save the resolved config. A folder that cannot be written is a ConfigError."""
    if plan.message:
        print(plan.message, flush=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(run_dir / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "owns": plan.owns}, indent=2) + "\n")
        if plan.remove:
            # Each entry is renamed away first (atomic), then deleted: an interrupted overwrite never
            # leaves half a checkpoint folder behind, and a rerun finishes the removal.
            trash = run_dir / f".overwritten-{os.getpid()}"
            trash.mkdir()
            for name in plan.remove:
                os.replace(run_dir / name, trash / name)
            shutil.rmtree(trash)
        ckpt_lib.clear_preempted(run_dir)  # a marker left by an earlier attempt is not this one's
        if cfg.train.run_lock:  # held: no other job is saving here, so every unfinished save is a leftover
            ckpt_lib.remove_unfinished(run_dir)
        _write_atomically(run_dir / "config.yaml", cfg.to_yaml())
    except OSError as exc:
        raise ConfigError(f"train.run_dir={run_dir}: cannot write the run folder ({exc.strerror or exc}: {exc.filename})") from None
    print(cfg.to_yaml(), end="", flush=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
