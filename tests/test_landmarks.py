"""The landmark network (landmarks.py): training views, finding faces, and photos aligned without landmark files."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import align
import data
import evaluate
import verify
import faces
import landmarks
import metrics
import train
from conftest import cli, smoke_args
from models import POSES, LandmarkNet
from test_align import face, toy_lm  # noqa: F401 (toy_lm: the toy with hand-made landmark files)
from test_folders import folders  # noqa: F401 (toy faces as identity folders)
from utils import UserError, machine_state


@pytest.fixture(scope="module")
def lm_run(toy_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "landmarks"
    r = cli(landmarks, "--data-root", toy_lm, "--out", out, "--img-size", "32", "--epochs", "1",
            "--batch-size", "16", "--val-images", "8", "--workers", "1",
            "--found-threshold", "0.5")  # a one-epoch toy network's best F1 is 0: it would find nothing
    assert r.returncode == 0, r.stderr
    return out


def dot_photos(tmp_path):
    """Photos with one white dot on a black ground at a hand-made face's eye, with their landmark sets."""
    root = tmp_path / "dots"
    points = {"frontal": face("frontal") * 2, "right": face("right") * 2, "left": face("left") * 2}
    for pose, p in points.items():
        img = Image.new("RGB", (260, 220))
        eye = p[12:18].mean(0)
        ImageDraw.Draw(img).ellipse([eye[0] - 6, eye[1] - 6, eye[0] + 6, eye[1] + 6], fill=(255, 255, 255))
        os.makedirs(root, exist_ok=True)
        img.save(root / f"{pose}.png")
    return root, points


class Photos:
    """A stand-in for a CFP of hand-made photos: what landmarks.FaceData reads."""

    def __init__(self, root, points):
        self.paths = [str(root / f"{k}.png") for k in points]
        self.landmarks = np.stack(list(points.values()))
        self.profile = np.array([k != "frontal" for k in points])


def test_views_put_the_landmarks_where_the_face_is_and_mirror_profiles(tmp_path):
    root, points = dot_photos(tmp_path)
    d = landmarks.FaceData(Photos(root, points), np.arange(3), workers=1)
    assert [POSES[k] for k in d.pose] == ["frontal", "right", "left"]
    gen = torch.Generator().manual_seed(0)
    rows = np.tile(np.arange(3), 40)
    x, pose, target = landmarks.random_views(d, rows, 64, gen, p_empty=0.0, max_degrees=20.0)
    swapped = 0
    for img, k, t, row in zip(x, pose, target, rows):
        eye = t.numpy()[12:18].mean(0) * 64
        bright = (img.mean(0) > 0.8).nonzero().float()  # (y, x) of the dot's pixels (the mosaic is dimmer)
        if d.pose[row] != POSES.index("frontal"):
            # a profile's label follows the way it faces in the view: swapped exactly when it was mirrored
            facing = align.pose_of(t.numpy() * 64, True)
            assert POSES[int(k)] == facing
            swapped += int(k) != d.pose[row]
        if len(bright) > 4:
            assert np.abs(bright.mean(0).numpy()[::-1] - eye).max() < 3  # the dot is where its landmark says
    assert 5 < swapped < 75  # about half the profiles were mirrored
    x, pose, _ = landmarks.random_views(d, rows, 64, gen, p_empty=1.0)
    assert (pose == 0).all()  # a background alone is "no face"


def test_poses_of_hand_made_landmark_sets():
    for facing, pose in (("frontal", "frontal"), ("right", "right"), ("left", "left")):
        assert align.pose_of(face(facing), facing != "frontal") == pose
    # the refined look is the square align.py's box alignment takes around the face
    x0, y0, side = faces.face_square(face("right"), "right", margin=1.25)
    m = faces.square_matrix(x0, y0, side, 64)
    out = align.apply(m, face("right"))
    assert out.min() >= 0 and out.max() <= 64


