"""From an image and its annotations to training batches: normalisation, crops and their targets.

Pure NumPy/PyTorch. Crops are sampled where annotations are, mixing every annotation type present;
each crop's annotations become a :class:`~napari_protoseg.training.losses.CropTargets` in crop coordinates
(y, x), after the same flip / 90-degree rotation as the image crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.morphology import disk
from skimage.segmentation import flood

from napari_protoseg.training.losses import CropTargets
from napari_protoseg.annotations.project import NO_REGION, AnnotationSet
from napari_protoseg.model.inputs import Normalization, plane_with_context


# ------------------------------------------------------------------------- crop geometry


def _rot90_yx(y, x, size: int, k: int):
    """Where pixel (y, x) of a square crop lands after ``np.rot90(crop, k)``."""
    for _ in range(k % 4):
        y, x = size - 1 - x, y
    return y, x


def _rot90_rect(y0, x0, y1, x1, size: int, k: int):
    """The half-open rectangle [y0, y1) x [x0, x1) after ``np.rot90(crop, k)``."""
    for _ in range(k % 4):
        y0, x0, y1, x1 = size - x1, y0, size - x0, y1
    return y0, x0, y1, x1


@dataclass
class _Anchor:
    kind: str  # "mask", "box", "point", "tag"
    z: int
    y0: int
    x0: int
    y1: int
    x1: int
    class_index: int = -1

    @property
    def side(self) -> int:
        """The longer side of the anchor's region."""
        return max(self.y1 - self.y0, self.x1 - self.x0)


LARGEST_TAG_CROP = 512  # tag crops grow at most to this side to hold a present tag's region


def present_tag_sides(annotations: AnnotationSet) -> np.ndarray:
    """The longer side of the region of every present tag (the plane's for a whole-plane tag)."""
    tags = annotations.tags[annotations.tags["present"]]
    h, w = annotations.plane_shape
    whole = tags["y0"] == NO_REGION
    heights = np.where(whole, h, tags["y1"] - tags["y0"])
    widths = np.where(whole, w, tags["x1"] - tags["x0"])
    return np.maximum(heights, widths).astype(np.int64)


def tag_crop_limit(annotations: AnnotationSet, largest: int = LARGEST_TAG_CROP) -> int:
    """The longest present-tag side training can use: ``largest``, or less on smaller planes."""
    h, w = annotations.plane_shape
    return min(largest, h, w)


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def point_radii(points: np.ndarray, radius: int, halfway: bool = True) -> np.ndarray:
    """The spread radius of each point: ``radius``, and with ``halfway`` at most half the distance
    (rounded down) from an exhaustive point to the nearest other exhaustive point of its class in its
    plane. Exhaustive points mark different objects, so a point's spread stops halfway to its
    neighbour's: clustered points of small objects (specks) spread over little, lone ones fully."""
    radii = np.full(len(points), max(int(radius), 0), dtype=np.int64)
    if not halfway or len(points) < 2:
        return radii
    exhaustive = points["exhaustive"].astype(bool)
    keys = np.stack([points["z"], points["class"]], axis=1)
    for z, cid in np.unique(keys[exhaustive], axis=0):
        members = np.nonzero(exhaustive & (points["z"] == z) & (points["class"] == cid))[0]
        if len(members) < 2:
            continue
        yx = np.stack([points["y"][members], points["x"][members]], axis=1).astype(np.float64)
        distance, _ = cKDTree(yx).query(yx, k=2)
        radii[members] = np.minimum(radii[members], np.floor(distance[:, 1] / 2).astype(np.int64))
    return radii


