"""Instance labels for the classes flagged ``instances: true``: the WISE-Net decoder, plain decoders
of the semantic class map, linking planes into 3D objects, and the objects' size floors.

Pure NumPy/scikit-image; :mod:`napari_protoseg.prediction.pipeline` applies them to a model's
prediction. Instances are decoded per plane; every object gets its own id (unique over the whole
array, 0 = background).

Decoders:

* ``"wise"`` (:func:`wise_instances`, needs a model with instance heads): every connected part of
  the class's semantic region is one object, unless two or more blobs of the localization map
  (probability > 0.5, 4-connected) fall in it: then each blob seeds an object at its most probable
  pixel and every pixel of the part goes to the seed whose embedding is most similar
  (``S = 2 / (1 + exp(|Ei - Ej|^2))``, i.e. the nearest one); WISE-Net's background seeds, which
  drop the pixels most similar to background, are optional;
* ``"watershed"``: the class's connected components split at the necks of their distance transform;
* ``"components"``: connected components (4-connectivity) of the class map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import label
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed

from napari_protoseg.prediction import DECODERS, DEFAULT_DECODER, PLAIN_DECODERS

__all__ = ["DECODERS", "DEFAULT_DECODER", "PLAIN_DECODERS", "PixelEmbeddings", "annotated_min_size",
           "annotated_object_areas", "areas_at_points", "link_planes", "min_object_sizes",
           "min_size_from_p10", "object_area_summary", "plain_instances", "sizes_at_points",
           "wise_instances"]

_CROSS = ndi.generate_binary_structure(2, 1)
# The size floor (pixels) of a class whose objects nothing measured.
DEFAULT_MIN_SIZE = 16
# An object smaller than this share of the annotated objects' 10th-percentile area is dropped.
MIN_SIZE_SHARE = 0.5


# ------------------------------------------------------------------------------ object sizes


def annotated_object_areas(annotations, class_id: int) -> np.ndarray:
    """Areas (pixels) of the objects of one class that the annotations outline: the 4-connected
    components of the class in the masks (per plane) and, for each box, the ellipse it holds
    (pi/4 of its area). Points and tags say nothing about size. Empty when nothing outlines one."""
    areas = []
    if annotations.masks is not None:
        masks = annotations.masks if annotations.is_stack else annotations.masks[None]
        for plane in masks:
            region = plane == class_id
            if region.any():
                areas.append(np.bincount(_components(region).ravel())[1:])
    boxes = annotations.boxes[annotations.boxes["class"] == class_id]
    if len(boxes):
        sides = (boxes["y1"].astype(np.int64) - boxes["y0"]) * (boxes["x1"].astype(np.int64) - boxes["x0"])
        areas.append(np.round(sides * (np.pi / 4)).astype(np.int64))
    return np.concatenate(areas).astype(np.int64) if areas else np.zeros(0, dtype=np.int64)


def areas_at_points(class_map: np.ndarray, points: np.ndarray, class_id: int) -> np.ndarray:
    """Areas (pixels) of the objects that the points of ``class_id`` mark in a class map: per plane,
    the 4-connected components of the class holding exactly one of its points (one holding several
    is objects run together, or no object at all). Where the class map does not say the class at a
    point, that point marks nothing."""
    planes = class_map if class_map.ndim == 3 else class_map[None]
    points = points[points["class"] == class_id]
    areas = []
    for z in np.unique(points["z"]):
        labels = _components(planes[int(z)] == class_id)
        here = points[points["z"] == z]
        marked, hits = np.unique(labels[here["y"].astype(np.int64), here["x"].astype(np.int64)], return_counts=True)
        marked = marked[(marked > 0) & (hits == 1)]
        if len(marked):
            areas.append(np.bincount(labels.ravel())[marked])
    return np.concatenate(areas).astype(np.int64) if areas else np.zeros(0, dtype=np.int64)


# Planes a method predicts to learn object sizes at points (those with the most points).
SIZE_PLANES = 8


def sizes_at_points(predict_planes: Callable[[list[int]], np.ndarray], annotations,
                    max_planes: int = SIZE_PLANES) -> dict[str, dict[str, float]]:
    """Object sizes for the classes flagged ``instances`` that points mark but nothing outlines
    (no mask component, no box): the areas of the objects a method's own class map holds at those
    points (:func:`areas_at_points`) on the ``max_planes`` planes with the most such points.
    ``predict_planes(zs)`` returns the class maps (len(zs), Y, X) of planes ``zs``. The entries
    are those of :func:`object_area_summary`, with ``"source": "predicted at points"``."""
    outlined = object_area_summary(annotations)
    wanted = [int(c.id) for c in annotations.classes if c.instances and str(int(c.id)) not in outlined]
    points = annotations.points[np.isin(annotations.points["class"], wanted)]
    if not len(points):
        return {}
    planes, counts = np.unique(points["z"], return_counts=True)
    zs = sorted(int(z) for z in planes[np.argsort(-counts, kind="stable")[:max_planes]])
    points = points[np.isin(points["z"], zs)].copy()
    points["z"] = np.searchsorted(zs, points["z"])
    class_maps = np.asarray(predict_planes(zs))
    out = {}
    for class_id in wanted:
        areas = areas_at_points(class_maps, points, class_id)
        if len(areas):
            out[str(class_id)] = {"count": int(len(areas)), "p10": _p10(areas), "median": float(np.median(areas)),
                                  "source": "predicted at points"}
    return out


def object_area_summary(annotations) -> dict[str, dict[str, float]]:
    """For each class flagged ``instances`` with outlined objects: their count and the 10th
    percentile and median of their areas (pixels), keyed by the class id as a string (JSON keys);
    the trainer stores it in the model's ``training_info["object_areas"]``."""
    out = {}
    for info in annotations.classes:
        if not info.instances:
            continue
        areas = annotated_object_areas(annotations, info.id)
        if len(areas):
            out[str(int(info.id))] = {"count": int(len(areas)), "p10": _p10(areas), "median": float(np.median(areas))}
    return out


