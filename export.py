"""The embedding network of a run as one file that torch alone loads (torch.export), with its preprocessing.

    python evaluate.py RUN --export embedder.pt2

    import json, torch
    extra = {"preprocessing.json": ""}
    embedder = torch.export.load("embedder.pt2", extra_files=extra).module()
    prep = json.loads(extra["preprocessing.json"])
    f = embedder(faces)          # faces: (B, 3, S, S) uint8 RGB, S = prep["img_size"], as prep["input"] says
    score = torch.nn.functional.cosine_similarity(f[0:1], f[1:2])   # same person when >= prep["thresholds"]

The file holds the network in float32: it reproduces an fp32 run's embeddings to about 1e-6. A run trained
with --amp embeds in bf16; measured on one such run (64 CFP images), the exported float32 embeddings differ
from its bf16 ones by up to 0.027 on features of size up to 4.6, a cosine of 0.99997 or more between the two. preprocessing.json says how the run made its inputs:
whole images resized (`resize`), or faces warped onto the run's templates by their landmarks (`align`), with
the normalisation the network applies inside the file.
"""
import json
import math
import os

import torch
import torch.nn as nn

from images import IMAGENET_MEAN, IMAGENET_STD, normalise, preprocess
from utils import UserError
EXTRA = "preprocessing.json"


class Embedder(nn.Module):
    """uint8 (B, 3, S, S) faces -> (B, D) float32 embeddings: the run's normalisation, then its branch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.embed(normalise(x.float() / 255))


def preprocessing(ckpt):
    """What a user must do to a photo before the embedder sees it, from the run's own checkpoint."""
    a = ckpt["args"]
    aligner = ckpt["aligner"]
    return {"img_size": a["img_size"], "channels": "RGB", "dtype": "uint8",
            "input": "faces warped onto align.templates by their 30 CFP landmarks (align.py), profiles facing "
                     "left mirrored" if aligner else f"the whole image, resized to the square by '{a['resize']}'",
            "resize": None if aligner else a["resize"], "align": aligner,
            "decode": "Pillow, EXIF orientation applied, any mode made RGB, transparency on white; " + (
                "the whole photo decoded, then warped (bilinear, after a box shrink to at most twice the output "
                "scale)" if aligner else "a JPEG decoded in Pillow's draft mode towards the input size "
                "(im.draft('RGB', (S, S))) before the resize: another decoder gives other pixels"),
            "landmarks": "each face needs CFP's 30 landmarks, which torch alone cannot give: a CFP landmark file, or "
                         "the landmark network of landmarks.py (faces.FaceFinder)" if aligner else None,
            "normalisation": {"mean": [255 * m for m in IMAGENET_MEAN], "std": [255 * s for s in IMAGENET_STD],
                              "applied": "inside the file"},
            "score": "cosine similarity of two embeddings",  # null: a kind the run had no pairs of
            "thresholds": {k: t if math.isfinite(t) else None for k, t in ckpt["thresholds"].items()},
            "trained_precision": "bfloat16" if a["amp"] else "float32"}


def export(model, ckpt, path, batch=2):
    """Write model's embedder with torch.export (batch size dynamic) and its preprocessing.json."""
    size = ckpt["args"]["img_size"]
    embedder = Embedder(model.float().to("cpu", memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(batch, 3, size, size, dtype=torch.uint8)
    program = torch.export.export(embedder, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=65536)},))
    torch.export.save(program, path, extra_files={EXTRA: json.dumps(preprocessing(ckpt), indent=1, allow_nan=False)})
    return embedder


def load(path):
    """-> (embedder module, preprocessing dict): what a user's own code does, torch alone."""
    extra = {EXTRA: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), json.loads(extra[EXTRA])


def export_run(model, ckpt, run, path):
    """evaluate.py --export PATH: the embedder file, checked against the run's own embeddings before it is kept."""
    if ckpt["args"]["arch"] != 2:
        raise UserError(f"--export: {run} is an --arch 1 run, whose pairs are judged by its decision network, "
                        f"not by comparing embeddings; only --arch 2 runs export an embedder")
    if os.path.exists(path):
        raise UserError(f"--export {path} already exists; remove it or choose another path")
    tmp = f"{path}.tmp{os.getpid()}.pt2"  # torch.export's archives are named .pt2
    try:
        try:
            export(model, ckpt, tmp)
        except (OSError, RuntimeError) as e:  # torch's archive writer reports a file it cannot open as a RuntimeError
            if isinstance(e, RuntimeError) and "open file failed" not in str(e):
                raise
            reason = e.strerror if isinstance(e, OSError) else str(e).split("strerror: ")[-1].strip()
            raise UserError(f"--export {path} cannot be written: {reason}") from None
        loaded, prep = load(tmp)
        size = ckpt["args"]["img_size"]
        x = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((loaded(x) - model.embed(preprocess(x))).abs().max())
        if diff > 1e-4:
            raise UserError(f"--export: the exported embedder differs from the network by {diff:.2e}; not written")
        os.replace(tmp, path)
    finally:  # also on Ctrl-C and SIGTERM (run_cli turns it into one): no half-written file is left
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {path}: {prep['img_size']}px {prep['input']}; float32, max difference from the network "
          f"{diff:.1e} on 3 test images")
