"""Datasets: CFP's protocol (Celebrities in Frontal-Profile), identity folders, the roles of a split, samplers.

Official layout (Sengupta et al., WACV 2016):

    ROOT/Data/Images/NNN/{frontal,profile}/NN.jpg
    ROOT/Protocol/Pair_list_F.txt, Pair_list_P.txt      "INDEX PATH", PATH relative to Protocol/
    ROOT/Protocol/Split/{FF,FP}/01..10/{same,diff}.txt  "i,j", 1-based; FF: frontal,frontal; FP: frontal,profile
    ROOT/Data/Fiducials/NNN/{frontal,profile}/NN.txt     30 landmarks, "x,y" per line (align.py), optional

Any other face dataset trains in torchvision's ImageFolder layout, one folder per identity:

    ROOT/IDENTITY/**/NAME.{jpg,jpeg,png,bmp,webp}        (no Protocol/ folder; pose and landmarks unknown)

The pixels (decoding, the uint8 bank, augmentation, normalisation) are images.py's.
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from align import NUM_POINTS
from images import same_pictures, thumbprints, warn
from utils import DataError, UserError, atomic_write, quote

KINDS = ("FF", "FP")
NUM_FOLDS = 10


# ---------------------------------------------------------------------------
# Protocol


@dataclass
class CFP:
    root: str
    paths: list          # absolute image paths: the frontal list, then the profile list
    identity: np.ndarray  # (N,) int, from the identity folder name
    profile: np.ndarray   # (N,) bool
    folds: dict           # fold (1-based int) -> {"FF": (P, 3), "FP": (P, 3)}, rows (a, b, same)
    landmarks: np.ndarray = None  # (N, 30, 2) float, image pixels; None when the dataset has no Data/Fiducials
    fingerprint: str = ""  # sha1 of the image list and every pair: which dataset a run was trained on
    layout: str = "cfp"    # "cfp", or "folders": identity folders (load_folders), with no protocol folds
    names: list = None     # identity folder names, by identity number

    def pairs(self, folds, kinds=KINDS):
        """All pairs of the given folds as (P, 3) int64 rows (a, b, same), and each row's kind."""
        rows = [self.folds[k][kind] for k in folds for kind in kinds]
        names = [kind for k in folds for kind in kinds for _ in self.folds[k][kind]]
        return np.concatenate(rows), np.array(names)

    def identities_of(self, folds):
        pairs, _ = self.pairs(folds)
        return np.unique(self.identity[pairs[:, :2]])

    def images_of(self, folds):
        """Every image of the identities that appear in the given folds."""
        return np.flatnonzero(np.isin(self.identity, self.identities_of(folds)))


