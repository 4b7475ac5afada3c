"""The segmentation network of Decoupled Semantic Prototypes (DSP, Reiss et al., CVPR 2023).

Pure PyTorch, no Qt. A 2D U-Net produces a ``D``-dimensional feature per pixel; the DSP head
(BatchNorm -> 1x1 conv -> LeakyReLU(0.1) -> 1x1 conv -> L2 normalisation) maps it onto the unit
sphere, and every class owns ``K`` prototypes on that sphere. The logit of class ``c`` at a pixel
with embedding ``e`` is the mean cosine similarity to the class's prototypes over a temperature::

    s_c = (1/K) * sum_j cos(e, p_c^j) / tau

Because ``e`` has unit length this equals ``e . mean_j(p_c^j / |p_c^j|) / tau``, which is how it is
computed (one einsum over a (C, D) matrix, exactly the same value, ``K`` times less memory). The
logits are therefore bounded by ``1 / tau`` in absolute value.

Optional WISE-Net instance heads (Laradji et al., 2019) share the U-Net's output features: a
localization head with one map per instance class (trained with the LCFCN loss to put one blob on
every object) and an embedding head with a free (not normalised) vector per pixel whose distances
say which pixels belong to the same object. They exist when ``ModelConfig.n_instance_classes > 0``.

Input sizes: any ``H, W``. The U-Net pads its input internally (reflection padding, replication for
inputs too small to reflect) up to a multiple of ``2 ** depth`` and crops the output back, so every
output has exactly the spatial size of its input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_protoseg.model.migration import CONFIG_VERSION, upgrade_model_config

__all__ = ["INSTANCE_HEAD_FIELDS", "DSPHead", "FilterBank", "InstanceHead", "LocalizationHead", "ModelConfig", "ProtoSegNet",
           "SampledEmbedding", "UNet2D", "pick_device"]

NORMS = ("group", "batch")
# The fields of ModelConfig that describe the instance heads (not the backbone they share).
INSTANCE_HEAD_FIELDS = ("instance_embed_dim", "localization_context", "embedding_context", "instance_coordinates")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`ProtoSegNet`; JSON-able through :meth:`to_dict`.

    ``n_classes`` and ``n_instance_classes`` are the project's part: ``None`` in both marks a
    configuration for any project (``TrainConfig.model``), which training completes from the
    project's classes; a network is built from a complete one. ``n_instance_classes`` > 0 adds the
    WISE-Net heads: one localization map per instance class (in the order of the classes flagged
    ``instances: true``) and an ``instance_embed_dim``-dim pixel embedding; without heads their
    settings (``localization_context``, ``embedding_context``, ``instance_coordinates``) are 0.

    The defaults are those training uses; why each is what it is: ``docs/decisions.md``. Older
    files load with the values they were written with (:mod:`napari_protoseg.model.migration`).
    """

    n_classes: int | None = None  # output classes (None: the project's, filled in by training)
    # Input channels: 1 for single sections, 2k + 1 for 2.5D input (the section and its k
    # neighbours on each side).
    in_channels: int = 1
    # U-Net channels at full resolution (doubled at every level) and number of 2x down-samplings.
    base_width: int = 8
    depth: int = 4
    embed_dim: int = 32  # dimensions of the DSP embedding on the unit sphere
    prototypes_per_class: int = 5  # K prototypes per class; the logit is the mean cosine over them
    temperature: float = 0.05  # tau: logits are cosines / tau, bounded by 1 / tau
    norm: str = "group"  # the U-Net's normalisation: "group" or "batch"
    # Classes with instance heads, those flagged instances (0: no heads; None: filled in by training).
    n_instance_classes: int | None = None
    instance_embed_dim: int = 64  # dimensions of the instance embedding (64, as in WISE-Net)
    # Scales of a fixed (not learned) filter bank (FilterBank) whose responses of the central
    # section join the input channels (ilastik-style features); none by default.
    filter_sigmas: tuple[float, ...] = ()
    # The localization head's context branch works at 1/localization_context of the features'
    # resolution (LocalizationHead); 0: the plain 3 x 3 head (InstanceHead).
    localization_context: int = 4
    # s > 1: the U-Net and the heads work at 1/s of the input resolution (input average-pooled,
    # logits and instance maps upsampled bilinearly back; the DSP embedding stays small). 1: full.
    input_scale: int = 2
    # The instance embedding head's context branch, as localization_context (0: the plain head).
    embedding_context: int = 4
    # c > 0 makes the instance embedding spatial: c times the pixel's (y, x) position joins its
    # first two channels, so that alike touching objects are told apart by position (Novotny et
    # al., ECCV 2018; Neven et al., CVPR 2019). 0: free vectors.
    instance_coordinates: float = 1 / 16

    def __post_init__(self) -> None:
        self.filter_sigmas = tuple(float(s) for s in self.filter_sigmas)
        if any(not (math.isfinite(s) and s > 0) for s in self.filter_sigmas):
            raise ValueError(f"ModelConfig.filter_sigmas must be positive numbers, got {self.filter_sigmas!r}")
        names = ["in_channels", "base_width", "embed_dim", "prototypes_per_class", "instance_embed_dim",
                 "input_scale"]
        if self.n_classes is not None:
            names.insert(0, "n_classes")
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("depth", "localization_context", "embedding_context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
        n_inst = self.n_instance_classes
        if self.n_classes is None:
            if n_inst is not None:
                raise ValueError("ModelConfig.n_instance_classes is set but n_classes is not: set both, or "
                                 "neither for a configuration that training completes from the project")
        elif n_inst is None:
            self.n_instance_classes = n_inst = 0
        if n_inst is not None and (isinstance(n_inst, bool) or not isinstance(n_inst, int)
                                   or not 0 <= n_inst <= self.n_classes):
            raise ValueError(f"ModelConfig.n_instance_classes must be an integer from 0 to n_classes "
                             f"({self.n_classes}), got {n_inst!r}")
        coordinates = self.instance_coordinates
        if isinstance(coordinates, bool) or not isinstance(coordinates, (int, float)) or not (
                math.isfinite(coordinates) and coordinates >= 0):
            raise ValueError(f"ModelConfig.instance_coordinates must be a number >= 0, got {coordinates!r}")
        self.instance_coordinates = float(coordinates)
        if coordinates and self.instance_embed_dim < 2:
            raise ValueError("ModelConfig.instance_coordinates needs an instance embedding of 2 or more dimensions")
        if n_inst == 0:  # settings of the instance heads: nothing without heads
            self.localization_context = self.embedding_context = 0
            self.instance_coordinates = 0.0
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"ModelConfig.temperature must be a positive number, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if self.norm not in NORMS:
            raise ValueError(f"ModelConfig.norm must be one of {NORMS}, got {self.norm!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON types (ints, floats, a str, a list; None for the project's part of a
        configuration for any project). Its format is :data:`~napari_protoseg.model.migration.CONFIG_VERSION`;
        whoever stores it stores that version beside it."""
        data = asdict(self)
        data["filter_sigmas"] = list(self.filter_sigmas)
        return data

    @property
    def has_instance_heads(self) -> bool:
        return bool(self.n_instance_classes)

    @property
    def is_complete(self) -> bool:
        """True when the project's part (``n_classes``) is filled in: a network can be built."""
        return self.n_classes is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any], version: int | None = CONFIG_VERSION) -> ModelConfig:
        """Inverse of :meth:`to_dict` for a dict stored with format ``version`` (None: 1, written
        before versions were recorded), upgraded by :func:`~napari_protoseg.model.migration.upgrade_model_config`
        (an older dict means what it meant then). Unknown or missing keys raise ``ValueError``, and
        a version newer than this release reads :class:`~napari_protoseg.model.migration.ConfigVersionError`."""
        data = upgrade_model_config(data, version)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        missing = known - set(data)
        if missing:
            raise ValueError(f"ModelConfig keys missing: {sorted(missing)}")
        return cls(**data)


