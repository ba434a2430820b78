"""Streaming inference: ``GRUModel.step`` chunk by chunk equals the whole-sequence forward.

Run: PYTHONPATH=. .venv/bin/pytest tests/test_streaming.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dist_gru.model import GRUModel

# Equal up to float32 rounding: the same ops in a different grouping of time steps.
TOL = 1e-5


def build(cell: str, head: str, output: str = "point", task: str = "regression") -> GRUModel:
    torch.manual_seed(0)
    horizon = 3 if head == "forecast" else 0
    model = GRUModel(
        3, 12, num_layers=2, cell=cell, head=head, output=output, task=task, horizon=horizon,
        output_size=2, scaling="global",
    ).eval()
    model.set_normalization(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.5]))
    return model


def stream(model: GRUModel, x: Tensor, lengths: Tensor, chunk_sizes: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Feed every sequence in chunks (sizes per sequence, each >= 1, summing to its length)."""
    state = model.initial_state(x.shape[0])
    start = torch.zeros_like(lengths)
    outputs = []
    for sizes in chunk_sizes:
        width = int(sizes.max())
        # Each sequence's next `size` samples, padded at the end of the chunk to its widest one.
        index = (start[:, None] + torch.arange(width)[None, :]).clamp_max(x.shape[1] - 1)
        chunk = x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))
        out, state = model.step(chunk, state, sizes)
        outputs.append(out)
        start = start + sizes
    assert torch.equal(start, lengths)
    return state, outputs


def chunks_of(lengths: Tensor, generator: torch.Generator, count: int) -> list[Tensor]:
    """`count` random chunk sizes per sequence, each at least 1, summing to its length."""
    sizes = []
    for length in lengths.tolist():
        cuts = torch.randperm(length - 1, generator=generator)[: count - 1].add(1).sort().values.tolist()
        bounds = [0, *cuts, length]
        sizes.append([b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return [torch.tensor(column) for column in zip(*sizes, strict=True)]


@pytest.mark.parametrize("cell", ["torch", "seed"])
@pytest.mark.parametrize(
    "head,output,task",
    [("last", "point", "regression"), ("last", "point", "classification"), ("step", "quantile", "regression"),
     ("forecast", "gaussian", "regression")],
)
def test_chunked_equals_whole_sequence(cell: str, head: str, output: str, task: str) -> None:
    model = build(cell, head, output, task)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 17, 3, generator=generator) * 3 + 1
    lengths = torch.tensor([17, 9, 4, 13, 6])
    with torch.no_grad():
        want, _ = model(x, lengths)
        for count in (1, 4):  # one chunk of everything; four uneven chunks per sequence
            sizes = chunks_of(lengths, generator, count)
            state, outputs = stream(model, x, lengths, sizes)
            assert state.shape == (2, 5, 12)
            if head == "step":
                # Sequence b's outputs: the valid steps of each of its chunks, in order.
                got = [torch.cat([out[b, : int(size[b])] for out, size in zip(outputs, sizes, strict=True)])
                       for b in range(5)]
                diff = max(float((got[b] - want[b, :n]).abs().max()) for b, n in enumerate(lengths.tolist()))
            else:
                assert outputs[-1].shape == want.shape
                diff = float((outputs[-1] - want).abs().max())
            assert diff < TOL, diff


@pytest.mark.parametrize("cell", ["torch", "seed"])
def test_one_sample_at_a_time_equals_forward(cell: str) -> None:
    """A live feed: one sample per call, the state carried between calls."""
    model = build(cell, "last")
    x = torch.randn(2, 20, 3, generator=torch.Generator().manual_seed(2))
    state = model.initial_state(2)
    with torch.no_grad():
        for t in range(20):
            out, state = model.step(x[:, t : t + 1], state)
            assert float((out - model(x[:, : t + 1])[0]).abs().max()) < TOL


def test_state_is_the_encoders_final_state() -> None:
    model = build("torch", "last")
    x = torch.randn(3, 8, 3)
    with torch.no_grad():
        _, state = model.step(x, model.initial_state(3))
        _, h_n = model.encoder.rnn((x - model.scaler.input_mean) / model.scaler.input_std)
    assert torch.equal(state, h_n)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bidirectional": True}, "step() needs a unidirectional model"),
        ({"scaling": "window"}, 'step() cannot scale per window'),
        ({"scaling": "last"}, 'step() cannot scale per window (scaling="last" needs the whole sequence)'),
        ({"scaling": "robust"}, 'step() cannot scale per window (scaling="robust"'),
        ({"scaling": "revin"}, 'step() cannot scale per window (scaling="revin"'),
    ],
)
def test_step_refuses_what_cannot_stream(kwargs: dict, message: str) -> None:
    model = GRUModel(3, 4, **kwargs).eval()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.step(torch.randn(1, 2, 3), model.initial_state(1))


def test_step_checks_the_state_shape() -> None:
    model = GRUModel(3, 4, num_layers=2)
    with pytest.raises(ValueError, match=r"state has shape \(1, 2, 4\), expected \(2, 2, 4\)"):
        model.step(torch.randn(2, 5, 3), torch.zeros(1, 2, 4))
