"""Reading a long-format table (CSV or Parquet) in bounded batches, and the first of the two passes
of `dist-gru prepare --table` (docs/tables.md).

Only the columns a role names are read. A batch is a `pyarrow.RecordBatch` of about `batch_bytes`:
CSV through `pyarrow.csv.open_csv` (a streaming reader whose block size is the batch size), Parquet
through `ParquetFile.iter_batches` (one row group's column chunks are decoded at a time, so a row
group must fit the memory budget). Pass 1 keeps O(number of series) state: per series its row
count, first and last timestamp and static values, and the label vocabulary of a classification
target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dist_gru.data.files import DataFormatError

CSV_SUFFIXES, PARQUET_SUFFIXES = (".csv",), (".parquet", ".pq")


@dataclasses.dataclass
class Roles:
    """Which table column plays which part; `values` (targets, past, future) are read as numbers."""

    id: str | None
    time: str
    targets: list[str]
    past: list[str]
    future: list[str]
    static: list[str]
    label: bool  # a classification target (read as text, mapped to class ids)

    @property
    def values(self) -> list[str]:
        return [*self.targets, *self.past, *self.future]

    @property
    def all(self) -> list[str]:
        return [*([self.id] if self.id else []), self.time, *self.values, *self.static]


def table_kind(file: Path) -> str:
    suffix = file.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise DataFormatError(f"--table {file}: unknown suffix {file.suffix!r}; expected .csv, .parquet or .pq")


def column_names(file: Path) -> list[str]:
    """The table's column names (a CSV's header row, a Parquet file's schema)."""
    if not file.is_file():
        raise DataFormatError(f"{file}: no such file")
    try:
        if table_kind(file) == "parquet":
            return list(pq.ParquetFile(file).schema_arrow.names)
        with pacsv.open_csv(file, read_options=pacsv.ReadOptions(block_size=1 << 20)) as reader:
            return list(reader.schema.names)
    except (pa.ArrowException, OSError) as err:
        raise DataFormatError(f"{file}: cannot be read as a {table_kind(file)} table: {err}") from None


