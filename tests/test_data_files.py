"""The on-disk format `dist_gru.seq/v1`: writer, reader, validation, and `dist-gru prepare`.

PYTHONPATH=. .venv/bin/pytest tests/test_data_files.py -q
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from dist_gru.data.files import (
    FORMAT,
    DataFormatError,
    SequenceFileDataset,
    collate_identity,
    validate,
    write_sequences,
)
from dist_gru.data.moments import feature_moments
from dist_gru.data.prepare import main as prepare


def _variable(n: int = 7, f: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, 9)), f)) for _ in range(n)]


@pytest.fixture
def regression(tmp_path):
    sequences = _variable()
    targets = np.random.default_rng(1).standard_normal((len(sequences), 2))
    path = write_sequences(tmp_path / "reg", sequences, targets, task="regression")
    return path, sequences, targets


def _files(path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


# ------------------------------------------------------------------------------------ round trips


def test_regression_round_trip(regression):
    path, sequences, targets = regression
    ds = SequenceFileDataset(path)
    assert (len(ds), ds.task, ds.num_features, ds.output_size, ds.num_classes) == (7, "regression", 3, 2, None)
    assert ds.lengths.dtype == np.int64
    assert ds.lengths.tolist() == [len(s) for s in sequences]
    for i, (seq, target) in enumerate(zip(sequences, targets, strict=True)):
        item = ds[i]
        assert item["index"] == i
        assert item["x"].dtype == torch.float32 and item["y"].dtype == torch.float32
        np.testing.assert_array_equal(item["x"].numpy(), seq.astype(np.float32))
        np.testing.assert_array_equal(item["y"].numpy(), target.astype(np.float32))
    np.testing.assert_array_equal(ds[-1]["x"].numpy(), sequences[-1].astype(np.float32))
    with pytest.raises(IndexError, match="index 7 out of range"):
        ds[7]

    meta = json.loads((path / "meta.json").read_text())
    lengths = [len(s) for s in sequences]
    assert meta == {
        "format": "dist_gru.seq/v1",
        "num_sequences": 7,
        "num_features": 3,
        "task": "regression",
        "target_dim": 2,
        "feature_dtype": "float32",
        "total_steps": sum(lengths),
        "min_length": min(lengths),
        "max_length": max(lengths),
        "created_by": meta["created_by"],
    }
    assert meta["created_by"].startswith("dist_gru ")
    offsets = np.load(path / "offsets.npy")
    assert offsets.dtype == np.int64 and offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert np.load(path / "features.npy").shape == (sum(lengths), 3)
    assert np.load(path / "targets.npy").dtype == np.float32
    assert validate(path) == meta


def test_getitems_pads_one_batch(regression):
    path, sequences, targets = regression
    ds = SequenceFileDataset(path)
    indices = [5, 0, 5, 3]
    batch = ds.__getitems__(indices)
    assert set(batch) == {"x", "lengths", "y", "index"}
    t_max = max(len(sequences[i]) for i in indices)
    assert batch["x"].shape == (4, t_max, 3) and batch["x"].dtype == torch.float32
    assert batch["lengths"].dtype == torch.int64 and batch["lengths"].tolist() == [len(sequences[i]) for i in indices]
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == indices
    np.testing.assert_array_equal(batch["y"].numpy(), targets[indices].astype(np.float32))
    for row, i in enumerate(indices):
        length = len(sequences[i])
        np.testing.assert_array_equal(batch["x"][row, :length].numpy(), sequences[i].astype(np.float32))
        assert not batch["x"][row, length:].any()  # zero padding
    with pytest.raises(IndexError, match="index 9 out of range"):
        ds.__getitems__([0, 9])


def test_classification_round_trip_and_dataloader(tmp_path):
    sequences = _variable(n=10, f=2, seed=3)
    labels = np.array([0, 3, 1, 2, 3, 0, 0, 1, 2, 3], dtype=np.int32)
    write_sequences(tmp_path / "cls", sequences, labels, task="classification", num_classes=4)
    ds = SequenceFileDataset(tmp_path / "cls")
    assert (ds.task, ds.output_size, ds.num_classes) == ("classification", 4, 4)
    assert json.loads((tmp_path / "cls" / "meta.json").read_text())["num_classes"] == 4
    for i, seq in enumerate(sequences):
        item = ds[i]
        assert item["y"].dtype == torch.int64 and item["y"].shape == () and item["y"].item() == labels[i]
        np.testing.assert_array_equal(item["x"].numpy(), seq.astype(np.float32))
    batch = ds.__getitems__([9, 1])
    assert batch["y"].dtype == torch.int64 and batch["y"].tolist() == [3, 3]

    # DataLoader calls __getitems__ with each batch of indices; the collate_fn is the identity.
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_identity, num_workers=1)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[0]["x"].shape == (4, max(len(s) for s in sequences[:4]), 2)
    assert torch.cat([b["y"] for b in batches]).tolist() == labels.tolist()


def test_fixed_length_3d_input(tmp_path):
    x = np.arange(4 * 5 * 2, dtype=np.float64).reshape(4, 5, 2)
    write_sequences(tmp_path / "fixed", x, np.arange(4.0), task="regression")
    ds = SequenceFileDataset(tmp_path / "fixed")
    assert np.load(tmp_path / "fixed" / "offsets.npy").tolist() == [0, 5, 10, 15, 20]
    assert ds.lengths.tolist() == [5] * 4 and ds.output_size == 1
    batch = ds.__getitems__([2, 0])
    np.testing.assert_array_equal(batch["x"].numpy(), x[[2, 0]].astype(np.float32))
    assert batch["y"].tolist() == [[2.0], [0.0]]


def test_dataset_is_memory_mapped_and_picklable(regression):
    path, sequences, _ = regression
    ds = SequenceFileDataset(path)
    assert isinstance(ds._features, np.memmap) and str(ds._features.filename) == str((path / "features.npy").resolve())
    assert isinstance(ds._targets, np.memmap)
    # nothing else the size of the features: other arrays are O(N) or views of the memory map
    for name, value in vars(ds).items():
        if isinstance(value, np.ndarray) and not isinstance(value, np.memmap):
            assert (
                value.shape == (len(ds) + 1,) or value.shape == (len(ds),) or np.shares_memory(value, ds._features)
            ), name
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._features is None  # the memory maps travel as a path and reopen on first use
    np.testing.assert_array_equal(clone[4]["x"].numpy(), sequences[4].astype(np.float32))
    assert isinstance(clone._features, np.memmap)
    assert clone.lengths.tolist() == ds.lengths.tolist()
    assert len(pickle.dumps(ds)) < 2000


def test_feature_moments_streams_in_chunks(tmp_path):
    rng = np.random.default_rng(5)
    # A large common offset: naive sum-of-squares in float32 would cancel catastrophically.
    sequences = [1e4 + rng.standard_normal((int(rng.integers(1, 30)), 3)) * [1.0, 0.01, 5.0] for _ in range(40)]
    write_sequences(tmp_path / "m", sequences, np.zeros(40), task="regression")
    ds = SequenceFileDataset(tmp_path / "m")
    data = np.concatenate(sequences).astype(np.float32).astype(np.float64)
    for chunk_steps in (7, 1 << 20):
        mean, std = feature_moments(ds, chunk_steps=chunk_steps)
        assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (3,)
        np.testing.assert_allclose(mean, data.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(std, data.std(axis=0), rtol=1e-5)


# ----------------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_existing_dataset_untouched(regression):
    path, sequences, targets = regression
    before = _files(path)
    bad = [s.copy() for s in sequences]
    bad[2][0, 1] = np.nan
    with pytest.raises(DataFormatError, match=r"non-finite value nan in sequence 2 at time step 0, feature 1"):
        write_sequences(path, bad, targets, task="regression")
    assert _files(path) == before
    assert os.listdir(path.parent) == ["reg"]  # no temporary directories left behind

    # A successful write replaces the dataset completely.
    write_sequences(path, sequences[:3], targets[:3, 0], task="regression")
    assert os.listdir(path.parent) == ["reg"]
    ds = SequenceFileDataset(path)
    assert len(ds) == 3 and ds.output_size == 1


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(DataFormatError, match=r"mine: is a non-empty directory but not a dist_gru.seq/v1 dataset"):
        write_sequences(tmp_path / "mine", _variable(), np.zeros(7), task="regression")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataFormatError, match="file: exists and is not a directory"):
        write_sequences(tmp_path / "file", _variable(), np.zeros(7), task="regression")
    (tmp_path / "empty").mkdir()
    write_sequences(tmp_path / "empty", _variable(), np.zeros(7), task="regression")
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "mine"]


# ------------------------------------------------------------------------------- bad inputs (write)


_SEQ = _variable(n=3, f=2)


@pytest.mark.parametrize(
    ("sequences", "targets", "kwargs", "message"),
    [
        (
            [_SEQ[0], np.full((2, 2), np.inf)],
            [0.0, 1.0],
            {},
            "sequences: non-finite value inf in sequence 1 at time step 0, feature 0",
        ),
        ([_SEQ[0], np.array([[1e300, 0.0]])], [0.0, 1.0], {}, "non-finite value inf in sequence 1"),
        ([_SEQ[0], np.zeros((0, 2))], [0.0, 1.0], {}, "sequences[1] has shape (0, 2): the sequence is empty"),
        ([_SEQ[0], np.zeros((3, 4))], [0.0, 1.0], {}, "sequences[1] has 4 features (shape (3, 4)); expected 2"),
        ([_SEQ[0], np.zeros(3)], [0.0, 1.0], {}, "sequences[1] has shape (3,); expected a 2-D array [T, F]"),
        (np.zeros((3, 2)), [0.0, 1.0, 2.0], {}, "sequences is one array of shape (3, 2); expected a 3-D array"),
        ([], [], {}, "sequences is empty"),
        ([np.array([["a", "b"]])], [0.0], {}, "sequences[0]: dtype <U1 is not numeric"),
        (_SEQ, [0.0, 1.0], {}, "targets has 2 rows (shape (2,)); expected N=3"),
        (_SEQ, [0.0, np.nan, 1.0], {}, "targets[1, 0] = nan; regression targets must be finite"),
        (_SEQ, np.zeros((3, 1, 1)), {}, "targets has shape (3, 1, 1); expected [N] or [N, O]"),
        (_SEQ, [0, 1, 2], {"num_classes": 3}, "num_classes=3 given for task='regression'; expected None"),
        (_SEQ, [0, 1, 2], {"task": "classify"}, "task='classify'; expected one of 'regression', 'classification'"),
        (_SEQ, [0, 1, 2], {"task": "classification"}, "num_classes=None; task='classification' needs an integer"),
        (
            _SEQ,
            [0, 3, 1],
            {"task": "classification", "num_classes": 3},
            "targets[1] = 3: label out of range; expected 0 <= label < num_classes=3",
        ),
        (
            _SEQ,
            [0, -1, 1],
            {"task": "classification", "num_classes": 3},
            "targets[1] = -1: label out of range",
        ),
        (
            _SEQ,
            [0.0, 1.5, 1.0],
            {"task": "classification", "num_classes": 3},
            "targets[1] = 1.5 is not an integer",
        ),
    ],
)
def test_write_rejects_bad_input(tmp_path, sequences, targets, kwargs, message):
    kwargs = {"task": "regression", **kwargs}
    with pytest.raises(DataFormatError) as err:
        write_sequences(tmp_path / "ds", sequences, np.asarray(targets), **kwargs)
    assert message in str(err.value)
    assert str(err.value).startswith(f"writing {tmp_path / 'ds'}: ")
    assert os.listdir(tmp_path) == []


def test_float_labels_that_are_integers_are_accepted(tmp_path):
    write_sequences(tmp_path / "c", _SEQ, np.array([2.0, 0.0, 1.0]), task="classification", num_classes=3)
    assert np.load(tmp_path / "c" / "targets.npy").tolist() == [2, 0, 1]


# ------------------------------------------------------------------------------ bad files (open)


def _corrupt_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def _offsets_not_monotone(path):
    offsets = np.load(path / "offsets.npy")
    offsets[3] = offsets[2]
    np.save(path / "offsets.npy", offsets)
    return (
        f"offsets.npy: offsets must be strictly increasing; offsets[3]={offsets[3]} <= "
        f"offsets[2]={offsets[2]} (sequence 2 is empty)"
    )


def _truncate_features(path):
    size = (path / "features.npy").stat().st_size
    os.truncate(path / "features.npy", size - 4)
    return "features.npy: cannot be read as a .npy array (truncated or corrupt?): mmap length is greater than file size"


def _features_float64(path):
    np.save(path / "features.npy", np.load(path / "features.npy").astype(np.float64))
    return "features.npy: dtype float64; expected float32"


def _features_wrong_width(path):
    features = np.load(path / "features.npy")
    np.save(path / "features.npy", features[:, :2])
    return f"features.npy: shape ({len(features)}, 2); expected ({len(features)}, 3) according to meta.json"


CORRUPTIONS = {
    "meta not json": lambda p: (p / "meta.json").write_text('{"format": '),
    "meta wrong format": lambda p: _corrupt_meta(p, format="dist_gru.seq/v0"),
    "meta missing key": lambda p: _corrupt_meta(p, target_dim=None),
    "meta bad type": lambda p: _corrupt_meta(p, num_features="3"),
    "meta missing": lambda p: (p / "meta.json").unlink(),
    "offsets not monotone": _offsets_not_monotone,
    "offsets end": lambda p: np.save(p / "offsets.npy", np.load(p / "offsets.npy") - np.eye(8, dtype=np.int64)[7]),
    "offsets dtype": lambda p: np.save(p / "offsets.npy", np.load(p / "offsets.npy").astype(np.int32)),
    "features truncated": _truncate_features,
    "features dtype": _features_float64,
    "features shape": _features_wrong_width,
    "features missing": lambda p: (p / "features.npy").unlink(),
    "targets not npy": lambda p: (p / "targets.npy").write_text("not an array"),
    "targets nan": lambda p: np.save(p / "targets.npy", np.full((7, 2), np.nan, dtype=np.float32)),
    "min_length": lambda p: _corrupt_meta(p, min_length=100),
}
EXPECTED = {
    "meta not json": "meta.json: not valid JSON (Expecting value: line 1 column 12",
    "meta wrong format": "meta.json: \"format\" is 'dist_gru.seq/v0'; expected 'dist_gru.seq/v1'",
    "meta missing key": 'meta.json: missing key "target_dim" (a regression dataset needs it)',
    "meta bad type": "meta.json: \"num_features\" is '3'; expected an integer >= 1",
    "meta missing": "meta.json: missing; ",
    "offsets end": "offsets.npy: offsets[-1]=",
    "offsets dtype": "offsets.npy: dtype int32; expected int64",
    "features missing": "features.npy: missing",
    "targets not npy": "targets.npy: not a .npy file",
    "targets nan": "targets.npy: targets[0, 0] = nan; regression targets must be finite",
    "min_length": "meta.json: min_length=100, but offsets.npy gives",
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_open_rejects_corrupt_dataset(regression, corruption):
    path = regression[0]
    message = CORRUPTIONS[corruption](path)
    message = message if isinstance(message, str) else EXPECTED[corruption]
    with pytest.raises(DataFormatError) as err:
        SequenceFileDataset(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_open_rejects_label_out_of_range_on_disk(tmp_path):
    write_sequences(tmp_path / "c", _SEQ, [0, 1, 2], task="classification", num_classes=3)
    np.save(tmp_path / "c" / "targets.npy", np.array([0, 1, 7]))
    with pytest.raises(
        DataFormatError, match=r"targets.npy: targets\[2\] = 7: label out of range; expected 0 <= label < num"
    ):
        SequenceFileDataset(tmp_path / "c")
    with pytest.raises(DataFormatError, match="does not exist; expected a dist_gru.seq/v1 dataset directory"):
        SequenceFileDataset(tmp_path / "nowhere")


def test_full_validation_scans_features(regression):
    path, sequences, _ = regression
    features = np.load(path / "features.npy", mmap_mode="r+")
    step = len(sequences[0]) + len(sequences[1]) + 1
    features[step, 2] = np.inf
    features.flush()
    del features
    assert validate(path, full=False)["format"] == FORMAT  # opening does not read features
    with pytest.raises(
        DataFormatError, match=r"features.npy: non-finite value inf in sequence 2 at time step 1, feature 2"
    ):
        validate(path, full=True)


# ------------------------------------------------------------------------------ dist-gru prepare


def _summary(capsys) -> dict:
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def _error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_prepare_npy(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((6, 4, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(6.0))
    argv = ["--features", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "y.npy"), "--task", "regression"]
    assert prepare([*argv, "--out", str(tmp_path / "out")]) == 0
    assert _summary(capsys) == {
        "path": str(tmp_path / "out"),
        "num_sequences": 6,
        "num_features": 3,
        "task": "regression",
        "target_dim": 1,
    }
    ds = SequenceFileDataset(tmp_path / "out")
    np.testing.assert_array_equal(ds.__getitems__(list(range(6)))["x"].numpy(), x)

    # [N, T] is one feature
    np.save(tmp_path / "x2.npy", x[:, :, 0])
    argv[1] = str(tmp_path / "x2.npy")
    assert prepare([*argv, "--out", str(tmp_path / "out2")]) == 0
    assert _summary(capsys)["num_features"] == 1
    np.testing.assert_array_equal(SequenceFileDataset(tmp_path / "out2")[5]["x"].numpy(), x[5, :, :1])

    assert prepare(["--check", str(tmp_path / "out2")]) == 0
    assert _summary(capsys)["format"] == FORMAT


def test_prepare_npz_with_lengths_and_val_split(tmp_path, capsys):
    rng = np.random.default_rng(1)
    n = 20
    lengths = rng.integers(1, 6, n)
    features = np.full((n, 5, 2), np.nan)  # padding may be anything, even NaN
    for i, length in enumerate(lengths):
        features[i, :length] = rng.standard_normal((length, 2))
    labels = rng.integers(0, 3, n)
    labels[0] = 4  # inferred num_classes = 5
    np.savez(tmp_path / "d.npz", features=features, targets=labels, lengths=lengths)
    argv = ["--npz", str(tmp_path / "d.npz"), "--task", "classification", "--val-fraction", "0.25", "--seed", "3"]
    assert prepare([*argv, "--out", str(tmp_path / "a")]) == 0
    summary = _summary(capsys)
    assert summary["train"] == {"path": str(tmp_path / "a" / "train"), "num_sequences": 15}
    assert summary["val"] == {"path": str(tmp_path / "a" / "val"), "num_sequences": 5}
    assert (summary["num_classes"], summary["num_features"]) == (5, 2)

    seen = {}
    for split in ("train", "val"):
        ds = SequenceFileDataset(tmp_path / "a" / split)
        assert ds.num_classes == 5
        for j in range(len(ds)):
            item = ds[j]
            matches = [
                i
                for i in range(n)
                if lengths[i] == len(item["x"]) and np.allclose(features[i, : lengths[i]], item["x"])
            ]
            assert len(matches) == 1 and labels[matches[0]] == item["y"].item()
            seen[matches[0]] = split
    assert sorted(seen) == list(range(n))  # every sequence exactly once

    # deterministic: the same seed gives the same split; the check covers both splits
    assert prepare([*argv, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    for split in ("train", "val"):
        assert _files(tmp_path / "a" / split).keys() == _files(tmp_path / "b" / split).keys()
        for name in ("features.npy", "offsets.npy", "targets.npy"):
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
    assert prepare(["--check", str(tmp_path / "a")]) == 0
    assert _summary(capsys)["val"]["num_sequences"] == 5


CSV = "time,price,volume\n" + "".join(f"{t},{100 + t * 0.5},{t % 3}\n" for t in range(20))


def test_prepare_csv_windows_and_time_ordered_val(tmp_path, capsys):
    (tmp_path / "p.csv").write_text(CSV)
    argv = ["--csv", str(tmp_path / "p.csv"), "--window", "4", "--ahead", "2", "--stride", "3"]
    argv += ["--target-columns", "price", "--feature-columns", "price, volume"]
    assert prepare([*argv, "--out", str(tmp_path / "w")]) == 0
    summary = _summary(capsys)
    # windows start at 0, 3, ..., 12 (target row = start + 4 + 2 - 1 = start + 5 <= 19 -> start <= 14)
    assert (summary["num_sequences"], summary["num_features"], summary["target_dim"]) == (5, 2, 1)
    ds = SequenceFileDataset(tmp_path / "w")
    item = ds[2]  # rows 6..9
    np.testing.assert_array_equal(item["x"].numpy(), [[103.0, 0.0], [103.5, 1.0], [104.0, 2.0], [104.5, 0.0]])
    assert item["y"].tolist() == [100 + 11 * 0.5]  # row 6 + 5

    # val = the last 40 % of the rows (12..19), windowed on their own: no val window overlaps train targets
    assert prepare([*argv, "--out", str(tmp_path / "s"), "--val-fraction", "0.4", "--stride", "1"]) == 0
    summary = _summary(capsys)
    assert (summary["train"]["num_sequences"], summary["val"]["num_sequences"]) == (7, 3)
    train, val = SequenceFileDataset(tmp_path / "s" / "train"), SequenceFileDataset(tmp_path / "s" / "val")
    train_targets = train.__getitems__(list(range(7)))["y"][:, 0].numpy()
    np.testing.assert_array_equal(train_targets, 100 + np.arange(5, 12) * 0.5)  # target rows 5..11
    val_batch = val.__getitems__([0, 1, 2])
    np.testing.assert_array_equal(val_batch["x"][0, :, 0].numpy(), 100 + np.arange(12, 16) * 0.5)  # rows 12..15
    np.testing.assert_array_equal(val_batch["y"][:, 0].numpy(), 100 + np.arange(17, 20) * 0.5)  # target rows 17..19

    # default: every column is a feature
    assert prepare(["--csv", str(tmp_path / "p.csv"), "--window", "19", "--target-columns", "volume",
                    "--out", str(tmp_path / "all")]) == 0  # fmt: skip
    summary = _summary(capsys)
    assert (summary["num_sequences"], summary["num_features"]) == (1, 3)
    assert SequenceFileDataset(tmp_path / "all")[0]["y"].tolist() == [19 % 3]


def test_prepare_errors_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "p.csv").write_text(CSV)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    np.save(tmp_path / "x4.npy", np.zeros((2, 3, 4, 5), dtype=np.float32))
    np.save(tmp_path / "x.npy", np.zeros((3, 4, 2), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.zeros(2))
    np.save(tmp_path / "labels.npy", np.array([0, 1, 5]))
    features = np.zeros((3, 4, 2))
    np.savez(tmp_path / "l.npz", features=features, targets=np.zeros(3), lengths=np.array([1, 5, 2]))
    np.savez(tmp_path / "nan.npz", features=features + [[[0.0]], [[np.nan]], [[0.0]]], targets=np.zeros(3))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("keep")
    (tmp_path / "nan.csv").write_text("c,d\n1,2\n3,nan\n")
    (tmp_path / "split" / "val").mkdir(parents=True)
    (tmp_path / "split" / "val" / "keep.txt").write_text("keep")
    out = str(tmp_path / "o")
    csv_args = ["--csv", str(tmp_path / "p.csv"), "--out", out]
    xy = ["--features", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "y.npy"), "--out", out]
    cases = [
        (["--features", str(tmp_path / "missing.npy"), *xy[2:], "--task", "regression"], "missing.npy: no such file"),
        (["--features", str(tmp_path / "x4.npy"), "--targets", str(tmp_path / "y.npy"), "--task", "regression",
          "--out", out], "x4.npy: shape (2, 3, 4, 5); expected [N, T, F] or [N, T] (one feature)"),
        ([*xy, "--task", "regression"], "y.npy: 2 targets (shape (2,)) but"),
        (["--features", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "labels.npy"), "--task",
          "classification", "--num-classes", "3", "--out", out], "labels.npy: targets[2] = 5: label out of range"),
        (["--npz", str(tmp_path / "l.npz"), "--task", "regression", "--out", out],
         "l.npz: lengths[1] = 5; expected 1 <= length <= T_max = 4"),
        (["--npz", str(tmp_path / "nan.npz"), "--task", "regression", "--out", out],
         "nan.npz: sequences: non-finite value nan in sequence 1 at time step 0, feature 0"),
        ([*xy[:4], "--task", "regression"], "--out DIR is required"),
        ([*xy, "--task", "regression", "--window", "3"], "--window only applies to --csv"),
        (["--npz", str(tmp_path / "l.npz"), "--out", out], "--task is required with --features/--npz"),
        ([*csv_args, "--window", "4", "--target-columns", "cost"],
         "p.csv: --target-columns: unknown column(s) 'cost'; available: time, price, volume"),
        ([*csv_args, "--window", "20", "--target-columns", "price"],
         "window 20 + ahead 1 needs at least 21 data rows; the series has 20"),
        ([*csv_args, "--window", "8", "--target-columns", "price", "--val-fraction", "0.2"],
         "window 8 + ahead 1 needs at least 9 data rows; the val part (rows 16..19) of the series has 4"),
        (["--csv", str(tmp_path / "bad.csv"), "--window", "1", "--target-columns", "a", "--out", out],
         "bad.csv: column 'b', line 3: 'x' is not a number"),
        ([*csv_args, "--target-columns", "price"], "--csv needs --window and --target-columns"),
        ([*csv_args, "--window", "0", "--target-columns", "price"], "--window 0; expected an integer >= 1"),
        ([*csv_args[:2], "--window", "2", "--target-columns", "price", "--out", str(tmp_path / "foreign")],
         "foreign: is a non-empty directory but not a dist_gru.seq/v1 dataset"),
        ([*csv_args[:2], "--window", "2", "--target-columns", "price", "--val-fraction", "0.4",
          "--out", str(tmp_path / "split")], "split/val: is a non-empty directory but not a dist_gru.seq/v1 dataset"),
        (["--csv", str(tmp_path / "nan.csv"), "--window", "1", "--target-columns", "c", "--out", out],
         "nan.csv: column 'd', line 3: 'nan' is not finite"),
        (["--check", str(tmp_path / "foreign")], "foreign/meta.json: missing"),
        (["--csv", "a.csv", "--npz", "b.npz"], "argument --npz: not allowed with argument --csv"),
        (["--npz", "b.npz", "--val-fraction", "1.5", "--out", out, "--task", "regression"],
         "--val-fraction 1.5; expected a number strictly between 0 and 1"),
    ]  # fmt: skip
    for argv, message in cases:
        assert prepare(argv) == 2, argv
        line = _error(capsys)
        assert message in line, (argv, line)
    # nothing was written, nothing was lost
    assert sorted(os.listdir(tmp_path)) == ["bad.csv", "foreign", "l.npz", "labels.npy", "nan.csv", "nan.npz",
                                            "p.csv", "split", "x.npy", "x4.npy", "y.npy"]  # fmt: skip
    assert os.listdir(tmp_path / "foreign") == ["keep.txt"]
    assert os.listdir(tmp_path / "split") == ["val"]  # train was not written either


# -------------------------------------------------------------------------------- per-step targets


def test_step_targets_round_trip(tmp_path):
    sequences = _variable(n=4, f=2, seed=3)
    labels = [np.arange(len(s)) % 3 for s in sequences]
    values = [np.random.default_rng(i).standard_normal((len(s), 2)) for i, s in enumerate(sequences)]
    write_sequences(tmp_path / "c", sequences, labels, task="classification", num_classes=3)
    write_sequences(tmp_path / "r", sequences, values, task="regression")
    lengths = [len(s) for s in sequences]
    for name, targets, dtype in (("c", labels, torch.int64), ("r", values, torch.float32)):
        ds = SequenceFileDataset(tmp_path / name)
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        assert (meta["target_kind"], ds.target_kind, ds.num_features) == ("step", "step", 2)
        stored = np.load(tmp_path / name / "targets.npy")
        assert stored.shape == ((sum(lengths),) if name == "c" else (sum(lengths), 2))
        batch = ds.__getitems__([3, 0, 2])
        assert batch["y"].dtype == dtype and batch["y"].shape[:2] == (3, max(lengths[i] for i in (3, 0, 2)))
        for row, i in enumerate((3, 0, 2)):
            expected = torch.from_numpy(np.asarray(targets[i])).to(dtype)
            assert torch.equal(batch["y"][row, : lengths[i]], expected)
            assert not batch["y"][row, lengths[i] :].any()  # padded with zeros past the length
            assert torch.equal(ds[i]["y"], expected)
    # a per-step regression target of one value per step may be [T_i]; a univariate series has F = 0
    write_sequences(tmp_path / "u", [np.zeros((6, 0))], [np.arange(6.0)], task="regression")
    ds = SequenceFileDataset(tmp_path / "u")
    assert (ds.num_features, ds.output_size, ds[0]["y"][:, 0].tolist()) == (0, 1, [0, 1, 2, 3, 4, 5])
    assert validate(tmp_path / "u")["num_features"] == 0
    with pytest.raises(DataFormatError, match=r"sequences\[0\] has shape \(6, 0\); expected F >= 1 features"):
        write_sequences(tmp_path / "x", [np.zeros((6, 0))], np.zeros(1), task="regression")


@pytest.mark.parametrize(
    ("targets", "kwargs", "message"),
    [
        (
            [np.zeros(5), np.zeros(2), np.zeros(4)],
            {},
            "targets[1] has 2 steps (shape (2,)) but sequence 1 has 3 steps; per-step targets need exactly one row",
        ),
        (
            [np.zeros(5), np.array([0.0, np.inf, 0.0]), np.zeros(4)],
            {},
            "targets: non-finite value inf in sequence 1 at time step 1, target 0; regression targets must be finite",
        ),
        ([np.zeros((5, 2)), np.zeros((3, 1)), np.zeros((4, 2))], {}, "targets[1] has 1 targets per step"),
        (
            [np.zeros(5, int), np.array([0, 1, 3]), np.zeros(4, int)],
            {"task": "classification", "num_classes": 3},
            "targets: label 3 in sequence 1 at time step 2 is out of range; expected 0 <= label < num_classes=3",
        ),
        (
            [np.zeros(5), np.array([0.0, 0.5, 1.0]), np.zeros(4)],
            {"task": "classification", "num_classes": 3},
            "label 0.5 in sequence 1 at time step 1 is not an integer",
        ),
        ([np.zeros(5), np.zeros(3)], {}, "targets: 2 per-step target arrays; expected N=3, one per sequence"),
    ],
)
def test_write_rejects_bad_step_targets(tmp_path, targets, kwargs, message):
    sequences = [np.zeros((n, 2)) for n in (5, 3, 4)]
    with pytest.raises(DataFormatError) as err:
        write_sequences(tmp_path / "ds", sequences, targets, **{"task": "regression", **kwargs})
    assert message in str(err.value)
    assert os.listdir(tmp_path) == []


def test_open_rejects_bad_step_targets_on_disk(tmp_path):
    sequences = [np.zeros((n, 1)) for n in (4, 3)]
    write_sequences(tmp_path / "c", sequences, [np.zeros(4, int), np.ones(3, int)], task="classification", num_classes=2)
    np.save(tmp_path / "c" / "targets.npy", np.array([0, 0, 0, 0, 1, 5, 1]))
    with pytest.raises(DataFormatError, match="targets.npy: targets: label 5 in sequence 1 at time step 1 is out of range"):
        SequenceFileDataset(tmp_path / "c")
    np.save(tmp_path / "c" / "targets.npy", np.zeros(2, dtype=np.int64))  # per-sequence shape in a step dataset
    with pytest.raises(DataFormatError, match=r"targets.npy: shape \(2,\); expected \(7,\) according to meta.json"):
        SequenceFileDataset(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    (tmp_path / "c" / "meta.json").write_text(json.dumps({**meta, "target_kind": "frame"}))
    with pytest.raises(DataFormatError, match="\"target_kind\" is 'frame'; expected one of 'sequence', 'step'"):
        SequenceFileDataset(tmp_path / "c")


def test_long_memory_mapped_series_is_written_in_chunks(tmp_path, monkeypatch):
    from dist_gru.data import files

    monkeypatch.setattr(files, "_MAX_CHUNK_VALUES", 64)  # a "long" series is then a few hundred steps
    source = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=(1000, 2))
    source[:] = np.arange(2000, dtype=np.float32).reshape(1000, 2)
    targets = np.arange(1000.0)
    targets[777] = np.nan
    with pytest.raises(DataFormatError, match="non-finite value nan in sequence 0 at time step 777"):
        write_sequences(tmp_path / "s", [source], [targets], task="regression")
    targets[777] = 0.0
    write_sequences(tmp_path / "s", [source], [targets], task="regression")
    ds = SequenceFileDataset(tmp_path / "s")
    np.testing.assert_array_equal(ds[0]["x"].numpy(), source)
    np.testing.assert_array_equal(ds[0]["y"][:, 0].numpy(), targets)


SALES = "store,day,units,price\n" + "".join(
    f"{store},{day},{day * 2 + (store == 'a')},{1.5 + day}\n" for store in ("b", "a") for day in range(10)
)


def test_prepare_csv_series_mode_stores_each_series_once(tmp_path, capsys):
    (tmp_path / "s.csv").write_text(SALES)
    base = ["--csv", str(tmp_path / "s.csv"), "--series", "--target-columns", "units"]
    assert prepare([*base, "--series-column", "store", "--feature-columns", "price", "--out", str(tmp_path / "d"),
                    "--val-fraction", "0.2"]) == 0  # fmt: skip
    summary = _summary(capsys)
    assert summary["train"]["num_sequences"] == summary["val"]["num_sequences"] == 2
    assert (summary["num_features"], summary["target_dim"], summary["target_kind"]) == (1, 1, "step")
    train, val = SequenceFileDataset(tmp_path / "d" / "train"), SequenceFileDataset(tmp_path / "d" / "val")
    assert train.lengths.tolist() == [8, 8] and val.lengths.tolist() == [2, 2]  # the last 20 % of each series
    # series in order of first appearance (b, then a), rows in file order; val is each series' future
    assert train[0]["y"][:, 0].tolist() == [2.0 * d for d in range(8)]
    assert train[1]["x"][:, 0].tolist() == [1.5 + d for d in range(8)]
    assert val[1]["y"][:, 0].tolist() == [17.0, 19.0]
    assert (train.meta["total_steps"], val.meta["total_steps"]) == (16, 4)  # no window copies
    # default features: every column but the targets and the series column; none at all is fine
    assert prepare([*base, "--series-column", "store", "--out", str(tmp_path / "e")]) == 0
    assert _summary(capsys)["num_features"] == 2
    assert prepare([*base, "--feature-columns", "units", "--out", str(tmp_path / "one")]) == 0
    assert _summary(capsys)["num_sequences"] == 1
    assert SequenceFileDataset(tmp_path / "one").lengths.tolist() == [20]  # without --series-column: one series
    (tmp_path / "u.csv").write_text("load\n" + "".join(f"{v}\n" for v in range(6)))
    assert prepare(["--csv", str(tmp_path / "u.csv"), "--series", "--target-columns", "load", "--out",
                    str(tmp_path / "u")]) == 0  # fmt: skip
    assert _summary(capsys)["num_features"] == 0
    # classification: per-step integer labels
    assert prepare([*base, "--series-column", "store", "--task", "classification", "--num-classes", "20",
                    "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    assert SequenceFileDataset(tmp_path / "c")[0]["y"].dtype == torch.int64


def test_prepare_csv_series_mode_errors_exit_2_and_write_nothing(tmp_path, capsys):
    (tmp_path / "s.csv").write_text(SALES + "c,0,1,1.0\n")
    (tmp_path / "nan.csv").write_text("id,v\nx,1\nx,nan\n")
    base = ["--csv", str(tmp_path / "s.csv"), "--series", "--target-columns", "units", "--out", str(tmp_path / "o")]
    cases = [
        ([*base, "--window", "4"], "--window cuts window copies; --series stores each series once"),
        ([*base, "--series-column", "store", "--val-fraction", "0.2"],
         "--val-fraction 0.2 of series 'c' (1 rows) leaves 1 training and 0 validation rows"),
        ([*base, "--series-column", "shop"], "--series-column: unknown column(s) 'shop'"),
        ([*base, "--series-column", "store", "--feature-columns", "store"], "names the series; it cannot be a feature"),
        ([*base, "--series-column", "units"], "--series-column 'units' is also a target column"),
        ([*base, "--feature-columns", "price", "--task", "classification", "--num-classes", "3"],
         "(series): targets: label 4.0 in sequence 0 at time step 2 is out of range"),  # units 0, 2, 4, ...
        (["--csv", str(tmp_path / "nan.csv"), "--series", "--target-columns", "v", "--series-column", "id", "--out", str(tmp_path / "o")],
         "nan.csv: column 'v', line 3: 'nan' is not finite"),
        (["--npz", "x.npz", "--series", "--task", "regression", "--out", str(tmp_path / "o")],
         "--series only applies to --csv"),
        ([*base[:2], "--series-column", "store", "--window", "3", "--target-columns", "units", "--out", "o"],
         "--series-column goes with --series"),
    ]  # fmt: skip
    for argv, message in cases:
        assert prepare(argv) == 2, argv
        line = _error(capsys)
        assert message in line, (argv, line)
    assert sorted(os.listdir(tmp_path)) == ["nan.csv", "s.csv"]


def test_prepare_csv_horizon_is_the_old_name_of_ahead(tmp_path, capsys):
    """`--ahead A`: the one target A rows after a window (a horizon is an H-step forecast elsewhere);
    the old `--horizon` still works, with a warning naming the new flag, and not next to `--ahead`."""
    (tmp_path / "p.csv").write_text(CSV)
    argv = ["--csv", str(tmp_path / "p.csv"), "--window", "4", "--target-columns", "price"]
    assert prepare([*argv, "--ahead", "2", "--out", str(tmp_path / "new")]) == 0
    capsys.readouterr()
    assert prepare([*argv, "--horizon", "2", "--out", str(tmp_path / "old")]) == 0
    assert "--horizon is now --ahead" in capsys.readouterr().err
    for name in ("features.npy", "targets.npy", "offsets.npy"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()
    assert prepare([*argv, "--horizon", "2", "--ahead", "2", "--out", str(tmp_path / "both")]) == 2
    assert "--horizon is the old name of --ahead; give only --ahead" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()
