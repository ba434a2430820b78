"""A tune worker: claim a trial, run it as an ordinary training run, record its result; repeat.

Each trial runs `dist-gru train --config DIR/base.yaml <its params> train.run_dir=DIR/trials/NNNN`
in a child process (torchrun --standalone for `--nproc` > 1), so a trial is resumable like any run
and a crash in one never takes the worker down. The child's stdout and stderr go to
DIR/logs/NNNN.log. A worker stops when the study holds `--trials` trials that are finished or run
by live workers, and no abandoned trial is left to resume.

Signals: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) are passed on to the running trial, which saves a
checkpoint and exits with the preemption code; the worker then leaves the trial RUNNING in the
study (its claim is released as the worker exits) and exits 75 itself, so a requeued job, or any
other worker, resumes the trial from that checkpoint. If the worker is killed outright (SIGKILL),
the kernel kills its trial too (PR_SET_PDEATHSIG on Linux) and drops its claim: the trial resumes
the same way from its last periodic checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dist_gru.train.checkpoint import EXIT_PREEMPTED
from dist_gru.train.run_lock import LOCK_FILE
from dist_gru.tune.prune import PRUNED_STEP
from dist_gru.tune.space import overrides, suggest
from dist_gru.tune.study import BASE_FILE, Claim, StudyFolder, make_sampler

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Worker:
    """Runs trials of one study until it holds `target` of them."""

    def __init__(self, folder: StudyFolder, target: int, nproc: int, say=print):
        self.folder, self.target, self.nproc, self.say = folder, target, nproc, say
        self.storage = folder.storage()
        self.study = folder.study(self.storage)
        self.child: subprocess.Popen | None = None
        self.stop_signal = 0

    def run(self) -> int:
        """0 when the study is done (for this worker), 75 when a signal stopped it mid-trial."""
        previous = {s: signal.signal(s, self._forward) for s in FORWARDED}
        try:
            while not self.stop_signal:
                with self.folder.locked():
                    claim = self._claim_abandoned() or self._claim_new()
                if claim is None:
                    return 0
                try:
                    code = self._run_trial(claim)
                    if code == EXIT_PREEMPTED or (self.stop_signal and code != 0):
                        self.say(f"tune: trial {claim.number} stopped by a signal; it resumes from its checkpoint")
                        return EXIT_PREEMPTED
                    self._record(claim, code)  # finished before a signal could stop it: recorded
                finally:
                    claim.release()
            return EXIT_PREEMPTED
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signum)  # the trial's own session: all of its processes

    # --- which trial ----------------------------------------------------------------------------

    def _claim_abandoned(self) -> Claim | None:
        """A RUNNING trial whose worker is gone (its claim is free): resume it."""
        import optuna

        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            fd = self.folder.try_claim(trial.number)
            if fd is not None:
                return Claim(trial.number, dict(trial.params), fd, resumed=True)
        return None

    def _claim_new(self) -> Claim | None:
        import optuna

        trials = self.study.get_trials(deepcopy=False)  # one read of the storage for both counts
        if sum(t.state != optuna.trial.TrialState.WAITING for t in trials) >= self.target:
            return None
        # A sampler seeded by the trial's number: workers that share a seed would otherwise draw the
        # same parameters, and a study's draws repeat given its history, whatever worker asks.
        self.study.sampler = make_sampler(self.folder.space, offset=len(trials))
        trial = self.study.ask()
        fd = self.folder.try_claim(trial.number)
        assert fd is not None, "a trial just asked for is claimed by nobody else (the study lock is held)"
        params = suggest(trial, self.folder.space, self.folder.base_tree())
        return Claim(trial.number, params, fd, resumed=False)

    # --- running it -----------------------------------------------------------------------------

    def command(self, claim: Claim) -> list[str]:
        """The trial's `dist-gru train` command line (all ranks, one node)."""
        folder, number = self.folder, claim.number
        launcher = [sys.executable, "-m", "dist_gru"]
        if self.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(self.nproc), "-m", "dist_gru"]  # fmt: skip
        return [
            *launcher, "train", "--config", str(folder.path / BASE_FILE), *overrides(claim.params),
            f"train.run_dir={folder.trial_dir(number)}", "train.resume=auto", "log.quiet=true",
            f"tune.study={folder.path}", f"tune.trial={number}",
            f"log.group={folder.name}", f"log.name={folder.name}-{number:04d}",
        ]  # fmt: skip

    def _run_trial(self, claim: Claim) -> int:
        shown = " ".join(overrides(claim.params))
        verb = "resuming" if claim.resumed else "starting"
        log = self.folder.log_path(claim.number)
        self.say(f"tune: {verb} trial {claim.number}: {shown} (log: {log})")
        if claim.resumed:
            self._wait_for_run_folder(claim.number)
        if self.stop_signal:  # the signal came before the trial started: nothing to stop, nothing to lose
            return EXIT_PREEMPTED
        with open(log, "a") as out:
            self.child = subprocess.Popen(
                self.command(claim), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
            if self.stop_signal:  # arrived while the child was being started: pass it on now
                os.killpg(self.child.pid, self.stop_signal)
            code = self.child.wait()
        self.child = None
        return code

    def _wait_for_run_folder(self, number: int, timeout_s: float = 300.0) -> None:
        """An abandoned trial's processes may still be dying (its run folder lock held for a
        moment after its worker was killed): wait for the lock rather than fail the trial."""
        path = self.folder.trial_dir(number) / LOCK_FILE
        deadline = time.monotonic() + timeout_s
        while path.exists() and time.monotonic() < deadline:
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.2)
            finally:
                os.close(fd)

    def _record(self, claim: Claim, code: int) -> None:
        """Tell the study how the trial ended: complete with its objective, pruned, or failed."""
        import optuna

        state = optuna.trial.TrialState
        number, metric = claim.number, self.folder.metric
        value, steps = final_value(self.folder.trial_dir(number), metric)
        trial_id = self.folder.trial_id(self.storage, number)
        trial = self.storage.get_trial(trial_id)
        if code == 0 and PRUNED_STEP in trial.user_attrs:
            self.study.tell(number, state=state.PRUNED)
            self.say(f"tune: trial {number} pruned at step {trial.user_attrs[PRUNED_STEP]}")
        elif code == 0 and value is not None:
            self.study.tell(number, value)
            self.say(f"tune: trial {number} complete: {metric}={value:.6g} after {steps} steps")
        else:
            why = f"exit code {code}" if code else f"no finite {metric} in its metrics.jsonl"
            self.storage.set_trial_user_attr(trial_id, "failure", why)
            self.study.tell(number, state=state.FAIL)
            self.say(f"tune: trial {number} failed ({why}); see {self.folder.log_path(number)}")


def _die_with_parent() -> None:
    """In the child: be killed when the worker dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def final_value(run_dir: Path, metric: str) -> tuple[float | None, int]:
    """(the last logged value of `metric`, the last step logged) of a run folder's metrics.jsonl."""
    value, steps = None, 0
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        steps = max(steps, int(record.get("step", 0)))
        if metric in record:
            value = record[metric]
    return (float(value) if isinstance(value, (int, float)) else None), steps

