"""Applying a trained model: tiled prediction with overlap blending, in bounded memory.

Pure NumPy/PyTorch, no Qt. A plane is cut into equally sized tiles that overlap by at least
``overlap`` pixels. Each tile's softmax probabilities are weighted by a separable window and
accumulated; the sum is divided by the accumulated weight. Along an edge shared with another tile
the window is (almost) zero in the outer quarter of the overlap, rises smoothly (cosine) over its
middle half and is 1 beyond; along the image border it is flat 1. The weight is > 0 everywhere
(at least 1e-6), so every pixel is covered, and where a tile's prediction suffers from its border
(padding, missing context) the neighbouring tile's interior takes over. A network whose output at a
pixel depends only on the inputs within its receptive field (``norm="batch"``, BatchNorm uses
running statistics in eval mode) therefore gives exactly the whole-image result once
``overlap / 4 >= receptive_radius(config)``. With ``norm="group"`` (the default) GroupNorm
normalises with each tile's own statistics, so tiles never reproduce a whole-image forward exactly;
the smooth cross-fade keeps this from showing as seams.

Memory: a plane is processed one row of tiles at a time; only ``C x tile x X`` accumulators are
held, and finished rows are handed on (into NumPy arrays, or written into a zarr group for volumes
larger than memory). Lazy inputs (dask, zarr, anything indexable with ``np.asarray(image[...])``)
are read piece by piece, never as a whole volume.

Test-time augmentation (``tta=True``): each tile is also predicted rotated by 90, 180 and 270
degrees and mirrored (the 8 symmetries of the square the network was trained with), each output
turned back, and the 8 softmax probabilities averaged. The result is then the same for a rotated
or mirrored image (up to tiling), and isolated misclassified pixels become rarer; it takes 8 times
the network's time. Only the semantic probabilities are averaged: the instance heads'
localization and embedding maps come from the plain pass.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_protoseg.annotations.project import label_dtype
from napari_protoseg.prediction.decoders import PixelEmbeddings
from napari_protoseg.model.file import TrainedModel
from napari_protoseg.model.network import ModelConfig, add_coordinates, pick_device

__all__ = [
    "PlaneInstanceMaps",
    "PlanePrediction",
    "VolumePrediction",
    "predict_instance_maps",
    "predict_instance_maps_of_planes",
    "predict_plane",
    "predict_planes",
    "predict_region",
    "predict_volume",
    "receptive_radius",
    "tile_layout",
]

_MIN_WEIGHT = 1e-6
# (quarter turns, mirror) of the 8 symmetries of the square; the first is the identity.
TTA_TRANSFORMS = tuple((turns, mirror) for turns in range(4) for mirror in (False, True))
# Lazy volumes whose planes (times the 2.5D window) fit in this many bytes are read whole plane
# by plane, each plane once; larger planes are read band by band.
_PLANE_CACHE_BYTES = 1 << 30


@dataclass
class PlanePrediction:
    """Prediction of one plane (or a region of it).

    ``probabilities`` (C, Y, X) float32 sum to 1 over C; ``classes`` (Y, X) holds class IDS (as in
    ``classes.json``, not output indices) of the most probable class; ``confidence`` (Y, X) is the
    largest probability, in [1/C, 1]. ``origin`` is (y0, x0) of the region in the plane.
    """

    probabilities: np.ndarray
    classes: np.ndarray
    confidence: np.ndarray
    class_ids: list[int]
    origin: tuple[int, int] = (0, 0)


@dataclass
class VolumePrediction:
    """Prediction of a plane or a stack by :func:`predict_volume`.

    ``classes`` (same shape as the image; 0 = not predicted, e.g. after a stop) and ``confidence``
    (float32) are NumPy arrays, or zarr arrays when written into the zarr group ``group``.
    ``probabilities`` is (C, *image.shape) float32 or None. ``planes_done`` counts completed planes;
    ``stopped`` is True when ``stop()`` ended the run early (planes after ``planes_done`` are 0,
    the plane being predicted at the stop may be partly written).
    """

    classes: Any
    confidence: Any
    probabilities: Any | None
    class_ids: list[int]
    planes_done: int
    planes_total: int
    stopped: bool = False
    group: Any | None = None

    @property
    def complete(self) -> bool:
        return self.planes_done == self.planes_total and not self.stopped


# ------------------------------------------------------------------------------- geometry


def receptive_radius(config: ModelConfig) -> int:
    """How far (pixels) an input can influence an output of the network: ``7 * 2**depth - 5``.

    Two 3x3 convolutions at full resolution, then per level ``i`` (scale ``2**(i-1)`` to
    ``2**i``) a 2x2 pool, two 3x3 convolutions down, a 2x2 transposed convolution and two 3x3
    convolutions up; the DSP head is 1x1. 9 for ``depth=1``, 23 for ``depth=2``, 51 for ``depth=3``,
    107 for ``depth=4`` (checked against input gradients). GroupNorm is ignored (it is global).
    A filter bank (``config.filter_sigmas``) adds its radius, ``ceil(4 * max sigma) + 1``.
    With ``input_scale`` s > 1 the network's reach, counted in its own pixels, grows by one (the
    bilinear upsampling) and each of its pixels is s input pixels: ``s * (7 * 2**depth - 4)``
    (exact for s = 2, an upper bound above), plus the filter bank's radius.
    """
    filters = max((int(math.ceil(4 * s)) + 1 for s in config.filter_sigmas), default=0)
    network = 7 * 2 ** config.depth - 5
    if config.input_scale > 1:
        network = config.input_scale * (network + 1)
    return network + filters


def _ceil_to(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def _tile_size(tile: int, multiple: int) -> int:
    """The tile rounded down to a multiple of the network's ``multiple``, at least twice that."""
    return max(2 * multiple, int(tile) // multiple * multiple)


def _axis_tiles(length: int, tile: int, overlap: int, multiple: int) -> tuple[list[int], int, int, int]:
    """Tile origins, tile size, padded length and the overlap the window uses, along one axis.

    An axis no longer than ``tile`` is one tile of its own length (the network pads it like a
    whole image). Longer axes are padded (reflected, as the network pads a whole image) to a
    multiple of ``multiple``; as few tiles as ``tile`` and ``overlap`` allow are placed at
    multiples of ``multiple`` (so every tile sees the same pooling grid as a whole-image forward),
    each overlapping the next by >= ``overlap``, and the tile is shrunk as far as that count allows.
    """
    if length <= tile:
        return [0], length, length, overlap
    padded = _ceil_to(length, multiple)
    step_overlap = min(_ceil_to(overlap, multiple), tile - multiple)
    n = math.ceil((padded - step_overlap) / (tile - step_overlap))
    size = min(tile, _ceil_to(math.ceil((padded + (n - 1) * step_overlap) / n), multiple))
    origins = (np.round(np.linspace(0, padded - size, n) / multiple) * multiple).astype(int).tolist()
    return origins, size, padded, min(overlap, step_overlap)


def tile_layout(shape: tuple[int, int], tile: int = 512, overlap: int = 64,
                multiple: int = 8) -> tuple[list[int], list[int], tuple[int, int]]:
    """Tile origins along y and x and the tile size (th, tw) used for a plane of ``shape``
    (``multiple``: ``ProtoSegNet.multiple``, ``input_scale * 2 ** depth``; 8 by default)."""
    _check_tiling(tile, overlap)
    tile = _tile_size(tile, multiple)
    ys, th, _, _ = _axis_tiles(int(shape[0]), tile, overlap, multiple)
    xs, tw, _, _ = _axis_tiles(int(shape[1]), tile, overlap, multiple)
    return ys, xs, (th, tw)


def _check_tiling(tile: int, overlap: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be a positive whole number, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise ValueError(f"overlap must be a whole number >= 0, got {overlap!r}")
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")


def _edge_profile(size: int, overlap: int) -> np.ndarray:
    """Weight by distance from an edge shared with another tile: ~0, cosine rise, 1."""
    d = np.arange(size, dtype=np.float64) + 0.5
    lo, hi = overlap / 4.0, 3.0 * overlap / 4.0
    if hi - lo <= 0:
        return np.ones(size)
    t = np.clip((d - lo) / (hi - lo), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def _window(size: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    w = np.ones(size)
    profile = _edge_profile(size, overlap)
    if ramp_start:
        w = np.minimum(w, profile)
    if ramp_end:
        w = np.minimum(w, profile[::-1])
    return np.maximum(w, _MIN_WEIGHT).astype(np.float32)


# -------------------------------------------------------------------------------- reading


def _image_dims(image) -> tuple[bool, tuple[int, int]]:
    shape = tuple(int(s) for s in image.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"expected a 2D plane (Y, X) or a stack (Z, Y, X), got an image of shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"the image is empty (shape {shape})")
    return len(shape) == 3, shape[-2:]


class _Source:
    """Reads (2k+1) section crops around plane ``z``; planes beyond the ends repeat the end plane
    (the rule of :func:`~napari_protoseg.training.crops.plane_with_context`); a 2D image repeats itself."""

    def __init__(self, image, context: int, cache_planes: bool = False):
        self.image = image
        self.is_stack, self.plane_shape = _image_dims(image)
        self.n_planes = int(image.shape[0]) if self.is_stack else 1
        self.context = int(context)
        self.direct = isinstance(image, np.ndarray)
        plane_bytes = self.plane_shape[0] * self.plane_shape[1] * np.dtype(image.dtype).itemsize
        self.cache_planes = (cache_planes and not self.direct
                             and plane_bytes * (2 * self.context + 1) <= _PLANE_CACHE_BYTES)
        self._planes: dict[int, np.ndarray] = {}

    def indices(self, z: int) -> list[int]:
        if not self.is_stack:
            return [0] * (2 * self.context + 1)
        return np.clip(np.arange(z - self.context, z + self.context + 1), 0, self.n_planes - 1).tolist()

    def _plane_index(self, zz: int):
        return (zz,) if self.is_stack else ()

    def begin_plane(self, z: int) -> None:
        """Forget cached planes outside plane ``z``'s window (sequential reading of a volume)."""
        if self.cache_planes:
            keep = set(self.indices(z))
            for zz in list(self._planes):
                if zz not in keep:
                    del self._planes[zz]

    def read(self, z: int, y0: int, y1: int, x0: int, x1: int) -> list[np.ndarray]:
        """Crops [y0:y1, x0:x1] of the 2k+1 planes around ``z``; beyond the image's bottom/right
        edge reflected (as the network pads a whole image)."""
        height, width = self.plane_shape
        cy1, cx1 = min(y1, height), min(x1, width)
        pad = ((0, y1 - cy1), (0, x1 - cx1))
        crops: dict[int, np.ndarray] = {}
        out = []
        for zz in self.indices(z):
            if zz not in crops:
                if self.direct:
                    crop = self.image[(*self._plane_index(zz), slice(y0, cy1), slice(x0, cx1))]
                elif self.cache_planes:
                    if zz not in self._planes:
                        self._planes[zz] = np.asarray(self.image[self._plane_index(zz) or (Ellipsis,)])
                    crop = self._planes[zz][y0:cy1, x0:cx1]
                else:
                    crop = np.asarray(self.image[(*self._plane_index(zz), slice(y0, cy1), slice(x0, cx1))])
                if pad[0][1] or pad[1][1]:
                    crop = np.pad(crop, pad, mode="reflect")
                crops[zz] = crop
            out.append(crops[zz])
        return out


# ------------------------------------------------------------------------------ the core


class _Stopped(Exception):
    pass


def _transformed(x: torch.Tensor, turns: int, mirror: bool) -> torch.Tensor:
    """``x`` (..., H, W) mirrored left-right (``mirror``), then rotated by ``turns`` quarter turns."""
    x = x.flip(-1) if mirror else x
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def _untransformed(x: torch.Tensor, turns: int, mirror: bool) -> torch.Tensor:
    """The inverse of :func:`_transformed`."""
    x = torch.rot90(x, -turns, dims=(-2, -1)) if turns else x
    return x.flip(-1) if mirror else x


class _Runner:
    """The network ready for prediction: eval mode, device, inference mode; restores train mode.
    ``tta``: average the semantic probabilities over :data:`TTA_TRANSFORMS`."""

    def __init__(self, model: TrainedModel, device, tta: bool = False):
        self.model = model
        self.net = model.net
        if device is None:
            self.device = next(self.net.parameters()).device
        else:
            self.device = device if isinstance(device, torch.device) else pick_device(device)
            if next(self.net.parameters()).device != self.device:
                self.net.to(self.device)
        self.n_classes = model.net.config.n_classes
        self.multiple = self.net.multiple
        self.transforms = TTA_TRANSFORMS if tta else TTA_TRANSFORMS[:1]

    def __enter__(self):
        self._was_training = self.net.training
        self.net.eval()
        return self

    def __exit__(self, *exc):
        self.net.train(self._was_training)

    def _semantic(self, x: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax probabilities of the normalised batch ``x``, averaged over the transforms;
        ``first``: the identity pass's logits, if already computed."""
        total = None
        for turns, mirror in self.transforms:
            if first is not None and not turns and not mirror:
                logits = first
            else:
                logits = self.net(_transformed(x, turns, mirror), instance_batch=0)["logits"]
            probs = _untransformed(torch.softmax(logits.float(), dim=1), turns, mirror)
            total = probs if total is None else total + probs
        return total / len(self.transforms) if len(self.transforms) > 1 else total

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(B, 2k+1, h, w) raw intensities -> (B, C, h, w) float32 softmax probabilities."""
        x = torch.from_numpy(self.model.normalization(batch)).to(self.device)
        with torch.inference_mode():
            probs = self._semantic(x)  # the instance heads are not needed
        return probs.cpu().numpy()

    def instance_outputs(self, batch: np.ndarray) -> np.ndarray:
        """(B, 2k+1, h, w) raw intensities -> (B, C + K + E, h, w) float32: softmax probabilities,
        localization probabilities (sigmoid) and the instance embedding, stacked. A spatial
        embedding (``ModelConfig.instance_coordinates``) comes without its positions: the learnt
        offsets, the same in every tile; :class:`PixelEmbeddings` adds the plane's positions."""
        x = torch.from_numpy(self.model.normalization(batch)).to(self.device)
        with torch.inference_mode():
            out = self.net(x)
            offsets = add_coordinates(out["instance_embedding"].float(), -self.net.config.instance_coordinates)
            stacked = torch.cat([self._semantic(x, first=out["logits"]),
                                 torch.sigmoid(out["localization"].float()), offsets], dim=1)
        return stacked.cpu().numpy()

    @property
    def n_instance_channels(self) -> int:
        config = self.net.config
        return self.n_classes + config.n_instance_classes + config.instance_embed_dim


def _plane_bands(runner: _Runner, source: _Source, z: int, bounds: tuple[int, int, int, int],
                 tile: int, overlap: int, batch_size: int,
                 stop: Callable[[], bool] | None = None,
                 instance: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """Blended probabilities of the region ``bounds = (y0, x0, y1, x1)`` of plane ``z``, yielded as
    finished row bands ``(r0, r1, probs (C, r1 - r0, X))`` in region coordinates, top to bottom.
    Tiles may reach past the region's bottom/right (to a multiple of ``ProtoSegNet.multiple``): they read the
    image there, or its reflection beyond the image's edge. With ``instance`` the bands hold the
    stacked outputs of :meth:`_Runner.instance_outputs` (C + K + E channels), blended alike."""
    y_lo, x_lo, y_hi, x_hi = bounds
    height, width = y_hi - y_lo, x_hi - x_lo
    m = runner.multiple
    tile = _tile_size(tile, m)
    ys, th, _, overlap_y = _axis_tiles(height, tile, overlap, m)
    xs, tw, padded_w, overlap_x = _axis_tiles(width, tile, overlap, m)
    wx = [_window(tw, overlap_x, i > 0, i < len(xs) - 1) for i in range(len(xs))]
    channels = runner.n_instance_channels if instance else runner.n_classes
    predict = runner.instance_outputs if instance else runner.probabilities
    acc = np.zeros((channels, th, width), np.float32)
    weight = np.zeros((th, width), np.float32)
    for k, py in enumerate(ys):
        if stop is not None and stop():
            raise _Stopped
        wy = _window(th, overlap_y, k > 0, k < len(ys) - 1)
        rows = min(th, height - py)  # rows of this tile row inside the region
        planes = source.read(z, y_lo + py, y_lo + py + th, x_lo, x_lo + padded_w)
        for b in range(0, len(xs), batch_size):
            cols = xs[b:b + batch_size]
            batch = np.stack([np.stack([p[:, px:px + tw] for p in planes]) for px in cols])
            probs = predict(batch)
            for j, px in enumerate(cols):
                cw = min(tw, width - px)
                w2 = wy[:rows, None] * wx[b + j][None, :cw]
                acc[:, :rows, px:px + cw] += probs[j, :, :rows, :cw] * w2
                weight[:rows, px:px + cw] += w2
        step = (ys[k + 1] - py) if k + 1 < len(ys) else rows
        yield py, py + step, acc[:, :step] / weight[:step]
        if step < th:
            acc[:, :th - step] = acc[:, step:].copy()
            weight[:th - step] = weight[step:].copy()
        acc[:, th - step:] = 0
        weight[th - step:] = 0


def _decide(probs: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and confidence (max probability) from (C, ...) probabilities."""
    index = np.argmax(probs, axis=0)
    confidence = np.take_along_axis(probs, index[None], axis=0)[0]
    return lut[index], confidence.astype(np.float32, copy=False)


def _check_z(source: _Source, z) -> int:
    if not source.is_stack:
        if z not in (None, 0):
            raise ValueError(f"z={z} given for a 2D plane; leave z out (or 0)")
        return 0
    if z is None:
        raise ValueError(f"the image is a stack of {source.n_planes} planes; give the plane index z")
    z = int(z)
    if not 0 <= z < source.n_planes:
        raise ValueError(f"plane z={z} is outside the stack (0..{source.n_planes - 1})")
    return z


def _check_batch(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
    return int(batch_size)


# -------------------------------------------------------------------------- public API


def predict_plane(model: TrainedModel, volume_or_plane, z: int | None = None, tile: int = 512,
                  overlap: int = 64, device=None, batch_size: int = 4, *, tta: bool = False) -> PlanePrediction:
    """Predict one whole plane: a 2D image (``z`` None), or plane ``z`` of a (Z, Y, X) stack.

    The input may be a NumPy array or a lazy array (dask, zarr); only the planes ``z - context ..
    z + context`` are read. ``device`` None uses the device the network is on; another device
    moves the network there (in place). The network's train/eval mode is restored afterwards.
    ``tta``: test-time augmentation (8 passes; see the module docstring).
    """
    h, w = _image_dims(volume_or_plane)[1]
    return predict_region(model, volume_or_plane, z, 0, 0, h, w, margin=0, tile=tile,
                          overlap=overlap, device=device, batch_size=batch_size, tta=tta)


def predict_region(model: TrainedModel, volume, z: int | None, y0: int, x0: int, y1: int, x1: int,
                   margin: int | None = None, tile: int = 512, overlap: int = 64, device=None,
                   batch_size: int = 4, *, tta: bool = False) -> PlanePrediction:
    """Predict the region [y0, y1) x [x0, x1) of a plane (e.g. the part visible in the viewer).

    The region is clipped to the image (``origin`` of the result says where it starts). It is
    predicted with ``margin`` pixels of surrounding image (default: the network's receptive
    radius, at least ``overlap``) so that its borders closely match a whole-plane prediction.
    Only the region plus margin is read from lazy inputs. ``tta``: test-time augmentation.
    """
    _check_tiling(tile, overlap)
    batch_size = _check_batch(batch_size)
    source = _Source(volume, model.context)
    z = _check_z(source, z)
    height, width = source.plane_shape
    y0, x0 = max(0, int(y0)), max(0, int(x0))
    y1, x1 = min(height, int(y1)), min(width, int(x1))
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"the region [{y0}:{y1}, {x0}:{x1}] holds no pixel of the "
                         f"{height} x {width} plane")
    if margin is None:
        margin = max(overlap, receptive_radius(model.net.config))
    margin = max(0, int(margin))
    by0, bx0 = max(0, y0 - margin), max(0, x0 - margin)
    by1, bx1 = min(height, y1 + margin), min(width, x1 + margin)
    with _Runner(model, device, tta) as runner:
        probs = np.empty((runner.n_classes, by1 - by0, bx1 - bx0), np.float32)
        for r0, r1, band in _plane_bands(runner, source, z, (by0, bx0, by1, bx1), tile, overlap,
                                         batch_size):
            probs[:, r0:r1] = band
    probs = np.ascontiguousarray(probs[:, y0 - by0:y1 - by0, x0 - bx0:x1 - bx0])
    ids = model.class_ids
    classes, confidence = _decide(probs, np.asarray(ids, dtype=label_dtype(max(ids))))
    return PlanePrediction(probabilities=probs, classes=classes, confidence=confidence,
                           class_ids=ids, origin=(y0, x0))


def _plane_walk(model: TrainedModel, image, planes, tile: int, overlap: int, batch_size: int):
    """What a walk over whole planes needs, checked: the source (each plane read once), the batch
    size, the lookup from class index to class id, and the planes (default: all)."""
    _check_tiling(tile, overlap)
    batch_size = _check_batch(batch_size)
    source = _Source(image, model.context, cache_planes=True)
    lut = np.asarray(model.class_ids, dtype=label_dtype(max(model.class_ids)))
    planes = range(source.n_planes) if planes is None else [_check_z(source, z) for z in planes]
    return source, batch_size, lut, planes


def predict_planes(model: TrainedModel, image, planes=None, *, tile: int = 512, overlap: int = 64, device=None,
                   batch_size: int = 4, stop: Callable[[], bool] | None = None,
                   tta: bool = False) -> Iterator[tuple[int, PlanePrediction]]:
    """Yield ``(z, PlanePrediction)`` for the whole planes ``planes`` (default: all) of a plane or
    stack, one after another: the numbers of :func:`predict_plane`, with a lazy stack read as
    :func:`predict_volume` reads it (each plane once). ``stop()`` is checked before each plane and
    each row of tiles; a plane it interrupts is not yielded. ``tta``: test-time augmentation."""
    source, batch_size, lut, planes = _plane_walk(model, image, planes, tile, overlap, batch_size)
    height, width = source.plane_shape
    ids = model.class_ids
    with _Runner(model, device, tta) as runner:
        for z in planes:
            if stop is not None and stop():
                return
            source.begin_plane(z)
            probs = np.empty((runner.n_classes, height, width), np.float32)
            try:
                for r0, r1, band in _plane_bands(runner, source, z, (0, 0, height, width), tile, overlap,
                                                 batch_size, stop):
                    probs[:, r0:r1] = band
            except _Stopped:
                return
            classes, confidence = _decide(probs, lut)
            yield z, PlanePrediction(probabilities=probs, classes=classes, confidence=confidence, class_ids=ids)


@dataclass
class PlaneInstanceMaps:
    """The outputs of one plane that instance decoding needs (see :func:`predict_instance_maps`).

    ``classes`` (Y, X) class ids and ``confidence`` as in :class:`PlanePrediction`;
    ``localization`` (K, Y, X) float32 blob probabilities, channel ``k`` for
    ``instance_class_ids[k]``; ``embedding``: the instance embedding (float16) of the pixels of the
    instance classes and of a ring of ``ring`` pixels around them.
    """

    classes: np.ndarray
    confidence: np.ndarray
    localization: np.ndarray
    embedding: PixelEmbeddings
    class_ids: list[int]
    instance_class_ids: list[int]


def predict_instance_maps_of_planes(model: TrainedModel, image, planes=None, *, tile: int = 512,
                                    overlap: int = 64, device=None, batch_size: int = 4, ring: int = 8,
                                    stop: Callable[[], bool] | None = None, tta: bool = False
                                    ) -> Iterator[tuple[int, PlaneInstanceMaps]]:
    """Yield ``(z, PlaneInstanceMaps)`` for the planes ``planes`` (default: all) of a plane or stack,
    tiled and blended as :func:`predict_volume` does (same windows for every output). Memory: one
    row of tiles of (C + K + E) accumulators, the plane's K localization maps and the embeddings
    of the pixels kept (float16). ``stop()`` is checked before each plane and row of tiles.
    ``tta``: the semantic classes by test-time augmentation (the other maps from the plain pass)."""
    if not model.has_instance_heads:
        raise ValueError("the model has no instance heads; train it on a project with a class flagged "
                         "'instances' to predict localization and embedding maps")
    source, batch_size, lut, planes = _plane_walk(model, image, planes, tile, overlap, batch_size)
    height, width = source.plane_shape
    n_classes = model.net.config.n_classes
    n_inst = model.net.config.n_instance_classes
    ids = model.class_ids
    instance_index = np.zeros(n_classes, dtype=bool)
    instance_index[[i for i, c in enumerate(model.classes) if c.instances]] = True
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    from scipy import ndimage as ndi

    with _Runner(model, device, tta) as runner:
        for z in planes:
            if stop is not None and stop():
                return
            source.begin_plane(z)
            classes = np.empty((height, width), lut.dtype)
            confidence = np.empty((height, width), np.float32)
            localization = np.empty((n_inst, height, width), np.float32)
            kept_index, kept_values = [], []
            try:
                for r0, r1, band in _plane_bands(runner, source, z, (0, 0, height, width), tile, overlap,
                                                 batch_size, stop, instance=True):
                    probs = band[:n_classes]
                    index = np.argmax(probs, axis=0)
                    classes[r0:r1] = lut[index]
                    confidence[r0:r1] = np.take_along_axis(probs, index[None], axis=0)[0]
                    localization[:, r0:r1] = band[n_classes:n_classes + n_inst]
                    near = instance_index[index]
                    if ring > 0 and near.any():
                        near = ndi.binary_dilation(near, cross, iterations=int(ring))
                    flat = np.flatnonzero(near)
                    kept_index.append(flat + r0 * width)
                    kept_values.append(band[n_classes + n_inst:].reshape(band.shape[0] - n_classes - n_inst, -1)
                                       [:, flat].T.astype(np.float16))
            except _Stopped:
                return
            embedding = PixelEmbeddings((height, width), np.concatenate(kept_index),
                                        np.concatenate(kept_values), model.net.config.instance_coordinates)
            yield z, PlaneInstanceMaps(classes=classes, confidence=confidence, localization=localization,
                                       embedding=embedding, class_ids=ids,
                                       instance_class_ids=model.instance_class_ids)


def predict_instance_maps(model: TrainedModel, volume_or_plane, z: int | None = None, *, tile: int = 512,
                          overlap: int = 64, device=None, batch_size: int = 4, ring: int = 8,
                          tta: bool = False) -> PlaneInstanceMaps:
    """Semantic classes, localization maps and instance embeddings of one whole plane (a 2D image
    with ``z`` None, or plane ``z`` of a stack), for :func:`~napari_protoseg.prediction.decoders.wise_instances`.
    Needs a model with instance heads."""
    source = _Source(volume_or_plane, model.context)
    z = _check_z(source, z)
    for _, maps in predict_instance_maps_of_planes(model, volume_or_plane, [z], tile=tile, overlap=overlap,
                                                   device=device, batch_size=batch_size, ring=ring, tta=tta):
        return maps
    raise RuntimeError("no plane was predicted")  # pragma: no cover


class _Sink:
    """Where predict_volume's finished rows go: NumPy arrays, or a zarr group written in whole
    chunk rows (rows are buffered until a chunk row is complete, so chunks are written once)."""

    def __init__(self, shape: tuple[int, ...], n_classes: int, class_dtype: np.dtype,
                 keep_probabilities: bool, out, attrs: dict):
        self.is_stack = len(shape) == 3
        self.height, self.width = shape[-2:]
        self.group = None
        if out is None:
            self.classes = np.zeros(shape, class_dtype)
            self.confidence = np.zeros(shape, np.float32)
            self.probabilities = np.zeros((n_classes, *shape), np.float32) if keep_probabilities else None
            self.chunk_rows = 1
        else:
            import zarr

            if isinstance(out, zarr.Group):
                group = out
            else:
                group = zarr.open_group(os.fspath(out) if isinstance(out, os.PathLike) else out, mode="a")
            self.group = group
            cy, cx = min(self.height, 1024), min(self.width, 1024)
            plane_chunks = ((1,) if self.is_stack else ()) + (cy, cx)
            self.classes = group.create_array("classes", shape=shape, dtype=class_dtype,
                                              chunks=plane_chunks, fill_value=0, overwrite=True)
            self.confidence = group.create_array("confidence", shape=shape, dtype=np.float32,
                                                 chunks=plane_chunks, fill_value=0.0, overwrite=True)
            self.probabilities = None
            if keep_probabilities:
                self.probabilities = group.create_array(
                    "probabilities", shape=(n_classes, *shape), dtype=np.float32,
                    chunks=(1, *plane_chunks), fill_value=0.0, overwrite=True)
            elif "probabilities" in group:
                del group["probabilities"]  # a stale array from an earlier run
            self.chunk_rows = cy
            group.attrs.update({"napari_protoseg": {**attrs, "complete": False, "planes_done": 0}})
        self._pending: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._z = 0

    def begin_plane(self, z: int) -> None:
        self._z = z
        self._pending = []

    def add(self, r0: int, r1: int, classes: np.ndarray, confidence: np.ndarray,
            probs: np.ndarray | None) -> None:
        self._pending.append((r0, r1, classes, confidence, probs))
        start, end = self._pending[0][0], r1
        if end == self.height or (end - start) >= self.chunk_rows:
            cut = end if end == self.height else start + (end - start) // self.chunk_rows * self.chunk_rows
            self._flush(cut)

    def _flush(self, cut: int) -> None:
        if not self._pending:
            return
        start = self._pending[0][0]
        cls = np.concatenate([p[2] for p in self._pending], axis=0)
        conf = np.concatenate([p[3] for p in self._pending], axis=0)
        probs = (np.concatenate([p[4] for p in self._pending], axis=1)
                 if self.probabilities is not None else None)
        n = cut - start
        zi = (self._z,) if self.is_stack else ()
        rows = (*zi, slice(start, cut), slice(None))
        self.classes[rows] = cls[:n]
        self.confidence[rows] = conf[:n]
        if probs is not None:
            self.probabilities[(slice(None), *rows)] = probs[:, :n]
        end = self._pending[-1][1]
        self._pending = ([(cut, end, cls[n:], conf[n:], None if probs is None else probs[:, n:])]
                         if cut < end else [])

    def end_plane(self) -> None:
        """Write whatever rows are pending (also after a stop in the middle of a plane)."""
        if self._pending:
            self._flush(self._pending[-1][1])

    def finish(self, planes_done: int, complete: bool) -> None:
        if self.group is not None:
            info = dict(self.group.attrs["napari_protoseg"])
            info.update(complete=complete, planes_done=planes_done)
            self.group.attrs.update({"napari_protoseg": info})


def predict_volume(model: TrainedModel, image, out=None, progress: Callable[[int, int], Any] | None = None,
                   stop: Callable[[], bool] | None = None, *, tile: int = 512, overlap: int = 64,
                   device=None, batch_size: int = 4, keep_probabilities: bool = False,
                   tta: bool = False) -> VolumePrediction:
    """Predict a 2D plane or every plane of a (Z, Y, X) stack, plane by plane.

    ``image`` may be a NumPy array or a lazy array (dask, zarr); planes are read one at a time
    (with their 2.5D neighbours), never the whole volume. Results: ``classes`` (class ids, shape of
    the image), ``confidence`` (float32) and, with ``keep_probabilities``, ``probabilities``
    (C, *image.shape) float32. With ``out`` None they are NumPy arrays; ``out`` a path, a zarr store
    or a ``zarr.Group`` writes them as the arrays "classes", "confidence" (and "probabilities") of
    that zarr group (replacing arrays of those names), so a volume larger than memory is predicted
    block by block; the group's ``attrs["napari_protoseg"]`` records class table, completeness and
    planes done. ``progress(done, total)`` is called after each plane; ``stop()`` is checked before
    each plane and each row of tiles and ends the run early (``stopped=True``). ``tta``: test-time
    augmentation (8 passes per tile; see the module docstring).
    """
    _check_tiling(tile, overlap)
    batch_size = _check_batch(batch_size)
    source = _Source(image, model.context, cache_planes=True)
    n_planes = source.n_planes
    shape = tuple(int(s) for s in image.shape)
    height, width = source.plane_shape
    ids = model.class_ids
    dtype = label_dtype(max(ids))
    lut = np.asarray(ids, dtype=dtype)
    from napari_protoseg import __version__

    attrs = {"version": __version__, "classes": [c.to_json() for c in model.classes],
             "planes_total": n_planes}
    sink = _Sink(shape, len(ids), dtype, keep_probabilities, out, attrs)
    done, stopped = 0, False
    with _Runner(model, device, tta) as runner:
        for z in range(n_planes):
            if stop is not None and stop():
                stopped = True
                break
            source.begin_plane(z)
            sink.begin_plane(z)
            try:
                for r0, r1, probs in _plane_bands(runner, source, z, (0, 0, height, width), tile,
                                                  overlap, batch_size, stop):
                    classes, confidence = _decide(probs, lut)
                    sink.add(r0, r1, classes, confidence, probs if keep_probabilities else None)
            except _Stopped:
                sink.end_plane()
                stopped = True
                break
            sink.end_plane()
            done += 1
            if progress is not None:
                progress(done, n_planes)
    sink.finish(done, complete=not stopped and done == n_planes)
    return VolumePrediction(classes=sink.classes, confidence=sink.confidence,
                            probabilities=sink.probabilities, class_ids=ids, planes_done=done,
                            planes_total=n_planes, stopped=stopped, group=sink.group)
