"""Train the landmark network (models.LandmarkNet) that faces.py finds faces with, from CFP alone.

From the training identities' photos, each pasted at a random place, scale and angle on a background of the
training families (backgrounds.py: pieces of other photos, gradients, noise, scenes of shapes, cells), or a
background alone ("no face", half of those among its own false faces once it makes some), it learns the face's pose
(frontal, profile facing left or right) and CFP's 30 landmarks. The threshold for a face found is chosen on a
precision/recall curve of validation pictures. It is tested on the test identities' photos as they are, pasted
into larger pictures and on backgrounds alone, of the training families and of held-out ones (text, textures).

    python landmarks.py --data-root cfp-dataset --out runs/landmarks     # train on the seed split's folds 1-6
    python landmarks.py --out runs/landmarks --test-only                 # test it again (a new threshold too)
    python evaluate.py RUN --landmark-net runs/landmarks --align predicted   # the cost of predicted landmarks
    python evaluate.py RUN --landmark-net runs/landmarks --pair A.jpg B.jpg  # any two photos
"""
import argparse
import csv
import json
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
import backgrounds
from backgrounds import backdrop, backgrounds_of, paste
from data import load_cfp, split_folds
from faces import (REFINE_MARGIN, FaceFinder, face_square, found_in_backgrounds, found_in_pasted, iou, letterbox,
                   score_photos, square_matrix, test_held_out)
from images import color_jitter, decode_image, mosaic, normalise, open_image, warp
from metrics import mean_found, precision_recall
from models import POSES, LandmarkNet
from utils import (DataError, Logger, Progress, UserError, amp_autocast, amp_dtype, atomic_save, atomic_write,
                   channels_last, git_state, load_checkpoint, load_weights, lr_lambda, machine_state, run_cli,
                   write_history, write_json)

CANVAS = 128        # training photos are decoded once, letterboxed into CANVAS x CANVAS
PATCH = 32          # background patches, cut from the corners of photos, outside their faces
FACE_SCALE = (0.12, 0.85)  # a training face's box side, as a fraction of the view's side (smaller faces are
                           # seen twice as large by the first look's tiles, faces.TILE; 0.06 found fewer)
DRAWN = 1024               # pictures of the drawn background families kept for the views; a quarter new each epoch
HARD = 1024                # the most recent false faces kept as "no face" views
MINE = 256                 # background pictures the network looks at after each epoch for its false faces
REFINE_JITTER = 0.2        # how far off a refining look's training views put the face (0.08 before --refine-jitter)
PROFILE_SHARE = 0.5        # profiles' share of the training views (CFP has 2/7; results/landmarks, heatmap_e18_p05)


# ---------------------------------------------------------------------------
# Geometry


