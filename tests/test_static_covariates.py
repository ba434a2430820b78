"""Static covariates: one value per series (a store's type, its size) reaches the model as its
initial state, travels in the model folder with its vocabularies, and is remapped by name when
data given to the model codes its categories otherwise; N processes compute what 1 computes.

    .venv/bin/pytest -q tests/test_static_covariates.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    PY,
    TINY,
    assert_ok,
    assert_refused,
    cli,
    load_weights,
    max_abs_diff,
    one_and_two_processes,
    read_metrics,
    run_all,
)

from dist_gru.config import ConfigError, load_config
from dist_gru.data.batching import model_inputs
from dist_gru.data.files import SequenceFileDataset
from dist_gru.data.loading import build_dataset
from dist_gru.data.statics import UNSEEN, Statics
from dist_gru.data.synthetic import StoresDataset
from dist_gru.data.windows import WindowDataset, context_at_end
from dist_gru.model import GRUModel

STORES = ["data.name=stores", "data.seq_len=60", "data.window=12"]
# 256 stores of 60 steps, 12-step windows labelled per step: a few seconds per run on 2 cores.
TRAIN = [
    *STORES,
    "model.head=step",
    "data.train_size=256",
    "data.val_size=64",
    "model.hidden_size=32",
    "model.num_layers=1",
    "train.global_batch_size=32",
    "train.max_steps=200",
    "train.eval_every=200",
    "train.log_every=100",
    "optim.lr=0.01",
    "optim.warmup_steps=20",
    "log.mode=disabled",
    "train.threads=1",
]
LEVELS = {"mall": 1.0, "outlet": -1.0, "street": 0.0}


def expect_rows(batch: dict, statics: Statics, seq: np.ndarray) -> None:
    assert batch["static_categories"].dtype == torch.int64 and batch["static_values"].dtype == torch.float32
    np.testing.assert_array_equal(batch["static_categories"].numpy(), statics.categories[seq])
    np.testing.assert_array_equal(batch["static_values"].numpy(), statics.values[seq])


def test_synthetic_batches_carry_their_series_static_rows():
    picks = np.array([0, 60, 500, 1500])
    for head in ("step", "forecast", "last"):
        horizon = ["data.horizon=4"] if head == "forecast" else []
        cfg = load_config(None, [*STORES, *horizon, f"model.head={head}", "data.train_size=40", "data.val_size=8"])
        windows = build_dataset(cfg.data, "train", head=head)
        seq, _ = windows.locate(picks)
        assert len(set(seq.tolist())) == 4  # four different series
        expect_rows(windows.__getitems__(picks.tolist()), windows.source.statics, seq)
    statics = windows.source.statics
    assert statics.columns[0] == {"name": "store_type", "kind": "category", "vocabulary": ["mall", "outlet", "street"]}
    assert set(statics.categories[:, 0].tolist()) == {0, 1, 2} and 0.5 <= statics.values.min() < statics.values.max() < 1.5
    val = build_dataset(cfg.data, "val", head="last").source.statics  # series 40.. of the same generator
    assert not np.array_equal(val.values, statics.values[:8])
    cfg = load_config(None, ["data.name=stores", "data.seq_len=20", "data.train_size=10", "data.val_size=2"])
    sequences = build_dataset(cfg.data, "train")
    expect_rows(sequences.__getitems__([3, 1, 9]), sequences.statics, np.array([3, 1, 9]))
    model_keys = model_inputs(sequences.__getitems__([0]), torch.device("cpu")).keys()
    assert set(model_keys) == {"x", "lengths", "static_categories", "static_values"}
    cfg = load_config(None, [*STORES, "model.head=step", "data.train_size=4", "data.static_covariates=false"])
    plain = build_dataset(cfg.data, "train", head="step").__getitems__([0, 50])
    assert "static_categories" not in plain and "static_values" not in plain


def store_table(stores: dict[str, tuple[str, float]], steps: int = 40, seed: int = 0) -> pd.DataFrame:
    """Daily sales of `stores` ({id: (type, size)}): the type's level + 0.3 (size - 1) + noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for sid, (kind, size) in stores.items():
        traffic = rng.random(steps)
        y = LEVELS.get(kind, 0.5) + 0.3 * (size - 1) + 0.5 * traffic + 0.1 * rng.standard_normal(steps)
        frames.append(
            pd.DataFrame({"store": sid, "ds": pd.date_range("2024-01-01", periods=steps, freq="D"), "y": y,
                          "traffic": traffic, "kind": kind, "size": size})
        )
    return pd.concat(frames, ignore_index=True)