def _read_lines(path):
    if not os.path.isfile(path):
        raise DataError(f"missing protocol file {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of line 1
            return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def is_number(text):
    """A protocol number: 1-9 ASCII digits (str.isdigit also takes other scripts' digits and superscripts)."""
    return text.isascii() and text.isdigit() and len(text) <= 9


def _read_image_list(root, name):
    path = os.path.join(root, "Protocol", name)
    protocol_dir = os.path.join(root, "Protocol")
    root_abs = os.path.abspath(root)
    paths = []
    for n, line in _read_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not is_number(parts[0]) or int(parts[0]) != len(paths) + 1:
            raise DataError(f"{path}:{n}: expected 'INDEX PATH' with INDEX {len(paths) + 1}, got {quote(line)}")
        # by the text of the path: `../..` may not leave the root, folders the user linked elsewhere may
        p = os.path.normpath(os.path.join(os.path.abspath(protocol_dir), parts[1]))
        if os.path.commonpath([p, root_abs]) != root_abs:
            raise DataError(f"{path}:{n}: {parts[1]!r} points outside the dataset root {root}")
        paths.append(p)
    if not paths:
        raise DataError(f"{path} lists no images")
    return paths


def _read_pairs(path, n_first, n_second, offset):
    rows = []
    for n, line in _read_lines(path):
        parts = line.split(",")
        if len(parts) != 2 or not all(is_number(p.strip()) for p in parts):
            raise DataError(f"{path}:{n}: expected 'i,j' with two positive integers, got {quote(line)}")
        i, j = int(parts[0]), int(parts[1])
        if not (1 <= i <= n_first and 1 <= j <= n_second):
            raise DataError(f"{path}:{n}: pair {i},{j} out of range (1..{n_first}, 1..{n_second})")
        rows.append((i - 1, offset + j - 1))
    return rows


def landmark_file(root, image_path):
    """Data/Images/NNN/frontal/NN.jpg -> Data/Fiducials/NNN/frontal/NN.txt (None outside Data/Images)."""
    rel = os.path.relpath(image_path, os.path.join(os.path.abspath(root), "Data", "Images"))
    if rel.startswith(os.pardir):
        return None
    return os.path.join(os.path.abspath(root), "Data", "Fiducials", os.path.splitext(rel)[0] + ".txt")


def read_landmarks(path):
    """A landmark file -> (30, 2) float64: one 'x,y' line per point, in image pixels."""
    points = []
    for n, line in _read_lines(path):
        parts = line.split(",")
        try:
            x, y = (float(p) for p in parts)
        except ValueError:
            raise DataError(f"{path}:{n}: expected 'x,y' with two numbers, got {quote(line)}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise DataError(f"{path}:{n}: landmark {quote(line)} is not finite")
        points.append((x, y))
    if len(points) != NUM_POINTS:
        raise DataError(f"{path}: {len(points)} landmarks, expected {NUM_POINTS}")
    return np.array(points)


def cfp_place(path):
    """(the root of the CFP layout a photo lies in, whether its folder says profile), or (None, None)."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1:i + 1] == ["Data", "Images"]:
            return os.sep.join(parts[:i - 1]) or os.sep, "profile" in parts[i + 1:-1]
    return None, None


def landmarks_of_photo(path):
    """(points, profile) for an image in a CFP-layout folder, from its Data/Fiducials file; the pose comes from
    the folder it is in (frontal or profile). A photo without a landmark file is refused, naming it."""
    root, profile = cfp_place(path)
    f = root and landmark_file(root, os.path.abspath(path))
    if f and os.path.isfile(f):
        return read_landmarks(f), profile
    raise DataError(f"{path} has no landmark file (Data/Fiducials/.../NN.txt beside a CFP-layout "
                    f"Data/Images/...): this run aligns faces by their landmarks")


def load_landmarks(root, paths):
    """Every image's landmarks (N, 30, 2), or None when the dataset has no Data/Fiducials folder."""
    if not os.path.isdir(os.path.join(root, "Data", "Fiducials")):
        return None
    files = [landmark_file(root, p) for p in paths]
    for p, f in zip(paths, files):
        if f is None:
            raise DataError(f"image {p} is not under Data/Images: its landmark file cannot be found")
        if not os.path.isfile(f):
            raise DataError(f"missing landmark file {f} (for {p})")
    return np.stack([read_landmarks(f) for f in files])


def load_cfp(root, flag="--data-root"):
    """Parse the protocol of a CFP-layout folder (errors name the flag that gave it). Images are not opened."""
    if not root or not os.path.isdir(root):
        raise DataError(f"{flag} {root!r} is not a folder (set {flag}" + (" or $CFP_ROOT; `python toy.py toy` writes "
                        "a synthetic one)" if flag == "--data-root" else ")"))
    if not os.path.isdir(os.path.join(root, "Protocol")):
        raise DataError(f"{flag} {root!r} has no Protocol/ folder: not a CFP-layout dataset")
    frontal = _read_image_list(root, "Pair_list_F.txt")
    profile = _read_image_list(root, "Pair_list_P.txt")
    paths = frontal + profile
    # Identity = the folder two levels above the file: Data/Images/NNN/frontal/NN.jpg
    names = [os.path.basename(os.path.dirname(os.path.dirname(p))) for p in paths]
    names, identity = np.unique(names, return_inverse=True)
    split_dir = os.path.join(root, "Protocol", "Split")
    folds = {}
    for k in range(1, NUM_FOLDS + 1):
        folds[k] = {}
        for kind in KINDS:
            n_second, offset = (len(frontal), 0) if kind == "FF" else (len(profile), len(frontal))
            d = os.path.join(split_dir, kind, f"{k:02d}")
            same = _read_pairs(os.path.join(d, "same.txt"), len(frontal), n_second, offset)
            diff = _read_pairs(os.path.join(d, "diff.txt"), len(frontal), n_second, offset)
            folds[k][kind] = np.array([(a, b, 1) for a, b in same] + [(a, b, 0) for a, b in diff],
                                      dtype=np.int64).reshape(-1, 3)
    h = hashlib.sha1("\n".join(os.path.relpath(p, root) for p in paths).encode())
    for k in sorted(folds):
        for kind in KINDS:
            h.update(np.ascontiguousarray(folds[k][kind]).tobytes())
    return CFP(root, paths, identity.astype(np.int64), np.arange(len(paths)) >= len(frontal), folds,
               load_landmarks(root, paths), h.hexdigest(), names=names.tolist())


def split_folds(protocol, test_fold=None):
    """Fold numbers per role. seed: 1-6 / 7-8 / 9-10. 10fold: test K, validation K+1 (1 after 10)."""
    if protocol == "seed":
        return {"train": [1, 2, 3, 4, 5, 6], "val": [7, 8], "test": [9, 10]}
    if protocol == "10fold":
        if test_fold is None or not 1 <= test_fold <= NUM_FOLDS:
            raise UserError(f"--protocol 10fold needs --test-fold between 1 and {NUM_FOLDS}, got {test_fold}")
        val = test_fold % NUM_FOLDS + 1
        train = [k for k in range(1, NUM_FOLDS + 1) if k not in (test_fold, val)]
        return {"train": train, "val": [val], "test": [test_fold]}
    raise UserError(f"unknown protocol {protocol!r}")


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


# ---------------------------------------------------------------------------
# Identity folders: any face dataset, ROOT/IDENTITY/**/NAME.jpg


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
HOLDOUT_PAIRS = 3000  # same-identity pairs (and as many different) per held-out role, at most


def load_dataset(root):
    """A CFP-layout folder (it has Protocol/) or an identity-folder dataset, told apart by the layout."""
    if root and os.path.isdir(root) and not os.path.isdir(os.path.join(root, "Protocol")) \
            and not os.path.isdir(os.path.join(root, "Data", "Images")):  # a CFP root without its protocol
        return load_folders(root)
    return load_cfp(root)


def load_folders(root):
    """ROOT/IDENTITY/**/*.jpg (torchvision's ImageFolder layout): one identity per folder, images at any depth
    below it, sorted. Pose and landmarks are unknown: every image counts as frontal."""
    if {"Images", "Fiducials"} & set(os.listdir(root)) and os.path.isdir(os.path.join(root, "..", "Protocol")):
        raise DataError(f"--data-root {root!r} looks like the Data/ folder of a CFP layout: give its root, "
                        f"{os.path.normpath(os.path.join(root, '..'))!r}")
    names = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    paths, identity = [], []
    for i, name in enumerate(names):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, name))
                       for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
        for f in [os.path.join(root, name)] + files:
            try:
                f.encode()
            except UnicodeEncodeError:  # a byte that is not UTF-8 (os gives it as a surrogate): no record holds it
                raise DataError(f"--data-root {root!r}: {os.path.relpath(f, root)!r} has a name that is not "
                                f"UTF-8; rename it") from None
        paths += files
        identity += [i] * len(files)
    if not paths:
        raise DataError(f"--data-root {root!r} has neither a Protocol/ folder (CFP's layout) nor identity folders "
                        f"with images ({', '.join(IMAGE_EXTENSIONS)}) inside: not a dataset")
    if len(set(identity)) < 2:
        raise DataError(f"--data-root {root!r}: one identity folder with images ({names[identity[0]]}); "
                        f"verification needs two or more")
    h = hashlib.sha1("\n".join(os.path.relpath(p, root) for p in paths).encode())
    return CFP(root, paths, np.array(identity, dtype=np.int64), np.zeros(len(paths), bool), {}, None,
               h.hexdigest(), layout="folders", names=names)


