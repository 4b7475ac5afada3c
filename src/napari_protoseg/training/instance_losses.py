"""Losses of the WISE-Net instance heads (Laradji et al., "Instance segmentation with point
supervision", 2019): the LCFCN localization loss and the pairwise similarity embedding loss.

Pure NumPy/PyTorch/scikit-image. Inputs are the batch's :class:`~napari_protoseg.training.losses.CropTargets`
(class indices ``0..C-1``) and ``instance_indices``, the class indices of the classes flagged
``instances: true``, in the order of the network's localization channels (channel ``k`` is class
``instance_indices[k]``).

**Objects and their points.** Every annotated point of an instance class is an object's point. A
connected component (4-connectivity) of an instance class in the crop's mask is an object too; when
it holds no annotated point of its class, its pixel farthest from the component's border (the crop
edge counts as border) becomes a *virtual point*. So masks train the localization head like points.

**LCFCN loss** on ``p = sigmoid(localization)``, per crop ``b`` and instance channel ``k``; every
target is computed on the CPU without gradient:

* image-level ``-log max p`` over the crop where the class is present (a point, virtual point or
  whole box of it in the crop) and over every present tag's region; ``-log(1 - max p)`` over every
  absent tag's region and over crops where the annotations rule the class out everywhere;
* point-level ``-log p`` at every (virtual) point, summed over a crop's points (as LCFCN sums over
  an image's points, so every object counts fully however many share the crop), mean over crops;
* split-level: ONE ``skimage.segmentation.watershed`` per step, of the elevation ``-p`` of every
  (crop, channel) with two or more points, with one integer marker per point (planes stacked, a
  footprint that does not connect them). *Global split*: ``-log(1 - p)`` on the boundaries between
  different points' basins; *local split*: the same boundaries inside each predicted blob
  (``p > 0.5``, 4-connected) that holds ``n >= 2`` points, weighted by ``n - 1`` (LCFCN);
* false-positive ``-log(1 - p)`` on every blob holding no point, only in crops where that class's
  points are exhaustive (or the whole crop is mask-labelled). Where only the points are exhaustive,
  blobs reaching within ``edge_margin`` pixels of the crop's edge are spared: an object cut by the
  crop may have its point outside (a mask-labelled crop has a virtual point in every cut component);
* negative (an addition to LCFCN): ``-log(1 - p)`` on the pixels the annotations rule the class
  out (:func:`~napari_protoseg.training.losses.negative_map`: other classes' mask pixels and points,
  absent tags, outside exhaustive boxes).

The watershed uses the elevation ``-p`` directly (LCFCN's code uses a black top-hat of ``p``).
The other terms are means: over pixels within a (crop, channel) or blob, then over those groups.

**Similarity loss.** ``S(Ei, Ej) = 2 / (1 + exp(|Ei - Ej|^2))`` on the embedding head's vectors;
``L_E = mean_same[-log S] + mean_different[-log(1 - S)]``. WISE-Net samples object pixels from
generic object proposals; here object regions come from our annotations and the semantic model
(``semantic_logits``, detached):

* a mask component (its annotated point, else its virtual point, is the anchor);
* a point's region: the pixels of its class's confident semantic region (argmax is the class and
  probability >= ``region_threshold``) connected to the point, plus the pixels within
  ``point_radius`` of the point, within the point's watershed basin (so touching objects with a
  point each are split between them);
* a whole box holding no point of its class: the largest connected part of its interior where the
  semantic model says the class (anchor: its pixel farthest from the part's border).

Background (per crop and class): pixels the annotations rule the class out and pixels where its
semantic probability is at most ``background_threshold``, outside every object region. Pairs:
sampled object pixels with their anchor (same); anchors of different objects, sampled object
pixels with the other objects' anchors, sampled background pixels with every anchor, and each sampled
object pixel with ``background_per_pixel`` random background samples of its crop (different).
``-log(1 - S) = -log tanh(d^2 / 2)`` is evaluated at ``d^2 + eps`` so its gradient stays finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from napari_protoseg.training.losses import CropTargets, _points_in_crop, _zero, negative_map, whole_boxes
from napari_protoseg.model.network import SampledEmbedding

__all__ = [
    "InstanceLossSettings",
    "InstanceLossWeights",
    "LCFCNTargets",
    "ObjectPoints",
    "embedding_loss",
    "instance_loss",
    "lcfcn_loss",
    "lcfcn_targets",
    "object_points",
    "similarity",
]

# Labelling/watershed of stacked (plane, Y, X) arrays: 4-connected within a plane, planes apart.
PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
PLANE_CROSS[1] = ndi.generate_binary_structure(2, 1)
LOCALIZATION_TERMS = ("loc_image", "loc_point", "loc_split_global", "loc_split_local",
                      "loc_false_positive", "loc_negative")


@dataclass
class InstanceLossWeights:
    """Weights of the localization terms (their weighted sum is ``"localization"``)."""

    image: float = 1.0
    point: float = 1.0
    split_global: float = 1.0
    split_local: float = 1.0
    false_positive: float = 1.0
    negative: float = 1.0


@dataclass
class InstanceLossSettings:
    """Sampling and thresholds of the similarity loss (see the module docstring)."""

    pixels_per_object: int = 32
    background_pixels: int = 64
    region_threshold: float = 0.5
    point_radius: float = 4.0
    background_per_pixel: int = 4
    background_threshold: float = 0.1
    blob_threshold: float = 0.5
    edge_margin: int = 32
    eps: float = 0.01


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``S = 2 / (1 + exp(|a - b|^2))`` along the last dimension (1 for equal vectors, -> 0 apart)."""
    d2 = (a - b).pow(2).sum(-1)
    return 1.0 - torch.tanh(d2 / 2)


