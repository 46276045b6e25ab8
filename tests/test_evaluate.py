import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import runs
import verify
import images
import report
import metrics
import models
import train
from conftest import cli, smoke_args


@pytest.fixture(scope="module")
def fold3_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tenfold_fold03"
    metrics = train.main(smoke_args(toy, out, "--protocol", "10fold", "--test-fold", "3", "--epochs", "1"))
    return out, metrics


def run_evaluate(*argv):
    return cli(evaluate, *argv)  # in this process; tests/test_train.py runs the real script in a subprocess


def test_tenfold_metrics(fold3_run, toy):
    out, m = fold3_run
    saved = json.load(open(out / "metrics.json"))
    assert saved["folds"] == {"train": [1, 2, 5, 6, 7, 8, 9, 10], "val": [4], "test": [3]}
    for kind in ("FF", "FP"):
        r = saved["test"][kind]
        # 4 negative pairs per kind resolve no FAR of 1% or 0.1%: no TAR@FAR is quoted
        assert set(r) == {"pairs", "threshold", "acc", "auc", "eer"}
        assert 0 <= r["auc"] <= 1 and 0 <= r["eer"] <= 0.5 and 0 <= r["acc"] <= 1
        assert r["pairs"] == 8 and r["threshold"] == saved["val"][kind]["threshold"]
    # the test pairs were fold 3's: the run embedded exactly fold 3's images
    cfp = data.load_cfp(toy)
    assert saved["num_embedded"] == len(np.unique(cfp.pairs([3])[0][:, :2]))
    assert os.path.getsize(out / "roc.png") > 5000


def test_embed_once_counts_and_flip_tta(fold3_run, toy):
    out, _ = fold3_run
    model, ckpt = verify.load_model(str(out), torch.device("cpu"))
    cfp = data.load_cfp(toy)
    pairs, _ = cfp.pairs(list(range(1, 11)))
    bank = images.ImageBank(cfp, pairs[:, :2].ravel(), ckpt["args"]["img_size"])
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    res = verify.evaluate(model, bank, pairs, batch_size=32)
    unique = len(np.unique(pairs[:, :2]))
    assert sum(calls) == res["num_embedded"] == unique < 2 * len(pairs)
    calls.clear()
    flip = verify.evaluate(model, bank, pairs, batch_size=32, tta=True)
    assert sum(calls) == flip["num_embedded"] == 2 * unique
    # flip TTA: the mean of the image's and its mirror's features (the scale the head was trained on)
    idx = np.unique(pairs[:, :2])[:5]
    with torch.no_grad():
        x = images.preprocess(bank[idx])
        expected = (model(x) + model(x.flip(3))) / 2
    assert torch.allclose(verify.extract(model, bank, idx, tta=True), expected, atol=1e-5)
    assert not torch.allclose(expected, model(x).detach(), atol=1e-3)  # the mirror does change the features
    # scores from stored features equal scoring each pair from scratch
    with torch.no_grad():
        x = lambda col: images.preprocess(bank[pairs[:, col]])
        direct = model(x(0), x(1)).numpy()
    assert np.allclose(res["scores"], direct, atol=1e-5)


