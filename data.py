"""CFP (Celebrities in Frontal-Profile): protocol parsing, image cache, batches.

Official layout (Sengupta et al., WACV 2016):

    ROOT/Data/Images/NNN/{frontal,profile}/NN.jpg
    ROOT/Protocol/Pair_list_F.txt, Pair_list_P.txt      "INDEX PATH", PATH relative to Protocol/
    ROOT/Protocol/Split/{FF,FP}/01..10/{same,diff}.txt  "i,j", 1-based; FF: frontal,frontal; FP: frontal,profile
    ROOT/Data/Fiducials/NNN/{frontal,profile}/NN.txt     30 landmarks, "x,y" per line (align.py), optional

Any other face dataset trains in torchvision's ImageFolder layout, one folder per identity:

    ROOT/IDENTITY/**/NAME.{jpg,jpeg,png,bmp,webp}        (no Protocol/ folder; pose and landmarks unknown)

Every image is decoded, aligned or resized once into a uint8 tensor; augmentation and
normalisation then run on whole batches, on the training device.

    python data.py --check DIR      summary of a dataset folder and its landmarks, non-zero exit on the first problem
    python data.py --make-toy DIR   write a small synthetic dataset in the same layout
    python data.py --make-toy-folders DIR [--identities N --per-identity M]   synthetic identity folders
    python data.py --to-folders CFP_ROOT DIR [--folds 1 2 ...]   CFP's images as identity folders (symbolic links)
"""
import argparse
import glob
import hashlib
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from align import NUM_POINTS
from utils import UserError, atomic_save, atomic_write, run_cli

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("FF", "FP")
NUM_FOLDS = 10


class DataError(UserError):
    pass


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


def quote(text, limit=60):
    """repr() of an input line, cut short: a 50 MB line must not become a 50 MB error message."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


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


def landmarks_of_photo(path):
    """(points, profile) for an image in a CFP-layout folder, from its Data/Fiducials file; the pose comes from
    the folder it is in (frontal or profile). A photo without a landmark file is refused, naming it."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1:i + 1] == ["Data", "Images"]:
            f = landmark_file(os.sep.join(parts[:i - 1]) or os.sep, os.path.abspath(path))
            if os.path.isfile(f):
                return read_landmarks(f), "profile" in parts[i + 1:-1]
            break
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


def load_cfp(root):
    """Parse the protocol of a CFP-layout folder. Images are not opened here."""
    if not root or not os.path.isdir(root):
        raise DataError(f"--data-root {root!r} is not a folder (set --data-root or $CFP_ROOT; "
                        f"`python data.py --make-toy toy` writes a synthetic one)")
    if not os.path.isdir(os.path.join(root, "Protocol")):
        raise DataError(f"--data-root {root!r} has no Protocol/ folder: not a CFP-layout dataset")
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
    names = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    paths, identity = [], []
    for i, name in enumerate(names):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, name))
                       for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += files
        identity += [i] * len(files)
    if not paths:
        raise DataError(f"--data-root {root!r} has neither a Protocol/ folder (CFP's layout) nor identity folders "
                        f"with images ({', '.join(IMAGE_EXTENSIONS)}) inside: not a dataset")
    if len(names) < 2:
        raise DataError(f"--data-root {root!r}: one identity folder ({names[0]}); verification needs two or more")
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


def write_pair_file(path, ds, pairs):
    """Pairs as 'a,b,same' lines, a and b relative to the dataset root: the run's own held-out pairs."""
    rel = [os.path.relpath(p, ds.root) for p in ds.paths]
    lines = [f"{rel[a]},{rel[b]},{same}" for a, b, same in pairs]
    if any("," in rel[i] for i in np.unique(pairs[:, :2])):
        raise DataError(f"{ds.root}: an image path contains a comma; rename it to hold its pairs in a file")
    atomic_write(path, "\n".join(lines) + "\n")


def read_pair_file(path, ds):
    """A pair file written by write_pair_file -> (P, 3) rows; a line naming an image not in ds is refused."""
    index = {os.path.relpath(p, ds.root): i for i, p in enumerate(ds.paths)}
    rows = []
    for n, line in _read_lines(path):
        parts = line.rsplit(",", 2)
        if len(parts) != 3 or parts[2] not in ("0", "1"):
            raise DataError(f"{path}:{n}: expected 'A,B,SAME' with SAME 0 or 1, got {quote(line)}")
        for p in parts[:2]:
            if p not in index:
                raise DataError(f"{path}:{n}: image {p!r} is not in {ds.root}")
        rows.append((index[parts[0]], index[parts[1]], int(parts[2])))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


