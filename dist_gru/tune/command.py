"""`dist-gru tune`: start or join a study and work on its trials, or report on it."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from dist_gru.config import ConfigError
from dist_gru.runtime import LaunchError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dist-gru tune",
        description="Search hyperparameters: every trial is an ordinary dist-gru run in STUDY/trials/NNNN. "
        "Start several workers (processes, nodes, a Slurm array) on one study folder to run trials in parallel.",
    )
    parser.add_argument("--study", required=True, help="the study folder (created on first use)")
    parser.add_argument("--config", help="base config YAML (a new study; joining: must match the study's)")
    parser.add_argument("--space", help="search space YAML (a new study; joining: must match the study's)")
    parser.add_argument("--trials", type=int, help="how many trials the study should hold (with all workers)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per trial (torchrun on this node when > 1)")
    parser.add_argument("--storage", help="an RDB URL (e.g. postgresql://...) instead of the journal file in the study folder")
    parser.add_argument("--report", action="store_true", help="print the trials table and best config; write plots and best/")
    parser.add_argument("overrides", nargs="*", help="base config overrides, section.key=value (a new study)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from dist_gru.tune.study import open_existing, open_study
    from dist_gru.tune.worker import Worker

    args = parse_args(argv)
    if importlib.util.find_spec("optuna") is None:
        raise LaunchError("dist-gru tune needs Optuna: pip install 'dist-gru[tune]' (or pip install 'optuna>=4,<5')")
    study_dir = Path(args.study)
    if args.report:
        from dist_gru.tune.report import report

        return report(open_existing(study_dir))
    if args.trials is None or args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: expected how many trials the study should hold, >= 1")
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: expected processes per trial, >= 1")
    if args.storage is not None and not args.storage.startswith(("postgresql", "mysql")):
        raise ConfigError(
            f"--storage {args.storage}: expected a postgresql:// or mysql:// URL (SQLite corrupts under "
            "concurrent workers on shared file systems; the default journal file is the safe choice)"
        )
    folder = open_study(study_dir, args.config, args.overrides, args.space, args.storage)
    print(f"tune: study {folder.path} ({folder.metric}, {folder.direction}); worker pid {os.getpid()}", flush=True)
    worker = Worker(folder, args.trials, args.nproc, say=lambda line: print(line, flush=True))
    code = worker.run()
    if code == 0:
        from dist_gru.tune.report import best_trial, copy_best_model

        with folder.locked():
            best = best_trial(worker.study)  # the worker's study: no second replay of the journal
            if best is not None:
                copy_best_model(folder, best.number)
                print(f"tune: best so far: trial {best.number}, {folder.metric}={best.value:.6g}", flush=True)
    return code
