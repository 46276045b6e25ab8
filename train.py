"""Train a Siamese face-verification network on CFP.

    python train.py --arch 2 --backbone resnext50 --lr 1e-4
    python data.py --make-toy toy && python train.py --data-root toy --backbone resnet18 --no-pretrained --img-size 64
    torchrun --nproc_per_node 2 train.py ...   (DistributedDataParallel; same flags)
"""
import argparse
import csv
import io
import json
import math
import os
import shlex
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from PIL import Image

import align
from align import ALIGN_MODES, NUM_POINTS, Aligner
from data import (KINDS, RESIZE_MODES, IdentityPairSet, ImageBank, ImageSet, PairSet, augment, clutter,
                  draw_pairs, holdout_identities, join, load_cfp, load_dataset, open_image, preprocess,
                  read_pair_file, split_folds, write_pair_file)
from evaluate import dataset_label, evaluate, write_scores
from landmarks import FaceFinder, backgrounds_of, paste
from losses import ARCH_LOSSES, LOSSES, build_loss
from metrics import report, thresholds_by_kind
from models import BACKBONES, build_model
from plots import import_pyplot, plot_curves, plot_errors, plot_inputs, plot_roc
from toy import make_toy
from utils import (DiskFull, RunLock, UserError, all_reduce_mean, amp_autocast, amp_dtype, atomic_save,
                   atomic_write, disk_full, git_state, init_distributed, load_checkpoint, load_weights, open_nofollow,
                   run_cli, write_json)

RUN_FILES = ("config.json", "history.csv", "curves.png", "best.pt", "last.pt", "metrics.json", "roc.png", "log.txt",
             "test_scores.csv", "errors.png", "inputs.png", "pairs_val.txt", "pairs_test.txt")
# A checkpoint is only usable with the flags that shaped its network and loss ...
MODEL_KEYS = ("arch", "variation", "loss", "backbone", "pool", "maxpool", "embed_dim", "img_size")
# ... and a resumed run is the same run only with the same data, objective and optimisation.
RUN_KEYS = MODEL_KEYS + ("protocol", "test_fold", "eval_root", "holdout", "pairs_from", "resize", "align",
                         "align_margin", "landmark_net", "predict_landmarks", "landmarks_pasted", "augment",
                         "jitter", "clutter", "clutter_from", "margin", "scale", "freeze", "dropout", "fix_bn_scale",
                         "optimizer", "weight_decay", "decay_norm_bias", "schedule", "warmup_epochs", "batch_size",
                         "seed", "amp")
# What a run made before a setting existed ran with (its saved args lack the key).
EARLIER_DEFAULTS = {"pool": "avg", "jitter": False, "clutter": 0.0, "clutter_from": "batch", "dropout": 0.0,
                    "align": "none", "align_margin": 1.25, "maxpool": True, "landmark_net": "",
                    "predict_landmarks": False, "landmarks_pasted": 0.0, "eval_root": "", "holdout": 0.1}
