"""Pixels: every image decoded once (aligned or resized whole) into one uint8 bank, kept in memory or in a
memory-mapped file; augmentation and the one normalisation then run on whole batches, on the training device.
"""
import glob
import hashlib
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from utils import DataError, UserError, atomic_save, quote

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


RESIZE_MODES = ("pad", "squash")


def to_square(im, size, resize="pad"):
    """PIL RGB image -> size x size. pad: whole image, aspect kept, black borders; squash: stretched to the
    square (the seed's transform)."""
    w, h = im.size
    if resize == "squash":
        return im.resize((size, size), Image.BILINEAR)
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
            im.load()  # the pixels first: a truncated file is a decoding error, not an EXIF one
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
        st = os.stat(p)  # the change time and the inode too: `cp -p` and `rsync -a` keep a size and an mtime
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
    view = resize
    if matrices is not None:  # aligned: the warps are part of what was decoded
        h.update(np.ascontiguousarray(np.asarray(matrices, dtype=np.float64).round(6)).tobytes())
        view = "aligned"
    return os.path.join(cache_dir, f"cfp_{size}px_{view}_{len(paths)}img_{h.hexdigest()[:16]}.pt")


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_cache(path, shape):
    """The cached (images, content hash), or None (with a warning) when the file is damaged or holds something
    else. Temp files that a killed write left beside it are removed first."""
    for tmp in glob.glob(glob.escape(path) + ".tmp[0-9]*"):
        os.remove(tmp)
    if not os.path.isfile(path):
        return None
    try:
        cached = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: any of torch's, pickle's or zipfile's errors
        warn(f"cache {path} cannot be read ({type(e).__name__}): decoding the images again")
        return None
    images = cached.get("images") if isinstance(cached, dict) else None
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != shape or \
            not isinstance(cached.get("content"), str):
        warn(f"cache {path} holds something else than {shape} uint8 images: decoding the images again")
        return None
    return images, cached["content"]


def write_cache(images, content, path):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save({"images": images, "content": content}, path)
    except (OSError, UserError) as e:  # a full disk or a read-only folder: the run goes on without a cache
        warn(f"the image cache {path} could not be written ({e}); going on without it")


def load_images(paths, size, workers=2, cache_dir="", resize="pad", matrices=None):
    """Decode every path once, resized whole or warped by its matrix (align.py): (N, 3, size, size) uint8.

    -> (images, a hash of the files' contents). With cache_dir, both are stored on disk keyed by the file list,
    sizes, times, inodes, the image size and the warps, so later runs skip decoding. The cache is optional:
    whatever goes wrong with it, the images are decoded."""
    cache = None
    if cache_dir:
        try:
            cache = _cache_file(cache_dir, paths, size, resize, matrices)
        except OSError as e:  # a missing image: decoding will name it
            warn(f"--cache-dir: {e.filename} cannot be read; decoding without the cache")
    cached = read_cache(cache, (len(paths), 3, size, size)) if cache else None
    if cached is not None:
        return cached
    out, digests = torch.empty(len(paths), 3, size, size, dtype=torch.uint8), []
    matrices = [None] * len(paths) if matrices is None else matrices
    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, (img, digest) in enumerate(pool.map(lambda p, m: (decode_image(p, size, resize, m), file_sha1(p)),
                                                   paths, matrices)):
            out[i] = img
            digests.append(digest)
    content = hashlib.sha1("".join(digests).encode()).hexdigest()
    if cache:
        write_cache(out, content, cache)
    return out, content


def file_sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


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
        # each writer its own temporary file (torchrun's ranks share their launcher's), renamed when whole
        tmp = f"{path}.part{os.getppid() if world > 1 else os.getpid()}"
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


def memory_budget():
    """Bytes of decoded images a bank keeps in memory: half of this machine's memory. A larger set is decoded
    into a memory-mapped file in the cache folder, which the operating system pages in as batches need it."""
    return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ImageBank:
    """The uint8 images a run needs, and the map from dataset index to row.

    A set larger than memory_budget() is decoded chunk by chunk into a memory-mapped file in cache_dir, which
    the operating system pages in as batches need it; under torchrun each rank decodes only its share of it."""

    def __init__(self, cfp, indices, size, workers=2, cache_dir="", device="cpu", resize="pad", aligner=None):
        self.indices = np.unique(indices)
        self.row = np.full(len(cfp.paths), -1, dtype=np.int64)
        self.row[self.indices] = np.arange(len(self.indices))
        need, budget = len(self.indices) * 3 * size * size, memory_budget()
        mapped = need > budget
        if mapped and not cache_dir:
            raise DataError(f"--img-size {size}: the decoded images would need {need / 2**30:.1f} GiB "
                            f"({len(self.indices)} x 3 x {size} x {size} bytes), more than half this machine's "
                            f"memory ({budget / 2**30:.1f} GiB); give --cache-dir DIR, a folder this run can write, "
                            f"to keep them in a memory-mapped file there, or choose a smaller --img-size")
        matrices = None
        if aligner is not None:  # each face warped by its own landmarks (align.py)
            if cfp.landmarks is None or np.isnan(cfp.landmarks[self.indices]).any():
                raise DataError(f"{cfp.root}: images without landmarks (no Data/Fiducials) cannot be aligned; use "
                                f"--align none, or --landmark-net RUN to predict them")
            matrices = [aligner.matrix(cfp.landmarks[i], cfp.profile[i], size) for i in self.indices]
        paths = [cfp.paths[i] for i in self.indices]
        if mapped:  # a set larger than memory is not hashed: a resumed run cannot check its content
            self.images, self.content = map_images(paths, size, workers, cache_dir, resize, matrices), None
            return
        images, self.content = load_images(paths, size, workers, cache_dir, resize, matrices)
        # On a GPU the whole uint8 set lives on the device: batches never cross PCIe.
        self.images = images.to(device)

    @classmethod
    def of(cls, num_images, indices, images):
        """A bank of images decoded elsewhere: images[k] is dataset image indices[k] (indices unique)."""
        bank = cls.__new__(cls)
        bank.indices, bank.images, bank.content = np.asarray(indices), images, None
        bank.row = np.full(num_images, -1, dtype=np.int64)
        bank.row[bank.indices] = np.arange(len(bank.indices))
        return bank

    def __getitem__(self, dataset_indices):
        rows = self.row[np.asarray(dataset_indices)]
        if (rows < 0).any():  # row -1 would silently read the last image
            missing = np.asarray(dataset_indices)[rows < 0]
            raise IndexError(f"images {missing[:5].tolist()} are not in the image bank")
        return self.images[torch.as_tensor(rows, device=self.images.device)]


