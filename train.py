"""Train a Siamese face-verification network on CFP.

    python train.py --arch 2 --backbone resnext50 --lr 1e-4
    python train.py --data-root toy --backbone resnet18 --no-pretrained --img-size 64   (toy: written first)
    torchrun --nproc_per_node 2 train.py ...   (DistributedDataParallel; same flags)
"""
import argparse
import contextlib
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from align import ALIGN_MODES
from backgrounds import clutter_pool
from data import KINDS, check_not_seen, split, split_folds, training_set
from faces import build_aligner, prepare
from images import RESIZE_MODES, ImageBank, preprocess, writable_dir
from losses import ARCH_LOSSES, LOSSES, Objective, build_loss
from metrics import report, thresholds_by_kind
from models import BACKBONES, build_model
from plots import import_pyplot, plot_curves, plot_errors, plot_roc
from runs import (SELECTED_BY, Interrupted, RunLock, continue_advice, describe_data, open_run, record_run, same_data,
                  saved_on_interrupt, write_scores)
from toy import make_toy
from utils import (Logger, Progress, UserError, all_reduce_mean, amp_autocast, amp_dtype, atomic_save, channels_last,
                   hms, init_distributed, load_checkpoint, load_weights, lr_lambda, run_cli, write_history,
                   write_json)
from verify import EVAL_BATCH, evaluate

MARGIN_DROPOUT = 0.6  # the study's choice for arcface/cosface (results/cfp-seed: validation 0.785 -> 0.813)
PRINT_FREQ = 50       # steps between progress lines; a line also comes every 10 s


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p.add_argument_group("model"))
    add_data_args(p.add_argument_group("data"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd"],
                   help="adam, or sgd with momentum 0.9 (default: adam)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay of weight matrices and kernels, not of BatchNorm and biases (default: 5e-4)")
    g.add_argument("--schedule", type=str, default="cosine", choices=["none", "cosine", "step"],
                   help="after warmup: constant, cosine to 0, or x0.1 at 1/2 and 3/4 of training (default: cosine)")
    g.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warmup from 0, in epochs; helps random-init and margin losses (default: 1)")
    g.add_argument("--epochs", type=int, default=14, help="training epochs (default: 14)")
    g.add_argument("--batch-size", type=int, default=14,
                   help="pairs (pair losses) or images (margin losses) per step and process (default: 14)")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=str, default="", help="run folder (default: runs/<name from the settings>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    g.add_argument("--seed", type=int, default=0, help="random seed; CPU runs repeat bit for bit (default: 0)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast where the GPU or CPU has it (fp16 with loss scaling on older GPUs; fp32, "
                        "with a warning, on CPUs without bf16) (default: off)")
    return p


def add_model_args(g):
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
                   help="freeze this first fraction of the backbone's layers; 0.5: the seed's half (default: 0)")
    g.add_argument("--margin", type=float, default=None,
                   help="loss margin (default: cosine 0.5, arcface 0.3, cosface 0.35)")
    g.add_argument("--scale", type=float, default=None,
                   help="arcface/cosface logit scale s (default: 32; the papers' 64 suits many more classes)")
    g.add_argument("--maxpool", action=argparse.BooleanOptionalAction, default=True,
                   help="ResNets: the stem's max-pool; --no-maxpool doubles the final map's side at about 4x the "
                        "compute (default: on)")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout on the backbone's feature, before the embedding layer (default: arcface and "
                        f"cosface {MARGIN_DROPOUT}, the pair losses 0)")


