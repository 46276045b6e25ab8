"""Evaluation: embed every image once, score every pair from the features (metrics in metrics.py).

    python evaluate.py RUN_DIR                      validation and test accuracy of best.pt
    python evaluate.py RUN_DIR --folds 9 10         FF and FP metrics on any folds' pairs
    python evaluate.py RUN_DIR --pair A.jpg B.jpg   same person or not?
    python evaluate.py RUN_DIR --pairs LIST.txt     one "A B" path pair per line -> CSV
    python evaluate.py RUN_DIR --benchmark cfp --data-root CFP   the literature's CFP-FF/FP protocol (10 folds)
    python evaluate.py RUN_DIR --export embedder.pt2  the embedding network as one file torch alone loads
    python evaluate.py --summarize runs/            Markdown table of every run (10-fold runs grouped)
    python evaluate.py --summarize results --out results/README.md    the results page, regenerated
"""
import argparse
import contextlib
import csv
import glob
import hashlib
import io
import json
import os
import re
import sys
import time
from collections import OrderedDict

import numpy as np
import torch

from align import Aligner
from data import (KINDS, NUM_FOLDS, DataError, ImageBank, decode_image, landmarks_of_photo, load_cfp, load_dataset,
                  open_image, preprocess, quote, read_pair_file, split_folds)
from landmarks import FaceFinder, align_photos
from metrics import accuracy, best_threshold, report, roc, tar_at_far, thresholds_by_kind, verification_metrics
from models import build_model, pair_score
from plots import plot_pair
from utils import (UserError, all_gather_rows, amp_autocast, atomic_write, load_checkpoint, load_weights, run_cli,
                   write_json)

ROLE_NAMES = {"train": "seen in training", "val": "validation (thresholds chosen here)", "test": "test"}


# ---------------------------------------------------------------------------
# Embed once, score many


