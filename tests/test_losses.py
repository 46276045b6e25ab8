import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import losses


def test_bce_on_known_values():
    logits = torch.tensor([[0.0], [2.0]])
    same = torch.tensor([1, 0])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert losses.BCEPairLoss()(logits, same).item() == pytest.approx(expected, rel=1e-6)


def test_ce_on_known_values():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    same = torch.tensor([0, 1])
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert losses.CEPairLoss()(logits, same).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_loss_known_values_and_matches_torch():
    cos = torch.tensor([0.9, 0.9, 0.2, 0.7])
    same = torch.tensor([1, 0, 0, 0])
    # same: 1 - 0.9; diff: max(0, cos - 0.5)
    assert losses.CosinePairLoss()(cos, same).item() == pytest.approx((0.1 + 0.4 + 0 + 0.2) / 4, rel=1e-6)
    torch.manual_seed(0)
    e1, e2 = torch.randn(16, 8), torch.randn(16, 8)
    same = torch.randint(0, 2, (16,))
    cos = nn.functional.cosine_similarity(e1, e2)
    ref = nn.CosineEmbeddingLoss(margin=0.5)(e1, e2, 2 * same - 1)
    assert losses.CosinePairLoss(0.5)(cos, same).item() == pytest.approx(ref.item(), rel=1e-5)


def margin_head(cls, thetas, **kw):
    """A head with centres e_0.. and embeddings at the given angles from centre 0 (in its plane with e_1)."""
    head = cls(num_classes=3, embed_dim=3, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    t = torch.tensor(thetas, dtype=torch.float64).float()
    emb = torch.stack([torch.cos(t), torch.sin(t), torch.zeros_like(t)], 1)
    return head, emb


def test_arcface_logits_by_hand():
    s, m = 64.0, 0.5
    thetas = [0.3, 1.2, math.pi - 0.2]  # the last: theta + m > pi
    head, emb = margin_head(losses.ArcFace, thetas, scale=s, margin=m)
    logits = head.logits(emb, torch.zeros(3, dtype=torch.long))
    expected_target = [math.cos(0.3 + m), math.cos(1.2 + m), math.cos(math.pi - 0.2) - math.sin(m) * m]
    assert logits[:, 0].tolist() == pytest.approx([s * v for v in expected_target], abs=1e-3)
    # non-target classes are plain s * cos
    assert logits[:, 1].tolist() == pytest.approx([s * math.sin(t) for t in thetas], abs=1e-3)
    assert logits[:, 2].tolist() == pytest.approx([0, 0, 0], abs=1e-4)
    # the margin makes the target logit smaller than without it, for every angle
    assert (logits[:, 0] < s * torch.cos(torch.tensor(thetas))).all()


def test_cosface_logits_by_hand():
    s, m = 30.0, 0.35
    head, emb = margin_head(losses.CosFace, [0.3, 2.0], scale=s, margin=m)
    logits = head.logits(emb, torch.tensor([0, 1]))
    assert logits[0, 0].item() == pytest.approx(s * (math.cos(0.3) - m), abs=1e-3)
    assert logits[0, 1].item() == pytest.approx(s * math.sin(0.3), abs=1e-3)
    assert logits[1, 1].item() == pytest.approx(s * (math.sin(2.0) - m), abs=1e-3)
    assert logits[1, 0].item() == pytest.approx(s * math.cos(2.0), abs=1e-3)


@pytest.mark.parametrize("cls", [losses.ArcFace, losses.CosFace])
def test_margin_gradient_finite_at_cos_plus_minus_one(cls):
    head, emb = margin_head(cls, [0.0, math.pi])  # cos(theta) = +1 and -1 exactly
    emb.requires_grad_(True)
    loss = head(emb, torch.zeros(2, dtype=torch.long))
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_margin_defaults():
    assert (losses.ArcFace(4, 8).scale, losses.ArcFace(4, 8).margin) == (32.0, 0.3)
    assert (losses.CosFace(4, 8).scale, losses.CosFace(4, 8).margin) == (32.0, 0.35)
    head = losses.build_loss("arcface", 4, 8, margin=0.2, scale=16)
    assert (head.scale, head.margin) == (16, 0.2) and head.weight.shape == (4, 8)
    assert losses.build_loss("cosface", 4, 8, margin=0.1).scale == 32.0
    assert losses.build_loss("cosine", margin=0.25).margin == 0.25 and losses.build_loss("cosine").margin == 0.5
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        losses.build_loss("triplet")


@pytest.mark.parametrize("cls", [losses.ArcFace, losses.CosFace])
def test_margin_logits_are_float32_under_bf16_autocast(cls):
    torch.manual_seed(0)
    head = cls(num_classes=300, embed_dim=512, scale=64.0)
    emb, labels = torch.randn(32, 512), torch.randint(0, 300, (32,))
    ref = head.logits(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head.logits(emb.bfloat16(), labels)
        loss = head(emb.bfloat16(), labels)
    assert got.dtype == torch.float32 and loss.dtype == torch.float32
    # the embedding itself arrives in bf16 (the network's output): compare with that input in float32
    ref = head.logits(emb.bfloat16().float(), labels)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def test_class_centres_are_the_training_identities(toy):
    cfp = data.load_cfp(toy)
    roles = data.split_folds("seed")
    train_set = data.ImageSet(cfp.images_of(roles["train"]), cfp.identity)
    head = losses.build_loss("arcface", train_set.num_classes, 16)
    train_ids = set(cfp.identities_of(roles["train"]))
    assert head.weight.shape == (len(train_ids), 16) == (12, 16)
    assert set(train_set.identities) == train_ids
    held_out = set(cfp.identities_of(roles["val"])) | set(cfp.identities_of(roles["test"]))
    assert not set(train_set.identities) & held_out
    assert len(train_set) == 12 * 14  # every image of every training identity
    labels = train_set.labels.numpy()
    assert (train_set.identities[labels] == cfp.identity[train_set.indices.numpy()]).all()
    assert np.array_equal(np.unique(labels), np.arange(12))
