"""Training: the trainer and the services it uses (checkpoints and the run folder, its lock,
preemption, best-model selection, fine-tuning, tracking, the non-finite guard).

A script builds a job and steps it with the same two calls `dist-gru train` makes:

    from dist_gru.config import load_config
    from dist_gru.train import build, train_loop
    job = build(load_config("configs/adding.yaml", ["train.max_steps=100"]))
    code, final_metrics = train_loop(job)
"""

__all__ = ["Job", "build", "lr_at", "main", "step_seed", "train_loop"]


def __getattr__(name: str):
    # The trainer loads on first use: the services here (checkpoint, run_folder ...) import each
    # other and are imported by inference without pulling in the whole trainer.
    if name in __all__:
        from dist_gru.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
