"""The Project section: where the project folder is, saving it now and in the background."""

from __future__ import annotations

import time

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from napari_protoseg.plugin.layers import METADATA_KEY
from napari_protoseg.plugin.panel.common import PanelSection
from napari_protoseg.plugin.session import SessionError, default_projects_dir


class ProjectSection(PanelSection):
    """The project folder, and autosave: a background save when something was edited."""

    def __init__(self, host):
        super().__init__(host)
        layout = QVBoxLayout(self)
        self.project_label = QLabel()
        self.project_label.setWordWrap(True)
        self.project_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.project_label)
        row = QHBoxLayout()
        self.save_now_button = QPushButton("Save now")
        self.save_now_button.clicked.connect(lambda: self.autosave(force=True))
        self.choose_folder_button = QPushButton("Choose folder…")
        self.choose_folder_button.clicked.connect(self._choose_folder_dialog)
        row.addWidget(self.save_now_button)
        row.addWidget(self.choose_folder_button)
        layout.addLayout(row)
        self.save_status = QLabel("Annotations are saved when training starts and every minute while you edit.")
        self.save_status.setWordWrap(True)
        layout.addWidget(self.save_status)

    def refresh(self) -> None:
        try:
            layer = self.session.image_layer()
        except SessionError:
            self.project_label.setText("Project folder: (no image)")
            return
        entry = layer.metadata.get(METADATA_KEY) or {}
        folder = entry.get("project")
        self.project_label.setText(f"Project folder: {folder}" if folder else
                                   f"Project folder: made in {default_projects_dir()} at the first save")

    def saved_by_training(self, folder) -> None:
        """A training run saved the project as it started."""
        self.save_status.setText(f"Saved at {time.strftime('%H:%M:%S')} (training started)")
        self.refresh()

    def autosave(self, force: bool = False) -> None:
        """Save the project folder in the background if something was edited (or ``force``)."""
        if self.closed or self.jobs.save_worker is not None or not (self.session.dirty or force):
            return
        try:
            snapshot = self.session.snapshot()
        except SessionError as err:
            if force:
                self.notify("error", f"Cannot save the project: {err}")
            else:
                self.save_status.setText(f"Not saved: {str(err).splitlines()[0]}")
            return
        self.jobs.start_save(snapshot.write, returned=self._saved, errored=self._save_failed)

    def _saved(self, folder) -> None:
        if self.closed:
            return
        self.save_status.setText(f"Saved at {time.strftime('%H:%M:%S')}")
        self.refresh()

    def _save_failed(self, err) -> None:
        self.session.dirty = True
        if not self.closed:
            self.notify("error", f"Could not save the project: {err}. Choose another folder in the Project section.")

    def _choose_folder_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Project folder")
        if folder:
            try:
                self.session.set_project_folder(folder)
            except SessionError as err:
                self.notify("error", str(err))
                return
            self.refresh()
            self.autosave(force=True)