# ----------------------------------------------------------------------------- objects, points


@dataclass
class ObjectPoints:
    """The objects' points of a batch: ``b, k, y, x`` (channel ``k``), ``annotated`` (False for the
    virtual points of mask components), ``component`` (the mask component holding the point, 0 =
    none); ``components`` (B, K, H, W) labels the instance classes' mask components (ids unique over
    the batch), ``points_in_component`` counts the annotated points in each (index = component id)."""

    b: np.ndarray
    k: np.ndarray
    y: np.ndarray
    x: np.ndarray
    annotated: np.ndarray
    component: np.ndarray
    components: np.ndarray
    points_in_component: np.ndarray

    def __len__(self) -> int:
        return len(self.b)

    def plane(self, K: int) -> np.ndarray:
        """Index ``b * K + k`` of each point's (crop, channel) plane."""
        return self.b * K + self.k


def _check_indices(instance_indices: Sequence[int], C: int) -> np.ndarray:
    idx = np.asarray(list(instance_indices), dtype=np.int64)
    if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= C)) or len(set(idx.tolist())) != len(idx):
        raise ValueError(f"instance_indices must be distinct class indices in 0..{C - 1}, got {list(instance_indices)}")
    return idx


def _deepest_pixels(labels: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """Flat index (into ``labels``, (P, H, W)) of the pixel of each label 1..n farthest from the
    label's border (outside the array counts as border); ties go to the first pixel."""
    P, H, W = labels.shape
    n = int(labels.max(initial=0))
    best = np.full(n + 1, -1, dtype=np.int64)
    if n == 0:
        return best
    distance = np.zeros(labels.shape, dtype=np.float32)
    for plane in np.flatnonzero(labels.reshape(P, -1).max(axis=1) > 0):
        padded = np.pad(labels[plane] > 0, 1)
        distance[plane] = ndi.distance_transform_edt(padded)[1:-1, 1:-1]
    flat = labels.reshape(-1)
    pixels = np.flatnonzero(flat)
    order = np.lexsort((-distance.reshape(-1)[pixels], flat[pixels]))
    sorted_labels = flat[pixels][order]
    first = np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]
    best[sorted_labels[first]] = pixels[order][first]
    return best


