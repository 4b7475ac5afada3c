"""The Classes section: the class table (colour, name, instances) and adding or removing classes."""

from __future__ import annotations

from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QColorDialog,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from napari_protoseg.plugin.panel.common import PanelSection, fit_height, swatch
from napari_protoseg.plugin.session import SessionError


class ClassesSection(PanelSection):
    """The class table; every edit goes through the session, then the whole panel is refreshed."""

    def __init__(self, host):
        super().__init__(host)
        self._updating = False  # True while the table is filled from the session
        layout = QVBoxLayout(self)
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

    def refresh(self) -> None:
        self._updating = True
        try:
            self._fill_class_table()
        finally:
            self._updating = False

    def update_buttons(self) -> None:
        training = self.jobs.train_worker is not None
        self.add_class_button.setEnabled(not training)
        self.remove_class_button.setEnabled(not training)

    def _fill_class_table(self) -> None:
        table = self.class_table
        table.blockSignals(True)
        table.setRowCount(len(self.session.classes))
        for row, info in enumerate(self.session.classes):
            button = QPushButton()
            button.setIcon(swatch(info.display_color(), 16))
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
        fit_height(table)

    def _edit(self, change) -> None:
        """Apply a change of the class table, say what is wrong if the session refuses it, refresh."""
        try:
            change()
        except SessionError as err:
            self.notify("error", str(err))
        self.host.refresh()

    def add_class(self) -> None:
        self._edit(lambda: self.session.add_class())

    def remove_selected_class(self) -> None:
        rows = {index.row() for index in self.class_table.selectedIndexes()}
        if not rows:
            self.notify("info", "Select the class to remove in the table first.")
            return
        class_id = self.session.classes[min(rows)].id
        self._edit(lambda: self.session.remove_class(class_id))

    def recolor_class(self, class_id: int, color: str) -> None:
        self._edit(lambda: self.session.recolor_class(class_id, color))

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
        QTimer.singleShot(0, self.host.refresh)  # not inside the table's own signal