def iter_batches(file: Path, roles: Roles, columns: list[str], batch_bytes: int) -> Iterator[pa.RecordBatch]:
    """`columns` of the table in batches of about `batch_bytes`; a conversion error names the column."""
    try:
        if table_kind(file) == "parquet":
            parquet = pq.ParquetFile(file, buffer_size=1 << 20, pre_buffer=False)
            per_row = 8 * len(columns) + 16
            yield from parquet.iter_batches(
                batch_size=max(1024, batch_bytes // per_row), columns=columns, use_threads=False
            )
            return
        # Text columns stay text here (ids, labels, statics are typed once the whole table is seen);
        # value columns are numbers, an empty field or NaN/NA/null a missing value.
        types = {name: pa.float64() for name in roles.values}
        types.update({name: pa.string() for name in [roles.id, roles.time, *roles.static] if name})
        if roles.label:
            types[roles.targets[0]] = pa.string()
        options = pacsv.ConvertOptions(include_columns=columns, column_types=types, strings_can_be_null=True)
        # The streaming reader holds about 30 blocks' worth of buffers (measured with pyarrow 26: 34 MiB
        # allocated at 1 MiB blocks), so a block is an eighth of the batch size.
        block = max(1 << 16, batch_bytes // 8)
        read = pacsv.ReadOptions(block_size=block, use_threads=False)
        with pacsv.open_csv(file, read_options=read, convert_options=options) as reader:
            yield from reader
    except pa.ArrowInvalid as err:
        hint = f"; value columns ({', '.join(roles.values)}) must be numbers" if "conversion error" in str(err) else ""
        raise DataFormatError(f"{file}: {err}{hint}") from None


def times_ns(column: pa.Array, file: Path, name: str, first_row: int) -> np.ndarray:
    """A timestamp, date or text column as int64 ns since the epoch (UTC wall time for zoned values);
    `first_row`: the number of data rows before this batch, for messages."""
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        ns = column.cast(pa.timestamp("ns", tz=getattr(column.type, "tz", None)))
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        ns = _parse_times(column, file, name)
    else:
        raise DataFormatError(
            f"{file}: --time-column {name!r} has type {column.type}; expected timestamps, dates or text such as "
            "2024-01-31 or 2024-01-31T13:00:00"
        )
    if ns.null_count:
        row = int(np.argmax(np.asarray(ns.is_null())))
        raise DataFormatError(
            f"{file}: --time-column {name!r} is empty in data row {first_row + row + 1}; every row needs a timestamp"
        )
    return np.asarray(ns.cast(pa.int64()))


def _parse_times(column: pa.Array, file: Path, name: str) -> pa.Array:
    for target in (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")):  # ISO 8601 without, then with a zone
        try:
            return column.cast(target)
        except pa.ArrowInvalid:
            pass
    try:  # any other format pandas reads; this batch only
        parsed = pd.to_datetime(column.to_pandas(), utc=True)
    except (ValueError, TypeError) as err:
        raise DataFormatError(f"{file}: --time-column {name!r}: {err}") from None
    return pa.array(parsed.dt.tz_localize(None).to_numpy("datetime64[ns]"), mask=parsed.isna().to_numpy())


def numbers(column: pa.Array, file: Path, name: str) -> np.ndarray:
    """A numeric column as float64 (null -> NaN)."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
        raise DataFormatError(f"{file}: column {name!r} has type {column.type}; expected numbers")
    return np.asarray(column.cast(pa.float64()).fill_null(np.nan))


def text(column: pa.Array) -> pa.Array:
    return column if pa.types.is_string(column.type) else column.cast(pa.string())


@dataclasses.dataclass
class Scan:
    """What pass 1 learns, O(number of series): indexed by series in order of first appearance."""

    index: dict[str, int] = dataclasses.field(default_factory=dict)
    counts: list[int] = dataclasses.field(default_factory=list)
    first: list[int] = dataclasses.field(default_factory=list)
    last: list[int] = dataclasses.field(default_factory=list)
    static: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    labels: set = dataclasses.field(default_factory=set)
    rows: int = 0


def series_codes(batch: pa.RecordBatch, roles: Roles, index: dict[str, int], file: Path, grow: bool) -> np.ndarray:
    """Each row's series number in `index` (new ids added when `grow`), via the batch's dictionary of ids."""
    if roles.id is None:
        if grow and not index:
            index[""] = 0
        return np.zeros(batch.num_rows, dtype=np.int64)
    ids = text(batch.column(roles.id))
    if ids.null_count:
        raise DataFormatError(f"{file}: --id-column {roles.id!r} is empty in a row; every row needs a series id")
    encoded = pc.dictionary_encode(ids)
    lookup = []
    for value in encoded.dictionary.to_pylist():
        if value not in index and grow:
            index[value] = len(index)
        lookup.append(index[value])
    return np.asarray(lookup, dtype=np.int64)[np.asarray(encoded.indices)]


def groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(order, series of each group, group starts, group sizes) of a batch's rows grouped by series."""
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(codes) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(codes)])
    return order, ordered[starts], starts, sizes


def scan(file: Path, roles: Roles, batch_bytes: int) -> Scan:
    """Pass 1: per-series counts, time range and static values; the label vocabulary."""
    state = Scan(static={name: [] for name in roles.static})
    labels = roles.targets[:1] if roles.label else []
    columns = [c for c in (roles.id, roles.time, *roles.static, *labels) if c]
    for batch in iter_batches(file, roles, columns, batch_bytes):
        codes = series_codes(batch, roles, state.index, file, grow=True)
        times = times_ns(batch.column(roles.time), file, roles.time, state.rows)
        order, series, starts, sizes = groups(codes)
        new = len(state.index) - len(state.counts)
        state.counts += [0] * new
        state.first += [np.iinfo(np.int64).max] * new
        state.last += [np.iinfo(np.int64).min] * new
        if len(order):
            ordered = times[order]
            lows, highs = np.minimum.reduceat(ordered, starts), np.maximum.reduceat(ordered, starts)
            for s, size, low, high in zip(series.tolist(), sizes.tolist(), lows.tolist(), highs.tolist(), strict=True):
                state.counts[s] += size
                state.first[s], state.last[s] = min(state.first[s], low), max(state.last[s], high)
        for name in roles.static:
            _scan_static(state, batch.column(name), name, order, series, starts, sizes, file)
        if roles.label:
            state.labels.update(v for v in pc.unique(text(batch.column(roles.targets[0]))).to_pylist() if v is not None)
        state.rows += batch.num_rows
    if state.rows == 0:
        raise DataFormatError(f"{file}: no data rows")
    return state


def _scan_static(state: Scan, column: pa.Array, name: str, order, series, starts, sizes, file: Path) -> None:
    """Record each series' value of a static column; a second, different value is an error."""
    values = state.static[name]
    values += [None] * (len(state.counts) - len(values))
    if column.null_count:
        raise DataFormatError(f"{file}: --static-columns {name!r} is empty in a row; every row needs its value")
    ordered = column.take(pa.array(order))
    first = ordered.take(pa.array(np.repeat(starts, sizes)))
    differs = np.asarray(pc.not_equal(ordered, first))
    firsts = first.take(pa.array(starts)).to_pylist()
    for s, start, size, value in zip(series.tolist(), starts.tolist(), sizes.tolist(), firsts, strict=True):
        changed = differs[start : start + size].any()
        if changed or (values[s] is not None and values[s] != value):
            other = ordered[start + int(np.argmax(differs[start : start + size]))].as_py() if changed else values[s]
            raise DataFormatError(
                f"{file}: --static-columns {name!r} changes within series {_name(state, s)!r} ({value!r} and "
                f"{other!r}); a static column holds one value per series"
            )
        values[s] = value


def _name(state: Scan, s: int) -> str:
    for key, value in state.index.items():  # only on an error
        if value == s:
            return key
    return str(s)
