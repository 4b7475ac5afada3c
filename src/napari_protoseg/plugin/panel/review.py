"""The Review section: accept the corrected prediction of the plane (or one instance) as annotation."""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from napari_protoseg.plugin.panel.common import PanelSection
from napari_protoseg.plugin.session import SessionError


class ReviewSection(PanelSection):
    """Copies corrected predictions into Masks; emits ``accepted`` when training should go on."""

    accepted = Signal()

    def __init__(self, host):
        super().__init__(host)
        layout = QVBoxLayout(self)
        hint = QLabel("Correct 'Prediction: semantic' and 'Prediction: instances' with napari's own tools "
                      "(paint, fill, erase, pick; paint one label over another to merge), then accept.")
        hint.setWordWrap(True)
        layout.addWidget(hint)
        self.accept_scope = QComboBox()
        self.accept_scope.addItems(["the current plane", "only the selected instance"])
        row = QHBoxLayout()
        row.addWidget(QLabel("Accept"))
        row.addWidget(self.accept_scope, 1)
        layout.addLayout(row)
        self.accept_button = QPushButton("Accept as annotation")
        self.accept_button.setToolTip("Copy the corrected prediction into the Masks annotation")
        self.accept_button.clicked.connect(self.accept_as_annotation)
        layout.addWidget(self.accept_button)
        self.continue_after_accept = QCheckBox("then continue training")
        self.continue_after_accept.setChecked(True)
        layout.addWidget(self.continue_after_accept)

    def accept_as_annotation(self) -> None:
        """Copy the corrected prediction (plane or selected instance) into Masks."""
        selected_only = self.accept_scope.currentIndex() == 1
        try:
            n = self.session.accept(selected_only=selected_only)
        except SessionError as err:
            self.notify("error", str(err))
            return
        z = self.session.current_plane()
        where = "" if z is None else f" of plane {z}"
        self.notify("info", f"Accepted {n} pixels{where} into the Masks annotation.")
        if self.continue_after_accept.isChecked() and not self.jobs.busy():
            self.accepted.emit()