def add_data_args(g):
    g.add_argument("--data-root", type=str, default=os.environ.get("CFP_ROOT", "cfp-dataset"),
                   help="CFP in its official layout, or one folder per identity (ROOT/IDENTITY/*.jpg); a missing "
                        "toy/ is written first (default: $CFP_ROOT, else ./cfp-dataset)")
    g.add_argument("--eval-root", type=str, default="", metavar="CFP_ROOT",
                   help="identity folders: validate and test on this CFP root's folds of --protocol (default: "
                        "pairs of held-out identities, saved in the run folder)")
    g.add_argument("--protocol", type=str, default="seed", choices=["seed", "10fold"],
                   help="seed: folds 1-6 train, 7-8 val, 9-10 test; 10fold: test --test-fold K, "
                        "validate on K+1, train on the other 8 (default: seed)")
    g.add_argument("--test-fold", type=int, default=None, help="test fold K for --protocol 10fold (1..10)")
    g.add_argument("--img-size", type=int, default=224, help="square input size in pixels (default: 224)")
    g.add_argument("--resize", type=str, default="pad", choices=RESIZE_MODES,
                   help="--align none: pad (black borders) or squash (the seed's stretch) to the square (default: pad)")
    g.add_argument("--align", type=str, default=None, choices=ALIGN_MODES,
                   help="template: a similarity transform onto the training faces' mean shape (one per pose, "
                        "profiles mirrored to face right); box: a square around the landmarks; none: the whole image "
                        "by --resize (align.py) (default: template where the dataset has Data/Fiducials, else none)")
    g.add_argument("--landmark-net", type=str, default="", metavar="RUN",
                   help="a landmark network (landmarks.py) that places the landmarks of images without a landmark "
                        "file, once, before training (default: none)")
    g.add_argument("--predict-landmarks", action="store_true",
                   help="with --landmark-net: every image's landmarks from the network, as for photos without "
                        "files (default: off)")
    g.add_argument("--pairs-from", type=str, default="identities", choices=["identities", "protocol"],
                   help="pair losses: fresh balanced pairs of the training identities every epoch, or the "
                        "protocol's fixed pairs as the seed (default: identities)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flip + rotation up to 20 degrees while training (default: on)")
    g.add_argument("--clutter", type=float, default=0.0, metavar="P",
                   help="aligned views: in a share P of the training images, a mosaic of faces or a drawn picture "
                        "where the photo ends, as around a face found in a larger picture (default: 0)")
    g.add_argument("--workers", type=int, default=2, help="image decoding threads (default: 2)")
    g.add_argument("--cache-dir", type=str, default="",
                   help="keep decoded images here, so later runs start at once; a set larger than half the "
                        "memory is memory-mapped from there (default: off)")


def check_args(args):
    """Fill the defaults that depend on other flags and refuse impossible settings, before anything is read or
    written. A resumed run takes --dropout and --align from its checkpoint when they are not given (open_run)."""
    args.loss = args.loss or ARCH_LOSSES[args.arch][0]
    if args.dropout is None and not args.resume:
        args.dropout = MARGIN_DROPOUT if LOSSES[args.loss].sampling == "images" else 0.0
    check_ranges(args)
    check_combinations(args)
    if not args.out:
        name = f"arch{args.arch}{'v' if args.variation else ''}_{args.loss}_{args.backbone}" \
               f"_lr{args.lr:g}_{args.optimizer}_{args.epochs}e"
        args.out = os.path.join("runs", name + (f"_fold{args.test_fold}" if args.test_fold else ""))


def check_ranges(args):
    """Every numeric flag inside its range, one line naming the first that is not."""
    def need(ok, flag, what):
        if not ok:
            raise UserError(f"--{flag.replace('_', '-')} must be {what}, got {getattr(args, flag)}")
    for flag in ("lr", "weight_decay", "warmup_epochs", "freeze", "dropout", "margin", "scale", "clutter"):
        need(getattr(args, flag) is None or math.isfinite(getattr(args, flag)), flag, "a finite number")
    for flag in ("batch_size", "epochs", "img_size"):
        need(getattr(args, flag) >= 1, flag, "at least 1")
    for flag in ("workers", "warmup_epochs", "weight_decay"):
        need(getattr(args, flag) >= 0, flag, "non-negative")
    need(args.lr > 0, "lr", "positive")
    need(0 <= args.seed < 2 ** 32, "seed", "in [0, 2^32)")
    need(0 <= args.freeze < 1, "freeze", "in [0, 1)")
    need(args.dropout is None or 0 <= args.dropout < 1, "dropout", "in [0, 1)")
    need(0 <= args.clutter <= 1, "clutter", "in [0, 1]")
    need(args.img_size >= 32, "img_size", "at least 32 (five stride-2 stages)")
    need(args.scale is None or args.scale > 0, "scale", "positive")
    if args.margin is not None and LOSSES[args.loss].margin_range:
        low, high = LOSSES[args.loss].margin_range
        need(low <= args.margin <= high, "margin", f"in [{low:g}, {high:g}] for --loss {args.loss}")


