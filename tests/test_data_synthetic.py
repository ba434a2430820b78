"""Synthetic datasets: a pure function of (seed, global index), any batch composition, sane statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_gru.config import load_config
from dist_gru.data.loading import build_dataset
from dist_gru.data.synthetic import SYNTHETIC, AddingDataset, SeedExampleDataset, SineDataset


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("variable_length", [False, True])
def test_sample_is_a_function_of_seed_and_index_only(name, variable_length):
    ds = SYNTHETIC[name](200, 30, seed=7, variable_length=variable_length)
    batch = ds.__getitems__([11, 3, 150])
    for row, i in enumerate([11, 3, 150]):
        alone = ds.__getitems__([i])
        length = int(batch["lengths"][row])
        assert length == int(alone["lengths"][0]) == ds.lengths[i]
        assert torch.equal(batch["x"][row, :length], alone["x"][0])
        if ds.target_kind == "step":  # per-step targets are padded like the inputs
            assert torch.equal(batch["y"][row, :length], alone["y"][0])
            assert not batch["y"][row, length:].any()
        else:
            assert torch.equal(batch["y"][row], alone["y"][0])
        assert not batch["x"][row, length:].any()  # padding is zeros
    again = SYNTHETIC[name](200, 30, seed=7, variable_length=variable_length).__getitems__([11, 3, 150])
    assert torch.equal(again["x"], batch["x"]) and torch.equal(again["y"], batch["y"])
    other = SYNTHETIC[name](200, 30, seed=8, variable_length=variable_length).__getitems__([11, 3, 150])
    # (the seasonal task's covariates are the calendar, the same for every seed; its series differ)
    assert not (torch.equal(other["x"], batch["x"]) and torch.equal(other["y"], batch["y"]))


def test_train_and_val_splits_do_not_overlap():
    cfg = load_config(None, ["data.train_size=100", "data.val_size=50", "data.seq_len=8"])
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert (train.offset, val.offset) == (0, 100)
    t = train.__getitems__(list(range(100)))["x"].reshape(100, -1)
    v = val.__getitems__(list(range(50)))["x"].reshape(50, -1)
    assert not any(bool((row == t).all(1).any()) for row in v)
    # val sample i is the train generator's sample train_size + i
    longer = AddingDataset(150, 8, cfg.data.seed)
    assert torch.equal(longer.__getitems__([100 + 7])["x"], val.__getitems__([7])["x"])


def test_adding_problem_semantics_and_baseline():
    ds = AddingDataset(4000, 50, seed=0, variable_length=True)
    batch = ds.__getitems__(list(range(4000)))
    x, y, lengths = batch["x"], batch["y"][:, 0], batch["lengths"]
    assert torch.equal(x[:, :, 1].sum(1), torch.full((4000,), 2.0))  # two markers
    assert torch.allclose((x[:, :, 0] * x[:, :, 1]).sum(1), y, atol=1e-6)
    first, second = [torch.nonzero(row[:, 1]).flatten().tolist() for row in x[:2]][0]
    assert first < lengths[0] // 2 <= second < lengths[0]
    assert lengths.min() >= 25 and lengths.max() == 50
    assert float(((y - 1) ** 2).mean()) == pytest.approx(1 / 6, abs=0.01)  # the published baseline


def test_sine_target_is_the_next_clean_value():
    ds = SineDataset(64, 40, seed=1)
    batch = ds.__getitems__(list(range(64)))
    assert batch["x"].shape == (64, 40, 1) and batch["y"].shape == (64, 1)
    # noise std 0.05: the last input is close to, but not equal to, a point on the same wave
    assert float((batch["x"][:, -1, 0] - batch["y"][:, 0]).abs().mean()) < 1.0
    assert batch["x"].abs().max() < 1.8


def test_seed_example_shapes_and_learnable_target():
    ds = SeedExampleDataset(32, 10, seed=0, num_features=10)
    batch = ds.__getitems__(list(range(32)))
    assert batch["x"].shape == (32, 10, 10)
    assert torch.allclose(batch["x"][:, :, 0].mean(1), batch["y"][:, 0], atol=1e-6)
    assert abs(float(batch["x"].std()) - 1.0) < 0.1


def test_out_of_range_index_is_an_error():
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        AddingDataset(10, 5, seed=0).__getitems__([10])


def test_generation_is_vectorised_enough():
    """Not a timing assertion: a batch touches no per-sample numpy Generator (a profile hot spot)."""
    ds = SeedExampleDataset(1000, 100, seed=0, num_features=32)
    calls = []
    original = np.random.default_rng
    np.random.default_rng = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        ds.__getitems__(list(range(64)))
    finally:
        np.random.default_rng = original
    assert calls == []