STORE_FACTS = {f"s{i:02d}": (("mall", "outlet", "street")[i % 3], 0.5 + i / 12) for i in range(12)}


def prepare(table: pd.DataFrame, tmp: Path, name: str, statics: str = "kind,size") -> Path:
    table.to_csv(tmp / f"{name}.csv", index=False)
    args = ["--table", str(tmp / f"{name}.csv"), "--id-column", "store", "--time-column", "ds", "--target-columns", "y"]
    args += ["--past-columns", "traffic", "--static-columns", statics, "--val-last", "10", "--out", str(tmp / name)]
    assert_ok(cli("prepare", *args))
    return tmp / name


def test_file_batches_carry_their_series_static_rows(tmp_path):
    folder = prepare(store_table(STORE_FACTS), tmp_path, "stores") / "train"
    source = SequenceFileDataset(folder)
    statics = source.statics
    assert [c["name"] for c in statics.columns] == ["kind", "size"]
    np.testing.assert_array_equal(statics.categories[:, 0], [i % 3 for i in range(12)])  # mall, outlet, street
    np.testing.assert_allclose(statics.values[:, 0], [0.5 + i / 12 for i in range(12)], rtol=1e-6)
    expect_rows(source.__getitems__([5, 0, 11]), statics, np.array([5, 0, 11]))
    windows = WindowDataset(source, window=8, horizon=2)
    picks = np.array([0, 30, 100, len(windows) - 1])
    expect_rows(windows.__getitems__(picks.tolist()), statics, windows.locate(picks)[0])
    expect_rows(context_at_end(source, np.array([2, 9]), 8), statics, np.array([2, 9]))


