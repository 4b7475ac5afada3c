"""The annotation-budget benchmark: simulated annotations, cost model, metrics, reporting, and a quick
end-to-end run on the shared VNC data (skipped where that folder is absent)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_protoseg.benchmark import budget as bm
from napari_protoseg.benchmark import command as bm_command
from napari_protoseg.benchmark.budget import CLASS_NAMES, MITOCHONDRION, SETTINGS, annotation_seconds, simulate_setting
from napari_protoseg.evaluation.metrics import class_iou, connected_instances
from napari_protoseg.annotations.project import AnnotationSet, read_project
from napari_protoseg.training.engine import TrainConfig

DATA = Path(__file__).parents[1].parent / "shared" / "data" / "vnc"
FOUR = ndi.generate_binary_structure(2, 1)


def synthetic_semantic(n=10, size=64):
    """A small labelled stack: cytoplasm, a membrane line and objects of the three object classes,
    including two mitochondria that touch only diagonally (two objects under 4-connectivity)."""
    sem = np.ones((n, size, size), np.uint8)
    sem[:, 30, :] = 2
    sem[:, 5:12, 5:12] = 3
    sem[:, 40:50, 40:48] = 3
    sem[:, 20:22, 20:22] = 3
    sem[:, 22:24, 22:24] = 3
    sem[1::2, 14:17, 30:34] = 3  # one more on odd sections
    sem[:, 55:58, 10:20] = 4
    sem[:, 0:3, 50:64] = 5
    return sem


def components(plane, cid):
    labels, n = ndi.label(plane == cid, structure=FOUR)
    return labels, n


@pytest.fixture(scope="module")
def sem():
    return synthetic_semantic()


@pytest.fixture(scope="module")
def simulated(sem):
    return {s: simulate_setting(s, sem, seed=0) for s in SETTINGS}


# ------------------------------------------------------------------------------ simulation


def test_dense_settings(sem, simulated):
    full, masks = simulated["full"], simulated["masks"]
    np.testing.assert_array_equal(full.masks, sem)
    np.testing.assert_array_equal(masks.masks[0], sem[0])
    assert not masks.masks[1:].any()
    for ann in (full, masks):
        assert len(ann.boxes) == len(ann.points) == len(ann.tags) == 0
        assert ann.validate() == []
        assert [c.id for c in ann.classes] == [1, 2, 3, 4, 5]


def test_unknown_setting(sem):
    with pytest.raises(ValueError, match="unknown setting"):
        simulate_setting("boxes-only", sem)


def check_tags(tags, sem, sections):
    assert sorted(set(tags["z"].tolist())) == list(sections)
    tile = sem.shape[1] // bm.TAG_GRID
    for z in sections:
        rows = tags[tags["z"] == z]
        assert len(rows) == bm.TAG_GRID ** 2 * len(bm.CLASS_NAMES)  # every class on every tile
        covered = np.zeros(sem.shape[1:], int)
        for r in rows:
            assert r["y1"] - r["y0"] == tile and r["x1"] - r["x0"] == tile
            region = sem[z, r["y0"]:r["y1"], r["x0"]:r["x1"]]
            assert bool(r["present"]) == bool(np.any(region == r["class"]))  # tags agree with labels
            covered[r["y0"]:r["y1"], r["x0"]:r["x1"]] += 1
        assert (covered == len(bm.CLASS_NAMES)).all()  # the grid tiles the section


def check_boxes(boxes, sem, sections):
    assert sorted(set(boxes["z"].tolist())) == list(sections)
    assert boxes["exhaustive"].all()
    for z in sections:
        for cid in bm.OBJECT_CLASSES:
            labels, n = components(sem[z], cid)
            rows = boxes[(boxes["z"] == z) & (boxes["class"] == cid)]
            got = sorted((int(r["y0"]), int(r["x0"]), int(r["y1"]), int(r["x1"])) for r in rows)
            want = sorted((s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndi.find_objects(labels))
            assert got == want and len(got) == n  # exhaustive: one tight box per object
        assert not np.isin(boxes[boxes["z"] == z]["class"], bm.STUFF_CLASSES).any()


def check_points(points, sem, sections):
    assert sorted(set(points["z"].tolist())) == list(sections)
    for z in sections:
        rows = points[points["z"] == z]
        assert (sem[z, rows["y"], rows["x"]] == rows["class"]).all()  # every point lies inside its class
        for cid in bm.OBJECT_CLASSES:
            labels, n = components(sem[z], cid)
            mine = rows[rows["class"] == cid]
            assert mine["exhaustive"].all()
            hit = labels[mine["y"], mine["x"]]
            assert sorted(hit.tolist()) == list(range(1, n + 1))  # exactly one point in every object
        for cid in bm.STUFF_CLASSES:
            mine = rows[rows["class"] == cid]
            assert len(mine) == bm.STUFF_POINTS and not mine["exhaustive"].any()
            assert len({(int(r["y"]), int(r["x"])) for r in mine}) == bm.STUFF_POINTS


def test_masks_plus_tags(sem, simulated):
    ann = simulated["masks+tags"]
    np.testing.assert_array_equal(ann.masks[0], sem[0])
    assert not ann.masks[1:].any() and len(ann.boxes) == len(ann.points) == 0
    check_tags(ann.tags, sem, range(1, 10))
    assert ann.validate() == []


def test_masks_plus_boxes_are_tight_exhaustive_on_sections_1_to_9(sem, simulated):
    ann = simulated["masks+boxes"]
    np.testing.assert_array_equal(ann.masks[0], sem[0])
    assert not ann.masks[1:].any() and len(ann.points) == len(ann.tags) == 0
    check_boxes(ann.boxes, sem, range(1, 10))
    # 4 mitochondria (the diagonal pair counts twice), 1 synapse, 1 glia; odd sections one more mito
    assert len(ann.boxes) == 9 * 6 + 5
    assert ann.validate() == []


def test_masks_plus_points(sem, simulated):
    ann = simulated["masks+points"]
    np.testing.assert_array_equal(ann.masks[0], sem[0])
    assert not ann.masks[1:].any() and len(ann.boxes) == len(ann.tags) == 0
    check_points(ann.points, sem, range(1, 10))
    assert len(ann.points) == 9 * (6 + 2 * bm.STUFF_POINTS) + 5
    assert ann.validate() == []


def test_mixed_splits_sections_in_thirds(sem, simulated):
    ann = simulated["mixed"]
    np.testing.assert_array_equal(ann.masks[0], sem[0])
    assert not ann.masks[1:].any()
    check_tags(ann.tags, sem, [1, 2, 3])
    check_boxes(ann.boxes, sem, [4, 5, 6])
    check_points(ann.points, sem, [7, 8, 9])
    assert ann.validate() == []


def test_points_only_has_no_masks(sem, simulated):
    ann = simulated["points-only"]
    assert ann.masks is None
    assert len(ann.boxes) == len(ann.tags) == 0
    check_points(ann.points, sem, range(10))


def test_points_are_random_pixels_and_seeded(sem):
    a = simulate_setting("masks+points", sem, seed=0).points
    b = simulate_setting("masks+points", sem, seed=0).points
    c = simulate_setting("masks+points", sem, seed=1).points
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Not the centre: the points of the big square mitochondrion differ between sections.
    big = a[(a["class"] == 3) & (a["y"] >= 40) & (a["x"] >= 40)]
    assert len({(int(p["y"]), int(p["x"])) for p in big}) > 1


def test_annotation_time_cost_model_by_hand():
    size = 1024
    masks = np.zeros((2, size, size), np.uint8)
    masks[0, : size // 2, : size // 2] = 1  # a quarter of a 1024 x 1024 section: 90 / 4 min
    ann = AnnotationSet(
        image_shape=(2, size, size), classes=bm.BENCHMARK_CLASSES, masks=masks,
        boxes=[(1, 0, 0, 5, 5, 3, True)] * 3,
        points=[(1, 7, 7, 3, True)] * 4,
        tags=[(1, c, True, 0, 0, 256, 256) for c in range(1, 6)] * 2,
    )
    assert annotation_seconds(ann) == pytest.approx(90 * 60 / 4 + 3 * 7 + 4 * 2 + 10 * 1)


def test_annotation_time_of_the_settings(sem, simulated):
    plane = sem.shape[1] * sem.shape[2] / 1024**2 * 90 * 60  # seconds for one dense section
    assert annotation_seconds(simulated["full"]) == pytest.approx(10 * plane)
    assert annotation_seconds(simulated["masks"]) == pytest.approx(plane)
    assert annotation_seconds(simulated["masks+tags"]) == pytest.approx(plane + 9 * 16 * 5)
    assert annotation_seconds(simulated["masks+boxes"]) == pytest.approx(plane + 7 * (9 * 6 + 5))
    assert annotation_seconds(simulated["points-only"]) == pytest.approx(2 * (10 * 46 + 5))


# ------------------------------------------------------------------------------- the peer


def test_peer_sees_masks_and_points_only(sem, simulated):
    same = [bm.rf_label_planes(simulated[s]) for s in ("masks", "masks+tags", "masks+boxes")]
    assert all(np.array_equal(same[0], other) for other in same[1:])
    pts = simulated["masks+points"].points
    labels = bm.rf_label_planes(simulated["masks+points"])
    assert (labels[pts["z"], pts["y"], pts["x"]] == pts["class"]).all()
    assert np.count_nonzero(labels[1:]) == len({(int(p["z"]), int(p["y"]), int(p["x"])) for p in pts})


def test_peer_instances_drop_the_specks_protoseg_decoders_drop(monkeypatch):
    """The instance table compares decoders: the peer's components get the size floor that protoseg's
    decoders take from the same annotations (here 100 px objects -> 50 px), so a 4 px speck is no
    false positive for the peer either, while the main table's AP50 keeps it."""
    from types import SimpleNamespace

    truth = np.zeros((1, 40, 40), np.int32)
    truth[0, 2:12, 2:12] = 1
    masks = np.zeros((1, 40, 40), np.int64)
    masks[0, 2:12, 2:12] = 3
    project = SimpleNamespace(image=np.zeros((1, 40, 40), np.float32), annotations=bm.AnnotationSet(
        (1, 40, 40), [bm.ClassInfo(3, "mitochondrion", instances=True)], masks=masks))
    prediction = np.zeros((1, 40, 40), np.uint8)
    prediction[0, 2:12, 2:12] = 3
    prediction[0, 30:32, 30:32] = 3  # a 4 px speck
    monkeypatch.setattr(bm, "train_random_forest", lambda *a, **k: None)
    monkeypatch.setattr(bm, "predict_random_forest", lambda *a, **k: prediction)
    result = bm._run_peer(project, (np.zeros((1, 40, 40), np.float32), prediction, truth), bm.RFConfig(), 0,
                          "peer", lambda message: None)
    peer = result["instances"]["components"]
    assert peer["min_size"] == 50 and (peer["tp"], peer["fp"], peer["fn"]) == (1, 0, 0)
    assert result["mito_fp"] == 1  # raw


