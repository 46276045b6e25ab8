"""Every run in results/ can be made again: its command parses with today's parser, or it is a run of a dropped
variant that results/STUDIES.md lists with the commit that has it."""
import contextlib
import glob
import io
import json
import os
import re
import shlex

import numpy as np
import pytest

import bench
import check
import evaluate
import landmarks
import toy
import train
from conftest import ROOT

PARSERS = {"train.py": train.get_args_parser, "landmarks.py": landmarks.get_args_parser}


def runs():
    return sorted(os.path.dirname(f) for f in glob.glob(os.path.join(ROOT, "results", "**", "config.json"),
                                                       recursive=True))


def parses(command):
    argv = shlex.split(command)
    parser = PARSERS[os.path.basename(argv[1])]()
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            parser.parse_args(argv[2:])
        except SystemExit:
            return False
    return True


def test_every_run_parses_or_is_listed_in_studies():
    studies = open(os.path.join(ROOT, "results", "STUDIES.md")).read()
    commit = re.search(r"\*\*`([0-9a-f]{7,40})`\*\*", studies)
    assert commit, "results/STUDIES.md names the last commit that has the dropped variants"
    unlisted = []
    for run in runs():
        command = json.load(open(os.path.join(run, "config.json")))["command"]
        name = os.path.relpath(run, os.path.join(ROOT, "results"))
        folder, base = os.path.split(name)
        listed = name in studies or (f"`{folder}/" in studies and f"`{base}`" in studies)
        if not parses(command) and not listed:
            unlisted.append(name)
    assert len(runs()) > 50 and unlisted == []


@pytest.mark.parametrize("flag", ["--jitter", "--pool flatten", "--head flatten", "--profile-share 0.5",
                                  "--feature-bn"])
def test_a_dropped_flag_does_not_parse(flag):
    script = "landmarks.py" if flag.startswith(("--head", "--profile")) else "train.py"
    assert not parses(f"python {script} {flag}") and parses(f"python {script}")


def test_a_ten_fold_row_says_whether_its_folds_share_one_commit_and_one_precision():
    import report
    one = {"commits": ["a" * 40], "precisions": ["bfloat16"]}
    assert report.made_by(one) == "aaaaaaa; bfloat16"
    assert report.made_by({**one, "commits": ["a" * 40 + "-dirty"]}).startswith("MIXED: 1 commits, uncommitted")
    assert report.made_by({"commits": ["a", "b"], "precisions": ["bfloat16", "float32"]}) == \
        "MIXED: 2 commits; bfloat16 and float32 MIXED"
    table, _ = report.summarize(os.path.join(ROOT, "results", "cfp-10fold"))
    row = next(line for line in table.splitlines() if line.startswith("| r18_arcface_64px_template_s8 | 10 |"))
    assert row.endswith("MIXED: 8 commits, uncommitted changes; bfloat16 and float32 MIXED |")  # as committed
    recipe = next(line for line in table.splitlines()
                  if line.startswith("| r18_arcface_96px_template_s8_nomaxpool | 10 |"))
    assert recipe.endswith("| 88124f8; bfloat16 |")  # the recipe's ten folds: one clean commit, one precision
    recipe30 = next(line for line in table.splitlines()
                    if line.startswith("| r18_arcface_96px_template_s8_nomaxpool_30e | 10 |"))
    assert recipe30.endswith("| d44ae37; bfloat16 |")  # the README's row: the same for the 30-epoch recipe


def test_the_paired_comparison_of_two_ten_fold_configurations():
    import report
    old = {"configuration": "old", "folds": [1, 2, 3], "FF acc": [0.80, 0.82, 0.84], "FP acc": [0.70, 0.75, 0.80]}
    new = {"configuration": "new", "folds": [2, 3, 4], "FF acc": [0.85, 0.85, 0.90], "FP acc": [0.74, 0.83, 0.9]}
    lines = report.paired(old, new)
    assert lines[3].startswith("| fold |") and [line.split(" | ")[0] for line in lines[5:7]] == ["| 2", "| 3"]
    # on folds 2 and 3: FF +0.03 and +0.01 (mean +0.02, se 0.01); FP -0.01 and +0.03 (mean +0.01, se 0.02)
    assert lines[-1] == "| mean (2 folds) | 0.8300 | 0.8500 | +0.0200 +- 0.0100 | 0.7750 | 0.7850 | +0.0100 +- 0.0200 |"
    assert report.paired(old, {**new, "folds": [3, 4, 5]}) == []  # one common fold: no standard error


def test_every_flag_the_readme_names_is_on_a_command_line():
    """A flag that left the code leaves the README too, but for the sentence that names the dropped ones."""
    known = {"--help", "--list", "--index-url", "--nproc_per_node"}  # pip, torchrun and experiments.sh
    for get in (*PARSERS.values(), evaluate.get_args_parser, bench.get_args_parser, check.get_args_parser,
                toy.get_args_parser):
        known |= {s for a in get()._actions for s in a.option_strings}
    text = open(os.path.join(ROOT, "README.md")).read()
    dropped = re.search(r"Variants that were studied and dropped \(([^)]*)\)", text)
    assert dropped, "README names the dropped variants in one sentence"
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text.replace(dropped.group(1), "")))
    assert sorted(named - known) == []


def test_the_readme_ten_fold_rows_are_the_summary_of_their_runs():
    """A 10-fold row of this project in the README names its experiments.sh ID; its FF and FP are what
    --summarize makes of that ID's folds in results/cfp-10fold, in %, mean +- sample std."""
    import report
    ids = dict(re.findall(r"^tenfold (\S+) python train\.py --out runs/10fold/(\S+)_fold\{K\} ",
                          open(os.path.join(ROOT, "experiments.sh")).read(), re.M))
    _, raw = report.summarize(os.path.join(ROOT, "results", "cfp-10fold"))
    summary = {r["configuration"]: r for r in raw}
    rows = re.findall(r"^\| \**this project\**.*\(`(10fold-[\w-]+)`\) \| CFP 10-fold \|.*\| ([\d.]+ \+- [\d.]+) \| "
                      r"([\d.]+ \+- [\d.]+) \|$", open(os.path.join(ROOT, "README.md")).read(), re.M)
    assert len(rows) >= 2
    for name, ff, fp in rows:
        r = summary[ids[name]]
        assert len(r["folds"]) == 10, name
        shown = [f"{100 * np.mean(r[f'{k} acc']):.2f} +- {100 * np.std(r[f'{k} acc'], ddof=1):.2f}" for k in ("FF", "FP")]
        assert [ff, fp] == shown, name


def test_a_one_fold_row_shows_no_spread():
    import report
    r = {"configuration": "x", "folds": [1], "commits": ["a" * 40], "precisions": ["bfloat16"],
         **{f"{k} {m}": [0.5] for k in ("FF", "FP") for m in ("acc", "auc", "eer")}, "FF pooled": {}, "FP pooled": {}}
    assert report.tenfold_row(r).startswith("| x | 1 | 0.5000 | 0.5000 | 0.5000 |")
    two = {**r, "folds": [1, 2], **{f"{k} acc": [0.5, 0.7] for k in ("FF", "FP")}}
    assert report.tenfold_row(two).startswith("| x | 2 | 0.6000 +- 0.1414 | 0.6000 +- 0.1414 |")
