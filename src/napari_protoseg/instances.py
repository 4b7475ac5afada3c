"""From a semantic class map to instance labels: plain decoders and linking planes into 3D objects.

Pure NumPy/scikit-image. Instances are decoded per plane for the classes flagged
``instances: true``; every object gets its own id (unique over the whole array, 0 = background).
The learned WISE-Net decoder lives next to these and uses the same id conventions.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.measure import label
from skimage.segmentation import watershed

__all__ = ["PLAIN_DECODERS", "plain_instances", "link_planes", "relabel_sequential"]

PLAIN_DECODERS = ("components", "watershed")


def _components(region: np.ndarray) -> np.ndarray:
    return label(region, connectivity=1)


def _distance_watershed(region: np.ndarray, min_distance: int) -> np.ndarray:
    """Split touching objects at the necks of the distance transform."""
    distance = ndi.distance_transform_edt(region)
    components = label(region, connectivity=1)
    peaks = peak_local_max(distance, min_distance=max(1, int(min_distance)), labels=components,
                           exclude_border=False)
    markers = np.zeros(region.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # A component without a peak (too small for min_distance) keeps one seed at its deepest pixel.
    seeded = np.unique(components[markers > 0])
    missing = np.setdiff1d(np.arange(1, components.max() + 1), seeded)
    if len(missing):
        deepest = ndi.maximum_position(distance, components, missing)
        for i, pos in enumerate(deepest):
            markers[pos] = len(peaks) + 1 + i
    return watershed(-distance, markers, mask=region)


def plain_instances(class_map: np.ndarray, instance_class_ids: Iterable[int], method: str = "watershed",
                    min_size: int = 16, min_distance: int = 7) -> np.ndarray:
    """Instance labels (uint32, same shape) from a class map (Y, X) or (Z, Y, X), decoded per plane.

    ``method`` "components": connected components (4-connectivity) of each instance class;
    "watershed": the components are split at the necks of their distance transform, so touching
    round objects become separate instances. Objects smaller than ``min_size`` pixels are dropped.
    Ids are consecutive and unique over the whole array.
    """
    if method not in PLAIN_DECODERS:
        raise ValueError(f"unknown instance decoder {method!r}; choose one of {', '.join(PLAIN_DECODERS)}")
    class_map = np.asarray(class_map)
    planes = class_map[None] if class_map.ndim == 2 else class_map
    out = np.zeros(planes.shape, dtype=np.uint32)
    next_id = 1
    ids = list(instance_class_ids)
    for z, plane in enumerate(planes):
        for cid in ids:
            region = plane == cid
            if not region.any():
                continue
            objects = _components(region) if method == "components" else _distance_watershed(region, min_distance)
            sizes = np.bincount(objects.ravel())
            keep = sizes >= min_size
            keep[0] = False
            new_ids = np.zeros(len(sizes), dtype=np.uint32)
            new_ids[keep] = np.arange(next_id, next_id + keep.sum(), dtype=np.uint32)
            next_id += int(keep.sum())
            out[z][region] = new_ids[objects[region]]
    return out[0] if class_map.ndim == 2 else out


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """The same objects with ids 1..n (0 stays background)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(labels.shape).astype(np.uint32)


def link_planes(labels: np.ndarray, min_overlap: float = 0.3) -> np.ndarray:
    """Link per-plane instances of a (Z, Y, X) stack into 3D objects by overlap.

    An object in plane z joins the object of plane z-1 that it overlaps most when the overlap is
    at least ``min_overlap`` of the smaller of the two; each object of plane z-1 continues into
    at most one object of plane z (the best-overlapping one). Returns consecutive 3D ids.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError("link_planes needs a (Z, Y, X) stack of per-plane instance labels")
    out = np.zeros(labels.shape, dtype=np.uint32)
    next_id = 1
    previous = None  # previous plane with 3D ids
    for z in range(labels.shape[0]):
        plane = labels[z]
        current = np.zeros(plane.shape, dtype=np.uint32)
        ids = np.unique(plane)
        ids = ids[ids > 0]
        assignment: dict[int, int] = {}
        if previous is not None and len(ids):
            both = (plane > 0) & (previous > 0)
            pairs, counts = np.unique(np.stack([plane[both], previous[both]]), axis=1, return_counts=True)
            size_now = dict(zip(*np.unique(plane[plane > 0], return_counts=True)))
            size_prev = dict(zip(*np.unique(previous[previous > 0], return_counts=True)))
            scored = sorted(((counts[i] / min(size_now[pairs[0, i]], size_prev[pairs[1, i]]), int(pairs[0, i]),
                              int(pairs[1, i])) for i in range(pairs.shape[1])), reverse=True)
            taken: set[int] = set()
            for score, now, before in scored:
                if score < min_overlap:
                    break
                if now in assignment or before in taken:
                    continue
                assignment[now] = before
                taken.add(before)
        for i in ids:
            i = int(i)
            if i not in assignment:
                assignment[i] = next_id
                next_id += 1
        lut = np.zeros(int(plane.max()) + 1, dtype=np.uint32)
        for i, target in assignment.items():
            lut[i] = target
        current = lut[plane]
        out[z] = current
        previous = current
    return relabel_sequential(out)
