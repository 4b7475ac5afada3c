"""The class table: the classes a project annotates, with their names, colours and instance flags."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from napari_protoseg.annotations.project import DEFAULT_COLORS, ClassInfo, check_classes, find_class
from napari_protoseg.plugin.layers import classes_from_metadata
from napari_protoseg.plugin.session.common import SessionError, problem_lines


def default_classes() -> list[ClassInfo]:
    """The class table of an image that has none yet: background and one object class."""
    return [ClassInfo(1, "background", False, DEFAULT_COLORS[9]), ClassInfo(2, "object", True, DEFAULT_COLORS[1])]


class ClassTable:
    """The classes, checked on every edit. ``edited()`` is called after each edit (the session pushes
    the table into the layers then); ``in_use(class_id)`` says whether a class is drawn somewhere."""

    def __init__(self, edited: Callable[[], None], in_use: Callable[[int], bool]):
        self.classes: list[ClassInfo] = []
        self._edited = edited
        self._in_use = in_use

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.classes]

    def by_id(self, class_id: int) -> ClassInfo:
        found = find_class(self.classes, class_id)
        if found is None:
            raise SessionError(f"There is no class with id {class_id}.")
        return found

    def take_from_layers(self, layers) -> bool:
        """Take the table from the first layer whose metadata carries one; False when none does."""
        for layer in layers:
            classes = classes_from_metadata(layer.metadata)
            if classes:
                self.classes = classes
                return True
        return False

    def set(self, classes: list[ClassInfo]) -> None:
        """Replace the table (checked: unique ids and names, valid colours) as an edit."""
        problems = check_classes(classes, file="class table")
        if problems:
            raise SessionError(problem_lines(problems))
        self.classes = classes
        self._edited()

    def _replace_class(self, class_id: int, **changes) -> None:
        self.by_id(class_id)
        self.set([replace(c, **changes) if c.id == class_id else c for c in self.classes])

    def add(self, name: str | None = None, instances: bool = False, color: str | None = None) -> ClassInfo:
        """Add a class with the next free id (and a free default name and colour)."""
        new_id = max(self.ids, default=0) + 1
        names = {c.name for c in self.classes}
        if name is None:
            name = f"class {new_id}"
            while name in names:
                name += "'"
        used = {c.display_color() for c in self.classes}
        if color is None:
            color = next((c for c in DEFAULT_COLORS if c not in used), DEFAULT_COLORS[(new_id - 1) % 10])
        info = ClassInfo(new_id, name, bool(instances), color)
        self.set([*self.classes, info])
        return info

    def rename(self, class_id: int, name: str) -> None:
        name = name.strip()
        if not name:
            raise SessionError("A class needs a name; type one in.")
        if any(c.name == name and c.id != class_id for c in self.classes):
            raise SessionError(f"There is already a class called '{name}'; choose another name.")
        self._replace_class(class_id, name=name)

    def recolor(self, class_id: int, color: str) -> None:
        self._replace_class(class_id, color=str(color).lower())

    def set_instances(self, class_id: int, instances: bool) -> None:
        self._replace_class(class_id, instances=bool(instances))

    def remove(self, class_id: int) -> None:
        """Remove a class nobody drew yet; a class in use must be erased from the layers first."""
        info = self.by_id(class_id)
        if self._in_use(class_id):
            raise SessionError(f"The class '{info.name}' is used in the annotations; erase or re-class those "
                               "annotations first, or rename the class instead.")
        self.set([c for c in self.classes if c.id != class_id])
