"""Dropout between GRU layers keyed by sample: a sequence's mask depends on its key and the layer only.

    .venv/bin/pytest -q tests/test_dropout.py

What makes N processes train what 1 process trains with dropout on: a sequence trained inside any
batch (other sequences, other padding, another rank's share) gets the same mask, hence the same
output and gradient, as trained alone. tests/test_distributed.py and tests/test_resume.py check it
with real processes.
"""

from __future__ import annotations

import pytest
import torch

from dist_gru.model import GRUModel
from dist_gru.model.dropout import KeyedDropout, sample_keys

PATHS = [  # (cell, encoder settings, expected training path on the CPU)
    ("torch", {}, "fused"),
    ("torch", {"recurrence": "native"}, "padded"),
    ("torch", {"packed": True}, "fused"),
    ("seed", {}, "seed"),
]


def _model(cell: str, settings: dict, bidirectional: bool) -> GRUModel:
    torch.manual_seed(0)
    model = GRUModel(3, 6, num_layers=3, dropout=0.5, cell=cell, bidirectional=bidirectional, head="step").double()
    model.encoder.configure(**settings)
    return model.train()


@pytest.mark.parametrize(("cell", "settings", "path"), PATHS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_a_sequence_gets_the_same_dropout_alone_and_inside_any_padded_batch(cell, settings, path, bidirectional):
    model = _model(cell, settings, bidirectional)
    x, lengths, index = torch.randn(3, 7, 3).double(), torch.tensor([7, 4, 5]), torch.tensor([10, 11, 12])
    assert model.encoder.path(x, lengths, keyed=True) == path
    keys = sample_keys(seed=1, step=5, index=index)
    batch = model(x, lengths, dropout_keys=keys)[0]
    for row in range(3):
        n = int(lengths[row])
        alone = model(x[row : row + 1, :n], dropout_keys=keys[row : row + 1])[0]
        assert (alone[0] - batch[row, :n]).abs().max() < 1e-12
        # Batch order and the other sequences do not matter either.
        pair = model(x[[row, (row + 1) % 3]], lengths[[row, (row + 1) % 3]], dropout_keys=keys[[row, (row + 1) % 3]])[0]
        assert (pair[0, :n] - batch[row, :n]).abs().max() < 1e-12
    # Dropout is really on: another step's keys, or evaluation mode, give other outputs.
    other = model(x, lengths, dropout_keys=sample_keys(seed=1, step=6, index=index))[0]
    assert (other[0] - batch[0]).abs().max() > 1e-3
    model.eval()
    assert (model(x, lengths, dropout_keys=keys)[0][0] - batch[0]).abs().max() > 1e-3


def test_the_masks_drop_the_configured_share_and_keep_the_expected_value():
    drop = KeyedDropout(0.3, sample_keys(0, 0, torch.arange(64)), None)
    out = drop(1, torch.ones(50, 64, 32))
    kept = (out != 0).double().mean().item()
    assert abs(kept - 0.7) < 0.01, kept
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))
    assert not torch.equal(drop(1, torch.ones(50, 64, 32)) != 0, drop(2, torch.ones(50, 64, 32)) != 0)  # per layer


def test_keys_depend_on_seed_step_and_sample_and_fit_torchs_seed_range():
    index = torch.tensor([0, 1, 2**40])
    keys = {tuple(sample_keys(s, t, index).tolist()) for s in (0, 1) for t in (0, 1)}
    assert len(keys) == 4 and all(len(set(k)) == 3 for k in keys)
    assert all(0 <= k < 2**63 for ks in keys for k in ks)
    assert torch.equal(sample_keys(3, 9, index), sample_keys(3, 9, index))


def test_keys_for_another_batch_size_are_refused():
    with pytest.raises(ValueError, match="2 dropout keys for a batch of 3 sequences"):
        KeyedDropout(0.5, sample_keys(0, 0, torch.arange(2)), None)(1, torch.ones(4, 3, 5))
