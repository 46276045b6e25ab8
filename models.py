"""Siamese networks on torchvision backbones.

Architecture 1: shared backbone -> [f1, f2] concatenated -> decision network -> logits.
  variation: a fully connected layer moves into the branches (compact per-image feature).
Architecture 2: shared backbone + fully connected layer -> embedding; pairs compared by cosine.
"""
import os
import urllib.error

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from utils import UserError

# our name -> torchvision name
BACKBONES = {
    "vgg16": "vgg16",
    "vgg16_bn": "vgg16_bn",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnext50": "resnext50_32x4d",
    "resnext101": "resnext101_32x8d",
}


EMBED_DIM = 512  # arch 2's embedding, arch 1 variation's compact feature


def build_backbone(name, pretrained=True, maxpool=True):
    """A torchvision network without its ImageNet classifier -> (module, feature dim). maxpool=False (ResNets)
    drops the stem's max-pool: small faces keep twice the resolution through every stage."""
    tv_name = BACKBONES[name]
    weights = torchvision.models.get_model_weights(tv_name).DEFAULT if pretrained else None
    try:
        net = torchvision.models.get_model(tv_name, weights=weights)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot download the ImageNet weights of {name} ({reason}): save {weights.url} "
                        f"as {target} (or set $TORCH_HOME), or train from scratch with --no-pretrained") from None
    if name.startswith("vgg"):
        # "VGG16's convolutionals": conv trunk + its adaptive pool to 7x7, flattened
        return nn.Sequential(net.features, net.avgpool, nn.Flatten()), 512 * 7 * 7
    dim = net.fc.in_features
    net.fc = nn.Identity()
    if not maxpool:
        net.maxpool = nn.Identity()
    return net, dim


