import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import images
from toy import make_toy
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
    make_toy(str(tmp_path / "again"), num_ids=20, same_per_kind=4)
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
        x = images.decode_image(str(p), 64)
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    assert (images.decode_image(str(gray), 32, "squash") == 200).all()


def test_decode_errors_name_the_file(tmp_path):
    with pytest.raises(data.DataError, match="missing image .*nope.jpg"):
        images.decode_image(str(tmp_path / "nope.jpg"), 32)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(data.DataError, match="cannot decode image .*bad.jpg"):
        images.decode_image(str(bad), 32)


def test_disk_cache_round_trip(toy, tmp_path):
    cfp = data.load_cfp(toy)
    paths = cfp.paths[:10]
    first = images.load_images(paths, 32, cache_dir=str(tmp_path))[0]
    assert len(os.listdir(tmp_path)) == 1
    calls = []
    orig = images.decode_image
    images.decode_image = lambda *a: calls.append(a) or orig(*a)
    try:
        again = images.load_images(paths, 32, cache_dir=str(tmp_path))[0]
    finally:
        images.decode_image = orig
    assert calls == [] and torch.equal(first, again)


def test_preprocess_and_augment():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    y = images.preprocess(x)
    mean = torch.tensor(images.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(images.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(y, (x / 255 - mean) / std)
    torch.manual_seed(0)
    a = images.preprocess(x, train=True)
    torch.manual_seed(0)
    b = images.preprocess(x, train=True)
    assert a.shape == y.shape and torch.equal(a, b) and not torch.allclose(a, y)


def test_augment_flips_half_the_images():
    img = torch.rand(1, 3, 8, 8).expand(200, 3, 8, 8).contiguous()  # an asymmetric image, 200 times
    torch.manual_seed(0)
    out = images.augment(img, max_degrees=0.0)  # no rotation: each output is the image or its exact mirror
    same = torch.isclose(out, img, atol=1e-6).flatten(1).all(1)
    mirrored = torch.isclose(out, img.flip(3), atol=1e-6).flatten(1).all(1)
    assert (same ^ mirrored).all()
    assert 70 < int(mirrored.sum()) < 130


def line_angles(x):
    """Orientation in degrees of the bright pixels of each image (second moments)."""
    w = x[:, 0]                                                        # (B, H, W)
    ys, xs = torch.meshgrid(torch.arange(w.shape[1]).float(), torch.arange(w.shape[2]).float(),
                            indexing="ij")
    m = w.sum((1, 2))
    cx, cy = (w * xs).sum((1, 2)) / m, (w * ys).sum((1, 2)) / m
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    cxx, cyy, cxy = ((w * dx * dx).sum((1, 2)), (w * dy * dy).sum((1, 2)), (w * dx * dy).sum((1, 2)))
    return torch.rad2deg(0.5 * torch.atan2(2 * cxy, cxx - cyy))


def test_augment_rotates_within_20_degrees():
    img = torch.zeros(300, 3, 64, 64)
    img[:, :, 31:33, 12:52] = 1.0  # a horizontal bar through the centre
    assert line_angles(img[:1]).abs().max() < 0.5
    torch.manual_seed(0)
    angles = line_angles(images.augment(img))
    assert angles.abs().max() <= 21.0           # never beyond +-20 degrees (plus sampling blur)
    assert angles.max() > 15 and angles.min() < -15  # and the whole range is used, both ways


def test_check_cli_reports_summary_and_truncated_image(toy, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "check.py")]
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


def test_disk_cache_is_invalidated_by_a_changed_image_or_size(toy, tmp_path):
    root = copy_toy(toy, tmp_path)
    cfp = data.load_cfp(str(root))
    paths = cfp.paths[:6]
    cache = tmp_path / "cache"
    first = images.load_images(paths, 32, cache_dir=str(cache))[0]
    Image.new("RGB", (50, 60), (255, 0, 0)).save(paths[2], "JPEG")  # the file changes: size and mtime
    os.utime(paths[2], ns=(1, 1))
    again = images.load_images(paths, 32, cache_dir=str(cache))[0]
    assert not torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    assert len(os.listdir(cache)) == 2
    bigger = images.load_images(paths, 40, cache_dir=str(cache))[0]
    assert bigger.shape[-1] == 40 and len(os.listdir(cache)) == 3
    images.load_images(paths, 40, cache_dir=str(cache), resize="squash")[0]
    assert len(os.listdir(cache)) == 4


def test_resize_modes_keep_or_stretch_the_face(tmp_path):
    tall = tmp_path / "tall.png"
    a = np.zeros((200, 100, 3), np.uint8)
    a[:50] = (0, 255, 0)   # top quarter green
    a[50:] = (255, 0, 0)   # the rest red
    Image.fromarray(a).save(tall)
    pad = images.decode_image(str(tall), 64, "pad")
    squash = images.decode_image(str(tall), 64, "squash")
    assert (pad[:, :, :14] == 0).all() and (pad[:, :, -14:] == 0).all()   # black side borders, 16 px each
    assert pad[1, 4, 32] > 200 and pad[0, 60, 32] > 200                   # green above red, aspect kept
    assert squash[1, 4, 2] > 200 and squash[0, 60, 2] > 200               # stretched over the full width
    with pytest.raises(data.DataError, match="unknown resize"):
        images.decode_image(str(tall), 64, "zoom")


def test_identity_pairs_are_fresh_balanced_and_from_training_identities(toy):
    cfp = data.load_cfp(toy)
    folds = data.split_folds("seed")
    pairs = data.IdentityPairSet(cfp, folds["train"])
    pairs.new_epoch(seed=0, epoch=0)
    p = pairs.pairs.numpy()
    assert len(p) == len(cfp.pairs(folds["train"])[0]) == 96
    a, b, same = p[:, 0], p[:, 1], p[:, 2]
    train_ids = set(cfp.identities_of(folds["train"]))
    assert set(cfp.identity[a]) | set(cfp.identity[b]) <= train_ids
    assert ((cfp.identity[a] == cfp.identity[b]) == (same == 1)).all()
    assert not cfp.profile[a].any() and cfp.profile[b].sum() == 48   # FF: frontal,frontal; FP: frontal,profile
    assert same.sum() == 48 and same[cfp.profile[b]].sum() == 24     # balanced in both kinds
    assert (a != b).all()
    again = data.IdentityPairSet(cfp, folds["train"])
    again.new_epoch(seed=0, epoch=0)
    assert torch.equal(again.pairs, pairs.pairs)                     # a function of (seed, epoch)
    pairs.new_epoch(seed=0, epoch=1)
    assert not torch.equal(again.pairs, pairs.pairs)                 # fresh every epoch


def test_image_bank_refuses_an_image_it_does_not_hold(toy):
    cfp = data.load_cfp(toy)
    bank = images.ImageBank(cfp, [0, 1, 2], 32)
    assert bank[[2, 0]].shape == (2, 3, 32, 32)
    with pytest.raises(IndexError, match=r"\[5\]"):
        bank[[0, 5]]


def test_color_jitter_keeps_grey_grey_and_greys_about_p_gray():
    img = torch.zeros(400, 3, 64, 64)
    img[:, :, 24:40, 24:40] = 0.5
    torch.manual_seed(0)
    colour = images.color_jitter(img)
    assert colour.min() >= 0 and colour.max() <= 1
    grey = (colour[:, 0] == colour[:, 1]).flatten(1).all(1) & (colour[:, 1] == colour[:, 2]).flatten(1).all(1)
    assert grey.all()  # a grey image stays grey whatever the saturation
    rgb = torch.rand(1, 3, 16, 16).expand(400, 3, 16, 16).contiguous()
    torch.manual_seed(0)
    jittered = images.color_jitter(rgb)
    grey = (jittered[:, 0] == jittered[:, 1]).flatten(1).all(1)
    assert 40 < int(grey.sum()) < 120                                      # about p_gray = 0.2 turned grey
    brightness = jittered.mean((1, 2, 3)) / rgb.mean((1, 2, 3))
    assert brightness.min() > 0.6 and brightness.max() < 1.4 and brightness.std() > 0.05


def test_clutter_fills_only_what_lies_outside_the_photo():
    """--clutter: the black that the warp left outside the photo becomes pieces of the batch's images, in a
    share p of them; the photo's own pixels stay as they were."""
    torch.manual_seed(0)
    x = torch.rand(400, 3, 16, 16) * 0.9 + 0.05
    x[:, :, :, :3] = 0  # the aligned square reached past the photo's left edge
    out = images.clutter(x, p=0.5)
    assert torch.equal(out[..., 3:], x[..., 3:])
    filled = (out[..., :3] > 0).flatten(1).all(1)
    untouched = (out[..., :3] == 0).flatten(1).all(1)
    assert (filled ^ untouched).all() and 150 < int(filled.sum()) < 250
    assert torch.equal(images.clutter(x, p=0.0), x)


def test_clutter_shows_the_drawn_families_beside_the_mosaic():
    """With train.py's pool (backgrounds.clutter_pool: gradient, noise, shapes), about 3 fills in 4 are one
    of its pictures and the rest the mosaic of faces; each pool picture comes whole, and the photo stays."""
    import backgrounds
    pool = backgrounds.clutter_pool(16, seed=0, n=12)
    assert pool.pictures.shape == (12, 3, 16, 16) and pool.families == 3
    torch.manual_seed(0)
    x = torch.rand(400, 3, 16, 16) * 0.9 + 0.05
    x[:, :, :, :3] = 0
    out = images.clutter(x, p=1.0, pool=pool)
    assert torch.equal(out[..., 3:], x[..., 3:])
    drawn = pool.pictures[..., :3].float() / 255
    from_pool = [bool((o[..., :3] == drawn).flatten(1).all(1).any()) for o in out]
    assert 250 < sum(from_pool) < 350


def test_augment_draws_two_numbers_per_image():
    """A flip and an angle per image, nothing more: runs made before other augmentations were studied repeat."""
    x = torch.rand(8, 3, 32, 32)
    torch.manual_seed(0)
    images.augment(x)
    after = torch.rand(1)
    torch.manual_seed(0)
    torch.rand(8), torch.rand(8)                                           # flip, angle: all it draws
    assert torch.equal(after, torch.rand(1))
