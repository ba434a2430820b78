"""Heads, bidirectional encoders, output kinds and window scaling of GRUModel, and their config checks.

Run: .venv/bin/pytest tests/test_heads.py -q -s   (-s prints the exactness differences)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_model import seed_reference_step
from torch import Tensor

from dist_gru import cli as dist_gru_cli
from dist_gru.config import ConfigError, load_config
from dist_gru.data import write_sequences
from dist_gru.data.files import SequenceFileDataset
from dist_gru.model import GRUModel, SeedGRU, reverse_within_lengths
from dist_gru.tasks import model_kwargs, task_for

LENGTHS = [3, 7, 1, 5]  # unsorted, with length 1 and the full length
STEPS = 7


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def loud_padded_batch(features: int) -> tuple[Tensor, Tensor]:
    """A padded batch whose padding is huge: any leak of it into a valid output shows."""
    x = torch.randn(len(LENGTHS), STEPS, features)
    for i, length in enumerate(LENGTHS):
        x[i, length:] = 1e3
    return x, torch.tensor(LENGTHS)


def valid_part(out: Tensor, i: int, head: str) -> Tensor:
    """Sample i's outputs that mean something: its valid steps for head step, everything otherwise."""
    return out[i, : LENGTHS[i]] if head == "step" else out[i]


def model_for(cell: str, bidirectional: bool, head: str, **kwargs) -> GRUModel:
    extra = {"horizon": 3} if head == "forecast" else {}
    return GRUModel(
        3, 8, num_layers=2, cell=cell, bidirectional=bidirectional, head=head, output_size=2, **extra, **kwargs
    ).eval()


# --- exactness: padded batch = each sequence alone, CPU path = packed path --------------------


@pytest.mark.parametrize("head", ["last", "step", "forecast"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_padded_batch_equals_each_sequence_alone_on_both_paths(cell: str, bidirectional: bool, head: str) -> None:
    model = model_for(cell, bidirectional, head, scaling="window")
    model.set_normalization(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.0]))
    x, lengths = loud_padded_batch(3)
    # SeedGRU masks padded steps itself and has no packed form: one path to check.
    paths = (False, True) if cell == "torch" else (False,)
    outputs = {}
    for packed in paths:
        model.encoder.configure(packed=packed)
        batched, _ = model(x, lengths)
        alone = [model(x[i : i + 1, :length])[0][0] for i, length in enumerate(LENGTHS)]
        diff = max((valid_part(batched, i, head) - a).abs().max().item() for i, a in enumerate(alone))
        path = "packed" if packed else "cpu"
        print(f"{cell} {'bi' if bidirectional else 'uni'} {head} {path}: padded vs alone max diff {diff:.2e}")
        assert diff < 1e-6
        outputs[packed] = batched
    if cell == "torch":
        across = max(
            (valid_part(outputs[False], i, head) - valid_part(outputs[True], i, head)).abs().max().item()
            for i in range(len(LENGTHS))
        )
        print(f"{cell} {'bi' if bidirectional else 'uni'} {head}: cpu path vs packed path max diff {across:.2e}")
        assert across < 1e-6


def test_reverse_within_lengths_keeps_padding_in_place_and_is_its_own_inverse() -> None:
    x = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1)
    lengths = torch.tensor([3, 4])
    reversed_ = reverse_within_lengths(x, lengths)
    assert reversed_[..., 0].tolist() == [[2, 1, 0, 3], [7, 6, 5, 4]]
    assert torch.equal(reverse_within_lengths(reversed_, lengths), x)
    time_major = reverse_within_lengths(x.transpose(0, 1), lengths, time_dim=0)
    assert torch.equal(time_major.transpose(0, 1), reversed_)


