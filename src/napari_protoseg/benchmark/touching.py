"""Touching mitochondria: the instance decoders compared where objects lie close together.

The VNC test sections hold no mitochondria within :data:`~napari_protoseg.evaluation.metrics.TOUCHING_GAP`
pixels of another, so the benchmark cannot say there whether the WISE decoder separates touching
objects better than the plain decoders. The synthetic sample (:mod:`napari_protoseg.annotations.synthetic`) holds
many. This benchmark trains on one synthetic stack from points only (the ``points-only`` setting of
BENCHMARK.md: one exhaustive point in every object, random points in the stuff classes), scores an
independent stack of the same generator, and reports every decoder's AP50, matched IoU and the
recall of touching mitochondria. Run it with ``protoseg benchmark-touching``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_protoseg.benchmark.budget import (STUFF_POINTS, _environment, _f, benchmark_config, save_json, simulate_points,
                                              source_commit)
from napari_protoseg.evaluation.instances import decoder_figures
from napari_protoseg.evaluation.metrics import TOUCHING_GAP
from napari_protoseg.annotations.project import AnnotationSet
from napari_protoseg.annotations.synthetic import CYTOPLASM, MEMBRANE, MITOCHONDRION, VESICLE, generate_sample

OBJECT_CLASSES = (MITOCHONDRION, VESICLE)
STUFF_CLASSES = (CYTOPLASM, MEMBRANE)
SHAPE = (8, 512, 512)
TRAIN_SAMPLE_SEED = 0
TEST_SAMPLE_SEED = 1
DECODERS_COMPARED = ("wise", "watershed", "components")
COMMAND = "protoseg benchmark-touching --out OUT_DIR"
DOCS_FILE = "benchmark-touching.md"


def sample_points(semantic: np.ndarray, seed: int = 0, stuff_points: int = STUFF_POINTS) -> np.ndarray:
    """Points as in BENCHMARK.md's ``points-only``, on a synthetic stack (the benchmark's
    :func:`~napari_protoseg.benchmark.budget.simulate_points` with the sample's classes): one exhaustive
    point in every 4-connected mitochondrion and vesicle of each plane, and ``stuff_points`` random,
    non-exhaustive points of each stuff class per plane."""
    return simulate_points(semantic, range(semantic.shape[0]), np.random.default_rng(seed), OBJECT_CLASSES,
                           STUFF_CLASSES, stuff_points)


def run_touching_benchmark(out_dir, *, shape=SHAPE, train_sample_seed: int = TRAIN_SAMPLE_SEED,
                           test_sample_seed: int = TEST_SAMPLE_SEED, seed: int = 0, steps: int | None = None,
                           progress=print, docs_path: str | Path | None = None, command: str | None = None) -> dict:
    """Train from points only on the synthetic stack of ``train_sample_seed``, decode the mitochondria
    of the stack of ``test_sample_seed`` with every decoder and score them. Writes ``touching.json``
    ``touching.md`` and the trained ``model.protoseg.pt`` into ``out_dir`` (and the Markdown to ``docs_path`` if given); returns the
    results. ``steps``: training steps (default: the benchmark's)."""
    from napari_protoseg import __version__
    from napari_protoseg.prediction.tiling import predict_volume
    from napari_protoseg.prediction.decoders import min_object_sizes
    from napari_protoseg.model.file import save_model
    from napari_protoseg.training.engine import train

    if len(tuple(shape)) != 3:
        raise ValueError(f"shape must be (Z, Y, X), not {shape!r}")
    if train_sample_seed == test_sample_seed:
        raise ValueError("the training and test stacks must differ (give two different sample seeds)")
    wall_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = benchmark_config(config_overrides={"steps": steps} if steps is not None else None, seed=seed)
    progress(f"touching benchmark: synthetic stacks {tuple(shape)} (sample seeds {train_sample_seed} for training, "
             f"{test_sample_seed} for scoring)")
    train_sample = generate_sample(shape, seed=train_sample_seed)
    test_sample = generate_sample(shape, seed=test_sample_seed)
    points = sample_points(train_sample.semantic, seed=seed)
    annotations = AnnotationSet(train_sample.image.shape, train_sample.annotations.classes, points=points)
    progress(f"  {len(points)} points ({int(points['exhaustive'].sum())} exhaustive, one per object); "
             f"training {config.steps} steps")
    start = time.perf_counter()
    for event in train(train_sample.image, annotations, config):
        if event.step % 300 == 0 and event.step and not event.finished:
            progress(f"  step {event.step}/{event.total_steps}")
    train_seconds = time.perf_counter() - start
    model = event.model
    save_model(out_dir / "model.protoseg.pt", model)
    classes = np.asarray(predict_volume(model, test_sample.image).classes)
    figures = decoder_figures(model, test_sample.image, classes, test_sample.instances, MITOCHONDRION)
    for name, f in figures.items():
        progress(f"  {name}: AP50 {f['ap50']:.3f}, touching recall {f['touching_recall']:.3f} "
                 f"({f['touching_objects']} touching)")
    results = {
        "benchmark": "napari-protoseg touching-mitochondria benchmark (synthetic sample, points only)",
        "napari_protoseg_version": __version__, "commit": source_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "seed": seed, "shape": list(shape), "train_sample_seed": train_sample_seed,
        "test_sample_seed": test_sample_seed, "points": int(len(points)),
        "exhaustive_points": int(points["exhaustive"].sum()), "train_config": config.to_dict(),
        "steps_done": int(event.step), "train_seconds": train_seconds,
        "min_sizes": {str(k): v for k, v in min_object_sizes(model).items()},
        "environment": _environment(), "decoders": figures,
    }
    results["target"] = touching_target(figures)
    results["wall_seconds"] = time.perf_counter() - wall_start
    save_json(out_dir / "touching.json", results)
    markdown = render_touching_markdown(results)
    written = [out_dir / "touching.json", out_dir / "touching.md", out_dir / "model.protoseg.pt"]
    (out_dir / "touching.md").write_text(markdown)
    if docs_path is not None:
        Path(docs_path).write_text(markdown)
        written.append(Path(docs_path))
    progress(f"target: {results['target']['text']}")
    progress("touching benchmark finished in {:.1f} min; wrote {}".format(
        results["wall_seconds"] / 60, ", ".join(map(str, written))))
    return results


def touching_target(figures: dict) -> dict:
    """The issue's target: the WISE decoder's recall of touching mitochondria above each plain
    decoder's (watershed and connected components)."""
    if "wise" not in figures or not figures["wise"].get("touching_objects"):
        return {"met": None, "text": "not measured (no instance heads or no touching mitochondria)"}
    wise = figures["wise"]["touching_recall"]
    plain = {name: figures[name]["touching_recall"] for name in ("watershed", "components") if name in figures}
    met = all(wise > value for value in plain.values())
    text = (f"WISE touching recall {wise:.3f} vs " + ", ".join(f"{name} {value:.3f}" for name, value in plain.items())
            + (" -> met" if met else " -> NOT met"))
    return {"met": met, "wise": wise, "plain": plain, "text": text}


def render_touching_markdown(results: dict) -> str:
    """The report: how the run was made, a row per decoder, and the target's verdict."""
    figures = results["decoders"]
    first = next(iter(figures.values()))
    objects = first["tp"] + first["fn"]
    env = results["environment"]
    target = results["target"]
    verdict = {True: "met", False: "**not met**", None: "not measured"}[target["met"]]
    lines = [
        "# Touching mitochondria (synthetic sample, points only)", "",
        f"Regenerate: `{COMMAND}` (`--docs docs/{DOCS_FILE}` writes this page). The VNC test sections hold no "
        f"mitochondria within {TOUCHING_GAP} px of another (docs/benchmarks.md), so the decoders are compared "
        "where objects touch on the synthetic sample instead: trained from points only on the stack of sample seed "
        f"{results['train_sample_seed']} ({' x '.join(map(str, results['shape']))}; {results['points']} points, "
        f"{results['exhaustive_points']} of them one per mitochondrion or vesicle, the rest "
        f"{STUFF_POINTS} random points per stuff class and plane, as in BENCHMARK.md's `points-only`), "
        f"{results['steps_done']} steps in {results['train_seconds']:.0f} s, and scored on the independent stack of "
        f"sample seed {results['test_sample_seed']}: {objects} mitochondria, {first['touching_objects']} of them "
        f"within {TOUCHING_GAP} px of another. The sample's mitochondria are the 4-connected components of their "
        "class, so touching ones are separated by a single pixel, or meet only diagonally; a decoder "
        "that merges a pair loses both. Scoring as in docs/benchmarks.md (AP50 at IoU >= 0.5, objects under the "
        "size floor dropped).", "",
        f"Run {results['date']}, napari-protoseg {results['napari_protoseg_version']}"
        + (f" (commit {results['commit'][:7]})" if results.get("commit") else "") + f", {env.get('device', 'cpu')}, "
        f"torch {env.get('torch')} ({env.get('torch_threads')} threads).", "",
        "| decoder | AP50 | matched IoU | touching recall | TP / FP / FN |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, f in figures.items():
        lines.append(f"| `{name}` | {_f(f['ap50'])} | {_f(f['matched_iou'])} | {_f(f['touching_recall'])} | "
                     f"{f['tp']} / {f['fp']} / {f['fn']} |")
    lines += ["", "Target: the WISE decoder beats the plain decoders where objects touch: "
              f"{target['text'].replace(' -> met', '').replace(' -> NOT met', '')}: {verdict}.", ""]
    return "\n".join(lines)


def build_parser(prog: str = "python -m napari_protoseg.benchmark.touching") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Train from points only on a synthetic stack and compare the instance decoders on another, where "
        "mitochondria touch."))
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options (shared with ``protoseg benchmark-touching``)."""
    parser.add_argument("--out", metavar="DIR", type=Path,
                        default=Path(tempfile.gettempdir()) / "protoseg-benchmark-touching",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="training steps (default: the benchmark's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated points and the training")
    parser.add_argument("--docs", metavar="MD", type=Path, help=f"also write the Markdown here (e.g. docs/{DOCS_FILE})")


def run_from_args(args, argv: list[str] | None = None) -> int:
    if args.steps is not None and args.steps < 1:
        print("protoseg benchmark-touching: --steps must be at least 1", file=sys.stderr)
        return 2
    command = " ".join(["protoseg benchmark-touching", *(sys.argv[1:] if argv is None else argv)])
    run_touching_benchmark(args.out, seed=args.seed, steps=args.steps, docs_path=args.docs, command=command,
                           progress=lambda message: print(message, flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
