"""The Annotate section: which image, the class to draw in, the Masks / Boxes / Points layers, and the
image tags of the plane (or region) in view."""

from __future__ import annotations

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QRadioButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_protoseg.annotations.project import ProjectError
from napari_protoseg.plugin.panel.common import PanelSection, fit_height, swatch
from napari_protoseg.plugin.session import TAG_STATES, SessionError


class AnnotateSection(PanelSection):
    """Drawing: the image and class chosen, the layer buttons, and the tag checklist."""

    image_chosen = Signal(str)

    def __init__(self, host):
        super().__init__(host)
        self._updating = False  # True while the combo boxes are filled from the session
        layout = QVBoxLayout(self)
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
        self._build_tags(layout)

    def _build_tags(self, layout: QVBoxLayout) -> None:
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
        self._tag_rows_key = None

    # ------------------------------------------------------------------------- refresh

    def refresh(self) -> None:
        self._updating = True
        try:
            names = [layer.name for layer in self.session.image_layers()]
            current = self.session.image_name
            self.image_combo.clear()
            self.image_combo.addItems(names)
            if current in names:
                self.image_combo.setCurrentText(current)
            self._fill_class_combo()
        finally:
            self._updating = False
        self.refresh_tags()

    def _fill_class_combo(self) -> None:
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        for info in self.session.classes:
            self.class_combo.addItem(swatch(info.display_color()), info.name, info.id)
        if self.session.drawing_class in self.session.class_ids:
            self.class_combo.setCurrentIndex(self.session.class_ids.index(self.session.drawing_class))
        self.class_combo.blockSignals(False)

    def view_changed(self) -> None:
        """The plane in view changed: show its tags."""
        self.refresh_tags()

    def camera_changed(self) -> None:
        """The canvas was panned or zoomed: the visible region's tags, if those are shown."""
        if self.tag_visible.isChecked():
            self.refresh_tags()

    # ------------------------------------------------------------------------- drawing

    def _image_chosen(self, name: str) -> None:
        if self._updating or not name:
            return
        self.session.image_name = name
        self.refresh_tags()
        self.image_chosen.emit(name)

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
        self.host.refresh()
        return layer

    # ---------------------------------------------------------------------------- tags

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
        if key == self._tag_rows_key:
            return
        self._tag_rows_key = key
        table = self.tag_table
        table.clearContents()
        table.setRowCount(len(classes))
        self._tag_groups = []
        for row, info in enumerate(classes):
            item = QTableWidgetItem(info.name)
            item.setIcon(swatch(info.display_color()))
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
        fit_height(table)

    def set_tag(self, class_id: int, state: str) -> None:
        try:
            z, region = self._tag_place()
            self.session.set_tag(class_id, state, z, region)
        except SessionError as err:
            self.notify("error", str(err))
        self.refresh_tags()
