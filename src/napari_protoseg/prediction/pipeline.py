"""Prediction from a trained model: the semantic class map, its confidence and the instances.

The entry point the command line, the demo and the benchmark call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_protoseg.annotations.project import label_dtype
from napari_protoseg.prediction.decoders import (DECODERS, DEFAULT_DECODER, WISE_MERGE_SIMILARITY, WISE_SHAPE_SEEDS,
                                                 link_planes, min_object_sizes, plain_instances, wise_instances)
from napari_protoseg.prediction.tiling import (_image_dims, predict_instance_maps_of_planes,
                                               predict_volume)


def default_decoder(model) -> str:
    """The decoder used when none is asked for: :data:`DEFAULT_DECODER` for every model."""
    return DEFAULT_DECODER


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


def predict_instances(model, image, *, decoder: str | None = None, link_3d: bool = False,
                      class_map=None, min_size: int | dict[int, int] | None = None, min_overlap: float = 0.3,
                      split_depth: float = 2.0, tile: int = 512, overlap: int = 64, device=None, batch_size: int = 4,
                      progress: Callable[[int, int], Any] | None = None,
                      stop: Callable[[], bool] | None = None, tta: bool = False,
                      merge_similarity: float | None = WISE_MERGE_SIMILARITY,
                      shape_seeds: bool = WISE_SHAPE_SEEDS) -> InstancePrediction:
    """Instances of the model's classes flagged ``instances`` in a plane (Y, X) or stack (Z, Y, X).

    ``decoder``: ``"components"`` (the default), ``"watershed"`` or ``"wise"`` (needs instance heads).
    ``class_map`` (class ids, shape of the image): a semantic prediction already made (e.g. by
    :func:`~napari_protoseg.prediction.tiling.predict_volume`), which the plain decoders then use instead of
    predicting again. ``link_3d`` links the planes'
    objects into 3D objects by overlap (:func:`link_planes`, ``min_overlap``); ids are unique over
    the whole array either way. ``min_size``: smallest object kept, in pixels (one number or one per
    class id); by default :func:`min_object_sizes` of the model (half the small annotated
    objects). ``progress(done, total)`` is called after each plane, ``stop()`` before each.
    ``tta``: the semantic prediction by test-time augmentation (see :mod:`~napari_protoseg.prediction.tiling`).
    ``merge_similarity``, ``shape_seeds``: the WISE decoder's (see :func:`wise_instances`).
    """
    decoder = default_decoder(model) if decoder is None else decoder
    if decoder not in DECODERS:
        raise ValueError(f"unknown instance decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    if decoder == "wise" and not model.has_instance_heads:
        raise ValueError("the 'wise' decoder needs a model with instance heads; this model has none (train it "
                         "with a class flagged 'instances'), or choose the 'watershed' or 'components' decoder")
    is_stack, _ = _image_dims(image)
    shape = tuple(int(s) for s in image.shape)
    n_planes = shape[0] if is_stack else 1
    ids = model.instance_class_ids
    if not ids:
        raise ValueError("the model has no class flagged 'instances'; flag the organelle classes to count as "
                         "objects in the class table and train again")
    if min_size is None:
        min_size = min_object_sizes(model)
    labels = np.zeros((n_planes, *shape[-2:]), dtype=np.uint32)
    classes = confidence = None
    done, stopped = 0, False
    if decoder == "wise":
        classes = np.zeros((n_planes, *shape[-2:]), dtype=label_dtype(max(model.class_ids)))
        confidence = np.zeros((n_planes, *shape[-2:]), dtype=np.float32)
        next_id = 0
        for z, maps in predict_instance_maps_of_planes(model, image, tile=tile, overlap=overlap, device=device,
                                                       batch_size=batch_size, stop=stop, tta=tta):
            plane = wise_instances(maps.classes, maps.localization, maps.embedding, ids, min_size=min_size,
                                   merge_similarity=merge_similarity, shape_seeds=shape_seeds,
                                   split_depth=split_depth)
            labels[z] = np.where(plane > 0, plane + next_id, 0)
            next_id += int(plane.max(initial=0))
            classes[z], confidence[z] = maps.classes, maps.confidence
            done += 1
            if progress is not None:
                progress(done, n_planes)
        stopped = done < n_planes
        if not is_stack:
            classes, confidence = classes[0], confidence[0]
    else:
        if class_map is None:
            prediction = predict_volume(model, image, tile=tile, overlap=overlap, device=device,
                                        batch_size=batch_size, stop=stop, tta=tta)
            class_map, classes, confidence = prediction.classes, prediction.classes, prediction.confidence
            done, stopped = prediction.planes_done, prediction.stopped
        else:
            class_map = np.asarray(class_map)
            if class_map.shape != shape:
                raise ValueError(f"class_map has shape {class_map.shape}, the image {shape}")
            done = n_planes
        planes = np.asarray(class_map).reshape(n_planes, *shape[-2:])
        labels[:done] = plain_instances(planes[:done], ids, method=decoder, min_size=min_size,
                                        split_depth=split_depth).reshape(done, *shape[-2:])
        if progress is not None:
            progress(done, n_planes)
    if link_3d and is_stack:
        labels = link_planes(labels, min_overlap=min_overlap)
    return InstancePrediction(labels=labels if is_stack else labels[0], classes=classes, confidence=confidence,
                              decoder=decoder, linked_3d=bool(link_3d and is_stack), planes_done=done,
                              planes_total=n_planes, stopped=stopped)