def l2_normalize(x: torch.Tensor, dim: int, eps: float = 1e-12) -> torch.Tensor:
    """``x / max(|x|, eps)`` along ``dim`` (as ``F.normalize``, several times faster backward on CPU)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True).clamp_min(eps * eps))


class _GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) that, on the CPU while autograd records,
    normalises a channels-last input in the standard layout and hands back channels-last: the
    backward of PyTorch's channels-last GroupNorm is several times slower on the CPU, and the
    convolutions around it want channels-last. Without autograd (prediction) the layout round trip
    costs more than it saves, so torch's own path runs (timings: docs/decisions.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or not torch.is_grad_enabled()
                or not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()):
            return super().forward(x)
        y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return y.contiguous(memory_format=torch.channels_last)


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # Groups of (at most) 8 channels' count; gcd keeps it a divisor of the channel count.
    groups = math.gcd(channels, 8)
    return _GroupNorm(groups, channels)


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            _norm_layer(norm, c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            _norm_layer(norm, c_out),
            nn.ReLU(inplace=True),
        )


class UNet2D(nn.Module):
    """A plain 2D U-Net: ``depth`` max-pool down-samplings, transposed-conv up-samplings, skips.

    ``forward(x: (B, in_channels, H, W)) -> (B, out_channels, H, W)`` for any ``H, W``: the input is
    padded to a multiple of ``2 ** depth`` (reflect, or replicate where the input is too small to
    reflect) and the output cropped back to ``H x W``.
    """

    def __init__(self, in_channels: int, out_channels: int, base_width: int = 16, depth: int = 3,
                 norm: str = "group") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.depth = depth
        widths = [base_width * 2 ** i for i in range(depth + 1)]
        self.stem = _ConvBlock(in_channels, widths[0], norm)
        self.down = nn.ModuleList(_ConvBlock(widths[i], widths[i + 1], norm) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in range(depth)
        )
        self.merge = nn.ModuleList(_ConvBlock(2 * widths[i], widths[i], norm) for i in range(depth))
        self.out = nn.Conv2d(widths[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        """Spatial sizes the encoder needs (the forward pads to it)."""
        return 2 ** self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        skips = []
        x = self.stem(x)
        for block in self.down:
            skips.append(x)
            x = block(F.max_pool2d(x, 2))
        for i in reversed(range(self.depth)):
            x = self.up[i](x)
            x = self.merge[i](torch.cat([skips[i], x], dim=1))
        x = self.out(x)
        return x[..., :h, :w]


class DSPHead(nn.Module):
    """The DSP projection head: BatchNorm2d -> 1x1 conv -> LeakyReLU(0.1) -> 1x1 conv -> L2 norm."""

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, embed_dim, 1)
        self.act = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(embed_dim, embed_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        e = self.conv2(self.act(self.conv1(self.norm(features))))
        return l2_normalize(e, dim=1)


class InstanceHead(nn.Module):
    """3x3 conv -> norm (as the backbone's) -> ReLU -> 1x1 conv: a small per-pixel head on the
    backbone features. The 1x1 conv runs as a matrix product over channels-last pixels (on the CPU
    several times faster than PyTorch's 1x1 convolution, same result)."""

    def __init__(self, channels: int, hidden: int, out_channels: int, norm: str = "group") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.norm = _norm_layer(norm, hidden)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, out_channels, 1)

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """The features before the last 1x1 convolution, (B, hidden, H, W)."""
        return self.act(self.norm(self.conv1(features)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _pointwise(self.conv2, self.hidden(features))


class SampledEmbedding:
    """An :class:`InstanceHead`'s output evaluated only at the pixels asked for: its hidden features
    and its last 1x1 convolution. The embedding loss reads a few thousand pixels of a batch; the
    full (B, 64, H, W) map and its gradient would cost a noticeable share of a training step."""

    def __init__(self, hidden: torch.Tensor, conv: nn.Conv2d, coordinates: float = 0.0) -> None:
        self.hidden = hidden
        self.conv = conv
        self.coordinates = float(coordinates)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, E, H, W), as the full map's."""
        b, _, h, w = self.hidden.shape
        return b, self.conv.out_channels, h, w

    def rows(self, flat_pixels: torch.Tensor) -> torch.Tensor:
        """(N, E) embeddings at ``flat_pixels``, indices into the (B, H, W) pixels."""
        pixels = self.hidden.permute(0, 2, 3, 1).reshape(-1, self.hidden.shape[1])
        # index_select: its backward adds repeated indices in a fixed order (deterministic).
        rows = _pointwise_rows(self.conv, pixels.index_select(0, flat_pixels))
        if self.coordinates:
            h, w = self.hidden.shape[-2:]
            within = flat_pixels % (h * w)
            position = torch.stack([within // w, within % w], dim=1).to(rows.dtype) * self.coordinates
            rows = torch.cat([rows[:, :2] + position, rows[:, 2:]], dim=1)
        return rows


def add_coordinates(embedding: torch.Tensor, scale: float) -> torch.Tensor:
    """``embedding`` (B, E, H, W) with ``scale`` times each pixel's (y, x) position in the map added
    to its first two channels."""
    if not scale:
        return embedding
    h, w = embedding.shape[-2:]
    ys = torch.arange(h, device=embedding.device, dtype=embedding.dtype) * scale
    xs = torch.arange(w, device=embedding.device, dtype=embedding.dtype) * scale
    grid = torch.stack([ys[:, None].expand(h, w), xs[None, :].expand(h, w)])
    return torch.cat([embedding[:, :2] + grid, embedding[:, 2:]], dim=1)


def _pointwise_rows(conv: nn.Conv2d, rows: torch.Tensor) -> torch.Tensor:
    """The 1x1 convolution ``conv`` of pixels given as rows (..., C_in) -> (..., C_out)."""
    return F.linear(rows, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The 1x1 convolution ``conv`` of ``x`` as a matrix product over channels-last pixels."""
    return _pointwise_rows(conv, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LocalizationHead(nn.Module):
    """The localization head with context: :class:`InstanceHead`'s 3x3 branch at full resolution
    plus a branch that average-pools the features by ``scale`` and applies three 3x3 convolutions
    dilated 1, 2 and 4 (about ``15 * scale`` pixels across), upsampled bilinearly; a 1x1
    convolution of both gives the maps. The plain head sees 3 x 3 feature pixels and put several
    blobs on most objects; this one sees whole mitochondria (measured: docs/decisions.md)."""

    def __init__(self, channels: int, hidden: int, out_channels: int, scale: int = 4, norm: str = "group") -> None:
        super().__init__()
        self.scale = int(scale)
        self.local = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1, bias=False), _norm_layer(norm, hidden),
                                   nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        c_in = channels
        for dilation in (1, 2, 4):
            layers += [nn.Conv2d(c_in, hidden, 3, padding=dilation, dilation=dilation, bias=False),
                       _norm_layer(norm, hidden), nn.ReLU(inplace=True)]
            c_in = hidden
        self.context = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(2 * hidden, out_channels, 1)

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """Both branches' features before the last 1x1 convolution, (B, 2 * hidden, H, W)."""
        h, w = features.shape[-2:]
        low = F.avg_pool2d(features, self.scale, ceil_mode=True)
        context = F.interpolate(self.context(low), size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([self.local(features), context], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _pointwise(self.conv2, self.hidden(features))


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _smoothing_matrix(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """The (size, size) matrix ``M`` with ``rows @ M`` = the rows convolved with ``kernel`` after
    the padding :meth:`FilterBank._padded` gives them (reflect, or replicate where the kernel is
    longer than the row): the padding is applied to the pixels' indices, so it is the same one."""
    r = (len(kernel) - 1) // 2
    mode = "reflect" if r < size else "replicate"
    source = F.pad(torch.arange(size, dtype=torch.float64).view(1, 1, size), (r, r), mode=mode)
    taps = source.view(-1).long().unfold(0, 2 * r + 1, 1)  # (size, 2r + 1): the input of each tap
    outputs = torch.arange(size).view(-1, 1).expand_as(taps)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((taps, outputs), kernel.double().view(1, -1).expand_as(taps), accumulate=True)
    return matrix


class FilterBank(nn.Module):
    """Fixed multiscale filters of one channel: for each ``sigma`` the Gaussian-smoothed image, its
    gradient magnitude (times sigma) and the two eigenvalues of its Hessian (times sigma^2), as
    scikit-image's ``multiscale_basic_features`` (intensity, edges, texture); the scale factors make
    the responses of different scales comparable. Reflect padding; no parameters.

    ``forward(x: (B, 1, H, W)) -> (B, 4 * len(sigmas), H, W)``.
    """

    # Up to this side length the smoothing runs as two matrix products with all scales at once
    # (padding folded into the matrices), faster on the CPU than 1-D convolutions (docs/decisions.md).
    matrix_limit = 1024

    def __init__(self, sigmas: tuple[float, ...]) -> None:
        super().__init__()
        self.sigmas = tuple(float(s) for s in sigmas)
        for i, sigma in enumerate(self.sigmas):
            self.register_buffer(f"kernel{i}", _gaussian_kernel(sigma), persistent=False)
        self._matrices: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}

    @property
    def n_features(self) -> int:
        return 4 * len(self.sigmas)

    @property
    def radius(self) -> int:
        """How far (pixels) an input influences a response."""
        return max((int(math.ceil(4 * s)) + 1 for s in self.sigmas), default=0)

    def _kernels(self) -> list[torch.Tensor]:
        return [getattr(self, f"kernel{i}") for i in range(len(self.sigmas))]

    @staticmethod
    def _padded(x: torch.Tensor, r: int, axis: int) -> torch.Tensor:
        size = x.shape[axis]
        mode = "reflect" if r < size else "replicate"
        return F.pad(x, (r, r, 0, 0) if axis == -1 else (0, 0, r, r), mode=mode)

    @classmethod
    def _smooth1d(cls, x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
        """``kernel`` along ``axis`` (-1: x, -2: y) of (B, 1, H, W), as a 1-D convolution of the
        rows (faster on the CPU than a 2-D convolution with a 1 x k kernel)."""
        r = (len(kernel) - 1) // 2
        if axis == -2:
            return cls._smooth1d(x.transpose(-1, -2), kernel, -1).transpose(-1, -2)
        padded = cls._padded(x, r, -1)
        b, c, h, w = padded.shape
        return F.conv1d(padded.reshape(b * c * h, 1, w), kernel.view(1, 1, -1)).reshape(b, c, h, w - 2 * r)

    def _smoothing_matrices(self, size: int, like: torch.Tensor) -> torch.Tensor:
        """(S, size, size): :func:`_smoothing_matrix` of each scale, cached per size and device."""
        key = (size, str(like.device), like.dtype)
        matrices = self._matrices.get(key)
        if matrices is None:
            matrices = torch.stack([_smoothing_matrix(k.cpu(), size) for k in self._kernels()])
            matrices = matrices.to(device=like.device, dtype=like.dtype)
            if len(self._matrices) >= 8:
                self._matrices.clear()
            self._matrices[key] = matrices
        return matrices

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, S, H, W): the image smoothed at each scale (separable Gaussian)."""
        h, w = x.shape[-2:]
        if max(h, w) <= self.matrix_limit:
            along_x = torch.matmul(x, self._smoothing_matrices(w, x))  # (B, S, H, W)
            return torch.matmul(self._smoothing_matrices(h, x).transpose(-1, -2), along_x)
        return torch.cat([self._smooth1d(self._smooth1d(x, k, -1), k, -2) for k in self._kernels()], dim=1)

    @classmethod
    def _neighbours(cls, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x[i-1]``, ``x[i]`` and ``x[i+1]`` along ``axis`` (views), with reflected borders."""
        padded = cls._padded(x, 1, axis)
        n = padded.shape[axis]
        before, centre, after = (padded.narrow(axis, start, n - 2) for start in (0, 1, 2))
        return before, centre, after

    @classmethod
    def _differences(cls, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Central first difference ``(x[i+1] - x[i-1]) / 2`` and second difference
        ``x[i+1] - 2 x[i] + x[i-1]`` along ``axis``, with reflected borders."""
        before, centre, after = cls._neighbours(x, axis)
        return 0.5 * (after - before), after - 2.0 * centre + before

    @classmethod
    def _first_difference(cls, x: torch.Tensor, axis: int) -> torch.Tensor:
        """Central first difference ``(x[i+1] - x[i-1]) / 2`` along ``axis``, with reflected borders."""
        before, _, after = cls._neighbours(x, axis)
        return 0.5 * (after - before)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        b, _, h, w = x.shape
        if not self.sigmas:
            return x.new_zeros(b, 0, h, w)
        sigma = torch.tensor(self.sigmas, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        smooth = self.smoothed(x)
        gy, hyy = self._differences(smooth, -2)
        gx, hxx = self._differences(smooth, -1)
        hxy = self._first_difference(gx, -2)
        edges = torch.sqrt(gx * gx + gy * gy + 1e-12) * sigma
        half_trace = (hxx + hyy) / 2
        spread = torch.sqrt(((hxx - hyy) / 2) ** 2 + hxy * hxy + 1e-12)
        curvature = [(half_trace + spread) * sigma ** 2, (half_trace - spread) * sigma ** 2]
        # Per scale: smoothed, edges, the two eigenvalues (the channel order models were trained on).
        return torch.stack([smooth, edges, *curvature], dim=2).reshape(b, 4 * len(self.sigmas), h, w)


class ProtoSegNet(nn.Module):
    """U-Net + DSP head + class prototypes (+ optional WISE-Net instance heads).

    ``forward(x: (B, in_channels, H, W))`` returns ``{"embedding": (B, D, h, w) unit vectors,
    "logits": (B, C, H, W)}`` with ``|logits| <= 1 / temperature``; ``h, w`` are the resolution
    the network works at, ``H, W`` (padded to :attr:`multiple` where ``config.input_scale`` > 1)
    divided by ``config.input_scale``. The prototypes are stored unnormalised in ``prototypes``
    (C, K, D) and L2-normalised at every forward.

    With instance heads (``config.n_instance_classes = K > 0``) the dict also holds
    ``"localization"`` (B, K, H, W) **logits** (``sigmoid`` gives the blob probabilities) and
    ``"instance_embedding"`` (B, E, H, W) free vectors; ``instance_batch=n`` computes them for the
    first ``n`` inputs only (the others, e.g. a strongly augmented copy, need only logits), and
    ``instance_batch=0`` skips the heads (semantic prediction);
    ``instance_backbone_grad`` scales the instance heads' gradients into the backbone: 0 (or False)
    keeps them out of it, 1 (or True) passes them whole; ``sampled_embedding=True`` gives the
    instance embedding as a :class:`SampledEmbedding` (training: the loss reads a few pixels).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.is_complete:
            raise ValueError("ModelConfig.n_classes is not set: a network needs its number of classes "
                             "(training fills it in from the project's classes)")
        self.config = config
        self.filters = FilterBank(config.filter_sigmas) if config.filter_sigmas else None
        n_filters = self.filters.n_features if self.filters is not None else 0
        self.backbone = UNet2D(config.in_channels + n_filters, config.embed_dim, config.base_width, config.depth,
                               config.norm)
        self.head = DSPHead(config.embed_dim, config.embed_dim)
        protos = torch.randn(config.n_classes, config.prototypes_per_class, config.embed_dim)
        self.prototypes = nn.Parameter(F.normalize(protos, dim=-1))
        if config.has_instance_heads:
            width = 16  # hidden channels of each head: more cost time (full resolution) without helping
            if config.localization_context:
                self.localization_head = LocalizationHead(config.embed_dim, width, config.n_instance_classes,
                                                          config.localization_context, config.norm)
            else:
                self.localization_head = InstanceHead(config.embed_dim, width, config.n_instance_classes, config.norm)
            if config.embedding_context:
                self.instance_embedding_head = LocalizationHead(config.embed_dim, width, config.instance_embed_dim,
                                                                config.embedding_context, config.norm)
            else:
                self.instance_embedding_head = InstanceHead(config.embed_dim, width, config.instance_embed_dim,
                                                            config.norm)
            with torch.no_grad():  # start with few blobs (p ~ 0.1), as LCFCN's initial background bias
                self.localization_head.conv2.bias.fill_(-2.0)
        # NHWC convolutions are markedly faster on CPU (oneDNN) and fine on CUDA; the input is
        # converted in forward, and state dicts load into these parameters whatever their layout.
        self.to(memory_format=torch.channels_last)

    @property
    def multiple(self) -> int:
        """Input sizes that need no padding: ``input_scale * 2 ** depth`` (tiles are placed on it)."""
        return self.config.input_scale * self.backbone.multiple

    def _to_input_size(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A map at the network's resolution, upsampled bilinearly by ``input_scale`` and cropped
        to ``height x width`` (contiguous)."""
        if self.config.input_scale > 1:
            x = F.interpolate(x, scale_factor=self.config.input_scale, mode="bilinear", align_corners=False)
        return x[..., :height, :width].contiguous()

    def clipping_groups(self) -> list[list[nn.Parameter]]:
        """The parameters in groups whose gradient norms are clipped separately: the semantic model
        (backbone, DSP head, prototypes) and each instance head. One global norm let the instance
        heads' large gradients scale down the semantic model's updates even with detached heads."""
        heads = [self.localization_head, self.instance_embedding_head] if self.config.has_instance_heads else []
        in_heads = {id(p) for head in heads for p in head.parameters()}
        semantic = [p for p in self.parameters() if id(p) not in in_heads]
        return [semantic] + [list(head.parameters()) for head in heads]

    def normalized_prototypes(self) -> torch.Tensor:
        """The prototypes on the unit sphere, (C, K, D)."""
        return l2_normalize(self.prototypes, dim=-1)

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map (B, embed_dim, h, w) at the network's resolution: what the DSP
        head, the instance heads and self-supervised pretraining read."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.filters is not None:
            centre = self.config.in_channels // 2
            with torch.no_grad():
                responses = self.filters(x[:, centre:centre + 1]).to(x.dtype)
            x = torch.cat([x, responses], dim=1)
        height, width = x.shape[-2:]
        input_scale = self.config.input_scale
        if input_scale > 1:
            # Padded at full resolution to the whole multiple, as the tiling of inference pads an
            # image, so that tiles and a whole-image forward see the same border.
            m = self.multiple
            pad_h, pad_w = (-height) % m, (-width) % m
            if pad_h or pad_w:
                mode = "reflect" if pad_h < height and pad_w < width else "replicate"
                x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
            x = F.avg_pool2d(x, input_scale)
        return self.backbone(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor, instance_batch: int | None = None,
                instance_backbone_grad: float = 1.0, sampled_embedding: bool = False) -> dict[str, Any]:
        height, width = x.shape[-2:]
        input_scale = self.config.input_scale
        features = self.backbone_features(x)
        e = self.head(features)
        # mean_j cos(e, p_c^j) = e . mean_j p_c^j, since |e| = 1 and each p_c^j is normalised.
        mean_proto = self.normalized_prototypes().mean(dim=1) / self.config.temperature  # (C, D)
        logits = F.linear(e.permute(0, 2, 3, 1), mean_proto).permute(0, 3, 1, 2)
        out = {"embedding": e, "logits": self._to_input_size(logits, height, width)}
        if self.config.has_instance_heads and instance_batch != 0:
            head_features = features if instance_batch is None else features[:instance_batch]
            scale = float(instance_backbone_grad)
            if scale == 0.0:
                head_features = head_features.detach()
            elif scale != 1.0:  # same values; the gradient into the backbone is multiplied by scale
                head_features = head_features.detach() + scale * (head_features - head_features.detach())
            # The backbone's output is cropped back to the input size; channels_last keeps the
            # heads' convolutions on the fast (oneDNN) path.
            head_features = head_features.contiguous(memory_format=torch.channels_last)
            out["localization"] = self._to_input_size(self.localization_head(head_features), height, width)
            if sampled_embedding:
                hidden = self.instance_embedding_head.hidden(head_features)
                if input_scale > 1:
                    hidden = self._to_input_size(hidden, height, width).contiguous(memory_format=torch.channels_last)
                out["instance_embedding"] = SampledEmbedding(hidden, self.instance_embedding_head.conv2,
                                                             self.config.instance_coordinates)
            else:
                embedding = self.instance_embedding_head(head_features)
                if input_scale > 1:
                    embedding = self._to_input_size(embedding, height, width)
                out["instance_embedding"] = add_coordinates(embedding, self.config.instance_coordinates)
        return out


def pick_device(preference: str = "auto") -> torch.device:
    """The torch device to train on.

    ``"auto"``: CUDA if available, else Apple MPS, else CPU. ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``)
    and ``"mps"`` ask for that device and raise ``ValueError`` if it is not available here.
    """
    pref = str(preference).strip().lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but no CUDA GPU is available to PyTorch here")
        device = torch.device(pref)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {pref!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    if pref == "mps":
        if not mps_ok:
            raise ValueError("device 'mps' was asked for, but Apple MPS is not available here")
        return torch.device("mps")
    raise ValueError(f"unknown device {preference!r}; use 'auto', 'cpu', 'cuda' or 'mps'")
