"""Training and evaluation throughput: is the input pipeline at the model's limit?

    python bench.py --data-root ../shared/cfp-dataset --backbone resnet18 --img-size 112 --batch-size 14 --steps 20

Measures in one process: (a) model-only training steps on a batch already in memory (the ceiling),
(b) end-to-end training steps through the real data path (uint8 image bank -> sampling -> augmentation
-> step), their ratio, (c) evaluation images/s; with --amp, (a) in fp32 as well.
The last line is `ratio X.XX` (end-to-end / model-only).
"""
import argparse
import time

import numpy as np
import torch

from align import ALIGN_MODES, Aligner
from data import PairSet, load_cfp, split_folds
from images import ImageBank, preprocess
from losses import Objective, build_loss
from models import BACKBONES, build_model
from toy import make_toy
from utils import UserError, amp_dtype, channels_last, run_cli
from verify import extract


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=str, default="",
                   help="CFP-layout folder (default: a synthetic toy dataset written to a temporary folder)")
    p.add_argument("--arch", type=int, default=2, choices=[1, 2], help="architecture (default: 2)")
    p.add_argument("--backbone", type=str, default="resnet18", choices=list(BACKBONES),
                   help="backbone (default: resnet18)")
    p.add_argument("--img-size", type=int, default=112, help="input size (default: 112)")
    p.add_argument("--batch-size", type=int, default=14, help="pairs per step (default: 14)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--eval-images", type=int, default=512, help="images embedded for (c) (default: 512)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision as train.py --amp (bf16 autocast on GPUs and on CPUs with AVX-512-BF16 or "
                        "AMX), timed beside fp32 (default: off)")
    p.add_argument("--align", type=str, default="none", choices=ALIGN_MODES,
                   help="decode the faces into the bank aligned by the dataset's landmarks, as train.py --align "
                        "(the templates from the seed split's training folds) (default: none)")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_bank(args, device):
    """The seed split's training pairs and their images, decoded once (aligned with --align) -> (cfp, pairs,
    bank, seconds)."""
    root = args.data_root
    if not root:
        import tempfile
        root = tempfile.mkdtemp(prefix="toy-")
        make_toy(root)
    cfp = load_cfp(root)
    pairs = PairSet(cfp.pairs(split_folds("seed")["train"])[0])
    t = time.time()
    aligner = None
    if args.align != "none":
        if cfp.landmarks is None:
            raise UserError(f"--align {args.align}: {root} has no Data/Fiducials landmark files")
        images = cfp.images_of(split_folds("seed")["train"])
        aligner = Aligner.fit(args.align, cfp.landmarks[images], cfp.profile[images])
    bank = ImageBank(cfp, pairs.pairs[:, :2].numpy().ravel(), args.img_size,
                     device=device if device.type == "cuda" else "cpu", aligner=aligner)
    return cfp, pairs, bank, time.time() - t


