"""The search space of `dist-gru tune`: a YAML file over any config key, checked before any trial.

    metric: eval/mase            # optional: the task's main metric (eval/loss, eval/accuracy, ...)
    direction: auto              # auto | minimize | maximize (auto: maximize accuracy and macro_f1)
    sampler: {name: tpe, seed: 0}                      # tpe | random
    pruner: {name: median, startup_trials: 2}          # none | median | asha | hyperband | threshold
    params:
      optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}           # float (log or linear)
      model.hidden_size: {low: 16, high: 128, step: 16}          # int: integer bounds
      model.num_layers: {choices: [1, 2]}                        # categorical
      model.dropout: {low: 0.0, high: 0.3, when: {model.num_layers: 2}}   # only for 2-layer trials

A parameter with `when` is suggested only when every named key (an earlier parameter, or the base
config) has the given value (or one of a list of values); otherwise the trial keeps the base
config's value. That is Optuna's define-by-run space: its samplers handle keys that come and go.
Every key must be a config key, and every bound and choice must be a value the key accepts: the
space is checked against the real config validation with the base config before the study starts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dist_gru.config import ConfigError, config_fields, load_config, short_repr

# Keys a trial cannot take from the space: where it runs and which study it reports to.
NOT_SEARCHABLE = ("train.run_dir", "train.resume", "tune.study", "tune.trial")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(_Strict):
    """One searched key: a float or int range, or a list of choices."""

    type: Literal["float", "int", "categorical"] | None = Field(None, description="inferred when omitted")
    # int | float: an int bound written as 16 (not 16.0) makes an int parameter.
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(None, gt=0)
    choices: list[Any] | None = None
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind(self) -> Param:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.type not in (None, "categorical"):
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
            self.type = "categorical"
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (a range) or choices (a list)")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"low={self.low} must be at most high={self.high} (finite)")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log=true and step cannot combine (Optuna samples one or the other)")
        if self.type is None:
            written = (self.low, self.high) + (() if self.step is None else (self.step,))
            self.type = "int" if all(isinstance(v, int) for v in written) else "float"
        return self

    def values_to_check(self) -> list[Any]:
        """The values whose validity proves the whole range valid (bounds are where ranges break)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class Sampler(_Strict):
    name: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0
    startup_trials: int = Field(10, ge=0, description="random trials before TPE models the space")


class Pruner(_Strict):
    name: Literal["none", "median", "asha", "hyperband", "threshold"] = "median"
    startup_trials: int = Field(2, ge=0, description="median: trials that finish before any is pruned")
    warmup_steps: int = Field(0, ge=0, description="median: no pruning before this training step")
    min_steps: int = Field(1, ge=1, description="asha / hyperband: the smallest budget (training steps)")
    reduction_factor: int = Field(3, ge=2, description="asha / hyperband: keep 1 in this many at each rung")
    lower: float | None = Field(None, description="threshold: prune below this value")
    upper: float | None = Field(None, description="threshold: prune above this value")


class Space(_Strict):
    metric: str | None = None
    direction: Literal["auto", "minimize", "maximize"] = "auto"
    sampler: Sampler = Field(default_factory=Sampler)
    pruner: Pruner = Field(default_factory=Pruner)
    # The base config as the study's first trial: the best found is then never worse than it on
    # the validation split (its searched keys' values must lie in the space).
    baseline: bool = False
    params: dict[str, Param]

    @model_validator(mode="after")
    def _shape(self) -> Space:
        if not self.params:
            raise ValueError("params is empty: name at least one config key to search")
        if self.metric is not None and not self.metric.startswith("eval/"):
            raise ValueError(f"metric={self.metric!r}: expected a logged eval metric, e.g. eval/loss")
        if self.pruner.name == "threshold" and self.pruner.lower is None and self.pruner.upper is None:
            raise ValueError("pruner threshold needs lower or upper")
        return self


def read_space(path: str | Path) -> Space:
    """The space in `path`, shape-checked (keys against the config come with `check_space`)."""
    import yaml

    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--space {path}: cannot read it as YAML ({exc})") from None
    return space_from_dict(tree, f"--space {path}")


def space_from_dict(tree: Any, where: str) -> Space:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping with params:, got {short_repr(tree)}")
    try:
        return Space.model_validate(tree)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise ConfigError(f"{where}: invalid search space:\n  " + "\n  ".join(problems)) from None


def check_space(space: Space, config: str | Path | None, config_overrides: list[str], where: str) -> None:
    """Refuse (ConfigError, every problem at once) a key that is not a config key or cannot be
    searched, a bound or choice the key does not accept, or a `when` on an unknown key. Each value
    is tried through the config's own validation, on top of the base config."""
    keys = {dotted for dotted, _ in config_fields()}
    problems = []
    for name, param in space.params.items():
        if name not in keys:
            problems.append(f"params.{name}: not a config key (see dist-gru train --help)")
            continue
        if name in NOT_SEARCHABLE:
            problems.append(f"params.{name}: set by dist-gru tune for each trial; it cannot be searched")
            continue
        for key in param.when:
            if key not in keys:
                problems.append(f"params.{name}.when: {key} is not a config key")
        for value in param.values_to_check():
            try:
                load_config(config, [*config_overrides, *overrides({name: value})])
            except ConfigError as exc:
                reason = str(exc).removeprefix("invalid config:\n  ").replace("\n  ", "; ")
                problems.append(f"params.{name}: the value {value!r} is outside what the key accepts ({reason})")
    if space.baseline and not problems:
        problems += baseline_problems(space, load_config(config, config_overrides).to_dict())
    if problems:
        raise ConfigError(f"{where}: invalid search space:\n  " + "\n  ".join(problems))


def baseline_params(space: Space, base: dict[str, Any]) -> dict[str, Any]:
    """The base config's values of the searched keys whose `when` holds there (trial 0 of `baseline`)."""
    values = {name: _lookup(base, name) for name in space.params}
    return {
        name: values[name]
        for name, p in space.params.items()
        if all(_matches(values.get(key, _lookup(base, key)), want) for key, want in p.when.items())
    }


def baseline_problems(space: Space, base: dict[str, Any]) -> list[str]:
    problems = []
    for name, value in baseline_params(space, base).items():
        p = space.params[name]
        inside = value in p.choices if p.type == "categorical" else value is not None and p.low <= value <= p.high
        if not inside:
            where = f"choices {p.choices}" if p.type == "categorical" else f"[{p.low}, {p.high}]"
            problems.append(
                f"baseline: true, but the base config's {name}={value!r} is outside {where}: "
                "widen the range, or set baseline: false"
            )
    return problems


def suggest(trial: Any, space: Space, base: dict[str, Any]) -> dict[str, Any]:
    """The trial's values for the keys whose `when` holds, in the space's order (define-by-run)."""
    chosen: dict[str, Any] = {}
    for name, p in space.params.items():
        if not all(_matches(chosen.get(key, _lookup(base, key)), want) for key, want in p.when.items()):
            continue
        if p.type == "categorical":
            chosen[name] = trial.suggest_categorical(name, p.choices)
        elif p.type == "int":
            chosen[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            chosen[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    return chosen


def _matches(value: Any, want: Any) -> bool:
    return value in want if isinstance(want, list) else value == want


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def overrides(params: dict[str, Any]) -> list[str]:
    """`key=value` overrides of a trial's params, parsed back by the config loader to the same values."""
    import json

    # JSON is YAML: strings quoted, lists and null spelled so the loader reads them back unchanged.
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]
