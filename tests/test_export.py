"""`dist-gru export`: ONNX (onnxruntime) and TorchScript (torch.jit.load) equal the PyTorch model.

Run: PYTHONPATH=. .venv/bin/pytest tests/test_export.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_gru.cli import main as cli_main
from dist_gru.infer import export
from dist_gru.model import GRUModel

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small graphs: on a shared machine, idle OpenMP threads spinning cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_model(folder: Path, **kwargs) -> GRUModel:
    torch.manual_seed(0)
    args = {"input_size": 3, "hidden_size": 8, "num_layers": 2, "output_size": 2, "scaling": "global", **kwargs}
    if args.get("head") == "forecast":
        args.setdefault("horizon", 3)
    model = GRUModel(**args)
    model.set_normalization(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 1.5]))
    if args["scaling"] == "revin":  # a learned affine away from its identity start, as after training
        with torch.no_grad():
            model.scaler.revin_raw_weight.copy_(torch.tensor([1.5, -2.0, 0.3]))
            model.scaler.revin_bias.copy_(torch.tensor([0.4, -0.7, 1.1]))
    if args.get("naive_season"):  # naive terms away from their zero start, as after training
        with torch.no_grad():
            for weights in model.head.naive.parameters():
                weights.normal_()
    model.save_pretrained(folder)
    return GRUModel.from_pretrained(folder)


CASES = {
    "last": {"head": "last"},
    "last-classification": {"head": "last", "task": "classification", "num_layers": 1, "output_size": 3},
    "step-quantile": {"head": "step", "output": "quantile"},
    "forecast-gaussian-window": {"head": "forecast", "output": "gaussian", "scaling": "window"},
    "bidirectional-step-window": {"head": "step", "bidirectional": True, "scaling": "window"},
    "forecast-quantile-last": {"head": "forecast", "output": "quantile", "scaling": "last"},
    "forecast-naive-terms-last": {"head": "forecast", "scaling": "last", "naive_season": 4},
    "forecast-gaussian-robust": {"head": "forecast", "output": "gaussian", "scaling": "robust"},
    "forecast-point-revin": {"head": "forecast", "scaling": "revin"},
    "forecast-quantile-revin": {"head": "forecast", "output": "quantile", "scaling": "revin"},
    "bidirectional-last": {"head": "last", "bidirectional": True, "output": "quantile"},
}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("cell", ["torch", "seed"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_equals_pytorch(tmp_path: Path, case: str, cell: str, fmt: str) -> None:
    model = save_model(tmp_path / "model", cell=cell, **CASES[case])
    out = tmp_path / f"graph.{fmt}"
    export.write_export(tmp_path / "model", fmt, out, export.DEFAULT_OPSET, stateful=False)
    assert export.verify(out, fmt, model, stateful=False) <= export.TOLERANCE

    meta = export.read_metadata(out, fmt)
    assert meta["model_config"] == json.loads((tmp_path / "model" / "config.json").read_text())
    assert list(meta["inputs"]) == ["x", "lengths"] and list(meta["outputs"]) == ["output"]
    x, lengths, _ = export.random_batch(model, 5, 11, torch.Generator().manual_seed(3))
    (got,) = export.load_runner(out, fmt)(x.numpy(), lengths.numpy())
    declared = meta["outputs"]["output"]
    assert len(got.shape) == len(declared)
    assert all(d == n for d, n in zip(declared, got.shape, strict=True) if isinstance(d, int))
    if fmt == "onnx":
        graph = onnx.load(str(out)).graph
        grus = [node for node in graph.node if node.op_type == "GRU"]
        assert len(grus) == model.num_layers
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in grus[0].attribute}
        assert attrs["linear_before_reset"] == (1 if cell == "torch" else 0)
        assert attrs["direction"] == (b"bidirectional" if model.bidirectional else b"forward")
        assert grus[0].input[4]  # sequence_lens is wired, not left empty
        dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", "time", 3]


def test_a_wrong_graph_is_caught(tmp_path: Path) -> None:
    """The check can fail: another model's weights differ by far more than the tolerance."""
    save_model(tmp_path / "model", head="last")
    export.write_export(tmp_path / "model", "onnx", tmp_path / "g.onnx", export.DEFAULT_OPSET, stateful=False)
    torch.manual_seed(1)
    other = GRUModel(3, 8, num_layers=2, output_size=2, scaling="global").eval()
    assert export.verify(tmp_path / "g.onnx", "onnx", other, stateful=False) > 1e-2


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_stateful_graph_streams_like_the_model(tmp_path: Path, cell: str, fmt: str) -> None:
    model = save_model(tmp_path / "model", cell=cell, head="forecast", output="quantile")
    out = tmp_path / f"step.{fmt}"
    meta = export.write_export(tmp_path / "model", fmt, out, export.DEFAULT_OPSET, stateful=True)
    assert list(meta["inputs"]) == ["x", "lengths", "state"] and list(meta["outputs"]) == ["output", "state_out"]
    assert export.verify(out, fmt, model, stateful=True) <= export.TOLERANCE
    # A live feed through the file, a sample at a time: the state out feeds the next call.
    runner = export.load_runner(out, fmt)
    x, _, _ = export.random_batch(model, 2, 12, torch.Generator().manual_seed(4))
    state = model.initial_state(2).numpy()
    for t in range(12):
        got, state = runner(x[:, t : t + 1].numpy(), np.ones(2, dtype=np.int64), state)
    with torch.no_grad():
        want = model(x)[0].numpy()
    assert float(np.abs(got - want).max()) <= export.TOLERANCE


