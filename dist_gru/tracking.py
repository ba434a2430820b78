"""Metrics out: `metrics.jsonl`, W&B (offline unless an API key is configured), TensorBoard, console.

Non-main ranks get a `Tracker` that does nothing, so the training loop never asks "am I rank 0?".
The main process (global rank 0) gets a `RunTracker`: every logged dict goes to `metrics.jsonl`
(one JSON object per line, with a `step` key) and to Accelerate's trackers under the same step.

W&B decisions (README "Tracking"):
- the run id lives in `<run_dir>/wandb_run_id` and in every checkpoint; a run resumed from a
  checkpoint continues that W&B run (`resume="allow"`), a run started from step 0 gets a new id
  (its steps restart, which W&B would drop as out of order in the old run);
- W&B writes its `wandb/` folder into `$WANDB_DIR` when the user set it (clusters point it at
  shared storage), else into the run folder;
- W&B is silent on the console (its banner and end-of-run summary are noise next to ours) unless
  the user set `WANDB_SILENT` or `WANDB_QUIET`; our final lines carry the run folder and the
  `wandb sync` command instead.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dist_gru.checkpoint import Checkpoint
from dist_gru.config import Config

WANDB_HOST = "https://api.wandb.ai"


class Tracker:
    """The do-nothing tracker of non-main ranks (and of `log.mode=disabled` for W&B)."""

    run_id: str | None = None
    wandb_dir: Path | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def final_lines(self) -> list[str]:
        """Lines for the end-of-run summary (where the W&B run is, how to sync it)."""
        return []


def api_key_configured() -> bool:
    """Whether wandb would find an API key: WANDB_API_KEY, else the netrc entry of the W&B host.

    The same places wandb looks (NETRC or ~/.netrc, host from WANDB_BASE_URL); the key itself is
    never returned, so it cannot end up in a message.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or WANDB_HOST).netloc
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        auth = None
    return bool(auth and auth[2])


def wandb_mode(cfg_mode: str) -> str:
    """`auto`: online when an API key is configured and WANDB_MODE does not say otherwise, else offline."""
    if cfg_mode != "auto":
        return cfg_mode
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode == "disabled":
        return "disabled"
    if env_mode in ("offline", "dryrun"):
        return "offline"
    return "online" if api_key_configured() else "offline"


def wandb_root(run_dir: Path) -> Path:
    """The folder W&B writes `wandb/` into: $WANDB_DIR when set, else the run folder."""
    user_dir = os.environ.get("WANDB_DIR")
    return Path(user_dir).expanduser() if user_dir else Path(run_dir)


def active_trackers(cfg: Config) -> list[str]:
    """What to pass as Accelerator(log_with=...): decided before the Accelerator exists."""
    return [t for t in cfg.log.trackers if t != "wandb" or wandb_mode(cfg.log.mode) != "disabled"]


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """`{"model": {"hidden_size": 16}}` -> `{"model.hidden_size": 16}`; None and lists as JSON text.

    TensorBoard's hparams take only flat scalars (a nested dict or None raises).
    """
    flat: dict[str, int | float | str | bool] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def _run_id(run_dir: Path, resume: Checkpoint | None) -> str:
    """The checkpoint's run id on resume (else the folder's saved one); a new id for a run from step 0."""
    path = run_dir / "wandb_run_id"
    run_id = None
    if resume is not None:
        run_id = resume.state.get("tracker_run_id") or (path.read_text().strip() if path.is_file() else None)
    run_id = run_id or secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _wandb_settings():
    """Silent unless the user asked wandb for output (WANDB_SILENT / WANDB_QUIET set to anything)."""
    if "WANDB_SILENT" in os.environ or "WANDB_QUIET" in os.environ:
        return None
    import wandb

    return wandb.Settings(silent=True)


