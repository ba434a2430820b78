"""One object per kind of model output: its loss, metrics, baselines, point forecast, predicted
rows and end-of-training summary, and the rules its training data must meet.

    python -c "import torch; from dist_gru.tasks import task_for; \
print(task_for({'task': 'regression', 'head': 'step'}).loss_sum(torch.zeros(2, 3, 1), torch.ones(2, 3, 1), torch.tensor([3, 1])))"

``task_for(model.config)`` builds the task of a model: ``RegressionTask`` (heads ``last`` and
``step``) or ``ForecastTask`` with a point, gaussian or quantile ``distribution``,
``ClassificationTask``, or ``TokenTask`` (token streams). ``model_kwargs(cfg, dataset)`` turns a
job's config and training data into ``GRUModel`` arguments, after the task checks that it fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dist_gru.config import Config, ConfigError
from dist_gru.data.streams import chunks_per_stream, max_token
from dist_gru.tasks.base import DataInfo, Task
from dist_gru.tasks.classification import ClassificationTask, TokenTask
from dist_gru.tasks.distributions import distribution
from dist_gru.tasks.functional import DEFAULT_QUANTILES
from dist_gru.tasks.regression import ForecastTask, RegressionTask

__all__ = [
    "CONFIG_DEFAULTS",
    "ClassificationTask",
    "DataInfo",
    "ForecastTask",
    "RegressionTask",
    "Task",
    "TokenTask",
    "data_info",
    "model_kwargs",
    "task_for",
]

# What a config.json that omits a key means: GRUModel's defaults of those arguments (a test holds
# them equal). Config files written before an argument existed keep meaning what they meant.
CONFIG_DEFAULTS: dict[str, Any] = {
    "task": "regression",
    "output_size": 1,
    "head": "last",
    "output": "point",
    "quantiles": DEFAULT_QUANTILES,
    "horizon": 0,
    "vocab_size": None,
    "loss_units": "raw",
    "point_loss": "mse",
}


def task_for(model_config: Mapping[str, Any]) -> Task:
    """The task of a model with these ``GRUModel`` arguments (``model.config``; omitted ones take
    their defaults). A gaussian or quantile output, a point loss other than MSE, or head ``forecast``,
    is a regression task even if ``task`` says otherwise, so that ``check_fits`` can name the mismatch
    with the data."""
    config = {**CONFIG_DEFAULTS, **model_config}
    head, output, size = config["head"], config["output"], config["output_size"]
    if config["task"] == "regression" or output != "point" or head == "forecast" or config["point_loss"] != "mse":
        values = distribution(output, config["quantiles"], config["point_loss"])
        if head == "forecast":
            return ForecastTask(size, values, config["horizon"], scaled_loss=config["loss_units"] == "scaled")
        return RegressionTask(head, size, values)
    if config["vocab_size"] is not None:
        return TokenTask(head, size)
    return ClassificationTask(head, size)


SYNTHETIC_KEYS = ("name", "seq_len", "num_features", "variable_length", "train_size", "val_size", "seed")


def data_facts(cfg: Config) -> dict[str, Any]:
    """What inference needs to know of a job's data, saved with the model (``GRUModel(data=...)``,
    config.json) so that a model folder copied away from its run folder evaluates and forecasts as
    the run's own does: the season, the context window and its stride, stream mode's chunk length,
    lanes and targets, and a synthetic dataset's generator parameters (its validation split)."""
    data, train = cfg.data, cfg.train
    facts: dict[str, Any] = {"season": data.season}
    if data.window is not None:
        facts.update(window=data.window, window_stride=data.window_stride)
    if train.tbptt is not None:
        facts["stream"] = {"tbptt": train.tbptt, "lanes": train.global_batch_size, "targets": data.targets}
    if data.name != "files":
        facts["synthetic"] = {key: getattr(data, key) for key in SYNTHETIC_KEYS}
    return facts


DATASET_FACTS = ("feature_names", "feature_roles", "target_names", "class_names", "freq", "calendar")


def dataset_facts(dataset: Any) -> dict[str, Any]:
    """The names the training data gives its columns and classes, its time step and calendar fields
    (those it has: `prepare --table` folders have them all), saved with the model so that its
    outputs carry the data's names wherever the model folder goes."""
    source = getattr(dataset, "source", dataset)  # windows are drawn from a stored dataset
    facts = {key: getattr(source, key, None) for key in DATASET_FACTS}
    return {key: value for key, value in facts.items() if value}


