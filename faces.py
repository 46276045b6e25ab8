"""Faces in any photo: the landmark network's finder, and the landmarks a run's photos get from it.

A run trained on CFP aligns every face by its landmarks (align.py). A user's photo has no landmark file, and
its face may be a small part of a larger picture. The landmark network (models.LandmarkNet, trained by
landmarks.py) looks three times, as MTCNN's cascade does: once at the whole picture, then twice at a square
around the landmarks it found. Each look also sees its view mirrored, which turns a profile facing left into
one facing right: the two answers are averaged (pose, and a profile's landmarks mirrored back).
"""
import dataclasses
import hashlib
import os
import time

import numpy as np
import torch
from PIL import Image

import align
from backgrounds import backdrop, background_pieces, backgrounds_of, paste
from images import normalise, open_image, warp
from metrics import mean_found, nme
from models import POSES, LandmarkNet
from utils import UserError, load_checkpoint, load_weights

REFINE_MARGIN = 1.3        # the square the second and third looks take around the face box (results/landmarks:
                           # margin13 against e20's 1.6)
MIRRORED = [0, 1, 3, 2]    # POSES of a mirrored view: left and right swap
FOUND = 0.5                # a face is found where P(no face) is below this at the first look and at the last,
                           # until landmarks.py chooses the network's own threshold on validation pictures
PLACE_BATCH = 64           # photos a look takes at once when a run's landmarks are placed
TILE = 0.6                 # the first look's four corner squares, as a share of the picture's longer side
CANDIDATES = 2             # views of the first look refined further, the surest of a face first: a second finds
                           # the faces a square of letters took the first look from (results/landmarks)


# ---------------------------------------------------------------------------
# Geometry: 3x3 matrices from a picture's pixels to a square view's pixels


def letterbox(w, h, size):
    """The whole w x h picture into the size x size square, aspect kept, centred."""
    s = size / max(w, h)
    return np.array([[s, 0, (size - s * w) / 2], [0, s, (size - s * h) / 2], [0, 0, 1.0]])


def square_matrix(x0, y0, side, size):
    """The square (x0, y0, side) of a picture onto the size x size view."""
    s = size / side
    return np.array([[s, 0, -x0 * s], [0, s, -y0 * s], [0, 0, 1.0]])


def tile_squares(w, h, side=None):
    """Four squares (x0, y0, side) of TILE times the picture's longer side, at its corners (overlapping)."""
    side = side or TILE * max(w, h)
    return [(x0, y0, side) for y0 in (0, h - side) for x0 in (0, w - side)]


def face_square(points, pose, margin=REFINE_MARGIN):
    """The square (x0, y0, side) around a face's landmarks, as align.py's box alignment takes it."""
    return align.square_of(align.face_box(points, pose), margin)