def sampling_theta(matrix, size_in, size_out):
    """(..., 3, 3) picture->view pixel matrices -> (..., 2, 3) affine_grid thetas (view -> picture, both in
    grid_sample's [-1, 1] units, align_corners=False)."""
    def unit(n):  # pixels -> [-1, 1]
        return torch.tensor([[2 / n, 0, 1 / n - 1], [0, 2 / n, 1 / n - 1], [0, 0, 1]], dtype=matrix.dtype)
    return (unit(size_in) @ torch.linalg.inv(matrix) @ torch.linalg.inv(unit(size_out)))[..., :2, :]


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
        self.pieces = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in self.patches]  # the cfp family's
        self.drawn = self.hard = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        self.drawn_share = 0.0

    def draw_backgrounds(self, families, size, rng, n=DRAWN):
        """Pictures of the drawn families (not cfp) for the views' backgrounds: DRAWN of them at first, then a
        quarter replaced at each call; the share of views that take one is theirs of the families."""
        drawn = [f for f in families if f != "cfp"]
        self.drawn_share = len(drawn) / len(families)
        if not drawn:
            return
        fresh = torch.from_numpy(np.stack([drawn_view(drawn[k % len(drawn)], size, rng)
                                           for k in range(n if len(self.drawn) < n else n // 4)]))
        self.drawn = torch.cat([self.drawn[len(fresh):], fresh]) if len(self.drawn) == n else fresh


def drawn_view(family, size, rng):
    """A picture of the family drawn at 1 to 3 times the view's side, as a view of a larger picture sees it:
    uint8 (3, size, size)."""
    side = int(size * rng.uniform(1, 3))
    return np.asarray(backgrounds.picture(family, side, side, rng).resize((size, size), Image.BILINEAR)
                      ).transpose(2, 0, 1)


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


def random_views(d, rows, size, gen, p_empty=0.25, max_degrees=20.0, margin=REFINE_MARGIN, jitter=REFINE_JITTER):
    """A batch of training views: each photo of `rows` scaled, turned and placed at random on a background of
    the training families (profiles mirrored half the time, their pose label swapped), or a background alone,
    half of those among the network's own false faces once there are some. The views as the
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
    x = torch.where(inside[:, None], x, backdrop_views(d, n, size, empty, gen))
    points = torch.as_tensor(d.points[rows]) @ m[:, :2, :2].transpose(1, 2) + m[:, None, :2, 2]
    pose = torch.where(mirror, torch.tensor([0, 1, 3, 2])[pose], pose)      # a mirrored profile turns around
    pose = torch.where(empty, torch.zeros_like(pose), pose)
    return color_jitter(x, 0.3, 0.1), pose, (points / size).float()


def backdrop_views(d, n, size, empty, gen):
    """The views' backgrounds: a mosaic of CFP pieces (the cfp family), or a picture of a drawn family at its
    share; a view without a face is one of the false faces half the time. -> float (n, 3, size, size) in [0, 1]."""
    bg = mosaic(d.patches, n, size, gen) / 255
    for pictures, use in ((d.drawn, torch.rand(n, generator=gen) < d.drawn_share),
                          (d.hard, empty & (torch.rand(n, generator=gen) < 0.5))):
        if len(pictures) and use.any():
            pick = torch.randint(len(pictures), (n,), generator=gen)
            bg = torch.where(use[:, None, None, None], pictures[pick].float() / 255, bg)
    return bg


def mine_false_faces(d, net, families, size, rng, n=MINE):
    """The network's false faces on n new pictures without a face: each such picture as the first look sees
    it (letterboxed) and as the last look does (the square around the face found), kept among d.hard."""
    finder = FaceFinder(net)
    pictures = [backdrop(families[k % len(families)], *map(int, rng.integers(size, 8 * size, 2)), rng, d.pieces)
                for k in range(n)]
    views = []
    for im, (points, _, pose, found) in zip(pictures, finder.find_all(pictures)):
        if found:
            square = face_square(points, pose)
            for m in (letterbox(*im.size, size), square_matrix(*square, size) if square[2] > 0 else None):
                if m is not None and np.isfinite(m).all():
                    views.append(np.asarray(warp(im, m, size)).transpose(2, 0, 1))
    if views:
        views = torch.from_numpy(np.stack(views))
        d.hard = (torch.cat([d.hard, views]) if len(d.hard) else views)[-HARD:]
    return len(views)


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
    p.add_argument("--epochs", type=int, default=21,
                   help="epochs over the training photos (default: 21, 17 minutes on a 2-core CPU with --amp)")
    p.add_argument("--batch-size", type=int, default=32, help="views per step (default: 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate, cosine decay (default: 2e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="train, validate and mine in bf16 autocast on CPUs with AVX-512-BF16 or AMX (fp32 "
                        "elsewhere, with a warning); the network is kept, and its threshold chosen and tested, in "
                        "fp32 (default: off)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default: 2)")
    p.add_argument("--val-images", type=int, default=400, help="validation photos looked at per epoch (default: 400)")
    p.add_argument("--held-out", nargs="+", default=list(backgrounds.HELD_OUT_FAMILIES),
                   choices=backgrounds.FAMILIES, metavar="FAMILY",
                   help="background families (backgrounds.py) the test pastes photos into, kept out of training "
                        f"(default: {' '.join(backgrounds.HELD_OUT_FAMILIES)})")
    p.add_argument("--held-out-images", type=int, default=500,
                   help="test photos pasted into each held-out family, at 1/2 and 1/4 (default: 500)")
    p.add_argument("--train-families", nargs="+", default=list(backgrounds.TRAIN_FAMILIES),
                   choices=backgrounds.FAMILIES, metavar="FAMILY",
                   help="background families the training views are drawn on (default: "
                        f"{' '.join(backgrounds.TRAIN_FAMILIES)})")
    p.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="after each epoch, keep the network's false faces on new background pictures as views "
                        "without a face (default: on)")
    p.add_argument("--found-threshold", type=float, default=None,
                   help="a face is found where P(no face) is below this at the first look and the last "
                        "(default: the best F1 on validation pictures)")
    p.add_argument("--test-only", action="store_true",
                   help="test the network already in --out again, as the code now tests (default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    return p


def check_args(args):
    for flag, value, lo in (("--img-size", args.img_size, 32), ("--epochs", args.epochs, 1),
                            ("--batch-size", args.batch_size, 2), ("--workers", args.workers, 1),
                            ("--val-images", args.val_images, 1), ("--seed", args.seed, 0),
                            ("--held-out-images", args.held_out_images, 1)):
        if value < lo:
            raise UserError(f"{flag} must be at least {lo}, got {value}")
    for flag, value in (("--lr", args.lr), ("--weight-decay", args.weight_decay)):
        if not (math.isfinite(value) and 0 <= value < 1) or (flag == "--lr" and value == 0):
            span = "(0, 1)" if flag == "--lr" else "[0, 1)"
            raise UserError(f"{flag} must be a finite number in {span}, got {value}")
    if not (math.isfinite(args.refine_jitter) and 0 <= args.refine_jitter <= 0.3):
        raise UserError(f"--refine-jitter must be in [0, 0.3], got {args.refine_jitter}")
    if set(args.train_families) & set(args.held_out):
        raise UserError(f"--held-out {' '.join(args.held_out)} and --train-families {' '.join(args.train_families)} "
                        f"share {' '.join(sorted(set(args.train_families) & set(args.held_out)))}: a held-out family "
                        f"is one the network never trained on")
    if args.found_threshold is not None and not 0 < args.found_threshold <= 1:
        raise UserError(f"--found-threshold must be in (0, 1], got {args.found_threshold}")
    if args.test_only and not os.path.isfile(os.path.join(args.out, "best.pt")):
        raise UserError(f"--test-only: {args.out} holds no landmark network (best.pt)")
    if os.path.exists(os.path.join(args.out, "best.pt")) and not (args.overwrite or args.test_only):
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


def main(args):
    check_args(args)
    torch.manual_seed(args.seed)
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
    if args.test_only:
        return test_again(args, cfp, sets, log)
    dtype = amp_dtype(torch.device("cpu")) if args.amp else None
    if args.amp and dtype is None:
        log("--amp: this CPU has no fast bf16 (AVX-512-BF16 or AMX): training in fp32")
    log(f"landmarks: {len(sets['train'])} training photos (folds {roles['train']}), validation folds "
        f"{roles['val']}, test folds {roles['test']}; {args.img_size} px views")
    write_json(os.path.join(args.out, "config.json"), {
        "task": "landmarks", "command": " ".join(["python"] + sys.argv), "args": vars(args), **git_state(args.out),
        **machine_state(), "folds": roles,
        "families": {"train": args.train_families, "held_out": args.held_out},
        "precision": "bfloat16" if dtype else "float32"})
    history, seconds = train_network(args, cfp, sets, dtype, log)
    choose_threshold(args, cfp, sets["val"], log)
    test_and_report(args, cfp, sets, history, seconds, log)


def train_network(args, cfp, sets, dtype, log):
    """The epochs: best.pt is the epoch with the lowest validation NME. -> (history, seconds)"""
    gen, rng = torch.Generator().manual_seed(args.seed), np.random.default_rng(args.seed)
    t = time.time()
    d = FaceData(cfp, sets["train"], args.workers)
    d.draw_backgrounds(args.train_families, args.img_size, rng)
    val_idx = np.random.default_rng(args.seed).permutation(sets["val"])[:args.val_images]
    log(f"decoded {len(d.indices)} photos and cut {len(d.patches)} background patches, drew {len(d.drawn)} "
        f"background pictures of {', '.join(args.train_families)} in {time.time() - t:.0f}s")
    net = LandmarkNet(args.img_size, maxpool=args.maxpool)
    if channels_last(torch.device("cpu"), dtype):
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * (len(d.indices) // args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", total, min(100, total // 10 + 1), overlap=True))
    history, best, t = [], math.inf, time.time()
    for epoch in range(1, args.epochs + 1):
        loss = train_one_epoch(net, d, opt, sched, epoch, args, gen, log)
        with amp_autocast(torch.device("cpu"), args.amp):  # the steps' precision, as train.py validates
            val, _, _ = score_photos(FaceFinder(net), cfp, val_idx)
            mined = mine_false_faces(d, net, args.train_families, args.img_size, rng) if args.hard_negatives else 0
        nme_val = mean_found(val.pop("nme"))
        d.draw_backgrounds(args.train_families, args.img_size, rng)
        history.append({"epoch": epoch, "train_loss": loss, "val_nme": nme_val, "val_pose_acc": val["pose_acc"],
                        "val_found": val["found"], "false_face_views": mined, "minutes": (time.time() - t) / 60})
        log(f"epoch {epoch} done: loss {loss:.4f}, validation NME {nme_val:.4f} (frontal {val['nme_frontal']:.4f}, "
            f"profile {val['nme_profile']:.4f}), pose accuracy {val['pose_acc']:.4f}, found {val['found']:.4f}; "
            f"{mined} false-face views mined from {MINE if args.hard_negatives else 0} pictures")
        if nme_val < best:
            best = nme_val
            atomic_save({"model": net.state_dict(), "args": vars(args), "epoch": epoch, "poses": POSES,
                         "val_nme": float(nme_val)}, os.path.join(args.out, "best.pt"))
        write_history(history, os.path.join(args.out, "history.csv"))
    return history, time.time() - t


def threshold_pictures(cfp, indices, families, seed):
    """Validation pictures for the found threshold: each photo pasted at 1/2 or 1/4 into a picture of a
    training family, and as many pictures of those families alone. -> (pictures, true face box or None)"""
    rng = np.random.default_rng(seed + 1)
    photos = [open_image(cfp.paths[i]) for i in indices]
    pieces = backgrounds_of(cfp, indices, rng) if "cfp" in families else None
    pictures, boxes = [], []
    for k, (im, i) in enumerate(zip(photos, indices)):
        picture, m = paste(im, (0.5, 0.25)[k % 2], families[k % len(families)], rng, pieces)
        pictures.append(picture)
        boxes.append(align.face_box(align.apply(m, cfp.landmarks[i]), align.pose_of(cfp.landmarks[i], cfp.profile[i])))
    for k, im in enumerate(photos):
        pictures.append(backdrop(families[k % len(families)], *im.size, rng, pieces))
        boxes.append(None)
    return pictures, boxes


def choose_threshold(args, cfp, val, log):
    """The found threshold with the best F1 on validation pictures (as many with a face as without), or
    --found-threshold; kept in best.pt, the curve in pr.csv and pr.png."""
    from plots import plot_precision_recall
    path = os.path.join(args.out, "best.pt")
    ckpt = load_checkpoint(path, kind="landmarks")
    net = LandmarkNet(args.img_size, maxpool=args.maxpool)
    load_weights(net, ckpt["model"], path)
    some = np.sort(np.random.default_rng(args.seed).permutation(val)[:args.val_images])
    pictures, boxes = threshold_pictures(cfp, some, args.train_families, args.seed)
    found = FaceFinder(net).find_all(pictures, doubt=True)
    doubt = np.array([f[4] for f in found])
    face = np.array([b is not None for b in boxes])
    hit = np.array([b is not None and iou(align.face_box(f[0], f[2]), b) >= 0.5 for f, b in zip(found, boxes)])
    curve = precision_recall(doubt, hit, face)
    f1 = 2 * curve[:, 1] * curve[:, 2] / np.maximum(curve[:, 1] + curve[:, 2], 1e-9)
    best = int(np.argmax(f1))
    threshold = args.found_threshold if args.found_threshold is not None else float(curve[best, 0])
    k = min(int(np.searchsorted(curve[:, 0], threshold)), len(curve) - 1)
    chosen = {"found_threshold": threshold, "precision": float(curve[k, 1]), "recall": float(curve[k, 2]),
              "false_faces": float(curve[k, 3]), "pictures": len(pictures), "families": args.train_families,
              "chosen_by": "given" if args.found_threshold is not None else "best F1 on validation pictures"}
    atomic_save({**ckpt, "found_threshold": threshold, "threshold_choice": chosen}, path)
    atomic_write(os.path.join(args.out, "pr.csv"), "threshold,precision,recall,false_faces\n"
                 + "".join(",".join(f"{v:.6g}" for v in row) + "\n" for row in curve))
    plot_precision_recall(curve, k, os.path.join(args.out, "pr.png"))
    log(f"found threshold {threshold:.4f} ({chosen['chosen_by']}): on {len(pictures)} validation pictures, "
        f"precision {chosen['precision']:.4f}, recall {chosen['recall']:.4f}, false faces {chosen['false_faces']:.4f}")
    return chosen


def test_and_report(args, cfp, sets, history, train_seconds, log):
    """The best epoch's network on the test identities' photos: as they are, and pasted into larger pictures."""
    from plots import plot_landmark_curves, plot_landmarks
    t, finder = time.time(), FaceFinder.load(os.path.join(args.out, "best.pt"))
    test, pictures, pred = score_photos(finder, cfp, sets["test"])
    test["nme"] = mean_found(test["nme"])
    pasted = {f"pasted_{f}": found_in_pasted(finder, cfp, sets["test"], f) for f in (0.5, 0.25)}  # seed 0, always
    pasted["background_alone"] = found_in_backgrounds(finder, cfp, sets["test"])
    held_out = test_held_out(finder, cfp, sets["test"], args)
    best = min(history, key=lambda h: h["val_nme"])
    metrics = {"test": test, **pasted, "held_out": held_out, "found_threshold": finder.threshold,
               "families": {"train": args.train_families, "held_out": args.held_out},
               "best_epoch": best["epoch"], "val_nme": best["val_nme"],
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
        f"{pasted['background_alone']['found']:.4f} of pictures without one; held-out families "
        + ", ".join(f"{k}: {v['pasted_0.5']['found']:.4f} / {v['pasted_0.25']['found']:.4f}, false faces "
                    f"{v['background_alone']['found']:.4f}" for k, v in held_out.items()) + "; "
        f"{train_seconds / 60:.1f} min of training and {metrics['test_minutes']:.1f} of testing -> {args.out}")
    return metrics


def test_again(args, cfp, sets, log):
    """--test-only: the network in --out tested again; its training history and minutes are kept."""
    with open(os.path.join(args.out, "history.csv")) as f:
        history = [{**{k: float(v) for k, v in row.items()}, "epoch": int(row["epoch"])} for row in csv.DictReader(f)]
    with open(os.path.join(args.out, "metrics.json")) as f:
        minutes = json.load(f)["train_minutes"]
    log(f"--test-only: testing {args.out}/best.pt again")
    path = os.path.join(args.out, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.setdefault("retests", []).append({"command": " ".join(["python"] + sys.argv), **git_state()})
    write_json(path, config)
    choose_threshold(args, cfp, sets["val"], log)
    return test_and_report(args, cfp, sets, history, minutes * 60, log)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
