"""Fine-tuning: a new run that starts from another run's weights (`train.init_from`), not a resume.

    dist-gru train --config configs/files.yaml train.init_from=runs/pretrained/model train.freeze=[rnn]

`train.init_from` names a model folder (`RUN/model`, `RUN/best`: config.json + model.safetensors)
or a checkpoint folder (`RUN/checkpoints/step-N`, verified against its COMPLETE marker). Only
weights come from it: the optimizer, the schedule and the step counter start anew, as in a fresh
run. The encoder (`rnn.*`) must have the same shape (input size, hidden size, layers, cell,
direction); the head is loaded only when it means the same thing (task, number of outputs, head,
output kind, quantiles, horizon), else it keeps its fresh initialisation and one line says why;
a forecast head's naive terms (`model.naive_terms`) of another season than the source's start at
0, as in a new model, so the loaded model forecasts what the source's GRU and head do.
Input scaling is a property of the data, so it is the new job's own (`data.scaling`), not the
source's. `train.freeze: [rnn]` leaves the encoder untrained: the optimizer holds only the head.

A resume of a fine-tuning run continues its own checkpoints; `init_from` is read only when the
run starts at step 0. The run folder records the source in `init_from.json` (path, kind, step,
sha256 of its weights, what was loaded and what re-initialised), and `train.init_from` is part of
the run's trajectory config, so a resume under another source is refused.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dist_gru.config import ConfigError
from dist_gru.train import checkpoint as ckpt_lib

RECORD = "init_from.json"
# GRUModel arguments that shape the encoder: a source must match them all.
ENCODER_KEYS = ("input_size", "hidden_size", "num_layers", "cell", "bidirectional")
# Arguments that give the head's outputs their meaning: any difference re-initialises the head.
HEAD_KEYS = ("task", "output_size", "head", "output", "quantiles", "horizon")


def read_source(given: str) -> tuple[Path, str, dict[str, Any], int | None]:
    """(weights file, kind, model config, step) of `train.init_from`; ConfigError names what is wrong."""
    path = Path(given)
    expected = (
        "expected a model folder (config.json + model.safetensors, e.g. RUN/model) or a checkpoint folder "
        "(RUN/checkpoints/step-N)"
    )
    if not path.is_dir():
        raise ConfigError(f"train.init_from={given}: not a folder; {expected}")
    if (path / ckpt_lib.MARKER).is_file():
        ckpt = ckpt_lib.verify(path)
        config = {"task": ckpt.state.get("task"), **ckpt.state.get("model_config", {})}
        return path / "model.safetensors", "checkpoint", config, ckpt.step
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        from dist_gru.model import verify_model_folder

        verify_model_folder(path, f"train.init_from={given}")
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as exc:
            raise ConfigError(f"train.init_from={given}: config.json is not valid JSON ({exc})") from None
        return path / "model.safetensors", "model", config, None
    hint = f" ({path / 'model'} looks like one: a run folder's model is RUN/model)" if (path / "model").is_dir() else ""
    raise ConfigError(f"train.init_from={given}: {expected}{hint}")


def _value(config: dict[str, Any], key: str) -> Any:
    """A model config's value of `key`; a config.json omits arguments left at their defaults."""
    from dist_gru.model import GRUModel

    value = config.get(key, inspect.signature(GRUModel.__init__).parameters[key].default)
    return list(value) if isinstance(value, tuple) else value


def init_weights(given: str, model: torch.nn.Module, model_config: dict[str, Any]) -> dict[str, Any]:
    """Load `train.init_from`'s weights into `model` (built from `model_config`); returns the record.

    Raises ConfigError, before anything is written, when the encoders differ in shape or the file
    does not hold the weights its config names."""
    weights_file, kind, source, step = read_source(given)
    mismatched = [
        f"{key}: the model there has {_value(source, key)!r}, this job has {_value(model_config, key)!r}"
        for key in ENCODER_KEYS
        if _value(source, key) != _value(model_config, key)
    ]
    if mismatched:
        raise ConfigError(
            f"train.init_from={given}: its GRU does not fit this job's model (fine-tuning keeps the encoder's "
            "shape; only the head may change):\n  " + "\n  ".join(mismatched)
        )
    try:
        weights = load_file(weights_file)
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad header or size
        raise ConfigError(f"train.init_from={given}: {weights_file.name} is unreadable ({exc})") from None
    head_changes = [
        f"{key} {_value(source, key)!r} -> {_value(model_config, key)!r}"
        for key in HEAD_KEYS
        if _value(source, key) != _value(model_config, key)
        and (key != "quantiles" or _value(model_config, "output") == "quantile")  # levels only shape quantile heads
    ]
    parts = ("rnn.",) if head_changes else ("rnn.", "head.")
    own = {name: t for name, t in model.state_dict().items() if name.startswith(parts)}
    naive = [_value(source, "naive_season"), _value(model_config, "naive_season")]
    if naive[0] != naive[1]:  # new naive terms start at 0, as in a new model: the forecast is the source's
        own = {name: t for name, t in own.items() if not name.startswith("head.naive.")}
    wrong = [
        f"{name}: {'missing' if name not in weights else list(weights[name].shape)}, expected {list(t.shape)}"
        for name, t in own.items()
        if name not in weights or weights[name].shape != t.shape
    ]
    if wrong:
        raise ConfigError(
            f"train.init_from={given}: {weights_file.name} does not match its config: " + "; ".join(wrong)
        )
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(weights[name])
    return {
        "init_from": given,
        "path": str(Path(given).resolve()),
        "kind": kind,
        "step": step,
        "sha256": ckpt_lib.sha256_file(weights_file),
        "loaded": [p.rstrip(".") for p in parts],
        "head_reinitialised": ", ".join(head_changes) or None,
        "naive_terms_new": f"naive_season {naive[0]} -> {naive[1]}" if naive[0] != naive[1] else None,
    }


def freeze(model: torch.nn.Module, parts: list[str]) -> None:
    """Stop training the named submodules (`train.freeze`); the optimizer then holds only the rest."""
    for part in parts:
        getattr(model, part).requires_grad_(False)


def describe(record: dict[str, Any]) -> str:
    """The one line printed when a fine-tuning run starts."""
    source = f"{record['kind']} {record['init_from']}" + (f" (step {record['step']})" if record["step"] else "")
    if record["head_reinitialised"]:
        loaded = f"rnn loaded; head re-initialised ({record['head_reinitialised']})"
    else:
        loaded = "rnn and head loaded"
    if record.get("naive_terms_new"):
        loaded += f"; naive terms start at 0 ({record['naive_terms_new']})"
    return f"dist-gru: train.init_from: weights from {source}: {loaded}"


def write_record(run_dir: Path, record: dict[str, Any], frozen: list[str]) -> None:
    """`<run_dir>/init_from.json`, atomically (global rank 0, once the run folder is committed)."""
    tmp = Path(run_dir) / f".{RECORD}.{os.getpid()}"
    tmp.write_text(json.dumps({**record, "frozen": frozen}, indent=2) + "\n")
    os.replace(tmp, Path(run_dir) / RECORD)
