"""The plugin manifest is valid, packaged, and names the contributions napari users see."""

import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml

import napari_protoseg


def test_npe2_validates_the_installed_plugin():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", "napari-protoseg"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


def test_the_manifest_found_through_the_entry_point_is_the_repository_root_one():
    packaged = resources.files(napari_protoseg) / "napari.yaml"
    manifest = yaml.safe_load(packaged.read_text())
    root = Path(__file__).parents[1] / "napari.yaml"
    assert manifest == yaml.safe_load(root.read_text())
    assert manifest["name"] == "napari-protoseg"
    samples = manifest["contributions"]["sample_data"]
    assert [s["display_name"] for s in samples] == ["Synthetic EM stack with annotations"]


def test_every_manifest_command_imports():
    import importlib

    manifest = yaml.safe_load((resources.files(napari_protoseg) / "napari.yaml").read_text())
    for command in manifest["contributions"]["commands"]:
        module, _, name = command["python_name"].partition(":")
        assert callable(getattr(importlib.import_module(module), name)), command["id"]
