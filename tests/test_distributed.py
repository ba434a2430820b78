"""The sharding contract and multi-process equivalence, with real torchrun processes on gloo.

    .venv/bin/pytest -q tests/test_distributed.py

Each module fixture trains once (a few seconds on 2 cores) and several tests check its run folders:
`samples/rank-R.jsonl` (train.record_samples) proves which samples each rank trained on, and
`model/model.safetensors` proves that W processes compute the update of one. The measured
differences are printed (`pytest -s`) and quoted in the README.

The sampler's unit tests at the end run in-process: no Accelerator, no processes.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    PY,
    TINY,
    assert_ok,
    cli,
    free_port,
    load_weights,
    max_abs_diff,
    read_metrics,
    run_all,
    summary_fields,
    torchrun,
)

from dist_gru.data.loading import TrainBatchSampler, eval_batches

# 20 optimizer steps of 16 samples over 200 training samples: 12 steps per epoch (8 samples
# dropped), so the runs cross an epoch boundary. 61 validation samples split unevenly over 2 ranks
# and into uneven eval batches of 8.
STEPS = 20
BASE = [
    *TINY,
    "log.mode=disabled",
    f"train.max_steps={STEPS}",
    "train.log_every=5",
    "data.train_size=200",
    "data.val_size=61",
    "train.eval_batch_size=8",
    "train.record_samples=true",
]
WEIGHT_TOL = 1e-5
METRIC_TOL = 1e-6


def _train(run_dir: Path, nproc: int, *overrides: str) -> tuple[Path, dict[str, str]]:
    """Train with `nproc` processes (1: the plain CLI); returns the run folder and the summary line's fields."""
    args = ("train", *BASE, f"train.run_dir={run_dir}", *overrides)
    result = assert_ok(torchrun(nproc, *args) if nproc > 1 else cli(*args))
    return run_dir, summary_fields(result.stdout)


def _samples(run_dir: Path, rank: int) -> list[dict]:
    lines = (run_dir / "samples" / f"rank-{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _weights(run_dir: Path) -> dict:
    return load_weights(run_dir / "model" / "model.safetensors")


def _step_batches(run_dir: Path, world_size: int) -> list[list[int]]:
    """The global batch of each optimizer step: ranks' slices of each micro-batch, in rank order, micro-batches in order."""
    per_rank = [_samples(run_dir, rank) for rank in range(world_size)]
    assert len({len(lines) for lines in per_rank}) == 1, "ranks recorded different numbers of micro-batches"
    steps: dict[int, list[int]] = {}
    for micro in zip(*per_rank, strict=True):
        assert len({line["step"] for line in micro}) == 1 and len({line["epoch"] for line in micro}) == 1
        steps.setdefault(micro[0]["step"], []).extend(i for line in micro for i in line["index"])
    assert sorted(steps) == list(range(STEPS))
    return [steps[s] for s in range(STEPS)]


# ---------------------------------------------------------------------------------------------
# Synthetic fixed-length data: 1 process vs 2 processes, and gradient accumulation


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, tuple[Path, dict[str, str]]]:
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "1x1": _train(root / "1x1", 1),
        "2x1": _train(root / "2x1", 2),
    }


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> dict[str, tuple[Path, dict[str, str]]]:
    root = tmp_path_factory.mktemp("accum")
    return {
        "2x2": _train(root / "2x2", 2, "train.grad_accum_steps=2"),
        "1x4": _train(root / "1x4", 1, "train.grad_accum_steps=4"),
    }


@pytest.mark.timeout(300)
def test_two_processes_are_a_ddp_world_of_two(synthetic):
    one, two = synthetic["1x1"][1], synthetic["2x1"][1]
    assert (two["world_size"], two["nodes"], two["backend"]) == ("2", "1", "gloo")
    assert two["wrapper"] == "DistributedDataParallel"
    assert (two["global_batch"], two["per_rank_batch"]) == ("16", "8")
    assert (one["world_size"], one["wrapper"], one["per_rank_batch"]) == ("1", "GRUModel", "16")


