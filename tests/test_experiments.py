import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import evaluate
import train
from conftest import ROOT

SEED_IDS = ["01", "02", "03", "04", "05", "06", "07", "08", "11", "13", "15", "17", "21", "23", "33",
            "43", "53", "63", "73"]
BACKBONE_CLASSES = {"vgg16": "Sequential", "resnet50": "ResNet", "resnet101": "ResNet", "resnext50": "ResNet",
                    "resnext101": "ResNet", "resnet18": "ResNet"}
LOSS_CLASSES = {"bce": "BCEPairLoss", "ce": "CEPairLoss", "cosine": "CosinePairLoss", "arcface": "ArcFace",
                "cosface": "CosFace"}


def sh(*args, env=None, cwd=ROOT):
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # `python` = this one
    return subprocess.run(["bash", "experiments.sh", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PATH": path, **(env or {})})


def dry_run_lines(*ids):
    r = sh("--dry-run", *ids)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line.strip()]


def rows_by_id():
    """(ID, command) for every run line of experiments.sh, read from the file itself."""
    with open(os.path.join(ROOT, "experiments.sh")) as f:
        return [(m.group(1), m.group(2)) for m in re.finditer(r"^run (\S+) (python train\.py .*)$", f.read(), re.M)]


def test_dry_run_lists_every_seed_row():
    lines = dry_run_lines()
    assert len(lines) >= 30 and all(line.startswith("python train.py ") for line in lines)
    ids = {i for i, _ in rows_by_id()}
    assert set(SEED_IDS) <= ids
    outs = [shlex.split(line)[shlex.split(line).index("--out") + 1] for line in lines]
    assert len(outs) == len(set(outs)), "two rows share a run folder"
    assert len(lines) == len(rows_by_id())


def test_selection_and_extra_args():
    assert [r for r in dry_run_lines("23", "63")] == [c for i, c in rows_by_id() if i in ("23", "63")]
    extra = dry_run_lines("01")
    assert len(extra) == 1
    r = sh("--dry-run", "01", env={"EXTRA_ARGS": "--img-size 32 --max-steps 2"})
    assert r.stdout.strip().endswith("--img-size 32 --max-steps 2")


@pytest.fixture(scope="module")
def smoke_sweep(toy, tmp_path_factory):
    """Every line as a smoke run (toy data, random init, 32 px, one step), in-process: (root, [(line, args)])."""
    root = tmp_path_factory.mktemp("sweep")
    done = []
    for exp_id, line in rows_by_id():
        argv = shlex.split(line)[2:]
        out = root / argv[argv.index("--out") + 1]
        argv += ["--out", str(out), "--data-root", toy, "--no-pretrained", "--img-size", "32", "--batch-size", "2",
                 "--max-steps", "1", "--device", "cpu", "--print-freq", "1000", "--eval-batch-size", "128"]
        asked = train.get_args_parser().parse_args(argv)
        train.main(asked)
        for f in ("best.pt", "last.pt"):  # VGG16 checkpoints are hundreds of MB: keep the disk free
            os.remove(out / f)
        done.append((line, asked))
    return root / "runs", done


def test_every_line_builds_what_it_asks_for(smoke_sweep):
    _, done = smoke_sweep
    assert len(done) == len(rows_by_id())
    for line, asked in done:
        with open(os.path.join(asked.out, "config.json")) as f:
            built = json.load(f)["built"]
        assert built["loss"] == LOSS_CLASSES[asked.loss], line
        assert built["network"] == BACKBONE_CLASSES[asked.backbone], line
        assert built["arch"] == asked.arch and asked.variation == ("--variation" in line), line
        assert built["optimizer"] == {"adam": "Adam", "sgd": "SGD"}[asked.optimizer], line
        assert built["frozen_layers"] == int(asked.freeze * built["backbone_layers"]), line
        assert (built["trainable_params"] < built["params"]) == (asked.freeze > 0), line
        assert os.path.isfile(os.path.join(asked.out, "metrics.json")), line


def test_summary_table(smoke_sweep):
    runs, done = smoke_sweep
    table = evaluate.summarize(str(runs))
    main_table, fold_table = table.split("10-fold protocol")
    data_rows = [row for row in main_table.splitlines() if row.startswith("| ") and not row.startswith("| ID")]
    assert len(data_rows) == len(done)
    assert set(SEED_IDS) <= {row.split(" | ")[0][2:] for row in data_rows}
    for row in data_rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 14 and all(cells), row
        assert 0 <= float(cells[10]) <= 1 and 0 <= float(cells[11]) <= 1
    groups = [row for row in fold_table.splitlines() if row.startswith("| ") and "configuration" not in row]
    assert len(groups) == 2 and all(" | 10 | " in row and row.count("+-") == 2 for row in groups), groups
    assert (runs / "summary.md").read_text() == table
    for _, asked in done:
        assert os.path.getsize(os.path.join(asked.out, "curves.png")) > 5000


def test_interrupted_sweep_skips_finished_runs(toy, tmp_path):
    import shutil
    for f in ("experiments.sh", "train.py", "data.py", "models.py", "losses.py", "evaluate.py", "utils.py"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    env = {"EXTRA_ARGS": f"--data-root {toy} --no-pretrained --img-size 32 --batch-size 2 --max-steps 1 "
                         f"--device cpu --eval-batch-size 128"}
    r = sh("01", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = sh("01", "05", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[01] runs/exp01_bce_vgg16_7e is finished: skipped" in r.stdout
    assert "[05] python train.py" in r.stdout
    assert (tmp_path / "runs" / "exp05_bce_var_vgg16_7e" / "metrics.json").exists()