def check_combinations(args):
    """Flags that contradict each other, or that the chosen loss or backbone would ignore."""
    sampling = LOSSES[args.loss].sampling
    rules = [
        (args.loss not in ARCH_LOSSES[args.arch], f"--loss {args.loss} does not fit --arch {args.arch} "
                                                  f"(choose from {', '.join(ARCH_LOSSES[args.arch])})"),
        (args.variation and args.arch != 1, "--variation only applies to --arch 1"),
        (args.margin is not None and not LOSSES[args.loss].margin_range,
         f"--margin does not apply to --loss {args.loss} (only to cosine, arcface and cosface)"),
        (args.scale is not None and sampling != "images",
         f"--scale does not apply to --loss {args.loss} (only to arcface and cosface)"),
        (not args.maxpool and args.backbone.startswith("vgg"), "--no-maxpool is for ResNets: VGG has no stem max-pool"),
        (args.predict_landmarks and not args.landmark_net,
         "--predict-landmarks needs --landmark-net RUN (a network trained by landmarks.py)"),
        (args.clutter and not args.augment, "--clutter adds to --augment: it has no effect with --no-augment"),
        (args.clutter and args.align == "none",
         "--clutter fills what an aligned square shows outside the photo: it needs --align"),
        (args.batch_size < 2 and (sampling == "images" or args.arch == 1),
         f"--arch {args.arch} --loss {args.loss} needs --batch-size of at least 2 (BatchNorm "
         f"{'on the embedding' if sampling == 'images' else 'in the decision network'})"),
        (args.resume and args.overwrite, "--resume and --overwrite contradict each other"),
        (args.protocol == "seed" and args.test_fold is not None, "--test-fold needs --protocol 10fold")]
    for broken, message in rules:
        if broken:
            raise UserError(message)
    if args.protocol == "10fold":
        split_folds(args.protocol, args.test_fold)  # refuses a missing or impossible --test-fold


def main(args):
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, device = init_distributed(device)
    with RunLock(args.out) if rank == 0 else contextlib.nullcontext():  # one run per folder, from the start
        return fit(args, device, rank, world)


def fit(args, device, rank, world):
    """One run, top to bottom: open the folder, data, model and loss, optimizer, resume, the epochs, the test."""
    resume = open_run(args, world)
    log = Logger(enabled=rank == 0)
    run = SimpleNamespace(args=args, device=device, rank=rank, world=world, log=log, saved=0,
                          dtype=setup(args, device, log))
    try:
        prepare_data(run, resume)
        build(run)
        restore(run, resume)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while reading the data and building the network, before anything of the "
                          f"run was written; {continue_advice(args, resume['epoch'] if resume else 0)}") from None
    with saved_on_interrupt(run):
        if rank == 0:
            record_run(run, resume)
        for epoch in range(run.epoch, args.epochs):
            # every epoch's randomness is a function of (seed, epoch, rank): resuming repeats it exactly
            torch.manual_seed(int(np.random.SeedSequence([args.seed, epoch, rank]).generate_state(1)[0]))
            t, lr = time.time(), run.optimizer.param_groups[0]["lr"]
            stats, val = train_one_epoch(run, epoch), validate(run)
            end_epoch(run, epoch, {"epoch": epoch + 1, "lr": lr, "lr_end": run.optimizer.param_groups[0]["lr"],
                                   "train_loss": stats["train_loss"], **val, "seconds": round(time.time() - t, 1)})
    with saved_on_interrupt(run, "interrupted during the final test: every epoch is saved; ", " (it only tests)"):
        metrics = test_and_report(run)
    if world > 1:
        dist.destroy_process_group()
    return metrics