MARGIN_DROPOUT = 0.6  # the study's choice for arcface/cosface (results/cfp-seed: validation 0.785 -> 0.813)
SELECTED_BY = "val_acc: accuracy of all validation pairs (FF and FP together) at one threshold"


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--arch", type=int, default=2, choices=[1, 2],
                   help="1: decision network on concatenated features; 2: embedding + cosine (default: 2)")
    g.add_argument("--variation", action=argparse.BooleanOptionalAction, default=False,
                   help="arch 1 only: move one FC layer into the branches for a compact feature (default: off)")
    g.add_argument("--loss", type=str, default=None, choices=sorted(LOSSES),
                   help="arch 1: ce (default) or bce; arch 2: cosine (default), arcface or cosface")
    g.add_argument("--backbone", type=str, default="vgg16", choices=list(BACKBONES),
                   help="torchvision trunk (default: vgg16); resnet18 is the one for CPUs")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ImageNet weights (default: on); --no-pretrained for random init")
    g.add_argument("--freeze", type=float, default=0.0,
                   help="freeze the first fraction of the backbone's layers, in [0, 1); 0.5 = the seed's "
                        "'fine-tune half' (default: 0)")
    g.add_argument("--embed-dim", type=int, default=512,
                   help="embedding size (arch 2) or compact feature size (arch 1 variation) (default: 512)")
    g.add_argument("--margin", type=float, default=None,
                   help="loss margin (default: cosine 0.5, arcface 0.3, cosface 0.35)")
    g.add_argument("--scale", type=float, default=None,
                   help="arcface/cosface logit scale s (default: 32; the papers' 64 suits many more classes)")
    g.add_argument("--pool", type=str, default="avg", choices=["avg", "flatten"],
                   help="ResNets: avg = global average pool of the last feature map (torchvision); flatten = the "
                        "map flattened, keeping the layout of the face (arcface_torch) (default: avg)")
    g.add_argument("--maxpool", action=argparse.BooleanOptionalAction, default=True,
                   help="ResNets: keep the stem's max-pool (torchvision); --no-maxpool halves the stride once, so "
                        "a 64 px face ends as a 4x4 map instead of 2x2, at about 4x the compute (default: on)")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout on the backbone's feature, before the embedding layer (default: arcface and "
                        f"cosface {MARGIN_DROPOUT}, the pair losses 0)")
    g.add_argument("--fix-bn-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="arch 2: keep the embedding BatchNorm's scale at 1, as arcface_torch does (default: on)")

    g = p.add_argument_group("data")
    g.add_argument("--data-root", type=str, default=os.environ.get("CFP_ROOT", "cfp-dataset"),
                   help="CFP folder in the official layout, or any face dataset as one folder per identity "
                        "(ROOT/IDENTITY/*.jpg, told apart by the layout) (default: $CFP_ROOT, else ./cfp-dataset); "
                        "a folder named toy that does not exist yet is written first with the synthetic toy dataset")
    g.add_argument("--eval-root", type=str, default="", metavar="CFP_ROOT",
                   help="identity-folder --data-root: validate and test on this CFP root's folds of --protocol "
                        "(default: pairs drawn once from held-out identities, saved in the run folder)")
    g.add_argument("--holdout", type=float, default=0.1,
                   help="identity-folder --data-root without --eval-root: the fraction of identities held out "
                        "for validation, and as many for test (default: 0.1)")
    g.add_argument("--protocol", type=str, default="seed", choices=["seed", "10fold"],
                   help="seed: folds 1-6 train, 7-8 val, 9-10 test; 10fold: test --test-fold K, "
                        "validate on K+1, train on the other 8 (default: seed)")
    g.add_argument("--test-fold", type=int, default=None, help="test fold K for --protocol 10fold (1..10)")
    g.add_argument("--img-size", type=int, default=224, help="square input size in pixels (default: 224)")
    g.add_argument("--resize", type=str, default="pad", choices=RESIZE_MODES,
                   help="to the square: pad (keep the aspect ratio, black borders), crop (centre square) or "
                        "squash (stretch, the seed's transform) (default: pad)")
    g.add_argument("--align", type=str, default=None, choices=ALIGN_MODES,
                   help="faces by the dataset's landmarks (align.py): template = a similarity transform onto the "
                        "training faces' mean shape, one for frontal faces and one for profiles, profiles mirrored "
                        "to face right; box = a square around the landmarks; none = the whole image by --resize "
                        "(default: template when the dataset has Data/Fiducials, else none)")
    g.add_argument("--landmark-net", type=str, default="", metavar="RUN",
                   help="for a dataset without Data/Fiducials: a landmark network (landmarks.py) that places every "
                        "image's landmarks once, before training, so that faces can be aligned (default: none)")
    g.add_argument("--predict-landmarks", action="store_true",
                   help="with --landmark-net: every image's landmarks from the network, its landmark file ignored, "
                        "so that training aligns faces as photos without files are aligned (default: off)")
    g.add_argument("--landmarks-pasted", type=float, default=0.0, metavar="F",
                   help="with --predict-landmarks: each training photo is first pasted at a random place into a "
                        "picture, on a mosaic of other training photos' corners, the face a fraction drawn from [F, 1] "
                        "of the picture's width, so that the network learns from the landmarks a face found in a "
                        "larger picture gets; validation and test photos are placed as they are (default: 0, off)")
    g.add_argument("--align-margin", type=float, default=1.25,
                   help="with --align: the square's side as a multiple of the face box's larger side (default: 1.25)")
    g.add_argument("--pairs-from", type=str, default="identities", choices=["identities", "protocol"],
                   help="pair losses: identities = fresh balanced FF/FP same/different pairs every epoch from all "
                        "images of the training identities; protocol = the protocol's fixed pairs, as the seed "
                        "(default: identities)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flip + rotation up to 20 degrees while training (default: on)")
    g.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=False,
                   help="with --augment, also a random zoom (+-15%%), shift (+-10%%), brightness, contrast and "
                        "saturation (+-30%%) and grey (p 0.2) (default: off)")
    g.add_argument("--clutter", type=float, default=0.0, metavar="P",
                   help="with --augment and an aligned view: in a share P of the training images, what the "
                        "aligned square shows outside the photo (black) becomes a mosaic of other images, as "
                        "around a face found in a larger picture (default: 0, off)")
    g.add_argument("--clutter-from", default="batch", choices=["batch", "photos"],
                   help="--clutter's mosaic: pieces of the batch's faces (their central halves), or corners of "
                        "400 training photos outside their faces, as a larger picture shows around a face "
                        "(default: batch)")
    g.add_argument("--workers", type=int, default=2, help="image decoding threads (default: 2)")
    g.add_argument("--cache-dir", type=str, default="",
                   help="keep decoded images on disk here, so later runs start at once (default: off)")
    g.add_argument("--bank-memory", type=float, default=None, metavar="GIB",
                   help="decoded images beyond this many GiB are kept in a memory-mapped file in --cache-dir, "
                        "decoded chunk by chunk, instead of in memory (default: half of this machine's memory)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd"],
                   help="adam, or sgd with momentum 0.9 (default: adam)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    g.add_argument("--decay-norm-bias", action=argparse.BooleanOptionalAction, default=False,
                   help="also decay BatchNorm parameters and biases (default: off, they are not decayed)")
    g.add_argument("--schedule", type=str, default="cosine", choices=["none", "cosine", "step"],
                   help="learning-rate schedule after warmup: constant, cosine to 0, or x0.1 at 1/2 and "
                        "3/4 of training (default: cosine)")
    g.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warmup from 0, in epochs; helps random-init and margin losses (default: 1)")
    g.add_argument("--epochs", type=int, default=14, help="training epochs (default: 14)")
    g.add_argument("--batch-size", type=int, default=14,
                   help="pairs (pair losses) or images (margin losses) per step and process (default: 14)")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps in total, for smoke runs (default: 0 = no limit)")

    g = p.add_argument_group("run")
    g.add_argument("--out", type=str, default="", help="run folder (default: runs/<name from the settings>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    g.add_argument("--seed", type=int, default=0, help="random seed; CPU runs repeat bit for bit (default: 0)")
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available, else CPU (default: auto)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision: bf16 autocast on GPUs and CPUs that support it (fp16 with loss "
                        "scaling on older GPUs; fp32, with a warning, on CPUs without bf16) (default: off)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (default: off)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="images per evaluation batch (default: 64)")
    g.add_argument("--print-freq", type=int, default=50,
                   help="steps between progress lines; a line also comes every 10 s (default: 50)")
    g.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def check_args(args):
    """Fill the defaults that depend on other flags and refuse impossible settings, before anything is read or
    written. A resumed run takes --dropout from its checkpoint when it is not given (open_run)."""
    if args.loss is None:
        args.loss = ARCH_LOSSES[args.arch][0]
    if args.dropout is None and not args.resume:
        args.dropout = MARGIN_DROPOUT if LOSSES[args.loss].sampling == "images" else 0.0
    check_ranges(args)
    check_combinations(args)
    if not args.out:
        name = f"arch{args.arch}{'v' if args.variation else ''}_{args.loss}_{args.backbone}" \
               f"_lr{args.lr:g}_{args.optimizer}_{args.epochs}e"
        args.out = os.path.join("runs", name + (f"_fold{args.test_fold}" if args.test_fold else ""))


MARGIN_RANGE = {"cosine": (-1.0, 1.0), "arcface": (0.0, 1.0), "cosface": (0.0, 1.0)}


def check_ranges(args):
    """Every numeric flag inside its range, one line naming the first that is not."""
    def need(ok, flag, what):
        if not ok:
            raise UserError(f"--{flag.replace('_', '-')} must be {what}, got {getattr(args, flag)}")
    for flag in ("lr", "weight_decay", "warmup_epochs", "freeze", "dropout", "margin", "scale", "align_margin",
                 "clutter", "landmarks_pasted"):
        value = getattr(args, flag)
        need(value is None or math.isfinite(value), flag, "a finite number")
    for flag in ("batch_size", "epochs", "img_size", "embed_dim", "eval_batch_size", "print_freq"):
        need(getattr(args, flag) >= 1, flag, "at least 1")
    for flag in ("max_steps", "workers", "warmup_epochs", "weight_decay"):
        need(getattr(args, flag) >= 0, flag, "non-negative")
    need(args.lr > 0, "lr", "positive")
    need(0 <= args.seed < 2 ** 32, "seed", "in [0, 2^32)")
    need(0 <= args.freeze < 1, "freeze", "in [0, 1)")
    need(args.dropout is None or 0 <= args.dropout < 1, "dropout", "in [0, 1)")
    need(1 <= args.align_margin <= 4, "align_margin", "in [1, 4]")
    need(0 <= args.clutter <= 1, "clutter", "in [0, 1]")
    need(0 <= args.landmarks_pasted <= 1, "landmarks_pasted", "in [0, 1]")
    need(args.embed_dim <= 65536, "embed_dim", "at most 65536")
    need(args.img_size >= 32, "img_size", "at least 32 (five stride-2 stages)")
    need(args.scale is None or args.scale > 0, "scale", "positive")
    need(0 < args.holdout < 0.5, "holdout", "in (0, 0.5)")
    need(args.bank_memory is None or (math.isfinite(args.bank_memory) and args.bank_memory >= 0), "bank_memory",
         "a non-negative number of GiB")
    if args.margin is not None and args.loss in MARGIN_RANGE:
        low, high = MARGIN_RANGE[args.loss]
        need(low <= args.margin <= high, "margin", f"in [{low:g}, {high:g}] for --loss {args.loss}")


def check_combinations(args):
    """Flags that contradict each other, or that the chosen loss or backbone would ignore."""
    sampling = LOSSES[args.loss].sampling
    if args.loss not in ARCH_LOSSES[args.arch]:
        raise UserError(f"--loss {args.loss} does not fit --arch {args.arch} "
                        f"(choose from {', '.join(ARCH_LOSSES[args.arch])})")
    if args.variation and args.arch != 1:
        raise UserError("--variation only applies to --arch 1")
    if args.margin is not None and args.loss not in MARGIN_RANGE:
        raise UserError(f"--margin does not apply to --loss {args.loss} (only to cosine, arcface and cosface)")
    if args.scale is not None and sampling != "images":
        raise UserError(f"--scale does not apply to --loss {args.loss} (only to arcface and cosface)")
    if args.pool == "flatten" and args.backbone.startswith("vgg"):
        raise UserError("--pool flatten is for ResNets: VGG's feature is already its flattened 7x7 map")
    if not args.maxpool and args.backbone.startswith("vgg"):
        raise UserError("--no-maxpool is for ResNets: VGG has no stem max-pool")
    if args.jitter and not args.augment:
        raise UserError("--jitter adds to --augment: it has no effect with --no-augment")
    if args.predict_landmarks and not args.landmark_net:
        raise UserError("--predict-landmarks needs --landmark-net RUN (a network trained by landmarks.py)")
    if args.landmarks_pasted and not args.predict_landmarks:
        raise UserError("--landmarks-pasted places the training photos' landmarks: it needs --predict-landmarks")
    if args.clutter and not args.augment:
        raise UserError("--clutter adds to --augment: it has no effect with --no-augment")
    if args.clutter and args.align == "none":
        raise UserError("--clutter fills what an aligned square shows outside the photo: it needs --align")
    if args.clutter_from != "batch" and not args.clutter:
        raise UserError(f"--clutter-from {args.clutter_from} chooses --clutter's pieces: it needs --clutter P")
    if args.batch_size < 2 and (sampling == "images" or args.arch == 1):
        raise UserError(f"--arch {args.arch} --loss {args.loss} needs --batch-size of at least 2 (BatchNorm "
                        f"{'on the embedding' if sampling == 'images' else 'in the decision network'})")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other")
    if args.protocol == "10fold":
        split_folds(args.protocol, args.test_fold)
    elif args.test_fold is not None:
        raise UserError("--test-fold needs --protocol 10fold")


def check_run_folder(args):
    """An existing run is never clobbered by accident."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if args.resume and not os.path.isfile(os.path.join(args.out, "last.pt")):
        raise UserError(f"--resume: {args.out} has no last.pt to resume from")
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"--out {args.out} already holds a run ({', '.join(existing)}); "
                        f"pass --resume to continue it or --overwrite to replace it")


def check_compatible(saved, args, source, keys=MODEL_KEYS):
    """Refuse a checkpoint whose settings differ from the ones asked for, naming each difference."""
    saved = {**EARLIER_DEFAULTS, **saved}
    diff = [f"--{k.replace('_', '-')} {saved.get(k)} vs {getattr(args, k)}" for k in keys
            if k in saved and saved[k] != getattr(args, k)]
    if diff:
        raise UserError(f"{source} was trained with other settings than asked for: {'; '.join(diff)}")


def build_optimizer(args, modules):
    groups = param_groups(modules, args.weight_decay, args.decay_norm_bias)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    return torch.optim.Adam(groups, lr=args.lr)


def param_groups(modules, weight_decay, decay_norm_bias):
    """Weight decay on weight matrices and conv kernels only (arcface_torch, timm, MoCo v3): BatchNorm
    parameters and biases are not decayed unless --decay-norm-bias."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 or decay_norm_bias else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def writable_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def lr_lambda(args, steps_per_epoch):
    total = args.epochs * steps_per_epoch
    warmup = args.warmup_epochs * steps_per_epoch

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if args.schedule == "step":
            return 0.1 ** sum(step >= m * total for m in (0.5, 0.75))
        return 1.0
    return f


class Objective(torch.nn.Module):
    """Model and loss as one module, so DistributedDataParallel also syncs the loss's class centres."""

    def __init__(self, model, criterion):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, inputs, target):
        return self.criterion(self.model(*inputs), target)


class Logger:
    """Prints on rank 0 and keeps a copy in the run's log.txt, from the run's first line on: lines
    printed before the run folder exists are written there when it is opened."""

    def __init__(self):
        self.path, self.pending = None, []

    def open(self, path):
        self.path = path
        self._write("".join(line + "\n" for line in self.pending))
        self.pending = []

    def __call__(self, *msg):
        line = " ".join(str(m) for m in msg)
        print(line, flush=True)
        if self.path:
            self._write(line + "\n")
        else:
            self.pending.append(line)

    def _write(self, text):
        try:
            with open_nofollow(self.path, "a") as f:
                f.write(text)
        except OSError as e:
            if disk_full(e):
                raise DiskFull(f"no space left on device while writing {self.path}") from None
            raise


def train_one_epoch(objective, train_set, bank, optimizer, scheduler, scaler, epoch, args, ctx):
    objective.train()
    train_set.new_epoch(args.seed, epoch)
    sampler = DistributedSampler(range(len(train_set)), num_replicas=ctx["world"], rank=ctx["rank"],
                                 shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    n_batches = max(1, len(order) // args.batch_size)
    if args.max_steps:  # the real stopping step, so the totals shown are the true ones
        n_batches = max(1, min(n_batches, args.max_steps - ctx["step"]))
    device, log = ctx["device"], ctx["log"]
    total_loss, seen, skipped, images = 0.0, 0, 0, 0
    t0 = last_print = time.time()
    for step in range(n_batches):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        inputs, target = train_set.batch(bank, idx, swap=True)
        inputs = [preprocess(x.to(device, non_blocking=True), train=args.augment, jitter=args.jitter,
                             clutter_p=args.clutter, clutter_pieces=ctx["clutter_pieces"])
                  for x in inputs]
        if ctx["channels_last"]:
            inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        target = target.to(device, non_blocking=True)
        with ctx["autocast"]:
            loss = objective(inputs, target)
        loss_value = loss.item() if ctx["world"] == 1 else all_reduce_mean([loss.item()], device)[0]
        if not math.isfinite(loss_value) and not scaler.is_enabled():
            raise UserError(f"non-finite loss ({loss_value}) at epoch {epoch + 1} step {step + 1}: "
                            f"try a lower --lr; best.pt and last.pt are left as they were")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # fp16: a step whose gradients overflowed is skipped and the scale lowered
        scaler.update()
        scheduler.step()
        if math.isfinite(loss_value):
            total_loss += loss_value
            seen += 1
            ctx["steps"].append([ctx["step"] + 1, round(loss_value, 5), scheduler.get_last_lr()[0]])
        else:
            skipped += 1
            if skipped > 100:
                raise UserError(f"non-finite loss in {skipped} steps of epoch {epoch + 1}, even with loss scaling: "
                                f"try a lower --lr; best.pt and last.pt are left as they were")
        images += sum(x.shape[0] for x in inputs) * ctx["world"]
        ctx["step"] += 1
        now = time.time()
        if (step + 1) % args.print_freq == 0 or now - last_print >= 10 or step + 1 == n_batches:
            last_print = now
            per_step = (now - t0) / (step + 1)
            epoch_left = per_step * (n_batches - step - 1)
            run_left = epoch_left + (ctx["epoch_seconds"] or per_step * n_batches) * (ctx["epochs_left"] - 1)
            log(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{n_batches} loss {total_loss / max(seen, 1):.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {images / (now - t0):.1f} img/s elapsed "
                f"{fmt_time(now - ctx['t_start'])} eta epoch {fmt_time(epoch_left)} run {fmt_time(run_left)}")
    if ctx["world"] > 1:  # BatchNorm statistics saw each rank's own batches: evaluate rank 0's everywhere
        for b in objective.module.buffers():
            dist.broadcast(b, 0)
    return {"train_loss": total_loss / max(seen, 1), "steps": n_batches, "skipped_steps": skipped}


def fmt_time(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def validate(model, bank, pairs, kinds, criterion, args, ctx):
    """Validation loss, thresholds (all pairs, FF, FP) and mean score of same and different pairs."""
    val = evaluate(model, bank, pairs, criterion, args.eval_batch_size, ctx["device"], autocast=ctx["autocast"])
    chosen = thresholds_by_kind(val["scores"], val["labels"], kinds)
    same = val["labels"] == 1
    row = {"val_loss": val["loss"], "val_acc": chosen["all"][1], "threshold": chosen["all"][0]}
    for kind in KINDS:  # NaN where there are no pairs of a kind (held-out pairs of identity folders)
        row[f"val_acc_{kind}"], row[f"threshold_{kind}"] = chosen.get(kind, (math.nan, math.nan))[::-1]
    row["val_score_same"] = float(val["scores"][same].mean())  # the cosine, for arch 2: collapse shows here
    row["val_score_diff"] = float(val["scores"][~same].mean())
    return row


def write_history(history, path):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, buf.getvalue())


def main(args):
    check_args(args)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    rank, world, device = init_distributed(device)
    lock = RunLock(args.out) if rank == 0 else None  # one run per folder, from the start
    try:
        return fit(args, device, rank, world)
    finally:
        if lock:
            lock.release()


def fit(args, device, rank, world):
    """One run as a sequence of steps: open, prepare the data, build, restore, record, train, test."""
    is_main = rank == 0
    resume = open_run(args, world)
    log = Logger() if is_main else (lambda *a: None)
    run = SimpleNamespace(args=args, device=device, rank=rank, world=world, log=log, dtype=setup(args, device, log))
    try:
        prepare_data(run, resume)
        build(run)
        restore(run, resume)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while reading the data and building the network, before anything of the "
                          f"run was written; {continue_advice(args, resume['epoch'] if resume else 0)}") from None
    try:
        if is_main:
            record_run(run, resume)
        train_epochs(run)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted in epoch {run.saved + 1}: {continue_advice(args, run.saved)}") from None
    except DiskFull as e:
        raise DiskFull(f"{e}; free some space, then {continue_advice(args, run.saved)}") from None
    try:
        metrics = test_and_report(run)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted during the final test: every epoch is saved; "
                          f"{continue_advice(args, run.saved)} (it only tests)") from None
    except DiskFull as e:
        raise DiskFull(f"{e}; free some space, then {continue_advice(args, run.saved)} (it only tests)") from None
    if world > 1:
        dist.destroy_process_group()
    return metrics


def open_run(args, world):
    """Check --out, and read and vet last.pt when resuming, before minutes are spent on data."""
    check_run_folder(args)
    if world > 1:
        dist.barrier()  # every rank has looked at --out before rank 0 writes into it
    if not args.resume:
        return None
    resume = load_checkpoint(os.path.join(args.out, "last.pt"), kind="last")
    saved = {**EARLIER_DEFAULTS, **resume["args"]}
    for flag in ("align", "dropout"):  # not given: the run's own value (or what it ran with before the flag)
        if getattr(args, flag) is None:
            setattr(args, flag, saved[flag])
    check_compatible(resume["args"], args, os.path.join(args.out, "last.pt"), RUN_KEYS)
    best = os.path.join(args.out, "best.pt")
    if not os.path.exists(best) and resume["epoch"] > 0:
        if resume["best"]["epoch"] != resume["epoch"]:
            raise UserError(f"--resume: {best} is gone and its epoch ({resume['best']['epoch']}) cannot be rebuilt "
                            f"from last.pt (epoch {resume['epoch']}); put it back, or start again with --overwrite")
        keep = ("model", "criterion", "args", "epoch", "threshold", "thresholds", "val_acc", "val", "aligner",
                "fingerprint")
        atomic_save({k: resume[k] for k in keep if k in resume}, best)  # the last epoch was the best one
    return resume


def setup(args, device, log):
    """Seeds, backend flags, a usable --cache-dir; the autocast dtype (None: fp32)."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import_pyplot()  # now, not at the first plot: a Ctrl-C inside matplotlib's first import is an ImportError
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.cache_dir and not writable_dir(args.cache_dir):
        log(f"warning: --cache-dir {args.cache_dir} cannot be written: decoding without a disk cache")
        args.cache_dir = ""
    dtype = amp_dtype(device) if args.amp else None
    if args.amp and dtype is None:
        log("--amp: this CPU has no fast bf16 (AVX-512-BF16 or AMX): training in fp32")
    return dtype


def prepare_data(run, resume):
    """The protocol, the training set, the validation and test pairs, and every image they need, decoded once."""
    args, log = run.args, run.log
    if os.path.basename(os.path.normpath(args.data_root)) == "toy" and not os.path.exists(args.data_root) \
            and run.rank == 0:
        make_toy(args.data_root)  # `--data-root toy`: try everything with no download
        log(f"wrote the synthetic toy dataset (drawn cartoon faces, not people) to {args.data_root}")
    if run.world > 1:
        dist.barrier()
    run.cfp, run.folds, run.train_images, (run.val_pairs, run.val_kinds), (run.test_pairs, run.test_kinds) = \
        split_data(args, resume)
    cfp, folds, train_images = run.cfp, run.folds, run.train_images
    if resume and resume.get("fingerprint") not in (None, cfp.fingerprint):
        raise UserError(f"--resume: {args.data_root} is not the dataset {args.out} was trained on (its protocol "
                        f"files or image list differ); use the run's own --data-root, or another --out")
    check_held_out(cfp, folds, train_images, run.val_pairs, run.test_pairs)
    run.landmarks = place_landmarks(args, cfp, log, train_images)
    run.aligner = build_aligner(args, cfp, train_images, resume)
    run.clutter_pieces = clutter_pieces(cfp, train_images, args.seed, run.device) \
        if args.clutter and args.clutter_from == "photos" else None
    if LOSSES[args.loss].sampling == "images":
        run.train_set = ImageSet(train_images, cfp.identity)
    elif args.pairs_from == "identities":
        run.train_set = IdentityPairSet(cfp, folds["train"]) if cfp.layout == "cfp" else \
            IdentityPairSet(cfp, images=train_images)
    elif cfp.layout == "folders":
        raise UserError("--pairs-from protocol: an identity-folder dataset has no protocol pairs; use identities")
    else:
        run.train_set = PairSet(cfp.pairs(folds["train"])[0])
    needed = np.concatenate([train_images, run.val_pairs[:, :2].ravel(), run.test_pairs[:, :2].ravel()])
    t = time.time()
    run.bank = ImageBank(cfp, needed, args.img_size, args.workers, args.cache_dir,
                         run.device if run.device.type == "cuda" else "cpu", resize=args.resize, aligner=run.aligner,
                         memory_gib=args.bank_memory)
    if cfp.layout == "folders":
        log(f"data: {args.data_root} is an identity-folder dataset: {len(np.unique(cfp.identity[train_images]))} "
            f"training identities, {len(train_images)} images; validation and test "
            + (f"on {args.eval_root}, protocol {args.protocol}" if args.eval_root else
               f"on pairs of held-out identities ({os.path.join(args.out, 'pairs_val.txt')}, pairs_test.txt)"))
    log(f"data: {len(run.train_set)} training {run.train_set.sampling} per epoch (folds {folds['train']}"
        f"{', drawn from identities' if isinstance(run.train_set, IdentityPairSet) else ''}), {len(run.val_pairs)} "
        f"validation pairs {folds['val']}, {len(run.test_pairs)} test pairs {folds['test']}; "
        f"{len(run.bank.indices)} images at {args.img_size}px ({view_name(args)}) decoded in {time.time() - t:.1f}s")


def split_data(args, resume):
    """(dataset, folds, training images, validation and test (pairs, kinds)) for a CFP layout (its folds), an
    identity-folder dataset validated and tested on --eval-root's CFP folds, or one with held-out identities
    (pairs drawn once with the seed, kept in the run folder as pairs_val.txt and pairs_test.txt)."""
    ds = load_dataset(args.data_root)
    if ds.layout == "cfp":
        if args.eval_root:
            raise UserError(f"--eval-root is for identity-folder training data; {args.data_root} is a CFP-layout "
                            f"dataset, which validates and tests on its own folds")
        folds = split_folds(args.protocol, args.test_fold)
        return ds, folds, ds.images_of(folds["train"]), ds.pairs(folds["val"]), ds.pairs(folds["test"])
    if args.eval_root:
        n, roles = len(ds.paths), split_folds(args.protocol, args.test_fold)
        ds = join(ds, load_cfp(args.eval_root))
        folds = {"train": f"identity folders of {args.data_root}", "val": roles["val"], "test": roles["test"]}
        return ds, folds, np.arange(n), ds.pairs(roles["val"]), ds.pairs(roles["test"])
    train_ids, *held_out = holdout_identities(ds, args.seed, args.holdout)
    pairs = []
    for role, ids in zip(("val", "test"), held_out):
        path = os.path.join(args.out, f"pairs_{role}.txt")
        rows = read_pair_file(path, ds) if resume and os.path.isfile(path) else draw_pairs(ds, ids, args.seed)
        pairs.append((rows, np.full(len(rows), "pairs")))
    folds = {"train": f"{len(train_ids)} identities", "val": f"{len(held_out[0])} held-out identities",
             "test": f"{len(held_out[1])} held-out identities"}
    return ds, folds, np.flatnonzero(np.isin(ds.identity, train_ids)), *pairs


def check_held_out(cfp, folds, train_images, val_pairs, test_pairs):
    """Training never sees a validation or test person or image, on any protocol; a layout that makes every
    image its own identity (a flattened folder) is refused before anything is trained."""
    if len(np.unique(cfp.identity[train_images])) == len(train_images):
        raise UserError(f"{cfp.root}: every training image is its own identity; is the layout "
                        f"Data/Images/<identity>/{{frontal,profile}}/NN.jpg (CFP) or IDENTITY/NAME.jpg (folders)?")
    held_out = np.unique(np.concatenate([val_pairs[:, :2].ravel(), test_pairs[:, :2].ravel()]))
    shared_ids = np.intersect1d(cfp.identity[train_images], cfp.identity[held_out])
    shared_images = np.intersect1d(train_images, held_out)
    names = np.array(cfp.names or [], dtype=object)
    same_names = cfp.layout == "folders" and \
        set(names[cfp.identity[train_images]]) & {n.split(":")[-1] for n in names[cfp.identity[held_out]]}
    if same_names:
        print(f"warning: {len(same_names)} training identity folders have the names of validation or test "
              f"identities (e.g. {sorted(same_names)[0]!r}): if they are the same people, the test is not "
              f"held out", file=sys.stderr)
    if len(shared_ids) or len(shared_images):
        raise UserError(f"{cfp.root}: {len(shared_ids)} identities and {len(shared_images)} images of the validation "
                        f"or test folds {folds['val'] + folds['test']} are also in the training folds; the folds "
                        f"must be identity-disjoint (python data.py --check {cfp.root})")
    if not len(val_pairs):
        raise UserError(f"{cfp.root}: validation folds {folds['val']} hold no pairs")


def build(run):
    """Network, loss, optimizer, schedule and gradient scaler."""
    args, device = run.args, run.device
    run.model = build_model(args).to(device)
    run.criterion = build_loss(args.loss, num_classes=getattr(run.train_set, "num_classes", None),
                               embed_dim=args.embed_dim, margin=args.margin, scale=args.scale).to(device)
    # channels_last: cuDNN's and oneDNN's fast layout for convolutions (on the CPU it pays with bf16)
    run.channels_last = device.type == "cuda" or run.dtype is not None
    if run.channels_last:
        run.model = run.model.to(memory_format=torch.channels_last)
    run.optimizer = build_optimizer(args, [run.model, run.criterion])
    run.steps_per_epoch = max(1, len(run.train_set) // (args.batch_size * run.world))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lr_lambda(args, run.steps_per_epoch))
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.dtype == torch.float16)
    total_steps = args.epochs * run.steps_per_epoch
    if args.max_steps:
        total_steps = min(args.max_steps, total_steps)
    if args.warmup_epochs and args.warmup_epochs * run.steps_per_epoch >= total_steps:
        run.log(f"warning: the {args.warmup_epochs:g}-epoch warmup spans the whole run ({total_steps} steps): the "
                f"learning rate reaches --lr {args.lr:g} at the last step at best; lower --warmup-epochs")
    run.objective = Objective(run.model, run.criterion)
    if run.world > 1:
        run.objective = DistributedDataParallel(run.objective,
                                                device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        run.objective = torch.compile(run.objective)


def restore(run, resume):
    """Where training starts: epoch 0, or the state of last.pt (model, loss, optimizer, schedule, scaler)."""
    run.epoch, run.history, run.best, run.steps = 0, [], {"val_acc": -1.0, "epoch": 0, "threshold": 0.0}, []
    run.saved = 0
    if not resume:
        return
    args, path = run.args, os.path.join(run.args.out, "last.pt")
    load_weights(run.model, resume["model"], path)
    load_weights(run.criterion, resume["criterion"], path)
    run.optimizer.load_state_dict(resume["optimizer"])
    run.scheduler.load_state_dict(resume["scheduler"])
    run.scaler.load_state_dict(resume["scaler"])
    run.epoch = run.saved = resume["epoch"]
    run.history, run.best, run.steps = resume["history"], resume["best"], resume.get("steps", [])
    if args.lr != resume["args"]["lr"]:  # an explicit new --lr wins over the saved one
        run.scheduler.base_lrs = [args.lr for _ in run.scheduler.base_lrs]
        for g in run.optimizer.param_groups:
            g["lr"] = args.lr * lr_lambda(args, run.steps_per_epoch)(run.scheduler.last_epoch)
        run.log(f"--lr {args.lr:g} replaces the run's {resume['args']['lr']:g}")
    run.log(f"resumed {path}: model, loss, optimizer, scheduler and scaler state, epoch {run.epoch}, best "
            f"validation accuracy {run.best['val_acc']:.4f} (epoch {run.best['epoch']})")


def record_run(run, resume):
    """The run folder, written only now that every input has been read: config.json (or its resumes list),
    log.txt from the first line on, and inputs.png."""
    args, model = run.args, run.model
    os.makedirs(args.out, exist_ok=True)
    if args.overwrite:
        for f in RUN_FILES:
            if os.path.exists(os.path.join(args.out, f)):
                os.remove(os.path.join(args.out, f))
    if resume and os.path.exists(os.path.join(args.out, "metrics.json")):
        os.remove(os.path.join(args.out, "metrics.json"))  # training again: no longer a finished run
    run.log.open(os.path.join(args.out, "log.txt"))
    built = {"network": type(model.backbone).__name__, "arch": model.arch, "loss": type(run.criterion).__name__,
             "optimizer": type(run.optimizer).__name__, "frozen_layers": len(model.frozen),
             "backbone_layers": model.num_layers, "params": sum(p.numel() for p in model.parameters()),
             "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "precision": str(run.dtype).replace("torch.", "") if run.dtype else "float32",
             "scale": getattr(run.criterion, "scale", None), "margin": getattr(run.criterion, "margin", None)}
    command = " ".join(shlex.quote(a) for a in ["python"] + sys.argv)
    path = os.path.join(args.out, "config.json")
    if not resume:
        aligner = run.aligner and {"mode": run.aligner.mode, "margin": run.aligner.margin,
                                   "templates_from_folds": run.folds["train"]}
        write_json(path, {"args": vars(args), "command": command, **git_state(), "torch": torch.__version__,
                          "device": str(run.device), "world_size": run.world, "threads": torch.get_num_threads(),
                          "dataset": dataset_label(args.data_root), "dataset_fingerprint": run.cfp.fingerprint,
                          "selected_by": SELECTED_BY, "built": built,
                          "aligner": aligner, "landmarks": run.landmarks, "data": data_record(run)})
        if run.cfp.layout == "folders" and not args.eval_root:  # the held-out pairs, for reruns and evaluate.py
            for role, pairs in (("val", run.val_pairs), ("test", run.test_pairs)):
                write_pair_file(os.path.join(args.out, f"pairs_{role}.txt"), run.cfp, pairs)
    else:
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} cannot be read ({e}); the run's own record is damaged") from None
        config.setdefault("resumes", []).append({"command": command, "epoch": run.epoch, "epochs": args.epochs,
                                                 "lr": args.lr, **git_state()})
        write_json(path, config)
    run.log(f"{args.out}: {built}")
    plot_inputs(input_samples(run.train_set, run.bank, run.val_pairs, run.cfp, args, run.clutter_pieces),
                os.path.join(args.out, "inputs.png"),
                title=f"{os.path.basename(args.out)}: what the network sees ({view_name(args)}, {args.img_size}px)")


def data_record(run):
    """What the run trained and was tested on, for config.json."""
    cfp, args = run.cfp, run.args
    if cfp.layout == "cfp":
        return {"layout": "cfp", "protocol": args.protocol, "folds": run.folds}
    return {"layout": "identity folders", "training_identities": len(np.unique(cfp.identity[run.train_images])),
            "evaluated_on": f"CFP root {args.eval_root}, protocol {args.protocol}" if args.eval_root else
            f"held-out identities ({args.holdout:g} each for validation and test): pairs_val.txt, pairs_test.txt",
            "folds": run.folds}


def train_epochs(run):
    """The epoch loop: train, validate, keep best.pt and last.pt, history.csv and curves.png."""
    args = run.args
    run.ctx = ctx = {"device": run.device, "rank": run.rank, "world": run.world, "log": run.log,
                     "step": run.epoch * run.steps_per_epoch, "autocast": amp_autocast(run.device, args.amp),
                     "channels_last": run.channels_last, "t_start": time.time(), "epoch_seconds": 0.0,
                     "steps": run.steps, "clutter_pieces": run.clutter_pieces}
    for epoch in range(run.epoch, args.epochs):
        # every epoch's randomness is a function of (seed, epoch, rank): resuming repeats it exactly
        torch.manual_seed(int(np.random.SeedSequence([args.seed, epoch, run.rank]).generate_state(1)[0]))
        t = time.time()
        ctx["epochs_left"] = args.epochs - epoch
        lr = run.optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(run.objective, run.train_set, run.bank, run.optimizer, run.scheduler, run.scaler,
                                epoch, args, ctx)
        val = validate(run.model, run.bank, run.val_pairs, run.val_kinds, run.criterion, args, ctx)
        ctx["epoch_seconds"] = time.time() - t
        run.history.append({"epoch": epoch + 1, "lr": lr, "lr_end": run.optimizer.param_groups[0]["lr"],
                            "train_loss": stats["train_loss"], **val, "seconds": round(ctx["epoch_seconds"], 1)})
        val_loss = f", val loss {val['val_loss']:.4f}" if math.isfinite(val["val_loss"]) else ""
        run.log(f"epoch {epoch + 1}/{args.epochs} done in {fmt_time(ctx['epoch_seconds'])}: train loss "
                f"{stats['train_loss']:.4f}{val_loss}, val acc {val['val_acc']:.4f} (threshold "
                f"{val['threshold']:.4f})"
                + "".join(f", {k} {val[f'val_acc_{k}']:.4f} ({val[f'threshold_{k}']:.4f})" for k in KINDS
                          if math.isfinite(val[f"val_acc_{k}"]))
                + f"; mean score same {val['val_score_same']:.3f} different {val['val_score_diff']:.3f}")
        if run.rank == 0:
            save_epoch(run, epoch, val)
        if args.max_steps and ctx["step"] >= args.max_steps:
            break


def save_epoch(run, epoch, val):
    """best.pt when validation improved, last.pt always (each written whole or not at all), and the curves."""
    out = run.args.out
    thresholds = {k: val["threshold" + ("" if k == "all" else f"_{k}")] for k in ("all",) + KINDS}
    state = {"model": run.model.state_dict(), "criterion": run.criterion.state_dict(), "args": vars(run.args),
             "epoch": epoch + 1, "threshold": val["threshold"], "thresholds": thresholds,
             "val_acc": val["val_acc"], "val": val, "aligner": run.aligner and run.aligner.state(),
             "fingerprint": run.cfp.fingerprint}
    if val["val_acc"] > run.best["val_acc"]:
        run.best = {"val_acc": val["val_acc"], "epoch": epoch + 1, "threshold": val["threshold"]}
        atomic_save(state, os.path.join(out, "best.pt"))
    atomic_save({**state, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict(), "best": run.best, "history": run.history, "steps": run.steps},
                os.path.join(out, "last.pt"))
    run.saved = epoch + 1
    write_history(run.history, os.path.join(out, "history.csv"))
    plot_curves(run.history, run.steps, run.steps_per_epoch, run.best["epoch"], os.path.join(out, "curves.png"))


def test_and_report(run):
    """The best epoch's weights on the test pairs, at its validation thresholds: metrics.json and the plots."""
    args, out, folds = run.args, run.args.out, run.folds
    if run.world > 1:
        dist.barrier()
    ckpt = load_checkpoint(os.path.join(out, "best.pt"))
    load_weights(run.model, ckpt["model"], os.path.join(out, "best.pt"))
    test = evaluate(run.model, run.bank, run.test_pairs, None, args.eval_batch_size, run.device,
                    autocast=run.ctx["autocast"])
    r = report(test["scores"], test["labels"], run.test_kinds, ckpt["thresholds"])
    metrics = {"selected_by": SELECTED_BY, "best_epoch": ckpt["epoch"], "val_acc": ckpt["val_acc"],
               "threshold": ckpt["threshold"], "test_acc": r["all"]["acc"],
               "val": {k: {"acc": ckpt["val"]["val_acc" + ("" if k == "all" else f"_{k}")],
                           "threshold": ckpt["thresholds"][k]} for k in ("all",) + KINDS},
               "test": r, "protocol": args.protocol, "folds": folds, "epochs_run": len(run.history),
               "steps": run.ctx["step"], "num_embedded": test["num_embedded"],
               "minutes": round(sum(h.get("seconds", 0) for h in run.history) / 60, 1)}
    if run.rank != 0:
        return metrics
    name = os.path.basename(out)
    write_scores(os.path.join(out, "test_scores.csv"), run.test_pairs, run.test_kinds, test["scores"])
    plot_roc(test["scores"], test["labels"], run.test_kinds, os.path.join(out, "roc.png"),
             title=f"{name}: test folds {folds['test']}")
    plot_errors(run.bank, run.test_pairs, run.test_kinds, test["scores"], ckpt["thresholds"],
                os.path.join(out, "errors.png"),
                title=f"{name}: most confident errors on test folds {folds['test']} "
                      f"(score above each pair; FF and FP each at its own validation threshold)")
    write_json(os.path.join(out, "metrics.json"), metrics)
    run.log(f"best epoch {metrics['best_epoch']}: val acc {metrics['val_acc']:.4f}; test acc "
            f"{metrics['test_acc']:.4f} (threshold {r['all']['threshold']:.4f})"
            + "".join(f", {k} {r[k]['acc']:.4f} (threshold {r[k]['threshold']:.4f})" for k in KINDS if k in r)
            + f" -> {out}")
    return metrics


def build_aligner(args, cfp, train_images, resume=None):
    """--align resolved against the dataset, and the Aligner it asks for (None for --align none). Template
    alignment takes its templates from the training faces (or, resuming, from the checkpoint)."""
    missing = cfp.landmarks is None or np.isnan(cfp.landmarks).any()
    if args.align is None:
        args.align = "template" if not missing or args.landmark_net else "none"
    if args.align == "none":
        return None
    if missing:
        raise UserError(f"--align {args.align}: {args.data_root} has no Data/Fiducials landmark files for some "
                        f"or all of its images; use --align none, or --landmark-net RUN to predict them")
    if resume and resume.get("aligner"):
        return Aligner(**resume["aligner"])
    try:
        return Aligner.fit(args.align, args.align_margin, cfp.landmarks[train_images], cfp.profile[train_images])
    except ValueError as e:  # a template needs faces of its pose among the training images
        raise UserError(f"--align {args.align}: {e} among the training images of {args.data_root}; "
                        f"use --align box") from None


def place_landmarks(args, cfp, log, train_images, chunk=256):
    """Where the faces' landmarks come from: the dataset's files, or (for images without them, with
    --landmark-net; for every image, with --predict-landmarks) the landmark network, run once over each such
    image, which also gives its pose; with --landmarks-pasted, over each training photo pasted into a picture.
    -> the record config.json keeps."""
    todo = np.arange(len(cfp.paths)) if cfp.landmarks is None or args.predict_landmarks else \
        np.flatnonzero(np.isnan(cfp.landmarks).any((1, 2)))
    if not len(todo) or not args.landmark_net or args.align == "none":
        return {"source": "none" if cfp.landmarks is None else "given" if not len(todo) else "given for some"}
    finder = FaceFinder.load(args.landmark_net)
    t, missed = time.time(), []
    pasting = Pasting(cfp, train_images, args.landmarks_pasted, args.seed) if args.landmarks_pasted else None
    if cfp.landmarks is None:
        cfp.landmarks = np.full((len(cfp.paths), NUM_POINTS, 2), np.nan)
    for start in range(0, len(todo), chunk):  # a chunk of photos in memory at a time
        rows = todo[start:start + chunk]
        pictures, moved = [open_image(cfp.paths[i]) for i in rows], [np.eye(3)] * len(rows)
        if pasting:
            pictures, moved = pasting(pictures, rows)
        for i, m, (points, profile, _, ok) in zip(rows, moved, finder.find_all(pictures)):
            cfp.landmarks[i] = align.apply(np.linalg.inv(m), points)  # back to the photo's own pixels
            if cfp.layout == "folders":  # CFP's folders tell the pose; identity folders do not
                cfp.profile[i] = profile
            if not ok:
                missed.append(cfp.paths[i])
    log(f"landmarks: predicted for {len(todo)} images by {args.landmark_net} in {time.time() - t:.0f}s; "
        f"no face found in {len(missed)} (their best guess kept){': ' + ', '.join(missed[:3]) if missed else ''}")
    return {"source": "predicted" if len(todo) == len(cfp.paths) else f"predicted for {len(todo)} images",
            **finder.source, "no_face_found": len(missed),
            **({"training_photos_pasted": f"face {args.landmarks_pasted:g} to 1 of the picture"} if pasting else {})}


def clutter_pieces(cfp, train_images, seed, device, size=32):
    """--clutter-from photos: the corners of 400 training photos that stay outside their faces (by the
    landmarks the run aligns with), uint8 (P, 3, size, size) on device."""
    marked = np.asarray(train_images)[np.isfinite(cfp.landmarks[train_images]).all((1, 2))]
    pieces = backgrounds_of(cfp, marked, np.random.default_rng(seed)) if len(marked) else []
    if not pieces:
        raise UserError("--clutter-from photos: no training photo has a corner outside its face to cut a piece from")
    return torch.stack([torch.from_numpy(np.asarray(p.resize((size, size), Image.BILINEAR)).copy()).permute(2, 0, 1)
                        for p in pieces]).to(device)


class Pasting:
    """--landmarks-pasted: the training photos among a chunk pasted at random into larger pictures, the face a
    fraction of the width drawn log-uniformly from [smallest, 1], on the corners of other training photos
    (landmarks.paste). __call__(pictures, rows) -> (pictures, matrices from each photo's pixels to its picture's)."""

    def __init__(self, cfp, train_images, smallest, seed):
        if cfp.landmarks is None or np.isnan(cfp.landmarks[train_images]).any():
            raise UserError("--landmarks-pasted cuts backgrounds outside the training faces by their landmark "
                            f"files: {cfp.root} lacks some")
        self.rng = np.random.default_rng(seed)
        self.train, self.smallest = set(np.asarray(train_images).tolist()), smallest
        self.pieces = backgrounds_of(cfp, np.asarray(train_images), self.rng)

    def __call__(self, pictures, rows):
        out = [paste(im, math.exp(self.rng.uniform(math.log(self.smallest), 0)), self.pieces, self.rng)
               if i in self.train else (im, np.eye(3)) for im, i in zip(pictures, rows)]
        return [p for p, _ in out], [m for _, m in out]


def view_name(args):
    return args.resize if args.align == "none" else f"{args.align}-aligned, margin {args.align_margin:g}"


def input_samples(train_set, bank, val_pairs, cfp, args, pieces=None, n=16):
    """A training batch after augmentation and validation faces of each pose, as uint8 images."""
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))[:n]
    inputs, _ = train_set.batch(bank, idx)
    x = inputs[0].float() / 255
    if args.augment:
        x = augment(clutter(x, args.clutter, pieces) if args.clutter else x, jitter=args.jitter)
    val = np.unique(val_pairs[:, :2])
    rows = {f"training batch, {'augmented' if args.augment else 'not augmented'}": (x * 255).round().byte()}
    for name, sel in (("validation frontal", ~cfp.profile[val]), ("validation profile", cfp.profile[val])):
        if sel.any():
            rows[name] = bank[val[sel][:: max(1, sel.sum() // n)][:n]]
    return rows


class Interrupted(UserError):
    exit_code = 130


def continue_advice(args, last_saved):
    if last_saved:
        return f"epoch {last_saved} is saved; continue with: {resume_command(args)}"
    return f"no epoch finished, nothing to continue; start again with: {resume_command(args, fresh=True)}"


def resume_command(args, fresh=False):
    """The command line that continues this run (or, with fresh, starts it again)."""
    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    if "--out" not in argv:
        argv += ["--out", args.out]
    return " ".join(shlex.quote(a) for a in ["python", "train.py"] + argv + ["--overwrite" if fresh else "--resume"])


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    run_cli(main, get_args_parser().parse_args())