def freeze_layers(backbone, fraction):
    """Freeze the first `fraction` of the backbone's parameterised layers, in forward order.

    Returns the frozen modules and the total count (VGG16: 13 convs; ResNet50: 53 conv + 53 BN)."""
    layers = [m for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    frozen = layers[:int(fraction * len(layers))]
    for m in frozen:
        m.requires_grad_(False)
    return frozen, len(layers)


class SiameseNet(nn.Module):
    """Two weight-sharing branches and a comparison.

    forward(x)      -> per-image features (N, D)
    forward(x1, x2) -> arch 1: logits (B, K); arch 2: cosine similarity (B,)
    """

    def __init__(self, backbone, feat_dim, arch=2, variation=False, embed_dim=EMBED_DIM, num_logits=2,
                 hidden=512, dropout=0.5, freeze=0.0, embed_dropout=0.0):
        super().__init__()
        self.arch, self.embed_dim = arch, embed_dim
        self.backbone = backbone
        self.frozen, self.num_layers = freeze_layers(backbone, freeze)
        self.drop = nn.Dropout(embed_dropout)  # on the backbone's feature, before the neck (arcface_torch's `dropout`)
        if arch == 2:
            self.neck = nn.Sequential(nn.Linear(feat_dim, embed_dim), nn.BatchNorm1d(embed_dim))
            self.neck[1].weight.requires_grad_(False)  # arcface_torch's `features` BatchNorm: only the shift learns
        elif variation:
            self.neck = nn.Sequential(nn.Linear(feat_dim, embed_dim), nn.ReLU(inplace=True))
        else:
            self.neck = nn.Identity()
        if arch == 1:
            branch_dim = embed_dim if variation else feat_dim
            self.decision = nn.Sequential(
                nn.Linear(2 * branch_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(hidden, num_logits),
            )
            # Start the first layer as a comparator: hidden units in pairs relu(+-A (f1 - f2)), i.e. weights
            # [A, -A] and [-A, A]. It is only an initialisation, free to move; from random init it is what
            # lets the decision network learn to compare before it memorises identities.
            first = self.decision[0]
            with torch.no_grad():
                a = first.weight[:hidden // 2, :branch_dim].clone()
                first.weight.copy_(torch.cat([torch.cat([a, -a], 1), torch.cat([-a, a], 1)]))
                first.bias.zero_()

    def train(self, mode=True):
        super().train(mode)
        for m in self.frozen:  # frozen BatchNorm keeps its (ImageNet) running statistics
            m.eval()
        return self

    def embed(self, x):
        return self.neck(self.drop(self.backbone(x)))  # (N, D)

    def compare(self, f1, f2):
        if self.arch == 1:
            return self.decision(torch.cat([f1, f2], dim=1))  # (B, 2D) -> (B, K)
        return (F.normalize(f1, dim=1) * F.normalize(f2, dim=1)).sum(dim=1)  # (B,) cosine

    def forward(self, x1, x2=None):
        if x2 is None:
            return self.embed(x1)
        # One backbone call for both images of every pair (faster than two calls).
        f1, f2 = self.embed(torch.cat([x1, x2])).chunk(2)  # (B, D) each
        return self.compare(f1, f2)


def pair_score(out):
    """Model output -> one score per pair, higher = more likely the same person."""
    if out.ndim == 1:
        return out                        # cosine similarity
    if out.shape[1] == 1:
        return out[:, 0]                  # one logit (BCE)
    return out[:, 1] - out[:, 0]          # two logits (CE): log-odds of "same"


def build_model(args):
    """The network a run's arguments ask for (a dict or an argparse namespace)."""
    a = args if isinstance(args, dict) else vars(args)
    backbone, dim = build_backbone(a["backbone"], a["pretrained"], a["maxpool"])
    return SiameseNet(backbone, dim, arch=a["arch"], variation=a["variation"], num_logits=2 if a["loss"] == "ce" else 1,
                      freeze=a["freeze"], embed_dropout=a["dropout"])


POSES = ("none", "frontal", "left", "right")  # the landmark network's classes: no face, or the face's pose


class LandmarkNet(nn.Module):
    """Where a face is and how it is turned, from one square view of a photo.

    forward(x) -> (logits (N, 4) over POSES, points (N, 30, 2)): CFP's 30 landmarks in units of the view's
    side, (0, 0) its top left corner. A ResNet18 from random init. The pose comes from its last feature map
    flattened, not averaged, so that it knows where on the view each feature lies. Each landmark comes from a
    heatmap at a quarter of the view's resolution, made from the last map brought back up through the stages
    before it (a feature pyramid), as the expected position under the heatmap's softmax (integral regression,
    Sun et al. 2018), which keeps every layer's translation equivariance. maxpool=False drops the stem's
    max-pool, for maps of twice the resolution at about twice the cost."""

    def __init__(self, img_size=64, num_points=30, maxpool=True, width=64):
        super().__init__()
        self.img_size, self.num_points = img_size, num_points
        self.backbone, _ = build_backbone("resnet18", pretrained=False, maxpool=maxpool)
        self.backbone.eval()  # a trial forward for the map's size that leaves BatchNorm's statistics alone
        with torch.no_grad():
            dim = self.stages(torch.zeros(1, 3, img_size, img_size))[3].numel()
        self.backbone.train()
        self.head = nn.Linear(dim, len(POSES))
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (64, 128, 256, 512))  # layer1..layer4
        self.heat = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, num_points, 1))

    def stages(self, x):
        """The ResNet's four stages' maps (strides 4, 8, 16, 32 with the max-pool)."""
        b = self.backbone
        x = b.relu(b.bn1(b.conv1(x)))
        if torch.is_grad_enabled():
            x = b.maxpool(x)
        else:  # a finder's look: PyTorch's CPU max-pool is ~4x faster on channels_last maps, and a maximum is the
            # same number in either layout (with gradients, a tie might route to another input)
            nchw = not x.is_contiguous(memory_format=torch.channels_last)
            x = b.maxpool(x.contiguous(memory_format=torch.channels_last))
            x = x.contiguous() if nchw else x
        maps = []
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = layer(x)
            maps.append(x)
        return maps

    def heatmap_points(self, maps):
        """Top-down pyramid to the first stage's resolution -> expected (x, y) of each landmark's softmax."""
        top = self.lateral[3](maps[3])
        for lateral, m in zip(self.lateral[2::-1], maps[2::-1]):
            top = lateral(m) + F.interpolate(top, size=m.shape[-2:], mode="nearest")
        heat = self.heat(top).float()                                            # (N, P, h, w)
        n, p, h, w = heat.shape
        prob = heat.flatten(2).softmax(-1).view(n, p, h, w)
        xs = (torch.arange(w, device=heat.device, dtype=heat.dtype) + 0.5) / w   # cell centres, units of the side
        ys = (torch.arange(h, device=heat.device, dtype=heat.dtype) + 0.5) / h
        return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], -1)  # (N, P, 2)

    def forward(self, x):
        maps = self.stages(x)
        return self.head(torch.flatten(maps[3], 1)), self.heatmap_points(maps)
