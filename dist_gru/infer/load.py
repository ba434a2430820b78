"""Loading a saved model folder for inference, and the pieces the inference commands share.

    from dist_gru.infer.load import load_model
    model = load_model("runs/adding/model")          # checked against its SHA256SUMS, loaded strictly

A model folder (config.json + model.safetensors) is all inference needs: besides the architecture,
config.json holds `data`, what inference needs to know of the data the model was trained on
(`data_facts`: the season, the context window and its stride, stream mode's settings, a synthetic
set's generator parameters, and the static columns with their vocabularies). The commands build their config from the run's config.yaml (or
--config) < the model's own head, horizon and data facts < the user's overrides, so a model folder
copied away from its run folder evaluates and forecasts as the run's own does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_gru.config import Config, ConfigError, load_config
from dist_gru.data.batching import model_inputs
from dist_gru.data.loading import build_dataset
from dist_gru.tasks import SYNTHETIC_KEYS, data_info, task_for

if TYPE_CHECKING:
    from dist_gru.model import GRUModel


def json_line(record: dict) -> str:
    """`record` as strict JSON: a NaN or infinite number becomes null, and `nonfinite` lists the
    keys that were (bare NaN / Infinity, which `json.dumps` writes by default, is not JSON)."""
    from dist_gru.train.tracking import finite_or_none

    clean = finite_or_none(record)
    nonfinite = [key for key, value in record.items() if value is not None and clean[key] is None]
    return json.dumps({**clean, "nonfinite": nonfinite} if nonfinite else clean, allow_nan=False)


def batch_to(batch: dict, device: torch.device) -> tuple[dict[str, Any], torch.Tensor | None]:
    """(the model's inputs, y) of a loader's batch (`dist_gru.data.batching.model_inputs`), y on
    `device` (None for unlabelled data)."""
    y = batch.get("y")
    return model_inputs(batch, device), None if y is None else y.to(device, non_blocking=device.type == "cuda")


def load_model(model_dir: str | Path) -> GRUModel:
    """The one loader of a saved model folder (evaluate, predict, forecast, export, sample): checked
    against its SHA256SUMS, then loaded strictly; any failure is a ConfigError naming the folder."""
    from dist_gru.model import GRUModel, verify_model_folder

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: not a folder; expected a saved model folder (config.json + model.safetensors)")
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise ConfigError(f"--model {model_dir}: expected a folder with config.json and model.safetensors")
    verify_model_folder(model_dir, f"--model {model_dir}")
    try:
        return GRUModel.from_pretrained(str(model_dir))
    except Exception as exc:  # a broken config.json or weights file: the mixin's errors vary
        raise ConfigError(f"--model {model_dir}: not a loadable model folder ({type(exc).__name__}: {exc})") from exc


def fact_overrides(model: GRUModel, data: str, own_config: bool) -> list[str]:
    """``data_facts`` of `model` as config overrides; none for a model saved without them (its run's
    config.yaml holds them). A synthetic generator's parameters apply to the same synthetic `data`
    only, and not under `own_config` (the user's --config names them)."""
    facts = model.data
    if facts is None:
        return []
    overrides = [f"data.season={facts['season']}", f"data.window={json.dumps(facts.get('window'))}"]
    if "window" in facts:
        overrides.append(f"data.window_stride={facts['window_stride']}")
    if "stream" in facts:
        stream = facts["stream"]
        overrides += [
            f"train.tbptt={stream['tbptt']}",
            f"train.global_batch_size={stream['lanes']}",
            f"data.targets={stream['targets']}",
            f"model.vocab_size={json.dumps(model.vocab_size)}",
        ]
    synthetic = facts.get("synthetic")
    if synthetic and synthetic["name"] == data and not own_config and not Path(data).exists():
        overrides += [f"data.{key}={json.dumps(synthetic[key])}" for key in SYNTHETIC_KEYS[1:]]
    return overrides


def inference_config(args: argparse.Namespace, model: GRUModel, extra: list[str] = ()) -> Config:
    """The job's config: the run's config.yaml (or --config) < the model's own head, horizon and
    data facts < `extra` < the user's overrides, then checked against the model."""
    model_dir = Path(args.model)
    run_config = args.config or (
        model_dir.parent / "config.yaml" if (model_dir.parent / "config.yaml").is_file() else None
    )
    overrides = [f"model.head={model.head_kind}", f"data.horizon={model.horizon}"]
    overrides.append(f"data.future_covariates={str(bool(model.future_channels)).lower()}")
    overrides.append(f"data.static_covariates={str(model.statics is not None).lower()}")
    overrides += [*fact_overrides(model, args.data, args.config is not None), *extra, *args.overrides]
    if Path(args.data).exists():
        overrides += ["data.name=files", f"data.val_path={args.data}", f"data.train_path={args.data}"]
    else:
        overrides += [f"data.name={args.data}"]
    cfg = load_config(run_config, overrides)
    for key, want, got in (
        ("model.head", model.head_kind, cfg.model.head),
        ("data.horizon", model.horizon, cfg.data.horizon),
    ):
        if want != got:
            raise ConfigError(f"{key}={got!r}, but the model at --model {model_dir} was built with {key}={want!r}")
    return cfg


def check_features(args: argparse.Namespace, model: GRUModel, num_features: int) -> None:
    """ConfigError unless the samples of `--data` have the model's number of input features."""
    if num_features != model.input_size:
        raise ConfigError(
            f"--data {args.data}: samples have {num_features} input features, the model expects {model.input_size}"
        )


def load_for_inference(
    args: argparse.Namespace, extra: list[str] = (), unlabelled: bool = False
) -> tuple[Config, GRUModel, Any]:
    """Model from `--model`, dataset from `--data` (a seq folder or a synthetic name); `unlabelled`:
    data without targets is welcome (predict)."""
    model = load_model(Path(args.model))
    cfg, dataset = data_for_model(args, model, extra, unlabelled)
    return cfg, model, dataset


def data_for_model(
    args: argparse.Namespace, model: GRUModel, extra: list[str] = (), unlabelled: bool = False
) -> tuple[Config, Any]:
    """The job's config and the dataset of `--data` as `model` reads it, checked against the model
    (unlabelled data, which has no targets to check, only with `unlabelled`)."""
    cfg = inference_config(args, model, list(extra))
    if cfg.train.tbptt:  # a stream-mode run: its validation data are streams, evaluated chunk by chunk
        from dist_gru.data.streams import build_stream_dataset

        dataset = build_stream_dataset(cfg, "val")
    else:
        dataset = build_dataset(cfg.data, "val", head=model.head_kind)
    if not (unlabelled and getattr(dataset, "target_kind", None) == "none"):
        task_for(model.config).check_fits(data_info(cfg, dataset, "val"))  # as training checks its data
    if getattr(dataset, "vocab_size", None) is None:  # token ids have no feature count to compare
        check_features(args, model, dataset.num_features)
    given = getattr(dataset, "future_channels", [])
    if given != model.future_channels:
        raise ConfigError(
            f"--data {args.data}: its future-known covariates are input channels {given}, the model reads "
            f"{model.future_channels} (mark the same feature columns as future-known)"
        )
    align_statics(dataset, model, f"--data {args.data}")
    return cfg, dataset


def require_positive(args: argparse.Namespace, *options: str) -> None:
    """ConfigError naming the first of the integer `options` (`--origins`, ...) given below 1."""
    for option in options:
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None and value < 1:
            raise ConfigError(f"{option} {value}: expected an integer >= 1")


def checked_out(args: argparse.Namespace, suffixes: tuple[str, ...]) -> Path:
    """`--out`: a file name ending in one of `suffixes`, in a folder that exists, and outside the
    command's inputs (which writing it would overwrite); else a ConfigError naming it."""
    out = Path(args.out)
    if out.suffix not in suffixes:
        raise ConfigError(f"--out {out}: expected a file name ending in {', '.join(suffixes)}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    problem = output_inside_input(out, {"--model": args.model, "--data": args.data, "--config": args.config})
    if problem:
        raise ConfigError(problem)
    return out


def align_statics(dataset: Any, model: GRUModel, where: str) -> None:
    """Give `dataset`'s batches the model's static columns: the data's category codes remapped by
    name to the model's vocabularies (`dist_gru.data.statics`); none for a model without statics.
    Data whose static columns differ from the model's is refused (DataFormatError naming both)."""
    from dist_gru.data.statics import aligned_statics

    if model.statics is not None and model.static_columns is None:
        raise ConfigError(f"{where}: the model reads static columns, but its config.json does not name them (data.static)")
    dataset.statics = aligned_statics(getattr(dataset, "statics", None), model.static_columns, where)


def output_inside_input(out: str | Path, inputs: dict[str, str | Path | None]) -> str | None:
    """Why `out` must not be written, or None: it is (inside) one of `inputs` ({option: path}),
    which writing it would overwrite (e.g. `--out DATA/features.npy`). Paths are compared resolved
    (symlinks and `..` followed); inputs that are not paths on disk (a synthetic dataset name) are skipped."""
    target = Path(out).resolve()
    for option, given in inputs.items():
        if given is None or not Path(given).exists():
            continue
        if target.is_relative_to(Path(given).resolve()):
            return (
                f"--out {out}: is inside {option} {given}, which it would overwrite; choose an output path "
                f"outside the inputs"
            )
    return None


def command_parser(prog: str) -> argparse.ArgumentParser:
    """The options every inference command over a dataset takes (evaluate, forecast, predict)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--model", required=True, help="a saved model folder (config.json + model.safetensors)")
    parser.add_argument(
        "--data", required=True, help="a dist_gru.seq/v1 folder, or a synthetic dataset name (uses its val split)"
    )
    parser.add_argument("--config", help="config for synthetic data parameters (default: the run's config.yaml)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.seq_len=100")
    return parser