# ---------------------------------------------------------------------------
# Images: decode once, keep uint8


RESIZE_MODES = ("pad", "crop", "squash")


def to_square(im, size, resize="pad"):
    """PIL RGB image -> size x size. pad: whole image, aspect kept, black borders; crop: centre square,
    aspect kept; squash: stretched to the square (the seed's transform)."""
    w, h = im.size
    if resize == "squash":
        return im.resize((size, size), Image.BILINEAR)
    if resize == "crop":
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        return im.resize((size, size), Image.BILINEAR, box=box)
    if resize == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        out = Image.new("RGB", (size, size))
        out.paste(im.resize((nw, nh), Image.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
        return out
    raise ValueError(f"unknown resize mode {resize!r}")


def warp(im, matrix, size):
    """PIL image -> size x size through `matrix` (3x3, the image's pixels -> the output's pixels).

    A large image is first shrunk by a box filter to at most twice the output's scale, so that the
    bilinear sampling of the warp does not alias."""
    scale = math.sqrt(abs(np.linalg.det(matrix[:2, :2])))  # output pixels per image pixel
    k = max(1, int(0.5 / scale))
    if k > 1:
        im = im.reduce(k)
    inverse = np.diag([1 / k, 1 / k, 1.0]) @ np.linalg.inv(matrix)  # output pixel -> (shrunk) image pixel
    return im.transform((size, size), Image.AFFINE, tuple(inverse[:2].ravel()), Image.BILINEAR)


def to_rgb(im, path):
    """Any mode -> RGB as an image viewer shows it: 16- and 32-bit greys scaled to 8 bits (convert() would
    clip them to white), transparency composited on white; a fully transparent picture is refused."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray((a / top * 255).clip(0, 255).round().astype(np.uint8))
    elif im.mode == "F":
        raise DataError(f"cannot decode image {path}: floating-point pixels (mode F) have no standard brightness")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        alpha = im.getchannel("A")
        if alpha.getextrema()[1] == 0:
            raise DataError(f"cannot decode image {path}: it is fully transparent")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def open_image(path, draft=None):
    """File -> RGB PIL image as an image viewer shows it: EXIF orientation applied, any mode (grayscale, CMYK,
    16-bit, transparency) made RGB; errors name the file. draft: let a JPEG decoder downscale towards it."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or a device would block open() forever
        raise DataError(f"image {path} is {'a folder' if os.path.isdir(path) else 'not a regular file'}")
    try:
        with Image.open(path) as im:
            if draft:
                im.draft("RGB", (draft, draft))  # JPEG: let the decoder downscale by 1/2..1/8 first
            try:
                im = ImageOps.exif_transpose(im)  # as a photo viewer shows it, whichever way the camera held it
            except Exception as e:  # Pillow's EXIF parsing of a damaged file can raise almost anything
                raise DataError(f"cannot read the EXIF data of image {path} ({type(e).__name__})") from None
            return to_rgb(im, path)
    except FileNotFoundError:
        raise DataError(f"missing image {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path}: {quote(str(e), 120)}") from None


def decode_image(path, size, resize="pad", matrix=None):
    """File -> (3, size, size) uint8 tensor. Any size, any mode (grayscale, CMYK, ...) becomes RGB.

    With matrix (3x3, from align.py), the face is warped by it instead of the whole image resized."""
    im = open_image(path, draft=size if matrix is None else None)
    try:
        im = to_square(im, size, resize) if matrix is None else warp(im, matrix, size)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot decode image {path}: {quote(str(e), 120)}") from None
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def _cache_file(cache_dir, paths, size, resize, matrices=None):
    h = hashlib.sha1(f"{size}{resize}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    view = resize
    if matrices is not None:  # aligned: the warps are part of what was decoded
        h.update(np.ascontiguousarray(np.asarray(matrices, dtype=np.float64).round(6)).tobytes())
        view = "aligned"
    return os.path.join(cache_dir, f"cfp_{size}px_{view}_{len(paths)}img_{h.hexdigest()[:16]}.pt")


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_cache(path, shape):
    """The cached images, or None (with a warning) when the file is damaged or holds something else.
    Temp files that a killed write left beside it are removed first."""
    for tmp in glob.glob(glob.escape(path) + ".tmp[0-9]*"):
        os.remove(tmp)
    if not os.path.isfile(path):
        return None
    try:
        images = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: any of torch's, pickle's or zipfile's errors
        warn(f"cache {path} cannot be read ({type(e).__name__}): decoding the images again")
        return None
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != shape:
        warn(f"cache {path} holds something else than {shape} uint8 images: decoding the images again")
        return None
    return images


def write_cache(images, path):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save(images, path)
    except (OSError, UserError) as e:  # a full disk or a read-only folder: the run goes on without a cache
        warn(f"the image cache {path} could not be written ({e}); going on without it")


def load_images(paths, size, workers=2, cache_dir="", resize="pad", matrices=None):
    """Decode every path once, resized whole or warped by its matrix (align.py): (N, 3, size, size) uint8.

    With cache_dir, the tensor is stored on disk keyed by the file list, sizes, mtimes, the image
    size and the warps, so later runs skip decoding. The cache is optional: whatever goes wrong with it,
    the images are decoded."""
    cache = None
    if cache_dir:
        try:
            cache = _cache_file(cache_dir, paths, size, resize, matrices)
        except OSError as e:  # a missing image: decoding will name it
            warn(f"--cache-dir: {e.filename} cannot be read; decoding without the cache")
    images = read_cache(cache, (len(paths), 3, size, size)) if cache else None
    if images is not None:
        return images
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    matrices = [None] * len(paths) if matrices is None else matrices
    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, img in enumerate(pool.map(lambda p, m: decode_image(p, size, resize, m), paths, matrices)):
            out[i] = img
    if cache:
        write_cache(out, cache)
    return out


def map_images(paths, size, workers=2, cache_dir="", resize="pad", matrices=None, chunk=1024):
    """load_images for a set larger than memory: (N, 3, size, size) uint8 backed by an .npy file in cache_dir,
    decoded chunk by chunk (under torchrun, rank r decodes chunks r, r + world, ...); a file a killed run
    left half-written is decoded again, since only a finished one is renamed to its final name."""
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    path = _cache_file(cache_dir, paths, size, resize, matrices)[:-len(".pt")] + ".npy"
    shape = (len(paths), 3, size, size)
    images = read_mapped(path, shape)
    if images is None:
        tmp = f"{path}.part"
        if rank == 0:
            os.makedirs(cache_dir, exist_ok=True)
            np.lib.format.open_memmap(tmp, "w+", np.uint8, shape).flush()
        if world > 1:
            dist.barrier()
        out = np.load(tmp, mmap_mode="r+")
        matrices = [None] * len(paths) if matrices is None else matrices
        chunk = max(1, min(chunk, -(-len(paths) // world)))  # every rank has a share, however few the images
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for start in range(rank * chunk, len(paths), world * chunk):
                end = min(start + chunk, len(paths))
                decoded = pool.map(lambda p, m: decode_image(p, size, resize, m), paths[start:end], matrices[start:end])
                out[start:end] = torch.stack(list(decoded)).numpy()
        out.flush()
        del out
        if world > 1:
            dist.barrier()
        if rank == 0:
            os.replace(tmp, path)
        if world > 1:
            dist.barrier()
        images = read_mapped(path, shape)
    return torch.from_numpy(images)


def read_mapped(path, shape):
    """The .npy bank at path, mapped copy-on-write (rows are read from disk as they are indexed), or None."""
    if not os.path.isfile(path):
        return None
    try:
        images = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as e:
        warn(f"cache {path} cannot be read ({type(e).__name__}): decoding the images again")
        return None
    if images.dtype != np.uint8 or images.shape != shape:
        warn(f"cache {path} holds something else than {shape} uint8 images: decoding the images again")
        return None
    return images


class ImageBank:
    """The uint8 images a run needs, and the map from dataset index to row.

    A set larger than memory_gib (default: half of this machine's memory) is decoded chunk by chunk into a
    memory-mapped file in cache_dir, which the operating system pages in as batches need it; under torchrun
    each rank decodes only its share of that file."""

    def __init__(self, cfp, indices, size, workers=2, cache_dir="", device="cpu", resize="pad", aligner=None,
                 memory_gib=None):
        self.indices = np.unique(indices)
        self.row = np.full(len(cfp.paths), -1, dtype=np.int64)
        self.row[self.indices] = np.arange(len(self.indices))
        need, memory = len(self.indices) * 3 * size * size, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = 0.5 * memory if memory_gib is None else memory_gib * 2**30
        mapped = need > budget
        if mapped and not cache_dir:
            raise DataError(f"--img-size {size}: the decoded images would need {need / 2**30:.1f} GiB "
                            f"({len(self.indices)} x 3 x {size} x {size} bytes), more than the "
                            f"{budget / 2**30:.1f} GiB --bank-memory allows in memory; give --cache-dir DIR to keep "
                            f"them in a memory-mapped file there, or choose a smaller --img-size")
        matrices = None
        if aligner is not None:  # each face warped by its own landmarks (align.py)
            if cfp.landmarks is None or np.isnan(cfp.landmarks[self.indices]).any():
                raise DataError(f"{cfp.root}: images without landmarks (no Data/Fiducials) cannot be aligned; use "
                                f"--align none, or --landmark-net RUN to predict them")
            matrices = [aligner.matrix(cfp.landmarks[i], cfp.profile[i], size) for i in self.indices]
        paths = [cfp.paths[i] for i in self.indices]
        if mapped:
            self.images = map_images(paths, size, workers, cache_dir, resize, matrices)
            return
        images = load_images(paths, size, workers, cache_dir, resize, matrices)
        # On a GPU the whole uint8 set lives on the device: batches never cross PCIe.
        self.images = images.to(device)

    @classmethod
    def of(cls, num_images, indices, images):
        """A bank of images decoded elsewhere: images[k] is dataset image indices[k] (indices unique)."""
        bank = cls.__new__(cls)
        bank.indices, bank.images = np.asarray(indices), images
        bank.row = np.full(num_images, -1, dtype=np.int64)
        bank.row[bank.indices] = np.arange(len(bank.indices))
        return bank

    def __getitem__(self, dataset_indices):
        rows = self.row[np.asarray(dataset_indices)]
        if (rows < 0).any():  # row -1 would silently read the last image
            missing = np.asarray(dataset_indices)[rows < 0]
            raise IndexError(f"images {missing[:5].tolist()} are not in the image bank")
        return self.images[torch.as_tensor(rows, device=self.images.device)]


def preprocess(x, train=False, jitter=False, clutter_p=0.0, clutter_pieces=None):
    """uint8 (B, 3, H, W) -> float normalised with ImageNet mean/std, augmented if train."""
    x = x.float() / 255
    if train:
        x = augment(clutter(x, clutter_p, clutter_pieces) if clutter_p else x, jitter=jitter)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x, max_degrees=20.0, jitter=False, max_scale=0.15, max_shift=0.1, max_color=0.3, p_gray=0.2):
    """Random horizontal flip and rotation in [-max_degrees, max_degrees], per image, batched.

    jitter adds a random zoom in [1 - max_scale, 1 + max_scale], a shift of up to max_shift of the side,
    brightness, contrast and saturation factors in [1 - max_color, 1 + max_color] and grey with
    probability p_gray. x: (B, 3, H, W) float in [0, 1]; the borders moved in are black. Parameters
    come from the CPU generator, so runs repeat on any device."""
    b = x.shape[0]
    flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)                  # (B,)
    angle = (torch.rand(b) * 2 - 1) * math.radians(max_degrees)         # (B,)
    zoom, shift = torch.ones(b), torch.zeros(2, b)
    if jitter:
        zoom = 1 + (torch.rand(b) * 2 - 1) * max_scale                  # > 1 shows more of the image
        shift = (torch.rand(2, b) * 2 - 1) * 2 * max_shift              # in [-1, 1] grid units
    cos, sin = zoom * torch.cos(angle), zoom * torch.sin(angle)
    # Output->input sampling matrix: rotation and zoom composed with a mirror of the x axis, then a shift.
    theta = torch.stack([torch.stack([flip * cos, -sin, shift[0]], 1),
                         torch.stack([flip * sin, cos, shift[1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if jitter:
        x = color_jitter(x, max_color, p_gray)
    return x


def mosaic(patches, n, size, gen=None):
    """n backgrounds, each k x k of the patches (k from 1 to 4, drawn once) resized into tiles:
    float (n, 3, size, size) in the patches' units. patches: (P, 3, h, w)."""
    k = int(torch.randint(1, 5, (1,), generator=gen))
    tile = math.ceil(size / k)
    pick = torch.randint(len(patches), (n, k * k), generator=gen).to(patches.device)
    tiles = F.interpolate(patches[pick.view(-1)].float(), size=(tile, tile), mode="bilinear",
                          align_corners=False).view(n, k, k, 3, tile, tile)
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, k * tile, k * tile)[..., :size, :size]


def clutter(x, p=0.5, pieces=None):
    """Where an aligned face's square reached outside its photo, a mosaic of pieces instead of black, in a
    share p of the images: the surroundings a face found in a larger picture has (landmarks.py). The pieces
    are `pieces` (uint8 (P, 3, h, w): train.py --clutter-from photos, corners of photos outside their faces)
    or the batch images' central halves, which lie inside their photos. The pixels replaced are those black
    in every channel, as the warp leaves outside the photo; a photo's own pixel that is exactly (0, 0, 0)
    goes too, which an augmentation can afford. x: (B, 3, H, W) in [0, 1]."""
    b, size = x.shape[0], x.shape[-1]
    outside = (x == 0).all(1, keepdim=True) & (torch.rand(b) < p).to(x.device).view(b, 1, 1, 1)
    q = size // 4
    fill = mosaic(x[..., q:size - q, q:size - q], b, size) if pieces is None else mosaic(pieces, b, size) / 255
    return torch.where(outside, fill.to(x.dtype), x)


def color_jitter(x, max_color=0.3, p_gray=0.2):
    """Per-image brightness, contrast and saturation factors in [1 - max_color, 1 + max_color], then grey
    with probability p_gray (the torchvision ColorJitter/RandomGrayscale operations, batched)."""
    b = x.shape[0]
    factors = (1 + (torch.rand(3, b) * 2 - 1) * max_color).to(x.device, x.dtype).view(3, b, 1, 1, 1)
    gray_p = (torch.rand(b) < p_gray).to(x.device, x.dtype).view(b, 1, 1, 1)
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = x * factors[0]                                                           # brightness
    mean_gray = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)    # (B, 1, 1, 1)
    x = (x - mean_gray) * factors[1] + mean_gray                                 # contrast
    gray = (x * weights).sum(1, keepdim=True)                                    # (B, 1, H, W)
    x = (x - gray) * factors[2] + gray                                           # saturation
    x = x * (1 - gray_p) + gray * gray_p
    return x.clamp(0, 1)


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
                raise DataError("--pairs-from identities needs 2+ identities with 2+ images each")
        elif len(self.ids) < 2 or min(map(len, self.frontal)) < 2 or min(map(len, self.profiles)) < 1:
            raise DataError("--pairs-from identities needs 2+ identities with 2+ frontal and 1+ profile image each")

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


# ---------------------------------------------------------------------------
# Command line


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
    counts = np.bincount(ds.identity)
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
    g.add_argument("--check", metavar="DIR", type=str, help="summarise and verify a CFP-layout dataset folder")
    g.add_argument("--make-toy", metavar="DIR", type=str, help="write the synthetic toy dataset into DIR")
    g.add_argument("--make-toy-folders", metavar="DIR", type=str,
                   help="write synthetic toy faces as identity folders, DIR/IDENTITY/NAME.jpg")
    g.add_argument("--to-folders", metavar=("CFP_ROOT", "DIR"), type=str, nargs=2,
                   help="link the images of a CFP root's identities into DIR as identity folders")
    parser.add_argument("--folds", type=int, nargs="+", default=None,
                        help="with --to-folders: only the identities of these folds (default: all)")
    parser.add_argument("--identities", type=int, default=100, help="--make-toy-folders: identities (default: 100)")
    parser.add_argument("--per-identity", type=int, default=14,
                        help="--make-toy-folders: images per identity (default: 14)")
    parser.add_argument("--max-size", type=int, default=88,
                        help="--make-toy-folders: largest image side; the smallest is half of it (default: 88)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="toy dataset seed (default: 0)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def main(args):
    if args.make_toy:
        if os.path.exists(os.path.join(args.make_toy, "Protocol")):
            raise UserError(f"--make-toy {args.make_toy}: a dataset is already there; choose another folder")
        from toy import make_toy
        make_toy(args.make_toy, seed=args.seed)
        print(f"wrote the synthetic toy dataset to {args.make_toy}")
    elif args.make_toy_folders:
        from toy import make_toy_folders
        if os.path.isdir(args.make_toy_folders) and os.listdir(args.make_toy_folders):
            raise UserError(f"--make-toy-folders {args.make_toy_folders}: the folder is not empty; choose another")
        if args.identities < 2 or args.per_identity < 2 or args.max_size < 16:
            raise UserError("--make-toy-folders needs --identities and --per-identity of 2 or more, --max-size 16+")
        make_toy_folders(args.make_toy_folders, args.identities, args.per_identity,
                         (args.max_size // 2, args.max_size + 1), args.seed)
        print(f"wrote {args.identities} x {args.per_identity} synthetic toy faces to {args.make_toy_folders}")
    elif args.to_folders:
        to_folders(*args.to_folders, args.folds)
    else:
        check(args.check, args.workers)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    run_cli(main, args)
