"""`dist-gru backtest`: a forecaster scored on the K last origins of every series, per series and
pooled, against the naive and seasonal-naive forecasts of the same origins; checked against a hand
computation of the same windows, on folders with plain and future-known covariates, 1 and 2 processes.

    .venv/bin/pytest -q tests/test_backtest.py -n 0 -s     # -s prints the figures compared
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_ok, assert_refused, cli, snapshot, torchrun

from dist_gru.config import load_config
from dist_gru.data.files import write_sequences
from dist_gru.data.loading import build_dataset
from dist_gru.infer.backtest import OriginWindows
from dist_gru.model import GRUModel

SEASON, WINDOW, HORIZON = 6, 18, 4
COMMON = [
    "model.head=forecast",
    f"data.window={WINDOW}",
    f"data.horizon={HORIZON}",
    "data.seq_len=60",
    "data.train_size=64",
    "data.val_size=8",
    "model.hidden_size=16",
    "model.num_layers=1",
    "train.global_batch_size=32",
    "train.max_steps=40",
    "train.eval_every=40",
    "train.log_every=20",
    "optim.lr=0.01",
    "optim.warmup_steps=5",
    "log.mode=disabled",
    "train.threads=1",
    "--quiet",
]
MODEL_COLUMNS = ["loss", "mse", "mae", "rmse", "smape", "mase", "bias", *(f"mae_step_{h}" for h in range(1, HORIZON + 1))]
BASELINE_COLUMNS = [f"{b}_{m}" for b in ("naive", "seasonal_naive") for m in ("mae", "rmse", "mase", "smape")]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A point forecaster of seasonal series (2 covariates), a quantile forecaster of promo series
    (1 future-known covariate), and a head-last model (not a forecaster)."""
    root = tmp_path_factory.mktemp("backtest-models")
    runs = {
        "seasonal": ["data.name=seasonal", f"data.season={SEASON}"],
        "promo": ["data.name=promo", "model.output=quantile"],
    }
    for name, args in runs.items():
        assert_ok(cli("train", *COMMON, *args, f"train.run_dir={root / name}"))
    GRUModel(3, 8).save_pretrained(root / "last" / "model")
    return {name: root / name / "model" for name in (*runs, "last")}


def seasonal_folder(path: Path, lengths: tuple[int, ...], constant: int) -> list[np.ndarray]:
    """Seasonal series with the sin/cos covariates of the synthetic task; series `constant` is a
    constant, which the naive forecast gets exactly right. Returns the targets."""
    rng = np.random.default_rng(0)
    features, targets = [], []
    for i, n in enumerate(lengths):
        angle = 2 * np.pi * np.arange(n) / SEASON
        value = np.full(n, 0.7) if i == constant else np.sin(angle + rng.uniform(0, 6)) + 0.05 * rng.standard_normal(n)
        features.append(np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32))
        targets.append(value.astype(np.float32)[:, None])
    write_sequences(path, features, targets, task="regression")
    return targets


def hand_windows(series: list[np.ndarray], covariates: list[np.ndarray], origins: int, stride: int):
    """x, future, y of origin k of every series, in (series, k) order, built here from the arrays."""
    xs, futures, ys = [], [], []
    for target, cov in zip(series, covariates, strict=True):
        for k in range(origins):
            start = len(target) - k * stride - HORIZON - WINDOW
            xs.append(np.concatenate([target[start : start + WINDOW], cov[start : start + WINDOW]], axis=1))
            futures.append(cov[start + WINDOW : start + WINDOW + HORIZON])
            ys.append(target[start + WINDOW : start + WINDOW + HORIZON])
    return torch.tensor(np.stack(xs)), torch.tensor(np.stack(futures)), np.stack(ys).astype(np.float64)


