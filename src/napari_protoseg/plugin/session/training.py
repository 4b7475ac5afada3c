"""A training run of the panel: save the project, train, write the checkpoint and model file, and
report progress and live previews (a generator the panel runs in a worker thread)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_protoseg.annotations.project import AnnotationSet, ClassInfo, ProjectError
from napari_protoseg.model.file import TrainedModel, save_model
from napari_protoseg.plugin.layers import class_colors
from napari_protoseg.plugin.session.autosave import ProjectSnapshot
from napari_protoseg.plugin.session.common import Region
from napari_protoseg.training.engine import PreviewRequest, TrainConfig, TrainEvent, train

# "Train on current labels" ends within this many seconds by default (TrainConfig.time_limit): the
# budget of a default run on a 2-core CPU, whatever the machine's pace that day.
PANEL_TIME_LIMIT = 300.0
CHECKPOINT_FILE = "training.ckpt"
MODEL_FILE = "model.protoseg.pt"


class PreviewTarget:
    """Where the live preview should look; set by the GUI thread, read by the training thread."""

    def __init__(self, every_seconds: float = 3.0):
        self.every_seconds = every_seconds
        self._lock = threading.Lock()
        self._region: tuple[int | None, Region] | None = None

    def set(self, z: int | None, region: Region) -> None:
        with self._lock:
            self._region = (z, tuple(int(v) for v in region))

    def get(self) -> tuple[int | None, Region] | None:
        with self._lock:
            return self._region


@dataclass
class TrainingUpdate:
    """One message of a training run: a progress event (with the region of its preview and the
    preview's picture, drawn on the worker thread), or a note."""

    event: TrainEvent | None = None
    preview_at: tuple[int | None, Region] | None = None
    preview_picture: np.ndarray | None = None
    note: str = ""
    saved: Path | None = None
    model_file: Path | None = None


def training_run(
    image: np.ndarray,
    annotations: AnnotationSet,
    config: TrainConfig,
    *,
    snapshot: ProjectSnapshot | None = None,
    resume: Path | None = None,
    initial_model: TrainedModel | None = None,
    preview: PreviewTarget | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[TrainingUpdate]:
    """Save the project, then train; yields :class:`TrainingUpdate`s (runs on a worker thread).

    The checkpoint and, at the end, the model file are written into the project folder. The last
    update carries the final :class:`TrainEvent` with the model (also after a stop).
    """
    folder = None
    if snapshot is not None:
        try:
            folder = snapshot.write()
            yield TrainingUpdate(saved=folder)
        except (OSError, ProjectError) as err:
            yield TrainingUpdate(note=f"The project could not be saved to {snapshot.folder} ({err}); "
                                 "training goes on. Choose another project folder in the Project section.")
            folder = None
    checkpoint = (folder / CHECKPOINT_FILE) if folder is not None else None
    request = PreviewRequest(0, 0, 0, 1, 1, every_seconds=preview.every_seconds) if preview is not None else None

    def aim_preview():
        target = preview.get() if preview is not None else None
        if target is None:
            return None
        z, (y0, x0, y1, x1) = target
        request.z, request.y0, request.x0, request.y1, request.x1 = z, y0, x0, y1, x1
        return target

    aimed = aim_preview()
    events = train(image, annotations, config, checkpoint_path=checkpoint, resume=resume,
                   initial_model=initial_model, preview=request if aimed is not None else None, stop=stop)
    try:
        for event in events:
            update = TrainingUpdate(event=event)
            if event.preview is not None and aimed is not None:
                update.preview_at = aimed
                update.preview_picture = preview_picture(image, *aimed, event.preview, annotations.classes)
            if event.model is not None and folder is not None:
                try:
                    save_model(folder / MODEL_FILE, event.model)
                    update.model_file = folder / MODEL_FILE
                except (OSError, ValueError) as err:
                    update.note = f"The model could not be saved into the project folder ({err})."
            yield update
            if request is not None:
                aimed = aim_preview()
    finally:
        events.close()


def preview_picture(image: np.ndarray, z: int | None, region: Region, class_map: np.ndarray,
                    classes: Sequence[ClassInfo]) -> np.ndarray:
    """RGB (h, w, 3) uint8 picture of a live preview: the image region in grey with the predicted
    classes in their colours on top (drawn in the panel; no layer has to be built while training)."""
    y0, x0, y1, x1 = region
    crop = np.asarray(image[(() if z is None else (z,)) + (slice(y0, y1), slice(x0, x1))], dtype=np.float32)
    # Contrast from every 4th pixel of every 4th row: the same percentiles to the eye, 16 times less work.
    low, high = np.percentile(crop[::4, ::4], [1, 99]) if crop.size else (0.0, 1.0)
    grey = np.clip((crop - low) / max(float(high - low), 1e-6), 0, 1)
    picture = np.repeat(grey[..., None], 3, axis=2)
    class_map = np.asarray(class_map)[: crop.shape[0], : crop.shape[1]]
    n = max([*(c.id for c in classes), int(class_map.max(initial=0))]) + 1
    palette = class_colors(list(range(n)), classes)[:, :3]
    painted = class_map > 0
    picture[painted] = 0.55 * picture[painted] + 0.45 * palette[class_map[painted]]
    return np.ascontiguousarray((picture * 255).round().astype(np.uint8))