@pytest.mark.timeout(300)
def test_rank_slices_partition_each_global_batch(synthetic):
    one_dir, two_dir = synthetic["1x1"][0], synthetic["2x1"][0]
    rank0, rank1 = _samples(two_dir, 0), _samples(two_dir, 1)
    reference = _samples(one_dir, 0)
    assert len(rank0) == len(rank1) == len(reference) == STEPS
    for a, b, ref in zip(rank0, rank1, reference, strict=True):
        assert a["step"] == b["step"] == ref["step"] and a["epoch"] == b["epoch"] == ref["epoch"]
        assert len(a["index"]) == len(b["index"]) == 8
        assert not set(a["index"]) & set(b["index"])
        assert a["index"] + b["index"] == ref["index"]  # rank 0's slice, then rank 1's: the 1-process batch
    # Epoch 0 is a permutation prefix (12 steps x 16 of 200, the last 8 dropped); epoch 1 reshuffles.
    epoch0 = [i for line in reference if line["epoch"] == 0 for i in line["index"]]
    epoch1 = [i for line in reference if line["epoch"] == 1 for i in line["index"]]
    assert len(epoch0) == 192 == len(set(epoch0)) and set(epoch0) <= set(range(200))
    assert len(epoch1) == (STEPS - 12) * 16 and epoch1 != epoch0[: len(epoch1)]


@pytest.mark.timeout(300)
def test_two_processes_train_like_one(synthetic):
    diff = max_abs_diff(_weights(synthetic["1x1"][0]), _weights(synthetic["2x1"][0]))
    print(f"\nsynthetic fixed length, {STEPS} steps: max |w(1 proc) - w(2 procs)| = {diff:.3g}")
    assert diff <= WEIGHT_TOL
    # The logged training loss is the global batch's mean, whatever the world size.
    one, two = read_metrics(synthetic["1x1"][0]), read_metrics(synthetic["2x1"][0])
    losses = [(a["train/loss"], b["train/loss"]) for a, b in zip(one, two, strict=True) if "train/loss" in a]
    assert len(losses) == STEPS // 5
    assert max(abs(a - b) for a, b in losses) <= 1e-5, losses


@pytest.mark.timeout(300)
def test_eval_metrics_of_two_processes_equal_one_with_uneven_split(synthetic):
    one, two = read_metrics(synthetic["1x1"][0])[-1], read_metrics(synthetic["2x1"][0])[-1]
    assert one["step"] == two["step"] == STEPS
    assert one["eval/num_samples"] == two["eval/num_samples"] == 61
    for key in ("eval/loss", "eval/mse", "eval/mae"):
        print(f"\n{key}: 1 proc {one[key]:.9g}, 2 procs {two[key]:.9g}, |diff| {abs(one[key] - two[key]):.3g}")
        assert two[key] == pytest.approx(one[key], abs=METRIC_TOL)


@pytest.mark.timeout(400)
def test_gradient_accumulation_equals_one_big_batch(synthetic, accumulated):
    reference_dir = synthetic["1x1"][0]
    two_by_two, one_by_four = accumulated["2x2"], accumulated["1x4"]
    assert (two_by_two[1]["per_rank_batch"], two_by_two[1]["grad_accum"]) == ("4", "2")
    assert (one_by_four[1]["per_rank_batch"], one_by_four[1]["grad_accum"]) == ("4", "4")
    # The same samples per optimizer step, in the same order, however they are split.
    reference = _step_batches(reference_dir, 1)
    assert _step_batches(two_by_two[0], 2) == reference
    assert _step_batches(one_by_four[0], 1) == reference
    w_ref = _weights(reference_dir)
    diff_2x2 = max_abs_diff(w_ref, _weights(two_by_two[0]))
    diff_1x4 = max_abs_diff(w_ref, _weights(one_by_four[0]))
    diff_between = max_abs_diff(_weights(two_by_two[0]), _weights(one_by_four[0]))
    print(
        f"\ngrad accumulation, {STEPS} steps: max |w| diff 1x1 vs 2 procs x 2 micro = {diff_2x2:.3g}, "
        f"1x1 vs 1 proc x 4 micro = {diff_1x4:.3g}, 2x2 vs 1x4 = {diff_between:.3g}"
    )
    assert max(diff_2x2, diff_1x4, diff_between) <= WEIGHT_TOL


