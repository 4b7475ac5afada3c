"""Mean and spread of benchmark runs over seeds, and the targets judged on the means."""

import json
import math

import pytest

from napari_protoseg.benchmark import budget as bm
from napari_protoseg.benchmark import command as bm_command
from napari_protoseg.benchmark.seeds import render_seed_markdown, summarize_seeds

from test_benchmark import fake_results


def seeded(seed: int, shift: float, names=None) -> dict:
    """``fake_results`` at ``seed`` with every protoseg mIoU and class IoU moved by ``shift``."""
    results = json.loads(json.dumps(fake_results()))
    results["seed"] = seed
    results["train_config"]["seed"] = seed
    for name, entry in results["settings"].items():
        entry["protoseg"]["miou"] += shift
        entry["protoseg"]["iou"] = {c: v + shift for c, v in entry["protoseg"]["iou"].items()}
    if names is not None:
        results["settings"] = {n: results["settings"][n] for n in names}
    return results


def test_means_spreads_and_targets_over_seeds():
    summary = summarize_seeds([seeded(0, 0.0), seeded(1, 0.02), seeded(2, -0.02)])
    assert summary["seeds"] == [0, 1, 2]
    masks = summary["settings"]["masks"]
    assert masks["n"] == 3 and masks["seeds"] == [0, 1, 2]
    assert masks["protoseg"]["miou"]["mean"] == pytest.approx(0.60)
    assert masks["protoseg"]["miou"]["sd"] == pytest.approx(0.02)  # sample sd of -0.02, 0, +0.02
    assert masks["protoseg"]["iou/synapse"]["min"] == pytest.approx(0.58)
    assert masks["peer"]["miou"]["sd"] == pytest.approx(0.0)
    targets = {t["target"]: t for t in summary["targets"]}
    # Every seed moves masks and masks+tags together: the paired gain is +0.06 in each, sd 0.
    tags = targets["`masks+tags` beats `masks` by >= 0.05 mIoU"]
    assert tags["measured"] == pytest.approx(0.06) and tags["met"] is True
    assert tags["sd"] == pytest.approx(0.0, abs=1e-12) and (tags["met_seeds"], tags["measured_seeds"]) == (3, 3)
    # masks+points beats the peer by +0.05 on the mean, by +0.07 at seed 1: met there only, not on the mean.
    peer = targets["`masks+points` beats the random-forest peer by >= 0.10 mIoU"]
    assert peer["measured"] == pytest.approx(0.05) and peer["met"] is False
    assert peer["sd"] == pytest.approx(0.02) and peer["met_seeds"] == 0
    md = render_seed_markdown(summary)
    assert "3 runs: seeds 0, 1, 2" in md and "| `masks` | 3 | 0.600 ± 0.020 |" in md
    assert "| 3 of 3 |" in md and "**no**" in md


def test_parts_of_one_seed_are_merged_and_settings_may_differ_in_their_seeds():
    summary = summarize_seeds([seeded(0, 0.0, ["masks", "mixed"]), seeded(0, 0.0, ["full"]),
                               seeded(1, 0.1, ["masks"])])
    assert summary["seeds"] == [0, 1]
    assert summary["settings"]["masks"]["n"] == 2
    assert summary["settings"]["masks"]["protoseg"]["miou"]["mean"] == pytest.approx(0.65)
    assert summary["settings"]["full"]["n"] == 1 and summary["settings"]["full"]["protoseg"]["miou"]["sd"] == 0.0
    assert "masks+boxes" not in summary["settings"]
    ratio = {t["target"]: t for t in summary["targets"]}["`mixed` mIoU >= 90 % of `full` mIoU"]
    assert ratio["measured"] == pytest.approx(0.71 / 0.80) and ratio["measured_seeds"] == 1
    md = render_seed_markdown(summary)
    assert "| `full` | 1 | 0.800 |" in md  # a single seed shows no spread


def test_only_runs_that_differ_in_their_seed_are_summarized():
    other = seeded(1, 0.0)
    other["train_config"]["steps"] += 1
    with pytest.raises(ValueError, match="differ in their seed alone"):
        summarize_seeds([seeded(0, 0.0), other])
    validation = seeded(1, 0.0)
    validation["data"] = {**validation["data"], "split": "validation"}
    with pytest.raises(ValueError, match="validation"):
        summarize_seeds([seeded(0, 0.0), validation])
    with pytest.raises(ValueError, match="nothing"):
        summarize_seeds([])


def test_summarize_seeds_from_the_command_line(tmp_path, capsys):
    files = []
    for seed, shift in ((0, 0.0), (1, 0.04)):
        path = tmp_path / f"r{seed}.json"
        path.write_text(json.dumps(seeded(seed, shift)))
        files.append(str(path))
    out, docs = tmp_path / "out", tmp_path / "seeds-doc.md"
    assert bm_command.main(["unused", "--summarize-seeds", *files, "--out", str(out), "--docs", str(docs)]) == 0
    written = json.loads((out / "seeds.json").read_text())
    assert written["seeds"] == [0, 1]
    assert math.isclose(written["settings"]["mixed"]["protoseg"]["miou"]["mean"], 0.73)
    assert (out / "seeds.md").read_text() == docs.read_text()
    assert bm_command.main(["unused", "--summarize-seeds", str(tmp_path / "missing.json"), "--out", str(out)]) == 1
    assert "missing.json" in capsys.readouterr().err
    args = bm_command.build_parser().parse_args(["data", "--seeds", "0", "1", "2", "--quick"])
    assert args.seeds == [0, 1, 2]


def test_seeds_option_runs_each_seed_into_its_folder_then_summarizes(tmp_path, monkeypatch):
    calls = []

    def fake_run(data_dir, out_dir, seed=0, docs_path=None, **kwargs):
        calls.append((seed, docs_path))
        out_dir.mkdir(parents=True)
        (out_dir / "results.json").write_text(json.dumps(seeded(seed, 0.01 * seed)))

    monkeypatch.setattr(bm_command, "run_benchmark", fake_run)
    assert bm_command.main(["data", "--seeds", "0", "2", "2", "--out", str(tmp_path)]) == 0
    assert calls == [(0, None), (2, None)]  # a complete multi-seed run never rewrites docs/benchmarks.md
    assert (tmp_path / "seed-2" / "results.json").is_file()
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [0, 2]
    assert summary["settings"]["masks"]["protoseg"]["miou"]["mean"] == pytest.approx(0.61)
