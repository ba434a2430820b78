"""Tracking: W&B offline runs read back from disk, TensorBoard, resume, secrets, console output.

Real training runs through the CLI and torchrun (TINY config, a few seconds each); W&B is always
offline or disabled here, and the API keys are fake: no test talks to a server.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import conftest
import pytest
import yaml
from conftest import TINY, assert_ok, cli, read_metrics, torchrun
from wandb_reader import find_offline_runs, history_series, read_run

from dist_gru.train.checkpoint import Checkpoint
from dist_gru.train.tracking import _run_id, active_trackers, flat_config, wandb_mode, wandb_root

pytestmark = pytest.mark.timeout(60)  # units; each real run sets its own, longer limit

FAKE_KEY = "0123456789abcdef" * 2 + "feedc0de"  # 40 characters, the length of a real W&B key


def _series(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], float(m[key])) for m in metrics if key in m]


def _metric_keys(metrics: list[dict]) -> set[str]:
    return {k for m in metrics for k in m} - {"step"}


# --------------------------------------------------------------------------------------------
# Real runs


@pytest.mark.timeout(240)
def test_two_process_run_writes_one_wandb_run_and_tensorboard_equal_to_metrics_jsonl(tmp_path):
    run_dir = tmp_path / "run"
    result = assert_ok(
        torchrun(
            2, "train", *TINY, f"train.run_dir={run_dir}", "train.eval_every=4", "log.trackers=[wandb,tensorboard]"
        )
    )
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "train/loss" in m] == [4, 8, 12]
    assert [m["step"] for m in metrics if "eval/mse" in m] == [4, 8, 12]

    # Exactly one W&B run (rank 1 made none), under the id kept in the run folder and the checkpoint.
    folders = find_offline_runs(run_dir)
    assert len(folders) == 1, folders
    run = read_run(folders[0])
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert run.run_id == run_id and run.project == "dist-gru"
    state = json.loads((run_dir / "checkpoints" / "step-000012" / "state.json").read_text())
    assert state["tracker_run_id"] == run_id

    # Every metric, value for value and step for step; the config record is the resolved config.
    keys = _metric_keys(metrics)
    assert {"train/loss", "train/lr", "perf/samples_per_s", "eval/mse", "mem/peak_rss_mb"} <= keys
    for key in sorted(keys):
        assert history_series(run, key) == _series(metrics, key), key
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run.config == resolved

    # TensorBoard, the second tracker: the same scalars (stored as float32) and the flattened config.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = run_dir / "tensorboard" / "dist-gru"
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    assert set(events.Tags()["scalars"]) == keys
    for key in sorted(keys):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = _series(metrics, key)
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), key
    (hparams,) = tb_dir.glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text()) == flat_config(resolved)

    # W&B says nothing on the console; our final lines say where the run is and how to sync it.
    assert "wandb:" not in result.output
    assert f"W&B run:      {folders[0]} (id {run_id}, offline)" in result.stdout
    assert f"wandb sync --id {run_id} {run_dir / 'wandb'}/offline-run-*-{run_id}*" in result.stdout


@pytest.mark.timeout(240)
def test_resumed_run_continues_the_same_wandb_run_with_increasing_steps(tmp_path):
    run_dir = tmp_path / "run"
    # Stop at step 8 (final checkpoint), then ask for 12: the second invocation resumes at 8.
    assert_ok(cli("train", *TINY, f"train.run_dir={run_dir}", "train.max_steps=8"))
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    result = assert_ok(cli("train", *TINY, f"train.run_dir={run_dir}", "train.max_steps=12"))
    assert "resuming from" in result.stdout and "(step 8)" in result.stdout

    folders = find_offline_runs(run_dir)
    assert len(folders) == 2, folders
    runs = [read_run(f) for f in folders]
    assert [r.run_id for r in runs] == [first_id, first_id]
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id
    steps = [[s for s, _ in history_series(r, "train/loss")] for r in runs]
    assert steps == [[4, 8], [12]]
    # Both W&B folders together hold exactly metrics.jsonl's history (train and eval).
    metrics = read_metrics(run_dir)
    for key in ("train/loss", "eval/mse"):
        assert history_series(runs[0], key) + history_series(runs[1], key) == _series(metrics, key), key
    for step in (8, 12):
        state = json.loads((run_dir / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())
        assert state["tracker_run_id"] == first_id
    # The sync hint covers both folders of the resumed run (the shell expands the glob in time order).
    assert f"wandb sync --id {first_id} {run_dir / 'wandb'}/offline-run-*-{first_id}*" in result.stdout
    assert sorted((run_dir / "wandb").glob(f"offline-run-*-{first_id}*")) == folders


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


@pytest.mark.timeout(240)
def test_api_key_appears_in_no_file_and_no_output(tmp_path):
    run_dir = tmp_path / "run"
    env = conftest.test_env(WANDB_API_KEY=FAKE_KEY)
    env.pop("WANDB_SILENT")  # W&B's own console output must be off by our default, and key-free
    result = assert_ok(
        cli(
            "train",
            *TINY,
            f"train.run_dir={run_dir}",
            "log.mode=offline",
            "log.trackers=[wandb,tensorboard]",
            "checkpoint.every=4",
            "train.eval_every=4",
            env=env,
        )
    )
    # The run did everything that writes files: W&B run, TensorBoard, checkpoints, model, metrics.
    assert len(find_offline_runs(run_dir)) == 1
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert len(list((run_dir / "checkpoints").iterdir())) == 3
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 15
    assert _files_containing(run_dir, FAKE_KEY.encode()) == []
    assert FAKE_KEY not in result.output
    assert "wandb:" not in result.output  # W&B silent unless the user asks (WANDB_SILENT / WANDB_QUIET)


@pytest.mark.timeout(240)
def test_wandb_dir_from_the_environment_wins_over_the_run_folder(tmp_path):
    run_dir, shared = tmp_path / "run", tmp_path / "shared" / "wandb-home"
    result = assert_ok(cli("train", *TINY, f"train.run_dir={run_dir}", env=conftest.test_env(WANDB_DIR=str(shared))))
    assert find_offline_runs(run_dir) == []
    (folder,) = find_offline_runs(shared)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert read_run(folder).run_id == run_id
    assert f"W&B run:      {folder} (id {run_id}, offline)" in result.stdout
    assert f"wandb sync --id {run_id} {shared / 'wandb'}/offline-run-*-{run_id}*" in result.stdout


def _rank_output(log_dir: Path, rank: int) -> tuple[str, str]:
    (folder,) = log_dir.glob(f"*/attempt_0/{rank}")
    return (folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "bar"])
def test_console_bar_or_periodic_lines_on_the_main_process_only(tmp_path, quiet):
    log_dir = tmp_path / "logs"
    args = [a for a in TINY if a != "--quiet"] + ["--quiet"] * quiet
    assert_ok(
        torchrun(
            2,
            "train",
            *args,
            f"train.run_dir={tmp_path / 'run'}",
            "train.eval_every=4",
            "log.mode=disabled",
            extra=("--log-dir", str(log_dir), "--redirects", "3"),
        )
    )
    out0, err0 = _rank_output(log_dir, 0)
    out1, err1 = _rank_output(log_dir, 1)
    periodic = [line for line in out0.splitlines() if line.startswith("step ")]
    evals = [line for line in out0.splitlines() if line.startswith("eval step ")]
    assert [line.split()[2] for line in evals] == ["4:", "8:", "12:"]
    if quiet:
        assert [line.split()[1] for line in periodic] == ["4/12", "8/12", "12/12"]
        assert all(" loss " in line and " samples/s " in line for line in periodic)
        assert "train:" not in err0 and "\r" not in err0
    else:
        assert periodic == []
        # tqdm: progress, loss and samples/s in the postfix, elapsed<remaining (the ETA).
        bar = err0.split("\r")[-1]
        assert "train: 100%" in bar and "12/12" in bar and "loss=" in bar and "sps=" in bar
        assert "<00:" in bar
    # Rank 1 prints nothing of the progress: no bar, no periodic lines, no eval lines, no summary.
    for text in (out1, err1):
        assert "train:" not in text and "step " not in text and "training finished" not in text


# --------------------------------------------------------------------------------------------
# Units: mode resolution (never starts a run), run ids, config flattening


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("WANDB_") or name == "NETRC":
            monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return monkeypatch


def test_auto_mode_is_online_with_an_api_key_and_offline_without(clean_env, tmp_path):
    assert wandb_mode("auto") == "offline"
    clean_env.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mode("auto") == "online"
    for env_mode, expected in [("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled")]:
        clean_env.setenv("WANDB_MODE", env_mode)
        assert wandb_mode("auto") == expected, env_mode
    clean_env.setenv("WANDB_MODE", "online")
    assert wandb_mode("auto") == "online"
    # Explicit modes are what the config says, whatever the environment.
    for mode in ("online", "offline", "disabled"):
        assert wandb_mode(mode) == mode


def test_auto_mode_finds_a_key_in_netrc_for_the_configured_host(clean_env, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    clean_env.setenv("NETRC", str(netrc))
    assert wandb_mode("auto") == "online"
    clean_env.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode("auto") == "offline"  # the key is for another host
    netrc.write_text(f"machine wandb.example.org login user password {FAKE_KEY}\n")
    assert wandb_mode("auto") == "online"


def test_disabled_wandb_is_not_a_tracker(clean_env):
    from dist_gru.config import load_config

    cfg = load_config(overrides=["log.trackers=[wandb,tensorboard]", "log.mode=disabled"])
    assert active_trackers(cfg) == ["tensorboard"]
    cfg = load_config(overrides=["log.trackers=[wandb,tensorboard]", "log.mode=offline"])
    assert active_trackers(cfg) == ["wandb", "tensorboard"]


def test_wandb_root_is_wandb_dir_when_set(clean_env, tmp_path):
    assert wandb_root(tmp_path / "run") == tmp_path / "run"
    clean_env.setenv("WANDB_DIR", str(tmp_path / "shared"))
    assert wandb_root(tmp_path / "run") == tmp_path / "shared"


def test_run_id_comes_from_the_checkpoint_and_is_new_for_a_fresh_start(tmp_path):
    (tmp_path / "wandb_run_id").write_text("oldid000\n")
    resumed = Checkpoint(tmp_path / "checkpoints" / "step-000008", {"step": 8, "tracker_run_id": "ckptid00"})
    assert _run_id(tmp_path, resumed) == "ckptid00"
    assert (tmp_path / "wandb_run_id").read_text() == "ckptid00\n"
    # A checkpoint without an id (older format) keeps the folder's id.
    assert _run_id(tmp_path, Checkpoint(tmp_path, {"step": 8})) == "ckptid00"
    # From step 0 the steps restart: a new W&B run, not a rewound one.
    fresh = _run_id(tmp_path, None)
    assert fresh != "ckptid00" and len(fresh) == 8
    assert (tmp_path / "wandb_run_id").read_text() == fresh + "\n"


def test_flat_config_gives_tensorboard_only_scalars():
    flat = flat_config({"model": {"hidden_size": 16, "cell": "torch"}, "log": {"tags": ["a"], "entity": None}})
    assert flat == {"model.hidden_size": 16, "model.cell": "torch", "log.tags": '["a"]', "log.entity": "null"}


@pytest.mark.timeout(30)
def test_a_failing_tracker_does_not_stop_training(tmp_path, capsys):
    """Slurm's SIGTERM to a job step kills W&B's service too; the next log must not kill the run."""
    from dist_gru.config import load_config
    from dist_gru.train.tracking import RunTracker

    class DeadTracker:
        name = "wandb"

        def store_init_configuration(self, config):
            pass

        def finish(self):
            raise ConnectionResetError("Connection lost")

    class DeadService:
        trackers: list = []

        def init_trackers(self, *args, **kwargs):
            self.trackers = [DeadTracker()]

        def log(self, metrics, step):
            raise ConnectionResetError("Connection lost")

    cfg = load_config(None, ["log.trackers=[tensorboard]"])
    tracker = RunTracker(cfg, DeadService(), tmp_path, None)
    tracker.log({"train/loss": 0.5}, step=1)
    tracker.log({"train/loss": 0.25}, step=2)
    tracker.finish()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["train/loss"]) for m in lines] == [(1, 0.5), (2, 0.25)]
    err = capsys.readouterr().err
    assert err.count("experiment tracker failed (ConnectionResetError: Connection lost)") == 1


# --------------------------------------------------------------------------------------------
# W&B never takes a run down: start-up failures fall back to an offline run under the same id


def _keyed_env(base_url: str, **extra: str) -> dict[str, str]:
    """A configured (fake) key and a server URL; log.mode alone decides (no WANDB_MODE)."""
    env = conftest.test_env(WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=base_url, **extra)
    env.pop("WANDB_MODE")
    return env


def _assert_one_offline_run_equal_to_metrics(run_dir: Path, result) -> str:
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (folder,) = find_offline_runs(run_dir)
    run = read_run(folder)
    assert run.run_id == run_id
    metrics = read_metrics(run_dir)
    assert history_series(run, "train/loss") == _series(metrics, "train/loss") != []
    assert f"W&B run:      {folder} (id {run_id}, offline)" in result.stdout
    assert f"wandb sync --id {run_id} " in result.stdout
    assert FAKE_KEY not in result.output
    assert "experiment tracker failed" not in result.output  # W&B did run, offline
    return run_id


@pytest.mark.timeout(240)
def test_auto_mode_with_a_key_but_an_unreachable_server_trains_offline(tmp_path):
    run_dir, port = tmp_path / "run", conftest.free_port()  # nothing listens on that port
    env = _keyed_env(f"http://127.0.0.1:{port}")
    result = assert_ok(cli("train", *TINY, f"train.run_dir={run_dir}", "log.mode=auto", env=env, timeout=200))
    warning = f"dist-gru: warning: W&B server unreachable (127.0.0.1:{port}: Connection refused); logging offline as run"
    assert result.stderr.count(warning) == 1, result.stderr[-3000:]
    _assert_one_offline_run_equal_to_metrics(run_dir, result)


class _RefusingServer(BaseHTTPRequestHandler):
    """A W&B server that refuses every request (a revoked or wrong key): 401."""

    def do_POST(self):  # noqa: N802 - the http.server interface
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.mark.timeout(240)
def test_an_online_start_that_fails_continues_offline_under_the_same_run_id(tmp_path, refusing_server):
    run_dir = tmp_path / "run"
    env = _keyed_env(refusing_server, WANDB_INIT_TIMEOUT="30")  # bounded even if W&B retried
    args = ("train", *TINY, f"train.run_dir={run_dir}", "log.mode=online", "log.trackers=[wandb,tensorboard]")
    result = assert_ok(cli(*args, env=env, timeout=200))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("dist-gru: warning:")]
    assert len(warnings) == 1 and "W&B did not start online (CommError" in warnings[0], result.stderr[-3000:]
    run_id = _assert_one_offline_run_equal_to_metrics(run_dir, result)
    assert f"logging offline as run {run_id} (upload it later: wandb sync)" in warnings[0]
    # TensorBoard, started again next to the offline W&B run, has every step once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "dist-gru"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8, 12]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, capsys):
    from dist_gru.config import load_config
    from dist_gru.train.tracking import RunTracker

    lines = ['{"step": 4, "train/loss": 0.5}', '{"step": 8, "train/loss": 0.4}', '{"step": 12, "train/loss": 0.3}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 16, "train/lo')
    resumed = Checkpoint(tmp_path / "checkpoints" / "step-000008", {"step": 8})
    RunTracker(load_config(None, ["log.trackers=[]"]), object(), tmp_path, resumed)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"  # line 12 is retrained
    err = capsys.readouterr().err
    assert err.count("dist-gru: warning:") == 1
    assert f"{tmp_path / 'metrics.jsonl'}: dropping its last line, which is not a metrics record" in err
    assert "'{\"step\": 16, \"train/lo'" in err