def setup(args, device, log):
    """Seeds, backend flags, a usable --cache-dir; the autocast dtype (None: fp32)."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import_pyplot()  # now, not at the first plot: a Ctrl-C inside matplotlib's first import is an ImportError
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.cache_dir and not writable_dir(args.cache_dir):
        log(f"warning: --cache-dir {args.cache_dir} cannot be written: decoding without a disk cache (a set larger "
            f"than half this machine's memory then has nowhere to go)")
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
    cfp, run.folds, train_images, run.val_pairs, run.test_pairs = split(  # a resumed run reads its pairs again
        args.data_root, args.eval_root, args.protocol, args.test_fold, args.seed, args.out if resume else None)
    same_data(resume, args, fingerprint=cfp.fingerprint)
    cfp, run.landmarks = prepare(cfp, vars(args), log)
    run.cfp, run.train_images, run.aligner = cfp, train_images, build_aligner(args, cfp, train_images, resume)
    run.train_set = training_set(LOSSES[args.loss].sampling, args.pairs_from, cfp, run.folds, train_images)
    run.pool = clutter_pool(args.img_size, args.seed) if args.clutter else None
    needed = np.concatenate([train_images, run.val_pairs[0][:, :2].ravel(), run.test_pairs[0][:, :2].ravel()])
    t = time.time()
    run.bank = ImageBank(cfp, needed, args.img_size, args.workers, args.cache_dir,
                         run.device if run.device.type == "cuda" else "cpu", resize=args.resize, aligner=run.aligner)
    if args.eval_root:  # the evaluation's images under other names among the training folders' images
        check_not_seen(run.bank, train_images, needed[len(train_images):], cfp, args.data_root, args.eval_root)
    same_data(resume, args, content=run.bank.content)
    for line in describe_data(run, time.time() - t):
        log(line)


def build(run):
    """Network, loss, optimizer, schedule and gradient scaler."""
    args, device = run.args, run.device
    run.model, run.channels_last = build_model(args).to(device), channels_last(device, run.dtype)
    run.criterion = build_loss(args.loss, num_classes=getattr(run.train_set, "num_classes", None),
                               embed_dim=run.model.embed_dim, margin=args.margin, scale=args.scale).to(device)
    if run.channels_last:
        run.model = run.model.to(memory_format=torch.channels_last)
    run.optimizer = build_optimizer(args, [run.model, run.criterion])
    run.steps_per_epoch = max(1, len(run.train_set) // (args.batch_size * run.world))
    total, warmup = args.epochs * run.steps_per_epoch, args.warmup_epochs * run.steps_per_epoch
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lr_lambda(args.schedule, total, warmup))
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.dtype == torch.float16)
    if args.warmup_epochs and warmup >= total:
        run.log(f"warning: the {args.warmup_epochs:g}-epoch warmup spans the whole run ({total} steps): the "
                f"learning rate reaches --lr {args.lr:g} at the last step at best; lower --warmup-epochs")
    run.objective = Objective(run.model, run.criterion)
    if run.world > 1:
        run.objective = DistributedDataParallel(run.objective,
                                                device_ids=[device.index] if device.type == "cuda" else None)


def build_optimizer(args, modules):
    """Weight decay on weight matrices and conv kernels only (arcface_torch, timm, MoCo v3)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    return torch.optim.Adam(groups, lr=args.lr)


