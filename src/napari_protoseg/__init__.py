"""napari-protoseg: organelle segmentation trained from any mix of masks, boxes, points and tags."""

try:
    from napari_protoseg._version import version as __version__
except ImportError:  # running from a source tree without an installed build
    __version__ = "0.0.0+unknown"

from napari_protoseg.annotations.project import AnnotationSet, ClassInfo, Problem, Project, ProjectError, read_project, write_project

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
