"""The Model section: what the current model was trained on, saving it and loading one."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from napari_protoseg.model.file import MODEL_SUFFIX, ModelFileError, check_model_classes, load_model, save_model
from napari_protoseg.plugin.panel.common import PanelSection
from napari_protoseg.plugin.session import SessionError


class ModelSection(PanelSection):
    """The model's info text, and model files; emits ``model_loaded``."""

    model_loaded = Signal()

    def __init__(self, host):
        super().__init__(host)
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.save_model_button = QPushButton("Save model…")
        self.save_model_button.clicked.connect(self._save_model_dialog)
        self.load_model_button = QPushButton("Load model…")
        self.load_model_button.clicked.connect(self._load_model_dialog)
        row.addWidget(self.save_model_button)
        row.addWidget(self.load_model_button)
        layout.addLayout(row)
        self.model_info = QLabel()
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.model_info)

    def refresh(self) -> None:
        self.model_info.setText(self.session.model_info())

    def update_buttons(self) -> None:
        self.load_model_button.setEnabled(not self.jobs.busy())
        self.save_model_button.setEnabled(self.session.model is not None and self.jobs.train_worker is None)

    def save_model_to(self, path) -> Path | None:
        model = self.session.model
        if model is None:
            self.notify("error", "There is no model to save yet; train one first.")
            return None
        path = Path(path)
        if not path.name.endswith(MODEL_SUFFIX) and not path.suffix:
            path = path.with_name(path.name + MODEL_SUFFIX)
        try:
            written = save_model(path, model)
        except (OSError, ValueError) as err:
            self.notify("error", f"Cannot save the model to {path}: {err}")
            return None
        self.notify("info", f"Model saved to {written}")
        return written

    def load_model_from(self, path) -> bool:
        try:
            model = load_model(path)
        except ModelFileError as err:
            self.notify("error", str(err))
            return False
        messages = check_model_classes(model, self.session.classes)
        if messages and not self._anything_drawn():
            self.session.classes = list(model.classes)
            self.session.apply_classes()
            messages = []
        self.session.set_model(model, f"Loaded from {Path(path).name}")
        self.session.resumable_checkpoint = None
        if messages:
            self.notify("warning", "The loaded model was trained for other classes than this project's class "
                        "table, so it cannot predict here:\n" + "\n".join(f"- {m}" for m in messages))
        self.model_loaded.emit()
        return True

    def _anything_drawn(self) -> bool:
        try:
            return self.session.annotations()[1].has_annotations()
        except SessionError:
            return True

    def _save_model_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save model", "model" + MODEL_SUFFIX,
                                              f"protoseg model (*{MODEL_SUFFIX});;all files (*)")
        if path:
            self.save_model_to(path)

    def _load_model_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load model", "", f"protoseg model (*{MODEL_SUFFIX});;all files (*)")
        if path:
            self.load_model_from(path)
