"""Windows drawn on the fly, the O(1)-memory sample order, per-step synthetic tasks, sharded moments.

PYTHONPATH=. .venv/bin/pytest tests/test_windows.py -q
"""

from __future__ import annotations

import itertools
import pickle
import tracemalloc

import numpy as np
import pytest
import torch

from dist_gru.config import ConfigError, load_config
from dist_gru.data import loading
from dist_gru.data.files import DataFormatError, SequenceFileDataset, write_sequences
from dist_gru.data.loading import TrainBatchSampler, build_dataset, make_loader, train_stream
from dist_gru.data.moments import feature_moments, moment_sums, moments_from_sums
from dist_gru.data.permutation import FeistelPermutation
from dist_gru.data.synthetic import RunningCountDataset, SeasonalDataset
from dist_gru.data.windows import WindowDataset

pytestmark = pytest.mark.timeout(60)

LENGTHS = [9, 3, 14, 6]


@pytest.fixture
def series(tmp_path):
    """Four regression series of 2 features and 2 per-step targets, with known values."""
    rng = np.random.default_rng(0)
    features = [rng.standard_normal((n, 2)).astype(np.float32) for n in LENGTHS]
    targets = [(100 + rng.standard_normal((n, 2))).astype(np.float32) for n in LENGTHS]
    write_sequences(tmp_path / "s", features, targets, task="regression")
    return SequenceFileDataset(tmp_path / "s"), features, targets


def _all_windows(lengths, need, stride):
    return [(i, t) for i, n in enumerate(lengths) for t in range(0, n - need + 1, stride)]


# ------------------------------------------------------------------------------ window arithmetic


@pytest.mark.parametrize(("window", "horizon", "stride"), [(4, 0, 1), (4, 2, 1), (3, 1, 2), (5, 3, 4), (14, 0, 1)])
def test_every_window_once_by_index_arithmetic(series, window, horizon, stride):
    source, features, targets = series
    mode = "forecast" if horizon else "step"
    ds = WindowDataset(source, window, horizon, stride, mode=mode)
    expected = _all_windows(LENGTHS, window + horizon, stride)
    assert len(ds) == len(expected)
    seq, start = ds.locate(np.arange(len(ds)))
    assert list(zip(seq.tolist(), start.tolist(), strict=True)) == expected
    # every window has the window's length, as a broadcast view: no per-window array
    assert ds.lengths.shape == (len(ds),) and ds.lengths.strides == (0,) and set(ds.lengths.tolist()) == {window}
    batch = ds.__getitems__(list(range(len(ds)))[::-1])
    assert batch["lengths"].tolist() == [window] * len(ds)
    assert batch["index"].tolist() == list(range(len(ds)))[::-1]
    for row, k in enumerate(batch["index"].tolist()):
        i, t = expected[k]
        if mode == "forecast":  # x = target history, then covariates; y = the next `horizon` targets
            np.testing.assert_array_equal(batch["x"][row].numpy(), np.concatenate([targets[i], features[i]], 1)[t : t + window])
            np.testing.assert_array_equal(batch["y"][row].numpy(), targets[i][t + window : t + window + horizon])
        else:
            np.testing.assert_array_equal(batch["x"][row].numpy(), features[i][t : t + window])
            np.testing.assert_array_equal(batch["y"][row].numpy(), targets[i][t : t + window])
    assert ds.num_features == (4 if mode == "forecast" else 2) == batch["x"].shape[2]
    assert (ds.task, ds.output_size, ds.target_kind) == ("regression", 2, "step")


def test_last_mode_and_classification_windows(tmp_path):
    rng = np.random.default_rng(1)
    features = [rng.standard_normal((n, 1)) for n in (6, 8)]
    labels = [rng.integers(0, 3, n) for n in (6, 8)]
    write_sequences(tmp_path / "c", features, labels, task="classification", num_classes=3)
    source = SequenceFileDataset(tmp_path / "c")
    step = WindowDataset(source, 4)
    batch = step.__getitems__([0, 5])  # windows (0, 0) and (1, 2)
    assert batch["y"].dtype == torch.int64 and batch["y"].shape == (2, 4)
    assert batch["y"][1].tolist() == labels[1][2:6].tolist()
    last = WindowDataset(source, 4, mode="last")
    assert last.target_kind == "sequence" and last.__getitems__([0, 5])["y"].tolist() == [labels[0][3], labels[1][5]]
    with pytest.raises(DataFormatError, match="has classification targets; forecasting needs regression targets"):
        WindowDataset(source, 4, 1)


