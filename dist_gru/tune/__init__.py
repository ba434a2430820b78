"""Hyperparameter search: `dist-gru tune`, trials as ordinary resumable runs in one study folder.

    dist-gru tune --config configs/forecast.yaml --space configs/tune/forecast_space.yaml \\
        --study runs/tune-forecast --trials 16            # start a study, or join it with the same args
    dist-gru tune --study runs/tune-forecast --trials 16  # another worker (any node sharing the folder)
    dist-gru tune --study runs/tune-forecast --report     # table, best config, plots, best/ model
    sbatch --array=0-3 slurm/tune.sbatch --study runs/tune-forecast --trials 16   # 4 workers

Modules: `space` (the search space YAML, checked against the config), `study` (the study folder,
its Optuna storage and claims), `worker` (claim, run, record), `prune` (the trial's side: report
evaluations, stop every rank at once), `report` (table, best config, plots).
"""
