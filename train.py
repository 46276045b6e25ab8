"""Train a Siamese face-verification network on CFP.

    python train.py --arch 2 --backbone resnext50 --lr 1e-4
    python data.py --make-toy toy && python train.py --data-root toy --backbone resnet18 --no-pretrained --img-size 64
    torchrun --nproc_per_node 2 train.py ...   (DistributedDataParallel; same flags)
"""
import argparse
import csv
import io
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from data import ImageBank, ImageSet, PairSet, load_cfp, preprocess, split_folds
from evaluate import best_threshold, evaluate, plot_roc, report
from losses import ARCH_LOSSES, LOSSES, build_loss
from models import BACKBONES, build_model
from utils import (UserError, all_reduce_mean, atomic_save, atomic_write, git_revision, init_distributed,
                   load_checkpoint, run_cli, write_json)

RUN_FILES = ("config.json", "history.csv", "curves.png", "best.pt", "last.pt", "metrics.json", "roc.png", "log.txt")
# A checkpoint is only usable with the flags that shaped its network and loss.
MODEL_KEYS = ("arch", "variation", "loss", "backbone", "embed_dim", "img_size")


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
                   help="loss margin (default: cosine 0.5, arcface 0.5, cosface 0.35)")
    g.add_argument("--scale", type=float, default=None, help="arcface/cosface logit scale s (default: 64)")

    g = p.add_argument_group("data")
    g.add_argument("--data-root", type=str, default=os.environ.get("CFP_ROOT", "cfp-dataset"),
                   help="CFP folder in the official layout (default: $CFP_ROOT, else ./cfp-dataset)")
    g.add_argument("--protocol", type=str, default="seed", choices=["seed", "10fold"],
                   help="seed: folds 1-6 train, 7-8 val, 9-10 test; 10fold: test --test-fold K, "
                        "validate on K+1, train on the other 8 (default: seed)")
    g.add_argument("--test-fold", type=int, default=None, help="test fold K for --protocol 10fold (1..10)")
    g.add_argument("--img-size", type=int, default=224, help="square input size in pixels (default: 224)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flip + rotation up to 20 degrees while training (default: on)")
    g.add_argument("--workers", type=int, default=2, help="image decoding threads (default: 2)")
    g.add_argument("--cache-dir", type=str, default="",
                   help="keep decoded images on disk here, so later runs start at once (default: off)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd"],
                   help="adam, or sgd with momentum 0.9 (default: adam)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
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
                   help="mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling; "
                        "no-op on CPU (default: off)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (default: off)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="images per evaluation batch (default: 64)")
    g.add_argument("--print-freq", type=int, default=50, help="steps between progress lines (default: 50)")
    g.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def check_args(args):
    """Fill the loss default and refuse impossible combinations, before anything is read or written."""
    if args.loss is None:
        args.loss = ARCH_LOSSES[args.arch][0]
    if args.loss not in ARCH_LOSSES[args.arch]:
        raise UserError(f"--loss {args.loss} does not fit --arch {args.arch} "
                        f"(choose from {', '.join(ARCH_LOSSES[args.arch])})")
    if args.variation and args.arch != 1:
        raise UserError("--variation only applies to --arch 1")
    if not 0 <= args.freeze < 1:
        raise UserError(f"--freeze must be in [0, 1), got {args.freeze}")
    for flag in ("batch_size", "epochs", "img_size", "embed_dim", "eval_batch_size", "print_freq"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if LOSSES[args.loss].sampling == "images" and args.batch_size < 2:
        raise UserError(f"--loss {args.loss} needs --batch-size of at least 2 (BatchNorm on the embedding)")
    if args.lr <= 0 or args.max_steps < 0 or args.warmup_epochs < 0 or args.workers < 0:
        raise UserError("--lr must be positive; --max-steps, --warmup-epochs and --workers non-negative")
    if args.img_size < 32:
        raise UserError(f"--img-size must be at least 32 (five stride-2 stages), got {args.img_size}")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other")
    if args.protocol == "10fold":
        split_folds(args.protocol, args.test_fold)
    elif args.test_fold is not None:
        raise UserError("--test-fold needs --protocol 10fold")
    if not args.out:
        name = f"arch{args.arch}{'v' if args.variation else ''}_{args.loss}_{args.backbone}" \
               f"_lr{args.lr:g}_{args.optimizer}_{args.epochs}e"
        args.out = os.path.join("runs", name + (f"_fold{args.test_fold}" if args.test_fold else ""))


def check_run_folder(args):
    """An existing run is never clobbered by accident."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if args.resume and not os.path.isfile(os.path.join(args.out, "last.pt")):
        raise UserError(f"--resume: {args.out} has no last.pt to resume from")
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"--out {args.out} already holds a run ({', '.join(existing)}); "
                        f"pass --resume to continue it or --overwrite to replace it")


def check_compatible(saved, args, source):
    diff = [f"--{k.replace('_', '-')} {saved.get(k)} vs {getattr(args, k)}" for k in MODEL_KEYS
            if saved.get(k) != getattr(args, k)]
    if diff:
        raise UserError(f"{source} was trained with other settings than asked for: {'; '.join(diff)}")


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
    """Prints on rank 0 and keeps a copy in the run's log.txt."""

    def __init__(self, path=None):
        self.path = path

    def __call__(self, *msg):
        line = " ".join(str(m) for m in msg)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def train_one_epoch(objective, train_set, bank, optimizer, scheduler, scaler, epoch, args, ctx):
    objective.train()
    sampler = DistributedSampler(range(len(train_set)), num_replicas=ctx["world"], rank=ctx["rank"],
                                 shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    n_batches = max(1, len(order) // args.batch_size)
    device, log = ctx["device"], ctx["log"]
    total_loss, seen, t0 = 0.0, 0, time.time()
    for step in range(n_batches):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        inputs, target = train_set.batch(bank, idx, swap=True)
        inputs = [preprocess(x.to(device, non_blocking=True), train=args.augment) for x in inputs]
        if device.type == "cuda":
            inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        target = target.to(device, non_blocking=True)
        with ctx["autocast"]:
            loss = objective(inputs, target)
        loss_value = loss.item() if ctx["world"] == 1 else all_reduce_mean([loss.item()], device)[0]
        if not math.isfinite(loss_value):
            raise UserError(f"non-finite loss ({loss_value}) at epoch {epoch + 1} step {step + 1}: "
                            f"try a lower --lr; best.pt and last.pt are left as they were")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += loss_value
        seen += 1
        ctx["step"] += 1
        last = step + 1 == n_batches or (args.max_steps and ctx["step"] >= args.max_steps)
        if (step + 1) % args.print_freq == 0 or last:
            images = sum(x.shape[0] for x in inputs) * (step + 1) * ctx["world"]
            log(f"epoch {epoch + 1} step {step + 1}/{n_batches} loss {total_loss / seen:.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {images / (time.time() - t0):.1f} img/s")
        if args.max_steps and ctx["step"] >= args.max_steps:
            break
    if ctx["world"] > 1:  # BatchNorm statistics saw each rank's own batches: evaluate rank 0's everywhere
        for b in objective.module.buffers():
            dist.broadcast(b, 0)
    return {"train_loss": total_loss / max(seen, 1), "steps": seen}


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_acc"] for h in history], "o-", color="C2")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


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
    is_main = rank == 0
    check_run_folder(args)
    if world > 1:
        dist.barrier()  # every rank has looked at --out before rank 0 writes into it
    resume = None
    if args.resume:  # read and vet it before spending minutes on data
        resume = load_checkpoint(os.path.join(args.out, "last.pt"))
        check_compatible(resume["args"], args, os.path.join(args.out, "last.pt"))
    log = Logger() if is_main else (lambda *a: None)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # protocol, network and loss first (cheap, and a missing weight file fails fast), then the images
    cfp = load_cfp(args.data_root)
    folds = split_folds(args.protocol, args.test_fold)
    if LOSSES[args.loss].sampling == "pairs":
        train_set = PairSet(cfp.pairs(folds["train"])[0])
    else:
        train_set = ImageSet(cfp.images_of(folds["train"]), cfp.identity)
    val_pairs, _ = cfp.pairs(folds["val"])
    test_pairs, test_kinds = cfp.pairs(folds["test"])
    model = build_model(args).to(device)
    criterion = build_loss(args.loss, num_classes=getattr(train_set, "num_classes", None),
                           embed_dim=args.embed_dim, margin=args.margin, scale=args.scale).to(device)
    needed = np.concatenate([cfp.images_of(folds["train"]), val_pairs[:, :2].ravel(), test_pairs[:, :2].ravel()])
    t = time.time()
    bank = ImageBank(cfp, needed, args.img_size, args.workers, args.cache_dir,
                     device if device.type == "cuda" else "cpu")
    log(f"data: {len(train_set)} training {train_set.sampling} (folds {folds['train']}), {len(val_pairs)} "
        f"validation pairs {folds['val']}, {len(test_pairs)} test pairs {folds['test']}; "
        f"{len(bank.indices)} images at {args.img_size}px decoded in {time.time() - t:.1f}s")

    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, len(train_set) // (args.batch_size * world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, steps_per_epoch))
    use_amp = args.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    start_epoch, history, best = 0, [], {"val_acc": -1.0, "epoch": 0, "threshold": 0.0}
    if resume:
        model.load_state_dict(resume["model"])
        criterion.load_state_dict(resume["criterion"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch, history, best = resume["epoch"], resume["history"], resume["best"]
        if args.lr != resume["args"]["lr"]:  # an explicit new --lr wins over the saved one
            scheduler.base_lrs = [args.lr for _ in scheduler.base_lrs]
            for g in optimizer.param_groups:
                g["lr"] = args.lr * lr_lambda(args, steps_per_epoch)(scheduler.last_epoch)
            log(f"--lr {args.lr:g} replaces the run's {resume['args']['lr']:g}")
        log(f"resumed {args.out}/last.pt: model, loss, optimizer, scheduler and scaler state, epoch "
            f"{start_epoch}, best validation accuracy {best['val_acc']:.4f} (epoch {best['epoch']})")

    objective = Objective(model, criterion)
    if world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        objective = torch.compile(objective)

    # the run folder: written only now that every input has been read successfully
    if is_main:
        os.makedirs(args.out, exist_ok=True)
        if args.overwrite:
            for f in RUN_FILES:
                if os.path.exists(os.path.join(args.out, f)):
                    os.remove(os.path.join(args.out, f))
        log = Logger(os.path.join(args.out, "log.txt"))
        built = {"network": type(model.backbone).__name__, "arch": model.arch, "loss": type(criterion).__name__,
                 "optimizer": type(optimizer).__name__, "frozen_layers": len(model.frozen),
                 "backbone_layers": model.num_layers,
                 "params": sum(p.numel() for p in model.parameters()),
                 "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if not args.resume:
            write_json(os.path.join(args.out, "config.json"),
                       {"args": vars(args), "command": " ".join(sys.argv), "git": git_revision(),
                        "torch": torch.__version__, "device": str(device), "world_size": world, "built": built})
        log(f"{args.out}: {built}")

    ctx = {"device": device, "rank": rank, "world": world, "log": log, "step": start_epoch * steps_per_epoch,
           "autocast": torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)}
    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness is a function of (seed, epoch, rank): resuming repeats it exactly
        torch.manual_seed(int(np.random.SeedSequence([args.seed, epoch, rank]).generate_state(1)[0]))
        t = time.time()
        stats = train_one_epoch(objective, train_set, bank, optimizer, scheduler, scaler, epoch, args, ctx)
        val = evaluate(model, bank, val_pairs, criterion, args.eval_batch_size, device, autocast=ctx["autocast"])
        threshold, val_acc = best_threshold(val["scores"], val["labels"])
        history.append({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": stats["train_loss"],
                        "val_loss": val["loss"], "val_acc": val_acc, "threshold": threshold})
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {stats['train_loss']:.4f}, val loss {val['loss']:.4f}, "
            f"val acc {val_acc:.4f} (threshold {threshold:.4f}), {time.time() - t:.1f}s")
        stop = bool(args.max_steps) and ctx["step"] >= args.max_steps
        if is_main:
            state = {"model": model.state_dict(), "criterion": criterion.state_dict(), "args": vars(args),
                     "epoch": epoch + 1, "threshold": threshold, "val_acc": val_acc}
            if val_acc > best["val_acc"]:
                best = {"val_acc": val_acc, "epoch": epoch + 1, "threshold": threshold}
                atomic_save(state, os.path.join(args.out, "best.pt"))
            atomic_save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "best": best, "history": history},
                        os.path.join(args.out, "last.pt"))
            write_history(history, os.path.join(args.out, "history.csv"))
            plot_curves(history, os.path.join(args.out, "curves.png"))
        if stop:
            break

    # test: the best epoch's weights and its validation threshold
    if world > 1:
        dist.barrier()
    ckpt = load_checkpoint(os.path.join(args.out, "best.pt"))
    model.load_state_dict(ckpt["model"])
    test = evaluate(model, bank, test_pairs, None, args.eval_batch_size, device, autocast=ctx["autocast"])
    metrics = {"best_epoch": ckpt["epoch"], "val_acc": ckpt["val_acc"], "threshold": ckpt["threshold"],
               **report(test, test_kinds, ckpt["threshold"]), "protocol": args.protocol, "folds": folds,
               "epochs_run": len(history)}
    if is_main:
        plot_roc(test, test_kinds, os.path.join(args.out, "roc.png"), title=f"{args.out}: test folds {folds['test']}")
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        log(f"best epoch {metrics['best_epoch']}: val acc {metrics['val_acc']:.4f}, test acc {metrics['test_acc']:.4f} "
            f"(FF {metrics['test']['FF']['acc']:.4f}, FP {metrics['test']['FP']['acc']:.4f}) -> {args.out}")
    if world > 1:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
