"""Train the landmark network (models.LandmarkNet) that faces.py finds faces with, from CFP alone.

From the training identities' photos, each pasted at a random place, scale and angle on a background cut from
other photos (or a background alone: "no face"), it learns the face's pose (frontal, profile facing left or
right) and CFP's 30 landmarks. It is tested on the test identities' photos as they are, pasted into larger
pictures, and on pictures of backgrounds alone.

    python landmarks.py --data-root cfp-dataset --out runs/landmarks     # train on the seed split's folds 1-6
    python evaluate.py RUN --landmark-net runs/landmarks --align predicted   # the cost of predicted landmarks
    python evaluate.py RUN --landmark-net runs/landmarks --pair A.jpg B.jpg  # any two photos
"""
import argparse
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import align
from data import load_cfp, split_folds
from faces import REFINE_MARGIN, FaceFinder, iou, letterbox
from images import color_jitter, decode_image, mosaic, normalise, open_image
from models import POSES, LandmarkNet
from utils import (DataError, Logger, Progress, UserError, amp_autocast, amp_dtype, atomic_save, channels_last,
                   git_state, lr_lambda, run_cli, write_history, write_json)

CANVAS = 128        # training photos are decoded once, letterboxed into CANVAS x CANVAS
PATCH = 32          # background patches, cut from the corners of photos, outside their faces
FACE_SCALE = (0.12, 0.85)  # a training face's box side, as a fraction of the view's side
REFINE_JITTER = 0.2        # how far off a refining look's training views put the face (0.08 before --refine-jitter)
PROFILE_SHARE = 0.5        # profiles' share of the training views (CFP has 2/7; results/landmarks, heatmap_e18_p05)


# ---------------------------------------------------------------------------
# Geometry and measures


def sampling_theta(matrix, size_in, size_out):
    """(..., 3, 3) picture->view pixel matrices -> (..., 2, 3) affine_grid thetas (view -> picture, both in
    grid_sample's [-1, 1] units, align_corners=False)."""
    def unit(n):  # pixels -> [-1, 1]
        return torch.tensor([[2 / n, 0, 1 / n - 1], [0, 2 / n, 1 / n - 1], [0, 0, 1]], dtype=matrix.dtype)
    return (unit(size_in) @ torch.linalg.inv(matrix) @ torch.linalg.inv(unit(size_out)))[..., :2, :]

def mean_found(errors):
    """The mean error over the faces found (a face not found has a NaN error); NaN when none was found."""
    errors = np.asarray(errors, dtype=float)
    errors = errors[~np.isnan(errors)]
    return float(errors.mean()) if len(errors) else float("nan")


def nme(pred, true, poses):
    """Mean landmark error of each face, normalised by the side sqrt(w h) of its (given) face box."""
    box = np.stack([align.face_box(t, p) for t, p in zip(true, poses)])
    side = np.sqrt((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))
    return np.linalg.norm(pred - true, axis=2).mean(1) / side


# ---------------------------------------------------------------------------
# Training data: photos decoded once, views composed on whole batches


class FaceData:
    """A set of CFP photos letterboxed into CANVAS squares, with their landmarks, poses and face boxes in
    canvas pixels, and background patches cut from their corners."""

    def __init__(self, cfp, indices, workers=2):
        self.indices = np.asarray(indices)
        sizes = [Image.open(cfp.paths[i]).size for i in self.indices]
        boxes = [letterbox(w, h, CANVAS) for w, h in sizes]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            self.images = torch.stack(list(pool.map(lambda i, m: decode_image(cfp.paths[i], CANVAS, matrix=m),
                                                    self.indices, boxes)))              # (N, 3, C, C) uint8
        self.points = np.stack([align.apply(m, cfp.landmarks[i]) for m, i in zip(boxes, self.indices)])
        self.pose = np.array([POSES.index(align.pose_of(p, cfp.profile[i]))
                              for p, i in zip(self.points, self.indices)])
        self.valid = np.array([[m[0, 2], m[1, 2], m[0, 2] + m[0, 0] * w, m[1, 2] + m[1, 1] * h]
                               for m, (w, h) in zip(boxes, sizes)])                      # the photo's own pixels
        self.face = np.stack([align.face_box(p, POSES[k]) for p, k in zip(self.points, self.pose)])
        self.patches = corner_patches(self.images, self.valid, self.face)


