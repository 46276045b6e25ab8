"""Pictures without a face, in families of kinds, drawn from nothing but a random generator (and CFP's own
photos for the cfp family). The face finder trains on some families and is tested on others it never saw,
so that its test says how it does on pictures unlike its training ones.

    cfp       a mosaic of pieces of CFP photos, away from their faces (what the finder first trained on)
    gradient  two colours blended along a random direction, with soft blobs of a third
    noise     coloured value noise summed over several scales, from clouds to grain
    shapes    a scene of rectangles, ellipses, polygons and lines, filled and outlined, on a plain ground
    text      lines of random letters and digits in several sizes and colours, on a plain or blended ground
    texture   periodic patterns: stripes, checkerboards, plaids, dots and bricks at random scales and angles
    cells     a mosaic of plain-coloured cells around random centres (Voronoi), their borders dark
"""
import math
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import align
from images import open_image

FAMILIES = ("cfp", "gradient", "noise", "shapes", "text", "texture", "cells")
TRAIN_FAMILIES = ("cfp", "gradient", "noise", "shapes", "cells")   # what landmarks.py trains on by default
HELD_OUT_FAMILIES = ("text", "texture")                   # what it is tested on, besides the training kinds
CLUTTER_FAMILIES = ("gradient", "noise", "shapes")        # what train.py's --clutter shows around faces
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:-"


