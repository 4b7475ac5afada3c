"""Targets and losses of Decoupled Semantic Prototypes (DSP, Reiss et al., CVPR 2023), pure PyTorch.

The annotations of a batch of ``B`` crops (``H x W`` each, coordinates ``(y, x)``, class indices
``0..C-1``) travel as one :class:`CropTargets`. Every annotation type yields *positives* (pooled
probabilities that should be high) and *negatives* (pixels where a class is known to be absent).
For each crop ``b`` and class ``c`` the DSP contrastive loss is::

    L(b, c) = log(sum_{i in N_c(b)} p_c(i) + eps) - mean_{pos of (b, c)} log(pos)

with ``p = softmax(logits)`` over classes. Positives by annotation type:

* mask (dense, partial or scribbles): one positive per connected component of class ``c`` in the
  crop's mask, **8-connectivity**, equal to the mean of ``p_c`` over the component;
* box of class ``c``: multiple-instance pooling inside the box,
  ``(sum_x max_y p_c + sum_y max_x p_c) / (w + h)``;
* point of class ``c``: ``p_c`` at the point;
* present tag for ``c``: ``p_c`` pooled over the tag's region by ``tag_pooling``: ``"mean"``,
  ``"max"`` or ``"smoothmax"`` = the generalized (power) mean ``(mean_i p_c(i)^r)^(1/r)`` with
  ``r = tag_power`` (default 4), which lies between the mean and the max.

Normalisers: for each type, ``-log(pos)`` is averaged over the type's positives inside each
``(b, c)`` and then over the ``(b, c)`` pairs that have that type; the negative term is averaged
over the ``(b, c)`` pairs that have at least one negative pixel, where a pair without any positive
(a class absent from the crop) counts ``negative_only_weight`` (``TrainConfig`` default 0.1: such a
pair's push never lets up however low ``p_c`` already is, and at full weight it drove rare classes
such as synapses out of the benchmark's predictions). The contrastive loss is the sum
of the negative term and the four positive terms (a type absent from the batch contributes 0).
Negatives are the *union* over all annotation types (see :func:`negative_map`).

Everything is computed in log space (``log_softmax``, log-sum-exp), so no probability underflow
turns into ``-inf``; everything is vectorised over classes, crops and annotations (boxes and tags
are processed in memory-bounded chunks). Connected components are found on the CPU without
gradient (``skimage.measure.label``), the rest runs on the logits' device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TAG_POOLINGS",
    "CropTargets",
    "LossWeights",
    "dsp_loss",
    "mask_components",
    "negative_map",
    "pseudo_label_loss",
    "pseudo_label_targets",
    "strong_augment",
    "supervised_ce",
    "supervised_targets",
    "total_loss",
]

TAG_POOLINGS = ("mean", "max", "smoothmax")
LOSS_TERMS = ("mask", "box", "point", "tag", "negative")

# Elements of the (n, h, w) gathers of box/tag regions per chunk (float32: 16 MiB).
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class CropTargets:
    """Annotations of a batch of ``B`` crops of ``H x W`` pixels; class indices ``0..C-1``.

    * ``mask`` (B, H, W) long: -1 = not annotated, else the class index (dense masks, partial masks
      and scribbles alike).
    * ``boxes`` (Nb, 6 or 7) long: ``b, c, y0, x0, y1, x1[, whole]``, half-open, tight around one
      object, clipped to the crop. ``whole`` (default 1) is 0 for a box cut by the crop's border:
      it is no longer tight, so it gives no positive, but its pixels are still no negatives.
    * ``box_exhaustive`` (B, C) bool: in crop ``b`` every object of class ``c`` has its box, so the
      pixels outside all class-``c`` boxes of the crop are negatives for ``c`` (with no box at all:
      the whole crop).
    * ``points`` (Np, >=4) long: ``b, c, y, x`` (further columns are ignored).
    * ``tags`` (Nt, >=7) long: ``b, c, present, y0, x0, y1, x1``; the region lies inside the crop,
      the whole crop is ``0, 0, H, W`` (further columns are ignored).
    * ``point_exhaustive`` (B, C) bool or None (= all False): in crop ``b``'s plane every object of
      class ``c`` has its point (the instance losses push unpointed blobs down only there).

    Coordinates outside the crop are clipped (boxes, tags) or dropped (points); empty rectangles
    are dropped.
    """

    mask: torch.Tensor
    boxes: torch.Tensor
    box_exhaustive: torch.Tensor
    points: torch.Tensor
    tags: torch.Tensor
    point_exhaustive: torch.Tensor | None = None

    @classmethod
    def empty(cls, batch: int, n_classes: int, height: int, width: int,
              device: torch.device | str | None = None) -> CropTargets:
        """Targets without any annotation (all pixels unlabelled, nothing exhaustive)."""
        return cls(
            mask=torch.full((batch, height, width), -1, dtype=torch.long, device=device),
            boxes=torch.zeros((0, 6), dtype=torch.long, device=device),
            box_exhaustive=torch.zeros((batch, n_classes), dtype=torch.bool, device=device),
            points=torch.zeros((0, 4), dtype=torch.long, device=device),
            tags=torch.zeros((0, 7), dtype=torch.long, device=device),
            point_exhaustive=torch.zeros((batch, n_classes), dtype=torch.bool, device=device),
        )

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.box_exhaustive.shape[1])

    @property
    def crop_shape(self) -> tuple[int, int]:
        return int(self.mask.shape[1]), int(self.mask.shape[2])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropTargets:
        """A copy on ``device`` (tensors already there are shared, not copied)."""
        moved = CropTargets(*(getattr(self, name).to(device, non_blocking=non_blocking)
                              for name in ("mask", "boxes", "box_exhaustive", "points", "tags")))
        if self.point_exhaustive is not None:
            moved.point_exhaustive = self.point_exhaustive.to(device, non_blocking=non_blocking)
        return moved

    def points_exhaustive(self) -> torch.Tensor:
        """(B, C) bool: ``point_exhaustive``, all False when not given."""
        if self.point_exhaustive is None:
            return torch.zeros_like(self.box_exhaustive)
        return self.point_exhaustive

    def validate(self, n_classes: int | None = None) -> None:
        """Raise ``ValueError`` for wrong shapes, dtypes, batch or class indices (not in the hot path)."""
        if self.mask.ndim != 3:
            raise ValueError(f"mask must be (B, H, W), got {tuple(self.mask.shape)}")
        B = self.batch_size
        C = self.n_classes if n_classes is None else n_classes
        if tuple(self.box_exhaustive.shape) != (B, C) or self.box_exhaustive.dtype != torch.bool:
            raise ValueError(f"box_exhaustive must be a bool tensor of shape ({B}, {C}), "
                             f"got {self.box_exhaustive.dtype} {tuple(self.box_exhaustive.shape)}")
        for name, cols in (("boxes", 6), ("points", 4), ("tags", 7)):
            table = getattr(self, name)
            if table.ndim != 2 or table.shape[1] < cols:
                raise ValueError(f"{name} must be (N, >={cols}), got {tuple(table.shape)}")
            if table.dtype != torch.long:
                raise ValueError(f"{name} must be a long tensor, got {table.dtype}")
            if len(table):
                if int(table[:, 0].min()) < 0 or int(table[:, 0].max()) >= B:
                    raise ValueError(f"{name}: crop index out of range 0..{B - 1}")
                if int(table[:, 1].min()) < 0 or int(table[:, 1].max()) >= C:
                    raise ValueError(f"{name}: class index out of range 0..{C - 1}")
        if self.point_exhaustive is not None and (tuple(self.point_exhaustive.shape) != (B, C)
                                                  or self.point_exhaustive.dtype != torch.bool):
            raise ValueError(f"point_exhaustive must be a bool tensor of shape ({B}, {C}), got "
                             f"{self.point_exhaustive.dtype} {tuple(self.point_exhaustive.shape)}")
        if self.mask.dtype != torch.long:
            raise ValueError(f"mask must be a long tensor, got {self.mask.dtype}")
        if self.mask.numel() and (int(self.mask.min()) < -1 or int(self.mask.max()) >= C):
            raise ValueError(f"mask values must lie in -1..{C - 1}")
        if len(self.tags) and not bool(((self.tags[:, 2] == 0) | (self.tags[:, 2] == 1)).all()):
            raise ValueError("tags: the present column must be 0 or 1")

    @staticmethod
    def collate(items: Sequence[CropTargets]) -> CropTargets:
        """Concatenate the targets of several batches (crop indices are shifted accordingly)."""
        if not items:
            raise ValueError("nothing to collate")
        offsets = np.cumsum([0] + [it.batch_size for it in items[:-1]])

        def shifted(table: torch.Tensor, off: int) -> torch.Tensor:
            table = table.clone()
            table[:, 0] += int(off)
            return table

        def joined(name: str) -> torch.Tensor:
            tables = [shifted(getattr(it, name), off) for it, off in zip(items, offsets)]
            width = max(table.shape[1] for table in tables)
            return torch.cat([F.pad(table, (0, width - table.shape[1])) for table in tables])

        return CropTargets(
            mask=torch.cat([it.mask for it in items]),
            boxes=joined("boxes"),
            box_exhaustive=torch.cat([it.box_exhaustive for it in items]),
            points=joined("points"),
            tags=joined("tags"),
            point_exhaustive=(None if all(it.point_exhaustive is None for it in items)
                              else torch.cat([it.points_exhaustive() for it in items])),
        )


@dataclass
class LossWeights:
    """Weights of :func:`total_loss`: ``contrastive + ce * CE + pseudo_label * PL``."""

    contrastive: float = 1.0
    ce: float = 1.0
    pseudo_label: float = 0.5


# --------------------------------------------------------------------------------------------
# Helpers


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that is part of ``like``'s graph (so ``backward()`` works on it)."""
    return like.sum() * 0.0 + 0.0  # "+ 0.0" turns a -0.0 into 0.0


