"""Unit tests for dist_gru.model: both GRU variants against their written equations.

Run: PYTHONPATH=. .venv/bin/pytest tests/test_model.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.hub_mixin
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from dist_gru.model import GRUModel, SeedGRU, SeedGRUCell

SEED_PARAMS = {
    "W_r": "hi",
    "W_z": "hi",
    "W_h": "hi",
    "U_r": "hh",
    "U_z": "hh",
    "U_h": "hh",
    "b_r": "h",
    "b_z": "h",
    "b_h": "h",
}


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


# --- references written straight from the equations: plain ops, one matmul a term ---


def seed_reference_step(cell: SeedGRUCell, x: Tensor, h: Tensor) -> Tensor:
    """The seed document's four equations."""
    r = torch.sigmoid(x @ cell.W_r.T + h @ cell.U_r.T + cell.b_r)
    z = torch.sigmoid(x @ cell.W_z.T + h @ cell.U_z.T + cell.b_z)
    candidate = torch.tanh(x @ cell.W_h.T + (r * h) @ cell.U_h.T + cell.b_h)
    return (1 - z) * h + z * candidate


def seed_reference(rnn: SeedGRU, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The seed equations over time and layers, batch first."""
    layer_input = x
    last = []
    for index, cell in enumerate(rnn.cells):
        h = torch.zeros(x.shape[0], rnn.hidden_size) if h0 is None else h0[index]
        outputs = []
        for t in range(x.shape[1]):
            h = seed_reference_step(cell, layer_input[:, t], h)
            outputs.append(h)
        layer_input = torch.stack(outputs, dim=1)
        last.append(h)
    return layer_input, torch.stack(last)


def torch_gru_reference(gru: torch.nn.GRU, x: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch's documented GRU equations, weight_ih_l{k} etc. split into (r, z, n)."""
    layer_input = x
    last = []
    for layer in range(gru.num_layers):
        w_ir, w_iz, w_in = getattr(gru, f"weight_ih_l{layer}").chunk(3)
        w_hr, w_hz, w_hn = getattr(gru, f"weight_hh_l{layer}").chunk(3)
        b_ir, b_iz, b_in = getattr(gru, f"bias_ih_l{layer}").chunk(3)
        b_hr, b_hz, b_hn = getattr(gru, f"bias_hh_l{layer}").chunk(3)
        h = torch.zeros(x.shape[0], gru.hidden_size)
        outputs = []
        for t in range(x.shape[1]):
            xt = layer_input[:, t]
            r = torch.sigmoid(xt @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
            z = torch.sigmoid(xt @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
            n = torch.tanh(xt @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
            h = (1 - z) * n + z * h
            outputs.append(h)
        layer_input = torch.stack(outputs, dim=1)
        last.append(h)
    return layer_input, torch.stack(last)


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


# --- SeedGRUCell / SeedGRU -------------------------------------------------------


def test_seed_cell_parameters_named_and_shaped_after_the_equations() -> None:
    cell = SeedGRUCell(input_size=5, hidden_size=7)
    sizes = {"h": 7, "i": 5}
    expected = {name: tuple(sizes[c] for c in dims) for name, dims in SEED_PARAMS.items()}
    assert {name: tuple(p.shape) for name, p in cell.named_parameters()} == expected
    bound = 1 / 7**0.5
    assert all(p.abs().max() <= bound for p in cell.parameters())


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_seed_cell_matches_the_four_equations(batch: int) -> None:
    cell = SeedGRUCell(5, 7)
    x, h = torch.randn(batch, 5), torch.randn(batch, 7)
    expected = seed_reference_step(cell, x, h)
    assert max_diff(cell(x, h), expected) < 1e-6
    # step() on the batched projection is the same math as forward().
    xproj = cell.input_projection(x[:, None])[:, 0]
    assert xproj.shape == (batch, 21)
    assert max_diff(cell.step(xproj, h), expected) < 1e-6


@pytest.mark.parametrize("batch", [1, 4])
def test_seed_gru_matches_reference_over_time_and_layers(batch: int) -> None:
    rnn = SeedGRU(5, 7, num_layers=2)
    x = torch.randn(batch, 9, 5)
    h0 = torch.randn(2, batch, 7)
    out, h_n = rnn(x)
    ref_out, ref_h = seed_reference(rnn, x)
    assert out.shape == (batch, 9, 7) and h_n.shape == (2, batch, 7)
    assert max_diff(out, ref_out) < 1e-6
    assert max_diff(h_n, ref_h) < 1e-6
    out, h_n = rnn(x, h0)
    ref_out, ref_h = seed_reference(rnn, x, h0)
    assert max_diff(out, ref_out) < 1e-6
    assert max_diff(h_n, ref_h) < 1e-6


def test_seed_gru_gradients_reach_all_nine_parameters_of_every_layer() -> None:
    rnn = SeedGRU(4, 6, num_layers=2)
    out, h_n = rnn(torch.randn(3, 5, 4), lengths=torch.tensor([5, 2, 4]))
    (out.square().sum() + h_n.sum()).backward()
    for index, cell in enumerate(rnn.cells):
        for name, param in cell.named_parameters():
            assert param.grad is not None, f"layer {index} {name}: no gradient"
            assert param.grad.abs().sum() > 0, f"layer {index} {name}: zero gradient"
    assert {name for name, _ in rnn.cells[1].named_parameters()} == set(SEED_PARAMS)


# --- nn.GRU inside GRUModel -------------------------------------------------------


def test_torch_cell_matches_pytorch_documented_equations_through_the_head() -> None:
    model = GRUModel(4, hidden_size=6, num_layers=2, cell="torch", output_size=3)
    model.eval()
    x = torch.randn(5, 8, 4)
    out, h_n = model.encoder.rnn(x)
    ref_out, ref_h = torch_gru_reference(model.encoder.rnn, x)
    assert max_diff(out, ref_out) < 1e-6
    assert max_diff(h_n, ref_h) < 1e-6
    expected = ref_h[-1] @ model.head.weight.T + model.head.bias
    assert max_diff(model(x)[0], expected) < 1e-6


# --- the two variants: same parametrisation, different candidate -----------------


def seed_from_torch(gru: torch.nn.GRU) -> SeedGRU:
    """A SeedGRU with gru's gates; seed z is torch's 1 - z, so z terms are negated."""
    seed = SeedGRU(gru.input_size, gru.hidden_size, gru.num_layers)
    with torch.no_grad():
        for layer, cell in enumerate(seed.cells):
            w_ir, w_iz, w_in = getattr(gru, f"weight_ih_l{layer}").chunk(3)
            w_hr, w_hz, w_hn = getattr(gru, f"weight_hh_l{layer}").chunk(3)
            b_ir, b_iz, b_in = getattr(gru, f"bias_ih_l{layer}").chunk(3)
            b_hr, b_hz, b_hn = getattr(gru, f"bias_hh_l{layer}").chunk(3)
            cell.W_r.copy_(w_ir)
            cell.U_r.copy_(w_hr)
            cell.b_r.copy_(b_ir + b_hr)
            cell.W_z.copy_(-w_iz)
            cell.U_z.copy_(-w_hz)
            cell.b_z.copy_(-(b_iz + b_hz))
            cell.W_h.copy_(w_in)
            cell.U_h.copy_(w_hn)
            cell.b_h.copy_(b_in + b_hn)
    return seed


def test_seed_and_torch_differ_only_through_the_reset_placement() -> None:
    gru = torch.nn.GRU(4, 6, num_layers=2, batch_first=True)
    x = torch.randn(3, 10, 4)

    # General weights: reset before vs after the recurrent product: different functions.
    out_torch, h_torch = gru(x)
    out_seed, h_seed = seed_from_torch(gru)(x)
    assert max_diff(h_torch, h_seed) > 1e-3

    # With W_hn = 0 and b_hn = 0 the reset gate has nothing to act on in either form,
    # and the mapping (including z -> 1 - z) makes them equal.
    with torch.no_grad():
        for layer in range(2):
            getattr(gru, f"weight_hh_l{layer}")[12:].zero_()
            getattr(gru, f"bias_hh_l{layer}")[12:].zero_()
    out_torch, h_torch = gru(x)
    out_seed, h_seed = seed_from_torch(gru)(x)
    assert max_diff(out_torch, out_seed) < 1e-6
    assert max_diff(h_torch, h_seed) < 1e-6


# --- variable lengths -------------------------------------------------------------


@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_padded_batch_equals_each_sequence_run_alone(cell: str) -> None:
    model = GRUModel(3, hidden_size=8, num_layers=2, cell=cell, output_size=2)
    model.eval()
    model.set_normalization(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.0]))
    steps = 7
    lengths = torch.tensor([3, 7, 1, 5])  # unsorted, with length 1 and the full length
    x = torch.randn(4, steps, 3)
    for i, length in enumerate(lengths.tolist()):
        x[i, length:] = 1e3  # loud padding: any leak shows
    batched, _ = model(x, lengths)
    alone = torch.cat([model(x[i : i + 1, :length])[0] for i, length in enumerate(lengths.tolist())])
    assert max_diff(batched, alone) < 1e-6
    # All lengths equal T: the unpacked path, same result as no lengths.
    full = torch.full((4,), steps)
    assert max_diff(model(x, full)[0], model(x)[0]) == 0


def test_seed_gru_padded_outputs_are_zero_and_valid_outputs_match() -> None:
    rnn = SeedGRU(3, 5, num_layers=2)
    lengths = torch.tensor([2, 6, 1])
    x = torch.randn(3, 6, 3)
    out, h_n = rnn(x, lengths=lengths)
    for i, length in enumerate(lengths.tolist()):
        alone_out, alone_h = rnn(x[i : i + 1, :length])
        assert max_diff(out[i, :length], alone_out[0]) < 1e-6
        assert max_diff(h_n[:, i], alone_h[:, 0]) < 1e-6
        assert out[i, length:].abs().sum() == 0


def test_bad_lengths_are_rejected() -> None:
    model = GRUModel(3, hidden_size=4)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        model(x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        model(x, torch.tensor([6, 5]))
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.tensor([5, 5, 5]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 5, 4))


# --- GRUModel: heads, arguments, dtype, normalisation, saving ----------------------


@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_classification_outputs_one_logit_per_class(cell: str) -> None:
    model = GRUModel(3, hidden_size=8, task="classification", output_size=5, cell=cell)
    assert model(torch.randn(4, 6, 3))[0].shape == (4, 5)
    assert GRUModel(3, hidden_size=8, output_size=2, cell=cell)(torch.randn(4, 6, 3))[0].shape == (4, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "ranking"}, r"task='ranking'.*regression, classification"),
        ({"cell": "lstm"}, r"cell='lstm'.*torch, seed"),
        ({"dropout": 1.5}, r"dropout=1.5"),
        ({"hidden_size": 0}, r"hidden_size=0"),
        ({"task": "classification", "output_size": 1}, r"output_size=1.*>= 2"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GRUModel(3, **kwargs)


def test_all_bad_arguments_reported_at_once() -> None:
    with pytest.raises(ValueError, match=r"task='x'.*cell='y'"):
        GRUModel(3, task="x", cell="y")


def test_numpy_integers_are_accepted_and_saved_as_plain_ints(tmp_path) -> None:
    # An array's shape gives numpy ints; the hub mixin would silently drop them from
    # config.json, and from_pretrained would then fail for want of input_size.
    model = GRUModel(np.int64(3), hidden_size=np.int32(4), output_size=np.int64(2))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["input_size"], config["hidden_size"], config["output_size"]) == (
        3,
        4,
        2,
    )
    assert GRUModel.from_pretrained(tmp_path).input_size == 3


@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_bf16_model_runs_on_bf16_input(cell: str) -> None:
    # h_0 follows the input (the seed example's CPU fp32 h_0 would fail here).
    model = GRUModel(3, hidden_size=8, num_layers=2, cell=cell).to(torch.bfloat16)
    x = torch.randn(4, 6, 3, dtype=torch.bfloat16)
    assert model(x)[0].dtype == torch.bfloat16
    assert model(x, torch.tensor([6, 2, 1, 4]))[0].dtype == torch.bfloat16


def test_normalization_is_applied_inside_the_model() -> None:
    model = GRUModel(2, hidden_size=4, cell="seed")
    x = torch.randn(3, 5, 2)
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    model.set_normalization(mean, std)
    assert model.scaler.input_std.tolist() == pytest.approx([3.0, 1e-6])
    reference = GRUModel(2, hidden_size=4, cell="seed")
    reference.load_state_dict(model.state_dict())
    reference.set_normalization(torch.zeros(2), torch.ones(2))
    expected, _ = reference((x - mean) / model.scaler.input_std)
    assert max_diff(model(x)[0], expected) < 1e-6
    with pytest.raises(ValueError, match="input_size=2"):
        model.set_normalization(torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_save_and_load_round_trip_offline(cell: str, tmp_path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("from_pretrained on a local directory tried to download")

    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", no_network)
    kwargs = {
        "input_size": 3,
        "hidden_size": 8,
        "num_layers": 2,
        "dropout": 0.1,
        "task": "classification",
        "output_size": 4,
        "cell": cell,
    }
    model = GRUModel(**kwargs)
    model.set_normalization([0.5, 1.0, -1.0], [2.0, 3.0, 0.25])
    model.eval()
    model.save_pretrained(tmp_path / "model")

    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == kwargs

    loaded = GRUModel.from_pretrained(tmp_path / "model")
    assert not loaded.training
    assert loaded.scaler.input_mean.tolist() == [0.5, 1.0, -1.0]
    assert loaded.scaler.input_std.tolist() == [2.0, 3.0, 0.25]
    x, lengths = torch.randn(3, 6, 3), torch.tensor([6, 1, 4])
    assert torch.equal(loaded(x, lengths)[0], model(x, lengths)[0])


def test_load_rejects_weights_of_a_different_model(tmp_path) -> None:
    GRUModel(3, hidden_size=8, cell="seed").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "cell": "torch"}))
    # The mixin's default strict=False would keep random nn.GRU weights without a word.
    with pytest.raises(RuntimeError):
        GRUModel.from_pretrained(tmp_path)


