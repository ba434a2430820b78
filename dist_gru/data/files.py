"""The file-backed sequence format `dist_gru.seq/v1`: write it, validate it, read it memory-mapped.

A dataset is a directory per split:

    meta.json      {"format": "dist_gru.seq/v1", "num_sequences": N, "num_features": F,
                    "task": "regression" | "classification", "target_dim": O | "num_classes": C,
                    "feature_dtype": "float32", "total_steps": S, "min_length": ..,
                    "max_length": .., "created_by": "dist_gru <version>"}
    features.npy   float32 [S, F]  all sequences concatenated along time
    offsets.npy    int64 [N + 1]   sequence i is features[offsets[i]:offsets[i + 1]]
    targets.npy    float32 [N, O] (regression) or int64 [N] (classification, labels in [0, C)),
                   or, with "target_kind": "step" in meta.json, one target per time step aligned
                   with features.npy: float32 [S, O] or int64 [S]

A step dataset (per-step labelling, series to forecast) may have no input features (F = 0): a
univariate series to forecast is its targets alone.

A token stream (a text as bytes, say) stores integer token ids instead of float features:
"feature_dtype": "uint8" or "int32", "num_features": 1, "vocab_size": V (every id in [0, V)),
"task": "classification", "num_classes": V, and "target_kind": "none": there is no targets.npy,
because such a stream is trained to predict its own next token (`data.targets: next`). Write one
with `dist_gru.data.streams.write_token_stream` or `dist-gru prepare --text FILE`.

Write one from Python, then train on it:

    from dist_gru.data.files import SequenceFileDataset, collate_identity, write_sequences
    write_sequences("data/train", [x0, x1, ...], y, task="regression")
    write_sequences("data/steps", [x0, x1, ...], [labels0, labels1, ...], task="classification", num_classes=3)
    ds = SequenceFileDataset("data/train")
    loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate_identity)

`SequenceFileDataset` never reads features.npy whole: it memory-maps it (Megatron-LM's indexed
dataset does the same), so a 4 GB file costs page cache, not process memory, and opening it is
O(N) (plus one chunked pass over per-step targets, which are validated on every open). Features are checked for finite values when written and by `validate(path, full=True)`
(`dist-gru prepare --check DIR`), not on every open.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import operator
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap

from dist_gru.data.batching import collate_identity, pad_batch
from dist_gru.data.statics import Statics

__all__ = [
    "FORMAT",
    "DataFormatError",
    "SequenceFileDataset",
    "collate_identity",
    "data_fingerprint",
    "validate",
    "write_sequences",
]

FORMAT = "dist_gru.seq/v1"
TASKS = ("regression", "classification")
TARGET_KINDS = ("sequence", "step")
# "none": no targets.npy; only token streams (trained on their next token) have none.
STORED_KINDS = (*TARGET_KINDS, "none")
FEATURE_DTYPES = ("float32", "uint8", "int32")
TOKEN_DTYPES = ("uint8", "int32")
META_FILE, FEATURES_FILE, OFFSETS_FILE, TARGETS_FILE = "meta.json", "features.npy", "offsets.npy", "targets.npy"
# Optional per-series arrays, O(N) each, listed in meta.json's "series_arrays" (written by
# `dist-gru prepare --table`): name -> (dtype, None for fixed-width unicode; width: None for [N]).
SERIES_ARRAYS = {
    "series_ids": (None, None),  # str [N]
    "series_start": ("int64", None),  # ns since the epoch of each series' first step
    "static_categories": ("int64", "category"),  # [N, Sc]: the code of each categorical static column
    "static_values": ("float32", "value"),  # [N, Sn]: numeric static columns
    "eval_from": ("int64", None),  # the first step whose target is in this split's evaluation period
}
FEATURE_ROLES = ("past", "future")
MISSING_POLICIES = ("error", "ffill", "interpolate", "mask")
# Chunks of features.npy read by the streaming passes stay below this many values (32 MiB as
# float64), whatever the number of features.
_MAX_CHUNK_VALUES = 1 << 22


class DataFormatError(ValueError):
    """A problem with user data: the message names the file or argument, the value, what is expected."""


# --------------------------------------------------------------------------------------- writing


def write_sequences(
    path: str | os.PathLike,
    sequences: Sequence[np.ndarray] | np.ndarray,
    targets: np.ndarray | Sequence,
    *,
    task: str,
    num_classes: int | None = None,
    target_kind: str | None = None,
) -> Path:
    """Validate `sequences` and `targets` and write them as a `dist_gru.seq/v1` dataset at `path`.

    `sequences` is a list of 2-D arrays [T_i, F] or one 3-D array [N, T, F] (fixed length);
    `targets` is [N] or [N, O] floats (regression, stored [N, O]) or [N] integer labels in
    [0, num_classes) (classification). A list of numpy arrays, one per sequence, of [T_i] or
    [T_i, O] (regression) or [T_i] labels (classification) gives per-step targets instead (a step
    dataset; its sequences may have F = 0 features). `target_kind` ("sequence" | "step") says
    which explicitly; by default a list of numpy arrays is per step and anything else per
    sequence. Long arrays (even memory-mapped ones) are copied in bounded chunks. The write is atomic: the files go into a temporary sibling
    directory that is renamed into place only once complete, so a failed write leaves nothing
    behind and an existing dataset at `path` is replaced only by a complete one. A non-empty
    directory at `path` that is not a dataset is never touched. Returns `path`.
    """
    path = Path(path)
    where = f"writing {path}"
    sequences, lengths, num_features, targets, num_classes, target_dim, kind = check_inputs(
        where, sequences, targets, task=task, num_classes=num_classes, scan_features=False, target_kind=target_kind
    )
    check_destination(path)
    labels = {
        "task": task,
        **({"num_classes": num_classes} if task == "classification" else {"target_dim": target_dim}),
        **({"target_kind": "step"} if kind == "step" else {}),
    }
    offsets, meta = _layout(lengths, num_features, labels)
    with staged_dataset(path, meta) as staging:
        _write_rows(staging, sequences, offsets, num_features, where)
        if kind == "step":
            shape = (int(offsets[-1]),) if task == "classification" else (int(offsets[-1]), target_dim)
            dtype = np.int64 if task == "classification" else np.float32
            stored = open_memmap(staging / TARGETS_FILE, mode="w+", dtype=dtype, shape=shape)
            _fill_step_targets(stored, targets, offsets, task, num_classes, f"{where}: targets")
            stored.flush()
            del stored
        else:
            np.save(staging / TARGETS_FILE, targets)
    return path


def write_features(path: str | os.PathLike, sequences: Sequence[np.ndarray] | np.ndarray) -> Path:
    """Unlabelled sequences (`[T_i, F]` each, or one [N, T, F] array) as a `dist_gru.seq/v1` dataset
    without targets (`"target_kind": "none"`, no task): new data to `dist-gru predict` on. Checked and
    written atomically like `write_sequences`; returns `path`."""
    path, where = Path(path), f"writing {path}"
    sequences, lengths, num_features = _check_sequences(sequences, where)
    check_destination(path)
    offsets, meta = _layout(lengths, num_features, {"target_kind": "none"})
    with staged_dataset(path, meta) as staging:
        _write_rows(staging, sequences, offsets, num_features, where)
    return path


def _layout(lengths: np.ndarray, num_features: int, labels: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """(offsets, meta.json) of sequences of `lengths`; `labels` says what targets they have."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    meta = {
        "format": FORMAT,
        "num_sequences": len(lengths),
        "num_features": num_features,
        **labels,
        "feature_dtype": "float32",
        "total_steps": int(offsets[-1]),
        "min_length": int(lengths.min()),
        "max_length": int(lengths.max()),
        "created_by": f"dist_gru {package_version()}",
    }
    return offsets, meta


