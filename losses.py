"""Training objectives.

Each loss says which samples it trains on (`sampling`): "pairs" (a, b, same) for the
Siamese losses, "images" (x, identity) for the margin-softmax losses.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BCEPairLoss(nn.Module):
    """Architecture 1, one logit: binary cross-entropy on the logit (never on a sigmoid)."""
    sampling, margin_range = "pairs", None  # margin_range: what --margin may be (None: the loss has none)

    def forward(self, logits, same):  # (B, 1), (B,)
        return F.binary_cross_entropy_with_logits(logits[:, 0], same.float())


class CEPairLoss(nn.Module):
    """Architecture 1, two logits (different, same): cross-entropy."""
    sampling, margin_range = "pairs", None

    def forward(self, logits, same):  # (B, 2), (B,)
        return F.cross_entropy(logits, same)


class CosinePairLoss(nn.Module):
    """Architecture 2: nn.CosineEmbeddingLoss, written on the cosine similarity itself.

        loss = 1 - cos            for same pairs
               max(0, cos - m)    for different pairs
    """
    sampling, margin_range = "pairs", (-1.0, 1.0)

    def __init__(self, margin=0.5):
        super().__init__()
        self.margin = margin

    def forward(self, cos, same):  # (B,), (B,)
        return torch.where(same == 1, 1 - cos, (cos - self.margin).clamp(min=0)).mean()


class MarginSoftmax(nn.Module):
    """Normalised softmax over the training identities with a margin on the target class.

    cos_ij = <x_i / |x_i|, w_j / |w_j|>, W: (C, D) one centre per training identity.
    logits = s * cos, with the target entry replaced by s * psi(cos_iy); then cross-entropy.
    The centres are only for training: verification compares embeddings by cosine.
    """
    sampling, margin_range = "images", (0.0, 1.0)

    def __init__(self, num_classes, embed_dim, scale, margin):
        super().__init__()
        self.scale, self.margin = scale, margin
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, std=0.01)

    def target_logit(self, cos):
        raise NotImplementedError

    def logits(self, emb, labels):
        # float32 even under autocast: in bf16, s * cos at s = 64 is off by up to ~0.2
        with torch.autocast(emb.device.type, enabled=False):
            cos = F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))  # (N, C)
            target = cos.gather(1, labels[:, None])                                                   # (N, 1)
            cos = cos.scatter(1, labels[:, None], self.target_logit(target))                          # (N, C)
            return self.scale * cos

    def forward(self, emb, labels):  # (N, D), (N,)
        return F.cross_entropy(self.logits(emb, labels), labels)


class ArcFace(MarginSoftmax):
    """Additive angular margin (Deng et al., ArcFace, CVPR 2019): psi = cos(theta + m).

    The paper's s = 64, m = 0.5 are for 10^4-10^5 identities; for CFP's few hundred, s = 32, m = 0.3
    trains from random init without the embedding collapsing (see the README's study).

    cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m). Past theta > pi - m, cos(theta + m)
    would rise again with theta; there psi = cos(theta) - m sin(m) keeps it decreasing
    (insightface's threshold), which keeps training stable from random init.
    sin(theta) = sqrt(1 - cos^2) is clamped away from 0 so the gradient stays finite at cos = +-1.
    """

    def __init__(self, num_classes, embed_dim, scale=32.0, margin=0.3):
        super().__init__(num_classes, embed_dim, scale, margin)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)

    def target_logit(self, cos):
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-6))
        phi = cos * self.cos_m - sin * self.sin_m  # cos(theta + m)
        return torch.where(cos > self.threshold, phi, cos - self.sin_m * self.margin)


class CosFace(MarginSoftmax):
    """Additive cosine margin (Wang et al., CosFace, CVPR 2018): psi = cos(theta) - m (paper: s = 64)."""

    def __init__(self, num_classes, embed_dim, scale=32.0, margin=0.35):
        super().__init__(num_classes, embed_dim, scale, margin)

    def target_logit(self, cos):
        return cos - self.margin


LOSSES = {"bce": BCEPairLoss, "ce": CEPairLoss, "cosine": CosinePairLoss, "arcface": ArcFace, "cosface": CosFace}
ARCH_LOSSES = {1: ("ce", "bce"), 2: ("cosine", "arcface", "cosface")}  # first = default


def build_loss(name, num_classes=None, embed_dim=None, margin=None, scale=None):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}")
    cls = LOSSES[name]
    kwargs = {k: v for k, v in (("margin", margin), ("scale", scale)) if v is not None}
    if cls.sampling == "images":
        return cls(num_classes, embed_dim, **kwargs)
    if name == "cosine":
        return cls(**{k: v for k, v in kwargs.items() if k == "margin"})
    return cls()


class Objective(nn.Module):
    """Model and loss as one module, so DistributedDataParallel also syncs the loss's class centres."""

    def __init__(self, model, criterion):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, inputs, target):
        return self.criterion(self.model(*inputs), target)
