"""Figures of a segmentation against reference labels: class IoU, instance matching (AP50 and the
IoU of the matched pairs) and the recall of objects that touch another.

Plain functions of NumPy label maps (SciPy and scikit-image inside), used alike by the demo, the
benchmark and the tests. Instances are scored per section: ``(Z, Y, X)`` maps whose ids are unique
within each section (they need not be consecutive; 0 is background).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage as ndi
from skimage.metrics import contingency_table

from napari_protoseg.prediction.decoders import DEFAULT_MIN_SIZE

__all__ = [
    "TOUCHING_GAP",
    "TOUCHING_MIN_AREA",
    "class_iou",
    "connected_instances",
    "instance_figures",
    "instance_iou",
    "instance_scores",
    "match_instances",
    "touching_objects",
    "touching_recall",
]

TOUCHING_GAP = 2  # objects at most this many pixels apart (4-connected steps) count as touching
# True instances smaller than this are label specks, not objects: no decoder keeps an object under
# DEFAULT_MIN_SIZE px, so they neither touch nor make another object touch. (In the VNC test sections
# 10-19 all 13 mitochondria within 2 px of another are such specks, 1-9 px, or touch only one.)
TOUCHING_MIN_AREA = DEFAULT_MIN_SIZE
_FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)


def class_iou(prediction: np.ndarray, truth: np.ndarray, class_ids: Iterable[int]) -> dict[int, float]:
    """Intersection over union of each class of ``class_ids`` over the whole maps (NaN where a class
    is in neither)."""
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    out = {}
    for cid in class_ids:
        p, t = prediction == cid, truth == cid
        union = np.count_nonzero(p | t)
        out[cid] = float(np.count_nonzero(p & t) / union) if union else float("nan")
    return out


def connected_instances(class_map: np.ndarray, class_id: int) -> np.ndarray:
    """The 4-connected components of one class as instances (int32), numbered 1..n in each section."""
    out = np.zeros(class_map.shape, dtype=np.int32)
    for z in range(class_map.shape[0]):
        out[z], _ = ndi.label(class_map[z] == class_id, structure=_FOUR_CONNECTED)
    return out


def instance_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The IoU of every (predicted, true) pair of instances of one label image: ``(iou, predicted_ids,
    true_ids)`` with ``iou[i, j]`` the IoU of ``predicted_ids[i]`` and ``true_ids[j]`` (ids ascending,
    background 0 left out)."""
    p_ids, p = _consecutive(predicted)
    t_ids, t = _consecutive(truth)
    overlap = contingency_table(p, t).toarray()  # overlap[i, j]: pixels with p == i and t == j
    area_p, area_t = overlap.sum(axis=1), overlap.sum(axis=0)
    inter = overlap[1:, 1:]
    union = area_p[1:, None] + area_t[None, 1:] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0), p_ids, t_ids


def _consecutive(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the nonzero ids ascending, the labels renumbered 1..n in that order with 0 kept as 0)."""
    values, inverse = np.unique(labels, return_inverse=True)
    if len(values) and values[0] == 0:
        return values[1:], inverse.reshape(-1)
    return values, inverse.reshape(-1) + 1


def match_instances(iou: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """One-to-one matches ``(row, column)`` of an IoU matrix at IoU >= ``threshold``, taken best IoU
    first (equal IoUs in row-major order). Above 0.5 two candidate pairs never share an instance; at
    exactly 0.5 they can (an object split into two halves), and any pair may below 0.5."""
    rows, cols = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_rows, used_cols, matches = set(), set(), []
    for k in order:
        i, j = int(rows[k]), int(cols[k])
        if i not in used_rows and j not in used_cols:
            used_rows.add(i)
            used_cols.add(j)
            matches.append((i, j))
    return matches


def instance_scores(predicted: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict:
    """``ap50`` = TP / (TP + FP + FN) with one-to-one matches (:func:`match_instances`) at IoU >=
    ``threshold`` in each section (NaN without any instance), ``matched_iou``, the mean IoU of the
    matched pairs (0 without any), and the counts ``tp``, ``fp``, ``fn``. ``predicted`` and ``truth``:
    (Z, Y, X) instance ids."""
    tp = fp = fn = 0
    matched_ious = []
    for z in range(truth.shape[0]):
        iou, p_ids, t_ids = instance_iou(predicted[z], truth[z])
        matches = match_instances(iou, threshold)
        matched_ious += [float(iou[i, j]) for i, j in matches]
        tp += len(matches)
        fp += len(p_ids) - len(matches)
        fn += len(t_ids) - len(matches)
    total = tp + fp + fn
    return {"ap50": tp / total if total else float("nan"),
            "matched_iou": float(np.mean(matched_ious)) if matched_ious else 0.0,
            "tp": tp, "fp": fp, "fn": fn}


def touching_objects(truth: np.ndarray, gap: int = TOUCHING_GAP, min_area: int = TOUCHING_MIN_AREA) -> list[set[int]]:
    """Per section of ``truth`` (Z, Y, X), the ids of the instances of at least ``min_area`` px that
    lie within ``gap`` pixels (4-connected steps) of another instance of at least ``min_area`` px."""
    out = []
    for plane in truth:
        ids, areas = np.unique(plane[plane > 0], return_counts=True)
        objects = np.where(np.isin(plane, ids[areas >= min_area]), plane, 0)
        near = set()
        for i in ids[areas >= min_area]:
            own = objects == i
            ring = ndi.binary_dilation(own, iterations=gap) & ~own
            if np.any((objects[ring] > 0) & (objects[ring] != i)):
                near.add(int(i))
        out.append(near)
    return out


def touching_recall(predicted: np.ndarray, truth: np.ndarray, gap: int = TOUCHING_GAP, threshold: float = 0.5,
                    min_area: int = TOUCHING_MIN_AREA) -> tuple[float, int]:
    """``(recall, count)``: the share of the :func:`touching_objects` of ``truth`` that some predicted
    instance matches at IoU >= ``threshold`` (NaN where there are none), and their number. Where
    decoders differ: a decoder that merges a touching pair loses both."""
    hits = total = 0
    for z, near in enumerate(touching_objects(truth, gap, min_area)):
        if not near:
            continue
        iou, _, t_ids = instance_iou(predicted[z], truth[z])
        best = iou[:, np.searchsorted(t_ids, sorted(near))].max(axis=0, initial=0.0)
        hits += int(np.count_nonzero(best >= threshold))
        total += len(near)
    return (hits / total if total else float("nan")), total


def instance_figures(predicted: np.ndarray, truth: np.ndarray, gap: int = TOUCHING_GAP, threshold: float = 0.5) -> dict:
    """:func:`instance_scores` plus ``touching_recall`` and ``touching_objects`` (the number of true
    instances within ``gap`` pixels of another; :func:`touching_recall`)."""
    recall, count = touching_recall(predicted, truth, gap, threshold)
    return {**instance_scores(predicted, truth, threshold), "touching_recall": recall, "touching_objects": count}
