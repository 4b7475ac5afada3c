"""The touching-mitochondria benchmark on the synthetic sample."""

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_protoseg.benchmark import touching as bt
from napari_protoseg.cli import main
from napari_protoseg.annotations.synthetic import MITOCHONDRION, VESICLE, generate_sample


@pytest.fixture(scope="module")
def stack():
    return generate_sample((2, 128, 128), seed=2)


def test_sample_points_put_one_exhaustive_point_in_every_object_and_random_stuff_points(stack):
    points = bt.sample_points(stack.semantic, seed=0, stuff_points=5)
    four = ndi.generate_binary_structure(2, 1)
    for z in range(stack.semantic.shape[0]):
        for cid in (MITOCHONDRION, VESICLE):
            labels, n = ndi.label(stack.semantic[z] == cid, structure=four)
            mine = points[(points["z"] == z) & (points["class"] == cid)]
            assert mine["exhaustive"].all()
            assert sorted(labels[mine["y"], mine["x"]]) == list(range(1, n + 1))  # one in each object
        for cid in bt.STUFF_CLASSES:
            mine = points[(points["z"] == z) & (points["class"] == cid)]
            assert len(mine) == 5 and not mine["exhaustive"].any()
            assert (stack.semantic[z][mine["y"], mine["x"]] == cid).all()
    again = bt.sample_points(stack.semantic, seed=0, stuff_points=5)
    assert np.array_equal(points, again)


def test_touching_target_asks_wise_to_beat_both_plain_decoders():
    def figures(wise, watershed, components):
        return {name: {"touching_recall": value, "touching_objects": 10}
                for name, value in (("wise", wise), ("watershed", watershed), ("components", components))}

    assert bt.touching_target(figures(0.6, 0.5, 0.4))["met"] is True
    assert bt.touching_target(figures(0.6, 0.7, 0.4))["met"] is False
    assert bt.touching_target(figures(0.5, 0.5, 0.4))["met"] is False  # a tie is not a win
    none_touch = figures(0.0, 0.0, 0.0)
    none_touch["wise"]["touching_objects"] = 0
    assert bt.touching_target(none_touch)["met"] is None


def test_a_short_run_writes_every_decoders_figures_and_the_report(tmp_path):
    docs = tmp_path / "touching-docs.md"
    results = bt.run_touching_benchmark(tmp_path / "out", shape=(2, 96, 96), steps=2, progress=lambda m: None,
                                        docs_path=docs)
    assert set(results["decoders"]) == set(bt.DECODERS_COMPARED)
    assert results["steps_done"] == 2 and "commit" in results
    truth = generate_sample((2, 96, 96), seed=bt.TEST_SAMPLE_SEED).instances
    objects = sum(len(np.unique(plane)) - 1 for plane in truth)
    for figures in results["decoders"].values():
        assert figures["tp"] + figures["fn"] == objects  # scored on the independent test stack
    saved = json.loads((tmp_path / "out" / "touching.json").read_text())
    assert saved["decoders"].keys() == results["decoders"].keys()
    markdown = (tmp_path / "out" / "touching.md").read_text()
    assert docs.read_text() == markdown
    for name in bt.DECODERS_COMPARED:
        assert f"| `{name}` |" in markdown
    assert "Target" in markdown


def test_the_training_and_test_stacks_must_differ(tmp_path):
    with pytest.raises(ValueError, match="differ"):
        bt.run_touching_benchmark(tmp_path, train_sample_seed=3, test_sample_seed=3, steps=1)


def test_command_line_refuses_zero_steps(capsys):
    assert main(["benchmark-touching", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