def test_random_forest_learns_a_toy_image(sem):
    rng = np.random.default_rng(0)
    raw = (np.choose(sem - 1, [120, 30, 200, 60, 250]) + rng.normal(0, 10, sem.shape)).clip(0, 255).astype(np.uint8)
    ann = simulate_setting("masks", sem)
    rf = bm.RFConfig(n_estimators=10, num_sigma=2, max_pixels=2000)
    forest = bm.train_random_forest(raw[:5], AnnotationSet((5, *sem.shape[1:]), ann.classes, masks=ann.masks[:5]),
                                    rf)
    pred = bm.predict_random_forest(forest, raw[5:], rf)
    assert np.nanmean(list(class_iou(pred, sem[5:], CLASS_NAMES).values())) > 0.5


# ----------------------------------------------------------------------------- reporting


def test_benchmark_config(monkeypatch):
    quick = bm.benchmark_config(quick=True)
    assert quick.steps == bm.QUICK_STEPS and quick.crop_size == bm.QUICK_CROP_SIZE
    default = TrainConfig()
    # the same share of training as the default warm-up
    assert quick.pseudo_label_warmup == round(default.pseudo_label_warmup * bm.QUICK_STEPS / default.steps)
    full = bm.benchmark_config(seed=3)
    assert full.steps == default.steps and full.pseudo_label_warmup == default.pseudo_label_warmup and full.seed == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the CPU's budget on every device
    assert bm.benchmark_config().steps == default.steps
    assert bm.benchmark_config(config_overrides={"steps": 100, "pseudo_label_warmup": 7}).pseudo_label_warmup == 7
    with pytest.raises(ValueError, match="unknown training option"):
        bm.benchmark_config(config_overrides={"stepz": 1})


