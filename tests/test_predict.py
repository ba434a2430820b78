"""`dist-gru predict` at scale: 2 real torchrun processes write the 1-process file byte for byte.

    .venv/bin/pytest -q tests/test_predict.py

The datasets have 37 sequences of varying length (2 ranks and batches of 4 divide neither), so
the ranks get unequal numbers of batches and the last batch is short.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import assert_ok, cli, save_run, torchrun

from dist_gru import cli as dist_gru_cli
from dist_gru.data import write_sequences
from dist_gru.data.loading import predict_batches
from dist_gru.model import GRUModel

NUM_SEQUENCES = 37


def _sequences(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(n), 3)).astype(np.float32) for n in rng.integers(2, 12, NUM_SEQUENCES)]


def _predict_both(tmp_path, model_dir: str, data: str, *flags: str) -> tuple[bytes, bytes, dict, dict]:
    """The file and JSON line of 1 process and of 2 torchrun processes."""
    one, two = tmp_path / "one.npy", tmp_path / "two.npy"
    common = ("predict", "--model", model_dir, "--data", data, "--batch-size", "4", *flags)
    first = assert_ok(cli(*common, "--out", str(one), timeout=120)).json_last_line()
    second = assert_ok(torchrun(2, *common, "--out", str(two), timeout=180)).json_last_line()
    assert not list(tmp_path.glob(".*partial*")), "a temporary file was left behind"
    return one.read_bytes(), two.read_bytes(), first, second


def _in_process(capsys, *argv: str) -> tuple[int, dict]:
    """`dist-gru predict ARGV` in this process: (exit code, JSON line or {}); stderr stays captured."""
    capsys.readouterr()
    code = dist_gru_cli.main(["predict", *argv])
    out = capsys.readouterr()
    print(out.err, file=sys.stderr)
    lines = out.out.strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 else {}


def test_predict_batches_cover_the_dataset_once_in_contiguous_blocks() -> None:
    one = predict_batches(NUM_SEQUENCES, 4, 0, 1)
    ranks = [predict_batches(NUM_SEQUENCES, 4, r, 2) for r in range(2)]
    assert [len(b) for b in ranks] == [5, 5] and ranks[1][-1] == [36]
    assert sorted(ranks[0] + ranks[1]) == one  # the same batches, dealt out in turn
    assert sum(one, []) == list(range(NUM_SEQUENCES))


@pytest.mark.timeout(400)
def test_two_processes_write_the_one_process_file_byte_for_byte(tmp_path, capsys) -> None:
    labels = np.random.default_rng(1).integers(0, 3, NUM_SEQUENCES)
    features = _sequences()
    write_sequences(tmp_path / "val", features, labels, task="classification", num_classes=3)
    torch.manual_seed(0)
    model = GRUModel(3, 8, task="classification", output_size=3).eval()
    model_dir = save_run(tmp_path, model, {"model": {"hidden_size": 8}})

    one, two, first, second = _predict_both(tmp_path, model_dir, str(tmp_path / "val"), "--probabilities")
    assert one == two
    assert (first["shape"], first["dtype"], second["world_size"]) == ([NUM_SEQUENCES, 3], "float32", 2)
    assert second["num_samples"] == NUM_SEQUENCES and second["samples_per_s"] > 0
    probabilities = np.load(tmp_path / "two.npy")
    with torch.no_grad():
        expected = torch.cat([model(torch.from_numpy(f)[None])[0].softmax(-1) for f in features]).numpy()
    assert np.abs(probabilities - expected).max() < 1e-5

    labels_out = tmp_path / "labels.npy"
    code, written = _in_process(capsys, "--model", model_dir, "--data", str(tmp_path / "val"), "--out", str(labels_out))
    assert (code, written["shape"], written["dtype"]) == (0, [NUM_SEQUENCES], "int64")
    assert np.load(labels_out).tolist() == expected.argmax(-1).tolist()


@pytest.mark.timeout(400)
def test_step_model_rows_and_offsets_are_the_same_on_two_processes(tmp_path) -> None:
    features = _sequences(2)
    targets = [np.cumsum(f[:, :1], axis=0) for f in features]
    write_sequences(tmp_path / "val", features, targets, task="regression")
    torch.manual_seed(0)
    model = GRUModel(3, 8, head="step", output="gaussian", bidirectional=True).eval()
    model_dir = save_run(tmp_path, model, {"model": {"head": "step", "output": "gaussian", "bidirectional": True}})

    one, two, first, second = _predict_both(tmp_path, model_dir, str(tmp_path / "val"))
    assert one == two
    total = sum(len(f) for f in features)
    assert (second["shape"], second["values"]) == ([total, 1, 2], "mean, scale")
    offsets = np.load(second["offsets"])
    assert offsets.tolist() == np.concatenate([[0], np.cumsum([len(f) for f in features])]).tolist()
    rows = np.load(tmp_path / "two.npy")
    with torch.no_grad():
        for i in (0, 17, NUM_SEQUENCES - 1):
            expected = model(torch.from_numpy(features[i])[None])[0][0].numpy()
            assert np.abs(rows[offsets[i] : offsets[i + 1]] - expected).max() < 1e-5


def test_bad_predict_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys) -> None:
    write_sequences(tmp_path / "val", _sequences(), np.zeros((NUM_SEQUENCES, 1), np.float32), task="regression")
    model_dir = save_run(tmp_path, GRUModel(3, 8), {})
    args = ("--model", model_dir, "--data", str(tmp_path / "val"))
    assert _in_process(capsys, *args, "--out", str(tmp_path / "p.npy"), "--probabilities")[0] == 2
    err = capsys.readouterr().err
    assert "error: --probabilities: the model at --model" in err and "is a regression model" in err
    assert _in_process(capsys, *args, "--out", str(tmp_path / "no" / "p.npy"))[0] == 2
    assert (
        f"error: --out {tmp_path / 'no' / 'p.npy'}: the folder {tmp_path / 'no'} does not exist"
        in capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "val"]