def join(train, held_out):
    """One dataset of an identity-folder training set and a CFP root that validates and tests it: held_out's
    images, identities and fold pairs come after train's. Landmarks the training folders lack are NaN."""
    n, ids = len(train.paths), len(train.names)
    folds = {k: {kind: p + np.array([n, n, 0]) for kind, p in f.items()} for k, f in held_out.folds.items()}
    landmarks = None
    if held_out.landmarks is not None or train.landmarks is not None:
        landmarks = np.concatenate([np.full((n, NUM_POINTS, 2), np.nan) if train.landmarks is None else train.landmarks,
                                    np.full((len(held_out.paths), NUM_POINTS, 2), np.nan)
                                    if held_out.landmarks is None else held_out.landmarks])
    fingerprint = hashlib.sha1(f"{train.fingerprint}+{held_out.fingerprint}".encode()).hexdigest()
    return CFP(train.root, train.paths + held_out.paths, np.concatenate([train.identity, held_out.identity + ids]),
               np.concatenate([train.profile, held_out.profile]), folds, landmarks, fingerprint, layout="folders",
               names=train.names + [f"{held_out.root}:{x}" for x in held_out.names])


def holdout_identities(ds, seed, fraction=0.1):
    """Identity-folder identities -> (train, val, test) identity arrays: fraction of those with 2+ images each
    for validation and for test (at least 2), drawn with the seed; the rest train."""
    counts = np.bincount(ds.identity, minlength=len(ds.names))
    eligible = np.random.default_rng([seed, 23]).permutation(np.flatnonzero(counts >= 2))
    k = max(2, round(fraction * len(ds.names)))
    if len(eligible) < 2 * k + 2:
        raise DataError(f"{ds.root}: {len(eligible)} identities with 2+ images; holding out {k} for validation and "
                        f"{k} for test needs at least {2 * k + 2} (or give --eval-root CFP_ROOT)")
    val, test = np.sort(eligible[:k]), np.sort(eligible[k:2 * k])
    return np.setdiff1d(np.arange(len(ds.names)), np.concatenate([val, test])), val, test


