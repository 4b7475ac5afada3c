"""The prediction run of the panel: a generator of predicted planes or regions, with their instances
(the panel runs it in a worker thread)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from napari_protoseg.model.file import TrainedModel
from napari_protoseg.plugin.session.common import Region, SessionError
from napari_protoseg.prediction.decoders import (DEFAULT_DECODER, PLAIN_DECODERS, link_planes, min_object_sizes,
                                                 plain_instances, relabel_sequential, wise_instances)
from napari_protoseg.prediction.tiling import PlaneInstanceMaps, predict_instance_maps, predict_plane, predict_region

# Instance decoders offered in the panel. The learned WISE-Net decoder joins this list; see
# :func:`decode_instances`, the one place where the decoder is applied.
INSTANCE_DECODERS = ("wise", *PLAIN_DECODERS)


@dataclass
class PredictionPiece:
    """A predicted plane or region (class ids, instance ids 1..n of this piece, confidence), or, at
    the end of a whole stack, the instances of all planes linked into 3D objects."""

    z: int | None
    origin: tuple[int, int]
    semantic: np.ndarray | None
    instances: np.ndarray | None
    confidence: np.ndarray | None
    done: int
    total: int
    linked_instances: np.ndarray | None = None


def decode_instances(model: TrainedModel, image: np.ndarray, class_map: np.ndarray, z: int | None,
                     region: Region, decoder: str = DEFAULT_DECODER, tta: bool = False,
                     maps: PlaneInstanceMaps | None = None) -> np.ndarray:
    """Instance labels (uint32, ids 1..n) of a predicted plane or region: THE place where the panel
    turns a prediction into instances (switch ``decoder`` here to use another decoder).

    ``class_map`` holds the class ids of ``region`` = (y0, x0, y1, x1) of plane ``z`` of ``image``;
    the model and image are there for decoders that look at more than the class map. ``maps``: the
    plane's :func:`~napari_protoseg.prediction.tiling.predict_instance_maps`, if already predicted (else the
    'wise' decoder predicts them, with ``tta``).
    """
    if decoder not in INSTANCE_DECODERS:
        raise SessionError(f"Unknown instance decoder '{decoder}'; choose one of {', '.join(INSTANCE_DECODERS)}.")
    instance_ids = model.instance_class_ids
    min_sizes = min_object_sizes(model)
    if decoder != "wise":
        return plain_instances(class_map, instance_ids, method=decoder, min_size=min_sizes)
    if not model.has_instance_heads:
        raise SessionError("The 'wise' instance decoder needs a model trained with a class flagged as "
                           "instances (it learns where objects are from them). Flag the organelle classes in "
                           "the class table and train again, or choose 'watershed'.")
    # The learned maps of the whole plane (seeds may lie outside the region), cut to the region.
    if maps is None:
        maps = predict_instance_maps(model, image, z, tta=tta)
    labels = wise_instances(maps.classes, maps.localization, maps.embedding, model.instance_class_ids,
                            min_size=min_sizes)
    y0, x0, y1, x1 = region
    # Objects stay within the semantic prediction shown next to them.
    inside = np.isin(class_map, instance_ids)
    return relabel_sequential(np.where(inside, labels[y0:y1, x0:x1], 0))


def prediction_run(model: TrainedModel, image: np.ndarray, scope: str, z: int | None = None,
                   region: Region | None = None, decoder: str = DEFAULT_DECODER,
                   stop: Callable[[], bool] | None = None, tta: bool = False) -> Iterator[PredictionPiece]:
    """Predict the plane ``z`` ("plane"), a region of it ("region") or every plane ("stack");
    yields a :class:`PredictionPiece` per plane (runs on a worker thread). ``tta``: test-time
    augmentation (8 passes per tile, see :mod:`~napari_protoseg.prediction.tiling`)."""
    is_stack = np.ndim(image) == 3
    plane_index = (lambda k: k) if is_stack else (lambda k: None)
    if scope == "stack":
        planes = list(range(image.shape[0])) if is_stack else [None]
    elif scope in ("plane", "region"):
        planes = [z if is_stack else None]
    else:
        raise ValueError(f"scope must be 'plane', 'region' or 'stack', not {scope!r}")
    height, width = np.shape(image)[-2:]
    y0, x0, y1, x1 = region if scope == "region" and region is not None else (0, 0, height, width)
    collected = [] if scope == "stack" and is_stack else None
    # The 'wise' decoder needs the whole plane's instance maps, which hold its semantic prediction too.
    whole_plane_maps = decoder == "wise" and scope != "region" and model.has_instance_heads
    for done, plane in enumerate(planes, start=1):
        if stop is not None and stop():
            return
        maps = None
        if whole_plane_maps:
            maps = predict_instance_maps(model, image, plane_index(plane), tta=tta)
            classes, confidence, (ry0, rx0) = maps.classes, maps.confidence, (0, 0)
        else:
            if scope == "region":
                result = predict_region(model, image, plane_index(plane), y0, x0, y1, x1, tta=tta)
            else:
                result = predict_plane(model, image, plane_index(plane), tta=tta)
            classes, confidence, (ry0, rx0) = result.classes, result.confidence, result.origin
        h, w = classes.shape
        instances = decode_instances(model, image, classes, plane, (ry0, rx0, ry0 + h, rx0 + w), decoder,
                                     tta=tta, maps=maps)
        if collected is not None:
            collected.append(instances)
        yield PredictionPiece(plane, (ry0, rx0), classes, instances, confidence, done, len(planes))
    if collected is not None:
        offsets = np.cumsum([0] + [int(p.max(initial=0)) for p in collected[:-1]])
        stacked = np.stack([np.where(p > 0, p + o, 0) for p, o in zip(collected, offsets)]).astype(np.uint32)
        yield PredictionPiece(None, (0, 0), None, None, None, len(planes), len(planes),
                              linked_instances=link_planes(stacked))
