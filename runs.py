"""The run folder: one run per folder, its record (config.json, log.txt, inputs.png), what a resumed run must
match, and how an interrupted run says to go on."""
import contextlib
import csv
import fcntl
import glob
import io
import json
import os
import shlex
import sys

import numpy as np
import torch
import torch.distributed as dist

from data import IdentityPairSet, dataset_label, write_pair_file
from plots import plot_inputs
from utils import (DiskFull, UserError, atomic_save, atomic_write, git_state, load_checkpoint, machine_state,
                   write_json)

RUN_FILES = ("config.json", "history.csv", "curves.png", "best.pt", "last.pt", "metrics.json", "roc.png", "log.txt",
             "test_scores.csv", "errors.png", "inputs.png", "pairs_val.txt", "pairs_test.txt", "git.diff")
SELECTED_BY = "val_acc: accuracy of all validation pairs (FF and FP together) at one threshold"
# A checkpoint is only usable with the flags that shaped its network and loss ...
MODEL_KEYS = ("arch", "variation", "loss", "backbone", "maxpool", "img_size")
# ... and a resumed run is the same run only with the same data, objective and optimisation.
RUN_KEYS = MODEL_KEYS + ("protocol", "test_fold", "eval_root", "pairs_from", "resize", "align", "landmark_net",
                         "predict_landmarks", "augment", "clutter", "margin", "scale", "freeze", "dropout",
                         "optimizer", "weight_decay", "schedule", "warmup_epochs", "batch_size", "seed", "amp")


class RunLock:
    """One run per folder: an exclusive flock on FOLDER/.lock, which the kernel releases when the process
    ends, however it ends (so a killed run leaves no stale lock)."""

    def __init__(self, folder):
        self.folder, self.file = folder, None
        self.created = not os.path.exists(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"--out {folder} is a file, not a folder")
        try:
            os.makedirs(folder, exist_ok=True)
            self.file = os.fdopen(os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                                          0o644), "a+")
        except OSError as e:
            if os.path.islink(os.path.join(folder, ".lock")):
                raise UserError(f"{os.path.join(folder, '.lock')} is a symbolic link: refusing to write "
                                f"through it") from None
            raise UserError(f"--out {folder} cannot be written: {e.strerror}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"--out {folder} is in use by another run ({holder}); wait for it to end or "
                            f"choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n")
        self.file.flush()
        # what a killed run was writing when it died: never read again, possibly gigabytes
        for tmp in glob.glob(os.path.join(glob.escape(folder), "*.tmp[0-9]*")):  # --out is a path, not a pattern
            os.remove(tmp)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()
            self.file = None
            if self.created and os.listdir(self.folder) == [".lock"]:  # nothing was written: leave no trace
                os.remove(os.path.join(self.folder, ".lock"))
                os.rmdir(self.folder)


def open_run(args, world):
    """Check --out, and read and vet last.pt when resuming, before minutes are spent on data."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if args.resume and not os.path.isfile(os.path.join(args.out, "last.pt")):
        raise UserError(f"--resume: {args.out} has no last.pt to resume from")
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"--out {args.out} already holds a run ({', '.join(existing)}); "
                        f"pass --resume to continue it or --overwrite to replace it")
    if world > 1:
        dist.barrier()  # every rank has looked at --out before rank 0 writes into it
    if not args.resume:
        return None
    resume = load_checkpoint(os.path.join(args.out, "last.pt"), kind="last")
    for flag in ("align", "dropout"):  # not given: the run's own value
        if getattr(args, flag) is None and flag in resume["args"]:
            setattr(args, flag, resume["args"][flag])
    check_compatible(resume["args"], args, os.path.join(args.out, "last.pt"), RUN_KEYS)
    best = os.path.join(args.out, "best.pt")
    if not os.path.exists(best) and resume["epoch"] > 0:
        if resume["best"]["epoch"] != resume["epoch"]:
            raise UserError(f"--resume: {best} is gone and its epoch ({resume['best']['epoch']}) cannot be rebuilt "
                            f"from last.pt (epoch {resume['epoch']}); put it back, or start again with --overwrite")
        keep = ("model", "criterion", "args", "epoch", "threshold", "thresholds", "val_acc", "val", "aligner",
                "fingerprint", "content")
        atomic_save({k: resume[k] for k in keep}, best)  # the last epoch was the best one
    return resume


def same_data(resume, args, fingerprint=None, content=None):
    """A resumed run reads the dataset it was trained on: the same protocol files and image list (fingerprint),
    and, once decoded, the same pixels (content)."""
    if resume and fingerprint is not None and resume["fingerprint"] != fingerprint:
        raise UserError(f"--resume: {args.data_root} is not the dataset {args.out} was trained on (its protocol "
                        f"files or image list differ); use the run's own --data-root, or another --out")
    if resume and content is not None and resume["content"] != content:
        raise UserError(f"--resume: the images in {args.data_root} are not those {args.out} was trained on (their "
                        f"contents changed); put them back, or start again with --overwrite")


def check_compatible(saved, args, source, keys=MODEL_KEYS):
    """Refuse a checkpoint whose settings differ from the ones asked for, naming each difference."""
    missing = [k for k in keys if k not in saved]
    if missing:
        raise UserError(f"{source} was written by an earlier version (it lacks {', '.join(missing)}): use the "
                        f"commit named in results/STUDIES.md, or start again with --overwrite")
    diff = [f"--{k.replace('_', '-')} {saved[k]} vs {getattr(args, k)}" for k in keys if saved[k] != getattr(args, k)]
    if diff:
        raise UserError(f"{source} was trained with other settings than asked for: {'; '.join(diff)}")


def read_config(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); the run's own record is damaged") from None


@contextlib.contextmanager
def saved_on_interrupt(run, what="", tail=""):
    """Ctrl-C, SIGTERM or a full disk inside the block: one line saying what is saved and how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        what = what or f"interrupted in epoch {run.saved + 1}: "
        raise Interrupted(f"{what}{continue_advice(run.args, run.saved)}{tail}") from None
    except DiskFull as e:
        raise DiskFull(f"{e}; free some space, then {continue_advice(run.args, run.saved)}{tail}") from None


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