# ---------------------------------------------------------------------------------------------
# File-backed variable-length data


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, object]:
    from dist_gru.data import write_sequences

    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(7)

    def split(n: int) -> tuple[list[np.ndarray], np.ndarray]:
        seqs = [rng.standard_normal((int(length), 2)).astype(np.float32) for length in rng.integers(3, 21, n)]
        return seqs, np.array([[s[:, 0].mean(), s[:, 1].max()] for s in seqs], dtype=np.float32)

    write_sequences(root / "train", *split(200), task="regression")
    write_sequences(root / "val", *split(61), task="regression")
    data = ["data.name=files", f"data.train_path={root / 'train'}", f"data.val_path={root / 'val'}"]
    dropout = [*data, "model.num_layers=2", "model.dropout=0.5"]
    return {
        "val": root / "val",
        "1x1": _train(root / "1x1", 1, *data),
        "2x1": _train(root / "2x1", 2, *data),
        "dropout-1x1": _train(root / "dropout-1x1", 1, *dropout),
        "dropout-2x1": _train(root / "dropout-2x1", 2, *dropout),
        "no-dropout-1x1": _train(root / "no-dropout-1x1", 1, *dropout, "model.dropout=0"),
    }


@pytest.mark.timeout(300)
def test_variable_length_files_two_processes_train_like_one(files):
    one_dir, two_dir = files["1x1"][0], files["2x1"][0]
    assert files["2x1"][1]["world_size"] == "2"
    assert _step_batches(two_dir, 2) == _step_batches(one_dir, 1)
    lengths = np.diff(np.load(files["val"].parent / "train" / "offsets.npy"))
    assert lengths.min() < lengths.max()  # really variable length: each rank pads to its own maximum
    diff = max_abs_diff(_weights(one_dir), _weights(two_dir))
    print(f"\nfile-backed variable length, {STEPS} steps: max |w(1 proc) - w(2 procs)| = {diff:.3g}")
    assert diff <= WEIGHT_TOL


@pytest.mark.timeout(300)
def test_dropout_between_layers_trains_the_same_on_two_processes_as_on_one(files):
    # Each sequence's mask is drawn from (seed, step, sample index), not from its rank's RNG.
    one, two = _weights(files["dropout-1x1"][0]), _weights(files["dropout-2x1"][0])
    diff, effect = max_abs_diff(one, two), max_abs_diff(one, _weights(files["no-dropout-1x1"][0]))
    print(f"\ndropout 0.5, 2 layers, variable length, {STEPS} steps: max |w(1 proc) - w(2 procs)| = {diff:.3g}"
          f" (dropout's own effect on the weights: {effect:.3g})")
    assert diff <= WEIGHT_TOL
    assert effect > 100 * WEIGHT_TOL


@pytest.mark.timeout(300)
def test_evaluate_command_under_torchrun_equals_one_process(files):
    model = files["1x1"][0] / "model"
    args = ("evaluate", "--model", str(model), "--data", str(files["val"]), "--batch-size", "8")
    one = assert_ok(cli(*args)).json_last_line()
    result = assert_ok(torchrun(2, *args))
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 1  # main process only
    two = result.json_last_line()
    assert one["num_samples"] == two["num_samples"] == 61
    for key in ("loss", "mse", "mae"):
        print(f"\nevaluate {key}: 1 proc {one[key]:.9g}, 2 procs {two[key]:.9g}, |diff| {abs(one[key] - two[key]):.3g}")
        assert two[key] == pytest.approx(one[key], abs=METRIC_TOL)


# ---------------------------------------------------------------------------------------------
# Two torchrun agents acting as two nodes on loopback


