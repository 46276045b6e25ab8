"""Identity-folder datasets, the literature's CFP benchmark and the exported embedder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import check
import data
import evaluate
import verify
import images
import train
from conftest import cli, smoke_args
from toy import make_toy_folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faces"))
    make_toy_folders(root, num_ids=24, per_id=6, size_range=(30, 50))
    return root


@pytest.fixture(scope="module")
def held_out_run(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "folders"
    metrics = train.main(smoke_args(folders, out, "--loss", "arcface", "--epochs", "1"))
    return out, metrics


def test_identity_folders_are_read_by_their_layout(folders, tmp_path):
    ds = data.load_dataset(folders)
    assert ds.layout == "folders" and len(ds.names) == 24 and len(ds.paths) == 24 * 6
    assert (np.bincount(ds.identity) == 6).all() and not ds.profile.any() and ds.landmarks is None
    os.makedirs(tmp_path / "one" / "a")
    with pytest.raises(data.DataError, match="neither a Protocol/ folder"):
        data.load_dataset(str(tmp_path / "one"))
    open(tmp_path / "one" / "a" / "x.jpg", "wb").close()
    with pytest.raises(data.DataError, match="one identity folder"):
        data.load_dataset(str(tmp_path / "one"))
    os.makedirs(tmp_path / "cfp" / "Data" / "Images" / "001")  # CFP's layout without its Protocol/ folder
    with pytest.raises(data.DataError, match="has no Protocol/ folder"):
        data.load_dataset(str(tmp_path / "cfp"))


def test_held_out_identities_are_disjoint_and_their_pairs_are_the_runs(folders, held_out_run):
    out, metrics = held_out_run
    ds = data.load_dataset(folders)
    train_ids, val_ids, test_ids = data.holdout_identities(ds, 0)
    assert len(val_ids) == len(test_ids) == 2  # 10% of 24, at least 2
    assert not set(train_ids) & set(val_ids) | set(train_ids) & set(test_ids) | set(val_ids) & set(test_ids)
    test = data.read_pair_file(str(out / "pairs_test.txt"), ds)
    assert set(ds.identity[test[:, :2].ravel()]) == set(test_ids) and (test[:, 0] != test[:, 1]).all()
    assert ((ds.identity[test[:, 0]] == ds.identity[test[:, 1]]) == test[:, 2]).all()
    config = json.load(open(out / "config.json"))
    assert config["data"]["layout"] == "identity folders" and config["data"]["training_identities"] == 20
    r = cli(evaluate, out, "--json", out / "again.json")  # the run's own pairs: the same test accuracy
    assert r.returncode == 0, r.stderr
    assert json.load(open(out / "again.json"))["test"]["all"]["acc"] == pytest.approx(metrics["test_acc"], abs=1e-9)


def test_pair_file_errors_name_the_line(folders, tmp_path):
    ds = data.load_dataset(folders)
    bad = tmp_path / "pairs.txt"
    bad.write_text('["id00001/frontal_01.jpg", "id00001/frontal_02.jpg", 1]\n'
                   '["id00001/frontal_01.jpg", "nothere.jpg", 0]\n')
    with pytest.raises(data.DataError, match=r"pairs.txt:2: image 'nothere.jpg' is not in"):
        data.read_pair_file(str(bad), ds)
    bad.write_text("id00001/frontal_01.jpg,id00001/frontal_02.jpg,1\n")  # the format of earlier runs
    with pytest.raises(data.DataError, match=r"pairs.txt:1: expected a JSON list .*results/STUDIES.md"):
        data.read_pair_file(str(bad), ds)


def test_eval_root_trains_on_folders_and_the_benchmark_refuses_cfp_people(toy, tmp_path):
    linked = tmp_path / "linked"
    check.to_folders(toy, str(linked), [1, 2, 3, 4, 5, 6])
    out = tmp_path / "run"
    metrics = train.main(smoke_args(linked, out, "--eval-root", toy, "--loss", "arcface", "--epochs", "1"))
    assert set(metrics["test"]) == {"all", "FF", "FP"}  # CFP's own test folds, FF and FP at their thresholds
    r = cli(evaluate, out, "--benchmark", "cfp", "--data-root", toy)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "are " in r.stderr and "own files" in r.stderr


def test_benchmark_chooses_each_folds_threshold_on_the_other_nine(held_out_run, toy, tmp_path):
    out, _ = held_out_run
    r = cli(evaluate, out, "--benchmark", "cfp", "--data-root", toy, "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    b = json.load(open(tmp_path / "b.json"))
    model, ckpt = verify.load_model(str(out), torch.device("cpu"))
    cfp = data.load_cfp(toy)
    bank = images.ImageBank(cfp, np.arange(len(cfp.paths)), 32)
    for kind in data.KINDS:
        scores = {k: verify.evaluate(model, bank, cfp.folds[k][kind])["scores"] for k in cfp.folds}
        accs = []
        for k in cfp.folds:  # by hand: the other nine folds' best threshold, applied to fold k
            rest = [j for j in cfp.folds if j != k]
            t, _ = evaluate.best_threshold(np.concatenate([scores[j] for j in rest]),
                                           np.concatenate([cfp.folds[j][kind][:, 2] for j in rest]))
            accs.append(np.mean((scores[k] >= t) == cfp.folds[k][kind][:, 2]))
        assert b[kind]["acc_folds"] == pytest.approx(accs, abs=1e-4)
        assert b[kind]["acc_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-6)


def test_benchmark_refuses_a_run_trained_on_cfp_folds(toy, tmp_path):
    out = tmp_path / "cfp_run"
    train.main(smoke_args(toy, out, "--epochs", "1"))
    r = cli(evaluate, out, "--benchmark", "cfp", "--data-root", toy)
    assert r.returncode == 2 and "trained on the CFP-layout dataset" in r.stderr and r.stderr.count("\n") == 1


def test_exported_embedder_reproduces_the_runs_embeddings_with_torch_alone(held_out_run, folders, tmp_path):
    out, _ = held_out_run
    path = tmp_path / "embedder.pt2"
    r = cli(evaluate, out, "--export", path)
    assert r.returncode == 0, r.stderr
    model, ckpt = verify.load_model(str(out), torch.device("cpu"))
    ds = data.load_dataset(folders)
    bank = images.ImageBank(ds, np.arange(10), 32)
    torch.save(bank.images, tmp_path / "faces.pt")
    expected = verify.extract(model, bank, np.arange(10))  # the run's own path to its embeddings
    # A fresh interpreter outside the repository, in isolated mode: only torch is importable.
    code = ("import json, torch; extra = {'preprocessing.json': ''}; "
            "m = torch.export.load('embedder.pt2', extra_files=extra).module(); "
            "torch.save(m(torch.load('faces.pt')), 'got.pt'); print(json.loads(extra['preprocessing.json'])['img_size'])")
    p = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "32"
    assert (torch.load(tmp_path / "got.pt") - expected).abs().max() < 1e-4
    again = cli(evaluate, out, "--export", path)  # an existing file is never replaced
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_bank_larger_than_its_memory_budget_is_a_mapped_file(toy, tmp_path, monkeypatch):
    cfp = data.load_cfp(toy)
    indices = np.arange(0, len(cfp.paths), 3)
    in_memory = images.ImageBank(cfp, indices, 32)
    monkeypatch.setattr(images, "memory_budget", lambda: 0)
    with pytest.raises(data.DataError, match="give --cache-dir"):
        images.ImageBank(cfp, indices, 32)
    mapped = images.ImageBank(cfp, indices, 32, cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npy")  # decoded chunk by chunk, renamed when whole
    assert torch.equal(mapped[indices], in_memory[indices])
    again = images.ImageBank(cfp, indices, 32, cache_dir=str(tmp_path))  # read, not decoded
    assert torch.equal(again.images, in_memory.images)


def test_any_utf8_folder_name_trains_evaluates_and_resumes_and_other_bytes_are_refused(tmp_path):
    root = tmp_path / "faces"
    make_toy_folders(str(root), num_ids=24, per_id=6, size_range=(30, 50))
    for old, new in (("id00001", "smith, john"), ("id00002", " leading space"), ("id00003", "two\nlines")):
        (root / old).rename(root / new)
    out = tmp_path / "run"
    m = train.main(smoke_args(root, out, "--loss", "arcface", "--epochs", "1"))
    r = cli(evaluate, out, "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["test"]["all"]["acc"] == m["test"]["all"]["acc"]
    assert train.main(smoke_args(root, out, "--loss", "arcface", "--epochs", "2", "--resume"))["epochs_run"] == 2
    os.rename(root / "id00004", os.path.join(os.fsencode(root), b"bad\xff"))
    r = cli(train, *["--data-root", root, "--out", tmp_path / "r2", "--backbone", "resnet18", "--no-pretrained",
                     "--img-size", "32", "--loss", "arcface"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not UTF-8" in r.stderr and "bad" in r.stderr
    assert not (tmp_path / "r2").exists()


def test_too_few_identities_for_pairs_names_the_folder(tmp_path):
    root = tmp_path / "faces"
    make_toy_folders(str(root), num_ids=3, per_id=2, size_range=(30, 50))
    ds = data.load_dataset(str(root))
    with pytest.raises(data.DataError, match=rf"{root}: --pairs-from identities needs 2\+ identities"):
        data.IdentityPairSet(ds, images=np.flatnonzero(ds.identity == 0))
