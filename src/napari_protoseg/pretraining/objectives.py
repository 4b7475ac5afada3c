"""Self-supervised objectives: what a network learns from unlabelled EM.

Both read a batch of normalised single-section crops ``(B, 1, H, W)`` (``H, W`` multiples of the
network's :attr:`~napari_protoseg.model.network.ProtoSegNet.multiple`) and return a scalar loss.

* :func:`masked_reconstruction_loss`: square patches of the input are hidden (replaced by the
  crop's mean and noise) and a 1x1 convolution on the backbone's features must restore their
  pixels, at the network's resolution: masked-image modelling, the convolutional form of MAE
  (SparK, FCMAE) and a patch-wise relative of Noise2Void's blind spot.
* :func:`dense_contrastive_loss`: two views of one crop, shifted against each other, each rotated,
  mirrored and with its own contrast, noise and blur; the DSP head's unit vectors of the same
  image point in both views must be nearer to each other than to every other sampled point of the
  batch (pixel-level InfoNCE, as PixContrast / DenseCL with known correspondences). It trains the
  embedding the DSP prototypes later read, in the same cosine geometry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_protoseg.model.network import ProtoSegNet

__all__ = ["OBJECTIVES", "dense_contrastive_loss", "masked_reconstruction_loss", "reconstruction_head",
           "two_views"]

OBJECTIVES = ("contrastive", "masked")


def reconstruction_head(net: ProtoSegNet) -> torch.nn.Conv2d:
    """The 1x1 convolution that restores pixels from the backbone's features (discarded afterwards)."""
    return torch.nn.Conv2d(net.config.embed_dim, 1, 1)


def masked_reconstruction_loss(net: ProtoSegNet, head: torch.nn.Module, x: torch.Tensor, generator: torch.Generator,
                               patch: int = 16, ratio: float = 0.5) -> torch.Tensor:
    """Mean squared error of the restored pixels of hidden ``patch`` x ``patch`` patches (a share
    ``ratio`` of them), with each crop standardised so that the loss is about 1 for a guess of its mean."""
    b, _, h, w = x.shape
    device = x.device
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
    grid = torch.rand(b, 1, -(-h // patch), -(-w // patch), generator=generator, device=device) < ratio
    hidden = F.interpolate(grid.float(), scale_factor=patch, mode="nearest")[..., :h, :w]
    noise = torch.randn(x.shape, generator=generator, device=device) * std * 0.5
    masked = torch.where(hidden > 0, mean + noise, x)
    restored = head(net.backbone_features(masked))
    scale = net.config.input_scale
    target = F.avg_pool2d((x - mean) / std, scale) if scale > 1 else (x - mean) / std
    weight = F.avg_pool2d(hidden, scale) if scale > 1 else hidden
    restored = restored[..., : target.shape[-2], : target.shape[-1]]
    error = (restored - target) ** 2 * weight
    return error.sum() / weight.sum().clamp_min(1.0)


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -k, dims=(-2, -1))


def _photometric(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Contrast, brightness, gamma, blur and noise of one view (per crop)."""
    b = x.shape[0]
    device = x.device

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, 1, 1, 1, generator=generator, device=device)

    x = x.clamp(0, 1) ** uniform(0.7, 1.4)
    x = (x - 0.5) * uniform(0.6, 1.4) + 0.5 + uniform(-0.15, 0.15)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(torch.rand(b, 1, 1, 1, generator=generator, device=device) < 0.3, blurred, x)
    return x + torch.randn(x.shape, generator=generator, device=device) * uniform(0.0, 0.08)


def two_views(crops: torch.Tensor, size: int, shift: int, step: int, generator: torch.Generator):
    """Two ``size`` x ``size`` views of each crop of side ``size + shift``: view A at the top left,
    view B moved by a random offset (dy, dx) in [0, shift], a multiple of ``step``; each with its own
    photometric changes and dihedral transform (the same for the whole batch).
    Returns ``(a, b, (dy, dx), (ka, fa), (kb, fb))``: ``k`` quarter turns, ``f`` mirrored."""
    device = crops.device
    dy, dx = (int(v) * step for v in torch.randint(0, shift // step + 1, (2,), generator=generator, device=device))
    a = crops[..., :size, :size]
    b = crops[..., dy:dy + size, dx:dx + size]
    ka, kb = (int(v) for v in torch.randint(0, 4, (2,), generator=generator, device=device))
    fa, fb = (bool(v) for v in torch.randint(0, 2, (2,), generator=generator, device=device))
    a = _dihedral(_photometric(a, generator), ka, fa)
    b = _dihedral(_photometric(b, generator), kb, fb)
    return a, b, (dy, dx), (ka, fa), (kb, fb)


def dense_contrastive_loss(net: ProtoSegNet, crops: torch.Tensor, generator: torch.Generator, size: int,
                           shift: int, pixels: int = 256, temperature: float = 0.2) -> torch.Tensor:
    """Pixel-level InfoNCE between two shifted, transformed views of each crop (side ``size +
    shift``; ``shift`` a multiple of the network's input scale). ``pixels`` image points per crop
    are sampled in the views' overlap; each is the positive of its twin and a negative of all other
    points of the batch, in both directions."""
    scale = net.config.input_scale
    a, b, (dy, dx), (ka, fa), (kb, fb) = two_views(crops, size, shift, scale, generator)
    ea = _undo_dihedral(net.head(net.backbone_features(a)), ka, fa)
    eb = _undo_dihedral(net.head(net.backbone_features(b)), kb, fb)
    n = size // scale
    oy, ox = dy // scale, dx // scale  # point (y, x) of B is point (y + oy, x + ox) of A
    overlap_h, overlap_w = n - oy, n - ox
    batch = crops.shape[0]
    ys = torch.randint(0, overlap_h, (batch, pixels), generator=generator, device=crops.device)
    xs = torch.randint(0, overlap_w, (batch, pixels), generator=generator, device=crops.device)
    index = torch.arange(batch, device=crops.device)[:, None]
    va = ea.permute(0, 2, 3, 1)[index, ys + oy, xs + ox].reshape(batch * pixels, -1)
    vb = eb.permute(0, 2, 3, 1)[index, ys, xs].reshape(batch * pixels, -1)
    logits = va @ vb.T / temperature
    labels = torch.arange(len(va), device=crops.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
