"""Static covariates: one value per series (a store's type, its size), as a batch carries them.

    from dist_gru.data.statics import Statics
    statics = Statics.of(SequenceFileDataset("data/sales/train"))   # None without static columns
    statics.rows(np.array([0, 5]))   # {"static_categories": int64 [2, Sc], "static_values": float32 [2, Sn]}

A dataset that batches (a `SequenceFileDataset`, a synthetic task, a `WindowDataset`) holds them as
its `statics` attribute; `build_dataset` sets it to None under `data.static_covariates=false`. The
columns are `[{"name", "kind": "category", "vocabulary": [...]}, {"name", "kind": "value"}, ...]`
(meta.json's "static"); category codes index the sorted vocabulary of the data they come from.

A model keeps the columns of its training data (`data.static` in config.json); data given to it
later is `aligned` to them by name, so a folder whose vocabulary lacks a category, or orders it
otherwise, gives each series the model's code of its category, and a category the model never saw
gets code -1 (the model's "unseen" embedding).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dist_gru.config import ConfigError

UNSEEN = -1  # the code of a category the model's vocabulary does not have


def describe_columns(columns: list[dict] | None) -> str:
    """How messages name static columns: `region (category), size (value)`, or `none`."""
    return ", ".join(f"{c['name']} ({c['kind']})" for c in columns) if columns else "none"


@dataclass(frozen=True)
class Statics:
    """The static columns of a dataset's N series: `categories` int64 [N, Sc] (codes into each
    category column's vocabulary, or `UNSEEN`), `values` float32 [N, Sn], in `columns` order."""

    columns: list[dict]
    categories: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, source: Any) -> Statics | None:
        """The statics of a dataset with `static`, `static_categories` and `static_values` (a
        `SequenceFileDataset`); None when it has no static columns."""
        columns = getattr(source, "static", None)
        if not columns:
            return None
        n = len(source)
        categories = source.static_categories if source.static_categories is not None else np.zeros((n, 0))
        values = source.static_values if source.static_values is not None else np.zeros((n, 0))
        return cls(list(columns), np.asarray(categories, dtype=np.int64), np.asarray(values, dtype=np.float32))

    @property
    def category_sizes(self) -> list[int]:
        """The vocabulary size of each category column (the model's embedding sizes)."""
        return [len(c["vocabulary"]) for c in self.columns if c["kind"] == "category"]

    @property
    def num_values(self) -> int:
        return sum(c["kind"] == "value" for c in self.columns)

    def rows(self, seq: np.ndarray) -> dict[str, torch.Tensor]:
        """A batch's static entries for series `seq`: only the kinds the columns have."""
        seq = np.asarray(seq, dtype=np.int64)
        rows = {}
        if self.category_sizes:
            rows["static_categories"] = torch.from_numpy(np.ascontiguousarray(self.categories[seq]))
        if self.num_values:
            rows["static_values"] = torch.from_numpy(np.ascontiguousarray(self.values[seq]))
        return rows

    def value_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (float64 [Sn]) of the numeric columns over the series: their standardisation."""
        values = self.values.astype(np.float64)
        if len(values) == 0:
            return np.zeros(values.shape[1]), np.ones(values.shape[1])
        return values.mean(axis=0), values.std(axis=0)

    def aligned(self, columns: list[dict], where: str) -> Statics:
        """These statics in the terms of `columns` (a model's): the same names and kinds in the same
        order, or ConfigError naming both; category codes remapped by name, a category that
        `columns` lacks to `UNSEEN` (counted, one warning)."""
        kinds = [(c["name"], c["kind"]) for c in self.columns]
        if kinds != [(c["name"], c["kind"]) for c in columns]:
            raise ConfigError(
                f"{where}: its static columns are {describe_columns(self.columns)}; the model reads "
                f"{describe_columns(columns)} (prepare the data with the same --static-columns, or train without them)"
            )
        codes, unseen, j = self.categories.copy(), {}, 0
        for mine, theirs in zip(self.columns, columns, strict=True):
            if mine["kind"] != "category":
                continue
            index = {name: code for code, name in enumerate(theirs["vocabulary"])}
            table = np.array([index.get(name, UNSEEN) for name in mine["vocabulary"]] + [UNSEEN], dtype=np.int64)
            codes[:, j] = table[self.categories[:, j]]  # an UNSEEN code stays UNSEEN (the table's last entry)
            missing = int((codes[:, j] == UNSEEN).sum())
            if missing:
                unseen[mine["name"]] = missing
            j += 1
        if unseen:
            counts = ", ".join(f"{name}: {count} series" for name, count in unseen.items())
            print(
                f"dist-gru: warning: {where}: static categories the model never saw ({counts}) use its "
                "unseen-category embedding",
                file=sys.stderr,
                flush=True,
            )
        return Statics(list(columns), codes, self.values)


def aligned_statics(statics: Statics | None, columns: list[dict] | None, where: str) -> Statics | None:
    """What a model with static `columns` (None: it has none) reads of data with `statics`: None
    for a model without them; the data's statics aligned to `columns`; data without statics for a
    model that reads them is refused (ConfigError)."""
    if columns is None:
        return None
    if statics is None:
        raise ConfigError(
            f"{where}: has no static columns; the model reads {describe_columns(columns)} (one value per series)"
        )
    return statics.aligned(columns, where)
