"""``nn.GRU``'s recurrence for training on the CPU, with a hand-written backward pass.

    python -c "import torch; from dist_gru.model.recurrence import gru_layers; \
rnn = torch.nn.GRU(3, 8, 2, batch_first=True); print(gru_layers(rnn, torch.randn(4, 5, 3))[0].shape)"

On the CPU, at the shapes people train (batch 64, hidden 128), ``nn.GRU`` runs about a dozen
small ATen ops per time step and layer, autograd records each of them, and the backward pass
replays as many nodes, the recurrent weight gradient accumulated step by step in small matrix
products; the candidate's tanh alone costs four times a sigmoid here. Here the whole time loop of
a layer is one autograd node:

* forward, per step: one ``addmm`` gives the reset and update pre-activations (the input
  projection, computed for every step at once beforehand, rides in as its bias) next to the
  recurrent product of the candidate; then two ``sigmoid_``, an ``addcmul``, an ``add`` and a
  ``lerp`` (the candidate's tanh taken as 2 sigmoid(2a) - 1, four times cheaper here); nothing
  is recorded;
* backward, per step: four ``mul``, one ``addcmul`` and one ``addmm``, written into one buffer
  laid out so that the recurrent product reads it in place; every factor that does not depend on
  the incoming gradient is computed for all steps at once first, and the weight gradients are
  one large matrix product over all steps after the loop.

The math is ``nn.GRU``'s (reset gate after the recurrent product, ``h' = (1 - z) n + z h``) on
``nn.GRU``'s own parameters, so a model trains, saves, exports and evaluates the same; results
agree with ``nn.GRU`` to rounding (the summation order of the weight gradients differs). Both
directions of a bidirectional layer run in the same loop (``gru_recurrences``: each step's ops
take both, a ``baddbmm`` in place of the ``addmm``), the backward one over each sequence reversed
within its length (the encoder, ``dist_gru.model.encoder``, reverses them); a batch is never
packed on the CPU for training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Recurrence(torch.autograd.Function):
    """``out [T, D, B, H]`` of D independent GRU recurrences (a layer's directions) run side by
    side, each from its input projection.

    Inputs: ``gi`` [T, D, B, 3H] = ``x W_ih^T + b_ih`` per recurrence (gates r, z, n), ``h0``
    [D, B, H], ``w_hh`` [D, 3H, H], ``b_hh`` [D, 3H]. Each runs from step 0 to T - 1; a backward
    direction is a recurrence over its sequences reversed (the encoder reverses them), so both
    directions of a layer share each step's ops: at the shapes people train, a step costs the
    dispatch of its ops more than their arithmetic. Time major, so every step's slice is
    contiguous; ``states`` holds h0 and every step's output (step t reads slot t, writes t + 1)."""

    @staticmethod
    def forward(ctx, gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        steps, directions, batch, gates = gi.shape
        hidden = gates // 3
        # The candidate is n = tanh(a) = 2 sigmoid(2a) - 1: on the CPU sigmoid costs a quarter of
        # tanh. So the candidate's rows of W_hh and b_hh, and its input term, enter doubled.
        doubled = torch.ones(gates, 1, dtype=w_hh.dtype, device=w_hh.device)
        doubled[2 * hidden :] = 2
        w_t = (w_hh * doubled).transpose(1, 2)
        # pre[t] = [gi_r + b_hr | gi_z + b_hz | 2 b_hn]: one product per step adds h W_hh^T to it,
        # giving the r and z pre-activations beside the candidate's recurrent term 2 gh_n.
        pre = gi.new_empty(gi.shape)
        torch.add(gi[..., : 2 * hidden], b_hh[:, None, : 2 * hidden], out=pre[..., : 2 * hidden])
        pre[..., 2 * hidden :] = 2 * b_hh[:, None, 2 * hidden :]
        gi_n = 2 * gi[..., 2 * hidden :]
        n = torch.empty_like(gi_n)
        states = gi.new_empty(steps + 1, directions, batch, hidden)  # h0 and every step's output
        states[0] = h0
        minus_one = gi.new_full((), -1.0)
        each, w_t = _per_step(directions, w_t)
        accumulate = torch.Tensor.addmm_ if directions == 1 else torch.Tensor.baddbmm_
        rz, gh_n = each(pre[..., : 2 * hidden]), each(pre[..., 2 * hidden :])
        r, z = each(pre[..., :hidden]), each(pre[..., hidden : 2 * hidden])
        steps_pre, steps_gi_n, steps_n, h = each(pre), each(gi_n), each(n), each(states)
        for t in range(steps):
            accumulate(steps_pre[t], h[t], w_t)
            rz[t].sigmoid_()
            torch.addcmul(steps_gi_n[t], r[t], gh_n[t], out=steps_n[t]).sigmoid_()
            torch.add(minus_one, steps_n[t], alpha=2, out=steps_n[t])
            torch.lerp(steps_n[t], h[t], z[t], out=h[t + 1])  # n + z (h - n)
        ctx.save_for_backward(w_hh, states, pre, n)
        return states[1:]

    @staticmethod
    def backward(ctx, d_out: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        w_hh, states, pre, n = ctx.saved_tensors
        steps, directions, batch, hidden = n.shape
        r, z, gh_n2 = pre[..., :hidden], pre[..., hidden : 2 * hidden], pre[..., 2 * hidden :]
        h_prev = states[:-1]
        # With a = pre-activation and dh the gradient reaching h_t:
        #   da_n = dh (1 - z)(1 - n^2)    da_z = dh (h_prev - n) z (1 - z)
        #   da_r = da_n gh_n r (1 - r)    d gh_n = da_n r    dh_prev = dh z + [da_r da_z d gh_n] W_hh
        # Every factor but dh is known before the loop, for all steps at once.
        # (In place where possible: at these sizes the passes over memory are what these cost.)
        to_n = torch.addcmul(torch.ones_like(n), n, n, value=-1)  # 1 - n^2
        to_n.addcmul_(to_n, z, value=-1)  # (1 - n^2)(1 - z)
        to_z = torch.addcmul(z, z, z, value=-1)  # z (1 - z)
        to_z.mul_(h_prev - n)
        to_r = torch.addcmul(r, r, r, value=-1).mul_(gh_n2).mul_(0.5)  # r (1 - r) gh_n, from 2 gh_n
        # Per step [d gh_n | da_r | da_z | da_n]: the first three are what the recurrent product
        # carries back (W_hh's rows reordered to n, r, z), the last three are d gi in its order.
        grads = n.new_empty(steps, directions, batch, 4, hidden)
        w_nrz = torch.cat([w_hh[:, 2 * hidden :], w_hh[:, : 2 * hidden]], dim=1)
        carried = grads[..., :3, :].flatten(-2)
        each, w_nrz = _per_step(directions, w_nrz)
        product = torch.addmm if directions == 1 else torch.baddbmm
        d_gh, d_r, d_z, d_n = (each(grads[..., k, :]) for k in range(4))
        steps_carried, steps_d_out = each(carried), each(d_out)
        steps_to_n, steps_to_z, steps_to_r, steps_r, steps_z = (each(v) for v in (to_n, to_z, to_r, r, z))
        dh = steps_d_out[steps - 1]
        for t in range(steps - 1, -1, -1):
            torch.mul(dh, steps_to_n[t], out=d_n[t])
            torch.mul(dh, steps_to_z[t], out=d_z[t])
            torch.mul(d_n[t], steps_to_r[t], out=d_r[t])
            torch.mul(d_n[t], steps_r[t], out=d_gh[t])
            if t == 0 and not ctx.needs_input_grad[1]:
                break  # a zero initial state needs no gradient
            below = dh * steps_z[t] if t == 0 else torch.addcmul(steps_d_out[t - 1], dh, steps_z[t])
            dh = product(below, steps_carried[t], w_nrz)
        # The weight gradients: one product per recurrence over all steps.
        flat = carried.transpose(0, 1).reshape(directions, steps * batch, 3 * hidden)
        d_w = flat.transpose(1, 2) @ h_prev.transpose(0, 1).reshape(directions, steps * batch, hidden)
        d_b = flat.sum(1)
        d_w_hh = torch.cat([d_w[:, hidden:], d_w[:, :hidden]], dim=1)  # rows back to r, z, n
        d_b_hh = torch.cat([d_b[:, hidden:], d_b[:, :hidden]], dim=1)
        d_gi = grads[..., 1:, :].flatten(-2)
        d_h0 = dh.view(directions, batch, hidden) if ctx.needs_input_grad[1] else None
        return d_gi, d_h0, d_w_hh, d_b_hh


def _per_step(directions: int, weight: Tensor) -> tuple[Callable[[Tensor], tuple[Tensor, ...]], Tensor]:
    """A function splitting a [T, D, ...] tensor into its steps, and ``weight`` [D, ...] as the
    per-step product takes it: one recurrence drops the D axis (``addmm`` is faster than a
    ``baddbmm`` batch of one)."""
    if directions == 1:
        return lambda v: v.select(1, 0).unbind(0), weight[0]
    return lambda v: v.unbind(0), weight


def gru_recurrences(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """D GRU recurrences side by side from their input projections: ``gi`` [T, D, B, 3H], ``h0``
    [D, B, H], ``w_hh`` [D, 3H, H], ``b_hh`` [D, 3H] -> every step's state [T, D, B, H]."""
    return _Recurrence.apply(gi, h0, w_hh, b_hh)


def gru_time_major(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One layer, one direction: ``x`` [T, B, F], ``h0`` [B, H] -> outputs [T, B, H] (time major)."""
    return _Recurrence.apply(F.linear(x, w_ih, b_ih)[:, None], h0[None], w_hh[None], b_hh[None])[:, 0]


def gru_direction(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One layer, one direction: ``x`` [B, T, F], ``h0`` [B, H] -> outputs [B, T, H] (batch first)."""
    return gru_time_major(x.transpose(0, 1), h0, w_ih, w_hh, b_ih, b_hh).transpose(0, 1)


def gru_layers(
    rnn: nn.GRU, x: Tensor, h0: Tensor | None = None, weight: Callable[[str], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """What ``rnn(x, h0)`` returns for a unidirectional, batch-first ``nn.GRU``: ``(out [B, T, H],
    h_n [L, B, H])``, with the same inter-layer dropout. ``weight(name)`` fetches a parameter
    (default ``getattr(rnn, name)``, or a copy cast to a compute dtype)."""
    if rnn.bidirectional or not rnn.batch_first:
        raise ValueError("gru_layers needs a unidirectional nn.GRU with batch_first=True")
    weight = weight or (lambda name: getattr(rnn, name))
    batch, hidden = x.shape[0], rnn.hidden_size
    layer_input = x.transpose(0, 1)  # time-major inside: every step's slice is contiguous
    finals = []
    for layer in range(rnn.num_layers):
        if layer > 0 and rnn.dropout > 0:
            layer_input = F.dropout(layer_input, rnn.dropout, rnn.training)
        w_ih, w_hh, b_ih, b_hh = (weight(f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        start = x.new_zeros(batch, hidden) if h0 is None else h0[layer].to(x.dtype)
        layer_input = gru_time_major(layer_input, start, w_ih, w_hh, b_ih, b_hh)
        finals.append(layer_input[-1])
    return layer_input.transpose(0, 1), torch.stack(finals)
