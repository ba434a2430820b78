"""Read an offline W&B run (``wandb/offline-run-*/run-<id>.wandb``) back from disk.

Test helper: wandb 0.31 ships no Python reader for its transaction log and an
offline run writes no ``wandb-summary.json`` / ``config.yaml``, so history,
config and summary exist only as protobuf records in the ``.wandb`` file.

File layout (wandb-core 0.31, ``core/internal/transactionlog`` +
``core/pkg/leveldb``, checked against files written by wandb 0.31.0):

* 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` as uint16 little-endian,
  version byte ``0``.  The header is part of block 0, so block 0 carries
  ``32768 - 7`` bytes of chunks.
* LevelDB log framing in 32 KiB blocks.  Each chunk: 7-byte header
  ``<IHB`` = (checksum, payload length, chunk type) then the payload.
  Types: FULL=1, FIRST=2, MIDDLE=3, LAST=4.  Chunks never cross a block
  boundary; a block tail shorter than 7 bytes is zero padding.
* Checksum: wandb uses ``leveldb.CRCAlgoIEEE`` for ``.wandb`` files, i.e. the
  plain IEEE CRC-32 (``zlib.crc32``) of the type byte followed by the payload,
  NOT LevelDB's masked CRC-32C.
* A record is the concatenation of its chunk payloads; it decodes as
  ``wandb.proto.wandb_internal_pb2.Record``.

Plain module, no package-relative imports: importable as ``wandb_reader`` or
``tests.wandb_reader``.
"""

from __future__ import annotations

import collections
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2 as pb

__all__ = [
    "OfflineRun",
    "find_offline_runs",
    "history_series",
    "read_records",
    "read_run",
    "read_runs",
]

FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FILE_VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")  # 7 bytes
CHUNK_HEADER = struct.Struct("<IHB")  # 7 bytes: checksum, length, type
BLOCK_SIZE = 32 * 1024

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_CHUNK_NAMES = {FULL: "FULL", FIRST: "FIRST", MIDDLE: "MIDDLE", LAST: "LAST"}

# wandb's internal bookkeeping key in config and summary.
_WANDB_INTERNAL_KEY = "_wandb"


@dataclass
class OfflineRun:
    """What one offline-run folder holds, decoded."""

    path: Path
    run_id: str
    project: str
    group: str = ""
    display_name: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    # Record.record_type oneof name -> count ("history", "run", "request", ...).
    record_types: dict[str, int] = field(default_factory=dict)
    # True when the run record says this folder continues an existing run
    # (``wandb.init(id=..., resume=...)``).
    resumed: bool = False


# --------------------------------------------------------------------------- #
# Finding runs
# --------------------------------------------------------------------------- #


def _natural_key(name: str) -> list[Any]:
    # Digits compare as numbers so a collision suffix "-10" sorts after "-2";
    # the fixed-width timestamp keeps its lexical (time) order.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def find_offline_runs(root: Path) -> list[Path]:
    """All ``offline-run-*`` directories under ``root`` (recursive), in time order.

    Folder names are ``offline-run-<YYYYmmdd_HHMMSS>-<id>``; wandb appends
    ``-1``, ``-2``... when a folder of that name already exists (a resumed
    run started within the same second), so name order is start-time order.
    """
    root = Path(root)
    found = [p for p in root.rglob("offline-run-*") if p.is_dir() and not p.is_symlink()]
    # Do not descend into a run's own folders (a run could log files named so).
    found = [p for p in found if not any(a.name.startswith("offline-run-") for a in p.parents)]
    return sorted(found, key=lambda p: _natural_key(p.name))


# --------------------------------------------------------------------------- #
# Low level: the .wandb transaction log
# --------------------------------------------------------------------------- #


def _check_file_header(data: bytes, where: Path) -> None:
    if len(data) < FILE_HEADER.size:
        raise ValueError(f"{where}: too short for a .wandb header ({len(data)} bytes)")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT:
        raise ValueError(f"{where}: bad ident {ident!r}, expected {FILE_IDENT!r}")
    if magic != FILE_MAGIC:
        raise ValueError(f"{where}: bad magic {magic:#06x}, expected {FILE_MAGIC:#06x}")
    if version != FILE_VERSION:
        raise ValueError(f"{where}: unsupported .wandb version {version}")


