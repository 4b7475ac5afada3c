"""How each instance decoder of a trained model does on labelled objects (the demo and the benchmark)."""

from __future__ import annotations

import time

import numpy as np

from napari_protoseg.evaluation.metrics import instance_figures
from napari_protoseg.prediction import pipeline

__all__ = ["decoder_figures"]


def decoder_figures(model, image: np.ndarray, class_map: np.ndarray, truth: np.ndarray, class_id: int) -> dict:
    """:func:`~napari_protoseg.evaluation.metrics.instance_figures` of the objects of ``class_id``
    against the true instances ``truth`` (Z, Y, X) for each decoder of ``model``: ``wise`` (with
    instance heads), ``watershed`` and ``components`` (both of the class map ``class_map``), each with
    its decoding time in ``seconds``. Empty where the model does not separate that class's objects."""
    if class_id not in model.instance_class_ids:
        return {}
    decoders = (["wise"] if model.has_instance_heads else []) + ["watershed", "components"]
    out = {}
    for decoder in decoders:
        start = time.perf_counter()
        prediction = pipeline.predict_instances(model, image, pipeline.DecoderSettings(decoder=decoder),
                                                class_map=None if decoder == "wise" else class_map)
        labels = prediction.labels
        if len(model.instance_class_ids) > 1:  # the objects of the other instance classes are not scored
            own = np.asarray(prediction.classes if prediction.classes is not None else class_map) == class_id
            labels = np.where(own, labels, 0)
        out[decoder] = {**instance_figures(labels, truth), "seconds": time.perf_counter() - start}
    return out
