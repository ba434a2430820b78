"""`dist-gru prepare`: turn arrays or a CSV time series into `dist_gru.seq/v1` datasets.

    # fixed-length arrays: features [N, T, F] (or [N, T], one feature), targets [N] / [N, O]
    dist-gru prepare --features X.npy --targets Y.npy --task regression --out data/xy
    # padded arrays cut to per-sequence lengths; 10 % of the sequences (seeded) go to DIR/val
    dist-gru prepare --npz seqs.npz --task classification --num-classes 10 --out data/seqs \\
        --val-fraction 0.1 --seed 0
    # a CSV time series cut into windows of 50 rows; target: `price` 1 row after each window;
    # the last 20 % of the rows (in time order) become DIR/val
    dist-gru prepare --csv prices.csv --window 50 --ahead 1 --target-columns price \\
        --out data/prices --val-fraction 0.2
    # series mode: each series stored once with per-step targets (windows are drawn at training
    # time with data.window / data.horizon); one series per value of `store`, covariates `price`
    # and `promo`; the last 20 % of every series (in time order) become DIR/val
    dist-gru prepare --csv sales.csv --series --series-column store --target-columns units \\
        --feature-columns price,promo --out data/sales --val-fraction 0.2
    # validate a dataset, features included, and print its meta
    dist-gru prepare --check data/prices/train

With `--val-fraction` the output is DIR/train and DIR/val, else one dataset at DIR. Success prints
one JSON line; any error prints one line `error: ...` to stderr and exits 2. Everything is
validated before the first file is written, and each dataset is written atomically, so a failed
run loses nothing already on disk.
"""

from __future__ import annotations