def fake_entry(miou, peer_miou, minutes, shared=None):
    def method(m):
        return {"iou": {n: m for n in bm.CLASS_NAMES.values()}, "miou": m, "mito_ap50": m / 2,
                "mito_matched_iou": 0.7, "train_seconds": 12.0, "throughput_mpx_s": 1.5, "peak_memory_mb": 900.0,
                "device": "cpu"}
    return {"annotation_minutes": minutes, "protoseg": method(miou),
            "peer": {**method(peer_miou), "shared_fit_with": shared}}


def fake_results():
    settings = {
        "full": fake_entry(0.80, 0.60, 900), "masks": fake_entry(0.60, 0.50, 90),
        "masks+tags": fake_entry(0.66, 0.50, 102, shared="masks"), "masks+boxes": fake_entry(0.64, 0.50, 213, "masks"),
        "masks+points": fake_entry(0.70, 0.65, 137), "mixed": fake_entry(0.71, 0.55, 153),
        "points-only": fake_entry(0.50, 0.45, 54),
    }
    return {
        "quick": False, "seed": 0, "date": "2026-01-01T00:00:00+00:00", "napari_protoseg_version": "0.0",
        "wall_seconds": 60.0, "data": {"crop": None, "citation": bm.DATASET_CITATION},
        "environment": {"torch": "2", "sklearn": "1", "skimage": "0", "cpu_count": 2, "platform": "test"},
        "train_config": bm.benchmark_config().to_dict(), "peer_config": bm.RFConfig().to_dict(),
        "peer_note": "peer as in BENCHMARK.md", "settings": settings,
        "shared_peer_fits": {"masks": ["masks+tags", "masks+boxes"]},
        "ablations": [{"setting": "mixed", "variant": "defaults", "changes": {}, "reused_main_run": True,
                       "protoseg": settings["mixed"]["protoseg"]}],
        "reference": {"all_cytoplasm": {"miou": 0.15}},
    }


def test_targets_measured_against_thresholds():
    results = fake_results()
    targets = {t["target"]: t for t in bm.evaluate_targets(results["settings"])}
    mixed = targets["`mixed` mIoU >= 90 % of `full` mIoU"]
    assert mixed["measured"] == pytest.approx(0.71 / 0.80) and mixed["met"] is False  # 88.75 %
    assert targets["`masks+tags` beats `masks` by >= 0.05 mIoU"]["met"] is True  # +0.06
    assert targets["`masks+boxes` beats `masks` by >= 0.05 mIoU"]["met"] is False  # +0.04
    assert targets["`masks+points` beats `masks` by >= 0.05 mIoU"]["met"] is True
    assert targets["`full` beats the random-forest peer by >= 0.10 mIoU"]["met"] is True
    assert targets["`masks+points` beats the random-forest peer by >= 0.10 mIoU"]["met"] is False
    partial = bm.evaluate_targets({"masks": results["settings"]["masks"]})
    assert [t["met"] for t in partial[:4]] == [None] * 4  # not run -> not measured, never "met"


