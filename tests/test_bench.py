"""`dist-gru bench` runs and prints its figures (the figures themselves are measured, not tested)."""

from __future__ import annotations

import json

import pytest
from conftest import assert_ok, cli, torchrun

pytestmark = pytest.mark.timeout(300)

SMALL = [
    "--steps",
    "5",
    "--warmup",
    "5",
    "--window",
    "5",
    "--rounds",
    "1",
    "model.hidden_size=16",
    "data.seq_len=10",
    "data.train_size=2000",
]
FIGURES = {
    "samples_per_s",
    "seq_steps_per_s",
    "median_step_s",
    "data_wait_frac",
    "peak_rss_mb",
    "gru_gflops",
    "matmul_gflops",
    "fraction_of_matmul",
    "padding_fraction",
    "startup_s",
}


def _report(stdout: str) -> dict:
    report = json.loads(stdout.strip().splitlines()[-1])
    for key in FIGURES:
        assert key in report and f"{key} " in stdout  # in the JSON line and in the table
    return report


def test_bench_one_process_against_the_bare_loop(tmp_path):
    result = assert_ok(cli("bench", "--compare-bare", "--run-dir", str(tmp_path / "b"), *SMALL))
    report = _report(result.stdout)
    assert report["world_size"] == 1 and report["global_batch_size"] == 64
    assert report["samples_per_s"] > 0 and report["bare_samples_per_s"] > 0
    assert report["ratio_vs_bare"] == pytest.approx(report["samples_per_s"] / report["bare_samples_per_s"], rel=1e-3)
    assert 0 < report["fraction_of_matmul"] == pytest.approx(report["gru_gflops"] / report["matmul_gflops"], rel=1e-2)


def test_bench_under_torchrun_two_processes(tmp_path):
    result = assert_ok(torchrun(2, "bench", "--compare-bare", "--run-dir", str(tmp_path / "b"), *SMALL))
    report = _report(result.stdout)
    assert report["world_size"] == 2 and report["global_batch_size"] == 128  # 64 per process
    assert result.stdout.count('{"world_size"') == 1  # printed by global rank 0 only


def test_bench_variable_length_files_with_bucketing(tmp_path):
    made = json.loads(assert_ok(cli("bench", "--make-files", str(tmp_path / "d"), "--files-mb", "4")).stdout)
    assert made["num_sequences"] >= 64 and (tmp_path / "d" / "meta.json").is_file()
    plain = _report(
        assert_ok(
            cli(
                "bench",
                "--run-dir",
                str(tmp_path / "b1"),
                *SMALL,
                "data.name=files",
                f"data.train_path={tmp_path / 'd'}",
            )
        ).stdout
    )
    bucketed = _report(
        assert_ok(
            cli(
                "bench",
                "--run-dir",
                str(tmp_path / "b2"),
                *SMALL,
                "data.name=files",
                f"data.train_path={tmp_path / 'd'}",
                "data.bucket_by_length=true",
            )
        ).stdout
    )
    assert bucketed["padding_fraction"] < plain["padding_fraction"] / 2


def test_the_bare_loop_runs_nothing_of_dist_gru():
    """The comparison loop is independent: while it trains, no function of the package runs except
    its own (in bench.py), so the ratio compares our loop with a hand-written one."""
    import sys
    from pathlib import Path

    import torch

    import dist_gru
    from dist_gru.bench import run_bare
    from dist_gru.config import load_config

    package = Path(dist_gru.__file__).parent
    called: set[str] = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(str(package)):
            called.add(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")

    cfg = load_config(None, ["model.hidden_size=8", "data.seq_len=6", "train.global_batch_size=4"])
    sys.setprofile(profile)
    try:
        samples_per_s = run_bare(cfg, num_features=3, steps=3, warmup=1, device=torch.device("cpu"))
    finally:
        sys.setprofile(None)
    assert samples_per_s > 0
    assert called == {"bench.py:run_bare", "bench.py:__init__", "bench.py:forward", "bench.py:_sum_over_ranks"}


def test_the_sweep_covers_both_axes_and_draws_its_table_and_curves(tmp_path):
    from dist_gru.sweep import bench_command, figure, points, table

    sweep = points(quick=True)
    assert len(sweep) == (3 + 3) * 2 * 2  # values x processes x precisions
    assert {p["precision"] for p in points(quick=True, precisions=("fp32",))} == {"fp32"}
    two = next(p for p in sweep if p["processes"] == 2 and p["axis"] == "seq_len" and p["value"] == 2000)
    cmd = bench_command(two, tmp_path / "b", steps=10)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node" in cmd
    assert {
        "data.seq_len=2000",
        "model.hidden_size=128",
        "train.threads=1",
        "train.precision=" + two["precision"],
    } <= set(cmd)
    rows = [
        {
            **{k: p[k] for k in ("axis", "value", "processes", "precision")},
            "samples_per_s": 100.0 * (i + 1),
            "median_step_s": 0.01,
            "fraction_of_matmul": 0.5,
            "data_wait_frac": 0.01,
        }
        for i, p in enumerate(sweep)
    ]
    text = table(rows)
    assert text.count("\n") == len(rows) + 2 and "| seq_len | 2000 | 2 |" in text
    figure(rows, "t").savefig(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_stream_mode_against_window_mode_under_torchrun(tmp_path):
    import numpy as np

    from dist_gru.data.files import write_sequences

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4000, 4)).astype(np.float32), rng.standard_normal((4000, 1)).astype(np.float32)
    write_sequences(tmp_path / "s", [x], [y], task="regression")
    args = ["bench", "--run-dir", str(tmp_path / "b"), *SMALL[:8], "--compare-window", "--checkpoint-every", "5"]
    args += ["model.hidden_size=16", "data.name=files", f"data.train_path={tmp_path / 's'}", "model.head=step"]
    result = assert_ok(torchrun(2, *args, "train.tbptt=20", "train.global_batch_size=8"))
    report = _report(result.stdout)
    print(
        f"\nMEASURED stream vs window step time {report['stream_vs_window_step_time']}, gather {report['state_gather_s']} s"
    )
    assert report["world_size"] == 2 and report["tbptt"] == 20 and report["checkpoints"] == 2
    assert report["state_gather_s"] > 0 and report["window_median_step_s"] > 0
    assert report["stream_vs_window_step_time"] == pytest.approx(
        report["median_step_s"] / report["window_median_step_s"], rel=1e-2
    )
