"""`dist-gru prepare --table FILE`: a long-format table (one row per series and timestamp, CSV or
Parquet, rows in any order) to `dist_gru.seq/v1` step datasets, in memory bounded by --memory-mb
whatever the file's size. docs/tables.md is the user's page; the passes:

1. scan (table_read.scan): per series its row count, time range and static values, O(series).
2. scatter: every batch's rows are written into memory-mapped scratch arrays at their series'
   offset (times int64 [rows], values float64 [rows, C]), so each series ends up contiguous.
3. layout: per series, its timestamps are sorted and placed on the regular grid of the frequency
   (given or inferred): duplicates, off-grid timestamps and (under --missing error) absent steps
   are refused here, before anything is written; this fixes every split's size.
4. write: per series, values are placed on the grid, gaps filled by policy, calendar columns
   derived, and the series written into each split's preallocated features.npy / targets.npy in a
   staging folder renamed into place at the end (nothing is written on a refused input).

Pages of the memory maps are handed back after every batch or series (the page cache keeps them),
so the process holds one batch and one series at a time; a single series must fit in half of the
budget, else it is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# Arrow's own allocators (mimalloc, jemalloc) keep freed batches for reuse; measured on a 50 MB
# Parquet file at --memory-mb 32, that held 10-20 MiB more at the peak than the system allocator.
# Arrow reads this when it first loads, so it is set before pyarrow (or pandas) is imported.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from numpy.lib.format import open_memmap  # noqa: E402

from dist_gru.data.files import (  # noqa: E402
    FEATURES_FILE,
    FORMAT,
    OFFSETS_FILE,
    TARGETS_FILE,
    DataFormatError,
    check_destination,
    package_version,
    staged_dataset,
)
from dist_gru.data.table_read import (  # noqa: E402
    Roles,
    Scan,
    column_names,
    groups,
    iter_batches,
    numbers,
    scan,
    series_codes,
    text,
    times_ns,
)
from dist_gru.data.table_series import (  # noqa: E402
    absent_steps_error,
    calendar_features,
    calendar_names,
    fill_series,
    grid_steps_estimate,
    infer_freq,
    parse_freq,
    place_on_grid,
    stamp,
)


@dataclasses.dataclass
class TableSpec:
    """What `prepare --table` was asked for (checked by the CLI). `cuts` maps "val" / "test" to
    ("from", ns timestamp) or ("last", steps)."""

    file: Path
    out: Path
    roles: Roles
    freq: str | None = None
    calendar: list[str] = dataclasses.field(default_factory=list)
    missing: str = "error"
    memory_mb: int = 1024
    task: str | None = "regression"  # None: unlabelled (no target columns)
    cuts: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB: VmHWM (getrusage's ru_maxrss carries a parent's peak over
    fork and exec on Linux, so a process started by a big one would report that one's)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release(*arrays: np.ndarray) -> None:
    """Write back and unmap the pages of memory-mapped arrays this process touched (Linux counts
    mapped file pages in RSS; the page cache keeps them)."""
    for array in arrays:
        mapping = getattr(array, "_mmap", None)
        if mapping is not None:
            mapping.flush()
            if hasattr(mmap, "MADV_DONTNEED"):
                mapping.madvise(mmap.MADV_DONTNEED)


def return_freed_memory() -> None:
    """Make glibc hand freed blocks of 128 KiB and more back to the OS at once.

    By default glibc raises its mmap threshold to the size of the largest block freed so far, so
    after the first batch every batch-sized array comes from the heap, which it trims only past
    twice that threshold: measured on a 50 MB Parquet file at --memory-mb 32, the heap kept about
    20 MiB of freed batches. A fixed threshold turns that adjustment off."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        mallopt(m_mmap_threshold, 1 << 17)
        mallopt(m_trim_threshold, 1 << 17)