def draw_pairs(ds, ids, seed, n=HOLDOUT_PAIRS):
    """(P, 3) rows (a, b, same) among these identities' images: n same-identity pairs of two different images
    and n different-identity pairs (fewer when there are few identities), drawn once with the seed."""
    rng = np.random.default_rng([seed, 29])
    images = [np.flatnonzero(ds.identity == i) for i in ids]
    n = min(n, 10 * len(ids))
    rows = []
    for _ in range(n):
        a, b = rng.choice(images[rng.integers(len(ids))], 2, replace=False)
        rows.append((a, b, 1))
    for _ in range(n):
        i, j = rng.choice(len(ids), 2, replace=False)
        rows.append((rng.choice(images[i]), rng.choice(images[j]), 0))
    return np.array(rows, dtype=np.int64)


def split(root, eval_root, protocol, test_fold, seed, pairs_dir=None):
    """The dataset at root and its roles -> (dataset, folds, training images, (validation pairs, kinds), (test
    pairs, kinds)), for a CFP layout (its folds), identity folders validated and tested on eval_root's CFP folds,
    or identity folders with held-out identities (pairs drawn once with the seed; read again from pairs_dir's
    pairs_val.txt and pairs_test.txt where they are). Training never sees a validation or test person or image."""
    ds = load_dataset(root)
    if ds.layout == "cfp":
        if eval_root:
            raise UserError(f"--eval-root is for identity-folder training data; {root} is a CFP-layout dataset, "
                            f"which validates and tests on its own folds")
        folds = split_folds(protocol, test_fold)
        roles = ds, folds, ds.images_of(folds["train"]), ds.pairs(folds["val"]), ds.pairs(folds["test"])
    elif eval_root:
        n, folds = len(ds.paths), split_folds(protocol, test_fold)
        ds = join(ds, load_cfp(eval_root, "--eval-root"))
        roles = ds, {"train": f"identity folders of {root}", "val": folds["val"], "test": folds["test"]}, \
            np.arange(n), ds.pairs(folds["val"]), ds.pairs(folds["test"])
    else:
        train_ids, *held_out = holdout_identities(ds, seed)
        pairs = []
        for role, ids in zip(("val", "test"), held_out):
            path = pairs_dir and os.path.join(pairs_dir, f"pairs_{role}.txt")
            rows = read_pair_file(path, ds) if path and os.path.isfile(path) else draw_pairs(ds, ids, seed)
            pairs.append((rows, np.full(len(rows), "pairs")))
        folds = {"train": f"{len(train_ids)} identities", "val": f"{len(held_out[0])} held-out identities",
                 "test": f"{len(held_out[1])} held-out identities"}
        roles = ds, folds, np.flatnonzero(np.isin(ds.identity, train_ids)), *pairs
    check_held_out(*roles)
    return roles


