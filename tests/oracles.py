"""Test oracles: slow, obviously correct versions of what the package computes fast.

The tests compare the package's functions with these on small inputs; the package does not carry them.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi

from napari_protoseg.training.losses import LOSS_TERMS, CropTargets, _check_logits, _zero, whole_boxes

# ------------------------------------------------------------------------------------ DSP loss


def reference_negative_map(t: CropTargets, C: int, H: int, W: int) -> np.ndarray:
    """:func:`~napari_protoseg.training.losses.negative_map` written as a plain per-crop, per-class loop."""
    mask = t.mask.cpu().numpy()
    B = mask.shape[0]
    boxes = t.boxes[:, :6].cpu().numpy()
    points = t.points[:, :4].cpu().numpy()
    tags = t.tags[:, :7].cpu().numpy()
    exhaustive = t.box_exhaustive.cpu().numpy()
    neg = np.zeros((B, C, H, W), bool)
    for b in range(B):
        for c in range(C):
            neg[b, c] |= (mask[b] >= 0) & (mask[b] != c)
            if exhaustive[b, c]:
                inside = np.zeros((H, W), bool)
                for bb, cc, y0, x0, y1, x1 in boxes:
                    if bb == b and cc == c:
                        inside[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
                neg[b, c] |= ~inside
            for bb, cc, y, x in points:
                if bb == b and cc != c and 0 <= y < H and 0 <= x < W:
                    neg[b, c, y, x] = True
            for bb, cc, present, y0, x0, y1, x1 in tags:
                if bb == b and cc == c and not present:
                    neg[b, c, max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return neg


def reference_dsp_loss(logits: torch.Tensor, t: CropTargets, tag_pooling: str = "mean", eps: float = 1e-6,
                       tag_power: float = 4.0, negative_only_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """:func:`~napari_protoseg.training.losses.dsp_loss` written as an obviously correct per-crop,
    per-class loop in probability space (slow). Components are labelled per class with
    ``skimage.measure.label``."""
    from skimage.measure import label

    B, C, H, W = _check_logits(logits, t)
    p = torch.softmax(logits, dim=1)
    neg = torch.from_numpy(reference_negative_map(t, C, H, W)).to(p.device)
    mask = t.mask.cpu().numpy()
    per_type: dict[str, list[torch.Tensor]] = {name: [] for name in LOSS_TERMS}

    def add(name: str, positives: list[torch.Tensor]) -> None:
        if positives:
            per_type[name].append(torch.stack([-torch.log(q) for q in positives]).mean())

    for b in range(B):
        for c in range(C):
            pc = p[b, c]
            positives_before = sum(len(v) for name, v in per_type.items() if name != "negative")
            comps = label(mask[b] == c, background=0, connectivity=2)
            add("mask", [pc[torch.from_numpy(comps == k)].mean() for k in range(1, comps.max() + 1)])
            boxes = []
            for bb, cc, y0, x0, y1, x1 in whole_boxes(t.boxes)[:, :6].tolist():
                y0, x0, y1, x1 = (min(max(v, 0), n) for v, n in ((y0, H), (x0, W), (y1, H), (x1, W)))
                if bb == b and cc == c and y1 > y0 and x1 > x0:
                    region = pc[y0:y1, x0:x1]
                    boxes.append((region.max(dim=0).values.sum() + region.max(dim=1).values.sum())
                                 / ((y1 - y0) + (x1 - x0)))
            add("box", boxes)
            add("point", [pc[y, x] for bb, cc, y, x in t.points[:, :4].tolist()
                          if bb == b and cc == c and 0 <= y < H and 0 <= x < W])
            tags = []
            for bb, cc, present, y0, x0, y1, x1 in t.tags[:, :7].tolist():
                y0, x0, y1, x1 = (min(max(v, 0), n) for v, n in ((y0, H), (x0, W), (y1, H), (x1, W)))
                if bb == b and cc == c and present and y1 > y0 and x1 > x0:
                    region = pc[y0:y1, x0:x1]
                    if tag_pooling == "mean":
                        tags.append(region.mean())
                    elif tag_pooling == "max":
                        tags.append(region.max())
                    else:
                        tags.append(region.pow(tag_power).mean().pow(1.0 / tag_power))
            add("tag", tags)
            if neg[b, c].any():
                has_positive = sum(len(v) for name, v in per_type.items() if name != "negative") > positives_before
                weight = 1.0 if has_positive else negative_only_weight
                per_type["negative"].append(weight * torch.log(pc[neg[b, c]].sum() + eps))
    zero = _zero(logits)
    out = {name: torch.stack(v).mean() if v else zero for name, v in per_type.items()}
    out["contrastive"] = out["negative"] + out["mask"] + out["box"] + out["point"] + out["tag"]
    return out


# ------------------------------------------------------------------------------------ metrics


def reference_instance_scores(predicted: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict:
    """:func:`~napari_protoseg.evaluation.metrics.instance_scores` by brute force: the IoU of every
    (predicted, true) pair of each section from their pixel masks, then matches taken greedily, best
    IoU first (equal IoUs: lower predicted id, then lower true id)."""
    tp = fp = fn = 0
    matched = []
    for p, t in zip(predicted, truth):
        p_ids = sorted(int(i) for i in set(p.ravel().tolist()) - {0})
        t_ids = sorted(int(i) for i in set(t.ravel().tolist()) - {0})
        candidates = []
        for i in p_ids:
            for j in t_ids:
                inter = np.count_nonzero((p == i) & (t == j))
                iou = inter / np.count_nonzero((p == i) | (t == j))
                if iou >= threshold:
                    candidates.append((-iou, i, j))
        used_p, used_t = set(), set()
        for negative_iou, i, j in sorted(candidates):
            if i not in used_p and j not in used_t:
                used_p.add(i)
                used_t.add(j)
                matched.append(-negative_iou)
        tp += len(used_p)
        fp += len(p_ids) - len(used_p)
        fn += len(t_ids) - len(used_t)
    total = tp + fp + fn
    return {"ap50": tp / total if total else float("nan"),
            "matched_iou": float(np.mean(matched)) if matched else 0.0, "tp": tp, "fp": fp, "fn": fn}


def reference_touching_objects(truth: np.ndarray, gap: int, min_area: int) -> list[set[int]]:
    """:func:`~napari_protoseg.evaluation.metrics.touching_objects` by brute force: an instance of at
    least ``min_area`` px touches where another such instance has a pixel at city-block distance
    ``gap`` or less from one of its pixels."""
    out = []
    for plane in truth:
        ids, areas = np.unique(plane[plane > 0], return_counts=True)
        big = [int(i) for i, a in zip(ids, areas) if a >= min_area]
        coords = {i: np.argwhere(plane == i) for i in big}
        near = set()
        for i in big:
            for j in big:
                if i != j:
                    distances = np.abs(coords[i][:, None, :] - coords[j][None, :, :]).sum(axis=2)
                    if distances.min() <= gap:
                        near.add(i)
        out.append(near)
    return out


def reference_touching_recall(predicted: np.ndarray, truth: np.ndarray, gap: int, threshold: float,
                              min_area: int) -> tuple[float, int]:
    """:func:`~napari_protoseg.evaluation.metrics.touching_recall` by brute force."""
    hits = total = 0
    for z, near in enumerate(reference_touching_objects(truth, gap, min_area)):
        for i in near:
            own = truth[z] == i
            best = max((np.count_nonzero(own & (predicted[z] == k)) / np.count_nonzero(own | (predicted[z] == k))
                        for k in set(predicted[z][own].tolist()) - {0}), default=0.0)
            hits += best >= threshold
            total += 1
    return (hits / total if total else float("nan")), total


def random_instance_maps(rng: np.random.Generator, shape: tuple[int, int, int], kind: int) -> np.ndarray:
    """A (Z, Y, X) instance map of one of three kinds: smooth blobs with ids that are not consecutive
    (0), rectangles that may touch, overlap or be cut by others (1), pixel noise (2)."""
    z, h, w = shape
    if kind == 0:
        blobs = ndi.gaussian_filter(rng.random((z, h, w)), 1.5) > rng.uniform(0.45, 0.55)
        labels = np.stack([ndi.label(plane)[0] for plane in blobs]).astype(np.int32)
        return np.where(labels > 0, labels * 3 + 1, 0)
    if kind == 1:
        labels = np.zeros((z, h, w), np.int32)
        for _ in range(int(rng.integers(0, 8))):
            k, y, x = rng.integers(0, z), rng.integers(0, h - 2), rng.integers(0, w - 2)
            labels[k, y:y + rng.integers(1, 12), x:x + rng.integers(1, 12)] = rng.integers(1, 20)
        return labels
    return rng.integers(0, 4, (z, h, w)).astype(np.int32)