def point_regions(volume: np.ndarray, points: np.ndarray, class_index: dict[int, int], radius: int,
                  tolerance: float, smoothing: float = 1.0, halfway: bool = True) -> np.ndarray:
    """Each point spread over the pixels around it that look like it: the 4-connected pixels within
    its radius (:func:`point_radii`: ``radius``, and with ``halfway`` at most half the way to the
    nearest other exhaustive point of its class) whose intensity (Gaussian-smoothed by
    ``smoothing``) differs from the point's by at most ``tolerance``. ``volume``: normalised
    (Z, Y, X). Returns the class index of every spread pixel, -1 elsewhere (int8 for at most 127
    classes, else int16) and where points of different classes claim the same pixel."""
    out = np.full(volume.shape, -1, dtype=np.int8 if len(class_index) < 128 else np.int16)
    if radius <= 0 or len(points) == 0:
        return out
    radii = point_radii(points, radius, halfway)
    conflict = np.zeros(volume.shape, dtype=bool)
    h, w = volume.shape[1:]
    for z in np.unique(points["z"]):
        plane = ndi.gaussian_filter(volume[z].astype(np.float32), smoothing) if smoothing else volume[z]
        for i in np.nonzero(points["z"] == z)[0]:
            r = int(radii[i])
            if r <= 0:  # the point teaches its own pixel (the point loss)
                continue
            p = points[i]
            y, x, cid = int(p["y"]), int(p["x"]), int(p["class"])
            y0, x0, y1, x1 = max(y - r, 0), max(x - r, 0), min(y + r + 1, h), min(x + r + 1, w)
            region = flood(plane[y0:y1, x0:x1], (y - y0, x - x0), tolerance=tolerance)
            region &= disk(r, dtype=bool)[y0 - y + r:y1 - y + r, x0 - x + r:x1 - x + r]
            window, clash = out[z, y0:y1, x0:x1], conflict[z, y0:y1, x0:x1]
            c = class_index[cid]
            clash |= region & (window >= 0) & (window != c)
            window[region] = c
    out[conflict] = -1
    return out