def _p10(areas: np.ndarray) -> float | None:
    return float(np.percentile(areas, 10)) if len(areas) else None


def min_object_sizes(model, default: int = DEFAULT_MIN_SIZE, share: float = MIN_SIZE_SHARE) -> dict[int, int]:
    """Smallest object (pixels) the decoders keep for each instance class of ``model``: ``share``
    of the 10th-percentile area of the objects annotated for training (``training_info``; for a
    class only points mark, of the objects the model found at them: :func:`sizes_at_points`), never
    below ``default``; ``default`` for a class whose size nothing says."""
    summary = (getattr(model, "training_info", None) or {}).get("object_areas", {})
    return {int(cid): min_size_from_p10(summary.get(str(int(cid)), {}).get("p10"), default, share)
            for cid in model.instance_class_ids}


def min_size_from_p10(p10: float | None, default: int = DEFAULT_MIN_SIZE, share: float = MIN_SIZE_SHARE) -> int:
    """The size rule of :func:`min_object_sizes` for one class: ``share`` of the 10th-percentile
    area ``p10`` of its annotated objects, never below ``default``; ``default`` when ``p10`` is None."""
    return max(int(default), int(share * float(p10))) if p10 else int(default)


def annotated_min_size(annotations, class_id: int, default: int = DEFAULT_MIN_SIZE,
                       share: float = MIN_SIZE_SHARE) -> int:
    """The smallest object a model trained on ``annotations`` keeps for ``class_id`` (the rule of
    :func:`min_object_sizes`, read from the annotations instead of a model), so another method's
    objects can be filtered the same way."""
    return min_size_from_p10(_p10(annotated_object_areas(annotations, class_id)), default, share)


def _min_size_of(min_size: int | dict[int, int], class_id: int) -> int:
    if isinstance(min_size, dict):
        return int(min_size.get(int(class_id), DEFAULT_MIN_SIZE))
    return int(min_size)


def _components(region: np.ndarray) -> np.ndarray:
    return label(region, connectivity=1)


def _distance_watershed(region: np.ndarray, split_depth: float) -> np.ndarray:
    """Split touching objects at the necks of the distance transform: one seed per maximum of the
    distance transform that rises at least ``split_depth`` pixels above the neck to any other
    (h-maxima), so an elongated object with a slightly uneven ridge stays whole."""
    distance = ndi.distance_transform_edt(region)
    markers = label(h_maxima(distance, max(float(split_depth), 1e-3)), connectivity=2)
    # A component whose maxima are all shallower (tiny objects) keeps one seed at its deepest pixel.
    components = label(region, connectivity=1)
    seeded = np.unique(components[markers > 0])
    missing = np.setdiff1d(np.arange(1, components.max() + 1), seeded)
    if len(missing):
        deepest = ndi.maximum_position(distance, components, missing)
        first = markers.max() + 1
        for i, pos in enumerate(deepest):
            markers[pos] = first + i
    return watershed(-distance, markers, mask=region)


