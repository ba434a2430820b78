"""`dist-gru bench --accuracy`: the harness runs end to end and writes its table and JSON (what the
models score is measured, not tested); the scores are computed as documented; bad options are refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import assert_ok, assert_refused, cli

from dist_gru.bench.accuracy import metrics, suite
from dist_gru.bench.accuracy.datasets import ForecastSet

pytestmark = pytest.mark.timeout(900)


def counting_set() -> ForecastSet:
    """One series 0, 1, ..., 5; two origins of one step, season 1: the naive scale is 1 at both."""
    return ForecastSet("count", "test", "D", 1, 2, 1, [np.arange(6.0)], [pd.Timestamp("2024-01-01")], origins=2)


def test_scores_follow_their_definitions():
    fset = counting_set()
    point = np.array([[[6.0], [3.0]]])  # origin 0 forecasts y[5] = 5, origin 1 y[4] = 4: errors +1, -1
    lo, hi = np.array([[[4.0], [3.5]]]), np.array([[[6.0], [3.9]]])  # 5 is inside [4, 6]; 4 is outside [3.5, 3.9]
    scores = metrics.forecast_scores(fset, point, lo, hi)
    assert scores == {"mase": 1.0, "mae": 1.0, "bias": 0.0, "coverage95": 0.5}
    assert "coverage95" not in metrics.forecast_scores(fset, point)  # a point forecaster has no interval


def test_mase_scale_is_the_in_sample_seasonal_naive_and_flat_histories_are_left_out():
    assert metrics.naive_scale(np.array([1.0, 5.0, 2.0, 6.0, 3.0]), 2) == 1.0  # |2-1|, |6-5|, |3-2|
    assert metrics.naive_scale(np.array([1.0, 4.0]), 4) == 3.0  # too short for the season: lag 1
    flat = ForecastSet("flat", "test", "D", 1, 2, 1, [np.ones(6), np.arange(6.0)], [pd.Timestamp("2024-01-01")] * 2)
    point = np.stack([np.full((3, 1), 1.0), np.array([[7.0], [4.0], [3.0]])])  # series 1 errors: +2, 0, 0
    assert math.isclose(metrics.forecast_scores(flat, point)["mase"], 2 / 3)


def test_summary_over_seeds_is_mean_and_range():
    summary = metrics.summarise([{"mase": 1.0, "mae": 2.0}, {"mase": 3.0, "mae": 2.0}])
    assert summary == {"mase": {"mean": 2.0, "min": 1.0, "max": 3.0}, "mae": {"mean": 2.0, "min": 2.0, "max": 2.0}}


def test_quick_run_writes_a_row_per_model_with_finite_scores(tmp_path):
    out = tmp_path / "acc"
    result = assert_ok(cli("bench", "--accuracy", "--quick", "--out", str(out), timeout=840))
    record = json.loads((out / "accuracy.json").read_text())
    assert {"date", "machine", "versions", "sets", "rows", "steps", "seeds"} <= set(record)
    assert record["machine"]["cpu"] and record["versions"]["torch"] and record["versions"]["dist-gru"]
    assert (record["steps"], record["seeds"]) == (suite.QUICK["steps"], 1)
    rows = {(row["set"], row["model"]): row for row in record["rows"]}
    # stocks needs no extra package: every forecaster has a row, scored or skipped with a note.
    for model in suite.FORECASTERS:
        row = rows[("stocks", model)]
        if model in ("dist-gru", "plain-gru") or "scores" in row:
            assert all(math.isfinite(row["scores"][key]["mean"]) for key in ("mase", "mae", "bias")), row
            assert row["train_s"] > 0
        else:
            assert row["note"].startswith("skipped: "), row
    assert rows[("stocks", "dist-gru")]["steps"] == suite.QUICK["steps"]
    assert rows[("stocks", "dist-gru")]["s_per_step"] > 0
    assert 0 <= rows[("stocks", "SeasonalNaive")].get("scores", {}).get("coverage95", {}).get("mean", 0.5) <= 1
    # the classification set needs aeon: scored by both GRUs and MiniRocket, or one note that the set was skipped
    if ("ItalyPowerDemand", "-") in rows:
        assert "aeon" in rows[("ItalyPowerDemand", "-")]["note"]
    else:
        for model in suite.CLASSIFIERS:
            assert 0 <= rows[("ItalyPowerDemand", model)]["scores"]["accuracy"]["mean"] <= 1
        assert rows[("ItalyPowerDemand", "MiniRocket")]["s_per_step"] is None  # no optimizer steps
    stocks = next(s for s in record["sets"] if s["set"] == "stocks")
    assert (stocks["series"], stocks["horizon"], stocks["origins"]) == (10, 12, 3)
    table = (out / "accuracy.md").read_text()
    assert all(f"\n| stocks | {model} | " in table for model in suite.FORECASTERS) and "| set | model | MASE |" in table
    assert "| stocks | matplotlib: sample_data/Stocks.csv | forecast, MS | 10 | 70-390 | 1 | 24 | 12 | 3 x 12 |" in table
    assert "| set | model | MASE |" in result.stdout
    assert not (out / "scratch").exists()  # the prepared folders and runs are removed


def test_bad_options_are_refused_in_one_line(tmp_path):
    assert_refused(cli("bench", "--accuracy", "--sets", "stocks,nope", "--out", str(tmp_path)), "nope", "m1_yearly")
    assert_refused(cli("bench", "--accuracy", "--seeds", "0", "--out", str(tmp_path)), "--seeds")
    assert not any(tmp_path.iterdir())
    assert "--accuracy" in assert_ok(cli("bench", "--help")).stdout
    assert "--quick" in assert_ok(cli("bench", "--accuracy", "--help")).stdout


def written_run(folder, sets: list[str], seeds: int = 3, model: str = "dist-gru") -> dict:
    """A finished run's record as the suite writes it: a row of `model` per set, MASE 1.0, 2.0, ..."""
    from dist_gru.bench.accuracy import table

    rows = [{"set": name, "kind": "forecast", "model": model, "seeds": seeds, "runs": [],
             "scores": {"mase": {"mean": 1.0 + i, "min": 1.0 + i, "max": 1.0 + i}}, "train_s": 1.0,
             "steps": 10, "s_per_step": 0.1} for i, name in enumerate(sets)]
    described = [{"set": name, "source": "test", "freq": "D", "season": 1, "window": 2, "horizon": 1, "origins": 3,
                  "stride": 1, "series": 1, "length_min": 9, "length_max": 9, "future_known": []} for name in sets]
    settings = {"steps": 10, "seeds": seeds, "overrides": [], "quick": False, "wall_s": 5.0}
    return table.write(folder, rows, described, settings, table.machine())


