"""Verification metrics and evaluation: embed every image once, score every pair from the features.

    python evaluate.py RUN_DIR                      validation and test accuracy of best.pt
    python evaluate.py RUN_DIR --folds 9 10         FF and FP metrics on any folds' pairs
    python evaluate.py RUN_DIR --pair A.jpg B.jpg   same person or not?
    python evaluate.py RUN_DIR --pairs LIST.txt     one "A B" path pair per line -> CSV
    python evaluate.py --summarize runs/            Markdown table of every run
"""
import argparse
import csv
import glob
import json
import os
import re
import sys
import time

import numpy as np
import torch

from data import KINDS, ImageBank, decode_image, load_cfp, preprocess, split_folds
from models import build_model, pair_score
from utils import UserError, all_gather_rows, atomic_write, load_checkpoint, run_cli, write_json

FARS = (1e-2, 1e-3)


# ---------------------------------------------------------------------------
# Metrics (numpy only). Convention: predict "same" when score >= threshold.


def roc(scores, labels):
    """ROC from one sort: (fpr, tpr, thresholds), thresholds = distinct scores, descending.

    Point 0 is (0, 0) at threshold +inf; point i > 0 predicts "same" for score >= thresholds[i]."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each distinct score
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    p, n = max(y.sum(), 1), max((~y).sum(), 1)
    return np.r_[0, fps] / n, np.r_[0, tps] / p, np.r_[np.inf, s[last]]


def best_threshold(scores, labels):
    """Exact accuracy-maximising threshold: every gap between sorted distinct scores is a candidate."""
    fpr, tpr, thr = roc(scores, labels)
    labels = np.asarray(labels).astype(bool)
    p, n = labels.sum(), (~labels).sum()
    acc = (tpr * p + (1 - fpr) * n) / len(labels)
    i = int(np.argmax(acc))
    if i == 0:
        t = thr[1] + 1.0                       # everything "different"
    elif i == len(thr) - 1:
        t = thr[i]                             # everything "same"
    else:
        t = (thr[i] + thr[i + 1]) / 2          # midway to the next lower score
    return float(t), float(acc[i])


def accuracy(scores, labels, threshold):
    return float(np.mean((np.asarray(scores) >= threshold) == np.asarray(labels).astype(bool)))


def verification_metrics(scores, labels, threshold):
    """Accuracy at a given threshold, AUC, EER and TAR at fixed FARs."""
    fpr, tpr, _ = roc(scores, labels)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    fnr = 1 - tpr
    i = int(np.argmax(fnr <= fpr))              # first point past the crossing (fnr falls, fpr rises)
    d0, d1 = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
    w = d0 / (d0 - d1) if d0 != d1 else 0.0
    eer = float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))
    out = {"acc": accuracy(scores, labels, threshold), "auc": auc, "eer": eer}
    for far in FARS:
        out[f"tar@far={far:g}"] = float(tpr[np.searchsorted(fpr, far, side="right") - 1])
    return out


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
    feats = []
    model.eval()
    for i in range(0, len(mine), batch_size):
        x = preprocess(bank[mine[i:i + batch_size]].to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast or torch.autocast(device.type, enabled=False):
            f = model(x)
            if tta:  # insightface's flip test: the sum of the image's and its mirror's features
                f = f + model(torch.flip(x, dims=[3]))
        feats.append(f.float())
    feats = torch.cat(feats) if feats else torch.zeros(0, 1, device=device)
    feats = all_gather_rows(feats)
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
    return {"scores": pair_score(out).numpy(), "labels": pairs[:, 2], "loss": loss,
            "num_embedded": len(indices) * (2 if tta else 1), "seconds": time.time() - t}


def report(result, kinds, threshold):
    """Test metrics at a fixed threshold: all pairs together (the seed's number), then FF and FP."""
    scores, labels = result["scores"], result["labels"]
    out = {"test_acc": accuracy(scores, labels, threshold), "test": {}, "num_embedded": result["num_embedded"]}
    for kind in ("all",) + KINDS:
        sel = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
        if sel.any():
            out["test"][kind] = {"pairs": int(sel.sum()), **verification_metrics(scores[sel], labels[sel], threshold)}
    return out


def plot_roc(result, kinds, path, title=""):
    """ROC curves for FF and FP, FAR on a log axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    for kind in KINDS:
        sel = kinds == kind
        if sel.any():
            fpr, tpr, _ = roc(result["scores"][sel], result["labels"][sel])
            auc = verification_metrics(result["scores"][sel], result["labels"][sel], 0.0)["auc"]
            ax.step(np.maximum(fpr, 1e-4), tpr, where="post", label=f"{kind} (AUC {auc:.3f})")
    ax.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1.01), xlabel="false accept rate",
           ylabel="true accept rate", title=title or "ROC")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ---------------------------------------------------------------------------
# Command line


def load_model(path, device):
    """Rebuild a network from its checkpoint alone (no ImageNet download: the weights are in it)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train.py")
    model = build_model({**ckpt["args"], "pretrained": False})
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def verify(model, ckpt, paths, device):
    """Scores for (a, b) image path pairs, each distinct image embedded once."""
    unique = sorted({p for pair in paths for p in pair})
    for p in unique:
        if not os.path.isfile(p):
            raise UserError(f"image {p} does not exist")
    x = torch.stack([decode_image(p, ckpt["args"]["img_size"]) for p in unique])
    with torch.no_grad():
        feats = torch.cat([model(preprocess(b.to(device))) for b in x.split(64)])
    row = {p: i for i, p in enumerate(unique)}
    idx = torch.tensor([[row[a], row[b]] for a, b in paths], device=feats.device)
    with torch.no_grad():
        return pair_score(model.compare(feats[idx[:, 0]], feats[idx[:, 1]])).float().cpu().numpy()


def summarize(root):
    """One row per finished run (10-fold runs of one configuration grouped), as Markdown."""
    runs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "config.json"), recursive=True))
    if not runs:
        raise UserError(f"--summarize: no run folders (with config.json) under {root}")
    cols = ["ID", "arch", "loss", "features from", "lr", "optimizer", "epochs", "freeze", "pretrained",
            "augmentation", "val acc", "test acc", "best epoch", "threshold"]
    rows, folds = [], {}
    for run in runs:
        with open(os.path.join(run, "config.json")) as f:
            a = json.load(f)["args"]
        name = os.path.basename(run)
        exp_id = name[3:5] if name.startswith("exp") and name[3:5].isdigit() else name
        desc = [exp_id, f"{a['arch']}{' var' if a.get('variation') else ''}", a["loss"], a["backbone"],
                f"{a['lr']:g}", a["optimizer"], str(a["epochs"]), f"{a['freeze']:g}",
                "yes" if a["pretrained"] else "no", "yes" if a["augment"] else "no"]
        metrics_file = os.path.join(run, "metrics.json")
        if not os.path.isfile(metrics_file):
            done = 0
            if os.path.isfile(os.path.join(run, "history.csv")):
                with open(os.path.join(run, "history.csv")) as f:
                    done = max(0, sum(1 for _ in f) - 1)
            rows.append(desc + [f"running: epoch {done}/{a['epochs']}", "", "", ""])
            continue
        with open(metrics_file) as f:
            m = json.load(f)
        rows.append(desc + [f"{m['val_acc']:.3f}", f"{m['test_acc']:.3f}", str(m["best_epoch"]),
                            f"{m['threshold']:.3f}"])
        if a.get("protocol") == "10fold":  # fold runs of one configuration share a name up to _foldK
            folds.setdefault(re.sub(r"_?fold\d+$", "", name) or run, {})[a["test_fold"]] = m
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    raw = []
    if folds:
        lines += ["", "10-fold protocol: test accuracy at the validation fold's threshold, mean +- std over folds", "",
                  "| configuration | folds | FF acc | FP acc | FF AUC | FP AUC | FF EER | FP EER |", "|" + "---|" * 8]
        for key, by_fold in sorted(folds.items()):
            vals = {f"{kind} {m}": [by_fold[k]["test"][kind][m] for k in sorted(by_fold)]
                    for kind in KINDS for m in ("acc", "auc", "eer")}
            cells = [key, str(len(by_fold))]
            cells += [f"{np.mean(vals[f'{kind} acc']):.3f} +- {np.std(vals[f'{kind} acc']):.3f}" for kind in KINDS]
            cells += [f"{np.mean(vals[f'{kind} {m}']):.3f}" for m in ("auc", "eer") for kind in KINDS]
            lines.append("| " + " | ".join(cells) + " |")
            raw.append({"configuration": key, "folds": sorted(by_fold), **vals})
    table = "\n".join(lines) + "\n"
    atomic_write(os.path.join(root, "summary.md"), table)
    if raw:
        write_json(os.path.join(root, "summary_10fold.json"), raw)
    return table


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", type=str, help="run folder (uses its best.pt) or checkpoint file")
    p.add_argument("--data-root", type=str, default=None,
                   help="CFP folder (default: the run's own --data-root if it is there, else $CFP_ROOT)")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="score the FF and FP pairs of these folds at the checkpoint's threshold "
                        "(default: the run's own validation and test folds)")
    p.add_argument("--tta", type=str, default="none", choices=["none", "flip"],
                   help="flip: embed each image and its mirror, sum the features (default: none)")
    p.add_argument("--pair", type=str, nargs=2, metavar=("A", "B"), help="verify two image files")
    p.add_argument("--pairs", type=str, metavar="FILE", help="verify every pair of FILE (one 'A B' per line, tab-separated if paths have spaces), CSV to stdout")
    p.add_argument("--summarize", type=str, nargs="?", const="runs", default=None, metavar="DIR",
                   help="print (and write DIR/summary.md) a table of every run under DIR (default DIR: runs)")
    p.add_argument("--json", type=str, default="", help="also write the metrics to this JSON file")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default: 2)")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available (default: auto)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(args):
    if args.summarize is not None:
        print(summarize(args.summarize), end="")
        return
    if not args.run:
        raise UserError("give a run folder or checkpoint (or --summarize DIR)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, ckpt = load_model(args.run, device)
    threshold = ckpt["threshold"]

    if args.pair or args.pairs:
        if args.pair:
            paths = [tuple(args.pair)]
        else:
            if not os.path.isfile(args.pairs):
                raise UserError(f"--pairs {args.pairs} does not exist")
            with open(args.pairs) as f:
                # a tab separates paths that contain spaces; otherwise any whitespace does
                paths = [tuple(line.rstrip("\n").split("\t") if "\t" in line else line.split())
                         for line in f if line.strip()]
            bad = next((n for n, p in enumerate(paths, 1) if len(p) != 2), None)
            if bad:
                raise UserError(f"{args.pairs}:{bad}: expected two image paths separated by a tab or whitespace")
        scores = verify(model, ckpt, paths, device)
        if args.pair:
            verdict = "same person" if scores[0] >= threshold else "different people"
            print(f"{verdict}: score {scores[0]:.4f} {'>=' if scores[0] >= threshold else '<'} "
                  f"threshold {threshold:.4f}")
        else:
            w = csv.writer(sys.stdout)
            w.writerow(["a", "b", "score", "threshold", "same"])
            for (a, b), s in zip(paths, scores):
                w.writerow([a, b, f"{s:.6f}", f"{threshold:.6f}", int(s >= threshold)])
        return

    a = ckpt["args"]
    root = args.data_root or (a["data_root"] if os.path.isdir(a["data_root"]) else os.environ.get("CFP_ROOT", ""))
    cfp = load_cfp(root)
    roles = split_folds(a["protocol"], a.get("test_fold"))
    sets = {"pairs": args.folds} if args.folds else {"val": roles["val"], "test": roles["test"]}
    for k in args.folds or []:
        if k not in cfp.folds:
            raise UserError(f"--folds: no fold {k} (1..{len(cfp.folds)})")
    wanted = np.concatenate([cfp.pairs(f)[0][:, :2].ravel() for f in sets.values()])
    t = time.time()
    bank = ImageBank(cfp, wanted, a["img_size"], args.workers, device=device if device.type == "cuda" else "cpu")
    decode_s = time.time() - t
    out = {"checkpoint": args.run, "data_root": root, "tta": args.tta, "decode_seconds": decode_s}
    for role, folds in sets.items():
        pairs, kinds = cfp.pairs(folds)
        res = evaluate(model, bank, pairs, None, args.batch_size, device, tta=args.tta == "flip")
        if role == "val":
            threshold, _ = best_threshold(res["scores"], res["labels"])
        out[role] = {"folds": folds, **report(res, kinds, threshold), "embed_seconds": res["seconds"]}
        r = out[role]
        print(f"{role} folds {folds}: accuracy {r['test_acc']:.4f} at threshold {threshold:.4f}; "
              + "; ".join(f"{k} acc {v['acc']:.4f} AUC {v['auc']:.4f} EER {v['eer']:.4f} "
                          f"TAR@FAR=1% {v['tar@far=0.01']:.4f}" for k, v in r["test"].items() if k != "all")
              + f"; {r['num_embedded']} images embedded in {res['seconds']:.1f}s")
    out["threshold"] = threshold
    print(f"total {time.time() - t:.1f}s (decoding {decode_s:.1f}s)")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