def _write_rows(staging: Path, sequences: Any, offsets: np.ndarray, num_features: int, where: str) -> None:
    """features.npy (every sequence's rows, copied in bounded chunks) and offsets.npy."""
    features = open_memmap(staging / FEATURES_FILE, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), num_features))
    _fill_features(features, sequences, offsets, f"{where}: sequences")
    features.flush()
    del features
    np.save(staging / OFFSETS_FILE, offsets)


@contextlib.contextmanager
def staged_dataset(path: Path, meta: dict[str, Any]) -> Iterator[Path]:
    """A temporary sibling folder to write a dataset's arrays into; on success `meta` is written
    and the folder renamed to `path` (the write is atomic), on failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    follow_umask(staging)
    try:
        yield staging
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only read it
    by setting it, which races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def follow_umask(path: str | os.PathLike) -> None:
    """Give `path` the permissions a new file (0666) or folder (0777) gets under the umask.

    mkstemp, mkdtemp and safetensors create private files and folders (0600 / 0700) so that a
    half-written one is nobody else's; renamed into place they would stay private."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~current_umask())


def check_destination(path: str | os.PathLike) -> None:
    """Raise unless `path` is absent, an empty directory, or a dataset that may be overwritten."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise DataFormatError(f"{path}: exists and is not a directory; refusing to overwrite it")
    if not any(path.iterdir()) or _is_dataset(path):
        return
    raise DataFormatError(
        f"{path}: is a non-empty directory but not a {FORMAT} dataset (no {META_FILE} with "
        f'"format": "{FORMAT}"); refusing to overwrite it: remove it or choose another path'
    )


def _is_dataset(path: Path) -> bool:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename the complete `staging` directory to `path`, keeping the old one until that worked."""
    if not path.exists():
        os.replace(staging, path)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, backup)  # `backup` is empty, so the rename may replace it
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def check_inputs(
    where: str,
    sequences: Any,
    targets: Any,
    *,
    task: Any,
    num_classes: Any,
    scan_features: bool,
    targets_where: str | None = None,
    target_kind: str | None = None,
) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray, int, Any, int | None, int | None, str]:
    """The checks `write_sequences` makes on its inputs before writing; with `scan_features`, also
    the finiteness of the features and per-step targets (which the writer checks while copying
    them). Messages start with `where` (`targets_where` for the targets, if given).

    Returns (sequences, lengths, F, targets, num_classes, target_dim (None for classification),
    target kind): per-sequence targets as stored, per-step ones as a list of arrays to copy.
    """
    task, num_classes = _check_task(task, num_classes, where)
    kind = _target_kind(targets, target_kind, where)
    sequences, lengths, num_features = _check_sequences(sequences, where, allow_no_features=kind == "step")
    targets_where = targets_where or where
    if kind == "step":
        targets, target_dim = _check_step_targets(targets, lengths, task, targets_where)
    else:
        targets = _check_targets(targets, len(lengths), task, num_classes, targets_where)
        target_dim = None if task == "classification" else int(targets.shape[1])
    if scan_features:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for first_row, block in _blocks(sequences, lengths):
            with np.errstate(over="ignore", invalid="ignore"):
                block = block.astype(np.float32, copy=False)
            if not np.isfinite(block).all():
                _raise_non_finite(block, first_row, offsets, f"{where}: sequences")
        if kind == "step":
            for first_row, block in _blocks(targets, lengths):
                _check_step_block(block, first_row, offsets, task, num_classes, f"{targets_where}: targets")
    return sequences, lengths, num_features, targets, num_classes, target_dim, kind


def _target_kind(targets: Any, target_kind: Any, where: str) -> str:
    if target_kind is not None:
        if target_kind not in TARGET_KINDS:
            raise DataFormatError(
                f"{where}: target_kind={target_kind!r}; expected one of {', '.join(map(repr, TARGET_KINDS))}"
            )
        return target_kind
    per_step = (
        isinstance(targets, (list, tuple))
        and len(targets) > 0
        and all(isinstance(t, np.ndarray) and t.ndim >= 1 for t in targets)
    )
    return "step" if per_step else "sequence"


