"""The command line of the annotation-budget benchmark (``protoseg benchmark``, or
``python -m napari_protoseg.benchmark``): runs, merges and seed summaries."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from napari_protoseg.benchmark.budget import (QUICK_CROP, QUICK_SETTINGS, QUICK_STEPS, SETTINGS, VALIDATION_SHARE,
                                              _repository_docs, run_benchmark, write_merged)
from napari_protoseg.benchmark.seeds import write_seed_summary


def build_parser(prog: str = "python -m napari_protoseg.benchmark") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Annotation-budget benchmark: train on simulated annotations of each setting (sections 0-9), "
        "score sections 10-19, compare with a random-forest peer."))
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with ``protoseg benchmark``)."""
    parser.add_argument("data_dir", metavar="DATA_DIR", help="folder with raw.tif, semantic.tif, mito_instances.tif")
    parser.add_argument("--out", metavar="DIR", type=Path,
                        default=Path(tempfile.gettempdir()) / "protoseg-benchmark",
                        help="output folder (default: %(default)s); keep it outside the repository, it holds "
                             "copies of the training sections")
    parser.add_argument("--quick", action="store_true",
                        help=f"small variant: {QUICK_CROP} x {QUICK_CROP} crops, {QUICK_STEPS} steps, settings "
                             f"{', '.join(QUICK_SETTINGS)}, no ablations, lighter peer (minutes on a laptop)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, metavar="SETTING",
                        help=f"settings to run (default: all; with --quick: {' '.join(QUICK_SETTINGS)}); "
                             f"choose from {' '.join(SETTINGS)}")
    ablation_choice = parser.add_mutually_exclusive_group()
    ablation_choice.add_argument("--no-ablations", action="store_true", help="skip the ablation runs")
    ablation_choice.add_argument("--ablations-only", action="store_true",
                                 help="run only the ablations (those of the --settings given, default all), to "
                                      "--merge with a run of the settings")
    parser.add_argument("--validation", action="store_true",
                        help=f"train on the top rows of sections 0-9 and score their bottom {100 * VALIDATION_SHARE:.0f} %% of "
                             "rows, reading no test section: the run for choosing defaults (never written to the docs)")
    parser.add_argument("--steps", type=int, help="training steps (default: the plugin's default; quick: "
                        f"{QUICK_STEPS})")
    parser.add_argument("--init", metavar="ENCODER",
                        help="start every training from this encoder file ('shipped': the package's EM encoder; "
                             "default: the plugin's default, TrainConfig.encoder)")
    parser.add_argument("--pretrain-minutes", type=float, metavar="M",
                        help="first pretrain the encoder on the raw training sections (self-supervised, from --init) "
                             "for M minutes, then train every run from it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated points, training and peer")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S",
                        help="run at each of these seeds (into OUT/seed-S; --seed is then ignored) and write the "
                             "mean and spread over them to OUT/seeds.md and OUT/seeds.json (--docs MD: that "
                             "summary also to MD)")
    parser.add_argument("--summarize-seeds", nargs="+", metavar="RESULTS_JSON", type=Path,
                        help="do not train: write the mean and spread over the seeds of these results.json "
                             "(runs that differ only in their seed; parts of one seed are merged) to OUT/seeds.md "
                             "and OUT/seeds.json (DATA_DIR is then ignored)")
    parser.add_argument("--docs", metavar="MD", type=Path, help="also write the Markdown table here (a complete "
                        "full run from a source checkout writes docs/benchmarks.md by default)")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON", type=Path,
                        help="do not train: merge the results.json of runs that each did some settings/ablations "
                             "into one report in --out (DATA_DIR is then ignored); a merge holding every setting "
                             "and ablation rewrites docs/benchmarks.md like a complete run; --docs MD writes even a "
                             "partial merge there, marked as partial")


def run_from_args(args, argv: list[str] | None = None) -> int:
    if getattr(args, "merge", None):
        try:
            write_merged(args.merge, args.out, docs_path=args.docs or _repository_docs(),
                         progress=lambda message: print(message, flush=True),
                         docs_even_if_partial=args.docs is not None)
        except (OSError, ValueError, KeyError) as error:
            print(f"protoseg benchmark --merge: {error}", file=sys.stderr)
            return 1
        return 0
    progress = lambda message: print(message, flush=True)  # noqa: E731
    if getattr(args, "summarize_seeds", None):
        try:
            write_seed_summary(args.summarize_seeds, args.out, docs_path=args.docs, progress=progress)
        except (OSError, ValueError, KeyError) as error:
            print(f"protoseg benchmark --summarize-seeds: {error}", file=sys.stderr)
            return 1
        return 0
    overrides = {"steps": args.steps} if args.steps is not None else {}
    if getattr(args, "init", None) is not None:
        overrides["encoder"] = None if args.init == "none" else args.init
    overrides = overrides or None
    docs = args.docs
    ablations_only = getattr(args, "ablations_only", False)
    validation = getattr(args, "validation", False)
    if validation and docs is not None:
        print("protoseg benchmark: --validation scores training sections; its report cannot go to --docs",
              file=sys.stderr)
        return 2
    complete = (not args.quick and args.settings in (None, list(SETTINGS)) and not args.no_ablations
                and not ablations_only and args.steps is None and args.seed == 0 and not validation
                and getattr(args, "init", None) is None and getattr(args, "pretrain_minutes", None) is None)
    if docs is None and complete and not args.seeds:
        docs = _repository_docs()
    command = " ".join(["protoseg benchmark", *(sys.argv[1:] if argv is None else argv)])

    def run(seed: int, out_dir: Path, docs_path) -> dict:
        return run_benchmark(args.data_dir, out_dir, settings=[] if ablations_only else args.settings, quick=args.quick,
                             ablation_settings=args.settings if ablations_only else None,
                             ablations=True if ablations_only else False if args.no_ablations else None, seed=seed,
                             config_overrides=overrides, progress=progress, docs_path=docs_path,
                             validation=validation, command=command,
                             pretrain_minutes=getattr(args, "pretrain_minutes", None))

    if not args.seeds:
        run(args.seed, args.out, docs)
        return 0
    files = []
    for seed in dict.fromkeys(args.seeds):
        progress(f"benchmark: seed {seed}")
        run(seed, Path(args.out) / f"seed-{seed}", None)
        files.append(Path(args.out) / f"seed-{seed}" / "results.json")
    write_seed_summary(files, args.out, docs_path=docs, progress=progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args, argv)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
