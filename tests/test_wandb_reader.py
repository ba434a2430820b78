"""Tests for tests/wandb_reader.py against real offline runs written by wandb.

Runs are made in a subprocess (fresh env, no API key, offline, no git, console
capture off) so wandb's service process and its global state never live in
the pytest process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

try:
    from wandb_reader import (
        BLOCK_SIZE,
        find_offline_runs,
        history_series,
        read_records,
        read_run,
        read_runs,
    )
except ImportError:  # collected as part of a ``tests`` package
    from tests.wandb_reader import (
        BLOCK_SIZE,
        find_offline_runs,
        history_series,
        read_records,
        read_run,
        read_runs,
    )

from wandb.proto import wandb_internal_pb2 as pb

pytestmark = pytest.mark.timeout(120)

CONFIG = {"a": 1, "b": {"c": 2.5}, "s": "x"}
BIG = "y" * 100_000  # one ~100 KB record: FIRST + MIDDLE + LAST chunks over 4 blocks


def _offline_env(wandb_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(wandb_dir),
        WANDB_SILENT="true",
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
        WANDB_CONSOLE="off",
        WANDB_CONFIG_DIR=str(wandb_dir / ".config"),
        WANDB_CACHE_DIR=str(wandb_dir / ".cache"),
        WANDB_DATA_DIR=str(wandb_dir / ".data"),
    )
    return env


def _run_wandb(wandb_dir: Path, body: str) -> dict:
    """Run ``body`` with wandb imported in a fresh offline process; it must
    ``print(json.dumps(...))`` as its last line."""
    wandb_dir.mkdir(parents=True, exist_ok=True)
    script = "import json, wandb\n" + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=_offline_env(wandb_dir),
        cwd=wandb_dir,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    info = _run_wandb(
        root,
        f"""
        run = wandb.init(project="p", config={CONFIG!r})
        logged = []
        for step in range(5):
            row = {{"train/loss": 0.5 / (step + 1), "lr": 1e-3 * 0.9 ** step}}
            if step % 2 == 0:
                row["val"] = {{"acc": 0.1 * step}}
            run.log(row, step=step)
            logged.append((step, row))
        run.config.update({{"late": [1, 2], "big": "y" * 100_000}})
        run.summary["best"] = 0.125
        run_id = run.id
        run.finish()
        print(json.dumps({{"id": run_id, "logged": logged}}))
        """,
    )
    return root, info


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resumed")
    info = _run_wandb(
        root,
        """
        run = wandb.init(project="p", config={"a": 1})
        rid = run.id
        for step in range(5):
            run.log({"x": float(step)}, step=step)
        run.finish()
        run = wandb.init(project="p", id=rid, resume="allow", config={"a": 2})
        for step in range(5, 10):
            run.log({"x": float(step)}, step=step)
        run.finish()
        print(json.dumps({"id": rid}))
        """,
    )
    return root, info


# --------------------------------------------------------------------------- #
# Real runs
# --------------------------------------------------------------------------- #


def test_read_run_matches_what_was_logged(single_run):
    root, info = single_run
    (run_dir,) = find_offline_runs(root)
    assert run_dir.parent == root / "wandb"
    run = read_run(run_dir)

    assert run.run_id == info["id"]
    assert run.project == "p"
    assert not run.resumed
    assert run.config == {**CONFIG, "late": [1, 2], "big": BIG}
    assert run.summary["best"] == 0.125
    assert run.summary["_step"] == 4
    assert "_wandb" not in run.summary

    user_rows = [{k: v for k, v in row.items() if k not in ("_timestamp", "_runtime")} for row in run.history]
    expected = []
    for step, row in info["logged"]:
        flat = {"_step": step, "train/loss": row["train/loss"], "lr": row["lr"]}
        if "val" in row:
            # A nested dict is logged as nested_key ["val", "acc"].
            flat["val/acc"] = row["val"]["acc"]
        expected.append(flat)
    assert user_rows == expected  # exact float equality, value for value

    assert history_series(run, "train/loss") == [(s, r["train/loss"]) for s, r in info["logged"]]
    assert history_series(run, "val/acc") == [(0, 0.0), (2, 0.2), (4, 0.4)]
    assert history_series(run, "missing") == []

    assert run.record_types["history"] == 5
    assert run.record_types["run"] == 1
    assert run.record_types["header"] == 1
    assert run.record_types["exit"] == 1
    # The big config value made a record spanning several 32 KiB blocks.
    (wandb_file,) = run_dir.glob("*.wandb")
    assert wandb_file.stat().st_size > 3 * BLOCK_SIZE


def test_resumed_run_writes_second_folder_and_steps_continue(resumed_runs):
    root, info = resumed_runs
    dirs = find_offline_runs(root)
    assert len(dirs) == 2
    first, second = (read_run(d) for d in dirs)
    assert first.run_id == second.run_id == info["id"]
    assert all(d.name.startswith("offline-run-") and info["id"] in d.name for d in dirs)
    assert not first.resumed and second.resumed
    assert history_series(first, "x") == [(s, float(s)) for s in range(5)]
    assert history_series(second, "x") == [(s, float(s)) for s in range(5, 10)]
    # An offline resume does not see the earlier folder: its config is its own.
    assert first.config == {"a": 1} and second.config == {"a": 2}
    assert [r.run_id for r in read_runs(root)] == [info["id"]] * 2


def test_any_single_byte_corruption_is_detected(resumed_runs, tmp_path):
    root, _ = resumed_runs
    (src,) = find_offline_runs(root)[0].glob("*.wandb")
    good = src.read_bytes()
    assert good[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    assert len(read_records(src)) > 10
    bad_file = tmp_path / "bad.wandb"

    # Inside the payload of the first chunk: a CRC mismatch, named as such.
    bad = bytearray(good)
    bad[7 + 7 + 5] ^= 0x01
    bad_file.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="CRC mismatch"):
        read_records(bad_file)

    # Every byte of the file, flipped on its own, must be caught somewhere.
    undetected = []
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0xFF
        bad_file.write_bytes(bytes(bad))
        try:
            read_records(bad_file)
        except ValueError:
            continue
        undetected.append(i)
    assert undetected == []

    bad_file.write_bytes(good[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_records(bad_file)


def test_find_offline_runs_orders_and_filters(tmp_path, resumed_runs):
    root, _ = resumed_runs
    copy = tmp_path / "nested" / "deeper"
    shutil.copytree(root / "wandb", copy / "wandb", symlinks=True)
    names = [p.name for p in find_offline_runs(tmp_path)]
    assert names == [p.name for p in find_offline_runs(root)]
    assert names[1] > names[0] or names[1].startswith(names[0])
    # "-10" collision suffix sorts after "-2"; "latest-run" and files are ignored.
    for name in (
        "offline-run-20250101_000000-abc-10",
        "offline-run-20250101_000000-abc-2",
    ):
        (tmp_path / name).mkdir()
    (tmp_path / "offline-run-20250101_000000-zzz.txt").write_text("not a dir")
    got = [p.name for p in find_offline_runs(tmp_path)]
    assert got[:2] == [
        "offline-run-20250101_000000-abc-2",
        "offline-run-20250101_000000-abc-10",
    ]
    assert got[2:] == names


# --------------------------------------------------------------------------- #
# Synthetic files: framing corner cases and merge semantics
# --------------------------------------------------------------------------- #


def _frame(payloads: list[bytes]) -> bytes:
    """Write a .wandb file the way wandb-core's leveldb writer does."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for p in payloads:
        first = True
        while True:
            left = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if left < 7:
                out += b"\0" * left
                continue
            n = min(len(p), left - 7)
            chunk, p = p[:n], p[n:]
            last = not p
            ctype = (1 if last else 2) if first else (4 if last else 3)
            out += struct.pack("<IHB", zlib.crc32(bytes([ctype]) + chunk), n, ctype) + chunk
            first = False
            if last:
                break
    return bytes(out)


