"""`dist-gru bench` runs and prints its figures (the figures themselves are measured, not tested)."""

from __future__ import annotations

import json

import pytest
import torch
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
    # The reference workload trains from files written once beside the run folder, from the very
    # tensors the bare loop holds in memory.
    from dist_gru.bench.bare_loop import reference_tensors
    from dist_gru.config import load_config
    from dist_gru.data.loading import build_dataset

    assert report["data"] == str(tmp_path / "b-data" / "t10-f32-b64-s0")
    files = build_dataset(load_config(None, ["data.name=files", f"data.train_path={report['data']}"]).data, "train")
    x, y = reference_tensors(10, 32, 64, 0)
    assert len(files) == len(x) == 8192
    first = files.__getitems__([0, 8191])
    torch.testing.assert_close(first["x"], x[[0, 8191]])
    torch.testing.assert_close(first["y"], y[[0, 8191]])
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
    """The comparison loop is independent: a fresh process that loads no module of the package but
    its own, so the ratio compares our loop with a hand-written one."""
    import subprocess
    import sys

    from dist_gru.bench.bare_loop import BareSpec

    spec = BareSpec(
        seq_len=6,
        num_features=3,
        global_batch=4,
        seed=0,
        hidden_size=8,
        num_layers=1,
        optimizer="adam",
        lr=1e-3,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        grad_clip=1.0,
        bf16=False,
        steps=3,
        warmup=1,
        threads=1,
        device="cpu",
    )
    done = subprocess.run(
        [sys.executable, "-m", "dist_gru.bench.bare_loop", spec.to_json()], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["samples_per_s"] > 0
    # The two package __init__ files (no working code); the loop itself runs as __main__.
    assert report["dist_gru_modules"] == ["dist_gru", "dist_gru.bench"]


def test_the_bare_loop_refuses_a_missing_spec():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dist_gru.bench.bare_loop"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: python -m dist_gru.bench.bare_loop" in done.stderr


def test_the_sweep_covers_both_axes_and_draws_its_table_and_curves(tmp_path):
    from dist_gru.bench.sweep import bench_command, cpu_model, figure, points, table

    assert " (family " in cpu_model() and "bf16" in cpu_model()  # names the bf16 instructions, or their absence

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
