"""`dist-gru bench --accuracy`: the suite's loop over sets, models and seeds, and its options."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dist_gru.bench.accuracy import metrics, ours, peers, plain_gru, table
from dist_gru.bench.accuracy.datasets import CLASSIFY, FORECAST, ClassSet, ForecastSet, MissingPackage
from dist_gru.config import Config, ConfigError, load_config

FORECASTERS = ("dist-gru", "plain-gru", *peers.STATS, *peers.NEURAL, *peers.DARTS)
CLASSIFIERS = ("dist-gru", "plain-gru", *peers.CLASSIFIERS)
MODELS = (*FORECASTERS, *peers.CLASSIFIERS)
STEPPED = ("dist-gru", "plain-gru", *peers.NEURAL, *peers.DARTS)  # trained by optimizer steps: seconds per step apply
# Optimizer steps of every trained model in the default suite. The forecasting recipe's own budget
# is 1500 (configs/forecast.yaml); at 1500, 8 forecasting sets x 5 trained models + 3 classification
# sets x 2, 3 seeds each, is over 45 minutes on 2 cores, at 1000 about 23 (two halves side by side,
# joined: docs/accuracy.md). `--steps 1500` runs the reference budget.
DEFAULT_STEPS = 1000
# The smoke run: a set that needs no extra package (matplotlib ships it), and one classification set.
QUICK = {"sets": ["stocks", "ItalyPowerDemand"], "steps": 40, "seeds": 1}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-gru bench --accuracy", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument("--sets", help=f"comma-separated, of {', '.join([*FORECAST, *CLASSIFY])} (default: all)")
    parser.add_argument("--models", help=f"comma-separated, of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--seeds", type=int, help="seeds per trained model (default 3; --quick 1)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps of every trained model (default {DEFAULT_STEPS}; --quick {QUICK['steps']})")
    parser.add_argument("--override", action="append", default=[], help="a dist-gru config override for its recipe (repeatable)")
    parser.add_argument("--out", default="runs/accuracy", help="folder for accuracy.json and accuracy.md")
    parser.add_argument("--join", help="comma-separated folders of earlier runs (e.g. parts of the suite run side by "
                        "side): their accuracy.json joined into one table in --out; trains nothing")
    args = parser.parse_args(argv)
    sets = args.sets.split(",") if args.sets else (QUICK["sets"] if args.quick else [*FORECAST, *CLASSIFY])
    models = args.models.split(",") if args.models else list(MODELS)
    unknown = [s for s in sets if s not in FORECAST and s not in CLASSIFY] + [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(f"bench --accuracy: unknown set or model {', '.join(unknown)}; sets: "
                          f"{', '.join([*FORECAST, *CLASSIFY])}; models: {', '.join(MODELS)}")
    if (args.seeds is not None and args.seeds < 1) or (args.steps is not None and args.steps < 1):
        raise ConfigError(f"bench --accuracy: --seeds and --steps must be >= 1, got {args.seeds} and {args.steps}")
    args.sets, args.models, args.threads = sets, models, torch.get_num_threads()
    args.seeds = args.seeds or (QUICK["seeds"] if args.quick else 3)
    args.steps = args.steps or (QUICK["steps"] if args.quick else DEFAULT_STEPS)
    return args


def recipe_config(kind: str, data: ForecastSet | ClassSet, args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The resolved recipe for a set (to read its budget) and the overrides every run of it adds."""
    extra = [*args.override, f"train.max_steps={args.steps}"]
    cfg = load_config(ours.recipe(kind), ours.COMMON + ours.set_overrides(data) + extra + ["data.name=files", "data.train_path=."])
    return cfg, extra


def budget_of(cfg: Config) -> plain_gru.Budget:
    return plain_gru.Budget(cfg.train.max_steps, cfg.train.global_batch_size, cfg.optim.lr, cfg.model.hidden_size, cfg.model.num_layers)


def plain_forecast(fset: ForecastSet, budget: plain_gru.Budget, seed: int) -> dict:
    started = time.perf_counter()
    histories = [y[: fset.cut(i, fset.origins - 1)] for i, y in enumerate(fset.series)]
    model = plain_gru.fit_forecaster(histories, fset.window, fset.horizon, budget, seed)
    seconds = time.perf_counter() - started
    point = np.empty((len(fset.series), fset.origins, fset.horizon))
    for k in range(fset.origins):
        contexts = np.stack([fset.context(i, k) for i in range(len(fset.series))])
        point[:, k] = plain_gru.forecast(model, contexts)
    return {"point": point, "train_s": seconds}


def forecast_once(model: str, fset: ForecastSet, budget: plain_gru.Budget, seed: int, work: Path, extra: list[str]) -> dict:
    if model == "dist-gru":
        return ours.forecast(fset, work, seed, extra)
    if model == "plain-gru":
        return plain_forecast(fset, budget, seed)
    if model in peers.STATS:
        return peers.stats_forecast(model, fset)
    if model in peers.DARTS:
        return peers.darts_forecast(fset, budget, seed)
    return peers.neural_forecast(model, fset, budget, seed)