def test_geometry_of_letterbox_and_sampling_theta():
    m = faces.letterbox(200, 100, 64)
    assert np.allclose(align.apply(m, np.array([[0, 0], [200, 100]])), [[0, 16], [64, 48]])
    # sampling a canvas through theta puts canvas pixel (x, y) at view pixel m (x, y)
    canvas = torch.zeros(1, 1, 128, 128)
    canvas[0, 0, 28:32, 98:102] = 1                                 # a dot around (100, 30)
    m = faces.square_matrix(64, 0, 64, 32)                      # the top right quarter, halved
    theta = landmarks.sampling_theta(torch.as_tensor(m)[None], 128, 32).float()
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 32, 32], align_corners=False)
    view = torch.nn.functional.grid_sample(canvas, grid, align_corners=False)[0, 0]
    y, x = np.unravel_index(int(view.argmax()), (32, 32))
    assert np.allclose(align.apply(m, np.array([[100.0, 30.0]])), [[18, 15]]) and abs(x - 18) <= 1 and abs(y - 15) <= 1


def test_the_landmark_network_trains_and_reports(lm_run):
    m = json.loads((lm_run / "metrics.json").read_text())
    assert set(m["test"]) >= {"nme_frontal", "nme_profile", "pose_acc", "found", "ms_per_photo"}
    assert 0 <= m["test"]["pose_acc"] <= 1 and m["test"]["images"] == 2 * 14 * 2  # folds 9-10: 2 ids each
    assert 0 <= m["background_alone"]["found"] <= 1 and m["background_alone"]["pictures"] == m["test"]["images"]
    for f in ("config.json", "history.csv", "log.txt", "curves.png", "landmarks.png", "best.pt"):
        assert (lm_run / f).exists(), f
    assert m["test_minutes"] > 0 and f"{m['test_minutes']:.1f} of testing" in (lm_run / "log.txt").read_text()
    config = json.loads((lm_run / "config.json").read_text())
    assert config["git"] is not None and config["cpu"] == machine_state()["cpu"]  # as train.py records
    r = cli(landmarks, "--data-root", "x", "--out", lm_run)
    assert r.returncode == 2 and "already holds a landmark network" in r.stderr
    net = LandmarkNet(32)
    logits, points = net(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, len(POSES)) and points.shape == (2, 30, 2)