def prepare_table(spec: TableSpec) -> dict[str, Any]:
    """Run the four passes; returns the summary `prepare` prints as JSON."""
    started = time.perf_counter()
    return_freed_memory()
    check_columns(spec)
    budget = spec.memory_mb << 20
    batch_bytes = max(1 << 20, budget // 32)  # the batch and its few converted copies stay well inside
    try:
        state = scan(spec.file, spec.roles, batch_bytes)
    except pa.ArrowException as err:  # a value Arrow cannot convert (a timestamp out of range, ...)
        raise DataFormatError(f"{spec.file}: {err}") from None
    series = Series.from_scan(state, spec)
    destinations = {name: spec.out / name if name else spec.out for name in _split_names(spec)}
    for destination in destinations.values():
        check_destination(destination)
    made_out = not spec.out.exists()
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.out.name}.scratch-", dir=spec.out.parent))
    try:
        raw = scatter(spec, state, series, scratch, batch_bytes)
        layout = Layout.build(spec, series, raw, budget)
        summary = write_splits(spec, series, raw, layout, destinations)
    except BaseException as err:
        if made_out and spec.out.is_dir() and not any(spec.out.iterdir()):
            spec.out.rmdir()
        if isinstance(err, pa.ArrowException):
            raise DataFormatError(f"{spec.file}: {err}") from None
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - started
    summary.update(rows=state.rows, seconds=round(seconds, 3), rows_per_s=round(state.rows / max(seconds, 1e-9)))
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return summary


def check_columns(spec: TableSpec) -> None:
    """Every named column exists and plays one part."""
    available = column_names(spec.file)
    roles = spec.roles
    unknown = [name for name in roles.all if name not in available]
    if unknown:
        raise DataFormatError(
            f"{spec.file}: unknown column(s) {', '.join(map(repr, unknown))}; available: {', '.join(available)}"
        )
    seen: set[str] = set()
    for name in roles.all:
        if name in seen:
            raise DataFormatError(f"column {name!r} is named in two roles; each column plays one part")
        seen.add(name)
    if spec.task == "classification" and len(roles.targets) != 1:
        raise DataFormatError(f"--task classification takes one --target-columns column of labels; got {len(roles.targets)}")


def _split_names(spec: TableSpec) -> list[str]:
    if not spec.cuts:
        return [""]
    return ["train", "val", *(["test"] if "test" in spec.cuts else [])]


# ------------------------------------------------------------------------------ series and statics


@dataclasses.dataclass
class Series:
    """The series in stored order (sorted by id: numerically when every id is an integer), their
    statics and the classes, from pass 1."""

    ids: list[str]
    rank: np.ndarray  # first-appearance number -> stored position
    counts: np.ndarray  # rows per stored series
    static_meta: list[dict]
    static_categories: np.ndarray  # int64 [N, Sc]
    static_values: np.ndarray  # float32 [N, Sn]
    class_names: list[str] | None
    num_classes: int | None

    @classmethod
    def from_scan(cls, state: Scan, spec: TableSpec) -> Series:
        found = list(state.index)
        numeric = all(_is_int_text(i) for i in found)
        order = sorted(range(len(found)), key=lambda s: (int(found[s]) if numeric else 0, found[s]))
        rank = np.empty(len(found), dtype=np.int64)
        rank[order] = np.arange(len(found))
        counts = np.asarray(state.counts, dtype=np.int64)[order]
        meta, categories, values = _statics(state, order)
        class_names, num_classes = _classes(state.labels, spec) if spec.roles.label else (None, None)
        ids = [found[s] for s in order]
        return cls(ids, rank, counts, meta, categories, values, class_names, num_classes)

    def name(self, i: int) -> str:
        return self.ids[i] if self.ids != [""] else "the series"


def _is_int_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _number(value: Any) -> float | None:
    if isinstance(value, (bool, int, float)):
        return float(value)
    with contextlib.suppress(ValueError, TypeError):
        return float(value)
    return None