def record_run(run, resume):
    """The run folder, written only now that every input has been read: config.json (or its resumes list),
    log.txt from the first line on, and inputs.png."""
    args, model = run.args, run.model
    os.makedirs(args.out, exist_ok=True)
    for f in RUN_FILES if args.overwrite else ("metrics.json",) if resume else ():
        if os.path.exists(os.path.join(args.out, f)):  # replaced, or training again: no longer a finished run
            os.remove(os.path.join(args.out, f))
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
        write_json(path, {"args": vars(args), "command": command, **git_state(args.out), **machine_state(),
                          "device": str(run.device), "world_size": run.world,
                          "dataset": dataset_label(args.data_root), "dataset_fingerprint": run.cfp.fingerprint,
                          "selected_by": SELECTED_BY, "built": built,
                          "aligner": aligner, "landmarks": run.landmarks, "data": data_record(run)})
        if run.cfp.layout == "folders" and not args.eval_root:  # the held-out pairs, for reruns and evaluate.py
            for role, (pairs, _) in (("val", run.val_pairs), ("test", run.test_pairs)):
                write_pair_file(os.path.join(args.out, f"pairs_{role}.txt"), run.cfp, pairs)
    else:
        config, machine = read_config(path), machine_state()
        threads = machine["threads"]
        config.setdefault("resumes", []).append({"command": command, "epoch": run.epoch, "epochs": args.epochs,
                                                 "lr": args.lr, **machine, **git_state()})
        if run.device.type == "cpu" and config["threads"] != threads:
            run.log(f"warning: {args.out} was started with {config['threads']} threads and resumes with "
                    f"{threads}: other CPU kernels, so it will not repeat bit for bit "
                    f"(OMP_NUM_THREADS={config['threads']} to match)")
        write_json(path, config)
    run.log(f"{args.out}: {built}")
    plot_inputs(run.train_set, run.bank, run.val_pairs[0], run.cfp, args, os.path.join(args.out, "inputs.png"),
                title=f"{os.path.basename(args.out)}: what the network sees ({view_name(args)}, {args.img_size}px)")


def data_record(run):
    """What the run trained and was tested on, for config.json."""
    cfp, args = run.cfp, run.args
    if cfp.layout == "cfp":
        return {"layout": "cfp", "protocol": args.protocol, "folds": run.folds}
    return {"layout": "identity folders", "training_identities": len(np.unique(cfp.identity[run.train_images])),
            "evaluated_on": f"CFP root {args.eval_root}, protocol {args.protocol}" if args.eval_root else
            "held-out identities (0.1 each for validation and test): pairs_val.txt, pairs_test.txt",
            "folds": run.folds}


def describe_data(run, seconds):
    """The log's lines on what the run trains, validates and tests on."""
    args, cfp, folds, train_images, lines = run.args, run.cfp, run.folds, run.train_images, []
    if cfp.layout == "folders":
        lines.append(f"data: {args.data_root} is an identity-folder dataset: "
                     f"{len(np.unique(cfp.identity[train_images]))} training identities, {len(train_images)} images; "
                     f"validation and test " + (f"on {args.eval_root}, protocol {args.protocol}" if args.eval_root else
                     f"on pairs of held-out identities ({os.path.join(args.out, 'pairs_val.txt')}, pairs_test.txt)"))
    drawn = ", drawn from identities" if isinstance(run.train_set, IdentityPairSet) else ""
    lines.append(f"data: {len(run.train_set)} training {run.train_set.sampling} per epoch (folds {folds['train']}"
                 f"{drawn}), {len(run.val_pairs[0])} validation pairs {folds['val']}, {len(run.test_pairs[0])} test "
                 f"pairs {folds['test']}; {len(run.bank.indices)} images at {args.img_size}px ({view_name(args)}) "
                 f"decoded in {seconds:.1f}s")
    return lines


def view_name(args):
    return args.resize if args.align == "none" else f"{args.align}-aligned, margin 1.25"


def write_scores(path, pairs, kinds, scores):
    """Every scored pair as CSV (a, b are 0-based dataset indices): pooled metrics and error galleries read it."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["a", "b", "kind", "same", "score"])
    w.writerows((int(a), int(b), k, int(y), f"{s:.9g}") for (a, b, y), k, s in zip(pairs, kinds, scores))
    atomic_write(path, buf.getvalue())
