"""Verification with a trained network: embed each image once and score pairs from the features (evaluate), and
a run as a Python object (Verifier), the face that face_recognition and facenet-pytorch give their users.

    from verify import Verifier
    v = Verifier("runs/t2")                         # landmark_net="runs/landmarks" for photos of any kind
    same, score, threshold, kind = v.verify("a.jpg", "b.jpg")   # kind: FF or FP, by the photos' poses
"""
import math
import os
import time
from collections import OrderedDict

import numpy as np
import torch

from align import Aligner
from data import cfp_place, landmarks_of_photo
from faces import FaceFinder
from images import decode_image, open_image, preprocess
from models import build_model, pair_score
from utils import (DataError, UserError, all_gather_rows, amp_autocast, amp_dtype, channels_last, load_checkpoint,
                   load_weights)

EVAL_BATCH = 64  # images per batch, as train.py embeds its validation and test images


@torch.no_grad()
def extract(model, bank, indices, batch_size=EVAL_BATCH, device="cpu", tta=False, amp=False):
    """Features of dataset images `indices` -> (N, D) float32 on the CPU, in the order given, in the run's own
    precision and layout. Under torchrun every rank embeds a share and the features are gathered."""
    device = torch.device(device)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    layout = torch.channels_last if channels_last(device, amp_dtype(device) if amp else None) else \
        torch.contiguous_format
    indices = np.asarray(indices)
    mine = indices[rank::world]
    model.eval()

    def embed(idx):
        x = preprocess(bank[idx].to(device, non_blocking=True)).contiguous(memory_format=layout)
        with amp_autocast(device, amp):
            f = model(x)
            if tta:  # insightface's flip test: the mean of the image's and its mirror's features
                f = (f + model(torch.flip(x, dims=[3]))) / 2
        return f.float()

    feats = [embed(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
    if not feats:  # a rank with nothing to embed still sends rows of the feature width
        feats = [embed(indices[:1])[:0] if len(indices) else torch.zeros(0, 1, device=device)]
    feats = all_gather_rows(torch.cat(feats))
    order = np.concatenate([np.arange(len(indices))[r::world] for r in range(world)])
    out = torch.empty_like(feats)
    out[torch.as_tensor(order, device=feats.device)] = feats
    return out.cpu()


@torch.no_grad()
def score_pairs(model, feats, row, pairs, batch_size=4096):
    """Raw pair outputs from stored features: feats (N, D), row maps dataset index -> feature row.

    Arch 2 takes the cosine of two embeddings; arch 1 runs its decision network on them."""
    device = next(model.parameters()).device
    feats, row = feats.to(device), torch.as_tensor(row, device=device)
    pairs = torch.as_tensor(pairs, device=device)
    out = [model.compare(feats[row[p[:, 0]]], feats[row[p[:, 1]]])  # (B, D) each -> (B,) or (B, K)
           for p in pairs.split(batch_size)]
    return torch.cat(out).float().cpu()


def evaluate(model, bank, pairs, criterion=None, batch_size=EVAL_BATCH, device="cpu", tta=False, amp=False):
    """Scores and loss for pairs (P, 3) of dataset indices. Each unique image is embedded once."""
    indices = np.unique(pairs[:, :2])
    t = time.time()
    feats = extract(model, bank, indices, batch_size, device, tta, amp)
    row = np.full(int(indices.max()) + 1, -1)
    row[indices] = np.arange(len(indices))
    model.eval()
    out = score_pairs(model, feats, row, pairs)
    same = torch.as_tensor(pairs[:, 2])
    loss = float("nan")
    if criterion is not None and criterion.sampling == "pairs":
        loss = float(criterion(out, same))  # pair losses hold no tensors: the CPU will do
    scores = pair_score(out).numpy()
    if not np.isfinite(scores).all():
        raise UserError(f"{int((~np.isfinite(scores)).sum())} of {len(scores)} pair scores are not finite (NaN or "
                        f"infinite): the network's weights are broken; no metric is computed")
    return {"scores": scores, "labels": pairs[:, 2], "loss": loss,
            "num_embedded": len(indices) * (2 if tta else 1), "seconds": time.time() - t}


# what this code reads of a run's arguments; a run of earlier code that lacks one is refused
CKPT_ARGS = ("arch", "variation", "loss", "backbone", "maxpool", "freeze", "dropout", "img_size", "resize", "amp",
             "data_root", "eval_root", "protocol", "test_fold", "align", "landmark_net", "predict_landmarks")


def load_model(path, device):
    """Rebuild a network from its checkpoint alone (no ImageNet download: the weights are in it)."""
    path = os.path.join(path, "best.pt") if os.path.isdir(path) else path
    ckpt = load_checkpoint(path)
    missing = [k for k in CKPT_ARGS if k not in ckpt["args"]] + [k for k in ("thresholds", "aligner") if k not in ckpt]
    if missing:
        raise UserError(f"{path} was written by an earlier version (it lacks {', '.join(missing)}): evaluate it "
                        f"at the commit named in results/STUDIES.md")
    try:
        model = build_model({**ckpt["args"], "pretrained": False})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: its settings do not describe a network ({type(e).__name__}: {e})") from None
    load_weights(model, ckpt["model"], path)
    model = model.to(device).eval()
    if channels_last(device, amp_dtype(device) if ckpt["args"]["amp"] else None):
        model = model.to(memory_format=torch.channels_last)  # the layout train.py evaluated in: the same scores
    return model, ckpt


def aligner_of(ckpt):
    """The run's face alignment (None: whole images resized)."""
    return Aligner(**ckpt["aligner"]) if ckpt["aligner"] else None


class Verifier:
    """A trained run, to verify photos from Python as --pair and --pairs do from the command line.

        v = Verifier("runs/t2", landmark_net="runs/landmarks")   # the network is optional for CFP's photos
        features = v.embed(["a.jpg", "b.jpg"])                   # (2, D), as the run embeds its test faces
        same, score, threshold, kind = v.verify("a.jpg", "b.jpg")   # or kind="FF", "FP", "all"

    A photo is read as the run's network saw its test faces: aligned by its landmarks (its CFP landmark file,
    else, or with predicted=True always, the landmark network's) or resized whole. Scores equal the run's
    test_scores.csv for CFP's own pairs."""

    def __init__(self, run, landmark_net="", predicted=False, device=None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.ckpt = load_model(run, self.device)
        self.args, self.aligner, self.run = self.ckpt["args"], aligner_of(self.ckpt), run
        self.landmark_net = landmark_net or self.args["landmark_net"]  # default: the one the run trained with
        self.finder = FaceFinder.load(self.landmark_net, self.device) if self.landmark_net else None
        if self.finder is not None and self.aligner is None:
            raise UserError(f"--landmark-net: {run} resizes whole images (--align none); it uses no landmarks")
        self.predicted, self.used, self.profile, self.cache = predicted, {}, {}, FeatureCache()

    @property
    def thresholds(self):
        """The run's validation thresholds: all pairs, FF, FP."""
        return self.ckpt["thresholds"]

    def photo(self, path):
        """One photo as the run's network sees it -> (3, S, S) uint8."""
        if not os.path.isfile(path):  # a folder or a device is refused before it is opened (a FIFO would hang)
            what = "a folder" if os.path.isdir(path) else "not a regular file" if os.path.exists(path) else "missing"
            raise UserError(f"image {path} does not exist" if what == "missing" else f"image {path} is {what}")
        matrix, folder = None, cfp_place(path)[1]  # the pose its CFP folder says, if it lies in one
        self.profile[path] = folder
        if self.aligner is not None:
            points, profile = self.landmarks(path)
            matrix = self.aligner.matrix(points, profile, self.args["img_size"])
            self.profile[path] = profile if folder is None else folder  # the folder first, else the network
        return decode_image(path, self.args["img_size"], self.args["resize"], matrix)

    def landmarks(self, path):
        if not self.predicted:
            try:
                points, profile = landmarks_of_photo(path)
                self.used[path] = "given"
                return points, profile
            except DataError:
                if self.finder is None:
                    raise DataError(f"{path} has no landmark file (Data/Fiducials/.../NN.txt beside a CFP-layout "
                                    f"Data/Images/...) and no --landmark-net was given to find them") from None
        found = self.finder.find([open_image(path)])[0]
        if found is None:
            raise DataError(f"no face found in {path}")
        self.used[path] = "predicted"
        return found[0], found[1]

    def embed(self, paths):
        """Features of photos (N, D), each distinct photo embedded once and kept for later calls; a photo
        that cannot be read raises its one-line UserError."""
        got, _ = self.features(dict.fromkeys(paths))
        errors = [f for f in got.values() if isinstance(f, str)]
        if errors:
            raise UserError(errors[0])
        return torch.stack([got[p] for p in paths])

    def scores(self, pairs):
        """Scores for (a, b) photo path pairs -> (scores, images decoded now by path, {path: reason}); NaN scores
        for pairs with a photo that cannot be read."""
        got, images = self.features(dict.fromkeys(p for pair in pairs for p in pair))
        errors = {p: f for p, f in got.items() if isinstance(f, str)}
        scores = np.full(len(pairs), np.nan)
        ok = [i for i, (x, y) in enumerate(pairs) if x not in errors and y not in errors]
        if ok:
            f1, f2 = (torch.stack([got[pairs[i][c]] for i in ok]).to(self.device) for c in (0, 1))
            with torch.no_grad():
                scores[ok] = pair_score(self.model.compare(f1, f2)).float().cpu().numpy()
        return scores, images, errors

    def features(self, paths):
        """{path: its feature, or the reason it cannot be read} for distinct paths, and the images decoded now;
        the cache keeps both for later calls, but this call's answer does not depend on its size."""
        got, images = {p: self.cache.get(p) for p in paths if p in self.cache}, {}
        for p in paths:
            if p not in got:
                try:
                    images[p] = self.photo(p)
                except UserError as e:
                    got[p] = str(e)
        if images:  # the same path as the fold evaluation: the scores equal the run's test_scores.csv
            unique = list(images)
            feats = extract(self.model, torch.stack([images[p] for p in unique]), np.arange(len(unique)),
                            EVAL_BATCH, self.device, amp=self.args["amp"])
            got.update(zip(unique, feats))
        for p in paths:
            self.cache.put(p, got[p])
        return got, images

    def kind(self, a, b):
        """The threshold a pair of photos gets: FF for two frontal faces, FP where one is a profile (two profiles
        too: CFP has no profile-profile pairs), each chosen on the run's validation pairs of that kind, by the
        poses their CFP folders or the landmark network give; all pairs' where a pose is unknown."""
        poses = [self.profile.get(p) for p in (a, b)]
        kind = "all" if None in poses else "FP" if any(poses) else "FF"
        return kind if math.isfinite(self.thresholds[kind]) else "all"  # held-out folder runs have one kind

    def verify(self, a, b, kind=None):
        """-> (same person?, score, the run's validation threshold for pairs of this kind, the kind: by default
        the one of the photos' poses)."""
        scores, _, errors = self.scores([(a, b)])
        if errors:
            raise UserError(next(iter(errors.values())))
        kind = kind or self.kind(a, b)
        threshold = self.thresholds[kind]
        return bool(scores[0] >= threshold), float(scores[0]), threshold, kind


class FeatureCache:
    """Features (or the reason an image could not be read) by path, the least recently used dropped first."""

    def __init__(self, size=50_000):
        self.size, self.items = size, OrderedDict()

    def __contains__(self, path):
        return path in self.items

    def get(self, path):
        self.items.move_to_end(path)
        return self.items[path]

    def put(self, path, value):
        self.items[path] = value
        self.items.move_to_end(path)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
