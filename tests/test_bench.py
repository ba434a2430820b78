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
    print(f"\nMEASURED stream vs window step time {report['stream_vs_window_step_time']}, gather {report['state_gather_s']} s")
    assert report["world_size"] == 2 and report["tbptt"] == 20 and report["checkpoints"] == 2
    assert report["state_gather_s"] > 0 and report["window_median_step_s"] > 0
    assert report["stream_vs_window_step_time"] == pytest.approx(
        report["median_step_s"] / report["window_median_step_s"], rel=1e-2
    )