def _blocks(arrays: list[np.ndarray] | np.ndarray, lengths: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row in the concatenated file, block [rows, ...]): a few fixed-length sequences, or one
    sequence in chunks of at most `_MAX_CHUNK_VALUES` values (so a long memory-mapped series is
    copied and checked without ever being read whole)."""
    if isinstance(arrays, np.ndarray):  # [N, T, ...]
        n, t = arrays.shape[:2]
        width = int(np.prod(arrays.shape[2:], dtype=np.int64))
        per_block = max(1, _MAX_CHUNK_VALUES // max(1, t * width))
        for first in range(0, n, per_block):
            yield first * t, arrays[first : first + per_block].reshape(-1, *arrays.shape[2:])
        return
    first_row = 0
    for seq, length in zip(arrays, lengths.tolist(), strict=True):
        width = int(np.prod(seq.shape[1:], dtype=np.int64))
        rows = max(1, _MAX_CHUNK_VALUES // max(1, width))
        for first in range(0, length, rows):
            yield first_row + first, seq[first : first + rows]
        first_row += length


def _fill_features(
    features: np.ndarray, sequences: list[np.ndarray] | np.ndarray, offsets: np.ndarray, what: str
) -> None:
    """Copy the sequences into the preallocated [S, F] memmap block by block, checking finiteness."""
    for first_row, block in _blocks(sequences, np.diff(offsets)):
        rows = features[first_row : first_row + len(block)]
        with np.errstate(over="ignore", invalid="ignore"):
            rows[...] = block
        if not np.isfinite(rows).all():
            _raise_non_finite(rows, first_row, offsets, what)


def _locate(offsets: np.ndarray, row: int) -> tuple[int, int]:
    """(sequence, time step within it) of a row of the concatenated arrays."""
    seq = int(np.searchsorted(offsets, row, side="right")) - 1
    return seq, row - int(offsets[seq])


def _raise_non_finite(rows: np.ndarray, first_row: int, offsets: np.ndarray, what: str) -> None:
    row, feature = (int(v) for v in np.argwhere(~np.isfinite(rows))[0])
    seq, step = _locate(offsets, first_row + row)
    raise DataFormatError(
        f"{what}: non-finite value {rows[row, feature]} in sequence {seq} at time step "
        f"{step}, feature {feature}; features must be finite (after conversion to float32)"
    )


def _fill_step_targets(
    stored: np.ndarray, targets: list[np.ndarray], offsets: np.ndarray, task: str, num_classes: int | None, what: str
) -> None:
    """Copy per-step targets into the preallocated [S, O] / [S] memmap block by block, checking each."""
    for first_row, block in _blocks(targets, np.diff(offsets)):
        rows = stored[first_row : first_row + len(block)]
        if task == "classification":
            _check_step_block(block, first_row, offsets, task, num_classes, what)
            rows[...] = block
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                rows[...] = block.reshape(len(block), -1)
            _check_step_block(rows, first_row, offsets, task, num_classes, what)


def _check_step_block(
    block: np.ndarray, first_row: int, offsets: np.ndarray, task: str, num_classes: int | None, what: str
) -> None:
    """Per-step targets of rows `first_row...`: finite regression values, or integer labels in range;
    a problem is reported with its sequence and time step."""
    if task == "regression":
        with np.errstate(over="ignore", invalid="ignore"):
            values = block.astype(np.float32, copy=False).reshape(len(block), -1)
        bad = ~np.isfinite(values)
        if bad.any():
            row, column = (int(v) for v in np.argwhere(bad)[0])
            seq, step = _locate(offsets, first_row + row)
            raise DataFormatError(
                f"{what}: non-finite value {values[row, column]} in sequence {seq} at time step {step}, "
                f"target {column}; regression targets must be finite (as float32)"
            )
        return
    if block.dtype.kind == "f":
        bad = ~(np.isfinite(block) & (block == np.round(block)))
        if bad.any():
            row = int(np.argmax(bad))
            seq, step = _locate(offsets, first_row + row)
            raise DataFormatError(
                f"{what}: label {block[row]} in sequence {seq} at time step {step} is not an integer; "
                "class labels must be integers"
            )
    bad = (block < 0) | (block >= num_classes)
    if bad.any():
        row = int(np.argmax(bad))
        seq, step = _locate(offsets, first_row + row)
        raise DataFormatError(
            f"{what}: label {block[row]} in sequence {seq} at time step {step} is out of range; "
            f"expected 0 <= label < num_classes={num_classes}"
        )


def _check_step_targets(targets: Any, lengths: np.ndarray, task: str, where: str) -> tuple[list[np.ndarray], int | None]:
    """Shapes and dtypes of per-step targets (values are checked while copying); returns the arrays
    and O (None for classification)."""
    what = f"{where}: targets"
    if isinstance(targets, np.ndarray):  # [N, T] or [N, T, O] for fixed-length [N, T, F] sequences
        if targets.ndim < 2:
            raise DataFormatError(
                f"{what} has shape {targets.shape}; per-step targets are one array per sequence ([T_i] or "
                "[T_i, O]), or [N, T] / [N, T, O] for fixed-length sequences"
            )
        targets = list(targets)
    elif isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
        raise DataFormatError(f"{what} is a {type(targets).__name__}; expected a list of per-step arrays")
    arrays = [np.asarray(t) for t in targets]
    if len(arrays) != len(lengths):
        raise DataFormatError(
            f"{what}: {len(arrays)} per-step target arrays; expected N={len(lengths)}, one per sequence"
        )
    target_dim = None
    for i, (array, length) in enumerate(zip(arrays, lengths.tolist(), strict=True)):
        item = f"{what}[{i}]"
        if task == "classification":
            if array.ndim != 1:
                raise DataFormatError(f"{item} has shape {array.shape}; expected [T_i] integer class labels per step")
            if array.dtype.kind not in "iuf":
                raise DataFormatError(f"{item}: dtype {array.dtype}; class labels must be integers")
        else:
            if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] == 0):
                raise DataFormatError(f"{item} has shape {array.shape}; expected [T_i] or [T_i, O] with O >= 1")
            _check_numeric(array, item)
            dim = 1 if array.ndim == 1 else array.shape[1]
            if target_dim is None:
                target_dim = dim
            elif dim != target_dim:
                raise DataFormatError(
                    f"{item} has {dim} targets per step (shape {array.shape}); expected {target_dim} like targets[0]"
                )
        if array.shape[0] != length:
            raise DataFormatError(
                f"{item} has {array.shape[0]} steps (shape {array.shape}) but sequence {i} has {length} steps; "
                "per-step targets need exactly one row per time step (for one target per sequence, pass an "
                "array [N] / [N, O] or target_kind='sequence')"
            )
    return arrays, target_dim


def _check_task(task: Any, num_classes: Any, where: str) -> tuple[str, int | None]:
    if task not in TASKS:
        raise DataFormatError(f"{where}: task={task!r}; expected one of {', '.join(map(repr, TASKS))}")
    if task == "regression":
        if num_classes is not None:
            raise DataFormatError(f"{where}: num_classes={num_classes!r} given for task='regression'; expected None")
        return task, None
    try:
        if isinstance(num_classes, bool):
            raise TypeError
        num_classes = operator.index(num_classes)
    except TypeError:
        raise DataFormatError(
            f"{where}: num_classes={num_classes!r}; task='classification' needs an integer number of classes >= 1"
        ) from None
    if num_classes < 1:
        raise DataFormatError(f"{where}: num_classes={num_classes}; expected an integer >= 1")
    return task, num_classes


def _check_numeric(array: np.ndarray, what: str) -> None:
    if array.dtype.kind not in "fiu":
        raise DataFormatError(f"{what}: dtype {array.dtype} is not numeric; expected a float array")


def _check_sequences(
    sequences: Any, where: str, allow_no_features: bool = False
) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray, int]:
    """Shapes and dtypes only (finiteness is checked while copying); returns (sequences, lengths, F).
    F = 0 is allowed for step datasets only (a series to forecast from its own history)."""
    if isinstance(sequences, np.ndarray):
        if sequences.ndim != 3:
            raise DataFormatError(
                f"{where}: sequences is one array of shape {sequences.shape}; expected a 3-D array "
                "[N, T, F] or a list of 2-D arrays [T_i, F]"
            )
        _check_numeric(sequences, f"{where}: sequences")
        n, t, f = sequences.shape
        if n == 0:
            raise DataFormatError(f"{where}: sequences has shape {sequences.shape}; expected at least one sequence")
        if t == 0 or (f == 0 and not allow_no_features):
            raise DataFormatError(
                f"{where}: sequences has shape {sequences.shape}; expected length T >= 1 and features F >= 1"
            )
        return sequences, np.full(n, t, dtype=np.int64), f
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__iter__"):
        raise DataFormatError(
            f"{where}: sequences is a {type(sequences).__name__}; expected a list of 2-D arrays [T_i, F] or a 3-D array"
        )
    arrays = [np.asarray(seq) for seq in sequences]
    if not arrays:
        raise DataFormatError(f"{where}: sequences is empty; expected at least one sequence")
    num_features = None
    for i, seq in enumerate(arrays):
        what = f"{where}: sequences[{i}]"
        if seq.ndim != 2:
            hint = " (use x[:, None] for a single feature)" if seq.ndim == 1 else ""
            raise DataFormatError(f"{what} has shape {seq.shape}; expected a 2-D array [T, F]{hint}")
        _check_numeric(seq, what)
        if seq.shape[0] == 0:
            raise DataFormatError(
                f"{what} has shape {seq.shape}: the sequence is empty; every sequence needs length >= 1"
            )
        if num_features is None:
            num_features = seq.shape[1]
            if num_features == 0 and not allow_no_features:
                raise DataFormatError(f"{what} has shape {seq.shape}; expected F >= 1 features")
        elif seq.shape[1] != num_features:
            raise DataFormatError(
                f"{what} has {seq.shape[1]} features (shape {seq.shape}); expected {num_features} like sequences[0]"
            )
    lengths = np.fromiter((len(seq) for seq in arrays), dtype=np.int64, count=len(arrays))
    return arrays, lengths, int(num_features)


def _check_targets(targets: Any, n: int, task: str, num_classes: int | None, where: str) -> np.ndarray:
    """Return targets as stored: float32 [N, O] (regression) or int64 [N] (classification)."""
    targets = np.asarray(targets)
    what = f"{where}: targets"
    if task == "classification":
        if targets.ndim != 1:
            raise DataFormatError(f"{what} has shape {targets.shape}; expected [N] = [{n}] integer class labels")
    elif targets.ndim not in (1, 2) or (targets.ndim == 2 and targets.shape[1] == 0):
        raise DataFormatError(f"{what} has shape {targets.shape}; expected [N] or [N, O] with O >= 1")
    if targets.shape[0] != n:
        raise DataFormatError(
            f"{what} has {targets.shape[0]} rows (shape {targets.shape}); expected N={n}, one per sequence"
        )
    if task == "regression":
        _check_numeric(targets, what)
        with np.errstate(over="ignore", invalid="ignore"):
            stored = targets.reshape(n, -1).astype(np.float32)
        _check_finite_targets(stored, what)
        return stored
    return _check_labels(targets, num_classes, what)


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    if labels.dtype.kind == "f":
        bad = ~(np.isfinite(labels) & (labels == np.round(labels)))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataFormatError(f"{what}[{i}] = {labels[i]} is not an integer; class labels must be integers")
    elif labels.dtype.kind not in "iu":
        raise DataFormatError(f"{what}: dtype {labels.dtype}; class labels must be integers")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataFormatError(
            f"{what}[{i}] = {labels[i]}: label out of range; expected 0 <= label < num_classes={num_classes}"
        )
    return labels.astype(np.int64)


def _check_finite_targets(targets: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(targets)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise DataFormatError(f"{what}[{i}, {j}] = {targets[i, j]}; regression targets must be finite (as float32)")


def package_version() -> str:
    """The installed dist-gru version (`dev` from a source checkout), for `created_by` in meta.json."""
    from importlib import metadata

    try:
        return metadata.version("dist-gru")
    except metadata.PackageNotFoundError:
        return "dev"


# --------------------------------------------------------------------------------------- reading


def meta_key(key: str, doc: str) -> property:
    """A read-only property: `meta.json`'s `key`, None when the folder has none."""
    return property(lambda self: self.meta.get(key), doc=doc)