def corner_patches(images, valid, faces, frac=0.3):
    """PATCH x PATCH squares from the four corners of each photo that do not reach into its face box."""
    out = []
    for img, (x0, y0, x1, y1), face in zip(images, valid, faces):
        side = frac * min(x1 - x0, y1 - y0)
        for cx, cy in ((x0, y0), (x1 - side, y0), (x0, y1 - side), (x1 - side, y1 - side)):
            if cx + side <= face[0] or cx >= face[2] or cy + side <= face[1] or cy >= face[3]:
                a, b = int(cy), int(cx)
                patch = img[:, a:a + max(1, int(side)), b:b + max(1, int(side))].float()[None]
                out.append(F.interpolate(patch, size=(PATCH, PATCH), mode="bilinear", align_corners=False)[0])
    if not out:
        raise DataError("no photo has a corner outside its face box to cut a background from")
    return torch.stack(out).to(torch.uint8)


def random_views(d, rows, size, gen, p_empty=0.15, max_degrees=20.0, margin=REFINE_MARGIN, jitter=REFINE_JITTER):
    """A batch of training views: each photo of `rows` scaled, turned and placed at random on a background
    (profiles mirrored half the time, their pose label swapped), or the background alone. The views as the
    refining looks see a face have its centre up to `jitter` of the side off the view's centre and its size
    up to 1.5 jitter off 1/margin, so that a look learns to correct a first guess that is off.
    -> (x float (n, 3, size, size) in [0, 1], pose labels (n,), points (n, 30, 2) in units of the side)."""
    n = len(rows)
    pose = torch.as_tensor(d.pose[rows])
    empty = torch.rand(n, generator=gen) < p_empty
    mirror = (torch.rand(n, generator=gen) < 0.5) & (pose != POSES.index("frontal"))
    face = torch.as_tensor(d.face[rows], dtype=torch.float64)
    side = (face[:, 2:] - face[:, :2]).max(1).values
    # half the views as the refining looks see a face (its box 1/margin of the side, near the centre),
    # half with the face anywhere, at any scale of FACE_SCALE, as the first look sees a picture
    lo, hi = map(math.log, FACE_SCALE)
    anywhere = torch.rand(n, generator=gen) < 0.5
    frac = torch.where(anywhere, torch.exp(lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)),
                       (1 + 1.5 * jitter * (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1)) / margin)
    zoom = frac * size / side
    angle = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * math.radians(max_degrees)
    f = frac[:, None]
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    centre = size * torch.where(anywhere[:, None], f / 2 + (1 - f) * u, 0.5 + jitter * (2 * u - 1))
    m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)                      # (n, 3, 3) canvas -> view
    cos, sin, flip = zoom * torch.cos(angle), zoom * torch.sin(angle), torch.where(mirror, -1.0, 1.0).double()
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = flip * cos, -sin, flip * sin, cos
    mid = (face[:, :2] + face[:, 2:]) / 2
    m[:, :2, 2] = centre - (m[:, :2, :2] @ mid[:, :, None])[:, :, 0]
    grid = F.affine_grid(sampling_theta(m, CANVAS, size).float(), [n, 3, size, size], align_corners=False)
    x = F.grid_sample(d.images[rows].float() / 255, grid, mode="bilinear", align_corners=False)
    px = (grid + 1) * CANVAS / 2                                               # (n, S, S, 2) canvas pixels
    valid = torch.as_tensor(d.valid[rows], dtype=torch.float32)[:, None, None]
    inside = ((px >= valid[..., :2]) & (px < valid[..., 2:])).all(-1) & ~empty[:, None, None]
    x = torch.where(inside[:, None], x, mosaic(d.patches, n, size, gen) / 255)
    points = torch.as_tensor(d.points[rows]) @ m[:, :2, :2].transpose(1, 2) + m[:, None, :2, 2]
    pose = torch.where(mirror, torch.tensor([0, 1, 3, 2])[pose], pose)      # a mirrored profile turns around
    pose = torch.where(empty, torch.zeros_like(pose), pose)
    return color_jitter(x, 0.3, 0.1), pose, (points / size).float()


