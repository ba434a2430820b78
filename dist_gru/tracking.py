"""Metrics out: `metrics.jsonl`, W&B (offline unless an API key is configured), TensorBoard, console.

Non-main ranks get a `Tracker` that does nothing, so the training loop never asks "am I rank 0?".
The main process (global rank 0) gets a `RunTracker`: every logged dict goes to `metrics.jsonl`
(one JSON object per line, with a `step` key) and to Accelerate's trackers under the same step.

The W&B run id is created once per run folder and kept in `<run_dir>/wandb_run_id` and in every
checkpoint, so a resumed, restarted or requeued job continues the same run (`resume="allow"`).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
from pathlib import Path
from typing import Any

from dist_gru.checkpoint import Checkpoint
from dist_gru.config import Config


class Tracker:
    """The do-nothing tracker of non-main ranks (and of `log.mode=disabled` for W&B)."""

    run_id: str | None = None
    wandb_dir: Path | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_mode(cfg_mode: str) -> str:
    """`auto`: online when an API key is configured and WANDB_MODE does not say otherwise, else offline."""
    if cfg_mode != "auto":
        return cfg_mode
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode in ("offline", "disabled", "dryrun"):
        return "disabled" if env_mode == "disabled" else "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        auth = None
    return "online" if auth and auth[2] else "offline"


def _run_id(run_dir: Path, from_checkpoint: str | None) -> str:
    """The run folder's tracker run id: the resumed checkpoint's, else the saved one, else a new one."""
    path = run_dir / "wandb_run_id"
    run_id = from_checkpoint or (path.read_text().strip() if path.is_file() else secrets.token_hex(4))
    path.write_text(run_id + "\n")
    return run_id


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class RunTracker(Tracker):
    def __init__(self, cfg: Config, accelerator, run_dir: Path, resume: Checkpoint | None):
        self.accelerator = accelerator
        self.metrics_path = run_dir / "metrics.jsonl"
        self._truncate_after(resume.step if resume else 0)
        self.run_id = _run_id(run_dir, resume.state.get("tracker_run_id") if resume else None)
        mode = wandb_mode(cfg.log.mode)
        trackers = active_trackers(cfg)
        init_kwargs: dict[str, Any] = {}
        if "wandb" in trackers:
            self.wandb_dir = run_dir
            init_kwargs["wandb"] = {
                "id": self.run_id,
                "resume": "allow",
                "mode": mode,
                "dir": str(run_dir),
                "name": cfg.log.name,
                "entity": cfg.log.entity,
                "group": cfg.log.group,
                "tags": cfg.log.tags or None,
                "notes": cfg.log.notes,
            }
        if trackers:
            accelerator.init_trackers(cfg.log.project, config=cfg.to_dict(), init_kwargs=init_kwargs)
        self.active = bool(trackers)

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
            self.accelerator.log(metrics, step=step)

    def finish(self) -> None:
        if self.active:
            self.accelerator.end_training()
            self.active = False


def make_tracker(cfg: Config, accelerator, run_dir: Path, resume: Checkpoint | None) -> Tracker:
    """The one place that decides who tracks: global rank 0 only."""
    if accelerator.is_main_process:
        return RunTracker(cfg, accelerator, run_dir, resume)
    return Tracker()


def active_trackers(cfg: Config) -> list[str]:
    """What to pass as Accelerator(log_with=...): decided before the Accelerator exists."""
    return [t for t in cfg.log.trackers if t != "wandb" or wandb_mode(cfg.log.mode) != "disabled"]
