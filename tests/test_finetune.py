"""Fine-tuning (`train.init_from`, `train.freeze`): a pretrained GRU with a new head beats training from scratch.

    .venv/bin/pytest -q tests/test_finetune.py

The GRU is pretrained on the adding problem (regression: the sum of two marked values). The second
task reads the same kind of sequences but asks which of three bins the sum falls in (classification,
so the head changes shape). With the encoder frozen, 40 steps of the head alone beat 40 steps of
the whole model from scratch by a wide margin (measured: accuracy 0.82 vs 0.70), and the GRU's
weights stay bit-identical to the pretrained ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PY, assert_ok, cli, load_weights, read_metrics, run_all

from dist_gru.data import write_sequences
from dist_gru.data.synthetic import SYNTHETIC
from dist_gru.model import GRUModel
from dist_gru.train import finetune
from dist_gru.train.checkpoint import save_checkpoint

SMALL = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "optim.warmup_steps=2",
    "train.global_batch_size=32",
    "train.log_every=50",
    "log.mode=disabled",
    "--quiet",
]
PRETRAIN = [
    *SMALL,
    "data.name=adding",
    "data.seq_len=10",
    "data.train_size=8192",
    "data.val_size=256",
    "optim.lr=1e-2",
    "optim.warmup_steps=10",
    "train.global_batch_size=64",
    "train.max_steps=300",
]


def _binned_sums(root) -> list[str]:
    """The adding problem's sequences (another seed), labelled by the bin of their sum: <0.75, <1.25, above."""
    for split, size, offset in (("train", 1024, 0), ("val", 256, 1024)):
        batch = SYNTHETIC["adding"](size, 10, 99, offset=offset).__getitems__(list(range(size)))
        labels = np.digitize(batch["y"][:, 0].numpy(), [0.75, 1.25])
        write_sequences(root / split, batch["x"].numpy(), labels, task="classification", num_classes=3)
    return ["data.name=files", f"data.train_path={root / 'train'}", f"data.val_path={root / 'val'}"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    assert_ok(cli("train", *PRETRAIN, f"train.run_dir={run_dir}", timeout=300))
    assert read_metrics(run_dir)[-1]["eval/mse"] < 0.02  # predicting 1 always: 0.167
    return run_dir


@pytest.mark.timeout(600)
def test_a_new_head_on_a_frozen_pretrained_gru_beats_the_same_budget_from_scratch(pretrained, tmp_path) -> None:
    data = _binned_sums(tmp_path / "bins")
    job = ["train", *SMALL, *data, "optim.lr=5e-2", "train.max_steps=40"]
    init = [f"train.init_from={pretrained / 'model'}", "train.freeze=[rnn]"]
    tuned, scratch = tmp_path / "tuned", tmp_path / "scratch"
    results = run_all(
        [
            [PY, "-m", "dist_gru", *job, *init, f"train.run_dir={tuned}"],
            [PY, "-m", "dist_gru", *job, f"train.run_dir={scratch}"],
        ],
        timeout=300,
    )
    for result in results:
        assert_ok(result)
    assert (
        "dist-gru: train.init_from: weights from model "
        f"{pretrained / 'model'}: rnn loaded; head re-initialised (task 'regression' -> 'classification', "
        "output_size 1 -> 3)"
    ) in results[0].stdout
    tuned_final, scratch_final = read_metrics(tuned)[-1], read_metrics(scratch)[-1]
    print(f"accuracy fine-tuned {tuned_final['eval/accuracy']:.4f} vs scratch {scratch_final['eval/accuracy']:.4f}")
    assert tuned_final["eval/accuracy"] > scratch_final["eval/accuracy"] + 0.05
    assert tuned_final["eval/loss"] < scratch_final["eval/loss"]
    # A fresh optimizer, schedule and step: the run starts at step 0 and its schedule is its own.
    assert [m["step"] for m in read_metrics(tuned) if "train/loss" in m] == [40]

    source, weights = (
        load_weights(pretrained / "model" / "model.safetensors"),
        load_weights(tuned / "model" / "model.safetensors"),
    )
    rnn = [name for name in weights if name.startswith("rnn.")]
    assert rnn and all(torch.equal(weights[name], source[name]) for name in rnn)  # frozen: bit-identical
    assert weights["head.weight"].shape == (3, 32) and source["head.weight"].shape == (1, 32)

    record = json.loads((tuned / "init_from.json").read_text())
    assert (record["kind"], record["loaded"], record["frozen"]) == ("model", ["rnn"], ["rnn"])
    assert record["path"] == str((pretrained / "model").resolve()) and len(record["sha256"]) == 64
    assert not (scratch / "init_from.json").exists()


@pytest.mark.timeout(300)
def test_bad_init_from_is_one_clear_error_and_writes_nothing(pretrained, tmp_path) -> None:
    other_input = tmp_path / "other_input"
    not_a_model = tmp_path / "not_a_model"
    (tmp_path / "empty").mkdir()
    job = [PY, "-m", "dist_gru", "train", *SMALL, "train.max_steps=2"]
    wrong_size, wrong_path = run_all(
        [
            [
                *job,
                "data.name=seed_example",
                "data.num_features=3",
                "data.train_size=64",
                f"train.init_from={pretrained / 'model'}",
                f"train.run_dir={other_input}",
            ],
            [*job, f"train.init_from={tmp_path / 'empty'}", f"train.run_dir={not_a_model}"],
        ],
        timeout=240,
    )
    assert wrong_size.returncode == 2 and "Traceback" not in wrong_size.stderr
    assert f"error: train.init_from={pretrained / 'model'}: its GRU does not fit this job's model" in wrong_size.stderr
    assert "input_size: the model there has 2, this job has 3" in wrong_size.stderr
    assert wrong_path.returncode == 2 and "Traceback" not in wrong_path.stderr
    assert (
        f"error: train.init_from={tmp_path / 'empty'}: expected a model folder (config.json + model.safetensors"
        in wrong_path.stderr
    )
    assert not other_input.exists() and not not_a_model.exists()


def test_init_from_a_checkpoint_loads_the_head_too_when_it_means_the_same(tmp_path) -> None:
    torch.manual_seed(1)
    source = GRUModel(2, 8)
    state = {"task": "regression", "model_config": {"input_size": 2, "hidden_size": 8, "num_layers": 1}}
    path = save_checkpoint(tmp_path, 5, source, torch.optim.AdamW(source.parameters()), state, keep=1)
    torch.manual_seed(2)
    target = GRUModel(2, 8)
    target.set_normalization([1.0, 2.0], [3.0, 4.0])
    record = finetune.init_weights(str(path), target, {"input_size": 2, "hidden_size": 8, "task": "regression"})
    assert (record["kind"], record["step"], record["loaded"], record["head_reinitialised"]) == (
        "checkpoint",
        5,
        ["rnn", "head"],
        None,
    )
    assert (
        finetune.describe(record)
        == f"dist-gru: train.init_from: weights from checkpoint {path} (step 5): rnn and head loaded"
    )
    ours, theirs = target.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith(("rnn.", "head.")))
    assert ours["input_mean"].tolist() == [1.0, 2.0]  # the scaling is this job's own


@pytest.mark.parametrize(("before", "after"), [(0, 4), (4, 0), (4, 2)])
def test_a_forecast_model_fine_tuned_with_other_naive_terms_keeps_its_head_and_forecasts_the_same(
    tmp_path, before: int, after: int
) -> None:
    torch.manual_seed(1)
    kwargs = {"head": "forecast", "horizon": 3, "scaling": "last"}
    source = GRUModel(2, 8, **kwargs, naive_season=before).eval()
    source.save_pretrained(tmp_path / "model")
    torch.manual_seed(2)
    target = GRUModel(2, 8, **kwargs, naive_season=after).eval()
    record = finetune.init_weights(str(tmp_path / "model"), target, {**target.config})
    assert (record["loaded"], record["head_reinitialised"]) == (["rnn", "head"], None)
    assert finetune.describe(record).endswith(f"rnn and head loaded; naive terms start at 0 (naive_season {before} -> {after})")
    if after:
        assert all(not p.any() for p in target.head.naive.parameters())
    x = torch.randn(5, 6, 2)
    with torch.no_grad():  # the source's terms start at 0 too, so both forecast what the GRU does
        assert torch.equal(target(x)[0], source(x)[0])