def test_window_datasets_pickle_small_and_load_through_a_dataloader(series):
    source, _, targets = series
    ds = WindowDataset(source, 3, 1)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 3000
    assert torch.equal(clone.__getitems__([7, 2])["y"], ds.__getitems__([7, 2])["y"])
    sampler = TrainBatchSampler(ds.lengths, 4, 1, 1, 2, seed=3)
    loader = make_loader(ds, sampler, num_workers=0)
    (epoch, batch) = next(train_stream(loader, sampler, 0))
    assert epoch == 0 and batch["index"].tolist() == sampler.epoch_batches(0)[0][2:].tolist()


def test_bad_windows_are_clear_errors(series, tmp_path):
    source, _, _ = series
    with pytest.raises(DataFormatError) as err:
        WindowDataset(source, 12, 3)
    assert "data.window=12 + data.horizon=3 = 15 steps is longer than every sequence (the longest has 14 steps)" in str(
        err.value
    )
    with pytest.raises(ValueError, match=r"data.window_stride=0; expected an integer >= 1"):
        WindowDataset(source, 3, stride=0)
    with pytest.raises(ValueError, match="data.horizon=2 with step windows"):
        WindowDataset(source, 3, 2, mode="step")
    write_sequences(tmp_path / "seq", [np.zeros((5, 1))], np.zeros(1), task="regression")
    with pytest.raises(DataFormatError, match="has one target per sequence; data.window draws windows"):
        WindowDataset(SequenceFileDataset(tmp_path / "seq"), 3)
    write_sequences(tmp_path / "uni", [np.zeros((5, 0))], [np.arange(5.0)], task="regression")
    univariate = SequenceFileDataset(tmp_path / "uni")
    assert WindowDataset(univariate, 3, 1).num_features == 1  # the target history alone
    with pytest.raises(DataFormatError, match=r"has no input features \(F = 0\); step windows read the features"):
        WindowDataset(univariate, 3)


def test_config_builds_windows_and_rejects_bad_keys(tmp_path):
    overrides = ["data.name=seasonal", "data.seq_len=60", "data.train_size=3", "data.val_size=2", "data.season=12"]
    cfg = load_config(None, [*overrides, "data.window=24", "data.horizon=6", "data.window_stride=2", "model.head=forecast"])
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert isinstance(train, WindowDataset) and train.mode == "forecast"
    assert (len(train), len(val)) == (3 * 16, 2 * 16)  # (60 - 30) // 2 + 1 windows per series
    with pytest.raises(ValueError, match="data.horizon=6 with last windows: a horizon means forecasting"):
        build_dataset(cfg.data, "train", head="last")
    cfg = load_config(None, [*overrides, "data.window=24"])
    assert build_dataset(cfg.data, "train").mode == "step" and build_dataset(cfg.data, "train", head="last").mode == "last"
    cfg = load_config(None, [*overrides, "data.window=200"])
    with pytest.raises(DataFormatError, match=r"longer than every sequence \(the longest has 60 steps\)"):
        build_dataset(cfg.data, "train")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.window_stride=0", "data.horizon=2", "data.normalize=true", "data.scaling=window"])
    message = str(err.value)
    assert "data.window_stride: Input should be greater than or equal to 1 (got 0)" in message
    cfg = load_config(None, ["data.normalize=true"])
    assert (cfg.data.scaling, cfg.data.normalize) == ("global", True)  # normalize is the old name of global
    assert load_config(None, ["data.scaling=global"]).data.normalize is True
    with pytest.raises(ConfigError, match="data.normalize=true means data.scaling=global, but data.scaling='window'"):
        load_config(None, ["data.normalize=true", "data.scaling=window"])
    with pytest.raises(ConfigError, match="data.horizon=3 forecasts the steps after a context window"):
        load_config(None, ["data.horizon=3", "model.head=forecast"])