def data_info(cfg: Config, dataset: Any, split: str) -> DataInfo:
    """What ``Task.check_fits`` needs to know of the `train` or `val` split ``dataset`` of a job
    (training) or of the data given to a saved model (inference)."""
    data = cfg.data
    path = data.train_path if split == "train" else data.val_path
    streams = {}
    if cfg.train.tbptt:  # stream mode: its token ids against the model's embedding
        vocab = getattr(dataset, "vocab_size", None)
        top = max_token(dataset.source) if vocab is not None and cfg.model.vocab_size is not None else None
        streams = {
            "model_vocab": cfg.model.vocab_size,
            "vocab_size": vocab,
            "max_token": top,
            "feature_dtype": dataset.source.meta["feature_dtype"],
            "targets": data.targets,
        }
    if split == "train":  # what an epoch holds against one global batch
        streams.update(epoch_samples=epoch_samples(cfg, dataset), global_batch=cfg.train.global_batch_size)
    return DataInfo(
        source=path if data.name == "files" else f"data.name={data.name}",
        task=dataset.task,
        target_kind=getattr(dataset, "target_kind", "sequence"),
        output_size=dataset.output_size,
        horizon=data.horizon,
        tbptt=cfg.train.tbptt,
        **streams,
    )


def epoch_samples(cfg: Config, dataset: Any) -> int:
    """Samples of one training epoch: sequences or windows, or in stream mode chunks of
    ``train.tbptt`` steps (a stream's last chunk may be shorter)."""
    if cfg.train.tbptt:
        return int(chunks_per_stream(dataset.lengths, cfg.train.tbptt).sum())
    return len(dataset)


def model_kwargs(cfg: Config, dataset: Any) -> dict[str, Any]:
    """``GRUModel`` arguments of a job: the architecture from ``cfg.model``, sizes and task from the
    training ``dataset`` (its ``num_features``, ``output_size``, ``task``, ``target_kind``, ``statics``), scaling
    and horizon from ``cfg.data``. A model section that cannot fit the data is a ConfigError."""
    model, data = cfg.model, cfg.data
    tokens = getattr(dataset, "vocab_size", None) is not None
    kwargs = {
        "input_size": model.embedding_dim if tokens else dataset.num_features,
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
        "dropout": model.dropout,
        "task": dataset.task,
        "output_size": dataset.output_size,
        "cell": model.cell,
        "head": model.head,
        "bidirectional": model.bidirectional,
        "output": model.output,
        "quantiles": list(model.quantiles),
        "horizon": data.horizon,
        "scaling": data.scaling,
        "loss_units": model.loss_units,
        "point_loss": model.point_loss,
        "naive_season": data.season if model.naive_terms else 0,
        "vocab_size": model.vocab_size if tokens else None,
        "future_channels": getattr(dataset, "future_channels", None) or None,
        # What inference needs to know of the data: window, season, names ...
        "data": {**data_facts(cfg), **dataset_facts(dataset)},
        **static_kwargs(cfg, dataset),
    }
    task_for(kwargs).check_fits(data_info(cfg, dataset, "train"))
    if "static_categories" in kwargs:  # inference aligns its data's static columns to these by name
        kwargs["data"]["static"] = dataset.statics.columns
    return kwargs


def static_kwargs(cfg: Config, dataset: Any) -> dict[str, Any]:
    """``static_categories`` and ``static_values`` of a job's model from its training data's static
    columns (none under ``data.static_covariates=false``); a stream job with them is refused."""
    statics = getattr(dataset, "statics", None)
    if cfg.train.tbptt and cfg.data.static_covariates:
        statics = getattr(getattr(dataset, "source", None), "statics", None)
        if statics is not None:
            raise ConfigError(
                f"data.train_path={cfg.data.train_path}: has static columns, which stream mode (train.tbptt) cannot "
                "read (a stream carries its state from chunk to chunk); set data.static_covariates=false"
            )
    if statics is None:
        return {}
    return {"static_categories": statics.category_sizes or None, "static_values": statics.num_values}
