"""Alignment by landmarks: the geometry (align.py), landmark files (data.py), aligned training and evaluation."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import align
import check
import data
import evaluate
import images
import train
from conftest import cli, smoke_args


def face(facing="right"):
    """A hand-made 30-point face: jaw 1-9 (ear down to chin), eyebrow 10-12, eye 13-18, nose 19-25, mouth 26-30.
    facing: 'frontal' (the image's left half of a face, as CFP marks frontal faces), 'right' or 'left'."""
    jaw = [(20 + 3 * i, 40 + 7 * i) for i in range(9)]
    brow = [(40, 30), (48, 28), (56, 30)]
    eye = [(42, 42), (46, 40), (50, 40), (54, 42), (50, 44), (46, 44)]
    nose = [(66, 40), (68, 50), (70, 60), (72, 68), (68, 72), (64, 72), (62, 70)]
    mouth = [(56, 86), (62, 84), (68, 84), (68, 88), (62, 90)]
    points = np.array(jaw + brow + eye + nose + mouth, dtype=np.float64)
    if facing == "frontal":
        points[:, 0] -= 10
        points[18:25, 0] = points[8, 0] - 0.5  # the nose on the face's centre line, above the chin
    if facing == "left":
        points[:, 0] = 120 - points[:, 0]
    return points


def random_similarity(rng):
    angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.5, 3)
    m = np.eye(3)
    m[:2, :2] = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m[:2, 2] = rng.uniform(-50, 50, 2)
    return m


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = face()
    for _ in range(5):
        m = random_similarity(rng)
        assert np.allclose(align.similarity(src, align.apply(m, src)), m, atol=1e-9)


@pytest.mark.parametrize("facing, pose", [("frontal", "frontal"), ("right", "right"), ("left", "left")])
def test_pose_of_hand_made_faces(facing, pose):
    assert align.pose_of(face(facing), profile=facing != "frontal") == pose


def test_profiles_facing_left_are_mirrored_onto_the_right_facing_template():
    right, left = face("right"), face("left")
    templates = align.build_templates(np.stack([face("frontal"), right, left]), np.array([False, True, True]), 1.25)
    for points in (right, left):
        m = align.warp_matrix(points, True, 64, "template", templates=templates)
        out = align.apply(m, points)
        assert np.abs(out - templates["profile"] * 64).max() < 1e-6  # both land on the same template
        assert out[align.NOSE, 0].mean() > out[align.JAW, 0].mean()  # facing right
    assert np.linalg.det(align.warp_matrix(left, True, 64, "template", templates=templates)[:2, :2]) < 0
    assert np.linalg.det(align.warp_matrix(right, True, 64, "template", templates=templates)[:2, :2]) > 0


def test_template_alignment_undoes_rotation_scale_and_shift():
    rng = np.random.default_rng(1)
    shapes = np.stack([align.apply(random_similarity(rng), face("frontal")) for _ in range(20)])
    templates = align.build_templates(np.concatenate([shapes, face("right")[None]]), np.arange(21) == 20, 1.25)
    t = templates["frontal"]
    assert 0 <= t.min() and t.max() <= 1  # the whole face inside the square, with the margin
    assert abs((t[13:18, 1].mean()) - t[[12, 15], 1].mean()) < 0.05  # the template is upright: the eye is level
    for points in shapes:
        out = align.apply(align.warp_matrix(points, False, 112, "template", templates=templates), points)
        assert np.abs(out - t * 112).max() < 1e-6


def test_box_keeps_the_face_upright_inside_the_square():
    points = face("frontal")
    out = align.apply(align.warp_matrix(points, False, 64, "box", margin=1.25), points)
    assert out.min() > 0 and out.max() < 64
    box = align.face_box(out, "frontal")
    assert max(box[2] - box[0], box[3] - box[1]) == pytest.approx(64 / 1.25)  # 1/margin of the side


def test_decoded_face_is_warped_where_the_matrix_says(tmp_path):
    """A white dot at a landmark of a large photo lands at that landmark's place in the small output."""
    points = face("left") * 8  # a 960 px photo: shrunk by a box filter before the warp
    img = Image.new("RGB", (960, 800))
    eye = points[13:18].mean(0)
    ImageDraw.Draw(img).ellipse([eye[0] - 16, eye[1] - 16, eye[0] + 16, eye[1] + 16], fill=(255, 255, 255))
    img.save(tmp_path / "photo.png")
    m = align.warp_matrix(points, True, 64, "box")
    x = images.decode_image(str(tmp_path / "photo.png"), 64, matrix=m)
    assert x.shape == (3, 64, 64)
    y, xs = np.unravel_index(int(x[0].float().argmax()), (64, 64))
    expected = align.apply(m, eye[None])[0]
    assert abs(xs - expected[0]) <= 1.5 and abs(y - expected[1]) <= 1.5
    assert expected[0] > 32  # the left-facing profile was mirrored: its eye is now right of the centre


def write_landmarks(root):
    """Landmark files for every image of a toy dataset: a face placed in the middle of each picture."""
    cfp = data.load_cfp(root)
    for i, path in enumerate(cfp.paths):
        w, h = Image.open(path).size
        facing = "frontal" if not cfp.profile[i] else ("left" if i % 2 else "right")
        points = face(facing) * (min(w, h) / 120)
        f = data.landmark_file(root, path)
        os.makedirs(os.path.dirname(f), exist_ok=True)
        with open(f, "w") as fh:
            fh.writelines(f"{x:.3f},{y:.3f}\n" for x, y in points)


