"""Small helpers shared by the scripts: errors, atomic files, checkpoints, distributed setup."""
import csv
import errno
import hashlib
import io
import json
import math
import os
import pickle
import platform
import signal
import subprocess
import sys
import time
import zipfile

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input the user can fix: printed as one line, no traceback (unless DEBUG=1)."""


class DiskFull(UserError):
    pass


class DataError(UserError):
    """A dataset, image or landmark file that cannot be used: one line naming it."""


def quote(text, limit=60):
    """repr() of an input line, cut short: a 50 MB line must not become a 50 MB error message."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def run_cli(main, args):
    """A script's main(args) with bad input as one line on stderr and exit status 2 (a traceback with DEBUG=1);
    SIGTERM stops it as Ctrl-C does, so that it says what is saved and leaves no half-written file."""
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        main(args)
    except UserError as e:
        if os.environ.get("DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        sys.exit(130)


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------
# Files that are either the old version or the new one, never half-written


def open_nofollow(path, mode="ab"):
    """open() for writing that never follows a symbolic link planted at path (O_NOFOLLOW): a run folder's
    files are its own, never another file reached through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if os.path.islink(path):
            raise UserError(f"{path} is a symbolic link: refusing to write through it") from None
        raise
    return os.fdopen(fd, mode)


def _atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)  # a stale temp file, or a link planted in its place: never written through
        with open_nofollow(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at path itself, never its target
    except (OSError, RuntimeError) as e:
        if _in_chain(e, KeyboardInterrupt):  # Ctrl-C inside torch.save surfaces as "unexpected pos"
            raise KeyboardInterrupt from None
        if disk_full(e):
            kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else \
                f"no {os.path.basename(path)} was written"
            raise DiskFull(f"no space left on device while writing {path}; {kept}") from None
        if isinstance(e, PermissionError):
            raise UserError(f"cannot write {path}: permission denied") from None
        raise
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _chain(e):
    """An exception and every exception it was raised from or while handling."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _in_chain(e, kind):
    return any(isinstance(x, kind) for x in _chain(e))


def disk_full(e):
    """ENOSPC anywhere in the exception chain: torch's zip writer turns a full disk into a RuntimeError
    ("unexpected pos ...") raised while handling the OSError."""
    return any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(x)
               for x in _chain(e))


def atomic_save(obj, path):
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write(path, data):
    _atomic(path, lambda f: f.write(data.encode() if isinstance(data, str) else data))


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


CHECKPOINT_KEYS = {"best": ("model", "criterion", "args", "epoch", "threshold"),
                   "last": ("model", "criterion", "args", "epoch", "optimizer", "scheduler", "scaler", "best",
                            "history", "content"),
                   "landmarks": ("model", "args", "epoch", "poses")}


