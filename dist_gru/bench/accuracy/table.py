"""The benchmark's outputs: one markdown table and one JSON file (rows, the machine, versions)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import platform
import subprocess
from pathlib import Path

import torch

PACKAGES = ("dist-gru", "torch", "numpy", "pandas", "statsforecast", "neuralforecast", "darts", "aeon", "statsmodels", "pmdarima")
COLUMNS = ("MASE", "MAE", "bias", "cov95", "accuracy")
# What every run's accuracy.json holds (--join reads these).
RECORD_KEYS = {"date", "machine", "versions", "steps", "seeds", "overrides", "wall_s", "sets", "rows"}
KEYS = {"MASE": "mase", "MAE": "mae", "bias": "bias", "cov95": "coverage95", "accuracy": "accuracy"}


def machine() -> dict:
    """The CPU's model name (lscpu), the thread count torch uses, the platform."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        model = ""
    return {"cpu": model or platform.processor(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _cell(summary: dict | None) -> str:
    if not summary or not math.isfinite(summary["mean"]):
        return ""
    text = f"{summary['mean']:.3g}"
    return text if summary["min"] == summary["max"] else f"{text} [{summary['min']:.3g}, {summary['max']:.3g}]"


def sets_table(sets: list[dict]) -> list[str]:
    """The data sets and their protocols, as markdown lines."""
    lines = ["| set | source | kind | series / train+test | length | season | window | horizon | origins x stride |",
             "|---" * 9 + "|"]
    for s in sets:
        length = f"{s['length_min']}-{s['length_max']}" if s["length_min"] != s["length_max"] else str(s["length_min"])
        if "horizon" in s:
            extra = f" + calendar {','.join(s['future_known'])}" if s["future_known"] else ""
            extra += f" + static {','.join(s['static'])}" if s.get("static") else ""  # runs saved before statics: none
            lines.append(f"| {s['set']} | {s['source']} | forecast, {s['freq']}{extra} | {s['series']} | {length} | "
                         f"{s['season']} | {s['window']} | {s['horizon']} | {s['origins']} x {s['stride']} |")
        else:
            kind = f"{'per-step labels' if s['per_step'] else 'classification'}, {s['classes']} classes, {s['features']} features"
            lines.append(f"| {s['set']} | {s['source']} | {kind} | {s['train']}+{s['test']} | {length} | | | | |")
    return lines


def markdown(rows: list[dict], header: dict, sets: list[dict]) -> str:
    """The results (a row per (set, model); metrics as mean [min, max] over seeds), then the sets."""
    lines = [
        f"Accuracy benchmark, {header['date']}, {header['machine']['cpu']} ({header['machine']['torch_threads']} threads); "
        f"optimizer steps {header['steps']}; {header['seeds']} seed(s); mean [min, max] over seeds"
        + (f"; {header['joined']} runs joined." if header.get("joined") else "."),
        "",
        "MASE: the forecast's MAE over the horizon / the in-sample MAE of the seasonal naive forecast, per series "
        "and origin, averaged. MAE and bias (forecast - actual) in the data's units; cov95: the share of actuals "
        "inside the 95 % interval. Trained models fit once on the history before the first origin; statsforecast "
        "models refit at every origin. train s: wall seconds of fitting (dist-gru: its whole `train` command); "
        "s/step: train s / optimizer steps.",
        "",
        "| set | model | " + " | ".join(COLUMNS) + " | train s | s/step | note |",
        "|---" * (len(COLUMNS) + 5) + "|",
    ]
    for row in rows:
        cells = [_cell(row.get("scores", {}).get(KEYS[c])) for c in COLUMNS]
        seconds = f"{row['train_s']:.1f}" if row.get("train_s") is not None else ""
        per_step = f"{row['s_per_step']:.4f}" if row.get("s_per_step") is not None else ""
        lines.append(f"| {row['set']} | {row['model']} | " + " | ".join(cells) + f" | {seconds} | {per_step} | {row.get('note', '')} |")
    return "\n".join([*lines, "", *sets_table(sets)]) + "\n"


def write(out: Path, rows: list[dict], sets: list[dict], settings: dict, host: dict) -> dict:
    """`accuracy.json` and `accuracy.md` under `out` (`host`: `machine()` taken before the runs); returns the JSON record."""
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": host,
        "versions": versions(),
        **settings,
    }
    return write_record(out, rows, sets, header)


def join(parts: list[dict], order: list[str]) -> tuple[list[dict], list[dict], dict]:
    """One table from the records of runs made apart (two halves of the suite side by side, or one
    more model's rows): rows and sets in the suite's set `order`, the newest date, the longest wall
    time, every package version any run found. Records of another budget (steps, seeds, overrides)
    or machine would mislead side by side, and a (set, model) row twice would be ambiguous: refused."""
    budget = [(p["steps"], p["seeds"], p["overrides"], p["machine"]["cpu"]) for p in parts]
    if len(set(map(repr, budget))) > 1:
        raise ValueError(f"bench --accuracy --join: the runs differ in (steps, seeds, overrides, cpu): {budget}")
    pairs = [(r["set"], r["model"]) for p in parts for r in p["rows"]]
    if len(set(pairs)) < len(pairs):
        raise ValueError(f"bench --accuracy --join: a (set, model) row is in more than one run: {sorted(pairs)}")
    described = {}
    for s in (s for p in parts for s in p["sets"]):
        if described.setdefault(s["set"], s) != s:
            raise ValueError(f"bench --accuracy --join: set {s['set']} is described differently in two runs")
    rank = {name: i for i, name in enumerate(order)}
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: rank.get(r["set"], len(rank)))
    sets = sorted(described.values(), key=lambda s: rank.get(s["set"], len(rank)))
    header = {k: v for k, v in parts[0].items() if k not in ("rows", "sets")}
    found = {name: next((p["versions"].get(name) for p in parts if p["versions"].get(name)), None) for name in dict.fromkeys(n for p in parts for n in p["versions"])}
    header |= {"date": max(p["date"] for p in parts), "wall_s": max(p["wall_s"] for p in parts), "joined": len(parts), "versions": found}
    return rows, sets, header


def write_record(out: Path, rows: list[dict], sets: list[dict], header: dict) -> dict:
    record = {**header, "sets": sets, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "accuracy.md").write_text(markdown(rows, header, sets))
    return record