def normalise(x):
    """float (B, 3, H, W) in [0, 1] -> normalised with ImageNet's mean and std, as every network here sees it."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(x, train=False, clutter_p=0.0, pool=None):
    """uint8 (B, 3, H, W) -> float normalised with ImageNet mean/std, augmented if train."""
    x = x.float() / 255
    if train:
        x = augment(clutter(x, clutter_p, pool) if clutter_p else x)
    return normalise(x)


def augment(x, max_degrees=20.0):
    """Random horizontal flip and rotation in [-max_degrees, max_degrees], per image, batched.

    x: (B, 3, H, W) float in [0, 1]; the corners moved in are black. Parameters come from the CPU
    generator, so runs repeat on any device."""
    b = x.shape[0]
    flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)                  # (B,)
    angle = (torch.rand(b) * 2 - 1) * math.radians(max_degrees)         # (B,)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output->input sampling matrix: a rotation composed with a mirror of the x axis.
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([flip * cos, -sin, zero], 1),
                         torch.stack([flip * sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mosaic(patches, n, size, gen=None):
    """n backgrounds, each k x k of the patches (k from 1 to 4, drawn once) resized into tiles:
    float (n, 3, size, size) in the patches' units. patches: (P, 3, h, w)."""
    k = int(torch.randint(1, 5, (1,), generator=gen))
    tile = math.ceil(size / k)
    pick = torch.randint(len(patches), (n, k * k), generator=gen).to(patches.device)
    tiles = F.interpolate(patches[pick.view(-1)].float(), size=(tile, tile), mode="bilinear",
                          align_corners=False).view(n, k, k, 3, tile, tile)
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, k * tile, k * tile)[..., :size, :size]


def clutter(x, p=0.5, pool=None):
    """Where an aligned face's square reached outside its photo, a mosaic of pieces of the batch's faces
    (their central halves, which lie inside their photos) instead of black, in a share p of the images: the
    surroundings a face found in a larger picture has (landmarks.py). With a pool (uint8 (N, 3, H, W), the
    drawn pictures of backgrounds.clutter_pool), each image's fill is the mosaic or one of them, each family
    as often. The pixels replaced are those black in every channel, as the warp leaves outside the photo; a
    photo's own pixel that is exactly (0, 0, 0) goes too, which an augmentation can afford.
    x: (B, 3, H, W) in [0, 1]."""
    b, size = x.shape[0], x.shape[-1]
    outside = (x == 0).all(1, keepdim=True) & (torch.rand(b) < p).to(x.device).view(b, 1, 1, 1)
    q = size // 4
    fill = mosaic(x[..., q:size - q, q:size - q], b, size)
    if pool is not None:
        drawn = (torch.rand(b) < pool.families / (pool.families + 1)).to(x.device).view(b, 1, 1, 1)
        fill = torch.where(drawn, pool.pictures[torch.randint(len(pool.pictures), (b,))].to(fill) / 255, fill)
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


def thumbprints(x):
    """uint8 (N, 3, H, W) pictures -> 32-byte prints: their grey 16 x 16 above its median. Two decodings of one
    photo (a link, a copy under another name, a lossless re-encoding) print alike; different photos do not."""
    grey = F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), 16).flatten(1)               # (N, 256)
    bits = (grey > grey.median(1, keepdim=True).values).cpu().numpy()
    return [row.tobytes() for row in np.packbits(bits, axis=1)]


def file_thumbprints(paths, workers=2, size=64):
    """The thumbprints of image files decoded whole at full resolution (no JPEG draft), padded to a square."""
    def one(p):
        return torch.from_numpy(np.asarray(to_square(open_image(p), size, "pad")).copy()).permute(2, 0, 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        decoded = list(pool.map(one, paths))
    return thumbprints(torch.stack(decoded)) if decoded else []


def same_pictures(a, b):
    """(i, j) for every print a[i] equal to a print b[j]."""
    where = {}
    for j, p in enumerate(b):
        where.setdefault(p, []).append(j)
    return [(i, j) for i, p in enumerate(a) for j in where.get(p, [])]


def writable_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)
