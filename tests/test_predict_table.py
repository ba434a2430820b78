"""`dist-gru predict --out preds.csv | .parquet`: rows keyed by series id and timestamp, labels under
their class names, for data prepared from a long table with text labels.

    .venv/bin/pytest -q tests/test_predict_table.py
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, assert_ok, assert_refused, cli


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Three sensors, hourly, of different lengths; the label of a step names the band its reading is in."""
    root = tmp_path_factory.mktemp("sensors")
    rng = np.random.default_rng(0)
    rows = []
    for sensor, (start, hours) in {"s1": ("2024-03-01 00:00", 60), "s2": ("2024-03-02 06:00", 45), "s3": ("2024-03-01 12:00", 50)}.items():
        for ts in pd.date_range(start, periods=hours, freq="h"):
            value = rng.random()
            band = "low" if value < 0.33 else ("mid" if value < 0.66 else "high")
            rows.append((sensor, "v2" if sensor == "s2" else "v1", ts.strftime("%Y-%m-%d %H:%M"), value, band))
    frame = pd.DataFrame(rows, columns=["sensor", "version", "time", "reading", "band"])
    frame.to_csv(root / "sensors.csv", index=False)
    assert_ok(cli(
        "prepare", "--table", str(root / "sensors.csv"), "--id-column", "sensor", "--time-column", "time",
        "--target-columns", "band", "--past-columns", "reading", "--static-columns", "version", "--task", "classification",
        "--out", str(root / "data"),
    ))
    train = [*TINY, "data.name=files", f"data.train_path={root / 'data'}", f"data.val_path={root / 'data'}",
             "model.head=step", "train.global_batch_size=3", "train.max_steps=150", "optim.lr=0.02",
             "log.mode=disabled", f"train.run_dir={root / 'run'}"]
    assert_ok(cli("train", *train, timeout=600))
    return root, frame


def test_labels_come_out_under_their_names_keyed_by_series_and_time(labelled, tmp_path):
    root, frame = labelled
    model, data = root / "run" / "model", root / "data"
    assert json.loads((model / "config.json").read_text())["data"]["class_names"] == ["high", "low", "mid"]
    result = assert_ok(cli("predict", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "p.csv")))
    assert json.loads(result.stdout.splitlines()[-1])["shape"] == [len(frame)]
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table.columns) == ["sensor", "version", "time", "band"]
    expected = frame.assign(time=pd.to_datetime(frame.time)).sort_values(["sensor", "time"], kind="stable")
    assert table.version.tolist() == expected.version.tolist()  # the static column, by name
    assert table.sensor.tolist() == expected.sensor.tolist()
    assert pd.to_datetime(table.time).tolist() == expected.time.tolist()
    assert set(table.band) <= {"high", "low", "mid"}
    accuracy = float((table.band.to_numpy() == expected.band.to_numpy()).mean())
    print(f"\nper-step band accuracy: {accuracy:.3f}")
    assert accuracy > 0.8
    # The .npy rows are the same predictions, as class ids in the order of the names.
    assert_ok(cli("predict", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "p.npy")))
    ids = np.load(tmp_path / "p.npy")
    assert np.array(["high", "low", "mid"])[ids].tolist() == table.band.tolist()
    # Probabilities: one column per class name, as Parquet.
    assert_ok(cli("predict", "--model", str(model), "--data", str(data), "--probabilities",
                  "--out", str(tmp_path / "p.parquet")))
    probs = pd.read_parquet(tmp_path / "p.parquet")
    assert list(probs.columns) == ["sensor", "version", "time", "p_high", "p_low", "p_mid"]
    np.testing.assert_allclose(probs[["p_high", "p_low", "p_mid"]].sum(axis=1), 1.0, rtol=1e-5)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial file left behind


def test_a_table_needs_a_table_suffix(labelled, tmp_path):
    root, _ = labelled
    result = cli("predict", "--model", str(root / "run" / "model"), "--data", str(root / "data"), "--out", str(tmp_path / "p.txt"))
    assert_refused(result, "--out", "expected a file name ending in .npy, .csv, .parquet")