def test_folds_are_reported_in_their_roles(fold3_run, tmp_path):
    out, _ = fold3_run
    r = run_evaluate(out, "--folds", *range(1, 11), "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    ev = json.load(open(tmp_path / "e.json"))
    assert ev["test"]["folds"] == [3] and ev["val"]["folds"] == [4]
    assert ev["train"]["folds"] == [1, 2, 5, 6, 7, 8, 9, 10] and ev["train"]["role"] == "seen in training"
    saved = json.load(open(out / "metrics.json"))  # each role's figures are its own folds' figures
    for kind in ("all", "FF", "FP"):
        assert ev["val"][kind]["acc"] == pytest.approx(saved["val"][kind]["acc"])
        assert ev["test"][kind]["acc"] == pytest.approx(saved["test"][kind]["acc"])
    assert ev["train"]["all"]["pairs"] == 8 * 16 and ev["val"]["all"]["pairs"] == 16
    lines = r.stdout.splitlines()
    assert lines[0].startswith("seen in training, folds [1, 2, 5, 6, 7, 8, 9, 10]: ")
    assert lines[1].startswith("validation") and lines[2].startswith("test, folds [3]: ")
    r = run_evaluate(out, "--folds", 3, "--json", tmp_path / "f.json")
    ev3 = json.load(open(tmp_path / "f.json"))
    assert set(ev3) & {"train", "val", "test"} == {"test"} and ev3["test"] == {**ev["test"], "embed_seconds":
                                                                                ev3["test"]["embed_seconds"]}


def fake_fold_run(folder, k, ff, fp, scores):
    """A finished 10-fold run's files, written by hand: config, metrics and test scores."""
    folder.mkdir(parents=True)
    args = {"arch": 2, "loss": "arcface", "backbone": "resnet18", "img_size": 64, "lr": 1e-3, "optimizer": "adam",
            "epochs": 10, "pretrained": False, "protocol": "10fold", "test_fold": k, "data_root": "/x/cfp-dataset"}
    (folder / "config.json").write_text(json.dumps({"args": args, "dataset": "CFP"}))
    test = {kind: {"acc": v, "auc": v - 0.05, "eer": 1 - v, "threshold": 0.3} for kind, v in (("FF", ff), ("FP", fp))}
    (folder / "metrics.json").write_text(json.dumps({"val_acc": 0.8, "test_acc": (ff + fp) / 2, "best_epoch": 5,
                                                     "steps": 100, "test": {"all": {"acc": 0.8}, **test}}))
    runs.write_scores(str(folder / "test_scores.csv"), *scores)


def test_summary_of_ten_folds_uses_each_folds_metrics(tmp_path):
    rng = np.random.default_rng(0)
    runs, pooled = tmp_path / "runs", {"FF": [], "FP": []}
    ff, fp = 0.90 + 0.01 * np.arange(10), 0.70 + 0.02 * np.arange(10)[::-1]
    for k in range(1, 11):
        kinds = np.array(["FF"] * 400 + ["FP"] * 400)
        labels = np.tile(np.r_[np.ones(50), np.zeros(350)], 2).astype(int)
        scores = (labels * (1.5 + (kinds == "FF")) + rng.normal(size=800)).astype(np.float32)
        pairs = np.stack([np.arange(800), np.arange(800), labels], 1)
        fake_fold_run(runs / f"cfg_fold{k:02d}", k, ff[k - 1], fp[k - 1], (pairs, kinds, scores))
        for kind in pooled:
            pooled[kind].append((scores[kinds == kind], labels[kinds == kind]))
    table, raw = report.summarize(str(runs))
    row = next(line for line in table.splitlines() if line.startswith("| cfg | 10 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{np.mean(ff):.4f} +- {np.std(ff, ddof=1):.4f}"  # the sample standard deviation
    assert cells[3] == f"{np.mean(fp):.4f} +- {np.std(fp, ddof=1):.4f}"
    assert cells[4:8] == [f"{np.mean(ff - 0.05):.4f}", f"{np.mean(fp - 0.05):.4f}", f"{np.mean(1 - ff):.4f}",
                          f"{np.mean(1 - fp):.4f}"]
    for i, kind in enumerate(("FF", "FP")):  # TAR@FAR=1% over the pooled 3500 negatives of the ten folds
        s, y = (np.concatenate(x) for x in zip(*pooled[kind]))
        fpr, tpr, _ = metrics.roc(s, y)
        assert cells[8 + i] == f"{metrics.tar_at_far(fpr, tpr, 3500)['tar@far=0.01']:.4f}"
        assert "tar@far=0.001" not in raw[0][f"{kind} pooled"]  # 3.5 pairs: not quoted
    assert raw[0]["FF acc"] == pytest.approx(ff.tolist()) and raw[0]["FP acc"] == pytest.approx(fp.tolist())
    assert "  FP acc: " + " ".join(f"{v:.4f}" for v in fp) in table  # the ten raw values are printed
    assert not (runs / "summary.md").exists()  # nothing written into the folder unless asked


def test_summary_marks_datasets_and_survives_a_broken_run(fold3_run, tmp_path):
    out, _ = fold3_run
    import shutil
    runs = tmp_path / "mixed"
    shutil.copytree(out, runs / "toy_run", ignore=shutil.ignore_patterns("*.pt"))
    cfp = runs / "cfp_run"
    shutil.copytree(out, cfp, ignore=shutil.ignore_patterns("*.pt"))
    config = json.load(open(cfp / "config.json"))
    config.pop("dataset")
    config["args"]["data_root"] = "/elsewhere/cfp-dataset"
    (cfp / "config.json").write_text(json.dumps(config))
    (runs / "broken").mkdir()
    (runs / "broken" / "config.json").write_text("{not json")
    r = run_evaluate("--summarize", runs, "--out", tmp_path / "table.md")
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in r.stdout.split("10-fold")[0].splitlines() if line.startswith("| ")}
    assert rows["toy_run"][1] == "toy" and rows["cfp_run"][1] == "CFP" and rows["run"][1] == "data"
    assert rows["broken"][1].startswith("unreadable: JSONDecodeError")
    assert rows["toy_run"][2] == "10fold 3" and rows["toy_run"][6] == "32" and rows["toy_run"][7] == "pad"
    assert rows["toy_run"][13].isdigit()  # steps
    assert (tmp_path / "table.md").read_text() == r.stdout
    assert sorted(os.listdir(runs)) == ["broken", "cfp_run", "toy_run"]


@pytest.fixture(scope="module")
def arch1_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("a1") / "arch1"
    train.main(smoke_args(toy, out, "--arch", "1", "--epochs", "2"))
    return out


def test_tta_threshold_is_chosen_under_tta(arch1_run, toy, tmp_path):
    r = run_evaluate(arch1_run, "--tta", "flip", "--json", tmp_path / "tta.json")
    assert r.returncode == 0, r.stderr
    ev = json.load(open(tmp_path / "tta.json"))
    model, ckpt = verify.load_model(str(arch1_run), torch.device("cpu"))
    cfp = data.load_cfp(toy)
    pairs, kinds = cfp.pairs([7, 8])
    bank = images.ImageBank(cfp, pairs[:, :2].ravel(), 32, resize=ckpt["args"]["resize"])
    res = verify.evaluate(model, bank, pairs, tta=True)
    expected = metrics.thresholds_by_kind(res["scores"], res["labels"], kinds)
    for kind in ("all", "FF", "FP"):
        assert ev["thresholds"][kind] == pytest.approx(expected[kind][0])
    assert ev["thresholds"] != ckpt["thresholds"]  # not the thresholds found without TTA
    assert f"(threshold {expected['all'][0]:.4f})" in r.stdout.splitlines()[0]


@pytest.mark.parametrize("arch", [1, 2])
def test_verify_two_arbitrary_photos(arch, fold3_run, arch1_run, toy, tmp_path):
    out = arch1_run if arch == 1 else fold3_run[0]
    big = tmp_path / "big colour.jpg"
    Image.open(os.path.join(toy, "Data/Images/003/frontal/01.jpg")).resize((300, 410)).save(big)
    gray = tmp_path / "small_gray.png"
    Image.open(os.path.join(toy, "Data/Images/003/profile/02.jpg")).convert("L").resize((43, 42)).save(gray)
    model, ckpt = verify.load_model(str(out), torch.device("cpu"))
    assert model.arch == arch
    with torch.no_grad():  # the network on the two decoded photos, directly
        x = [images.preprocess(images.decode_image(str(p), 32, ckpt["args"]["resize"])[None]) for p in (big, gray)]
        expected = float(models.pair_score(model(*x))[0])
    for kind in ("all", "FP"):
        r = run_evaluate(out, "--pair", big, gray, "--kind", kind, "--show", tmp_path / f"{kind}.png")
        assert r.returncode == 0, r.stderr
        line = r.stdout.strip()
        assert line.startswith(("same person: score", "different people: score")) and "threshold" in line
        score = float(line.split("score ")[1].split()[0])
        threshold = float(line.split("threshold ")[1].split()[0])
        assert score == pytest.approx(expected, abs=1e-4)
        assert threshold == pytest.approx(ckpt["thresholds"][kind], abs=1e-4)
        assert (score >= threshold) == line.startswith("same")
        assert Image.open(tmp_path / f"{kind}.png").size[0] > 200  # the picture of the pair and its verdict
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{big}\t{gray}\n{gray} {gray}\n")
    r = run_evaluate(out, "--pairs", pairs)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 2 and float(rows[0]["score"]) == pytest.approx(expected, abs=1e-4)
    if arch == 2:
        assert float(rows[1]["score"]) == pytest.approx(1.0, abs=1e-4)  # an image against itself


def test_verify_unreadable_file_is_one_line(fold3_run, tmp_path):
    out, _ = fold3_run
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    r = run_evaluate(out, "--pair", bad, bad)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "notes.jpg" in r.stderr
    r = run_evaluate(out, "--pair", tmp_path / "missing.png", bad)
    assert r.returncode == 2 and "missing.png" in r.stderr


def test_results_page_is_generated_from_the_run_files():
    """results/README.md is exactly what --summarize makes of the committed runs: no figure typed by hand."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
    text, _ = report.results_page(root)
    with open(os.path.join(root, "README.md")) as f:
        assert f.read() == text, "stale: python evaluate.py --summarize results --out results/README.md"