def test_bidirectional_seed_gru_matches_the_equations_read_both_ways() -> None:
    rnn = SeedGRU(3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(2, 6, 3)

    def run(cell, inputs: Tensor) -> Tensor:
        h = torch.zeros(inputs.shape[0], 5)
        outputs = []
        for t in range(inputs.shape[1]):
            h = seed_reference_step(cell, inputs[:, t], h)
            outputs.append(h)
        return torch.stack(outputs, dim=1)

    layer_input = x
    for forward_cell, backward_cell in zip(rnn.cells, rnn.reverse_cells, strict=True):
        backward = run(backward_cell, layer_input.flip(1)).flip(1)
        layer_input = torch.cat([run(forward_cell, layer_input), backward], dim=-1)
    out, h_n = rnn(x)
    assert out.shape == (2, 6, 10) and h_n.shape == (4, 2, 5)
    assert (out - layer_input).abs().max() < 1e-6
    # h_n: the forward state after the last step, the backward state after step 0 (nn.GRU's order).
    assert (h_n[-2] - layer_input[:, -1, :5]).abs().max() < 1e-6
    assert (h_n[-1] - layer_input[:, 0, 5:]).abs().max() < 1e-6


@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_bidirectional_last_reads_forward_last_state_and_backward_state_at_step_zero(cell: str) -> None:
    model = GRUModel(3, 6, num_layers=2, cell=cell, bidirectional=True, output_size=2).eval()
    x = torch.randn(4, 5, 3)
    out, _ = model.encoder.rnn(x)
    summary = torch.cat([out[:, -1, :6], out[:, 0, 6:]], dim=-1)
    expected = summary @ model.head.weight.T + model.head.bias
    assert (model(x)[0] - expected).abs().max() < 1e-6


def test_cpu_bidirectional_path_trains_both_directions_of_every_layer() -> None:
    model = GRUModel(3, 4, num_layers=2, bidirectional=True, head="step", output_size=1)
    x, lengths = loud_padded_batch(3)
    model.encoder.configure(packed=False)
    model(x, lengths)[0].square().sum().backward()
    for name, param in model.encoder.rnn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bf16_recurrence_on_the_cpu_bidirectional_path_stays_close_to_fp32() -> None:
    model = GRUModel(3, 8, num_layers=2, bidirectional=True, head="step", output_size=2).eval()
    x, lengths = loud_padded_batch(3)
    full, _ = model(x, lengths)
    model.encoder.configure(dtype=torch.bfloat16)
    low, _ = model(x, lengths)
    assert low.dtype == torch.float32
    mask = torch.arange(STEPS)[None, :] < lengths[:, None]
    assert (low - full)[mask].abs().max() < 5e-2


# --- output kinds and their shapes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "output", "shape"),
    [
        ("last", "point", (4, 2)),
        ("step", "point", (4, 7, 2)),
        ("forecast", "point", (4, 3, 2)),
        ("last", "gaussian", (4, 2, 2)),
        ("step", "gaussian", (4, 7, 2, 2)),
        ("forecast", "gaussian", (4, 3, 2, 2)),
        ("last", "quantile", (4, 2, 4)),
        ("step", "quantile", (4, 7, 2, 4)),
        ("forecast", "quantile", (4, 3, 2, 4)),
    ],
)
def test_output_layout_of_every_head_and_output(head: str, output: str, shape: tuple[int, ...]) -> None:
    model = model_for("torch", False, head, output=output, quantiles=[0.05, 0.25, 0.75, 0.95])
    out, _ = model(*loud_padded_batch(3))
    assert out.shape == shape
    if output == "gaussian":
        assert bool((out[..., 1] > 0).all())
        assert task_for(model.config).point_forecast(out).shape == shape[:-1]


def test_step_classification_outputs_logits_per_step() -> None:
    model = GRUModel(3, 8, task="classification", output_size=5, head="step", bidirectional=True)
    assert model(*loud_padded_batch(3))[0].shape == (4, 7, 5)


# --- scaling inside the model ----------------------------------------------------------------


@pytest.mark.parametrize("head", ["last", "step"])
def test_window_scaling_makes_outputs_invariant_to_each_samples_own_affine_transform(head: str) -> None:
    model = model_for("torch", True, head, scaling="window")
    x, lengths = loud_padded_batch(3)
    scale = torch.tensor([[[3.0, 0.5, 10.0]], [[1.0, 2.0, 4.0]], [[7.0, 7.0, 7.0]], [[0.1, 1.0, 1.0]]])
    shift = torch.tensor([[[100.0, -5.0, 0.0]], [[1.0, 1.0, 1.0]], [[-3.0, 2.0, 9.0]], [[0.0, 0.0, 50.0]]])
    a, b = model(x, lengths)[0], model(x * scale + shift, lengths)[0]
    diff = max((valid_part(a, i, head) - valid_part(b, i, head)).abs().max().item() for i in range(4))
    assert diff < 1e-4


