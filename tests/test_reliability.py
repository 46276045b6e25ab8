"""What a careful tester tries: two runs on one folder, killed writes, full disks, damaged checkpoints,
hostile images and protocol files, partly bad pair lists, symlinked datasets, rotated photos."""
import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import check
import data
import evaluate
import verify
import images
import report
import runs
import train
import utils
from conftest import ROOT, cli, smoke_args
from utils import UserError


def one_line(message):
    return "\n" not in str(message).strip() and len(str(message)) < 600


@pytest.fixture(scope="module")
def fold3_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fold03"
    train.main(smoke_args(toy, out, "--protocol", "10fold", "--test-fold", "3", "--epochs", "1"))
    return out


def smoke_argv(toy, out):
    """smoke_args as a command line, for cli()."""
    return ["--data-root", toy, "--out", out, "--backbone", "resnet18", "--no-pretrained", "--img-size", "32",
            "--batch-size", "8", "--epochs", "1"]


def copy_run(run, dst):
    shutil.copytree(run, dst)
    return dst


def test_two_runs_on_one_folder(toy, tmp_path):
    out = tmp_path / "shared"
    cmd = [sys.executable, "train.py", "--data-root", toy, "--backbone", "resnet18", "--no-pretrained",
           "--img-size", "32", "--batch-size", "8", "--epochs", "2", "--out", str(out)]
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
    train.main(smoke_args(toy, out, "--protocol", "10fold", "--test-fold", "3", "--epochs", "2", "--resume"))
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
    m = train.main(smoke_args(toy, tmp_path / "ok", "--cache-dir", str(a_file / "cache"), "--epochs", "1"))
    assert "warning: --cache-dir" in capsys.readouterr().out and m["epochs_run"] == 1
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
            ckpt["args"]["backbone"] = "resnet50"
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
        args.backbone = "resnet50"  # as the edited checkpoint says, so that only the weights disagree
    with pytest.raises(UserError, match=message) as e:
        train.main(args)
    assert one_line(e.value) and "last.pt" in str(e.value) and "malicious" not in str(e.value)
    if how != "best.pt over last.pt":  # best.pt itself is fine there
        with pytest.raises(UserError) as e:
            evaluate.main(evaluate.get_args_parser().parse_args([str(run)]))
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
        images.decode_image(str(bomb), 32)
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
        images.ImageBank(cfp, np.arange(10), 100000)
    assert one_line(e.value)


