"""The protoseg panel: its sections put together, and what they share (session, background jobs,
timers, notifications, the viewer's events)."""

from __future__ import annotations

import sys
import traceback

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QMessageBox, QScrollArea, QVBoxLayout, QWidget

from napari_protoseg.annotations.project import ProjectError
from napari_protoseg.plugin.layers import METADATA_KEY, classes_from_metadata
from napari_protoseg.plugin.panel.annotate import AnnotateSection
from napari_protoseg.plugin.panel.classes import ClassesSection
from napari_protoseg.plugin.panel.common import Section
from napari_protoseg.plugin.panel.model import ModelSection
from napari_protoseg.plugin.panel.predict import PredictSection
from napari_protoseg.plugin.panel.project import ProjectSection
from napari_protoseg.plugin.panel.review import ReviewSection
from napari_protoseg.plugin.panel.train import TrainSection
from napari_protoseg.plugin.panel.workers import BackgroundJobs, WorkerFailure, warm_up_torch
from napari_protoseg.plugin.session import ANNOTATION_ROLES, AUTOSAVE_SECONDS, PREDICTION_SEMANTIC, Session
from napari_protoseg.training.engine import TrainConfig

AUTOSAVE_MS = AUTOSAVE_SECONDS * 1000
WARM_UP_POLL_MS = 100


