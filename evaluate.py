"""Evaluation: embed every image once, score every pair from the features (metrics in metrics.py).

    python evaluate.py RUN_DIR                      validation and test accuracy of best.pt
    python evaluate.py RUN_DIR --folds 9 10         FF and FP metrics on any folds' pairs
    python evaluate.py RUN_DIR --pair A.jpg B.jpg   same person or not?
    python evaluate.py RUN_DIR --pairs LIST.txt     one "A B" path pair per line -> CSV
    python evaluate.py RUN_DIR --benchmark cfp --data-root CFP   the literature's CFP-FF/FP protocol (10 folds)
    python evaluate.py RUN_DIR --export embedder.pt2  the embedding network as one file torch alone loads
    python evaluate.py --summarize runs/            Markdown table of every run (report.py)

From Python, a run is a Verifier:

    from evaluate import Verifier
    v = Verifier("runs/t2")                         # landmark_net="runs/landmarks" for photos of any kind
    same, score, threshold, kind = v.verify("a.jpg", "b.jpg")   # kind: FF or FP, by the photos' poses
"""
import argparse
import csv
import hashlib
import io
import itertools
import math
import os
import signal
import stat
import sys
import time
from collections import OrderedDict

import numpy as np
import torch

import export
from align import Aligner
from data import (KINDS, NUM_FOLDS, cfp_place, join, landmarks_of_photo, load_cfp, load_dataset, read_pair_file,
                  split_folds)
from faces import FaceFinder, align_photos, prepare
from images import ImageBank, decode_image, file_thumbprints, open_image, preprocess, same_pictures
from metrics import accuracy, best_threshold, report, thresholds_by_kind, verification_metrics
from models import build_model, pair_score
from plots import plot_pair
from report import summarize_runs
from utils import (DataError, UserError, all_gather_rows, amp_autocast, amp_dtype, atomic_write, channels_last,
                   load_checkpoint, load_weights, quote, run_cli, write_json)

ROLE_NAMES = {"train": "seen in training", "val": "validation (thresholds chosen here)", "test": "test"}
EVAL_BATCH = 64  # images per batch, as train.py embeds its validation and test images


# ---------------------------------------------------------------------------
# Embed once, score many


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


def describe(name, r):
    """One line: all pairs at the mixed threshold, then FF and FP each at its own."""
    parts = [f"{name}: all {r['all']['acc']:.4f} (threshold {r['all']['threshold']:.4f})"]
    for kind in KINDS:
        if kind in r:
            m = r[kind]
            far = f", TAR@FAR=1% {m['tar@far=0.01']:.4f}" if "tar@far=0.01" in m else ""
            parts.append(f"{kind} {m['acc']:.4f} (threshold {m['threshold']:.4f}), AUC {m['auc']:.4f}, "
                         f"EER {m['eer']:.4f}{far}")
    return " | ".join(parts)