def classify_once(model: str, cset: ClassSet, budget: plain_gru.Budget, seed: int, work: Path, extra: list[str]) -> dict:
    if model == "dist-gru":
        return ours.classify(cset, work, seed, extra)
    if model in peers.CLASSIFIERS:
        return peers.minirocket(cset, seed)
    started = time.perf_counter()
    fitted, stats = plain_gru.fit_classifier(cset.train_x, cset.train_y, cset.num_classes, cset.per_step, budget, seed)
    seconds = time.perf_counter() - started
    return {"labels": plain_gru.predict_classes(fitted, stats, cset.test_x, cset.per_step), "train_s": seconds}


def model_row(name: str, model: str, data, args: argparse.Namespace, work: Path) -> dict:
    """One (set, model) row: scores over seeds, mean training seconds and seconds per step."""
    is_forecast = isinstance(data, ForecastSet)
    kind = "forecast" if is_forecast else ("label" if data.per_step else "classify")
    cfg, extra = recipe_config(kind, data, args)
    budget = budget_of(cfg)
    trained = model not in peers.STATS
    runs, seconds = [], []
    # Every model starts with the thread count the suite started with: a full run once ended with
    # torch at 2 threads under OMP_NUM_THREADS=1, changed by one of the packages it had called.
    torch.set_num_threads(args.threads)
    for seed in range(args.seeds if trained else 1):
        if is_forecast:
            result = forecast_once(model, data, budget, seed, work, extra)
            runs.append(metrics.forecast_scores(data, result["point"], result.get("lo"), result.get("hi")))
        else:
            result = classify_once(model, data, budget, seed, work, extra)
            runs.append(metrics.accuracy(data.test_y, result["labels"]))
        seconds.append(result["train_s"])
    row = {"set": name, "kind": kind, "model": model, "seeds": len(runs), "runs": runs, "scores": metrics.summarise(runs)}
    row["train_s"] = float(np.mean(seconds))
    row["steps"] = budget.steps if model in STEPPED else None
    row["s_per_step"] = row["train_s"] / budget.steps if model in STEPPED else None
    return row


def describe(name: str, data: ForecastSet | ClassSet) -> dict:
    if isinstance(data, ForecastSet):
        lengths = [len(y) for y in data.series]
        keys = ("source", "freq", "season", "window", "horizon", "origins")
        return {"set": name, **{k: getattr(data, k) for k in keys}, "stride": data.step, "series": len(lengths),
                "length_min": min(lengths), "length_max": max(lengths), "future_known": data.calendar,
                "static": list(data.static)}
    return {"set": name, "source": data.source, "per_step": data.per_step, "classes": data.num_classes,
            "train": len(data.train_x), "test": len(data.test_x), "features": int(data.train_x[0].shape[1]),
            "length_min": min(len(x) for x in data.test_x), "length_max": max(len(x) for x in data.test_x)}


def set_rows(name: str, args: argparse.Namespace, work: Path) -> tuple[list[dict], dict | None]:
    """Every chosen model's row on one set (a note row for a missing package or a failure)."""
    try:
        data = (FORECAST.get(name) or CLASSIFY[name])()
    except MissingPackage as err:
        return [{"set": name, "model": "-", "note": f"set skipped: {err}"}], None
    if isinstance(data, ForecastSet):
        chosen = [m for m in args.models if m in FORECASTERS]
    else:  # MiniRocket labels whole sequences, not steps
        chosen = [m for m in args.models if m in CLASSIFIERS and not (data.per_step and m in peers.CLASSIFIERS)]
    rows = []
    for model in chosen:
        print(f"bench --accuracy: {name} / {model}", flush=True)
        try:
            rows.append(model_row(name, model, data, args, work / name))
        except MissingPackage as err:
            rows.append({"set": name, "model": model, "note": f"skipped: {err}"})
        except Exception as err:  # one model failing must not lose the rest of a long suite
            import traceback

            traceback.print_exc()
            rows.append({"set": name, "model": model, "note": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"})
    return rows, describe(name, data)


def join_runs(folders: list[str], out: Path) -> int:
    """`--join`: the records of earlier runs as one table; a missing or foreign record changes nothing."""
    parts = []
    for folder in folders:
        path = Path(folder) / "accuracy.json"
        try:
            record = json.loads(path.read_text())
            missing = sorted(table.RECORD_KEYS - set(record))
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"bench --accuracy --join: cannot read {path} ({err}); expected the --out folder of a finished run") from None
        if missing:
            raise ConfigError(f"bench --accuracy --join: {path} is not a record of bench --accuracy (no {', '.join(missing)})")
        parts.append(record)
    try:
        rows, sets, header = table.join(parts, [*FORECAST, *CLASSIFY])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    table.write_record(out, rows, sets, header)
    print((out / "accuracy.md").read_text(), flush=True)
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.join:
        return join_runs(args.join.split(","), out)
    work = out / "scratch"  # prepared folders and runs, removed at the end
    shutil.rmtree(work, ignore_errors=True)
    rows, sets, started, host = [], [], time.perf_counter(), table.machine()
    for name in args.sets:
        found, described = set_rows(name, args, work)
        rows += found
        sets += [described] if described else []
    used = sorted({row["steps"] for row in rows if row.get("steps")})
    settings = {"steps": used[0] if len(used) == 1 else used, "seeds": args.seeds, "overrides": args.override,
                "quick": args.quick, "wall_s": round(time.perf_counter() - started, 1)}
    table.write(out, rows, sets, settings, host)
    print((out / "accuracy.md").read_text(), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0
