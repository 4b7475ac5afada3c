"""The Train section: steps and time limit, "Train on current labels", continue and stop, and the
run's progress, loss and live preview."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QProgressBar, QPushButton, QSpinBox, QVBoxLayout

from napari_protoseg._text import format_duration
from napari_protoseg.model.file import check_model_classes
from napari_protoseg.plugin.panel.common import PanelSection
from napari_protoseg.plugin.panel.train_views import LossPlot, PreviewView
from napari_protoseg.plugin.session import (
    STACK_LEARNING_MINUTES,
    PreviewTarget,
    SessionError,
    stack_learning_run,
    training_run,
)
from napari_protoseg.pretraining.engine import PretrainConfig
from napari_protoseg.training.engine import TrainConfig, training_notes

TRAIN_BUTTON_TEXT = "Train on current labels"
PREVIEW_SECONDS = 3.0
PREVIEW_MAX_SIZE = 384  # the live preview predicts at most this many pixels square around the view centre
PROGRESS_REFRESH_SECONDS = 0.25


class TrainSection(PanelSection):
    """Starts training runs in the background and shows their progress. Emits ``project_saved`` when a
    run saved the project, ``model_changed`` when it ended with a model, and ``trained`` after a run
    whose plane in view should now be predicted."""

    project_saved = Signal(object)
    model_changed = Signal()
    trained = Signal()

    def __init__(self, host):
        super().__init__(host)
        self.preview_target = PreviewTarget(PREVIEW_SECONDS)
        self.last_event = None  # the latest TrainEvent (tests and the status line read it)
        self._predict_after_training = False
        self._progress_pending = False
        self._last_progress_shown = 0.0
        self._learning_image = None  # the image being learnt (or last learnt) in the background
        self._learnt_images: set = set()  # images whose learning time is spent
        self.learning_minutes = STACK_LEARNING_MINUTES  # background learning per image, in all
        self._training_waits: bool | None = None  # a training run (continuing?) waiting for learning to pause
        layout = QVBoxLayout(self)
        form = QHBoxLayout()
        form.addWidget(QLabel("Steps"))
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1_000_000)
        self.steps_spin.setValue(self.session.train_config.steps)
        self.steps_spin.valueChanged.connect(self._steps_changed)
        form.addWidget(self.steps_spin)
        form.addWidget(QLabel("at most"))
        self.time_limit_spin = QSpinBox()
        self.time_limit_spin.setRange(0, 24 * 60)
        self.time_limit_spin.setSuffix(" min")
        self.time_limit_spin.setSpecialValueText("no limit")
        self.time_limit_spin.setToolTip("Training measures its pace and does fewer steps if these would take "
                                        "longer, its learning rate still decaying to the end (0: no limit)")
        self._show_time_limit(self.session.train_config.time_limit)
        self.time_limit_spin.valueChanged.connect(self._time_limit_changed)
        form.addWidget(self.time_limit_spin)
        form.addStretch(1)
        layout.addLayout(form)
        self.preview_check = QCheckBox("live preview")
        self.preview_check.setChecked(True)
        self.preview_check.setToolTip(f"While training, predict the plane in view every {PREVIEW_SECONDS:.0f} s "
                                      "(less often where that would take over a tenth of the training time)")
        layout.addWidget(self.preview_check)
        self.train_button = QPushButton(TRAIN_BUTTON_TEXT)
        self.train_button.setToolTip("Train a new model on every annotation drawn so far (any mix of types)")
        self.train_button.clicked.connect(self.train_on_current_labels)
        font = self.train_button.font()
        font.setBold(True)
        self.train_button.setFont(font)
        layout.addWidget(self.train_button)
        row = QHBoxLayout()
        self.continue_button = QPushButton("Continue training")
        self.continue_button.setToolTip("Go on from the current model (or the stopped run) with the current labels")
        self.continue_button.clicked.connect(self.continue_training)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step; the last checkpoint is kept")
        self.stop_button.clicked.connect(self.stop_training)
        row.addWidget(self.continue_button)
        row.addWidget(self.stop_button)
        layout.addLayout(row)
        self.train_progress = QProgressBar()
        self.train_progress.setFormat("not started")
        self.train_progress.setTextVisible(True)
        layout.addWidget(self.train_progress)
        self.device_label = QLabel()
        layout.addWidget(self.device_label)
        self.loss_plot = LossPlot()
        layout.addWidget(self.loss_plot)
        self.preview_view = PreviewView()
        layout.addWidget(self.preview_view)
        self.train_status = QLabel("")
        self.train_status.setWordWrap(True)
        layout.addWidget(self.train_status)
        self.learn_check = QCheckBox("learn the image in the background")
        self.learn_check.setChecked(True)
        self.learn_check.setToolTip(
            f"While you annotate, the network learns the look of this image without labels (up to "
            f"{STACK_LEARNING_MINUTES:g} min in all, paused while training runs); training starts from what it "
            "learnt. Kept in the project folder. Untick to pause it.")
        self.learn_check.toggled.connect(self._learning_toggled)
        layout.addWidget(self.learn_check)
        self.learn_status = QLabel("")
        self.learn_status.setWordWrap(True)
        layout.addWidget(self.learn_status)

    def update_buttons(self) -> None:
        idle = not self.jobs.busy() and self._training_waits is None
        self.train_button.setEnabled(idle)
        self.continue_button.setEnabled(idle and self.session.model is not None)
        self.stop_button.setEnabled(self.jobs.train_worker is not None)

    # ------------------------------------------------------------------------ settings

    def set_train_config(self, config: TrainConfig) -> None:
        """Use these training settings (the Steps and time limit boxes show and edit ``config.steps``
        and ``config.time_limit``)."""
        self.session.train_config = config
        self.steps_spin.blockSignals(True)
        self.steps_spin.setValue(config.steps)
        self.steps_spin.blockSignals(False)
        self._show_time_limit(config.time_limit)

    def _show_time_limit(self, seconds: float | None) -> None:
        self.time_limit_spin.blockSignals(True)
        self.time_limit_spin.setValue(0 if seconds is None else max(1, round(seconds / 60)))
        self.time_limit_spin.blockSignals(False)

    def _steps_changed(self, value: int) -> None:
        self.session.train_config = replace(self.session.train_config, steps=int(value))

    def _time_limit_changed(self, minutes: int) -> None:
        self.session.train_config = replace(self.session.train_config,
                                            time_limit=60.0 * minutes if minutes else None)

    # ------------------------------------------------------------------------- the run

    def train_on_current_labels(self) -> None:
        """Train a new model on every annotation drawn so far."""
        self._start_training(continuing=False)

    def continue_training(self) -> None:
        """Resume a stopped run, or go on training the current model on the current labels."""
        self._start_training(continuing=True)

    def continue_or_train(self) -> None:
        """Continue training where the current model fits the class table, else train a new model."""
        model = self.session.model
        if model is not None and not check_model_classes(model, self.session.classes):
            self.continue_training()
        else:
            self.train_on_current_labels()

    def _start_training(self, continuing: bool) -> None:
        if self.jobs.busy() or self._training_waits is not None:
            self.notify("warning", "Training or prediction is running; wait for it or press Stop first.")
            return
        if self.jobs.learn_worker is not None:
            # Learning the image stops after its step and keeps what it learnt; training starts from that.
            self._training_waits = continuing
            self.train_status.setText("Pausing the learning of the image …")
            self.pause_learning()
            self.host.update_buttons()
            return
        try:
            image, annotations = self.session.training_input()
            encoder = self.session.training_encoder()
            resume, initial_model = self.session.continue_plan() if continuing else (None, None)
            snapshot = self.session.snapshot(image, annotations)
        except SessionError as err:
            self.notify("error", str(err))
            return
        for note in training_notes(annotations):
            self.notify("warning", note)
        self.session.resumable_checkpoint = None
        if not continuing:
            self.loss_plot.clear()
        self.jobs.stop_training.clear()
        self.jobs.training_done.clear()
        self.aim_preview(force=True)
        self.train_status.setText("Saving the project and starting …")
        self.preview_view.setVisible(False)
        self.jobs.start_training(
            training_run(image, annotations, replace(self.session.train_config, encoder=encoder), snapshot=snapshot,
                         resume=resume, initial_model=initial_model,
                         preview=self.preview_target if self.preview_check.isChecked() else None,
                         stop=self.jobs.stop_training.is_set),
            yielded=self._on_training_update, errored=lambda err: self.host.worker_failed("Training", err),
            finished=self._run_ended)
        self.host.update_buttons()

    def stop_training(self) -> None:
        """Stop after the current step; the run's checkpoint is kept for 'Continue training'."""
        if self.jobs.train_worker is not None:
            self.jobs.stop_training.set()
            self.train_status.setText("Stopping after this step …")

    def aim_preview(self, force: bool = False) -> None:
        """Point the live preview at the region in view (at most PREVIEW_MAX_SIZE square)."""
        if self.jobs.train_worker is None and not force:
            return
        try:
            z = self.session.current_plane()
            y0, x0, y1, x1 = self.session.visible_region()
        except SessionError:
            return
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        half = PREVIEW_MAX_SIZE // 2
        if y1 - y0 > PREVIEW_MAX_SIZE:
            y0, y1 = cy - half, cy + half
        if x1 - x0 > PREVIEW_MAX_SIZE:
            x0, x1 = cx - half, cx + half
        self.preview_target.set(z, (y0, x0, y1, x1))

    def _on_training_update(self, update) -> None:
        if self.closed:
            return
        if update.note:
            self.notify("warning", update.note)
        if update.saved is not None:
            self.session.set_project_folder(update.saved)
            self.project_saved.emit(update.saved)
        event = update.event
        if event is None:
            return
        self.last_event = event
        if "total" in event.losses:
            self.loss_plot.add(event.step, event.losses["total"], redraw=False)
        if update.preview_picture is not None:
            z, region = update.preview_at
            where = ("" if z is None else f"plane {z}, ") + f"y {region[0]}-{region[2]}, x {region[1]}-{region[3]}"
            self.preview_view.show_picture(update.preview_picture, f"Live preview at step {event.step}: {where}")
        if event.model is not None:
            self._show_progress()
            self._training_finished(event, update)
        else:
            self._show_progress_soon()

    def _show_progress_soon(self) -> None:
        """Redraw the progress at most every PROGRESS_REFRESH_SECONDS: every redraw of the window
        costs napari's event loop time (a lot with software OpenGL), steps can come much faster."""
        if self._progress_pending:
            return
        wait = PROGRESS_REFRESH_SECONDS - (time.monotonic() - self._last_progress_shown)
        if wait <= 0:
            self._show_progress()
        else:
            self._progress_pending = True
            QTimer.singleShot(int(wait * 1000), self._show_progress)

    def _show_progress(self) -> None:
        self._progress_pending = False
        self._last_progress_shown = time.monotonic()
        event = self.last_event
        if self.closed or event is None:
            return
        self.train_progress.setMaximum(max(1, event.total_steps))
        self.train_progress.setValue(event.step)
        eta = "" if event.model is not None else f" · ETA {format_duration(event.eta)}"
        self.train_progress.setFormat(f"step {event.step} / {event.total_steps}{eta}")
        self.device_label.setText(f"Device: {event.device}")
        self.loss_plot.update()
        if event.model is None:
            self.train_status.setText(f"Training: loss {event.losses.get('total', float('nan')):.3f}")

    def _training_finished(self, event, update) -> None:
        stopped = not event.finished
        source = (f"Trained in this session, stopped at step {event.step} of {event.total_steps}" if stopped
                  else f"Trained in this session ({event.step} steps, {format_duration(event.elapsed)})")
        self.session.set_model(event.model, source)
        self.session.resumable_checkpoint = Path(event.checkpoint) if stopped and event.checkpoint else None
        if update.model_file is not None:
            source += f"; saved as {update.model_file}"
            self.session.model_source = source
        finished = f"Finished {event.step} steps in {format_duration(event.elapsed)}"
        if event.time_limited:
            finished += (f", all the time limit allowed ({event.requested_steps} asked); 'Continue training' "
                         "trains more")
        self.train_status.setText(
            f"Stopped at step {event.step} of {event.total_steps}; 'Continue training' resumes from the "
            "checkpoint." if stopped else finished + ".")
        self.model_changed.emit()
        self._predict_after_training = True

    def _run_ended(self) -> None:
        if self.closed:
            return
        if self._predict_after_training:
            self._predict_after_training = False
            self.trained.emit()
        self.host.update_buttons()
        self.start_learning()

    # ---------------------------------------------------------------- learning the stack

    def start_learning(self) -> None:
        """Learn the chosen image in the background, unless it is ticked off, training runs, or its
        time is spent (then only its state is shown)."""
        if (self.closed or not self.learn_check.isChecked() or self.jobs.learn_worker is not None
                or self.jobs.train_worker is not None):
            return
        try:
            image = self.session.image()
            folder = self.session.project_folder()
        except SessionError:
            return
        key = self._image_key()
        if key in self._learnt_images:
            return
        self._learning_image = key
        config = PretrainConfig(model=replace(self.session.train_config.model, in_channels=1),
                                device=self.session.train_config.device)
        self.jobs.start_stack_learning(
            stack_learning_run(image, folder, config, start_from=self.session.train_config.encoder,
                               budget_minutes=self.learning_minutes, stop=self.jobs.stop_learning.is_set),
            yielded=self._on_learning_update, errored=self._learning_failed, finished=self._learning_ended)

    def image_changed(self) -> None:
        """Another image was chosen: learning moves on to it (the other's encoder stays in its folder)."""
        if self.jobs.learn_worker is not None and self._learning_image != self._image_key():
            self.pause_learning()  # its end starts learning the new image
        else:
            self.start_learning()

    def _image_key(self):
        try:
            layer = self.session.image_layer()
        except SessionError:
            return None
        return id(layer), layer.name

    def _learning_ended(self) -> None:
        if self.closed:
            return
        if self._training_waits is not None:
            continuing, self._training_waits = self._training_waits, None
            self.host.update_buttons()
            self._start_training(continuing)
        else:  # another image chosen, or the box ticked again, meanwhile
            self.start_learning()

    def pause_learning(self) -> None:
        """Stop learning the stack after its current step (what it learnt is kept)."""
        if self.jobs.learn_worker is not None:
            self.jobs.stop_learning.set()

    def _learning_toggled(self, on: bool) -> None:
        if on:
            self.start_learning()
        else:
            self.pause_learning()
            self.learn_status.setText("Learning the image: paused.")

    def _on_learning_update(self, update) -> None:
        if self.closed:
            return
        done = f"{format_duration(update.seconds)} of {format_duration(update.budget)}"
        if update.finished:
            self._learnt_images.add(self._learning_image)
            text = f"Learnt the image ({format_duration(update.seconds)}); training starts from it."
        elif update.stopped:
            text = f"Learning the image: paused at {done}" + (
                "." if self.learn_check.isChecked() else "; tick the box to go on.")
        else:
            text = f"Learning the image in the background: {done}"
        self.learn_status.setText(text)

    def _learning_failed(self, err) -> None:
        self._learnt_images.add(self._learning_image)  # not tried again for this image
        if self.closed:
            return
        self.learn_status.setText("Learning the image stopped: " + str(err).splitlines()[0][:200])