def colour(rng):
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def grid(w, h):
    """Pixel centres in units of the larger side: (h, w) arrays x and y."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return x / max(w, h), y / max(w, h)


def to_image(a):
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def gradient(w, h, rng):
    x, y = grid(w, h)
    angle = rng.uniform(0, 2 * math.pi)
    t = (x * math.cos(angle) + y * math.sin(angle))[..., None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    a = (1 - t) * np.array(colour(rng)) + t * np.array(colour(rng))
    for _ in range(rng.integers(0, 4)):  # soft blobs
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.5)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(0.3, 0.9)
        a = (1 - weight) * a + weight * np.array(colour(rng))
    return to_image(a)


def noise(w, h, rng):
    a = np.zeros((h, w, 3), np.float32)
    total = 0.0
    for k, cells in enumerate(rng.choice([2, 3, 4, 6, 8, 12, 16, 32, 64], size=rng.integers(2, 5), replace=False)):
        amplitude = rng.uniform(0.2, 1.0)
        small = rng.uniform(0, 255, (int(cells), int(cells), 3)).astype(np.uint8)
        a += amplitude * np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
        total += amplitude
    return to_image(a / total)


def shapes(w, h, rng):
    im = Image.new("RGB", (w, h), colour(rng))
    draw = ImageDraw.Draw(im)
    side = max(w, h)
    for _ in range(rng.integers(3, 30)):
        x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(-0.1, 1.0) * h
        s = side * rng.uniform(0.03, 0.5)
        x1, y1 = x0 + s * rng.uniform(0.3, 1.5), y0 + s * rng.uniform(0.3, 1.5)
        fill = colour(rng) if rng.random() < 0.8 else None
        line = colour(rng) if fill is None or rng.random() < 0.3 else None
        width = int(rng.integers(1, max(2, side // 40)))
        kind = rng.integers(4)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=line, width=width)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=fill, outline=line, width=width)
        elif kind == 2:
            n = int(rng.integers(3, 7))
            draw.polygon([(x0 + rng.uniform(0, s), y0 + rng.uniform(0, s)) for _ in range(n)], fill=fill,
                         outline=line)
        else:
            draw.line((x0, y0, x1, y1), fill=colour(rng), width=width)
    return im


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # a Pillow without FreeType: the one bitmap font
        return ImageFont.load_default()


def text(w, h, rng):
    im = gradient(w, h, rng) if rng.random() < 0.5 else Image.new("RGB", (w, h), colour(rng))
    draw = ImageDraw.Draw(im)
    y = rng.uniform(-0.1, 0.2) * h
    while y < h:
        size = int(max(6, max(w, h) * rng.uniform(0.03, 0.2)))
        words = "".join(rng.choice(list(LETTERS), size=int(rng.integers(3, 30))))
        draw.text((rng.uniform(-0.2, 0.5) * w, y), words, fill=colour(rng), font=font(size))
        y += size * rng.uniform(1.0, 2.0)
    return im


def texture(w, h, rng):
    x, y = grid(w, h)
    angle = rng.uniform(0, math.pi)
    u, v = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
    f = rng.uniform(3, 40)  # periods across the picture
    kind = rng.integers(5)
    if kind == 0:    # stripes
        t = 0.5 + 0.5 * np.sin(2 * math.pi * f * u)
    elif kind == 1:  # checkerboard
        t = ((np.floor(f * u) + np.floor(f * v)) % 2).astype(np.float32)
    elif kind == 2:  # plaid
        t = 0.5 + 0.25 * (np.sin(2 * math.pi * f * u) + np.sin(2 * math.pi * f * rng.uniform(0.5, 2) * v))
    elif kind == 3:  # dots
        t = (np.hypot((f * u) % 1 - 0.5, (f * v) % 1 - 0.5) < rng.uniform(0.15, 0.45)).astype(np.float32)
    else:            # bricks
        row = np.floor(f * v)
        t = (((f * v) % 1 < 0.15) | ((f * u / 2 + row / 2) % 1 < 0.08)).astype(np.float32)
    t = t[..., None]
    return to_image((1 - t) * np.array(colour(rng)) + t * np.array(colour(rng)))


def cells(w, h, rng):
    x, y = grid(w, h)
    n = int(rng.integers(4, 60))
    centres = rng.uniform(0, 1, (n, 2)) * [w, h] / max(w, h)
    d = np.stack([np.hypot(x - cx, y - cy) for cx, cy in centres])       # (n, h, w)
    near = np.partition(d, 1, 0)[:2]                                     # the nearest two centres
    colours = np.array([colour(rng) for _ in range(n)], np.float32)
    a = colours[d.argmin(0)]
    border = (near[1] - near[0]) < rng.uniform(0.002, 0.02)               # where two cells meet
    return to_image(np.where(border[..., None], a * 0.2, a))


def mosaic_picture(w, h, pieces, rng, tiles=4):
    """The cfp family: `tiles` x `tiles` pieces (PIL images) resized into tiles."""
    picture = Image.new("RGB", (w, h))
    tw, th = math.ceil(w / tiles), math.ceil(h / tiles)
    for ty in range(tiles):
        for tx in range(tiles):
            picture.paste(pieces[rng.integers(len(pieces))].resize((tw, th), Image.BILINEAR), (tx * tw, ty * th))
    return picture


DRAW = {"gradient": gradient, "noise": noise, "shapes": shapes, "text": text, "texture": texture, "cells": cells}


def picture(family, w, h, rng, pieces=None):
    """A w x h picture without a face of one family (cfp needs the background pieces)."""
    if family == "cfp":
        return mosaic_picture(w, h, pieces, rng)
    if family not in DRAW:
        raise ValueError(f"unknown background family {family!r} (choose from {', '.join(FAMILIES)})")
    return DRAW[family](w, h, rng)


def pictures(families, n, size, rng):
    """n square pictures of the drawn families (not cfp), as uint8 (n, 3, size, size), in turn by family."""
    out = np.stack([np.asarray(picture(families[k % len(families)], size, size, rng)) for k in range(n)])
    return out.transpose(0, 3, 1, 2)


def clutter_pool(size, seed, n=512):
    """The CLUTTER_FAMILIES as train.py's --clutter shows them around faces, beside its mosaic of faces
    (images.clutter): n square pictures, uint8 (n, 3, size, size), and how many families they hold."""
    families = list(CLUTTER_FAMILIES)
    drawn = pictures(families, n, size, np.random.default_rng(seed))
    return SimpleNamespace(pictures=torch.from_numpy(np.ascontiguousarray(drawn)), families=len(families))


# ---------------------------------------------------------------------------
# Pictures larger than a face: a photo pasted into a background


def backdrop(family, w, h, rng, pieces=None, detail=512):
    """A w x h picture without a face; the drawn families at most `detail` pixels on the longer side, then
    enlarged (the finder's closest look at a face pasted at 1/4 sees about that detail)."""
    if family == "cfp":
        return mosaic_picture(w, h, pieces, rng)
    s = min(1.0, detail / max(w, h))
    im = picture(family, max(1, round(w * s)), max(1, round(h * s)), rng)
    return im if s == 1 else im.resize((w, h), Image.BILINEAR)


def paste(im, fraction, family, rng, pieces=None):
    """im pasted at a random place into a picture 1/fraction times its width and height, on a background of
    the family. -> (picture, matrix from im's pixels to the picture's)."""
    w, h = im.size
    W, H = round(w / fraction), round(h / fraction)
    picture = backdrop(family, W, H, rng, pieces)
    x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    picture.paste(im, (x0, y0))
    return picture, np.array([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1]])


def background_pieces(pictures, points, poses, frac=0.3):
    """Corner squares of photos that stay outside their face boxes (PIL images)."""
    out = []
    for im, p, pose in zip(pictures, points, poses):
        w, h = im.size
        face, side = align.face_box(p, pose), int(frac * min(w, h))
        for x, y in ((0, 0), (w - side, 0), (0, h - side), (w - side, h - side)):
            if x + side <= face[0] or x >= face[2] or y + side <= face[1] or y >= face[3]:
                out.append(im.crop((x, y, x + side, y + side)))
    return out


def backgrounds_of(cfp, indices, rng, n=400):
    """Background pieces (background_pieces) from n of the photos `indices`, by their given landmarks."""
    some = np.asarray(indices)[rng.choice(len(indices), min(len(indices), n), replace=False)]
    return background_pieces([open_image(cfp.paths[i]) for i in some], cfp.landmarks[some],
                             [align.pose_of(cfp.landmarks[i], cfp.profile[i]) for i in some])