@pytest.mark.parametrize("scaling", ["window", "last", "robust", "revin"])
@pytest.mark.parametrize("output", ["point", "gaussian", "quantile"])
def test_window_scaled_forecasts_follow_the_target_history_back_to_raw_units(output: str, scaling: str) -> None:
    # Channels 0-1 are the target history (output_size=2), channel 2 a covariate.
    model = GRUModel(3, 8, head="forecast", horizon=3, output_size=2, output=output, scaling=scaling).eval()
    x, lengths = loud_padded_batch(3)
    scale, shift = torch.tensor([5.0, 0.2, 3.0]), torch.tensor([1000.0, -4.0, 7.0])
    base, moved = model(x, lengths)[0], model(x * scale + shift, lengths)[0]
    target_scale, target_shift = scale[:2], shift[:2]
    if output == "point":
        expected = base * target_scale + target_shift
    elif output == "quantile":
        expected = base * target_scale[:, None] + target_shift[:, None]
    else:
        expected = torch.stack([base[..., 0] * target_scale + target_shift, base[..., 1] * target_scale], dim=-1)
    assert (moved - expected).abs().max() / expected.abs().max() < 1e-5


def test_forecast_outputs_are_mapped_back_through_global_statistics() -> None:
    model = GRUModel(3, 8, head="forecast", horizon=2, output_size=1).eval()
    x, lengths = loud_padded_batch(3)
    plain, _ = model(x, lengths)
    mean, std = torch.tensor([10.0, -1.0, 0.5]), torch.tensor([4.0, 2.0, 0.5])
    model.set_normalization(mean, std)
    assert (model(x * std + mean, lengths)[0] - (plain * std[0] + mean[0])).abs().max() < 1e-4


# --- arguments, saving ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head": "middle"}, r"head='middle'.*last, step, forecast"),
        ({"output": "poisson"}, r"output='poisson'.*point, gaussian, quantile"),
        ({"quantiles": [0.5, 1.0]}, r"quantiles=\[0.5, 1.0\]: \[1.0\] outside \(0, 1\)"),
        ({"quantiles": [0.5, 0.5]}, r"strictly increasing"),
        ({"task": "classification", "output_size": 3, "output": "gaussian"}, r"output='gaussian'.*regression"),
        ({"head": "forecast"}, r"horizon=0: expected an integer >= 1"),
        ({"head": "step", "horizon": 2}, r"horizon=2 with head='step'"),
        ({"head": "forecast", "horizon": 2, "output_size": 4}, r"input_size=3 < output_size=4"),
        ({"scaling": "bogus"}, r"scaling='bogus': expected one of none, global, window, last, robust, revin"),
        ({"loss_units": "pixels"}, r"loss_units='pixels': expected one of raw, scaled"),
        ({"point_loss": "huber"}, r"point_loss='huber': expected one of mse, mae"),
        ({"loss_units": "scaled", "scaling": "window"}, r"loss_units='scaled' with head='last'.*needs head='forecast'"),
        ({"head": "forecast", "horizon": 2, "loss_units": "scaled"}, r"scaling='none'.*a scaling other than 'none'"),
        ({"output": "quantile", "point_loss": "mae"}, r"point_loss='mae' with output='quantile': applies to output='point'"),
    ],
)
def test_bad_head_arguments_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GRUModel(3, **kwargs)


@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_save_and_load_round_trip_with_the_new_fields(cell: str, tmp_path) -> None:
    kwargs = {
        "head": "forecast",
        "bidirectional": True,
        "output": "quantile",
        "quantiles": [0.2, 0.5, 0.8],
        "horizon": 4,
        "scaling": "window",
    }
    model = GRUModel(3, 8, num_layers=2, cell=cell, output_size=2, **kwargs).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {key: config[key] for key in kwargs} == kwargs
    loaded = GRUModel.from_pretrained(tmp_path)
    assert (loaded.head_kind, loaded.bidirectional, loaded.quantiles, loaded.horizon) == (
        "forecast",
        True,
        (0.2, 0.5, 0.8),
        4,
    )
    x, lengths = loud_padded_batch(3)
    assert torch.equal(loaded(x, lengths)[0], model(x, lengths)[0])


def test_a_model_with_default_heads_writes_the_config_older_releases_read(tmp_path) -> None:
    GRUModel(3, 8, quantiles=(0.1, 0.5, 0.9)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config) == {"input_size", "hidden_size", "num_layers", "dropout", "task", "output_size", "cell"}


# --- config: the keys and the checks across sections ----------------------------------------


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return str(info.value)


