"""From a long table to a forecast table: `prepare --table` with dates, series ids and a future-known
column, a forecast model trained on it, and `dist-gru forecast --future plan.csv --out f.csv`
writing `id, ds, <target>` rows with the real timestamps after each series' end.

    .venv/bin/pytest -q tests/test_forecast_table.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_ok, assert_refused, cli, snapshot

HORIZON = 7
TRAIN = [
    "data.name=files",
    "model.head=forecast",
    "data.window=14",
    f"data.horizon={HORIZON}",
    "model.hidden_size=16",
    "model.num_layers=1",
    "train.global_batch_size=16",
    "train.max_steps=400",
    "train.eval_every=400",
    "optim.warmup_steps=5",
    "optim.lr=0.01",
    "data.scaling=global",
    "log.mode=disabled",
    "--quiet",
]


def shop_table(path: Path) -> pd.DataFrame:
    """Three shops of different lengths and starts, daily, with planned promotions (+3 units)."""
    rng = np.random.default_rng(0)
    rows = []
    for shop, (start, days) in {"north": ("2024-01-01", 120), "south": ("2024-01-20", 90), "east": ("2024-02-03", 100)}.items():
        for ds in pd.date_range(start, periods=days, freq="D"):
            promo = int(rng.random() < 0.2)
            region = "coast" if shop == "east" else "inland"  # a static column: one value per shop
            rows.append((shop, region, ds.strftime("%Y-%m-%d"), promo, 10 + 3 * promo + rng.normal(0, 0.2)))
    frame = pd.DataFrame(rows, columns=["shop", "region", "day", "promo", "units"])
    frame.sample(frac=1.0, random_state=0).to_csv(path, index=False)  # rows in any order
    return frame


@pytest.fixture(scope="module")
def shops(tmp_path_factory):
    root = tmp_path_factory.mktemp("shops")
    frame = shop_table(root / "shops.csv")
    prepared = cli(
        "prepare", "--table", str(root / "shops.csv"), "--id-column", "shop", "--time-column", "day",
        "--target-columns", "units", "--future-columns", "promo", "--calendar", "dayofweek", "--static-columns", "region",
        "--val-last", "20", "--out", str(root / "data"),
    )
    assert_ok(prepared)
    data = root / "data"
    run = cli("train", *TRAIN, f"data.train_path={data / 'train'}", f"data.val_path={data / 'val'}",
              f"train.run_dir={root / 'run'}", timeout=600)
    assert_ok(run)
    return root, frame


def plan(frame: pd.DataFrame, promo: int) -> pd.DataFrame:
    """The promotions planned for the 7 days after each shop's last day."""
    rows = []
    for shop, days in frame.groupby("shop")["day"]:
        after = pd.date_range(pd.Timestamp(days.max()) + pd.Timedelta(days=1), periods=HORIZON, freq="D")
        rows += [(shop, ds.strftime("%Y-%m-%d"), promo) for ds in after]
    return pd.DataFrame(rows, columns=["shop", "day", "promo"])


def test_a_forecast_table_has_ids_and_the_days_after_each_series(shops, tmp_path):
    root, frame = shops
    plan(frame, 1).to_csv(tmp_path / "plan-all.csv", index=False)
    plan(frame, 0).to_parquet(tmp_path / "plan-none.parquet", index=False)
    model, data = root / "run" / "model", root / "data" / "val"
    out = {}
    for name, future in (("all", tmp_path / "plan-all.csv"), ("none", tmp_path / "plan-none.parquet")):
        target = tmp_path / f"{name}.csv"
        assert_ok(cli("forecast", "--model", str(model), "--data", str(data), "--future", str(future), "--out", str(target)))
        out[name] = pd.read_csv(target)
    table = out["all"]
    facts = json.loads((model / "config.json").read_text())["data"]  # the data's names travel with the model
    assert facts["feature_names"] == ["promo", "dayofweek_sin", "dayofweek_cos"]
    assert facts["feature_roles"] == ["future"] * 3 and facts["target_names"] == ["units"]
    assert (facts["freq"], facts["calendar"]) == ("D", ["dayofweek"])
    assert list(table.columns) == ["shop", "region", "day", "units"]
    assert table.groupby("shop").region.first().to_dict() == {"east": "coast", "north": "inland", "south": "inland"}
    assert len(table) == 3 * HORIZON
    for shop, days in frame.groupby("shop")["day"]:
        expected = pd.date_range(pd.Timestamp(days.max()) + pd.Timedelta(days=1), periods=HORIZON, freq="D")
        assert table.loc[table.shop == shop, "day"].tolist() == [d.strftime("%Y-%m-%d") for d in expected]
    lift = (out["all"].units - out["none"].units).mean()
    print(f"\nforecast units with a promotion planned every day minus none: {lift:.2f} (true lift 3)")
    assert 2.0 < lift < 4.0
    # The .npy form holds the same numbers; a copied model folder writes the same table.
    assert_ok(cli("forecast", "--model", str(model), "--data", str(data), "--future", str(tmp_path / "plan-all.csv"),
                  "--out", str(tmp_path / "all.npy")))
    np.testing.assert_allclose(np.load(tmp_path / "all.npy")[..., 0].reshape(-1), table.units.to_numpy(), rtol=1e-6)
    shutil.copytree(model, tmp_path / "copy" / "model")
    assert_ok(cli("forecast", "--model", str(tmp_path / "copy" / "model"), "--data", str(data),
                  "--future", str(tmp_path / "plan-all.csv"), "--out", str(tmp_path / "copied.csv")))
    assert (tmp_path / "copied.csv").read_bytes() == (tmp_path / "all.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "copied.csv"), table)


def test_an_incomplete_plan_is_refused_naming_the_missing_rows(shops, tmp_path):
    root, frame = shops
    model, data = root / "run" / "model", root / "data" / "val"
    partial = plan(frame, 1)
    partial = partial[~((partial.shop == "south") & (partial.day == partial[partial.shop == "south"].day.iloc[2]))]
    partial.to_csv(tmp_path / "partial.csv", index=False)
    before = snapshot(tmp_path)
    result = cli("forecast", "--model", str(model), "--data", str(data), "--future", str(tmp_path / "partial.csv"),
                 "--out", str(tmp_path / "f.csv"))
    day = plan(frame, 1).query("shop == 'south'").day.iloc[2]
    assert_refused(result, "1 of the 21 (series, time) rows of the horizon are missing", f"'south' at {day} 00:00:00")
    assert snapshot(tmp_path) == before  # nothing written
    assert_refused(
        cli("forecast", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "f.csv")),
        "reads future-known covariates over the horizon (promo)", "shop, day, promo",
    )
    assert_refused(
        cli("forecast", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "f.txt")),
        "--out", "expected a file name ending in .npy, .csv, .parquet",
    )