def hand_metrics(point: np.ndarray, x: torch.Tensor, y: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, sMAPE and MASE of `point`, and the baselines' MAE, from the windows' own history."""
    history = x[..., :1].double().numpy()
    naive = np.repeat(history[:, -1:], HORIZON, axis=1)
    seasonal = history[:, WINDOW - SEASON + np.arange(HORIZON) % SEASON]
    error = np.abs(point - y)
    smape = np.where(np.abs(point) + np.abs(y) > 0, 200 * error / (np.abs(point) + np.abs(y) + 1e-300), 0.0)
    return {
        "mae": error.mean(),
        "rmse": np.sqrt((error**2).mean()),
        "smape": smape.mean(),
        "mase": error.sum() / np.abs(seasonal - y).sum(),
        "naive_mae": np.abs(naive - y).mean(),
        "seasonal_naive_mae": np.abs(seasonal - y).mean(),
        "naive_mase": np.abs(naive - y).sum() / np.abs(seasonal - y).sum(),
    }


def test_origin_windows_read_as_training_windows():
    """An origin on the training stride grid is read exactly as the training window at that start."""
    cfg = load_config(None, ["data.name=promo", "data.seq_len=60", "data.window=18", "data.horizon=4",
                             "model.head=forecast", "data.train_size=3", "data.val_size=2"])
    windows = build_dataset(cfg.data, "train", head="forecast")
    origins = OriginWindows(windows, origins=3, stride=5)
    assert origins.starts.tolist() == [[38, 33, 28]] * 3 and len(origins) == 9
    batch = origins.__getitems__([1, 5])  # series 0 origin 1 (start 33), series 1 origin 2 (start 28)
    number = windows.__len__() // 3  # windows per series (stride 1)
    same = windows.__getitems__([33, number + 28])
    for key in ("x", "y", "future", "lengths"):
        torch.testing.assert_close(batch[key], same[key], rtol=0, atol=0)
    assert batch["index"].tolist() == [1, 5] and origins.series(batch["index"]).tolist() == [0, 1]


def test_pooled_and_per_series_metrics_equal_a_hand_computation(models, tmp_path):
    lengths, origins = (40, 47, 31), 3
    targets = seasonal_folder(tmp_path / "series", lengths, constant=2)
    folder = str(tmp_path / "series")
    result = assert_ok(cli("backtest", "--model", str(models["seasonal"]), "--data", folder,
                           "--origins", str(origins), "--out", str(tmp_path / "table.csv")))
    record = result.json_last_line()
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 1
    covariates = [np.stack([np.sin(a), np.cos(a)], axis=1).astype(np.float32)
                  for a in (2 * np.pi * np.arange(n) / SEASON for n in lengths)]
    x, _, y = hand_windows(targets, covariates, origins, stride=HORIZON)
    model = GRUModel.from_pretrained(str(models["seasonal"])).eval()
    with torch.no_grad():
        point = model(x, lengths=torch.full((len(x),), WINDOW))[0].double().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # the constant series' seasonal-naive MAE is 0
        pooled = hand_metrics(point, x, y)
    # Origin 0 is what `dist-gru forecast` gives on the series without their last horizon.
    write_sequences(tmp_path / "cut", [c[:-HORIZON] for c in covariates], [t[:-HORIZON] for t in targets],
                    task="regression")
    assert_ok(cli("forecast", "--model", str(models["seasonal"]), "--data", str(tmp_path / "cut"),
                  "--out", str(tmp_path / "origin0.npy")))
    np.testing.assert_allclose(np.load(tmp_path / "origin0.npy"), point[::origins], rtol=1e-5, atol=1e-6)
    print(f"\nbacktest pooled: {json.dumps(record)}\nby hand: {pooled}")
    assert (record["series"], record["origins"], record["stride"], record["windows"]) == (3, 3, HORIZON, 9)
    for key, value in pooled.items():
        assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert record["seasonal_naive_mase"] == pytest.approx(1.0)

    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert list(rows[0]) == ["id", "origins", *MODEL_COLUMNS, *BASELINE_COLUMNS, "loses_to_baseline"]
    assert [row["id"] for row in rows] == ["0", "1", "2"] and {row["origins"] for row in rows} == {"3"}
    losing = []
    for i, row in enumerate(rows):
        with np.errstate(divide="ignore", invalid="ignore"):
            own = hand_metrics(point[3 * i : 3 * i + 3], x[3 * i : 3 * i + 3], y[3 * i : 3 * i + 3])
        assert float(row["mae"]) == pytest.approx(own["mae"], rel=1e-5)
        assert float(row["naive_mae"]) == pytest.approx(own["naive_mae"], abs=1e-7)
        loses = own["mae"] > min(own["naive_mae"], own["seasonal_naive_mae"])
        assert row["loses_to_baseline"] == str(loses)
        losing += [i] if loses else []
    assert float(rows[2]["naive_mae"]) == 0.0 and rows[2]["loses_to_baseline"] == "True"  # the constant series
    assert record["losing_series"] == len(losing) and record["losing_ids"] == losing


def test_stride_places_the_origins_and_parquet_holds_the_same_table(models, tmp_path):
    seasonal_folder(tmp_path / "series", (40, 47, 31), constant=2)
    args = ["backtest", "--model", str(models["seasonal"]), "--data", str(tmp_path / "series"), "--origins", "4"]
    one = assert_ok(cli(*args, "--stride", "1", "--out", str(tmp_path / "t.parquet"))).json_last_line()
    assert (one["stride"], one["windows"]) == (1, 12)
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert table["id"].tolist() == [0, 1, 2] and table["origins"].tolist() == [4, 4, 4]
    assert table["mae"].mean() == pytest.approx(one["mae"])  # equal origins per series: pooled = mean
    assert assert_ok(cli(*args, "--stride", "1", "--out", str(tmp_path / "t.csv"))).json_last_line()["mae"] == one["mae"]
    np.testing.assert_allclose(pd.read_csv(tmp_path / "t.csv")["mae"], table["mae"], rtol=1e-12)
    # A different stride scores different windows.
    assert assert_ok(cli(*args, "--stride", "2")).json_last_line()["mae"] != one["mae"]


def promo_table(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A long CSV table of promo series (ids b, a, c, z, unsorted): y, promo (future-known); z is a
    constant without promotions, which the naive forecast gets exactly right."""
    rng = np.random.default_rng(1)
    frames, ys, promos = [], [], []
    for name, n in (("b", 36), ("a", 41), ("c", 30), ("z", 33)):
        promo = (rng.random(n) < 0.3).astype(np.float32) * (name != "z")
        y = (0.5 + 1.5 * promo + 0.1 * rng.standard_normal(n) * (name != "z")).astype(np.float32)
        days = pd.date_range("2024-01-01", periods=n, freq="D")
        frames.append(pd.DataFrame({"store": name, "ds": days.strftime("%Y-%m-%d"), "y": y, "promo": promo}))
        ys.append(y[:, None])
        promos.append(promo[:, None])
    pd.concat(frames).to_csv(path, index=False)
    order = [1, 0, 2, 3]  # series are stored sorted by id: a, b, c, z
    return [ys[i] for i in order], [promos[i] for i in order]


def test_future_known_covariates_and_quantile_coverage_on_a_prepared_table(models, tmp_path):
    ys, promos = promo_table(tmp_path / "sales.csv")
    assert_ok(cli("prepare", "--table", str(tmp_path / "sales.csv"), "--id-column", "store", "--time-column", "ds",
                  "--target-columns", "y", "--future-columns", "promo", "--out", str(tmp_path / "sales")))
    out = tmp_path / "table.csv"
    record = assert_ok(cli("backtest", "--model", str(models["promo"]), "--data", str(tmp_path / "sales"),
                           "--origins", "2", "--out", str(out))).json_last_line()
    x, future, y = hand_windows(ys, promos, origins=2, stride=HORIZON)
    model = GRUModel.from_pretrained(str(models["promo"])).eval()
    with torch.no_grad():
        quantiles = model(x, lengths=torch.full((len(x),), WINDOW), future=future)[0].double().numpy()
    print(f"\nbacktest of the promo table: {json.dumps(record)}")
    assert record["mae"] == pytest.approx(np.abs(quantiles[..., 1] - y).mean(), rel=1e-5)
    for level, q in ((0.1, 0), (0.5, 1), (0.9, 2)):
        assert record[f"coverage_{level:g}"] == pytest.approx((y <= quantiles[..., q]).mean())
    table = pd.read_csv(out, dtype={"id": str})
    assert table["id"].tolist() == ["a", "b", "c", "z"] and "coverage_0.9" in table.columns
    own_mae = np.abs(quantiles[..., 1] - y).reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(table["mae"], own_mae, rtol=1e-5)
    assert table["naive_mae"].iloc[3] == 0.0  # the constant: naive is exact, the model cannot beat it
    assert (record["losing_series"], record["losing_ids"]) == (1, ["z"])
    assert table["loses_to_baseline"].tolist() == [False, False, False, True]
    # Without the horizon's plan the forecasts differ: the future values really reach the model.
    with torch.no_grad():
        blind = model(x, lengths=torch.full((len(x),), WINDOW), future=torch.zeros_like(future))[0].double().numpy()
    assert np.abs(blind[..., 1] - y).mean() != pytest.approx(record["mae"], rel=1e-3)


def test_refusals_name_the_problem_and_write_nothing(models, tmp_path):
    seasonal_folder(tmp_path / "series", (40, 47, 31), constant=2)
    data, model = str(tmp_path / "series"), str(models["seasonal"])
    before = snapshot(tmp_path)
    base = ["backtest", "--data", data]
    cases = [
        ([*base, "--model", str(models["last"]), "--origins", "2"],
         ["a model with head 'last' has no horizon to forecast; dist-gru backtest needs a model trained with model.head=forecast"]),
        ([*base, "--model", model, "--origins", "4"],
         ["--origins 4: needs 34 steps per series (data.window=18 + horizon 4 + 3 x stride 4)",
          "1 of 3 series", "(series 2; the shortest has 31 steps); lower --origins or --stride"]),
        ([*base, "--model", model, "--origins", "2", "--stride", "10"], ["--origins 2: needs 32 steps", "1 of 3"]),
        ([*base, "--model", model, "--origins", "0"], ["--origins 0: expected an integer >= 1"]),
        ([*base, "--model", model, "--origins", "2", "--out", str(tmp_path / "t.json")],
         [f"--out {tmp_path / 't.json'}: expected a file name ending in .csv, .parquet"]),
        ([*base, "--model", model, "--origins", "2", "--out", str(tmp_path / "series" / "t.csv")],
         ["is inside --data", "choose an output path outside the inputs"]),
        ([*base, "--model", model, "--origins", "2", "--out", str(tmp_path / "nowhere" / "t.csv")],
         [f"the folder {tmp_path / 'nowhere'} does not exist"]),
    ]
    for args, phrases in cases:
        assert_refused(cli(*args), *phrases)
    assert snapshot(tmp_path) == before
    # The shortest series (31 steps) holds exactly 2 origins 9 steps apart: 18 + 4 + 9.
    assert assert_ok(cli(*base, "--model", model, "--origins", "2", "--stride", "9")).json_last_line()["windows"] == 6


@pytest.mark.timeout(400)
def test_two_processes_give_the_json_and_table_of_one(models, tmp_path):
    seasonal_folder(tmp_path / "series", (40, 47, 31, 36, 44), constant=2)
    args = ["backtest", "--model", str(models["seasonal"]), "--data", str(tmp_path / "series"), "--origins", "3",
            "--batch-size", "4"]
    one = assert_ok(cli(*args, "--out", str(tmp_path / "one.csv"))).json_last_line()
    result = assert_ok(torchrun(2, *args, "--out", str(tmp_path / "two.csv")))
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 only
    two = result.json_last_line()
    print(f"\nbacktest mae: 1 proc {one['mae']:.9g}, 2 procs {two['mae']:.9g}")
    assert one.keys() == two.keys()
    for key, value in one.items():
        if isinstance(value, float) or key == "mae_by_step":
            assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        elif key != "out":
            assert two[key] == value, key
    tables = [pd.read_csv(tmp_path / name) for name in ("one.csv", "two.csv")]
    assert tables[0]["id"].tolist() == tables[1]["id"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(tables[1]["mae"], tables[0]["mae"], rtol=1e-5)
    assert tables[1]["loses_to_baseline"].tolist() == tables[0]["loses_to_baseline"].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "series", "two.csv"]  # no partial files left
