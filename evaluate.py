"""Evaluate a trained run: the protocol's folds, your own pairs of photos, the literature's CFP benchmark, export.
Embedding and scoring are verify.py's; the metrics are metrics.py's.

    python evaluate.py RUN_DIR                      validation and test accuracy of best.pt
    python evaluate.py RUN_DIR --folds 9 10         FF and FP metrics on any folds' pairs
    python evaluate.py RUN_DIR --pair A.jpg B.jpg   same person or not?
    python evaluate.py RUN_DIR --pairs LIST.txt     one "A B" path pair per line -> CSV
    python evaluate.py RUN_DIR --benchmark cfp --data-root CFP   the literature's CFP-FF/FP protocol (10 folds)
    python evaluate.py RUN_DIR --export embedder.pt2  the embedding network as one file torch alone loads
    python evaluate.py --summarize runs/            Markdown table of every run (report.py)

From Python, a run is a verify.Verifier.
"""
import argparse
import csv
import itertools
import os
import stat
import sys
import time

import numpy as np
import torch

import export
from backgrounds import FAMILIES
from data import KINDS, NUM_FOLDS, join, load_cfp, load_dataset, read_pair_file, split_folds
from faces import align_photos, prepare
from images import ImageBank, file_sha1, file_thumbprints, same_pictures
from metrics import accuracy, best_threshold, report, thresholds_by_kind, verification_metrics
from plots import plot_pair
from report import summarize_runs
from utils import UserError, quote, run_cli, write_json
from verify import EVAL_BATCH, Verifier, evaluate, load_model

ROLE_NAMES = {"train": "seen in training", "val": "validation (thresholds chosen here)", "test": "test"}


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
    p.add_argument("--paste", type=float, default=None, metavar="FRACTION",
                   help="fold evaluation of an aligned run: each photo pasted at a random place into a picture "
                        "1/FRACTION its width and height, then its face found there (--align predicted) or its "
                        "landmarks carried along (given): what a photo in a larger picture costs (default: off)")
    p.add_argument("--paste-on", type=str, default="cfp", choices=FAMILIES, metavar="FAMILY",
                   help=f"with --paste: the background family (backgrounds.py: {', '.join(FAMILIES)}); text and "
                        f"texture are kept out of the landmark network's training (default: cfp)")
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
    if args.paste is not None and not (0 < args.paste <= 1 and args.align in ("given", "predicted")):
        raise UserError(f"--paste must be in (0, 1] and comes with --align given or predicted, got {args.paste} "
                        f"with --align {args.align}")
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
    if args.paste is not None and (v.aligner is None or cfp.landmarks is None):
        raise UserError(f"--paste: {args.run} aligns no face, or {cfp.root} has no landmark files to tell where "
                        f"the pasted faces are")
    if args.align == "predicted" or args.paste is not None:
        finder = v.finder if args.align == "predicted" else None
        images, landmarks = align_photos(cfp, needed, finder, v.aligner, v.args["img_size"], args.paste,
                                         args.paste_on)
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
    digests = {file_sha1(p) for p in cfp.paths if os.path.getsize(p) in copied_sizes}
    same = sum(file_sha1(p) in digests for p in copied)
    if same:
        return f"{same} of its {len(ds.paths)} training images are copies of {cfp.root}'s"
    same = {i for i, _ in same_pictures(file_thumbprints(ds.paths), file_thumbprints(cfp.paths))}
    return f"{len(same)} of its {len(ds.paths)} training images are {cfp.root}'s, decoded (re-encoded copies)" \
        if same else None


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


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
