"""The protoseg panel: classes, annotate, train, predict, review, model, project.

The panel only converts between Qt controls, napari layers and the Qt-free workflow in
:mod:`napari_protoseg.plugin.session`; training and prediction run in napari thread workers so the
viewer never freezes.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QPointF, Qt, QTimer
from qtpy.QtGui import QColor, QIcon, QImage, QPainter, QPen, QPixmap, QPolygonF
from qtpy.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QColorDialog,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_protoseg._text import format_duration
from napari_protoseg.plugin.layers import METADATA_KEY, classes_from_metadata
from napari_protoseg.model.file import MODEL_SUFFIX, ModelFileError, check_model_classes, load_model, save_model
from napari_protoseg.annotations.project import ProjectError
from napari_protoseg.prediction import DECODERS
from napari_protoseg.prediction.pipeline import PredictionError, prediction_run
from napari_protoseg.plugin.session import (
    ANNOTATION_ROLES,
    AUTOSAVE_SECONDS,
    PREDICTION_LAYERS,
    PREDICTION_SEMANTIC,
    TAG_STATES,
    PreviewTarget,
    Session,
    SessionError,
    default_projects_dir,
    prediction_settings,
    training_run,
)
from napari_protoseg.training.engine import TrainConfig, training_notes

TRAIN_BUTTON_TEXT = "Train on current labels"
PREVIEW_SECONDS = 3.0
PREVIEW_MAX_SIZE = 384  # the live preview predicts at most this many pixels square around the view centre
AUTOSAVE_MS = AUTOSAVE_SECONDS * 1000
CLOSE_WAIT_SECONDS = 60.0
GIL_SWITCH_SECONDS = 0.001
PROGRESS_REFRESH_SECONDS = 0.25
_PREPARING = "preparing"  # stands for the prediction worker while its layers are being made


_warm_up_lock = threading.Lock()
_warm_up_done: threading.Event | None = None


def _import_torch_lazies(done: threading.Event) -> None:
    try:
        import torch

        # The first optimiser imports torch._dynamo (and sympy, ...) lazily; one tiny step does it.
        net = torch.nn.Conv2d(1, 1, 3)
        optimizer = torch.optim.AdamW(net.parameters())
        net(torch.zeros(1, 1, 4, 4)).sum().backward()
        optimizer.step()
    except Exception:  # noqa: BLE001 - only a warm-up; training reports real problems itself
        pass
    finally:
        done.set()


def warm_up_torch() -> threading.Event:
    """Import, in a background thread, what PyTorch imports lazily on its first optimiser (about 2 s of
    holding the GIL). Done while the user annotates, it no longer stalls napari when training starts.
    Returns an event that is set when the imports are done."""
    global _warm_up_done
    with _warm_up_lock:
        if _warm_up_done is None:
            _warm_up_done = threading.Event()
            threading.Thread(target=_import_torch_lazies, args=(_warm_up_done,), name="protoseg-warm-up").start()
        return _warm_up_done


class StoppableWorker(GeneratorWorker):
    """A generator worker whose ``quit()`` (napari's cancel, closing the window) asks the generator to
    stop cleanly through ``stop_flag`` instead of abandoning it mid-run, so training still writes its
    checkpoint and reports its last event."""

    stop_flag: threading.Event | None = None

    def quit(self) -> None:
        if self.stop_flag is not None:
            self.stop_flag.set()
        else:
            super().quit()


class WorkerFailure(Exception):
    """An exception raised inside a worker generator, carried out to the panel. (superqt's generator
    worker takes a RuntimeError for "the worker was deleted" and drops it without a signal; PyTorch
    raises RuntimeErrors for real problems, such as running out of memory.)"""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _run_until_done(generator, done: threading.Event):
    """Iterate ``generator`` and set ``done`` when it ends, however it ends."""
    try:
        yield from generator
    except Exception as err:
        raise WorkerFailure(err) from err
    finally:
        done.set()


def _stoppable_worker(generator, done: threading.Event, stop_flag: threading.Event, *, yielded, errored,
                      finished) -> StoppableWorker:
    """An unstarted worker running ``generator`` (``done`` set when it ends, however it ends) that
    napari's cancel or closing the window stops through ``stop_flag``."""
    worker = create_worker(_run_until_done, generator, done, _worker_class=StoppableWorker, _start_thread=False,
                           _connect={"yielded": yielded, "errored": errored, "finished": finished})
    worker.stop_flag = stop_flag
    return worker


class LossPlot(QWidget):
    """A small live plot of the training loss: every step faint, a running average on top. Painted
    directly, so a redraw costs next to nothing while training runs."""

    SMOOTHING = 0.1  # weight of the newest step in the running average

    def __init__(self, parent=None):
        super().__init__(parent)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def add(self, step: int, loss: float, redraw: bool = True) -> None:
        if not math.isfinite(loss):
            return
        if self.steps and self.steps[-1] == int(step):  # the last event of a run repeats its step
            self.losses[-1] = float(loss)
        else:
            self.steps.append(int(step))
            self.losses.append(float(loss))
        if redraw:
            self.update()

    def clear(self) -> None:
        self.steps, self.losses = [], []
        self.update()

    def smoothed(self) -> np.ndarray:
        values = np.asarray(self.losses, dtype=float)
        out = np.empty_like(values)
        average = values[0] if len(values) else 0.0
        for i, value in enumerate(values):
            average += self.SMOOTHING * (value - average) if i else 0.0
            out[i] = average
        return out

    def paintEvent(self, event):  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text_color = self.palette().color(self.foregroundRole())
        font = painter.font()
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        painter.setFont(font)
        plot = self.rect().adjusted(44, 8, -8, -18)
        painter.setPen(QPen(text_color, 1))
        painter.drawRect(plot)
        if len(self.losses) < 2:
            painter.drawText(plot, Qt.AlignmentFlag.AlignCenter, "the loss appears here during training")
            return
        raw = np.asarray(self.losses, dtype=float)
        smooth = self.smoothed()
        steps = np.asarray(self.steps, dtype=float)
        if len(raw) > 1000:  # a point per pixel is plenty
            keep = np.linspace(0, len(raw) - 1, 1000).astype(int)
            raw, smooth, steps = raw[keep], smooth[keep], steps[keep]
        # Single odd steps should not squash the curve: the range covers 98 % of the steps.
        low, high = float(min(np.percentile(raw, 1), smooth.min())), float(max(np.percentile(raw, 99), smooth.max()))
        if high - low < 1e-9:
            low, high = low - 0.5, high + 0.5
        first, last = float(steps[0]), float(max(steps[-1], steps[0] + 1))
        xs = plot.left() + (steps - first) / (last - first) * plot.width()

        def line(values):
            ys = plot.bottom() - (np.clip(values, low, high) - low) / (high - low) * plot.height()
            return QPolygonF([QPointF(float(x), float(y)) for x, y in zip(xs, ys)])

        faint = QColor("#f0a030")
        faint.setAlpha(90)
        painter.setPen(QPen(faint, 1))
        painter.drawPolyline(line(raw))
        painter.setPen(QPen(QColor("#f0a030"), 2))
        painter.drawPolyline(line(smooth))
        painter.setPen(QPen(text_color, 1))
        right = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        painter.drawText(0, plot.top() - 6, 40, 14, right, f"{high:.3g}")
        painter.drawText(0, plot.bottom() - 8, 40, 14, right, f"{low:.3g}")
        painter.drawText(plot.left(), plot.bottom() + 2, plot.width(), 14, Qt.AlignmentFlag.AlignLeft,
                         f"step {int(first)}")
        painter.drawText(plot.left(), plot.bottom() + 2, plot.width(), 14, Qt.AlignmentFlag.AlignRight,
                         f"loss (line: running average) · step {int(last)}")


class Section(QWidget):
    """A titled part of the panel that folds away; its content keeps its natural height."""

    def __init__(self, title: str, content: QWidget, parent=None):
        super().__init__(parent)
        self.header = QToolButton()
        self.header.setText(title)
        self.header.setCheckable(True)
        self.header.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.header.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        font = self.header.font()
        font.setBold(True)
        self.header.setFont(font)
        self.header.toggled.connect(self._show)
        self.content = content
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 2, 0, 2)
        layout.setSpacing(2)
        layout.addWidget(self.header)
        layout.addWidget(content)
        self._show(False)

    def _show(self, expanded: bool) -> None:
        self.header.setArrowType(Qt.ArrowType.DownArrow if expanded else Qt.ArrowType.RightArrow)
        self.content.setVisible(expanded)

    def expand(self, animate: bool = False) -> None:
        self.header.setChecked(True)

    def collapse(self, animate: bool = False) -> None:
        self.header.setChecked(False)

    def isExpanded(self) -> bool:
        return self.header.isChecked()


