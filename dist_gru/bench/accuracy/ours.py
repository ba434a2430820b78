"""dist-gru's own recipe, run through the real commands (`prepare --table`, `train`, `forecast`,
`predict`), in this process, exactly as a user would type them.

The recipe is a config file of the repository (`configs/forecast.yaml` for forecasting,
`configs/files.yaml` for sequence classification, `configs/labelling.yaml` for per-step labels)
plus overrides that are data: `COMMON` for every run, the set's protocol (window, horizon,
season), `PER_SET` for a set's own needs, then the user's `--override`s. When the recipe
changes, the benchmark follows; swapping the scaler is one line of `COMMON` (or
`--override data.scaling=...`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dist_gru import cli
from dist_gru.bench.accuracy.datasets import ClassSet, ForecastSet

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
RECIPES = {"forecast": "forecast.yaml", "classify": "files.yaml", "label": "labelling.yaml"}
# For every run: no checkpoints or tracking (they cost time and change no weight), no evaluation
# during training (the benchmark scores the test origins itself).
COMMON = ["checkpoint.every=0", "train.eval_every=0", "log.mode=disabled", "train.resume=none"]
# airline's single series has 61 training windows, fewer than the recipe's batch of 64.
PER_SET: dict[str, list[str]] = {"airline": ["train.global_batch_size=32"]}


def recipe(kind: str) -> str:
    return str(CONFIGS / RECIPES[kind])


def set_overrides(fset: ForecastSet | ClassSet) -> list[str]:
    """The set's protocol as config overrides, then its own extras."""
    own = PER_SET.get(fset.name, [])
    if isinstance(fset, ClassSet):
        return ["data.val_path=null", *own]
    return [f"data.window={fset.window}", f"data.horizon={fset.horizon}", f"data.season={fset.season}", *own]


def command(*argv: str) -> None:
    """One dist-gru command in this process; its `error:` line is on stderr already when it fails."""
    code = cli.main(list(argv))
    if code != 0:
        print(f"bench --accuracy: failed: dist-gru {' '.join(argv)}", file=sys.stderr, flush=True)
        raise RuntimeError(f"dist-gru {argv[0]} exited with code {code} (its error is in the log)")


def origin_folders(fset: ForecastSet, work: Path) -> list[Path]:
    """Per origin k, the history before it as a prepared folder (series id = its index); prepared once per set."""
    folders = []
    work.mkdir(parents=True, exist_ok=True)
    for k in range(fset.origins):
        folder = work / f"origin{k}"
        if not (folder / "meta.json").is_file():
            rows = []
            for i, (y, start) in enumerate(zip(fset.series, fset.starts, strict=True)):
                cut = fset.cut(i, k)
                times = pd.date_range(start, periods=cut, freq=fset.freq)
                statics = {column: values[i] for column, values in fset.static.items()}
                rows.append(pd.DataFrame({"id": i, "ds": times, "y": y[:cut], **statics}))
            table = work / f"origin{k}.csv"
            pd.concat(rows).to_csv(table, index=False)
            extra = ["--calendar", ",".join(fset.calendar)] if fset.calendar else []
            extra += ["--static-columns", ",".join(fset.static)] if fset.static else []
            command("prepare", "--table", str(table), "--id-column", "id", "--time-column", "ds", "--target-columns",
                    "y", "--freq", fset.freq, *extra, "--out", str(folder))
        folders.append(folder)
    return folders


def train(kind: str, train_path: Path, run: Path, seed: int, overrides: list[str]) -> float:
    """Train the recipe on `train_path` into `run`; returns the wall seconds."""
    started = time.perf_counter()
    command("train", "--config", recipe(kind), *COMMON, *overrides, "data.name=files", f"data.train_path={train_path}",
            f"train.run_dir={run}", f"train.seed={seed}", "--quiet")
    return time.perf_counter() - started


def forecast(fset: ForecastSet, work: Path, seed: int, overrides: list[str]) -> dict:
    """Point forecasts [N, K, H] of every origin (and 95 % bounds for a quantile model that has them)."""
    folders = origin_folders(fset, work)
    run = work / f"ours-seed{seed}"
    seconds = train("forecast", folders[-1], run, seed, set_overrides(fset) + overrides)
    outputs = []
    for k, folder in enumerate(folders):
        out = run / f"forecast{k}.npy"
        command("forecast", "--model", str(run / "model"), "--data", str(folder), "--out", str(out))
        outputs.append(np.load(out)[:, :, 0])  # [N, H(, Q)]: the first (only) target
    stacked = np.stack(outputs, axis=1)
    return {**point_and_bounds(stacked, run / "model"), "train_s": seconds}


def point_and_bounds(outputs: np.ndarray, model_dir: Path) -> dict:
    """A point model's output is the forecast; a quantile model's median is, and its 0.025 and 0.975
    quantiles, when it has them, are the 95 % interval."""
    if outputs.ndim == 3:
        return {"point": outputs}
    import json

    quantiles = [round(q, 6) for q in json.loads((model_dir / "config.json").read_text())["quantiles"]]
    result = {"point": outputs[..., quantiles.index(0.5) if 0.5 in quantiles else len(quantiles) // 2]}
    if 0.025 in quantiles and 0.975 in quantiles:
        result |= {"lo": outputs[..., quantiles.index(0.025)], "hi": outputs[..., quantiles.index(0.975)]}
    return result


def classify(cset: ClassSet, work: Path, seed: int, overrides: list[str]) -> dict:
    """Predicted labels of the test split (per step: every step of every sequence, concatenated)."""
    from dist_gru.data.files import write_sequences

    kind = "label" if cset.per_step else "classify"
    paths = {}
    for split, x, y in (("train", cset.train_x, cset.train_y), ("test", cset.test_x, cset.test_y)):
        paths[split] = work / split
        if not (paths[split] / "meta.json").is_file():
            write_sequences(paths[split], x, y, task="classification", num_classes=cset.num_classes)
    run = work / f"ours-seed{seed}"
    seconds = train(kind, paths["train"], run, seed, set_overrides(cset) + overrides)
    out = run / "predicted.npy"
    command("predict", "--model", str(run / "model"), "--data", str(paths["test"]), "--out", str(out))
    return {"labels": np.load(out), "train_s": seconds}
