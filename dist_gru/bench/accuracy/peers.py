"""What users would pick instead of dist-gru, each through its own package (the `bench` extra):
statsforecast's SeasonalNaive, AutoETS and AutoTheta, refitted at every origin; NeuralForecast's
GRU and NHITS, trained once on the history before the first origin with dist-gru's budget
(`max_steps`, `windows_batch_size` = the batch, `learning_rate`, `input_size` = the window);
Darts' `BlockRNNModel` with a GRU of dist-gru's size, likewise; for sequence classification,
aeon's MiniRocket. A missing package raises MissingPackage (a note in the table, never a crash).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pandas as pd

from dist_gru.bench.accuracy.datasets import ClassSet, ForecastSet, require
from dist_gru.bench.accuracy.plain_gru import Budget

STATS = ("SeasonalNaive", "AutoETS", "AutoTheta")
NEURAL = ("NF-GRU", "NF-NHITS")
DARTS = ("Darts-GRU",)
CLASSIFIERS = ("MiniRocket",)


def long_frame(fset: ForecastSet, k: int) -> pd.DataFrame:
    """The history before origin k of every series as `unique_id, ds, y`."""
    parts = []
    for i, (y, start) in enumerate(zip(fset.series, fset.starts, strict=True)):
        cut = fset.cut(i, k)
        parts.append(pd.DataFrame({"unique_id": i, "ds": pd.date_range(start, periods=cut, freq=fset.freq), "y": y[:cut]}))
    return pd.concat(parts, ignore_index=True)


def _by_series(frame: pd.DataFrame, column: str, fset: ForecastSet) -> np.ndarray:
    """[N, H] of `column` from a forecast frame with `unique_id` and rows in time order per series."""
    frame = frame.reset_index() if "unique_id" not in frame.columns else frame
    return np.stack([frame.loc[frame.unique_id == i, column].to_numpy()[: fset.horizon] for i in range(len(fset.series))])


def stats_forecast(name: str, fset: ForecastSet) -> dict:
    """One statsforecast model, fitted at each origin on that origin's history."""
    require("statsforecast")
    from statsforecast import StatsForecast
    from statsforecast import models as sf_models

    make = {
        "SeasonalNaive": lambda: sf_models.SeasonalNaive(season_length=fset.season),
        "AutoETS": lambda: sf_models.AutoETS(season_length=fset.season),
        "AutoTheta": lambda: sf_models.AutoTheta(season_length=fset.season),
    }[name]
    point, lo, hi, started = [], [], [], time.perf_counter()
    for k in range(fset.origins):
        frame = StatsForecast(models=[make()], freq=fset.freq, n_jobs=1).forecast(df=long_frame(fset, k), h=fset.horizon, level=[95])
        alias = [c for c in frame.columns if c not in ("unique_id", "ds") and "-lo-" not in c and "-hi-" not in c][0]
        point.append(_by_series(frame, alias, fset))
        lo.append(_by_series(frame, f"{alias}-lo-95", fset))
        hi.append(_by_series(frame, f"{alias}-hi-95", fset))
    return {"point": np.stack(point, 1), "lo": np.stack(lo, 1), "hi": np.stack(hi, 1), "train_s": time.perf_counter() - started}


def _quiet_lightning() -> None:
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    for logger in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "neuralforecast"):
        logging.getLogger(logger).setLevel(logging.ERROR)


def neural_forecast(name: str, fset: ForecastSet, budget: Budget, seed: int) -> dict:
    """NeuralForecast's GRU or NHITS at dist-gru's budget, trained on the history before the first origin."""
    require("neuralforecast")
    _quiet_lightning()
    from neuralforecast import NeuralForecast
    from neuralforecast import models as nf_models

    common = dict(
        h=fset.horizon, input_size=fset.window, max_steps=budget.steps, learning_rate=budget.lr,
        batch_size=min(len(fset.series), budget.batch), windows_batch_size=budget.batch, random_seed=seed,
        start_padding_enabled=True, enable_progress_bar=False, enable_model_summary=False, logger=False,
        enable_checkpointing=False, accelerator="cpu", devices=1,
    )
    if name == "NF-GRU":
        model = nf_models.GRU(encoder_hidden_size=budget.hidden, encoder_n_layers=budget.layers, alias=name, **common)
    else:
        model = nf_models.NHITS(alias=name, **common)
    nf = NeuralForecast(models=[model], freq=fset.freq)
    started = time.perf_counter()
    nf.fit(df=long_frame(fset, fset.origins - 1), val_size=0)
    seconds = time.perf_counter() - started
    point = [_by_series(nf.predict(df=long_frame(fset, k)), name, fset) for k in range(fset.origins)]
    return {"point": np.stack(point, 1), "train_s": seconds}


