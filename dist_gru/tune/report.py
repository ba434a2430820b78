"""What a study found: the trials table, the best config as YAML, plots, and DIR/best/.

    dist-gru tune --study runs/tune-co2 --report

writes DIR/best.yaml (the base config with the best trial's parameters: a config for
`dist-gru train --config`), DIR/history.png (the objective of every trial and the best so far),
DIR/params.png (the objective against each parameter) and DIR/best/ (a copy of the best trial's
model folder, which evaluates, forecasts and exports like any model folder).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import yaml

from dist_gru.tune.space import overrides
from dist_gru.tune.study import BASE_FILE, StudyFolder
from dist_gru.tune.worker import final_value

BEST_MODEL, BEST_CONFIG = "best", "best.yaml"


def trial_rows(folder: StudyFolder, study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, objective, steps trained, wall seconds and parameters."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        _, steps = final_value(folder.trial_dir(trial.number), folder.metric)
        end = trial.datetime_complete
        wall = (end - trial.datetime_start).total_seconds() if end and trial.datetime_start else None
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name.lower(),
                "value": trial.value if trial.values else None,
                "steps": steps,
                "wall_s": wall,
                "params": dict(trial.params),
            }
        )
    return rows


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """The rows as aligned text columns, one per parameter after the fixed ones."""
    keys = sorted({key for row in rows for key in row["params"]})
    lines = [["trial", "state", metric, "steps", "wall s", *keys]]
    for row in rows:
        value = "-" if row["value"] is None else f"{row['value']:.6g}"
        wall = "-" if row["wall_s"] is None else f"{row['wall_s']:.1f}"
        params = [_show(row["params"].get(key, "-")) for key in keys]
        lines.append([f"{row['trial']:04d}", row["state"], value, str(row["steps"]), wall, *params])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines)


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_config(folder: StudyFolder, params: dict[str, Any]) -> str:
    """The base config with `params` applied, as YAML, without the study's own keys."""
    from dist_gru.config import load_config

    cfg = load_config(folder.path / BASE_FILE, overrides(params)).to_dict()
    cfg.pop("tune", None)
    return yaml.safe_dump(cfg, sort_keys=False)


def copy_best_model(folder: StudyFolder, number: int) -> Path | None:
    """DIR/best/ := the model folder of trial `number`, swapped in whole (never half-copied)."""
    source = folder.trial_dir(number) / "model"
    if not source.is_dir():
        return None
    target, tmp = folder.path / BEST_MODEL, folder.path / (BEST_MODEL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    (tmp / "TRIAL").write_text(f"{number}\n")
    old = folder.path / (BEST_MODEL + ".old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def best_trial(study: Any) -> Any:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if done else None


def plots(folder: StudyFolder, study: Any) -> list[Path]:
    """history.png and params.png (Optuna's matplotlib plots); none before a trial completes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    if best_trial(study) is None:
        return []
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental feature" warnings of optuna.visualization.matplotlib
        for name, draw in (("history.png", optuna_plots.plot_optimization_history), ("params.png", optuna_plots.plot_slice)):
            axes = draw(study, target_name=folder.metric)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.set_size_inches(max(6.4, 3.2 * len(folder.space.params)) if name == "params.png" else 6.4, 4.8)
            figure.tight_layout()
            figure.savefig(folder.path / name, dpi=100)
            plt.close(figure)
            written.append(folder.path / name)
    return written


def report(folder: StudyFolder) -> int:
    """`dist-gru tune --study DIR --report`: print the table and the best config; write the files."""
    study = folder.study()
    rows = trial_rows(folder, study)
    print(f"study {folder.name}: {len(rows)} trials, objective {folder.metric} ({folder.direction})")
    print(table(rows, folder.metric))
    best = best_trial(study)
    if best is None:
        print("no trial has completed yet")
        return 0
    text = best_config(folder, dict(best.params))
    (folder.path / BEST_CONFIG).write_text(text)
    model = copy_best_model(folder, best.number)
    pruned = sum(row["state"] == "pruned" for row in rows)
    print(f"\nbest: trial {best.number}, {folder.metric}={best.value:.6g}; {pruned} trials pruned early")
    print("best parameters: " + " ".join(overrides(dict(best.params))))
    print(f"best config:     {folder.path / BEST_CONFIG} (dist-gru train --config {folder.path / BEST_CONFIG})")
    print(f"best model:      {model}")
    print("plots:           " + ", ".join(str(p) for p in plots(folder, study)))
    return 0
