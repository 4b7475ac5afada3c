"""Prediction from a trained model: the semantic class map, its confidence and the instances.

The one pipeline behind the napari panel, ``protoseg predict``, the headless demo and the
benchmark. :func:`prediction_run` predicts a plane, a region of a plane or every plane of a stack
and yields a :class:`PredictionPiece` per plane as soon as it is done; :func:`predict_instances`
gathers the pieces of a whole image into arrays. How a prediction becomes objects is one
:class:`DecoderSettings` value, which :func:`decode_instances` applies to each predicted plane.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
from skimage.segmentation import relabel_sequential

from napari_protoseg.annotations.project import label_dtype
from napari_protoseg.prediction.decoders import (DECODERS, DEFAULT_DECODER, link_planes, min_object_sizes,
                                                 plain_instances, wise_instances)
from napari_protoseg.prediction.tiling import (PlaneInstanceMaps, _image_dims, predict_instance_maps,
                                               predict_instance_maps_of_planes, predict_planes, predict_region)

__all__ = ["SCOPES", "DecoderSettings", "InstancePrediction", "PredictionError", "PredictionPiece", "check_decoder",
           "decode_instances", "predict_instances", "prediction_run"]

Region = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open pixel range of a plane
# What prediction_run predicts: plane z, a region of plane z, or every plane.
SCOPES = ("plane", "region", "stack")


class PredictionError(ValueError):
    """Settings or input that a prediction cannot go with; ``str(err)`` says what to change."""


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _size_floor(value, what: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise PredictionError(f"{what} must be a whole number of pixels (0 or more), not {value!r}")
    return int(value)


@dataclass(frozen=True)
class DecoderSettings:
    """How a model's prediction becomes objects: the one configuration of the panel, ``protoseg
    predict``, the demo and the benchmark (defaults: the command line's).

    ``decoder``: one of :data:`~napari_protoseg.prediction.decoders.DECODERS`. ``min_size``: the
    smallest object kept, in pixels (one number, or one per class id); None: the floors the model
    learnt (:func:`~napari_protoseg.prediction.decoders.min_object_sizes`). ``split_depth``: how much
    narrower (pixels of distance to the border) a neck must be for the watershed to split there (and
    the depth of the WISE decoder's shape seeds). ``link_3d``: a whole stack's objects are linked
    from plane to plane into 3D objects where they overlap by at least ``min_overlap`` of the
    smaller one (:func:`~napari_protoseg.prediction.decoders.link_planes`). ``tta``: the semantic
    prediction by test-time augmentation (8 passes, see :mod:`~napari_protoseg.prediction.tiling`).
    Bad values raise :class:`PredictionError`.
    """

    decoder: str = DEFAULT_DECODER
    min_size: int | Mapping[int, int] | None = None
    # WISE decoder: seeds of one part of the class map whose pixels' mean embeddings are more similar
    # than this are one object (None: every seed its own object; why 0.5: docs/decisions.md).
    merge_similarity: float | None = 0.5
    # WISE decoder: the maxima of the distance transform propose seeds too (off: docs/decisions.md).
    shape_seeds: bool = False
    split_depth: float = 2.0
    link_3d: bool = False
    min_overlap: float = 0.3
    tta: bool = False

    def __post_init__(self):
        if not isinstance(self.decoder, str) or self.decoder not in DECODERS:
            raise PredictionError(f"unknown instance decoder {self.decoder!r}; choose one of {', '.join(DECODERS)}")
        if isinstance(self.min_size, Mapping):
            floors = {}
            for class_id, floor in self.min_size.items():
                if not isinstance(class_id, (int, np.integer)) or isinstance(class_id, bool):
                    raise PredictionError(f"min_size: the keys are class ids (whole numbers), not {class_id!r}")
                floors[int(class_id)] = _size_floor(floor, f"min_size of class {class_id}")
            object.__setattr__(self, "min_size", floors)  # a copy: the settings do not change with the caller's dict
        elif self.min_size is not None:
            object.__setattr__(self, "min_size", _size_floor(self.min_size, "min_size"))
        if self.merge_similarity is not None and not (_is_number(self.merge_similarity)
                                                      and 0.0 < self.merge_similarity < 1.0):
            raise PredictionError(f"merge_similarity must be between 0 and 1 (a similarity; both excluded), or None "
                                  f"to merge no seeds; got {self.merge_similarity!r}")
        if not (_is_number(self.split_depth) and self.split_depth > 0):
            raise PredictionError(f"split_depth must be a positive number of pixels, not {self.split_depth!r}")
        if not (_is_number(self.min_overlap) and 0.0 <= self.min_overlap <= 1.0):
            raise PredictionError(f"min_overlap must be a share between 0 and 1, not {self.min_overlap!r}")
        for name in ("shape_seeds", "link_3d", "tta"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise PredictionError(f"{name} must be True or False, not {getattr(self, name)!r}")


def check_decoder(model, settings: DecoderSettings) -> None:
    """Raise :class:`PredictionError` when ``model`` cannot decode with ``settings`` (the 'wise'
    decoder needs the instance heads that only a model trained with an instance class has)."""
    if settings.decoder == "wise" and not model.has_instance_heads:
        raise PredictionError("The 'wise' instance decoder needs a model with instance heads, which only a model "
                              "trained with a class flagged as instances has (it learns where objects are from "
                              "them). Flag the organelle classes as instances in the class table and train again, "
                              "or choose the 'components' or 'watershed' decoder.")


@dataclass
class PredictionPiece:
    """A predicted plane or region (class ids, instance ids 1..n of this piece, confidence), or, at
    the end of a whole stack with ``link_3d``, the instances of all planes linked into 3D objects.
    ``confidence`` is None where a given class map was decoded; ``done`` / ``total``: planes."""

    z: int | None
    origin: tuple[int, int]
    semantic: np.ndarray | None
    instances: np.ndarray | None
    confidence: np.ndarray | None
    done: int
    total: int
    linked_instances: np.ndarray | None = None


def decode_instances(model, class_map: np.ndarray, settings: DecoderSettings,
                     maps: PlaneInstanceMaps | None = None, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Instance labels (uint32, ids 1..n) of one predicted plane, or of the region at ``origin`` of a
    plane: THE place where a prediction becomes objects.

    ``class_map``: the class ids of the plane or region. ``maps``: the whole plane's
    :class:`~napari_protoseg.prediction.tiling.PlaneInstanceMaps`, which the 'wise' decoder decodes
    (its seeds may lie outside a region); its objects are then kept where ``class_map`` says an
    instance class, so they stay within the semantic prediction shown next to them.
    """
    ids = model.instance_class_ids
    min_size = settings.min_size if settings.min_size is not None else min_object_sizes(model)
    if settings.decoder != "wise":
        return plain_instances(class_map, ids, method=settings.decoder, min_size=min_size,
                               split_depth=settings.split_depth)
    if maps is None:
        raise PredictionError("the 'wise' decoder decodes the plane's instance maps (predict_instance_maps); "
                              "pass them as maps")
    labels = wise_instances(maps.classes, maps.localization, maps.embedding, ids, min_size=min_size,
                            merge_similarity=settings.merge_similarity, shape_seeds=settings.shape_seeds,
                            split_depth=settings.split_depth)
    (y0, x0), (h, w) = origin, class_map.shape
    inside = np.isin(class_map, ids)
    return relabel_sequential(np.where(inside, labels[y0:y0 + h, x0:x0 + w], 0))[0].astype(np.uint32, copy=False)


def prediction_run(model, image, scope: str = "stack", z: int | None = None, region: Region | None = None,
                   settings: DecoderSettings | None = None, *, class_map=None,
                   stop: Callable[[], bool] | None = None, progress: Callable[[int, int], Any] | None = None,
                   tile: int = 512, overlap: int = 64, device=None, batch_size: int = 4) -> Iterator[PredictionPiece]:
    """Predict plane ``z`` ("plane"), the ``region`` (y0, x0, y1, x1) of plane ``z`` ("region";
    clipped to the image, None: the whole plane) or every plane ("stack") of a plane (Y, X, ``z``
    None) or stack (Z, Y, X), and decode its objects with ``settings`` (default
    :class:`DecoderSettings`). Returns a generator of one :class:`PredictionPiece` per plane, as
    each is done; with ``settings.link_3d``, a finished stack ends with the piece of the linked
    instances. Instance ids start at 1 in every piece.

    The input is checked here (a :class:`PredictionError` says what is wrong), the work is done
    while iterating. ``stop()`` is checked before each plane and each row of tiles and ends the run
    (no linked piece then); ``progress(done, total)`` is called after each plane. ``class_map``
    (class ids, the shape of the image): a semantic prediction already made, which the plain
    decoders decode instead of predicting again (the 'wise' decoder predicts its own maps). ``tile``,
    ``overlap``, ``device``, ``batch_size``: as in :mod:`~napari_protoseg.prediction.tiling`.
    """
    settings = DecoderSettings() if settings is None else settings
    if not isinstance(settings, DecoderSettings):
        raise PredictionError(f"settings must be a DecoderSettings, not {type(settings).__name__}")
    if scope not in SCOPES:
        raise PredictionError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    check_decoder(model, settings)
    is_stack, (height, width) = _image_dims(image)
    if scope == "stack":
        planes = list(range(int(image.shape[0]))) if is_stack else [None]
    elif not is_stack:
        planes = [None]
    elif z is None or not 0 <= int(z) < int(image.shape[0]):
        raise PredictionError(f"give the plane z of the {int(image.shape[0])}-plane stack to predict, not {z!r}")
    else:
        planes = [int(z)]
    y0, x0, y1, x1 = region if scope == "region" and region is not None else (0, 0, height, width)
    y0, x0, y1, x1 = max(0, int(y0)), max(0, int(x0)), min(height, int(y1)), min(width, int(x1))
    if y1 <= y0 or x1 <= x0:
        raise PredictionError(f"the region {tuple(region)} holds no pixel of the {height} x {width} plane")
    if class_map is not None and settings.decoder != "wise":
        class_map = np.asarray(class_map)
        if class_map.shape != tuple(int(s) for s in image.shape):
            raise PredictionError(f"class_map has shape {class_map.shape}, the image {tuple(image.shape)}")
    else:
        class_map = None
    tiling = {"tile": tile, "overlap": overlap, "device": device, "batch_size": batch_size}
    predicted = _predicted_planes(model, image, planes, scope, (y0, x0, y1, x1), settings, class_map, stop, tiling)
    return _pieces(model, predicted, len(planes), scope == "stack" and is_stack and settings.link_3d, settings,
                   progress)


def _predicted_planes(model, image, planes: list, scope: str, bounds: Region, settings: DecoderSettings,
                      class_map, stop, tiling: dict):
    """Yield (z, class ids, confidence or None, origin, whole-plane instance maps or None) per plane."""
    y0, x0, y1, x1 = bounds
    tta = settings.tta
    indices = [0 if z is None else z for z in planes]
    if class_map is not None:
        for z in planes:
            if stop is not None and stop():
                return
            plane = class_map if z is None else class_map[z]
            yield z, plane[y0:y1, x0:x1], None, (y0, x0), None
    elif scope == "region":
        for z in planes:
            if stop is not None and stop():
                return
            part = predict_region(model, image, z, y0, x0, y1, x1, tta=tta, **tiling)
            # The 'wise' decoder's seeds may lie outside the region: it decodes the whole plane's maps.
            maps = predict_instance_maps(model, image, z, tta=tta, **tiling) if settings.decoder == "wise" else None
            yield z, part.classes, part.confidence, part.origin, maps
    elif settings.decoder == "wise":
        # The instance maps of a whole plane hold its semantic prediction too: one pass per plane.
        for z, (_, maps) in zip(planes, predict_instance_maps_of_planes(model, image, indices, stop=stop, tta=tta,
                                                                        **tiling)):
            yield z, maps.classes, maps.confidence, (0, 0), maps
    else:
        for z, (_, part) in zip(planes, predict_planes(model, image, indices, stop=stop, tta=tta, **tiling)):
            yield z, part.classes, part.confidence, (0, 0), None


def _pieces(model, predicted, total: int, link: bool, settings: DecoderSettings,
            progress) -> Iterator[PredictionPiece]:
    collected = [] if link else None
    for done, (z, classes, confidence, origin, maps) in enumerate(predicted, start=1):
        instances = decode_instances(model, classes, settings, maps=maps, origin=origin)
        if collected is not None:
            collected.append(instances)
        if progress is not None:
            progress(done, total)
        yield PredictionPiece(z, origin, classes, instances, confidence, done, total)
    if collected is not None and len(collected) == total:
        offsets = np.cumsum([0] + [int(p.max(initial=0)) for p in collected[:-1]])
        stacked = np.stack([np.where(p > 0, p + o, 0) for p, o in zip(collected, offsets)]).astype(np.uint32)
        yield PredictionPiece(None, (0, 0), None, None, None, total, total,
                              linked_instances=link_planes(stacked, min_overlap=settings.min_overlap))


@dataclass
class InstancePrediction:
    """Instances predicted by :func:`predict_instances`.

    ``labels`` (uint32, shape of the image): unique id per object, per plane or linked into 3D
    objects (``linked_3d``); ``classes`` / ``confidence``: the semantic prediction of the same pass
    (None when a class map was given); ``stopped`` when ``stop()`` ended the run early (planes from
    ``planes_done`` on are 0).
    """

    labels: np.ndarray
    classes: Any | None
    confidence: Any | None
    decoder: str
    linked_3d: bool
    planes_done: int
    planes_total: int
    stopped: bool = False


def predict_instances(model, image, settings: DecoderSettings | None = None, *, class_map=None,
                      progress: Callable[[int, int], Any] | None = None, stop: Callable[[], bool] | None = None,
                      tile: int = 512, overlap: int = 64, device=None, batch_size: int = 4) -> InstancePrediction:
    """The classes, confidence and instances of every plane of a plane (Y, X) or stack (Z, Y, X):
    the pieces of :func:`prediction_run` over the whole image, gathered (what ``protoseg predict``,
    the demo and the benchmark use). Only the classes flagged ``instances`` get objects; ids are
    unique over the whole array, numbered plane after plane (or linked in 3D with
    ``settings.link_3d``). ``class_map``, ``progress``, ``stop`` and the tiling: as in
    :func:`prediction_run`.
    """
    settings = DecoderSettings() if settings is None else settings
    check_decoder(model, settings)
    if not model.instance_class_ids:
        raise PredictionError("the model has no class flagged 'instances'; flag the organelle classes to count as "
                              "objects in the class table and train again")
    is_stack, plane_shape = _image_dims(image)
    n_planes = int(image.shape[0]) if is_stack else 1
    labels = np.zeros((n_planes, *plane_shape), dtype=np.uint32)
    own_pass = class_map is None or settings.decoder == "wise"
    classes = np.zeros((n_planes, *plane_shape), dtype=label_dtype(max(model.class_ids))) if own_pass else None
    confidence = np.zeros((n_planes, *plane_shape), dtype=np.float32) if own_pass else None
    next_id, done, linked = 0, 0, None
    for piece in prediction_run(model, image, "stack", settings=settings, class_map=class_map, stop=stop,
                                progress=progress, tile=tile, overlap=overlap, device=device, batch_size=batch_size):
        if piece.linked_instances is not None:
            linked = piece.linked_instances
            continue
        index = 0 if piece.z is None else piece.z
        labels[index] = np.where(piece.instances > 0, piece.instances + np.uint32(next_id), 0)
        next_id += int(piece.instances.max(initial=0))
        if own_pass:
            classes[index], confidence[index] = piece.semantic, piece.confidence
        done = piece.done
    linked_3d = bool(settings.link_3d and is_stack)
    if linked_3d:  # a stopped run links the planes it did
        labels = linked if linked is not None else link_planes(labels, min_overlap=settings.min_overlap)
    if not is_stack:
        labels = labels[0]
        classes, confidence = (classes[0], confidence[0]) if own_pass else (None, None)
    return InstancePrediction(labels=labels, classes=classes, confidence=confidence, decoder=settings.decoder,
                              linked_3d=linked_3d, planes_done=done, planes_total=n_planes,
                              stopped=done < n_planes)