def _history_of_size(size: int, num: int) -> pb.Record:
    for pad in range(size, 0, -1):
        rec = pb.Record(num=num)
        item = rec.history.item.add()
        item.nested_key.append("pad")
        item.value_json = json.dumps("z" * pad)
        if len(rec.SerializeToString()) == size:
            return rec
    raise AssertionError(size)


def _config_item(target, path, value=None):
    item = target.add()
    if len(path) == 1:
        item.key = path[0]
    else:
        item.nested_key.extend(path)
    if value is not None:
        item.value_json = json.dumps(value)


def test_block_trailer_and_multi_chunk_records(tmp_path):
    # Record 1 leaves 3 bytes in block 0 (a trailer), record 2 spans 3 blocks,
    # record 3 ends exactly 7 bytes before a block end, so record 4 starts with
    # an empty FIRST chunk.
    r1 = _history_of_size(BLOCK_SIZE - 7 - 7 - 3, 1)
    r2 = _history_of_size(2 * BLOCK_SIZE + 100, 2)
    used = (7 + 7 + len(r1.SerializeToString()) + 3 + 3 * 7 + len(r2.SerializeToString())) % BLOCK_SIZE
    r3 = _history_of_size(BLOCK_SIZE - used - 7 - 7, 3)
    r4 = pb.Record(num=4, exit=pb.RunExitRecord(exit_code=0))
    records = [r1, r2, r3, r4]
    data = _frame([r.SerializeToString() for r in records])
    assert data[BLOCK_SIZE - 3 : BLOCK_SIZE] == b"\0\0\0"
    f = tmp_path / "run-x.wandb"
    f.write_bytes(data)
    assert read_records(f) == records

    f.write_bytes(data[: BLOCK_SIZE - 3] + b"\0\1\0" + data[BLOCK_SIZE:])
    with pytest.raises(ValueError, match="trailer"):
        read_records(f)