# ------------------------------------------------------------------------ the sample order at scale


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 63, 64, 65, 1000, 4099])
def test_feistel_permutation_is_a_bijection(n):
    values = FeistelPermutation(n, key=11, stream=2)(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    again = FeistelPermutation(n, key=11, stream=2)(np.arange(n)[::-1])
    np.testing.assert_array_equal(again, values[::-1])  # any positions, in any order, give the same values
    if n > 64:
        assert not np.array_equal(values, FeistelPermutation(n, key=12, stream=2)(np.arange(n)))
        assert abs(np.corrcoef(np.arange(n), values)[0, 1]) < 0.2  # shuffled, not shifted


def test_in_memory_order_is_unchanged_for_ordinary_datasets():
    # up to IN_MEMORY_ORDER_MAX samples the order is still the seeded numpy permutation, bit for bit
    sampler = TrainBatchSampler(np.ones(1000), 16, 1, 0, 1, seed=3)
    assert sampler.in_memory
    expected = np.random.default_rng((3, 2)).permutation(1000)[: 62 * 16].reshape(62, 16)
    np.testing.assert_array_equal(sampler.epoch_batches(2), expected)


@pytest.fixture
def large_order(monkeypatch):
    """Samplers built here take the O(1)-memory path, as datasets above 4 Mi samples do."""
    monkeypatch.setattr(loading, "IN_MEMORY_ORDER_MAX", 100)


@pytest.mark.parametrize("bucket", [False, True])
def test_feistel_order_keeps_the_sampler_contract(large_order, bucket):
    lengths = np.random.default_rng(0).integers(1, 60, 1700)  # 53 steps of 2 x 16, 4 samples left over

    def sampler(rank=0, world_size=1, seed=5):
        return TrainBatchSampler(lengths, 16, 2, rank, world_size, seed, bucket_by_length=bucket)

    one = sampler()
    assert not one.in_memory
    for epoch in (0, 3):
        batches = one.epoch_batches(epoch)
        assert batches.shape == (106, 16) and len(np.unique(batches)) == batches.size
        np.testing.assert_array_equal(batches, sampler(rank=1, world_size=4).epoch_batches(epoch))
        assert [one.micro_batch(epoch, j).tolist() for j in (0, 7, 105)] == batches[[0, 7, 105]].tolist()
    assert not np.array_equal(one.epoch_batches(0), one.epoch_batches(1))
    assert not np.array_equal(one.epoch_batches(0), sampler(seed=6).epoch_batches(0))
    # rank slices are equal, disjoint and make the global micro-batch, from any position
    ranks = [sampler(rank=r, world_size=4) for r in range(4)]
    for r in ranks:
        r.set_position(*r.position(10))
    per_rank = [list(r) for r in ranks]
    assert [sum(slices, []) for slices in zip(*per_rank, strict=True)] == one.epoch_batches(0)[20:].tolist()
    if bucket:  # sorted by length inside each window of BUCKET_WINDOW micro-batches: less padding
        plain = TrainBatchSampler(lengths, 16, 2, 0, 4, 5)
        assert sampler(world_size=4).padding_fraction(0) < plain.padding_fraction(0) / 2


def test_valid_steps_is_the_global_batch_sum_on_every_rank(large_order):
    lengths = np.random.default_rng(2).integers(1, 40, 500)
    for step in (0, 3, 9):  # 7 steps per epoch: step 9 is in epoch 1
        sums = set()
        for world_size in (1, 2, 4):
            ranks = [TrainBatchSampler(lengths, 16, 4, r, world_size, seed=1) for r in range(world_size)]
            epoch, start = ranks[0].position(step)
            seen = 0
            for r in ranks:
                r.set_position(epoch, start)
                seen += sum(int(lengths[s].sum()) for s in itertools.islice(r, 4))  # its 4 micro-batches
            sums |= {seen, *(r.valid_steps(step) for r in ranks)}
        assert len(sums) == 1


def test_a_hundred_million_windows_cost_no_memory_per_window():
    """10^8 windows of one long generated series: opening, ordering and drawing batches allocates a
    few MB, where one int64 per window would be 800 MB."""
    tracemalloc.start()
    try:
        ds = WindowDataset(SeasonalDataset(1, 100_000_064, seed=0, season=24), window=48, horizon=16)
        sampler = TrainBatchSampler(ds.lengths, 256, 1, 1, 2, seed=0)
        sampler.set_position(*sampler.position(123_456))
        batches = [ds.__getitems__(indices) for indices in itertools.islice(sampler, 5)]
        valid = sampler.valid_steps(123_456)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == 100_000_001 and not sampler.in_memory
    assert [b["x"].shape for b in batches] == [(128, 48, 3)] * 5 and valid == 256 * 48
    assert peak < 20 * 2**20, f"peak traced allocation {peak / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------- synthetic tasks


def test_running_count_labels_count_the_last_three_inputs():
    ds = RunningCountDataset(300, 40, seed=2)
    batch = ds.__getitems__(list(range(300)))
    bits, labels = batch["x"][:, :, 0].long(), batch["y"]
    assert labels.dtype == torch.int64 and (ds.num_classes, ds.target_kind) == (4, "step")
    padded = torch.nn.functional.pad(bits, (2, 0))
    assert torch.equal(labels, padded[:, 2:] + padded[:, 1:-1] + padded[:, :-2])
    # a rule that sees only the current step is right half the time; the majority class 3/8
    counts = labels[:, 2:].flatten()
    memoryless = torch.where(bits[:, 2:].flatten() == 1, 2, 1)
    print(f"\nrunning_count baselines: memoryless {float((memoryless == counts).float().mean()):.3f}, "
          f"majority {float((counts == 1).float().mean()):.3f}")  # fmt: skip
    assert float((memoryless == counts).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert float((counts == 1).float().mean()) == pytest.approx(3 / 8, abs=0.02)


@pytest.mark.parametrize("task", ["running_count", "seasonal"])
def test_synthetic_windows_are_slices_of_the_whole_series(task):
    source = RunningCountDataset(4, 50, seed=1) if task == "running_count" else SeasonalDataset(4, 50, seed=1, season=7)
    whole = source.__getitems__([0, 1, 2, 3])
    horizon = 0 if task == "running_count" else 5
    ds = WindowDataset(source, 10, horizon, 3)
    batch = ds.__getitems__(list(range(len(ds))))
    seq, start = ds.locate(np.arange(len(ds)))
    for row, (i, t) in enumerate(zip(seq.tolist(), start.tolist(), strict=True)):
        if horizon:
            history = torch.cat([whole["y"][i], whole["x"][i]], dim=1)[t : t + 10]
            assert torch.allclose(batch["x"][row], history, atol=1e-6)
            assert torch.allclose(batch["y"][row], whole["y"][i, t + 10 : t + 15], atol=1e-6)
        else:
            assert torch.equal(batch["x"][row], whole["x"][i, t : t + 10])
            assert torch.equal(batch["y"][row], whole["y"][i, t : t + 10])


def test_seasonal_series_have_trend_season_and_small_noise():
    ds = SeasonalDataset(64, 240, seed=3, season=12)
    y = ds.__getitems__(list(range(64)))["y"][:, :, 0].double()
    season_diff = y[:, 12:] - y[:, :-12]  # removes level and season: trend * 12 + noise
    trend = season_diff.mean(1) / 12
    assert float(trend.abs().max()) < 0.031 and float(trend.abs().mean()) > 0.006
    residual = season_diff - 12 * trend[:, None]
    assert float(residual.std()) == pytest.approx(0.05 * 2**0.5, rel=0.1)  # the noise, twice
    naive = (y[:, 1:] - y[:, :-1]).abs().mean()
    assert float(residual.abs().mean()) < float(naive) / 3  # trend and season are the structure to learn


# ------------------------------------------------------------------------------------- moments


@pytest.mark.parametrize("mode", ["step", "forecast"])
def test_sharded_moments_equal_one_pass_over_the_steps(series, mode):
    source, features, targets = series
    ds = WindowDataset(source, 3, 2 if mode == "forecast" else 0)
    channels = [np.concatenate([t, f], 1) for t, f in zip(targets, features, strict=True)] if mode == "forecast" else features
    data = np.concatenate(channels).astype(np.float64)
    mean, std = feature_moments(ds)
    np.testing.assert_allclose(mean, data.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, data.std(0), rtol=1e-5)
    for shards in (2, 3, 7):
        parts = [moment_sums(ds, shard, shards, chunk_steps=4) for shard in range(shards)]
        assert sum(p[0, 0] for p in parts) == len(data)  # every step exactly once
        sharded = moments_from_sums(sum(parts), ds)
        np.testing.assert_allclose(sharded[0], mean, rtol=1e-6)
        np.testing.assert_allclose(sharded[1], std, rtol=1e-5)


def test_sharded_moments_of_synthetic_data():
    ds = SeasonalDataset(5, 30, seed=0, season=6, variable_length=True)
    whole = ds.__getitems__(list(range(5)))
    valid = torch.arange(whole["x"].shape[1])[None, :] < whole["lengths"][:, None]
    data = whole["x"][valid].double().numpy()
    for dataset, expected in ((ds, data), (WindowDataset(ds, 4, 2), np.concatenate([whole["y"][valid].numpy(), data], 1))):
        mean, std = moments_from_sums(sum(moment_sums(dataset, s, 3) for s in range(3)), dataset)
        np.testing.assert_allclose(mean, expected.mean(0), atol=1e-6)
        np.testing.assert_allclose(std, expected.std(0), atol=1e-6)
    with pytest.raises(ValueError, match="shard=3; expected 0 <= shard < num_shards=3"):
        moment_sums(ds, 3, 3)
