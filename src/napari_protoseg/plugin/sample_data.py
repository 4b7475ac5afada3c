"""The npe2 sample-data command: the synthetic EM stack with its annotation layers."""

from __future__ import annotations

from napari_protoseg.annotations import synthetic
from napari_protoseg.plugin.layers import annotation_layers, axis_labels


def napari_sample() -> list:
    """npe2 sample-data command: the default synthetic stack and its annotation layers."""
    sample = synthetic.generate_sample()
    image_layer = (sample.image, {"name": "EM (synthetic)", "axis_labels": axis_labels(sample.image.ndim)}, "image")
    return [image_layer] + list(annotation_layers(sample.annotations))