def test_report_sets_the_targets_against_the_dense_label_upper_bound():
    results = fake_results()
    results["settings"]["full"]["protoseg"]["miou"] = 0.62  # dense masks everywhere: +0.02 over masks
    md = bm.render_markdown(results)
    assert "`full` scores 0.620 mIoU, +0.020 against `masks`" in md
    assert "would have to learn more than the dense masks" in md
    results["settings"]["full"]["protoseg"]["instances"] = {"wise": {"ap50": 0.3}, "components": {"ap50": 0.4}}
    lines = "".join(bm.dense_label_ceiling(results["settings"]))
    assert "(by decoder: wise 0.300, components 0.400) bounds the 0.70 asked of `points-only`" in lines
    assert bm.dense_label_ceiling({"masks": results["settings"]["masks"]}) == []  # no `full`: nothing to say


def test_markdown_and_plot(tmp_path):
    results = fake_results()
    md = bm.render_markdown(results)
    assert md.count("| `") >= 2 * len(SETTINGS) + 1
    assert "(= `masks`)" in md and "one random-forest fit serves them all" in md
    assert "**not met**" in md and "doi:10.6084/m9.figshare.856713" in md
    assert "## Ablations" in md and "Quick run" not in md
    assert "a main run's includes its live previews" in md  # the fake's mixed ablation reuses the main run
    bm.plot_miou_vs_time(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ablations_only = {**results, "settings": {}, "shared_peer_fits": {}}
    assert "## Ablations" in bm.render_markdown(ablations_only)
    bm.plot_miou_vs_time(ablations_only, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interactivity_text_says_how_previews_were_paced():
    """Runs since the preview cap say previews come less often where they would cost over their time
    share; reports of older runs (no "preview" entry) do not claim it."""
    results = fake_results()
    results["settings"]["full"]["protoseg"]["preview_timeline"] = [[4.0, 0.3], [40.0, 0.5]]
    older = bm.render_markdown(results).split("## Interactivity")[1]
    assert "asked for every 5 s;" in older and "less often" not in older
    results["preview"] = {"every_seconds": 5.0, "max_time_share": 0.1}
    capped = bm.render_markdown(results).split("## Interactivity")[1]
    assert "less often where previews would take over 10% of the training time" in capped


def _stack(n=20, size=64):
    """Synthetic data whose raw value is the section's number (so a split shows what it read)."""
    sem = synthetic_semantic(n, size)
    raw = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], sem.shape).copy()
    return bm.BenchmarkData(raw, sem, connected_instances(sem, MITOCHONDRION))