def test_join_makes_one_table_of_runs_made_side_by_side_in_the_suites_set_order(tmp_path):
    written_run(tmp_path / "a", ["sunspots", "stocks"])
    written_run(tmp_path / "b", ["elnino"])
    written_run(tmp_path / "c", ["stocks"], model="Darts-GRU")  # one more model's rows on a set of run a
    out = tmp_path / "joined"
    runs = ",".join(str(tmp_path / name) for name in "abc")
    result = assert_ok(cli("bench", "--accuracy", "--join", runs, "--out", str(out)))
    record = json.loads((out / "accuracy.json").read_text())
    assert [(row["set"], row["model"]) for row in record["rows"]] == [
        ("stocks", "dist-gru"), ("stocks", "Darts-GRU"), ("elnino", "dist-gru"), ("sunspots", "dist-gru")]  # the suite's order
    assert [s["set"] for s in record["sets"]] == ["stocks", "elnino", "sunspots"]
    assert record["joined"] == 3 and record["seeds"] == 3
    table = (out / "accuracy.md").read_text()
    assert "3 runs joined." in table and "| stocks | dist-gru | 2 |" in table
    assert table in result.stdout


def test_join_refuses_runs_of_another_budget_or_a_folder_without_a_record(tmp_path):
    written_run(tmp_path / "a", ["stocks"])
    written_run(tmp_path / "b", ["elnino"], seeds=5)
    out = tmp_path / "joined"
    assert_refused(cli("bench", "--accuracy", "--join", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(out)), "seeds")
    assert_refused(cli("bench", "--accuracy", "--join", f"{tmp_path / 'a'},{tmp_path / 'a'}", "--out", str(out)), "(set, model)")
    assert_refused(cli("bench", "--accuracy", "--join", f"{tmp_path / 'a'},{tmp_path / 'c'}", "--out", str(out)), "c/accuracy.json")
    assert not out.exists()


def test_a_sets_static_categories_reach_dist_grus_prepared_folders(tmp_path):
    """What a series measures (macro: which indicator) is given to dist-gru as a static category of
    every origin's prepared folder, one code per series in the order of the set's series."""
    from dist_gru.bench.accuracy import ours
    from dist_gru.data.files import SequenceFileDataset

    two = ForecastSet("two", "test", "D", 1, 2, 1, [np.arange(8.0), np.arange(8.0) * 2],
                      [pd.Timestamp("2024-01-01")] * 2, origins=2, static={"indicator": ["rate", "level"]})
    folders = ours.origin_folders(two, tmp_path)
    assert len(folders) == 2
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["static"] == [{"name": "indicator", "kind": "category", "vocabulary": ["level", "rate"]}]
        assert SequenceFileDataset(folder).static_categories.tolist() == [[1], [0]]
    assert suite.describe("two", two)["static"] == ["indicator"]