class SequenceFileDataset(torch.utils.data.Dataset):
    """A `dist_gru.seq/v1` directory as a map-style dataset, memory-mapped, never read whole.

    `ds[i]` is `{"x": float32 [T_i, F], "y": float32 [O] or int64 [], "index": i}`.
    `ds.__getitems__(indices)` (what `DataLoader` calls with a batch of indices) returns one padded
    batch `{"x": float32 [B, T_max, F] zero-padded, "lengths": int64 [B], "y": float32 [B, O] or
    int64 [B], "index": int64 [B]}` (plus the series' static columns, `static_categories` int64
    [B, Sc] and `static_values` float32 [B, Sn], where `statics` holds them), so the loader's
    `collate_fn` must be `collate_identity`.
    A step dataset (`target_kind == "step"`) has `y` per step: `ds[i]["y"]` float32 [T_i, O] or
    int64 [T_i], a batch's float32 [B, T_max, O] or int64 [B, T_max], zero-padded.

    Opening validates meta.json, the three arrays' dtypes and shapes, the offsets and the targets
    (O(N) work, plus a chunked pass over per-step targets); it does not scan features.npy (see `validate(path, full=True)`). Pickling keeps only
    the path and meta: a DataLoader worker reopens the memory maps on first use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        # None for unlabelled data (target_kind "none", float features): predicted on, never trained on.
        self.task: str | None = self.meta.get("task")
        self.target_kind: str = self.meta.get("target_kind", "sequence")
        self.num_features: int = self.meta["num_features"]
        self.num_classes: int | None = self.meta.get("num_classes") if self.task == "classification" else None
        self.output_size: int | None = self.num_classes if self.task == "classification" else self.meta.get("target_dim")
        # Token streams only: ids in [0, vocab_size); None for float features.
        self.vocab_size: int | None = self.meta.get("vocab_size") if self.meta["feature_dtype"] in TOKEN_DTYPES else None
        self._open(check_contents=True)
        self._series_arrays = load_series_arrays(self.path, self.meta, self._lengths)
        # The static columns its batches carry (None: none, or ignored by data.static_covariates=false).
        self.statics: Statics | None = Statics.of(self)

    # Per-series facts of a dataset written by `dist-gru prepare --table` (docs/tables.md); each is
    # None for a dataset that does not have it. Arrays are read-only, O(N).

    @property
    def series_ids(self) -> np.ndarray | None:
        """str [N]: each series' id (the --id-column value)."""
        return self._series_arrays.get("series_ids")

    @property
    def series_start(self) -> np.ndarray | None:
        """int64 [N]: the timestamp of each series' first stored step, ns since the epoch (UTC)."""
        return self._series_arrays.get("series_start")

    @property
    def eval_from(self) -> np.ndarray | None:
        """int64 [N]: per series, the first step whose target is in this split's evaluation period
        (the steps before it are history); windows are drawn so their targets start there."""
        return self._series_arrays.get("eval_from")

    @property
    def static_categories(self) -> np.ndarray | None:
        """int64 [N, Sc]: per series, the code of each categorical static column (see `static`)."""
        return self._series_arrays.get("static_categories")

    @property
    def static_values(self) -> np.ndarray | None:
        """float32 [N, Sn]: per series, each numeric static column."""
        return self._series_arrays.get("static_values")

    # What `prepare --table` stores of the data, None for other folders (docs/tables.md).
    static = meta_key("static", 'The static columns: [{"name", "kind": "category" (with "vocabulary") | "value"}, ...].')
    freq = meta_key("freq", 'The pandas offset alias of the time step (e.g. "h", "D", "MS").')
    feature_names = meta_key("feature_names", "The name of each feature column.")
    feature_roles = meta_key("feature_roles", 'Per feature column: "past" (up to the forecast origin) or "future" (known ahead).')
    target_names = meta_key("target_names", "The name of each target column.")
    class_names = meta_key("class_names", "Classification: the name of each class id 0..C-1.")
    time_column = meta_key("time_column", "The table's time column.")
    id_column = meta_key("id_column", "The table's series id column.")

    @property
    def calendar(self) -> list[str]:
        """The calendar fields (`prepare --table --calendar`) whose columns follow from the timestamps."""
        return list(self.meta.get("calendar", []))

    def _check_token_ids(self) -> None:
        """Every token id in [0, vocab_size), in one chunked pass (a stream is checked like its targets)."""
        for first, chunk in _chunks(self._feature_rows, 1 << 22):
            bad = (chunk < 0) | (chunk >= self.vocab_size)
            if bad.any():
                row = int(np.argmax(bad.any(axis=1)))
                seq, step = _locate(self._offsets, first + row)
                raise DataFormatError(
                    f"{self.path / FEATURES_FILE}: token id {int(chunk[row, 0])} in sequence {seq} at step {step} "
                    f"is outside the vocabulary; expected 0 <= id < vocab_size={self.vocab_size}"
                )
            self.release_pages()

    def read_span(self, seq: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Steps ``[start, stop)`` of sequence ``seq``: its features (stored dtype, [steps, F]) and
        per-step targets ([steps, O] or [steps]; None without stored per-step targets). Views of the
        memory map: the caller copies what it keeps."""
        self._ensure_open()
        begin = int(self._offsets[seq])
        targets = None if self.target_kind != "step" else self._targets.view(np.ndarray)[begin + start : begin + stop]
        return self._feature_rows[begin + start : begin + stop], targets
    def _open(self, check_contents: bool) -> None:
        meta, n = self.meta, self.meta["num_sequences"]
        rows = meta["total_steps"] if self.target_kind == "step" else n
        targets_shape = (rows,) if self.task == "classification" else (rows, self.output_size)
        targets_dtype = np.int64 if self.task == "classification" else np.float32
        feature_dtype = np.dtype(meta["feature_dtype"])
        self._features = _load_array(self.path / FEATURES_FILE, feature_dtype, (meta["total_steps"], self.num_features))
        self._targets = (
            None if self.target_kind == "none" else _load_array(self.path / TARGETS_FILE, targets_dtype, targets_shape)
        )
        offsets_file = self.path / OFFSETS_FILE
        offsets = np.array(_load_array(offsets_file, np.int64, (n + 1,)))  # N + 1 values, read whole
        self._feature_rows = self._features.view(np.ndarray)  # plain view: cheaper to slice than a memmap
        self._offsets = offsets
        self._lengths = np.diff(offsets)
        if check_contents:
            _check_offsets(offsets, meta["total_steps"], offsets_file)
            for key, value in (("min_length", self._lengths.min()), ("max_length", self._lengths.max())):
                if key in meta and meta[key] != value:
                    raise DataFormatError(f"{self.path / META_FILE}: {key}={meta[key]}, but offsets.npy gives {value}")
            what = f"{self.path / TARGETS_FILE}: targets"
            if self.vocab_size is not None:
                self._check_token_ids()
            if self.target_kind == "none":
                pass
            elif self.target_kind == "step":
                for first, chunk in _chunks(self._targets.view(np.ndarray), 1 << 20):
                    _check_step_block(chunk, first, offsets, self.task, self.num_classes, what)
                    self.release_pages()
            elif self.task == "classification":
                _check_labels(np.asarray(self._targets), self.num_classes, what)
            else:
                _check_finite_targets(np.asarray(self._targets), what)

    def _ensure_open(self) -> None:
        if self._features is None:
            self._open(check_contents=False)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_features", "_feature_rows", "_targets", "_offsets", "_lengths"):
            state[key] = None
        return state

    @property
    def offsets(self) -> np.ndarray:
        """int64 [N + 1]: sequence i is time steps ``[offsets[i], offsets[i + 1])`` of the split."""
        self._ensure_open()
        return self._offsets

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N]: the length of every sequence."""
        self._ensure_open()
        return self._lengths

    def __len__(self) -> int:
        return self.meta["num_sequences"]

    def __repr__(self) -> str:
        return (
            f"SequenceFileDataset({str(self.path)!r}, N={len(self)}, F={self.num_features}, "
            f"task={self.task!r}, output_size={self.output_size})"
        )

    def _index(self, i: int) -> int:
        n = len(self)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} sequences")
        return i + n if i < 0 else i

    def _refuse_tokens(self) -> None:
        if self.vocab_size is not None:
            raise DataFormatError(
                f"{self.path}: is a token stream (feature_dtype {self.meta['feature_dtype']}, no stored targets); "
                "it trains in stream mode only: set train.tbptt, data.targets=next and model.vocab_size"
            )

    def __getitem__(self, i: int) -> dict:
        self._ensure_open()
        self._refuse_tokens()
        i = self._index(i)
        x = np.array(self._feature_rows[self._offsets[i] : self._offsets[i + 1]])
        if self.target_kind == "none":  # unlabelled
            return {"x": torch.from_numpy(x), "index": i}
        if self.target_kind == "step":
            y = torch.from_numpy(np.array(self._targets[self._offsets[i] : self._offsets[i + 1]]))
        elif self.task == "classification":
            y = torch.tensor(int(self._targets[i]), dtype=torch.int64)
        else:
            y = torch.from_numpy(np.array(self._targets[i]))
        return {"x": torch.from_numpy(x), "y": y, "index": i}

    def __getitems__(self, indices: list[int]) -> dict:
        """One zero-padded batch for `indices` (DataLoader's batched fast path; use `collate_identity`)."""
        self._ensure_open()
        self._refuse_tokens()
        n = len(self)
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < -n or index.max() >= n):
            bad = int(index[(index < -n) | (index >= n)][0])
            raise IndexError(f"index {bad} out of range for a dataset of {n} sequences")
        index = np.where(index < 0, index + n, index)
        rows = self._feature_rows
        starts, ends = self._offsets[index].tolist(), self._offsets[index + 1].tolist()
        sequences = [rows[start:end] for start, end in zip(starts, ends, strict=True)]
        if self.target_kind == "step":
            targets = self._targets.view(np.ndarray)
            batch = pad_batch(sequences, [targets[start:end] for start, end in zip(starts, ends, strict=True)], index)
        elif self.target_kind == "none":  # unlabelled: the batch has no `y`
            batch = pad_batch(sequences, None, index)
        else:
            batch = pad_batch(sequences, self._targets[index], index)
        self.release_pages()
        return batch if self.statics is None else {**batch, **self.statics.rows(index)}

    def read_steps(
        self, seq: np.ndarray, starts: np.ndarray, feature_steps: int, target_steps: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Steps `[t, t + feature_steps)` of the features and `[t, t + target_steps)` of the per-step
        targets of sequences `seq` at starts `t`, copied once into [B, feature_steps, F] and
        [B, target_steps, O] (or [B, target_steps]) arrays; the caller keeps every slice in range."""
        self._ensure_open()
        if self.target_kind != "step":
            raise DataFormatError(f"{self.path}: has one target per sequence; windows need per-step targets")
        first = self._offsets[np.asarray(seq, dtype=np.int64)] + np.asarray(starts, dtype=np.int64)
        features = np.empty((len(first), feature_steps, self.num_features), dtype=np.float32)
        targets_rows = self._targets.view(np.ndarray)
        targets = np.empty((len(first), target_steps, *targets_rows.shape[1:]), dtype=targets_rows.dtype)
        for row, begin in enumerate(first.tolist()):
            features[row] = self._feature_rows[begin : begin + feature_steps]
            targets[row] = targets_rows[begin : begin + target_steps]
        self.release_pages()
        return features, targets

    def release_pages(self) -> None:
        """Unmap the feature pages this process touched (the page cache keeps them).

        Linux counts every mapped file page in the process's RSS, and a read fault maps up to 64 KiB
        around it: over a run, reading random sequences of a 4 GB file would grow each rank's RSS
        towards 4 GB. Dropping the mapping after each batch (about 0.5 ms for a 4 GB file) keeps the
        per-process memory independent of the dataset size; the data stays cached for the next read."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        arrays = (self._features, self._targets) if self.target_kind == "step" else (self._features,)
        for array in arrays:
            mapping = getattr(array, "_mmap", None)
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)

    def step_blocks(
        self, first: int, last: int, block_steps: int, with_targets: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Rows ``[first, last)`` of the concatenated time steps in blocks of at most ``block_steps``:
        ``(features [b, F], per-step targets [b, ...] or None)``, views of the memory map; the pages
        are released after each block, so a streaming pass never holds the whole file mapped."""
        self._ensure_open()
        targets = self._targets.view(np.ndarray) if with_targets else None
        for begin in range(first, last, block_steps):
            end = min(begin + block_steps, last)
            yield self._feature_rows[begin:end], None if targets is None else targets[begin:end]
            self.release_pages()


def _chunks(rows: np.ndarray, chunk_steps: int) -> Iterator[tuple[int, np.ndarray]]:
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps={chunk_steps}; expected >= 1")
    width = int(np.prod(rows.shape[1:], dtype=np.int64))
    step = max(1, min(chunk_steps, _MAX_CHUNK_VALUES // max(1, width)))
    for first in range(0, len(rows), step):
        yield first, rows[first : first + step]


def validate(path: str | os.PathLike, full: bool = True) -> dict:
    """Open and validate the dataset at `path`; with `full`, also scan features.npy for non-finite
    values, chunk by chunk. Returns its meta; raises `DataFormatError` naming the first problem."""
    dataset = SequenceFileDataset(path)
    if full:
        for first, chunk in _chunks(dataset._feature_rows, 1 << 20):
            if not np.isfinite(chunk).all():
                _raise_non_finite(chunk, first, dataset._offsets, str(dataset.path / FEATURES_FILE))
    return dict(dataset.meta)


def data_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies the dataset at `path`, cheaply enough for terabytes: meta.json's fields (all
    but `created_by`, which a re-`prepare` by a newer release changes) and the size of every file.

    Reads meta.json and stats the arrays, never reads them: data replaced at the same path shows
    in its counts, lengths or sizes; an edit that keeps every one of them does not."""
    path = Path(path)
    fingerprint = {key: value for key, value in _read_meta(path).items() if key != "created_by"}
    for name in (FEATURES_FILE, OFFSETS_FILE, TARGETS_FILE):
        with contextlib.suppress(OSError):  # a missing file is reported when the dataset is opened
            fingerprint[f"{name} bytes"] = (path / name).stat().st_size
    return fingerprint


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataFormatError(f"{path}: {what}; expected a {FORMAT} dataset directory")
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise DataFormatError(
            f"{meta_file}: missing; {path} is not a {FORMAT} dataset (write one with "
            "dist_gru.data.files.write_sequences or `dist-gru prepare`)"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{meta_file}: not valid JSON (not UTF-8 text: {err})") from None
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{meta_file}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DataFormatError(f"{meta_file}: holds a JSON {type(meta).__name__}; expected an object")
    if meta.get("format") != FORMAT:
        raise DataFormatError(f'{meta_file}: "format" is {meta.get("format")!r}; expected {FORMAT!r}')
    unlabelled = meta.get("target_kind") == "none" and meta.get("feature_dtype") not in TOKEN_DTYPES
    if meta.get("task") not in TASKS and not (unlabelled and meta.get("task") is None):
        raise DataFormatError(
            f'{meta_file}: "task" is {meta.get("task")!r}; expected one of {", ".join(map(repr, TASKS))}'
        )
    if meta.get("target_kind", "sequence") not in STORED_KINDS:
        raise DataFormatError(
            f'{meta_file}: "target_kind" is {meta["target_kind"]!r}; expected one of '
            f"{', '.join(map(repr, STORED_KINDS))} (absent means sequence)"
        )
    size_key = {"classification": "num_classes", "regression": "target_dim"}.get(meta.get("task"))
    for key in ("num_sequences", "num_features", *([size_key] if size_key else []), "total_steps"):
        if key not in meta:
            raise DataFormatError(f'{meta_file}: missing key "{key}" (a {meta.get("task")} dataset needs it)')
        low = 0 if key == "num_features" and meta.get("target_kind") == "step" else 1
        if not _is_int(meta[key]) or meta[key] < low:
            raise DataFormatError(f'{meta_file}: "{key}" is {meta[key]!r}; expected an integer >= {low}')
    for key in ("min_length", "max_length"):
        if key in meta and (not _is_int(meta[key]) or meta[key] < 1):
            raise DataFormatError(f'{meta_file}: "{key}" is {meta[key]!r}; expected an integer >= 1')
    if meta.get("feature_dtype") not in FEATURE_DTYPES:
        raise DataFormatError(
            f'{meta_file}: "feature_dtype" is {meta.get("feature_dtype")!r}; expected one of '
            f"{', '.join(map(repr, FEATURE_DTYPES))}"
        )
    if meta["feature_dtype"] in TOKEN_DTYPES:
        vocab = meta.get("vocab_size")
        if not _is_int(vocab) or vocab < 2 or meta["num_features"] != 1:
            raise DataFormatError(
                f'{meta_file}: "feature_dtype" {meta["feature_dtype"]!r} is a token stream, which needs '
                f'"num_features": 1 and an integer "vocab_size" >= 2; got num_features={meta["num_features"]!r}, '
                f"vocab_size={vocab!r}"
            )
    if meta["total_steps"] < meta["num_sequences"]:
        raise DataFormatError(
            f'{meta_file}: "total_steps" is {meta["total_steps"]} < "num_sequences" {meta["num_sequences"]}; '
            "every sequence has at least one step"
        )
    _check_table_meta(meta, meta_file)
    return meta


def _check_names(meta: dict, key: str, size: int | None, meta_file: Path, allowed: tuple[str, ...] = ()) -> None:
    """An optional key holding a list of strings (of `size` entries; each one of `allowed` if given)."""
    if key not in meta:
        return
    value = meta[key]
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value) and (size is None or len(value) == size)
    if not ok or (allowed and any(v not in allowed for v in value)):
        each = f"one of {', '.join(map(repr, allowed))}" if allowed else "a string"
        count = f"{size} entries" if size is not None else "entries"
        raise DataFormatError(f'{meta_file}: "{key}" is {value!r}; expected a list of {count}, each {each}')


def _check_table_meta(meta: dict, meta_file: Path) -> None:
    """The optional keys `dist-gru prepare --table` writes; older datasets have none of them."""
    width = meta["num_features"]
    _check_names(meta, "feature_names", width, meta_file)
    _check_names(meta, "feature_roles", width, meta_file, FEATURE_ROLES)
    targets = 1 if meta.get("task") == "classification" else meta.get("target_dim")
    _check_names(meta, "target_names", targets, meta_file)
    if meta.get("task") == "classification":
        _check_names(meta, "class_names", meta["num_classes"], meta_file)
    elif "class_names" in meta:
        raise DataFormatError(f'{meta_file}: "class_names" given for a dataset without classes; expected none')
    _check_names(meta, "series_arrays", None, meta_file, tuple(SERIES_ARRAYS))
    _check_names(meta, "calendar", None, meta_file)
    for key in ("freq", "time_column", "id_column"):
        if key in meta and meta[key] is not None and not (isinstance(meta[key], str) and meta[key]):
            raise DataFormatError(f'{meta_file}: "{key}" is {meta[key]!r}; expected a non-empty string or null')
    if "static" in meta:
        _check_static_meta(meta["static"], meta_file)
    if "missing" in meta:
        missing = meta["missing"]
        counts = missing.get("filled") if isinstance(missing, dict) else None
        if (
            not isinstance(missing, dict)
            or missing.get("policy") not in MISSING_POLICIES
            or not isinstance(counts, dict)
            or not all(_is_int(v) and v >= 0 for v in counts.values())
        ):
            raise DataFormatError(
                f'{meta_file}: "missing" is {missing!r}; expected {{"policy": one of '
                f'{", ".join(map(repr, MISSING_POLICIES))}, "filled": {{column: count >= 0}}, ...}}'
            )


def _check_static_meta(static: Any, meta_file: Path) -> None:
    """"static": a list of {"name", "kind": "category" with a "vocabulary" of strings, or "value"}."""
    entries = static if isinstance(static, list) else [None]
    for entry in entries:
        ok = isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry.get("kind") in ("category", "value")
        if ok and entry["kind"] == "category":
            vocabulary = entry.get("vocabulary")
            ok = isinstance(vocabulary, list) and len(vocabulary) > 0 and all(isinstance(v, str) for v in vocabulary)
        if not ok:
            raise DataFormatError(
                f'{meta_file}: "static" entry {entry!r}; expected {{"name": str, "kind": "category", '
                '"vocabulary": [str, ...]}} or {"name": str, "kind": "value"}'
            )


def load_series_arrays(path: Path, meta: dict, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """The per-series arrays meta.json lists in "series_arrays", read whole (O(N)), validated and
    made read-only."""
    static = meta.get("static") or []
    widths = {kind: sum(entry["kind"] == kind for entry in static) for kind in ("category", "value")}
    arrays = {}
    for name in meta.get("series_arrays", []):
        file = path / f"{name}.npy"
        dtype, width = SERIES_ARRAYS[name]
        array = _load_small(file)
        shape = (len(lengths),) if width is None else (len(lengths), widths[width])
        dtype_ok = array.dtype.kind == "U" if dtype is None else array.dtype == np.dtype(dtype)
        if not dtype_ok or array.shape != shape:
            raise DataFormatError(
                f"{file}: dtype {array.dtype}, shape {array.shape}; expected {dtype or 'str'} of shape {shape} "
                f"according to {META_FILE}"
            )
        array.setflags(write=False)
        arrays[name] = array
    _check_series_values(path, arrays, static, lengths)
    return arrays


def _load_small(file: Path) -> np.ndarray:
    if not file.is_file():
        raise DataFormatError(f"{file}: missing; {META_FILE} lists it in \"series_arrays\"")
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise DataFormatError(f"{file}: cannot be read as a .npy array (truncated or corrupt?): {err}") from None


def _check_series_values(path: Path, arrays: dict[str, np.ndarray], static: list[dict], lengths: np.ndarray) -> None:
    """Values in range: eval_from within each series, category codes within their vocabularies."""
    eval_from = arrays.get("eval_from")
    if eval_from is not None:
        bad = (eval_from < 0) | (eval_from > lengths)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataFormatError(
                f"{path / 'eval_from.npy'}: eval_from[{i}] = {eval_from[i]}; expected 0 <= value <= the series' "
                f"length {lengths[i]}"
            )
    codes = arrays.get("static_categories")
    if codes is not None:
        sizes = np.array([len(e["vocabulary"]) for e in static if e["kind"] == "category"], dtype=np.int64)
        bad = (codes < 0) | (codes >= sizes)
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise DataFormatError(
                f"{path / 'static_categories.npy'}: [{i}, {j}] = {codes[i, j]}; expected a code in [0, {sizes[j]})"
            )


def _load_array(file: Path, dtype: type, shape: tuple[int, ...]) -> np.memmap:
    if not file.is_file():
        raise DataFormatError(
            f"{file}: missing; a {FORMAT} dataset needs {FEATURES_FILE}, {OFFSETS_FILE} and {TARGETS_FILE}"
        )
    with file.open("rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise DataFormatError(f"{file}: not a .npy file (it does not start with the .npy magic bytes)")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:  # what numpy raises for truncated or foreign files
        raise DataFormatError(f"{file}: cannot be read as a .npy array (truncated or corrupt?): {err}") from None
    if array.dtype != np.dtype(dtype):
        raise DataFormatError(f"{file}: dtype {array.dtype}; expected {np.dtype(dtype)}")
    if array.shape != shape:
        raise DataFormatError(f"{file}: shape {array.shape}; expected {shape} according to {META_FILE}")
    return array


def _check_offsets(offsets: np.ndarray, total_steps: int, file: Path) -> None:
    if offsets[0] != 0:
        raise DataFormatError(f"{file}: offsets[0]={offsets[0]}; expected 0")
    if offsets[-1] != total_steps:
        raise DataFormatError(
            f"{file}: offsets[-1]={offsets[-1]}; expected total_steps={total_steps} (the rows of {FEATURES_FILE})"
        )
    bad = np.diff(offsets) <= 0
    if bad.any():
        i = int(np.argmax(bad))
        what = "is empty" if offsets[i + 1] == offsets[i] else "has negative length"
        raise DataFormatError(
            f"{file}: offsets must be strictly increasing; offsets[{i + 1}]={offsets[i + 1]} <= "
            f"offsets[{i}]={offsets[i]} (sequence {i} {what})"
        )