def test_new_data_without_targets_is_predicted_on_and_refused_for_training(tmp_path):
    """`prepare --features X.npy` without `--targets` stores unlabelled data (no task, no targets);
    predict reads it, and gives the rows it gives for the same sequences stored with labels;
    evaluate and train refuse it in one line."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 8, 2)).astype(np.float32)
    y = (x[:, :, 0].sum(1) > 0).astype(np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    assert_ok(cli("prepare", "--features", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "y.npy"),
                  "--task", "classification", "--out", str(tmp_path / "labelled")))
    assert_ok(cli("prepare", "--features", str(tmp_path / "x.npy"), "--out", str(tmp_path / "new")))
    meta = json.loads((tmp_path / "new" / "meta.json").read_text())
    assert meta["target_kind"] == "none" and "task" not in meta and "num_classes" not in meta
    assert not (tmp_path / "new" / "targets.npy").exists()
    run = tmp_path / "run"
    assert_ok(cli("train", *TINY, "data.name=files", f"data.train_path={tmp_path / 'labelled'}",
                  "train.global_batch_size=32", "log.mode=disabled", f"train.run_dir={run}"))
    for data in ("labelled", "new"):
        assert_ok(cli("predict", "--model", str(run / "model"), "--data", str(tmp_path / data),
                      "--out", str(tmp_path / f"{data}.npy")))
    np.testing.assert_array_equal(np.load(tmp_path / "new.npy"), np.load(tmp_path / "labelled.npy"))
    assert_ok(cli("predict", "--model", str(run / "model"), "--data", str(tmp_path / "new"),
                  "--out", str(tmp_path / "new.csv")))
    table = pd.read_csv(tmp_path / "new.csv")
    assert list(table.columns) == ["id", "label"] and table.id.tolist() == list(range(96))
    refused = "holds no targets (unlabelled data): dist-gru predict reads it"
    assert_refused(cli("evaluate", "--model", str(run / "model"), "--data", str(tmp_path / "new")), refused)
    assert_refused(cli("train", *TINY, "data.name=files", f"data.train_path={tmp_path / 'new'}",
                       f"train.run_dir={tmp_path / 'never'}"), refused)
    assert not (tmp_path / "never").exists()


def test_an_unlabelled_table_is_predicted_on_with_its_ids_times_and_statics(labelled, tmp_path):
    """`prepare --table` without `--target-columns`: new readings to label, stored with their ids,
    timestamps and static columns but no targets; predict writes them keyed by sensor and hour."""
    root, frame = labelled
    new = frame.drop(columns="band")
    new.to_csv(tmp_path / "new.csv", index=False)
    assert_ok(cli("prepare", "--table", str(tmp_path / "new.csv"), "--id-column", "sensor", "--time-column", "time",
                  "--past-columns", "reading", "--static-columns", "version", "--out", str(tmp_path / "new")))
    meta = json.loads((tmp_path / "new" / "meta.json").read_text())
    assert meta["target_kind"] == "none" and meta["task"] is None and not (tmp_path / "new" / "targets.npy").exists()
    model = root / "run" / "model"
    assert_ok(cli("predict", "--model", str(model), "--data", str(tmp_path / "new"), "--out", str(tmp_path / "new.csv.out.csv")))
    assert_ok(cli("predict", "--model", str(model), "--data", str(root / "data"), "--out", str(tmp_path / "old.csv")))
    unlabelled, labelled_rows = pd.read_csv(tmp_path / "new.csv.out.csv"), pd.read_csv(tmp_path / "old.csv")
    pd.testing.assert_frame_equal(unlabelled, labelled_rows)  # the same readings, the same rows
    assert_refused(
        cli("prepare", "--table", str(tmp_path / "new.csv"), "--id-column", "sensor", "--time-column", "time",
            "--past-columns", "reading", "--val-last", "5", "--out", str(tmp_path / "cut")),
        "--val-last needs --target-columns",
    )
