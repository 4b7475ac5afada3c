"""The Predict section: predict the plane, the visible region or the stack, with a choice of instance
decoder and test-time augmentation; the predictions arrive in the review layers."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout

from napari_protoseg.plugin.panel.common import PanelSection
from napari_protoseg.plugin.panel.workers import PREPARING, run_in_turns
from napari_protoseg.plugin.session import SessionError, prediction_settings
from napari_protoseg.prediction import DECODERS
from napari_protoseg.prediction.pipeline import PredictionError, prediction_run


class PredictSection(PanelSection):
    """Starts prediction runs: first the review layers are made, a small step per turn of napari's
    event loop, then the run's pieces are written into them as they come. Emits ``finished``."""

    finished = Signal()

    def __init__(self, host):
        super().__init__(host)
        self._stop_prediction = self.jobs.stop_prediction
        self._prepared_for = None  # the image the review layers were last made for
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.predict_buttons = {}
        for scope, text in (("plane", "Current plane"), ("region", "Visible region"), ("stack", "Whole stack")):
            button = QPushButton(text)
            button.clicked.connect(lambda _=False, scope=scope: self.predict(scope))
            row.addWidget(button)
            self.predict_buttons[scope] = button
        layout.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Instances by"))
        self.decoder_combo = QComboBox()
        self.decoder_combo.addItems(list(DECODERS))
        self.decoder_combo.setCurrentText(self.session.decoder)
        self.decoder_combo.currentTextChanged.connect(lambda text: setattr(self.session, "decoder", text))
        row.addWidget(self.decoder_combo, 1)
        self.predict_stop_button = QPushButton("Stop")
        self.predict_stop_button.clicked.connect(self.stop_prediction)
        row.addWidget(self.predict_stop_button)
        layout.addLayout(row)
        self.tta_check = QCheckBox("test-time augmentation (8 x slower)")
        self.tta_check.setToolTip("Predict each tile also rotated and mirrored and average the 8 results: "
                                  "fewer stray pixels of a wrong class, about 8 times the time.")
        self.tta_check.setChecked(self.session.test_time_augmentation)
        self.tta_check.toggled.connect(lambda on: setattr(self.session, "test_time_augmentation", bool(on)))
        layout.addWidget(self.tta_check)
        self.predict_progress = QProgressBar()
        self.predict_progress.setFormat("%v / %m planes")
        layout.addWidget(self.predict_progress)

    def prepare_review_layers(self, then: Callable[[], None] | None = None) -> None:
        """Make the review layers (hidden) for a newly chosen image, in turns of the event loop, so that
        napari's work for new layers is done before a prediction arrives; then call ``then``. Once per
        image: review layers the user deletes come back only with the next prediction."""
        steps = [then] if then is not None else []
        try:
            layer = self.session.image_layer()
            image_key = (id(layer), layer.name, self.session.image().shape)
        except SessionError:
            image_key = self._prepared_for
        if image_key != self._prepared_for:
            self._prepared_for = image_key
            steps = self.session.review_layer_steps() + steps
        # A step refused (the image went meanwhile) is said again, with its reason, by the next prediction.
        run_in_turns(steps, cancelled=lambda: self.closed, refused=lambda err: then() if then is not None else None)

    def update_buttons(self) -> None:
        idle = not self.jobs.busy()
        for button in self.predict_buttons.values():
            button.setEnabled(idle and self.session.model is not None)
        self.predict_stop_button.setEnabled(self.jobs.predict_worker is not None)

    def predict(self, scope: str) -> None:
        """Predict the plane in view ("plane"), the visible region ("region") or every plane ("stack")."""
        if self.jobs.busy():
            self.notify("warning", "Training or prediction is running; wait for it or press Stop first.")
            return
        self.jobs.predict_worker = PREPARING
        self._begin_prediction(scope)

    def predict_after_training(self) -> None:
        """Predict the plane in view once a training run has ended, from the next turn of the event loop."""
        self.jobs.predict_worker = PREPARING
        self._in_turns([lambda: self._begin_prediction("plane", after_training=True)])

    def _in_turns(self, steps) -> None:
        def refused(err):
            self.notify("error", str(err))
            self._prediction_not_started()

        run_in_turns(steps, cancelled=lambda: self.closed, refused=refused)

    def _redraw_in_turns(self, steps) -> None:
        run_in_turns(steps, cancelled=lambda: self.closed, refused=lambda err: self.notify("error", str(err)))

    def _begin_prediction(self, scope: str, after_training: bool = False) -> None:
        def give_up(level=None, message=""):
            self.jobs.predict_worker = None
            self.host.update_buttons()
            if level:
                self.notify(level, message)

        try:
            model = self.session.check_model()
            image = self.session.image()
            z = self.session.current_plane()
            region = self.session.visible_region() if scope == "region" else None
            settings = prediction_settings(self.session.decoder, self.session.test_time_augmentation)
            run = prediction_run(model, image, scope, z, region, settings, stop=self._stop_prediction.is_set)
        except (SessionError, PredictionError) as err:
            return give_up("error", str(err))
        edited = self.session.prediction_layers_edited()
        if edited:
            what = " and ".join(f"'{name}'" for name in edited)
            question = (f"You edited {what} since it was predicted. "
                        + ("Training has finished: " if after_training else "")
                        + "overwrite your edits with the new prediction?\n\nChoose No to keep them "
                        "(accept them as annotation first, then predict again).")
            if not self.host.confirm(question):
                return give_up("info", f"Kept your edits of {what}; the new prediction was not written.")
        self.host.update_buttons()
        total = int(np.shape(image)[0]) if scope == "stack" and np.ndim(image) == 3 else 1
        self.predict_progress.setMaximum(total)
        self.predict_progress.setValue(0)
        self._stop_prediction.clear()
        self.jobs.prediction_done.clear()

        def start_worker():
            self.jobs.start_prediction(
                run, yielded=self._on_prediction_piece, errored=lambda err: self.host.worker_failed("Prediction", err),
                finished=self._prediction_ended)

        self._in_turns([*self.session.prediction_layer_steps(), start_worker])

    def _prediction_not_started(self) -> None:
        self.jobs.predict_worker = None
        self.jobs.prediction_done.set()
        self.host.update_buttons()

    def stop_prediction(self) -> None:
        self._stop_prediction.set()

    def _on_prediction_piece(self, piece) -> None:
        if self.closed:
            return
        try:
            changed = self.session.write_prediction(piece, redraw=False)
        except SessionError as err:
            self._stop_prediction.set()
            self.notify("error", str(err))
            return
        # One layer redrawn per turn: napari repaints the canvas in between.
        self._redraw_in_turns([lambda name=name: self.session.redraw_prediction(name) for name in changed])
        self.predict_progress.setMaximum(piece.total)
        self.predict_progress.setValue(piece.done)

    def _prediction_ended(self) -> None:
        if self.closed:
            return
        self.host.update_buttons()
        # Review layers whose plane was out of view while predicted are shown all the same; then
        # ``finished``, each in a turn of its own (the layers of the last piece are redrawn before).
        self._redraw_in_turns([*self.session.showing_steps(), self.finished.emit])
