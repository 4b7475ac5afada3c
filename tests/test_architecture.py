"""The package layout: subpackages in layers, no import cycles, and what each part may import."""

import ast
import subprocess
import sys
from pathlib import Path

import napari_protoseg

PACKAGE = Path(napari_protoseg.__file__).parent
# Each subpackage may import only from those listed before it (and from itself).
LAYERS = ["annotations", "model", "prediction", "evaluation", "training", "pretraining", "plugin", "benchmark"]
# Top-level modules and what they may import.
TOP_LEVEL = {"_text": set(), "_version": set(), "__init__": {"annotations"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every napari_protoseg module that ``path`` imports, at module level or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    modules = {m for m in found if m.split(".")[0] == "napari_protoseg"}
    return {m for m in modules if m in ALL_MODULES} - {name}


ALL_MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_module_imports_itself_through_others():
    """No import cycles among the package's modules (counting imports inside functions too)."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(GRAPH, white)
    cycles = []

    def visit(node, trail):
        color[node] = grey
        for nxt in sorted(GRAPH[node]):
            if color[nxt] == grey:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif color[nxt] == white:
                visit(nxt, trail + [nxt])
        color[node] = black

    for module in sorted(GRAPH):
        if color[module] == white:
            visit(module, [module])
    assert cycles == []


def test_subpackages_import_only_the_layers_below_them():
    """annotations < model < prediction < evaluation < training < plugin < benchmark; the command line
    may import any layer but the benchmark only from its own subcommands."""
    wrong = []
    for module, imported in GRAPH.items():
        own = _subpackage(module)
        for other in imported:
            theirs = _subpackage(other)
            if theirs in ("__init__", "_text", "_version") or theirs == own:
                continue
            if own in LAYERS:
                if theirs not in LAYERS or LAYERS.index(theirs) > LAYERS.index(own):
                    wrong.append(f"{module} imports {other}")
            elif own in TOP_LEVEL:
                if theirs not in TOP_LEVEL[own]:
                    wrong.append(f"{module} imports {other}")
    assert wrong == []


def test_the_command_line_imports_the_benchmark_only_in_the_benchmark_dispatch():
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    owners = []
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("napari_protoseg.benchmark"):
                owners.append(function.name)
    assert set(owners) == {"_benchmark_main"}


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_annotations_need_neither_torch_nor_napari():
    loaded = _modules_after("import napari_protoseg.annotations.project, napari_protoseg.annotations.synthetic")
    assert not {"torch", "napari", "qtpy"} & loaded


def test_loading_a_model_file_does_not_load_the_training_code():
    loaded = _modules_after("import napari_protoseg.model.file, napari_protoseg.prediction.pipeline")
    assert not {m for m in loaded if m.startswith("napari_protoseg.training")}


def test_the_plugin_and_help_never_load_the_benchmark():
    loaded = _modules_after("import napari_protoseg, napari_protoseg.plugin.session, napari_protoseg.cli\n"
                            "napari_protoseg.cli.build_parser()")
    assert not {m for m in loaded if m.startswith("napari_protoseg.benchmark")}
    assert not {"sklearn", "matplotlib"} & loaded


def test_the_session_has_no_qt_in_it():
    loaded = _modules_after("import napari_protoseg.plugin.session")
    assert not {m for m in loaded if m.split(".")[0] in ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6")}


def test_importing_the_package_loads_nothing_heavy():
    """napari imports the package to find the plugin: that must not load NumPy, PyTorch or napari."""
    loaded = _modules_after("import napari_protoseg")
    assert not {"numpy", "torch", "napari"} & loaded
    assert _modules_after("from napari_protoseg import AnnotationSet") >= {"napari_protoseg.annotations.project"}