def _iter_payloads(data: bytes, where: Path):
    """Yield (offset of first chunk, reassembled record bytes)."""
    pos = FILE_HEADER.size
    end = len(data)
    pending: list[bytes] | None = None  # chunks of a FIRST..LAST record
    pending_at = -1
    while pos < end:
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            # Block trailer: too small for a chunk header; the writer zero-fills it.
            trailer = data[pos : pos + left_in_block]
            if trailer.strip(b"\0"):
                raise ValueError(f"{where}: non-zero block trailer at offset {pos}")
            pos += left_in_block
            continue
        if end - pos < CHUNK_HEADER.size:
            raise ValueError(f"{where}: truncated chunk header at offset {pos}")
        checksum, length, ctype = CHUNK_HEADER.unpack_from(data, pos)
        if checksum == 0 and length == 0 and ctype == 0:
            # Zeroed rest of a block (preallocated / mmapped file): LevelDB's
            # reader skips it between records.
            if pending is not None:
                raise ValueError(f"{where}: zeroed chunk inside a record at offset {pos}")
            pos += left_in_block
            continue
        start = pos + CHUNK_HEADER.size
        stop = start + length
        if length > left_in_block - CHUNK_HEADER.size:
            raise ValueError(f"{where}: chunk at offset {pos} (length {length}) overflows its block")
        if stop > end:
            raise ValueError(f"{where}: truncated chunk at offset {pos} (length {length})")
        payload = data[start:stop]
        computed = zlib.crc32(payload, zlib.crc32(bytes((ctype,))))
        if computed != checksum:
            raise ValueError(
                f"{where}: CRC mismatch in chunk at offset {pos}: stored {checksum:#010x}, computed {computed:#010x}"
            )
        if ctype == FULL or ctype == FIRST:
            if pending is not None:
                raise ValueError(
                    f"{where}: {_CHUNK_NAMES[ctype]} chunk at offset {pos} inside an "
                    f"unfinished record started at {pending_at}"
                )
            if ctype == FULL:
                yield pos, payload
            else:
                pending, pending_at = [payload], pos
        elif ctype == MIDDLE or ctype == LAST:
            if pending is None:
                raise ValueError(f"{where}: {_CHUNK_NAMES[ctype]} chunk at offset {pos} without a FIRST chunk")
            pending.append(payload)
            if ctype == LAST:
                yield pending_at, b"".join(pending)
                pending = None
        else:
            raise ValueError(f"{where}: unknown chunk type {ctype} at offset {pos}")
        pos = stop
    if pending is not None:
        raise ValueError(f"{where}: file ends inside a record started at offset {pending_at}")


def read_records(wandb_file: Path) -> list[pb.Record]:
    """Parse every record of a ``.wandb`` file.

    Strict: a bad header, CRC mismatch, bad framing, truncation or an
    undecodable record raises ``ValueError`` (no LevelDB-style recovery).
    """
    wandb_file = Path(wandb_file)
    data = wandb_file.read_bytes()
    _check_file_header(data, wandb_file)
    records = []
    for offset, payload in _iter_payloads(data, wandb_file):
        try:
            records.append(pb.Record.FromString(payload))
        except DecodeError as e:
            raise ValueError(f"{wandb_file}: record at offset {offset} does not decode: {e}") from e
    return records


# --------------------------------------------------------------------------- #
# High level: history, config, summary
# --------------------------------------------------------------------------- #


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _json(text: str) -> Any:
    return json.loads(text)  # accepts NaN / Infinity, as wandb writes them


