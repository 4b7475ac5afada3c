"""How the panel predicts: the decoder settings of its prediction runs (the runs themselves are
:func:`~napari_protoseg.prediction.pipeline.prediction_run`, the command line's pipeline)."""

from __future__ import annotations

from napari_protoseg.prediction import DEFAULT_DECODER
from napari_protoseg.prediction.pipeline import DecoderSettings


def prediction_settings(decoder: str = DEFAULT_DECODER, tta: bool = False) -> DecoderSettings:
    """The decoder settings the panel predicts with: the decoder chosen, test-time augmentation as
    ticked, a whole stack's objects linked from plane to plane into 3D objects, the rest as
    :class:`~napari_protoseg.prediction.pipeline.DecoderSettings` has them (as ``protoseg predict``)."""
    return DecoderSettings(decoder=decoder, tta=tta, link_3d=True)