def test_config_summary_history_semantics(tmp_path):
    recs = []
    run = pb.Record(run=pb.RunRecord(run_id="rid", project="proj"))
    _config_item(run.run.config.update, ["_wandb"], {"cli_version": "0.31.0"})
    _config_item(run.run.config.update, ["a"], 1)
    _config_item(run.run.config.update, ["b"], {"c": 2.5, "d": {"e": 1}})
    recs.append(run)
    cfg = pb.Record()
    _config_item(cfg.config.update, ["b", "d", "f"], 2)  # nested leaf: siblings kept
    _config_item(cfg.config.update, ["b", "c"], 3.5)
    _config_item(cfg.config.update, ["n", "m"], "new")  # creates intermediate dicts
    _config_item(cfg.config.remove, ["a"])
    _config_item(cfg.config.remove, ["b", "d", "e"])
    recs.append(cfg)
    cfg2 = pb.Record()
    _config_item(cfg2.config.update, ["n"], [1])  # top-level key replaces whole value
    recs.append(cfg2)

    s1 = pb.Record()
    _config_item(s1.summary.update, ["_wandb", "runtime"], 3)
    _config_item(s1.summary.update, ["loss"], 1.0)
    _config_item(s1.summary.update, ["acc"], 0.5)
    s2 = pb.Record()
    _config_item(s2.summary.update, ["loss"], 0.25)
    _config_item(s2.summary.remove, ["acc"])
    recs += [s1, s2]

    h1 = pb.Record()  # no _step item: step.num is used
    h1.history.step.num = 7
    item = h1.history.item.add()
    item.key = "k"
    item.value_json = "NaN"
    h2 = pb.Record()  # typed (non-JSON) item values
    h2.history.item.add(nested_key=["_step"], integer=8)
    h2.history.item.add(nested_key=["val", "acc"], number=0.75)
    h2.history.item.add(key="t", text="hi")
    recs += [h1, h2]

    f = tmp_path / "run-rid.wandb"
    f.write_bytes(_frame([r.SerializeToString() for r in recs]))
    run = read_run(f)
    assert run.run_id == "rid" and run.project == "proj"
    assert run.config == {"b": {"c": 3.5, "d": {"f": 2}}, "n": [1]}
    assert run.summary == {"loss": 0.25}
    assert run.history[0]["_step"] == 7
    assert math.isnan(run.history[0]["k"])
    assert run.history[1] == {"_step": 8, "val/acc": 0.75, "t": "hi"}
    assert history_series(run, "val/acc") == [(8, 0.75)]
    with pytest.raises(TypeError):
        history_series(run, "t")
    assert run.record_types == {"run": 1, "config": 2, "summary": 2, "history": 2}


def test_wrapped_config_is_unwrapped_only_when_all_wrapped(tmp_path):
    def cfg_run(items):
        rec = pb.Record(run=pb.RunRecord(run_id="r", project="p"))
        for k, v in items.items():
            _config_item(rec.run.config.update, [k], v)
        f = tmp_path / "run-r.wandb"
        f.write_bytes(_frame([rec.SerializeToString()]))
        return read_run(f).config

    wrapped = {
        "_wandb": {"desc": None, "value": {"t": 1}},
        "a": {"desc": None, "value": 1},
        "b": {"value": {"c": 2.5}},
    }
    assert cfg_run(wrapped) == {"a": 1, "b": {"c": 2.5}}
    assert cfg_run({"a": {"value": 1}, "b": 2}) == {"a": {"value": 1}, "b": 2}


def test_bad_header_and_framing(tmp_path):
    f = tmp_path / "x.wandb"
    good = _frame([pb.Record(num=1).SerializeToString()])
    for data, msg in [
        (b":W&", "too short"),
        (b"LVDB" + good[4:], "ident"),
        (good[:4] + b"\0\0" + good[6:], "magic"),
        (good[:6] + b"\1" + good[7:], "version"),
        (good + struct.pack("<IHB", zlib.crc32(b"\3"), 0, 3), "without a FIRST"),
        (
            good + struct.pack("<IHB", zlib.crc32(b"\2x"), 1, 2) + b"x",
            "ends inside a record",
        ),
        (good + struct.pack("<IHB", zlib.crc32(b"\7"), 0, 7), "unknown chunk type"),
        (good + b"\xff\xff\xff\xff\xff\xff\x01", "overflows"),
        (good + b"\1\0", "truncated"),
        (_frame([b"\xff\xff\xff"]), "does not decode"),
    ]:
        f.write_bytes(data)
        with pytest.raises(ValueError, match=msg):
            read_records(f)
    f.write_bytes(good)
    assert read_records(f) == [pb.Record(num=1)]
    with pytest.raises(ValueError, match="exactly one"):
        read_run(tmp_path / "nothing-here")