def _history_value(item: pb.HistoryItem) -> Any:
    if item.value_json:
        return _json(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return _json(item.json)
    return getattr(item, kind)


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _remove_path(target: dict[str, Any], path: list[str]) -> None:
    node: Any = target
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _apply_items(target: dict[str, Any], rec: Any) -> None:
    """Apply a ConfigRecord / SummaryRecord (update + remove items) in order.

    A top-level ``key`` replaces the value; a ``nested_key`` path sets one leaf
    inside nested dicts (creating them), leaving siblings alone.
    """
    for item in rec.update:
        _set_path(target, _item_path(item), _json(item.value_json))
    for item in rec.remove:
        _remove_path(target, _item_path(item))


def _unwrap_config(config: dict[str, Any]) -> dict[str, Any]:
    """Undo the ``{"key": {"desc": ..., "value": ...}}`` wrapping of config.yaml style.

    Only when *every* top-level entry is wrapped, so a user key that merely
    happens to hold ``{"value": ...}`` is left alone.
    """
    if config and all(isinstance(v, dict) and "value" in v and set(v) <= {"value", "desc"} for v in config.values()):
        return {k: v["value"] for k, v in config.items()}
    return config


def _wandb_file_of(run_dir: Path) -> Path:
    if run_dir.is_file():
        return run_dir
    files = sorted(run_dir.glob("*.wandb"))
    if len(files) != 1:
        raise ValueError(f"{run_dir}: expected exactly one .wandb file, found {len(files)}")
    return files[0]


def read_run(run_dir: Path) -> OfflineRun:
    """Decode one ``offline-run-*`` folder (or a ``.wandb`` file directly).

    * history: one dict per history record; key = ``"/".join(nested_key)`` or
      ``key``; values json-decoded; ``_step`` from the items, or from the
      record's ``step.num`` when no ``_step`` item is present.
    * config: run record config then config records, merged in order; nested
      ``nested_key`` updates set leaves; removes applied; ``_wandb`` dropped;
      ``{"value": ...}`` wrapping undone if present.
    * summary: all summary updates/removes merged in order (last value wins);
      ``_wandb`` dropped.
    """
    run_dir = Path(run_dir)
    wandb_file = _wandb_file_of(run_dir)
    records = read_records(wandb_file)

    run_id = project = group = display_name = ""
    resumed = False
    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    counts: collections.Counter[str] = collections.Counter()

    for rec in records:
        kind = rec.WhichOneof("record_type")
        counts[kind or "<none>"] += 1
        if kind == "run":
            r = rec.run
            run_id = run_id or r.run_id
            project = project or r.project
            group = group or r.run_group
            display_name = display_name or r.display_name
            resumed = resumed or bool(r.resume) or bool(r.resumed)
            _apply_items(config, r.config)
            _apply_items(summary, r.summary)
        elif kind == "config":
            _apply_items(config, rec.config)
        elif kind == "summary":
            _apply_items(summary, rec.summary)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                row["/".join(_item_path(item))] = _history_value(item)
            if "_step" not in row and rec.history.HasField("step"):
                row["_step"] = rec.history.step.num
            history.append(row)

    config.pop(_WANDB_INTERNAL_KEY, None)
    config = _unwrap_config(config)
    summary.pop(_WANDB_INTERNAL_KEY, None)

    return OfflineRun(
        path=run_dir,
        run_id=run_id,
        project=project,
        group=group,
        display_name=display_name,
        history=history,
        config=config,
        summary=summary,
        record_types=dict(counts),
        resumed=resumed,
    )


def read_runs(root: Path) -> list[OfflineRun]:
    """``read_run`` for every ``find_offline_runs(root)`` folder, in time order."""
    return [read_run(p) for p in find_offline_runs(root)]


def history_series(run: OfflineRun, key: str) -> list[tuple[int, float]]:
    """(step, value) for every history row that has ``key``, in file order."""
    out = []
    for i, row in enumerate(run.history):
        if key not in row:
            continue
        if "_step" not in row:
            raise ValueError(f"history row {i} has {key!r} but no _step")
        value = row[key]
        if not isinstance(value, (int, float)):
            raise TypeError(f"history row {i}: {key!r} is {value!r}, not a number")
        out.append((int(row["_step"]), float(value)))
    return out