def test_the_initial_state_depends_on_the_statics():
    torch.manual_seed(0)
    model = GRUModel(2, 8, num_layers=2, bidirectional=True, static_categories=[3, 2], static_values=1).eval()
    x = torch.randn(4, 6, 2).expand(4, 6, 2)  # one sequence four times: only the statics differ
    codes, values = torch.tensor([[0, 0], [1, 0], [2, 1], [0, 0]]), torch.tensor([[1.0], [1.0], [1.0], [3.0]])
    with torch.no_grad():
        out, state = model(x, static_categories=codes, static_values=values)
        assert state.shape == (4, 4, 8)
        assert all((out[i] - out[0]).abs().max() > 1e-4 for i in (1, 2, 3))
        # What the encoder starts from is the static encoder's state, for every layer and direction.
        start = model.statics(codes, values)
        assert start.shape == (4, 4, 8)
        scaled, _, _ = model.scaler(x, None)
        torch.testing.assert_close(state, model.encoder(scaled, None, start)[1])
        # Code -1 (unseen) and a code outside the vocabulary both read the unseen row 0.
        unseen = model(x, static_categories=torch.tensor([[UNSEEN, 0]] * 4), static_values=values)[0]
        outside = model(x, static_categories=torch.tensor([[7, 0]] * 4), static_values=values)[0]
        torch.testing.assert_close(unseen, outside, rtol=0, atol=0)
        assert (unseen[0] - out[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"static_categories: this model reads 2 static column\(s\) \[batch, 2\]; none given"):
        model(x, static_values=values)
    stream = GRUModel(2, 8, static_values=1)
    with pytest.raises(ValueError, match="does not run in stream mode"):
        stream(x, state=stream.initial_state(4), static_values=values)
    assert model.config["static_categories"] == [3, 2] and model.config["static_values"] == 1


def test_a_model_without_statics_keeps_its_state_dict_keys_and_config():
    plain = GRUModel(3, 8, head="forecast", horizon=2)
    assert list(plain.state_dict()) == [
        "input_mean", "input_std", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0",
        "head.weight", "head.bias",
    ]
    assert plain.statics is None and not {"static_categories", "static_values"} & set(plain.config)
    with pytest.raises(ValueError, match="reads no static covariates"):
        plain(torch.randn(1, 4, 3), static_values=torch.ones(1, 1))
    with pytest.raises(ValueError, match=r"static_categories=\[0\]: expected a list of vocabulary sizes >= 1"):
        GRUModel(3, 8, static_categories=[0])


def test_alignment_remaps_categories_by_name(capsys):
    columns = [{"name": "kind", "kind": "category", "vocabulary": ["mall", "outlet", "street"]}, {"name": "size", "kind": "value"}]
    theirs = [{"name": "kind", "kind": "category", "vocabulary": ["kiosk", "outlet", "street"]}, {"name": "size", "kind": "value"}]
    data = Statics(theirs, np.array([[0], [1], [2], [1]]), np.ones((4, 1), dtype=np.float32))
    aligned = data.aligned(columns, "--data shops")
    np.testing.assert_array_equal(aligned.categories[:, 0], [UNSEEN, 1, 2, 1])
    assert aligned.columns == columns
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "--data shops: static categories the model never saw (kind: 1 series)" in err
    other = Statics([{"name": "region", "kind": "value"}], np.zeros((4, 0), dtype=np.int64), np.ones((4, 1), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"its static columns are region \(value\); the model reads kind \(category\), size \(value\)"):
        other.aligned(columns, "--data shops")


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory):
    """Stores trained with and without their type (step windows), and a forecast model on files."""
    root = tmp_path_factory.mktemp("stores")
    data = prepare(store_table(STORE_FACTS), root, "stores")
    forecast = ["data.name=files", f"data.train_path={data / 'train'}", f"data.val_path={data / 'val'}"]
    forecast += ["data.window=8", "data.horizon=2", "model.head=forecast", "model.hidden_size=16", "train.max_steps=20"]
    forecast += ["train.global_batch_size=16", "train.eval_every=20", "log.mode=disabled", "train.threads=1"]
    cmds = [[PY, "-m", "dist_gru", "train", *TRAIN, f"train.run_dir={root / name}", f"data.static_covariates={flag}"]
            for name, flag in (("with", "true"), ("without", "false"))]
    cmds.append([PY, "-m", "dist_gru", "train", *forecast, f"train.run_dir={root / 'forecast'}"])
    for result in run_all(cmds, timeout=600):
        assert_ok(result)
    return root


def final_eval(run_dir: Path) -> dict:
    return [line for line in read_metrics(run_dir) if "eval/mae" in line][-1]


def test_a_static_category_carries_the_level(store_runs):
    """A store's level is set by its type, which nothing in its steps reveals: the model that reads
    the statics predicts far better than the one that cannot."""
    with_statics, without = final_eval(store_runs / "with"), final_eval(store_runs / "without")
    print(f"\nstores MAE: {with_statics['eval/mae']:.4f} with statics, {without['eval/mae']:.4f} without")
    assert with_statics["eval/mae"] < 0.3 * without["eval/mae"]
    config = json.loads((store_runs / "with" / "model" / "config.json").read_text())
    assert config["static_categories"] == [3] and config["static_values"] == 1
    assert config["data"]["static"][0]["vocabulary"] == ["mall", "outlet", "street"]
    plain = json.loads((store_runs / "without" / "model" / "config.json").read_text())
    assert "static_categories" not in plain and "static" not in plain["data"]
    # The numeric column is standardised with the training series' statistics, saved as buffers.
    weights = load_weights(store_runs / "with" / "model" / "model.safetensors")
    mean, std = StoresDataset(256, 60, 1234).statics.value_moments()
    np.testing.assert_allclose(weights["statics.value_mean"].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(weights["statics.value_std"].numpy(), std, rtol=1e-6)
    assert 0.25 < float(std[0]) < 0.33  # U(0.5, 1.5): 1 / sqrt(12)


def test_forecast_remaps_a_folders_vocabulary_by_name(store_runs, tmp_path):
    """A folder prepared from a table without any mall has vocabulary [outlet, street]: its codes
    differ from the model's, and the forecasts of its stores are those of the full folder."""
    model = store_runs / "forecast" / "model"
    full = assert_ok(cli("forecast", "--model", str(model), "--data", str(store_runs / "stores" / "val"), "--out", str(tmp_path / "full.npy")))
    assert "warning" not in full.stderr
    table = store_table(STORE_FACTS)
    no_malls = table[table["kind"] != "mall"]
    folder = prepare(no_malls, tmp_path, "no_malls") / "val"
    assert SequenceFileDataset(folder).static[0]["vocabulary"] == ["outlet", "street"]
    assert_ok(cli("forecast", "--model", str(model), "--data", str(folder), "--out", str(tmp_path / "part.npy")))
    kept = [i for i, (kind, _) in enumerate(STORE_FACTS.values()) if kind != "mall"]
    np.testing.assert_allclose(np.load(tmp_path / "part.npy"), np.load(tmp_path / "full.npy")[kept], rtol=1e-6, atol=1e-6)
    kiosk = prepare(store_table({"k1": ("kiosk", 1.0), "s01": STORE_FACTS["s01"]}), tmp_path, "kiosk") / "val"
    result = assert_ok(cli("forecast", "--model", str(model), "--data", str(kiosk), "--out", str(tmp_path / "k.npy")))
    assert result.stderr.count("never saw") == 1 and "(kind: 1 series)" in result.stderr
    other = prepare(table, tmp_path, "sizes_only", statics="size") / "val"
    out = tmp_path / "refused.npy"
    assert_refused(
        cli("forecast", "--model", str(model), "--data", str(other), "--out", str(out)),
        f"--data {other}: its static columns are size (value); the model reads kind (category), size (value)",
    )
    assert not out.exists()
    export = cli("export", "--model", str(model), "--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--stateful")
    assert_refused(export, "--stateful with static covariates")
    exported = assert_ok(cli("export", "--model", str(model), "--format", "torchscript", "--out", str(tmp_path / "m.pt")))
    assert json.loads(exported.stdout.splitlines()[-1])["max_difference"] <= 1e-5


def test_a_copied_model_folder_evaluates_as_the_run_does(store_runs, tmp_path):
    copied = tmp_path / "elsewhere" / "model"
    shutil.copytree(store_runs / "with" / "model", copied)
    original = assert_ok(cli("evaluate", "--model", str(store_runs / "with" / "model"), "--data", "stores"))
    elsewhere = assert_ok(cli("evaluate", "--model", str(copied), "--data", "stores"))
    assert original.stdout.splitlines()[-1] == elsewhere.stdout.splitlines()[-1]
    assert json.loads(elsewhere.stdout.splitlines()[-1])["mae"] == pytest.approx(final_eval(store_runs / "with")["eval/mae"])
    refused = cli("evaluate", "--model", str(copied), "--data", "promo")
    assert_refused(refused, "--data promo: has no static columns; the model reads store_type (category), size (value)")
    # A model trained without the statics ignores those of the data it is given.
    without = assert_ok(cli("evaluate", "--model", str(store_runs / "without" / "model"), "--data", "stores"))
    assert json.loads(without.stdout.splitlines()[-1])["mae"] == pytest.approx(final_eval(store_runs / "without")["eval/mae"])
    data = store_runs / "stores" / "val"
    forecast = store_runs / "forecast" / "model"
    copied = tmp_path / "forecast" / "model"
    shutil.copytree(forecast, copied)
    results = [assert_ok(cli("evaluate", "--model", str(m), "--data", str(data))).stdout.splitlines()[-1] for m in (forecast, copied)]
    assert results[0] == results[1]
    assert json.loads(results[0])["mae"] == pytest.approx(final_eval(store_runs / "forecast")["eval/mae"])


def test_two_processes_train_like_one_with_statics(tmp_path):
    args = [*TINY, *STORES, "model.head=step", "data.train_size=64", "data.val_size=16", "train.max_steps=12"]
    args += ["log.mode=disabled", "train.eval_every=12"]
    weights = one_and_two_processes(tmp_path, *args)
    assert "statics.project.weight" in weights[0]
    diff = max_abs_diff(*weights)
    print(f"\nstatic covariates, 12 steps: max |w(1 proc) - w(2 procs)| = {diff:.3g}")
    assert diff <= 1e-5
    evals = [final_eval(tmp_path / run) for run in ("one", "two")]
    assert abs(evals[0]["eval/mae"] - evals[1]["eval/mae"]) <= 1e-6


def test_stream_mode_refuses_static_columns(tmp_path):
    folder = prepare(store_table(STORE_FACTS), tmp_path, "stores")
    args = ["data.name=files", f"data.train_path={folder / 'train'}", "train.tbptt=5", "data.targets=dataset"]
    args += ["model.head=step", "train.global_batch_size=4", "train.max_steps=2", "log.mode=disabled"]
    refused = cli("train", *args, f"train.run_dir={tmp_path / 'run'}")
    assert_refused(refused, "stream mode (train.tbptt) cannot read", "set data.static_covariates=false")
    assert not (tmp_path / "run").exists()


EXPORTED = {
    "bidirectional-categories-values": {"bidirectional": True, "static_categories": [3, 2], "static_values": 2},
    "seed-values": {"cell": "seed", "static_values": 1, "head": "forecast", "horizon": 2},
    "categories": {"static_categories": [4], "head": "step"},
}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("case", list(EXPORTED))
def test_export_takes_the_static_inputs(tmp_path, case, fmt):
    """The exported graph takes the static inputs after x and lengths and computes what the model
    does, an unseen code (-1) included."""
    pytest.importorskip("onnxruntime")
    from dist_gru.infer import export

    torch.manual_seed(0)
    model = GRUModel(3, 8, num_layers=2, **EXPORTED[case])
    if model.static_values:
        model.statics.set_normalization(torch.full((model.static_values,), 2.0), torch.full((model.static_values,), 0.5))
    model.save_pretrained(tmp_path / "model")
    model = GRUModel.from_pretrained(tmp_path / "model")
    out = tmp_path / f"graph.{fmt}"
    meta = export.write_export(tmp_path / "model", fmt, out, export.DEFAULT_OPSET, stateful=False)
    names = [name for name in ("static_categories", "static_values") if name in model.config]
    assert list(meta["inputs"]) == ["x", "lengths", *names]
    assert export.verify(out, fmt, model, stateful=False) <= export.TOLERANCE
    x, lengths, _ = export.random_batch(model, 4, 7, torch.Generator().manual_seed(3))
    statics = {}
    if "static_categories" in names:
        statics["static_categories"] = torch.tensor([[UNSEEN] * len(model.static_categories), *[[0] * len(model.static_categories)] * 3])
    if "static_values" in names:
        statics["static_values"] = torch.linspace(0, 3, 4 * model.static_values).reshape(4, -1)
    (got,) = export.load_runner(out, fmt)(x.numpy(), lengths.numpy(), *(t.numpy() for t in statics.values()))
    with torch.no_grad():
        want = model(x, lengths, **statics)[0].numpy()
    valid = np.arange(7)[None, :] < lengths.numpy()[:, None]
    got, want = (got[valid], want[valid]) if model.head_kind == "step" else (got, want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_fine_tuning_standardises_the_static_values_with_its_own_data(store_runs, tmp_path):
    """Fine-tuning loads the GRU and head only: the static encoder starts afresh, its numeric
    columns standardised with the new job's training series."""
    args = [*TRAIN, "data.train_size=64", "data.seed=7", "train.max_steps=2", "train.eval_every=2"]
    assert_ok(cli("train", *args, f"train.init_from={store_runs / 'with' / 'model'}", f"train.run_dir={tmp_path / 'tuned'}"))
    weights = load_weights(tmp_path / "tuned" / "model" / "model.safetensors")
    mean, std = StoresDataset(64, 60, 7).statics.value_moments()
    np.testing.assert_allclose(weights["statics.value_mean"].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(weights["statics.value_std"].numpy(), std, rtol=1e-6)
