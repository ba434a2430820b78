"""`dist-gru tune`: trials as ordinary runs in one study folder, any number of workers.

Concurrent workers record each trial once; a worker killed by SIGKILL leaves its trial to the next
worker, which resumes it from its checkpoint (the metrics equal an uninterrupted run's); a pruned
trial stops on every rank at one step; a bad space, another study's folder or a folder whose locks
cannot work gets one error and changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from conftest import PY, Background, assert_ok, assert_refused, cli, read_metrics, run_all, snapshot

from dist_gru.tune.space import Space, space_from_dict, suggest

BASE = {
    "model": {"hidden_size": 8, "num_layers": 1},
    "data": {"name": "adding", "seq_len": 10, "train_size": 256, "val_size": 64},
    "optim": {"warmup_steps": 2},
    "train": {"global_batch_size": 16, "max_steps": 12, "log_every": 4, "eval_every": 4},
    "log": {"mode": "disabled"},
}
SPACE = {
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "params": {"optim.lr": {"low": 1e-3, "high": 1e-2, "log": True}, "model.hidden_size": {"choices": [4, 8]}},
}


def write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def study_files(tmp_path: Path, base: dict = BASE, space: dict = SPACE) -> tuple[Path, Path]:
    return write(tmp_path / "base.yaml", base), write(tmp_path / "space.yaml", space)


def tune_cmd(study: Path, *args: str) -> list[str]:
    return [PY, "-m", "dist_gru", "tune", "--study", str(study), *args]


def trials(study: Path) -> list[optuna.trial.FrozenTrial]:
    from dist_gru.tune.study import open_existing

    return open_existing(study).study().get_trials()


def started(output: str) -> list[int]:
    return [int(line.split()[3].rstrip(":")) for line in output.splitlines() if line.startswith("tune: starting trial")]


# --- the space, in-process ------------------------------------------------------------------------


def test_space_types_conditions_and_overrides_round_trip():
    space = space_from_dict(
        {
            "params": {
                "model.num_layers": {"choices": [1, 2]},
                "model.dropout": {"low": 0.0, "high": 0.5, "when": {"model.num_layers": 2}},
                "model.hidden_size": {"low": 8, "high": 64, "step": 8},
                "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
            }
        },
        "test",
    )
    kinds = {name: p.type for name, p in space.params.items()}
    assert kinds == {"model.num_layers": "categorical", "model.dropout": "float", "model.hidden_size": "int", "optim.lr": "float"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        params = suggest(study.ask(), space, {})
        assert ("model.dropout" in params) == (params["model.num_layers"] == 2), params
        assert params["model.hidden_size"] % 8 == 0 and 8 <= params["model.hidden_size"] <= 64
        seen.add(params["model.num_layers"])
        from dist_gru.config import load_config
        from dist_gru.tune.space import overrides

        cfg = load_config(None, overrides(params))  # every value comes back as the same value
        assert cfg.optim.lr == params["optim.lr"] and cfg.model.hidden_size == params["model.hidden_size"]
    assert seen == {1, 2}


@pytest.mark.parametrize(
    "tree, phrase",
    [
        ({"params": {}}, "params is empty"),
        ({"params": {"optim.lr": {"low": 1.0, "high": 0.1}}}, "must be at most high"),
        ({"params": {"optim.lr": {"low": 0.0, "high": 0.1, "log": True}}}, "log=true needs low > 0"),
        ({"params": {"optim.lr": {"choices": [0.1], "low": 0.1}}}, "either choices or low/high"),
        ({"params": {"optim.lr": {"low": 0.1, "high": 1.0}}, "metric": "loss"}, "expected a logged eval metric"),
        ({"params": {"optim.lr": {"low": 0.1, "high": 1.0}}, "bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_a_malformed_space_is_refused_with_its_reason(tree, phrase):
    from dist_gru.config import ConfigError

    with pytest.raises(ConfigError, match="invalid search space") as err:
        space_from_dict(tree, "--space s.yaml")
    assert phrase in str(err.value)
    assert isinstance(space_from_dict(SPACE, "ok"), Space)


# --- bad input through the real command: one error, exit 2, nothing changed ------------------------


@pytest.mark.parametrize(
    "params, phrases",
    [
        ({"model.bogus": {"low": 1, "high": 2}}, ["params.model.bogus: not a config key"]),
        ({"model.hidden_size": {"low": 0, "high": 8}}, ["params.model.hidden_size: the value 0 is outside", "model.hidden_size"]),
        ({"train.run_dir": {"choices": ["a", "b"]}}, ["params.train.run_dir: set by dist-gru tune"]),
    ],
)
def test_a_space_the_config_rejects_changes_nothing(tmp_path, params, phrases):
    base, space = study_files(tmp_path, space={"params": params})
    before = snapshot(tmp_path)
    result = cli("tune", "--config", str(base), "--space", str(space), "--study", str(tmp_path / "s"), "--trials", "2")
    assert_refused(result, "invalid search space", *phrases)
    assert snapshot(tmp_path) == before


def test_a_study_folder_of_another_search_is_refused(tmp_path):
    base, space = study_files(tmp_path, space={**SPACE, "params": {"optim.lr": {"low": 1e-3, "high": 1e-2}}})
    study = tmp_path / "s"
    assert_ok(cli("tune", "--config", str(base), "--space", str(space), "--study", str(study), "--trials", "1"))
    other = write(tmp_path / "other.yaml", {**SPACE, "params": {"optim.lr": {"low": 1e-4, "high": 1e-2}}})
    before = snapshot(tmp_path)
    result = cli("tune", "--config", str(base), "--space", str(other), "--study", str(study), "--trials", "2")
    assert_refused(result, f"--study {study}: this folder holds another search (its space differ")
    assert snapshot(tmp_path) == before
    result = cli("tune", "--config", str(base), "--space", str(space), "--study", str(study), "--trials", "2", "optim.lr=0.5")
    assert_refused(result, "its base config differ")
    assert snapshot(tmp_path) == before


def test_a_study_folder_whose_locks_cannot_work_is_refused(tmp_path):
    base, space = study_files(tmp_path)
    study = tmp_path / "s"
    (study / "study.lock").mkdir(parents=True)  # not a file: no flock can be taken on it
    before = snapshot(tmp_path)
    result = cli("tune", "--config", str(base), "--space", str(space), "--study", str(study), "--trials", "1")
    assert_refused(result, f"study lock {study / 'study.lock'}: is not a file", "working locks")
    assert snapshot(tmp_path) == before


def test_a_baseline_study_runs_the_base_config_first(tmp_path):
    base, space = study_files(tmp_path, space={**SPACE, "baseline": True})
    study = tmp_path / "s"
    assert_ok(cli("tune", "--config", str(base), "--space", str(space), "--study", str(study), "--trials", "2"))
    first, second = trials(study)
    # optim.lr is not in the base file: the config's default, 3e-3, lies in the space's range.
    assert first.params == {"optim.lr": 3e-3, "model.hidden_size": 8}
    assert second.params != first.params
    outside = write(tmp_path / "outside.yaml", {**SPACE, "baseline": True, "params": {"model.hidden_size": {"choices": [4, 16]}}})
    result = cli("tune", "--config", str(base), "--space", str(outside), "--study", str(tmp_path / "t"), "--trials", "2")
    assert_refused(result, "baseline: true, but the base config's model.hidden_size=8 is outside choices [4, 16]")
    assert not (tmp_path / "t").exists()


def test_a_worker_starting_while_another_creates_the_study_waits_and_joins_it(tmp_path):
    """The creator holds the study lock from before it makes anything but the folder until
    study.json is written; a second worker that finds the half-made folder waits for it instead of
    refusing it as "not a study folder" (seen in CI when two workers started at once)."""
    import fcntl
    import shutil
    import threading

    from dist_gru.tune.study import open_study

    base, space = study_files(tmp_path)
    made = open_study(tmp_path / "made", str(base), [], str(space), None)  # what the creator will have written
    study = tmp_path / "s"
    (study / "trials").mkdir(parents=True)  # the creator, half way
    lock = os.open(study / "study.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    outcome = {}

    def second_worker() -> None:
        try:
            outcome["spec"] = open_study(study, str(base), [], str(space), None).spec
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    worker = threading.Thread(target=second_worker, daemon=True)
    worker.start()
    worker.join(timeout=2)
    assert worker.is_alive() and not outcome, outcome  # waiting on the lock, not refusing
    for item in (tmp_path / "made").iterdir():  # the creator finishes, then lets go of the lock
        if item.is_dir():
            shutil.copytree(item, study / item.name, dirs_exist_ok=True)
        elif item.name != "study.lock":
            shutil.copy(item, study / item.name)
    os.close(lock)
    worker.join(timeout=120)
    assert outcome == {"spec": made.spec}


# --- workers -------------------------------------------------------------------------------------


def test_two_concurrent_workers_record_six_distinct_trials(tmp_path):
    base, space = study_files(tmp_path)
    study = tmp_path / "s"
    args = ("--config", str(base), "--space", str(space), "--trials", "6")
    first, second = run_all([tune_cmd(study, *args), tune_cmd(study, *args)], timeout=600)
    assert_ok(first), assert_ok(second)
    done = trials(study)
    assert [t.number for t in done] == list(range(6))
    assert {t.state for t in done} == {optuna.trial.TrialState.COMPLETE}
    # Each trial ran in exactly one worker, and both workers ran some.
    ran = [started(first.stdout), started(second.stdout)]
    assert sorted(ran[0] + ran[1]) == list(range(6)) and all(ran), ran
    for t in done:
        run_dir = study / "trials" / f"{t.number:04d}"
        evals = [m["eval/loss"] for m in read_metrics(run_dir) if "eval/loss" in m]
        assert evals[-1] == pytest.approx(t.value, rel=1e-12)  # the objective is the final evaluation
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["optim"]["lr"] == t.params["optim.lr"] and config["model"]["hidden_size"] == t.params["model.hidden_size"]
        assert config["log"]["group"] == "s" and config["train"]["seed"] == 0  # grouped by study; seed recorded
    best = min(done, key=lambda t: t.value)
    assert (study / "best" / "TRIAL").read_text().strip() == str(best.number)
    report = assert_ok(cli("tune", "--study", str(study), "--report"))
    assert f"best: trial {best.number}, eval/loss={best.value:.6g}; 0 trials pruned early" in report.stdout
    assert len([line for line in report.stdout.splitlines() if line.startswith("000")]) == 6
    best_yaml = yaml.safe_load((study / "best.yaml").read_text())
    assert best_yaml["optim"]["lr"] == best.params["optim.lr"] and "tune" not in best_yaml
    assert (study / "history.png").stat().st_size > 1000 and (study / "params.png").stat().st_size > 1000


def test_a_killed_worker_s_trial_resumes_from_its_checkpoint(tmp_path):
    long = {**BASE, "train": {**BASE["train"], "max_steps": 400, "eval_every": 100, "log_every": 10},
            "checkpoint": {"every": 10}}  # fmt: skip
    base, space = study_files(tmp_path, base=long)
    study = tmp_path / "s"
    worker = Background(tune_cmd(study, "--config", str(base), "--space", str(space), "--trials", "1"), tmp_path / "w1.log")
    checkpoints = study / "trials" / "0000" / "checkpoints"
    worker.wait_until(lambda: any(checkpoints.glob("step-*/COMPLETE")), "the trial's first checkpoint", timeout=300)
    trial_processes = psutil.Process(worker.proc.pid).children(recursive=True)
    os.kill(worker.proc.pid, signal.SIGKILL)  # the worker alone: its trial must die with it
    worker.proc.wait(60)
    gone, alive = psutil.wait_procs(trial_processes, timeout=60)
    assert not alive, f"the trial outlived its killed worker: {alive}"
    assert [t.state for t in trials(study)] == [optuna.trial.TrialState.RUNNING]

    second = assert_ok(cli("tune", "--study", str(study), "--trials", "1", timeout=600))
    assert "tune: resuming trial 0" in second.stdout
    log = (study / "logs" / "0000.log").read_text()
    resumed_at = int(log.split("dist-gru: resuming from ")[1].split("(step ")[1].split(")")[0])
    assert 10 <= resumed_at < 400
    [trial] = trials(study)
    assert trial.state == optuna.trial.TrialState.COMPLETE

    # The same trial without interruption: every logged value equal, no step trained twice or skipped.
    reference = tmp_path / "reference"
    assert_ok(cli("train", "--config", str(base), *[f"{k}={v}" for k, v in trial.params.items()], f"train.run_dir={reference}"))
    resumed, uninterrupted = read_metrics(study / "trials" / "0000"), read_metrics(reference)
    assert [m["step"] for m in resumed] == [m["step"] for m in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):
        for key in ("train/loss", "eval/loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert trial.value == pytest.approx(uninterrupted[-1]["eval/loss"], rel=1e-5)


def test_pruning_stops_a_two_process_trial_on_every_rank_at_one_step(tmp_path):
    long = {**BASE, "train": {**BASE["train"], "max_steps": 40, "eval_every": 10}}
    # Every loss is above -1: the first evaluation prunes the trial.
    prune_all = {**SPACE, "pruner": {"name": "threshold", "upper": -1.0}}
    base, space = study_files(tmp_path, base=long, space=prune_all)
    study = tmp_path / "s"
    result = assert_ok(
        cli("tune", "--config", str(base), "--space", str(space), "--study", str(study), "--trials", "1", "--nproc", "2", timeout=600)
    )
    [trial] = trials(study)
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["pruned_step"] == 10
    assert "tune: trial 0 pruned at step 10" in result.stdout
    run_dir = study / "trials" / "0000"
    assert max(m["step"] for m in read_metrics(run_dir)) == 10  # nothing trained after the decision
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000010"]
    state = json.loads((run_dir / "checkpoints" / "step-000010" / "state.json").read_text())
    assert "pruned by study s (trial 0)" in json.dumps(state)
    log = (study / "logs" / "0000.log").read_text()
    assert "world_size=2" in log and log.count("Traceback") == 0


def test_trials_are_w_and_b_runs_grouped_by_the_study_offline_too(tmp_path):
    from wandb_reader import find_offline_runs, read_run

    offline = {**BASE, "log": {"mode": "offline"}}
    base, space = study_files(tmp_path, base=offline)
    study = tmp_path / "my-study"
    assert_ok(cli("tune", "--config", str(base), "--space", str(space), "--study", str(study), "--trials", "2"))
    for number in (0, 1):
        [folder] = find_offline_runs(study / "trials" / f"{number:04d}")
        run = read_run(folder)
        assert (run.group, run.display_name) == ("my-study", f"my-study-{number:04d}")
        assert run.history[-1]["eval/loss"] == pytest.approx(trials(study)[number].value, rel=1e-6)


def test_the_worker_passes_a_preemption_signal_to_its_trial_and_leaves_it_resumable(tmp_path):
    long = {**BASE, "train": {**BASE["train"], "max_steps": 400, "eval_every": 100, "log_every": 10}}
    base, space = study_files(tmp_path, base=long)
    study = tmp_path / "s"
    worker = Background(tune_cmd(study, "--config", str(base), "--space", str(space), "--trials", "1"), tmp_path / "w.log")
    metrics = study / "trials" / "0000" / "metrics.jsonl"
    worker.wait_until(lambda: metrics.is_file() and metrics.stat().st_size > 0, "the trial's first metrics", timeout=300)
    os.kill(worker.proc.pid, signal.SIGUSR1)
    assert worker.wait(120) == 75
    assert "stopped by a signal; it resumes from its checkpoint" in worker.output()
    assert [t.state for t in trials(study)] == [optuna.trial.TrialState.RUNNING]
    assert "preempted by signal" in (study / "logs" / "0000.log").read_text()
    second = assert_ok(cli("tune", "--study", str(study), "--trials", "1", timeout=600))
    assert "tune: resuming trial 0" in second.stdout
    assert [t.state for t in trials(study)] == [optuna.trial.TrialState.COMPLETE]

