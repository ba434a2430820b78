"""A study folder: the search it runs, its Optuna storage, its trials' run folders and their claims.

    DIR/study.json      what the study is: search space, metric and direction, storage (written once)
    DIR/base.yaml       the base config every trial starts from (resolved: defaults, file, overrides)
    DIR/journal.log     the Optuna journal (unless an RDB URL was given): every worker appends to it
    DIR/trials/NNNN/    trial NNNN's run folder: an ordinary dist-gru run (config.yaml, checkpoints/,
                        model/, metrics.jsonl), resumable like any other
    DIR/logs/NNNN.log   what the trial's processes printed
    DIR/claims/NNNN.lock  held (flock) by the worker running trial NNNN while it runs
    DIR/study.lock      held (flock) while a worker asks for or claims a trial

Storage on a shared file system: Optuna's `JournalStorage` with `JournalFileOpenLock`, whose lock
file is made with O_EXCL (safe on NFSv3+) and taken over after a grace period when a killed
process left it behind. SQLite is not offered (it corrupts on NFS under concurrent writers); an
RDB URL (`--storage postgresql://...`) is the option for sites that run a database.

Who runs which trial is decided by `flock` on claim files, which the kernel releases when the
holder dies, even by SIGKILL (NFS clients map flock to byte-range locks the server tracks). A trial
that the study lists as RUNNING but whose claim nobody holds lost its worker: the next worker
claims it and runs the same run folder again, which resumes from its last checkpoint. Asking for a
new trial and claiming it happen under the study lock, so no worker can mistake a trial that was
just asked for (not yet claimed) for an abandoned one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_gru.config import Config, ConfigError, load_config
from dist_gru.runtime import LaunchError
from dist_gru.tune.space import Space, baseline_params, space_from_dict

STUDY_FILE = "study.json"
BASE_FILE = "base.yaml"
JOURNAL = "journal.log"
STUDY_LOCK = "study.lock"
TRIALS, LOGS, CLAIMS = "trials", "logs", "claims"
FORMAT = "dist_gru.study/v1"


class StudyMismatch(ConfigError):
    """A study folder that holds another search (space, base config or storage)."""


@dataclass
class Claim:
    """A trial this worker runs: its number, parameters and the held claim file."""

    number: int
    params: dict[str, Any]
    fd: int
    resumed: bool

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor drops the flock


class StudyFolder:
    """An opened study folder (`create` or `open`); `study()` is the Optuna study in its storage."""

    def __init__(self, path: Path, spec: dict[str, Any]):
        self.path, self.spec = path, spec
        self.space: Space = space_from_dict(spec["space"], f"{path / STUDY_FILE}")

    # --- what the study is ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def metric(self) -> str:
        return self.spec["metric"]

    @property
    def direction(self) -> str:
        return self.spec["direction"]

    def base_config(self) -> Config:
        return load_config(self.path / BASE_FILE)

    def base_tree(self) -> dict[str, Any]:
        return self.base_config().to_dict()

    def trial_dir(self, number: int) -> Path:
        return self.path / TRIALS / f"{number:04d}"

    def log_path(self, number: int) -> Path:
        return self.path / LOGS / f"{number:04d}.log"

    # --- storage ------------------------------------------------------------------------------

    def storage(self) -> Any:
        import optuna
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        url = self.spec.get("storage")
        if url:
            return optuna.storages.RDBStorage(url)
        journal = str(self.path / JOURNAL)
        return optuna.storages.JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal)))

    def trial_id(self, storage: Any, number: int) -> int:
        """The storage's id of trial `number` (what its public per-trial calls take)."""
        return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.name), number)

    def study(self, storage: Any = None) -> Any:
        """The Optuna study with this folder's sampler and pruner."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(
            study_name=self.name,
            storage=storage or self.storage(),
            sampler=make_sampler(self.space),
            pruner=make_pruner(self.space, self.base_config().train.max_steps),
        )

    # --- locks --------------------------------------------------------------------------------

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the study lock: one worker at a time asks for or claims a trial."""
        return study_lock(self.path)

    def try_claim(self, number: int) -> int | None:
        """The held claim file of trial `number`, or None when a live worker holds it."""
        fd = _open_lock_file(self.path / CLAIMS / f"{number:04d}.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


@contextlib.contextmanager
def study_lock(path: Path) -> Iterator[None]:
    """Hold the study lock of the folder `path` (blocking until it is free)."""
    fd = _open_lock_file(path / STUDY_LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LaunchError(f"study lock {path}: cannot open it ({exc.strerror}); {LOCK_HINT}") from None


LOCK_HINT = "the study folder must be a writable folder on a file system with working locks (local, or NFSv3+ with locking)"


def check_lockable(path: Path) -> None:
    """Refuse a study folder whose locks cannot work, before anything is written there: the study
    lock must be an flock-able file, and the journal's O_EXCL lock file name must be free or a
    file (a folder there would make every writer wait forever)."""
    for name in (STUDY_LOCK, JOURNAL + ".lock"):
        target = path / name
        if target.exists() and not target.is_file():
            raise LaunchError(f"study lock {target}: is not a file; {LOCK_HINT}")
    lock = path / STUDY_LOCK
    if lock.exists():
        fd = _open_lock_file(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError as exc:
            raise LaunchError(f"study lock {lock}: flock fails ({exc.strerror}); {LOCK_HINT}") from None
        finally:
            os.close(fd)


def make_sampler(space: Space, offset: int = 0) -> Any:
    """The space's sampler, its seed (if any) moved by `offset` (the number of the trial it draws)."""
    import optuna

    s = space.sampler
    seed = None if s.seed is None else s.seed + offset
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.startup_trials)


def make_pruner(space: Space, max_steps: int) -> Any:
    """The pruner of the space; its steps are training steps (trials report at their evaluations)."""
    import optuna

    p = space.pruner
    pruners = {
        "none": lambda: optuna.pruners.NopPruner(),
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps),
        "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_steps, reduction_factor=p.reduction_factor),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(
            min_resource=p.min_steps, max_resource=max_steps, reduction_factor=p.reduction_factor
        ),
        "threshold": lambda: optuna.pruners.ThresholdPruner(lower=p.lower, upper=p.upper),
    }
    return pruners[p.name]()


