import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import train
from conftest import ROOT, smoke_args


@pytest.fixture(scope="module")
def fold3_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tenfold_fold03"
    metrics = train.main(smoke_args(toy, out, "--protocol", "10fold", "--test-fold", "3", "--epochs", "1"))
    return out, metrics


def run_evaluate(*argv):
    return subprocess.run([sys.executable, "evaluate.py", *map(str, argv)], capture_output=True, text=True, cwd=ROOT)


def test_tenfold_metrics(fold3_run, toy):
    out, m = fold3_run
    saved = json.load(open(out / "metrics.json"))
    assert saved["folds"] == {"train": [1, 2, 5, 6, 7, 8, 9, 10], "val": [4], "test": [3]}
    for kind in ("FF", "FP"):
        r = saved["test"][kind]
        assert set(r) == {"pairs", "acc", "auc", "eer", "tar@far=0.01", "tar@far=0.001"}
        assert 0 <= r["auc"] <= 1 and 0 <= r["eer"] <= 0.5 and 0 <= r["acc"] <= 1
        assert r["pairs"] == 8
    # the test pairs were fold 3's: the run embedded exactly fold 3's images
    cfp = data.load_cfp(toy)
    assert saved["num_embedded"] == len(np.unique(cfp.pairs([3])[0][:, :2]))
    assert os.path.getsize(out / "roc.png") > 5000


def test_embed_once_counts_and_flip_tta(fold3_run, toy):
    out, _ = fold3_run
    model, ckpt = evaluate.load_model(str(out), torch.device("cpu"))
    cfp = data.load_cfp(toy)
    pairs, _ = cfp.pairs(list(range(1, 11)))
    bank = data.ImageBank(cfp, pairs[:, :2].ravel(), ckpt["args"]["img_size"])
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    res = evaluate.evaluate(model, bank, pairs, batch_size=32)
    unique = len(np.unique(pairs[:, :2]))
    assert sum(calls) == res["num_embedded"] == unique < 2 * len(pairs)
    calls.clear()
    flip = evaluate.evaluate(model, bank, pairs, batch_size=32, tta=True)
    assert sum(calls) == flip["num_embedded"] == 2 * unique
    # scores from stored features equal scoring each pair from scratch
    with torch.no_grad():
        x = lambda col: data.preprocess(bank[pairs[:, col]])
        direct = model(x(0), x(1)).numpy()
    assert np.allclose(res["scores"], direct, atol=1e-5)


def test_folds_option_and_summary_of_ten_folds(toy, tmp_path):
    runs = tmp_path / "runs"
    for k in range(1, 11):
        train.main(smoke_args(toy, runs / f"cfg_fold{k:02d}", "--protocol", "10fold", "--test-fold", k,
                              "--epochs", "1", "--max-steps", "2"))
        if k > 1:  # only fold 1's checkpoint is evaluated below
            os.remove(runs / f"cfg_fold{k:02d}" / "last.pt")
    table = evaluate.summarize(str(runs))
    rows = [line for line in table.split("10-fold protocol")[1].splitlines() if line.startswith("| cfg")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:2] == ["cfg", "10"] and "+-" in cells[2] and "+-" in cells[3]
    raw = json.load(open(runs / "summary_10fold.json"))
    assert len(raw[0]["FF acc"]) == 10 and len(raw[0]["FP eer"]) == 10
    assert f"{np.mean(raw[0]['FP acc']):.3f} +- {np.std(raw[0]['FP acc']):.3f}" == cells[3]
    r = run_evaluate(runs / "cfg_fold01", "--folds", 9, 10, "--json", tmp_path / "e.json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ev = json.load(open(tmp_path / "e.json"))
    assert ev["pairs"]["folds"] == [9, 10] and ev["pairs"]["test"]["FF"]["pairs"] == 16


def test_verify_two_arbitrary_photos(fold3_run, toy, tmp_path):
    out, _ = fold3_run
    big = tmp_path / "big colour.jpg"
    Image.open(os.path.join(toy, "Data/Images/003/frontal/01.jpg")).resize((300, 410)).save(big)
    gray = tmp_path / "small_gray.png"
    Image.open(os.path.join(toy, "Data/Images/003/profile/02.jpg")).convert("L").resize((43, 42)).save(gray)
    r = run_evaluate(out, "--pair", big, gray)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith(("same person: score", "different people: score")) and "threshold" in line
    score = float(line.split("score ")[1].split()[0])
    threshold = float(line.split("threshold ")[1])
    assert (score >= threshold) == line.startswith("same")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{big}\t{gray}\n{gray} {gray}\n")
    r = run_evaluate(out, "--pairs", pairs)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 2 and float(rows[0]["score"]) == pytest.approx(score, abs=1e-4)
    assert float(rows[1]["score"]) == pytest.approx(1.0, abs=1e-4)  # an image against itself


def test_verify_unreadable_file_is_one_line(fold3_run, tmp_path):
    out, _ = fold3_run
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    r = run_evaluate(out, "--pair", bad, bad)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "notes.jpg" in r.stderr
    r = run_evaluate(out, "--pair", tmp_path / "missing.png", bad)
    assert r.returncode == 2 and "missing.png" in r.stderr
