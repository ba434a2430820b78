"""A crash (any exception that is not a user error) names the process in one block with its traceback,
and under torchrun also lands in torchrun's error file; user errors stay one `error:` line, exit 2.

The command that crashes is a stand-in module put in the command table: the report is the CLI's."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import pytest

from dist_gru import cli

COMMAND_MODULE = '''
from dist_gru.config import ConfigError
from dist_gru.data.files import DataFormatError


def crash(argv):
    raise RuntimeError("boom: " + " ".join(argv))


def user_error(argv):
    raise ConfigError("train.max_steps: must be positive (got -1)")


def data_error(argv):
    raise DataFormatError("data/train/features.npy: truncated")
'''


@pytest.fixture
def commands(tmp_path, monkeypatch):
    (tmp_path / "stand_in_command.py").write_text(COMMAND_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "crash", ("stand_in_command", "crash", "crash"))
    monkeypatch.setitem(cli.COMMANDS, "user-error", ("stand_in_command", "user_error", "user error"))
    monkeypatch.setitem(cli.COMMANDS, "data-error", ("stand_in_command", "data_error", "data error"))
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    return error_file


def test_a_crash_on_a_rank_is_reported_with_the_rank_and_the_traceback(commands, monkeypatch, capfd):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.main(["crash", "at", "step", "7"]) == 1
    err = capfd.readouterr().err
    lines = err.splitlines()
    host = socket.gethostname()
    assert lines[0] == f"dist-gru: rank 3 of 4 (local rank 1, host {host}) crashed: RuntimeError: boom: at step 7"
    assert lines[1] == "Traceback (most recent call last):"
    assert 'raise RuntimeError("boom: " + " ".join(argv))' in err and lines[-1] == "RuntimeError: boom: at step 7"
    # What torchrun's failure summary shows for this rank.
    recorded = json.loads(commands.read_text())["message"]
    assert recorded["message"] == "RuntimeError: boom: at step 7"
    assert "stand_in_command.py" in recorded["extraInfo"]["py_callstack"]


def test_a_crash_under_srun_takes_the_rank_from_slurm(commands, monkeypatch, capfd):
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert cli.main(["crash"]) == 1
    first = capfd.readouterr().err.splitlines()[0]
    assert first == f"dist-gru: rank 1 of 2 (local rank 0, host {socket.gethostname()}) crashed: RuntimeError: boom: "


def test_a_crash_of_a_single_process_names_the_host(commands, capfd):
    assert cli.main(["crash"]) == 1
    assert capfd.readouterr().err.splitlines()[0] == f"dist-gru: host {socket.gethostname()} crashed: RuntimeError: boom: "


def test_a_user_error_stays_one_line_and_exit_2_with_no_error_file(commands, monkeypatch, capfd):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["user-error"]) == 2
    assert capfd.readouterr().err == "error: train.max_steps: must be positive (got -1)\n"
    assert not commands.exists()


def test_an_error_every_rank_shares_is_printed_by_rank_0_alone(commands, monkeypatch, capfd):
    """Rank 1 has the same config error: it says nothing and leaves after rank 0 (the launcher's
    SIGTERM, or a time limit), so the launcher's first failure is the rank that printed."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    launcher = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))  # as torchrun does
    launcher.start()
    try:
        assert cli.main(["user-error"]) == 2
    finally:
        launcher.join()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    assert capfd.readouterr().err == ""
    assert not commands.exists()


def test_a_stop_that_came_during_start_up_counts(commands, monkeypatch, capfd):
    """The launcher's SIGTERM reached the step boundary's handler before the error: no wait."""
    from dist_gru.train import preemption

    monkeypatch.setattr(preemption, "_received", [signal.SIGTERM])
    monkeypatch.setenv("RANK", "1")
    try:
        assert cli.main(["user-error"]) == 2
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    assert capfd.readouterr().err == ""


def test_a_shared_error_rank_0_did_not_stop_on_is_printed_by_its_rank(commands, monkeypatch, capfd):
    """No signal comes (rank 0 trains on: the error was this rank's after all): it says so itself."""
    monkeypatch.setattr(cli, "stopped_after_rank0", lambda: False)
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["user-error"]) == 2
    assert capfd.readouterr().err == "error (rank 1): train.max_steps: must be positive (got -1)\n"


def test_an_error_of_one_rank_is_printed_by_that_rank(commands, monkeypatch, capfd):
    """A data file one rank cannot read may be fine on the others: that rank names itself."""
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert cli.main(["data-error"]) == 2
    assert capfd.readouterr().err == "error (rank 3): data/train/features.npy: truncated\n"