def test_validation_split_reads_no_test_section():
    """--validation chooses defaults without the test sections: it trains on the top rows of sections
    0-9 and scores their bottom quarter; changing sections 10-19 changes nothing in it."""
    data = _stack()
    split = bm.benchmark_split(data, validation=True)
    assert split.train.raw.shape == (10, 48, 64) and split.test.raw.shape == (10, 16, 64)
    assert split.train.raw.max() <= 9 and split.test.raw.max() <= 9
    np.testing.assert_array_equal(split.test.semantic, data.semantic[:10, 48:])
    np.testing.assert_array_equal(split.train.semantic, data.semantic[:10, :48])
    # the mitochondrion at rows 40-49 is cut by the split: each part is an object of its own region
    np.testing.assert_array_equal(split.test.mito_instances, connected_instances(data.semantic[:10, 48:], MITOCHONDRION))
    assert split.description == {"split": "validation", "train_sections": [0, 9], "train_rows": [0, 47],
                                 "test_sections": [0, 9], "test_rows": [48, 63]}
    changed = bm.BenchmarkData(data.raw.copy(), data.semantic.copy(), data.mito_instances.copy())
    changed.raw[10:] = 200
    changed.semantic[10:] = 4
    again = bm.benchmark_split(changed, validation=True)
    for a, b in ((split.train, again.train), (split.test, again.test)):
        for field in ("raw", "semantic", "mito_instances"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # Validation needs only the training sections; the protocol's split needs all 20.
    assert bm.benchmark_split(bm.BenchmarkData(data.raw[:10], data.semantic[:10], data.mito_instances[:10]),
                              validation=True).test.raw.shape == (10, 16, 64)
    with pytest.raises(ValueError, match="needs 20"):
        bm.benchmark_split(bm.BenchmarkData(data.raw[:10], data.semantic[:10], data.mito_instances[:10]))
    test = bm.benchmark_split(data)
    assert test.test.raw.min() == 10 and test.train.raw.max() == 9
    assert test.description["split"] == "test"


def test_validation_reports_are_marked_and_never_the_docs(tmp_path):
    results = fake_results()
    validation = {**results, "data": {**results["data"], "split": "validation", "train_sections": [0, 9],
                                      "train_rows": [0, 767], "test_sections": [0, 9], "test_rows": [768, 1023]}}
    md = bm.render_markdown(validation)
    assert "Validation run" in md and "rows 768-1023" in md
    assert "Validation run" not in bm.render_markdown(results)
    with pytest.raises(ValueError, match="cannot be merged"):
        bm.merge_results([results, validation])
    with pytest.raises(ValueError, match="docs"):
        bm.run_benchmark(tmp_path / "nowhere", tmp_path / "out", validation=True, docs_path=tmp_path / "docs.md")
    assert bm_command.main([str(tmp_path / "nowhere"), "--validation", "--docs", str(tmp_path / "docs.md")]) == 2
    assert not (tmp_path / "docs.md").exists()


def _part(results, names, ablation_rows, complete=True):
    part = json.loads(json.dumps(results))
    part["settings"] = {n: part["settings"][n] for n in names}
    part["ablations"] = ablation_rows
    part["complete"] = complete
    return part


def test_partial_runs_merge_into_one_report(tmp_path, as_version_1):
    """Settings and ablations run in separate sessions give the one report of a complete run."""
    results = fake_results()
    # An --ablations-only run leaves out the variants that are main runs; the merge takes those from the settings.
    main_run = TrainConfig.from_dict(results["train_config"])
    rows = [{"setting": s, "variant": v, "changes": c, "reused_main_run": False,
             "protoseg": results["settings"][s]["protoseg"]} for s, v, c in bm.ABLATIONS
            if main_run.with_changes(c) != main_run]
    first = _part(results, ["full", "masks", "masks+tags"], [])
    second = _part(results, ["masks+boxes", "masks+points", "mixed", "points-only"], rows)
    merged = bm.merge_results([first, second])
    assert list(merged["settings"]) == list(SETTINGS) and merged["complete"] and not merged["partial"]
    assert len(merged["ablations"]) == len(bm.ABLATIONS)
    assert [(r["setting"], r["variant"]) for r in merged["ablations"]] == [(s, v) for s, v, _ in bm.ABLATIONS]
    reused = [r for r in merged["ablations"] if r["changes"] in ({}, {"tag_pooling": "mean"})]
    assert len(reused) == 5  # masks, mixed, full, points-only and masks+tags with the default (mean) tag pooling
    assert reused and all(r["reused_main_run"] and r["protoseg"] == results["settings"][r["setting"]]["protoseg"]
                          for r in reused)
    assert merged["shared_peer_fits"] == {"masks": ["masks+tags", "masks+boxes"]}
    assert merged["targets"] == bm.evaluate_targets(results["settings"])

    only_first = bm.merge_results([first])
    assert not only_first["complete"] and "Partial results" in bm.render_markdown(only_first)
    # the banner names the ablations the merge lacks, and only those
    banner = bm.render_markdown(only_first).split("\n")[2]
    assert "`mixed` / without cross-entropy" in banner and "`full` / defaults" not in banner
    lonely = bm.merge_results([second])  # masks+boxes shared masks' fit, which is not in this merge
    assert lonely["settings"]["masks+boxes"]["peer"]["shared_fit_with"] is None

    older = _part(results, ["masks"], [])
    older["train_config"] = as_version_1(older["train_config"])  # flat, as written before versions
    del older["train_config"]["filter_sigmas"]  # written before that option existed: trained without filters
    assert not first["train_config"]["model"]["filter_sigmas"]  # today's default: no filter bank, as before it existed
    assert list(bm.merge_results([first, older])["settings"]) == ["full", "masks", "masks+tags"]
    assert bm.merge_results([first, older])["train_config"] == first["train_config"]  # in today's format
    first_with_filters = {**first, "train_config": {**first["train_config"], "model": {
        **first["train_config"]["model"], "filter_sigmas": [1.0, 2.5]}}}
    with pytest.raises(ValueError, match="differ in train_config"):
        bm.merge_results([first_with_filters, older])
    other = _part(results, ["masks"], [])
    other["train_config"] = {**other["train_config"], "steps": 7}
    with pytest.raises(ValueError, match="differ in train_config"):
        bm.merge_results([first, other])
    interrupted = _part(results, ["masks+boxes", "masks+points"], rows[:2], complete=False)
    some = bm.merge_results([first, interrupted])
    assert list(some["settings"]) == ["full", "masks", "masks+tags", "masks+boxes", "masks+points"]
    assert len(some["ablations"]) == 2 + 3 and some["partial"]  # + the main runs of full, masks and masks+tags

    files = []
    for i, part in enumerate((first, second)):
        files.append(tmp_path / f"part{i}.json")
        bm.save_json(files[-1], part)
    docs = tmp_path / "docs.md"
    assert bm_command.main(["unused", "--merge", *map(str, files), "--out", str(tmp_path / "out"), "--docs", str(docs)]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"]
    # The report says which version ran which part.
    report = (tmp_path / "out" / "benchmarks.md").read_text()
    assert report.count("Merged part: napari-protoseg") == 2
    # The docs get the same report, its JSON next to it and the plot in images/, as docs/ holds them.
    out_md = (tmp_path / "out" / "benchmarks.md").read_text()
    assert "![mIoU against annotation time](miou_vs_time.png)" in out_md
    assert docs.read_text() == out_md.replace("](miou_vs_time.png)", "](images/miou_vs_time.png)")
    assert (json.loads((tmp_path / "benchmark-results.json").read_text())
            == json.loads((tmp_path / "out" / "results.json").read_text()))
    assert ((tmp_path / "images" / "miou_vs_time.png").read_bytes()
            == (tmp_path / "out" / "miou_vs_time.png").read_bytes())
    assert bm_command.main(["unused", "--merge", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o2")]) == 1
    partial_docs = tmp_path / "partial.md"
    assert bm_command.main(["unused", "--merge", str(files[0]), "--out", str(tmp_path / "o3"), "--docs", str(partial_docs)]) == 0
    assert "Partial results" in partial_docs.read_text()  # asked for explicitly: written, and marked partial


def test_merging_keeps_every_runs_record_and_an_unknown_total_time():
    """A merge of a merge lists each run it comes from; a part stopped before its end (no wall time)
    makes the total time unknown rather than the sum of the others."""
    results = fake_results()
    first = _part(results, ["full", "masks"], [])
    second = {**_part(results, ["mixed"], []), "date": "2026-01-02T00:00:00+00:00", "wall_seconds": 120.0}
    interrupted = _part(results, ["points-only"], [], complete=False)
    interrupted["date"] = "2026-01-03T00:00:00+00:00"
    del interrupted["wall_seconds"]

    timed = bm.merge_results([bm.merge_results([first]), second])
    assert [run["date"] for run in timed["merged_from"]] == [first["date"], second["date"]]
    assert timed["wall_seconds"] == pytest.approx(60.0 + 120.0)
    md = bm.render_markdown(timed)
    assert "merged from 2 runs (below), 3 min in all" in md and md.count("Merged part: napari-protoseg") == 2
    assert "compare train times and prediction throughput within one part only" in md

    untimed = bm.merge_results([timed, interrupted])
    assert len(untimed["merged_from"]) == 3 and untimed["wall_seconds"] is None
    md = bm.render_markdown(untimed)
    assert "total time not recorded (a part was stopped before its end, or merged without its time)" in md
    assert f"run {interrupted['date']}: `points-only`" in md  # its own line, without a time
    assert f"run {second['date']}, 2 min: `mixed`" in md

    alone = bm.render_markdown(bm.merge_results([first]))
    assert "run 2026-01-01T00:00:00+00:00, 1 min in all" in alone and "within one part only" not in alone


def test_command_line_options(tmp_path):
    args = bm_command.build_parser().parse_args(["data", "--quick", "--settings", "masks", "mixed", "--no-ablations",
                                         "--steps", "5", "--seed", "2", "--out", str(tmp_path)])
    assert args.quick and args.settings == ["masks", "mixed"] and args.no_ablations
    assert args.steps == 5 and args.seed == 2 and args.out == tmp_path
    with pytest.raises(SystemExit):
        bm_command.build_parser().parse_args(["data", "--settings", "boxes-only"])


# ------------------------------------------------------------------ quick run on the real data

# Floor for the quick `full` run's mIoU. Measured on the 2-core CPU (60 steps, 128-pixel crops,
# 256 x 256 sections, class-balanced cross-entropy, instance heads trained jointly): 0.331
# (cytoplasm 0.79, membrane 0.25, mitochondrion 0.08, glia 0.20). Any constant prediction scores at
# most the "everything cytoplasm" baseline (0.138 here: cytoplasm IoU 0.553 over 4 present
# classes), and a network that has not learnt membrane scores far below the floor.
QUICK_FULL_MIOU_FLOOR = 0.25
QUICK_MARGIN_OVER_CYTOPLASM = 0.07


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared benchmark data not found at {DATA}")
def test_quick_benchmark_on_the_vnc_data(tmp_path):
    lines = []
    results = bm.run_benchmark(DATA, tmp_path, settings=["full"], quick=True, progress=lines.append)

    # Everything is written, and the project folder reads back as the training input.
    for name in ("results.json", "benchmarks.md", "miou_vs_time.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] and saved["quick"] and saved["ablations"] == []
    project = read_project(tmp_path / "projects" / "full")
    assert project.image.shape == (10, bm.QUICK_CROP, bm.QUICK_CROP)
    assert project.annotations.masks.all()
    md = (tmp_path / "benchmarks.md").read_text()
    assert "Quick run" in md and "| `full` | protoseg |" in md and "| `full` | random forest |" in md
    assert any("mIoU" in line for line in lines)

    full = saved["settings"]["full"]
    for method in ("protoseg", "peer"):
        r = full[method]
        for key in ("miou", "mito_ap50", "mito_matched_iou", "train_seconds", "throughput_mpx_s", "peak_memory_mb"):
            assert r[key] is not None, (method, key)
        assert r["train_seconds"] > 0 and r["throughput_mpx_s"] > 0
    assert full["annotation_minutes"] == pytest.approx(10 * 256 * 256 / 1024**2 * 90)

    # The all-cytoplasm baseline, computed here from the labels themselves.
    sem = bm.BenchmarkData.load(DATA, crop=bm.QUICK_CROP).semantic[10:20]
    baseline = np.nanmean(list(class_iou(np.ones_like(sem), sem, CLASS_NAMES).values()))
    assert saved["reference"]["all_cytoplasm"]["miou"] == pytest.approx(baseline)
    miou = results["settings"]["full"]["protoseg"]["miou"]
    assert miou >= QUICK_FULL_MIOU_FLOOR, f"quick full mIoU {miou:.3f} below the floor"
    assert miou >= baseline + QUICK_MARGIN_OVER_CYTOPLASM, f"{miou:.3f} vs all-cytoplasm {baseline:.3f}"
    assert results["settings"]["full"]["protoseg"]["iou"]["membrane"] > 0.2  # share 0.16: learnt, not guessed
    # The live preview was requested as the panel does, and scored over time.
    timeline = full["protoseg"]["preview_timeline"]
    assert timeline and all(0 <= m <= 1 for _, m in timeline)
    assert [t for t, _ in timeline] == sorted(t for t, _ in timeline)
    assert "## Interactivity" in md and "| `full` |" in md.split("## Interactivity")[1]


def test_preview_summary_reads_the_timeline():
    timeline = [[4.0, 0.2], [9.5, 0.4], [28.0, 0.55], [33.0, 0.6], [60.0, 0.62]]
    ps = bm.preview_summary(timeline)
    assert ps == {"first_seconds": 4.0, "miou_at": 0.55, "final_miou": 0.62, "seconds_to_90pct": 33.0}  # 0.9 * 0.62 > 0.55
    assert bm.preview_summary([])["first_seconds"] is None
    assert bm.preview_summary([[40.0, 0.5]])["miou_at"] is None  # nothing by 30 s
    assert bm.preview_region((1024, 1024)) == (256, 256, 768, 768)
    assert bm.preview_region((256, 300)) == (0, 0, 256, 300)  # smaller planes: all of it


def test_only_a_complete_full_run_rewrites_the_docs(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bm_command, "run_benchmark", lambda *a, **k: calls.append(k))
    docs = bm._repository_docs()
    assert docs is None or docs.name == "benchmarks.md"
    for argv, expect_docs in (([], docs), (["--quick"], None), (["--settings", "masks"], None),
                              (["--no-ablations"], None), (["--steps", "10"], None),
                              (["--quick", "--docs", str(tmp_path / "b.md")], tmp_path / "b.md")):
        assert bm_command.main(["data", "--out", str(tmp_path), *argv]) == 0
        assert calls[-1]["docs_path"] == expect_docs, argv
    assert calls[-1]["command"].startswith("protoseg benchmark data")
    assert bm_command.main(["data", "--out", str(tmp_path), "--ablations-only"]) == 0
    assert calls[-1]["settings"] == [] and calls[-1]["ablations"] is True and calls[-1]["docs_path"] is None
    assert calls[-1]["ablation_settings"] is None  # every setting's ablations
    assert bm_command.main(["data", "--out", str(tmp_path), "--ablations-only", "--settings", "mixed", "masks+tags"]) == 0
    assert calls[-1]["settings"] == [] and calls[-1]["ablation_settings"] == ["mixed", "masks+tags"]
    with pytest.raises(SystemExit):
        bm_command.build_parser().parse_args(["data", "--ablations-only", "--no-ablations"])


# ------------------------------------------------------------------ mitochondrion instances


def test_report_says_when_no_touching_mitochondria_can_be_compared():
    results = with_instances(fake_results())
    for entry in results["settings"].values():
        for figures in entry["protoseg"].get("instances", {}).values():
            figures.update(touching_recall=float("nan"), touching_objects=0)
    targets = [t for t in bm.evaluate_instance_targets(results["settings"]) if "touch" in t["target"]]
    assert targets and all(t["met"] is None and "no touching mitochondria" in t["measured_text"] for t in targets)
    assert "the test sections hold none" in "\n".join(bm.render_instance_markdown(results))


def with_instances(results, wise=0.8, watershed=0.6, peer=0.5, touching=(0.9, 0.4)):
    def figures(ap50, recall):
        return {"ap50": ap50, "matched_iou": 0.8, "tp": 8, "fp": 1, "fn": 1, "touching_recall": recall,
                "touching_objects": 10}
    for name in bm.INSTANCE_SETTINGS:
        entry = results["settings"][name]
        entry["protoseg"]["instances"] = {"wise": figures(wise, touching[0]), "watershed": figures(watershed, touching[1]),
                                          "components": figures(0.4, 0.1)}
        entry["peer"]["instances"] = {"components": figures(peer, 0.1)}
    return results


def test_instance_targets_and_table():
    results = with_instances(fake_results(), wise=0.75, peer=0.5)
    targets = {t["target"]: t for t in bm.evaluate_targets(results["settings"])}
    assert targets["`points-only` mito AP50 (WISE decoder) >= 0.70"]["met"] is True
    assert targets["`points-only` mito AP50 (WISE) beats the peer's connected components by >= 0.20"]["met"] is True
    assert targets["`full`: WISE decoder beats the plain decoder where mitochondria touch"]["met"] is True
    low = {t["target"]: t for t in bm.evaluate_targets(with_instances(fake_results(), wise=0.65, peer=0.5)["settings"])}
    assert low["`points-only` mito AP50 (WISE decoder) >= 0.70"]["met"] is False
    assert low["`points-only` mito AP50 (WISE) beats the peer's connected components by >= 0.20"]["met"] is False
    md = bm.render_markdown(results)
    assert "## Mitochondrion instances" in md
    assert "| `points-only` | protoseg | wise | 0.750 |" in md and "| `points-only` | random forest | components |" in md
    assert "the peer's components keep every speck" in md  # results from before the peer had the size floor
    for name in bm.INSTANCE_SETTINGS:
        results["settings"][name]["peer"]["instances"]["components"]["min_size"] = 16
    assert "Every decoder, the peer's included, drops objects smaller" in bm.render_markdown(results)
    plain = {t["target"]: t for t in bm.evaluate_targets(fake_results()["settings"])}
    assert plain["`points-only` mito AP50 (WISE decoder) >= 0.70"]["met"] is None  # not measured
    assert "## Mitochondrion instances" not in bm.render_markdown(fake_results())


def test_results_name_the_source_commit_they_were_measured_at():
    """An editable install keeps the version string of its install, so results also record the
    checkout's commit (marked +modified when tracked files differ from it)."""
    import re
    import subprocess

    root = Path(bm.__file__).resolve().parents[2]
    commit = bm.source_commit()
    if not (root / ".git").exists():
        assert commit is None
        return
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}(\+modified)?", commit) and commit.startswith(head)


def test_the_plot_moves_a_label_below_its_marker_when_a_neighbours_label_is_above_it():
    """Settings with about the same annotation time and mIoU (`masks+points` at 137 min and `mixed`
    at 153 min, both 0.516) must not print their names over each other."""
    assert bm._crowded(153.1, 0.516, [(137.1, 0.516)])
    assert not bm._crowded(213.0, 0.492, [(137.1, 0.516)])  # 0.19 decades away
    assert not bm._crowded(153.1, 0.45, [(137.1, 0.516)])  # 0.066 mIoU lower


def test_the_peers_size_floor_follows_the_rule_of_the_decoders(monkeypatch):
    """Outlined mitochondria set the peer's floor as they set protoseg's; where only points mark
    them, the peer's own objects at the points do, as the model's do for protoseg."""
    from types import SimpleNamespace

    from napari_protoseg.prediction.decoders import annotated_min_size
    from napari_protoseg.annotations.project import empty_points

    semantic = np.ones((3, 48, 48), np.uint8)
    semantic[:, 10:30, 10:30] = 3  # one 400 px mitochondrion per section
    points = np.array([(z, 20, 20, 3, True) for z in range(3)], dtype=empty_points().dtype)
    points_only = AnnotationSet((3, 48, 48), bm.BENCHMARK_CLASSES, points=points)
    predicted = []

    def peer_map(forest, raw, rf):
        predicted.append(len(raw))
        out = np.ones(raw.shape, np.uint8)
        out[:, 15:35, 15:40] = 3  # the peer's objects at the points: 500 px
        return out

    monkeypatch.setattr(bm, "predict_random_forest", peer_map)
    assert bm.peer_min_size(None, SimpleNamespace(image=np.zeros((3, 48, 48), np.uint8), annotations=points_only)) == 250
    assert predicted == [3]
    masks = AnnotationSet((3, 48, 48), bm.BENCHMARK_CLASSES, masks=semantic, points=points)
    assert bm.peer_min_size(None, SimpleNamespace(image=np.zeros((3, 48, 48), np.uint8), annotations=masks)) \
        == annotated_min_size(masks, 3) == 200
    assert predicted == [3]  # outlined: nothing to predict


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared benchmark data not found at {DATA}")
def test_stack_pretraining_reads_only_the_training_part_and_every_run_starts_from_it(tmp_path, monkeypatch):
    from napari_protoseg.pretraining import engine as pretraining_engine

    seen = []
    real_pretrain = pretraining_engine.pretrain

    def spy(images, *args, **kwargs):
        seen.extend(np.asarray(image).copy() for image in images)
        return real_pretrain(images, *args, **kwargs)

    monkeypatch.setattr(pretraining_engine, "pretrain", spy)
    results = bm.run_benchmark(DATA, tmp_path, settings=["masks"], quick=True, pretrain_minutes=0.05,
                               progress=lambda *_: None)
    data = bm.BenchmarkData.load(DATA, crop=bm.QUICK_CROP)
    assert len(seen) == 1 and np.array_equal(seen[0], data.raw[:10])  # sections 0-9, never 10-19
    pretraining = results["pretraining"]
    assert pretraining["steps"] > 0 and pretraining["seconds"] > 0 and pretraining["started_from"] is None
    assert results["train_config"]["encoder"] == pretraining["encoder"] == str(tmp_path / "stack-encoder.safetensors")
    assert "Stack pretraining" in (tmp_path / "benchmarks.md").read_text()
