"""A small synthetic dataset in CFP's layout: drawn cartoon faces, not people.

It lets every path of the project run in seconds with no download:

    python toy.py toy                        the toy CFP
    python train.py --data-root toy ...      (a folder named toy that does not exist yet is written first)
    python toy.py --folders DIR [--identities N --per-identity M]   the same faces as identity folders
"""
import argparse
import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw

from data import KINDS, NUM_FOLDS
from utils import UserError, run_cli


def make_toy(out, num_ids=100, same_per_kind=25, size_range=(40, 88), seed=0):
    """A small synthetic CFP: cartoon faces whose identity is their colours and proportions.

    Nuisances (position, scale, brightness, noise, a few grayscale images) vary per image;
    "profile" images are drawn turned sideways. Deterministic for a given seed."""
    rng = np.random.RandomState(seed)
    people = draw_people(rng, num_ids)
    frontal, profile = [], []
    for i, p in enumerate(people):
        for kind, count, store in (("frontal", 10, frontal), ("profile", 4, profile)):
            d = os.path.join(out, "Data", "Images", f"{i + 1:03d}", kind)
            os.makedirs(d, exist_ok=True)
            for n in range(1, count + 1):
                draw_face(rng, p, kind == "profile", size_range).save(os.path.join(d, f"{n:02d}.jpg"), quality=90)
                store.append(f"../Data/Images/{i + 1:03d}/{kind}/{n:02d}.jpg")
    os.makedirs(os.path.join(out, "Protocol"), exist_ok=True)
    for name, lst in (("Pair_list_F.txt", frontal), ("Pair_list_P.txt", profile)):
        with open(os.path.join(out, "Protocol", name), "w") as f:
            f.writelines(f"{n} {p}\n" for n, p in enumerate(lst, 1))
    with open(os.path.join(out, "Data", "list_name.txt"), "w") as f:
        f.writelines(f"Synthetic person {i + 1:03d}\n" for i in range(num_ids))
    ids_per_fold = num_ids // NUM_FOLDS
    for k in range(NUM_FOLDS):
        fold_ids = list(range(k * ids_per_fold, (k + 1) * ids_per_fold))
        for kind in KINDS:
            d = os.path.join(out, "Protocol", "Split", kind, f"{k + 1:02d}")
            os.makedirs(d, exist_ok=True)
            for name, same in (("same.txt", True), ("diff.txt", False)):
                with open(os.path.join(d, name), "w") as f:
                    f.writelines(f"{i},{j}\n" for i, j in sample_pairs(rng, fold_ids, kind, same, same_per_kind))
    with open(os.path.join(out, "Readme.txt"), "w") as f:
        f.write("SYNTHETIC toy dataset in the CFP layout, written by `python data.py --make-toy`.\n"
                "These are drawn cartoon faces, not photographs of people. Numbers measured on it say\n"
                "nothing about real face verification; use it to try the pipeline without a download.\n"
                f"{num_ids} identities, 10 frontal + 4 profile images each, 10 identity-disjoint folds,\n"
                f"{same_per_kind} same + {same_per_kind} diff pairs per fold for FF and for FP.\n")


def make_toy_folders(out, num_ids=100, per_id=14, size_range=(40, 88), seed=0):
    """The toy faces in the identity-folder layout: out/idNNNNN/{frontal,profile}_NN.jpg, per_id images per
    identity, one in 3.5 of them turned sideways (as the toy CFP's 4 profiles in 14). With more identities
    than distinct drawn people (1152 x 9 proportions), identities repeat; the measurements that use so many
    (memory, images/s) do not depend on it."""
    rng = np.random.RandomState(seed)
    people = draw_people(rng, min(num_ids, 16 ** 3 * 9))
    for i in range(num_ids):
        d = os.path.join(out, f"id{i + 1:05d}")
        os.makedirs(d, exist_ok=True)
        for n in range(per_id):
            profile = n % 7 >= 5
            name = f"{'profile' if profile else 'frontal'}_{n + 1:02d}.jpg"
            draw_face(rng, people[i % len(people)], profile, size_range).save(os.path.join(d, name), quality=90)
    with open(os.path.join(out, "Readme.txt"), "w") as f:
        f.write(f"SYNTHETIC toy faces as identity folders, written by `python data.py --make-toy-folders`: drawn "
                f"cartoon faces, not people. {num_ids} identities, {per_id} images each.\n")


