"""The workflow behind the napari panel, without Qt.

A :class:`Session` works on a napari viewer model (``napari.Viewer`` or the Qt-free
``napari.components.ViewerModel``). It is made of parts, one module each:

- :mod:`.image`: which image layer is annotated, and the plane and region in view;
- :mod:`.classes`: the class table;
- :mod:`.annotation_layers`: finds or creates the annotation layers, the drawing class, the tags;
- :mod:`.gathering`: the layers gathered into an :class:`~napari_protoseg.annotations.project.AnnotationSet`,
  checked before training with a message saying what to fix;
- :mod:`.autosave`: the project folder and whether it needs saving;
- :mod:`.model`: the current model and what "Continue training" resumes;
- :mod:`.review`: predictions written into the review layers, the user's edits of them tracked, and
  corrected predictions copied back into the "Masks" annotation.

The long-running parts are plain generators (:func:`.training.training_run`, and
:func:`~napari_protoseg.prediction.pipeline.prediction_run` with :func:`.prediction.prediction_settings`)
that the panel runs in napari thread workers and tests can iterate directly. The science lives elsewhere: conversions in ``plugin/layers.py``, training in
``training/``, prediction in ``prediction/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from napari_protoseg.annotations.project import AnnotationSet, ClassInfo
from napari_protoseg.model.file import TrainedModel
from napari_protoseg.plugin.session.annotation_layers import (TAG_ABSENT, TAG_PRESENT, TAG_STATES, TAG_UNKNOWN,
                                                              AnnotationLayers)
from napari_protoseg.plugin.session.autosave import (AUTOSAVE_SECONDS, PROJECTS_DIR_ENV, Autosave, ProjectSnapshot,
                                                     default_projects_dir)
from napari_protoseg.plugin.session.classes import ClassTable, default_classes
from napari_protoseg.plugin.session.common import (ANNOTATION_ROLES, PREDICTION_CONFIDENCE, PREDICTION_INSTANCES,
                                                   PREDICTION_LAYERS, PREDICTION_SEMANTIC, Region, SessionError)
from napari_protoseg.plugin.session.gathering import gather_annotations, gather_training_input
from napari_protoseg.plugin.session.image import ImageChoice
from napari_protoseg.plugin.session.model import CurrentModel, model_info_text
from napari_protoseg.plugin.session.prediction import prediction_settings
from napari_protoseg.plugin.session.review import PredictionLayers
from napari_protoseg.plugin.session.stack_learning import (STACK_ENCODER_FILE, STACK_LEARNING_MINUTES,
                                                           StackLearningUpdate, stack_encoder, stack_learning_run)
from napari_protoseg.plugin.session.training import (CHECKPOINT_FILE, MODEL_FILE, PANEL_TIME_LIMIT, PreviewTarget,
                                                     TrainingUpdate, training_run)
from napari_protoseg.prediction import DEFAULT_DECODER
from napari_protoseg.prediction.pipeline import PredictionPiece
from napari_protoseg.training.engine import TrainConfig, default_train_config

__all__ = [
    "ANNOTATION_ROLES", "AUTOSAVE_SECONDS", "CHECKPOINT_FILE", "MODEL_FILE", "PANEL_TIME_LIMIT",
    "PREDICTION_CONFIDENCE", "PREDICTION_INSTANCES", "PREDICTION_LAYERS", "PREDICTION_SEMANTIC", "PROJECTS_DIR_ENV",
    "TAG_ABSENT", "TAG_PRESENT", "TAG_STATES", "TAG_UNKNOWN", "PreviewTarget", "ProjectSnapshot",
    "Region", "STACK_ENCODER_FILE", "STACK_LEARNING_MINUTES", "Session", "SessionError", "StackLearningUpdate",
    "TrainingUpdate", "default_classes", "default_projects_dir", "model_info_text", "prediction_settings",
    "stack_encoder", "stack_learning_run", "training_run",
]


class Session:
    """Workflow state of one viewer: classes, layers, model, autosave, predictions. Each concern is a
    part (``image_choice``, ``class_table``, ``annotation_layers``, ``autosave``, ``current_model``,
    ``prediction_layers``); the methods here are the panel's and the tests' way in."""

    def __init__(self, viewer, train_config: TrainConfig | None = None):
        self.viewer = viewer
        self.image_choice = ImageChoice(viewer)
        self.class_table = ClassTable(edited=self._classes_edited, in_use=self._class_in_use)
        self.autosave = Autosave(self.image_choice, self.annotations)
        self.annotation_layers = AnnotationLayers(viewer, self.image_choice, self.class_table,
                                                  self.autosave.mark_dirty)
        self.prediction_layers = PredictionLayers(viewer, self.annotation_layers, self.autosave.mark_dirty)
        self.current_model = CurrentModel(lambda: self.class_table.classes)
        self.train_config = (train_config if train_config is not None
                             else default_train_config(time_limit=PANEL_TIME_LIMIT))
        self.decoder = DEFAULT_DECODER
        self.test_time_augmentation = False  # predictions average 8 rotated/mirrored passes
        if not self.load_classes_from_layers():
            self.class_table.classes = default_classes()
        self.annotation_layers.drawing_class = self.classes[0].id if self.classes else None

    # -------------------------------------------------------------------------- image

    @property
    def image_name(self) -> str | None:
        return self.image_choice.name

    @image_name.setter
    def image_name(self, name: str | None) -> None:
        self.image_choice.name = name

    def image_layers(self) -> list:
        return self.image_choice.layers()

    def image_layer(self):
        return self.image_choice.layer()

    def image(self) -> np.ndarray:
        return self.image_choice.data()

    def current_plane(self) -> int | None:
        return self.image_choice.current_plane()

    def plane_shape(self) -> tuple[int, int]:
        return self.image_choice.plane_shape()

    def visible_region(self) -> Region:
        return self.image_choice.visible_region()

    # ------------------------------------------------------------------------ classes

    @property
    def classes(self) -> list[ClassInfo]:
        return self.class_table.classes

    @classes.setter
    def classes(self, classes: list[ClassInfo]) -> None:
        """Take a class table as it is (from layers or a model); :meth:`apply_classes` pushes it."""
        self.class_table.classes = classes

    @property
    def class_ids(self) -> list[int]:
        return self.class_table.ids

    def class_by_id(self, class_id: int) -> ClassInfo:
        return self.class_table.by_id(class_id)

    def load_classes_from_layers(self) -> bool:
        """Take the class table from the annotation layers' metadata, if there is one."""
        if not self.class_table.take_from_layers(self.viewer.layers):
            return False
        self.apply_classes()
        return True

    def _classes_edited(self) -> None:
        self.apply_classes()
        self.mark_dirty()

    def _class_in_use(self, class_id: int) -> bool:
        return self.annotation_layers.class_in_use(class_id)

    def add_class(self, name: str | None = None, instances: bool = False, color: str | None = None) -> ClassInfo:
        return self.class_table.add(name, instances, color)

    def rename_class(self, class_id: int, name: str) -> None:
        self.class_table.rename(class_id, name)
        self.apply_tag_labels()

    def recolor_class(self, class_id: int, color: str) -> None:
        self.class_table.recolor(class_id, color)

    def set_instance_class(self, class_id: int, instances: bool) -> None:
        self.class_table.set_instances(class_id, instances)

    def remove_class(self, class_id: int) -> None:
        self.class_table.remove(class_id)

    def apply_classes(self) -> None:
        """Push the class table into every annotation and prediction layer: colours, metadata."""
        self.annotation_layers.apply_classes()
        self.prediction_layers.apply_classes()

    def apply_tag_labels(self) -> None:
        self.annotation_layers.apply_tag_labels()

    # ------------------------------------------------------------ annotation layers, tags

    @property
    def drawing_class(self) -> int | None:
        return self.annotation_layers.drawing_class

    @property
    def exhaustive(self) -> bool:
        return self.annotation_layers.exhaustive

    def annotation_layer(self, role: str):
        return self.annotation_layers.layer(role)

    def ensure_annotation_layer(self, role: str):
        return self.annotation_layers.ensure(role)

    def watch_layer(self, layer) -> None:
        self.annotation_layers.watch(layer)

    def watch_annotation_layers(self) -> None:
        self.annotation_layers.watch_all()

    def set_drawing_class(self, class_id: int | None) -> None:
        self.annotation_layers.set_drawing_class(class_id)

    def set_exhaustive(self, exhaustive: bool) -> None:
        self.annotation_layers.set_exhaustive(exhaustive)

    def activate(self, role: str):
        return self.annotation_layers.activate(role)

    def tag_states(self, z: int | None, region: Region | None = None) -> dict[int, str]:
        return self.annotation_layers.tag_states(z, region)

    def set_tag(self, class_id: int, state: str, z: int | None, region: Region | None = None) -> None:
        self.annotation_layers.set_tag(class_id, state, z, region)

    def annotations(self) -> tuple[np.ndarray, AnnotationSet]:
        return gather_annotations(self.annotation_layers)

    def training_input(self) -> tuple[np.ndarray, AnnotationSet]:
        return gather_training_input(self.annotation_layers)

    # -------------------------------------------------------------------------- model

    @property
    def model(self) -> TrainedModel | None:
        return self.current_model.model

    @property
    def model_source(self) -> str:
        return self.current_model.source

    @model_source.setter
    def model_source(self, source: str) -> None:
        self.current_model.source = source

    @property
    def resumable_checkpoint(self) -> Path | None:
        return self.current_model.resumable_checkpoint

    @resumable_checkpoint.setter
    def resumable_checkpoint(self, checkpoint: Path | None) -> None:
        self.current_model.resumable_checkpoint = checkpoint

    def set_model(self, model: TrainedModel, source: str = "") -> None:
        self.current_model.set(model, source)

    def check_model(self, model: TrainedModel | None = None) -> TrainedModel:
        return self.current_model.check(model)

    def continue_plan(self) -> tuple[Path | None, TrainedModel | None]:
        return self.current_model.continue_plan()

    def model_info(self) -> str:
        return self.current_model.info()

    # ------------------------------------------------------------------------ autosave

    @property
    def dirty(self) -> bool:
        return self.autosave.dirty

    @dirty.setter
    def dirty(self, dirty: bool) -> None:
        self.autosave.dirty = dirty

    @property
    def last_saved(self) -> float | None:
        return self.autosave.last_saved

    def mark_dirty(self, *_args) -> None:
        self.autosave.mark_dirty()

    def project_folder(self) -> Path:
        return self.autosave.project_folder()

    def set_project_folder(self, folder: str | os.PathLike) -> None:
        self.autosave.set_project_folder(folder)

    def training_encoder(self) -> str | None:
        """The encoder a new training run starts from: what learning the stack kept in the project
        folder for this network, else the training configuration's (``TrainConfig.encoder``)."""
        try:
            path = self.project_folder() / STACK_ENCODER_FILE
        except SessionError:
            return self.train_config.encoder
        encoder, _ = stack_encoder(path.parent, self.train_config.model)
        return str(path) if encoder is not None else self.train_config.encoder

    def snapshot(self, image: np.ndarray | None = None, annotations: AnnotationSet | None = None) -> ProjectSnapshot:
        return self.autosave.snapshot(image, annotations)

    def save_project(self) -> Path:
        return self.autosave.save_project()

    # ----------------------------------------------------------------- review layers

    def prediction_layers_edited(self) -> list[str]:
        return self.prediction_layers.edited()

    def prediction_layer_steps(self) -> list[Callable[[], None]]:
        """Steps that make the missing review layers for a prediction (hidden: :meth:`redraw_prediction`
        shows each once it holds its first prediction)."""
        return self.prediction_layers.creation_steps()

    def showing_steps(self) -> list[Callable[[], None]]:
        """Steps that show the review layers not shown yet (at the end of a prediction)."""
        return self.prediction_layers.showing_steps()

    def review_layer_steps(self) -> list[Callable[[], None]]:
        """Steps that make the absent review layers, hidden, ahead of the first prediction (napari's
        work for a new layer then happens when the image is chosen, not when a prediction arrives)."""
        try:
            self.image()
        except SessionError:
            return []
        return self.prediction_layers.creation_steps(self.prediction_layers.absent())

    def ensure_prediction_layer(self, name: str):
        return self.prediction_layers.ensure(name)

    def ensure_prediction_layers(self) -> dict[str, object]:
        return self.prediction_layers.ensure_all()

    def write_prediction(self, piece: PredictionPiece, redraw: bool = True) -> list[str]:
        return self.prediction_layers.write(piece, redraw)

    def redraw_prediction(self, name: str) -> None:
        self.prediction_layers.redraw(name)

    def accept(self, selected_only: bool = False, instance_ids: Sequence[int] | None = None) -> int:
        return self.prediction_layers.accept(selected_only, instance_ids)