# ---------------------------------------------------------------------------
# Finding a face and its landmarks in any picture

# ---------------------------------------------------------------------------
# Pictures larger than the face: each photo pasted on a background cut from other photos


def background_picture(w, h, backgrounds, rng, tiles=4):
    """A w x h picture with no face: a mosaic of `tiles` x `tiles` pieces of the background photos."""
    picture = Image.new("RGB", (w, h))
    tw, th = math.ceil(w / tiles), math.ceil(h / tiles)
    for ty in range(tiles):
        for tx in range(tiles):
            bg = backgrounds[rng.integers(len(backgrounds))]
            picture.paste(bg.resize((tw, th), Image.BILINEAR), (tx * tw, ty * th))
    return picture


def paste(im, fraction, backgrounds, rng, tiles=4):
    """im pasted at a random place into a picture 1/fraction times its width and height, on a mosaic of
    `tiles` x `tiles` pieces of the background photos. -> (picture, matrix from im's pixels to the picture's)."""
    w, h = im.size
    W, H = round(w / fraction), round(h / fraction)
    picture = background_picture(W, H, backgrounds, rng, tiles)
    x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    picture.paste(im, (x0, y0))
    return picture, np.array([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1]])


def background_pieces(pictures, points, poses, frac=0.3):
    """Corner squares of photos that stay outside their face boxes (PIL images)."""
    out = []
    for im, p, pose in zip(pictures, points, poses):
        w, h = im.size
        face, side = align.face_box(p, pose), int(frac * min(w, h))
        for x, y in ((0, 0), (w - side, 0), (0, h - side), (w - side, h - side)):
            if x + side <= face[0] or x >= face[2] or y + side <= face[1] or y >= face[3]:
                out.append(im.crop((x, y, x + side, y + side)))
    return out


def backgrounds_of(cfp, indices, rng, n=400):
    """Background pieces (background_pieces) from n of the photos `indices`, by their given landmarks."""
    some = np.asarray(indices)[rng.choice(len(indices), min(len(indices), n), replace=False)]
    return background_pieces([open_image(cfp.paths[i]) for i in some], cfp.landmarks[some],
                             [align.pose_of(cfp.landmarks[i], cfp.profile[i]) for i in some])

# ---------------------------------------------------------------------------
# Training