class CropSampler:
    """Samples square training crops around annotations and builds their targets.

    ``class_ids`` fixes the order of class indices (index i = ``class_ids[i]``). Each crop holds
    an annotation chosen in three draws: an annotation type, a class among those that type
    annotates, then one annotation of that class, each uniform. Rare types and rare classes (a few
    mitochondria among acres of cytoplasm) are thus seen as often as common ones. ``mask_share``,
    when given, is the share of crops centred on mask pixels when other types are present too (the
    other types share the rest uniformly): a dense mask teaches every pixel of a crop, a point one.

    A present tag says only that its class is somewhere in its region, so it teaches only in a crop
    that holds the whole region. Present tags wider than ``crop_size`` (up to
    :func:`tag_crop_limit`) therefore get crops of their own: a step is either ``batch_size`` crops
    of ``crop_size``, or a *tag step* of :attr:`tag_crop_size` crops centred on such tags, as many as
    hold about the same number of pixels. Tag steps are drawn so that these tags get the share of
    the pixels that the three draws above give them among the crops, so a step costs about the same
    whatever its kind. Present tags too wide even for that, and absent tags, centre ordinary crops.
    """

    def __init__(self, image: np.ndarray, annotations: AnnotationSet, normalization: Normalization,
                 crop_size: int = 256, context: int = 0, augment: bool = True, jitter: bool = True,
                 mask_share: float | None = None, point_spread: int = 0, point_spread_tolerance: float = 0.1,
                 point_spread_halfway: bool = True):
        if mask_share is not None and not 0.0 <= mask_share <= 1.0:
            raise ValueError(f"mask_share must be between 0 and 1, got {mask_share!r}")
        if point_spread < 0 or point_spread_tolerance < 0:
            raise ValueError(f"point_spread and point_spread_tolerance must be 0 or more, got {point_spread!r} "
                             f"and {point_spread_tolerance!r}")
        self.mask_share = mask_share
        self.annotations = annotations
        self.is_stack = annotations.is_stack
        self.volume = normalization(image)
        if not self.is_stack:
            self.volume = self.volume[None]
        self.class_ids = list(annotations.class_ids)
        self.index_of = {cid: i for i, cid in enumerate(self.class_ids)}
        self.n_classes = len(self.class_ids)
        h, w = annotations.plane_shape
        self.crop_size = int(min(crop_size, h, w))  # crops are square, so planes can be rotated
        self.context = context
        self.augment = augment
        self.jitter = jitter
        lut = np.full(max([0, *self.class_ids]) + 1, -1, dtype=np.int64)
        for cid, i in self.index_of.items():
            lut[cid] = i
        self.mask_index = None if annotations.masks is None else lut[annotations.masks.reshape(self.volume.shape)]
        # Points spread over their look-alike neighbourhood teach like mask pixels where no mask is.
        self.spread_index = None
        if point_spread > 0 and len(annotations.points):
            self.spread_index = point_regions(self.volume, annotations.points, self.index_of, point_spread,
                                              point_spread_tolerance, halfway=point_spread_halfway)
        self.anchors = self._collect_anchors()
        self._tag_crop_anchors = {c: large for c, group in self.anchors.get("tag", {}).items()
                                  if (large := [a for a in group if self._needs_tag_crop(a)])}
        sides = [a.side for group in self._tag_crop_anchors.values() for a in group]
        self.tag_crop_size = min(_round_up(max(sides), 16), h, w) if sides else self.crop_size
        self.tag_anchor_share = self._share_of_tag_crop_anchors()

    def _collect_anchors(self) -> dict[str, dict[int, list[_Anchor]]]:
        """Anchors by annotation type, then by class index."""
        ann = self.annotations
        anchors: dict[str, dict[int, list[_Anchor]]] = {}

        def add(anchor: _Anchor) -> None:
            anchors.setdefault(anchor.kind, {}).setdefault(anchor.class_index, []).append(anchor)

        if self.mask_index is not None:
            # Up to a few hundred random pixels of each class and plane stand for the masks.
            rng = np.random.default_rng(0)
            for z in range(self.volume.shape[0]):
                plane = self.mask_index[z]
                for c in range(self.n_classes):
                    ys, xs = np.nonzero(plane == c)
                    if len(ys):
                        pick = rng.choice(len(ys), size=min(len(ys), 256), replace=False)
                        for y, x in zip(ys[pick].tolist(), xs[pick].tolist()):
                            add(_Anchor("mask", z, y, x, y + 1, x + 1, c))
        for b in ann.boxes:
            add(_Anchor("box", int(b["z"]), int(b["y0"]), int(b["x0"]), int(b["y1"]), int(b["x1"]),
                        self.index_of[int(b["class"])]))
        for p in ann.points:
            add(_Anchor("point", int(p["z"]), int(p["y"]), int(p["x"]), int(p["y"]) + 1, int(p["x"]) + 1,
                        self.index_of[int(p["class"])]))
        h, w = ann.plane_shape
        for t in ann.tags:
            whole = int(t["y0"]) == NO_REGION
            y0, x0, y1, x1 = (0, 0, h, w) if whole else (int(t[f]) for f in ("y0", "x0", "y1", "x1"))
            # Absent tags, and present tags too wide for any crop, say nothing about where a class
            # is in a crop; they are all one group.
            anchor = _Anchor("tag", int(t["z"]), y0, x0, y1, x1)
            if t["present"] and anchor.side <= tag_crop_limit(ann):
                anchor.class_index = self.index_of[int(t["class"])]
            add(anchor)
        return anchors

    def _needs_tag_crop(self, anchor: _Anchor) -> bool:
        """A present tag whose region a crop of ``crop_size`` cannot hold."""
        return anchor.kind == "tag" and anchor.class_index >= 0 and anchor.side > self.crop_size

    def _kind_probabilities(self) -> dict[str, float]:
        """The probabilities of the type draw of :meth:`pick_anchor` (keep the two in step)."""
        kinds = sorted(self.anchors)
        if self.mask_share is not None and "mask" in kinds and len(kinds) > 1:
            return {k: self.mask_share if k == "mask" else (1.0 - self.mask_share) / (len(kinds) - 1) for k in kinds}
        return {k: 1.0 / len(kinds) for k in kinds}

    def _share_of_tag_crop_anchors(self) -> float:
        """How often :meth:`pick_anchor` picks a present tag that needs a tag crop."""
        by_class = self.anchors.get("tag", {})
        if not self._tag_crop_anchors:
            return 0.0
        within = sum(len(self._tag_crop_anchors.get(c, ())) / len(group) for c, group in by_class.items()) / len(by_class)
        return self._kind_probabilities()["tag"] * within

    def tag_step_plan(self, batch_size: int) -> tuple[int, float]:
        """(crops per tag step, probability of a tag step) for steps of ``batch_size`` crops.

        The probability gives the tag crops the pixel share :attr:`tag_anchor_share` (0 without
        present tags wider than a crop; 1 when nothing else is annotated)."""
        share = self.tag_anchor_share
        n_tag = max(1, round(batch_size * (self.crop_size / self.tag_crop_size) ** 2))
        if share <= 0.0 or share >= 1.0:
            return n_tag, float(share >= 1.0)
        tag_pixels = n_tag * self.tag_crop_size ** 2
        other_pixels = batch_size * self.crop_size ** 2
        return n_tag, share * other_pixels / (share * other_pixels + (1.0 - share) * tag_pixels)

    def pick_anchor(self, rng: np.random.Generator) -> _Anchor:
        """An annotation to centre a crop on: type (see ``mask_share``), class and annotation."""
        kinds = sorted(self.anchors)
        if self.mask_share is not None and "mask" in kinds and len(kinds) > 1:
            others = [k for k in kinds if k != "mask"]
            kind = "mask" if rng.random() < self.mask_share else others[int(rng.integers(len(others)))]
        else:
            kind = kinds[int(rng.integers(len(kinds)))]
        return self._pick_in(self.anchors[kind], rng)

    @staticmethod
    def _pick_in(by_class: dict[int, list[_Anchor]], rng: np.random.Generator) -> _Anchor:
        classes = sorted(by_class)
        group = by_class[classes[int(rng.integers(len(classes)))]]
        return group[int(rng.integers(len(group)))]

    def _pick_tag_crop_anchor(self, rng: np.random.Generator) -> _Anchor:
        """A present tag that needs a tag crop: class, then tag, uniform."""
        return self._pick_in(self._tag_crop_anchors, rng)

    def _pick_crop_anchor(self, rng: np.random.Generator) -> _Anchor:
        """As :meth:`pick_anchor`, but never a tag that needs a tag crop."""
        while True:
            anchor = self.pick_anchor(rng)
            if not self._needs_tag_crop(anchor):
                return anchor

    @property
    def has_annotations(self) -> bool:
        return bool(self.anchors)

    def _crop_origin(self, anchor: _Anchor, rng: np.random.Generator, s: int) -> tuple[int, int]:
        """Top-left corner of an s x s crop holding the anchor (whole, if it fits), chosen at random."""
        h, w = self.annotations.plane_shape
        origin = []
        for lo, hi, size in ((anchor.y0, anchor.y1, h), (anchor.x0, anchor.x1, w)):
            if hi - lo <= s:  # the crop can hold the anchor: start between hi - s and lo
                first, last = max(0, hi - s), min(lo, size - s)
            else:  # larger than a crop: any crop inside it
                first, last = lo, min(hi - s, size - s)
            first = min(max(first, 0), size - s)
            last = max(min(last, size - s), first)
            origin.append(int(rng.integers(first, last + 1)))
        return origin[0], origin[1]

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, CropTargets]:
        """A batch of augmented crops (B, 2k+1, S, S) and their targets: ``batch_size`` crops of
        ``crop_size``, or a tag step (see the class description)."""
        n_tag, tag_step_probability = self.tag_step_plan(batch_size)
        tag_step = 0.0 < tag_step_probability and (tag_step_probability >= 1.0 or rng.random() < tag_step_probability)
        if tag_step:
            size, pick, batch_size = self.tag_crop_size, self._pick_tag_crop_anchor, n_tag
        else:
            size, pick = self.crop_size, self._pick_crop_anchor
        images, masks, boxes, exhaustive, points, tags, points_exhaustive = [], [], [], [], [], [], []
        for b in range(batch_size):
            anchor = pick(rng)
            oy, ox = self._crop_origin(anchor, rng, size)
            k = int(rng.integers(4)) if self.augment else 0
            flip = bool(rng.integers(2)) if self.augment else False
            image, targets = self._crop(anchor.z, oy, ox, k, flip, size)
            if self.augment and self.jitter:
                image = _intensity_jitter(image, rng)
            images.append(image)
            masks.append(targets["mask"])
            exhaustive.append(targets["box_exhaustive"])
            points_exhaustive.append(targets["point_exhaustive"])
            boxes += [(b, *row) for row in targets["boxes"]]
            points += [(b, *row) for row in targets["points"]]
            tags += [(b, *row) for row in targets["tags"]]

        def table(rows, width):
            return torch.tensor(rows, dtype=torch.long).reshape(-1, width)

        return torch.from_numpy(np.stack(images)), CropTargets(
            mask=torch.from_numpy(np.stack(masks)),
            boxes=table(boxes, 7),
            box_exhaustive=torch.from_numpy(np.stack(exhaustive)),
            points=table(points, 4),
            tags=table(tags, 7),
            point_exhaustive=torch.from_numpy(np.stack(points_exhaustive)),
        )

    def _crop(self, z: int, oy: int, ox: int, k: int, flip: bool, s: int):
        """Crop an s x s square of plane z at (oy, ox), rotate by k quarter turns, flip left-right;
        targets follow."""
        ann = self.annotations
        h, w = ann.plane_shape
        image = plane_with_context(self.volume, z, self.context)[:, oy:oy + s, ox:ox + s]
        mask = (self.mask_index[z, oy:oy + s, ox:ox + s] if self.mask_index is not None
                else np.full((s, s), -1, dtype=np.int64))
        if self.spread_index is not None:
            mask = np.where(mask >= 0, mask, self.spread_index[z, oy:oy + s, ox:ox + s])

        def geometric(y0, x0, y1, x1):
            y0, x0, y1, x1 = _rot90_rect(y0, x0, y1, x1, s, k)
            if flip:
                x0, x1 = s - x1, s - x0
            return y0, x0, y1, x1

        box_rows = []
        exhaustive = np.zeros(self.n_classes, dtype=bool)
        in_plane = ann.boxes[ann.boxes["z"] == z]
        for cid in np.unique(in_plane["class"]):
            rows = in_plane[in_plane["class"] == cid]
            exhaustive[self.index_of[int(cid)]] = bool(np.all(rows["exhaustive"]))
        for bx in in_plane:
            y0, x0 = int(bx["y0"]) - oy, int(bx["x0"]) - ox
            y1, x1 = int(bx["y1"]) - oy, int(bx["x1"]) - ox
            if y1 <= 0 or x1 <= 0 or y0 >= s or x0 >= s:
                continue
            # A box cut by the crop's border is no longer tight (some of its rows or columns may
            # miss the object), so it gives no positive; it still keeps its pixels off the negatives.
            whole = y0 >= 0 and x0 >= 0 and y1 <= s and x1 <= s
            c = self.index_of[int(bx["class"])]
            box_rows.append((c, *geometric(max(y0, 0), max(x0, 0), min(y1, s), min(x1, s)), int(whole)))

        point_rows = []
        in_plane = ann.points[ann.points["z"] == z]
        # As for boxes: a class's points are exhaustive in this plane when all of them say so.
        points_exhaustive = np.zeros(self.n_classes, dtype=bool)
        for cid in np.unique(in_plane["class"]):
            points_exhaustive[self.index_of[int(cid)]] = bool(np.all(in_plane["exhaustive"][in_plane["class"] == cid]))
        for p in in_plane:
            y, x = int(p["y"]) - oy, int(p["x"]) - ox
            if 0 <= y < s and 0 <= x < s:
                y, x = _rot90_yx(y, x, s, k)
                if flip:
                    x = s - 1 - x
                point_rows.append((self.index_of[int(p["class"])], y, x))

        tag_rows = []
        in_plane = ann.tags[ann.tags["z"] == z]
        for t in in_plane:
            whole = int(t["y0"]) == NO_REGION
            y0, x0, y1, x1 = (0, 0, h, w) if whole else (int(t[f]) for f in ("y0", "x0", "y1", "x1"))
            y0, x0, y1, x1 = y0 - oy, x0 - ox, y1 - oy, x1 - ox
            present = bool(t["present"])
            if present:
                # The object may lie outside the crop unless the whole region is inside it.
                if not (y0 >= 0 and x0 >= 0 and y1 <= s and x1 <= s):
                    continue
            else:
                y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, s), min(x1, s)
                if y1 <= y0 or x1 <= x0:
                    continue
            tag_rows.append((self.index_of[int(t["class"])], int(present), *geometric(y0, x0, y1, x1)))

        image = np.rot90(image, k, axes=(1, 2))
        mask = np.rot90(mask, k)
        if flip:
            image = image[:, :, ::-1]
            mask = mask[:, ::-1]
        return np.ascontiguousarray(image), {
            "mask": np.ascontiguousarray(mask), "boxes": box_rows, "box_exhaustive": exhaustive,
            "points": point_rows, "tags": tag_rows, "point_exhaustive": points_exhaustive}


def _intensity_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gain, offset and gamma, as EM contrast varies from section to section."""
    gain = rng.uniform(0.8, 1.2)
    offset = rng.uniform(-0.1, 0.1)
    gamma = np.exp(rng.uniform(-0.25, 0.25))
    clipped = np.clip(image, 0.0, None)
    return (gain * np.power(clipped, gamma) + offset + (image - clipped)).astype(np.float32)