@pytest.fixture(scope="module")
def toy_lm(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_lm") / "toy"
    shutil.copytree(toy, root)
    write_landmarks(str(root))
    return str(root)


def test_landmark_files_are_read_and_errors_name_file_and_line(toy_lm, tmp_path):
    cfp = data.load_cfp(toy_lm)
    assert cfp.landmarks.shape == (len(cfp.paths), 30, 2)
    assert data.load_cfp(os.path.join(toy_lm)).landmarks is not None
    copy = tmp_path / "toy"
    shutil.copytree(toy_lm, copy)
    f = copy / "Data/Fiducials/002/frontal/03.txt"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:4] + ["12.5;7"] + lines[5:]) + "\n")
    with pytest.raises(data.DataError, match=r"Fiducials/002/frontal/03.txt:5: expected 'x,y'"):
        data.load_cfp(str(copy))
    f.write_text("\n".join(lines[:29]) + "\n")
    with pytest.raises(data.DataError, match="03.txt: 29 landmarks, expected 30"):
        data.load_cfp(str(copy))
    f.unlink()
    with pytest.raises(data.DataError, match="missing landmark file .*002/frontal/03.txt"):
        data.load_cfp(str(copy))


def test_check_counts_landmarks_and_names_points_outside(toy_lm, tmp_path):
    copy = tmp_path / "toy"
    shutil.copytree(toy_lm, copy)
    f = copy / "Data/Fiducials/004/profile/02.txt"
    f.write_text("-5,3\n" + "".join(f.read_text().splitlines(True)[1:]))
    r = cli(check, copy)
    assert r.returncode == 0, r.stderr
    assert f"landmarks    {20 * 14} landmark files read" in r.stdout
    assert "1 images have landmarks outside the picture" in r.stdout and "004/profile/02.jpg (1)" in r.stdout


def test_cache_key_includes_the_alignment(toy_lm, tmp_path):
    cfp = data.load_cfp(toy_lm)
    idx = np.arange(6)
    box = images.ImageBank(cfp, idx, 32, cache_dir=str(tmp_path), aligner=align.Aligner("box", 1.25))
    wider = images.ImageBank(cfp, idx, 32, cache_dir=str(tmp_path), aligner=align.Aligner("box", 2.0))
    whole = images.ImageBank(cfp, idx, 32, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 3
    assert not torch.equal(box.images, wider.images) and not torch.equal(box.images, whole.images)


def test_aligned_training_records_its_alignment_and_pictures_its_inputs(toy_lm, toy, tmp_path):
    # --amp: bf16 where the CPU has it, so that --pair is checked against a bf16 run's test scores
    m = train.main(smoke_args(toy_lm, tmp_path / "run", "--loss", "arcface", "--epochs", "1", "--amp"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["args"]["align"] == "template" and config["aligner"]["templates_from_folds"] == [1, 2, 3, 4, 5, 6]
    assert Image.open(tmp_path / "run" / "inputs.png").size[0] > 300
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert set(ckpt["aligner"]["templates"]) == {"frontal", "profile"}
    assert 0 <= m["test_acc"] <= 1
    # evaluation decodes the test faces exactly as training did: the same scores as test_scores.csv
    r = cli(evaluate, tmp_path / "run", "--data-root", toy_lm, "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["test"]["all"]["acc"] == pytest.approx(m["test_acc"])
    with open(tmp_path / "run" / "test_scores.csv") as f:
        row = next(csv.DictReader(f))
    cfp = data.load_cfp(toy_lm)
    r = cli(evaluate, tmp_path / "run", "--pair", cfp.paths[int(row["a"])], cfp.paths[int(row["b"])])
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split("score ")[1].split()[0]) == pytest.approx(float(row["score"]), abs=1e-6)
    # a photo with no landmark file: one line naming it
    r = cli(evaluate, tmp_path / "run", "--pair", os.path.join(toy, "Data/Images/001/frontal/01.jpg"),
            cfp.paths[0])
    assert r.returncode == 2 and "001/frontal/01.jpg has no landmark file" in r.stderr
    assert r.stderr.count("\n") == 1


def test_align_defaults_follow_the_dataset(toy, tmp_path):
    args = smoke_args(toy, tmp_path / "run", "--epochs", "1")
    train.main(args)
    assert args.align == "none"  # no Data/Fiducials: whole images, as before
    r = cli(train, *["--data-root", toy, "--out", tmp_path / "r2", "--align", "template", "--backbone", "resnet18",
                     "--no-pretrained", "--img-size", "32"])
    assert r.returncode == 2 and "has no Data/Fiducials landmark files" in r.stderr


def test_real_cfp_landmarks(cfp_root):
    cfp = data.load_cfp(cfp_root)
    assert cfp.landmarks.shape == (7000, 30, 2)
    poses = [align.pose_of(p, q) for p, q in zip(cfp.landmarks, cfp.profile)]
    assert poses.count("frontal") == 5000 and 900 < poses.count("left") < 1100  # about half face each way