import argparse
import array as pyarray  # (`array` names numpy arrays below)
import codecs
import contextlib
import csv
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dist_gru.config import MAX_SEED
from dist_gru.data.files import (
    MISSING_POLICIES,
    TASKS,
    DataFormatError,
    check_destination,
    check_inputs,
    validate,
    write_features,
    write_sequences,
)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, not argparse's usage block
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dist-gru prepare",
        description="Write dist_gru.seq/v1 datasets from .npy/.npz arrays or a CSV time series.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", type=Path, help=".npy features: [N, T, F] or [N, T] (one feature)")
    source.add_argument(
        "--npz", type=Path, help=".npz with `features` [N, T_max, F], `targets`, optional `lengths` [N]"
    )
    source.add_argument("--csv", type=Path, help="CSV time series with a header row (windows, or --series)")
    source.add_argument("--check", type=Path, metavar="DIR", help="validate DIR (features included), print its meta")
    source.add_argument(
        "--text", type=Path, metavar="FILE", help="a file's bytes as one token stream (vocabulary 256; stream mode)"
    )
    source.add_argument(
        "--table",
        type=Path,
        metavar="FILE",
        help="a long-format table (.csv, .parquet/.pq): one row per series and timestamp (docs/tables.md)",
    )
    _table_arguments(parser)
    parser.add_argument("--targets", type=Path, help=".npy targets for --features: [N] or [N, O]")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output dataset directory")
    parser.add_argument("--task", choices=TASKS, help="required for --features/--npz; --csv is regression")
    parser.add_argument("--num-classes", type=int, help="classification: number of classes (default: max label + 1)")
    parser.add_argument("--val-fraction", type=float, help="write DIR/train and DIR/val, this fraction in val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val permutation for arrays (default 0)")
    parser.add_argument(
        "--series",
        action="store_true",
        help="CSV: store each series once with per-step targets (no window copies; windows are drawn at "
        "training time with data.window)",
    )
    parser.add_argument(
        "--series-column", help="CSV --series: one series per value of this column (rows in file order)"
    )
    parser.add_argument("--window", type=int, help="CSV: rows per window (sequence length)")
    parser.add_argument(
        "--ahead",
        dest="horizon",
        type=int,
        help="CSV windows: the target is the one value this many rows after the window's end (default 1)",
    )
    # The old spelling of --ahead: "horizon" means an H-step forecast everywhere else (data.horizon).
    parser.add_argument("--horizon", dest="old_horizon", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stride", type=int, help="CSV: rows between window starts (default 1)")
    parser.add_argument("--target-columns", help="CSV: comma-separated target columns")
    parser.add_argument(
        "--encoding", help="CSV: the file's text encoding, e.g. latin-1 or cp1252 (default utf-8; a BOM is allowed)"
    )
    parser.add_argument(
        "--feature-columns",
        help="CSV: comma-separated feature columns (default: all columns; with --series all but the target "
        "and series columns, possibly none)",
    )
    return parser


TABLE_OPTIONS = (
    "id_column", "time_column", "freq", "past_columns", "future_columns", "static_columns", "calendar",
    "missing", "memory_mb", "val_from", "val_last", "test_from", "test_last",
)  # fmt: skip


def _table_arguments(parser: argparse.ArgumentParser) -> None:
    table = parser.add_argument_group("--table (long format; docs/tables.md)")
    table.add_argument("--id-column", help="the series id (absent: the table is one series)")
    table.add_argument("--time-column", help="the timestamp (required with --table)")
    table.add_argument("--freq", help="pandas offset alias of the time step (h, D, W-SUN, MS, ...; default: inferred)")
    table.add_argument("--past-columns", help="covariates observed up to the forecast origin")
    table.add_argument("--future-columns", help="covariates known for the horizon too")
    table.add_argument("--static-columns", help="one value per series (text: a category; numbers: a value)")
    table.add_argument("--calendar", help="calendar features from the timestamps, e.g. hour,dayofweek,month (docs/tables.md)")
    table.add_argument("--missing", choices=MISSING_POLICIES, help="missing values and steps (default error)")
    table.add_argument("--memory-mb", type=int, help="the memory bound of the conversion in MiB (default 1024)")
    table.add_argument("--val-from", metavar="TIMESTAMP", help="steps at or after it are validation")
    table.add_argument("--val-last", type=int, metavar="N", help="the last N steps of each series are validation")
    table.add_argument("--test-from", metavar="TIMESTAMP", help="steps at or after it are test (after validation)")
    table.add_argument("--test-last", type=int, metavar="N", help="the last N steps of each series are test")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        summary = _run(args)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except (_UsageError, DataFormatError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _renamed_horizon(args: argparse.Namespace) -> None:
    """`--horizon`, the old name of `--ahead`: taken as it, with a warning (not next to `--ahead`)."""
    if args.old_horizon is None:
        return
    if args.horizon is not None:
        raise _UsageError("--horizon is the old name of --ahead; give only --ahead")
    print(
        "dist-gru prepare: warning: --horizon is now --ahead (the one target that many rows after each window; "
        "data.horizon is a multi-step forecast)",
        file=sys.stderr,
    )
    args.horizon = args.old_horizon


def _run(args: argparse.Namespace) -> dict:
    if args.check is not None:
        return _check(args.check)
    _renamed_horizon(args)
    _check_source_options(args)
    if args.table is not None:
        return _table(args)
    if args.features is None and args.targets is not None:
        raise _UsageError("--targets goes with --features (an .npz holds its own targets)")
    if args.out is None:
        raise _UsageError("--out DIR is required")
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        raise _UsageError(f"--val-fraction {args.val_fraction}; expected a number strictly between 0 and 1")
    if not 0 <= args.seed <= MAX_SEED:
        raise _UsageError(f"--seed {args.seed}; expected an integer in 0..{MAX_SEED}")
    if args.text is not None:
        if args.task is not None or args.num_classes is not None:
            raise _UsageError("--text writes byte tokens (next-byte prediction over 256 classes): drop --task/--num-classes")
        from dist_gru.data.streams import prepare_text

        return prepare_text(args.text, args.out, args.val_fraction)

    if args.csv is not None and args.series:
        task = args.task or "regression"
        if task == "regression" and args.num_classes is not None:
            raise _UsageError("--num-classes applies to --task classification")
        splits, num_classes = _csv_series_splits(args, task)
        return _write_splits(args.out, splits, task, num_classes)
    if args.csv is not None:
        if args.series_column is not None:
            raise _UsageError("--series-column goes with --series")
        if args.task not in (None, "regression"):
            raise _UsageError(f"--task {args.task}: CSV windows have regression targets; expected --task regression")
        if args.num_classes is not None:
            raise _UsageError("--num-classes applies to classification; CSV windows are regression")
        return _write_splits(args.out, _csv_splits(args), "regression", None)

    if args.features is not None and args.targets is None:
        return _unlabelled(args)
    if args.task is None:
        raise _UsageError(f"--task is required with --features/--npz; expected one of {', '.join(TASKS)}")
    if args.task == "regression" and args.num_classes is not None:
        raise _UsageError("--num-classes applies to --task classification")
    if args.features is not None:
        sequences, targets = _load_npy(args.features, args.targets)
        where, targets_where = str(args.features), str(args.targets)
    else:
        sequences, targets = _load_npz(args.npz)
        where = targets_where = str(args.npz)
    num_classes = _num_classes(targets, args, targets_where) if args.task == "classification" else None
    # Everything (finite features included) is checked on the whole input before any split is written.
    check_inputs(
        where,
        sequences,
        targets,
        task=args.task,
        num_classes=num_classes,
        scan_features=True,
        targets_where=targets_where,
    )
    if args.val_fraction is None:
        splits = {"": (sequences, targets)}
    else:
        splits = _random_split(sequences, targets, args.val_fraction, args.seed)
    return _write_splits(args.out, splits, args.task, num_classes)


def _check_source_options(args: argparse.Namespace) -> None:
    """Options of one source given with another (--table has its own check of the CSV ones)."""
    given = [f"--{name.replace('_', '-')}" for name in TABLE_OPTIONS if getattr(args, name) is not None]
    if args.table is None and given:
        raise _UsageError(f"{', '.join(given)} {'only applies' if len(given) == 1 else 'only apply'} to --table")
    csv_options = ("window", "horizon", "stride", "target_columns", "feature_columns", "series_column", "encoding")
    if args.csv is None and args.table is None:
        given = [f"--{name.replace('_', '-')}" for name in csv_options if getattr(args, name) is not None]
        given += ["--series"] if args.series else []
        if given:
            raise _UsageError(f"{', '.join(given)} {'only applies' if len(given) == 1 else 'only apply'} to --csv")


# ---------------------------------------------------------------------------------- array sources


def _load(file: Path, mmap: bool):
    if not file.is_file():
        raise DataFormatError(f"{file}: no such file")
    try:
        return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise DataFormatError(f"{file}: cannot be read with numpy.load: {err}") from None


def _as_nt_f(features: np.ndarray, what: str) -> np.ndarray:
    """[N, T, F] as is, [N, T] as [N, T, 1] (a view either way)."""
    if features.ndim == 2:
        return features[:, :, None]
    if features.ndim != 3:
        raise DataFormatError(f"{what}: shape {features.shape}; expected [N, T, F] or [N, T] (one feature)")
    return features


def _load_npy(features_file: Path, targets_file: Path) -> tuple[np.ndarray, np.ndarray]:
    features, targets = _load(features_file, mmap=True), _load(targets_file, mmap=False)
    for file, array in ((features_file, features), (targets_file, targets)):
        if not isinstance(array, np.ndarray):
            raise DataFormatError(f"{file}: is an .npz archive; use --npz for archives")
    features = _as_nt_f(features, str(features_file))
    if len(targets) != len(features):
        raise DataFormatError(
            f"{targets_file}: {len(targets)} targets (shape {targets.shape}) but {features_file} "
            f"holds {len(features)} sequences; expected one target per sequence"
        )
    return features, targets


def _unlabelled(args: argparse.Namespace) -> dict:
    """`--features` without `--targets`: new data to predict on, stored without targets or task."""
    given = [flag for flag, value in (("--task", args.task), ("--num-classes", args.num_classes),
                                      ("--val-fraction", args.val_fraction)) if value is not None]
    if given:
        raise _UsageError(f"{given[0]} applies to labelled data; --features without --targets stores unlabelled data")
    if args.out is None:
        raise _UsageError("--out DIR is required")
    features = _load(args.features, mmap=True)
    if not isinstance(features, np.ndarray):
        raise DataFormatError(f"{args.features}: is an .npz archive; use --npz for archives")
    sequences = _as_nt_f(features, str(args.features))
    write_features(args.out, sequences)
    return {"path": str(args.out), "num_sequences": len(sequences), "num_features": int(sequences.shape[2]), "target_kind": "none"}


def _load_npz(file: Path) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    archive = _load(file, mmap=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataFormatError(f"{file}: is a single .npy array; expected an .npz with `features` and `targets`")
    with archive:
        missing = [name for name in ("features", "targets") if name not in archive.files]
        if missing:
            found = ", ".join(archive.files) or "nothing"
            raise DataFormatError(f"{file}: missing array(s) {', '.join(missing)}; found: {found}")
        try:
            features = _as_nt_f(archive["features"], f"{file}: features")
            targets = archive["targets"]
            lengths = archive["lengths"] if "lengths" in archive.files else None
        except (ValueError, EOFError, OSError) as err:  # a corrupt member
            raise DataFormatError(f"{file}: cannot be read with numpy.load: {err}") from None
    if len(targets) != len(features):
        raise DataFormatError(
            f"{file}: {len(targets)} targets (shape {targets.shape}) but {len(features)} sequences in "
            "features; expected one target per sequence"
        )
    if lengths is None:
        return features, targets
    n, t_max = features.shape[:2]
    if lengths.shape != (n,) or lengths.dtype.kind not in "iu":
        raise DataFormatError(
            f"{file}: lengths has shape {lengths.shape}, dtype {lengths.dtype}; expected integers [N] = [{n}]"
        )
    bad = (lengths < 1) | (lengths > t_max)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataFormatError(f"{file}: lengths[{i}] = {lengths[i]}; expected 1 <= length <= T_max = {t_max}")
    return [features[i, :length] for i, length in enumerate(lengths.tolist())], targets


def _num_classes(targets: np.ndarray, args: argparse.Namespace, where: str) -> int:
    """--num-classes, or the largest label + 1 over the whole input (before any split)."""
    if args.num_classes is not None:
        return args.num_classes
    if targets.ndim != 1 or targets.size == 0 or targets.dtype.kind not in "iuf" or not np.isfinite(targets).all():
        raise DataFormatError(
            f"{where}: targets have shape {targets.shape}, dtype {targets.dtype}; classification expects "
            "[N] finite integer labels (the number of classes is their maximum + 1 unless --num-classes is given)"
        )
    return max(1, int(targets.max()) + 1)  # negative labels are reported by the range check


def _random_split(sequences, targets: np.ndarray, val_fraction: float, seed: int) -> dict:
    """A seeded permutation's first `val_fraction` go to val; each split keeps the original order."""
    n = len(targets)
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise DataFormatError(
            f"--val-fraction {val_fraction} of {n} sequences gives {n_val} validation and {n - n_val} "
            "training sequences; expected at least one in each"
        )
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])

    def take(index: np.ndarray):  # views of a (memory-mapped) [N, T, F] array: no copy of the features
        return [sequences[i] for i in index.tolist()], targets[index]

    return {"train": take(train), "val": take(val)}


# ------------------------------------------------------------------------------------ CSV source


def _columns(file: Path, option: str, value: str, header: list[str]) -> list[int]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise _UsageError(f"{option} is empty; available columns: {', '.join(header)}")
    unknown = [name for name in names if name not in header]
    if unknown:
        raise DataFormatError(
            f"{file}: {option}: unknown column(s) {', '.join(map(repr, unknown))}; available: {', '.join(header)}"
        )
    return [header.index(name) for name in names]


def _encoding(value: str | None) -> str:
    """The codec to open a CSV with: `--encoding`, UTF-8 by default (a leading BOM allowed)."""
    if value is None:
        return "utf-8-sig"
    try:
        name = codecs.lookup(value).name
    except LookupError:
        raise _UsageError(
            f"--encoding {value}: unknown encoding; expected a Python codec name such as utf-8, latin-1 or cp1252"
        ) from None
    return "utf-8-sig" if name == "utf-8" else name


def _undecodable(file: Path, encoding: str) -> tuple[int, int, int]:
    """(offset, line, value) of the first byte of `file` that `encoding` cannot decode; the file
    is read again in chunks, only to name the position (the text reader's error cannot)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset, line = 0, 1
    with file.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:  # err.object: bytes held back from the last chunk + chunk
                held = len(err.object) - len(chunk)
                line += chunk.count(b"\n", 0, max(0, err.start - held))
                return offset - held + err.start, line, err.object[err.start]
            if not chunk:
                return offset, line, 0  # not reached: the text reader failed, so some byte is bad
            offset, line = offset + len(chunk), line + chunk.count(b"\n")


@contextlib.contextmanager
def _csv_rows(file: Path, encoding: str) -> Iterator[Any]:
    """A `csv.reader` (RFC 4180 quoting) over `file`; an undecodable byte is a DataFormatError."""
    if not file.is_file():
        raise DataFormatError(f"{file}: no such file")
    try:
        with file.open(newline="", encoding=encoding) as f:
            yield csv.reader(f)
    except UnicodeDecodeError:
        offset, line, value = _undecodable(file, encoding)
        name = codecs.lookup(encoding).name.removesuffix("-sig")
        raise DataFormatError(
            f"{file}: not valid {name} (byte 0x{value:02x} at offset {offset}, line {line}); expected {name} text, "
            "or name the file's encoding with --encoding (e.g. --encoding latin-1)"
        ) from None


def _read_csv(
    file: Path, header: list[str], used: list[int], encoding: str, key_column: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """One pass over the data rows: the `used` columns as float64 [rows, len(used)] and the values of
    `key_column` (stripped; [] without one), or an error naming the line (and column) of the problem."""
    values, keys = pyarray.array("d"), []  # 8 bytes a value, not a Python float
    blank = None
    with _csv_rows(file, encoding) as reader:
        next(reader, None)  # the header
        for row in reader:
            line = reader.line_num
            if not row:  # blank lines may end the file; inside the data they would shift the timeline
                blank = blank or line
                continue
            if blank is not None:
                raise DataFormatError(
                    f"{file}: line {blank} is blank; a blank line in the data would shift the timeline: remove it"
                )
            if len(row) != len(header):
                raise DataFormatError(
                    f"{file}: line {line} has {len(row)} fields; expected {len(header)} (the header's)"
                )
            try:
                numbers = [float(row[c]) for c in used]
            except ValueError:
                numbers = []
            if len(numbers) != len(used) or not all(map(math.isfinite, numbers)):
                _raise_bad_number(file, header, used, row, line)
            values.extend(numbers)
            if key_column is not None:
                keys.append(row[key_column].strip())
    return np.frombuffer(values, dtype=np.float64).reshape(-1, len(used)), keys


def _raise_bad_number(file: Path, header: list[str], used: list[int], row: list[str], line: int) -> None:
    for c in used:
        try:
            value = float(row[c])
        except ValueError:
            raise DataFormatError(f"{file}: column {header[c]!r}, line {line}: {row[c]!r} is not a number") from None
        if not math.isfinite(value):
            raise DataFormatError(f"{file}: column {header[c]!r}, line {line}: {row[c]!r} is not finite")


def _windows(data: np.ndarray, window: int, horizon: int, stride: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Windows [n, window, F] (a view) and their target row indices, or None if none fits."""
    last_start = len(data) - window - horizon  # target row = start + window + horizon - 1 <= rows - 1
    if last_start < 0:
        return None
    starts = np.arange(0, last_start + 1, stride)
    views = np.lib.stride_tricks.sliding_window_view(data, window, axis=0)  # [rows - window + 1, F, window]
    return views[starts].transpose(0, 2, 1), starts + window + horizon - 1


def _csv_splits(args: argparse.Namespace) -> dict:
    file = args.csv
    if args.window is None or args.target_columns is None:
        raise _UsageError("--csv needs --window and --target-columns")
    horizon = 1 if args.horizon is None else args.horizon
    stride = 1 if args.stride is None else args.stride
    for option, value, low in (("--window", args.window, 1), ("--ahead", horizon, 0), ("--stride", stride, 1)):
        if value < low:
            raise _UsageError(f"{option} {value}; expected an integer >= {low}")
    encoding = _encoding(args.encoding)
    header = _csv_header(file, encoding)
    feature_cols = (
        list(range(len(header)))
        if args.feature_columns is None
        else _columns(file, "--feature-columns", args.feature_columns, header)
    )
    target_cols = _columns(file, "--target-columns", args.target_columns, header)
    used = sorted(set(feature_cols) | set(target_cols))
    data, _ = _read_csv(file, header, used, encoding)
    features, targets = data[:, [used.index(c) for c in feature_cols]], data[:, [used.index(c) for c in target_cols]]

    need = args.window + horizon
    parts = {"": (0, len(data))}
    if args.val_fraction is not None:  # split the rows first: no val window touches a train target
        cut = len(data) - round(len(data) * args.val_fraction)
        parts = {"train": (0, cut), "val": (cut, len(data))}
    splits = {}
    for name, (begin, end) in parts.items():
        cut_windows = _windows(features[begin:end], args.window, horizon, stride)
        if cut_windows is None:
            part = f"the {name} part (rows {begin}..{end - 1}) of " if name else ""
            raise DataFormatError(
                f"{file}: window {args.window} + ahead {horizon} needs at least {need} data rows; "
                f"{part}the series has {end - begin}"
            )
        windows, target_rows = cut_windows
        splits[name] = (windows, targets[begin:end][target_rows])
        where = f"{file} ({name} windows)" if name else f"{file} (windows)"
        check_inputs(where, *splits[name], task="regression", num_classes=None, scan_features=True)
    return splits


def _csv_header(file: Path, encoding: str) -> list[str]:
    with _csv_rows(file, encoding) as reader:
        header = [name.strip() for name in next(reader, [])]
    if not header or not any(header):
        raise DataFormatError(f"{file}: no header row; expected column names on the first line")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataFormatError(f"{file}: duplicate column name(s) {', '.join(map(repr, duplicated))} in the header")
    return header


def _csv_series_splits(args: argparse.Namespace, task: str) -> tuple[dict, int | None]:
    """Series mode: every series once, per-step targets aligned with the features, no windows."""
    file = args.csv
    window_options = (("--window", args.window), ("--ahead", args.horizon), ("--stride", args.stride))
    given = [flag for flag, value in window_options if value is not None]
    if given:
        raise _UsageError(
            f"{given[0]} cuts window copies; --series stores each series once and windows are drawn at training "
            "time (set data.window, data.horizon, data.window_stride in the config)"
        )
    if args.target_columns is None:
        raise _UsageError("--csv --series needs --target-columns")
    encoding = _encoding(args.encoding)
    header = _csv_header(file, encoding)
    target_cols = _columns(file, "--target-columns", args.target_columns, header)
    if task == "classification" and len(target_cols) != 1:
        raise _UsageError(f"--task classification takes one --target-columns column of labels; got {len(target_cols)}")
    series_col = None
    if args.series_column is not None:
        (series_col,) = _columns(file, "--series-column", args.series_column, header)
        if series_col in target_cols:
            raise _UsageError(f"--series-column {header[series_col]!r} is also a target column")
    if args.feature_columns is None:
        feature_cols = [c for c in range(len(header)) if c not in target_cols and c != series_col]
    else:
        feature_cols = _columns(file, "--feature-columns", args.feature_columns, header)
        if series_col in feature_cols:
            raise _UsageError(f"--series-column {header[series_col]!r} names the series; it cannot be a feature")
    used = sorted(set(feature_cols) | set(target_cols))
    data, keys = _read_csv(file, header, used, encoding, series_col)
    features = data[:, [used.index(c) for c in feature_cols]].astype(np.float32)
    targets = data[:, [used.index(c) for c in target_cols]]
    if len(data) == 0:
        raise DataFormatError(f"{file}: no data rows")
    if series_col is None:
        names, groups = [None], [np.arange(len(data))]
    else:
        names, first, inverse = np.unique(np.array(keys), return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # series in order of first appearance
        rows = np.argsort(inverse, kind="stable")  # rows grouped by series, file order inside
        groups = np.split(rows, np.cumsum(np.bincount(inverse))[:-1])
        names, groups = names[order].tolist(), [groups[i] for i in order]
    if task == "classification":
        targets = targets[:, 0]
        num_classes = _num_classes(targets, args, str(file))
    else:
        num_classes = None
    parts: dict[str, tuple[list, list]] = {"": ([], [])}
    if args.val_fraction is not None:
        parts = {"train": ([], []), "val": ([], [])}
    for name, rows in zip(names, groups, strict=True):
        if args.val_fraction is None:
            pieces = {"": rows}
        else:  # the last fraction of each series in time order: val is the future of train
            cut = len(rows) - round(len(rows) * args.val_fraction)
            label = f"series {name!r} ({len(rows)} rows)" if name is not None else f"the series ({len(rows)} rows)"
            if not 0 < cut < len(rows):
                raise DataFormatError(
                    f"{file}: --val-fraction {args.val_fraction} of {label} leaves {cut} training and "
                    f"{len(rows) - cut} validation rows; expected at least one in each"
                )
            pieces = {"train": rows[:cut], "val": rows[cut:]}
        for split, piece in pieces.items():
            parts[split][0].append(features[piece])
            parts[split][1].append(targets[piece])
    for split, (sequences, step_targets) in parts.items():
        where = f"{file} ({split} series)" if split else f"{file} (series)"
        check_inputs(
            where, sequences, step_targets, task=task, num_classes=num_classes, scan_features=True, target_kind="step"
        )
    return parts, num_classes


# ---------------------------------------------------------------------------------- table source


def _names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def _timestamp(option: str, value: str | None) -> int | None:
    """A cut's timestamp as ns since the epoch (a zoned one in UTC, as the table's times are)."""
    import pandas as pd

    if value is None:
        return None
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError):
        stamp = pd.NaT
    if stamp is pd.NaT:
        raise _UsageError(f"{option} {value!r}: not a timestamp; expected e.g. 2024-01-31 or 2024-01-31T13:00")
    return (stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp).as_unit("ns").value


def _table_cuts(args: argparse.Namespace) -> dict[str, tuple[str, int]]:
    cuts = {}
    for split in ("val", "test"):
        since, last = getattr(args, f"{split}_from"), getattr(args, f"{split}_last")
        if since is not None and last is not None:
            raise _UsageError(f"--{split}-from and --{split}-last: give one of them")
        if last is not None and last < 1:
            raise _UsageError(f"--{split}-last {last}; expected an integer >= 1")
        if since is not None:
            cuts[split] = ("from", _timestamp(f"--{split}-from", since))
        elif last is not None:
            cuts[split] = ("last", last)
    if "test" in cuts and "val" not in cuts:
        raise _UsageError("--test-from/--test-last need --val-from or --val-last (validation comes before test)")
    if cuts.get("val", ("",))[0] == cuts.get("test", ("",))[0] == "from" and cuts["test"][1] <= cuts["val"][1]:
        raise _UsageError(f"--test-from {args.test_from} is not after --val-from {args.val_from}")
    return cuts


def _table(args: argparse.Namespace) -> dict:
    """`--table`: check the options, then convert (dist_gru.data.table)."""
    from dist_gru.data.table import TableSpec, prepare_table
    from dist_gru.data.table_read import Roles
    from dist_gru.data.table_series import CALENDAR

    other = ["window", "horizon", "stride", "series_column", "feature_columns", "encoding", "num_classes", "val_fraction"]
    given = [f"--{name.replace('_', '-')}" for name in other if getattr(args, name) is not None] + ["--series"] * args.series
    if given:
        hint = " (cut in time with --val-from or --val-last)" if "--val-fraction" in given else ""
        raise _UsageError(f"{', '.join(given)} does not apply to --table{hint}")
    for option in ("out", "time_column"):
        if getattr(args, option) is None:
            raise _UsageError(f"--table needs --{option.replace('_', '-')}")
    if args.target_columns is None:  # new data to predict on: no targets, no task, no time cut
        given = [flag for flag in ("--task", "--val-from", "--val-last", "--test-from", "--test-last")
                 if getattr(args, flag[2:].replace("-", "_")) is not None]
        if given:
            raise _UsageError(f"{given[0]} needs --target-columns (without them the table is unlabelled data to predict on)")
    calendar = _names(args.calendar)
    unknown = [name for name in calendar if name not in CALENDAR]
    if unknown:
        raise _UsageError(f"--calendar {', '.join(unknown)}: unknown; expected some of {', '.join(CALENDAR)}")
    memory_mb = 1024 if args.memory_mb is None else args.memory_mb
    if memory_mb < 16:
        raise _UsageError(f"--memory-mb {memory_mb}; expected an integer >= 16")
    task = None if args.target_columns is None else args.task or "regression"
    roles = Roles(
        id=args.id_column,
        time=args.time_column,
        targets=_names(args.target_columns),
        past=_names(args.past_columns),
        future=_names(args.future_columns),
        static=_names(args.static_columns),
        label=task == "classification",
    )
    spec = TableSpec(args.table, args.out, roles, args.freq, calendar, args.missing or "error", memory_mb, task, _table_cuts(args))
    return prepare_table(spec)


# --------------------------------------------------------------------------------------- writing


def _write_splits(out: Path, splits: dict, task: str, num_classes: int | None) -> dict:
    """Write each split (one at DIR, or DIR/train and DIR/val) once every destination is checked."""
    destinations = {name: out / name if name else out for name in splits}
    for destination in destinations.values():
        check_destination(destination)
    summary: dict = {}
    for name, (sequences, targets) in splits.items():
        write_sequences(destinations[name], sequences, targets, task=task, num_classes=num_classes)
        info = {"path": str(destinations[name]), "num_sequences": len(targets)}
        if name:
            summary[name] = info
        else:
            summary.update(info)
    sequences, targets = next(iter(splits.values()))
    summary["num_features"] = int(sequences[0].shape[-1])
    summary["task"] = task
    if task == "classification":
        summary["num_classes"] = num_classes
    else:
        sample = targets[0] if isinstance(targets, list) else targets  # per-step: one array per series
        summary["target_dim"] = 1 if np.ndim(sample) == 1 else int(np.shape(sample)[1])
    if isinstance(targets, list):
        summary["target_kind"] = "step"
    return summary


def _check(path: Path) -> dict:
    if not (path / "meta.json").exists() and (path / "train" / "meta.json").exists():
        return {name: validate(path / name) for name in ("train", "val", "test") if (path / name).exists()}
    return validate(path, full=True)
