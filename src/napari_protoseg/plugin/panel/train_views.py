"""The Train section's live views: the loss plot and the preview picture, both painted directly so that
redrawing them costs napari's event loop next to nothing while training runs."""

from __future__ import annotations

import math

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QImage, QPainter, QPen, QPixmap, QPolygonF
from qtpy.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget


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
