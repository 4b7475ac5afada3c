"""The current model: where it came from, whether it fits the class table, what "Continue" resumes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from napari_protoseg._text import format_ranges
from napari_protoseg.annotations.project import ClassInfo
from napari_protoseg.model.file import TrainedModel, check_model_classes
from napari_protoseg.plugin.session.common import SessionError


class CurrentModel:
    """The model of the session (None until one is trained or loaded); ``classes()`` gives the class
    table it has to fit."""

    def __init__(self, classes: Callable[[], list[ClassInfo]]):
        self._classes = classes
        self.model: TrainedModel | None = None
        self.source = ""  # where the model came from, for the info text
        self.resumable_checkpoint: Path | None = None  # a stopped run that "Continue training" resumes

    def set(self, model: TrainedModel, source: str = "") -> None:
        self.model = model
        self.source = source

    def check(self, model: TrainedModel | None = None) -> TrainedModel:
        """The model, checked to predict exactly the classes of the class table."""
        model = self.model if model is None else model
        if model is None:
            raise SessionError("There is no model yet. Click 'Train on current labels', or load a model in "
                               "the Model section.")
        messages = check_model_classes(model, self._classes())
        if messages:
            raise SessionError("The model was trained for other classes than this project's class table:\n"
                               + "\n".join(f"- {m}" for m in messages)
                               + "\nClick 'Train on current labels' to train a model for the current classes.")
        return model

    def continue_plan(self) -> tuple[Path | None, TrainedModel | None]:
        """What "Continue training" starts from: (checkpoint of a stopped run, or the current model)."""
        model = self.check()
        if self.resumable_checkpoint is not None and Path(self.resumable_checkpoint).is_file():
            return Path(self.resumable_checkpoint), None
        return None, model

    def info(self) -> str:
        """What the current model was trained on, as text for the Model section."""
        return model_info_text(self.model, self.source)


def model_info_text(model: TrainedModel | None, source: str = "") -> str:
    """Classes, annotation counts and steps of a model, from its ``training_info``."""
    if model is None:
        return "No model yet: train one, or load a model file."
    info = model.training_info or {}
    lines = []
    if source:
        lines.append(source)
    steps = info.get("steps")
    config = info.get("train_config") or {}
    total = config.get("steps")
    if steps is not None:
        lines.append(f"Trained {steps} step(s)" + (f" of {total}" if total and total != steps else "")
                     + (f", last loss {info['last_losses']['total']:.3f}"
                        if isinstance(info.get("last_losses"), dict) and "total" in info["last_losses"] else ""))
    names = ", ".join(f"{c.name}{' (instances)' if c.instances else ''}" for c in model.classes)
    lines.append(f"Classes: {names}")
    totals = info.get("totals")
    if totals:
        lines.append(f"Annotations: {totals.get('mask_pixels', 0)} mask pixels, {totals.get('boxes', 0)} boxes, "
                     f"{totals.get('points', 0)} points, {totals.get('tags', 0)} tags")
    per_class = info.get("annotations") or {}
    for name, counts in per_class.items():
        parts = [f"{counts[k]} {label}" for k, label in
                 (("mask_pixels", "px"), ("boxes", "boxes"), ("points", "points"), ("tags_present", "tags +"),
                  ("tags_absent", "tags −")) if counts.get(k)]
        lines.append(f"  {name}: {', '.join(parts) if parts else 'nothing'}")
    planes = info.get("planes_annotated")
    if planes:
        lines.append(f"Planes annotated: {format_ranges(planes)}")
    return "\n".join(lines)