def _clip_rects(table: torch.Tensor, first: int, H: int, W: int) -> tuple[torch.Tensor, ...]:
    """Clip the rectangles ``table[:, first:first + 4]`` (y0, x0, y1, x1) to the crop, drop empty ones.

    Returns ``(rows_kept, y0, x0, y1, x1)``.
    """
    y0 = table[:, first].clamp(0, H)
    x0 = table[:, first + 1].clamp(0, W)
    y1 = table[:, first + 2].clamp(0, H)
    x1 = table[:, first + 3].clamp(0, W)
    keep = (y1 > y0) & (x1 > x0)
    return table[keep], y0[keep], x0[keep], y1[keep], x1[keep]


def _rect_union(B: int, C: int, H: int, W: int, b: torch.Tensor, c: torch.Tensor, y0: torch.Tensor,
                x0: torch.Tensor, y1: torch.Tensor, x1: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, C, H, W) bool: the union of the (non-empty, clipped) rectangles of each (b, c).

    A 2D difference array plus two cumulative sums: O(N + BCHW) time and memory whatever N is.
    """
    diff = torch.zeros(B * C * (H + 1) * (W + 1), dtype=torch.int32, device=device)
    if len(b):
        base = (b * C + c) * ((H + 1) * (W + 1))
        idx = torch.cat([base + y0 * (W + 1) + x0, base + y0 * (W + 1) + x1,
                         base + y1 * (W + 1) + x0, base + y1 * (W + 1) + x1])
        ones = torch.ones_like(b, dtype=torch.int32)
        diff.index_add_(0, idx, torch.cat([ones, -ones, -ones, ones]))
    counts = diff.view(B * C, H + 1, W + 1).cumsum(1, dtype=torch.int32).cumsum(2, dtype=torch.int32)
    return (counts[:, :H, :W] > 0).reshape(B, C, H, W)


def _points_in_crop(points: torch.Tensor, H: int, W: int) -> torch.Tensor:
    p = points[:, :4]
    keep = (p[:, 2] >= 0) & (p[:, 2] < H) & (p[:, 3] >= 0) & (p[:, 3] < W)
    return p[keep]


def negative_map(t: CropTargets, C: int, H: int, W: int) -> torch.Tensor:
    """(B, C, H, W) bool: pixels where class ``c`` is known to be absent.

    The union over all annotation types (unlike the published reference code, where the last
    type's negatives overwrite the earlier ones):

    * mask: every annotated pixel is negative for every class other than its own;
    * boxes: for (b, c) with ``box_exhaustive[b, c]``, every pixel outside all class-``c`` boxes of
      crop ``b`` (the whole crop if it has none);
    * points: the point's pixel is negative for every class other than the point's;
    * absent tags: every pixel of the tag's region is negative for the tag's class.
    """
    mask = t.mask
    B = mask.shape[0]
    device = mask.device
    classes = torch.arange(C, device=device)
    labelled = mask[:, None] >= 0
    neg = labelled & (mask[:, None] != classes[None, :, None, None])

    if bool(t.box_exhaustive.any()):
        boxes, y0, x0, y1, x1 = _clip_rects(t.boxes, 2, H, W)
        inside = _rect_union(B, C, H, W, boxes[:, 0], boxes[:, 1], y0, x0, y1, x1, device)
        neg |= t.box_exhaustive[:, :, None, None].to(device) & ~inside

    points = _points_in_crop(t.points, H, W)
    if len(points):
        # (point, class) pairs for every class other than the point's own; writing True from
        # duplicate indices is deterministic.
        other = classes[None, :] != points[:, 1:2]  # (Np, C)
        pi, ci = other.nonzero(as_tuple=True)
        neg[points[pi, 0], ci, points[pi, 2], points[pi, 3]] = True

    absent = t.tags[t.tags[:, 2] == 0]
    if len(absent):
        absent, y0, x0, y1, x1 = _clip_rects(absent, 3, H, W)
        neg |= _rect_union(B, C, H, W, absent[:, 0], absent[:, 1], y0, x0, y1, x1, device)
    return neg


def _label_crops(values: np.ndarray, connectivity: int) -> np.ndarray:
    """Regions of equal value (-1 = background) in every crop of ``values`` (B, H, W), labelled in one
    ``skimage.measure.label`` call: int64 (B, H, W), 0 for background, 1..N numbered across the crops."""
    from skimage.measure import label

    B, H, W = values.shape
    stacked = np.full((B, H + 1, W), -1, dtype=np.int64)  # a row of -1 keeps the crops apart
    stacked[:, :H] = values
    labels = label(stacked.reshape(B * (H + 1), W), background=-1, connectivity=connectivity)
    return labels.reshape(B, H + 1, W)[:, :H].astype(np.int64, copy=False)


def unpointed_region_negatives(logits: torch.Tensor, t: CropTargets) -> torch.Tensor:
    """(B, C, H, W) bool: the semantic counterpart of LCFCN's false-positive term.

    Where class ``c``'s points are exhaustive in crop ``b``'s plane (``point_exhaustive``), every
    4-connected region of pixels the model currently assigns to ``c`` (argmax of ``logits``) that
    holds no point and no mask pixel of ``c`` is not ``c``: its pixels are negatives for ``c``.
    Regions touching the crop's edge are left alone (the object's point may lie outside the crop).
    Computed without gradient, on the CPU.
    """
    B, C, H, W = logits.shape
    neg = torch.zeros((B, C, H, W), dtype=torch.bool, device=logits.device)
    exhaustive = t.points_exhaustive().cpu().numpy()
    if not exhaustive.any() or H < 3 or W < 3:
        return neg
    pred = logits.detach().max(dim=1).indices.cpu().numpy()  # argmax; faster on the CPU
    pred = np.where(exhaustive[np.arange(B)[:, None, None], pred], pred, -1)
    labels = _label_crops(pred, connectivity=1)
    keep = np.zeros(int(labels.max()) + 1, dtype=bool)  # regions that may be c
    keep[0] = True
    keep[np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(),
                         labels[:, :, -1].ravel()])] = True
    points = _points_in_crop(t.points, H, W).cpu().numpy()
    if len(points):
        b, c, y, x = points.T
        own = pred[b, y, x] == c
        keep[labels[b[own], y[own], x[own]]] = True
    mask = t.mask.cpu().numpy()
    own_mask = (mask >= 0) & (mask == pred)
    keep[labels[own_mask]] = True
    b, y, x = np.nonzero(~keep[labels])
    if len(b):
        index = [torch.as_tensor(v, device=logits.device) for v in (b, pred[b, y, x], y, x)]
        neg[index[0], index[1], index[2], index[3]] = True
    return neg


def mask_components(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components (8-connectivity) of every class in every crop of ``mask`` (B, H, W).

    Returns ``(labels, comp_class, comp_batch)``: ``labels`` (B, H, W) int64 with 0 for unlabelled
    pixels and 1..M for the components, ``comp_class[k - 1]`` and ``comp_batch[k - 1]`` the class
    and crop of component ``k``. Computed on the CPU, without gradient, in one ``label`` call (crops
    stacked with a separating row of unlabelled pixels; neighbouring pixels of equal value connect).
    """
    m = mask.detach().cpu().numpy()
    B, H, W = m.shape
    if B == 0 or H == 0 or W == 0 or not (m >= 0).any():
        return np.zeros((B, H, W), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    labels = _label_crops(m, connectivity=2)
    n = int(labels.max())
    comp_class = np.zeros(n, np.int64)
    comp_batch = np.zeros(n, np.int64)
    sel = labels > 0
    ids = labels[sel] - 1
    comp_class[ids] = m[sel]
    comp_batch[ids] = np.nonzero(sel)[0]
    return labels, comp_class, comp_batch


def _pair_term(values: torch.Tensor, pairs: torch.Tensor, n_pairs: int, zero: torch.Tensor) -> torch.Tensor:
    """Mean over (b, c) pairs that have values of the per-pair mean of ``values``."""
    if values.numel() == 0:
        return zero
    sums = values.new_zeros(n_pairs).index_add(0, pairs, values)
    counts = values.new_zeros(n_pairs).index_add(0, pairs, torch.ones_like(values))
    has = counts > 0
    per_pair = sums / counts.clamp_min(1)
    return (per_pair * has).sum() / has.sum().clamp_min(1)


def _sort_by_area(table: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, y1: torch.Tensor,
                  x1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    order = torch.argsort((y1 - y0) * (x1 - x0), stable=True)
    return table[order], y0[order], x0[order], y1[order], x1[order]


def _rect_chunks(logp: torch.Tensor, b: torch.Tensor, c: torch.Tensor, y0: torch.Tensor,
                 x0: torch.Tensor, y1: torch.Tensor, x1: torch.Tensor,
                 chunk_elements: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(slice, values)``: ``values`` (n, hmax, wmax) = ``logp[b, c]`` inside each of the
    chunk's rectangles (anchored at its top-left corner), ``-inf`` in the padding.

    Chunks are formed greedily in the given order (sorted by area, the padding stays small) so
    that ``n * hmax * wmax <= chunk_elements`` (a larger rectangle gets a chunk of its own): the
    temporaries are bounded and what autograd keeps is about the rectangles' total area.
    """
    H, W = logp.shape[-2:]
    h = y1 - y0
    w = x1 - x0
    bounds = [0]
    hm = wm = 0
    for i, (hi, wi) in enumerate(zip(h.tolist(), w.tolist())):
        nh, nw = max(hm, hi), max(wm, wi)
        if i > bounds[-1] and (i - bounds[-1] + 1) * nh * nw > chunk_elements:
            bounds.append(i)
            nh, nw = hi, wi
        hm, wm = nh, nw
    bounds.append(len(h))
    for start, stop in zip(bounds[:-1], bounds[1:]):
        s = slice(start, stop)
        hmax, wmax = int(h[s].max()), int(w[s].max())
        ar_h = torch.arange(hmax, device=logp.device)
        ar_w = torch.arange(wmax, device=logp.device)
        in_y = ar_h[None, :] < h[s, None]  # (n, hmax)
        in_x = ar_w[None, :] < w[s, None]  # (n, wmax)
        rows = (y0[s, None] + ar_h[None, :]).clamp(max=H - 1)
        cols = (x0[s, None] + ar_w[None, :]).clamp(max=W - 1)
        vals = logp[b[s, None, None], c[s, None, None], rows[:, :, None], cols[:, None, :]]
        inside = in_y[:, :, None] & in_x[:, None, :]
        yield s, vals.masked_fill(~inside, float("-inf"))


def _neg_log_box_positives(logp: torch.Tensor, boxes: torch.Tensor, chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-log of the MIL-pooled box positives and their (b, c) rows."""
    H, W = logp.shape[-2:]
    boxes, y0, x0, y1, x1 = _clip_rects(boxes, 2, H, W)
    if len(boxes) == 0:
        return logp.new_zeros(0), boxes
    boxes, y0, x0, y1, x1 = _sort_by_area(boxes, y0, x0, y1, x1)
    out = []
    for s, vals in _rect_chunks(logp, boxes[:, 0], boxes[:, 1], y0, x0, y1, x1, chunk_elements):
        col_max = vals.amax(dim=1)  # (n, wmax): max over rows of each column; -inf outside
        row_max = vals.amax(dim=2)  # (n, hmax)
        # log((sum_x max_y p + sum_y max_x p) / (w + h)); padded entries are -inf (contribute 0).
        lse = torch.logsumexp(torch.cat([col_max, row_max], dim=1), dim=1)
        out.append(torch.log((y1[s] - y0[s] + x1[s] - x0[s]).to(logp.dtype)) - lse)
    return torch.cat(out), boxes


def _neg_log_tag_positives(logp: torch.Tensor, tags: torch.Tensor, pooling: str, power: float,
                           chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-log of the pooled present-tag positives and their (b, c) rows."""
    H, W = logp.shape[-2:]
    tags, y0, x0, y1, x1 = _clip_rects(tags, 3, H, W)
    if len(tags) == 0:
        return logp.new_zeros(0), tags
    tags, y0, x0, y1, x1 = _sort_by_area(tags, y0, x0, y1, x1)
    out = []
    for s, vals in _rect_chunks(logp, tags[:, 0], tags[:, 1], y0, x0, y1, x1, chunk_elements):
        flat = vals.flatten(1)
        log_area = torch.log(((y1[s] - y0[s]) * (x1[s] - x0[s])).to(logp.dtype))
        if pooling == "mean":
            pooled = torch.logsumexp(flat, dim=1) - log_area
        elif pooling == "max":
            pooled = flat.amax(dim=1)
        else:  # generalized mean (mean p^r)^(1/r), in log space
            pooled = (torch.logsumexp(power * flat, dim=1) - log_area) / power
        out.append(-pooled)
    return torch.cat(out), tags


def _check_logits(logits: torch.Tensor, t: CropTargets) -> tuple[int, int, int, int]:
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got {tuple(logits.shape)}")
    B, C, H, W = logits.shape
    if tuple(t.mask.shape) != (B, H, W):
        raise ValueError(f"targets are for crops {tuple(t.mask.shape)}, logits are {tuple(logits.shape)}")
    if tuple(t.box_exhaustive.shape) != (B, C):
        raise ValueError(f"box_exhaustive is {tuple(t.box_exhaustive.shape)}, expected ({B}, {C})")
    return B, C, H, W


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=1)


# --------------------------------------------------------------------------------------------
# The DSP contrastive loss


def dsp_loss(logits: torch.Tensor, t: CropTargets, tag_pooling: str = "mean", eps: float = 1e-6,
             tag_power: float = 4.0, negatives: torch.Tensor | None = None,
             chunk_elements: int = _CHUNK_ELEMENTS, negative_only_weight: float = 1.0,
             full_weight_pairs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The DSP loss of ``logits`` (B, C, H, W) against the annotations ``t`` (see module docstring).

    ``tag_pooling``: ``"mean"``, ``"max"`` or ``"smoothmax"`` (power mean with exponent
    ``tag_power``). ``negatives``: a precomputed :func:`negative_map` (else computed here).
    ``negative_only_weight``: the weight, in the negative term, of a ``(b, c)`` pair that has
    negatives but no positive (1: as any other pair; the divisor still counts it), except the pairs
    marked in ``full_weight_pairs`` (B, C) bool, which keep weight 1.
    Returns the scalar terms ``{"contrastive", "mask", "box", "point", "tag", "negative"}`` with
    ``contrastive = negative + mask + box + point + tag``. Terms without any annotation are a
    zero that is still part of the graph.
    """
    if tag_pooling not in TAG_POOLINGS:
        raise ValueError(f"tag_pooling must be one of {TAG_POOLINGS}, got {tag_pooling!r}")
    if not tag_power > 0:
        raise ValueError(f"tag_power must be positive, got {tag_power!r}")
    if not negative_only_weight >= 0:
        raise ValueError(f"negative_only_weight must be 0 or more, got {negative_only_weight!r}")
    B, C, H, W = _check_logits(logits, t)
    logp = _log_probs(logits)
    zero = _zero(logp)
    n_pairs = B * C
    device = logp.device
    terms: dict[str, torch.Tensor] = {}

    # Negatives: log(sum_{i in N} p_c(i) + eps) = logsumexp({log p_c(i)} U {log eps}), with the
    # maximum detached (exact value and gradient, no NaN when N is empty).
    neg = negative_map(t, C, H, W) if negatives is None else negatives
    flat = logp.masked_fill(~neg, float("-inf")).reshape(n_pairs, H * W)
    log_eps = math.log(eps)
    top = flat.amax(dim=1).detach().clamp_min(log_eps)
    neg_log = top + torch.log(torch.exp(flat - top[:, None]).sum(dim=1) + torch.exp(log_eps - top))
    has_neg = neg.reshape(n_pairs, H * W).any(dim=1)
    positive_pairs = []  # (b * C + c) of every positive, to find the pairs that have none

    # Mask: one positive per connected component = mean p_c over it (segment log-sum-exp).
    labels, comp_class, comp_batch = mask_components(t.mask)
    if len(comp_class):
        lab = torch.from_numpy(labels).to(device).reshape(-1)
        sel = lab > 0
        seg = lab[sel] - 1
        vals = logp.gather(1, t.mask.clamp_min(0)[:, None]).reshape(-1)[sel]
        m = len(comp_class)
        seg_max = vals.new_full((m,), float("-inf")).scatter_reduce(0, seg, vals.detach(), "amax")
        sums = vals.new_zeros(m).index_add(0, seg, torch.exp(vals - seg_max[seg]))
        counts = vals.new_zeros(m).index_add(0, seg, torch.ones_like(vals))
        neg_log_pos = -(seg_max + torch.log(sums) - torch.log(counts))
        pairs = torch.from_numpy(comp_batch * C + comp_class).to(device)
        terms["mask"] = _pair_term(neg_log_pos, pairs, n_pairs, zero)
        positive_pairs.append(pairs)
    else:
        terms["mask"] = zero

    # Boxes: multiple-instance pooling inside each box that lies wholly in the crop.
    neg_log_pos, boxes = _neg_log_box_positives(logp, whole_boxes(t.boxes), chunk_elements)
    terms["box"] = _pair_term(neg_log_pos, boxes[:, 0] * C + boxes[:, 1], n_pairs, zero) if len(boxes) else zero
    positive_pairs.append(boxes[:, 0] * C + boxes[:, 1])

    # Points: p_c at the point.
    points = _points_in_crop(t.points, H, W)
    if len(points):
        neg_log_pos = -logp[points[:, 0], points[:, 1], points[:, 2], points[:, 3]]
        terms["point"] = _pair_term(neg_log_pos, points[:, 0] * C + points[:, 1], n_pairs, zero)
        positive_pairs.append(points[:, 0] * C + points[:, 1])
    else:
        terms["point"] = zero

    # Present tags: pooled p_c over the region.
    present = t.tags[t.tags[:, 2] == 1]
    neg_log_pos, tags = _neg_log_tag_positives(logp, present, tag_pooling, tag_power, chunk_elements)
    terms["tag"] = _pair_term(neg_log_pos, tags[:, 0] * C + tags[:, 1], n_pairs, zero) if len(tags) else zero
    positive_pairs.append(tags[:, 0] * C + tags[:, 1])

    weights = has_neg.to(neg_log.dtype)
    if negative_only_weight != 1.0:
        has_pos = torch.zeros(n_pairs, dtype=torch.bool, device=device)
        has_pos[torch.cat([rows.to(device=device, dtype=torch.long) for rows in positive_pairs])] = True
        if full_weight_pairs is not None:
            has_pos |= full_weight_pairs.to(device).reshape(n_pairs)
        weights = torch.where(has_pos, weights, weights * negative_only_weight)
    terms["negative"] = (neg_log * weights).sum() / has_neg.sum().clamp_min(1) if bool(has_neg.any()) else zero

    out = {"contrastive": terms["negative"] + terms["mask"] + terms["box"] + terms["point"] + terms["tag"]}
    out.update(terms)
    return out


def whole_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """The boxes that give a positive: all, unless a 7th column marks cut boxes with 0."""
    return boxes[boxes[:, 6] != 0] if boxes.shape[1] > 6 else boxes


# --------------------------------------------------------------------------------------------
# Cross-entropy, pseudo labels, augmentation, total


def supervised_targets(t: CropTargets) -> torch.Tensor:
    """(B, H, W) long: the mask, with every (in-crop) point's pixel set to the point's class; -1 elsewhere."""
    target = t.mask.clone()
    H, W = target.shape[-2:]
    points = _points_in_crop(t.points, H, W)
    if len(points):
        target[points[:, 0], points[:, 2], points[:, 3]] = points[:, 1]
    return target


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, balance: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the pixels with a target (>= 0), each class's mean weighted by its pixel
    count to the power ``1 - balance``: 0 (or False) is the plain mean over pixels, 1 (or True) the
    mean over the classes present of each class's mean (a class of few pixels weighs as much as a
    common one), 0.5 weighs classes by the square root of their pixel counts."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    balance = float(balance)
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be between 0 and 1, got {balance!r}")
    valid = target >= 0
    if not bool(valid.any()):
        return _zero(logits)
    ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    if balance == 0.0:
        return (ce * valid).sum() / valid.sum()
    C = logits.shape[1]
    cls = target[valid]
    sums = ce.new_zeros(C).index_add(0, cls, ce[valid])
    counts = ce.new_zeros(C).index_add(0, cls, torch.ones_like(sums[cls]))
    present = counts > 0
    weights = counts[present] ** (1.0 - balance)
    return (weights * sums[present] / counts[present]).sum() / weights.sum()


def supervised_ce(logits: torch.Tensor, t: CropTargets, balance: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the annotated mask pixels and point pixels (one mean over their
    union; a point overrides the mask under it; ``balance``: see :func:`_masked_ce`);
    a graph-connected 0 when there are none."""
    _check_logits(logits, t)
    return _masked_ce(logits, supervised_targets(t), balance)


@torch.no_grad()
def pseudo_label_targets(weak_logits: torch.Tensor, t: CropTargets, threshold: float | None = None,
                         negatives: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W) long pseudo labels from the detached prediction of a weakly augmented view.

    The classes the annotations rule out (:func:`negative_map`) are forbidden (logit -inf), the
    probabilities renormalised over the remaining classes and the argmax taken. Mask and point
    pixels get their annotated class (confidence 1). Pixels whose renormalised confidence is below
    ``threshold`` and pixels where every class is forbidden get -1 (ignored).
    """
    B, C, H, W = _check_logits(weak_logits, t)
    logits = weak_logits.detach().float()
    neg = negative_map(t, C, H, W) if negatives is None else negatives
    all_neg = neg.all(dim=1)
    logits = logits.masked_fill(neg & ~all_neg[:, None], float("-inf"))
    conf, target = torch.softmax(logits, dim=1).max(dim=1)
    known = supervised_targets(t)
    is_known = known >= 0
    target = torch.where(is_known, known, target)
    conf = torch.where(is_known, torch.ones_like(conf), conf)
    drop = all_neg & ~is_known
    if threshold is not None:
        drop |= conf < threshold
    return target.masked_fill(drop, -1)


def pseudo_label_loss(strong_logits: torch.Tensor, targets: torch.Tensor, balance: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the strongly augmented view's logits against pseudo labels (-1 ignored),
    averaged over the labelled pixels (``balance``: see :func:`_masked_ce`); a
    graph-connected 0 when there are none."""
    if strong_logits.ndim != 4 or tuple(targets.shape) != (strong_logits.shape[0], *strong_logits.shape[2:]):
        raise ValueError(f"targets {tuple(targets.shape)} do not fit logits {tuple(strong_logits.shape)}")
    return _masked_ce(strong_logits, targets, balance)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


@torch.no_grad()
def strong_augment(x: torch.Tensor, generator: torch.Generator | None = None, *,
                   gain: tuple[float, float] = (0.7, 1.4), offset: float = 0.2,
                   gamma: tuple[float, float] = (0.7, 1.5), noise: float = 0.1,
                   cutouts: int = 2, cutout_size: tuple[float, float] = (0.1, 0.3),
                   cutout_prob: float = 0.5) -> torch.Tensor:
    """Photometric strong augmentation of a batch ``x`` (B, Ch, H, W); no geometric change, so the
    output stays pixel-aligned with ``x`` (and with a weakly augmented view of it).

    Per crop (the same for all of its channels, e.g. the sections of a 2.5D input), with the crop's
    mean ``mu``, standard deviation ``sd`` and range [lo, hi]:

    * gamma: ``lo + (hi - lo) * ((x - lo) / (hi - lo)) ** g``, ``g ~ U(gamma)`` (log-uniform);
    * contrast and brightness: ``mu + k * (x - mu) + o * sd``, ``k ~ U(gain)`` (log-uniform),
      ``o ~ U(-offset, offset)``;
    * Gaussian noise with standard deviation ``s * sd``, ``s ~ U(0, noise)``;
    * ``cutouts`` squares (each kept with probability ``cutout_prob``) with sides
      ``~ U(cutout_size) * min(H, W)`` filled with ``mu``.

    All randomness comes from ``generator`` (on ``x``'s device), or the global RNG if None.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (B, Ch, H, W), got {tuple(x.shape)}")
    B, _, H, W = x.shape
    dev = x.device
    orig_dtype = x.dtype
    x = x.float()
    if B == 0 or H == 0 or W == 0:
        return x.to(orig_dtype)
    flat = x.reshape(B, -1)
    mu = flat.mean(dim=1).view(B, 1, 1, 1)
    sd = flat.std(dim=1, correction=0).view(B, 1, 1, 1).clamp_min(1e-6)
    lo = flat.amin(dim=1).view(B, 1, 1, 1)
    rng = (flat.amax(dim=1).view(B, 1, 1, 1) - lo).clamp_min(1e-6)

    g = torch.exp(_uniform((B, 1, 1, 1), math.log(gamma[0]), math.log(gamma[1]), generator, dev))
    y = lo + rng * ((x - lo) / rng).clamp(0, 1).pow(g)
    k = torch.exp(_uniform((B, 1, 1, 1), math.log(gain[0]), math.log(gain[1]), generator, dev))
    o = _uniform((B, 1, 1, 1), -offset, offset, generator, dev)
    y = mu + k * (y - mu) + o * sd
    s = _uniform((B, 1, 1, 1), 0.0, noise, generator, dev)
    y = y + s * sd * torch.randn(y.shape, generator=generator, device=dev)

    if cutouts > 0:
        side = _uniform((B, cutouts), *cutout_size, generator, dev) * min(H, W)
        cy = _uniform((B, cutouts), 0.0, float(H), generator, dev)
        cx = _uniform((B, cutouts), 0.0, float(W), generator, dev)
        keep = torch.rand((B, cutouts), generator=generator, device=dev) < cutout_prob
        ys = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
        xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
        in_y = (ys[None, None, :] - cy[..., None]).abs() <= side[..., None] / 2  # (B, n, H)
        in_x = (xs[None, None, :] - cx[..., None]).abs() <= side[..., None] / 2  # (B, n, W)
        cut = (in_y[..., :, None] & in_x[..., None, :] & keep[..., None, None]).any(dim=1)  # (B, H, W)
        y = torch.where(cut[:, None], mu.expand_as(y), y)
    return y.to(orig_dtype)


def total_loss(logits: torch.Tensor, t: CropTargets, strong_logits: torch.Tensor | None = None, *,
               weights: LossWeights | None = None, tag_pooling: str = "mean", tag_power: float = 4.0,
               pl_threshold: float | None = 0.8, eps: float = 1e-6,
               balance_classes: float = 0.0, unpointed_negatives: bool = False,
               negative_only_weight: float = 1.0, negatives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``contrastive + w_ce * CE + w_pl * pseudo-label`` for one training step.

    ``logits``: the (weakly augmented) view's prediction, trained with the DSP loss and the
    supervised cross-entropy; its detached prediction also gives the pseudo labels (confidence
    ``pl_threshold``) for ``strong_logits``, the prediction of a strongly augmented, pixel-aligned
    view (see :func:`strong_augment`); without ``strong_logits`` the pseudo-label term is 0.
    ``balance_classes``: the class balance of both cross-entropies, 0 to 1 (see :func:`_masked_ce`).
    ``unpointed_negatives``: add :func:`unpointed_region_negatives` to the negatives.
    ``negative_only_weight``: see :func:`dsp_loss`; a pair with unpointed-region negatives keeps
    weight 1 (those negatives vanish once the class is no longer predicted there, so they cannot
    push it down for ever). ``negatives``: ``negative_map(t, ...)`` when the caller already has it
    (it is not modified).
    Returns ``{"total", "contrastive", "mask", "box", "point", "tag", "negative", "ce",
    "pseudo_label"}``, all scalars.
    """
    w = LossWeights() if weights is None else weights
    B, C, H, W = _check_logits(logits, t)
    neg = negative_map(t, C, H, W) if negatives is None else negatives
    full_weight_pairs = None
    if unpointed_negatives:
        unpointed = unpointed_region_negatives(logits, t)
        neg = neg | unpointed
        full_weight_pairs = unpointed.flatten(2).any(dim=2)
    out = dsp_loss(logits, t, tag_pooling=tag_pooling, eps=eps, tag_power=tag_power, negatives=neg,
                   negative_only_weight=negative_only_weight, full_weight_pairs=full_weight_pairs)
    out["ce"] = supervised_ce(logits, t, balance_classes)
    if strong_logits is not None:
        if strong_logits.shape != logits.shape:
            raise ValueError(f"strong_logits {tuple(strong_logits.shape)} differ from logits {tuple(logits.shape)}")
        pl = pseudo_label_targets(logits, t, threshold=pl_threshold, negatives=neg)
        out["pseudo_label"] = pseudo_label_loss(strong_logits, pl, balance_classes)
    else:
        out["pseudo_label"] = _zero(logits)
    out["total"] = w.contrastive * out["contrastive"] + w.ce * out["ce"] + w.pseudo_label * out["pseudo_label"]
    return out
