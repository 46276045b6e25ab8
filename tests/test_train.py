import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import train
from conftest import ROOT, smoke_args
from utils import UserError


def run_script(*argv, **kwargs):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, **kwargs)


def snapshot(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def finished_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "arch2"
    metrics = train.main(smoke_args(toy, out, "--arch", "2", "--seed", "1"))
    return out, metrics


def test_end_to_end_run_writes_every_file(finished_run):
    out, metrics = finished_run
    for f in ("config.json", "history.csv", "curves.png", "best.pt", "last.pt", "metrics.json", "log.txt"):
        assert os.path.isfile(out / f), f
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert saved["test_acc"] == metrics["test_acc"] and 0 <= saved["test_acc"] <= 1
    assert set(saved["test"]) == {"all", "FF", "FP"} and saved["test"]["FF"]["pairs"] == 16
    assert saved["folds"]["test"] == [9, 10]
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["args"]["loss"] == "cosine" and config["built"]["loss"] == "CosinePairLoss"
    assert len(open(out / "history.csv").read().strip().splitlines()) == 3  # header + 2 epochs


def test_evaluate_reproduces_training_numbers(finished_run):
    out, metrics = finished_run
    r = run_script("evaluate.py", str(out), "--device", "cpu", "--json", str(out.parent / "eval.json"))
    assert r.returncode == 0, r.stderr
    with open(out.parent / "eval.json") as f:
        ev = json.load(f)
    assert ev["test"]["test_acc"] == metrics["test_acc"]
    assert ev["threshold"] == pytest.approx(metrics["threshold"])
    assert ev["test"]["num_embedded"] == metrics["num_embedded"]


def test_checkpoints_are_plain_data(finished_run):
    out, _ = finished_run
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert {"model", "criterion", "args", "epoch", "threshold", "val_acc"} <= set(ckpt)
    last = torch.load(out / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "best", "history"} <= set(last)


def test_arch1_variants_and_margin_losses_run(toy, tmp_path):
    for name, extra in {"ce": ["--arch", "1"], "bce_var": ["--arch", "1", "--variation", "--loss", "bce"],
                        "arcface": ["--loss", "arcface"]}.items():
        m = train.main(smoke_args(toy, tmp_path / name, *extra, "--epochs", "1", "--max-steps", "3"))
        assert 0 <= m["test_acc"] <= 1 and m["epochs_run"] == 1


def test_each_image_is_decoded_once(toy, tmp_path, monkeypatch):
    calls = []
    orig = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda path, size: calls.append(path) or orig(path, size))
    train.main(smoke_args(toy, tmp_path / "r", "--epochs", "2"))
    assert len(calls) == len(set(calls)) > 0  # two epochs of training and evaluation, one decode each


def test_same_seed_same_history(toy, tmp_path):
    for name in ("a", "b"):
        train.main(smoke_args(toy, tmp_path / name, "--seed", "7", "--max-steps", "8"))
    assert open(tmp_path / "a" / "history.csv").read() == open(tmp_path / "b" / "history.csv").read()


def test_resume_after_sigkill_matches_uninterrupted(toy, tmp_path):
    common = ["train.py", "--data-root", toy, "--backbone", "resnet18", "--no-pretrained", "--img-size", "32",
              "--batch-size", "8", "--epochs", "4", "--lr", "1e-3", "--device", "cpu", "--seed", "3"]
    ref = run_script(*common, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    victim = subprocess.Popen([sys.executable, *common, "--out", str(tmp_path / "cut")], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "cut" / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 3:  # 2 epochs done: in the third
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert len(history.read_text().splitlines()) == 3, "the run was not killed in its third epoch"
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = run_script(*common, "--out", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    a = json.load(open(tmp_path / "ref" / "metrics.json"))
    b = json.load(open(tmp_path / "cut" / "metrics.json"))
    assert a == b
    wa = torch.load(tmp_path / "ref" / "best.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert open(tmp_path / "ref" / "history.csv").read() == open(tmp_path / "cut" / "history.csv").read()


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused(finished_run, toy, tmp_path):
    out, _ = finished_run
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("best.pt", "last.pt"):
        torch.save({"model": Exploit(marker)}, bad / name)
    (bad / "config.json").write_text("{}")
    r = run_script("evaluate.py", str(bad))
    assert r.returncode == 2 and "refusing to load" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_script("train.py", "--data-root", toy, "--out", str(bad), "--resume", "--backbone", "resnet18",
                   "--no-pretrained", "--img-size", "32")
    assert r.returncode == 2 and "refusing to load" in r.stderr, r.stderr
    assert not marker.exists()


BAD_INPUTS = {
    "missing data root": (["--data-root", "/nonexistent"], "--data-root"),
    "variation with arch 2": (["--variation", "--arch", "2"], "--variation"),
    "cosine with arch 1": (["--arch", "1", "--loss", "cosine"], "--loss cosine"),
    "freeze 1": (["--freeze", "1"], "--freeze"),
    "freeze negative": (["--freeze", "-0.1"], "--freeze"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "10fold without fold": (["--protocol", "10fold"], "--test-fold"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_flags_leave_existing_run_untouched(finished_run, case):
    out, _ = finished_run
    before = snapshot(out)
    argv, culprit = BAD_INPUTS[case]
    args = smoke_args(out.parent, out, "--overwrite", *argv)  # --overwrite: the input itself must stop it
    with pytest.raises(UserError, match=culprit):
        train.main(args)
    assert snapshot(out) == before


def test_existing_run_is_never_overwritten_by_accident(finished_run, toy):
    out, _ = finished_run
    before = snapshot(out)
    with pytest.raises(UserError, match="already holds a run"):
        train.main(smoke_args(toy, out))
    assert snapshot(out) == before


def test_bad_data_is_one_line_and_touches_nothing(finished_run, toy, tmp_path):
    out, _ = finished_run
    before = snapshot(out)
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(toy, broken)
    (broken / "Data/Images/003/frontal/02.jpg").write_bytes(b"\xff\xd8\xff truncated")
    r = run_script("train.py", "--data-root", str(broken), "--out", str(out), "--overwrite", "--backbone",
                   "resnet18", "--no-pretrained", "--img-size", "32")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "003/frontal/02.jpg" in r.stderr, r.stderr
    assert snapshot(out) == before
    r = run_script("evaluate.py", str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.strip().count("\n") == 0


def test_non_finite_loss_stops_and_keeps_checkpoints(toy, tmp_path):
    out = tmp_path / "boom"
    train.main(smoke_args(toy, out, "--epochs", "1", "--backbone", "vgg16"))
    before = snapshot(out)
    args = smoke_args(toy, out, "--epochs", "3", "--backbone", "vgg16", "--resume", "--lr", "1e6")
    with pytest.raises(UserError, match=r"non-finite loss .* at epoch 2 step \d+"):
        train.main(args)
    after = snapshot(out)
    assert after["best.pt"] == before["best.pt"] and after["last.pt"] == before["last.pt"]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_checkpoint_from_other_settings_is_refused(finished_run, toy):
    out, _ = finished_run
    with pytest.raises(UserError, match="--backbone resnet18 vs vgg16"):
        train.main(smoke_args(toy, out, "--resume", "--backbone", "vgg16", "--epochs", "3"))


def test_ddp_two_processes_identical_weights(toy, tmp_path):
    r = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.join(ROOT, "tests", "ddp_worker.py"), toy, str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    start = torch.load(tmp_path / "init.pt", weights_only=True)
    assert any(not torch.equal(w0[k], start[k]) for k in w0)  # it did train
    assert sorted(os.listdir(tmp_path / "run")).count("metrics.json") == 1