def draw_people(rng, num_ids):
    """Identity = a distinct combination of well-separated colours and proportions."""
    hues = np.linspace(0, 1, 8, endpoint=False)
    palette = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.7, v)) for h in hues for v in (0.55, 0.95)]
    people = []
    for c in rng.permutation(len(palette) ** 3 * 9)[:num_ids]:
        c, shape = divmod(int(c), 9)
        c, skin = divmod(c, len(palette))
        bg, hair = divmod(c, len(palette))
        people.append(dict(skin=palette[skin], hair=palette[hair], bg=palette[bg],
                           width=(0.45, 0.6, 0.75)[shape // 3], hair_h=(0.15, 0.3, 0.45)[shape % 3]))
    return people


def draw_face(rng, p, profile, size_range):
    """One picture of person p: position, scale, brightness and noise drawn from rng; 1% in grey."""
    s = rng.randint(*size_range)
    jitter = rng.uniform(-0.08, 0.08, 2) * s
    scale = rng.uniform(0.85, 1.1)
    img = Image.new("RGB", (s, s), tuple(int(c) for c in p["bg"]))
    d = ImageDraw.Draw(img)
    w, h = p["width"] * s * scale * (0.6 if profile else 1), 0.75 * s * scale
    cx, cy = s / 2 + jitter[0] + (0.12 * s if profile else 0), s / 2 + jitter[1]
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    d.ellipse(box, fill=tuple(int(c) for c in p["skin"]))
    d.chord([box[0], box[1], box[2], box[1] + 2 * p["hair_h"] * h], 180, 360, fill=tuple(int(c) for c in p["hair"]))
    for ex in ([cx + 0.1 * w] if profile else [cx - 0.2 * w, cx + 0.2 * w]):
        d.ellipse([ex - 0.04 * s, cy - 0.04 * s, ex + 0.04 * s, cy + 0.04 * s], fill=(20, 20, 20))
    a = np.asarray(img, dtype=np.float32) * rng.uniform(0.9, 1.1) + rng.normal(0, 8, (s, s, 3))
    img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    return img.convert("L") if rng.rand() < 0.01 else img


def sample_pairs(rng, fold_ids, kind, same, count):
    """count distinct 1-based (i, j) pairs: frontal,frontal (FF) or frontal,profile (FP)."""
    n_second = 10 if kind == "FF" else 4
    rows = set()
    while len(rows) < count:
        a = rng.choice(fold_ids)
        b = a if same else rng.choice([x for x in fold_ids if x != a])
        i, j = rng.randint(10), rng.randint(n_second)
        if kind == "FF" and same and i == j:
            continue
        rows.add((a * 10 + i + 1, b * n_second + j + 1))
    return sorted(rows)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=str, help="the folder to write, empty or not there yet")
    p.add_argument("--folders", action="store_true", help="identity folders, DIR/IDENTITY/NAME.jpg, of any size "
                                                          "(default: CFP's layout)")
    p.add_argument("--identities", type=int, default=100, help="--folders: identities (default: 100)")
    p.add_argument("--per-identity", type=int, default=14, help="--folders: images per identity (default: 14)")
    p.add_argument("--max-size", type=int, default=88,
                   help="--folders: largest image side; the smallest is half of it (default: 88)")
    p.add_argument("--seed", type=int, default=0, help="toy dataset seed (default: 0)")
    return p


def main(args):
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise UserError(f"{args.out}: the folder is not empty; choose another")
    if not args.folders:
        make_toy(args.out, seed=args.seed)
        return print(f"wrote the synthetic toy dataset to {args.out}")
    if args.identities < 2 or args.per_identity < 2 or args.max_size < 16:
        raise UserError("--folders needs --identities and --per-identity of 2 or more, --max-size 16+")
    make_toy_folders(args.out, args.identities, args.per_identity, (args.max_size // 2, args.max_size + 1),
                     args.seed)
    print(f"wrote {args.identities} x {args.per_identity} synthetic toy faces to {args.out}")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
