"""The documentation tells the truth: README.md's commands run, docs/ names only what exists.

    .venv/bin/pytest -q tests/test_docs.py -n 0            # the quick checks and the quickstarts
    .venv/bin/pytest -q tests/test_docs.py -m "not slow"   # the quick checks only

- docs/config.md is generated from the config's field descriptions and must equal the generator's
  output (`python -m dist_gru.config --markdown > docs/config.md` after changing a field).
- Every ```bash block of README.md has a `<!-- docs-test: NAME -->` marker above it. The blocks in
  RUNS run as written in a scratch folder (a copy of configs/, README.md and docs/) and must print
  a concrete fact; the others (a GPU, a Slurm cluster, `make`) are checked in STATIC.
- In README.md and docs/*.md, inside code: every `dist-gru <command>` exists and takes every
  `--flag` shown, every `section.key=` and every `section.key` span is a config key, every
  configs/ launch/ slurm/ tests/ path exists, every `--config` file is a valid config.
- Every relative link resolves (headings included); nothing points outside the repository.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import PY, REPO, Result, run
from conftest import test_env as child_env  # (a name pytest does not collect)

from dist_gru.cli import COMMANDS
from dist_gru.config import NOT_TRAJECTORY, config_fields, config_reference_markdown, load_config

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
SECTIONS = ("model", "data", "optim", "train", "checkpoint", "log")
KEYS = {dotted for dotted, _ in config_fields()}
# a key or a section of keys (train.early_stopping), as a span may name either
KEY_PREFIXES = KEYS | {".".join(k.split(".")[:n]) for k in KEYS for n in range(1, k.count(".") + 1)}


# ---------------------------------------------------------------------------------------------
# Reading Markdown


def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, body, marker) of every fenced block; marker is the `docs-test` name on the line
    before the fence, or ''."""
    pattern = r"(?:<!-- docs-test: ([\w-]+) -->\n)?^```(\w*)\n(.*?)^```$"
    return [(lang, body, marker or "") for marker, lang, body in re.findall(pattern, text, re.M | re.S)]


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return re.sub(r"^```\w*\n.*?^```$", "", text, flags=re.M | re.S)


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(text))


def code_lines(text: str) -> list[str]:
    """Every command-like line: the lines of non-Python fenced blocks (continuations joined) and
    every inline code span."""
    lines = []
    for lang, body, _ in fenced_blocks(text):
        if lang in ("bash", "sh", ""):
            lines += body.replace("\\\n", " ").splitlines()
    return lines + code_spans(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(text), re.M)}


# ---------------------------------------------------------------------------------------------
# The generated config reference


def test_config_reference_is_generated_from_the_config() -> None:
    expected = config_reference_markdown()
    assert (REPO / "docs/config.md").read_text() == expected, (
        "docs/config.md is stale: run `python -m dist_gru.config --markdown > docs/config.md`"
    )
    for dotted, field in config_fields():
        assert f"| `{dotted}` |" in expected and field.description, dotted


def test_config_reference_command_prints_it() -> None:
    result = run([PY, "-m", "dist_gru.config", "--markdown"], timeout=120)
    assert result.returncode == 0, result.output
    assert result.stdout == config_reference_markdown()
    assert "| `train.early_stopping.patience` | int, >= 1 | `3` |" in result.stdout


# ---------------------------------------------------------------------------------------------
# README: size, markers, the test command


def test_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail to docs/"
    text = README.read_text()
    for name in COMMANDS:  # the command table names every subcommand
        assert f"| `{name}` |" in text, name


def test_every_readme_bash_block_is_marked_and_checked() -> None:
    blocks = [(body, marker) for lang, body, marker in fenced_blocks(README.read_text()) if lang == "bash"]
    unmarked = [body.splitlines()[0] for body, marker in blocks if not marker]
    assert not unmarked, f"bash blocks without a <!-- docs-test: NAME --> marker: {unmarked}"
    markers = [marker for _, marker in blocks]
    assert len(markers) == len(set(markers)), markers
    assert set(markers) == set(RUNS) | set(STATIC), (set(markers), set(RUNS) | set(STATIC))


def readme_block(name: str) -> str:
    found = [body for _, body, marker in fenced_blocks(README.read_text()) if marker == name]
    assert len(found) == 1, f"README.md has no block marked {name!r}"
    return found[0]


def test_readme_test_command_is_what_ci_runs() -> None:
    assert re.search(r"^make test\b", readme_block("make"), re.M)
    assert re.search(r"^make test$", (REPO / ".ci/run").read_text(), re.M)


# ---------------------------------------------------------------------------------------------
# README quickstarts that run here


