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
  `wandb sync` command instead;
- W&B never takes a run down. Online mode starts only when the server answers a TCP connection
  (a compute node without network, a shared ~/.netrc with a key: offline at once, not a timeout);
  `wandb.init` waits at most INIT_TIMEOUT_S (or $WANDB_INIT_TIMEOUT); any failure to start online
  (refused key, server error, timeout) warns once and starts the same run id offline, to be
  uploaded later with `wandb sync`; a tracker that fails offline too, or later while logging, is
  dropped with a warning and metrics.jsonl carries on.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import re
import secrets
import shlex
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dist_gru.config import Config
from dist_gru.train.checkpoint import Checkpoint

WANDB_HOST = "https://api.wandb.ai"
# wandb.init's own default is 90 s; a start-up that waits longer than this will not succeed anyway.
INIT_TIMEOUT_S = 30.0
# A TCP connection to a reachable server opens in milliseconds; an unreachable one fails or hangs.
PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


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

    def state_dict(self) -> str | None:
        """The run id a checkpoint records, so that a resume continues the same W&B run."""
        return self.run_id

    def load_state_dict(self, state: str | None) -> None:
        pass  # read when the tracker starts, before it logs anything (`make_tracker`'s resume)


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


def wandb_server() -> tuple[str, int]:
    """(host, port) of the W&B server wandb would talk to (WANDB_BASE_URL, else the public one)."""
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or WANDB_HOST)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def wandb_server_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the W&B server cannot be reached, or None when a TCP connection to it opens.

    Behind a proxy a direct connection proves nothing: None, and wandb.init's timeout bounds the attempt.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    host, port = wandb_server()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


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
        run_id = resume.state.get("tracker_run_id") or (_read_run_id(path) if path.is_file() else None)
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
        # An edited state.json or a damaged wandb_run_id: the W&B run cannot be continued, the run can.
        _warn(f"the saved W&B run id {str(run_id)[:40]!r} is not a run id; logging under a new one")
        run_id = None
    run_id = run_id or secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


# What W&B takes as a run id (dist-gru draws 8 hex digits): no path, query or URL characters.
_RUN_ID = re.compile(r"[^/\\#?%:\s\ufffd]{1,128}")


def _read_run_id(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace").strip()
    except OSError:
        return ""  # unreadable: a new id


def finite_or_none(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as None (JSON null): strict JSON parsers reject bare NaN / Infinity."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _wandb_settings():
    """Silent unless the user asked wandb for output (WANDB_SILENT / WANDB_QUIET set to anything);
    start-up bounded by INIT_TIMEOUT_S unless the user set WANDB_INIT_TIMEOUT."""
    import wandb

    settings: dict[str, Any] = {}
    if "WANDB_SILENT" not in os.environ and "WANDB_QUIET" not in os.environ:
        settings["silent"] = True
    if "WANDB_INIT_TIMEOUT" not in os.environ:
        settings["init_timeout"] = INIT_TIMEOUT_S
    return wandb.Settings(**settings)


def _stop_wandb() -> None:
    """Forget a W&B start that failed: wandb's service keeps the run id it could not start and would
    refuse it to the offline retry ("run ID ... is in use") until it is torn down."""
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - the service may be gone already; there is nothing left to stop
        pass


def _warn(message: str) -> None:
    print(f"dist-gru: warning: {message}", file=sys.stderr, flush=True)


class RunTracker(Tracker):
    def __init__(self, cfg: Config, accelerator, run_dir: Path, resume: Checkpoint | None):
        self.accelerator = accelerator
        self.metrics_path = run_dir / "metrics.jsonl"
        self._truncate_after(resume.step if resume else 0)
        self.run_id = _run_id(run_dir, resume)
        self.mode = wandb_mode(cfg.log.mode)
        trackers = active_trackers(cfg)
        init_kwargs: dict[str, Any] = {}
        if "wandb" in trackers and self.mode == "online" and (why := wandb_server_unreachable()):
            self.mode = "offline"
            _warn(f"W&B server unreachable ({why}); logging offline as run {self.run_id} (upload it later: wandb sync)")
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
        try:
            self._start(cfg, init_kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever W&B raises (CommError, UsageError, timeouts)
            if "wandb" not in trackers or self.mode != "online":
                self._drop_trackers(exc)
                return
            _warn(
                f"W&B did not start online ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"logging offline as run {self.run_id} (upload it later: wandb sync)"
            )
            for tracker in self.accelerator.trackers:  # the other trackers start again with the offline W&B
                if tracker.name != "wandb":
                    with contextlib.suppress(Exception):
                        tracker.finish()
            _stop_wandb()
            self.mode = init_kwargs["wandb"]["mode"] = "offline"
            try:
                self._start(cfg, init_kwargs)
            except Exception as exc:  # noqa: BLE001
                self._drop_trackers(exc)

    def _start(self, cfg: Config, init_kwargs: dict[str, Any]) -> None:
        self.accelerator.trackers = []  # a failed attempt may have left some behind
        self.accelerator.init_trackers(cfg.log.project, init_kwargs=init_kwargs)
        # The resolved config: nested for W&B (as in config.yaml), flattened for TensorBoard's hparams.
        config = cfg.to_dict()
        for tracker in self.accelerator.trackers:
            tracker.store_init_configuration(flat_config(config) if tracker.name == "tensorboard" else config)

    def _truncate_after(self, step: int) -> None:
        """A resumed run retrains the steps after its checkpoint: drop their stale lines first.

        A process killed mid-write leaves a last line cut short, even mid-character; it (and any
        other unreadable line, UTF-8 or not) is dropped with a warning naming it, instead of failing
        the resume.
        """
        if not self.metrics_path.is_file():
            return
        kept = []
        lines = self.metrics_path.read_bytes().splitlines() if step > 0 else []  # from step 0 nothing is kept
        for number, raw in enumerate(lines, 1):
            line = raw.decode(errors="replace")
            try:
                stale = json.loads(raw.decode())["step"] > step  # UnicodeDecodeError is a ValueError
            except (ValueError, TypeError, KeyError) as exc:
                where = "its last line" if number == len(lines) else f"line {number}"
                _warn(
                    f"{self.metrics_path}: dropping {where}, which is not a metrics record "
                    f"({type(exc).__name__}; cut short by a killed process?): {line[:80]!r}"
                )
                continue
            if not stale:
                kept.append(line)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        metrics = finite_or_none(metrics)
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
        _warn(f"experiment tracker failed ({type(exc).__name__}: {exc}); continuing with {self.metrics_path} only")

    def wandb_folders(self) -> list[Path]:
        """This run id's W&B folders, oldest first (a resumed offline run has one per start)."""
        if self.wandb_dir is None:
            return []
        # Only this mode's folders: an online start that failed leaves a `run-...` folder of its own.
        prefix = "offline-run" if self.mode == "offline" else "run"
        return sorted((self.wandb_dir / "wandb").glob(f"{prefix}-*-{self.run_id}*"))

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