def _darts_series(fset: ForecastSet, i: int, k: int, values: np.ndarray):
    """`values`, the last steps of series i before origin k, as a Darts `TimeSeries` (float32, as it trains)."""
    from darts import TimeSeries

    last = pd.date_range(fset.starts[i], periods=fset.cut(i, k), freq=fset.freq)[-1]
    return TimeSeries.from_times_and_values(pd.date_range(end=last, periods=len(values), freq=fset.freq), values.astype(np.float32))


def darts_forecast(fset: ForecastSet, budget: Budget, seed: int) -> dict:
    """Darts' BlockRNNModel (a GRU of dist-gru's size, a linear map to the horizon) at dist-gru's
    budget, as its documentation has it: each series min-max scaled by Darts' `Scaler` fitted on the
    training history, plus the model's reversible instance normalisation; trained once on the history
    before the first origin, `max_steps` optimizer steps."""
    require("darts")
    _quiet_lightning()
    from darts.dataprocessing.transformers import Scaler
    from darts.models import BlockRNNModel

    trainer = dict(accelerator="cpu", devices=1, max_steps=budget.steps, enable_progress_bar=False,
                   enable_model_summary=False, logger=False, enable_checkpointing=False)
    # n_epochs: Darts' own stop; every epoch takes at least one step, so max_steps ends the training.
    model = BlockRNNModel(
        input_chunk_length=fset.window, output_chunk_length=fset.horizon, model="GRU", hidden_dim=budget.hidden,
        n_rnn_layers=budget.layers, batch_size=budget.batch, n_epochs=budget.steps, optimizer_kwargs={"lr": budget.lr},
        use_reversible_instance_norm=True, random_state=seed, pl_trainer_kwargs=trainer,
    )
    scaler = Scaler()
    started = time.perf_counter()
    first = fset.origins - 1
    scaled = scaler.fit_transform([_darts_series(fset, i, first, y[: fset.cut(i, first)]) for i, y in enumerate(fset.series)])
    # Training takes the series that hold one window and its horizon (as the plain GRU's does).
    model.fit([s for s in scaled if len(s) >= fset.window + fset.horizon], verbose=False)
    seconds = time.perf_counter() - started
    point = []
    for k in range(fset.origins):  # the model reads the last window; a shorter history is padded as the plain GRU's is
        contexts = scaler.transform([_darts_series(fset, i, k, fset.context(i, k)) for i in range(len(fset.series))])
        predicted = scaler.inverse_transform(model.predict(fset.horizon, series=contexts, verbose=False))
        point.append(np.stack([s.values()[:, 0] for s in predicted]))
    return {"point": np.stack(point, 1), "train_s": seconds}


def minirocket(cset: ClassSet, seed: int) -> dict:
    """aeon's MiniRocket classifier (random kernels + a ridge classifier); sequences of unequal
    length are padded with their last value to the longest, as MiniRocket needs one length."""
    require("aeon")
    from aeon.classification.convolution_based import MiniRocketClassifier

    length = max(len(x) for x in [*cset.train_x, *cset.test_x])

    def panel(sequences: list[np.ndarray]) -> np.ndarray:  # [N, channels, length]
        return np.stack([np.pad(x, ((0, length - len(x)), (0, 0)), mode="edge").T for x in sequences])

    started = time.perf_counter()
    model = MiniRocketClassifier(random_state=seed, n_jobs=1).fit(panel(cset.train_x), np.asarray(cset.train_y))
    seconds = time.perf_counter() - started
    return {"labels": model.predict(panel(cset.test_x)), "train_s": seconds}