class ProtosegWidget(QWidget):
    """The protoseg panel for a napari viewer (npe2 widget contribution)."""

    def __init__(self, napari_viewer, train_config: TrainConfig | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.session = Session(napari_viewer, train_config)
        self.session.watch_annotation_layers()
        self.confirm = self._ask  # (question) -> bool; tests replace it
        self.jobs = BackgroundJobs()
        self._lifecycle = {"closed": False}
        self._build()
        self._connect_sections()
        self._connect_viewer()
        self.autosave_timer = QTimer(self)
        self.autosave_timer.setInterval(AUTOSAVE_MS)
        self.autosave_timer.timeout.connect(self.project_section.autosave)
        self.autosave_timer.start()
        self.refresh()
        self.warmed_up = warm_up_torch()
        # From the event loop, once whoever made the panel has set it up (e.g. its training settings).
        QTimer.singleShot(0, self._prepare_review_layers_after_warm_up)

    def _prepare_review_layers_after_warm_up(self) -> None:
        """Make the review layers and start learning the image once PyTorch's imports are done: the
        import holds the GIL and would stretch napari's work for the new layers several times over."""
        if self.closed:
            return
        if not self.warmed_up.is_set():
            QTimer.singleShot(WARM_UP_POLL_MS, self._prepare_review_layers_after_warm_up)
            return
        # Learning the image starts after the review layers are made: its thread would slow napari's work on them.
        self.predict_section.prepare_review_layers(then=self.train_section.start_learning)

    @property
    def closed(self) -> bool:
        return self._lifecycle["closed"]

    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        layout = QVBoxLayout(body)
        layout.setContentsMargins(6, 6, 6, 6)
        self.classes_section = ClassesSection(self)
        self.annotate_section = AnnotateSection(self)
        self.train_section = TrainSection(self)
        self.predict_section = PredictSection(self)
        self.review_section = ReviewSection(self)
        self.model_section = ModelSection(self)
        self.project_section = ProjectSection(self)
        self.parts = (self.classes_section, self.annotate_section, self.train_section, self.predict_section,
                      self.review_section, self.model_section, self.project_section)
        self.sections: dict[str, Section] = {}
        for title, part, expanded in zip(("Classes", "Annotate", "Train", "Predict", "Review", "Model", "Project"),
                                         self.parts, (True, True, True, False, False, False, False)):
            section = Section(title, part)
            if expanded:
                section.expand()
            layout.addWidget(section)
            self.sections[title] = section
        layout.addStretch(1)
        # Wide enough for every section, so nothing is cut off at the right edge of the dock.
        scroll.setMinimumWidth(max(400, body.minimumSizeHint().width()) + scroll.verticalScrollBar().sizeHint().width())

    def _connect_sections(self) -> None:
        """What one section's work means for the others."""
        self.annotate_section.image_chosen.connect(lambda _name: self.project_section.refresh())
        self.annotate_section.image_chosen.connect(lambda _name: self.predict_section.prepare_review_layers())
        self.annotate_section.image_chosen.connect(lambda _name: self.train_section.image_changed())
        self.train_section.project_saved.connect(self.project_section.saved_by_training)
        self.train_section.model_changed.connect(self.model_section.refresh)
        self.train_section.trained.connect(self.predict_section.predict_after_training)
        self.predict_section.finished.connect(self._prediction_finished)
        self.review_section.accepted.connect(self.train_section.continue_or_train)
        self.model_section.model_loaded.connect(self.refresh)

    def _prediction_finished(self) -> None:
        if PREDICTION_SEMANTIC in self.viewer.layers:
            self.sections["Review"].expand()

    # ===================================================================== viewer hooks

    def _connect_viewer(self) -> None:
        self.viewer.layers.events.inserted.connect(self._layer_inserted)
        self.viewer.layers.events.removed.connect(self._layers_changed)
        self.viewer.dims.events.current_step.connect(self._view_changed)
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.events.center.connect(self._camera_changed)
        camera.events.zoom.connect(self._camera_changed)
        # Closing napari (or the panel) deletes this widget: stop background work cleanly and wait for
        # it, so training writes its checkpoint. The callback must not touch the deleted widget.
        jobs, lifecycle = self.jobs, self._lifecycle

        def on_destroyed(*_):
            lifecycle["closed"] = True
            jobs.stop_all_and_wait()

        self.destroyed.connect(on_destroyed)

    def _layer_inserted(self, event) -> None:
        if self.closed:
            return
        layer = event.value
        role = (layer.metadata.get(METADATA_KEY) or {}).get("role") if layer.metadata else None
        if role == "prediction":
            return  # review layers change nothing the panel shows
        if role in ANNOTATION_ROLES:
            classes = classes_from_metadata(layer.metadata)
            if classes and classes != self.session.classes:
                self.session.classes = classes
                self.session.apply_classes()
            self.session.watch_layer(layer)
        self._layers_changed()

    def _layers_changed(self, *_args) -> None:
        if not self.closed:
            self.refresh()
            self.predict_section.prepare_review_layers()

    def _view_changed(self, *_args) -> None:
        if self.closed:
            return
        self.annotate_section.view_changed()
        self.train_section.aim_preview()

    def _camera_changed(self, *_args) -> None:
        if self.closed:
            return
        self.annotate_section.camera_changed()
        self.train_section.aim_preview()

    # ========================================================================== shared

    def refresh(self) -> None:
        """Fill every control from the session and the viewer."""
        for part in self.parts:
            part.refresh()
        self.update_buttons()

    def update_buttons(self) -> None:
        """Enable in every section what can be done while the background jobs run."""
        for part in self.parts:
            part.update_buttons()

    def set_train_config(self, config: TrainConfig) -> None:
        """Use these training settings (shown and edited in the Train section)."""
        self.train_section.set_train_config(config)

    def notify(self, level: str, text: str) -> None:
        """Show a napari notification (``level`` "error", "warning" or "info")."""
        {"error": show_error, "warning": show_warning, "info": show_info}[level](text)

    def _ask(self, question: str) -> bool:
        answer = QMessageBox.question(self, "protoseg", question,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def worker_failed(self, what: str, err: BaseException) -> None:
        """Say that a background run failed (with its traceback on stderr for unexpected errors)."""
        err = err.error if isinstance(err, WorkerFailure) else err
        if self.closed:
            return
        if isinstance(err, ProjectError):
            message = f"{what} failed:\n" + "\n".join(f"- {p}" for p in err.problems)
        else:
            message = f"{what} failed: {type(err).__name__}: {err}"
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        self.notify("error", message)
