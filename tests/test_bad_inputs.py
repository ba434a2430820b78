"""Bad user input through the real CLI: one `error:` line, exit 2, nothing changed on disk.

    .venv/bin/pytest -q tests/test_bad_inputs.py -n 0

Configs that expand or nest without bound, non-UTF-8 files, out-of-range seeds, output paths
inside an input, malformed CSV, and the permissions of what the commands write.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PY, TINY, Result, assert_ok, assert_refused, cli, run, save_run, snapshot

from dist_gru.data import SequenceFileDataset, write_sequences
from dist_gru.model import GRUModel

# The real entry point with a limit on the process: a memory cap (so that an unbounded expansion
# fails fast instead of taking the shared machine's memory) and a umask.
LIMITED = (
    "import os, resource, sys\n"
    "limit, umask = int(sys.argv[1]), int(sys.argv[2], 8)\n"
    "if limit:\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "os.umask(umask)\n"
    "from dist_gru.cli import main\n"
    "sys.exit(main(sys.argv[3:]))\n"
)
MEMORY_CAP = 6 << 30  # torch's import maps ~2 GB of address space; a config needs far less than the rest


def limited_cli(*args: str, umask: int = 0o022, memory: int = MEMORY_CAP, timeout: float = 180) -> Result:
    """`dist-gru ARGS` with at most `memory` bytes of address space (0: no cap) and `umask`."""
    return run([PY, "-c", LIMITED, str(memory), f"{umask:o}", *args], timeout=timeout)




def one_error(result: Result, *fragments: str) -> str:
    """The single `error:` message of a refused command, which names every fragment, and is short."""
    err = assert_refused(result, *fragments)
    assert err.startswith("error: ") and err.count("error:") == 1, err[-3000:]
    assert len(err) < 2000, f"a {len(err)}-character message: {err[:500]}..."
    return err


# ------------------------------------------------------------------------------------- configs

LAUGHS = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)
]


@pytest.mark.parametrize(
    ("document", "line"),
    [
        ("\n".join(LAUGHS), 5),
        ("anchors:\n" + "\n".join(f"  {line}" for line in LAUGHS) + "\nlog:\n  tags: *a9", 6),
    ],
    ids=["top-level", "log.tags"],
)
def test_aliases_that_expand_a_config_are_refused(tmp_path: Path, document: str, line: int) -> None:
    config = tmp_path / "laughs.yaml"
    config.write_text(document + "\n")
    assert len(config.read_bytes()) < 600  # a few hundred bytes standing for 9**10 values
    result = limited_cli("train", "--config", str(config), f"train.run_dir={tmp_path / 'run'}")
    message = f"--config {config}: line {line}: this value holds 66,430 values (aliases *name expanded)"
    one_error(result, message, "at most 10,000")
    assert sorted(os.listdir(tmp_path)) == ["laughs.yaml"]


def test_recursive_alias_deep_nesting_and_non_utf8_configs(tmp_path: Path) -> None:
    (tmp_path / "deep.yaml").write_text("train:\n  max_steps: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "loop.yaml").write_text("log:\n  tags: &t [a, *t]\n")
    (tmp_path / "latin1.yaml").write_bytes("log:\n  notes: caf\xe9\n".encode("latin-1"))
    run_dir = f"train.run_dir={tmp_path / 'run'}"
    for name, message in (
        ("deep", "deep.yaml: line 2: nested deeper than 100 levels"),
        ("loop", "loop.yaml: line 2: alias *t refers to a collection that contains it"),
        ("latin1", "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 17, line 2); expected a UTF-8 file"),
    ):
        one_error(limited_cli("train", "--config", str(tmp_path / f"{name}.yaml"), run_dir), message)
    deep_override = limited_cli("train", run_dir, "log.tags=" + "[" * 3000 + "]" * 3000)
    one_error(deep_override, "log.tags: line 1: nested deeper than 100 levels")
    assert sorted(os.listdir(tmp_path)) == ["deep.yaml", "latin1.yaml", "loop.yaml"]


def test_seeds_have_a_range_and_long_values_are_shortened(tmp_path: Path) -> None:
    run_dir = f"train.run_dir={tmp_path / 'run'}"
    seeds = limited_cli("train", run_dir, "train.seed=99999999999999999999999", "data.seed=-1")
    one_error(
        seeds,
        "train.seed: Input should be less than or equal to 9223372036854775807 (got 99999999999999999999999)",
        "data.seed: Input should be greater than or equal to 0 (got -1)",
    )
    long_value = limited_cli("train", run_dir, "train.precision=" + "x" * 100_000)
    err = one_error(long_value, "train.precision: Input should be 'fp32', 'bf16' or 'fp16' (got 'xxxx")
    assert "xxx...xxx" in err  # the middle of the value is left out
    (tmp_path / "tags.yaml").write_text("log:\n  tags: [" + ", ".join(["1"] * 5000) + "]\n")
    many = limited_cli("train", "--config", str(tmp_path / "tags.yaml"), run_dir)
    err = one_error(many, "log.tags.19: Input should be a valid string (got 1)", "... and 4980 more problems")
    assert "log.tags.20:" not in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- outputs inside inputs


@pytest.fixture
def model_and_series(tmp_path: Path) -> tuple[str, Path]:
    """A forecast model (in RUN/model, with RUN/config.yaml) and a folder of series it can read."""
    rng = np.random.default_rng(0)
    features = [rng.standard_normal((n, 2)).astype(np.float32) for n in (9, 7, 12)]
    targets = [rng.standard_normal((n, 1)).astype(np.float32) for n in (9, 7, 12)]
    write_sequences(tmp_path / "series", features, targets, task="regression")
    torch.manual_seed(0)
    model = GRUModel(3, 8, head="forecast", horizon=2).eval()
    config = {"model": {"head": "forecast"}, "data": {"window": 6, "horizon": 2}}
    return save_run(tmp_path, model, config), tmp_path / "series"


def test_outputs_inside_an_input_are_refused(tmp_path: Path, model_and_series: tuple[str, Path]) -> None:
    model_dir, series = model_and_series
    (tmp_path / "link").symlink_to(series)  # a path that only resolves into the data
    before = snapshot(tmp_path)
    cases = [
        (["predict", "--data", str(series), "--out", str(series / "features.npy")], f"--data {series}"),
        (["predict", "--data", str(series), "--out", str(tmp_path / "link" / "x.npy")], f"--data {series}"),
        (["predict", "--data", str(series), "--out", f"{model_dir}/p.npy"], f"--model {model_dir}"),
        (["forecast", "--data", str(series), "--out", str(series / "targets.npy")], f"--data {series}"),
        (["export", "--format", "torchscript", "--out", f"{model_dir}/model.safetensors"], f"--model {model_dir}"),
    ]
    for args, names in cases:
        out = args[args.index("--out") + 1]
        one_error(cli(*args, "--model", model_dir, timeout=120), f"--out {out}: is inside {names}")
    assert snapshot(tmp_path) == before
    # next to the input, not inside it: written
    assert_ok(cli("forecast", "--model", model_dir, "--data", str(series), "--out", str(tmp_path / "f.npy")))
    assert np.load(tmp_path / "f.npy").shape == (3, 2, 1)


# -------------------------------------------------------------------------------------- CSV


def prepare_csv(tmp_path: Path, text: str | bytes, *args: str) -> Result:
    csv_file = tmp_path / "in.csv"
    csv_file.write_bytes(text if isinstance(text, bytes) else text.encode())
    return cli("prepare", "--csv", str(csv_file), "--out", str(tmp_path / "out"), *args, timeout=120)


SERIES = ["--series", "--series-column", "key", "--target-columns", "y"]


def test_quoted_csv_fields_are_parsed_as_csv(tmp_path: Path) -> None:
    text = 'key,x,y\n"s,0",1,2\n"s,1",3,4\n"s,0",5,6\n'
    summary = assert_ok(prepare_csv(tmp_path, text, *SERIES)).json_last_line()
    assert summary["num_sequences"] == 2
    data = SequenceFileDataset(tmp_path / "out")
    assert data[0]["x"].tolist() == [[1.0], [5.0]] and data[0]["y"].tolist() == [[2.0], [6.0]]
    assert data[1]["x"].tolist() == [[3.0]] and data[1]["y"].tolist() == [[4.0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("key,x,y\na,1,2\na,3,4,5\na,5,6\n", "in.csv: line 3 has 4 fields; expected 3 (the header's)"),
        ("key,x,y\na,1,2\n\na,5,6\n", "in.csv: line 3 is blank; a blank line in the data would shift the timeline"),
    ],
    ids=["extra-field", "blank-line"],
)
def test_malformed_csv_rows_are_refused_by_line(tmp_path: Path, text: str, message: str) -> None:
    one_error(prepare_csv(tmp_path, text, *SERIES), message)
    assert sorted(os.listdir(tmp_path)) == ["in.csv"]


def test_csv_encoding_is_checked_and_can_be_chosen(tmp_path: Path) -> None:
    text = "key,x,y\ncaf\xe9,1,2\ncaf\xe9,3,4\n\n".encode("latin-1")  # a trailing blank line is allowed
    one_error(
        prepare_csv(tmp_path, text, *SERIES),
        f"{tmp_path / 'in.csv'}: not valid utf-8 (byte 0xe9 at offset 11, line 2)",
        "--encoding",
    )
    assert sorted(os.listdir(tmp_path)) == ["in.csv"]
    summary = assert_ok(prepare_csv(tmp_path, text, *SERIES, "--encoding", "latin-1")).json_last_line()
    assert summary["num_sequences"] == 1
    one_error(prepare_csv(tmp_path, text, *SERIES, "--encoding", "klingon"), "--encoding klingon: unknown encoding")


def test_prepare_seed_has_a_range(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", features=np.zeros((10, 3, 1), np.float32), targets=np.zeros(10, np.float32))
    args = ["prepare", "--npz", str(tmp_path / "a.npz"), "--task", "regression", "--val-fraction", "0.2"]
    refused = cli(*args, "--out", str(tmp_path / "out"), "--seed", "-1", timeout=120)
    one_error(refused, "--seed -1; expected an integer in 0..9223372036854775807")
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]


# ------------------------------------------------------------------------------- permissions


def modes(root: Path) -> dict[str, int]:
    """{path relative to root ("" for root): permission bits}."""
    paths = [root, *sorted(root.rglob("*"))]
    return {str(p.relative_to(root)).strip("."): stat.S_IMODE(p.stat().st_mode) for p in paths}


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("x,y\n" + "".join(f"{i},{i % 3}\n" for i in range(20)))
    prepared = limited_cli(
        "prepare", "--csv", str(tmp_path / "in.csv"), "--series", "--target-columns", "y",
        "--val-fraction", "0.2", "--out", str(tmp_path / "data"), umask=0o022,
    )  # fmt: skip
    assert_ok(prepared)
    files = ("meta.json", "features.npy", "offsets.npy", "targets.npy")
    expected = {"": 0o755} | {split: 0o755 for split in ("train", "val")}
    expected |= {f"{split}/{name}": 0o644 for split in ("train", "val") for name in files}
    assert modes(tmp_path / "data") == expected

    run_dir = tmp_path / "run"
    trained = limited_cli(
        "train", *TINY, "train.max_steps=2", f"train.run_dir={run_dir}", umask=0o027, memory=0, timeout=300
    )
    assert_ok(trained)
    expected = {"": 0o750, "README.md": 0o640, "SHA256SUMS": 0o640, "config.json": 0o640, "model.safetensors": 0o640}
    assert modes(run_dir / "model") == expected
    assert json.loads((run_dir / "model" / "config.json").read_text())["hidden_size"] == 16
