"""The forecast head's naive terms (``model.naive_terms``, ``GRUModel(naive_season=...)``): the
seasonal-naive and drift forecasts of each context, weighted per step by learned weights.

Run: .venv/bin/pytest tests/test_naive_terms.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_gru.config import ConfigError, load_config
from dist_gru.data.sources import build_source
from dist_gru.model import GRUModel
from dist_gru.tasks import model_kwargs

SEASON, HORIZON = 3, 5
LENGTHS = [7, 4, 2, 6]  # unsorted; 2 is shorter than a season


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def padded_batch(channels: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 contexts of LENGTHS steps, padding 1e3: a term that reads padding shows."""
    x = torch.randn(len(LENGTHS), max(LENGTHS), channels + 1, dtype=torch.float64) * 3 + 10
    for i, length in enumerate(LENGTHS):
        x[i, length:] = 1e3
    return x, torch.tensor(LENGTHS)


def naive_only(scaling: str, seasonal: float, drift: float, recent_drift: float = 0.0, **kwargs) -> GRUModel:
    """A model whose GRU part forecasts 0, so that its output is the weighted naive terms."""
    model = GRUModel(3, 8, head="forecast", horizon=HORIZON, output_size=2, scaling=scaling, naive_season=SEASON, **kwargs)
    model = model.double().eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.naive.seasonal.fill_(seasonal)
        model.head.naive.drift.fill_(drift)
        model.head.naive.recent_drift.fill_(recent_drift)
    return model


def hand_seasonal_naive(context: np.ndarray) -> np.ndarray:
    """The context's last season repeated over the horizon (a context shorter than a season: from its
    first step): [L, O] -> [HORIZON, O]."""
    length = len(context)
    return np.stack([context[max(0, length - SEASON + h % SEASON)] for h in range(HORIZON)])


def hand_drift(context: np.ndarray, back: int | None = None) -> np.ndarray:
    """The last value plus h times the mean change per step over the last ``back`` steps (None: the
    whole context; the classical drift forecast)."""
    first = 0 if back is None else max(0, len(context) - 1 - back)
    slope = (context[-1] - context[first]) / (len(context) - 1 - first)
    return np.stack([context[-1] + (h + 1) * slope for h in range(HORIZON)])


@pytest.mark.parametrize("scaling", ["none", "window", "last", "robust", "revin"])
def test_seasonal_weight_one_forecasts_the_seasonal_naive_of_every_context_in_the_data_units(scaling: str) -> None:
    model = naive_only(scaling, seasonal=1.0, drift=0.0)
    x, lengths = padded_batch()
    with torch.no_grad():
        out = model(x, lengths)[0].numpy()
    for i, length in enumerate(LENGTHS):
        np.testing.assert_allclose(out[i], hand_seasonal_naive(x[i, :length, :2].numpy()), rtol=0, atol=1e-9)


@pytest.mark.parametrize("recent", [False, True], ids=["whole-context", "last-season"])
def test_a_drift_weight_of_one_on_the_last_value_scaler_is_the_drift_forecast(recent: bool) -> None:
    model = naive_only("last", seasonal=0.0, drift=0.0 if recent else 1.0, recent_drift=1.0 if recent else 0.0)
    x, lengths = padded_batch()
    with torch.no_grad():
        out = model(x, lengths)[0].numpy()
    for i, length in enumerate(LENGTHS):
        expected = hand_drift(x[i, :length, :2].numpy(), SEASON if recent else None)
        np.testing.assert_allclose(out[i], expected, rtol=0, atol=1e-9)


def test_a_padded_batch_forecasts_what_each_context_alone_does() -> None:
    model = GRUModel(3, 8, head="forecast", horizon=HORIZON, output_size=2, scaling="last", naive_season=SEASON)
    model = model.double().eval()
    with torch.no_grad():
        for weights in model.head.naive.parameters():
            weights.normal_()
        x, lengths = padded_batch()
        batched = model(x, lengths)[0]
        for i, length in enumerate(LENGTHS):
            alone = model(x[i : i + 1, :length])[0][0]
            assert (batched[i] - alone).abs().max().item() < 1e-12


