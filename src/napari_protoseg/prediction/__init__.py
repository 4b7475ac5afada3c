"""Prediction with a trained model: tiled and lazy inference, the instance decoders, and the one
pipeline that turns a model and an image into class maps, confidence and instances.

The decoders' names are declared here, light to import (``protoseg --help`` lists them without
loading SciPy or scikit-image); :mod:`~napari_protoseg.prediction.decoders` implements them.
"""

# The instance decoders by name: the one list that the command line, the panel and the pipeline offer.
PLAIN_DECODERS = ("components", "watershed")
DECODERS = ("wise", *PLAIN_DECODERS)
# The decoder used when none is asked for: connected components of the class map with the size
# floor (why: docs/decisions.md).
DEFAULT_DECODER = "components"
