import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import evaluate
import images
import runs
import train
import utils
from conftest import ROOT, cli, smoke_args
from utils import UserError


def run_script(*argv, **kwargs):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, **kwargs)


def snapshot(folder):
    """Every file of a run folder, but the lock (which names the last process that held the folder)."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f != ".lock"}


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
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved["test"]) == {"all", "FF", "FP"} and saved["test"]["FF"]["pairs"] == 16
    assert saved["folds"]["test"] == [9, 10] and "val_acc" in saved["selected_by"]
    # FF and FP each at its own validation threshold, all pairs at the mixed one; all three stored
    ckpt = torch.load(out / "best.pt", weights_only=True)
    history = list(csv.DictReader(open(out / "history.csv")))
    best = history[saved["best_epoch"] - 1]
    for kind, suffix in (("all", ""), ("FF", "_FF"), ("FP", "_FP")):
        assert saved["val"][kind]["threshold"] == ckpt["thresholds"][kind] == float(best["threshold" + suffix])
        assert saved["test"][kind]["threshold"] == saved["val"][kind]["threshold"]
        assert saved["val"][kind]["acc"] == float(best["val_acc" + suffix])
    assert saved["test_acc"] == saved["test"]["all"]["acc"] and saved["val_acc"] == saved["val"]["all"]["acc"]
    # the stored test scores give the reported accuracies at the stored thresholds
    rows = list(csv.DictReader(open(out / "test_scores.csv")))
    assert len(rows) == 32
    for kind in ("FF", "FP"):
        sel = [r for r in rows if r["kind"] == kind]
        acc = np.mean([(float(r["score"]) >= saved["test"][kind]["threshold"]) == (r["same"] == "1") for r in sel])
        assert acc == pytest.approx(saved["test"][kind]["acc"])
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["args"]["loss"] == "cosine" and config["built"]["loss"] == "CosinePairLoss"
    # the machine, since another CPU or thread count moves the last digits: "<model>, <its fast bf16 kernels>"
    assert config["threads"] >= 1 and config["cpu"].endswith((", AMX", ", AVX-512-BF16", ", no fast bf16"))
    assert len(open(out / "history.csv").read().strip().splitlines()) == 3  # header + 2 epochs


def test_evaluate_reproduces_training_numbers(finished_run):
    out, metrics = finished_run
    r = run_script("evaluate.py", str(out), "--json", str(out.parent / "eval.json"))
    assert r.returncode == 0, r.stderr
    with open(out.parent / "eval.json") as f:
        ev = json.load(f)
    for kind in ("all", "FF", "FP"):
        assert ev["test"][kind]["acc"] == metrics["test"][kind]["acc"]
        assert ev["thresholds"][kind] == pytest.approx(metrics["val"][kind]["threshold"])
        assert ev["val"][kind]["acc"] == pytest.approx(metrics["val"][kind]["acc"])
    assert ev["test"]["num_embedded"] == metrics["num_embedded"]


def test_checkpoints_are_plain_data(finished_run):
    out, _ = finished_run
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert {"model", "criterion", "args", "epoch", "threshold", "val_acc"} <= set(ckpt)
    last = torch.load(out / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "best", "history"} <= set(last)


def test_each_image_is_decoded_once(toy, tmp_path, monkeypatch):
    calls = []
    orig = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda path, *a: calls.append(path) or orig(path, *a))
    train.main(smoke_args(toy, tmp_path / "r", "--epochs", "2"))
    assert len(calls) == len(set(calls)) > 0  # two epochs of training and evaluation, one decode each


def test_same_seed_same_history_other_seed_differs(toy, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        train.main(smoke_args(toy, tmp_path / name, "--seed", seed))
    drop_time = lambda name: [{k: v for k, v in row.items() if k != "seconds"}
                              for row in csv.DictReader(open(tmp_path / name / "history.csv"))]
    assert drop_time("a") == drop_time("b")
    assert [r["train_loss"] for r in drop_time("a")] != [r["train_loss"] for r in drop_time("c")]


def test_resume_after_sigkill_matches_uninterrupted(toy, tmp_path):
    common = ["train.py", "--data-root", toy, "--backbone", "resnet18", "--no-pretrained", "--img-size", "32",
              "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--seed", "3"]
    ref = run_script(*common, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    victim = subprocess.Popen([sys.executable, *common, "--out", str(tmp_path / "cut")], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "cut" / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 2:  # 1 epoch done: in the second
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert len(history.read_text().splitlines()) == 2, "the run was not killed in its second epoch"
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = run_script(*common, "--out", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    a = json.load(open(tmp_path / "ref" / "metrics.json"))
    b = json.load(open(tmp_path / "cut" / "metrics.json"))
    assert a.pop("minutes") >= 0 and b.pop("minutes") >= 0  # wall time is the only thing allowed to differ
    assert a == b
    wa = torch.load(tmp_path / "ref" / "best.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    drop_time = lambda p: [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(p))]
    assert drop_time(tmp_path / "ref" / "history.csv") == drop_time(tmp_path / "cut" / "history.csv")


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
    r = cli(evaluate, bad)
    assert r.returncode == 2 and "refusing to load" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli(train, "--data-root", toy, "--out", bad, "--resume", "--backbone", "resnet18", "--no-pretrained",
            "--img-size", "32")
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
    r = cli(train, "--data-root", broken, "--out", out, "--overwrite", "--backbone", "resnet18", "--no-pretrained",
            "--img-size", "32")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "003/frontal/02.jpg" in r.stderr, r.stderr
    assert snapshot(out) == before
    r = cli(evaluate, tmp_path / "nothing-here")
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
    # rank 0 alone writes the run: each line of the log once
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count("epoch 1/1 done") == 1 and log.count("best epoch 1") == 1
    # distributed evaluation gives the features of single-process evaluation, in order
    for r in (0, 1):
        calls = [json.loads(line) for line in (tmp_path / f"extract_rank{r}.jsonl").read_text().splitlines()]
        assert len(calls) == 2  # validation and test
        for c in calls:
            assert c["shape"] == c["single"] and c["diff"] < 1e-5
            assert c["one"] == [1, c["single"][1]]  # one image: rank 1 embeds none, keeps the feature width
    # the mapped bank: one file, both halves decoded (an image a rank skipped would be all zeros)
    banks = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".npy")]
    assert len(banks) == 1 and np.load(tmp_path / "cache" / banks[0]).reshape(-1, 3 * 32 * 32).max(1).min() > 0


@pytest.mark.parametrize("schedule", ["none", "cosine", "step"])
def test_learning_rate_schedule(schedule):
    f = utils.lr_lambda(schedule, 80, 20)  # 8 epochs of 10 steps, 2 of warmup
    assert [f(s) for s in (0, 9, 19)] == pytest.approx([1 / 20, 10 / 20, 1.0])  # linear warmup from 0
    after = [f(s) for s in range(20, 80)]
    if schedule == "none":
        assert after == [1.0] * 60
    elif schedule == "cosine":
        assert after[0] == 1.0 and f(50) == pytest.approx(0.5) and f(79) == pytest.approx(0, abs=1e-2)
        assert all(x >= y for x, y in zip(after, after[1:]))
    else:  # x0.1 at 1/2 and 3/4 of the run
        assert (f(39), f(40), f(59), f(60), f(79)) == pytest.approx((1, 0.1, 0.1, 0.01, 0.01))
    assert utils.lr_lambda(schedule, 80, 0)(0) == 1.0


def test_resume_with_a_new_lr_uses_it(finished_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    toy = json.load(open(out / "config.json"))["args"]["data_root"]
    train.main(smoke_args(toy, out, "--arch", "2", "--seed", "1", "--resume", "--epochs", "3", "--lr", "0.5"))
    history = list(csv.DictReader(open(out / "history.csv")))
    # epoch 3 of 3 starts halfway down the cosine that follows the 1-epoch warmup: 0.5 x 0.5
    assert float(history[2]["lr"]) == pytest.approx(0.25) and float(history[0]["lr"]) < 0.001
    assert "--lr 0.5 replaces the run's 0.001" in open(out / "log.txt").read()
    config = json.load(open(out / "config.json"))
    assert config["args"]["epochs"] == 2 and config["resumes"][0]["epochs"] == 3  # the original, then the change


def test_best_epoch_is_the_best_validation_accuracy(toy, tmp_path, monkeypatch):
    scripted = iter([0.6, 0.9, 0.7])
    validate = train.validate

    def fake(*args, **kwargs):
        row = validate(*args, **kwargs)
        return {**row, "val_acc": next(scripted)}
    monkeypatch.setattr(train, "validate", fake)
    out = tmp_path / "r"
    metrics = train.main(smoke_args(toy, out, "--epochs", "3"))
    assert metrics["best_epoch"] == 2 and metrics["val_acc"] == 0.9 and metrics["epochs_run"] == 3
    best = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert best["epoch"] == 2 and last["epoch"] == 3 and last["best"]["epoch"] == 2
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_training_learns(toy, tmp_path):
    """On the tiny toy set (12 training identities), a short run fits its identities and pulls apart the
    embeddings of unseen ones (the validation folds' people).

    Measured on two x86 CPUs at 1 and 2 threads: the final training loss 0.6-1.0 and the validation cosine
    gap (mean of same pairs minus mean of different pairs) 0.53-0.70; the untrained network (lr 1e-9) stays at
    loss 13-15 and gap 0.28. Test accuracy is not the bar: on 32 pairs it moves 0.75-1.0 between those
    machines. Without dropout: it regularises long runs on real faces, and slows a short one."""
    for loss in ("arcface", "cosface"):
        train.main(smoke_args(toy, tmp_path / loss, "--loss", loss, "--epochs", "4", "--batch-size", "16",
                              "--lr", "1e-3", "--dropout", "0"))
        with open(tmp_path / loss / "history.csv") as f:
            last = list(csv.DictReader(f))[-1]
        assert float(last["train_loss"]) < np.log(12), (loss, last)
        assert float(last["val_score_same"]) - float(last["val_score_diff"]) > 0.45, (loss, last)


def test_training_set_holds_no_validation_or_test_identity(toy, tmp_path, monkeypatch):
    seen = {}
    one_epoch = train.train_one_epoch

    def spy(run, epoch):
        stats = one_epoch(run, epoch)
        train_set = run.train_set
        if isinstance(train_set, data.ImageSet):
            seen.setdefault("images", set()).update(train_set.indices.tolist())
        else:
            seen.setdefault("images", set()).update(train_set.pairs[:, :2].flatten().tolist())
        return stats
    monkeypatch.setattr(train, "train_one_epoch", spy)
    cfp = data.load_cfp(toy)
    for extra in (["--loss", "arcface"], ["--protocol", "10fold", "--test-fold", "5"], ["--pairs-from", "protocol"]):
        seen.clear()
        m = train.main(smoke_args(toy, tmp_path / "_".join(extra), *extra, "--epochs", "1"))
        ids = set(cfp.identity[sorted(seen["images"])])
        held_out = set(cfp.identities_of(m["folds"]["val"] + m["folds"]["test"]))
        assert len(ids) >= 8 and not ids & held_out, extra


ERROR_PATHS = {
    "resume without last.pt": (["--resume"], "has no last.pt"),
    "resume and overwrite": (["--resume", "--overwrite"], "contradict"),
    "image size 16": (["--img-size", "16"], "--img-size must be at least 32"),
    "arcface batch 1": (["--loss", "arcface", "--batch-size", "1"], "--batch-size of at least 2"),
    "test fold 11": (["--protocol", "10fold", "--test-fold", "11"], "between 1 and 10"),
    "clutter above 1": (["--clutter", "1.5"], "--clutter must be in"),
    "clutter without augment": (["--clutter", "0.5", "--no-augment"], "--clutter adds to --augment"),
    "clutter unaligned": (["--clutter", "0.5", "--align", "none"], "--clutter .* needs --align"),
}


@pytest.mark.parametrize("case", list(ERROR_PATHS))
def test_error_paths_are_one_line(toy, tmp_path, case):
    argv, message = ERROR_PATHS[case]
    with pytest.raises(UserError, match=message):
        train.main(smoke_args(toy, tmp_path / "new", *argv))
    assert not (tmp_path / "new").exists()


def test_cli_errors_exit_2_and_debug_reraises(toy, tmp_path):
    common = ["train.py", "--data-root", toy, "--out", str(tmp_path / "x"), "--no-pretrained", "--backbone", "resnet18"]
    r = run_script(*common, "--img-size", "16")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_script(*common, "--img-size", "16", env={**os.environ, "DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "UserError" in r.stderr
    r = run_script("evaluate.py", str(tmp_path / "none"), "--folds", "11")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_sigint_stops_with_the_command_that_continues(toy, tmp_path):
    out = tmp_path / "run"
    # epochs long enough (64 px, 6 of them) that a busy machine cannot finish the run before the signal lands
    cmd = ["train.py", "--data-root", toy, "--backbone", "resnet18", "--no-pretrained", "--img-size", "64",
           "--batch-size", "4", "--epochs", "6", "--lr", "1e-3", "--out", str(out)]
    for wait_for_epoch in (False, True):  # interrupted before any epoch is saved, then after one
        # SIGINT at its default even when the suite itself was started in the background (where shells ignore it)
        p = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        marker = out / ("history.csv" if wait_for_epoch else "log.txt")
        while time.time() < deadline and p.poll() is None and not marker.exists():
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
        advice = shlex.split(lines[0].split("with: ")[1])
        assert advice[:2] == ["python", "train.py"] and advice[-1] == ("--resume" if wait_for_epoch else "--overwrite")
        assert ("epoch 1 is saved" in lines[0]) == wait_for_epoch
        cmd = advice[1:]  # the advice is what runs next
    r = subprocess.run([sys.executable, *cmd, "--epochs", "2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # (--epochs 2: one more epoch shows the advice works, in a sixth of the time)
    assert "resumed" in r.stdout and json.load(open(out / "metrics.json"))["epochs_run"] == 2


def test_fp16_overflow_skips_the_step(toy, tmp_path, monkeypatch):
    """With fp16 loss scaling, a non-finite loss is the scaler's business: the step is skipped and the scale
    lowered, as PyTorch intends, and training goes on (without a scaler it stops the run: see above)."""
    monkeypatch.setattr(train, "amp_dtype", lambda device: torch.float16)
    forward, calls = train.Objective.forward, []

    def overflow_once(self, inputs, target):
        loss = forward(self, inputs, target)
        calls.append(1)
        return loss * float("inf") if len(calls) == 2 else loss
    monkeypatch.setattr(train.Objective, "forward", overflow_once)
    out = tmp_path / "fp16"
    m = train.main(smoke_args(toy, out, "--amp", "--epochs", "1"))
    assert m["steps"] == len(calls)
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["scaler"]["scale"] <= 65536.0 / 2  # halved at the overflowed step (and at any real fp16 overflow)
    assert len(last["steps"]) == m["steps"] - 1  # the skipped step's loss is not in the curve


def test_progress_lines_show_the_total_and_time_left(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "PRINT_FREQ", 5)
    train.main(smoke_args(toy, tmp_path / "r", "--epochs", "3"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/3 step")]
    assert [line.split()[3] for line in lines] == ["5/12", "10/12", "12/12"]  # 96 pairs of 8: every 5th, the last
    assert all(" img/s eta epoch " in line and " run " in line for line in lines)


def test_data_root_toy_is_written_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    m = train.main(smoke_args("toy", tmp_path / "r", "--epochs", "1", "--img-size", "32", "--batch-size", "64"))
    assert "wrote the synthetic toy dataset" in capsys.readouterr().out and m["steps"] == 600 // 64
    assert len(data.load_cfp(str(tmp_path / "toy")).paths) == 1400
    with pytest.raises(UserError, match="is not a folder"):
        train.main(smoke_args(str(tmp_path / "not-toy"), tmp_path / "r2"))


def test_dropout_default_follows_the_loss_and_old_runs_keep_theirs():
    for loss, dropout in (("arcface", train.MARGIN_DROPOUT), ("cosface", train.MARGIN_DROPOUT), ("cosine", 0.0)):
        args = train.get_args_parser().parse_args(["--arch", "2", "--loss", loss])
        train.check_args(args)
        assert args.dropout == dropout, loss
    args = train.get_args_parser().parse_args(["--arch", "2", "--loss", "arcface"])
    train.check_args(args)
    saved = {k: getattr(args, k) for k in runs.RUN_KEYS if k != "dropout"}
    with pytest.raises(UserError, match="written by an earlier version .*lacks dropout.*results/STUDIES.md"):
        runs.check_compatible(saved, args, "last.pt", runs.RUN_KEYS)   # a run from before --dropout: refused
    runs.check_compatible({**saved, "dropout": args.dropout}, args, "last.pt", runs.RUN_KEYS)
