"""The figures a run folder holds (matplotlib, Agg backend, written atomically).

    curves.png   per-step training loss (raw and smoothed), learning rate, per-epoch validation loss and
                 accuracy (all pairs, FF, FP), the best epoch marked
    roc.png      test ROC of FF and FP, FAR on a log axis
    errors.png   the test pairs the model got most confidently wrong, FF and FP: false accepts and rejects
    inputs.png   what the network sees: a training batch after augmentation, validation frontal and profile faces
    landmarks.png, curves.png of a landmark network (landmarks.py): given and predicted landmarks on test faces
"""
import io
import math

import numpy as np
import torch

from data import KINDS
from images import augment, clutter
from metrics import auc, roc
from utils import atomic_write


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def import_pyplot():
    """Import matplotlib ahead of the first figure (train.py does, before a run is interruptible)."""
    _pyplot()


def _save(fig, path, dpi=80):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def smooth(values, window):
    """Exponential moving average with a bias correction (TensorBoard's smoothing), window ~ 1 / (1 - beta)."""
    beta, avg, out = 1 - 1 / max(window, 1), 0.0, []
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def plot_curves(history, steps, steps_per_epoch, best_epoch, path):
    """history: per-epoch dicts (train.py's history.csv rows); steps: [step, loss, lr] per optimizer step."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in history]
    if steps:
        x = np.array([s[0] for s in steps]) / steps_per_epoch  # in epochs: step k ends at k / steps_per_epoch
        loss = [s[1] for s in steps]
        ax1.plot(x, loss, color="C0", alpha=0.25, lw=0.8)
        ax1.plot(x, smooth(loss, max(5, len(loss) // 50)), color="C0", label="training loss (per step, smoothed)")
        lr_ax = ax1.twinx()
        lr_ax.plot(x, [s[2] for s in steps], color="0.5", ls=":", lw=1)
        lr_ax.set_ylabel("learning rate (dotted)", color="0.4")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    val_loss = [h["val_loss"] for h in history]
    if np.isfinite(val_loss).any():
        ax1.plot(epochs, val_loss, "o-", color="C1", label="validation loss")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend(loc="upper right", fontsize=8)
    for key, label, style in (("val_acc", "all pairs", "o-"), ("val_acc_FF", "FF", "s--"),
                              ("val_acc_FP", "FP", "^--")):
        if key in history[0]:
            ax2.plot(epochs, [h[key] for h in history], style, label=label, ms=4)
    if best_epoch:
        best = history[best_epoch - 1]["val_acc"]
        ax2.axvline(best_epoch, color="0.6", lw=1)
        ax2.plot([best_epoch], [best], "*", color="C3", ms=14, label=f"best: epoch {best_epoch}, {best:.3f}")
    ax2.set(xlabel="epoch", ylabel="accuracy at the validation threshold", title="validation accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right", fontsize=8)
    last = max(epochs[-1], 1)
    ticks = np.arange(0, last + 1, max(1, round(last / 10)))  # integer epochs, for 1 epoch and for 40
    ax1.set_xlim(0, last * 1.03)
    ax1.set_xticks(ticks)
    ax2.set_xlim(0.5, last + 0.5)
    ax2.set_xticks(ticks[ticks >= 1] if last > 1 else [1])
    fig.tight_layout()
    _save(fig, path)


def kinds_of(kinds):
    """The pair kinds present, CFP's FF and FP first (identity-folder pairs have the one kind 'pairs')."""
    present = list(dict.fromkeys(np.asarray(kinds).tolist()))
    return [k for k in KINDS if k in present] + [k for k in present if k not in KINDS]


def plot_roc(scores, labels, kinds, path, title=""):
    """ROC curves for FF and FP (or whatever kinds the pairs have), FAR on a log axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for kind in kinds_of(kinds):
        sel = kinds == kind
        if sel.any() and 0 < labels[sel].sum() < sel.sum():
            fpr, tpr, _ = roc(scores[sel], labels[sel])
            ax.step(np.maximum(fpr, 1e-4), tpr, where="post", label=f"{kind} (AUC {auc(fpr, tpr):.3f})")
    ax.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1.01), xlabel="false accept rate",
           ylabel="true accept rate", title=title or "ROC")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _pair_image(a, b):
    """Two uint8 (3, H, W) tensors side by side, as an (H, 2W + gap, 3) array."""
    a, b = (x.permute(1, 2, 0).cpu().numpy() for x in (a, b))
    gap = np.full((a.shape[0], max(2, a.shape[1] // 16), 3), 255, np.uint8)
    return np.concatenate([a, gap, b], 1)


def worst_errors(scores, labels, kinds, thresholds, per_group=8):
    """{(kind, "false accepts" | "false rejects"): (pair rows, most confidently wrong first; how many in all)}."""
    out = {}
    for kind in kinds_of(kinds):
        t = thresholds.get(kind, thresholds["all"])
        fa = np.flatnonzero((kinds == kind) & (labels == 0) & (scores >= t))
        fr = np.flatnonzero((kinds == kind) & (labels == 1) & (scores < t))
        out[kind, "false accepts"] = fa[np.argsort(-scores[fa], kind="stable")][:per_group], len(fa)
        out[kind, "false rejects"] = fr[np.argsort(scores[fr], kind="stable")][:per_group], len(fr)
    return out


def plot_errors(bank, pairs, kinds, scores, thresholds, path, per_group=8, title=""):
    """The test pairs the model got most confidently wrong, as the network saw them (after resizing): one strip
    of pairs per kind of error, each pair's score above it."""
    plt = _pyplot()
    groups = worst_errors(scores, pairs[:, 2], kinds, thresholds, per_group)
    fig, axes = plt.subplots(len(groups), 1, figsize=(1.9 * per_group, 1.45 * len(groups)), squeeze=False)
    h, w, _ = _pair_image(bank[0], bank[0]).shape
    slot = w + w // 8  # each pair's place in a strip, with a gap
    for ax, ((kind, what), (rows, total)) in zip(axes[:, 0], groups.items()):
        strip = np.full((h, slot * per_group, 3), 255, np.uint8)
        for col, i in enumerate(rows):
            strip[:, col * slot:col * slot + w] = _pair_image(*bank[[pairs[i, 0], pairs[i, 1]]])
            ax.text((col * slot + w / 2) / strip.shape[1], 1.02, f"{scores[i]:.3f}", transform=ax.transAxes,
                    ha="center", va="bottom", fontsize=8, color="C3")
        ax.imshow(strip)
        ax.axis("off")
        threshold = thresholds.get(kind, thresholds["all"])
        ax.text(-0.01, 0.5, f"{kind} {what}\n{total} in all\nthreshold {threshold:.3f}", transform=ax.transAxes,
                ha="right", va="center", fontsize=8)
    fig.suptitle(title or "most confident test errors (score above each pair)", fontsize=9)
    fig.subplots_adjust(left=0.1, right=0.99, top=0.9, bottom=0.01, hspace=0.35)
    _save(fig, path)


