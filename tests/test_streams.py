"""Stream mode (truncated BPTT), in-process: the lane sampler's contract, chunked stateful forward
passes equal to unchunked ones, state reset where a lane moves to another stream, token streams.

    .venv/bin/pytest -q tests/test_streams.py

The multi-process runs (1 vs 2 processes, resume on another world size) are in
tests/test_streams_distributed.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_gru.config import ConfigError
from dist_gru.data.files import DataFormatError, SequenceFileDataset, write_sequences
from dist_gru.data.streams import (
    LaneState,
    StreamDataset,
    StreamSampler,
    build_stream_dataset,
    lane_stream,
    write_token_stream,
)
from dist_gru.model import GRUModel


def _stream_folder(path, lengths, features=3, seed=0):
    """Streams of float features with per-step class targets (3 classes)."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((n, features)).astype(np.float32) for n in lengths]
    ys = [rng.integers(0, 3, n) for n in lengths]
    write_sequences(path, xs, ys, task="classification", num_classes=3)
    return xs, ys


@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_chunked_stateful_forward_equals_the_unchunked_forward(cell):
    torch.manual_seed(0)
    model = GRUModel(3, 16, 2, task="classification", output_size=3, head="step", cell=cell).eval()
    x = torch.randn(1, 203, 3)  # 25 chunks of 8 and a partial one of 3
    with torch.no_grad():
        whole, _ = model(x)
        state = torch.zeros(2, 1, 16)
        pieces = []
        for start in range(0, 203, 8):
            out, state = model(x[:, start : start + 8], state=state)
            pieces.append(out)
    chunked = torch.cat(pieces, dim=1)
    diff = float((chunked - whole).abs().max())
    print(f"\nMEASURED chunked vs unchunked stateful forward ({cell}): max abs diff {diff:.3g}")
    assert chunked.shape == whole.shape
    assert diff < 1e-6


