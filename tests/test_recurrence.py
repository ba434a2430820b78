"""The CPU training recurrence (dist_gru.model.recurrence) against nn.GRU and autograd's own gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_gru.model import GRUModel
from dist_gru.model.recurrence import gru_direction, gru_layers, gru_recurrences


def _grads(fn, inputs, params, seed=1):
    """Outputs and gradients of a random linear function of `fn`'s outputs (out and h_n)."""
    out, h_n = fn()
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    w_h = torch.randn(h_n.shape, generator=gen, dtype=h_n.dtype)
    loss = (out * w_out).sum() + (h_n * w_h).sum()
    return out, h_n, torch.autograd.grad(loss, [*inputs, *params])


@pytest.mark.parametrize("directions", [1, 2])
def test_gradcheck_of_one_layer_in_double(directions):
    gen = torch.Generator().manual_seed(0)
    args = [
        torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        for shape in ((5, directions, 3, 12), (directions, 3, 4), (directions, 12, 4), (directions, 12))
    ]
    assert torch.autograd.gradcheck(gru_recurrences, args)


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("with_state", [False, True])
def test_layers_equal_nn_gru_in_double(layers, with_state):
    torch.manual_seed(0)
    rnn = nn.GRU(5, 7, layers, batch_first=True).double()
    x = torch.randn(4, 9, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, 4, 7, dtype=torch.float64, requires_grad=True) if with_state else None
    inputs = [x] + ([h0] if with_state else [])
    ref = _grads(lambda: rnn(x, h0), inputs, list(rnn.parameters()))
    ours = _grads(lambda: gru_layers(rnn, x, h0), inputs, list(rnn.parameters()))
    for a, b in zip([ref[0], ref[1], *ref[2]], [ours[0], ours[1], *ours[2]], strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-12


def test_float32_training_step_matches_nn_gru_to_rounding():
    torch.manual_seed(0)
    rnn = nn.GRU(32, 128, 2, batch_first=True)
    x = torch.randn(64, 100, 32)
    ref = _grads(lambda: rnn(x), [], list(rnn.parameters()))
    ours = _grads(lambda: gru_layers(rnn, x), [], list(rnn.parameters()))
    assert (ref[0] - ours[0]).abs().max().item() < 1e-5
    for a, b in zip(ref[2], ours[2], strict=True):
        assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()


def test_single_direction_equals_one_layer_gru():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 6, 1, batch_first=True).double()
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    h0 = torch.randn(2, 6, dtype=torch.float64)
    weights = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    expected, _ = rnn(x, h0.unsqueeze(0))
    assert (gru_direction(x, h0, *weights) - expected).abs().max().item() < 1e-12


def test_dropout_between_layers_only_in_training_mode():
    # Not nn.GRU's mask (it draws inside its kernel): in eval mode the results agree exactly, in
    # training mode dropout between the layers changes the output.
    torch.manual_seed(0)
    rnn = nn.GRU(4, 8, 2, batch_first=True, dropout=0.5).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    rnn.eval()
    assert (gru_layers(rnn, x)[0] - rnn(x)[0]).abs().max().item() < 1e-12
    rnn.train()
    assert (gru_layers(rnn, x)[0] - rnn.eval()(x)[0]).abs().max().item() > 1e-3


def test_refuses_a_bidirectional_gru():
    with pytest.raises(ValueError, match="unidirectional"):
        gru_layers(nn.GRU(2, 3, bidirectional=True, batch_first=True), torch.randn(1, 2, 2))


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "full"])
@pytest.mark.parametrize("head", ["last", "step"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gru_model_training_path_equals_the_native_one(head, bidirectional, padded):
    """GRUModel trains through the fused recurrence on the CPU (each direction of a bidirectional
    one, padded or not); padded batches stay exact."""
    torch.manual_seed(0)
    model = GRUModel(3, 6, num_layers=2, head=head, bidirectional=bidirectional).double()
    x = torch.randn(5, 11, 3, dtype=torch.float64)
    lengths = torch.tensor([11, 4, 7, 1, 11] if padded else [11] * 5)
    results = {}
    for kernel in ("native", "fused"):
        model.encoder.configure(recurrence=kernel)
        model.zero_grad()
        out, _ = model(x, lengths)
        out.square().sum().backward()
        results[kernel] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    (out_a, grads_a), (out_b, grads_b) = results["native"], results["fused"]
    assert (out_a - out_b).abs().max().item() < 1e-12
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a - b).abs().max().item() < 1e-12


def test_two_recurrences_side_by_side_equal_each_run_alone():
    """Both directions of a layer share one loop: outputs and every gradient (input projections,
    initial states, weights) equal those of each recurrence run by itself."""
    torch.manual_seed(0)
    gi = torch.randn(7, 2, 3, 15, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(2, 15, 5, dtype=torch.float64, requires_grad=True)
    b_hh = torch.randn(2, 15, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, 2, 3, 5, dtype=torch.float64)
    inputs = [gi, h0, w_hh, b_hh]
    together = gru_recurrences(gi, h0, w_hh, b_hh)
    grads_together = torch.autograd.grad((together * target).sum(), inputs)
    alone = torch.cat(
        [gru_recurrences(gi[:, k : k + 1], h0[k : k + 1], w_hh[k : k + 1], b_hh[k : k + 1]) for k in range(2)], dim=1
    )
    grads_alone = torch.autograd.grad((alone * target).sum(), inputs)
    assert (together - alone).abs().max().item() < 1e-12
    for a, b in zip(grads_together, grads_alone, strict=True):
        assert (a - b).abs().max().item() < 1e-12