def plot_pair(a, b, score, threshold, verdict, path):
    """One verified pair: both images as the network saw them, the score and the verdict."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 2.4))
    ax.imshow(_pair_image(a, b))
    ax.axis("off")
    ax.set_title(f"{verdict}: score {score:.4f} {'>=' if score >= threshold else '<'} threshold {threshold:.4f}",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def input_rows(train_set, bank, val_pairs, cfp, args, n=16):
    """A training batch after augmentation and validation faces of each pose, as uint8 images."""
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))[:n]
    inputs, _ = train_set.batch(bank, idx)
    x = inputs[0].float() / 255
    if args.augment:
        x = augment(clutter(x, args.clutter) if args.clutter else x)
    val = np.unique(val_pairs[:, :2])
    rows = {f"training batch, {'augmented' if args.augment else 'not augmented'}": (x * 255).round().byte()}
    for name, sel in (("validation frontal", ~cfp.profile[val]), ("validation profile", cfp.profile[val])):
        if sel.any():
            rows[name] = bank[val[sel][:: max(1, sel.sum() // n)][:n]]
    return rows


def plot_inputs(train_set, bank, val_pairs, cfp, args, path, per_row=16, title=""):
    """What the network sees: a training batch after augmentation, validation frontal and profile faces, each
    drawn as one strip of up to per_row faces."""
    plt = _pyplot()
    rows = input_rows(train_set, bank, val_pairs, cfp, args, per_row)
    fig, axes = plt.subplots(len(rows), 1, figsize=(per_row * 0.8, 1.0 * len(rows) + 0.4), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows.items()):
        images = images[:per_row].cpu()
        gap = np.full((images.shape[2], 2, 3), 255, np.uint8)
        strip = [piece for x in images for piece in (x.permute(1, 2, 0).numpy(), gap)]
        ax.imshow(np.concatenate(strip, 1) if strip else np.zeros((1, 1, 3), np.uint8))
        ax.set_title(label, fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.02, hspace=0.3)
    _save(fig, path)


def plot_landmark_curves(history, path):
    """The landmark network's training loss and validation NME / pose accuracy per epoch."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-")
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss (pose CE + 10 x landmark L1)")
    ax2.plot(epochs, [h["val_nme"] for h in history], "o-", label="validation NME")
    ax2.set(xlabel="epoch", ylabel="NME (face box)")
    twin = ax2.twinx()
    twin.plot(epochs, [h["val_pose_acc"] for h in history], "s:", color="C1", label="pose accuracy")
    twin.set_ylabel("pose accuracy")
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_landmarks(pictures, given, predicted, titles, path, per_row=8):
    """Test faces with their given landmarks (green) and the network's (red)."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(pictures) / per_row))
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im, g, p, t in zip(axes.ravel(), pictures, given, predicted, titles):
        ax.imshow(im)
        ax.scatter(g[:, 0], g[:, 1], s=3, c="lime")
        if p is not None:
            ax.scatter(p[:, 0], p[:, 1], s=3, c="red")
        ax.set_title(t, fontsize=7)
    fig.suptitle("test faces: given landmarks green, predicted red", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_precision_recall(curve, chosen, path):
    """The found threshold's precision/recall curve on validation pictures (rows: threshold, precision,
    recall, false-face rate) and the chosen point."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(curve[:, 2], curve[:, 1])
    ax1.plot(curve[chosen, 2], curve[chosen, 1], "o", label=f"P(no face) < {curve[chosen, 0]:.3f}")
    ax1.set(xlabel="recall (faces found at their place)", ylabel="precision", title="validation pictures")
    ax1.legend(fontsize=8)
    ax2.plot(curve[:, 0], curve[:, 2], label="recall")
    ax2.plot(curve[:, 0], curve[:, 3], label="false faces (pictures without one)")
    ax2.axvline(curve[chosen, 0], color="gray", ls=":")
    ax2.set(xlabel="threshold on P(no face)", xscale="log", title="by threshold")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