def read_spec(path: Path) -> dict[str, Any] | None:
    """The folder's study.json, or None when it is no study folder yet."""
    file = path / STUDY_FILE
    if not file.exists():
        return None
    try:
        spec = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--study {path}: {STUDY_FILE} is unreadable ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ConfigError(f"--study {path}: {STUDY_FILE} is not a {FORMAT} study description")
    return spec


def open_existing(path: Path) -> StudyFolder:
    spec = read_spec(path)
    if spec is None:
        raise ConfigError(f"--study {path}: no study there ({STUDY_FILE} missing); start one with --config and --space")
    return StudyFolder(path, spec)


def open_study(path: Path, config: str | None, overrides: list[str], space_path: str | None, storage: str | None) -> StudyFolder:
    """The study in `path`: created from `config` + `space_path` when the folder holds none yet, or
    joined (the given config and space, if any, must be the ones it was made with). Everything is
    checked before the folder changes; two workers starting at once create it once."""
    spec = read_spec(path)
    if spec is not None:
        check_lockable(path)
    if spec is not None and space_path is None and config is None and not overrides:
        return StudyFolder(path, spec)
    if space_path is None:
        raise ConfigError(f"--study {path}: no study there ({STUDY_FILE} missing); start one with --config and --space")
    from dist_gru.tune.space import check_space, read_space

    space = read_space(space_path)
    cfg = load_config(config, overrides)
    check_space(space, config, overrides, f"--space {space_path}")
    wanted = new_spec(path, space, cfg, storage)
    if spec is None and path.exists() and (not path.is_dir() or any(p.name != STUDY_LOCK for p in path.iterdir())):
        # A worker creating the study here makes study.lock first and holds it until study.json is written.
        spec = _after_creation(path) if (path / STUDY_LOCK).is_file() else None
        if spec is None:
            raise ConfigError(f"--study {path}: exists and is not a study folder (no {STUDY_FILE}); choose a new folder")
    if spec is not None:
        _check_same_study(path, spec, wanted, cfg)
        return StudyFolder(path, spec)
    if path.exists():
        check_lockable(path)
    return _create(path, wanted, cfg)


