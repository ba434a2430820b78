"""The file-backed sequence format `dist_gru.seq/v1`: write it, validate it, read it memory-mapped.

A dataset is a directory per split:

    meta.json      {"format": "dist_gru.seq/v1", "num_sequences": N, "num_features": F,
                    "task": "regression" | "classification", "target_dim": O | "num_classes": C,
                    "feature_dtype": "float32", "total_steps": S, "min_length": ..,
                    "max_length": .., "created_by": "dist_gru <version>"}
    features.npy   float32 [S, F]  all sequences concatenated along time
    offsets.npy    int64 [N + 1]   sequence i is features[offsets[i]:offsets[i + 1]]
    targets.npy    float32 [N, O] (regression) or int64 [N] (classification, labels in [0, C))

Write one from Python, then train on it:

    from dist_gru.data.files import SequenceFileDataset, collate_identity, write_sequences
    write_sequences("data/train", [x0, x1, ...], y, task="regression")
    ds = SequenceFileDataset("data/train")
    loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate_identity)

`SequenceFileDataset` never reads features.npy whole: it memory-maps it (Megatron-LM's indexed
dataset does the same), so a 4 GB file costs page cache, not process memory, and opening it is
O(N). Features are checked for finite values when written and by `validate(path, full=True)`
(`dist-gru prepare --check DIR`), not on every open.
"""

from __future__ import annotations

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

__all__ = [
    "FORMAT",
    "DataFormatError",
    "SequenceFileDataset",
    "collate_identity",
    "validate",
    "write_sequences",
]

FORMAT = "dist_gru.seq/v1"
TASKS = ("regression", "classification")
META_FILE, FEATURES_FILE, OFFSETS_FILE, TARGETS_FILE = "meta.json", "features.npy", "offsets.npy", "targets.npy"
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
) -> Path:
    """Validate `sequences` and `targets` and write them as a `dist_gru.seq/v1` dataset at `path`.

    `sequences` is a list of 2-D arrays [T_i, F] or one 3-D array [N, T, F] (fixed length);
    `targets` is [N] or [N, O] floats (regression, stored [N, O]) or [N] integer labels in
    [0, num_classes) (classification). The write is atomic: the files go into a temporary sibling
    directory that is renamed into place only once complete, so a failed write leaves nothing
    behind and an existing dataset at `path` is replaced only by a complete one. A non-empty
    directory at `path` that is not a dataset is never touched. Returns `path`.
    """
    path = Path(path)
    sequences, lengths, num_features, targets, num_classes = _check_inputs(
        f"writing {path}", sequences, targets, task=task, num_classes=num_classes, scan_features=False
    )
    check_destination(path)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    meta: dict[str, Any] = {
        "format": FORMAT,
        "num_sequences": len(lengths),
        "num_features": num_features,
        "task": task,
        **({"num_classes": num_classes} if task == "classification" else {"target_dim": int(targets.shape[1])}),
        "feature_dtype": "float32",
        "total_steps": int(offsets[-1]),
        "min_length": int(lengths.min()),
        "max_length": int(lengths.max()),
        "created_by": f"dist_gru {_version()}",
    }

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        features = open_memmap(
            staging / FEATURES_FILE, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), num_features)
        )
        _fill_features(features, sequences, offsets, f"writing {path}: sequences")
        features.flush()
        del features
        np.save(staging / OFFSETS_FILE, offsets)
        np.save(staging / TARGETS_FILE, targets)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


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


def _check_inputs(
    where: str,
    sequences: Any,
    targets: Any,
    *,
    task: Any,
    num_classes: Any,
    scan_features: bool,
    targets_where: str | None = None,
) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray, int, np.ndarray, int | None]:
    """The checks `write_sequences` makes on its inputs before writing; with `scan_features`, also
    the finiteness of the features (which the writer checks while copying them). Messages start
    with `where` (`targets_where` for the targets, if given).

    Returns (sequences, lengths, F, targets as stored, num_classes).
    """
    task, num_classes = _check_task(task, num_classes, where)
    sequences, lengths, num_features = _check_sequences(sequences, where)
    targets = _check_targets(targets, len(lengths), task, num_classes, targets_where or where)
    if scan_features:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for first_row, block in _feature_blocks(sequences, lengths):
            with np.errstate(over="ignore", invalid="ignore"):
                block = block.astype(np.float32, copy=False)
            if not np.isfinite(block).all():
                _raise_non_finite(block, first_row, offsets, f"{where}: sequences")
    return sequences, lengths, num_features, targets, num_classes