def write_scores(path, pairs, kinds, scores):
    """Every scored pair as CSV (a, b are 0-based dataset indices): pooled metrics and error galleries read it."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["a", "b", "kind", "same", "score"])
    w.writerows((int(a), int(b), k, int(y), f"{s:.9g}") for (a, b, y), k, s in zip(pairs, kinds, scores))
    atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------
# A run as a Python object


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
        scores, _, errors = self.scores([(p, p) for p in paths])
        if errors:
            raise UserError(next(iter(errors.values())))
        return torch.stack([self.cache.get(p) for p in paths])

    def scores(self, pairs):
        """Scores for (a, b) photo path pairs -> (scores, images decoded now by path, {path: reason}); NaN scores
        for pairs with a photo that cannot be read."""
        images, errors = {}, {}
        for p in dict.fromkeys(p for pair in pairs for p in pair):
            if p in self.cache:
                continue
            try:
                images[p] = self.photo(p)
            except UserError as e:
                errors[p] = str(e)
                self.cache.put(p, str(e))
        if images:  # the same path as the fold evaluation: the scores equal the run's test_scores.csv
            unique = list(images)
            feats = extract(self.model, torch.stack([images[p] for p in unique]), np.arange(len(unique)),
                            EVAL_BATCH, self.device, amp=self.args["amp"])
            for p, f in zip(unique, feats):
                self.cache.put(p, f)
        scores = np.full(len(pairs), np.nan)
        got = {p: self.cache.get(p) for pair in pairs for p in pair}
        errors.update({p: f for p, f in got.items() if isinstance(f, str)})
        ok = [i for i, (x, y) in enumerate(pairs) if x not in errors and y not in errors]
        if ok:
            f1, f2 = (torch.stack([got[pairs[i][c]] for i in ok]).to(self.device) for c in (0, 1))
            with torch.no_grad():
                scores[ok] = pair_score(self.model.compare(f1, f2)).float().cpu().numpy()
        return scores, images, errors

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


def read_pair_list(path, chunk=4096):
    """'A B' per line (a tab between paths that contain spaces), in chunks of lines, from a file, a pipe or
    `-` (standard input): yields (pairs, line numbers, [(line, reason)]) for each chunk, so a list of any
    length streams."""
    if path != "-":
        if os.path.isdir(path):
            raise UserError(f"--pairs {path} is a folder, not a list of pairs")
        if not os.path.exists(path):
            raise UserError(f"--pairs {path} does not exist")
        if not (os.path.isfile(path) or stat.S_ISFIFO(os.stat(path).st_mode)):
            raise UserError(f"--pairs {path} is not a regular file or a pipe")
    pairs, numbers, bad = [], [], []
    try:
        with open(sys.stdin.fileno() if path == "-" else path, encoding="utf-8-sig", closefd=path != "-") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    line = line.rstrip()  # trailing spaces, tabs and the line end
                    fields = [x.strip() for x in line.split("\t")] if "\t" in line else line.split()
                    if len(fields) != 2 or not all(fields):
                        bad.append((n, f"expected two image paths separated by a tab or whitespace, got {quote(line)}"))
                    else:
                        pairs.append(tuple(fields))
                        numbers.append(n)
                if len(pairs) + len(bad) >= chunk:
                    yield pairs, numbers, bad
                    pairs, numbers, bad = [], [], []
    except UnicodeDecodeError as e:
        raise UserError(f"--pairs {path}: not UTF-8 text (byte offset {e.start})") from None
    yield pairs, numbers, bad


# ---------------------------------------------------------------------------
# Command line


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", type=str, help="run folder (uses its best.pt) or checkpoint file")
    p.add_argument("--data-root", type=str, default=None,
                   help="CFP folder (default: the run's own --data-root if it is there, else $CFP_ROOT)")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="score the FF and FP pairs of these folds, each reported in its role for this run "
                        "(seen in training, validation or test) (default: the run's validation and test folds)")
    p.add_argument("--tta", type=str, default="none", choices=["none", "flip"],
                   help="flip: each image's feature is the mean of its own and its mirror's; the thresholds are "
                        "then chosen again on the run's validation folds under the same TTA (default: none)")
    p.add_argument("--pair", type=str, nargs=2, metavar=("A", "B"), help="verify two image files")
    p.add_argument("--pairs", type=str, metavar="FILE",
                   help="verify every pair of FILE (one 'A B' per line, tab-separated if paths have spaces), "
                        "CSV to stdout")
    p.add_argument("--show", type=str, default="", metavar="PNG",
                   help="with --pair: also draw both images as the network sees them, with the verdict")
    p.add_argument("--kind", type=str, default=None, choices=["all", "FF", "FP"],
                   help="with --pair/--pairs: the validation threshold to use: all pairs, frontal-frontal or "
                        "frontal-profile (default: each pair's by its photos' poses, all pairs' where a pose is "
                        "unknown)")
    p.add_argument("--landmark-net", type=str, default="", metavar="RUN",
                   help="a landmark network (landmarks.py's run folder or best.pt) that finds the face and its "
                        "landmarks in photos without a landmark file, for a run that aligns faces (default: the "
                        "one the run was trained with, if any)")
    p.add_argument("--align", type=str, default="run", choices=["run", "given", "predicted"],
                   help="fold evaluation of an aligned run, where its landmarks come from: run = as in its training "
                        "(its landmark files, or its network's landmarks placed the same way); given = the landmark "
                        "files (the network where there are none); predicted = the network for every photo, one "
                        "at a time, as --pair finds a face (default: run)")
    p.add_argument("--benchmark", type=str, default=None, choices=["cfp"], help="cfp: CFP-FF/FP as the literature "
                   "reports them (each fold's threshold from the other nine), for a run that never saw CFP's people")
    p.add_argument("--export", type=str, default="", metavar="PATH", help="write the run's embedder (arch 2) and "
                   "its preprocessing as one torch.export file (.pt2) that torch alone loads (export.py)")
    p.add_argument("--summarize", type=str, nargs="?", const="runs", default=None, metavar="DIR",
                   help="print a table of every run under DIR (default DIR: runs)")
    p.add_argument("--out", type=str, default="", help="with --summarize: also write the table to this file")
    p.add_argument("--json", type=str, default="", help="also write the metrics (or the raw 10-fold values) "
                                                        "to this JSON file")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH, help=f"images per batch (default: {EVAL_BATCH})")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default: 2)")
    return p


def main(args):
    for flag, path in (("--json", args.json), ("--show", args.show), ("--out", args.out), ("--export", args.export)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"{flag} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist")
    if args.summarize is not None:
        return summarize_runs(args.summarize, args.out, args.json)
    if not args.run:
        raise UserError("give a run folder or checkpoint (or --summarize DIR)")
    if os.path.isdir(args.run) and not os.path.exists(os.path.join(args.run, "best.pt")) and \
            any(os.path.isfile(os.path.join(d.path, "config.json")) for d in os.scandir(args.run) if d.is_dir()):
        raise UserError(f"{args.run} is a folder of runs, not a run: evaluate one of them, or table them all with "
                        f"--summarize {args.run}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if (args.pair or args.pairs) and args.tta != "none":
        raise UserError("--tta applies to fold evaluation (its thresholds come from the validation folds); "
                        "--pair and --pairs use the run's own thresholds")
    if args.align == "predicted" and not args.landmark_net:
        raise UserError("--align predicted needs --landmark-net RUN (a network trained by landmarks.py)")
    if args.export:
        model, ckpt = load_model(args.run, torch.device("cpu"))
        return export.export_run(model, ckpt, args.run, args.export)
    v = Verifier(args.run, args.landmark_net, args.align == "predicted")
    if args.pair:
        return verify_one_pair(args, v)
    if args.pairs:
        return verify_pair_list(args, v)
    if args.benchmark:
        return benchmark_cfp(args, v)
    held_out = v.args["eval_root"] == "" and (os.path.isfile(os.path.join(run_dir(args.run), "pairs_val.txt")) or (
        os.path.isdir(v.args["data_root"]) and load_dataset(v.args["data_root"]).layout == "folders"))
    if held_out and not args.folds:  # identity folders, validated and tested on held-out identities
        return evaluate_held_out(args, v)
    return evaluate_folds(args, v)


def verify_one_pair(args, v):
    """--pair A B: one verdict at the run's validation threshold for --kind, or for the photos' poses."""
    scores, images, errors = v.scores([tuple(args.pair)])
    if errors:
        raise UserError(next(iter(errors.values())))
    kind = args.kind or v.kind(*args.pair)
    threshold = v.thresholds[kind]
    verdict = "same person" if scores[0] >= threshold else "different people"
    why = "" if args.kind else ": " + ", ".join(
        f"{p} {'unknown pose' if v.profile[p] is None else 'profile' if v.profile[p] else 'frontal'}"
        for p in dict.fromkeys(args.pair))
    print(f"{verdict}: score {scores[0]:.6f} {'>=' if scores[0] >= threshold else '<'} "
          f"threshold {threshold:.6f} ({kind} pairs{why})")
    if "predicted" in v.used.values():
        print("landmarks: " + ", ".join(f"{p} {v.used[p]}" for p in dict.fromkeys(args.pair))
              + f" (landmark network {v.finder.source['network']}, sha1 {v.finder.source['sha1'][:12]})")
    if args.show:
        plot_pair(images[args.pair[0]], images[args.pair[1]], scores[0], threshold, verdict, args.show)


def verify_pair_list(args, v):
    """--pairs FILE: a CSV row per line on stdout, streamed chunk by chunk; unreadable lines on stderr, exit 1."""
    chunks = read_pair_list(args.pairs)
    first = next(chunks)  # a list that cannot be read is one line, before any output
    w = csv.writer(sys.stdout)
    w.writerow(["line", "a", "b", "score", "threshold", "same", "kind"])
    scored, failed = 0, 0
    for paths, numbers, bad in itertools.chain([first], chunks):
        scores, _, errors = v.scores(paths)
        for n, (x, y), score in zip(numbers, paths, scores):
            if np.isnan(score):
                bad.append((n, "; ".join(errors[p] for p in (x, y) if p in errors)))
                continue
            kind = args.kind or v.kind(x, y)
            threshold = v.thresholds[kind]
            w.writerow([n, x, y, f"{score:.9g}", f"{threshold:.9g}", int(score >= threshold), kind])
        sys.stdout.flush()
        for n, reason in sorted(bad):
            print(f"{args.pairs}:{n}: {reason}", file=sys.stderr)
        scored, failed = scored + int(np.isfinite(scores).sum()), failed + len(bad)
    if failed:
        print(f"error: {failed} of {failed + scored} lines of {args.pairs} could not be scored (listed above)",
              file=sys.stderr)
        sys.exit(1)


def evaluate_folds(args, v):
    """Fold evaluation: each asked fold's FF and FP pairs in its role for this run, at thresholds chosen on the
    run's own validation folds (under the same TTA)."""
    a = v.args
    own = a["eval_root"] or a["data_root"]  # an identity-folder run validated and tested on --eval-root
    root = args.data_root or (own if os.path.isdir(own) else os.environ.get("CFP_ROOT", ""))
    if not args.data_root and root != own:
        print(f"data: the run's --data-root {own} is not there; reading $CFP_ROOT={root}")
    cfp = load_cfp(root)
    if a["eval_root"] and os.path.isdir(a["data_root"]):  # as in training: after the training folders' images
        cfp = join(load_dataset(a["data_root"]), cfp)
    roles = split_folds(a["protocol"], a["test_fold"])
    for k in args.folds or []:
        if k not in cfp.folds:
            raise UserError(f"--folds: no fold {k} (1..{len(cfp.folds)})")
    asked = args.folds or roles["val"] + roles["test"]
    sets = {role: [k for k in folds if k in asked] for role, folds in roles.items()}
    needed = np.concatenate([cfp.pairs(f)[0][:, :2].ravel() for f in list(sets.values()) + [roles["val"]] if f])
    t = time.time()
    bank, landmarks = fold_bank(args, cfp, np.unique(needed), v)
    decode_s, tta = time.time() - t, args.tta == "flip"
    out = {"checkpoint": args.run, "data_root": root, "tta": args.tta, "decode_seconds": decode_s,
           "landmarks": landmarks}
    val_pairs, val_kinds = cfp.pairs(roles["val"])
    val = evaluate(v.model, bank, val_pairs, None, args.batch_size, v.device, tta=tta, amp=a["amp"])
    thresholds = {k: thr for k, (thr, _) in thresholds_by_kind(val["scores"], val["labels"], val_kinds).items()}
    for role in ("train", "val", "test"):
        if not sets[role]:
            continue
        if sets[role] == roles["val"]:
            res, kinds = val, val_kinds
        else:
            pairs, kinds = cfp.pairs(sets[role])
            res = evaluate(v.model, bank, pairs, None, args.batch_size, v.device, tta=tta, amp=a["amp"])
        out[role] = {"folds": sets[role], "role": ROLE_NAMES[role],
                     **report(res["scores"], res["labels"], kinds, thresholds),
                     "num_embedded": res["num_embedded"], "embed_seconds": res["seconds"]}
        print(describe(f"{ROLE_NAMES[role]}, folds {sets[role]}", out[role]))
    out["thresholds"] = thresholds
    if "found" in landmarks:  # each photo's face found as --pair finds it
        where = landmarks["found_at_its_place"]
        print(f"landmarks predicted: face found in {landmarks['found']:.4f} of the photos" +
              (f", where the given landmarks put it in {where:.4f}" if where is not None else ""))
    print(f"total {time.time() - t:.1f}s (decoding {decode_s:.1f}s)" + (", flip TTA" if tta else ""))
    if args.json:
        write_json(args.json, out)


