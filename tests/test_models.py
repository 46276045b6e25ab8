import os
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

import models
from conftest import model_args
from utils import UserError

FEATURE_DIMS = {"vgg16": 25088, "vgg16_bn": 25088, "resnet18": 512, "resnet50": 2048, "resnet101": 2048,
                "resnext50": 2048, "resnext101": 2048}


@pytest.mark.parametrize("name", list(models.BACKBONES))
def test_every_backbone_and_head(name):
    torch.manual_seed(0)
    backbone, dim = models.build_backbone(name, pretrained=False)
    assert dim == FEATURE_DIMS[name]
    # the named torchvision network, less its classifier (the count tells resnet50 from resnext50)
    with torch.device("meta"):
        ref = torchvision.models.get_model(models.BACKBONES[name])
    head = ref.classifier if name.startswith("vgg") else ref.fc
    expected = sum(p.numel() for p in ref.parameters()) - sum(p.numel() for p in head.parameters())
    assert sum(p.numel() for p in backbone.parameters()) == expected
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    heads = {  # (arch, variation, logits) -> expected output shape of model(x1, x2)
        (1, False, 2): (2, 2), (1, False, 1): (2, 1), (1, True, 2): (2, 2), (2, False, 1): (2,),
    }
    for (arch, variation, k), shape in heads.items():
        net = models.SiameseNet(backbone, dim, arch=arch, variation=variation, embed_dim=16, num_logits=k).eval()
        with torch.no_grad():
            out = net(x1, x2)
            feats = net(x1)
        assert out.shape == shape and torch.isfinite(out).all()
        expected_dim = dim if arch == 1 and not variation else 16
        assert feats.shape == (2, expected_dim) and torch.isfinite(feats).all()
        if arch == 2:
            assert (out.abs() <= 1 + 1e-5).all()  # a cosine


def test_one_backbone_call_per_pair_batch():
    backbone, dim = models.build_backbone("resnet18", pretrained=False)
    net = models.SiameseNet(backbone, dim, arch=1, num_logits=2).eval()
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x1, x2 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = net(x1, x2)
        ref = net.compare(net(x1), net(x2))
    assert calls == [6, 3, 3]
    assert torch.allclose(out, ref, atol=1e-5)


def test_vgg_trunk_is_the_convolutional_part():
    backbone, _ = models.build_backbone("vgg16", pretrained=False)
    assert not any(isinstance(m, nn.Linear) for m in backbone.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) == 13


def test_freeze_half():
    net = models.build_model(model_args(backbone="vgg16", arch=2, loss="cosine", freeze=0.5))
    convs = [m for m in net.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert (len(net.frozen), net.num_layers) == (6, 13)
    assert all(not p.requires_grad for m in convs[:6] for p in m.parameters())
    assert all(p.requires_grad for m in convs[6:] for p in m.parameters())
    assert net.neck[0].weight.requires_grad and not net.neck[1].weight.requires_grad  # BatchNorm's scale stays 1


def test_frozen_batchnorm_stays_in_eval_mode():
    net = models.build_model(model_args(backbone="resnet18", arch=2, loss="cosine", freeze=0.5))
    bns = [m for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    frozen = [m for m in bns if m in net.frozen]
    assert 0 < len(frozen) < len(bns)
    net.train()
    assert all(not m.training for m in frozen) and all(m.training for m in bns if m not in net.frozen)
    before = frozen[0].running_mean.clone()
    net(torch.randn(4, 3, 32, 32))
    assert torch.equal(frozen[0].running_mean, before)


def test_pair_score_orientation():
    assert models.pair_score(torch.tensor([0.3, -0.2])).tolist() == pytest.approx([0.3, -0.2])
    assert models.pair_score(torch.tensor([[1.5], [-1.0]])).tolist() == [1.5, -1.0]
    assert models.pair_score(torch.tensor([[0.0, 2.0], [1.0, -1.0]])).tolist() == [2.0, -2.0]


def test_pretrained_weights_load_from_torch_home(tmp_path, monkeypatch):
    """torchvision's real path: weights=DEFAULT reads $TORCH_HOME/hub/checkpoints/<file> when it is there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    torch.manual_seed(123)
    planted = torchvision.models.resnet18().state_dict()
    ckpt_dir = tmp_path / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save(planted, ckpt_dir / os.path.basename(weights.url))
    backbone, _ = models.build_backbone("resnet18", pretrained=True)
    got = backbone.state_dict()
    assert torch.equal(got["conv1.weight"], planted["conv1.weight"])
    assert torch.equal(got["layer4.1.bn2.running_var"], planted["layer4.1.bn2.running_var"])


def test_missing_weights_give_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as e:
        models.build_backbone("resnext50", pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and "--no-pretrained" in msg
    assert os.path.join(str(tmp_path), "hub", "checkpoints", "resnext50_32x4d-") in msg


def test_decision_network_starts_as_a_comparator():
    backbone, dim = models.build_backbone("resnet18", pretrained=False)
    for variation, branch in ((False, dim), (True, 16)):
        net = models.SiameseNet(backbone, dim, arch=1, variation=variation, embed_dim=16, hidden=64)
        first = net.decision[0]
        w = first.weight.detach()
        a = w[:32, :branch]
        assert a.abs().sum() > 0
        assert torch.equal(w[:32, branch:], -a) and torch.equal(w[32:, :branch], -a) and torch.equal(w[32:, branch:], a)
        assert torch.equal(first.bias.detach(), torch.zeros(64))
        # hence the first layer's output for (f, f) is zero: identical features look identical
        f = torch.randn(3, branch)
        assert torch.allclose(first(torch.cat([f, f], 1)), torch.zeros(3, 64), atol=1e-5)


@pytest.mark.parametrize("name,fraction,frozen,total", [
    ("resnet18", 0.5, 20, 40), ("resnet50", 0.5, 53, 106), ("resnext50", 0.25, 26, 106), ("vgg16", 0.5, 6, 13),
])
def test_freeze_counts(name, fraction, frozen, total):
    backbone, dim = models.build_backbone(name, pretrained=False)
    net = models.SiameseNet(backbone, dim, arch=2, embed_dim=16, freeze=fraction)
    assert (len(net.frozen), net.num_layers) == (frozen, total)
    layers = [m for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert layers[:frozen] == net.frozen  # the first ones, in forward order
    assert all(not p.requires_grad for m in layers[:frozen] for p in m.parameters())
    assert all(p.requires_grad for m in layers[frozen:] for p in m.parameters())


def test_embedding_batchnorm_scale_fixed():
    fixed = models.build_model(model_args())
    assert not fixed.neck[1].weight.requires_grad and fixed.neck[1].bias.requires_grad
    fixed.train()
    fixed(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    assert fixed.neck[1].weight.grad is None and torch.equal(fixed.neck[1].weight, torch.ones(512))


def test_dropout_acts_on_the_feature_in_training_only():
    net = models.build_model(model_args(backbone="resnet18", arch=2, loss="arcface", dropout=0.5))
    x = torch.randn(4, 3, 64, 64)
    assert isinstance(net.drop, torch.nn.Dropout) and net.drop.p == 0.5
    net.eval()
    assert torch.equal(net(x), net(x))
    plain = models.build_model(model_args(backbone="resnet18", arch=2, loss="arcface"))
    assert net.state_dict().keys() == plain.state_dict().keys()           # old checkpoints still load
    net.train()
    torch.manual_seed(0)
    a = net.neck[0](net.drop(net.backbone(x)))
    assert not torch.allclose(a, net.neck[0](net.backbone(x)))
