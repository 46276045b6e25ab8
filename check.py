"""Check a dataset folder before training on it, or lay CFP's images out as identity folders.

    python check.py DIR                                   identities, pairs per fold, landmark files, every image
                                                          decoded; a non-zero exit on the first problem
    python check.py --to-folders CFP_ROOT DIR [--folds 1 2 ...]   CFP's images as identity folders (symbolic links)
"""
import argparse
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from data import load_cfp, load_dataset, split_folds
from images import decode_image
from utils import DataError, UserError, run_cli


def to_folders(root, out, folds=None):
    """A CFP root's images (of the identities of these folds) as out/IDENTITY/{frontal,profile}_NN.jpg links."""
    cfp = load_cfp(root)
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--to-folders: {out} is not empty; choose another folder")
    for k in folds or []:
        if k not in cfp.folds:
            raise UserError(f"--folds: no fold {k} (1..{len(cfp.folds)})")
    images = cfp.images_of(folds) if folds else np.arange(len(cfp.paths))
    for i in images:
        d = os.path.join(out, cfp.names[cfp.identity[i]])
        os.makedirs(d, exist_ok=True)
        kind = "profile" if cfp.profile[i] else "frontal"
        os.symlink(os.path.abspath(cfp.paths[i]), os.path.join(d, f"{kind}_{os.path.basename(cfp.paths[i])}"))
    print(f"linked {len(images)} images of {len(np.unique(cfp.identity[images]))} identities"
          f"{f' (folds {folds})' if folds else ''} into {out}")


def check_folders(ds, workers):
    counts = np.bincount(ds.identity, minlength=len(ds.names))  # empty identity folders count as 0
    print(f"dataset      {ds.root} (identity folders)")
    print(f"identities   {len(ds.names)} ({int((counts >= 2).sum())} with 2+ images)")
    print(f"images       {len(ds.paths)} ({counts.min()}-{counts.max()} per identity, median {np.median(counts):g})")
    problems = check_decoding(ds.paths, workers)
    for p in problems[:10]:
        print(f"problem: {p}")
    if problems:
        raise DataError(f"{ds.root}: {len(problems)} images cannot be decoded, the first: {problems[0]}")
    print(f"decoded      all {len(ds.paths)} images: OK")


def check(root, workers):
    if load_dataset(root).layout == "folders":
        return check_folders(load_dataset(root), workers)
    cfp = load_cfp(root)
    n_front = int((~cfp.profile).sum())
    print(f"dataset      {root}")
    print(f"identities   {len(np.unique(cfp.identity))}")
    print(f"images       {n_front} frontal, {len(cfp.paths) - n_front} profile")
    for k, kinds in cfp.folds.items():
        counts = "  ".join(f"{kind} {int(p[:, 2].sum())} same / {int((1 - p[:, 2]).sum())} diff"
                           for kind, p in kinds.items())
        print(f"fold {k:02d}      {counts}  ({len(cfp.identities_of([k]))} identities)")
    roles = split_folds("seed")
    ids = {role: set(cfp.identities_of(folds)) for role, folds in roles.items()}
    sizes = " / ".join(f"{len(cfp.pairs(folds)[0])} {role}" for role, folds in roles.items())
    print(f"seed split   {sizes} pairs (FF+FP)")
    overlap = (ids["train"] & ids["val"]) | (ids["train"] & ids["test"]) | (ids["val"] & ids["test"])
    if overlap:
        raise DataError(f"seed split is not identity-disjoint: {len(overlap)} identities shared")
    for k, kinds in cfp.folds.items():
        for kind, p in kinds.items():
            if (p[:, 0] == p[:, 1]).any():
                print(f"warning: fold {k:02d} {kind}: {int((p[:, 0] == p[:, 1]).sum())} pairs of an image with itself")
            _, first = np.unique(np.sort(p[:, :2], axis=1), axis=0, return_index=True)
            if len(first) < len(p):
                print(f"warning: fold {k:02d} {kind}: {len(p) - len(first)} duplicate pairs")
    if cfp.landmarks is None:
        print("landmarks    none (no Data/Fiducials folder): --align none only")
    else:
        print(f"landmarks    {len(cfp.landmarks)} landmark files read ({cfp.landmarks.shape[1]} points each)")
        check_landmarks(cfp)
    problems = check_pairs(cfp) + check_decoding(cfp.paths, workers)
    if len(problems) > 1:
        print("\n".join(f"problem: {p}" for p in problems))
        raise DataError(f"{root}: {len(problems)} problems (listed above), the first: {problems[0]}")
    if problems:
        raise DataError(problems[0])
    print(f"decoded      all {len(cfp.paths)} images: OK")


def check_pairs(cfp):
    """Folds without pairs, and same/diff lines that contradict the identities."""
    problems = []
    for k, kinds in cfp.folds.items():
        for kind, p in kinds.items():
            if not len(p):
                problems.append(f"fold {k:02d} {kind} has no pairs: a split using it has nothing to validate or test")
                continue
            same_id = cfp.identity[p[:, 0]] == cfp.identity[p[:, 1]]
            for label, wrong, what in ((1, ~same_id, "same.txt pairs two different identities"),
                                       (0, same_id, "diff.txt pairs an identity with itself")):
                n = int((wrong & (p[:, 2] == label)).sum())
                if n:
                    problems.append(f"fold {k:02d} {kind}: {n} lines of {what}")
    return problems


def check_decoding(paths, workers, chunk=256):
    """Decode every image (in chunks, to bound memory); one problem per image that cannot be read."""
    problems = []

    def one(p):
        try:
            decode_image(p, 8)
        except DataError as e:
            return str(e)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i in range(0, len(paths), chunk):
            problems += [e for e in pool.map(one, paths[i:i + chunk]) if e]
    return problems


def check_landmarks(cfp, show=10):
    """Name the images whose landmarks fall outside the picture (a warning: alignment still works)."""
    outside = []
    for path, points in zip(cfp.paths, cfp.landmarks):
        with Image.open(path) as im:
            w, h = im.size[::-1] if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im.size  # as viewed
        n = int(((points < 0) | (points > [w, h])).any(1).sum())
        if n:
            outside.append(f"{os.path.relpath(path, cfp.root)} ({n})")
    if outside:
        print(f"warning: {len(outside)} images have landmarks outside the picture (points): "
              + ", ".join(outside[:show]) + (f", ... and {len(outside) - show} more" if len(outside) > show else ""))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("check", nargs="?", metavar="DIR", type=str, help="summarise and verify a dataset folder")
    g.add_argument("--to-folders", metavar=("CFP_ROOT", "DIR"), type=str, nargs=2,
                   help="link the images of a CFP root's identities into DIR as identity folders")
    parser.add_argument("--folds", type=int, nargs="+", default=None,
                        help="with --to-folders: only the identities of these folds (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (default: 2)")
    return parser


def main(args):
    if args.to_folders:
        to_folders(*args.to_folders, args.folds)
    else:
        check(args.check, args.workers)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
