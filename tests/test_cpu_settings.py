"""Process settings for CPU training: the compute precision of bf16, the allocator, the recurrence."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import TINY, assert_ok, cli, read_metrics, summary_fields

from dist_gru import runtime
from dist_gru.config import load_config

# One thread: the two runs compared below must sum in the same order.
QUICK = [*TINY, "log.mode=disabled", "train.threads=1"]


@pytest.mark.parametrize(
    ("has_bf16", "cpu_bf16", "precision", "expected"),
    [
        (False, "auto", "bf16", "fp32"),  # emulated bf16 would be slower and less accurate
        (True, "auto", "bf16", "bf16"),
        (False, "gru", "bf16", "bf16"),  # asked for explicitly
        (False, "autocast", "bf16", "bf16"),
        (False, "auto", "fp32", "fp32"),
    ],
)
def test_compute_precision_of_bf16_follows_the_cpu(monkeypatch, has_bf16, cpu_bf16, precision, expected):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    cfg = load_config(None, [f"train.precision={precision}", f"train.cpu_bf16={cpu_bf16}"])
    assert runtime.compute_precision(cfg, use_gpu=False) == expected
    assert runtime.compute_precision(cfg, use_gpu=True) == precision  # GPUs: as asked


def test_bf16_run_says_what_it_computes_in(tmp_path):
    result = assert_ok(cli("train", *QUICK, "train.max_steps=2", "train.precision=bf16", f"train.run_dir={tmp_path / 'r'}"))
    fields = summary_fields(result.stdout)
    native = runtime.cpu_has_bf16()
    assert (fields["precision"], fields["compute"]) == ("bf16", "bf16" if native else "fp32")
    notice = "this CPU has no bf16 instructions (AVX512-BF16, AMX): computing in fp32"
    assert (notice in result.stdout) == (not native)


RSS_AFTER_FREE = textwrap.dedent(
    """
    import sys
    import torch
    from dist_gru.runtime import keep_freed_memory

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
    before = rss_mb()
    del x
    print(kept, round(before - rss_mb()))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_keeps_a_freed_buffer_resident():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        kept, released = out.stdout.split()
        return kept, int(released)

    assert run("default")[1] >= 60  # glibc returns a freed 64 MiB buffer to the OS ...
    assert run("keep") == ("True", 0)  # ... and keeps it for the next step when asked


def test_native_recurrence_and_system_allocator_train_the_same(tmp_path):
    """Both switches change how a step runs, not what it computes: the losses agree to rounding."""
    runs = {}
    for name, extra in {"fast": [], "plain": ["train.recurrence=native", "train.keep_freed_memory=false"]}.items():
        run_dir = tmp_path / name
        assert_ok(cli("train", *QUICK, "train.max_steps=20", "train.log_every=5", f"train.run_dir={run_dir}", *extra))
        runs[name] = [row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row]
    fast, plain = runs["fast"], runs["plain"]
    assert len(fast) == len(plain) == 4
    assert max(abs(a - b) for a, b in zip(fast, plain, strict=True)) < 1e-5
