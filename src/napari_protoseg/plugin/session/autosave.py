"""Autosave: whether the project was edited since it was saved, its folder, and what to write there."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_protoseg.annotations.project import IMAGE_FILE, AnnotationSet, write_project
from napari_protoseg.plugin.layers import METADATA_KEY
from napari_protoseg.plugin.session.image import ImageChoice

AUTOSAVE_SECONDS = 60
PROJECTS_DIR_ENV = "PROTOSEG_PROJECTS_DIR"


def default_projects_dir() -> Path:
    """Where projects of images that came from no project folder are autosaved."""
    return Path(os.environ.get(PROJECTS_DIR_ENV) or Path.home() / "protoseg-projects")


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return slug or "image"


@dataclass
class ProjectSnapshot:
    """What the project folder should hold; :meth:`write` may run on any thread."""

    folder: Path
    image: np.ndarray
    annotations: AnnotationSet

    def write(self) -> Path:
        """Write the annotations (and the image, once) into the project folder."""
        folder = Path(self.folder)
        has_image = (folder / IMAGE_FILE).is_file()
        return write_project(folder, self.image, self.annotations, write_image=not has_image)


class Autosave:
    """The project folder of the chosen image and whether it needs saving. ``gather()`` returns the
    image and annotations to save (``SessionError`` when they cannot be)."""

    def __init__(self, image: ImageChoice, gather: Callable[[], tuple[np.ndarray, AnnotationSet]]):
        self.image = image
        self._gather = gather
        self.dirty = False
        self.last_saved: float | None = None

    def mark_dirty(self, *_args) -> None:
        self.dirty = True

    def project_folder(self) -> Path:
        """The project folder of the chosen image: where it was opened from, else a new folder in
        :func:`default_projects_dir` named after the image (recorded in the image layer's metadata)."""
        layer = self.image.layer()
        entry = dict(layer.metadata.get(METADATA_KEY) or {})
        if entry.get("project"):
            return Path(entry["project"])
        base = default_projects_dir() / _slug(layer.name)
        folder, n = base, 1
        while folder.exists() and any(folder.iterdir()):
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        self.set_project_folder(folder)
        return folder

    def set_project_folder(self, folder: str | os.PathLike) -> None:
        layer = self.image.layer()
        entry = dict(layer.metadata.get(METADATA_KEY) or {})
        entry.update(role="image", project=str(Path(folder).resolve()))
        layer.metadata = {**layer.metadata, METADATA_KEY: entry}

    def snapshot(self, image: np.ndarray | None = None, annotations: AnnotationSet | None = None) -> ProjectSnapshot:
        """A copy of what the project folder should hold now (taken on the GUI thread; pass the image
        and annotations when they were just gathered)."""
        if image is None or annotations is None:
            image, annotations = self._gather()
        folder = self.project_folder()
        snapshot = ProjectSnapshot(folder=folder, image=image, annotations=annotations)
        self.dirty = False
        self.last_saved = time.monotonic()
        return snapshot

    def save_project(self) -> Path:
        """Write the project folder now (on this thread)."""
        return self.snapshot().write()
