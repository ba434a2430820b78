"""dist_gru.tasks: every kind of task gives the loss, units, metrics, point forecast, predicted rows,
summary lines and data-fit messages the code before the tasks gave (the numbers below are that
code's, on these inputs), and ``task_for`` reads a model's config as the model means it.

Run: .venv/bin/pytest tests/test_tasks.py -q
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from dist_gru.config import ConfigError
from dist_gru.model import GRUModel
from dist_gru.tasks import (
    CONFIG_DEFAULTS,
    ClassificationTask,
    DataInfo,
    ForecastTask,
    RegressionTask,
    TokenTask,
    task_for,
)


def ramp(*shape: int, shift: float = 0.0) -> torch.Tensor:
    """Deterministic, varied values: the sine of the element index."""
    return torch.sin(torch.arange(int(np.prod(shape)), dtype=torch.float32) * 0.37 + shift).view(*shape)


LENGTHS = torch.tensor([3, 1, 2])
HISTORY = ramp(3, 4, 2, shift=0.5)  # forecast inputs: channel 0 is the target history
# name: (model config, output, target, lengths, x)
CASES = {
    "last_point": ({"task": "regression", "output_size": 2}, ramp(3, 2), ramp(3, 2, shift=1.0), LENGTHS, None),
    "last_gaussian": (
        {"task": "regression", "output_size": 1, "output": "gaussian"},
        torch.stack([ramp(3, 1), ramp(3, 1, shift=2.0).abs() + 0.5], -1),
        ramp(3, 1, shift=1.0),
        LENGTHS,
        None,
    ),
    "step_quantile": (
        {"task": "regression", "output_size": 1, "head": "step", "output": "quantile", "quantiles": [0.2, 0.5, 0.9]},
        ramp(3, 3, 1, 3).sort(-1).values,
        ramp(3, 3, 1, shift=1.0),
        LENGTHS,
        None,
    ),
    "forecast_point": (
        {"task": "regression", "output_size": 1, "head": "forecast", "horizon": 2},
        ramp(3, 2, 1),
        ramp(3, 2, 1, shift=1.0),
        torch.tensor([4, 4, 3]),
        HISTORY,
    ),
    "forecast_quantile": (
        {"task": "regression", "output_size": 1, "head": "forecast", "horizon": 2, "output": "quantile"},
        ramp(3, 2, 1, 3).sort(-1).values,
        ramp(3, 2, 1, shift=1.0),
        torch.tensor([4, 4, 3]),
        HISTORY,
    ),
    "last_classes": ({"task": "classification", "output_size": 3}, ramp(3, 3), torch.tensor([0, 2, 2]), LENGTHS, None),
    "step_classes": (
        {"task": "classification", "output_size": 3, "head": "step"},
        ramp(3, 3, 3),
        torch.tensor([[0, 1, 2], [2, -100, -100], [1, 1, 7]]),  # padded labels, even out of range, count nowhere
        LENGTHS,
        None,
    ),
    "tokens": (
        {"task": "classification", "output_size": 4, "head": "step", "vocab_size": 4},
        ramp(3, 3, 4),
        torch.tensor([[0, 1, 3], [2, 0, 0], [1, 1, 0]]),
        LENGTHS,
        None,
    ),
}
# (loss sum, units), metrics (season 2): what the code before the tasks computed on CASES (tokens:
# its stream evaluation added bits per token and the unigram baseline to these).
EXPECTED = {
    "last_point": (
        (0.8941553831, 3),
        {"loss": 0.2980517863, "num_samples": 3, "mse": 0.2980517863, "mae": 0.4773465792},
    ),
    "last_gaussian": (
        (3.5371165276, 3),
        {"loss": 1.1790388409, "num_samples": 3, "mse": 0.3957828526, "mae": 0.5903982818, "coverage_95": 1.0},
    ),
    "step_quantile": (
        (1.9229723215, 6),
        {
            "loss": 0.320495391,
            "num_samples": 3,
            "num_steps": 6,
            "mse": 0.8140601375,
            "mae": 0.7497758071,
            "pinball": 0.320495391,
            "coverage_0.2": 0.3333333333,
            "coverage_0.5": 0.3333333333,
            "coverage_0.9": 0.5,
        },
    ),
    "forecast_point": (
        (0.8941553831, 3),
        {
            "loss": 0.2980517863,
            "num_samples": 3,
            "mse": 0.2980517863,
            "mae": 0.4773465792,
            "rmse": 0.5459411931,
            "smape": 81.5474593505,
            "naive_mae": 0.8462257832,
            "seasonal_naive_mae": 0.8162948042,
            "mase": 0.5847722866,
            "bias": -0.1130517026,  # mean of output - target
        },
    ),
    "forecast_quantile": (
        (0.9586429, 3),
        {
            "loss": 0.3195476257,
            "num_samples": 3,
            "mse": 0.8786324835,
            "mae": 0.7613923401,
            "rmse": 0.9373539798,
            "smape": 123.8081789376,
            "naive_mae": 0.8462257832,
            "seasonal_naive_mae": 0.8162948042,
            "mase": 0.9327418674,
            "bias": -0.7613923401,  # every median forecast under its target: -mae
            "pinball": 0.3195476257,
            "coverage_0.1": 0.0,
            "coverage_0.5": 0.0,
            "coverage_0.9": 0.1666666667,
        },
    ),
    "last_classes": ((4.019923687, 3), {"loss": 1.3399745951, "num_samples": 3, "accuracy": 0.0, "macro_f1": 0.0}),
    "step_classes": (
        (7.5606560707, 6),
        {"loss": 1.2601093836, "num_samples": 3, "num_steps": 6, "accuracy": 0.1666666667, "macro_f1": 0.1666666667},
    ),
    "tokens": (
        (9.2329626083, 6),
        {
            "loss": 1.5388269418,
            "num_samples": 3,
            "num_steps": 6,
            "accuracy": 0.0,
            "macro_f1": 0.0,
            "bits_per_token": 1.5388269418 / math.log(2),
            # valid tokens 0 1 3 | 2 | 1 1: frequencies 1/6, 3/6, 1/6, 1/6
            "unigram_bits_per_token": 3 / 6 * math.log2(6) + 0.5 * math.log2(2),
        },
    ),
}
KINDS = {
    "last_point": RegressionTask,
    "last_gaussian": RegressionTask,
    "step_quantile": RegressionTask,
    "forecast_point": ForecastTask,
    "forecast_quantile": ForecastTask,
    "last_classes": ClassificationTask,
    "step_classes": ClassificationTask,
    "tokens": TokenTask,
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_units_and_metrics_are_the_ones_before_the_tasks(name: str) -> None:
    config, output, target, lengths, x = CASES[name]
    task = task_for(config)
    assert type(task) is KINDS[name]
    (total, units), metrics = EXPECTED[name]
    got_total, got_units = task.loss_sum(output, target, lengths)
    assert got_units == units and float(got_total) == pytest.approx(total, rel=1e-6)
    sums = task.metric_sums(season=2)
    sums.update(output, target, lengths, x)
    results = sums.results()
    assert list(results) == list(metrics)  # names and their order
    for key, value in metrics.items():
        assert results[key] == pytest.approx(value, rel=1e-7, abs=1e-9), key
    assert task.metric_names() == list(metrics)
    # The list-valued metrics, for reports: a forecast's MAE at each horizon step (their mean is mae).
    breakdowns = sums.results(breakdowns=True)
    assert list(breakdowns) == list(metrics) + list(BY_STEP.get(name, {}))
    for key, value in BY_STEP.get(name, {}).items():
        assert breakdowns[key] == pytest.approx(value, rel=1e-7), key


# The MAE at horizon steps 1 and 2 of the forecast CASES, computed with numpy.
BY_STEP = {
    "forecast_point": {"mae_by_step": [0.5114696224530538, 0.4432235360145569]},
    "forecast_quantile": {"mae_by_step": [0.839678555727005, 0.6831061244010925]},
}


class Sampler:
    def valid_steps(self, step: int) -> int:
        return 100 + step


@pytest.mark.parametrize("name", list(CASES))
def test_units_of_a_step_are_valid_steps_for_head_step_and_samples_otherwise(name: str) -> None:
    task = task_for(CASES[name][0])
    assert task.units(Sampler(), 7, 32) == (107 if CASES[name][0].get("head") == "step" else 32)


def test_point_forecast_is_the_value_the_mean_or_the_median_level() -> None:
    for name, pick in (("last_point", lambda o: o), ("last_gaussian", lambda o: o[..., 0])):
        output = CASES[name][1]
        assert torch.equal(task_for(CASES[name][0]).point_forecast(output), pick(output))
    for name in ("step_quantile", "forecast_quantile"):  # levels (0.2, 0.5, 0.9) and (0.1, 0.5, 0.9)
        output = CASES[name][1]
        assert torch.equal(task_for(CASES[name][0]).point_forecast(output), output[..., 1])
    logits = CASES["last_classes"][1]
    assert torch.equal(task_for(CASES["last_classes"][0]).point_forecast(logits), logits)


# (probabilities) -> (row shape, dtype, about): what `dist-gru predict` wrote before the tasks.
LAYOUTS = {
    "last_point": {False: ((2,), "float32", {"values": "values"})},
    "last_gaussian": {False: ((1, 2), "float32", {"values": "mean, scale"})},
    "step_quantile": {False: ((1, 3), "float32", {"values": "quantiles", "quantiles": [0.2, 0.5, 0.9]})},
    "forecast_point": {False: ((2, 1), "float32", {"values": "values"})},
    "forecast_quantile": {False: ((2, 1, 3), "float32", {"values": "quantiles", "quantiles": [0.1, 0.5, 0.9]})},
    "last_classes": {
        False: ((), "int64", {"values": "predicted class labels"}),
        True: ((3,), "float32", {"values": "class probabilities"}),
    },
    "step_classes": {
        False: ((), "int64", {"values": "predicted class labels"}),
        True: ((3,), "float32", {"values": "class probabilities"}),
    },
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predict_row_layout_and_rows(name: str) -> None:
    config, output, _, lengths, _ = CASES[name]
    task = task_for(config)
    for probabilities, (shape, dtype, about) in LAYOUTS[name].items():
        assert task.row_layout(probabilities) == (shape, np.dtype(dtype), about)
        rows = task.rows(output, lengths, probabilities)
        assert (rows.shape[1:], rows.dtype) == (shape, np.dtype(dtype))
    # the model's own output has that layout
    model = GRUModel(2, 4, **config).eval()
    with torch.no_grad():
        probe, _ = model(torch.zeros(1, 1, 2), torch.ones(1, dtype=torch.int64))
    assert tuple(probe.shape[2:] if config.get("head") == "step" else probe.shape[1:]) == task.output_shape()


def test_rows_are_labels_or_probabilities_and_valid_steps_only() -> None:
    config, logits, _, lengths, _ = CASES["last_classes"]
    task = task_for(config)
    assert task.rows(logits, lengths, False).tolist() == [2, 1, 0]
    assert np.allclose(task.rows(logits, lengths, True), logits.softmax(-1).numpy())
    config, logits, _, lengths, _ = CASES["step_classes"]
    assert task_for(config).rows(logits, lengths, False).tolist() == [2, 1, 0, 0, 2, 0]  # 3 + 1 + 2 steps
    config, output, _, lengths, _ = CASES["step_quantile"]
    rows = task_for(config).rows(output, lengths, False)
    assert np.array_equal(rows, torch.cat([output[0, :3], output[1, :1], output[2, :2]]).numpy())
    config, output, _, lengths, _ = CASES["forecast_point"]
    assert np.array_equal(task_for(config).rows(output, lengths, False), output.numpy())


def test_summary_lines_are_the_ones_training_printed() -> None:
    regression = task_for({})
    assert regression.summary_lines({"mse": 0.0123456789}) == ["  final eval mse: 0.0123457"]
    assert regression.summary_lines({"mse": 0.02}, "predicting 1 always: 0.167") == [
        "  final eval mse: 0.02 (predicting 1 always: 0.167)"
    ]
    assert regression.summary_lines({}) == []
    forecast = task_for({"head": "forecast", "horizon": 2})
    final = {"mse": 0.5, "mae": 0.25, "naive_mae": 1.0, "seasonal_naive_mae": 0.75, "mase": 1 / 3}
    assert forecast.summary_lines(final) == [
        "  final eval mse: 0.5",
        "  final eval forecast mae: 0.25 (naive: 1, seasonal naive: 0.75), mase 0.3333",
    ]
    classes = task_for({"task": "classification", "output_size": 3})
    assert classes.summary_lines({"accuracy": 0.5, "macro_f1": 0.25}) == [
        "  final eval accuracy: 0.5000",
        "  final eval macro-F1: 0.2500",
    ]
    tokens = task_for(CASES["tokens"][0])
    final = {"accuracy": 0.5, "macro_f1": 0.25, "bits_per_token": 1.5, "unigram_bits_per_token": 2.0}
    assert tokens.summary_lines(final)[-1] == "  final eval bits per token: 1.5000 (unigram baseline: 2.0000)"


def test_config_defaults_are_the_models_and_a_saved_config_gives_the_same_task() -> None:
    signature = inspect.signature(GRUModel.__init__).parameters
    assert {key: signature[key].default for key in CONFIG_DEFAULTS} == CONFIG_DEFAULTS
    model = GRUModel(3, 4, head="forecast", horizon=2, output="quantile", quantiles=[0.25, 0.75])
    task = task_for(model.config)
    assert (type(task), task.horizon, task.distribution.quantiles) == (ForecastTask, 2, (0.25, 0.75))
    assert type(task_for(GRUModel(3, 4).config)) is RegressionTask


SOURCE = "data.name=labels"
LABELS = DataInfo(source=SOURCE, task="classification", target_kind="sequence", output_size=3)
STEPS = DataInfo(source="data/steps", task="regression", target_kind="step", output_size=1)


def fit_error(config: dict, data: DataInfo) -> str:
    with pytest.raises(ConfigError) as info:
        task_for(config).check_fits(data)
    return str(info.value)


def test_check_fits_messages() -> None:
    assert fit_error({"task": "classification", "output": "gaussian", "head": "forecast"}, LABELS) == (
        "the model does not fit the data:\n"
        f"  model.output=gaussian needs a regression task, but {SOURCE} is a classification task with 3 classes: "
        "use model.output=point (class logits, cross-entropy)\n"
        f"  model.head=forecast needs a regression task (values to forecast); {SOURCE} holds class labels"
    )
    assert fit_error({"task": "classification", "head": "step"}, LABELS) == (
        "the model does not fit the data:\n"
        f"  model.head=step needs a target at every step, but {SOURCE} has one target per sequence: "
        "use model.head=last, or data with per-step targets"
    )
    assert fit_error({}, STEPS) == (
        "the model does not fit the data:\n"
        "  model.head=last needs one target per sequence, but data/steps has a target at every step: "
        "use model.head=step (or model.head=forecast with data.window and data.horizon)"
    )
    task_for({"head": "step"}).check_fits(STEPS)
    task_for({"task": "classification", "output_size": 3}).check_fits(LABELS)
    task_for({}).check_fits(DataInfo("data/windows", "regression", "step", 1, horizon=2))


def test_stream_mode_token_rules_are_check_fits_rules() -> None:
    """Whether the model's vocabulary covers the data's token ids (stream mode), with the messages
    the stream reader gave when it held these rules."""
    from dist_gru.tasks import DataInfo

    def refusal(config: dict, **data) -> str:
        info = DataInfo("d", "classification", "step", 4, **data)
        with pytest.raises(ConfigError) as err:
            task_for(config).check_fits(info)
        return str(err.value).removeprefix("the model does not fit the data:\n  ")

    tokens = {"task": "classification", "output_size": 4, "head": "step", "vocab_size": 4}
    floats = {"task": "classification", "output_size": 4, "head": "step"}
    assert refusal(floats, model_vocab=8, feature_dtype="float32") == (
        "model.vocab_size=8 reads token ids, but d holds float features (feature_dtype float32): unset model.vocab_size"
    )
    assert refusal(floats, vocab_size=4) == (
        "d is a token stream (vocabulary 4): set model.vocab_size (>= the largest token id + 1) so the model "
        "embeds its ids"
    )
    assert refusal(tokens, vocab_size=4, model_vocab=3, max_token=3, targets="next") == (
        "d: token id 3 is outside the model's vocabulary, model.vocab_size=3; expected ids in [0, 3) "
        "(set model.vocab_size >= 4)"
    )
    assert refusal(tokens, vocab_size=4, model_vocab=4, max_token=3, targets="stored") == (
        "d is a token stream without stored targets: use data.targets=next"
    )
    fits = DataInfo("d", "classification", "step", 4, vocab_size=4, model_vocab=4, max_token=3, targets="next")
    task_for(tokens).check_fits(fits)  # no error
    # Outside stream mode these rules do not apply (the reader refuses token data there): data_info
    # leaves the token fields empty.
    from dist_gru.config import load_config
    from dist_gru.data.loading import build_dataset
    from dist_gru.tasks import data_info

    cfg = load_config(None, ["data.name=running_count", "data.seq_len=6", "data.train_size=8", "model.head=step", "train.global_batch_size=8"])
    info = data_info(cfg, build_dataset(cfg.data, "train", head="step"), "train")
    assert (info.vocab_size, info.model_vocab, info.max_token) == (None, None, None)
    task_for(floats).check_fits(info)


def test_gaussian_coverage_counts_the_values_inside_the_95_percent_interval() -> None:
    """mean 0, scale 1: the interval is +-1.96; 0.5 and -1.9 are inside, 2.5 and -2.0 outside."""
    task = task_for({"task": "regression", "output_size": 1, "output": "gaussian"})
    output = torch.tensor([[[0.0, 1.0]]] * 4)
    target = torch.tensor([[0.5], [2.5], [-1.9], [-2.0]])
    sums = task.metric_sums()
    sums.update(output, target, None, None)
    assert sums.results()["coverage_95"] == 0.5