class RunTracker(Tracker):
    def __init__(self, cfg: Config, accelerator, run_dir: Path, resume: Checkpoint | None):
        self.accelerator = accelerator
        self.metrics_path = run_dir / "metrics.jsonl"
        self._truncate_after(resume.step if resume else 0)
        self.run_id = _run_id(run_dir, resume)
        self.mode = wandb_mode(cfg.log.mode)
        trackers = active_trackers(cfg)
        init_kwargs: dict[str, Any] = {}
        if "wandb" in trackers:
            self.wandb_dir = wandb_root(run_dir)
            self.wandb_dir.mkdir(parents=True, exist_ok=True)
            init_kwargs["wandb"] = {
                "id": self.run_id,
                "resume": "allow",
                "mode": self.mode,
                "dir": str(self.wandb_dir),
                "name": cfg.log.name,
                "entity": cfg.log.entity,
                "group": cfg.log.group,
                "tags": cfg.log.tags or None,
                "notes": cfg.log.notes,
                "settings": _wandb_settings(),
            }
        self.active = bool(trackers)
        if not self.active:
            return
        accelerator.init_trackers(cfg.log.project, init_kwargs=init_kwargs)
        # The resolved config: nested for W&B (as in config.yaml), flattened for TensorBoard's hparams.
        config = cfg.to_dict()
        for tracker in accelerator.trackers:
            tracker.store_init_configuration(flat_config(config) if tracker.name == "tensorboard" else config)

    def _truncate_after(self, step: int) -> None:
        """A resumed run retrains the steps after its checkpoint: drop their stale lines first."""
        if not self.metrics_path.is_file():
            return
        kept = [
            line for line in self.metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        metrics = _clean(metrics)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.active:
            try:
                self.accelerator.log(metrics, step=step)
            except Exception as exc:  # noqa: BLE001 - any tracker failure
                self._drop_trackers(exc)

    def finish(self) -> None:
        if self.active:
            try:
                # Not accelerator.end_training(): it also destroys the process group, on rank 0 only,
                # while the other ranks still need it; train.main tears the group down on every rank.
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            except Exception as exc:  # noqa: BLE001
                self._drop_trackers(exc)
            self.active = False

    def _drop_trackers(self, exc: Exception) -> None:
        """A tracker that fails must not take the training run down with it: Slurm's SIGTERM to a
        whole job step also kills W&B's service process, and the next log call would then raise
        before the preemption checkpoint is saved. metrics.jsonl keeps every value."""
        self.active = False
        print(
            f"dist-gru: warning: experiment tracker failed ({type(exc).__name__}: {exc}); "
            f"continuing with {self.metrics_path} only",
            file=sys.stderr,
            flush=True,
        )

    def wandb_folders(self) -> list[Path]:
        """This run id's W&B folders, oldest first (a resumed offline run has one per start)."""
        if self.wandb_dir is None:
            return []
        return sorted((self.wandb_dir / "wandb").glob(f"*run-*-{self.run_id}*"))

    def final_lines(self) -> list[str]:
        if self.wandb_dir is None:
            return []
        folders = self.wandb_folders()
        where = folders[-1] if folders else self.wandb_dir / "wandb"
        lines = [f"  W&B run:      {where} (id {self.run_id}, {self.mode})"]
        if self.mode == "online" and self.active:
            lines.append(f"  W&B url:      {self.accelerator.get_tracker('wandb', unwrap=True).url}")
        if self.mode == "offline":
            # A glob over every start of this run id: `wandb sync --id` uploads them to one run, in order.
            pattern = shlex.quote(str(self.wandb_dir / "wandb")) + f"/offline-run-*-{self.run_id}*"
            lines.append(f"  W&B sync:     wandb sync --id {self.run_id} {pattern}")
        return lines


def make_tracker(cfg: Config, accelerator, run_dir: Path, resume: Checkpoint | None) -> Tracker:
    """The one place that decides who tracks: global rank 0 only."""
    if accelerator.is_main_process:
        return RunTracker(cfg, accelerator, run_dir, resume)
    return Tracker()