def fold_bank(args, cfp, needed, v):
    """The images an evaluation embeds, made by the code that made the run's own: its landmarks placed as in
    training (--align run), from the files (given), or found photo by photo as --pair does (predicted).
    -> (bank, where the landmarks came from)"""
    where = v.device if v.device.type == "cuda" else "cpu"
    if args.align == "predicted":
        images, landmarks = align_photos(cfp, needed, v.finder, v.aligner, v.args["img_size"])
        return ImageBank.of(len(cfp.paths), needed, images.to(where)), landmarks
    landmarks = {"source": "none"}
    if v.aligner is not None:
        a = {**v.args, "landmark_net": v.landmark_net,
             "predict_landmarks": v.args["predict_landmarks"] and args.align == "run"}
        cfp, landmarks = prepare(cfp, a, lambda line: print(line, file=sys.stderr), needed)
    return ImageBank(cfp, needed, v.args["img_size"], args.workers, device=where, resize=v.args["resize"],
                     aligner=v.aligner), landmarks


# ---------------------------------------------------------------------------
# Identity-folder runs, the literature's CFP benchmark, export


def run_dir(path):
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def evaluate_held_out(args, v):
    """A run trained on identity folders with held-out identities: its own pairs_val.txt and pairs_test.txt,
    the test at the threshold chosen on the validation pairs."""
    a = v.args
    ds = load_dataset(args.data_root or a["data_root"])
    files = {role: os.path.join(run_dir(args.run), f"pairs_{role}.txt") for role in ("val", "test")}
    for role, path in files.items():
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: the run's held-out {role} pairs, drawn when it trained")
    sets = {role: read_pair_file(path, ds) for role, path in files.items()}
    bank, _ = fold_bank(args, ds, np.unique(np.concatenate([p[:, :2].ravel() for p in sets.values()])), v)
    out = {"checkpoint": args.run, "data_root": ds.root}
    res = {role: evaluate(v.model, bank, p, None, args.batch_size, v.device, amp=a["amp"])
           for role, p in sets.items()}
    threshold = best_threshold(res["val"]["scores"], res["val"]["labels"])[0]
    for role in ("val", "test"):
        out[role] = {"role": ROLE_NAMES[role], "pairs_file": f"pairs_{role}.txt",
                     "all": verification_metrics(res[role]["scores"], res[role]["labels"], threshold)}
        print(describe(f"{ROLE_NAMES[role]}, held-out identities ({out[role]['pairs_file']})", out[role]))
    if args.json:
        write_json(args.json, out)


