"""What a job's data asks of the model: the ``GRUModel`` arguments of a config and its training
data, and the rules a model section must meet to fit that data (a ConfigError otherwise)."""

from __future__ import annotations

from typing import Any

from dist_gru.config import Config, ConfigError
from dist_gru.infer.load import data_facts


def model_kwargs(cfg: Config, dataset: Any) -> dict[str, Any]:
    """``GRUModel`` arguments of a job: the architecture from ``cfg.model``, sizes and task from the
    training ``dataset`` (its ``num_features``, ``output_size``, ``task``, ``target_kind``), scaling
    and horizon from ``cfg.data``. A model section that cannot fit the data is a ConfigError."""
    model, data = cfg.model, cfg.data
    task = dataset.task
    target_kind = getattr(dataset, "target_kind", "sequence")
    source = data.train_path if data.name == "files" else f"data.name={data.name}"
    problems = []
    if task == "classification" and model.output != "point":
        problems.append(
            f"model.output={model.output} needs a regression task, but {source} is a classification task with "
            f"{dataset.output_size} classes: use model.output=point (class logits, cross-entropy)"
        )
    if task == "classification" and model.head == "forecast":
        problems.append(
            f"model.head=forecast needs a regression task (values to forecast); {source} holds class labels"
        )
    if model.head == "step" and target_kind != "step":
        problems.append(
            f"model.head=step needs a target at every step, but {source} has one target per sequence: "
            "use model.head=last, or data with per-step targets"
        )
    if model.head == "last" and target_kind == "step" and data.horizon == 0:
        problems.append(
            f"model.head=last needs one target per sequence, but {source} has a target at every step: "
            "use model.head=step (or model.head=forecast with data.window and data.horizon)"
        )
    if problems:
        raise ConfigError("the model does not fit the data:\n  " + "\n  ".join(problems))
    tokens = getattr(dataset, "vocab_size", None) is not None
    return {
        "input_size": model.embedding_dim if tokens else dataset.num_features,
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
        "dropout": model.dropout,
        "task": task,
        "output_size": dataset.output_size,
        "cell": model.cell,
        "head": model.head,
        "bidirectional": model.bidirectional,
        "output": model.output,
        "quantiles": list(model.quantiles),
        "horizon": data.horizon,
        "scaling": data.scaling,
        "vocab_size": model.vocab_size if tokens else None,
        "data": data_facts(cfg),  # what inference needs to know of the data: window, season ...
    }
