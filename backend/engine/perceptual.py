"""Perceptual losses between images: LPIPS (VGG or AlexNet trunk) and the Gram-matrix style loss.

SyncDiffusion's guidance differentiates one of these, and the coherence metrics (``backend/analysis/metrics.py``)
measure with them. Every loss takes two batches of RGB images in [-1, 1], shape (N, 3, H, W), and returns
one value per image pair, shape (N,), in float32, differentiable with respect to both inputs.

The trunks (torchvision's ImageNet VGG16, AlexNet, VGG19) come from ``download.pytorch.org`` at first use
and are cached in torch hub's folder. They are pickled ``.pth`` files, so they are read with
``torch.load(weights_only=True)``, which accepts tensors only and runs no code. ``backbone="random"`` builds
the trunk with random weights from a fixed seed instead (tests, and machines that cannot download):
the numbers then repeat but only mean something relative to each other; every result says which it used.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ModelNotFound
from .models import hub_offline
from ..request import SYNC_LOSSES

PERCEPTUAL_LOSSES = SYNC_LOSSES  # lpips-vgg, lpips-alex, style: the names --sync-loss accepts

# torchvision's ImageNet weights for each trunk (the URL's file name carries the hash prefix it checks).
_TRUNK_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}
_TRUNK_OF_LOSS = {"lpips-vgg": "vgg16", "lpips-alex": "alexnet", "style": "vgg19"}
# The style loss of Gatys et al. as SyncDiffusion's evaluation code measures it: Gram matrices of the
# outputs of VGG19's first five convolutions (before their ReLU), on ImageNet-normalised [0, 1] images.
_STYLE_CONV_LAYERS = 5
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """Which trunk weights a loss uses: ``pretrained`` is True for the ImageNet weights; ``note`` says why
    random weights were used when they were."""

    trunk: str
    pretrained: bool
    note: str = ""

    def describe(self) -> str:
        """One line for metadata and metric reports, e.g. ``vgg16 pretrained`` or ``vgg16 random (...)``."""
        kind = "pretrained" if self.pretrained else "random"
        return f"{self.trunk} {kind}" + (f" ({self.note})" if self.note else "")


def trunk_checkpoint_path(trunk: str) -> str:
    """Where torch hub caches the ImageNet weights of ``trunk`` (vgg16, alexnet or vgg19)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(_TRUNK_URLS[trunk]))


def _trunk_state_dict(trunk: str, backbone: str) -> tuple[dict | None, Backbone]:
    """The trunk's ImageNet state dict (or None for random weights) and a description of the choice.

    ``torch.hub.load_state_dict_from_url`` reads the cached file or downloads it (checking the hash its
    name carries), with ``weights_only=True``."""
    if backbone == "random":
        return None, Backbone(trunk, False, "asked for")
    path = trunk_checkpoint_path(trunk)
    if not os.path.exists(path) and hub_offline():
        if backbone == "pretrained":
            raise ModelNotFound(
                f"The {trunk} weights the perceptual loss needs are not in {path} and downloads are off "
                "(HF_HUB_OFFLINE); download them once online or use --sync-loss-backbone random."
            )
        return None, Backbone(trunk, False, "ImageNet weights not cached and downloads are off")
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            _TRUNK_URLS[trunk], map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as error:  # network errors come in many types; the result says what happened
        if backbone == "pretrained":
            raise ModelNotFound(f"Could not load the {trunk} weights from {_TRUNK_URLS[trunk]}: {error}.") from error
        print(f"warning: could not load {trunk} weights ({error}); using a random trunk", file=sys.stderr)
        return None, Backbone(trunk, False, "download failed")
    return state_dict, Backbone(trunk, True)


def _torchvision_trunk(trunk: str, state_dict: dict | None) -> torch.nn.Sequential:
    """torchvision's ``features`` of ``trunk``: ImageNet weights when ``state_dict`` is given, else random."""
    import torchvision

    network = getattr(torchvision.models, trunk)(weights=None)
    if state_dict is not None:
        network.load_state_dict(state_dict)
    return network.features