class Steps:
    """One training step of each kind: on a fixed batch, and through the real data path."""

    def __init__(self, args, device, cfp, pairs, bank):
        self.args, self.device, self.cfp, self.pairs, self.bank = args, device, cfp, pairs, bank
        loss = "cosine" if args.arch == 2 else "ce"
        self.model = build_model({"backbone": args.backbone, "arch": args.arch, "loss": loss, "pretrained": False,
                                  "maxpool": True, "variation": False, "freeze": 0.0, "dropout": 0.0}).to(device)
        self.objective = Objective(self.model, build_loss(loss)).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, weight_decay=5e-4)
        self.dtype = amp_dtype(device) if args.amp else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.fmt = torch.channels_last if channels_last(device, self.dtype) else torch.contiguous_format
        self.model = self.model.to(memory_format=self.fmt)
        self.order = torch.randperm(len(pairs))
        self.fixed = self.real_batch(0)
        self.fixed32 = ([x.contiguous() for x in self.fixed[0]], self.fixed[1])

    def step(self, inputs, target, amp=True):
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=amp and bool(self.dtype)):
            loss = self.objective(inputs, target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def rows(self, i):
        n = self.args.batch_size
        return self.order[(i * n) % (len(self.order) - n):][:n]

    def real_batch(self, i):
        """The training loop's data path: gather uint8 from the bank, augment and normalise on the device."""
        inputs, target = self.pairs.batch(self.bank, self.rows(i), swap=True)
        inputs = [preprocess(x.to(self.device, non_blocking=True), train=True).contiguous(memory_format=self.fmt)
                  for x in inputs]
        return inputs, target.to(self.device, non_blocking=True)


def time_steps(s, args):
    """Seconds and step counts of each path, measured in interleaved blocks so that machine noise hits all."""
    timings = {"model-only": [], "end-to-end": [], "model-only fp32": []}

    def timed(name, k, run):
        sync(s.device)
        t = time.perf_counter()
        for i in range(k):
            run(i)
        sync(s.device)
        timings[name].append((time.perf_counter() - t, k))
    for i in range(args.warmup):
        s.step(*s.fixed)
        s.step(*s.real_batch(i))
    block = max(1, min(5, args.steps))
    for b in range(0, args.steps, block):
        k = min(block, args.steps - b)
        timed("model-only", k, lambda i: s.step(*s.fixed))
        timed("end-to-end", k, lambda i: s.step(*s.real_batch(b + i)))
        if s.dtype is not None:  # the same step without autocast, in train.py's fp32 layout
            if s.device.type != "cuda":
                s.model.to(memory_format=torch.contiguous_format)
            timed("model-only fp32", k, lambda i: s.step(*s.fixed32, amp=False))
            s.model.to(memory_format=s.fmt)
    return timings


def eval_rate(s, args):
    """Images per second embedded for evaluation (no grad)."""
    indices = np.unique(s.pairs.pairs[:, :2].numpy())[:args.eval_images]
    extract(s.model, s.bank, indices, 64, s.device)  # warm-up
    sync(s.device)
    t = time.perf_counter()
    extract(s.model, s.bank, indices, 64, s.device)
    sync(s.device)
    return len(indices) / (time.perf_counter() - t)


def report(s, args, timings, rate, decode_s):
    name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    n, precision = args.batch_size, str(s.dtype).replace("torch.", "") if s.dtype else "off"
    print(f"device {name}; torch {torch.__version__}; {args.backbone} arch {args.arch} at {args.img_size}px, "
          f"{n} pairs/step, amp {precision}; {len(s.bank.indices)} images decoded once "
          f"({'aligned: ' + args.align if args.align != 'none' else 'whole'}) in {decode_s:.1f}s")
    print(f"{'path':<16}{'s/step':>10}{'pairs/s':>10}{'images/s':>10}")
    rates = {}
    for k, v in timings.items():
        if v:
            per_step = sum(t for t, _ in v) / sum(c for _, c in v)
            rates[k] = n / per_step
            print(f"{k:<16}{per_step:>10.3f}{rates[k]:>10.1f}{2 * rates[k]:>10.1f}")
    print(f"{'evaluation':<16}{'':>10}{'':>10}{rate:>10.1f}")
    if "model-only fp32" in rates:
        print(f"model-only, {precision} autocast / fp32: {rates['model-only'] / rates['model-only fp32']:.2f}x")
    print(f"ratio {rates['end-to-end'] / rates['model-only']:.2f}")


def main(args):
    if min(args.batch_size, args.steps, args.img_size) < 1:
        raise UserError("--batch-size, --steps and --img-size must be positive")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfp, pairs, bank, decode_s = load_bank(args, device)
    steps = Steps(args, device, cfp, pairs, bank)
    if args.amp and steps.dtype is None:
        print("--amp: this CPU has no fast bf16 (AVX-512-BF16 or AMX): timing fp32 only")
    timings = time_steps(steps, args)
    rate = eval_rate(steps, args)
    report(steps, args, timings, rate, decode_s)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
