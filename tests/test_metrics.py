"""dist_gru.tasks.metrics against hand-computed values, and the evaluate / predict / forecast commands.

Run: .venv/bin/pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_ok, cli, save_run

from dist_gru import cli as dist_gru_cli
from dist_gru.data import write_sequences
from dist_gru.model import GRUModel
from dist_gru.tasks import task_for
from dist_gru.tasks.functional import seasonal_naive


def test_step_classification_accuracy_and_macro_f1_by_hand() -> None:
    sums = task_for({"task": "classification", "head": "step", "output_size": 3}).metric_sums()
    # valid steps predict 0, 1, 2 against labels 0, 1, 1; the padded 4th step (label 2) is ignored
    logits = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]]])
    sums.update(logits, torch.tensor([[0, 1, 1, 2]]), torch.tensor([3]))
    metrics = sums.results()
    assert (metrics["num_samples"], metrics["num_steps"]) == (1, 3)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # F1: class 0: 2*1 / (2*1 + 0 + 0) = 1; class 1: 2 / (2 + 0 + 1) = 2/3; class 2: 0 / (0 + 1 + 0) = 0
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_macro_f1_averages_only_classes_seen_in_targets_or_predictions() -> None:
    sums = task_for({"task": "classification", "output_size": 4}).metric_sums()
    sums.update(torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0]]), torch.tensor([0, 0]), torch.tensor([1, 1]))
    # class 0: TP 1, FN 1 -> 2/3; class 1: FP 1 -> 0; classes 2 and 3 never occur
    assert sums.results()["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_step_regression_mse_and_mae_over_valid_steps() -> None:
    sums = task_for({"head": "step", "output_size": 2}).metric_sums()
    output = torch.zeros(2, 2, 2)
    target = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[3.0, 1.0], [1e6, 1e6]]])
    sums.update(output, target, torch.tensor([2, 1]))
    metrics = sums.results()
    assert metrics["num_steps"] == 3
    assert metrics["mse"] == pytest.approx((1 + 1 + 4 + 0 + 9 + 1) / 6)
    assert metrics["mae"] == pytest.approx((1 + 1 + 2 + 0 + 3 + 1) / 6)


def test_last_regression_keeps_todays_keys() -> None:
    sums = task_for({}).metric_sums()
    sums.update(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]), torch.tensor([4, 2]))
    assert sums.results() == {"loss": 2.5, "num_samples": 2, "mse": 2.5, "mae": 1.5}


def test_forecast_metrics_and_baselines_by_hand() -> None:
    task = task_for({"head": "forecast", "output": "quantile", "quantiles": (0.1, 0.5, 0.9), "horizon": 3})
    sums = task.metric_sums(season=2)
    x = torch.tensor([[[1.0, 9.0], [2.0, 9.0], [3.0, 9.0], [4.0, 9.0]]])  # history 1 2 3 4, one covariate
    y = torch.tensor([[[5.0], [6.0], [7.0]]])
    out = torch.tensor([[[[4.0, 5.0, 6.0]], [[5.0, 6.5, 7.0]], [[6.0, 7.0, 8.0]]]])  # median 5, 6.5, 7
    sums.update(out, y, torch.tensor([4]), x)
    m = sums.results()
    assert m["mae"] == pytest.approx(0.5 / 3)
    assert m["rmse"] == pytest.approx((0.25 / 3) ** 0.5)
    assert m["smape"] == pytest.approx(200 * (0.5 / 12.5) / 3)
    assert m["naive_mae"] == pytest.approx((1 + 2 + 3) / 3)  # 4 repeated
    # season 2 repeats the last season (3, 4): forecasts 3, 4, 3 -> errors 2, 2, 4
    assert m["seasonal_naive_mae"] == pytest.approx(8 / 3)
    assert m["mase"] == pytest.approx((0.5 / 3) / (8 / 3))
    # pinball per step: (0.1*1 + 0 + 0.1*1)/3, (0.1*1 + 0.5*0.5 + 0.1*1)/3, (0.1*1 + 0 + 0.1*1)/3
    assert m["pinball"] == pytest.approx((0.2 + 0.45 + 0.2) / 9)
    assert m["loss"] == pytest.approx(m["pinball"])
    assert (m["coverage_0.1"], m["coverage_0.5"], m["coverage_0.9"]) == (0.0, pytest.approx(1.0), 1.0)


def test_seasonal_naive_reads_each_samples_own_last_season() -> None:
    history = torch.tensor([[[1.0], [2.0], [3.0], [0.0]], [[1.0], [2.0], [3.0], [4.0]]])
    forecast = seasonal_naive(history, torch.tensor([3, 4]), horizon=5, season=3)
    assert forecast[..., 0].tolist() == [[1, 2, 3, 1, 2], [2, 3, 4, 2, 3]]
    with pytest.raises(ValueError, match="season=5"):
        seasonal_naive(history, torch.tensor([3, 4]), horizon=1, season=5)


@pytest.mark.parametrize(
    ("spec", "outputs"),
    [
        ({"task": "classification", "head": "step"}, 4),
        ({"task": "regression", "head": "forecast", "output": "gaussian"}, 2),
        ({"task": "regression", "head": "forecast", "output": "quantile"}, 2),
    ],
)
def test_sums_of_shards_give_the_metrics_of_the_whole(spec: dict, outputs: int) -> None:
    # The reduction evaluate() does across ranks: add the vectors, then divide.
    model = GRUModel(
        3,
        4,
        task=spec["task"],
        output_size=outputs,
        head=spec["head"],
        output=spec.get("output", "point"),
        horizon=2 if spec["head"] == "forecast" else 0,
    ).eval()
    x, lengths = torch.randn(7, 5, 3), torch.tensor([5, 2, 4, 5, 1, 3, 5])
    if spec["head"] == "forecast":
        lengths = torch.full((7,), 5)
        y = torch.randn(7, 2, outputs)
    else:
        y = torch.randint(0, outputs, (7, 5))
    with torch.no_grad():
        out, _ = model(x, lengths)
    task = task_for(model.config)
    whole = task.metric_sums(season=2)
    whole.update(out, y, lengths, x)
    shards = [task.metric_sums(season=2) for _ in range(2)]
    for rank, shard in enumerate(shards):
        index = torch.arange(rank, 7, 2)
        shard.update(out[index], y[index], lengths[index], x[index])
    combined = shards[0].results(shards[0].sums + shards[1].sums)
    assert combined.keys() == whole.results().keys()
    for key, value in whole.results().items():
        assert combined[key] == pytest.approx(value, rel=1e-12), key


# --- the commands on real files -------------------------------------------------------------


def _series(tmp_path, lengths: list[int], channels: int = 1):
    """Series with per-step targets (channels) and 2 covariates, written as a step dataset."""
    rng = np.random.default_rng(0)
    features = [rng.standard_normal((n, 2)).astype(np.float32) for n in lengths]
    targets = [np.cumsum(rng.standard_normal((n, channels)), axis=0).astype(np.float32) + 50 for n in lengths]
    write_sequences(tmp_path / "series", features, targets, task="regression")
    return features, targets


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """The real `dist-gru` entry point in this process (commands that build no Accelerator)."""
    capsys.readouterr()
    code = dist_gru_cli.main(list(argv))
    captured = capsys.readouterr()
    # stdout's last line is the command's JSON (the hub mixin may print a line before it)
    return code, (captured.out.splitlines() or [""])[-1], captured.err


def test_forecast_command_forecasts_after_the_end_of_every_series(tmp_path, capsys) -> None:
    features, targets = _series(tmp_path, [9, 6, 12])
    torch.manual_seed(0)
    model = GRUModel(3, 8, head="forecast", horizon=3, output="quantile", scaling="window").eval()
    config = {"model": {"head": "forecast", "output": "quantile"}, "data": {"window": 6, "horizon": 3}}
    model_dir = save_run(tmp_path, model, config)
    out = tmp_path / "forecast.npy"
    code, written, _ = run_cli(
        capsys, "forecast", "--model", model_dir, "--data", str(tmp_path / "series"), "--out", str(out)
    )
    assert (code, json.loads(written)) == (0, {"out": str(out), "shape": [3, 3, 1, 3]})
    forecast = np.load(out)
    with torch.no_grad():
        for i, (f, t) in enumerate(zip(features, targets, strict=True)):
            context = torch.from_numpy(np.concatenate([t[-6:], f[-6:]], axis=1))[None]
            expected = model(context)[0][0].numpy()
            assert np.abs(forecast[i] - expected).max() < 1e-5


def test_forecast_command_refuses_bad_input_and_writes_nothing(tmp_path, capsys) -> None:
    _series(tmp_path, [9, 4])
    forecaster = GRUModel(3, 8, head="forecast", horizon=2)
    model_dir = save_run(tmp_path, forecaster, {"model": {"head": "forecast"}, "data": {"window": 6, "horizon": 2}})
    out = tmp_path / "forecast.npy"
    code, _, err = run_cli(
        capsys, "forecast", "--model", model_dir, "--data", str(tmp_path / "series"), "--out", str(out)
    )
    assert code == 2 and "error: " in err and "Traceback" not in err
    assert "1 series are shorter than the context window data.window=6 (series 1 has 4 steps)" in err
    GRUModel(3, 8, head="step").save_pretrained(tmp_path / "step_model")
    wrong = cli(
        "forecast", "--model", str(tmp_path / "step_model"), "--data", str(tmp_path / "series"), "--out", str(out)
    )
    assert wrong.returncode == 2
    assert "a model with head 'step' has no horizon to forecast" in wrong.stderr
    assert not out.exists()


def test_predict_and_evaluate_a_step_model_on_whole_sequences(tmp_path, capsys) -> None:
    rng = np.random.default_rng(1)
    lengths = [5, 2, 7]
    features = [rng.standard_normal((n, 3)).astype(np.float32) for n in lengths]
    labels = [rng.integers(0, 3, n) for n in lengths]
    write_sequences(tmp_path / "val", features, labels, task="classification", num_classes=3)
    torch.manual_seed(0)
    model = GRUModel(3, 8, task="classification", output_size=3, head="step", bidirectional=True).eval()
    model_dir = save_run(tmp_path, model, {"model": {"head": "step", "bidirectional": True}})
    out = tmp_path / "pred.npy"
    code, written, _ = run_cli(
        capsys, "predict", "--model", model_dir, "--data", str(tmp_path / "val"), "--out", str(out)
    )
    assert code == 0 and json.loads(written)["shape"] == [14]
    offsets = np.load(tmp_path / "pred.offsets.npy")
    assert offsets.tolist() == [0, 5, 7, 14]
    with torch.no_grad():
        expected = [model(torch.from_numpy(f)[None])[0][0].argmax(-1).numpy() for f in features]
    assert np.load(out).tolist() == np.concatenate(expected).tolist()

    metrics = assert_ok(cli("evaluate", "--model", model_dir, "--data", str(tmp_path / "val"))).json_last_line()
    hits = np.concatenate(expected) == np.concatenate(labels)
    assert (metrics["num_samples"], metrics["num_steps"]) == (3, 14)
    assert metrics["accuracy"] == pytest.approx(hits.mean())
    assert 0 <= metrics["macro_f1"] <= 1
