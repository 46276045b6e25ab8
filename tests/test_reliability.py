"""What a careful tester tries: two runs on one folder, killed writes, full disks, damaged checkpoints,
hostile images and protocol files, partly bad pair lists, symlinked datasets, rotated photos."""
import errno
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import train
import utils
from conftest import ROOT, cli, smoke_args
from utils import UserError


def one_line(message):
    return "\n" not in str(message).strip() and len(str(message)) < 600


@pytest.fixture(scope="module")
def fold3_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fold03"
    train.main(smoke_args(toy, out, "--protocol", "10fold", "--test-fold", "3", "--epochs", "1", "--max-steps", "3"))
    return out


def copy_run(run, dst):
    shutil.copytree(run, dst)
    return dst


def test_two_runs_on_one_folder(toy, tmp_path):
    out = tmp_path / "shared"
    cmd = [sys.executable, "train.py", "--data-root", toy, "--backbone", "resnet18", "--no-pretrained",
           "--img-size", "32", "--batch-size", "8", "--epochs", "2", "--device", "cpu", "--out", str(out)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / ".lock").exists():
        time.sleep(0.02)
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 2 and one_line(second.stderr), second.stderr
    assert f"pid {first.pid}" in second.stderr and "in use by another run" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    log = (out / "log.txt").read_text()
    assert log.count("epoch 2/2 done") == 1 and log.count("data: ") == 1  # the first run's lines only
    # the lock dies with its process: the folder can be resumed now
    r = subprocess.run(cmd + ["--resume", "--epochs", "3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_orphaned_temp_files_are_removed(fold3_run, toy, tmp_path):
    out = copy_run(fold3_run, tmp_path / "run")
    for name in ("last.pt.tmp4242", "best.pt.tmp77", "metrics.json.tmp9"):  # what a SIGKILL mid-write leaves
        (out / name).write_bytes(b"\0" * 1000)
    train.main(smoke_args(toy, out, "--protocol", "10fold", "--test-fold", "3", "--epochs", "2", "--max-steps",
                          "6", "--resume"))
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_full_disk_is_one_line_and_keeps_the_checkpoint(fold3_run, toy, tmp_path, monkeypatch):
    out = copy_run(fold3_run, tmp_path / "run")
    before = (out / "last.pt").read_bytes()
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # as torch's zip writer fails on a full disk
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2766272 vs 2766168")
    monkeypatch.setattr(utils.torch, "save", full_disk)
    with pytest.raises(utils.DiskFull) as e:
        train.main(smoke_args(toy, out, "--protocol", "10fold", "--test-fold", "3", "--epochs", "2", "--resume"))
    msg = str(e.value)
    assert one_line(msg) and msg.startswith(f"no space left on device while writing {out}")
    assert "the previous best.pt is intact" in msg or "the previous last.pt is intact" in msg
    assert "continue with: python train.py" in msg and msg.endswith("--resume")
    monkeypatch.setattr(utils.torch, "save", save)
    assert (out / "last.pt").read_bytes() == before and not [f for f in os.listdir(out) if ".tmp" in f]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_unwritable_out_and_cache(toy, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        train.main(smoke_args(toy, a_file))
    m = train.main(smoke_args(toy, tmp_path / "ok", "--cache-dir", str(a_file / "cache"), "--epochs", "1",
                              "--max-steps", "1"))
    assert "warning: --cache-dir" in capsys.readouterr().out and m["steps"] == 1
    with pytest.raises(UserError, match="--json .*does not exist"):
        evaluate.main(evaluate.get_args_parser().parse_args([str(tmp_path / "ok"), "--json", "/nonexistent/x.json"]))


def damage(run, how):
    last, best = run / "last.pt", run / "best.pt"
    if how == "empty":
        last.write_bytes(b"")
        best.write_bytes(b"")
    elif how == "random bytes":
        last.write_bytes(np.random.default_rng(0).bytes(5000))
        best.write_bytes(np.random.default_rng(1).bytes(5000))
    elif how == "best.pt over last.pt":
        shutil.copy(best, last)
    elif how == "bare tensor":
        torch.save(torch.zeros(3), last)
        torch.save(torch.zeros(3), best)
    elif how == "args disagree with the weights":
        for f in (last, best):
            ckpt = torch.load(f, weights_only=True)
            ckpt["args"]["embed_dim"] = 64
            torch.save(ckpt, f)


@pytest.mark.parametrize("how,message", [
    ("empty", "is empty"), ("random bytes", "damaged or not a PyTorch file"),
    ("best.pt over last.pt", "best.pt copied over it"), ("bare tensor", "it holds a Tensor"),
    ("args disagree with the weights", "do not fit the network"),
])
def test_damaged_checkpoints_are_one_line(fold3_run, toy, tmp_path, how, message):
    run = copy_run(fold3_run, tmp_path / "run")
    damage(run, how)
    args = smoke_args(toy, run, "--protocol", "10fold", "--test-fold", "3", "--epochs", "2", "--resume")
    if how == "args disagree with the weights":
        args.embed_dim = 64  # as the edited checkpoint says, so that only the weights disagree
    with pytest.raises(UserError, match=message) as e:
        train.main(args)
    assert one_line(e.value) and "last.pt" in str(e.value) and "malicious" not in str(e.value)
    if how != "best.pt over last.pt":  # best.pt itself is fine there
        with pytest.raises(UserError) as e:
            evaluate.main(evaluate.get_args_parser().parse_args([str(run), "--device", "cpu"]))
        assert one_line(e.value) and "best.pt" in str(e.value) and "refusing" not in str(e.value)


def png_declaring(width, height):
    """A few hundred bytes of PNG whose header says width x height: a decompression bomb."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_hostile_and_odd_inputs(toy, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    with pytest.raises(data.DataError, match="bomb.png") as e:
        data.decode_image(str(bomb), 32)
    assert one_line(e.value) and len(str(e.value)) < 300
    root = tmp_path / "copy"
    shutil.copytree(toy, root)
    same = root / "Protocol/Split/FF/02/same.txt"
    original = same.read_bytes()
    same.write_bytes(b"\xef\xbb\xbf" + original)  # a byte-order mark is accepted
    assert len(data.load_cfp(str(root)).folds[2]["FF"]) == 8
    same.write_bytes(original[:4] + b"\xe9" + original[4:])  # Latin-1 e-acute
    with pytest.raises(data.DataError, match="same.txt: not UTF-8 text") as e:
        data.load_cfp(str(root))
    assert one_line(e.value)
    same.write_bytes(b"1," + b"9" * 50_000_000 + b"\n")
    with pytest.raises(data.DataError) as e:
        data.load_cfp(str(root))
    assert one_line(e.value) and len(str(e.value)) < 300 and "50000002 characters" in str(e.value)
    same.write_bytes(original)
    cfp = data.load_cfp(str(root))
    with pytest.raises(data.DataError, match=r"--img-size 100000: .* GiB") as e:
        data.ImageBank(cfp, np.arange(10), 100000)
    assert one_line(e.value)


def test_check_reports_duplicate_and_self_pairs(toy, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(toy, root)
    diff = root / "Protocol/Split/FF/05/diff.txt"
    lines = diff.read_text().splitlines()
    diff.write_text("\n".join(lines + [lines[0], "7,7"]) + "\n")
    r = cli(data, "--check", root)
    assert r.returncode == 0, r.stderr
    assert "warning: fold 05 FF: 1 pairs of an image with itself" in r.stdout
    assert "warning: fold 05 FF: 1 duplicate pairs" in r.stdout


def test_pairs_list_scores_every_good_line(fold3_run, toy, tmp_path):
    images = [os.path.join(toy, f"Data/Images/{i:03d}/frontal/01.jpg") for i in range(1, 21)]
    lines = [f"{images[i]} {images[(i + 1) % 20]}" for i in range(20)]
    lines[4] = f"{images[4]} {tmp_path / 'missing.jpg'}"
    (tmp_path / "broken.jpg").write_text("not a jpeg")
    lines[11] = f"{tmp_path / 'broken.jpg'} {images[3]}"
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    r = cli(evaluate, fold3_run, "--pairs", tmp_path / "list.txt")
    assert r.returncode == 1
    rows = r.stdout.strip().splitlines()
    assert rows[0].startswith("line,a,b,score") and len(rows) == 19
    assert [int(row.split(",")[0]) for row in rows[1:]] == [n for n in range(1, 21) if n not in (5, 12)]
    err = r.stderr.strip().splitlines()
    assert err[0].startswith(f"{tmp_path / 'list.txt'}:5: image ") and "missing.jpg" in err[0]
    assert err[1].startswith(f"{tmp_path / 'list.txt'}:12: cannot decode image") and len(err) == 3


def test_symlinked_data_folder_is_accepted(toy, tmp_path):
    elsewhere = tmp_path / "other-disk"
    root = tmp_path / "cfp"
    root.mkdir()
    shutil.copytree(os.path.join(toy, "Data"), elsewhere / "Data")
    shutil.copytree(os.path.join(toy, "Protocol"), root / "Protocol")
    (root / "Data").symlink_to(elsewhere / "Data")
    r = cli(data, "--check", root)
    assert r.returncode == 0, r.stderr
    (root / "Protocol" / "Pair_list_P.txt").write_text("1 ../../../etc/passwd\n")
    with pytest.raises(data.DataError, match="outside the dataset root"):
        data.load_cfp(str(root))


def test_resume_refuses_another_run(fold3_run, toy, tmp_path):
    run = copy_run(fold3_run, tmp_path / "run")
    for argv, culprit in ((["--test-fold", "4"], "--test-fold 3 vs 4"), (["--test-fold", "3", "--seed", "5"],
                                                                          "--seed 0 vs 5"),
                          (["--test-fold", "3", "--loss", "arcface", "--batch-size", "4"], "--loss cosine vs arcface")):
        with pytest.raises(UserError, match=culprit) as e:
            train.main(smoke_args(toy, run, "--protocol", "10fold", "--epochs", "3", "--resume", *argv))
        assert one_line(e.value)
    r = cli(train, "--data-root", toy, "--out", run, "--resume", "--protocol", "10fold", "--test-fold", "4",
            "--backbone", "resnet18", "--no-pretrained", "--img-size", "32", "--batch-size", "8")
    assert r.returncode == 2 and one_line(r.stderr) and "--test-fold 3 vs 4" in r.stderr


def test_photos_are_seen_upright(tmp_path):
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = (255, 0, 0)  # left half red, right half blue, as stored
    a[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: a viewer rotates the image 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    x = data.decode_image(str(path), 64, "squash")
    assert x[0, 5, 32] > 200 and x[2, 60, 32] > 200  # upright: red on top, blue below


def test_a_resumed_run_is_not_shown_as_finished(fold3_run, toy, tmp_path, monkeypatch):
    run = copy_run(fold3_run, tmp_path / "run")
    seen = []
    one_epoch = train.train_one_epoch

    def spy(*args, **kwargs):
        seen.append((run / "metrics.json").exists())
        return one_epoch(*args, **kwargs)
    monkeypatch.setattr(train, "train_one_epoch", spy)
    train.main(smoke_args(toy, run, "--protocol", "10fold", "--test-fold", "3", "--epochs", "2", "--max-steps", "6",
                          "--resume"))
    assert seen == [False] and (run / "metrics.json").exists()  # gone while training, back when it finished
    table, _ = evaluate.summarize(str(tmp_path))
    assert "running or stopped" not in table