def load_checkpoint(path, kind="best"):
    """torch.load with weights_only=True: tensors and plain data only, nothing in the file runs.

    A file that is not what train.py writes as best.pt / last.pt (`kind`) is refused in one line."""
    if os.path.isdir(path):
        path = os.path.join(path, "best.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): damaged")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UserError(f"cannot read checkpoint {path}: damaged or not a PyTorch file (not a zip archive)")
    check_unpacked_size(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = next((line for line in lines if "GLOBAL" in line), None)
        if code:  # it names a function or class to import: code would run
            raise UserError(f"refusing to load {path}: it holds more than tensors and plain data "
                            f"({code[:120]}); only checkpoints written by train.py are accepted") from None
        reason = next((line for line in lines if "WeightsUnpickler" not in line and "Weights only" not in line
                       and "Please file" not in line), lines[0] if lines else "")
        raise UserError(f"cannot read checkpoint {path}: damaged or not a PyTorch file ({reason[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: damaged or not a PyTorch file ({first[:120]})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint written by train.py (it holds a {type(ckpt).__name__})")
    missing = [k for k in CHECKPOINT_KEYS[kind] if k not in ckpt]
    if missing:
        hint = " (is it a best.pt copied over it?)" if kind == "last" and "model" in ckpt else ""
        what = "a landmark network written by landmarks.py" if kind == "landmarks" else f"a {kind}.pt written by train.py"
        raise UserError(f"{path} is not {what}: it lacks {', '.join(missing)}{hint}")
    return ckpt


def check_unpacked_size(path, factor=2):
    """torch.save stores its records uncompressed: a file whose records would unpack to far more than its own
    size is damaged or crafted, and is refused before anything is allocated."""
    try:
        with zipfile.ZipFile(path) as z:
            unpacked = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: damaged or not a PyTorch file ({e})") from None
    if unpacked > factor * os.path.getsize(path) + 2 ** 20:
        raise UserError(f"refusing to load {path}: its records would unpack to {unpacked / 2**30:.1f} GiB from a "
                        f"{os.path.getsize(path) / 2**20:.1f} MiB file; damaged or not written by train.py")


def load_weights(module, state, path):
    """load_state_dict, with a one-line error when the weights do not fit the network."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        more = " ".join(str(e).split())[len(first):][:160]
        raise UserError(f"{path}: the weights do not fit the network its settings describe ({first}{more})") from None



def amp_dtype(device):
    """The autocast dtype --amp uses on this device: bf16 where it is fast (CUDA with bf16, CPUs with
    AVX-512-BF16 or AMX), fp16 on older GPUs (with loss scaling), None where a CPU has no fast bf16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return torch.bfloat16
    return None


def amp_autocast(device, amp):
    dtype = amp_dtype(device) if amp else None
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def machine_state():
    """{"torch", "threads", "cpu"}: what a run's last digits also depend on, since another CPU or thread count
    picks other kernels. "cpu" is the model and which fast bf16 kernels it has."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    fast = "AMX" if torch.cpu._is_amx_tile_supported() else \
        "AVX-512-BF16" if torch.cpu._is_avx512_bf16_supported() else "no fast bf16"
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": f"{model or platform.processor() or platform.machine()}, {fast}"}


def git_state(out=None):
    """{"git": the commit (with -dirty when tracked files differ from it), "git_diff_sha1": a hash of that
    difference (None when clean)}: enough to tell whether two runs came from the same code. With out, a dirty
    tree's difference itself is kept there as git.diff, so that the run can be made again."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=here, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git": None, "git_diff_sha1": None}
    if diff and out:
        atomic_write(os.path.join(out, "git.diff"), diff)
    return {"git": rev + ("-dirty" if diff else ""), "git_diff_sha1": hashlib.sha1(diff).hexdigest() if diff else None}


# ---------------------------------------------------------------------------
# The pieces of a training loop that train.py and landmarks.py share


class Logger:
    """Prints (on rank 0) and keeps a copy in the run's log.txt, from the run's first line on: lines
    printed before the run folder exists are written there when it is opened."""

    def __init__(self, enabled=True):
        self.enabled, self.path, self.pending = enabled, None, []

    def open(self, path):
        self.path = path
        self._write("".join(line + "\n" for line in self.pending))
        self.pending = []

    def __call__(self, *msg):
        if not self.enabled:
            return
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


class Progress:
    """pytorch/examples' meters for one epoch: the running mean loss, the steps skipped for a non-finite loss,
    and a line every print_freq steps or 10 s with images/s and the time left."""

    def __init__(self, log, epoch, epochs, n_batches, print_freq=50):
        self.log, self.epoch, self.epochs, self.n, self.print_freq = log, epoch, epochs, n_batches, print_freq
        self.total, self.seen, self.skipped, self.images, self.step = 0.0, 0, 0, 0, 0
        self.t0 = self.last = time.time()

    @property
    def mean(self):
        return self.total / max(self.seen, 1)

    def update(self, loss, images, lr):
        """One step's loss (skipped when not finite), how many images it took and its learning rate ->
        whether the loss counted."""
        self.step, self.images, finite = self.step + 1, self.images + images, math.isfinite(loss)
        self.total, self.seen, self.skipped = (self.total + loss, self.seen + 1, self.skipped) if finite else \
            (self.total, self.seen, self.skipped + 1)
        now = time.time()
        if self.step % self.print_freq == 0 or now - self.last >= 10 or self.step == self.n:
            self.last, per_step = now, (now - self.t0) / self.step
            epoch_left = per_step * (self.n - self.step)
            self.log(f"epoch {self.epoch + 1}/{self.epochs} step {self.step}/{self.n} loss {self.mean:.4f} "
                     f"lr {lr:.2e} {self.images / (now - self.t0):.1f} img/s eta epoch {hms(epoch_left)} "
                     f"run {hms(epoch_left + per_step * self.n * (self.epochs - self.epoch - 1))}")
        return finite


def hms(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def write_history(history, path):
    """Per-epoch rows (dicts with the same keys) as a CSV file."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, buf.getvalue())


def lr_lambda(schedule, total, warmup, overlap=False):
    """The learning rate's factor at each optimizer step: a linear warmup from 0 over `warmup` steps, then
    constant (none), cosine to 0 (cosine) or x0.1 at 1/2 and 3/4 of the `total` steps (step). With overlap (the
    landmark network's), the cosine spans every step and the warmup's factor multiplies its start."""
    def f(step):
        if overlap:
            return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if schedule == "step":
            return 0.1 ** sum(step >= m * total for m in (0.5, 0.75))
        return 1.0
    return f


def channels_last(device, dtype):
    """Whether the network and its inputs take the channels_last layout, cuDNN's and oneDNN's fast one for
    convolutions: always on CUDA, on the CPU with bf16 autocast (dtype None: fp32)."""
    return device.type == "cuda" or dtype is not None


# ---------------------------------------------------------------------------
# Distributed (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)


def init_distributed(device):
    """Returns (rank, world_size, device). A plain `python train.py` is rank 0 of 1."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, device
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_mean(values, device):
    """Average a list of floats over ranks (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_gather_rows(x):
    """Concatenate (N_r, D) tensors of every rank in rank order; N_r may differ by rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    pad = int(max(s.item() for s in sizes))
    padded = torch.zeros(pad, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes)])

