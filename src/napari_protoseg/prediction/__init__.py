"""Prediction with a trained model: tiled and lazy inference, the instance decoders, and the one
pipeline that turns a model and an image into class maps, confidence and instances.

The decoders' names are declared here, light to import (``protoseg --help`` lists them without
loading SciPy or scikit-image); :mod:`~napari_protoseg.prediction.decoders` implements them.
"""

# The instance decoders by name: the one list that the command line, the panel and the pipeline offer.
PLAIN_DECODERS = ("components", "watershed")
DECODERS = ("wise", *PLAIN_DECODERS)
# Connected components of the class map with the size floor: on mitochondria of the validation split
# (models trained on rows 0-767 of sections 0-9, scored on rows 768-1023) the WISE decoder matched as
# many or slightly fewer (AP50 mixed 0.086 vs 0.089, masks+points 0.062 vs 0.065): its localization
# map rarely finds two objects in one part of the class map. The watershed splits elongated ones.
DEFAULT_DECODER = "components"
