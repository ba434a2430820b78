"""Predictions as a table: `dist-gru predict --out preds.csv | preds.parquet`.

The rows `dist-gru predict` writes (one per sample, or one per valid step) keyed by what the data
stores of them: the series id (or the sample's index), and for per-step rows and windows the
timestamp of the step (or its position), then the values under the data's names (class names for
labels, `p_<class>` for probabilities, target names for regression values). The table is written
from the memory-mapped rows in chunks of samples, so it never needs the whole output in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pandas.tseries.frequencies import to_offset

from dist_gru.tasks import task_for

TABLES = (".csv", ".parquet")
CHUNK_SAMPLES = 4096


def step_times(start_ns: np.ndarray, positions: np.ndarray, freq: str) -> np.ndarray:
    """datetime64[ns]: step `positions` of series starting at `start_ns` (ns), `freq` apart."""
    offset = to_offset(freq)
    try:  # fixed steps (h, D, 15min ...): one vectorised product
        step = pd.Timedelta(offset).value
    except ValueError:  # calendar steps (MS, QS, W-SUN ...): offset arithmetic per row
        times = [pd.Timestamp(int(s)) + int(p) * offset for s, p in zip(start_ns.tolist(), positions.tolist(), strict=True)]
        return np.array(times, dtype="datetime64[ns]")
    return (np.asarray(start_ns, dtype=np.int64) + np.asarray(positions, dtype=np.int64) * step).astype("datetime64[ns]")


def row_keys(dataset: Any, samples: np.ndarray, per_step: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(series of each row, step of each row within its series, or None for a row per sequence)."""
    if hasattr(dataset, "locate"):  # windows: a row per window, at the window's last step
        seq, start = dataset.locate(samples)
        return seq, start + dataset.window - 1
    if not per_step:
        return samples, None
    lengths = np.asarray(dataset.lengths, dtype=np.int64)[samples]
    seq = np.repeat(samples, lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return seq, np.arange(int(lengths.sum()), dtype=np.int64) - first


def series_columns(source: Any, seq: np.ndarray) -> dict[str, np.ndarray]:
    """The columns that say which series a row is of: its id (its index without stored ids), then
    its static columns (category names, values)."""
    ids = getattr(source, "series_ids", None)
    columns = {getattr(source, "id_column", None) or "id": ids[seq] if ids is not None else seq}
    columns.update(static_columns(source, seq))
    return columns


def value_names(model: Any, names: list[str] | None) -> list[str]:
    """The names of a model's output columns: the data's target names, else `label` (classes) or
    `y` (`y0`, `y1`, ... for several targets)."""
    if names:
        return names
    if model.task == "classification":
        return ["label"]
    return ["y"] if model.output_size == 1 else [f"y{c}" for c in range(model.output_size)]


def key_columns(dataset: Any, seq: np.ndarray, step: np.ndarray | None) -> dict[str, np.ndarray]:
    """The columns that say what a row is: its series (`series_columns`), and for a row per step its
    time (or its position)."""
    source = getattr(dataset, "source", dataset)
    columns = series_columns(source, seq)
    if step is None:
        return columns
    starts, freq = getattr(source, "series_start", None), getattr(source, "freq", None)
    if starts is not None and freq is not None:
        columns[getattr(source, "time_column", None) or "ds"] = step_times(starts[seq], step, freq)
    else:
        columns["step"] = step
    return columns


def static_columns(source: Any, seq: np.ndarray) -> dict[str, np.ndarray]:
    """Each static column of series `seq` as the data stores it: category names, numeric values."""
    columns, codes, values = getattr(source, "static", None) or [], 0, 0
    out = {}
    for column in columns:
        if column["kind"] == "category":
            vocabulary = np.asarray(column["vocabulary"], dtype=object)
            out[column["name"]] = vocabulary[source.static_categories[seq, codes]]
            codes += 1
        else:
            out[column["name"]] = source.static_values[seq, values]
            values += 1
    return out


def prediction_frames(rows: np.ndarray, offsets: np.ndarray, dataset: Any, model: Any, probabilities: bool):
    """The table in chunks of samples (DataFrames), keys then values."""
    task, facts = task_for(model.config), model.data or {}
    names = value_names(model, facts.get("target_names"))
    for first in range(0, len(offsets) - 1, CHUNK_SAMPLES):
        samples = np.arange(first, min(first + CHUNK_SAMPLES, len(offsets) - 1))
        seq, step = row_keys(dataset, samples, task.per_step)
        block = np.asarray(rows[offsets[samples[0]] : offsets[samples[-1] + 1]])
        values = task.table_columns(block, names, facts.get("class_names"))
        yield pd.DataFrame({**key_columns(dataset, seq, step), **values})


def write_table(out: Path, frames) -> None:
    """Write the chunks to `out` (.csv or .parquet) under a temporary name, then move it into place."""
    tmp = out.with_name(f".{out.name}.table-{os.getpid()}")  # beside predict's own `.partial` rows file
    try:
        writer = None
        for k, frame in enumerate(frames):
            if out.suffix == ".csv":
                frame.to_csv(tmp, mode="w" if k == 0 else "a", header=k == 0, index=False)
                continue
            table = pa.Table.from_pandas(frame, preserve_index=False)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
