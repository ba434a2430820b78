"""Best checkpoint (`checkpoint.best`) and early stopping (`train.early_stopping`), on 2 real processes.

    .venv/bin/pytest -q tests/test_selection.py

One 2-process run evaluates every 4 steps and stops when eval/loss has not improved for 2
evaluations (measured: best at step 24, stopped at step 32 of 80). Next to it, the same run on one
process is cut at step 20 and resumed: the best-so-far and the patience count come back from the
checkpoint, so it stops at the same step with the same best model.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import PY, TINY, assert_ok, cli, load_weights, max_abs_diff, read_metrics, run_all, torchrun_cmd

JOB = [
    *TINY,
    "log.mode=disabled",
    "optim.schedule=constant",  # the cut run's shorter max_steps must not change its learning rates
    "train.eval_every=4",
    "train.early_stopping.metric=eval/loss",
    "train.early_stopping.patience=2",
    "checkpoint.best=eval/loss",
]
MAX_STEPS = 80
REASON = re.compile(r"dist-gru: early stopping: eval/loss did not improve for 2 evaluations .*stopped at step (\d+)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    two, cut, bad = root / "two", root / "cut", root / "bad"
    results = run_all(
        [
            torchrun_cmd(
                2, "train", *JOB, f"train.max_steps={MAX_STEPS}", "train.record_samples=true", f"train.run_dir={two}"
            ),
            [PY, "-m", "dist_gru", "train", *JOB, "train.max_steps=20", f"train.run_dir={cut}"],
            [PY, "-m", "dist_gru", "train", *JOB, "checkpoint.best=eval/accuracy", f"train.run_dir={bad}"],
        ],
        timeout=300,
    )
    for result in results[:2]:
        assert_ok(result)
    return {"two": (two, results[0]), "cut": cut, "bad": (bad, results[2])}


@pytest.mark.timeout(400)
def test_every_rank_stops_at_the_same_eval_step(runs) -> None:
    run_dir, result = runs["two"]
    stopped = int(REASON.search(result.stdout).group(1))
    evals = [m for m in read_metrics(run_dir) if "eval/loss" in m]
    assert stopped < MAX_STEPS and stopped % 4 == 0 and evals[-1]["step"] == stopped
    for rank in (0, 1):  # the last micro-batch each rank trained on is the stop step's
        last = json.loads((run_dir / "samples" / f"rank-{rank}.jsonl").read_text().splitlines()[-1])
        assert last["step"] == stopped - 1
    assert "  stopped:      early stopping: eval/loss did not improve for 2 evaluations" in result.stdout
    record = read_metrics(run_dir)[-1]
    assert (record["step"], record["early_stopping/stopped"]) == (stopped, 1)
    state = json.loads((run_dir / "checkpoints" / f"step-{stopped:06d}" / "state.json").read_text())
    assert f"stopped at step {stopped}" in state["selection"]["stopped"]

    before = {p.name: p.stat().st_mtime_ns for p in [*run_dir.iterdir(), *(run_dir / "checkpoints").iterdir()]}
    again = assert_ok(cli("train", *JOB, f"train.max_steps={MAX_STEPS}", f"train.run_dir={run_dir}"))
    assert "holds a finished run" in again.stdout and f"stopped at step {stopped}" in again.stdout
    after = {p.name: p.stat().st_mtime_ns for p in [*run_dir.iterdir(), *(run_dir / "checkpoints").iterdir()]}
    assert after == before  # nothing written


@pytest.mark.timeout(400)
def test_best_holds_the_best_eval_steps_model(runs) -> None:
    run_dir, _ = runs["two"]
    evals = {m["step"]: m["eval/loss"] for m in read_metrics(run_dir) if "eval/loss" in m}
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["step"] == min(evals, key=evals.get) and best["value"] == evals[best["step"]]
    assert (best["metric"], best["mode"]) == ("eval/loss", "min")
    metrics = assert_ok(cli("evaluate", "--model", str(run_dir / "best"), "--data", "adding")).json_last_line()
    assert metrics["loss"] == pytest.approx(best["value"], rel=1e-6)
    assert (
        max_abs_diff(
            load_weights(run_dir / "best" / "model.safetensors"), load_weights(run_dir / "model" / "model.safetensors")
        )
        > 0
    )


@pytest.mark.timeout(400)
def test_a_resumed_run_stops_where_the_uninterrupted_one_does(runs) -> None:
    two, result = runs["two"]
    stopped = int(REASON.search(result.stdout).group(1))
    cut = runs["cut"]
    assert json.loads((cut / "best" / "best.json").read_text())["step"] <= 20
    resumed = assert_ok(cli("train", *JOB, f"train.max_steps={MAX_STEPS}", f"train.run_dir={cut}"))
    assert "resuming from" in resumed.stdout
    assert int(REASON.search(resumed.stdout).group(1)) == stopped
    assert (
        json.loads((cut / "best" / "best.json").read_text())["step"]
        == json.loads((two / "best" / "best.json").read_text())["step"]
    )
    # 1 process vs 2: the gradient all-reduce sums in another order
    difference = max_abs_diff(
        load_weights(cut / "best" / "model.safetensors"), load_weights(two / "best" / "model.safetensors")
    )
    print(f"stopped at step {stopped}; best/ resumed on 1 process vs uninterrupted on 2: max abs diff {difference:.2e}")
    assert difference < 1e-5


def test_a_metric_the_model_does_not_log_is_refused_before_anything_is_written(runs) -> None:
    run_dir, result = runs["bad"]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "error: checkpoint.best=eval/accuracy: this model does not log it; its eval metrics are eval/loss, "
        "eval/num_samples, eval/mse, eval/mae"
    ) in result.stderr
    assert not run_dir.exists()