def test_the_terms_start_at_zero_so_a_new_model_forecasts_as_one_without_them() -> None:
    x, lengths = padded_batch()
    outputs = []
    for season in (0, SEASON):
        torch.manual_seed(1)
        model = GRUModel(3, 8, head="forecast", horizon=HORIZON, output_size=2, scaling="last", naive_season=season)
        outputs.append(model.double().eval()(x, lengths)[0])
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("output", ["gaussian", "quantile"])
def test_probabilistic_outputs_move_their_location_and_keep_their_spread(output: str) -> None:
    x, lengths = padded_batch()
    without = naive_only("last", seasonal=0.0, drift=0.0, output=output)
    with_terms = naive_only("last", seasonal=1.0, drift=0.0, output=output)
    with_terms.load_state_dict(without.state_dict() | {k: v for k, v in with_terms.state_dict().items() if "naive" in k})
    with torch.no_grad():
        base, moved = without(x, lengths)[0], with_terms(x, lengths)[0]
    seasonal = torch.stack(
        [torch.from_numpy(hand_seasonal_naive(x[i, :n, :2].numpy())) for i, n in enumerate(LENGTHS)]
    )
    last = torch.stack([x[i, n - 1, :2] for i, n in enumerate(LENGTHS)]).unsqueeze(1)
    shift = (seasonal - last).unsqueeze(-1)  # the term in the data's units: the last-value scaler's std cancels
    if output == "gaussian":  # (mean, scale): the mean moves, the scale stays
        assert torch.allclose(moved[..., 0], base[..., 0] + shift[..., 0], atol=1e-9)
        assert torch.equal(moved[..., 1], base[..., 1])
    else:  # every quantile moves by the same amount, so they stay ordered as they were
        assert torch.allclose(moved, base + shift, atol=1e-9)


def test_a_saved_model_folder_keeps_the_terms(tmp_path: Path) -> None:
    model = GRUModel(3, 8, head="forecast", horizon=HORIZON, output_size=2, scaling="last", naive_season=SEASON).eval()
    with torch.no_grad():
        for weights in model.head.naive.parameters():
            weights.normal_()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["naive_season"] == SEASON
    loaded = GRUModel.from_pretrained(tmp_path)
    assert {"head.naive.seasonal", "head.naive.drift", "head.naive.recent_drift"} <= set(loaded.state_dict())
    x, lengths = padded_batch()
    x = x.float()
    assert torch.equal(loaded(x, lengths)[0], model(x, lengths)[0])
    GRUModel(3, 8, head="forecast", horizon=HORIZON).save_pretrained(tmp_path / "plain")
    assert "naive_season" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_a_carried_state_is_refused() -> None:
    model = GRUModel(3, 8, head="forecast", horizon=HORIZON, naive_season=SEASON)
    x = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match="a carried state with naive terms: they read the whole context"):
        model(x, state=model.initial_state(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"naive_season": -1, "head": "forecast", "horizon": 2}, r"naive_season=-1: expected an integer >= 0"),
        ({"naive_season": 4}, r"naive_season=4 with head='last'.*extend a forecast's target history"),
    ],
)
def test_bad_model_arguments_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GRUModel(3, **kwargs)


def test_the_config_key_sets_the_data_season_and_is_refused_off_the_forecast_head() -> None:
    cfg = load_config("configs/forecast.yaml", ["data.train_size=4", "data.val_size=2"])
    assert cfg.model.naive_terms is True  # the recommended forecasting recipe uses them
    kwargs = model_kwargs(cfg, build_source(cfg, 0, 1, torch.device("cpu")).train_set)
    assert kwargs["naive_season"] == cfg.data.season == 12
    with pytest.raises(ConfigError, match="model.naive_terms=true with model.head=last"):
        load_config(None, ["model.naive_terms=true"])
