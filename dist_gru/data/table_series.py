"""One series of a long table at a time: its time grid (frequency, duplicate and irregular
timestamps, absent steps), missing values filled by policy, and calendar features.

Everything here works on one series' arrays (O(its length)); pandas does the calendar arithmetic
(`to_offset`, `infer_freq`, `date_range`), so monthly, weekly or business-day steps work as pandas
defines them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset

from dist_gru.data.files import DataFormatError

# Calendar features: the period of each cyclic field (encoded as a sin/cos pair of its phase); None:
# the period varies (days in the month or the year); "year" is stored as the number itself.
CALENDAR = {
    "minute": 60,
    "hour": 24,
    "dayofweek": 7,
    "day": None,
    "dayofyear": None,
    "weekofyear": 53,
    "month": 12,
    "quarter": 4,
    "year": 0,
}


def stamp(ns: int) -> str:
    """A timestamp as messages show it."""
    return str(pd.Timestamp(int(ns)))


def parse_freq(value: str) -> pd.DateOffset:
    try:
        return to_offset(value)
    except (ValueError, TypeError):
        raise DataFormatError(
            f"--freq {value!r}: not a pandas offset alias; expected e.g. h, D, W-SUN, MS, QS, YS, 15min"
        ) from None


def infer_freq(times: np.ndarray) -> pd.DateOffset | None:
    """The step of sorted, regular timestamps (pandas.infer_freq), or None (irregular, gaps, < 3 steps)."""
    if len(times) < 3:
        return None
    with warnings.catch_warnings():  # pandas 3 announces a change of the return type
        warnings.simplefilter("ignore")
        try:
            freq = pd.infer_freq(pd.DatetimeIndex(times.astype("datetime64[ns]")))
        except (ValueError, TypeError):
            return None
    return None if freq is None else to_offset(freq)


def calendar_names(fields: list[str]) -> list[str]:
    return [name for field in fields for name in ([field] if CALENDAR[field] == 0 else [f"{field}_sin", f"{field}_cos"])]


def calendar_features(grid: pd.DatetimeIndex, fields: list[str]) -> np.ndarray:
    """float32 [len(grid), len(calendar_names(fields))]: each field's phase as sin/cos (year as is)."""
    columns = []
    for field in fields:
        if field == "year":
            columns.append(grid.year.to_numpy(np.float64))
            continue
        if field == "day":
            phase = (grid.day.to_numpy() - 1) / grid.days_in_month.to_numpy()
        elif field == "dayofyear":
            phase = (grid.day_of_year.to_numpy() - 1) / np.where(grid.is_leap_year, 366, 365)
        elif field == "weekofyear":
            phase = (grid.isocalendar().week.to_numpy(np.int64) - 1) / CALENDAR[field]
        else:
            value = getattr(grid, "day_of_week" if field == "dayofweek" else field).to_numpy()
            phase = (value - (1 if field in ("month", "quarter") else 0)) / CALENDAR[field]
        columns += [np.sin(2 * np.pi * phase), np.cos(2 * np.pi * phase)]
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(grid), 0), np.float32)


def grid_steps_estimate(first: int, last: int, offset: pd.DateOffset) -> int:
    """About how many steps of `offset` lie between two timestamps (exact for fixed steps), to refuse
    a series too long for the memory budget before building its grid."""
    start = pd.Timestamp(int(first))
    step = max(1, ((start + offset) - start).value)
    return (last - first) // step + 1


def place_on_grid(times: np.ndarray, offset: pd.DateOffset, series: str) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """The series' regular grid from its first to its last timestamp and each (sorted) timestamp's
    step on it; duplicate or off-grid timestamps are errors naming the series and the timestamps."""
    same = np.flatnonzero(times[1:] == times[:-1])
    if len(same):
        shown = ", ".join(stamp(t) for t in np.unique(times[same + 1])[:3])
        raise DataFormatError(
            f"series {series!r} has duplicate timestamps ({shown}); expected one row per series and timestamp"
        )
    grid = pd.date_range(pd.Timestamp(int(times[0])), pd.Timestamp(int(times[-1])), freq=offset)
    stamps = grid.asi8
    steps = np.searchsorted(stamps, times)
    off = (steps >= len(stamps)) | (stamps[np.minimum(steps, len(stamps) - 1)] != times)
    if off.any():
        shown = ", ".join(stamp(t) for t in times[off][:3])
        raise DataFormatError(
            f"series {series!r} has timestamps off its {offset.freqstr} grid starting at {stamp(times[0])}: {shown} "
            f"(irregular); expected one row per {offset.freqstr} step (give --freq if the inferred one is wrong)"
        )
    return grid, steps


def absent_steps_error(grid: pd.DatetimeIndex, steps: np.ndarray, series: str, freq: str) -> DataFormatError:
    """The error for a series whose grid has steps without a row, under --missing error."""
    absent = np.setdiff1d(np.arange(len(grid)), steps)
    shown = ", ".join(str(grid[i]) for i in absent[:3])
    return DataFormatError(
        f"series {series!r} has {len(absent)} missing timestamp(s) on its {freq} grid ({shown}{', ...' if len(absent) > 3 else ''}); "
        "with --missing error every step needs a row: fill them with --missing ffill, interpolate or mask"
    )


def forward_fill(column: np.ndarray) -> None:
    """Fill NaNs in place with the last observed value; leading NaNs take the first observed one."""
    valid = ~np.isnan(column)
    last = np.maximum.accumulate(np.where(valid, np.arange(len(column)), 0))
    first = int(np.argmax(valid))
    column[:] = column[last]
    column[:first] = column[first]


def interpolate(column: np.ndarray) -> None:
    """Fill NaNs in place linearly between observed neighbours; the edges take the nearest observed value."""
    valid = ~np.isnan(column)
    steps = np.arange(len(column))
    column[~valid] = np.interp(steps[~valid], steps[valid], column[valid])


def fill_series(
    values: np.ndarray, names: list[str], num_targets: int, label: bool, policy: str, grid: pd.DatetimeIndex, series: str
) -> tuple[np.ndarray, np.ndarray]:
    """Fill the NaNs of one series' value columns [L, C] in place by `policy`. The first
    `num_targets` columns are targets (under mask they are filled forward, covariates with 0);
    with `label`, column 0 holds class ids, which are only ever filled forward. Returns the number
    filled per column and the observed mask [L, C] (before filling)."""
    missing = np.isnan(values)
    counts = missing.sum(axis=0)
    for c in np.flatnonzero(counts):
        if policy == "error":
            step = int(np.argmax(missing[:, c]))
            raise DataFormatError(
                f"column {names[c]!r}, series {series!r}, timestamp {grid[step]}: missing value; with --missing error "
                "every value must be present: fill gaps with --missing ffill, interpolate or mask"
            )
        if policy == "mask" and c >= num_targets:  # a covariate: 0 where unobserved, and its _observed column says so
            values[missing[:, c], c] = 0.0
            continue
        if counts[c] == len(values):
            raise DataFormatError(
                f"column {names[c]!r} has no value in series {series!r}; --missing {policy} fills gaps from observed "
                "values, and there are none"
            )
        if policy == "interpolate" and not (label and c == 0):
            interpolate(values[:, c])
        else:
            forward_fill(values[:, c])
    return counts, ~missing
