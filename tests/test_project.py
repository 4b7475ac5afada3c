"""The annotation project format: round trip, validation messages and atomic writing."""

import json
import os

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_protoseg.annotations import project as proj
from napari_protoseg.annotations.project import (
    AnnotationSet,
    ClassInfo,
    ProjectError,
    class_ids_in,
    read_annotations,
    read_project,
    write_project,
)


# ------------------------------------------------------------------------- property round trip


@st.composite
def annotation_sets(draw):
    is_stack = draw(st.booleans())
    h, w = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    z = draw(st.integers(1, 3)) if is_stack else 1
    shape = (z, h, w) if is_stack else (h, w)
    ids = draw(st.lists(st.integers(1, 300), min_size=1, max_size=4, unique=True))
    classes = [
        ClassInfo(i, f"class {i}", draw(st.booleans()),
                  draw(st.one_of(st.none(), st.sampled_from(["#12abEF", "#000000", "#ffffff"]))))
        for i in ids
    ]
    masks = None
    if draw(st.booleans()):
        masks = np.asarray(draw(st.lists(st.sampled_from([0] + ids), min_size=int(np.prod(shape)),
                                         max_size=int(np.prod(shape)))), dtype=np.uint16).reshape(shape)
    planes = st.integers(0, z - 1)

    def rect():
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        return y0, x0, draw(st.integers(y0 + 1, h)), draw(st.integers(x0 + 1, w))

    boxes = [(draw(planes), *rect(), draw(st.sampled_from(ids)), draw(st.booleans()))
             for _ in range(draw(st.integers(0, 4)))]
    points = [(draw(planes), draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1)),
               draw(st.sampled_from(ids)), draw(st.booleans())) for _ in range(draw(st.integers(0, 4)))]
    tags = {}
    for _ in range(draw(st.integers(0, 4))):
        region = rect() if draw(st.booleans()) else (-1, -1, -1, -1)
        key = (draw(planes), draw(st.sampled_from(ids)), region)
        tags[key] = draw(st.booleans())
    tag_rows = [(zz, c, present, *region) for (zz, c, region), present in tags.items()]
    return AnnotationSet(shape, classes, masks, boxes, points, tag_rows)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(annotations=annotation_sets())
def test_project_folder_round_trip_loses_nothing(tmp_path_factory, annotations):
    assert annotations.validate() == []
    folder = tmp_path_factory.mktemp("project")
    image = np.arange(np.prod(annotations.image_shape), dtype=np.float32).reshape(annotations.image_shape)
    write_project(folder, image, annotations)
    loaded = read_project(folder)
    assert loaded.annotations.equals(annotations)
    np.testing.assert_array_equal(loaded.image, image)
    # Writing what was read gives the same files again.
    write_project(folder, loaded.image, loaded.annotations)
    assert read_annotations(folder).equals(annotations)


def test_two_d_project_files_have_no_z_column(tmp_path, plane_annotations):
    write_project(tmp_path, np.zeros(plane_annotations.image_shape), plane_annotations)
    for name in ("boxes.csv", "points.csv", "tags.csv"):
        assert not (tmp_path / name).read_text().split("\n")[0].startswith("z,")


def test_whole_plane_tags_are_written_with_empty_region_cells(tmp_path, stack_annotations):
    write_project(tmp_path, np.zeros(stack_annotations.image_shape), stack_annotations)
    lines = (tmp_path / "tags.csv").read_text().splitlines()
    assert lines[0] == "z,class,present,y0,x0,y1,x1"
    assert lines[1] == "0,3,1,,,,"


def test_optional_columns_default_to_exhaustive(tmp_path, stack_annotations):
    write_project(tmp_path, np.zeros(stack_annotations.image_shape), stack_annotations)
    (tmp_path / "points.csv").write_text("z,y,x,class\n0,1,2,3\n")
    (tmp_path / "boxes.csv").write_text("z,y0,x0,y1,x1,class\n0,1,2,5,6,3\n")
    annotations = read_annotations(tmp_path)
    assert annotations.points["exhaustive"].tolist() == [True]
    assert annotations.boxes["exhaustive"].tolist() == [True]


