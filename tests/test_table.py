"""`dist-gru prepare --table`: long-format CSV and Parquet tables to `dist_gru.seq/v1` folders, and the
per-series facts those folders keep (docs/tables.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import PY, assert_ok, cli, run

from dist_gru.data.files import DataFormatError, SequenceFileDataset
from dist_gru.data.prepare import main as prepare
from dist_gru.data.windows import WindowDataset

LENGTHS = {"a": 30, "b": 20, "c": 25}


def _table(lengths=LENGTHS, freq="D", start="2024-01-01") -> pd.DataFrame:
    """Series of different lengths: y = k (+100 for b), a past and a future covariate, two statics."""
    frames = []
    for sid, n in lengths.items():
        k = np.arange(n, dtype=float)
        frames.append(
            pd.DataFrame(
                {
                    "id": sid,
                    "ds": pd.date_range(start, periods=n, freq=freq),
                    "y": k + (100 if sid == "b" else 0),
                    "price": k * 0.5,
                    "promo": k % 7,
                    "region": "south" if sid == "c" else "north",
                    "size": {"a": 3.0, "b": 1.0, "c": 2.0}.get(sid, 0.0),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def _prepare(capsys, *args) -> dict:
    code = prepare([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _refused(capsys, *args) -> str:
    code = prepare([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


BASE = ["--id-column", "id", "--time-column", "ds", "--target-columns", "y"]
FULL = [*BASE, "--past-columns", "price", "--future-columns", "promo", "--static-columns", "region,size"]


def _files(path: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "meta.json"}
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("created_by")
    return {**files, "meta": json.dumps(meta, sort_keys=True).encode()}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_long_table_becomes_one_series_per_id_in_any_row_order(tmp_path, capsys, suffix):
    df = _table()
    shuffled = df.sample(frac=1, random_state=0)  # series interleaved, time shuffled
    sorted_file, shuffled_file = _write(df, tmp_path / f"s{suffix}"), _write(shuffled, tmp_path / f"u{suffix}")
    calendar = ["--calendar", "dayofweek,month,year"]
    summary = _prepare(capsys, "--table", sorted_file, *FULL, *calendar, "--out", tmp_path / "s")
    _prepare(capsys, "--table", shuffled_file, *FULL, *calendar, "--out", tmp_path / "u")
    assert _files(tmp_path / "s") == _files(tmp_path / "u")
    assert summary["rows"] == 75 and summary["freq"] == "D" and summary["num_series"] == 3
    assert summary["rows_per_s"] > 0 and summary["peak_rss_mb"] > 0

    ds = SequenceFileDataset(tmp_path / "s")
    assert ds.series_ids.tolist() == ["a", "b", "c"] and ds.lengths.tolist() == [30, 20, 25]
    assert ds.series_start.tolist() == [pd.Timestamp("2024-01-01").value] * 3
    assert ds.freq == "D" and ds.time_column == "ds" and ds.id_column == "id" and ds.target_names == ["y"]
    names = ["price", "promo", "dayofweek_sin", "dayofweek_cos", "month_sin", "month_cos", "year"]
    assert ds.feature_names == names and ds.feature_roles == ["past"] + ["future"] * 6
    assert ds.static == [
        {"name": "region", "kind": "category", "vocabulary": ["north", "south"]},
        {"name": "size", "kind": "value"},
    ]
    assert ds.static_categories.tolist() == [[0], [0], [1]] and ds.static_values.tolist() == [[3.0], [1.0], [2.0]]
    assert ds.eval_from is None and ds.class_names is None
    b = ds[1]
    torch.testing.assert_close(b["y"][:, 0], torch.arange(20, dtype=torch.float32) + 100)
    days = pd.date_range("2024-01-01", periods=20, freq="D")
    expected = np.stack(
        [
            np.arange(20) * 0.5,
            np.arange(20) % 7,
            np.sin(2 * np.pi * days.day_of_week / 7),
            np.cos(2 * np.pi * days.day_of_week / 7),
            np.sin(2 * np.pi * (days.month - 1) / 12),
            np.cos(2 * np.pi * (days.month - 1) / 12),
            days.year,
        ],
        axis=1,
    )
    np.testing.assert_allclose(b["x"].numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError):  # read-only per-series arrays
        ds.series_start[0] = 0


def test_csv_and_parquet_of_one_table_agree_and_one_series_needs_no_id(tmp_path, capsys):
    df = _table()
    _prepare(capsys, "--table", _write(df, tmp_path / "t.csv"), *FULL, "--out", tmp_path / "c")
    _prepare(capsys, "--table", _write(df, tmp_path / "t.parquet"), *FULL, "--out", tmp_path / "p")
    assert _files(tmp_path / "c") == _files(tmp_path / "p")
    one = _table({"a": 12}).drop(columns=["id"])
    _prepare(capsys, "--table", _write(one, tmp_path / "one.pq"), "--time-column", "ds", "--target-columns", "y",
             "--out", tmp_path / "one")  # fmt: skip
    ds = SequenceFileDataset(tmp_path / "one")
    assert len(ds) == 1 and ds.series_ids is None and ds.num_features == 0 and ds.lengths.tolist() == [12]


@pytest.mark.parametrize(
    "freq, stored", [("h", "h"), ("D", "D"), ("MS", "MS"), ("W-SUN", "W-SUN"), ("QS", "QS-JAN"), ("YS", "YS-JAN")]
)
def test_each_file_keeps_its_own_inferred_frequency(tmp_path, capsys, freq, stored):
    start = "2023-01-01"  # a Sunday, a month, quarter and year start
    summary = _prepare(capsys, "--table", _write(_table(freq=freq, start=start), tmp_path / "t.parquet"), *BASE,
                       "--out", tmp_path / "o")  # fmt: skip
    assert summary["freq"] == stored and SequenceFileDataset(tmp_path / "o").freq == stored


def test_mixed_frequencies_duplicates_and_irregular_steps_are_refused(tmp_path, capsys):
    daily, hourly = _table({"a": 10}), _table({"b": 10}, freq="h")
    err = _refused(capsys, "--table", _write(pd.concat([daily, hourly]), tmp_path / "m.csv"), *BASE, "--out", tmp_path / "o")
    assert "series 'b' has timestamps off its D grid starting at 2024-01-01 00:00:00: 2024-01-01 01:00:00" in err

    dup = _table()
    dup = pd.concat([dup, dup[(dup.id == "c") & (dup.ds == "2024-01-05")]])
    err = _refused(capsys, "--table", _write(dup, tmp_path / "d.csv"), *BASE, "--out", tmp_path / "o")
    assert "series 'c' has duplicate timestamps (2024-01-05 00:00:00)" in err

    irregular = _table()
    irregular.loc[(irregular.id == "a") & (irregular.ds == "2024-01-07"), "ds"] = pd.Timestamp("2024-01-07 12:00")
    err = _refused(capsys, "--table", _write(irregular, tmp_path / "i.parquet"), *BASE, "--out", tmp_path / "o")
    assert "series 'a' has timestamps off its D grid" in err and "2024-01-07 12:00:00" in err
    err = _refused(capsys, "--table", _write(daily, tmp_path / "w.csv"), *BASE, "--freq", "W-MON", "--out", tmp_path / "o")
    assert "series 'a' has timestamps off its W-MON grid" in err
    assert not (tmp_path / "o").exists()
    err = _refused(capsys, "--table", tmp_path / "w.csv", *BASE, "--freq", "fortnightly", "--out", tmp_path / "o")
    assert "--freq 'fortnightly': not a pandas offset alias" in err


def _gappy(tmp_path: Path) -> Path:
    """Series a: y NaN at day 2, price NaN at days 0 and 4, day 6 absent; series b complete."""
    df = _table({"a": 8, "b": 5})
    df.loc[(df.id == "a") & (df.ds == "2024-01-03"), "y"] = np.nan
    df.loc[(df.id == "a") & df.ds.isin(pd.to_datetime(["2024-01-01", "2024-01-05"])), "price"] = np.nan
    df = df[~((df.id == "a") & (df.ds == "2024-01-07"))]
    return _write(df, tmp_path / "g.csv")


def test_missing_values_and_steps_under_each_policy(tmp_path, capsys):
    file = _gappy(tmp_path)
    args = [*BASE, "--past-columns", "price", "--out"]
    err = _refused(capsys, "--table", file, *args, tmp_path / "e")
    assert "series 'a' has 1 missing timestamp(s) on its D grid (2024-01-07 00:00:00)" in err
    complete = _table({"a": 8}).astype({"y": float})
    complete.loc[3, "y"] = np.nan
    err = _refused(capsys, "--table", _write(complete, tmp_path / "n.parquet"), *args, tmp_path / "e")
    assert "column 'y', series 'a', timestamp 2024-01-04 00:00:00: missing value" in err

    y = {}
    price = {}
    for policy in ("ffill", "interpolate", "mask"):
        summary = _prepare(capsys, "--table", file, *args, tmp_path / policy, "--missing", policy)
        assert summary["missing"] == {"policy": policy, "filled": {"y": 2, "price": 3}, "inserted_steps": 1}
        ds = SequenceFileDataset(tmp_path / policy)
        assert ds.meta["missing"] == summary["missing"]
        y[policy], price[policy] = ds[0]["y"][:, 0].tolist(), ds[0]["x"][:, 0].tolist()
        assert ds.lengths.tolist() == [8, 5]
    assert y["ffill"] == [0, 1, 1, 3, 4, 5, 5, 7] and price["ffill"] == [0.5, 0.5, 1, 1.5, 1.5, 2.5, 2.5, 3.5]
    assert y["interpolate"] == [0, 1, 2, 3, 4, 5, 6, 7] and price["interpolate"] == [0.5, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]
    assert y["mask"] == y["ffill"] and price["mask"] == [0, 0.5, 1, 1.5, 0, 2.5, 0, 3.5]
    ds = SequenceFileDataset(tmp_path / "mask")
    assert ds.feature_names == ["price", "y_observed", "price_observed"] and ds.feature_roles == ["past"] * 3
    assert ds[0]["x"][:, 1].tolist() == [1, 1, 0, 1, 1, 1, 0, 1] and ds[0]["x"][:, 2].tolist() == [0, 1, 1, 1, 0, 1, 0, 1]
    assert ds[1]["x"][:, 1:].eq(1).all()


def test_csv_blank_lines_and_nan_spellings(tmp_path, capsys):
    text = "id,ds,y\na,2024-01-01,1\n\na,2024-01-02,NaN\na,2024-01-03,\na,2024-01-04,4\n\n"
    (tmp_path / "b.csv").write_text(text)
    _prepare(capsys, "--table", tmp_path / "b.csv", *BASE, "--freq", "D", "--missing", "interpolate", "--out", tmp_path / "o")
    assert SequenceFileDataset(tmp_path / "o")[0]["y"][:, 0].tolist() == [1, 2, 3, 4]
    (tmp_path / "x.csv").write_text("id,ds,y\na,2024-01-01,1\na,2024-01-02,abc\n")
    err = _refused(capsys, "--table", tmp_path / "x.csv", *BASE, "--out", tmp_path / "o2")
    assert "abc" in err and "must be numbers" in err
    (tmp_path / "t.csv").write_text("id,ds,y\na,2024-01-01,1\na,,2\n")
    err = _refused(capsys, "--table", tmp_path / "t.csv", *BASE, "--out", tmp_path / "o2")
    assert "--time-column 'ds' is empty in data row 2; every row needs a timestamp" in err


def test_a_static_value_that_changes_within_a_series_is_refused(tmp_path, capsys):
    df = _table()
    df.loc[(df.id == "b") & (df.ds == "2024-01-09"), "region"] = "west"
    for suffix in (".csv", ".parquet"):
        err = _refused(capsys, "--table", _write(df, tmp_path / f"s{suffix}"), *FULL, "--out", tmp_path / "o")
        assert "--static-columns 'region' changes within series 'b' ('north' and 'west')" in err


def test_text_labels_become_sorted_class_ids_with_names(tmp_path, capsys):
    df = _table({"a": 6, "b": 4})
    df["state"] = np.where(df.y % 3 == 0, "idle", np.where(df.y % 3 == 1, "busy", "off"))
    file = _write(df, tmp_path / "l.parquet")
    args = ["--id-column", "id", "--time-column", "ds", "--target-columns", "state", "--past-columns", "price"]
    summary = _prepare(capsys, "--table", file, *args, "--task", "classification", "--out", tmp_path / "o")
    assert summary["num_classes"] == 3
    ds = SequenceFileDataset(tmp_path / "o")
    assert ds.class_names == ["busy", "idle", "off"] and ds.num_classes == 3
    assert ds[0]["y"].tolist() == [1, 0, 2, 1, 0, 2]  # idle, busy, off, ...
    df["state"] = (df.y % 3).astype(int)
    _prepare(capsys, "--table", _write(df, tmp_path / "i.csv"), *args, "--task", "classification", "--out", tmp_path / "i")
    ds = SequenceFileDataset(tmp_path / "i")
    assert ds.class_names is None and ds.num_classes == 3 and ds[1]["y"].tolist() == [1, 2, 0, 1]  # (100 + k) % 3


def test_the_time_cut_keeps_history_in_validation(tmp_path, capsys):
    file = _write(_table(), tmp_path / "t.parquet")
    summary = _prepare(capsys, "--table", file, *BASE, "--past-columns", "price", "--val-from", "2024-01-16",
                       "--out", tmp_path / "o")  # fmt: skip
    train, val = SequenceFileDataset(tmp_path / "o" / "train"), SequenceFileDataset(tmp_path / "o" / "val")
    assert train.lengths.tolist() == [15, 15, 15] and val.lengths.tolist() == [30, 20, 25]
    assert val.eval_from.tolist() == [15, 15, 15] and train.eval_from is None
    assert summary["train"]["total_steps"] == 45 and summary["val"]["total_steps"] == 75
    torch.testing.assert_close(val[1]["y"][:15], train[1]["y"])

    forecast = WindowDataset(val, window=4, horizon=2)  # first forecast step t + 4 >= 15: t from 11
    seq, start = forecast.locate(np.arange(len(forecast)))
    assert len(forecast) == (30 - 6 - 11 + 1) + (20 - 6 - 11 + 1) + (25 - 6 - 11 + 1)
    assert start[seq == 1].tolist() == [11, 12, 13, 14] and start.min() == 11
    batch = forecast.__getitems__([0])
    torch.testing.assert_close(batch["y"][0, :, 0], torch.tensor([15.0, 16.0]))  # the first validation targets
    torch.testing.assert_close(batch["x"][0, :, 0], torch.tensor([11.0, 12.0, 13.0, 14.0]))  # history before the cut
    strided = WindowDataset(val, window=4, horizon=2, stride=3)  # 11 rounded up to the grid: 12
    assert WindowDataset(train, window=4, horizon=2, stride=3).locate(np.array([0]))[1].tolist() == [0]
    assert strided.locate(np.arange(len(strided)))[1][:3].tolist() == [12, 15, 18]
    steps = WindowDataset(val, window=4, mode="step")  # last step t + 3 >= 15: t from 12
    assert steps.locate(np.array([0]))[1].tolist() == [12] and len(steps) == (30 - 4 - 12 + 1) + (20 - 4 - 12 + 1) + (25 - 4 - 12 + 1)

    _prepare(capsys, "--table", file, *BASE, "--val-last", "5", "--test-last", "3", "--out", tmp_path / "l")
    test = SequenceFileDataset(tmp_path / "l" / "test")
    val = SequenceFileDataset(tmp_path / "l" / "val")
    assert SequenceFileDataset(tmp_path / "l" / "train").lengths.tolist() == [22, 12, 17]
    assert val.lengths.tolist() == [27, 17, 22] and val.eval_from.tolist() == [22, 12, 17]
    assert test.lengths.tolist() == [30, 20, 25] and test.eval_from.tolist() == [27, 17, 22]

    _prepare(capsys, "--table", file, *BASE, "--val-last", "5", "--test-from", "2024-01-18", "--out", tmp_path / "m")
    assert SequenceFileDataset(tmp_path / "m" / "val").eval_from.tolist() == [12, 12, 12]  # 5 steps before the test cut
    assert SequenceFileDataset(tmp_path / "m" / "test").eval_from.tolist() == [17, 17, 17]

    err = _refused(capsys, "--table", file, *BASE, "--val-from", "2024-01-22", "--out", tmp_path / "x")
    assert "1 series have no D step in the val part of the time cut: 'b' (20 steps from 2024-01-01 00:00:00)" in err


def test_a_refused_table_leaves_existing_folders_alone(tmp_path, capsys):
    good, bad = _table(), _table()
    bad.loc[5, "y"] = np.nan
    _prepare(capsys, "--table", _write(good, tmp_path / "g.csv"), *BASE, "--val-last", "4", "--out", tmp_path / "o")
    before = {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    err = _refused(capsys, "--table", _write(bad, tmp_path / "b.csv"), *BASE, "--val-last", "4", "--out", tmp_path / "o")
    assert "missing value" in err
    assert {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()} == before
    _refused(capsys, "--table", tmp_path / "b.csv", *BASE, "--val-last", "4", "--out", tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv", "g.csv", "o"]  # no folder, no scratch left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-columns", "y"], "--table needs --time-column"),
        ([*BASE, "--val-fraction", "0.2"], "--val-fraction does not apply to --table (cut in time with --val-from"),
        ([*BASE, "--past-columns", "nope"], "unknown column(s) 'nope'; available: id, ds, y, price, promo, region, size"),
        ([*BASE, "--past-columns", "y"], "column 'y' is named in two roles"),
        ([*BASE, "--calendar", "hour,moon"], "--calendar moon: unknown"),
        ([*BASE, "--val-from", "soon"], "--val-from 'soon': not a timestamp"),
        ([*BASE, "--test-last", "3"], "--test-from/--test-last need --val-from or --val-last"),
        ([*BASE, "--memory-mb", "4"], "--memory-mb 4; expected an integer >= 16"),
    ],
)
def test_bad_table_options_are_one_error_line(tmp_path, capsys, args, message):
    file = _write(_table(), tmp_path / "t.csv")
    assert message in _refused(capsys, "--table", file, *args, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_new_meta_keys_and_series_arrays_are_validated_on_open(tmp_path, capsys):
    _prepare(capsys, "--table", _write(_table(), tmp_path / "t.csv"), *FULL, "--val-last", "4", "--out", tmp_path / "o")
    val = tmp_path / "o" / "val"
    meta = json.loads((val / "meta.json").read_text())
    (val / "meta.json").write_text(json.dumps({**meta, "feature_roles": ["past", "later"]}))
    with pytest.raises(DataFormatError, match='"feature_roles" is'):
        SequenceFileDataset(val)
    (val / "meta.json").write_text(json.dumps(meta))
    np.save(val / "eval_from.npy", np.array([26, 99, 21]))
    with pytest.raises(DataFormatError, match=r"eval_from\[1\] = 99; expected 0 <= value <= the series' length 20"):
        SequenceFileDataset(val)
    (val / "eval_from.npy").unlink()
    with pytest.raises(DataFormatError, match="eval_from.npy: missing"):
        SequenceFileDataset(val)


def _peak_of(code: str) -> float:
    result = assert_ok(run([PY, "-c", code], timeout=120))
    return float(result.stdout.split()[-1])


@pytest.mark.slow
def test_a_table_larger_than_the_memory_bound_is_converted_within_it(tmp_path):
    """~40 MB of Parquet at --memory-mb 32: the peak RSS of the conversion minus that of a process that
    imported the same modules stays under 32 MiB."""
    rows, series = 1_500_000, 100
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(tmp_path / "big.parquet", pa.schema([("id", pa.string()), ("ts", pa.timestamp("ns")),
                          ("y", pa.float64()), ("x1", pa.float64()), ("x2", pa.float64())])) as writer:  # fmt: skip
        for first in range(0, rows, 100_000):
            k = np.arange(first, first + 100_000)
            writer.write_table(pa.table({
                "id": (k % series).astype(str), "ts": np.datetime64("2020-01-01", "ns") + (k // series).astype("timedelta64[h]"),
                "y": rng.standard_normal(len(k)), "x1": rng.standard_normal(len(k)), "x2": rng.standard_normal(len(k)),
            }))  # fmt: skip
    assert (tmp_path / "big.parquet").stat().st_size > 32 << 20
    baseline = _peak_of(
        "import dist_gru.cli, dist_gru.data.prepare, dist_gru.data.table; "
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    ) / 1024
    result = assert_ok(cli("prepare", "--table", str(tmp_path / "big.parquet"), "--id-column", "id", "--time-column", "ts",
                           "--target-columns", "y", "--past-columns", "x1,x2", "--memory-mb", "32", "--val-last", "100",
                           "--out", str(tmp_path / "o"), timeout=240))  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["rows"] == rows and summary["val"]["total_steps"] == rows
    assert summary["peak_rss_mb"] - baseline < 32, (summary["peak_rss_mb"], baseline)
    val = SequenceFileDataset(tmp_path / "o" / "val")
    assert val.lengths.tolist() == [rows // series] * series and val.freq == "h"
    assert val.series_ids[:3].tolist() == ["0", "1", "2"]  # integer ids in numeric order


@pytest.mark.slow
def test_a_prepared_table_trains_and_forecasts_end_to_end(tmp_path, capsys):
    df = _table({str(i): 80 for i in range(4)})
    df["y"] = np.sin(np.arange(len(df)) * 2 * np.pi / 7) + 0.1 * df.price
    _prepare(capsys, "--table", _write(df, tmp_path / "t.csv"), *BASE, "--past-columns", "price", "--calendar",
             "dayofweek", "--val-last", "10", "--out", tmp_path / "data")  # fmt: skip
    args = [
        "model.hidden_size=8", "model.num_layers=1", "model.head=forecast", "data.name=files",
        f"data.train_path={tmp_path / 'data' / 'train'}", f"data.val_path={tmp_path / 'data' / 'val'}",
        "data.window=12", "data.horizon=3", "optim.warmup_steps=2", "train.global_batch_size=16",
        "train.max_steps=6", "train.log_every=3", "log.mode=disabled", "--quiet", f"train.run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert_ok(cli("train", *args, timeout=240))
    result = assert_ok(cli("forecast", "--model", str(tmp_path / "run" / "model"), "--data",
                           str(tmp_path / "data" / "val"), "--out", str(tmp_path / "f.npy"), timeout=240))  # fmt: skip
    assert np.load(tmp_path / "f.npy").shape == (4, 3, 1), result.output
    assert os.path.exists(tmp_path / "run" / "model")


@pytest.mark.slow
def test_the_table_benchmark_reports_rows_speed_and_memory(tmp_path):
    result = assert_ok(run([PY, "-m", "dist_gru.bench.table", "--rows", "3000", "--series", "10", "--dir",
                            str(tmp_path)], timeout=240))  # fmt: skip
    report = json.loads(result.stdout)
    assert report["rows"] == 3000 and report["series"] == 10 and report["file_mb"] > 0
    assert report["rows_per_s"] > 0 and report["peak_rss_mb"] > 0 and report["memory_mb"] == 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the table and the dataset are removed


def test_zoned_timestamps_float_labels_and_out_of_range_times(tmp_path, capsys):
    (tmp_path / "z.csv").write_text("".join(
        ["id,ds,y\n"] + [f"a,2024-01-0{d}T01:00:00+01:00,{d}\n" for d in range(1, 5)]
    ))  # fmt: skip
    _prepare(capsys, "--table", tmp_path / "z.csv", *BASE, "--out", tmp_path / "z")
    ds = SequenceFileDataset(tmp_path / "z")
    assert ds.series_start.tolist() == [pd.Timestamp("2024-01-01 00:00").value] and ds.freq == "D"

    df = _table({"a": 6})
    df["label"] = (df.y % 3).astype(float)
    args = ["--id-column", "id", "--time-column", "ds", "--target-columns", "label", "--past-columns", "price"]
    _prepare(capsys, "--table", _write(df, tmp_path / "f.parquet"), *args, "--task", "classification", "--out", tmp_path / "f")
    ds = SequenceFileDataset(tmp_path / "f")
    assert ds.class_names is None and ds.num_classes == 3 and ds[0]["y"].tolist() == [0, 1, 2, 0, 1, 2]

    far = pa.table({"id": ["a"] * 3, "ds": pa.array([np.datetime64(f"250{d}-01-01", "us") for d in range(3)]), "y": [1.0] * 3})
    pq.write_table(far, tmp_path / "far.parquet")
    err = _refused(capsys, "--table", tmp_path / "far.parquet", *BASE, "--out", tmp_path / "far")
    assert str(tmp_path / "far.parquet") in err and not (tmp_path / "far").exists()
