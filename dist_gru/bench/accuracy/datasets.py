"""The benchmark's data sets: real series that ship inside PyPI packages (nothing is downloaded).

A forecasting set is a list of series on one regular time grid, with the evaluation protocol as
data: `season` (for the seasonal naive and MASE), `window` (a multiple of the season), `horizon`,
and `origins` rolling forecast origins `stride` steps apart at the end of every series. A
classification set is train/test lists of [T, F] sequences with a label per sequence, or per step.
A loader whose package is missing raises `MissingPackage`; the runner turns that into a note.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


class MissingPackage(Exception):
    """A data set's or model's package is not installed (`pip install 'dist-gru[bench]'`)."""


def require(module: str) -> object:
    """`module` imported, or MissingPackage naming it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingPackage(f"{module} is not installed ({err.__class__.__name__})") from None


@dataclass
class ForecastSet:
    name: str
    source: str  # "package: what" for the report
    freq: str  # pandas offset alias of the grid
    season: int
    window: int
    horizon: int
    series: list[np.ndarray]  # float64 [L_i] each
    starts: list[pd.Timestamp]
    origins: int = 3
    stride: int = 0  # 0: the horizon (origins whose forecasts do not overlap)
    calendar: list[str] = field(default_factory=list)  # future-known calendar covariates for dist-gru
    # Static categories for dist-gru, per column each series' value: what a series measures, where a
    # set mixes different quantities (macro: GDP in dollars, rates in percent, population in people).
    static: dict[str, list[str]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return self.stride or self.horizon

    def cut(self, i: int, k: int) -> int:
        """The first forecast step of origin k (0 = the last origin) of series i."""
        return len(self.series[i]) - self.horizon - k * self.step

    def context(self, i: int, k: int) -> np.ndarray:
        """The `window` steps of series i before origin k; a shorter history padded at its start with
        its first value."""
        y = self.series[i][: self.cut(i, k)][-self.window :]
        return np.pad(y, (self.window - len(y), 0), mode="edge")


@dataclass
class ClassSet:
    name: str
    source: str
    train_x: list[np.ndarray]  # [T_i, F] float32 each
    train_y: list[np.ndarray] | np.ndarray  # [N] labels, or per step a [T_i] array each
    test_x: list[np.ndarray]
    test_y: list[np.ndarray] | np.ndarray
    per_step: bool = False

    @property
    def num_classes(self) -> int:
        labels = np.concatenate([np.ravel(y) for y in self.train_y]) if self.per_step else np.asarray(self.train_y)
        return int(labels.max()) + 1


def _single(name, source, freq, season, window, horizon, values, start, **kw) -> ForecastSet:
    values = np.asarray(values, dtype=np.float64)
    return ForecastSet(name, source, freq, season, window, horizon, [values], [pd.Timestamp(start)], **kw)


def airline() -> ForecastSet:
    values = require("aeon.datasets").load_airline()
    return _single("airline", "aeon: load_airline", "MS", 12, 36, 12, values, "1949-01-01")


def stocks() -> ForecastSet:
    """Monthly closing prices of 10 stocks and indices, 1990-2022, shipped with matplotlib (a
    dependency of dist-gru, so this set needs no extra: the smoke run's set). Season 1: prices have
    no yearly pattern, the naive forecast is the one to beat."""
    from matplotlib import cbook

    frame = pd.read_csv(cbook.get_sample_data("Stocks.csv"), comment="#", parse_dates=["Date"])
    monthly = frame[frame.Date.dt.day == 1].set_index("Date")  # the file adds some weekly rows: month starts only
    series, starts = [], []
    for column in monthly.columns:
        values = monthly[column].dropna()
        if len(pd.date_range(values.index[0], values.index[-1], freq="MS")) != len(values):
            raise ValueError(f"Stocks.csv: {column} has gaps")
        series.append(values.to_numpy(np.float64))
        starts.append(values.index[0])
    return ForecastSet("stocks", "matplotlib: sample_data/Stocks.csv", "MS", 1, 24, 12, series, starts)


def taylor() -> ForecastSet:
    # Half-hourly electricity demand of England and Wales from Monday 5 June 2000 (Taylor, 2003):
    # the package ships the values only, so the grid is rebuilt from that documented start.
    values = require("pmdarima.datasets").load_taylor()
    return _single(
        "taylor", "pmdarima: load_taylor", "30min", 48, 144, 48, values, "2000-06-05 00:00",
        calendar=["hour", "dayofweek"],
    )


def co2() -> ForecastSet:
    frame = require("statsmodels.api").datasets.co2.load_pandas().data
    values = frame["co2"].interpolate().bfill().to_numpy()  # 59 missing weeks, filled linearly
    return _single("co2", "statsmodels: co2", "W-SAT", 52, 104, 52, values, frame.index[0])


def elnino() -> ForecastSet:
    frame = require("statsmodels.api").datasets.elnino.load_pandas().data
    values = frame.drop(columns="YEAR").to_numpy().ravel()  # a row per year, a column per month
    return _single("elnino", "statsmodels: elnino", "MS", 12, 48, 12, values, f"{int(frame.YEAR[0])}-01-01")


def macro() -> ForecastSet:
    frame = require("statsmodels.api").datasets.macrodata.load_pandas().data
    columns = ["realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1", "tbilrate", "unemp", "pop"]
    series = [frame[c].to_numpy(np.float64) for c in columns]
    start = pd.Timestamp("1959-01-01")
    return ForecastSet("macro", "statsmodels: macrodata (10 columns)", "QS", 4, 16, 8, series, [start] * len(series),
                       static={"indicator": columns})


def sunspots() -> ForecastSet:
    frame = require("statsmodels.api").datasets.sunspots.load_pandas().data
    # Season 11: the solar cycle (about 11 years), the pattern a yearly forecaster can use.
    return _single("sunspots", "statsmodels: sunspots", "YS", 11, 44, 11, frame.SUNACTIVITY, "1700-01-01")


def m1_yearly() -> ForecastSet:
    aeon = require("aeon.datasets")
    frame = require("aeon.datasets").load_from_tsf_file(
        f"{aeon.__path__[0]}/data/m1_yearly_dataset/m1_yearly_dataset.tsf"
    )[0]
    series = [np.asarray(v, dtype=np.float64) for v in frame.series_value]
    starts = [pd.Timestamp(t).normalize() for t in frame.start_timestamp]
    # The shortest series has 15 years: 3 origins one year apart leave every series a history of 7+.
    return ForecastSet("m1_yearly", "aeon: M1 yearly (tsf)", "YS", 1, 6, 6, series, starts, stride=1)


def _aeon_split(loader: str, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    x, y = getattr(require("aeon.datasets"), loader)(split=split)
    sequences = [np.ascontiguousarray(np.asarray(s, dtype=np.float32).T) for s in x]  # [C, T] -> [T, C]
    return sequences, y


def _classes(loader: str, name: str) -> ClassSet:
    train_x, train_y = _aeon_split(loader, "train")
    test_x, test_y = _aeon_split(loader, "test")
    names = np.unique(np.concatenate([train_y, test_y]))
    code = {label: i for i, label in enumerate(names)}
    as_codes = lambda y: np.array([code[v] for v in y], dtype=np.int64)  # noqa: E731
    return ClassSet(name, f"aeon: {loader}", train_x, as_codes(train_y), test_x, as_codes(test_y))


def italy_power() -> ClassSet:
    return _classes("load_italy_power_demand", "ItalyPowerDemand")


def japanese_vowels() -> ClassSet:
    return _classes("load_japanese_vowels", "JapaneseVowels")


def italy_power_days(days: int = 8, count: tuple[int, int] = (400, 400), seed: int = 0) -> ClassSet:
    """Per-step labelling built from ItalyPowerDemand: a sequence is `days` days drawn at random
    (seeded) from one split, joined end to end, each step labelled with its day's class (the half
    of the year it was measured in). Training sequences use train-split days only, test ones
    test-split days only, so no measured day is seen in both."""
    sets = {}
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), count, strict=True):
        x, y = _day_split(split)
        pick = rng.integers(0, len(x), size=(n, days))
        sets[split] = (
            [np.concatenate([x[d] for d in row]) for row in pick],
            [np.repeat(y[row], len(x[0])) for row in pick],
        )
    return ClassSet("ItalyPowerDays", "aeon: load_italy_power_demand, days joined", *sets["train"], *sets["test"], True)


def _day_split(split: str) -> tuple[list[np.ndarray], np.ndarray]:
    x, y = _aeon_split("load_italy_power_demand", split)
    return x, (np.asarray(y).astype(np.int64) - 1)


FORECAST: dict[str, Callable[[], ForecastSet]] = {
    "stocks": stocks,
    "taylor": taylor,
    "co2": co2,
    "elnino": elnino,
    "airline": airline,
    "macro": macro,
    "sunspots": sunspots,
    "m1_yearly": m1_yearly,
}
CLASSIFY: dict[str, Callable[[], ClassSet]] = {
    "ItalyPowerDemand": italy_power,
    "JapaneseVowels": japanese_vowels,
    "ItalyPowerDays": italy_power_days,
}