def check_held_out(cfp, folds, train_images, val, test):
    """Training never sees a validation or test person or image, on any protocol; a layout that makes every
    image its own identity (a flattened folder) is refused before anything is trained."""
    if len(np.unique(cfp.identity[train_images])) == len(train_images):
        raise UserError(f"{cfp.root}: every training image is its own identity; is the layout "
                        f"Data/Images/<identity>/{{frontal,profile}}/NN.jpg (CFP) or IDENTITY/NAME.jpg (folders)?")
    held_out = np.unique(np.concatenate([val[0][:, :2].ravel(), test[0][:, :2].ravel()]))
    shared_ids = np.intersect1d(cfp.identity[train_images], cfp.identity[held_out])
    shared_images = np.intersect1d(train_images, held_out)
    names = np.array(cfp.names or [], dtype=object)
    same_names = cfp.layout == "folders" and \
        set(names[cfp.identity[train_images]]) & {n.split(":")[-1] for n in names[cfp.identity[held_out]]}
    if same_names:
        warn(f"{len(same_names)} training identity folders have the names of validation or test identities (e.g. "
             f"{sorted(same_names)[0]!r}): if they are the same people, the test is not held out")
    if len(shared_ids) or len(shared_images):
        raise UserError(f"{cfp.root}: {len(shared_ids)} identities and {len(shared_images)} images of the validation "
                        f"or test folds {folds['val'] + folds['test']} are also in the training folds; the folds "
                        f"must be identity-disjoint (python check.py {cfp.root})")
    if not len(val[0]):
        raise UserError(f"{cfp.root}: validation folds {folds['val']} hold no pairs")


def check_not_seen(bank, train_images, held_out, cfp, data_root, eval_root, chunk=4096):
    """Refuse a training image that is a validation or test image of --eval-root under another name: the same
    decoded pixels (a link or a renamed copy)."""
    held_out = np.unique(held_out)
    prints = thumbprints(bank[held_out])
    same = [(train_images[k + i], held_out[j]) for k in range(0, len(train_images), chunk)
            for i, j in same_pictures(thumbprints(bank[train_images[k:k + chunk]]), prints)]
    if same:
        a, b = same[0]
        raise UserError(f"{len(same)} training images of {data_root} are validation or test images of --eval-root "
                        f"{eval_root} (the same pixels), e.g. {cfp.paths[a]} = {cfp.paths[b]}: the test would not "
                        f"be held out")


def write_pair_file(path, ds, pairs):
    """The run's own held-out pairs, one JSON list [A, B, SAME] a line, A and B relative to the dataset root:
    any file name round-trips, commas, spaces and line breaks included."""
    rel = [os.path.relpath(p, ds.root) for p in ds.paths]
    atomic_write(path, "".join(json.dumps([rel[a], rel[b], int(same)]) + "\n" for a, b, same in pairs))


def read_pair_file(path, ds):
    """A pair file written by write_pair_file -> (P, 3) rows; a line naming an image not in ds is refused."""
    index = {os.path.relpath(p, ds.root): i for i, p in enumerate(ds.paths)}
    rows = []
    for n, line in _read_lines(path):
        try:
            a, b, same = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{n}: expected a JSON list [A, B, SAME], got {quote(line)} (pair files of runs "
                            f"before this format: the commit named in results/STUDIES.md)") from None
        for p in (a, b):
            if p not in index:
                raise DataError(f"{path}:{n}: image {p!r} is not in {ds.root}")
        rows.append((index[a], index[b], int(same)))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