def _feature_blocks(sequences: list[np.ndarray] | np.ndarray, lengths: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row in features.npy, block [rows, F]): one sequence, or a few fixed-length ones."""
    if isinstance(sequences, np.ndarray):  # [N, T, F]
        n, t, f = sequences.shape
        per_block = max(1, _MAX_CHUNK_VALUES // (t * f))
        for first in range(0, n, per_block):
            yield first * t, sequences[first : first + per_block].reshape(-1, f)
        return
    first_row = 0
    for seq, length in zip(sequences, lengths.tolist(), strict=True):
        yield first_row, seq
        first_row += length


def _fill_features(
    features: np.ndarray, sequences: list[np.ndarray] | np.ndarray, offsets: np.ndarray, what: str
) -> None:
    """Copy the sequences into the preallocated [S, F] memmap block by block, checking finiteness."""
    for first_row, block in _feature_blocks(sequences, np.diff(offsets)):
        rows = features[first_row : first_row + len(block)]
        with np.errstate(over="ignore", invalid="ignore"):
            rows[...] = block
        if not np.isfinite(rows).all():
            _raise_non_finite(rows, first_row, offsets, what)


def _raise_non_finite(rows: np.ndarray, first_row: int, offsets: np.ndarray, what: str) -> None:
    row, feature = (int(v) for v in np.argwhere(~np.isfinite(rows))[0])
    step = first_row + row
    seq = int(np.searchsorted(offsets, step, side="right")) - 1
    raise DataFormatError(
        f"{what}: non-finite value {rows[row, feature]} in sequence {seq} at time step "
        f"{step - int(offsets[seq])}, feature {feature}; features must be finite (after conversion to float32)"
    )


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


def _check_sequences(sequences: Any, where: str) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray, int]:
    """Shapes and dtypes only (finiteness is checked while copying); returns (sequences, lengths, F)."""
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
        if t == 0 or f == 0:
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
            if num_features == 0:
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


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dist-gru")
    except metadata.PackageNotFoundError:
        return "dev"


# --------------------------------------------------------------------------------------- reading


class SequenceFileDataset(torch.utils.data.Dataset):
    """A `dist_gru.seq/v1` directory as a map-style dataset, memory-mapped, never read whole.

    `ds[i]` is `{"x": float32 [T_i, F], "y": float32 [O] or int64 [], "index": i}`.
    `ds.__getitems__(indices)` (what `DataLoader` calls with a batch of indices) returns one padded
    batch `{"x": float32 [B, T_max, F] zero-padded, "lengths": int64 [B], "y": float32 [B, O] or
    int64 [B], "index": int64 [B]}`, so the loader's `collate_fn` must be `collate_identity`.

    Opening validates meta.json, the three arrays' dtypes and shapes, the offsets and the targets
    (O(N) work); it does not scan features.npy (see `validate(path, full=True)`). Pickling keeps only
    the path and meta: a DataLoader worker reopens the memory maps on first use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        self.task: str = self.meta["task"]
        self.num_features: int = self.meta["num_features"]
        self.num_classes: int | None = self.meta.get("num_classes") if self.task == "classification" else None
        self.output_size: int = self.num_classes if self.task == "classification" else self.meta["target_dim"]
        self._open(check_contents=True)

    def _open(self, check_contents: bool) -> None:
        meta, n = self.meta, self.meta["num_sequences"]
        targets_shape = (n,) if self.task == "classification" else (n, self.output_size)
        targets_dtype = np.int64 if self.task == "classification" else np.float32
        self._features = _load_array(self.path / FEATURES_FILE, np.float32, (meta["total_steps"], self.num_features))
        self._targets = _load_array(self.path / TARGETS_FILE, targets_dtype, targets_shape)
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
            targets = np.asarray(self._targets)
            if self.task == "classification":
                _check_labels(targets, self.num_classes, f"{self.path / TARGETS_FILE}: targets")
            else:
                _check_finite_targets(targets, f"{self.path / TARGETS_FILE}: targets")

    def _ensure_open(self) -> None:
        if self._features is None:
            self._open(check_contents=False)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_features", "_feature_rows", "_targets", "_offsets", "_lengths"):
            state[key] = None
        return state

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

    def __getitem__(self, i: int) -> dict:
        self._ensure_open()
        i = self._index(i)
        x = np.array(self._feature_rows[self._offsets[i] : self._offsets[i + 1]])
        if self.task == "classification":
            y = torch.tensor(int(self._targets[i]), dtype=torch.int64)
        else:
            y = torch.from_numpy(np.array(self._targets[i]))
        return {"x": torch.from_numpy(x), "y": y, "index": i}

    def __getitems__(self, indices: list[int]) -> dict:
        """One zero-padded batch for `indices` (DataLoader's batched fast path; use `collate_identity`)."""
        self._ensure_open()
        n = len(self)
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < -n or index.max() >= n):
            bad = int(index[(index < -n) | (index >= n)][0])
            raise IndexError(f"index {bad} out of range for a dataset of {n} sequences")
        index = np.where(index < 0, index + n, index)
        rows = self._feature_rows
        starts, ends = self._offsets[index].tolist(), self._offsets[index + 1].tolist()
        sequences = [rows[start:end] for start, end in zip(starts, ends, strict=True)]
        batch = pad_batch(sequences, self._targets[index], index)
        self._release_pages()
        return batch

    def _release_pages(self) -> None:
        """Unmap the feature pages this process touched (the page cache keeps them).

        Linux counts every mapped file page in the process's RSS, and a read fault maps up to 64 KiB
        around it: over a run, reading random sequences of a 4 GB file would grow each rank's RSS
        towards 4 GB. Dropping the mapping after each batch (about 0.5 ms for a 4 GB file) keeps the
        per-process memory independent of the dataset size; the data stays cached for the next read."""
        mapping = getattr(self._features, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def feature_moments(self, chunk_steps: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and (population) std over all time steps: float32 [F] each.

        One streaming pass over features.npy in chunks of at most `chunk_steps` steps (and at most
        4 Mi values), each chunk's float64 mean and centred sum of squares merged with Chan et al.'s
        parallel formula, so large offsets do not cancel catastrophically.
        """
        self._ensure_open()
        count, mean, m2 = 0, np.zeros(self.num_features), np.zeros(self.num_features)
        for _, chunk in _chunks(self._feature_rows, chunk_steps):
            chunk_mean = chunk.mean(axis=0, dtype=np.float64)
            centred = chunk - chunk_mean  # float64
            chunk_m2 = np.einsum("ij,ij->j", centred, centred)
            total = count + len(chunk)
            delta = chunk_mean - mean
            mean = mean + delta * (len(chunk) / total)
            m2 = m2 + chunk_m2 + delta**2 * (count * len(chunk) / total)
            count = total
            self._release_pages()  # a streaming pass must not leave the whole file mapped
        return mean.astype(np.float32), np.sqrt(m2 / count).astype(np.float32)


def _chunks(rows: np.ndarray, chunk_steps: int) -> Iterator[tuple[int, np.ndarray]]:
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps={chunk_steps}; expected >= 1")
    step = max(1, min(chunk_steps, _MAX_CHUNK_VALUES // max(1, rows.shape[1])))
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
    if meta.get("task") not in TASKS:
        raise DataFormatError(
            f'{meta_file}: "task" is {meta.get("task")!r}; expected one of {", ".join(map(repr, TASKS))}'
        )
    size_key = "num_classes" if meta["task"] == "classification" else "target_dim"
    for key in ("num_sequences", "num_features", size_key, "total_steps"):
        if key not in meta:
            raise DataFormatError(f'{meta_file}: missing key "{key}" (a {meta["task"]} dataset needs it)')
        if not _is_int(meta[key]) or meta[key] < 1:
            raise DataFormatError(f'{meta_file}: "{key}" is {meta[key]!r}; expected an integer >= 1')
    for key in ("min_length", "max_length"):
        if key in meta and (not _is_int(meta[key]) or meta[key] < 1):
            raise DataFormatError(f'{meta_file}: "{key}" is {meta[key]!r}; expected an integer >= 1')
    if meta.get("feature_dtype") != "float32":
        raise DataFormatError(f'{meta_file}: "feature_dtype" is {meta.get("feature_dtype")!r}; expected "float32"')
    if meta["total_steps"] < meta["num_sequences"]:
        raise DataFormatError(
            f'{meta_file}: "total_steps" is {meta["total_steps"]} < "num_sequences" {meta["num_sequences"]}; '
            "every sequence has at least one step"
        )
    return meta


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