def test_check_reports_duplicate_and_self_pairs(toy, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(toy, root)
    diff = root / "Protocol/Split/FF/05/diff.txt"
    lines = diff.read_text().splitlines()
    diff.write_text("\n".join(lines + [lines[0]]) + "\n")
    same = root / "Protocol/Split/FF/05/same.txt"  # an image with itself: the same identity, so in same.txt
    same.write_text(same.read_text() + "81,81\n")
    r = cli(check, root)
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
    r = cli(check, root)
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
    x = images.decode_image(str(path), 64, "squash")
    assert x[0, 5, 32] > 200 and x[2, 60, 32] > 200  # upright: red on top, blue below


def test_a_resumed_run_is_not_shown_as_finished(fold3_run, toy, tmp_path, monkeypatch):
    run = copy_run(fold3_run, tmp_path / "run")
    seen = []
    one_epoch = train.train_one_epoch

    def spy(*args, **kwargs):
        seen.append((run / "metrics.json").exists())
        return one_epoch(*args, **kwargs)
    monkeypatch.setattr(train, "train_one_epoch", spy)
    train.main(smoke_args(toy, run, "--protocol", "10fold", "--test-fold", "3", "--epochs", "2",
                          "--resume"))
    assert seen == [False] and (run / "metrics.json").exists()  # gone while training, back when it finished
    table, _ = report.summarize(str(tmp_path))
    assert "running or stopped" not in table


# ---------------------------------------------------------------------------
# Third round


BAD_NUMBERS = {
    "--seed -1": (["--seed", "-1"], "--seed must be in"),
    "--lr nan": (["--lr", "nan"], "--lr must be a finite number"),
    "--warmup-epochs nan": (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    "--scale 0": (["--loss", "arcface", "--scale", "0"], "--scale must be positive"),
    "--margin 2 arcface": (["--loss", "arcface", "--margin", "2"], r"--margin must be in \[0, 1\] for --loss arcface"),
    "--margin nan": (["--loss", "cosface", "--margin", "nan"], "--margin must be a finite number"),
    "--arch 1 --batch-size 1": (["--arch", "1", "--batch-size", "1"], "needs --batch-size of at least 2"),
    "--scale with cosine": (["--loss", "cosine", "--scale", "16"], "--scale does not apply to --loss cosine"),
    "--margin with ce": (["--arch", "1", "--loss", "ce", "--margin", "0.2"], "--margin does not apply to --loss ce"),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_numeric_flags_are_range_checked_before_work(toy, tmp_path, case):
    argv, message = BAD_NUMBERS[case]
    r = cli(train, *smoke_argv(toy, tmp_path / "run"), *argv)
    assert r.returncode == 2 and re.search(message, r.stderr), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "lower --lr" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_of_earlier_code_is_refused_in_one_line_naming_the_commit(toy, tmp_path):
    out = tmp_path / "run"
    train.main(smoke_args(toy, out, "--loss", "arcface", "--dropout", "0", "--epochs", "1"))
    for name in ("last.pt", "best.pt"):  # as written before the flag existed: no "dropout" in its args
        ckpt = torch.load(out / name, weights_only=False)
        del ckpt["args"]["dropout"]
        torch.save(ckpt, out / name)
    with pytest.raises(UserError, match="earlier version .*lacks dropout.*results/STUDIES.md") as e:
        train.main(smoke_args(toy, out, "--loss", "arcface", "--epochs", "2", "--resume"))
    assert one_line(e.value)
    r = cli(evaluate, out)
    assert r.returncode == 2 and "lacks dropout" in r.stderr and r.stderr.count("\n") == 1


def test_ctrl_c_inside_a_checkpoint_save_is_an_interrupt_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    utils.atomic_save({"x": torch.zeros(1000)}, path)
    before = path.read_bytes()
    real = utils.open_nofollow

    def interrupted(p, mode="ab"):  # Ctrl-C arrives while torch's zip writer is writing records
        f = real(p, mode)
        calls = []

        def write(b):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return type(f).write(f, b)
        f.write = write
        return f
    monkeypatch.setattr(utils, "open_nofollow", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not RuntimeError("unexpected pos ..."), which torch raises
        utils.atomic_save({"x": torch.zeros(100000)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_run_folder_files_are_never_written_through_a_link(toy, tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(outside)
    r = cli(train, *smoke_argv(toy, out))
    assert r.returncode == 2 and ".lock is a symbolic link" in r.stderr
    (out / ".lock").unlink()
    (out / "notes.txt").symlink_to(outside)
    with pytest.raises(UserError, match="symbolic link"):
        utils.open_nofollow(str(out / "notes.txt"), "a")
    os.symlink(outside, str(out / f"best.pt.tmp{os.getpid()}"))  # a link where the temp file will go
    utils.atomic_save({"x": torch.zeros(1)}, str(out / "best.pt"))
    assert outside.read_text() == "keep me\n" and not os.path.islink(out / "best.pt")


def test_out_is_a_path_never_a_glob_pattern(toy, tmp_path):
    other = tmp_path / "runs" / "other"
    other.mkdir(parents=True)
    (other / "best.pt.tmp123").write_text("another run's temp file")
    train.main(smoke_args(toy, tmp_path / "runs" / "*", "--epochs", "1"))
    assert (other / "best.pt.tmp123").exists()


def test_checkpoint_that_would_unpack_far_beyond_its_size_is_refused(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (64 << 20))  # 64 MiB of zeros in a few kB
    assert os.path.getsize(path) < 1 << 20
    with pytest.raises(UserError, match="would unpack to"):
        utils.load_checkpoint(str(path))


def test_resume_refuses_another_dataset_and_rebuilds_a_lost_best(toy, tmp_path):
    out = tmp_path / "run"
    train.main(smoke_args(toy, out, "--epochs", "1"))
    other = tmp_path / "other"
    shutil.copytree(toy, other)
    same = other / "Protocol/Split/FF/02/same.txt"
    same.write_text("".join(reversed(same.read_text().splitlines(True))))
    with pytest.raises(UserError, match="is not the dataset"):
        train.main(smoke_args(other, out, "--epochs", "2", "--resume"))
    assert (out / "metrics.json").exists()  # refused before anything of the run was touched
    (out / "best.pt").unlink()  # its only epoch was the best one: rebuilt from last.pt
    m = train.main(smoke_args(toy, out, "--epochs", "2", "--resume"))
    assert m["epochs_run"] == 2 and (out / "best.pt").exists()


def test_pair_lists_stream_and_take_any_separator(fold3_run, toy, tmp_path, monkeypatch):
    images = [os.path.join(toy, "Data/Images/003/frontal/01.jpg"), os.path.join(toy, "Data/Images/004/profile/02.jpg")]
    lines = [f"{images[0]}\t{images[1]}  ", f"{images[1]} {images[0]}   "] * 5000
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    decoded = []
    real = verify.decode_image
    monkeypatch.setattr(verify, "decode_image", lambda p, *a: decoded.append(p) or real(p, *a))
    r = cli(evaluate, fold3_run, "--pairs", tmp_path / "list.txt")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert len(rows) == 1 + 10000 and len(decoded) == 2  # each image decoded once across all chunks
    for bad, what in ((tmp_path, "is a folder"), ("/dev/null", "is not a regular file")):
        r = cli(evaluate, fold3_run, "--pairs", bad)
        assert r.returncode == 2 and what in r.stderr
    r = cli(evaluate, fold3_run, "--pair", "/dev/null", images[0])
    assert r.returncode == 2 and "/dev/null is not a regular file" in r.stderr


def test_caches_are_optional(toy, tmp_path, monkeypatch, capsys):
    cfp = data.load_cfp(toy)
    paths = cfp.paths[:6]
    cache = tmp_path / "cache"
    first = images.load_images(paths, 32, cache_dir=str(cache))[0]
    (name,) = os.listdir(cache)
    full = (cache / name).read_bytes()
    (cache / name).write_bytes(full[:len(full) // 2])  # truncated
    (cache / f"{name}.tmp4242").write_bytes(b"half a write")  # left by a killed run
    assert torch.equal(images.load_images(paths, 32, cache_dir=str(cache))[0], first)
    assert "cannot be read" in capsys.readouterr().err and sorted(os.listdir(cache)) == [name]
    torch.save(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), cache / name)  # wrong shape
    assert torch.equal(images.load_images(paths, 32, cache_dir=str(cache))[0], first)
    assert "holds something else" in capsys.readouterr().err

    def full_disk(obj, path):
        raise utils.DiskFull(f"no space left on device while writing {path}")
    monkeypatch.setattr(images, "atomic_save", full_disk)
    (cache / name).unlink()
    assert torch.equal(images.load_images(paths, 32, cache_dir=str(cache))[0], first)
    assert "could not be written" in capsys.readouterr().err
    missing = [paths[1], str(tmp_path / "gone.jpg")]
    with pytest.raises(data.DataError, match="missing image .*gone.jpg"):
        images.load_images(missing, 32, cache_dir=str(cache))[0]


def test_summaries_group_by_folder_and_survive_any_content(fold3_run, tmp_path):
    root = tmp_path / "results"
    for study in ("A", "B"):  # the same run name in two studies: two configurations, neither lost
        shutil.copytree(fold3_run, root / study / "x_fold03", ignore=shutil.ignore_patterns("*.pt"))
    shutil.copytree(fold3_run, root / "A" / "copy" / "x_fold03", ignore=shutil.ignore_patterns("*.pt"))
    junk = {"missing keys": {}, "nulls": {"val_acc": None, "test": None}, "strings": {"val_acc": "high"},
            "deep": "[" * 100000 + "]" * 100000}
    for name, content in junk.items():
        shutil.copytree(fold3_run, root / "junk" / name, ignore=shutil.ignore_patterns("*.pt"))
        (root / "junk" / name / "metrics.json").write_text(content if isinstance(content, str) else json.dumps(content))
    (root / "junk" / "loop").symlink_to(root)  # a link back up: not followed
    table, raw = report.summarize(str(root))
    assert {r["configuration"] for r in raw} == {"A/x", "B/x", "A/copy/x"}
    for name in junk:
        assert f"junk/{name} | unreadable" in table


def test_non_finite_scores_are_refused(fold3_run, toy, tmp_path):
    import metrics
    with pytest.raises(ValueError, match="not finite"):
        metrics.roc(np.array([0.1, np.nan, 0.3]), np.array([1, 0, 1]))
    model, ckpt = verify.load_model(str(fold3_run), torch.device("cpu"))
    with torch.no_grad():
        model.neck[0].weight.fill_(float("nan"))
    cfp = data.load_cfp(toy)
    pairs, _ = cfp.pairs([3])
    bank = images.ImageBank(cfp, pairs[:, :2].ravel(), 32)
    with pytest.raises(UserError, match="pair scores are not finite"):
        verify.evaluate(model, bank, pairs)


def test_images_are_decoded_as_a_viewer_shows_them_or_refused(tmp_path):
    grey16 = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # 0 .. 61380 of 65535
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    x = images.decode_image(str(tmp_path / "grey16.png"), 32, "squash")
    assert 0 < x.float().mean() < 250 and x.max() > 200  # scaled to 8 bits, not clipped to a white square
    rgba = Image.new("RGBA", (32, 32), (200, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (8, 8, 24, 24))
    rgba.save(tmp_path / "alpha.png")
    x = images.decode_image(str(tmp_path / "alpha.png"), 32, "squash")
    assert x[:, 0, 0].tolist() == [255, 255, 255] and x[:, 16, 16].tolist() == [0, 0, 255]  # on white
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    with pytest.raises(data.DataError, match="clear.png: it is fully transparent"):
        images.decode_image(str(tmp_path / "clear.png"), 32)


def test_check_reports_every_bad_image_empty_folds_and_contradicting_pairs(toy, tmp_path):
    root = tmp_path / "toy"
    shutil.copytree(toy, root)
    for victim in ("013/profile/03.jpg", "002/frontal/01.jpg"):
        (root / "Data/Images" / victim).write_bytes(b"\xff\xd8\xff broken")
    (root / "Protocol/Split/FP/07/diff.txt").write_text("")
    (root / "Protocol/Split/FP/07/same.txt").write_text("")
    same = root / "Protocol/Split/FF/02/same.txt"
    i, j = same.read_text().splitlines()[0].split(",")
    diff = root / "Protocol/Split/FF/02/diff.txt"
    diff.write_text(f"{i},{j}\n" + diff.read_text())  # a same pair listed as different
    r = cli(check, root)
    assert r.returncode == 2
    assert "013/profile/03.jpg" in r.stdout and "002/frontal/01.jpg" in r.stdout  # both, not the first only
    assert "fold 07 FP has no pairs" in r.stdout and "fold 02 FF: 1 lines of diff.txt pairs an identity" in r.stdout
    assert "4 problems" in r.stderr


def test_protocol_numbers_are_ascii_digits(toy, tmp_path):
    root = tmp_path / "toy"
    shutil.copytree(toy, root)
    (root / "Protocol/Split/FF/01/same.txt").write_text("\u0661,2\n")  # ARABIC-INDIC DIGIT ONE
    with pytest.raises(data.DataError, match="same.txt:1: expected 'i,j'"):
        data.load_cfp(str(root))


def test_flattened_layout_and_shared_identities_are_refused_before_training(toy, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(toy, flat)
    lines = []
    for name in ("Pair_list_F.txt", "Pair_list_P.txt"):  # every image moved into a folder of its own
        rows = []
        for line in (flat / "Protocol" / name).read_text().splitlines():
            n, rel = line.split()
            new = f"../Data/Images/{name[10]}{n}/x/{os.path.basename(rel)}"
            (flat / "Protocol" / new).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(flat / "Protocol" / rel, flat / "Protocol" / new)
            rows.append(f"{n} {new}")
        (flat / "Protocol" / name).write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match="every training image is its own identity"):
        train.main(smoke_args(flat, tmp_path / "run1"))
    shared = tmp_path / "shared"
    shutil.copytree(toy, shared)
    train_same = (shared / "Protocol/Split/FF/01/same.txt").read_text()
    (shared / "Protocol/Split/FF/09/same.txt").write_text(train_same)  # test pairs of training people
    with pytest.raises(UserError, match="also in the training folds"):
        train.main(smoke_args(shared, tmp_path / "run2"))
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


def test_interrupts_while_decoding_and_during_the_final_test_say_what_happened(toy, tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(images, "load_images", interrupt)
        with pytest.raises(runs.Interrupted, match="while reading the data"):
            train.main(smoke_args(toy, tmp_path / "run", "--epochs", "1"))
    assert not (tmp_path / "run").exists()
    real = train.evaluate
    with monkeypatch.context() as m:  # the test's evaluate() is the first call after the epochs
        m.setattr(train, "evaluate", lambda *a, **k: interrupt() if not a[3] else real(*a, **k))
        with pytest.raises(runs.Interrupted, match="during the final test: every epoch is saved"):
            train.main(smoke_args(toy, tmp_path / "run", "--epochs", "1"))
    m = train.main(smoke_args(toy, tmp_path / "run", "--epochs", "1", "--resume"))  # only tests
    assert m["epochs_run"] == 1 and (tmp_path / "run" / "metrics.json").exists()


def test_an_image_that_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "face.jpg"
    os.mkfifo(fifo)  # open() on it would wait for a writer forever
    with pytest.raises(data.DataError, match="face.jpg is not a regular file"):
        images.decode_image(str(fifo), 32)


def test_a_damaged_exif_is_that_images_error(fold3_run, toy, tmp_path, monkeypatch):
    bad = os.path.join(toy, "Data/Images/003/frontal/01.jpg")
    real = images.ImageOps.exif_transpose

    def exif(im):
        if getattr(im, "filename", "") == bad:
            raise struct.error("unpack requires a buffer of 4 bytes")  # as Pillow raises on a truncated tag
        return real(im)
    monkeypatch.setattr(images.ImageOps, "exif_transpose", exif)
    with pytest.raises(data.DataError, match="cannot read the EXIF data of image .*003/frontal/01.jpg"):
        images.decode_image(bad, 32)
    good = os.path.join(toy, "Data/Images/004/frontal/01.jpg")
    (tmp_path / "list.txt").write_text(f"{bad} {good}\n{good} {good}\n")
    r = cli(evaluate, fold3_run, "--pairs", tmp_path / "list.txt")
    assert r.returncode == 1 and len(r.stdout.strip().splitlines()) == 2  # the other line is still scored
    assert "list.txt:1: cannot read the EXIF data" in r.stderr


def test_a_full_disk_while_logging_gets_the_advice_a_full_save_gets(toy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(smoke_args(toy, out, "--epochs", "1"))
    real = utils.open_nofollow
    written = []

    def nospace(path, mode="ab"):
        if str(path).endswith("log.txt"):
            written.append(path)
            if len(written) > 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, mode)
    monkeypatch.setattr(utils, "open_nofollow", nospace)
    with pytest.raises(utils.DiskFull, match=r"while writing .*log.txt; free some space, then epoch 1 is saved; "
                                             r"continue with: python train.py .*--resume"):
        train.main(smoke_args(toy, out, "--epochs", "3", "--resume"))


# ---------------------------------------------------------------------------
# Fourth round


def test_a_pair_list_that_cannot_be_read_is_one_line_before_any_output(fold3_run, toy, tmp_path):
    for bad in (tmp_path / "missing.txt", tmp_path):
        r = cli(evaluate, fold3_run, "--pairs", bad)
        assert r.returncode == 2 and r.stdout == "" and one_line(r.stderr), r.stdout
    a, b = (os.path.join(toy, f"Data/Images/00{i}/frontal/01.jpg") for i in (3, 4))
    for source in ("-", "/dev/stdin"):  # standard input, a pipe
        r = subprocess.run([sys.executable, "evaluate.py", str(fold3_run), "--pairs", source], cwd=ROOT,
                           input=f"{a} {b}\n{b} {b}\n", capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.strip().splitlines()) == 3, r.stdout


def test_the_threshold_follows_the_photos_poses_unless_a_kind_is_given(fold3_run, toy):
    frontal, other, profile = (os.path.join(toy, f"Data/Images/{p}.jpg") for p in
                               ("003/frontal/01", "003/frontal/02", "003/profile/01"))
    thresholds = torch.load(fold3_run / "best.pt", weights_only=True)["thresholds"]
    for pair, kind in (((frontal, other), "FF"), ((frontal, profile), "FP"), ((profile, frontal), "FP")):
        r = cli(evaluate, fold3_run, "--pair", *pair)
        assert r.returncode == 0, r.stderr
        assert f"threshold {thresholds[kind]:.6f} ({kind} pairs: " in r.stdout, r.stdout
        assert ("profile" in r.stdout) == (kind == "FP"), r.stdout  # it says why: each photo's pose
    r = cli(evaluate, fold3_run, "--pair", frontal, profile, "--kind", "FF")
    assert f"threshold {thresholds['FF']:.6f} (FF pairs)" in r.stdout
    v = verify.Verifier(str(fold3_run), device=torch.device("cpu"))
    assert v.verify(frontal, profile)[2:] == (thresholds["FP"], "FP")
    assert v.verify(frontal, other, kind="all")[2:] == (thresholds["all"], "all")


def test_more_photos_than_the_feature_cache_holds_are_embedded_in_one_call(fold3_run, toy):
    photos = [os.path.join(toy, f"Data/Images/00{i}/frontal/01.jpg") for i in (3, 4, 5)]
    v = verify.Verifier(str(fold3_run), device=torch.device("cpu"))
    alone = torch.stack([v.embed([p])[0] for p in photos])
    v = verify.Verifier(str(fold3_run), device=torch.device("cpu"))
    v.cache.size = 2  # a list longer than the cache: the first features are dropped before they are returned
    assert torch.allclose(v.embed(photos), alone, atol=1e-4)  # a batch of three, against three of one
    scores, _, errors = v.scores([(photos[0], photos[1]), (photos[2], photos[0])])
    assert errors == {} and np.isfinite(scores).all()


def test_an_exported_runs_preprocessing_is_strict_json(fold3_run, tmp_path, monkeypatch):
    import export
    ckpt = torch.load(fold3_run / "best.pt", weights_only=True)
    ckpt["thresholds"]["FP"] = float("nan")  # a held-out folder run has no FF or FP pairs
    prep = json.loads(json.dumps(export.preprocessing(ckpt), allow_nan=False))
    assert prep["thresholds"]["FP"] is None and prep["thresholds"]["FF"] == ckpt["thresholds"]["FF"]


def test_export_to_a_place_that_cannot_be_written_is_one_line(fold3_run):
    r = cli(evaluate, fold3_run, "--export", "/proc/self/embedder.pt2")
    assert r.returncode == 2 and one_line(r.stderr) and "/proc/self/embedder.pt2 cannot be written" in r.stderr


def test_sigterm_during_export_leaves_no_temporary_file(fold3_run, tmp_path):
    path = tmp_path / "embedder.pt2"
    p = subprocess.Popen([sys.executable, "evaluate.py", str(fold3_run), "--export", str(path)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list(tmp_path.glob("embedder.pt2.tmp*")):
        time.sleep(0.01)
    p.send_signal(15)
    p.communicate(timeout=60)
    assert p.returncode in (0, 130) and not list(tmp_path.glob("*.tmp*"))  # finished, or stopped and cleaned up


def test_two_runs_sharing_a_cache_folder_decode_a_mapped_bank_side_by_side(toy, tmp_path):
    code = ("import sys, numpy as np, data, images; images.memory_budget = lambda: 0; cfp = data.load_cfp(sys.argv[1]); "
            "bank = images.ImageBank(cfp, np.arange(len(cfp.paths)), 32, cache_dir=sys.argv[2]); "
            "print(int(bank.images.sum()))")
    for trial in range(3):
        cache = tmp_path / f"cache{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", code, toy, str(cache)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-300:] for _, err in outs]
        assert outs[0][0] == outs[1][0] and [f.name for f in cache.iterdir() if ".part" in f.name] == []


def test_errors_name_the_folder_at_fault(toy, tmp_path):
    shutil.copytree(toy, tmp_path / "cfp")
    with pytest.raises(data.DataError, match=r"looks like the Data/ folder of a CFP layout: give its root, .*cfp'"):
        data.load_dataset(str(tmp_path / "cfp" / "Data"))
    one = tmp_path / "one"
    shutil.copytree(os.path.join(toy, "Data/Images/001"), one / "alice")
    (one / "bob").mkdir()  # an identity folder without images
    with pytest.raises(data.DataError, match=r"one identity folder with images \(alice\)"):
        data.load_dataset(str(one))


def test_more_errors_name_what_is_at_fault(toy, fold3_run, tmp_path):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(open(os.path.join(toy, "Data/Images/003/frontal/01.jpg"), "rb").read()[:600])
    with pytest.raises(data.DataError, match="cannot decode image .*cut.jpg") as e:
        images.decode_image(str(truncated), 32)
    assert "EXIF" not in str(e.value)
    r = cli(evaluate, fold3_run.parent)  # a folder of runs
    assert r.returncode == 2 and "is a folder of runs" in r.stderr and "--summarize" in r.stderr
    r = cli(evaluate, fold3_run, "--benchmark", "cfp", "--data-root", toy)
    assert r.returncode == 2 and "never trained on its dataset's images" in r.stderr and "people" not in r.stderr


def test_a_held_out_run_without_its_pairs_names_the_file(tmp_path):
    from toy import make_toy_folders
    make_toy_folders(str(tmp_path / "faces"), num_ids=24, per_id=6, size_range=(30, 50))
    out = tmp_path / "run"
    train.main(smoke_args(tmp_path / "faces", out, "--loss", "arcface", "--epochs", "1"))
    (out / "pairs_val.txt").unlink()
    r = cli(evaluate, out)
    assert r.returncode == 2 and "pairs_val.txt is missing" in r.stderr and "Protocol" not in r.stderr
    with pytest.raises(data.DataError, match="--eval-root '/nonexistent' is not a folder"):
        data.split(str(tmp_path / "faces"), "/nonexistent", "seed", None, 0)


def test_check_counts_empty_identity_folders(toy, tmp_path):
    from toy import make_toy_folders
    make_toy_folders(str(tmp_path / "faces"), num_ids=3, per_id=4, size_range=(30, 50))
    (tmp_path / "faces" / "zz_empty").mkdir()
    r = cli(check, tmp_path / "faces")
    assert r.returncode == 0, r.stderr
    assert "identities   4 (3 with 2+ images)" in r.stdout and "(0-4 per identity" in r.stdout


def test_an_exported_runs_preprocessing_says_how_to_decode_and_where_landmarks_come_from(fold3_run):
    import export
    ckpt = torch.load(fold3_run / "best.pt", weights_only=True)
    prep = export.preprocessing(ckpt)
    assert "draft" in prep["decode"] and prep["landmarks"] is None  # a whole-image run
    ckpt["aligner"] = {"mode": "template", "margin": 1.25, "templates": {}}
    prep = export.preprocessing(ckpt)
    assert "warped" in prep["decode"] and "landmark network" in prep["landmarks"]


def test_a_changed_image_is_caught_by_the_cache_and_by_resume(toy, tmp_path):
    root = tmp_path / "toy"
    shutil.copytree(toy, root)
    cfp = data.load_cfp(str(root))
    sizes = [os.path.getsize(p) for p in cfp.paths]
    i, j = next((i, j) for i in range(len(sizes)) for j in range(i + 1, len(sizes)) if sizes[i] == sizes[j])
    out = tmp_path / "run"
    train.main(smoke_args(root, out, "--epochs", "1", "--cache-dir", tmp_path / "cache"))
    few = [cfp.paths[i], cfp.paths[j]]
    first, content = images.load_images(few, 32, cache_dir=str(tmp_path / "cache2"))
    st = os.stat(few[0])
    body = open(few[1], "rb").read()
    open(few[0], "wb").write(body)  # another image of the same size in its place, with its times (`cp -p`)
    os.utime(few[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    again, changed = images.load_images(few, 32, cache_dir=str(tmp_path / "cache2"))
    assert changed != content and torch.equal(again[0], again[1]) and not torch.equal(first[0], again[0])
    with pytest.raises(UserError, match="contents changed"):
        train.main(smoke_args(root, out, "--epochs", "2", "--resume", "--cache-dir", tmp_path / "cache"))


def test_a_benchmark_of_a_run_whose_training_data_is_gone_says_so(tmp_path, toy):
    from toy import make_toy_folders
    make_toy_folders(str(tmp_path / "faces"), num_ids=24, per_id=6, size_range=(30, 50))
    out = tmp_path / "run"
    train.main(smoke_args(tmp_path / "faces", out, "--loss", "arcface", "--epochs", "1", "--eval-root", toy))
    shutil.rmtree(tmp_path / "faces")
    r = cli(evaluate, out, "--benchmark", "cfp", "--data-root", toy)
    assert r.returncode == 2 and one_line(r.stderr) and "training data" in r.stderr and "is gone" in r.stderr
    assert "--data-root" not in r.stderr


def test_evaluation_images_under_other_names_or_re_encoded_are_caught(toy, tmp_path):
    linked = tmp_path / "linked"
    check.to_folders(toy, str(linked))  # every fold, the test folds' people included
    for k, d in enumerate(sorted(linked.iterdir())):
        d.rename(linked / f"person{k:03d}")  # other names
    with pytest.raises(UserError, match=r"training images of .* are validation or test images of --eval-root"):
        train.main(smoke_args(linked, tmp_path / "run", "--loss", "arcface", "--epochs", "1", "--eval-root", toy))
    assert not (tmp_path / "run").exists()
    cfp = data.load_cfp(toy)
    pngs = tmp_path / "pngs"
    for i in cfp.images_of([9, 10]).tolist() + list(range(0, len(cfp.paths), 7)):
        d = pngs / f"id{cfp.identity[i]:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.open(cfp.paths[i]).convert("RGB").save(d / f"{i}.png")  # re-encoded: other bytes, the same pixels
    out = tmp_path / "pngrun"
    train.main(smoke_args(pngs, out, "--loss", "arcface", "--epochs", "1"))
    r = cli(evaluate, out, "--benchmark", "cfp", "--data-root", toy)
    assert r.returncode == 2 and one_line(r.stderr) and "re-encoded copies" in r.stderr


def test_a_resume_with_another_thread_count_says_the_run_will_not_repeat(fold3_run, toy, tmp_path):
    """On a CPU the thread count picks the kernels: a run resumed with another count is not the run its
    config.json describes (fold 1 of the recipe moved by 1.6 / 2.4 points of FF / FP with 2 threads for 1)."""
    run = copy_run(fold3_run, tmp_path / "run")
    saved = json.load(open(run / "config.json"))["threads"]
    before = torch.get_num_threads()
    torch.set_num_threads(saved + 1)
    try:
        train.main(smoke_args(toy, run, "--protocol", "10fold", "--test-fold", "3", "--epochs", "2", "--resume"))
    finally:
        torch.set_num_threads(before)
    assert f"warning: {run} was started with {saved} threads and resumes with {saved + 1}" in \
        open(run / "log.txt").read()
    resumed = json.load(open(run / "config.json"))["resumes"][-1]
    assert resumed["threads"] == saved + 1 and resumed["cpu"]  # and the CPU it resumed on