def get_args_parser():
    p = argparse.ArgumentParser(description="Train the landmark network (pose + CFP's 30 landmarks) on a CFP "
                                            "protocol's training identities; validate and test on the others.")
    p.add_argument("--data-root", default=os.environ.get("CFP_ROOT", "cfp-dataset"),
                   help="CFP-layout folder with Data/Fiducials (default: $CFP_ROOT or ./cfp-dataset)")
    p.add_argument("--protocol", default="seed", choices=["seed", "10fold"],
                   help="whose training identities it learns from: train.py's folds (default: seed)")
    p.add_argument("--test-fold", type=int, default=None, help="--protocol 10fold: the test fold K")
    p.add_argument("--out", default="runs/landmarks", help="run folder (default: runs/landmarks)")
    p.add_argument("--img-size", type=int, default=64, help="the network's view, pixels (default: 64)")
    p.add_argument("--maxpool", action=argparse.BooleanOptionalAction, default=True,
                   help="the ResNet18 stem's max-pool; --no-maxpool doubles the final map's resolution at about "
                        "twice the cost (default: on)")
    p.add_argument("--refine-jitter", type=float, default=REFINE_JITTER,
                   help="the refining looks' training views: the face's centre up to this share of the view off its "
                        "centre, its size up to 1.5 times as much off 1/margin, in [0, 0.3] (default: "
                        f"{REFINE_JITTER}; 0.08, with the size 0.15 off, before the flag)")
    p.add_argument("--epochs", type=int, default=18,
                   help="epochs over the training photos (default: 18, under 10 minutes on a 2-core CPU with --amp)")
    p.add_argument("--batch-size", type=int, default=32, help="views per step (default: 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate, cosine decay (default: 2e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="train in bf16 autocast on CPUs with AVX-512-BF16 or AMX (fp32 elsewhere, with a "
                        "warning); the network is kept and evaluated in fp32 (default: off)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default: 2)")
    p.add_argument("--val-images", type=int, default=400, help="validation photos looked at per epoch (default: 400)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    return p


def check_args(args):
    for flag, value, lo in (("--img-size", args.img_size, 32), ("--epochs", args.epochs, 1),
                            ("--batch-size", args.batch_size, 2), ("--workers", args.workers, 1),
                            ("--val-images", args.val_images, 1), ("--seed", args.seed, 0)):
        if value < lo:
            raise UserError(f"{flag} must be at least {lo}, got {value}")
    for flag, value in (("--lr", args.lr), ("--weight-decay", args.weight_decay)):
        if not (math.isfinite(value) and 0 <= value < 1) or (flag == "--lr" and value == 0):
            span = "(0, 1)" if flag == "--lr" else "[0, 1)"
            raise UserError(f"{flag} must be a finite number in {span}, got {value}")
    if not (math.isfinite(args.refine_jitter) and 0 <= args.refine_jitter <= 0.3):
        raise UserError(f"--refine-jitter must be in [0, 0.3], got {args.refine_jitter}")
    if os.path.exists(os.path.join(args.out, "best.pt")) and not args.overwrite:
        raise UserError(f"--out {args.out} already holds a landmark network; choose another --out or add --overwrite")


def landmark_loss(logits, points, pose, target):
    """Pose cross-entropy plus 10 x the mean L1 landmark error (in units of the view) of the views with a face."""
    face = pose > 0
    if not face.any():
        return F.cross_entropy(logits, pose) + points.sum() * 0
    return F.cross_entropy(logits, pose) + 10 * (points[face] - target[face]).abs().mean()


def epoch_order(d, gen):
    """An epoch's photos: as many draws as photos, profiles (pose left or right) PROFILE_SHARE of them on
    average, where CFP has 2 in 7."""
    profile = torch.as_tensor(d.pose > POSES.index("frontal"))
    if profile.all() or not profile.any():
        raise DataError("the landmark network needs both frontal and profile training photos")
    weight = torch.where(profile, PROFILE_SHARE / profile.sum(), (1 - PROFILE_SHARE) / (~profile).sum())
    return torch.multinomial(weight.double(), len(d.indices), replacement=True, generator=gen)


def train_one_epoch(net, d, opt, sched, epoch, args, gen, log):
    net.train()
    cpu = torch.device("cpu")
    layout = torch.channels_last if channels_last(cpu, amp_dtype(cpu) if args.amp else None) else \
        torch.contiguous_format
    order = epoch_order(d, gen)
    steps = len(order) // args.batch_size
    meter = Progress(log, epoch - 1, args.epochs, steps, print_freq=20)
    for step in range(steps):
        rows = order[step * args.batch_size:(step + 1) * args.batch_size].numpy()
        x, pose, target = random_views(d, rows, args.img_size, gen, jitter=args.refine_jitter)
        with amp_autocast(cpu, args.amp):  # bf16 where the CPU has it, else a no-op
            logits, points = net(normalise(x).contiguous(memory_format=layout))
        loss = landmark_loss(logits.float(), points.float(), pose, target)
        if not meter.update(loss.item(), len(rows), sched.get_last_lr()[0]):
            raise UserError(f"the loss is {loss.item()} at epoch {epoch} step {step + 1}; try a lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return meter.mean


def score_photos(finder, cfp, indices):
    """The finder on CFP photos as they are: NME against the given landmarks, pose accuracy, misses."""
    pictures = [open_image(cfp.paths[i]) for i in indices]
    t = time.time()
    found = finder.find(pictures)
    seconds = time.time() - t
    true_pose = [align.pose_of(cfp.landmarks[i], cfp.profile[i]) for i in indices]
    pred = np.stack([f[0] if f else np.full((30, 2), np.nan) for f in found])
    errors = nme(pred, cfp.landmarks[indices], true_pose)
    pose_ok = np.array([f is not None and f[2] == t for f, t in zip(found, true_pose)])
    profile = cfp.profile[indices]
    return {"nme_frontal": mean_found(errors[~profile]), "nme_profile": mean_found(errors[profile]),
            "nme": errors,
            "pose_acc": float(pose_ok.mean()), "found": float(np.mean([f is not None for f in found])),
            "images": len(indices), "ms_per_photo": 1000 * seconds / len(indices)}, pictures, pred


def found_in_pasted(finder, cfp, indices, fraction, seed=0):
    """Each photo pasted into a picture 1/fraction its size on a background from the other photos: the share
    of pictures in which the face box found overlaps the given one by IoU >= 0.5, and the NME there."""
    rng = np.random.default_rng(seed)
    pictures = [open_image(cfp.paths[i]) for i in indices]
    poses = [align.pose_of(cfp.landmarks[i], cfp.profile[i]) for i in indices]
    pieces = background_pieces(pictures, cfp.landmarks[indices], poses)
    hits, errors = [], []
    for k in range(0, len(indices), 64):
        batch = [paste(im, fraction, pieces, rng) for im in pictures[k:k + 64]]
        found = finder.find([b[0] for b in batch])
        for (_, m), f, i, pose in zip(batch, found, indices[k:k + 64], poses[k:k + 64]):
            true = align.apply(m, cfp.landmarks[i])
            ok = f is not None and iou(align.face_box(f[0], f[2]), align.face_box(true, pose)) >= 0.5
            hits.append(ok)
            errors.append(nme(f[0][None], true[None], [pose])[0] if f is not None else np.nan)
    return {"found": float(np.mean(hits)), "nme": mean_found(errors)}


def found_in_backgrounds(finder, cfp, indices, seed=0):
    """Pictures with no face, each a mosaic of background pieces the size of one of the photos: the share in
    which a face is found anyway (false faces)."""
    rng = np.random.default_rng(seed)
    pieces = backgrounds_of(cfp, indices, rng)
    sizes = [Image.open(cfp.paths[i]).size for i in indices]
    found = []
    for k in range(0, len(sizes), 64):
        pictures = [background_picture(w, h, pieces, rng) for w, h in sizes[k:k + 64]]
        found += [f is not None for f in finder.find(pictures)]
    return {"found": float(np.mean(found)), "pictures": len(found)}


def main(args):
    check_args(args)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfp = load_cfp(args.data_root)
    if cfp.landmarks is None:
        raise DataError(f"--data-root {args.data_root} has no Data/Fiducials landmarks to learn from")
    roles = split_folds(args.protocol, args.test_fold)
    sets = {role: cfp.images_of(folds) for role, folds in roles.items()}
    if np.intersect1d(cfp.identity[sets["train"]], cfp.identity[np.concatenate([sets["val"], sets["test"]])]).size:
        raise DataError("the training identities overlap the validation or test ones")
    os.makedirs(args.out, exist_ok=True)
    log = Logger()
    log.open(os.path.join(args.out, "log.txt"))
    dtype = amp_dtype(torch.device("cpu")) if args.amp else None
    if args.amp and dtype is None:
        log("--amp: this CPU has no fast bf16 (AVX-512-BF16 or AMX): training in fp32")
    log(f"landmarks: {len(sets['train'])} training photos (folds {roles['train']}), validation folds "
        f"{roles['val']}, test folds {roles['test']}; {args.img_size} px views")
    write_json(os.path.join(args.out, "config.json"), {
        "task": "landmarks", "command": " ".join(["python"] + sys.argv), "args": vars(args), **git_state(args.out),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "folds": roles,
        "precision": "bfloat16" if dtype else "float32"})
    t = time.time()
    d = FaceData(cfp, sets["train"], args.workers)
    val_idx = np.random.default_rng(args.seed).permutation(sets["val"])[:args.val_images]
    log(f"decoded {len(d.indices)} photos and cut {len(d.patches)} background patches in {time.time() - t:.0f}s")
    net = LandmarkNet(args.img_size, maxpool=args.maxpool)
    if channels_last(torch.device("cpu"), dtype):
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * (len(d.indices) // args.batch_size)
    warmup = min(100, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", total, warmup, overlap=True))
    history, best, t = [], math.inf, time.time()
    for epoch in range(1, args.epochs + 1):
        loss = train_one_epoch(net, d, opt, sched, epoch, args, gen, log)
        val, _, _ = score_photos(FaceFinder(net), cfp, val_idx)
        nme_val = mean_found(val.pop("nme"))
        history.append({"epoch": epoch, "train_loss": loss, "val_nme": nme_val, "val_pose_acc": val["pose_acc"],
                        "val_found": val["found"], "minutes": (time.time() - t) / 60})
        log(f"epoch {epoch} done: loss {loss:.4f}, validation NME {nme_val:.4f} (frontal {val['nme_frontal']:.4f}, "
            f"profile {val['nme_profile']:.4f}), pose accuracy {val['pose_acc']:.4f}, found {val['found']:.4f}")
        if nme_val < best:
            best = nme_val
            atomic_save({"model": net.state_dict(), "args": vars(args), "epoch": epoch, "poses": POSES,
                         "val_nme": float(nme_val)}, os.path.join(args.out, "best.pt"))
        write_history(history, os.path.join(args.out, "history.csv"))
    test_and_report(args, cfp, sets, history, time.time() - t, log)


def test_and_report(args, cfp, sets, history, train_seconds, log):
    """The best epoch's network on the test identities' photos: as they are, and pasted into larger pictures."""
    from plots import plot_landmark_curves, plot_landmarks
    t, finder = time.time(), FaceFinder.load(os.path.join(args.out, "best.pt"))
    test, pictures, pred = score_photos(finder, cfp, sets["test"])
    test["nme"] = mean_found(test["nme"])
    pasted = {f"pasted_{f}": found_in_pasted(finder, cfp, sets["test"], f, args.seed) for f in (0.5, 0.25)}
    pasted["background_alone"] = found_in_backgrounds(finder, cfp, sets["test"], args.seed)
    best = min(history, key=lambda h: h["val_nme"])
    metrics = {"test": test, **pasted, "best_epoch": best["epoch"], "val_nme": best["val_nme"],
               "train_minutes": train_seconds / 60, "test_minutes": (time.time() - t) / 60,
               "test_folds": split_folds(args.protocol, args.test_fold)["test"]}
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    plot_landmark_curves(history, os.path.join(args.out, "curves.png"))
    show = np.random.default_rng(0).choice(len(sets["test"]), 16, replace=False)
    plot_landmarks([pictures[k] for k in show], cfp.landmarks[sets["test"][show]], pred[show],
                   [os.path.relpath(cfp.paths[sets["test"][k]], cfp.root)[12:] for k in show],
                   os.path.join(args.out, "landmarks.png"))
    log(f"best epoch {best['epoch']}; test: NME frontal {test['nme_frontal']:.4f}, profile {test['nme_profile']:.4f}, "
        f"pose accuracy {test['pose_acc']:.4f}, {test['ms_per_photo']:.1f} ms a photo; pasted at 1/2: found "
        f"{pasted['pasted_0.5']['found']:.4f}, at 1/4: {pasted['pasted_0.25']['found']:.4f}; a face found in "
        f"{pasted['background_alone']['found']:.4f} of pictures without one; "
        f"{train_seconds / 60:.1f} min of training and {metrics['test_minutes']:.1f} of testing -> {args.out}")
    return metrics


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