def restore(run, resume):
    """Where training starts: epoch 0, or the state of last.pt (model, loss, optimizer, schedule, scaler)."""
    run.epoch, run.step, run.history, run.steps = 0, 0, [], []  # run.step: optimizer steps, for the step curve
    run.best = {"val_acc": -1.0, "epoch": 0, "threshold": 0.0}
    if not resume:
        return
    args, path = run.args, os.path.join(run.args.out, "last.pt")
    load_weights(run.model, resume["model"], path)
    load_weights(run.criterion, resume["criterion"], path)
    run.optimizer.load_state_dict(resume["optimizer"])
    run.scheduler.load_state_dict(resume["scheduler"])
    run.scaler.load_state_dict(resume["scaler"])
    run.epoch = run.saved = resume["epoch"]
    run.step = run.epoch * run.steps_per_epoch
    run.history, run.best, run.steps = resume["history"], resume["best"], resume["steps"]
    if args.lr != resume["args"]["lr"]:  # an explicit new --lr wins over the saved one
        run.scheduler.base_lrs = [args.lr for _ in run.scheduler.base_lrs]
        for g in run.optimizer.param_groups:
            g["lr"] = args.lr * run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)
        run.log(f"--lr {args.lr:g} replaces the run's {resume['args']['lr']:g}")
    run.log(f"resumed {path}: model, loss, optimizer, scheduler and scaler state, epoch {run.epoch}, best "
            f"validation accuracy {run.best['val_acc']:.4f} (epoch {run.best['epoch']})")