def new_spec(path: Path, space: Space, cfg: Config, storage: str | None) -> dict[str, Any]:
    metric, direction = resolve_objective(space, cfg)
    return {
        "format": FORMAT,
        "name": path.resolve().name,
        "space": space.model_dump(mode="json"),
        "metric": metric,
        "direction": direction,
        "storage": storage,
    }


def resolve_objective(space: Space, cfg: Config) -> tuple[str, str]:
    """(metric, minimize | maximize): the space's metric, checked against what the base config's
    model logs, or the task's main metric."""
    from dist_gru.data.loading import build_dataset
    from dist_gru.tasks import model_kwargs, task_for
    from dist_gru.train.selection import direction

    if build_dataset(cfg.data, "val", cfg.model.head) is None:
        raise ConfigError("a search compares evaluations: the base config needs a validation split (data.val_size or data.val_path)")
    if space.pruner.name != "none" and not cfg.train.eval_every and "train.eval_every" not in space.params:
        raise ConfigError(
            f"pruner {space.pruner.name} decides at evaluations, but the base config has train.eval_every=0 "
            "(only a final one): set train.eval_every, or pruner: {name: none}"
        )
    task = task_for(model_kwargs(cfg, build_dataset(cfg.data, "train", cfg.model.head)))
    metric = space.metric or f"eval/{task.main_metric}"
    names = task.metric_names()
    if metric.removeprefix("eval/") not in names:
        logged = ", ".join(f"eval/{name}" for name in names)
        raise ConfigError(f"metric={metric}: this model does not log it; its eval metrics are {logged}")
    if space.direction != "auto":
        return metric, space.direction
    return metric, "maximize" if direction(metric, "auto") == "max" else "minimize"


def _check_same_study(path: Path, spec: dict[str, Any], wanted: dict[str, Any], cfg: Config) -> None:
    saved_base = load_config(path / BASE_FILE).to_dict()
    differences = [key for key in ("space", "metric", "direction", "storage") if spec.get(key) != wanted[key]]
    if saved_base != cfg.to_dict():
        differences.append("base config")
    if differences:
        raise StudyMismatch(
            f"--study {path}: this folder holds another search (its {', '.join(differences)} differ from the "
            "given ones); choose a new --study folder, or give only --study to join it as it is"
        )


def _after_creation(path: Path) -> dict[str, Any] | None:
    """study.json once no worker is creating the study in `path` any more: the creator holds the
    study lock from before it makes anything but the folder until study.json is written."""
    with study_lock(path):
        return read_spec(path)


def _make_folder(path: Path, sub: str = "") -> None:
    """The study folder `path`, or its subfolder `sub`; LaunchError naming the study if it cannot be made."""
    try:
        (path / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"--study {path}: cannot create the study folder ({exc.strerror})") from None


def _create(path: Path, spec: dict[str, Any], cfg: Config) -> StudyFolder:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    created = not path.exists()
    _make_folder(path)
    folder = StudyFolder(path, spec)
    with folder.locked():  # before anything else is made here: see _after_creation
        existing = read_spec(path)  # another worker may have created it while this one checked
        if existing is not None:
            _check_same_study(path, existing, spec, cfg)
            return StudyFolder(path, existing)
        try:
            for sub in (TRIALS, LOGS, CLAIMS):
                _make_folder(path, sub)
            (path / BASE_FILE).write_text(cfg.to_yaml())
            study = optuna.create_study(
                study_name=spec["name"], storage=folder.storage(), direction=spec["direction"], load_if_exists=True
            )
            if folder.space.baseline:  # the first trial any worker asks for
                study.enqueue_trial(baseline_params(folder.space, cfg.to_dict()))
        except Exception:
            if created:
                import shutil

                shutil.rmtree(path, ignore_errors=True)  # a refused start leaves no half-made study
            raise
        tmp = path / (STUDY_FILE + ".tmp")
        tmp.write_text(json.dumps(spec, indent=2) + "\n")
        os.replace(tmp, path / STUDY_FILE)  # last: a folder with study.json is a complete study
    return folder