def plain_instances(class_map: np.ndarray, instance_class_ids: Iterable[int], method: str = "watershed",
                    min_size: int | dict[int, int] = DEFAULT_MIN_SIZE, split_depth: float = 2.0) -> np.ndarray:
    """Instance labels (uint32, same shape) from a class map (Y, X) or (Z, Y, X), decoded per plane.

    ``method`` "components": connected components (4-connectivity) of each instance class;
    "watershed": the components are split at necks at least ``split_depth`` pixels narrower (in
    distance to the border) than the objects on both sides, so touching round objects become
    separate instances and a long, unevenly wide one stays whole. Objects smaller than
    ``min_size`` pixels (one number, or one per class id as :func:`min_object_sizes` gives) are
    dropped. Ids are consecutive and unique over the whole array.
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
            objects = _components(region) if method == "components" else _distance_watershed(region, split_depth)
            sizes = np.bincount(objects.ravel())
            keep = sizes >= _min_size_of(min_size, cid)
            keep[0] = False
            new_ids = np.zeros(len(sizes), dtype=np.uint32)
            new_ids[keep] = np.arange(next_id, next_id + keep.sum(), dtype=np.uint32)
            next_id += int(keep.sum())
            out[z][region] = new_ids[objects[region]]
    return out[0] if class_map.ndim == 2 else out


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
    return relabel_sequential(out)[0].astype(np.uint32, copy=False)


# ------------------------------------------------------------------------------ WISE decoder


@dataclass
class PixelEmbeddings:
    """Instance embeddings of (some of) the pixels of a plane of ``shape`` (Y, X): ``index`` holds
    their sorted flat pixel indices, ``values`` (N, E) their vectors. Inference keeps only the
    pixels near instance classes (see :func:`~napari_protoseg.prediction.tiling.predict_instance_maps`);
    :meth:`dense` wraps a full (E, Y, X) array. ``coordinates`` c > 0: a spatial embedding whose
    ``values`` are the learnt offsets; :meth:`at` adds c times the pixel's (y, x) to the first two
    channels (kept apart so that float16 storage loses no precision on large planes)."""

    shape: tuple[int, int]
    index: np.ndarray
    values: np.ndarray
    coordinates: float = 0.0

    @classmethod
    def dense(cls, embedding: np.ndarray) -> PixelEmbeddings:
        embedding = np.asarray(embedding)
        if embedding.ndim != 3:
            raise ValueError(f"a dense embedding must be (E, Y, X), got shape {embedding.shape}")
        e, h, w = embedding.shape
        return cls((h, w), np.arange(h * w), embedding.reshape(e, h * w).T)

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def available(self) -> np.ndarray:
        """(Y, X) bool: the pixels that have an embedding."""
        out = np.zeros(self.shape[0] * self.shape[1], dtype=bool)
        out[self.index] = True
        return out.reshape(self.shape)

    def at(self, flat: np.ndarray) -> np.ndarray:
        """(n, E) float32 vectors of the flat pixel indices ``flat`` (all must be available)."""
        flat = np.asarray(flat)
        pos = np.searchsorted(self.index, flat)
        if len(flat) and (pos.max() >= len(self.index) or np.any(self.index[pos] != flat)):
            raise ValueError("asked for the embedding of a pixel that was not kept")
        vectors = self.values[pos].astype(np.float32, copy=True if self.coordinates else False)
        if self.coordinates:
            ys, xs = np.divmod(flat, self.shape[1])
            vectors[:, 0] += np.float32(self.coordinates) * ys
            vectors[:, 1] += np.float32(self.coordinates) * xs
        return vectors


def _nearest(pixels: np.ndarray, seeds: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest seed (Euclidean, i.e. the most similar one) of every pixel vector, and
    its squared distance."""
    seed_norm = (seeds * seeds).sum(axis=1)
    index = np.empty(len(pixels), dtype=np.int64)
    distance = np.empty(len(pixels), dtype=np.float32)
    for start in range(0, len(pixels), chunk):
        block = pixels[start:start + chunk]
        d2 = seed_norm[None, :] - 2.0 * block @ seeds.T
        index[start:start + chunk] = np.argmin(d2, axis=1)
        distance[start:start + chunk] = d2[np.arange(len(block)), index[start:start + chunk]] + (block * block).sum(1)
    return index, distance