def test_types_emptied_since_last_save_are_removed(tmp_path, stack_annotations):
    write_project(tmp_path, np.zeros(stack_annotations.image_shape), stack_annotations)
    stack_annotations.boxes = proj.empty_boxes()
    stack_annotations.masks = np.zeros(stack_annotations.image_shape, np.uint8)
    write_project(tmp_path, np.zeros(stack_annotations.image_shape), stack_annotations)
    assert not (tmp_path / "boxes.csv").exists()
    assert not (tmp_path / "masks.tif").exists()
    assert len(read_annotations(tmp_path).boxes) == 0


# -------------------------------------------------------------------------- atomic writing


def test_a_crash_while_writing_keeps_the_previous_file_whole(tmp_path, stack_annotations, monkeypatch):
    write_project(tmp_path, np.zeros(stack_annotations.image_shape), stack_annotations)
    before = (tmp_path / "points.csv").read_bytes()
    saved = read_annotations(tmp_path)
    stack_annotations.points = stack_annotations.points[:1]

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(proj.os, "replace", crash)
    with pytest.raises(OSError):
        write_project(tmp_path, np.zeros(stack_annotations.image_shape), stack_annotations)
    monkeypatch.undo()
    assert (tmp_path / "points.csv").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")], "temporary files left behind"
    assert read_annotations(tmp_path).equals(saved)


def test_writing_invalid_annotations_is_refused_before_any_file_changes(tmp_path, stack_annotations):
    write_project(tmp_path, np.zeros(stack_annotations.image_shape), stack_annotations)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    stack_annotations.points = np.array([(0, 99, 0, 1, True)], dtype=proj.POINT_DTYPE)
    with pytest.raises(ProjectError):
        write_project(tmp_path, np.zeros(stack_annotations.image_shape), stack_annotations)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ------------------------------------------------------------------------------ validation


@pytest.fixture
def project_dir(tmp_path, stack_annotations):
    write_project(tmp_path, np.zeros(stack_annotations.image_shape, np.uint8), stack_annotations)
    return tmp_path


def problems_of(folder):
    with pytest.raises(ProjectError) as info:
        read_annotations(folder)
    return [str(p) for p in info.value.problems]


def test_masks_of_another_shape_than_the_image_are_named(project_dir):
    tifffile.imwrite(project_dir / "masks.tif", np.ones((3, 20, 31), np.uint8), photometric="minisblack")
    (message,) = problems_of(project_dir)
    assert message.startswith("masks.tif:") and "(3, 20, 31)" in message and "(3, 20, 30)" in message


def test_mask_class_not_in_class_table_is_named(project_dir):
    tifffile.imwrite(project_dir / "masks.tif", np.full((3, 20, 30), 7, np.uint8), photometric="minisblack")
    (message,) = problems_of(project_dir)
    assert "masks.tif" in message and "[7]" in message