def test_head_keys_validate_and_default_to_todays_model() -> None:
    cfg = load_config(None, [])
    assert (cfg.model.head, cfg.model.bidirectional, cfg.model.output, cfg.model.quantiles) == (
        "last",
        False,
        "point",
        [0.1, 0.5, 0.9],
    )
    cfg = load_config(
        None, ["model.head=forecast", "data.window=24", "data.horizon=6", "model.quantiles=[0.05, 0.5, 0.95]"]
    )
    assert (cfg.model.head, cfg.data.horizon, cfg.model.quantiles) == ("forecast", 6, [0.05, 0.5, 0.95])
    assert "model.head: Input should be 'last', 'step' or 'forecast' (got 'first')" in config_error("model.head=first")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.quantiles=[0.1, 1.5]"], "model.quantiles=[0.1, 1.5]: [1.5] outside (0, 1)"),
        (["model.quantiles=[0.0, 0.5]"], "model.quantiles=[0.0, 0.5]: [0.0] outside (0, 1)"),
        (["model.quantiles=[0.9, 0.1]"], "model.quantiles=[0.9, 0.1]: expected strictly increasing levels"),
        (["model.quantiles=[]"], "model.quantiles=[]: expected a non-empty list"),
        (
            ["data.window=10", "data.horizon=3", "model.head=step"],
            "data.horizon=3 with model.head='step': only model.head=forecast predicts steps after the context window",
        ),
        (
            ["data.window=10", "data.horizon=3", "model.head=step", "model.bidirectional=true"],
            "a bidirectional step head would even read the steps it is asked to forecast",
        ),
        (["model.head=forecast"], "model.head=forecast needs data.window (the context length) and data.horizon >= 1"),
        (["model.head=forecast", "data.window=10"], "got data.window=10, data.horizon=0"),
        (
            ["model.head=forecast", "data.window=4", "data.horizon=2", "data.season=7"],
            "data.season=7 is longer than data.window=4",
        ),
    ],
)
def test_bad_combinations_are_one_clear_message_each(overrides: list[str], message: str) -> None:
    assert message in config_error(*overrides)


def test_the_model_section_must_fit_the_data(tmp_path) -> None:
    rng = np.random.default_rng(0)
    sequences = [rng.standard_normal((n, 2)).astype(np.float32) for n in (4, 6)]
    write_sequences(tmp_path / "labels", sequences, np.array([0, 2]), task="classification", num_classes=3)
    write_sequences(tmp_path / "steps", sequences, [np.zeros((n, 1), np.float32) for n in (4, 6)], task="regression")
    labels, steps = SequenceFileDataset(tmp_path / "labels"), SequenceFileDataset(tmp_path / "steps")

    def problem(dataset, *overrides: str) -> str:
        path = dataset.path
        cfg = load_config(None, ["data.name=files", f"data.train_path={path}", *overrides])
        with pytest.raises(ConfigError) as info:
            model_kwargs(cfg, dataset)
        return str(info.value)

    assert "model.output=gaussian needs a regression task, but " in problem(labels, "model.output=gaussian")
    assert "is a classification task with 3 classes" in problem(labels, "model.output=quantile")
    assert "model.head=step needs a target at every step" in problem(labels, "model.head=step")
    assert "model.head=last needs one target per sequence" in problem(steps)
    cfg = load_config(
        None,
        [
            "data.name=files",
            f"data.train_path={steps.path}",
            "model.head=step",
            "data.scaling=window",
            "train.global_batch_size=2",
        ],
    )
    kwargs = model_kwargs(cfg, steps)
    assert (kwargs["input_size"], kwargs["head"], kwargs["scaling"], kwargs["horizon"]) == (2, "step", "window", 0)
    assert GRUModel(**kwargs)(torch.randn(2, 5, 2))[0].shape == (2, 5, 1)


def test_a_bad_combination_exits_2_through_the_command_before_anything_is_written(tmp_path, capsys) -> None:
    run_dir = tmp_path / "never"
    overrides = [f"train.run_dir={run_dir}", "model.head=forecast", "model.quantiles=[0.5, 0.2]"]
    assert dist_gru_cli.main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert "model.quantiles=[0.5, 0.2]: expected strictly increasing levels" in err
    assert "Traceback" not in err
    assert not run_dir.exists()
    assert dist_gru_cli.main(["train", f"train.run_dir={run_dir}", "model.head=forecast"]) == 2
    assert "model.head=forecast needs data.window" in capsys.readouterr().err
    assert not run_dir.exists()
