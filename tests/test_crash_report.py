"""A crash (any exception that is not a user error) names the process in one block with its traceback,
and under torchrun also lands in torchrun's error file; user errors stay one `error:` line, exit 2.

The command that crashes is a stand-in module put in the command table: the report is the CLI's."""

from __future__ import annotations

import json
import socket

import pytest

from dist_gru import cli

COMMAND_MODULE = '''
from dist_gru.config import ConfigError


def crash(argv):
    raise RuntimeError("boom: " + " ".join(argv))


def user_error(argv):
    raise ConfigError("train.max_steps: must be positive (got -1)")
'''


@pytest.fixture
def commands(tmp_path, monkeypatch):
    (tmp_path / "stand_in_command.py").write_text(COMMAND_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "crash", ("stand_in_command", "crash", "crash"))
    monkeypatch.setitem(cli.COMMANDS, "user-error", ("stand_in_command", "user_error", "user error"))
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
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["user-error"]) == 2
    assert capfd.readouterr().err == "error: train.max_steps: must be positive (got -1)\n"
    assert not commands.exists()