def _statics(state: Scan, order: list[int]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Static columns: numeric ones as values, text ones as categories with a sorted vocabulary."""
    meta, categories, values = [], [], []
    for name, per_series in state.static.items():
        column = [per_series[s] for s in order]
        as_numbers = [_number(v) for v in column]
        if all(v is not None and np.isfinite(v) for v in as_numbers):
            meta.append({"name": name, "kind": "value"})
            values.append(np.asarray(as_numbers, dtype=np.float32))
            continue
        vocabulary = sorted({str(v) for v in column})
        meta.append({"name": name, "kind": "category", "vocabulary": vocabulary})
        codes = {v: k for k, v in enumerate(vocabulary)}
        categories.append(np.asarray([codes[str(v)] for v in column], dtype=np.int64))
    n = len(order)
    return (
        meta,
        np.stack(categories, axis=1) if categories else np.zeros((n, 0), np.int64),
        np.stack(values, axis=1) if values else np.zeros((n, 0), np.float32),
    )


def _classes(labels: set, spec: TableSpec) -> tuple[list[str] | None, int]:
    """Integer labels keep their ids (C = max + 1, no names); text labels become 0..C-1 in sorted order."""
    if not labels:
        raise DataFormatError(f"{spec.file}: target column {spec.roles.targets[0]!r} has no labels")
    if all(isinstance(v, (int, float)) and float(v).is_integer() or _is_int_text(v) for v in labels):
        ids = sorted(int(v) for v in labels)
        if ids[0] < 0:
            raise DataFormatError(f"{spec.file}: label {ids[0]} in {spec.roles.targets[0]!r}; integer class labels are >= 0")
        return None, ids[-1] + 1
    names = sorted(str(v) for v in labels)
    return names, len(names)


# ---------------------------------------------------------------------------------------- scatter


@dataclasses.dataclass
class Raw:
    """Pass 2's scratch arrays: series i's rows are [offsets[i], offsets[i + 1]) in table order."""

    times: np.ndarray  # int64 [rows]
    values: np.ndarray  # float64 [rows, C]: targets, past, future; NaN = missing
    offsets: np.ndarray  # int64 [N + 1]
    missing: np.ndarray  # int64 [C]: missing values per column in the table


def scatter(spec: TableSpec, state: Scan, series: Series, scratch: Path, batch_bytes: int) -> Raw:
    """Pass 2: each batch's rows into the scratch arrays at their series' next free rows."""
    roles = spec.roles
    offsets = np.concatenate([[0], np.cumsum(series.counts)]).astype(np.int64)
    times = open_memmap(scratch / "times.npy", mode="w+", dtype=np.int64, shape=(state.rows,))
    values = open_memmap(scratch / "values.npy", mode="w+", dtype=np.float64, shape=(state.rows, len(roles.values)))
    cursor, missing = offsets[:-1].copy(), np.zeros(len(roles.values), dtype=np.int64)
    pending = 0  # bytes written since the scratch arrays' pages were last handed back
    columns = [c for c in roles.all if c not in roles.static]
    for batch in iter_batches(spec.file, roles, columns, batch_bytes):
        codes = series.rank[series_codes(batch, roles, state.index, spec.file, grow=False)]
        order, stored, starts, sizes = groups(codes)
        rows = np.repeat(cursor[stored] - starts, sizes) + np.arange(len(codes))
        cursor[stored] += sizes
        times[rows] = times_ns(batch.column(roles.time), spec.file, roles.time, 0)[order]  # checked in pass 1
        block = _values(batch, spec, series)
        missing += np.isnan(block).sum(axis=0)
        values[rows] = block[order]
        pending += block.nbytes + len(rows) * 8
        if pending > batch_bytes * 2:  # hand the touched pages back every few batches
            release(times, values)
            pending = 0
    release(times, values)
    return Raw(times, values, offsets, missing)


def _values(batch: pa.RecordBatch, spec: TableSpec, series: Series) -> np.ndarray:
    """float64 [rows, C] of the value columns; a label column as class ids (NaN: missing)."""
    columns = []
    for name in spec.roles.values:
        column = batch.column(name)
        if spec.roles.label and name == spec.roles.targets[0]:
            if series.class_names is not None:
                ids = pc.index_in(text(column), value_set=pa.array(series.class_names))
                columns.append(np.asarray(ids.cast(pa.float64()).fill_null(np.nan)))
                continue
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column = column.cast(pa.float64())  # integer labels written as text
        columns.append(numbers(column, spec.file, name))
    return np.stack(columns, axis=1)


# ----------------------------------------------------------------------------------------- layout


@dataclasses.dataclass
class Layout:
    """Per stored series: its grid length, first timestamp, absent steps, and each split's end and
    evaluation start; the frequency."""

    freq: pd.DateOffset
    lengths: np.ndarray
    starts: np.ndarray
    inserted: np.ndarray
    ends: dict[str, np.ndarray]  # split -> steps of each series it holds (a prefix)
    eval_from: dict[str, np.ndarray]  # val/test -> first evaluated step of each series

    @classmethod
    def build(cls, spec: TableSpec, series: Series, raw: Raw, budget: int) -> Layout:
        freq = parse_freq(spec.freq) if spec.freq else _inferred_freq(series, raw)
        n = len(series.ids)
        lengths, starts, inserted = (np.zeros(n, dtype=np.int64) for _ in range(3))
        cuts = {name: np.zeros(n, dtype=np.int64) for name in spec.cuts}
        per_step = 8 * (3 * raw.values.shape[1] + len(spec.calendar) * 2 + 8)
        pending = 0  # bytes of raw.times read since its pages were last handed back
        for i in range(n):
            times = np.sort(raw.times[raw.offsets[i] : raw.offsets[i + 1]])
            _check_fits(series.name(i), times, freq, per_step, budget)
            grid, steps = place_on_grid(times, freq, series.name(i))
            if len(grid) > len(times) and spec.missing == "error":
                raise absent_steps_error(grid, steps, series.name(i), freq.freqstr)
            lengths[i], starts[i], inserted[i] = len(grid), grid.asi8[0], len(grid) - len(times)
            for name, cut in _cut_steps(spec, grid).items():
                cuts[name][i] = cut
            pending += len(times) * 8
            if pending > budget // 16:
                release(raw.times)
                pending = 0
        release(raw.times)
        ends, eval_from = _splits(spec, series, lengths, starts, cuts, freq)
        return cls(freq, lengths, starts, inserted, ends, eval_from)


def _inferred_freq(series: Series, raw: Raw) -> pd.DateOffset:
    """The step of the first series (in stored order) whose timestamps are regular."""
    for i in range(len(series.ids)):
        freq = infer_freq(np.sort(raw.times[raw.offsets[i] : raw.offsets[i + 1]]))
        if freq is not None:
            return freq
    raise DataFormatError(
        "cannot infer the time step: no series has 3 or more regularly spaced timestamps; give it with --freq "
        "(a pandas offset alias such as h, D, W-SUN, MS)"
    )


def _check_fits(name: str, times: np.ndarray, freq: pd.DateOffset, per_step: int, budget: int) -> None:
    steps = grid_steps_estimate(int(times[0]), int(times[-1]), freq)
    if steps * per_step > budget // 2:
        raise DataFormatError(
            f"series {name!r} spans about {steps} {freq.freqstr} steps ({stamp(times[0])} .. {stamp(times[-1])}): "
            f"filling it needs about {steps * per_step >> 20} MiB, more than half of --memory-mb; raise --memory-mb "
            "(one series is processed whole)"
        )


def _cut_steps(spec: TableSpec, grid: pd.DatetimeIndex) -> dict[str, int]:
    """Per cut, the number of the series' steps before it; `--val-last N` counts N steps back from
    the test cut when there is one."""
    steps = {}
    for name in sorted(spec.cuts, key=lambda split: split != "test"):  # test first
        kind, value = spec.cuts[name]
        if kind == "from":
            steps[name] = int(np.searchsorted(grid.asi8, value, side="left"))
        else:
            steps[name] = steps.get("test", len(grid)) - value
    return steps


def _splits(spec: TableSpec, series: Series, lengths, starts, cuts, freq) -> tuple[dict, dict]:
    """Each split's per-series end and evaluation start; a series without steps in a part is refused."""
    if not cuts:
        return {"": lengths}, {}
    val = cuts["val"]
    test = cuts.get("test", lengths)
    parts = {"train": (np.zeros_like(val), val), "val": (val, test)}
    if "test" in cuts:
        parts["test"] = (test, lengths)
    for name, (begin, end) in parts.items():
        bad = np.flatnonzero(end - begin < 1)
        if len(bad):
            shown = ", ".join(
                f"{series.name(i)!r} ({lengths[i]} steps from {stamp(starts[i])})" for i in bad[:3]
            )
            raise DataFormatError(
                f"{len(bad)} series have no {freq.freqstr} step in the {name} part of the time cut: {shown}; every "
                "series needs steps on both sides of each cut (move the cut, or drop those series)"
            )
    ends = {"train": val, "val": test, **({"test": lengths} if "test" in cuts else {})}
    return ends, {"val": val, **({"test": test} if "test" in cuts else {})}


# ------------------------------------------------------------------------------------------ write


def write_splits(spec: TableSpec, series: Series, raw: Raw, layout: Layout, destinations: dict[str, Path]) -> dict:
    """Pass 4: each series filled and written into every split (a prefix of it, or all of it)."""
    roles = spec.roles
    gaps = raw.missing > 0 if not layout.inserted.any() else np.ones(len(roles.values), dtype=bool)
    masked = np.flatnonzero(gaps) if spec.missing == "mask" else np.zeros(0, dtype=np.int64)
    names = [*roles.past, *roles.future, *calendar_names(spec.calendar)] + [f"{roles.values[c]}_observed" for c in masked]
    feature_roles = ["past"] * len(roles.past) + ["future"] * (len(names) - len(roles.past) - len(masked))
    feature_roles += ["past"] * len(masked)
    filled = np.zeros(len(roles.values), dtype=np.int64)
    with contextlib.ExitStack() as stack:
        metas, outputs = {}, {}
        for split, destination in destinations.items():
            metas[split] = _meta(spec, series, layout, split, names, feature_roles)
            staging = stack.enter_context(staged_dataset(destination, metas[split]))
            target_dim = None if roles.label else len(roles.targets)
            outputs[split] = (staging, *_allocate(staging, layout.ends[split], len(names), target_dim))
        pending = 0
        for i in range(len(series.ids)):
            features, targets, counts = _series_rows(spec, series, raw, layout, i, masked)
            lo, hi = raw.offsets[i], raw.offsets[i + 1]
            filled += counts
            for split, (_, stored_features, stored_targets, offsets) in outputs.items():
                first, end = int(offsets[i]), int(layout.ends[split][i])
                stored_features[first : first + end] = features[:end]
                stored_targets[first : first + end] = targets[:end]
            # Pages touched since the last release: the series' rows read back, and written to each split.
            pending += (hi - lo) * raw.values.shape[1] * 8 + (features.nbytes + targets.nbytes) * len(outputs)
            if pending > (spec.memory_mb << 20) // 16:
                _release_outputs(outputs, raw)
                pending = 0
        missing = {
            "policy": spec.missing,
            "filled": {name: int(n) for name, n in zip(roles.values, filled, strict=True)},
            "inserted_steps": int(layout.inserted.sum()),
        }
        for split, (staging, *arrays) in outputs.items():
            _release_outputs({split: (staging, *arrays)}, raw)
            metas[split]["missing"] = missing
            _save_series_arrays(staging, series, layout, split, metas[split])
    return _summary(spec, series, layout, destinations, names, missing)


def _allocate(staging: Path, ends: np.ndarray, width: int, target_dim: int | None) -> tuple:
    """A split's features.npy [S, F], targets.npy [S, O] float32 or (labels, target_dim None) [S]
    int64 as memory maps, and its offsets (saved as offsets.npy)."""
    offsets = np.concatenate([[0], np.cumsum(ends)]).astype(np.int64)
    np.save(staging / OFFSETS_FILE, offsets)
    total = int(offsets[-1])
    shape, dtype = ((total,), np.int64) if target_dim is None else ((total, target_dim), np.float32)
    if target_dim == 0:  # unlabelled data: no targets.npy
        targets = np.zeros(shape, dtype=dtype)
    else:
        targets = open_memmap(staging / TARGETS_FILE, mode="w+", dtype=dtype, shape=shape)
    if width:
        features = open_memmap(staging / FEATURES_FILE, mode="w+", dtype=np.float32, shape=(total, width))
    else:  # a zero-byte array cannot be memory-mapped; nothing to fill
        np.save(staging / FEATURES_FILE, np.zeros((total, 0), dtype=np.float32))
        features = np.zeros((total, 0), dtype=np.float32)
    return features, targets, offsets


def _release_outputs(outputs: dict, raw: Raw) -> None:
    for _, features, targets, _ in outputs.values():
        release(features, targets)
    release(raw.times, raw.values)


def _series_rows(
    spec: TableSpec, series: Series, raw: Raw, layout: Layout, i: int, masked: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Series i on its grid: features [L, F] float32, targets [L, O] float32 or [L] int64 labels,
    and the number of values filled per value column."""
    roles, name = spec.roles, series.name(i)
    lo, hi = int(raw.offsets[i]), int(raw.offsets[i + 1])
    times = np.asarray(raw.times[lo:hi])
    order = np.argsort(times, kind="stable")
    grid, steps = place_on_grid(times[order], layout.freq, name)
    values = np.full((len(grid), len(roles.values)), np.nan)
    values[steps] = np.asarray(raw.values[lo:hi])[order]
    counts, observed = fill_series(values, roles.values, len(roles.targets), roles.label, spec.missing, grid, name)
    num_targets = len(roles.targets)
    with np.errstate(over="ignore", invalid="ignore"):
        covariates = values[:, num_targets:].astype(np.float32)
        targets = values[:, 0].astype(np.int64) if roles.label else values[:, :num_targets].astype(np.float32)
    # The value columns as stored, in table order (class ids are in range by construction).
    checked = covariates if roles.label else np.concatenate([targets, covariates], axis=1)
    bad = ~np.isfinite(checked)
    if bad.any():
        step, column = (int(v) for v in np.argwhere(bad)[0])
        column += num_targets if roles.label else 0
        raise DataFormatError(
            f"column {roles.values[column]!r}, series {name!r}, timestamp {grid[step]}: value {values[step, column]} "
            "does not fit float32; expected finite values"
        )
    parts = [covariates, calendar_features(grid, spec.calendar), observed[:, masked].astype(np.float32)]
    return np.concatenate(parts, axis=1), targets, counts


def _meta(spec: TableSpec, series: Series, layout: Layout, split: str, names: list[str], roles_: list[str]) -> dict:
    roles, ends = spec.roles, layout.ends[split]
    sizes = {"num_classes": series.num_classes} if roles.label else {"target_dim": len(roles.targets)}
    if not roles.targets:  # unlabelled data to predict on: no task, no targets
        sizes = {"target_kind": "none"}
    arrays = ["series_ids"] * (roles.id is not None) + ["series_start"]
    arrays += ["static_categories"] * bool(series.static_categories.shape[1])
    arrays += ["static_values"] * bool(series.static_values.shape[1]) + ["eval_from"] * (split in layout.eval_from)
    return {
        "format": FORMAT,
        "num_sequences": len(series.ids),
        "num_features": len(names),
        "task": spec.task,
        "target_kind": "step",
        **sizes,
        "feature_dtype": "float32",
        "total_steps": int(ends.sum()),
        "min_length": int(ends.min()),
        "max_length": int(ends.max()),
        "created_by": f"dist_gru {package_version()}",
        "feature_names": names,
        "feature_roles": roles_,
        "target_names": list(roles.targets),
        **({"class_names": series.class_names} if series.class_names is not None else {}),
        "freq": layout.freq.freqstr,
        "time_column": roles.time,
        "calendar": list(spec.calendar),
        "id_column": roles.id,
        "static": series.static_meta,
        "series_arrays": arrays,
    }


def _save_series_arrays(staging: Path, series: Series, layout: Layout, split: str, meta: dict) -> None:
    arrays = {
        "series_ids": np.array(series.ids, dtype=str),
        "series_start": layout.starts,
        "static_categories": series.static_categories,
        "static_values": series.static_values,
        "eval_from": layout.eval_from.get(split),
    }
    for name in meta["series_arrays"]:
        np.save(staging / f"{name}.npy", arrays[name], allow_pickle=False)


def _summary(spec: TableSpec, series: Series, layout: Layout, destinations: dict, names: list[str], missing: dict) -> dict:
    summary: dict[str, Any] = {}
    for split, destination in destinations.items():
        info = {"path": str(destination), "num_sequences": len(series.ids), "total_steps": int(layout.ends[split].sum())}
        if split:
            summary[split] = info
        else:
            summary.update(info)
    summary.update(num_series=len(series.ids), num_features=len(names), feature_names=names, task=spec.task)
    if spec.roles.label:
        summary["num_classes"] = series.num_classes
    else:
        summary["target_dim"] = len(spec.roles.targets)
    summary.update(target_kind="step" if spec.roles.targets else "none", freq=layout.freq.freqstr, missing=missing)
    return summary