def test_cli_exports_checks_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_model(tmp_path / "model", cell="seed", head="step")
    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--out", str(out),
                     "--opset", "20"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["path"] == str(out) and report["format"] == "onnx" and report["opset"] == 20
    assert 0 <= report["max_difference"] <= export.TOLERANCE
    assert onnx.load(str(out)).opset_import[0].version == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.onnx"]  # no temporary left


@pytest.mark.parametrize(
    "model_kwargs,args,message",
    [
        (None, ["--format", "onnx"], "not a folder; expected a saved model folder"),
        ({}, ["--format", "onnx", "--opset", "9"], "--opset 9: unsupported; expected an ONNX opset in 14..20"),
        ({}, ["--format", "onnx", "--opset", "21"], "--opset 21: unsupported; expected an ONNX opset in 14..20"),
        ({}, ["--format", "torchscript", "--opset", "17"], "--opset 17: applies to --format onnx only"),
        ({}, ["--format", "tflite"], "--format tflite: expected one of onnx, torchscript"),
        ({"bidirectional": True}, ["--format", "onnx", "--stateful"], "--stateful with a bidirectional model"),
        ({"scaling": "window"}, ["--format", "torchscript", "--stateful"], "--stateful with data.scaling=window"),
        ({"scaling": "robust"}, ["--format", "onnx", "--stateful"], "--stateful with data.scaling=robust: per-window"),
        (
            {"head": "forecast", "naive_season": 2},
            ["--format", "onnx", "--stateful"],
            "--stateful with naive terms (model.naive_terms): they read the whole context",
        ),
    ],
)
def test_bad_input_is_one_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, model_kwargs: dict | None, args: list[str], message: str
) -> None:
    folder = tmp_path / "model"
    if model_kwargs is not None:
        save_model(folder, **model_kwargs)
    before = sorted(tmp_path.rglob("*"))
    code = cli_main(["export", "--model", str(folder), "--out", str(tmp_path / "out.file"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("files", [{}, {"config.json": "{not json", "model.safetensors": "x"},
                                   {"config.json": "{}", "model.safetensors": "not safetensors"}])
def test_a_folder_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture, files: dict) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    before = sorted(tmp_path.rglob("*"))
    code = cli_main(["export", "--model", str(folder), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --model {folder}: "), err
    assert err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_bench_inference_reports_the_three_runtimes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_model(tmp_path / "model", cell="seed", head="last")
    args = ["bench", "--inference", "--model", str(tmp_path / "model"), "--length", "6", "--batch-size", "4",
            "--rounds", "1", "--latency-calls", "2", "--throughput-calls", "1"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["length"] == 6 and report["batch_size"] == 4 and report["cell"] == "seed"
    for runtime in ("eager", "torchscript", "onnxruntime"):
        assert report[runtime]["latency_ms"] > 0 and report[runtime]["throughput_seq_per_s"] > 0
        assert report[runtime]["max_difference"] <= export.TOLERANCE
        assert out.count(f"\n{runtime} ") == 1  # one row of the table each
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the exports lived in a temporary folder


@pytest.mark.parametrize(
    "args,message",
    [(["--inference"], "--inference needs --model RUN/model"),
     (["--inference", "--model", "m", "--length", "0"], "--length 0: expected an integer >= 1")],
)
def test_bench_inference_bad_options(capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    assert cli_main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid bench options:") and message in err, err