@pytest.mark.timeout(400)
def test_two_agents_as_two_nodes_write_one_run_folder(tmp_path):
    # Each "node" works in its own folder and run_dir is relative, so files written by anything
    # but global rank 0 would show up under the other node's folder.
    port = free_port()
    nodes = [tmp_path / "node-a", tmp_path / "node-b"]
    for node in nodes:
        node.mkdir()
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"two-nodes-{port}",
        "-m",
        "dist_gru",
        "train",
        *TINY,
        "train.threads=1",  # each agent sees one local process and would take both cores
        "train.run_dir=run",
    ]
    results = run_all([cmd, cmd], cwds=nodes, timeout=300)
    for result in results:
        assert_ok(result)
    main = [i for i, result in enumerate(results) if "dist-gru: world_size=" in result.stdout]
    assert len(main) == 1, "exactly one agent hosts global rank 0"
    fields = summary_fields(results[main[0]].stdout)
    assert (fields["world_size"], fields["nodes"], fields["wrapper"]) == ("2", "2", "DistributedDataParallel")
    main_node, other_node = nodes[main[0]], nodes[1 - main[0]]
    assert list(other_node.iterdir()) == [], "a rank other than global rank 0 wrote files"
    run_dir = main_node / "run"
    assert [m["step"] for m in read_metrics(run_dir) if "train/loss" in m] == [4, 8, 12]
    assert read_metrics(run_dir)[-1]["eval/num_samples"] == 64
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


# ---------------------------------------------------------------------------------------------
# The sampler, in-process


def _sampler(lengths, micro=16, accum=1, rank=0, world_size=1, seed=0, bucket=False) -> TrainBatchSampler:
    return TrainBatchSampler(np.asarray(lengths), micro, accum, rank, world_size, seed, bucket_by_length=bucket)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bucket", [False, True])