@pytest.fixture(scope="module")
def aligned_run(toy_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "aligned"
    train.main(smoke_args(toy_lm, out, "--loss", "arcface", "--epochs", "1"))
    return out


def test_predicted_landmarks_where_a_file_is_missing(aligned_run, lm_run, toy, toy_lm, tmp_path):
    cfp = data.load_cfp(toy_lm)
    plain = os.path.join(toy, "Data/Images/019/frontal/01.jpg")  # the toy without landmark files
    r = cli(evaluate, aligned_run, "--pair", plain, cfp.paths[0])
    assert r.returncode == 2 and "no landmark file" in r.stderr and "--landmark-net" in r.stderr
    r = cli(evaluate, aligned_run, "--pair", plain, cfp.paths[0], "--landmark-net", lm_run)
    assert r.returncode == 0, r.stderr
    assert f"{plain} predicted" in r.stdout and f"{cfp.paths[0]} given" in r.stdout
    # --align predicted: one pair scores as the fold evaluation with predicted landmarks does
    pairs, _ = cfp.pairs([9])
    a, b = cfp.paths[pairs[0, 0]], cfp.paths[pairs[0, 1]]
    r = cli(evaluate, aligned_run, "--pair", a, b, "--landmark-net", lm_run, "--align", "predicted")
    assert r.returncode == 0, r.stderr
    score = float(r.stdout.split("score ")[1].split()[0])
    args = evaluate.get_args_parser().parse_args([str(aligned_run), "--align", "predicted"])
    v = verify.Verifier(str(aligned_run), str(lm_run), predicted=True, device=torch.device("cpu"))
    bank, used = evaluate.fold_bank(args, cfp, np.unique(pairs[:, :2]), v)
    res = verify.evaluate(v.model, bank, pairs[:1], None)
    assert used["source"] == "predicted" and used["sha1"] == v.finder.source["sha1"]
    assert res["scores"][0] == pytest.approx(score, abs=1e-4)
    assert v.verify(a, b)[1] == pytest.approx(score, abs=1e-6)  # the Python face gives --pair's score
    r = cli(evaluate, aligned_run, "--folds", "9", "--landmark-net", lm_run, "--align", "predicted",
            "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "e.json").read_text())["landmarks"]
    assert 0 <= got["found_at_its_place"] <= got["found"] <= 1


def test_a_photo_with_no_face_is_one_line(aligned_run, lm_run, toy_lm, tmp_path, monkeypatch):
    cfp = data.load_cfp(toy_lm)
    blank = tmp_path / "wall.png"
    Image.new("RGB", (90, 90), (128, 128, 128)).save(blank)
    real = faces.FaceFinder.find_all
    monkeypatch.setattr(faces.FaceFinder, "find_all",  # the wall: whatever a tiny network thinks
                        lambda self, pics, chunk=64: [f[:3] + (f[3] and pic.size != (90, 90),)
                                                      for f, pic in zip(real(self, pics, chunk), pics)])
    r = cli(evaluate, aligned_run, "--pair", blank, cfp.paths[0], "--landmark-net", lm_run, "--align", "predicted")
    assert r.returncode == 2 and r.stderr == f"error: no face found in {blank}\n"
    (tmp_path / "list.txt").write_text(f"{blank} {cfp.paths[0]}\n{cfp.paths[1]} {cfp.paths[0]}\n")
    r = cli(evaluate, aligned_run, "--pairs", tmp_path / "list.txt", "--landmark-net", lm_run, "--align", "predicted")
    assert r.returncode == 1 and len(r.stdout.strip().splitlines()) == 2  # the header and the good line
    assert f"list.txt:1: no face found in {blank}" in r.stderr


def test_landmark_flags_are_checked(aligned_run, lm_run):
    r = cli(evaluate, aligned_run, "--align", "predicted")
    assert r.returncode == 2 and "--align predicted needs --landmark-net" in r.stderr
    r = cli(evaluate, aligned_run, "--landmark-net", aligned_run)
    assert r.returncode == 2 and "not a landmark network written by landmarks.py" in r.stderr


def test_training_on_a_dataset_without_landmark_files(lm_run, toy, tmp_path):
    out = tmp_path / "run"
    args = smoke_args(toy, out, "--loss", "arcface", "--epochs", "1", "--landmark-net", lm_run)
    train.main(args)
    config = json.loads((out / "config.json").read_text())
    assert args.align == "template" and config["landmarks"]["source"] == "predicted"
    assert config["landmarks"]["sha1"] == faces.FaceFinder.load(str(lm_run)).source["sha1"]
    placing = [line for line in (out / "log.txt").read_text().splitlines() if " images placed, " in line]
    assert placing and placing[-1].startswith(f"landmarks: {len(data.load_cfp(toy).paths)}/") and " eta " in placing[-1]
    # evaluated on the same dataset, the run finds its faces with the network it was trained with
    r = cli(evaluate, out, "--folds", "9", "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["landmarks"]["source"] == "predicted"


def test_predict_landmarks_replaces_the_files(lm_run, toy_lm, tmp_path):
    """--predict-landmarks: a dataset with landmark files trains on the network's landmarks instead."""
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--predict-landmarks needs --landmark-net"):
        train.main(smoke_args(toy_lm, out, "--predict-landmarks"))
    args = smoke_args(toy_lm, out, "--loss", "arcface", "--epochs", "1", "--landmark-net", lm_run,
                      "--predict-landmarks")
    train.main(args)
    config = json.loads((out / "config.json").read_text())
    assert config["landmarks"]["source"] == "predicted"  # every image, not "given for some"


class DotNet(torch.nn.Module):
    """A stand-in landmark network that sees one bright dot: every landmark on it, the pose by the half it is
    in (left half: a profile facing left), or, with constant=True, the same answer whatever it sees."""

    def __init__(self, constant=False):
        super().__init__()
        self.img_size, self.constant = 32, constant

    def forward(self, x):
        n, size = len(x), x.shape[-1]
        if self.constant:
            return torch.tensor([[0.0, 0.0, 2.0, 0.0]]).repeat(n, 1), torch.full((n, 30, 2), 0.3)
        g = x.mean(1).flatten(1).argmax(1)
        dot = torch.stack([(g % size).float() + 0.5, (g // size).float() + 0.5], 1) / size   # (n, 2) view units
        logits = torch.zeros(n, len(POSES))
        logits[torch.arange(n), torch.where(dot[:, 0] < 0.5, 2, 3)] = 5.0
        return logits, dot[:, None].repeat(1, 30, 1)


def test_the_mirrored_look_agrees_with_a_mirror_consistent_network_and_swaps_left_and_right():
    im = Image.new("RGB", (32, 32))
    im.putpixel((6, 20), (255, 255, 255))   # a dot in the left half
    m = [np.eye(3)]
    plain, flipped = faces.FaceFinder(DotNet(), flip=False), faces.FaceFinder(DotNet(), flip=True)
    (p0, q0), (p1, q1) = plain.look([im], m), flipped.look([im], m)
    assert p1[0].argmax() == POSES.index("left") and np.allclose(p0, p1, atol=1e-6)
    assert np.allclose(q0[0], q1[0], atol=1e-4) and np.allclose(q1[0][0], [6.5, 20.5])
    # a network that always says "left": its mirrored look says "right", so the two are averaged
    p, q = faces.FaceFinder(DotNet(constant=True), flip=True).look([im], m)
    assert np.isclose(p[0][2], p[0][3]) and np.isclose(p[0].sum(), 1)
    assert np.allclose(q[0], [0.5 * 32, 0.3 * 32])  # x 0.3 averaged with its mirror image 0.7; y kept


def test_profiles_are_drawn_at_their_share():
    class D:
        indices = np.arange(700)
        pose = np.array([POSES.index("frontal")] * 500 + [POSES.index("left")] * 100 + [POSES.index("right")] * 100)
    gen = torch.Generator().manual_seed(0)
    order = torch.cat([landmarks.epoch_order(D, gen) for _ in range(20)])
    assert abs((torch.as_tensor(D.pose)[order] > 1).float().mean().item() - landmarks.PROFILE_SHARE) < 0.03


def test_the_heatmap_head_reads_each_landmark_where_its_heatmap_peaks(tmp_path):
    net = LandmarkNet(64).eval()
    logits, points = net(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, len(POSES)) and points.shape == (2, 30, 2)

    class Peak(torch.nn.Module):  # every landmark's heatmap one sharp peak at row 3, column 10 of 16
        def forward(self, top):
            heat = torch.zeros(len(top), 30, *top.shape[-2:])
            heat[:, :, 3, 10] = 50.0
            return heat
    net.heat = Peak()
    _, points = net(torch.zeros(1, 3, 64, 64))
    assert torch.allclose(points[0], torch.tensor([10.5, 3.5]) / 16, atol=1e-4)  # (x, y) of the cell's centre
    # a checkpoint of a heatmap network loads as one; one of the dropped flat head is refused in one line
    path = tmp_path / "best.pt"
    torch.save({"model": LandmarkNet(32).state_dict(), "args": {"img_size": 32, "maxpool": True},
                "poses": POSES, "epoch": 1, "found_threshold": 0.5}, path)
    assert faces.FaceFinder.load(str(path)).net.img_size == 32
    torch.save({"model": {"head.weight": torch.zeros(1)}, "args": {"img_size": 32, "head": "flatten"},
                "poses": POSES, "epoch": 1}, path)
    with pytest.raises(UserError, match="a variant no longer in the code .*results/STUDIES.md"):
        faces.FaceFinder.load(str(path))



def test_refine_jitter_moves_the_refining_views_face_off_the_centre(tmp_path):
    root, points = dot_photos(tmp_path)
    d = landmarks.FaceData(Photos(root, points), np.arange(3), workers=1)
    rows = np.tile(np.arange(3), 60)

    def offsets(jitter):  # each view's face-box centre from the view's centre, in units of its side
        gen = torch.Generator().manual_seed(0)
        _, pose, target = landmarks.random_views(d, rows, 64, gen, p_empty=0.0, max_degrees=0.0, jitter=jitter)
        boxes = [align.face_box(t.numpy(), POSES[k]) for t, k in zip(target, pose)]
        return np.array([np.abs((b[:2] + b[2:]) / 2 - 0.5).max() for b in boxes])
    still, moved = offsets(0.0), offsets(0.25)
    assert 0.3 < (still < 1e-4).mean() < 0.7       # the refining half of the views: the face exactly centred
    assert (moved < 1e-4).mean() < 0.05 and ((moved > 0.1) & (moved <= 0.25 + 1e-6)).mean() > 0.1
    r = cli(landmarks, "--data-root", "x", "--out", "x", "--refine-jitter", "0.5")
    assert r.returncode == 2 and "--refine-jitter must be in [0, 0.3]" in r.stderr


def test_a_face_is_found_only_where_the_last_look_confirms_the_first():
    class Doubtful(DotNet):  # "a face" at the first look, "no face" at every later one
        calls = 0

        def forward(self, x):
            logits, points = super().forward(x)
            self.calls += 1
            if self.calls > 1:
                logits = torch.zeros_like(logits)
                logits[:, 0] = 5.0
            return logits, points
    im = Image.new("RGB", (64, 64))
    im.putpixel((20, 30), (255, 255, 255))
    assert faces.FaceFinder(DotNet(), flip=False).find([im])[0] is not None
    assert faces.FaceFinder(Doubtful(), flip=False).find([im]) == [None]
    assert faces.FaceFinder(Doubtful(), looks=1, flip=False).find([im])[0] is not None  # one look: both


def test_a_second_candidate_of_the_first_look_mends_a_first_look_taken_by_a_decoy():
    class Decoy(DotNet):  # sure of a red mark from afar and not close up; fairly sure of the white dot, the face
        def forward(self, x):
            red, white = (x[:, 0] - x[:, 1]).flatten(1), x[:, 1].flatten(1)
            has_red, has_white = red.max(1).values > 2, white.max(1).values > 0
            doubt = torch.where(has_red & has_white, 0.02, torch.where(has_white, 0.05, 0.99))
            g = torch.where(has_red, red.argmax(1), white.argmax(1))
            size = x.shape[-1]
            dot = torch.stack([(g % size).float() + 0.5, (g // size).float() + 0.5], 1) / size
            ring = 0.1 * torch.stack([torch.cos(torch.arange(30) * 0.21), torch.sin(torch.arange(30) * 0.21)], 1)
            tiny = torch.full_like(doubt, 1e-4)
            return torch.stack([doubt, 1 - doubt - 2e-4, tiny, tiny], 1).log(), dot[:, None] + ring
    im = Image.new("RGB", (64, 64))
    ImageDraw.Draw(im).rectangle([6, 6, 9, 9], fill=(255, 0, 0))        # in the top-left corner square only
    ImageDraw.Draw(im).rectangle([54, 54, 57, 57], fill=(255, 255, 255))  # in the bottom-right one only
    one = faces.FaceFinder(Decoy(), flip=False, candidates=1).find_all([im], doubt=True)[0]
    two = faces.FaceFinder(Decoy(), flip=False, candidates=2).find_all([im], doubt=True)[0]
    assert not one[3] and np.allclose(one[0].mean(0), 8, atol=3)    # the decoy, refuted close up: no face
    assert two[3] and np.allclose(two[0].mean(0), 56, atol=3)       # the second candidate: the face


def test_each_look_is_one_network_call_for_all_its_views():
    """One photo at a time, each network call pays a fixed cost (every weight read and laid out again): the first
    look's whole picture and four corner squares, each with its mirror image, go through in one call."""
    batches = []

    class Counting(DotNet):
        def forward(self, x):
            batches.append(len(x))
            return super().forward(x)
    im = Image.new("RGB", (64, 48))
    im.putpixel((20, 30), (255, 255, 255))
    faces.FaceFinder(Counting()).find([im])
    assert batches == [10, 4, 4]   # 5 views mirrored; then 2 candidates mirrored, at each of 2 closer looks


def test_a_look_without_gradients_gives_the_numbers_of_one_with_them():
    """Without gradients the stem's max-pool runs on a channels_last copy (faster on the CPU); a maximum is the
    same number in either layout, so every output is bit for bit the same, for either input layout."""
    net = LandmarkNet(32).eval()
    x = torch.randn(3, 3, 32, 32)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=layout)
        with torch.no_grad():
            fast = net(x)
        slow = [t.detach() for t in net(x)]
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))

# every data layout x where the landmarks come from: (training data, extra flags); "toy_lm" has landmark files
LAYOUTS = {
    "cfp, none": ("toy", ["--align", "none"]),
    "cfp, given": ("toy_lm", []),
    "cfp, predicted": ("toy_lm", ["--landmark-net", "LM", "--predict-landmarks"]),
    "held-out folders, none": ("folders", ["--align", "none"]),
    "held-out folders, predicted": ("folders", ["--landmark-net", "LM"]),
    "eval-root, none": ("folders", ["--align", "none", "--eval-root", "toy"]),
    "eval-root, predicted": ("folders", ["--landmark-net", "LM", "--eval-root", "toy_lm"]),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_evaluate_reproduces_the_runs_own_test_figures(case, toy, toy_lm, folders, lm_run, tmp_path):
    """evaluate.py RUN builds its images as the run's training did: the same test accuracy and AUC, exactly."""
    roots = {"toy": toy, "toy_lm": toy_lm, "folders": folders, "LM": str(lm_run)}
    root, extra = LAYOUTS[case]
    out = tmp_path / "run"
    m = train.main(smoke_args(roots[root], out, "--loss", "arcface", "--epochs", "1",
                              *[roots.get(a, a) for a in extra]))
    r = cli(evaluate, out, "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    test = json.loads((tmp_path / "e.json").read_text())["test"]
    for kind, got in m["test"].items():
        assert (test[kind]["acc"], test[kind]["auc"]) == (got["acc"], got["auc"]), (case, kind)


# ---------------------------------------------------------------------------
# Background families: training on some, testing on the others


def test_no_held_out_family_is_drawn_in_training(toy_lm, tmp_path, monkeypatch):
    import backgrounds
    drawn, real = [], backgrounds.picture
    monkeypatch.setattr(backgrounds, "picture", lambda family, *a, **k: drawn.append(family) or real(family, *a, **k))
    monkeypatch.setattr(landmarks, "test_and_report", lambda *a, **k: drawn.append("<test>"))
    out = tmp_path / "lm"
    args = landmarks.get_args_parser().parse_args(
        ["--data-root", toy_lm, "--out", str(out), "--img-size", "32", "--epochs", "1", "--batch-size", "16",
         "--val-images", "8", "--workers", "1", "--train-families", "cfp", "gradient", "texture",
         "--held-out", "text", "shapes", "noise"])
    landmarks.main(args)
    training = drawn[:drawn.index("<test>")]
    assert set(training) == {"gradient", "texture"}  # the cfp family is a mosaic of CFP pieces, never drawn
    config = json.loads((out / "config.json").read_text())
    assert config["families"] == {"train": ["cfp", "gradient", "texture"], "held_out": ["text", "shapes", "noise"]}
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert 0 < ckpt["found_threshold"] <= 1 and (out / "pr.csv").exists() and (out / "pr.png").exists()
    r = cli(landmarks, "--data-root", toy_lm, "--out", tmp_path / "x", "--train-families", "cfp", "text")
    assert r.returncode == 2 and "share text" in r.stderr and not (tmp_path / "x").exists()


def test_amp_validates_and_mines_in_bf16_and_chooses_the_threshold_in_fp32(toy_lm, tmp_path, monkeypatch):
    import utils
    looks, real_look, real_choose = [], faces.FaceFinder.look, landmarks.choose_threshold
    monkeypatch.setattr(utils, "amp_dtype", lambda device: torch.bfloat16)  # as on a CPU with fast bf16
    monkeypatch.setattr(faces.FaceFinder, "look", lambda self, *a: looks.append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")) or real_look(self, *a))
    monkeypatch.setattr(landmarks, "choose_threshold", lambda *a: looks.append("<after training>") or real_choose(*a))
    monkeypatch.setattr(landmarks, "test_and_report", lambda *a: None)  # the test's looks: as the threshold's
    args = landmarks.get_args_parser().parse_args(
        ["--data-root", toy_lm, "--out", str(tmp_path / "lm"), "--img-size", "32", "--epochs", "1", "--batch-size",
         "16", "--val-images", "8", "--workers", "1", "--found-threshold", "0.5", "--amp"])
    landmarks.main(args)
    cut = looks.index("<after training>")
    assert cut > 0 and set(looks[:cut]) == {torch.bfloat16} and set(looks[cut + 1:]) == {False}


def test_the_test_reports_held_out_families_with_frontal_and_profile_apart(lm_run):
    m = json.loads((lm_run / "metrics.json").read_text())
    assert set(m["held_out"]) == {"text", "texture"}
    for family in m["held_out"].values():
        for f in ("pasted_0.5", "pasted_0.25"):
            assert {"found", "found_frontal", "found_profile", "nme"} <= set(family[f])
        assert family["background_alone"]["pictures"] == min(500, m["test"]["images"])


def test_every_family_draws_a_picture_of_the_size_asked():
    import backgrounds
    rng = np.random.default_rng(0)
    for family in backgrounds.DRAW:
        im = backgrounds.picture(family, 37, 23, rng)
        assert im.size == (37, 23) and im.mode == "RGB" and np.asarray(im).std() > 0, family
    with pytest.raises(ValueError, match="unknown background family"):
        backgrounds.picture("sky", 8, 8, rng)


def test_precision_recall_by_threshold():
    doubt = np.array([0.1, 0.2, 0.3, 0.9])        # found where P(no face) is below the threshold
    face = np.array([True, False, True, False])
    hit = np.array([True, False, False, False])   # the third face is found, but elsewhere
    curve = metrics.precision_recall(doubt, hit, face)
    assert np.allclose(curve[:, 0], [0.15, 0.25, 0.6, 1.0])
    assert np.allclose(curve[:, 1], [1.0, 0.5, 1 / 3, 0.25]) and np.allclose(curve[:, 2], 0.5)
    assert np.allclose(curve[:, 3], [0.0, 0.5, 0.5, 1.0])


def test_the_finder_uses_its_networks_threshold(tmp_path):
    class Unsure(DotNet):  # P(no face) 0.4 at every look
        def forward(self, x):
            logits, points = super().forward(x)
            return torch.log(torch.tensor([0.4, 0.0001, 0.5999, 0.0001])).repeat(len(x), 1), points
    im = Image.new("RGB", (64, 64))
    im.putpixel((20, 30), (255, 255, 255))
    assert faces.FaceFinder(Unsure(), flip=False, threshold=0.5).find([im])[0] is not None
    assert faces.FaceFinder(Unsure(), flip=False, threshold=0.3).find([im]) == [None]
    net = LandmarkNet(32)
    args = landmarks.get_args_parser().parse_args(["--img-size", "32"])
    torch.save({"model": net.state_dict(), "args": vars(args), "epoch": 1, "poses": POSES}, tmp_path / "best.pt")
    with pytest.raises(UserError, match="no threshold for a face found: .*--test-only"):
        faces.FaceFinder.load(str(tmp_path / "best.pt"))


def test_test_only_tests_a_network_again_at_a_given_threshold(lm_run, toy_lm, tmp_path):
    import shutil
    run = tmp_path / "again"
    shutil.copytree(lm_run, run)
    r = cli(landmarks, "--data-root", toy_lm, "--out", run, "--img-size", "32", "--val-images", "8", "--workers", "1",
            "--test-only", "--found-threshold", "0.5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    # the test pictures do not depend on the training seed: another --seed meets the same ones
    figures = [{k: m[k] for k in ("pasted_0.5", "pasted_0.25", "background_alone", "held_out")}
               for m in (json.loads((folder / "metrics.json").read_text()) for folder in (lm_run, run))]
    assert figures[0] == figures[1]
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["found_threshold"] == 0.5 and ckpt["threshold_choice"]["chosen_by"] == "given"
    assert "--test-only: testing" in (run / "log.txt").read_text()
    retests = json.loads((run / "config.json").read_text())["retests"]  # the command: sys.argv, pytest's here
    assert len(retests) == 1 and retests[0]["command"].startswith("python") and retests[0]["git"]
    r = cli(landmarks, "--data-root", toy_lm, "--out", tmp_path / "none", "--test-only")
    assert r.returncode == 2 and "holds no landmark network" in r.stderr


def test_fold_evaluation_of_photos_pasted_into_a_held_out_family(aligned_run, lm_run, toy_lm, tmp_path):
    r = cli(evaluate, aligned_run, "--folds", "9", "--align", "given", "--paste", "0.5", "--paste-on", "text",
            "--json", tmp_path / "given.json")
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "given.json").read_text())["landmarks"]
    assert got["source"] == "given" and got["paste"] == 0.5 and got["paste_on"] == "text"
    assert got["found_at_its_place"] == 1.0  # the given landmarks, carried into the picture
    r = cli(evaluate, aligned_run, "--folds", "9", "--landmark-net", lm_run, "--align", "predicted", "--paste", "0.25",
            "--json", tmp_path / "predicted.json")
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "predicted.json").read_text())["landmarks"]
    assert got["source"] == "predicted" and got["paste"] == 0.25 and got["paste_on"] == "cfp"
    r = cli(evaluate, aligned_run, "--paste", "0.5")
    assert r.returncode == 2 and "--align given or predicted" in r.stderr