def object_points(t: CropTargets, instance_indices: Sequence[int]) -> ObjectPoints:
    """Annotated points of the instance classes in the crops plus one virtual point per mask
    component (4-connectivity) of an instance class that holds no annotated point of its class."""
    B, H, W = t.mask.shape
    C = t.n_classes
    idx = _check_indices(instance_indices, C)
    K = len(idx)
    lut = np.full(C, -1, dtype=np.int64)
    lut[idx] = np.arange(K)
    mask = t.mask.detach().cpu().numpy()
    binary = mask[:, None] == idx[None, :, None, None]  # (B, K, H, W)
    components, n_comp = ndi.label(binary.reshape(B * K, H, W), structure=PLANE_CROSS)
    components = components.reshape(B, K, H, W).astype(np.int64, copy=False)

    pts = _points_in_crop(t.points, H, W).cpu().numpy()
    pts = pts[lut[pts[:, 1]] >= 0] if len(pts) else pts.reshape(0, 4)
    b, k, y, x = pts[:, 0], lut[pts[:, 1]], pts[:, 2], pts[:, 3]
    comp_of_point = components[b, k, y, x]
    points_in_component = np.bincount(comp_of_point, minlength=n_comp + 1)
    points_in_component[0] = 0

    virtual = np.flatnonzero(points_in_component[1:] == 0) + 1
    deepest = _deepest_pixels(components.reshape(B * K, H, W))[virtual]
    vp, vy, vx = np.unravel_index(deepest, (B * K, H, W)) if len(virtual) else (np.zeros(0, np.int64),) * 3
    return ObjectPoints(
        b=np.concatenate([b, vp // K]).astype(np.int64), k=np.concatenate([k, vp % K]).astype(np.int64),
        y=np.concatenate([y, vy]).astype(np.int64), x=np.concatenate([x, vx]).astype(np.int64),
        annotated=np.r_[np.ones(len(b), bool), np.zeros(len(virtual), bool)],
        component=np.concatenate([comp_of_point, virtual]).astype(np.int64),
        components=components, points_in_component=points_in_component)


# ------------------------------------------------------------------------------------- LCFCN


@dataclass
class LCFCNTargets:
    """Targets of :func:`lcfcn_loss`, computed without gradient by :func:`lcfcn_targets`.

    Pixel sets are flat indices into the (B, K, H, W) localization map with a group id each:
    ``split_global`` (group = plane ``b * K + k``), ``split_local`` (group = blob, weighted by
    ``split_local_weight[group]``), ``false_positive`` (group = plane). ``basins`` (B, K, H, W)
    holds the watershed (marker = point index + 1; 0 in planes with fewer than two points),
    ``blobs`` the labelled blobs (ids unique over the batch). ``image`` rows are
    ``b, k, present, y0, x0, y1, x1``.
    """

    points: ObjectPoints
    basins: np.ndarray
    blobs: np.ndarray
    split_global: tuple[np.ndarray, np.ndarray]
    split_local: tuple[np.ndarray, np.ndarray]
    split_local_weight: np.ndarray
    false_positive: tuple[np.ndarray, np.ndarray]
    image: np.ndarray


def _thick_boundaries(labels: np.ndarray) -> np.ndarray:
    """(P, H, W) bool: pixels with a 4-neighbour in the same plane of another non-zero label."""
    out = np.zeros(labels.shape, dtype=bool)
    for axis in (1, 2):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        differ = (labels[tuple(a)] != labels[tuple(b)]) & (labels[tuple(a)] > 0) & (labels[tuple(b)] > 0)
        out[tuple(a)] |= differ
        out[tuple(b)] |= differ
    return out


@torch.no_grad()
def lcfcn_targets(localization: torch.Tensor, t: CropTargets, instance_indices: Sequence[int],
                  points: ObjectPoints | None = None, negatives: torch.Tensor | None = None,
                  blob_threshold: float = 0.5, edge_margin: int = 32) -> LCFCNTargets:
    """The LCFCN targets of a batch (see the module docstring); ``negatives`` (B, C, H, W) may be
    passed when already computed."""
    B, K, H, W = localization.shape
    idx = _check_indices(instance_indices, t.n_classes)
    if len(idx) != K:
        raise ValueError(f"the localization map has {K} channels but {len(idx)} instance classes were given")
    points = object_points(t, idx) if points is None else points
    prob = torch.sigmoid(localization.detach().float()).cpu().numpy().reshape(B * K, H, W)
    plane_of_point = points.plane(K)
    n_points = np.bincount(plane_of_point, minlength=B * K)

    # One watershed for every plane with two or more points, one integer marker per point.
    basins = np.zeros((B * K, H, W), dtype=np.int64)
    split_planes = np.flatnonzero(n_points >= 2)
    if len(split_planes):
        chosen = np.isin(plane_of_point, split_planes)
        markers = np.zeros((len(split_planes), H, W), dtype=np.int64)
        markers[np.searchsorted(split_planes, plane_of_point[chosen]), points.y[chosen], points.x[chosen]] = \
            np.flatnonzero(chosen) + 1
        basins[split_planes] = watershed(-prob[split_planes], markers, connectivity=PLANE_CROSS)
    boundary = _thick_boundaries(basins)
    global_pixels = np.flatnonzero(boundary)
    split_global = (global_pixels, global_pixels // (H * W))

    blobs, n_blobs = ndi.label(prob > blob_threshold, structure=PLANE_CROSS)
    points_in_blob = np.bincount(blobs[plane_of_point, points.y, points.x], minlength=n_blobs + 1)
    points_in_blob[0] = 0
    flat_blobs = blobs.reshape(-1)
    local_pixels = np.flatnonzero(boundary.reshape(-1) & (points_in_blob[flat_blobs] >= 2))
    split_local = (local_pixels, flat_blobs[local_pixels])
    split_local_weight = np.maximum(points_in_blob - 1, 0).astype(np.float32)

    c_of_k = torch.as_tensor(idx, device=t.mask.device)
    labelled = (t.mask >= 0).flatten(1).all(dim=1)[:, None].expand(B, K)
    by_points = t.points_exhaustive()[:, c_of_k] & ~labelled
    labelled, by_points = (v.cpu().numpy().reshape(B * K) for v in (labelled, by_points))
    blob_plane = np.zeros(n_blobs + 1, dtype=np.int64)
    blob_plane[flat_blobs] = np.arange(B * K).repeat(H * W)  # every pixel writes its plane
    margin = int(min(max(edge_margin, 1), (min(H, W) + 1) // 2))
    border = np.ones((H, W), dtype=bool)
    border[margin:H - margin, margin:W - margin] = False
    near_edge = np.zeros(n_blobs + 1, dtype=bool)
    near_edge[blobs[:, border].ravel()] = True
    false_blob = (points_in_blob == 0) & (labelled[blob_plane] | (by_points[blob_plane] & ~near_edge))
    false_blob[0] = False
    fp_pixels = np.flatnonzero(false_blob[flat_blobs])
    false_positive = (fp_pixels, fp_pixels // (H * W))

    # Image level: present where a point or whole box is, present/absent tags over their regions,
    # absent where the annotations rule the class out in the whole crop.
    present = n_points.reshape(B, K) > 0
    lut = np.full(t.n_classes, -1, dtype=np.int64)
    lut[idx] = np.arange(K)
    boxes = whole_boxes(t.boxes).cpu().numpy()
    boxes = boxes[lut[boxes[:, 1]] >= 0] if len(boxes) else boxes
    if len(boxes):
        present[boxes[:, 0], lut[boxes[:, 1]]] = True
    neg = negative_map(t, t.n_classes, H, W) if negatives is None else negatives
    absent = neg[:, c_of_k].flatten(2).all(dim=2).cpu().numpy() & ~present
    rows = [np.array([(bb, kk, 1, 0, 0, H, W) for bb, kk in zip(*np.nonzero(present))], dtype=np.int64),
            np.array([(bb, kk, 0, 0, 0, H, W) for bb, kk in zip(*np.nonzero(absent))], dtype=np.int64)]
    tags = t.tags[:, :7].cpu().numpy()
    if len(tags):
        tags = tags[lut[tags[:, 1]] >= 0]
        y0, x0 = np.clip(tags[:, 3], 0, H), np.clip(tags[:, 4], 0, W)
        y1, x1 = np.clip(tags[:, 5], 0, H), np.clip(tags[:, 6], 0, W)
        keep = (y1 > y0) & (x1 > x0)
        rows.append(np.stack([tags[:, 0], lut[tags[:, 1]], tags[:, 2], y0, x0, y1, x1], axis=1)[keep])
    image = np.concatenate([r.reshape(-1, 7) for r in rows])
    return LCFCNTargets(points=points, basins=basins.reshape(B, K, H, W), blobs=blobs.reshape(B, K, H, W),
                        split_global=split_global, split_local=split_local,
                        split_local_weight=split_local_weight, false_positive=false_positive, image=image)


def _group_mean(values: torch.Tensor, groups: np.ndarray, zero: torch.Tensor,
                group_weight: np.ndarray | None = None) -> torch.Tensor:
    """Mean over the groups present of (weight x the mean of ``values`` within the group)."""
    if values.numel() == 0:
        return zero
    unique, inverse = np.unique(groups, return_inverse=True)
    inv = torch.as_tensor(inverse, device=values.device)
    sums = values.new_zeros(len(unique)).index_add(0, inv, values)
    counts = values.new_zeros(len(unique)).index_add(0, inv, torch.ones_like(values))
    per_group = sums / counts
    if group_weight is not None:
        per_group = per_group * torch.as_tensor(group_weight[unique], device=values.device, dtype=values.dtype)
    return per_group.mean()


def _take(values: torch.Tensor, index) -> torch.Tensor:
    """``values[index]`` along the first dimension, as ``index_select``: its backward adds repeated
    indices in a fixed order, where plain indexing's backward uses unordered atomic float adds on a
    multi-threaded CPU (training with the instance heads was then not reproducible)."""
    return values.index_select(0, torch.as_tensor(index, device=values.device, dtype=torch.long))


def lcfcn_loss(localization: torch.Tensor, t: CropTargets, instance_indices: Sequence[int], *,
               targets: LCFCNTargets | None = None, negatives: torch.Tensor | None = None,
               weights: InstanceLossWeights | None = None) -> dict[str, torch.Tensor]:
    """The LCFCN loss of ``localization`` (B, K, H, W) logits; returns its terms (``LOCALIZATION_TERMS``)
    and their weighted sum ``"localization"``, all scalars (a graph-connected 0 for a term without
    pixels)."""
    w = InstanceLossWeights() if weights is None else weights
    B, K, H, W = localization.shape
    if negatives is None:
        negatives = negative_map(t, t.n_classes, H, W)
    if targets is None:
        targets = lcfcn_targets(localization, t, instance_indices, negatives=negatives)
    logits = localization.float()
    flat = logits.reshape(-1)
    device = logits.device
    zero = _zero(logits)

    def towards(pixels: np.ndarray, value: float) -> torch.Tensor:
        v = _take(flat, pixels)
        return F.binary_cross_entropy_with_logits(v, torch.full_like(v, value), reduction="none")

    terms = {}
    pts = targets.points
    if len(pts):
        at = _take(flat, ((pts.b * K + pts.k) * H + pts.y) * W + pts.x)
        terms["loc_point"] = F.binary_cross_entropy_with_logits(at, torch.ones_like(at), reduction="sum") / B
    else:
        terms["loc_point"] = zero
    pixels, groups = targets.split_global
    terms["loc_split_global"] = _group_mean(towards(pixels, 0.0), groups, zero)
    pixels, groups = targets.split_local
    terms["loc_split_local"] = _group_mean(towards(pixels, 0.0), groups, zero, targets.split_local_weight)
    pixels, groups = targets.false_positive
    terms["loc_false_positive"] = _group_mean(towards(pixels, 0.0), groups, zero)

    rows = torch.as_tensor(targets.image, device=device)
    if len(rows):
        ys = torch.arange(H, device=device)
        xs = torch.arange(W, device=device)
        inside = (((ys >= rows[:, 3, None]) & (ys < rows[:, 5, None]))[:, :, None]
                  & ((xs >= rows[:, 4, None]) & (xs < rows[:, 6, None]))[:, None, :])
        planes = _take(logits.reshape(B * K, H, W), rows[:, 0] * K + rows[:, 1])
        top = planes.masked_fill(~inside, float("-inf")).amax(dim=(1, 2))
        terms["loc_image"] = F.binary_cross_entropy_with_logits(top, rows[:, 2].to(top.dtype))
    else:
        terms["loc_image"] = zero

    idx = torch.as_tensor(_check_indices(instance_indices, t.n_classes), device=device)
    neg = negatives[:, idx]
    if bool(neg.any()):
        v = torch.masked_select(logits, neg)
        terms["loc_negative"] = F.binary_cross_entropy_with_logits(v, torch.zeros_like(v))
    else:
        terms["loc_negative"] = zero
    terms = {name: terms[name] for name in LOCALIZATION_TERMS}
    terms["localization"] = (w.image * terms["loc_image"] + w.point * terms["loc_point"]
                             + w.split_global * terms["loc_split_global"]
                             + w.split_local * terms["loc_split_local"]
                             + w.false_positive * terms["loc_false_positive"]
                             + w.negative * terms["loc_negative"])
    return terms


# ----------------------------------------------------------------------------- similarity


def _sample_per_group(groups: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of at most ``limit`` randomly chosen entries of each group id in ``groups``."""
    if len(groups) == 0 or limit <= 0:
        return np.zeros(0, dtype=np.int64)
    # Sort by group, then randomly within it: one argsort of group + U[0, 1) (the order of
    # lexsort((random, groups)), several times faster). The keys are distinct (almost surely), so
    # the default sort gives the order of a stable one (a rare tie still gives a fair sample),
    # five times faster.
    order = np.argsort(groups + rng.random(len(groups)))
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1]
    rank = np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))
    return order[rank < limit]


@torch.no_grad()
def _object_regions(t: CropTargets, idx: np.ndarray, lcfcn: LCFCNTargets, semantic_prob: torch.Tensor,
                    settings: InstanceLossSettings) -> tuple[np.ndarray, np.ndarray]:
    """(B, K, H, W) object ids (0 = none) and the anchors' flat (B, K, H, W) pixel index per object."""
    B, K, H, W = lcfcn.basins.shape
    pts = lcfcn.points
    sem = semantic_prob[:, torch.as_tensor(idx, device=semantic_prob.device)]
    top = semantic_prob.max(dim=1).indices  # as argmax (first maximum), several times faster on the CPU
    region = ((top[:, None] == torch.as_tensor(idx, device=top.device)[None, :, None, None])
              & (sem >= settings.region_threshold)).cpu().numpy()
    objects = np.zeros((B, K, H, W), dtype=np.int64)
    anchors: list[np.ndarray] = []
    next_id = 1

    # Whole boxes without a point of their class: the largest semantic part of the interior.
    lut = np.full(t.n_classes, -1, dtype=np.int64)
    lut[idx] = np.arange(K)
    boxes = whole_boxes(t.boxes).cpu().numpy()
    for row in (boxes[lut[boxes[:, 1]] >= 0] if len(boxes) else []):
        b, k, y0, x0, y1, x1 = int(row[0]), int(lut[row[1]]), *(int(v) for v in row[2:6])
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
        if y1 <= y0 or x1 <= x0:
            continue
        mine = (pts.b == b) & (pts.k == k)
        if np.any(mine & (pts.y >= y0) & (pts.y < y1) & (pts.x >= x0) & (pts.x < x1)):
            continue
        parts, n = ndi.label(region[b, k, y0:y1, x0:x1], structure=PLANE_CROSS[1])
        if n == 0:
            continue
        largest = np.argmax(np.bincount(parts.ravel())[1:]) + 1
        part = parts == largest
        deepest = int(_deepest_pixels(part[None].astype(np.int64))[1])
        dy, dx = divmod(deepest, x1 - x0)
        objects[b, k, y0:y1, x0:x1][part] = next_id
        anchors.append(np.atleast_1d(np.ravel_multi_index((b, k, y0 + dy, x0 + dx), (B, K, H, W))))
        next_id += 1

    # Points outside mask components: their semantic component within their watershed basin.
    free = np.flatnonzero(pts.component == 0)
    if len(free):
        sem_comp, _ = ndi.label(region.reshape(B * K, H, W), structure=PLANE_CROSS)
        sem_comp = sem_comp.reshape(B, K, H, W).astype(np.int64)
        n_keys = len(pts) + 1
        key = sem_comp * n_keys + lcfcn.basins
        point_keys = key[pts.b[free], pts.k[free], pts.y[free], pts.x[free]]
        valid = sem_comp[pts.b[free], pts.k[free], pts.y[free], pts.x[free]] > 0
        ids = np.arange(next_id, next_id + len(free))
        order = np.argsort(point_keys[valid])
        sorted_keys, sorted_ids = point_keys[valid][order], ids[valid][order]
        flat_key = key.reshape(-1)
        pos = np.searchsorted(sorted_keys, flat_key).clip(0, max(len(sorted_keys) - 1, 0))
        hit = (sem_comp.reshape(-1) > 0) & (len(sorted_keys) > 0)
        if len(sorted_keys):
            hit &= sorted_keys[pos] == flat_key
            objects.reshape(-1)[hit] = sorted_ids[pos[hit]]
        point_flat = np.ravel_multi_index((pts.b[free], pts.k[free], pts.y[free], pts.x[free]), (B, K, H, W))
        # Pixels within point_radius of a point (in its basin) belong to it even where the
        # semantic model does not (yet) see the class.
        if settings.point_radius > 0:
            markers = np.zeros((B * K, H, W), dtype=np.int64)
            markers.reshape(-1)[point_flat] = ids
            for plane in np.unique(pts.b[free] * K + pts.k[free]):
                distance, (iy, ix) = ndi.distance_transform_edt(markers[plane] == 0, return_indices=True)
                nearest = markers[plane][iy, ix]
                point_index = nearest - next_id  # index into ``free``
                basin = lcfcn.basins.reshape(B * K, H, W)[plane]
                own_basin = basin == basin.reshape(-1)[point_flat[point_index] % (H * W)].reshape(H, W)
                near = (distance <= settings.point_radius) & own_basin
                target = objects.reshape(B * K, H, W)[plane]
                target[near & (target == 0)] = nearest[near & (target == 0)]
        objects.reshape(-1)[point_flat] = ids
        anchors.append(point_flat)
        next_id += len(free)

    # Mask components (last: they win where regions overlap), anchored at their (virtual) point.
    in_comp = np.flatnonzero(pts.component > 0)
    usable = in_comp[lcfcn.points.points_in_component[pts.component[in_comp]] <= 1]
    if len(usable):
        comp_to_id = np.zeros(int(pts.components.max()) + 1, dtype=np.int64)
        comp_to_id[pts.component[usable]] = np.arange(next_id, next_id + len(usable))
        comp_pixels = pts.components > 0
        objects[comp_pixels] = np.where(comp_to_id[pts.components[comp_pixels]] > 0,
                                        comp_to_id[pts.components[comp_pixels]], objects[comp_pixels])
        anchors.append(np.ravel_multi_index((pts.b[usable], pts.k[usable], pts.y[usable], pts.x[usable]),
                                            (B, K, H, W)))
    anchor_flat = np.concatenate(anchors) if anchors else np.zeros(0, dtype=np.int64)
    # Ids of objects whose region was overwritten entirely still own their anchor pixel.
    objects.reshape(-1)[anchor_flat] = np.arange(1, len(anchor_flat) + 1)
    return objects, anchor_flat


def _embedding_rows(instance_embedding: torch.Tensor | SampledEmbedding, flat_pixels: np.ndarray) -> torch.Tensor:
    """(N, E) embeddings at ``flat_pixels`` (indices into the (B, H, W) pixels) of a full map or a
    :class:`~napari_protoseg.model.network.SampledEmbedding`."""
    if isinstance(instance_embedding, SampledEmbedding):
        device = instance_embedding.hidden.device
        return instance_embedding.rows(torch.as_tensor(flat_pixels, device=device, dtype=torch.long))
    pixel_rows = instance_embedding.permute(0, 2, 3, 1).reshape(-1, instance_embedding.shape[1])
    return _take(pixel_rows, flat_pixels)


def embedding_loss(instance_embedding: torch.Tensor | SampledEmbedding, semantic_logits: torch.Tensor, t: CropTargets,
                   instance_indices: Sequence[int], *, lcfcn: LCFCNTargets, rng: np.random.Generator | None = None,
                   negatives: torch.Tensor | None = None,
                   settings: InstanceLossSettings | None = None) -> torch.Tensor:
    """The pairwise similarity loss of ``instance_embedding`` (B, E, H, W), a full map or a
    :class:`~napari_protoseg.model.network.SampledEmbedding` (see the module docstring).

    ``lcfcn`` gives the objects' points and the watershed basins (from :func:`lcfcn_targets`);
    ``semantic_logits`` (B, C, H, W) are used detached. Returns a scalar (a graph-connected 0
    without any pair).
    """
    s = InstanceLossSettings() if settings is None else settings
    rng = np.random.default_rng(0) if rng is None else rng
    B, E, H, W = instance_embedding.shape
    idx = _check_indices(instance_indices, t.n_classes)
    K = len(idx)
    zero = _zero(_embedding_rows(instance_embedding, np.zeros(1, dtype=np.int64)))
    if K == 0:
        return zero
    with torch.no_grad():
        semantic_prob = torch.softmax(semantic_logits.detach().float(), dim=1)
        objects, anchor_flat = _object_regions(t, idx, lcfcn, semantic_prob, s)
        if len(anchor_flat) == 0:
            return zero
        neg = negative_map(t, t.n_classes, H, W) if negatives is None else negatives
        c_of_k = torch.as_tensor(idx, device=neg.device)
        background = (neg[:, c_of_k] | (semantic_prob[:, c_of_k] <= s.background_threshold)).cpu().numpy()
        background &= objects == 0

    # Samples: object pixels (grouped by object) and background pixels (grouped by plane).
    obj_flat = np.flatnonzero(objects)
    obj_ids = objects.reshape(-1)[obj_flat]
    is_anchor = np.zeros(objects.size, dtype=bool)
    is_anchor[anchor_flat] = True
    candidates = ~is_anchor[obj_flat]
    picked = obj_flat[candidates][_sample_per_group(obj_ids[candidates], s.pixels_per_object, rng)]
    picked_obj = objects.reshape(-1)[picked] - 1  # object index 0..M-1
    bg_flat = np.flatnonzero(background)
    bg = bg_flat[_sample_per_group(bg_flat // (H * W), s.background_pixels, rng)]

    plane_size = H * W
    anchor_plane = anchor_flat // plane_size
    M = len(anchor_flat)
    same_plane = anchor_plane[:, None] == anchor_plane[None, :]
    ai, aj = np.nonzero(np.triu(same_plane, k=1))
    pi, pj = np.nonzero((picked[:, None] // plane_size == anchor_plane[None, :])
                        & (picked_obj[:, None] != np.arange(M)[None, :]))
    qi, qj = np.nonzero(bg[:, None] // plane_size == anchor_plane[None, :])
    # Each sampled object pixel also meets a few background samples of its plane.
    bg_plane = bg // plane_size
    order = np.argsort(bg_plane, kind="stable")
    first = np.searchsorted(bg_plane[order], picked // plane_size)
    count = np.searchsorted(bg_plane[order], picked // plane_size, side="right") - first
    has_bg = np.flatnonzero(count > 0)
    ri = np.repeat(has_bg, s.background_per_pixel)
    rj = order[first[ri] + (rng.random(len(ri)) * count[ri]).astype(np.int64)]

    # One gather of every pixel involved: anchors, object samples, background samples.
    table = np.concatenate([anchor_flat, picked, bg])
    b, rem = table // (K * plane_size), table % plane_size
    vectors = _embedding_rows(instance_embedding, b * plane_size + rem).float()  # (N, E)
    n_picked = len(picked)
    same = (np.arange(M, M + n_picked), picked_obj)
    different = (np.concatenate([ai, M + pi, M + n_picked + qi, M + ri]),
                 np.concatenate([aj, pj, qj, M + n_picked + rj]))

    def squared_distance(pairs) -> torch.Tensor:
        i, j = pairs
        return (_take(vectors, i) - _take(vectors, j)).pow(2).sum(-1)

    loss = zero
    if n_picked:
        # -log S = log(1 + exp(d^2)) - log 2
        loss = loss + (F.softplus(squared_distance(same)) - math.log(2.0)).mean()
    if len(different[0]):
        loss = loss - torch.log(torch.tanh((squared_distance(different) + s.eps) / 2)).mean()
    return loss


def instance_loss(localization: torch.Tensor, instance_embedding: torch.Tensor, semantic_logits: torch.Tensor,
                  t: CropTargets, instance_indices: Sequence[int], *, rng: np.random.Generator | None = None,
                  negatives: torch.Tensor | None = None, weights: InstanceLossWeights | None = None,
                  settings: InstanceLossSettings | None = None) -> dict[str, torch.Tensor]:
    """The LCFCN terms, ``"localization"`` (their weighted sum) and ``"embedding"`` for one batch;
    the watershed and the objects' points are computed once and shared by both losses."""
    s = InstanceLossSettings() if settings is None else settings
    B, K, H, W = localization.shape
    if negatives is None:
        negatives = negative_map(t, t.n_classes, H, W)
    targets = lcfcn_targets(localization, t, instance_indices, negatives=negatives, blob_threshold=s.blob_threshold,
                            edge_margin=s.edge_margin)
    out = lcfcn_loss(localization, t, instance_indices, targets=targets, negatives=negatives, weights=weights)
    out["embedding"] = embedding_loss(instance_embedding, semantic_logits, t, instance_indices, lcfcn=targets,
                                      rng=rng, negatives=negatives, settings=s)
    return out