class PreviewView(QWidget):
    """The live training preview: a picture of the region in view with the predicted classes."""

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.picture = QLabel()
        self.picture.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.caption = QLabel()
        self.caption.setWordWrap(True)
        layout.addWidget(self.picture)
        layout.addWidget(self.caption)
        self.shown: np.ndarray | None = None
        self.setVisible(False)

    def show_picture(self, rgb: np.ndarray, caption: str, size: int = 260) -> None:
        self.shown = rgb
        height, width, _ = rgb.shape
        image = QImage(rgb.data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()
        pixmap = QPixmap.fromImage(image).scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                                 Qt.TransformationMode.FastTransformation)
        self.picture.setPixmap(pixmap)
        self.caption.setText(caption)
        self.setVisible(True)


def _fit_height(table: QTableWidget) -> None:
    """Make a short table exactly as tall as its rows (no inner scroll bar)."""
    table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    header = table.horizontalHeader().sizeHint().height()
    rows = sum(table.rowHeight(r) for r in range(table.rowCount()))
    table.setFixedHeight(header + rows + 2 * table.frameWidth() + 2)


def _swatch(color: str, size: int = 14) -> QIcon:
    pixmap = QPixmap(size, size)
    pixmap.fill(QColor(color))
    return QIcon(pixmap)


