"""The protoseg command line: exit codes and messages, never a traceback for bad input."""

import subprocess
import sys

import numpy as np
import pytest

from napari_protoseg.cli import main
from napari_protoseg.project import write_project


@pytest.fixture
def project_folder(tmp_path, stack_annotations):
    return write_project(tmp_path / "cells", np.zeros(stack_annotations.image_shape, np.uint8), stack_annotations)


def test_validate_prints_a_summary_and_exits_zero_for_a_valid_project(project_folder, capsys):
    assert main(["validate", str(project_folder)]) == 0
    out = capsys.readouterr().out
    assert "valid annotation project" in out
    assert "image: 3 x 20 x 30" in out
    assert "94 mask pixels, 2 boxes, 2 points, 2 tags" in out
    assert any(line.split()[:6] == ["mitochondrion", "16", "2", "1", "1", "0"] for line in out.splitlines())
    assert "planes annotated (3): 0-2" in out


def test_validate_lists_every_problem_and_exits_non_zero(project_folder, capsys):
    (project_folder / "points.csv").write_text("z,y,x,class\n0,1,1,42\n0,nan,1,1\n")
    assert main(["validate", str(project_folder)]) == 1
    err = capsys.readouterr().err
    assert "not a valid annotation project" in err
    assert "points.csv, row 1: class 42 is not in classes.json" in err
    assert "points.csv, row 2: column 'y' holds 'nan'" in err


def test_validate_of_a_missing_folder_explains_what_a_project_is(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere")]) == 1
    assert "is not a folder; a project is a folder holding image.tif and classes.json" in capsys.readouterr().err


def test_validate_of_a_broken_image_file_is_a_message(project_folder, capsys):
    (project_folder / "image.tif").write_bytes(b"not a tiff")
    assert main(["validate", str(project_folder)]) == 1
    assert "image.tif: cannot be read as a TIFF" in capsys.readouterr().err


def test_no_subcommand_prints_help_and_exits_with_usage_code(capsys):
    assert main([]) == 2
    assert "validate" in capsys.readouterr().out


def test_installed_console_script_gives_no_traceback_for_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "napari_protoseg.cli", "validate", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "image.tif: is missing" in result.stderr