@torch.no_grad()
def extract(model, bank, indices, batch_size=64, device="cpu", tta=False, autocast=None):
    """Features of dataset images `indices` -> (N, D) float32 on the CPU, in the order given.

    Under torchrun every rank embeds a share and the features are gathered."""
    device = torch.device(device)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    indices = np.asarray(indices)
    mine = indices[rank::world]
    model.eval()

    def embed(idx):
        x = preprocess(bank[idx].to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast or contextlib.nullcontext():
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


def evaluate(model, bank, pairs, criterion=None, batch_size=64, device="cpu", tta=False, autocast=None):
    """Scores and loss for pairs (P, 3) of dataset indices. Each unique image is embedded once."""
    indices = np.unique(pairs[:, :2])
    t = time.time()
    feats = extract(model, bank, indices, batch_size, device, tta, autocast)
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


def read_scores(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return (np.array([float(r["score"]) for r in rows]), np.array([int(r["same"]) for r in rows]),
            np.array([r["kind"] for r in rows]))


# ---------------------------------------------------------------------------
# Command line


def load_model(path, device):
    """Rebuild a network from its checkpoint alone (no ImageNet download: the weights are in it)."""
    path = os.path.join(path, "best.pt") if os.path.isdir(path) else path
    ckpt = load_checkpoint(path)
    try:
        model = build_model({**ckpt["args"], "pretrained": False})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: its settings do not describe a network ({type(e).__name__}: {e})") from None
    load_weights(model, ckpt["model"], path)
    model = model.to(device).eval()
    if device.type == "cuda" or amp_autocast(device, ckpt["args"].get("amp", False)).fast_dtype != torch.float32:
        model = model.to(memory_format=torch.channels_last)  # the layout train.py evaluated in: the same scores
    return model, ckpt


def run_thresholds(ckpt):
    """The validation thresholds stored with a checkpoint: all pairs, FF, FP."""
    return ckpt.get("thresholds") or {k: ckpt["threshold"] for k in ("all",) + KINDS}


def aligner_of(ckpt):
    """The run's face alignment (None: whole images resized)."""
    return Aligner(**ckpt["aligner"]) if ckpt.get("aligner") else None


class Photos:
    """How --pair and --pairs read a photo: as the run's network saw its test faces, aligned by the photo's
    landmarks (its CFP landmark file, else, or with predicted=True always, the landmark network's) or
    resized whole. photos(path) -> (3, S, S) uint8; photos.used[path]: 'given' or 'predicted'."""

    def __init__(self, ckpt, finder=None, predicted=False):
        self.args, self.aligner, self.finder, self.predicted = ckpt["args"], aligner_of(ckpt), finder, predicted
        self.used = {}

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

    def __call__(self, path):
        if not os.path.isfile(path):  # a folder or a device is refused before it is opened (a FIFO would hang)
            what = "a folder" if os.path.isdir(path) else "not a regular file" if os.path.exists(path) else "missing"
            raise UserError(f"image {path} does not exist" if what == "missing" else f"image {path} is {what}")
        matrix = None
        if self.aligner is not None:
            points, profile = self.landmarks(path)
            matrix = self.aligner.matrix(points, profile, self.args["img_size"])
        return decode_image(path, self.args["img_size"], self.args.get("resize", "squash"), matrix)


def verify(model, ckpt, paths, device, cache=None, photos=None):
    """Scores for (a, b) image path pairs, each distinct image embedded once, in the run's own precision.

    -> (scores, images, errors): NaN scores for pairs with an image that cannot be read, the decoded
    images by path, and {path: reason} for those that could not be. cache (a FeatureCache) keeps features
    from earlier calls, so a long pair list embeds each image once."""
    cache = FeatureCache() if cache is None else cache
    photos = Photos(ckpt) if photos is None else photos
    images, errors = {}, {}
    for p in dict.fromkeys(p for pair in paths for p in pair):
        if p in cache:
            continue
        try:
            images[p] = photos(p)
        except UserError as e:
            errors[p] = str(e)
            cache.put(p, str(e))
    if images:
        unique = list(images)
        autocast = amp_autocast(device, ckpt["args"].get("amp", False))
        # the same path as the fold evaluation: the scores equal the run's test_scores.csv
        feats = extract(model, torch.stack([images[p] for p in unique]), np.arange(len(unique)),
                        ckpt["args"].get("eval_batch_size", 64), device, autocast=autocast)
        for p, f in zip(unique, feats):
            cache.put(p, f)
    scores = np.full(len(paths), np.nan)
    got = {p: cache.get(p) for pair in paths for p in pair}
    errors.update({p: f for p, f in got.items() if isinstance(f, str)})
    ok = [i for i, (x, y) in enumerate(paths) if x not in errors and y not in errors]
    if ok:
        f1 = torch.stack([got[paths[i][0]] for i in ok]).to(device)
        f2 = torch.stack([got[paths[i][1]] for i in ok]).to(device)
        with torch.no_grad():
            scores[ok] = pair_score(model.compare(f1, f2)).float().cpu().numpy()
    return scores, images, errors


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
    """'A B' per line (a tab between paths that contain spaces), in chunks of lines:
    yields (pairs, line numbers, [(line, reason)]) for each chunk, so a list of any length streams."""
    if os.path.isdir(path):
        raise UserError(f"--pairs {path} is a folder, not a list of pairs")
    if not os.path.exists(path):
        raise UserError(f"--pairs {path} does not exist")
    if not os.path.isfile(path):
        raise UserError(f"--pairs {path} is not a regular file")
    pairs, numbers, bad = [], [], []
    try:
        with open(path, encoding="utf-8-sig") as f:
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


def dataset_label(root):
    """CFP, toy or other, from what a dataset folder holds (or, when it is gone, its name)."""
    readme = os.path.join(root or "", "Readme.txt")
    if os.path.isfile(readme):
        with open(readme, errors="replace") as f:
            head = f.read(200)
        return "toy" if head.startswith("SYNTHETIC toy") else ("CFP" if "Frontal" in head or "CFP" in head
                                                                else "other")
    name = os.path.basename(os.path.normpath(root or "")).lower()
    return "toy" if "toy" in name else ("CFP" if "cfp" in name else "other")


def _fmt(x, digits=3):
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


SUMMARY_COLUMNS = ["run", "data", "protocol", "arch", "loss", "backbone", "px", "view", "s", "dropout", "lr",
                   "optimizer", "epochs", "steps", "pretrained", "val acc", "test acc", "FF acc", "FP acc", "FF AUC",
                   "FP AUC", "best epoch"]


def find_runs(root):
    """Every folder under root with a config.json or metrics.json; symbolic links are not followed (no loops)."""
    return sorted(d for d, _, files in os.walk(root) if {"config.json", "metrics.json"} & set(files))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def view_of(a):
    """How the run put faces into its square: aligned (template/box, margin) or the whole image (resize mode)."""
    align = a.get("align") or "none"
    return a.get("resize", "squash") if align == "none" else f"{align} {a.get('align_margin', 1.25):g}"


def run_row(run, root):
    """One table row for a run folder -> (row, args, metrics or None)."""
    name = os.path.relpath(run, root) if os.path.relpath(run, root) != "." else os.path.basename(run)
    config = read_json(os.path.join(run, "config.json"))
    a = config["args"]
    layout = (config.get("data") or {}).get("layout", "cfp")
    protocol = a["protocol"] + (f" {a['test_fold']}" if a.get("test_fold") else "")
    row = [name, (config.get("dataset") or dataset_label(a["data_root"])) + (" folders" if layout != "cfp" else ""),
           protocol if layout == "cfp" or a.get("eval_root") else "held-out",
           f"{a['arch']}{' var' if a.get('variation') else ''}", a["loss"], a["backbone"], str(a["img_size"]),
           view_of(a), _fmt((config.get("built") or {}).get("scale") or a.get("scale"), 0),
           _fmt(a.get("dropout") or 0.0, 1) if a["loss"] in ("arcface", "cosface") else "",
           f"{a['lr']:g}", a["optimizer"], str(a["epochs"])]
    pretrained = "yes" if a["pretrained"] else "no"
    if not os.path.isfile(os.path.join(run, "metrics.json")):
        done = 0
        if os.path.isfile(os.path.join(run, "history.csv")):
            with open(os.path.join(run, "history.csv")) as f:
                done = max(0, sum(1 for _ in f) - 1)
        return row + ["", pretrained, f"running or stopped: epoch {done}/{a['epochs']}"] + [""] * 6, a, None
    m = read_json(os.path.join(run, "metrics.json"))
    t = m["test"]
    kind = lambda k, key: t.get(k, {}).get(key, float("nan"))  # held-out identity-folder pairs have no FF, FP
    cells = [float(x) for x in (m["val_acc"], m["test_acc"], kind("FF", "acc"), kind("FP", "acc"), kind("FF", "auc"),
                                kind("FP", "auc"))]
    return row + [str(m.get("steps", "")), pretrained, *map(_fmt, cells), str(m["best_epoch"])], a, m


def configuration_key(run, root):
    """10-fold runs of one configuration: the same parent folder and the same name up to _foldK."""
    parent = os.path.relpath(os.path.dirname(run), root)
    base = re.sub(r"_?fold\d+$", "", os.path.basename(run)) or os.path.basename(run)
    return base if parent == "." else os.path.join(parent, base)


def summarize(root):
    """Markdown table, one row per run under root (10-fold runs of one configuration also grouped)
    -> (text, raw 10-fold values)."""
    runs = find_runs(root)
    if not runs:
        raise UserError(f"--summarize: no run folders (with config.json) under {root}")
    rows, folds, warnings = [], {}, []
    for run in runs:
        try:
            row, a, m = run_row(run, root)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            rows.append([os.path.relpath(run, root), f"unreadable: {type(e).__name__}: {str(e)[:80]}"]
                        + [""] * (len(SUMMARY_COLUMNS) - 2))
            continue
        rows.append(row)
        if m is not None and a["protocol"] == "10fold":
            key = configuration_key(run, root)
            if a["test_fold"] in folds.get(key, {}):
                warnings.append(f"warning: {key}: two runs test fold {a['test_fold']} "
                                f"({folds[key][a['test_fold']][1]}, {run}); the first is used")
                continue
            folds.setdefault(key, {})[a["test_fold"]] = (m, run)
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    raw = [tenfold_values(key, by_fold) for key, by_fold in sorted(folds.items())]
    if raw:
        lines += ["", "10-fold protocol: test fold accuracy, each kind at its own validation-fold threshold; mean +- "
                  "sample standard deviation (ddof 1) over folds; TAR@FAR pooled over the folds' test scores (the "
                  "folds' models are not calibrated to each other)", "",
                  "| configuration | folds | FF acc | FP acc | FF AUC | FP AUC | FF EER | FP EER | FF TAR@FAR=1% "
                  "| FP TAR@FAR=1% |", "|" + "---|" * 10]
        lines += [tenfold_row(r) for r in raw]
        for r in raw:
            lines += ["", f"{r['configuration']}, folds {r['folds']}:"]
            lines += [f"  {k}: " + " ".join(f"{v:.4f}" for v in r[k]) for k in r if k.endswith(("acc", "auc", "eer"))]
    return "\n".join(warnings + lines) + "\n", raw


def tenfold_values(key, by_fold):
    """The per-fold metrics of one 10-fold configuration, and TAR@FAR over its pooled test scores."""
    ks = sorted(by_fold)
    vals = {f"{kind} {m}": [float(by_fold[k][0]["test"][kind][m]) for k in ks]
            for kind in KINDS for m in ("acc", "auc", "eer")}
    pooled = {}
    files = [os.path.join(by_fold[k][1], "test_scores.csv") for k in ks]
    if all(os.path.isfile(f) for f in files):
        s, y, kinds = (np.concatenate(x) for x in zip(*map(read_scores, files)))
        for kind in KINDS:
            sel = kinds == kind
            fpr, tpr, _ = roc(s[sel], y[sel])
            pooled[kind] = tar_at_far(fpr, tpr, int((y[sel] == 0).sum()))
    return {"configuration": key, "folds": ks, **vals, **{f"{kind} pooled": pooled.get(kind, {}) for kind in KINDS}}


def tenfold_row(r):
    std = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")  # noqa: E731
    cells = [r["configuration"], str(len(r["folds"]))]
    cells += [f"{np.mean(r[f'{kind} acc']):.4f} +- {std(r[f'{kind} acc']):.4f}" for kind in KINDS]
    cells += [f"{np.mean(r[f'{kind} {m}']):.4f}" for m in ("auc", "eer") for kind in KINDS]
    cells += [_fmt(r[f"{kind} pooled"].get("tar@far=0.01"), 4) for kind in KINDS]
    return "| " + " | ".join(cells) + " |"


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
    p.add_argument("--kind", type=str, default="all", choices=["all", "FF", "FP"],
                   help="with --pair/--pairs: the validation threshold to use: all pairs, frontal-frontal or "
                        "frontal-profile (default: all)")
    p.add_argument("--landmark-net", type=str, default="", metavar="RUN",
                   help="a landmark network (landmarks.py's run folder or best.pt) that finds the face and its "
                        "landmarks in photos without a landmark file, for a run that aligns faces (default: none)")
    p.add_argument("--align", type=str, default="given", choices=["given", "predicted"],
                   help="where an aligned run's landmarks come from: given = each photo's CFP landmark file "
                        "(the landmark network where there is none); predicted = the landmark network for every "
                        "photo, CFP's included (default: given)")
    p.add_argument("--paste", type=float, default=None, metavar="FRACTION",
                   help="fold evaluation of an aligned run: each photo first pasted at a random place into a "
                        "picture 1/FRACTION its width, on a background cut from other photos, its face then found "
                        "by the landmark network (--align predicted) or by its given landmarks carried along "
                        "(--align given: what the background alone costs) (default: off)")
    p.add_argument("--benchmark", type=str, default=None, choices=["cfp"],
                   help="cfp: all ten folds' FF and FP pairs of --data-root, fold K's threshold chosen on the other "
                        "nine, mean +- std, AUC and EER per kind, as the literature reports CFP; only for a run "
                        "that never trained on CFP's people")
    p.add_argument("--export", type=str, default="", metavar="PATH",
                   help="write the run's embedding network (arch 2) with its preprocessing as one torch.export "
                        "file (.pt2) that torch alone loads (export.py)")
    p.add_argument("--summarize", type=str, nargs="?", const="runs", default=None, metavar="DIR",
                   help="print a table of every run under DIR (default DIR: runs)")
    p.add_argument("--out", type=str, default="", help="with --summarize: also write the table to this file")
    p.add_argument("--json", type=str, default="", help="also write the metrics (or the raw 10-fold values) "
                                                        "to this JSON file")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default: 2)")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available (default: auto)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(args):
    for flag, path in (("--json", args.json), ("--show", args.show), ("--out", args.out), ("--export", args.export)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"{flag} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist")
    if args.summarize is not None:
        return summarize_runs(args)
    if not args.run:
        raise UserError("give a run folder or checkpoint (or --summarize DIR)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if (args.pair or args.pairs) and args.tta != "none":
        raise UserError("--tta applies to fold evaluation (its thresholds come from the validation folds); "
                        "--pair and --pairs use the run's own thresholds")
    check_landmark_flags(args)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, ckpt = load_model(args.run, device)
    if args.export:
        return export_run(args, model, ckpt, device)
    net = args.landmark_net or ckpt["args"].get("landmark_net", "")  # default: the one the run was trained with
    finder = FaceFinder.load(net, device) if net else None
    if finder is not None and aligner_of(ckpt) is None:
        raise UserError(f"--landmark-net: {args.run} resizes whole images (--align none); it uses no landmarks")
    photos = Photos(ckpt, finder, args.align == "predicted")
    if args.pair:
        return verify_one_pair(args, model, ckpt, device, photos)
    if args.pairs:
        return verify_pair_list(args, model, ckpt, device, photos)
    if args.benchmark:
        return benchmark_cfp(args, model, ckpt, device, finder)
    if ckpt["args"].get("eval_root") == "" and not args.folds and is_held_out_run(args.run):
        return evaluate_held_out(args, model, ckpt, device)
    return evaluate_folds(args, model, ckpt, device, finder)


def check_landmark_flags(args):
    if args.align == "predicted" and not args.landmark_net:
        raise UserError("--align predicted needs --landmark-net RUN (a network trained by landmarks.py)")
    if args.paste is not None:
        if args.pair or args.pairs:
            raise UserError("--paste applies to fold evaluation, not to --pair or --pairs")
        if not 0 < args.paste <= 1:
            raise UserError(f"--paste must be in (0, 1], got {args.paste}")


def results_page(root):
    """A Markdown page of a results folder: ROOT/about.md, then for each subfolder with runs its about.md and
    the table of its runs (summarize). Every figure comes from the runs' files -> (text, raw 10-fold values)."""
    def about(folder):
        path = os.path.join(folder, "about.md")
        return open(path).read().strip() + "\n\n" if os.path.isfile(path) else ""
    text, raw = about(root), []
    for sub in sorted(d.name for d in os.scandir(root) if d.is_dir(follow_symlinks=False)):
        if not find_runs(os.path.join(root, sub)):
            continue
        if is_landmark_folder(os.path.join(root, sub)):
            text += f"## {sub}\n\n{about(os.path.join(root, sub))}{landmark_tables(os.path.join(root, sub))}\n"
            continue
        table, values = summarize(os.path.join(root, sub))
        text += f"## {sub}\n\n{about(os.path.join(root, sub))}{table}\n"
        raw += values
    return text.rstrip() + "\n", raw


def is_landmark_folder(folder):
    def task(run):
        try:
            c = read_json(os.path.join(run, "config.json"))
            made_by = str(c.get("command", ""))
            return c.get("task") or ("landmarks" if made_by.startswith("python landmarks.py") else None)
        except (OSError, ValueError, AttributeError):
            return None
    return all(task(run) == "landmarks" for run in find_runs(folder))


def landmark_tables(folder):
    """The landmark networks of a folder (landmarks.py runs), and the verification runs evaluated with their
    landmarks (the evaluate.py --json files beside them, verify_*.json)."""
    lines = ["| network | protocol | head | profile share | px | epochs | minutes | test NME frontal | NME profile | "
             "pose acc | found, pasted at 1/2 | at 1/4 | a face where none is | ms a photo |", "|" + "---|" * 14]
    checks = []
    for run in find_runs(folder):
        try:
            c, m = read_json(os.path.join(run, "config.json")), read_json(os.path.join(run, "metrics.json"))
            a, t = c["args"], m["test"]
            share, alone = a.get("profile_share"), m.get("background_alone", {}).get("found")
            lines.append(f"| {os.path.relpath(run, folder)} | {a['protocol']} | {a.get('head', 'flatten')} | "
                         f"{'each photo once' if share is None else share} | {a['img_size']} | {a['epochs']} | "
                         f"{m['train_minutes']:.1f} | {t['nme_frontal']:.4f} | {t['nme_profile']:.4f} | "
                         f"{t['pose_acc']:.4f} | {m['pasted_0.5']['found']:.4f} | {m['pasted_0.25']['found']:.4f} | "
                         f"{'' if alone is None else f'{alone:.4f}'} | {t['ms_per_photo']:.1f} |")
        except (OSError, ValueError, KeyError, TypeError) as e:
            lines.append(f"| {os.path.relpath(run, folder)} | unreadable: {type(e).__name__}: {str(e)[:80]} |")
        checks += [(os.path.relpath(run, folder), p) for p in
                   sorted(glob.glob(os.path.join(glob.escape(run), "verify_*.json")))]
    if checks:
        lines += ["", "| verification run, evaluated with | landmarks | found | test acc | FF acc | FP acc |",
                  "|" + "---|" * 6]
    for net, path in checks:
        try:
            e = read_json(path)
            lm, t = e["landmarks"], e["test"]
            how = lm["source"] + (f" by {net}" if lm["source"] == "predicted" else "") + \
                (f", pasted at 1/{1 / lm['paste']:g}" if lm.get("paste") else "")
            found = _fmt(lm.get("found_at_its_place"), 4)
            lines.append(f"| {os.path.basename(e['checkpoint'].rstrip('/'))} ({os.path.basename(path)}) | {how} | "
                         f"{found} | {t['all']['acc']:.4f} | {t['FF']['acc']:.4f} | {t['FP']['acc']:.4f} |")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            lines.append(f"| {os.path.basename(path)} | unreadable: {type(e).__name__} |")
    return "\n".join(lines) + "\n"


def summarize_runs(args):
    """--summarize: the table of every run under a folder (a page of sections when the folder has about.md)."""
    page = os.path.isfile(os.path.join(args.summarize, "about.md")) and not any(  # a page of folders of runs
        os.path.isfile(os.path.join(d.path, "config.json")) for d in os.scandir(args.summarize) if d.is_dir())
    table, raw = results_page(args.summarize) if page else summarize(args.summarize)
    print(table, end="")
    if args.out:
        atomic_write(args.out, table)
    if args.json:
        write_json(args.json, raw)


def verify_one_pair(args, model, ckpt, device, photos):
    """--pair A B: one verdict at the run's validation threshold for --kind."""
    threshold = run_thresholds(ckpt)[args.kind]
    scores, images, errors = verify(model, ckpt, [tuple(args.pair)], device, photos=photos)
    if errors:
        raise UserError(next(iter(errors.values())))
    verdict = "same person" if scores[0] >= threshold else "different people"
    print(f"{verdict}: score {scores[0]:.6f} {'>=' if scores[0] >= threshold else '<'} "
          f"threshold {threshold:.6f} ({args.kind} pairs)")
    if "predicted" in photos.used.values():
        print("landmarks: " + ", ".join(f"{p} {photos.used[p]}" for p in dict.fromkeys(args.pair))
              + f" (landmark network {photos.finder.source['network']}, sha1 {photos.finder.source['sha1'][:12]})")
    if args.show:
        plot_pair(images[args.pair[0]], images[args.pair[1]], scores[0], threshold, verdict, args.show)


def verify_pair_list(args, model, ckpt, device, photos):
    """--pairs FILE: a CSV row per line on stdout, streamed chunk by chunk; unreadable lines on stderr, exit 1."""
    threshold = run_thresholds(ckpt)[args.kind]
    w = csv.writer(sys.stdout)
    w.writerow(["line", "a", "b", "score", "threshold", "same"])
    cache, scored, failed = FeatureCache(), 0, 0
    for paths, numbers, bad in read_pair_list(args.pairs):
        scores, _, errors = verify(model, ckpt, paths, device, cache, photos)
        for n, (x, y), score in zip(numbers, paths, scores):
            if np.isnan(score):
                bad.append((n, "; ".join(errors[p] for p in (x, y) if p in errors)))
            else:
                w.writerow([n, x, y, f"{score:.9g}", f"{threshold:.9g}", int(score >= threshold)])
        sys.stdout.flush()
        for n, reason in sorted(bad):
            print(f"{args.pairs}:{n}: {reason}", file=sys.stderr)
        scored, failed = scored + int(np.isfinite(scores).sum()), failed + len(bad)
    if failed:
        print(f"error: {failed} of {failed + scored} lines of {args.pairs} could not be scored (listed above)",
              file=sys.stderr)
        sys.exit(1)


def evaluate_folds(args, model, ckpt, device, finder=None):
    """Fold evaluation: each asked fold's FF and FP pairs in its role for this run, at thresholds chosen on the
    run's own validation folds (under the same TTA)."""
    a = ckpt["args"]
    own = a.get("eval_root") or a["data_root"]  # an identity-folder run validated and tested on --eval-root
    root = args.data_root or (own if os.path.isdir(own) else os.environ.get("CFP_ROOT", ""))
    if not args.data_root and root != own:
        print(f"data: the run's --data-root {own} is not there; reading $CFP_ROOT={root}")
    cfp = load_cfp(root)
    roles = split_folds(a["protocol"], a.get("test_fold"))
    for k in args.folds or []:
        if k not in cfp.folds:
            raise UserError(f"--folds: no fold {k} (1..{len(cfp.folds)})")
    asked = args.folds or roles["val"] + roles["test"]
    sets = {role: [k for k in folds if k in asked] for role, folds in roles.items()}
    needed = np.concatenate([cfp.pairs(f)[0][:, :2].ravel() for f in list(sets.values()) + [roles["val"]] if f])
    t = time.time()
    bank, landmarks = fold_bank(args, cfp, np.unique(needed), ckpt, device, finder)
    decode_s = time.time() - t
    autocast = amp_autocast(device, a.get("amp", False))
    tta = args.tta == "flip"
    out = {"checkpoint": args.run, "data_root": root, "tta": args.tta, "decode_seconds": decode_s,
           "landmarks": landmarks}
    val_pairs, val_kinds = cfp.pairs(roles["val"])
    val = evaluate(model, bank, val_pairs, None, args.batch_size, device, tta=tta, autocast=autocast)
    thresholds = {k: thr for k, (thr, _) in thresholds_by_kind(val["scores"], val["labels"], val_kinds).items()}
    for role in ("train", "val", "test"):
        if not sets[role]:
            continue
        if sets[role] == roles["val"]:
            res, kinds = val, val_kinds
        else:
            pairs, kinds = cfp.pairs(sets[role])
            res = evaluate(model, bank, pairs, None, args.batch_size, device, tta=tta, autocast=autocast)
        out[role] = {"folds": sets[role], "role": ROLE_NAMES[role],
                     **report(res["scores"], res["labels"], kinds, thresholds),
                     "num_embedded": res["num_embedded"], "embed_seconds": res["seconds"]}
        print(describe(f"{ROLE_NAMES[role]}, folds {sets[role]}", out[role]))
    out["thresholds"] = thresholds
    if landmarks["source"] == "predicted":
        where = landmarks["found_at_its_place"]
        print(f"landmarks predicted: face found in {landmarks['found']:.4f} of the photos" +
              (f", where the given landmarks put it in {where:.4f}" if where is not None else "") +
              (f" (each photo pasted into a picture {1 / args.paste:g} times its width)" if args.paste else ""))
    print(f"total {time.time() - t:.1f}s (decoding {decode_s:.1f}s)" + (", flip TTA" if tta else ""))
    if args.json:
        write_json(args.json, out)


def fold_bank(args, cfp, needed, ckpt, device, finder):
    """The images a fold evaluation embeds: aligned by their landmark files or, with --align predicted, by
    the landmark network's landmarks; with --paste, each photo first pasted into a larger picture, its
    landmarks found there or carried along. -> (bank, where the landmarks came from)"""
    a, where = ckpt["args"], device if device.type == "cuda" else "cpu"
    if args.paste is not None and not aligner_of(ckpt):
        raise UserError(f"--paste: {args.run} resizes whole images (--align none); it aligns no face")
    if args.paste is not None and cfp.landmarks is None:
        raise UserError(f"--paste: {cfp.root} has no landmark files to tell where the pasted faces are")
    predicted = args.align == "predicted" or (cfp.landmarks is None and finder is not None and aligner_of(ckpt))
    if not predicted and args.paste is None:
        return ImageBank(cfp, needed, a["img_size"], args.workers, device=where, resize=a.get("resize", "squash"),
                         aligner=aligner_of(ckpt)), {"source": "given" if aligner_of(ckpt) else "none"}
    images, landmarks = align_photos(cfp, needed, finder if predicted else None, aligner_of(ckpt), a["img_size"],
                                     args.paste)
    return ImageBank.of(len(cfp.paths), needed, images.to(where)), landmarks


# ---------------------------------------------------------------------------
# Identity-folder runs, the literature's CFP benchmark, export


def run_dir(path):
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def is_held_out_run(path):
    return os.path.isfile(os.path.join(run_dir(path), "pairs_val.txt"))


def evaluate_held_out(args, model, ckpt, device):
    """A run trained on identity folders with held-out identities: its own pairs_val.txt and pairs_test.txt,
    the test at the threshold chosen on the validation pairs."""
    a = ckpt["args"]
    ds = load_dataset(args.data_root or a["data_root"])
    sets = {role: read_pair_file(os.path.join(run_dir(args.run), f"pairs_{role}.txt"), ds) for role in ("val", "test")}
    bank = ImageBank(ds, np.concatenate([p[:, :2].ravel() for p in sets.values()]), a["img_size"], args.workers,
                     device=device if device.type == "cuda" else "cpu", resize=a.get("resize", "pad"))
    autocast, out = amp_autocast(device, a.get("amp", False)), {"checkpoint": args.run, "data_root": ds.root}
    res = {role: evaluate(model, bank, p, None, args.batch_size, device, autocast=autocast) for role, p in sets.items()}
    threshold = best_threshold(res["val"]["scores"], res["val"]["labels"])[0]
    for role in ("val", "test"):
        out[role] = {"role": ROLE_NAMES[role], "pairs_file": f"pairs_{role}.txt",
                     "all": verification_metrics(res[role]["scores"], res[role]["labels"], threshold)}
        print(describe(f"{ROLE_NAMES[role]}, held-out identities ({out[role]['pairs_file']})", out[role]))
    if args.json:
        write_json(args.json, out)


def cfp_training_images(ckpt, cfp):
    """Why a run's network has seen CFP's people (a sentence), or None: trained on a CFP-layout root, or on
    identity folders whose images are CFP's own files (linked or copied there)."""
    a = ckpt["args"]
    if not a.get("eval_root") and not os.path.isdir(a["data_root"]):
        return f"its training data {a['data_root']} is not there to show it is not CFP"
    ds = load_dataset(a["data_root"])
    if ds.layout == "cfp":
        return f"it trained on the CFP-layout dataset {a['data_root']} (folds {split_folds(a['protocol'], a.get('test_fold'))['train']})"
    cfp_files = {os.path.realpath(p) for p in cfp.paths}
    sizes = {os.path.getsize(p) for p in cfp.paths}
    linked = sum(os.path.realpath(p) in cfp_files for p in ds.paths)
    if linked:
        return f"{linked} of its {len(ds.paths)} training images are {cfp.root}'s own files"
    copied = [p for p in ds.paths if os.path.getsize(p) in sizes]  # then compare the bytes of those only
    copied_sizes = {os.path.getsize(p) for p in copied}
    digests = {file_digest(p) for p in cfp.paths if os.path.getsize(p) in copied_sizes}
    same = sum(file_digest(p) in digests for p in copied)
    return f"{same} of its {len(ds.paths)} training images are copies of {cfp.root}'s" if same else None


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def benchmark_cfp(args, model, ckpt, device, finder=None):
    """--benchmark cfp: every fold's FF and FP pairs scored once; fold K's accuracy at the threshold that is
    best on the other nine folds' pairs of the same kind (insightface's protocol); mean +- sample std over
    the ten folds, and AUC and EER of all 3500 pairs of each kind."""
    cfp = load_cfp(args.data_root or os.environ.get("CFP_ROOT", ""))
    seen = cfp_training_images(ckpt, cfp)
    if seen:
        raise UserError(f"--benchmark cfp: {args.run} cannot be benchmarked on {cfp.root}: {seen}; the benchmark "
                        f"would test on people it trained on")
    t = time.time()
    pairs, kinds = cfp.pairs(range(1, NUM_FOLDS + 1))
    fold = np.concatenate([np.full(len(cfp.folds[k][kind]), k) for k in range(1, NUM_FOLDS + 1) for kind in KINDS])
    bank, landmarks = fold_bank(args, cfp, np.unique(pairs[:, :2]), ckpt, device, finder)
    res = evaluate(model, bank, pairs, None, args.batch_size, device,
                   autocast=amp_autocast(device, ckpt["args"].get("amp", False)))
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


def export_run(args, model, ckpt, device):
    """--export PATH: the embedder file, checked against the run's own embeddings before it is kept."""
    import export
    if ckpt["args"]["arch"] != 2:
        raise UserError(f"--export: {args.run} is an --arch 1 run, whose pairs are judged by its decision network, "
                        f"not by comparing embeddings; only --arch 2 runs export an embedder")
    if os.path.exists(args.export):
        raise UserError(f"--export {args.export} already exists; remove it or choose another path")
    tmp = f"{args.export}.tmp{os.getpid()}.pt2"  # torch.export's archives are named .pt2
    try:
        export.export(model, ckpt, tmp)
        loaded, prep = export.load(tmp)
        size = ckpt["args"]["img_size"]
        x = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((loaded(x) - model.embed(preprocess(x))).abs().max())
        if diff > 1e-4:
            raise UserError(f"--export: the exported embedder differs from the network by {diff:.2e}; not written")
        os.replace(tmp, args.export)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.export}: {prep['img_size']}px {prep['input']}; float32, max difference from the network "
          f"{diff:.1e} on 3 test images")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