def json_lines(result: Result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def one_with(result: Result, key: str) -> dict:
    found = [record for record in json_lines(result) if key in record]
    assert found, f"no JSON line with {key!r} in\n{result.stdout[-3000:]}"
    return found[-1]


def check_classification(folder: Path, result: Result) -> None:
    metrics = one_with(result, "accuracy")
    assert metrics["num_samples"] == 120 and metrics["accuracy"] > 0.6, metrics  # 3 classes: chance 1/3
    assert np.load(folder / "probs.npy").shape == (120, 3)


def check_labelling(folder: Path, result: Result) -> None:
    metrics = one_with(result, "macro_f1")
    assert metrics["accuracy"] > 0.6, metrics  # the current step alone: 0.5
    offsets = np.load(folder / "labels.offsets.npy")
    assert len(offsets) == metrics["num_samples"] + 1
    assert np.load(folder / "labels.npy").shape == (offsets[-1],)


def check_forecast(folder: Path, result: Result) -> None:
    metrics = one_with(result, "mase")
    assert metrics["mae"] < metrics["seasonal_naive_mae"] < metrics["naive_mae"], metrics
    forecasts = pd.read_csv(folder / "forecasts.csv")
    assert list(forecasts.columns) == ["store", "day", "units"] and len(forecasts) == 8 * 7
    assert forecasts.day.unique().tolist() == [f"2025-02-{d:02d}" for d in range(4, 11)]  # after day 400
    assert forecasts.units.between(30, 120).all(), forecasts


def check_bytes(folder: Path, result: Result) -> None:
    metrics = one_with(result, "bits_per_token")
    assert metrics["bits_per_token"] < metrics["unigram_bits_per_token"], metrics
    assert result.stdout.rstrip().splitlines()[-1], "sample printed nothing"


def check_torchrun(folder: Path, result: Result) -> None:
    assert "world_size=2" in result.output, result.output[-3000:]
    assert (folder / "runs/debug-2/model/model.safetensors").is_file()


RUNS: dict[str, Callable[[Path, Result], None]] = {
    "classification": check_classification,
    "labelling": check_labelling,
    "forecast": check_forecast,
    "bytes": check_bytes,
    "torchrun": check_torchrun,
}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", list(RUNS))
def test_readme_quickstart_runs_as_written(name: str, tmp_path: Path) -> None:
    for part in ("configs", "docs"):
        shutil.copytree(REPO / part, tmp_path / part)
    shutil.copy(README, tmp_path / "README.md")
    env = child_env(PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = run(["bash", "-euo", "pipefail", "-c", readme_block(name)], cwd=tmp_path, env=env, timeout=1100)
    assert result.returncode == 0, f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    RUNS[name](tmp_path, result)


# ---------------------------------------------------------------------------------------------
# README blocks that need what this machine lacks: checked statically


def check_install(block: str) -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    table = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^(\w+) = \[", table, re.M)
    used = re.findall(r"pip install -e '\.\[(\w+)\]'", block)
    assert used and set(used) <= set(extras), (used, sorted(extras))
    assert re.search(r"^pip install -e \.\s", block, re.M)


def check_make(block: str) -> None:
    targets = re.findall(r"^make (\w+)", block, re.M)
    assert targets == ["train", "test"], targets
    for target, expect in (("train", "configs/adding.yaml"), ("test", "pytest")):
        result = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and expect in result.stdout, result.stdout + result.stderr


def check_slurm(block: str) -> None:
    scripts = set(re.findall(r"slurm/\w+\.sbatch", block))
    assert scripts, block
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    # the keys, configs and flags of these lines are checked with every page's below


STATIC: dict[str, Callable[[str], None]] = {"install": check_install, "make": check_make, "slurm": check_slurm}


@pytest.mark.parametrize("name", list(STATIC))
def test_readme_block_checked_statically(name: str) -> None:
    STATIC[name](readme_block(name))


# ---------------------------------------------------------------------------------------------
# Every page: commands, flags, config keys, paths, links


@functools.cache
def command_help(name: str) -> str:
    result = run([PY, "-m", "dist_gru", name, "--help"], timeout=180)
    assert result.returncode == 0, result.output
    return result.stdout


COMMAND = re.compile(r"(?:\bdist-gru|-m dist_gru|\bslurm/\w+\.sbatch|\blaunch/torchrun\w*\.sh)(?: (\w[\w-]*))?(.*)")


def commands_in(text: str) -> list[tuple[str, list[str]]]:
    """(subcommand, its --flags) of every command shown in code; the Slurm and torchrun scripts
    take `dist-gru train`'s arguments, slurm/tune.sbatch those of `dist-gru tune`."""
    found = []
    for line in code_lines(text):
        for match in COMMAND.finditer(line):
            head = match.group(0)
            if head.startswith(("slurm/", "launch/")):
                name = "tune" if head.startswith("slurm/tune.") else "train"
                rest = head.split(" ", 1)[1] if " " in head else ""
            else:
                name, rest = match.group(1), match.group(2)
            if name is None or (head.startswith("dist-gru") and name not in COMMANDS and not rest.startswith(" ")):
                continue  # `dist-gru` alone, or prose such as "dist-gru's"
            rest = re.split(r"\s#|[|;`)]|&&", rest)[0]
            found.append((name, re.findall(r"(?<!\S)(--[\w-]+)", rest)))
    return found


def command_problems(text: str) -> list[str]:
    problems = []
    for name, flags in commands_in(text):
        if name not in COMMANDS:
            problems.append(f"dist-gru {name}: no such command ({', '.join(COMMANDS)})")
            continue
        problems += [f"dist-gru {name} {flag}: no such option" for flag in flags if flag not in command_help(name)]
    return sorted(set(problems))


KEY_ASSIGNMENT = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=")
KEY_SPAN = re.compile(rf"((?:{'|'.join(SECTIONS)})\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:: \S+)?")
FILE_SUFFIXES = {"safetensors", "py", "json", "jsonl", "yaml", "npy", "pt", "onnx", "sbatch", "sh", "md"}


def key_problems(text: str) -> list[str]:
    """`section.key=` in code, and code spans that are just `section.key` (or `section.key: value`),
    naming something that is not in the config schema."""
    keys = [key for line in code_lines(text) for key in KEY_ASSIGNMENT.findall(line)]
    problems = [f"{key}= (not a config key)" for key in keys if key not in KEYS]
    for span in code_spans(text):
        match = KEY_SPAN.fullmatch(span)
        if match and match.group(1) not in KEY_PREFIXES and match.group(1).rsplit(".", 1)[1] not in FILE_SUFFIXES:
            problems.append(f"`{span}` (not a config key)")
    return sorted(set(problems))


def link_problems(page: Path, text: str) -> list[str]:
    """Relative links that do not resolve to a file (and heading) of the repository, and mentions
    of things outside it."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"https?://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            problems.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(text if not path else resolved.read_text()):
            problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    for pattern in (r"/work/|/home/", r"\.\./shared", r"DESIGN\.md|STYLE\.md", r"(?<![\w&])#\d+\b"):
        problems += [f"mentions {m!r}" for m in re.findall(pattern, text)]
    problems += [f"mentions an issue: {m!r}" for m in re.findall(r"\bissues?\b", text, re.I)]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_commands_and_flags_exist(page: Path) -> None:
    problems = command_problems(page.read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_keys_exist(page: Path) -> None:
    problems = key_problems(page.read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_paths_and_configs_exist(page: Path) -> None:
    text = "\n".join(code_lines(page.read_text()))
    paths = set(re.findall(r"(?<![\w/.$-])((?:configs|launch|slurm|tests)/[\w./-]*[\w/])", text))
    missing = [path for path in sorted(paths) if "*" not in path and not (REPO / path).exists()]
    assert not missing, missing
    for config in sorted(set(re.findall(r"--config (configs/[\w.-]+\.yaml)", text))):
        load_config(REPO / config)  # raises ConfigError naming the key


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve_inside_the_repository(page: Path) -> None:
    problems = link_problems(page, page.read_text())
    assert not problems, "\n".join(problems)


# A folder outside the repository that pages must not point to (spelled in two pieces, so that
# this file does not point there itself).
OUTSIDE = "../" + "shared"
BAD_PAGE = f"""See [a](nowhere.md), [b](models.md#no-such-heading), [c](../../etc/passwd) and {OUTSIDE}/x.

```bash
dist-gru trian --config configs/adding.yaml
dist-gru train --confg configs/adding.yaml model.hiden_size=3 \\
    train.max_step=5
torchrun --nproc-per-node 2 -m dist_gru evaluate --model m --data d --probabilities
```

Set `train.tbtt: 64`, not `model.safetensors`; `sbatch slurm/train.sbatch --quiet train.lr=1`.
"""


def test_the_checks_catch_mistakes() -> None:
    """The checkers above find each kind of mistake they exist for, so a green run means something."""
    assert command_problems(BAD_PAGE) == [
        "dist-gru evaluate --probabilities: no such option",
        "dist-gru train --confg: no such option",
        "dist-gru trian: no such command (" + ", ".join(COMMANDS) + ")",
    ]
    assert key_problems(BAD_PAGE) == [
        "`train.tbtt: 64` (not a config key)",
        "model.hiden_size= (not a config key)",
        "train.lr= (not a config key)",
        "train.max_step= (not a config key)",
    ]
    assert link_problems(REPO / "docs/x.md", BAD_PAGE) == [
        "nowhere.md: no such file in the repository",
        "models.md#no-such-heading: no heading #no-such-heading in models.md",
        "../../etc/passwd: no such file in the repository",
        f"mentions '{OUTSIDE}'",
    ]


def test_docs_index_lists_every_page() -> None:
    index = (REPO / "docs/README.md").read_text()
    missing = [p.name for p in DOCS if p.name != "README.md" and f"]({p.name})" not in index]
    assert not missing, missing


def test_run_folder_page_lists_the_keys_a_resume_may_change() -> None:
    text = (REPO / "docs/run-folder.md").read_text()
    paragraph = text.split("## Trajectory keys", 1)[1].split("NOT_TRAJECTORY", 1)[0]
    listed = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", paragraph))
    assert listed == set(NOT_TRAJECTORY), (sorted(listed - NOT_TRAJECTORY), sorted(NOT_TRAJECTORY - listed))