def test_epoch_order_depends_only_on_seed_and_epoch(bucket):
    lengths = np.random.default_rng(0).integers(1, 100, 1000)
    a = _sampler(lengths, bucket=bucket, seed=3)
    b = _sampler(lengths, bucket=bucket, seed=3, micro=16, world_size=4, rank=2)
    for epoch in (0, 1, 5):
        batches = a.epoch_batches(epoch)
        assert batches.shape == (1000 // 16, 16)
        assert len(np.unique(batches)) == batches.size  # no sample twice in an epoch
        np.testing.assert_array_equal(batches, b.epoch_batches(epoch))  # rank and world size do not matter
        np.testing.assert_array_equal(batches, _sampler(lengths, bucket=bucket, seed=3).epoch_batches(epoch))
    assert not np.array_equal(a.epoch_batches(0), a.epoch_batches(1))
    assert not np.array_equal(a.epoch_batches(0), _sampler(lengths, bucket=bucket, seed=4).epoch_batches(0))


@pytest.mark.timeout(30)
def test_position_is_a_pure_function_of_the_step():
    sampler = _sampler(np.ones(100), micro=8, accum=3)  # 4 steps of 24 samples per epoch, 4 dropped
    assert sampler.steps_per_epoch == 4
    assert [sampler.position(s) for s in (0, 1, 3, 4, 9)] == [(0, 0), (0, 3), (0, 9), (1, 0), (2, 3)]
    sampler.set_position(*sampler.position(6))
    assert len(sampler) == 12 - 6
    assert list(sampler) == [b.tolist() for b in sampler.epoch_batches(1)[6:]]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_rank_slices_are_equal_disjoint_and_make_the_global_batch(world_size):
    lengths = np.arange(1, 201)
    ranks = [_sampler(lengths, micro=16, accum=2, rank=r, world_size=world_size, seed=1) for r in range(world_size)]
    for r in ranks:
        r.set_position(1, 4)
    per_rank = [list(r) for r in ranks]
    glob = ranks[0].epoch_batches(1)[4:]
    assert all(len(batches) == len(glob) for batches in per_rank)
    for i, batch in enumerate(glob):
        slices = [batches[i] for batches in per_rank]
        assert all(len(s) == 16 // world_size for s in slices)
        assert sum(slices, []) == batch.tolist()


@pytest.mark.timeout(30)
def test_bucket_by_length_reduces_padding_and_keeps_the_contract():
    # Skewed lengths: mostly short, a long tail.
    lengths = np.minimum(1 + np.random.default_rng(1).lognormal(2.0, 1.0, 4096).astype(int), 500)
    plain = _sampler(lengths, micro=32, world_size=2, seed=5)
    bucketed = _sampler(lengths, micro=32, world_size=2, seed=5, bucket=True)
    before, after = plain.padding_fraction(0), bucketed.padding_fraction(0)
    print(f"\npadding fraction on skewed lengths: {before:.3f} plain, {after:.3f} bucketed")
    assert after < before / 2
    # Still an epoch permutation prefix of the same size, split equally over ranks, and deterministic.
    batches = bucketed.epoch_batches(0)
    assert batches.shape == plain.epoch_batches(0).shape and len(np.unique(batches)) == batches.size
    np.testing.assert_array_equal(batches, _sampler(lengths, micro=32, seed=5, bucket=True).epoch_batches(0))
    rank1 = _sampler(lengths, micro=32, rank=1, world_size=2, seed=5, bucket=True)
    assert [a + b for a, b in zip(bucketed, rank1, strict=True)] == batches.tolist()


@pytest.mark.timeout(30)
def test_too_little_data_for_one_global_batch_is_a_clear_error():
    from dist_gru.config import ConfigError
    from dist_gru.tasks import DataInfo, task_for

    assert _sampler(np.ones(30), micro=16, accum=2).steps_per_epoch == 0
    assert _sampler(np.ones(32), micro=16, accum=2).steps_per_epoch == 1
    info = DataInfo("d", "regression", "sequence", 1, epoch_samples=30, global_batch=32)
    with pytest.raises(ConfigError) as err:
        task_for({}).check_fits(info)
    assert str(err.value) == (
        "the training split has 30 samples, fewer than one global batch of 32: lower train.global_batch_size "
        "or use more data"
    )
    task_for({}).check_fits(DataInfo("d", "regression", "sequence", 1, epoch_samples=32, global_batch=32))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("num_samples", [1, 3, 61, 64, 257])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_batches_cover_every_sample_exactly_once(num_samples, world_size):
    per_rank = [eval_batches(num_samples, 8, rank, world_size) for rank in range(world_size)]
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(seen) == list(range(num_samples))
    assert all(0 < len(batch) <= 8 for batches in per_rank for batch in batches)
    sizes = [sum(map(len, batches)) for batches in per_rank]
    assert max(sizes) - min(sizes) <= 1  # shards differ by at most one sample


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_step", [0, 5, 7])
def test_train_stream_resumes_exactly_at_a_step_across_epochs(start_step):
    from dist_gru.config import DataConfig
    from dist_gru.data.loading import build_dataset, make_loader, train_stream

    dataset = build_dataset(DataConfig(name="adding", seq_len=4, train_size=50, val_size=1), "train")

    def stream(step: int):
        sampler = _sampler(dataset.lengths, micro=8, accum=2, rank=1, world_size=2, seed=9)  # 3 steps per epoch
        return train_stream(make_loader(dataset, sampler, num_workers=0), sampler, step)

    full = [(epoch, batch["index"].tolist()) for epoch, batch in itertools.islice(stream(0), 2 * 10)]
    resumed = [(epoch, batch["index"].tolist()) for epoch, batch in itertools.islice(stream(start_step), 2 * 3)]
    assert resumed == full[2 * start_step : 2 * start_step + 6]
    assert [epoch for epoch, _ in full] == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 2
    reference = _sampler(dataset.lengths, micro=8, accum=2, seed=9)
    assert [indices for _, indices in full[6:12]] == [b[4:].tolist() for b in reference.epoch_batches(1)]