def iou(a, b):
    """Intersection over union of boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


# ---------------------------------------------------------------------------
# Finding a face and its landmarks in any picture


class FaceFinder:
    """The landmark network applied to whole pictures: a look at the picture letterboxed, then two looks at
    the square around the landmarks found. find(pictures) -> one (points (30, 2) in picture pixels,
    profile, pose) per picture, or None where no face is found (the first look or the last says "no face").
    flip: each look averaged with the look at its mirror image (a frontal face's landmarks are the plain
    look's: CFP marks the picture's left half)."""

    def __init__(self, net, looks=3, device="cpu", flip=True, threshold=FOUND, tiles=True, candidates=CANDIDATES):
        self.net, self.looks, self.device, self.flip, self.tiles = net.eval(), looks, device, flip, tiles
        self.size, self.threshold, self.candidates = net.img_size, threshold, candidates

    @classmethod
    def load(cls, path, device="cpu"):
        path = os.path.join(path, "best.pt") if os.path.isdir(path) else path
        ckpt = load_checkpoint(path, kind="landmarks")
        a = ckpt["args"]
        dropped = {k: a[k] for k in ("head", "refine_margin") if k in a and a[k] not in ("heatmap", REFINE_MARGIN)}
        if dropped or "lateral.0.weight" not in ckpt["model"]:  # the flat head, or another refining square
            what = dropped or "the flat head"
            raise UserError(f"{path} is a landmark network of a variant no longer in the code ({what}): use the "
                            f"commit named in results/STUDIES.md")
        if "found_threshold" not in ckpt:
            raise UserError(f"{path} has no threshold for a face found: choose one on validation pictures with "
                            f"python landmarks.py --out {os.path.dirname(path)} --test-only")
        net = LandmarkNet(a["img_size"], maxpool=a["maxpool"])
        load_weights(net, ckpt["model"], path)
        finder = cls(net.to(device), device=device, threshold=ckpt["found_threshold"])
        with open(path, "rb") as f:
            finder.source = {"network": os.path.abspath(path), "sha1": hashlib.sha1(f.read()).hexdigest()}
        return finder

    @torch.no_grad()
    def look(self, pictures, matrices):
        x = torch.stack([torch.from_numpy(np.asarray(warp(im, m, self.size)).copy()).permute(2, 0, 1)
                         for im, m in zip(pictures, matrices)])
        x = normalise(x.to(self.device).float() / 255)
        logits, points = self.net(torch.cat([x, x.flip(-1)]) if self.flip else x)
        probs, points = logits.float().softmax(1).cpu().numpy(), points.float().cpu().numpy()
        if self.flip:  # the mirrored view: a profile facing left faces right there, and its points mirror back
            n = len(x)
            probs = (probs[:n] + probs[n:][:, MIRRORED]) / 2
            back = points[n:] * [-1, 1] + [1, 0]
            profile = probs[:, 2:].sum(1) > probs[:, 1]
            points = np.where(profile[:, None, None], (points[:n] + back) / 2, points[:n])
        points = points * self.size
        return probs, [align.apply(np.linalg.inv(m), p) for m, p in zip(matrices, points)]

    def refined(self, matrix, points, pose):
        """The next look: the square around the landmarks found, unless they are no face's (the last look kept)."""
        x0, y0, side = face_square(points, pose)
        if not (np.isfinite([x0, y0, side]).all() and side * matrix[0, 0] > 4):  # at least 4 view pixels
            return matrix
        return square_matrix(x0, y0, side, self.size)

    def find(self, pictures, chunk=64):
        """-> per picture (points, profile, pose) or None where no face is found."""
        return [f[:3] if f[3] else None for f in self.find_all(pictures, chunk)]

    def find_all(self, pictures, chunk=64, doubt=False):
        """-> per picture (points, profile, pose, found): the landmarks are the best guess even where no
        face was found; with doubt, also the larger P(no face) of the first look and the last."""
        out = []
        for i in range(0, len(pictures), chunk):
            out += self._find(pictures[i:i + chunk])
        return out if doubt else [f[:4] for f in out]

    def first_look(self, pictures):
        """The whole picture, and with tiles the four squares of TILE times its longer side at its corners (each
        face up to 0.2 of the side lies whole in one, seen twice as large). -> the `candidates` views of each
        picture most sure of a face, surest first: (their picture's index, matrices, probabilities, points)."""
        matrices = [[letterbox(*im.size, self.size)] +
                    [square_matrix(*square, self.size) for square in (tile_squares(*im.size) if self.tiles else [])]
                    for im in pictures]
        views = len(matrices[0])  # in one network call: each call pays a fixed cost (every weight read and laid out)
        probs, points = self.look([im for im in pictures for _ in range(views)], [m for ms in matrices for m in ms])
        probs = probs.reshape(len(pictures), views, -1)
        points = [points[i * views:(i + 1) * views] for i in range(len(pictures))]
        keep = [(i, int(k)) for i, p in enumerate(probs)
                for k in np.argsort(p[:, 0], kind="stable")[:self.candidates]]
        return (np.array([i for i, _ in keep]), [matrices[i][k] for i, k in keep],
                np.array([probs[i][k] for i, k in keep]), [points[i][k] for i, k in keep])

    def _find(self, pictures):
        """Each candidate view refined by the looks that follow; a picture's face is its candidate whose doubt
        (the larger P(no face) of its first look and its last) is least."""
        rows, matrices, probs, points = self.first_look(pictures)
        doubt = probs[:, 0]
        for _ in range(self.looks - 1):
            poses = [POSES[1 + int(p[1:].argmax())] for p in probs]
            matrices = [self.refined(m, q, pose) for m, q, pose in zip(matrices, points, poses)]
            probs, points = self.look([pictures[i] for i in rows], matrices)
        doubt = np.maximum(doubt, probs[:, 0])  # the close look confirms it: half the false faces go
        best = [min(np.flatnonzero(rows == i), key=lambda c: doubt[c]) for i in range(len(pictures))]
        poses = [POSES[1 + int(probs[c][1:].argmax())] for c in best]
        return [(points[c], pose != "frontal", pose, bool(doubt[c] < self.threshold), float(doubt[c]))
                for c, pose in zip(best, poses)]


# ---------------------------------------------------------------------------
# A run's photos: their landmarks placed once, or each found as --pair finds it