class PairSet:
    """Pairs (a, b, same) for losses that compare two images: the protocol's fixed pairs."""
    sampling = "pairs"

    def __init__(self, pairs):
        self.pairs = torch.as_tensor(pairs)

    def __len__(self):
        return len(self.pairs)

    def new_epoch(self, seed, epoch):
        pass

    def batch(self, bank, idx, swap=False):
        a, b, same = self.pairs[idx].unbind(1)
        if swap:  # a pair is unordered: show the decision network both orders
            s = torch.rand(len(a)) < 0.5
            a, b = torch.where(s, b, a), torch.where(s, a, b)
        return (bank[a], bank[b]), same


class IdentityPairSet(PairSet):
    """Fresh pairs every epoch, drawn from all images of the training identities.

    CFP: as many pairs as the protocol has for these folds, in the protocol's proportions: half FF (two
    frontal images), half FP (frontal, profile); each half half same-identity, half different. Identity
    folders (pose unknown): one pair per training image, half same-identity, half different."""

    def __init__(self, cfp, folds=None, images=None):
        if folds is not None:
            images = cfp.images_of(folds)
        super().__init__(cfp.pairs(folds)[0] if folds is not None else np.zeros((len(images), 3), np.int64))
        self.ids = np.unique(cfp.identity[images])
        self.frontal = [images[(cfp.identity[images] == i) & ~cfp.profile[images]] for i in self.ids]
        self.profiles = [images[(cfp.identity[images] == i) & cfp.profile[images]] for i in self.ids]
        if cfp.layout == "folders":
            self.frontal = self.profiles = [images[cfp.identity[images] == i] for i in self.ids]
            if len(self.ids) < 2 or min(map(len, self.frontal)) < 2:
                raise DataError(f"{cfp.root}: --pairs-from identities needs 2+ identities with 2+ images each")
        elif len(self.ids) < 2 or min(map(len, self.frontal)) < 2 or min(map(len, self.profiles)) < 1:
            raise DataError(f"{cfp.root}: --pairs-from identities needs 2+ identities with 2+ frontal and 1+ "
                            f"profile image each")

    def new_epoch(self, seed, epoch):
        rng = np.random.default_rng([seed, epoch, 7])
        n = len(self.pairs) // 4  # per (kind, same/different)
        rows = []
        for second in (self.frontal, self.profiles):
            for same in (1, 0):
                a = rng.integers(len(self.ids), size=n)
                b = a if same else (a + rng.integers(1, len(self.ids), size=n)) % len(self.ids)
                for i, j in zip(a, b):
                    x = rng.choice(self.frontal[i])
                    pool = second[j][second[j] != x]  # never an image with itself
                    rows.append((x, rng.choice(pool), same))
        self.pairs = torch.as_tensor(np.array(rows, dtype=np.int64))


class ImageSet:
    """Single images with identity labels 0..C-1, for classification (margin) losses."""
    sampling = "images"

    def __init__(self, indices, identity):
        self.indices = torch.as_tensor(indices)
        ids, labels = np.unique(identity[indices], return_inverse=True)
        self.identities = ids                      # dataset identity of each class centre
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.indices)

    @property
    def num_classes(self):
        return len(self.identities)

    def new_epoch(self, seed, epoch):
        pass

    def batch(self, bank, idx, swap=False):
        return (bank[self.indices[idx]],), self.labels[idx]


def training_set(sampling, pairs_from, cfp, folds, train_images):
    """Images with identity labels (margin losses), or pairs: fresh from the identities, or the protocol's."""
    if sampling == "images":
        return ImageSet(train_images, cfp.identity)
    if pairs_from == "identities":
        return IdentityPairSet(cfp, folds["train"]) if cfp.layout == "cfp" else \
            IdentityPairSet(cfp, images=train_images)
    if cfp.layout == "folders":
        raise UserError("--pairs-from protocol: an identity-folder dataset has no protocol pairs; use identities")
    return PairSet(cfp.pairs(folds["train"])[0])