def _blob_seeds(probability: np.ndarray, region: np.ndarray, threshold: float) -> np.ndarray:
    """Flat index of the most probable pixel inside ``region`` of every blob (``probability >
    threshold``, 4-connected) that reaches into the region."""
    blobs, n = ndi.label(probability > threshold, structure=_CROSS)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    flat_blobs = blobs.reshape(-1)
    candidates = np.flatnonzero((flat_blobs > 0) & region.reshape(-1))
    order = np.lexsort((-probability.reshape(-1)[candidates], flat_blobs[candidates]))
    ordered = flat_blobs[candidates][order]
    first = np.r_[True, ordered[1:] != ordered[:-1]] if len(ordered) else np.zeros(0, bool)
    return candidates[order][first]


def _object_seeds(probability: np.ndarray, components: np.ndarray, threshold: float) -> np.ndarray:
    """Flat seed indices: one per blob of ``probability`` (see :func:`_blob_seeds`) inside the
    labelled ``components``, plus the most probable pixel of every component no blob reaches."""
    seeds = _blob_seeds(probability, components > 0, threshold)
    missing = np.setdiff1d(np.arange(1, int(components.max()) + 1), components.reshape(-1)[seeds])
    if len(missing):
        best = ndi.maximum_position(probability, components, missing)
        seeds = np.concatenate([seeds, np.ravel_multi_index(tuple(np.array(best).T), components.shape)])
    return seeds