def prepare(cfp, a, log, needed=None):
    """Where a run's faces get their landmarks: the dataset's files or, for images without them (every image
    with --predict-landmarks), the run's landmark network, a: the run's arguments. needed: only these images'
    are wanted (an evaluation), placed in the same batches as in training, so that they come out the same.
    -> (the dataset with those landmarks, the record for config.json)."""
    todo = np.arange(len(cfp.paths)) if cfp.landmarks is None or a["predict_landmarks"] else \
        np.flatnonzero(np.isnan(cfp.landmarks).any((1, 2)))
    if not len(todo) or not a["landmark_net"] or a["align"] == "none":
        return cfp, {"source": "none" if cfp.landmarks is None else "given" if not len(todo) else "given for some"}
    finder, t, n = FaceFinder.load(a["landmark_net"]), time.time(), len(todo)
    if needed is not None:  # the batches of `todo` that hold a needed image, whole
        batches = np.unique(np.flatnonzero(np.isin(todo, needed)) // PLACE_BATCH)
        todo = np.concatenate([todo[b * PLACE_BATCH:(b + 1) * PLACE_BATCH] for b in batches] or [todo[:0]])
    cfp, missed = place(cfp, todo, finder, log)
    log(f"landmarks: predicted for {len(todo)} images by {a['landmark_net']} in {time.time() - t:.0f}s; "
        f"no face found in {len(missed)} (their best guess kept){': ' + ', '.join(missed[:3]) if missed else ''}")
    return cfp, {"source": "predicted" if n == len(cfp.paths) else f"predicted for {n} images",
                 **finder.source, "no_face_found": len(missed)}


def place(cfp, todo, finder, log, chunk=4 * PLACE_BATCH):
    """The landmark network run once over the images `todo`, a chunk of photos in memory at a time, with
    progress. -> (a copy of cfp with those images' landmarks and, for identity folders, whose pose CFP's
    folders do not tell, their poses; the paths where no face was found, their best guess kept)."""
    landmarks = np.full((len(cfp.paths), align.NUM_POINTS, 2), np.nan) if cfp.landmarks is None else \
        cfp.landmarks.copy()
    profile, missed, t = cfp.profile.copy(), [], time.time()
    for start in range(0, len(todo), chunk):
        rows = todo[start:start + chunk]
        pictures = [open_image(cfp.paths[i]) for i in rows]
        for i, (points, is_profile, _, ok) in zip(rows, finder.find_all(pictures, PLACE_BATCH)):
            landmarks[i] = points
            if cfp.layout == "folders":
                profile[i] = is_profile
            if not ok:
                missed.append(cfp.paths[i])
        done, seconds = start + len(rows), time.time() - t
        log(f"landmarks: {done}/{len(todo)} images placed, {seconds:.0f}s, "
            f"eta {seconds / done * (len(todo) - done):.0f}s")
    return dataclasses.replace(cfp, landmarks=landmarks, profile=profile), missed


def align_photos(cfp, indices, finder, aligner, size, fraction=None, family="cfp", seed=0, chunk=64):
    """CFP photos aligned as a user's photo is, by the landmark network's landmarks (finder None: by the given
    ones); with fraction, each photo first pasted into a picture 1/fraction its size on a background of the
    family, the given landmarks moved with it. -> (uint8 (N, 3, size, size), what was found: the share of photos
    whose face was found where the given landmarks put it (face boxes' IoU >= 0.5))"""
    rng = np.random.default_rng(seed)
    given = cfp.landmarks is not None  # where the faces really are, to tell whether each was found there
    true_pose = [align.pose_of(cfp.landmarks[i], cfp.profile[i]) for i in indices] if given else None
    pieces = backgrounds_of(cfp, indices, rng) if fraction is not None and family == "cfp" else None
    out = torch.empty(len(indices), 3, size, size, dtype=torch.uint8)
    found, located = [], []
    for k in range(0, len(indices), chunk):
        rows = indices[k:k + chunk]
        pictures, moved = [open_image(cfp.paths[i]) for i in rows], [np.eye(3)] * len(rows)
        if fraction is not None:
            pictures, moved = zip(*[paste(im, fraction, family, rng, pieces) for im in pictures])
        true = [align.apply(m, cfp.landmarks[i]) for m, i in zip(moved, rows)] if given else None
        # one photo a look, as --pair looks at a photo: kernels that differ with the batch size would move the
        # landmarks by hundredths of a pixel, enough to move a score in its third decimal
        faces = finder.find_all(pictures, chunk=1) if finder is not None else \
            [(p, bool(cfp.profile[i]), pose, True) for p, i, pose in zip(true, rows, true_pose[k:k + chunk])]
        for j, (im, (points, profile, pose, ok)) in enumerate(zip(pictures, faces)):
            out[k + j] = torch.from_numpy(np.asarray(warp(im, aligner.matrix(points, profile, size), size)).copy()
                                          ).permute(2, 0, 1)
            found.append(ok)
            if given:
                located.append(ok and iou(align.face_box(points, pose), align.face_box(true[j], true_pose[k + j]))
                               >= 0.5)
    source = {"source": "predicted", **finder.source} if finder is not None else {"source": "given"}
    pasted = {"paste": fraction, "paste_on": family} if fraction is not None else {}
    return out, {**source, **pasted, "found": float(np.mean(found)),
                 "found_at_its_place": float(np.mean(located)) if given else None}


def build_aligner(args, cfp, train_images, resume=None):
    """--align resolved against the dataset, and the Aligner it asks for (None for --align none). Template
    alignment takes its templates from the training faces (or, resuming, from the checkpoint)."""
    missing = cfp.landmarks is None or np.isnan(cfp.landmarks).any()
    if args.align is None:
        args.align = "template" if not missing or args.landmark_net else "none"
    if args.align == "none":
        return None
    if missing:
        raise UserError(f"--align {args.align}: {args.data_root} has no Data/Fiducials landmark files for some "
                        f"or all of its images; use --align none, or --landmark-net RUN to predict them")
    if resume and resume["aligner"]:
        return align.Aligner(**resume["aligner"])
    try:
        return align.Aligner.fit(args.align, cfp.landmarks[train_images], cfp.profile[train_images])
    except ValueError as e:  # a template needs faces of its pose among the training images
        raise UserError(f"--align {args.align}: {e} among the training images of {args.data_root}; "
                        f"use --align box") from None


# ---------------------------------------------------------------------------
# How well a finder finds: CFP photos as they are, pasted into larger pictures, and pictures without a face


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


def found_in_pasted(finder, cfp, indices, fraction, family="cfp"):
    """Each photo pasted into a picture 1/fraction its size on a background of the family (cfp: pieces of the
    photos themselves): the share of pictures in which the face box found overlaps the given one by IoU >= 0.5,
    of all photos and of frontal and profile ones apart, and the NME there."""
    rng = np.random.default_rng(0)  # the same pictures for every network
    pictures = [open_image(cfp.paths[i]) for i in indices]
    poses = [align.pose_of(cfp.landmarks[i], cfp.profile[i]) for i in indices]
    pieces = background_pieces(pictures, cfp.landmarks[indices], poses) if family == "cfp" else None
    hits, errors = [], []
    for k in range(0, len(indices), 64):
        batch = [paste(im, fraction, family, rng, pieces) for im in pictures[k:k + 64]]
        found = finder.find([b[0] for b in batch])
        for (_, m), f, i, pose in zip(batch, found, indices[k:k + 64], poses[k:k + 64]):
            true = align.apply(m, cfp.landmarks[i])
            ok = f is not None and iou(align.face_box(f[0], f[2]), align.face_box(true, pose)) >= 0.5
            hits.append(ok)
            errors.append(nme(f[0][None], true[None], [pose])[0] if f is not None else np.nan)
    hits, profile = np.array(hits), cfp.profile[indices]
    return {"found": float(hits.mean()), "found_frontal": float(hits[~profile].mean()) if (~profile).any() else None,
            "found_profile": float(hits[profile].mean()) if profile.any() else None, "nme": mean_found(errors)}


def found_in_backgrounds(finder, cfp, indices, family="cfp"):
    """Pictures with no face of the family, each the size of one of the photos: the share in which a face is
    found anyway (false faces)."""
    rng = np.random.default_rng(0)  # the same pictures for every network
    pieces = backgrounds_of(cfp, indices, rng) if family == "cfp" else None
    sizes = [Image.open(cfp.paths[i]).size for i in indices]
    found = []
    for k in range(0, len(sizes), 64):
        pictures = [backdrop(family, w, h, rng, pieces) for w, h in sizes[k:k + 64]]
        found += [f is not None for f in finder.find(pictures)]
    return {"found": float(np.mean(found)), "pictures": len(found)}


def test_held_out(finder, cfp, test, args):
    """The finder on background families it never trained on: --held-out-images test photos pasted at 1/2 and
    1/4 into pictures of each family, and as many pictures of the family alone. Like every test picture, they
    are drawn with seed 0 whatever --seed trained the network, so that two trainings meet the same pictures."""
    some = np.sort(np.random.default_rng(0).permutation(test)[:args.held_out_images])
    return {family: {"pasted_0.5": found_in_pasted(finder, cfp, some, 0.5, family),
                     "pasted_0.25": found_in_pasted(finder, cfp, some, 0.25, family),
                     "background_alone": found_in_backgrounds(finder, cfp, some, family)}
            for family in args.held_out}
