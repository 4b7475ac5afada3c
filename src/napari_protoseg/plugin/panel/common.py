"""What the panel's sections share: their base class, the fold-away frame, small Qt helpers."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QSizePolicy, QTableWidget, QToolButton, QVBoxLayout, QWidget


class PanelSection(QWidget):
    """One section of the panel (classes, annotate, train, ...): its controls and what they do.

    ``host`` is the :class:`~napari_protoseg.plugin.panel.widget.ProtosegWidget` that holds the
    session, the background jobs, notifications and questions to the user."""

    def __init__(self, host):
        super().__init__()
        self.host = host

    @property
    def session(self):
        return self.host.session

    @property
    def jobs(self):
        return self.host.jobs

    @property
    def closed(self) -> bool:
        return self.host.closed

    def notify(self, level: str, text: str) -> None:
        self.host.notify(level, text)

    def refresh(self) -> None:
        """Fill the controls from the session and the viewer."""

    def update_buttons(self) -> None:
        """Enable what can be done now (nothing that would clash with running work)."""


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


def fit_height(table: QTableWidget) -> None:
    """Make a short table exactly as tall as its rows (no inner scroll bar)."""
    table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    header = table.horizontalHeader().sizeHint().height()
    rows = sum(table.rowHeight(r) for r in range(table.rowCount()))
    table.setFixedHeight(header + rows + 2 * table.frameWidth() + 2)


def swatch(color: str, size: int = 14) -> QIcon:
    """A small square icon of a colour."""
    pixmap = QPixmap(size, size)
    pixmap.fill(QColor(color))
    return QIcon(pixmap)