def _similar_groups(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """For seed vectors (n, E): the index of each seed's group representative (its lowest index),
    where seeds whose similarity ``S = 2 / (1 + exp(|a - b|^2))`` exceeds ``threshold`` are grouped,
    transitively (the embedding says they are one object)."""
    n = len(vectors)
    d2 = ((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    # S > t  <=>  exp(d2) < 2 / t - 1
    linked = d2 < np.log(2.0 / threshold - 1.0)
    _, group = connected_components(csr_matrix(linked), directed=False)
    first = np.full(n, n, dtype=np.int64)
    np.minimum.at(first, group, np.arange(n))
    return first[group]


def _shape_seeds(region: np.ndarray, split_depth: float) -> np.ndarray:
    """Flat indices of the deepest pixel of every h-maximum (``split_depth``) of the region's
    distance transform: the watershed decoder's seeds, one per round part of an object."""
    distance = ndi.distance_transform_edt(region)
    markers, n = ndi.label(h_maxima(distance, max(float(split_depth), 1e-3)), structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    best = ndi.maximum_position(distance, markers, np.arange(1, n + 1))
    return np.ravel_multi_index(tuple(np.array(best).T), region.shape).astype(np.int64)


def wise_instances(class_map: np.ndarray, localization: np.ndarray, embedding, instance_class_ids: Sequence[int], *,
                   blob_threshold: float = 0.5, background_seeds: int = 0, background_ring: int = 6,
                   min_size: int | dict[int, int] = DEFAULT_MIN_SIZE, seed: int = 0,
                   merge_similarity: float | None = None, shape_seeds: bool = False,
                   split_depth: float = 2.0) -> np.ndarray:
    """WISE-Net instance labels (uint32, ids 1..n) of one plane.

    ``class_map`` (Y, X) class ids; ``localization`` (K, Y, X) blob probabilities, channel ``k`` for
    ``instance_class_ids[k]``; ``embedding`` (E, Y, X) or :class:`PixelEmbeddings` (covering the
    classes' regions and, with background seeds, the ``background_ring`` pixels around them).

    Per class, each connected part of its semantic region is decoded on its own: every blob of the
    localization map (``> blob_threshold``, 4-connected) gives a seed at its most probable pixel
    in the part, and a part no blob reaches gets one at its most probable pixel, so the semantic
    model's objects are never lost where the localization map is weak. A part with one seed is one
    object; in a part with several, every pixel goes to the seed whose embedding is most similar
    (``S = 2 / (1 + exp(|Ei - Ej|^2))``, i.e. the nearest) and each object keeps the piece
    connected to its seed. ``background_seeds`` > 0 also samples that many background seeds
    (seeded random choice among background pixels within ``background_ring`` pixels of the region)
    and drops the pixels more similar to one of them than to their object's seed (WISE-Net's
    trimming; off by default: it measured no better on the validation split). Objects smaller than
    ``min_size`` pixels (one number, or one per class id) are dropped.

    ``shape_seeds``: the maxima of the region's distance transform (h-maxima of depth
    ``split_depth``, the watershed decoder's seeds) propose seeds too, for objects the localization
    map missed. ``merge_similarity``: in a part with several seeds, seeds whose pixels' mean
    embeddings are more similar than this are one object (transitively): fragments of the
    localization map, or a round part of an object the shape proposed, rejoin their object.
    """
    class_map = np.asarray(class_map)
    localization = np.asarray(localization)
    ids = [int(c) for c in instance_class_ids]
    if class_map.ndim != 2:
        raise ValueError(f"wise_instances decodes one plane; class_map must be (Y, X), got {class_map.shape}")
    if localization.shape != (len(ids), *class_map.shape):
        raise ValueError(f"localization must be (K={len(ids)}, {class_map.shape[0]}, {class_map.shape[1]}) "
                         f"for the instance classes {ids}, got {localization.shape}")
    emb = embedding if isinstance(embedding, PixelEmbeddings) else PixelEmbeddings.dense(embedding)
    if emb.shape != class_map.shape:
        raise ValueError(f"the embedding covers a {emb.shape} plane, the class map is {class_map.shape}")
    if merge_similarity is not None and not 0.0 < merge_similarity < 1.0:
        raise ValueError(f"merge_similarity must be between 0 and 1 (a similarity), or None; got {merge_similarity!r}")
    rng = np.random.default_rng(seed)
    available = emb.available() if len(emb.index) < class_map.size else None
    out = np.zeros(class_map.shape, dtype=np.uint32)
    next_id = 1
    for k, cid in enumerate(ids):
        region = class_map == cid
        if not region.any():
            continue
        components = _components(region)
        flat_components = components.reshape(-1)
        seeds = _object_seeds(localization[k], components, blob_threshold)
        if shape_seeds:
            seeds = np.union1d(seeds, _shape_seeds(region, split_depth))
        seed_component = flat_components[seeds]
        # Parts with one seed are one object; parts with several are split by embedding similarity.
        seeds_per_component = np.bincount(seed_component, minlength=int(components.max()) + 1)
        single = np.zeros(len(seeds_per_component), dtype=np.int64)
        one = seeds_per_component[seed_component] == 1
        single[seed_component[one]] = np.flatnonzero(one) + 1
        objects = single[flat_components]
        boxes = ndi.find_objects(components)
        seed_object = np.arange(1, len(seeds) + 1)
        for part in np.flatnonzero(seeds_per_component > 1):
            mine = np.flatnonzero(seed_component == part)
            box = boxes[part - 1]
            ys, xs = np.nonzero(components[box] == part)
            pixels = np.ravel_multi_index((ys + box[0].start, xs + box[1].start), class_map.shape)
            vectors = emb.at(pixels)
            seed_vectors = emb.at(seeds[mine])
            nearest, _ = _nearest(vectors, seed_vectors)
            if merge_similarity is not None:
                # The mean embedding of each seed's pixels says more than the seed pixel's own.
                counts = np.bincount(nearest, minlength=len(mine))
                means = np.zeros_like(seed_vectors)
                np.add.at(means, nearest, vectors)
                means = np.where(counts[:, None] > 0, means / np.maximum(counts, 1)[:, None], seed_vectors)
                seed_object[mine] = mine[_similar_groups(means, merge_similarity)] + 1
            objects[pixels] = seed_object[mine[nearest]]
        if background_seeds > 0:
            ring = ndi.binary_dilation(region, _CROSS, iterations=max(1, int(background_ring))) & ~region
            if available is not None:
                ring &= available
            ring_pixels = np.flatnonzero(ring)
            n_bg = min(int(background_seeds), len(ring_pixels))
            if n_bg:
                bg_seeds = np.sort(rng.choice(ring_pixels, size=n_bg, replace=False))
                pixels = np.flatnonzero(region)
                vectors = emb.at(pixels)
                _, to_background = _nearest(vectors, emb.at(bg_seeds))
                own = emb.at(seeds)[objects[pixels] - 1]
                to_own = ((vectors - own) ** 2).sum(axis=1)
                objects[pixels[to_background < to_own]] = 0
        objects[seeds] = seed_object
        # Keep each object's piece connected to its seed.
        pieces = label(objects.reshape(class_map.shape), connectivity=1, background=0).reshape(-1)
        keep = np.zeros(pieces.max() + 1, dtype=bool)
        keep[pieces[seeds]] = True
        keep[0] = False
        objects[~keep[pieces]] = 0
        sizes = np.bincount(objects, minlength=len(seeds) + 1)
        kept = sizes >= _min_size_of(min_size, cid)
        kept[0] = False
        new_ids = np.zeros(len(sizes), dtype=np.uint32)
        new_ids[kept] = np.arange(next_id, next_id + kept.sum(), dtype=np.uint32)
        next_id += int(kept.sum())
        selected = objects > 0
        out.reshape(-1)[selected] = new_ids[objects[selected]]
    return out