class PerceptualLoss(torch.nn.Module):
    """One perceptual loss (``name`` in PERCEPTUAL_LOSSES), frozen, in eval mode, float32.

    size: when given, both images are resized (bilinear, antialiased) so their shorter side is ``size`` px
    before the loss, which makes the loss cheaper (``--sync-loss-size``). scale: a constant factor on the
    result (SyncDiffusion's supplementary multiplies the style loss by 10^6 for guidance).
    """

    def __init__(self, name: str, network: torch.nn.Module, backbone: Backbone, size: int | None = None, scale: float = 1.0):
        super().__init__()
        self.name, self.network, self.backbone, self.size, self.scale = name, network, backbone, size, scale
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss per pair: images, targets (N, 3, H, W) in [-1, 1], any float dtype -> (N,) float32."""
        images, targets = images.float(), targets.float()
        if self.size is not None:
            images, targets = self._resize(images), self._resize(targets)
        if self.name == "style":
            loss = style_loss(self.network, images, targets)
        else:
            loss = self.network(images, targets).reshape(images.shape[0])
        return loss * self.scale

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        factor = self.size / min(height, width)
        if factor == 1:
            return images
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def load_perceptual_loss(
    name: str, device: torch.device | str = "cpu", backbone: str = "auto", size: int | None = None, scale: float = 1.0
) -> PerceptualLoss:
    """Build the loss ``name`` (lpips-vgg, lpips-alex or style) on ``device``.

    backbone: ``auto`` (ImageNet trunk when cached or downloadable, else random with a note), ``pretrained``
    (ImageNet or a ModelNotFound error), ``random`` (random trunk from seed 0; repeatable, the global RNG
    untouched). LPIPS's own linear layers ship inside the lpips package and are always loaded. The network
    is built once and kept for later calls (the worker runs many jobs), until the trunk file or the
    offline setting it was chosen by changes.
    """
    if name not in PERCEPTUAL_LOSSES:
        raise ValueError(f"unknown perceptual loss {name!r}")
    path = trunk_checkpoint_path(_TRUNK_OF_LOSS[name])
    network, chosen = _loss_network(name, backbone, str(torch.device(device)), path, os.path.exists(path), hub_offline())
    return PerceptualLoss(name, network, chosen, size, scale)


@functools.lru_cache(maxsize=2)
def _loss_network(name: str, backbone: str, device: str, path: str, cached: bool, offline: bool):
    """(network on ``device``, Backbone) of loss ``name``; ``path``, ``cached`` and ``offline`` only key the
    cache, so that a trunk downloaded or cached since, or a change of the offline setting, is seen."""
    trunk = _TRUNK_OF_LOSS[name]
    state_dict, chosen = _trunk_state_dict(trunk, backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random trunks (and LPIPS's unused init) repeat from run to run
        if name == "style":
            network = _style_layers(_torchvision_trunk(trunk, state_dict))
        else:
            network = _lpips(trunk, state_dict)
    return network.requires_grad_(False).eval().to(device), chosen


def _lpips(trunk: str, state_dict: dict | None) -> torch.nn.Module:
    """lpips.LPIPS with its trunk's ImageNet weights copied in from ``state_dict`` (random if None)."""
    import warnings

    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated ``pretrained`` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net={"vgg16": "vgg", "alexnet": "alex"}[trunk], pnet_rand=True, verbose=False)
    if state_dict is not None:
        features = _torchvision_trunk(trunk, state_dict)
        # lpips splits torchvision's ``features`` into slices whose children keep their index as name.
        for slice_module in model.net.children():
            for index, layer in slice_module.named_children():
                layer.load_state_dict(features[int(index)].state_dict())
    return model


def _style_layers(features: torch.nn.Sequential) -> torch.nn.Sequential:
    """The leading layers of a VGG ``features`` up to and including its fifth convolution."""
    convolutions = [index for index, layer in enumerate(features) if isinstance(layer, torch.nn.Conv2d)]
    return features[: convolutions[_STYLE_CONV_LAYERS - 1] + 1]


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix per image: features (N, C, H, W) -> (N, C, C), divided by C*H*W (as Gatys et al.'s
    PyTorch tutorial that SyncDiffusion's evaluation uses)."""
    count, channels, height, width = features.shape
    flat = features.reshape(count, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


def style_loss(features: torch.nn.Sequential, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Gatys style loss per pair: the sum over VGG19's first five convolution outputs of the mean squared
    difference of Gram matrices. features: VGG19 ``features`` cut after the fifth convolution;
    images, targets (N, 3, H, W) in [-1, 1] -> (N,)."""
    mean = images.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    both = torch.cat([images, targets])
    hidden = ((both + 1) / 2 - mean) / std
    total = images.new_zeros(images.shape[0])
    for layer in features:
        # Out-of-place ReLU: torchvision's in-place one would overwrite the convolution output we read.
        hidden = F.relu(hidden) if isinstance(layer, torch.nn.ReLU) else layer(hidden)
        if isinstance(layer, torch.nn.Conv2d):
            grams = gram_matrix(hidden)
            ours, theirs = grams[: images.shape[0]], grams[images.shape[0] :]
            total = total + ((ours - theirs) ** 2).mean(dim=(1, 2))
    return total
