import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import ROOT


def copy_toy(toy, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(toy, dst)
    return dst


def test_toy_protocol_parses(toy):
    cfp = data.load_cfp(toy)
    assert len(cfp.paths) == 20 * 14
    assert int(cfp.profile.sum()) == 20 * 4
    assert len(np.unique(cfp.identity)) == 20
    for k in range(1, 11):
        for kind in data.KINDS:
            pairs = cfp.folds[k][kind]
            assert pairs.shape == (8, 3) and pairs[:, 2].sum() == 4
            same = pairs[pairs[:, 2] == 1]
            assert (cfp.identity[same[:, 0]] == cfp.identity[same[:, 1]]).all()
            diff = pairs[pairs[:, 2] == 0]
            assert (cfp.identity[diff[:, 0]] != cfp.identity[diff[:, 1]]).all()
            assert not cfp.profile[pairs[:, 0]].any()  # first image always frontal
            assert cfp.profile[pairs[:, 1]].all() == (kind == "FP")
    # identities come from the folder: image 15 (1-based) is person 002's 5th frontal
    assert cfp.paths[14].endswith(os.path.join("002", "frontal", "05.jpg"))
    assert cfp.identity[14] == cfp.identity[10] != cfp.identity[9]


def test_toy_is_deterministic(toy, tmp_path):
    data.make_toy(str(tmp_path / "again"), num_ids=20, same_per_kind=4)
    for rel in ("Protocol/Split/FP/03/diff.txt", "Data/Images/007/profile/02.jpg"):
        with open(os.path.join(toy, rel), "rb") as a, open(tmp_path / "again" / rel, "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("protocol,test_fold,expected", [
    ("seed", None, {"train": [1, 2, 3, 4, 5, 6], "val": [7, 8], "test": [9, 10]}),
    ("10fold", 3, {"train": [1, 2, 5, 6, 7, 8, 9, 10], "val": [4], "test": [3]}),
    ("10fold", 10, {"train": [2, 3, 4, 5, 6, 7, 8, 9], "val": [1], "test": [10]}),
])
def test_split_folds(protocol, test_fold, expected):
    assert data.split_folds(protocol, test_fold) == expected


def test_split_roles_are_identity_disjoint(toy):
    cfp = data.load_cfp(toy)
    roles = data.split_folds("seed")
    ids = {r: set(cfp.identities_of(f)) for r, f in roles.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert len(cfp.pairs(roles["train"])[0]) == 6 * 16


@pytest.mark.parametrize("edit,message", [
    (lambda r: os.remove(r / "Protocol/Split/FP/04/same.txt"), "missing protocol file"),
    (lambda r: (r / "Protocol/Split/FF/02/diff.txt").write_text("3,4\n5;6\n"), "diff.txt:2: expected 'i,j'"),
    (lambda r: (r / "Protocol/Split/FP/02/same.txt").write_text("1,81\n"), "same.txt:1: pair 1,81 out of range"),
    (lambda r: (r / "Protocol/Pair_list_P.txt").write_text("1 ../../etc/passwd\n"), "outside the dataset root"),
    (lambda r: (r / "Protocol/Pair_list_F.txt").write_text("1 a.jpg\n3 b.jpg\n"), "Pair_list_F.txt:2:"),
])
def test_protocol_errors_name_file_and_line(toy, tmp_path, edit, message):
    root = copy_toy(toy, tmp_path)
    edit(root)
    with pytest.raises(data.DataError, match=message):
        data.load_cfp(str(root))


def test_missing_data_root():
    with pytest.raises(data.DataError, match="--data-root"):
        data.load_cfp("/nonexistent/cfp")


def test_decode_any_size_and_mode(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((42, 43), 200, np.uint8), "L").save(gray)
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (300, 120), (0, 255, 0, 0)).save(cmyk)
    for p in (gray, cmyk):
        x = data.decode_image(str(p), 64)
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    assert (data.decode_image(str(gray), 32) == 200).all()


def test_decode_errors_name_the_file(tmp_path):
    with pytest.raises(data.DataError, match="missing image .*nope.jpg"):
        data.decode_image(str(tmp_path / "nope.jpg"), 32)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(data.DataError, match="cannot decode image .*bad.jpg"):
        data.decode_image(str(bad), 32)


def test_disk_cache_round_trip(toy, tmp_path):
    cfp = data.load_cfp(toy)
    paths = cfp.paths[:10]
    first = data.load_images(paths, 32, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1
    calls = []
    orig = data.decode_image
    data.decode_image = lambda *a: calls.append(a) or orig(*a)
    try:
        again = data.load_images(paths, 32, cache_dir=str(tmp_path))
    finally:
        data.decode_image = orig
    assert calls == [] and torch.equal(first, again)


def test_preprocess_and_augment():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    y = data.preprocess(x)
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(y, (x / 255 - mean) / std)
    torch.manual_seed(0)
    a = data.preprocess(x, train=True)
    torch.manual_seed(0)
    b = data.preprocess(x, train=True)
    assert a.shape == y.shape and torch.equal(a, b) and not torch.allclose(a, y)
    # no rotation + mirror = exact horizontal flip
    img = torch.rand(1, 3, 8, 8)
    torch.manual_seed(0)
    flipped = data.augment(img, max_degrees=0.0)
    assert torch.allclose(flipped, img, atol=1e-6) or torch.allclose(flipped, img.flip(3), atol=1e-6)


def test_check_cli_reports_summary_and_truncated_image(toy, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "data.py"), "--check"]
    ok = subprocess.run(cmd + [toy], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "identities   20" in ok.stdout and "200 frontal, 80 profile" in ok.stdout
    assert "96 train / 32 val / 32 test" in ok.stdout
    root = copy_toy(toy, tmp_path)
    victim = root / "Data/Images/013/profile/03.jpg"
    raw = victim.read_bytes()
    victim.write_bytes(raw[:len(raw) // 2])
    bad = subprocess.run(cmd + [str(root)], capture_output=True, text=True)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "013/profile/03.jpg" in lines[0], bad.stderr


def test_real_cfp(cfp_root):
    cfp = data.load_cfp(cfp_root)
    assert len(np.unique(cfp.identity)) == 500
    assert int((~cfp.profile).sum()) == 5000 and int(cfp.profile.sum()) == 2000
    roles = data.split_folds("seed")
    assert [len(cfp.pairs(roles[r])[0]) for r in ("train", "val", "test")] == [8400, 2800, 2800]
    ids = {r: set(cfp.identities_of(f)) for r, f in roles.items()}
    assert [len(ids[r]) for r in ("train", "val", "test")] == [300, 100, 100]
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    for k in range(1, 11):  # FF fold k and FP fold k hold the same 50 identities
        ff = set(cfp.identity[cfp.folds[k]["FF"][:, :2].ravel()])
        fp = set(cfp.identity[cfp.folds[k]["FP"][:, :2].ravel()])
        assert ff == fp and len(ff) == 50