def test_lanes_cover_each_epoch_once_and_ranks_partition_the_lanes():
    lengths = np.array([50, 7, 33, 120, 1, 64])
    chunk, lanes = 8, 4
    sampler = StreamSampler(lengths, lanes, chunk, 0, 1, seed=3)
    total = int(sum(-(-n // chunk) for n in lengths))
    assert sampler.total_chunks == total == 37 and sampler.steps_per_epoch == 9
    for epoch in range(2):
        seen = set()
        for k in range(sampler.steps_per_epoch):
            where = sampler.chunks(epoch * sampler.steps_per_epoch + k)
            for i, o, n in zip(where["stream"], where["offset"], where["length"], strict=True):
                assert 0 < n <= chunk and o + n <= lengths[i]
                steps = {(int(i), int(o) + t) for t in range(int(n))}
                assert not steps & seen, "a step was read twice in one epoch"
                seen |= steps
        # Only the last 37 - 4 * 9 = 1 chunk of the epoch's tape is dropped: at most `chunk` steps.
        assert int(lengths.sum()) - len(seen) <= chunk
    # The layout is a function of (seed, step): another sampler, or rank 1 of 2, agrees.
    again = StreamSampler(lengths, lanes, chunk, 1, 2, seed=3)
    assert again.rank_lanes.tolist() == [2, 3]
    for step in (0, 5, 13):
        a, b = sampler.chunks(step), again.chunks(step, again.rank_lanes)
        assert a["stream"][2:].tolist() == b["stream"].tolist() and a["offset"][2:].tolist() == b["offset"].tolist()
    assert sampler.valid_steps(0) == int(sampler.chunks(0)["length"].sum())


def test_more_lanes_than_an_epoch_has_chunks_is_refused(tmp_path):
    from dist_gru.config import load_config
    from dist_gru.tasks import data_info, task_for

    assert StreamSampler(np.array([16, 16]), 9, 4, 0, 1, seed=0).steps_per_epoch == 0
    _stream_folder(tmp_path / "two", [16, 13])  # 4 + 4 chunks of 4 steps (the last one short)
    overrides = ["data.name=files", f"data.train_path={tmp_path / 'two'}", "train.tbptt=4", "model.head=step"]
    tokens = {"task": "classification", "output_size": 3, "head": "step"}
    for lanes, refused in ((9, True), (8, False)):
        cfg = load_config(None, [*overrides, f"train.global_batch_size={lanes}"])
        info = data_info(cfg, build_stream_dataset(cfg, "train"), "train")
        assert (info.epoch_samples, info.global_batch, info.tbptt) == (8, lanes, 4)
        if not refused:
            task_for(tokens).check_fits(info)
            continue
        with pytest.raises(ConfigError) as err:
            task_for(tokens).check_fits(info)
        assert str(err.value) == (
            "train.global_batch_size=9 lanes, but an epoch of the training streams has only 8 chunks of "
            "train.tbptt=4 steps: use at most 8 lanes, a shorter train.tbptt, or more data"
        )


def test_a_lane_crossing_a_stream_boundary_resets_its_state(tmp_path):
    xs, _ = _stream_folder(tmp_path / "two", [20, 12])
    dataset = StreamDataset(SequenceFileDataset(tmp_path / "two"), "dataset")
    sampler = StreamSampler(dataset.lengths, 1, 8, 0, 1, seed=0)  # one lane walks both streams
    torch.manual_seed(0)
    model = GRUModel(3, 8, 1, task="classification", output_size=3, head="step").eval()
    lanes = LaneState(1, 1, 8, torch.device("cpu"))
    order = sampler._epoch_layout(0)[0].tolist()
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    resets = []
    stream = lane_stream(dataset, sampler, 0)
    with torch.no_grad():
        for step in range(sampler.steps_per_epoch):  # 3 + 2 chunks
            _, batch = next(stream)
            resets.append(bool(batch["reset"][0]))
            out, h_n = model(batch["x"], batch["lengths"], state=lanes.carried(batch["reset"]))
            lanes.keep(h_n)
            i = int(sampler.chunks(step)["stream"][0])
            outputs[i].append(out[0, : int(batch["lengths"][0])])
    first_chunks = {0: 3, 1: 2}[order[0]]
    assert resets == [True] + [False] * (first_chunks - 1) + [True] + [False] * (4 - first_chunks)
    with torch.no_grad():
        for i in (0, 1):  # each stream alone from a zero state: what the lane computed
            alone = model(torch.from_numpy(xs[i])[None])[0][0]
            assert float((torch.cat(outputs[i]) - alone).abs().max()) < 1e-6
    # Without the reset, the second stream would start from the first one's final state.
    with torch.no_grad():
        second = order[1]
        carried = model(torch.from_numpy(xs[second])[None], state=h_n)[0][0]
        assert float((carried - model(torch.from_numpy(xs[second])[None])[0][0]).abs().max()) > 1e-3


def test_next_step_targets_of_a_token_stream(tmp_path):
    tokens = np.arange(40) % 7
    write_token_stream(tmp_path / "tok", tokens, vocab_size=7)
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert (meta["feature_dtype"], meta["vocab_size"], meta["target_kind"]) == ("uint8", 7, "none")
    dataset = StreamDataset(SequenceFileDataset(tmp_path / "tok"), "next")
    assert dataset.lengths.tolist() == [39] and (dataset.task, dataset.output_size) == ("classification", 7)
    batch = dataset.read(np.array([0, 0]), np.array([0, 32]), np.array([8, 7]), 8)
    assert batch["x"].dtype == torch.int64 and batch["x"].shape == (2, 8)
    assert batch["x"][1, :7].tolist() == (np.arange(32, 39) % 7).tolist()
    assert batch["y"][1, :7].tolist() == (np.arange(33, 40) % 7).tolist()
    assert batch["lengths"].tolist() == [8, 7]
    with pytest.raises(DataFormatError, match="has no stored per-step targets.*data.targets=next"):
        StreamDataset(SequenceFileDataset(tmp_path / "tok"), "dataset")


def test_token_ids_outside_the_stored_vocabulary_are_refused_on_open(tmp_path):
    write_token_stream(tmp_path / "tok", np.arange(10), vocab_size=10)
    meta_file = tmp_path / "tok" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta.update(vocab_size=8, num_classes=8)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"token id 8 in sequence 0 at step 8 is outside the vocabulary; expected 0 <= id < vocab_size=8"):
        SequenceFileDataset(tmp_path / "tok")