def train_one_epoch(run, epoch):
    args, device = run.args, run.device
    run.objective.train()
    run.train_set.new_epoch(args.seed, epoch)
    sampler = DistributedSampler(range(len(run.train_set)), num_replicas=run.world, rank=run.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    n_batches = max(1, len(order) // args.batch_size)
    meter = Progress(run.log, epoch, args.epochs, n_batches, PRINT_FREQ)
    for step in range(n_batches):
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        inputs, target = run.train_set.batch(run.bank, batch, swap=True)
        inputs = [preprocess(x.to(device, non_blocking=True), args.augment, args.clutter, run.pool) for x in inputs]
        if run.channels_last:
            inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        with amp_autocast(device, args.amp):
            loss = run.objective(inputs, target.to(device, non_blocking=True))
        loss_value = loss.item() if run.world == 1 else all_reduce_mean([loss.item()], device)[0]
        if not math.isfinite(loss_value) and not run.scaler.is_enabled():
            raise UserError(f"non-finite loss ({loss_value}) at epoch {epoch + 1} step {step + 1}: "
                            f"try a lower --lr; best.pt and last.pt are left as they were")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)  # fp16: a step whose gradients overflowed is skipped and the scale lowered
        run.scaler.update()
        run.scheduler.step()
        run.step += 1
        if meter.update(loss_value, sum(x.shape[0] for x in inputs) * run.world, run.scheduler.get_last_lr()[0]):
            run.steps.append([run.step, round(loss_value, 5), run.scheduler.get_last_lr()[0]])
        elif meter.skipped > 100:
            raise UserError(f"non-finite loss in {meter.skipped} steps of epoch {epoch + 1}, even with loss scaling: "
                            f"try a lower --lr; best.pt and last.pt are left as they were")
    if run.world > 1:  # BatchNorm statistics saw each rank's own batches: evaluate rank 0's everywhere
        for b in run.objective.module.buffers():
            dist.broadcast(b, 0)
    return {"train_loss": meter.mean, "steps": n_batches, "skipped_steps": meter.skipped}


def validate(run):
    """Validation loss, thresholds (all pairs, FF, FP) and mean score of same and different pairs."""
    pairs, kinds = run.val_pairs
    val = evaluate(run.model, run.bank, pairs, run.criterion, EVAL_BATCH, run.device, amp=run.args.amp)
    chosen = thresholds_by_kind(val["scores"], val["labels"], kinds)
    same = val["labels"] == 1
    row = {"val_loss": val["loss"], "val_acc": chosen["all"][1], "threshold": chosen["all"][0]}
    for kind in KINDS:  # NaN where there are no pairs of a kind (held-out pairs of identity folders)
        row[f"val_acc_{kind}"], row[f"threshold_{kind}"] = chosen.get(kind, (math.nan, math.nan))[::-1]
    return {**row, "val_score_same": float(val["scores"][same].mean()),  # the cosine, for arch 2: collapse shows
            "val_score_diff": float(val["scores"][~same].mean())}


def end_epoch(run, epoch, row):
    """The epoch's line; on rank 0 best.pt if validation improved, last.pt, history.csv and curves.png."""
    run.history.append(row)
    val_loss = f", val loss {row['val_loss']:.4f}" if math.isfinite(row["val_loss"]) else ""
    run.log(f"epoch {epoch + 1}/{run.args.epochs} done in {hms(row['seconds'])}: train loss "
            f"{row['train_loss']:.4f}{val_loss}, val acc {row['val_acc']:.4f} (threshold {row['threshold']:.4f})"
            + "".join(f", {k} {row[f'val_acc_{k}']:.4f} ({row[f'threshold_{k}']:.4f})" for k in KINDS
                      if math.isfinite(row[f"val_acc_{k}"]))
            + f"; mean score same {row['val_score_same']:.3f} different {row['val_score_diff']:.3f}")
    if run.rank != 0:
        return
    out, val = run.args.out, {k: v for k, v in row.items() if k.startswith(("val_", "threshold"))}
    thresholds = {k: val["threshold" + ("" if k == "all" else f"_{k}")] for k in ("all",) + KINDS}
    state = {"model": run.model.state_dict(), "criterion": run.criterion.state_dict(), "args": vars(run.args),
             "epoch": epoch + 1, "threshold": val["threshold"], "thresholds": thresholds,
             "val_acc": val["val_acc"], "val": val, "aligner": run.aligner and run.aligner.state(),
             "fingerprint": run.cfp.fingerprint, "content": run.bank.content}
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
    args, out, folds, (pairs, kinds) = run.args, run.args.out, run.folds, run.test_pairs
    if run.world > 1:
        dist.barrier()
    ckpt = load_checkpoint(os.path.join(out, "best.pt"))
    load_weights(run.model, ckpt["model"], os.path.join(out, "best.pt"))
    test = evaluate(run.model, run.bank, pairs, None, EVAL_BATCH, run.device, amp=args.amp)
    r = report(test["scores"], test["labels"], kinds, ckpt["thresholds"])
    metrics = {"selected_by": SELECTED_BY, "best_epoch": ckpt["epoch"], "val_acc": ckpt["val_acc"],
               "threshold": ckpt["threshold"], "test_acc": r["all"]["acc"],
               "val": {k: {"acc": ckpt["val"]["val_acc" + ("" if k == "all" else f"_{k}")],
                           "threshold": ckpt["thresholds"][k]} for k in ("all",) + KINDS},
               "test": r, "protocol": args.protocol, "folds": folds, "epochs_run": len(run.history),
               "steps": len(run.history) and run.history[-1]["epoch"] * run.steps_per_epoch,
               "num_embedded": test["num_embedded"],
               "minutes": round(sum(h["seconds"] for h in run.history) / 60, 1)}
    if run.rank != 0:
        return metrics
    name = os.path.basename(out)
    write_scores(os.path.join(out, "test_scores.csv"), pairs, kinds, test["scores"])
    plot_roc(test["scores"], test["labels"], kinds, os.path.join(out, "roc.png"), f"{name}: test folds {folds['test']}")
    plot_errors(run.bank, pairs, kinds, test["scores"], ckpt["thresholds"], os.path.join(out, "errors.png"),
                title=f"{name}: most confident errors on test folds {folds['test']} "
                      f"(score above each pair; FF and FP each at its own validation threshold)")
    write_json(os.path.join(out, "metrics.json"), metrics)
    run.log(f"best epoch {metrics['best_epoch']}: val acc {metrics['val_acc']:.4f}; test acc "
            f"{metrics['test_acc']:.4f} (threshold {r['all']['threshold']:.4f})"
            + "".join(f", {k} {r[k]['acc']:.4f} (threshold {r[k]['threshold']:.4f})" for k in KINDS if k in r)
            + f" -> {out}")
    return metrics


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