def cfp_training_images(a, cfp):
    """Why a run's network has seen CFP's people (a sentence), or None: trained on a CFP-layout root, or on
    identity folders whose images are CFP's own files (linked or copied there)."""
    if not os.path.isdir(a["data_root"]):
        return f"its training data {a['data_root']} is gone, so nothing shows it holds none of these images"
    ds = load_dataset(a["data_root"])
    if ds.layout == "cfp":
        return f"it trained on the CFP-layout dataset {a['data_root']} (folds " \
               f"{split_folds(a['protocol'], a['test_fold'])['train']})"
    cfp_files = {os.path.realpath(p) for p in cfp.paths}
    sizes = {os.path.getsize(p) for p in cfp.paths}
    linked = sum(os.path.realpath(p) in cfp_files for p in ds.paths)
    if linked:
        return f"{linked} of its {len(ds.paths)} training images are {cfp.root}'s own files"
    copied = [p for p in ds.paths if os.path.getsize(p) in sizes]  # then compare the bytes of those only
    copied_sizes = {os.path.getsize(p) for p in copied}
    digests = {file_digest(p) for p in cfp.paths if os.path.getsize(p) in copied_sizes}
    same = sum(file_digest(p) in digests for p in copied)
    if same:
        return f"{same} of its {len(ds.paths)} training images are copies of {cfp.root}'s"
    same = {i for i, _ in same_pictures(file_thumbprints(ds.paths), file_thumbprints(cfp.paths))}
    return f"{len(same)} of its {len(ds.paths)} training images are {cfp.root}'s, decoded (re-encoded copies)" \
        if same else None


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def benchmark_cfp(args, v):
    """--benchmark cfp: every fold's FF and FP pairs scored once; fold K's accuracy at the threshold that is
    best on the other nine folds' pairs of the same kind (insightface's protocol); mean +- sample std over
    the ten folds, and AUC and EER of all pairs of each kind."""
    cfp = load_cfp(args.data_root or os.environ.get("CFP_ROOT", ""))
    seen = cfp_training_images(v.args, cfp)
    if seen:
        raise UserError(f"--benchmark cfp: {args.run} cannot be benchmarked on {cfp.root}: {seen}; the benchmark "
                        f"takes only runs that never trained on its dataset's images")
    t = time.time()
    pairs, kinds = cfp.pairs(range(1, NUM_FOLDS + 1))
    fold = np.concatenate([np.full(len(cfp.folds[k][kind]), k) for k in range(1, NUM_FOLDS + 1) for kind in KINDS])
    bank, landmarks = fold_bank(args, cfp, np.unique(pairs[:, :2]), v)
    res = evaluate(v.model, bank, pairs, None, args.batch_size, v.device, amp=v.args["amp"])
    out = {"checkpoint": args.run, "data_root": cfp.root, "protocol": "CFP 10 folds, each fold's threshold chosen "
           "on the other nine", "landmarks": landmarks}
    for kind in KINDS:
        s, y, k = res["scores"][kinds == kind], res["labels"][kinds == kind], fold[kinds == kind]
        accs = [accuracy(s[k == f], y[k == f], best_threshold(s[k != f], y[k != f])[0])
                for f in range(1, NUM_FOLDS + 1)]
        pooled = verification_metrics(s, y, best_threshold(s, y)[0])
        out[kind] = {"acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs, ddof=1)),
                     "acc_folds": [round(a, 4) for a in accs], "auc": pooled["auc"], "eer": pooled["eer"],
                     **{m: pooled[m] for m in pooled if m.startswith("tar@")}, "pairs": len(s)}
        print(f"CFP-{kind}: {100 * out[kind]['acc_mean']:.2f} +- {100 * out[kind]['acc_std']:.2f}  AUC "
              f"{pooled['auc']:.4f}  EER {pooled['eer']:.4f}  ({len(s)} pairs; folds "
              f"{' '.join(f'{a:.3f}' for a in accs)})")
    print(f"total {time.time() - t:.1f}s")
    if args.json:
        write_json(args.json, out)


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    run_cli(main, get_args_parser().parse_args())