def test_flatten_parameters_and_parameter_count() -> None:
    for cell in ("torch", "seed"):
        model = GRUModel(3, hidden_size=8, num_layers=2, cell=cell, output_size=2)
        model.flatten_parameters()
        gru_params = 3 * (8 * 3 + 8 * 8) + 3 * (8 * 8 + 8 * 8)
        biases = {"torch": 2 * 2 * 3 * 8, "seed": 2 * 3 * 8}[cell]
        assert model.num_parameters == gru_params + biases + 8 * 2 + 2


# --- model folders saved by earlier releases ------------------------------------------------

SAVED_V1 = Path(__file__).parent / "data" / "models_v1"


@pytest.mark.parametrize("name", sorted(p.name for p in SAVED_V1.iterdir()))
def test_a_model_folder_saved_by_the_flat_module_release_loads_and_gives_its_outputs(name: str, tmp_path) -> None:
    """Folders written before the model became a package (config.json, model.safetensors with the keys
    rnn.*, head.*, input_mean, input_std, embedding.*) load strictly and compute what they did then;
    saving one again writes the same keys and config."""
    folder = SAVED_V1 / name
    model = GRUModel.from_pretrained(folder)
    io = load_file(folder / "io.safetensors")
    with torch.no_grad():
        out, _ = model(io["x"], io["lengths"])
    assert (out - io["output"]).abs().max().item() < 1e-6
    model.save_pretrained(tmp_path / "again")
    saved, again = load_file(folder / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(again) == sorted(saved)
    assert all(torch.equal(again[key], saved[key]) for key in saved)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    assert sorted(model.state_dict()) == sorted(saved)
    # An optimizer's saved state is indexed by parameter position: the order is still embedding, rnn, head.
    named = model.state_dict(keep_vars=True)
    in_parameter_order = [next(key for key, t in named.items() if t is p) for p in model.parameters()]
    assert in_parameter_order == [key for key in named if key not in ("input_mean", "input_std")]
    assert in_parameter_order[-2:] == ["head.weight", "head.bias"] and in_parameter_order[0] != "head.weight"


# --- the forward contract and the encoder's execution paths -------------------------------------


def autograd_nodes(out: Tensor) -> set[str]:
    """Names of every node in ``out``'s backward graph."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("cell", ["torch", "seed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize(
    ("head", "output", "trailing"),
    [("last", "point", (2,)), ("step", "gaussian", (7, 2, 2)), ("forecast", "quantile", (3, 2, 3))],
)
def test_forward_returns_outputs_and_each_sequences_final_state(cell, bidirectional, head, output, trailing) -> None:
    """(out, state) for every head: state [layers * directions, B, H] holds each sequence's state after
    its last valid step (backward: after step 0), what the sequence gives alone, on every path."""
    extra = {"horizon": 3} if head == "forecast" else {}
    model = GRUModel(3, 5, num_layers=2, cell=cell, bidirectional=bidirectional, head=head, output=output,
                     output_size=2, quantiles=[0.1, 0.5, 0.9], **extra)
    x, lengths = torch.randn(4, 7, 3), torch.tensor([7, 3, 1, 5])
    for training in (False, True):  # inference paths, then the training ones
        model.train(training)
        out, state = model(x, lengths)
        assert out.shape == (4, *trailing)
        assert state.shape == (2 * (2 if bidirectional else 1), 4, 5)
        for i, length in enumerate(lengths.tolist()):
            _, alone = model(x[i : i + 1, :length])
            assert max_diff(state[:, i], alone[:, 0]) < 1e-6


@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_a_state_given_to_forward_continues_each_sequence(cell: str) -> None:
    model = GRUModel(3, 5, num_layers=2, cell=cell, head="step").eval()
    x, lengths = torch.randn(3, 9, 3), torch.tensor([9, 6, 5])
    whole, state_whole = model(x, lengths)
    first, state = model(x[:, :4])
    second, state = model(x[:, 4:], lengths - 4, state)
    assert max_diff(torch.cat([first, second], dim=1)[0], whole[0]) < 1e-6
    assert max_diff(state, state_whole) < 1e-6


@pytest.mark.parametrize(
    ("cell", "device_settings", "training", "padded", "expected"),
    [
        ("seed", {}, True, True, "seed"),
        ("seed", {"packed": True}, False, True, "seed"),
        ("torch", {}, True, False, "fused"),
        ("torch", {}, True, True, "fused"),
        ("torch", {}, False, False, "native"),
        ("torch", {}, False, True, "padded"),
        ("torch", {"recurrence": "native"}, True, False, "native"),
        ("torch", {"recurrence": "native"}, True, True, "padded"),
        ("torch", {"packed": True}, True, True, "packed"),
        ("torch", {"packed": True}, False, False, "native"),
    ],
)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_the_encoder_picks_its_path_from_the_cell_the_settings_grad_mode_and_padding(
    cell, device_settings, training, padded, expected, bidirectional
) -> None:
    encoder = GRUModel(3, 4, cell=cell, bidirectional=bidirectional).encoder
    encoder.configure(**device_settings)
    x, lengths = torch.randn(2, 5, 3), (torch.tensor([5, 2]) if padded else None)
    with torch.set_grad_enabled(training):
        assert encoder.path(x, lengths) == expected


def test_a_traced_graph_holds_the_native_gru_even_in_training() -> None:
    model = GRUModel(3, 4, bidirectional=True, head="step")
    seen = []

    def probe(x: Tensor) -> Tensor:
        seen.append(model.encoder.path(x, None))
        return x

    torch.jit.trace(probe, torch.randn(2, 5, 3), check_trace=False)
    assert seen == ["native"]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_cpu_training_runs_the_fused_recurrence_for_each_direction_padded_or_not(bidirectional: bool) -> None:
    """Both directions of an unpadded bidirectional batch train through the fused recurrence, not
    nn.GRU's slow CPU backward; recurrence="native" keeps nn.GRU's op."""
    model = GRUModel(3, 4, num_layers=2, bidirectional=bidirectional, head="step")
    x = torch.randn(2, 5, 3)
    for lengths in (None, torch.tensor([5, 3])):
        assert "_RecurrenceBackward" in autograd_nodes(model(x, lengths)[0])
        model.encoder.configure(recurrence="native")
        assert "_RecurrenceBackward" not in autograd_nodes(model(x, lengths)[0])
        model.encoder.configure()


def test_encoder_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="recurrence='cuda': expected one of fused, native"):
        GRUModel(3, 4).encoder.configure(recurrence="cuda")