class ProtosegWidget(QWidget):
    """The protoseg panel for a napari viewer (npe2 widget contribution)."""

    def __init__(self, napari_viewer, train_config: TrainConfig | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.session = Session(napari_viewer, train_config)
        self.session.watch_annotation_layers()
        self.confirm = self._ask  # (question) -> bool; tests replace it
        self.preview_target = PreviewTarget(PREVIEW_SECONDS)
        self._train_worker = None
        self._predict_worker = None
        self._save_worker = None
        self._stop_training = threading.Event()
        self._stop_prediction = threading.Event()
        self._training_done = threading.Event()
        self._prediction_done = threading.Event()
        self._training_done.set()
        self._prediction_done.set()
        self._predict_after_training = False
        self._progress_pending = False
        self._last_progress_shown = 0.0
        self._workers_running = 0
        self._switch_interval: float | None = None
        self._lifecycle = {"closed": False}
        self._updating = False  # True while the panel fills its own controls
        self.last_event = None  # the latest TrainEvent (tests and the status line read it)

        self._build()
        self._connect_viewer()
        self.autosave_timer = QTimer(self)
        self.autosave_timer.setInterval(AUTOSAVE_MS)
        self.autosave_timer.timeout.connect(self.autosave)
        self.autosave_timer.start()
        self.refresh()
        self.warmed_up = warm_up_torch()

    @property
    def _closed(self) -> bool:
        return self._lifecycle["closed"]

    # ======================================================================== building

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
        self.sections: dict[str, Section] = {}
        for title, builder, expanded in (
            ("Classes", self._build_classes, True),
            ("Annotate", self._build_annotate, True),
            ("Train", self._build_train, True),
            ("Predict", self._build_predict, False),
            ("Review", self._build_review, False),
            ("Model", self._build_model, False),
            ("Project", self._build_project, False),
        ):
            content = QWidget()
            builder(content)
            section = Section(title, content)
            if expanded:
                section.expand()
            layout.addWidget(section)
            self.sections[title] = section
        layout.addStretch(1)
        # Wide enough for every section, so nothing is cut off at the right edge of the dock.
        scroll.setMinimumWidth(max(400, body.minimumSizeHint().width()) + scroll.verticalScrollBar().sizeHint().width())

    def _build_classes(self, parent: QWidget) -> None:
        layout = QVBoxLayout(parent)
        self.class_table = QTableWidget(0, 3)
        self.class_table.setHorizontalHeaderLabels(["colour", "name", "instances"])
        self.class_table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.class_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.class_table.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.class_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.class_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.class_table.setToolTip("Double-click a name to rename; click the colour to change it; tick "
                                    "'instances' for classes whose objects are separated (e.g. mitochondria).")
        self.class_table.itemChanged.connect(self._class_item_changed)
        layout.addWidget(self.class_table)
        row = QHBoxLayout()
        self.add_class_button = QPushButton("Add class")
        self.add_class_button.clicked.connect(self.add_class)
        self.remove_class_button = QPushButton("Remove class")
        self.remove_class_button.clicked.connect(self.remove_selected_class)
        row.addWidget(self.add_class_button)
        row.addWidget(self.remove_class_button)
        layout.addLayout(row)

    def _build_annotate(self, parent: QWidget) -> None:
        layout = QVBoxLayout(parent)
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(self._image_chosen)
        form.addRow("Image", self.image_combo)
        self.class_combo = QComboBox()
        self.class_combo.currentIndexChanged.connect(self._drawing_class_chosen)
        form.addRow("Draw class", self.class_combo)
        layout.addLayout(form)
        row = QHBoxLayout()
        self.layer_buttons = {}
        for role, text, tip in (("masks", "Masks", "Paint, fill or draw polygons in the chosen class"),
                                ("boxes", "Boxes", "Draw a rectangle tight around one object"),
                                ("points", "Points", "Click once inside an object")):
            button = QPushButton(text)
            button.setToolTip(tip)
            button.clicked.connect(lambda _=False, role=role: self.activate_layer(role))
            row.addWidget(button)
            self.layer_buttons[role] = button
        layout.addLayout(row)
        row = QHBoxLayout()
        self.exhaustive_check = QCheckBox()
        tip = ("Tick when you box (or click) ALL objects of the class in this plane: then everything outside "
               "them is known not to be that class.")
        self.exhaustive_check.setToolTip(tip)
        self.exhaustive_check.toggled.connect(self.session.set_exhaustive)
        exhaustive_label = QLabel("Boxes and points mark every object of the class in their plane")
        exhaustive_label.setWordWrap(True)
        exhaustive_label.setToolTip(tip)
        exhaustive_label.setBuddy(self.exhaustive_check)
        row.addWidget(self.exhaustive_check)
        row.addWidget(exhaustive_label, 1)
        layout.addLayout(row)

        self.tags_label = QLabel("Tags")
        layout.addWidget(self.tags_label)
        tags_scope = QHBoxLayout()
        tags_scope.addWidget(QLabel("for the"))
        self.tag_whole_plane = QRadioButton("whole plane")
        self.tag_visible = QRadioButton("visible region")
        self.tag_whole_plane.setChecked(True)
        self.tag_whole_plane.toggled.connect(lambda _: self.refresh_tags())
        tags_scope.addWidget(self.tag_whole_plane)
        tags_scope.addWidget(self.tag_visible)
        tags_scope.addStretch(1)
        layout.addLayout(tags_scope)
        self.tag_table = QTableWidget(0, 4)
        self.tag_table.setHorizontalHeaderLabels(["class", "present", "absent", "unknown"])
        self.tag_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in (1, 2, 3):
            self.tag_table.horizontalHeader().setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        self.tag_table.verticalHeader().setVisible(False)
        self.tag_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.tag_table.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.tag_table.setToolTip("Image tags: say which classes occur in the plane (or the visible region).")
        layout.addWidget(self.tag_table)
        self._tag_groups: list[QButtonGroup] = []

    def _build_train(self, parent: QWidget) -> None:
        layout = QVBoxLayout(parent)
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

    def _build_predict(self, parent: QWidget) -> None:
        layout = QVBoxLayout(parent)
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

    def _build_review(self, parent: QWidget) -> None:
        layout = QVBoxLayout(parent)
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

    def _build_model(self, parent: QWidget) -> None:
        layout = QVBoxLayout(parent)
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

    def _build_project(self, parent: QWidget) -> None:
        layout = QVBoxLayout(parent)
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
        stops = (self._stop_training, self._stop_prediction)
        dones = (self._training_done, self._prediction_done)
        lifecycle = self._lifecycle

        def on_destroyed(*_):
            lifecycle["closed"] = True
            for flag in stops:
                flag.set()
            deadline = time.monotonic() + CLOSE_WAIT_SECONDS
            for done in dones:
                done.wait(max(0.0, deadline - time.monotonic()))

        self.destroyed.connect(on_destroyed)

    def _layer_inserted(self, event) -> None:
        if self._closed:
            return
        layer = event.value
        role = (layer.metadata.get(METADATA_KEY) or {}).get("role") if layer.metadata else None
        if role in ANNOTATION_ROLES:
            classes = classes_from_metadata(layer.metadata)
            if classes and classes != self.session.classes:
                self.session.classes = classes
                self.session.apply_classes()
            self.session.watch_layer(layer)
        self._layers_changed()

    def _layers_changed(self, *_args) -> None:
        if not self._closed:
            self.refresh()

    def _view_changed(self, *_args) -> None:
        if self._closed:
            return
        self.refresh_tags()
        self._aim_preview()

    def _camera_changed(self, *_args) -> None:
        if self._closed:
            return
        if self.tag_visible.isChecked():
            self.refresh_tags()
        self._aim_preview()

    # ========================================================================= refresh

    def refresh(self) -> None:
        """Fill every control from the session and the viewer."""
        self._updating = True
        try:
            names = [layer.name for layer in self.session.image_layers()]
            current = self.session.image_name
            self.image_combo.clear()
            self.image_combo.addItems(names)
            if current in names:
                self.image_combo.setCurrentText(current)
            self._fill_class_table()
            self._fill_class_combo()
        finally:
            self._updating = False
        self.refresh_tags()
        self._refresh_model_info()
        self._refresh_project_label()
        self._update_buttons()

    def _fill_class_table(self) -> None:
        table = self.class_table
        table.blockSignals(True)
        table.setRowCount(len(self.session.classes))
        for row, info in enumerate(self.session.classes):
            button = QPushButton()
            button.setIcon(_swatch(info.display_color(), 16))
            button.setToolTip(f"{info.display_color()}: click to change the colour")
            button.setFlat(True)
            button.clicked.connect(lambda _=False, cid=info.id: self._recolor_dialog(cid))
            table.setCellWidget(row, 0, button)
            name = QTableWidgetItem(info.name)
            name.setData(Qt.ItemDataRole.UserRole, info.id)
            table.setItem(row, 1, name)
            flag = QTableWidgetItem()
            flag.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
            flag.setCheckState(Qt.CheckState.Checked if info.instances else Qt.CheckState.Unchecked)
            flag.setData(Qt.ItemDataRole.UserRole, info.id)
            table.setItem(row, 2, flag)
            table.setVerticalHeaderItem(row, QTableWidgetItem(str(info.id)))
        table.blockSignals(False)
        _fit_height(table)

    def _fill_class_combo(self) -> None:
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        for info in self.session.classes:
            self.class_combo.addItem(_swatch(info.display_color()), info.name, info.id)
        if self.session.drawing_class in self.session.class_ids:
            self.class_combo.setCurrentIndex(self.session.class_ids.index(self.session.drawing_class))
        self.class_combo.blockSignals(False)

    def _tag_place(self):
        """(z, region) the tag checklist refers to; raises SessionError without an image."""
        z = self.session.current_plane()
        region = self.session.visible_region() if self.tag_visible.isChecked() else None
        return z, region

    def refresh_tags(self) -> None:
        """Show the tags of the plane (or region) in view; rows are rebuilt only when classes change."""
        try:
            z, region = self._tag_place()
            states = self.session.tag_states(z, region)
        except (SessionError, ProjectError):
            self._build_tag_rows([])
            self.tags_label.setText("Tags (open an image first)")
            return
        where = "the image" if z is None else f"plane {z}"
        if region is not None:
            where += f", y {region[0]}-{region[2]}, x {region[1]}-{region[3]}"
        self.tags_label.setText(f"Tags of {where}")
        self._build_tag_rows(self.session.classes)
        for info, group in zip(self.session.classes, self._tag_groups):
            column = 1 + TAG_STATES.index(states.get(info.id, TAG_STATES[-1]))
            group.button(column).setChecked(True)

    def _build_tag_rows(self, classes) -> None:
        key = [(c.id, c.name, c.display_color()) for c in classes]
        if key == getattr(self, "_tag_rows_key", None):
            return
        self._tag_rows_key = key
        table = self.tag_table
        table.clearContents()
        table.setRowCount(len(classes))
        self._tag_groups = []
        for row, info in enumerate(classes):
            item = QTableWidgetItem(info.name)
            item.setIcon(_swatch(info.display_color()))
            item.setFlags(Qt.ItemFlag.ItemIsEnabled)
            table.setItem(row, 0, item)
            group = QButtonGroup(table)
            for column, state in enumerate(TAG_STATES, start=1):
                radio = QRadioButton()
                radio.setToolTip(f"{info.name}: {state}")
                group.addButton(radio, column)
                cell = QWidget()
                cell_layout = QHBoxLayout(cell)
                cell_layout.setContentsMargins(0, 0, 0, 0)
                cell_layout.setAlignment(Qt.AlignmentFlag.AlignCenter)
                cell_layout.addWidget(radio)
                table.setCellWidget(row, column, cell)
            group.idClicked.connect(lambda column, cid=info.id: self.set_tag(cid, TAG_STATES[column - 1]))
            self._tag_groups.append(group)
        _fit_height(table)

    def _refresh_model_info(self) -> None:
        self.model_info.setText(self.session.model_info())

    def _refresh_project_label(self) -> None:
        try:
            layer = self.session.image_layer()
        except SessionError:
            self.project_label.setText("Project folder: (no image)")
            return
        entry = layer.metadata.get(METADATA_KEY) or {}
        folder = entry.get("project")
        self.project_label.setText(f"Project folder: {folder}" if folder else
                                   f"Project folder: made in {default_projects_dir()} at the first save")

    def _busy(self) -> bool:
        return self._train_worker is not None or self._predict_worker is not None

    def _update_buttons(self) -> None:
        training = self._train_worker is not None
        predicting = self._predict_worker is not None
        idle = not training and not predicting
        self.train_button.setEnabled(idle)
        self.continue_button.setEnabled(idle and self.session.model is not None)
        self.stop_button.setEnabled(training)
        for button in self.predict_buttons.values():
            button.setEnabled(idle and self.session.model is not None)
        self.predict_stop_button.setEnabled(predicting)
        self.load_model_button.setEnabled(idle)
        self.save_model_button.setEnabled(self.session.model is not None and not training)
        self.add_class_button.setEnabled(not training)
        self.remove_class_button.setEnabled(not training)

    # ==================================================================== notifications

    def notify(self, level: str, text: str) -> None:
        """Show a napari notification (``level`` "error", "warning" or "info")."""
        {"error": show_error, "warning": show_warning, "info": show_info}[level](text)

    def _ask(self, question: str) -> bool:
        answer = QMessageBox.question(self, "protoseg", question,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _worker_failed(self, what: str, err: BaseException) -> None:
        err = err.error if isinstance(err, WorkerFailure) else err
        if self._closed:
            return
        if isinstance(err, ProjectError):
            message = f"{what} failed:\n" + "\n".join(f"- {p}" for p in err.problems)
        else:
            message = f"{what} failed: {type(err).__name__}: {err}"
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        self.notify("error", message)

    # ========================================================================= classes

    def add_class(self) -> None:
        try:
            self.session.add_class()
        except SessionError as err:
            self.notify("error", str(err))
        self.refresh()

    def remove_selected_class(self) -> None:
        rows = {index.row() for index in self.class_table.selectedIndexes()}
        if not rows:
            self.notify("info", "Select the class to remove in the table first.")
            return
        class_id = self.session.classes[min(rows)].id
        try:
            self.session.remove_class(class_id)
        except SessionError as err:
            self.notify("error", str(err))
        self.refresh()

    def recolor_class(self, class_id: int, color: str) -> None:
        try:
            self.session.recolor_class(class_id, color)
        except SessionError as err:
            self.notify("error", str(err))
        self.refresh()

    def _recolor_dialog(self, class_id: int) -> None:
        current = QColor(self.session.class_by_id(class_id).display_color())
        color = QColorDialog.getColor(current, self, "Class colour")
        if color.isValid():
            self.recolor_class(class_id, color.name())

    def _class_item_changed(self, item: QTableWidgetItem) -> None:
        if self._updating:
            return
        class_id = item.data(Qt.ItemDataRole.UserRole)
        try:
            if item.column() == 1:
                self.session.rename_class(class_id, item.text())
            elif item.column() == 2:
                self.session.set_instance_class(class_id, item.checkState() == Qt.CheckState.Checked)
        except SessionError as err:
            self.notify("error", str(err))
        QTimer.singleShot(0, self.refresh)  # not inside the table's own signal

    # ======================================================================== annotate

    def _image_chosen(self, name: str) -> None:
        if self._updating or not name:
            return
        self.session.image_name = name
        self.refresh_tags()
        self._refresh_project_label()

    def _drawing_class_chosen(self, index: int) -> None:
        if index >= 0:
            self.session.set_drawing_class(self.class_combo.itemData(index))

    def activate_layer(self, role: str):
        """Create or pick the Masks / Boxes / Points layer and put it into drawing mode."""
        try:
            layer = self.session.activate(role)
        except SessionError as err:
            self.notify("error", str(err))
            return None
        self.refresh()
        return layer

    def set_tag(self, class_id: int, state: str) -> None:
        try:
            z, region = self._tag_place()
            self.session.set_tag(class_id, state, z, region)
        except SessionError as err:
            self.notify("error", str(err))
        self.refresh_tags()

    # =========================================================================== train

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

    def train_on_current_labels(self) -> None:
        """Train a new model on every annotation drawn so far."""
        self._start_training(continuing=False)

    def continue_training(self) -> None:
        """Resume a stopped run, or go on training the current model on the current labels."""
        self._start_training(continuing=True)

    def _start_training(self, continuing: bool) -> None:
        if self._busy():
            self.notify("warning", "Training or prediction is running; wait for it or press Stop first.")
            return
        try:
            image, annotations = self.session.training_input()
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
        self._stop_training.clear()
        self._training_done.clear()
        self._aim_preview(force=True)
        self.train_status.setText("Saving the project and starting …")
        self.preview_view.setVisible(False)
        worker = _stoppable_worker(
            training_run(image, annotations, replace(self.session.train_config), snapshot=snapshot,
                         resume=resume, initial_model=initial_model,
                         preview=self.preview_target if self.preview_check.isChecked() else None,
                         stop=self._stop_training.is_set),
            self._training_done, self._stop_training, yielded=self._on_training_update,
            errored=lambda err: self._worker_failed("Training", err), finished=self._on_training_finished)
        self._train_worker = worker
        self._update_buttons()
        self._limit_torch_threads()
        self._background_started()
        worker.start()

    def _background_started(self) -> None:
        """While a worker runs, napari's event loop gets the GIL back within 1 ms (Python's default
        switch interval is 5 ms, long enough to make the loop stutter while a worker computes)."""
        self._workers_running += 1
        if self._workers_running == 1:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(GIL_SWITCH_SECONDS)

    def _background_ended(self) -> None:
        self._workers_running = max(0, self._workers_running - 1)
        if self._workers_running == 0 and self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    @staticmethod
    def _limit_torch_threads() -> None:
        """Leave one CPU core to napari's event loop while training on the CPU."""
        import torch

        cores = os.cpu_count() or 1
        if cores > 1 and torch.get_num_threads() >= cores:
            torch.set_num_threads(cores - 1)

    def stop_training(self) -> None:
        """Stop after the current step; the run's checkpoint is kept for 'Continue training'."""
        if self._train_worker is not None:
            self._stop_training.set()
            self.train_status.setText("Stopping after this step …")

    def _aim_preview(self, force: bool = False) -> None:
        if self._train_worker is None and not force:
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
        if self._closed:
            return
        if update.note:
            self.notify("warning", update.note)
        if update.saved is not None:
            self.session.set_project_folder(update.saved)
            self.save_status.setText(f"Saved at {time.strftime('%H:%M:%S')} (training started)")
            self._refresh_project_label()
        event = update.event
        if event is None:
            return
        self.last_event = event
        if "total" in event.losses:
            self.loss_plot.add(event.step, event.losses["total"], redraw=False)
        if event.preview is not None and update.preview_at is not None:
            z, region = update.preview_at
            try:
                picture = self.session.preview_picture(z, region, event.preview)
            except SessionError:
                picture = None
            if picture is not None:
                where = ("" if z is None else f"plane {z}, ") + f"y {region[0]}-{region[2]}, x {region[1]}-{region[3]}"
                self.preview_view.show_picture(picture, f"Live preview at step {event.step}: {where}")
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
        if self._closed or event is None:
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
        self._refresh_model_info()
        self._predict_after_training = True

    def _on_training_finished(self) -> None:
        self._train_worker = None
        self._background_ended()
        if self._closed:
            return
        if self._predict_after_training:
            # Predict the plane in view; new layers are made one per event-loop turn to keep napari fluid.
            self._predict_after_training = False
            self._predict_worker = _PREPARING
            self._run_in_turns([lambda: self._begin_prediction("plane", after_training=True)],
                               failed=self._prediction_not_started)
        self._update_buttons()

    def _run_in_turns(self, steps, failed=None) -> None:
        """Run the callables one per turn of the event loop (napari repaints and reacts in between).
        A ``SessionError`` is shown and ends the sequence (then ``failed()`` is called)."""
        if not steps:
            return

        def run_first():
            if self._closed:
                return
            try:
                steps[0]()
            except SessionError as err:
                self.notify("error", str(err))
                if failed is not None:
                    failed()
                return
            self._run_in_turns(steps[1:], failed)

        QTimer.singleShot(0, run_first)

    # ========================================================================= predict

    def predict(self, scope: str) -> None:
        """Predict the plane in view ("plane"), the visible region ("region") or every plane ("stack")."""
        if self._busy():
            self.notify("warning", "Training or prediction is running; wait for it or press Stop first.")
            return
        self._predict_worker = _PREPARING
        self._begin_prediction(scope)

    def _begin_prediction(self, scope: str, after_training: bool = False) -> None:
        def give_up(level=None, message=""):
            self._predict_worker = None
            self._update_buttons()
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
            if not self.confirm(question):
                return give_up("info", f"Kept your edits of {what}; the new prediction was not written.")
        self._update_buttons()
        total = int(np.shape(image)[0]) if scope == "stack" and np.ndim(image) == 3 else 1
        self.predict_progress.setMaximum(total)
        self.predict_progress.setValue(0)
        self._stop_prediction.clear()
        self._prediction_done.clear()

        def start_worker():
            worker = _stoppable_worker(
                run, self._prediction_done, self._stop_prediction, yielded=self._on_prediction_piece,
                errored=lambda err: self._worker_failed("Prediction", err), finished=self._on_prediction_finished)
            self._predict_worker = worker
            self._background_started()
            worker.start()

        layer_steps = [lambda name=name: self.session.ensure_prediction_layer(name) for name in PREDICTION_LAYERS]
        self._run_in_turns([*layer_steps, start_worker], failed=self._prediction_not_started)

    def _prediction_not_started(self) -> None:
        self._predict_worker = None
        self._prediction_done.set()
        self._update_buttons()

    def stop_prediction(self) -> None:
        self._stop_prediction.set()

    def _on_prediction_piece(self, piece) -> None:
        if self._closed:
            return
        try:
            self.session.write_prediction(piece)
        except SessionError as err:
            self._stop_prediction.set()
            self.notify("error", str(err))
            return
        self.predict_progress.setMaximum(piece.total)
        self.predict_progress.setValue(piece.done)

    def _on_prediction_finished(self) -> None:
        self._predict_worker = None
        self._background_ended()
        if self._closed:
            return
        self._update_buttons()
        if PREDICTION_SEMANTIC in self.viewer.layers:
            self.sections["Review"].expand()

    # ========================================================================== review

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
        if self.continue_after_accept.isChecked() and not self._busy():
            if self.session.model is not None and not check_model_classes(self.session.model, self.session.classes):
                self.continue_training()
            else:
                self.train_on_current_labels()

    # =========================================================================== model

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
        self.refresh()
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

    # ========================================================================= project

    def autosave(self, force: bool = False) -> None:
        """Save the project folder in the background if something was edited (or ``force``)."""
        if self._closed or self._save_worker is not None or not (self.session.dirty or force):
            return
        try:
            snapshot = self.session.snapshot()
        except SessionError as err:
            if force:
                self.notify("error", f"Cannot save the project: {err}")
            else:
                self.save_status.setText(f"Not saved: {str(err).splitlines()[0]}")
            return
        self._save_worker = create_worker(
            snapshot.write, _start_thread=True,
            _connect={"returned": self._saved, "errored": self._save_failed,
                      "finished": lambda: setattr(self, "_save_worker", None)})

    def _saved(self, folder) -> None:
        if self._closed:
            return
        self.save_status.setText(f"Saved at {time.strftime('%H:%M:%S')}")
        self._refresh_project_label()

    def _save_failed(self, err) -> None:
        self.session.dirty = True
        if not self._closed:
            self.notify("error", f"Could not save the project: {err}. Choose another folder in the Project section.")

    def _choose_folder_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Project folder")
        if folder:
            try:
                self.session.set_project_folder(folder)
            except SessionError as err:
                self.notify("error", str(err))
                return
            self._refresh_project_label()
            self.autosave(force=True)