@pytest.mark.parametrize("file, content, expected", [
    ("boxes.csv", "z,y0,x0,y1,x1,class\n0,1,1,5,5,3\n0,1,1,5,5,9\n", "boxes.csv, row 2: class 9 is not in classes.json"),
    ("points.csv", "z,y,x,class\n0,1,1,8\n", "points.csv, row 1: class 8 is not in classes.json"),
    ("tags.csv", "z,class,present\n0,4,1\n", "tags.csv, row 1: class 4 is not in classes.json"),
    ("points.csv", "z,y,x,class\n0,20,1,1\n", "points.csv, row 1: point (y=20, x=1) is outside the 20 x 30 plane"),
    ("points.csv", "z,y,x,class\n3,1,1,1\n", "points.csv, row 1: plane z=3 is outside the image"),
    ("boxes.csv", "z,y0,x0,y1,x1,class\n0,-1,0,5,5,3\n", "reaches outside the 20 x 30 plane"),
    ("boxes.csv", "z,y0,x0,y1,x1,class\n0,5,5,5,9,3\n", "boxes.csv, row 1: box [5, 5) x [5, 9) is empty or inverted"),
    ("boxes.csv", "z,y0,x0,y1,x1,class\n0,9,5,4,9,3\n", "boxes.csv, row 1: box [9, 4) x [5, 9) is empty or inverted"),
    ("points.csv", "z,y,x,class\n0,nan,1,1\n", "points.csv, row 1: column 'y' holds 'nan'; a value is needed"),
    ("points.csv", "z,y,x,class\n0,,1,1\n", "points.csv, row 1: column 'y' holds '', which is not a number"),
    ("points.csv", "z,y,x,class\n0,1.5,1,1\n", "pixel coordinates and ids are whole numbers"),
    ("points.csv", "z,y,x,class,comment\n0,1,1,1,hi\n", "points.csv: has unknown column(s) ['comment']"),
    ("boxes.csv", "z,y0,x0,y1,class\n", "boxes.csv: lacks column(s) ['x1']"),
    ("tags.csv", "z,class,present,y0,x0,y1,x1\n0,1,1,0,0,21,5\n", "tags.csv, row 1: tag region [0, 21) x [0, 5) reaches outside"),
    ("tags.csv", "z,class,present,y0,x0,y1,x1\n0,1,1,0,0,,5\n", "a tag region needs all of y0,x0,y1,x1"),
    ("tags.csv", "z,class,present\n0,1,1\n0,1,0\n", "tags.csv, row 2: says class 1 is absent but row 1 says the opposite"),
    ("tags.csv", "z,class,present\n0,1,2\n", "column 'present' must be 0 or 1"),
])
def test_bad_rows_are_named_with_file_row_and_problem(project_dir, file, content, expected):
    (project_dir / file).write_text(content)
    messages = problems_of(project_dir)
    assert any(expected in m for m in messages), messages


def test_every_problem_is_reported_not_only_the_first(project_dir):
    (project_dir / "points.csv").write_text("z,y,x,class\n0,1,1,8\n0,1,1,1\n0,99,1,1\n")
    (project_dir / "boxes.csv").write_text("z,y0,x0,y1,x1,class\n0,5,5,2,9,3\n")
    messages = problems_of(project_dir)
    assert len(messages) == 3
    assert {m.split(":")[0] for m in messages} == {"points.csv, row 1", "points.csv, row 3", "boxes.csv, row 1"}


def test_a_z_column_in_a_two_d_project_is_an_error(tmp_path, plane_annotations):
    write_project(tmp_path, np.zeros(plane_annotations.image_shape), plane_annotations)
    (tmp_path / "points.csv").write_text("z,y,x,class\n0,1,1,1\n")
    assert any("single 2D plane" in m for m in problems_of(tmp_path))


@pytest.mark.parametrize("doc, expected", [
    ({"classes": [{"id": 0, "name": "bg"}]}, "class id 0 must be an integer >= 1"),
    ({"classes": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}, "class id 1 is used twice"),
    ({"classes": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]}, "class name 'a' is used twice"),
    ({"classes": [{"id": 1, "name": "a", "color": "red"}]}, "is not of the form '#rrggbb'"),
    ({"classes": [{"id": 1, "name": "a", "size": 3}]}, "unknown key(s) ['size']"),
    ({"classes": []}, "defines no class"),
    ({"1": "cytoplasm"}, 'must be an object {"classes"'),
])
def test_bad_class_tables_are_explained(project_dir, doc, expected):
    (project_dir / "classes.json").write_text(json.dumps(doc))
    messages = problems_of(project_dir)
    assert any(expected in m for m in messages), messages


