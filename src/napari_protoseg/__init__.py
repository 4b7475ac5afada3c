"""napari-protoseg: organelle segmentation trained from any mix of masks, boxes, points and tags.

The names below come from :mod:`napari_protoseg.annotations.project` and load on first use, so that
importing the package (napari does, to find the plugin) costs nothing until one is used.
"""

from __future__ import annotations

import importlib

try:
    from napari_protoseg._version import version as __version__
except ImportError:  # running from a source tree without an installed build
    __version__ = "0.0.0+unknown"

__all__ = [
    "AnnotationSet",
    "ClassInfo",
    "Problem",
    "Project",
    "ProjectError",
    "__version__",
    "read_project",
    "write_project",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("napari_protoseg.annotations.project"), name)
    raise AttributeError(f"module 'napari_protoseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
