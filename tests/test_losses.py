"""The tasks' losses (dist_gru.tasks) against hand-computed values: units, masking, the global-count property.

Run: .venv/bin/pytest tests/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_gru.infer.evaluate import loss_fn
from dist_gru.tasks import task_for
from dist_gru.tasks.functional import median_index


def test_last_point_regression_is_todays_mse() -> None:
    output, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    total, units = task_for({}).loss_sum(output, target)
    # per sample: mean over O of the squared errors: (1 + 4) / 2 and (9 + 1) / 2
    assert (float(total), units) == (2.5 + 5.0, 2)
    assert float(loss_fn("regression", output, target)) == pytest.approx(float(F.mse_loss(output, target)))


def test_step_regression_counts_valid_steps_only_whatever_the_padding_holds() -> None:
    output = torch.zeros(2, 3, 1)
    target = torch.tensor([[[1.0], [2.0], [1e6]], [[3.0], [1e6], [1e6]]])
    total, units = task_for({"head": "step"}).loss_sum(output, target, torch.tensor([2, 1]))
    assert (float(total), units) == (1.0 + 4.0 + 9.0, 3)


def test_step_classification_ignores_padded_labels_even_outside_the_classes() -> None:
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, 1, -100]])
    task = task_for({"task": "classification", "head": "step", "output_size": 2})
    total, units = task.loss_sum(logits, labels, torch.tensor([2]))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (math.e + 1))
    assert units == 2 and float(total) == pytest.approx(expected, rel=1e-6)


def test_gaussian_nll_is_the_full_negative_log_likelihood() -> None:
    output = torch.tensor([[[0.5, 2.0]], [[-1.0, 0.5]]])  # [B=2, O=1, (mean, scale)]
    target = torch.tensor([[1.5], [0.0]])
    total, units = task_for({"output": "gaussian"}).loss_sum(output, target)
    expected = -torch.distributions.Normal(output[..., 0], output[..., 1]).log_prob(target).sum()
    assert units == 2 and float(total) == pytest.approx(float(expected), rel=1e-6)


def test_quantile_pinball_loss_by_hand() -> None:
    task = task_for({"output": "quantile", "quantiles": (0.1, 0.9)})
    output = torch.tensor([[[1.0, 3.0]]])  # [B=1, O=1, Q=2]
    target = torch.tensor([[2.0]])
    # y - q_0.1 = 1 > 0: 0.1 * 1; y - q_0.9 = -1 < 0: (0.9 - 1) * -1 = 0.1; mean over levels 0.1
    total, units = task.loss_sum(output, target)
    assert units == 1 and float(total) == pytest.approx(0.1)


def test_forecast_unit_is_a_window_averaged_over_horizon_and_channels() -> None:
    output = torch.zeros(2, 3, 2)
    target = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    total, units = task_for({"head": "forecast", "output_size": 2, "horizon": 3}).loss_sum(output, target)
    assert units == 2
    assert float(total) == pytest.approx(float((target**2).mean(dim=(1, 2)).sum()))


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_sums_of_uneven_shards_divided_by_the_global_count_equal_the_whole_batch(task: str) -> None:
    # What the trainer relies on: ranks with different numbers of valid steps still give the mean
    # over the global batch's valid steps once the sums and counts are added up.
    spec = task_for({"task": task, "head": "step", "output_size": 3})
    lengths = torch.tensor([6, 1, 2, 5, 6])
    output = torch.randn(5, 6, 3)
    target = torch.randint(0, 3, (5, 6)) if task == "classification" else torch.randn(5, 6, 3)
    whole, count = spec.loss_sum(output, target, lengths)
    parts = [spec.loss_sum(output[s], target[s], lengths[s]) for s in (slice(0, 1), slice(1, 3), slice(3, 5))]
    assert count == 20 == sum(n for _, n in parts)
    assert float(sum(t for t, _ in parts)) / 20 == pytest.approx(float(whole) / count, rel=1e-6)
    mean_of_means = sum(float(t) / n for t, n in parts) / 3
    assert abs(mean_of_means - float(whole) / count) > 1e-3  # a per-rank mean would differ


def test_point_forecast_is_the_mean_or_the_median_level() -> None:
    gaussian = torch.tensor([[[1.0, 0.3], [2.0, 0.1]]])
    assert task_for({"output": "gaussian", "output_size": 2}).point_forecast(gaussian).tolist() == [[1.0, 2.0]]
    quantiles = torch.tensor([[[0.0, 1.0, 2.0]]])
    assert task_for({"output": "quantile"}).point_forecast(quantiles).tolist() == [[1.0]]
    assert median_index((0.1, 0.4, 0.7)) == 1
    assert median_index((0.25, 0.75)) == 0  # a tie: the lower level