def test_missing_class_table_and_broken_json_are_explained(project_dir):
    (project_dir / "classes.json").write_text("{not json")
    assert "classes.json: is not valid JSON" in problems_of(project_dir)[0]
    (project_dir / "classes.json").unlink()
    assert "classes.json: is missing" in problems_of(project_dir)[0]


def test_rgb_image_gets_a_message_saying_to_convert_it(tmp_path, classes):
    tifffile.imwrite(tmp_path / "image.tif", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [c.to_json() for c in classes]}))
    (message,) = problems_of(tmp_path)
    assert "RGB" in message and "grayscale" in message


def test_multichannel_image_gets_a_clear_message(classes):
    ann = AnnotationSet((2, 3, 64, 64), classes)
    (problem,) = ann.validate()
    assert "4 dimensions" in problem.message and "single-channel" in problem.message


def test_write_project_refuses_an_image_of_another_shape(tmp_path, stack_annotations):
    with pytest.raises(ProjectError, match="annotations were made for shape"):
        write_project(tmp_path, np.zeros((3, 20, 31)), stack_annotations)


def test_summary_counts_annotations_per_type_class_and_plane(stack_annotations):
    summary = stack_annotations.summary()
    assert summary["totals"] == {"mask_pixels": 18 + 60 + 16, "boxes": 2, "points": 2, "tags": 2}
    assert summary["classes"]["mitochondrion"] == {
        "mask_pixels": 16, "boxes": 2, "points": 1, "tags_present": 1, "tags_absent": 0}
    assert summary["planes_annotated"] == [0, 1, 2]


def test_written_files_are_readable_by_the_group_and_others_as_usual(tmp_path, stack_annotations):
    previous = os.umask(0o022)
    os.umask(previous)
    write_project(tmp_path, np.zeros(stack_annotations.image_shape), stack_annotations)
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~previous, path.name


def test_a_class_table_reads_back_from_json_and_is_checked(classes):
    """One parser for every class table (classes.json, model files, checkpoints, layer metadata)."""
    assert proj.classes_from_json([c.to_json() for c in classes]) == (classes, [])
    assert [ClassInfo.from_json(c.to_json()) for c in classes] == classes
    typo = [{"id": 1, "name": "a", "colour": "#ff0000"}]
    _, problems = proj.classes_from_json(typo)
    assert [str(p) for p in problems] == ["classes.json, row 1: unknown key(s) ['colour']; allowed are id, name, "
                                          "instances, color."]
    assert proj.classes_from_json(typo, allow_unknown_keys=True) == ([ClassInfo(1, "a")], [])
    _, problems = proj.classes_from_json([{"id": 1}, {"id": 1, "name": "b"}, {"id": 1, "name": "c"}], "class table")
    assert [str(p) for p in problems] == ["class table, row 1: each class needs at least 'id' and 'name'.",
                                          "class table, row 2: class id 1 is used twice (entries 1 and 2)."]
    assert proj.classes_from_json({"id": 1, "name": "a"})[1][0].message.startswith("must be a list of classes")


def test_label_dtype_is_the_smallest_unsigned_type_that_holds_the_labels():
    maxima = (0, 255, 256, 65535, 65536, 2**32 - 1, 2**32)
    assert [proj.label_dtype(m) for m in maxima] == [np.dtype(t) for t in (
        np.uint8, np.uint8, np.uint16, np.uint16, np.uint32, np.uint32, np.int64)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_the_class_ids_in_masks_are_their_distinct_values_in_order(dtype):
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 40, 50), dtype)
    masks[rng.random(masks.shape) < 0.01] = 7
    masks[0, 0, 0] = np.iinfo(dtype).max if dtype != np.int64 else 12
    masks[1, 2, 3] = 2
    ids = class_ids_in(masks)
    assert ids.dtype == masks.dtype and np.array_equal(ids, np.unique(masks))
    assert np.array_equal(class_ids_in(np.zeros((4, 4), dtype)), [0])
