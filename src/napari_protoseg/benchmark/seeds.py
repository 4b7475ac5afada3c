"""Benchmark figures across seeds: mean and spread of runs that differ only in their seed.

One benchmark run is one draw: the seed sets the simulated points, the crops, the initial weights
and the peer's forest, and single runs of the same code moved a setting's mIoU by up to 0.05. The
targets (gains of 0.05 and 0.10 mIoU) are judged here on the mean over seeds, with the spread and
how many single seeds met each one beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from napari_protoseg.benchmark.budget import CLASS_NAMES, INSTANCE_SETTINGS, SETTINGS, evaluate_targets, merge_results, save_json

SUMMARY_JSON = "seeds.json"
SUMMARY_MD = "seeds.md"
DECODERS = ("wise", "watershed", "components")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _figures(entry: dict, method: str) -> dict[str, float | None]:
    """The figures of one setting's ``method`` ("protoseg" or "peer") that are averaged over seeds."""
    part = entry.get(method, {})
    out: dict[str, float | None] = {"miou": part.get("miou")}
    for name, value in part.get("iou", {}).items():
        out[f"iou/{name}"] = value
    for decoder, figures in part.get("instances", {}).items():
        out[f"ap50/{decoder}"] = figures.get("ap50")
        out[f"touching_recall/{decoder}"] = figures.get("touching_recall")
    return out


def _as_entry(figures: dict[str, float]) -> dict:
    """Mean figures back in the shape of a results.json setting entry (for :func:`evaluate_targets`)."""
    entry: dict = {"miou": figures.get("miou"), "iou": {}, "instances": {}}
    for key, value in figures.items():
        kind, _, name = key.partition("/")
        if kind == "iou":
            entry["iou"][name] = value
        elif kind in ("ap50", "touching_recall"):
            entry["instances"].setdefault(name, {})[kind] = value
    return entry


def summarize_seeds(parts: list[dict]) -> dict:
    """Mean and spread over seeds of ``results.json`` dicts of the same configuration.

    Parts with the same seed are first merged (:func:`~napari_protoseg.benchmark.budget.merge_results`:
    e.g. a seed run in two halves); parts must agree in training configuration, quick flag and split.
    Returns ``{"seeds", "settings": {name: {"n", "seeds", "protoseg": {figure: {"mean", "sd", "min",
    "max", "values"}}, "peer": ...}}, "targets": [...]}``; the targets are evaluated on the mean
    figures and on each seed's own run (``met_seeds`` of ``measured_seeds``).
    """
    if not parts:
        raise ValueError("nothing to summarize")
    by_seed: dict[int, list[dict]] = {}
    for part in parts:
        by_seed.setdefault(int(part.get("seed", 0)), []).append(part)
    # merge_results checks that the parts of one seed agree; across seeds only the seed may differ.
    runs = {seed: merge_results(group) for seed, group in sorted(by_seed.items())}
    first = next(iter(runs.values()))

    def setup(run: dict) -> dict:
        return {"train_config": {k: v for k, v in run.get("train_config", {}).items() if k != "seed"},
                "quick": run.get("quick")}

    for seed, run in runs.items():
        for key in ("train_config", "quick"):
            if setup(run)[key] != setup(first)[key]:
                raise ValueError(f"seed {seed} differs from seed {first.get('seed')} in {key}; only runs "
                                 "that differ in their seed alone can be summarized")
        if run.get("data", {}).get("split") != first.get("data", {}).get("split"):
            raise ValueError("a validation run and a run scored on the test sections cannot be summarized together")

    settings: dict[str, dict] = {}
    mean_settings: dict[str, dict] = {}
    for name in SETTINGS:
        seeds = [seed for seed, run in runs.items() if name in run["settings"]]
        if not seeds:
            continue
        summary: dict = {"n": len(seeds), "seeds": seeds}
        means: dict = {}
        for method in ("protoseg", "peer"):
            per_seed = [_figures(runs[seed]["settings"][name], method) for seed in seeds]
            keys = list(dict.fromkeys(key for figures in per_seed for key in figures))
            summary[method] = {}
            for key in keys:
                values = [figures.get(key) for figures in per_seed]
                kept = [v for v in values if v is not None and math.isfinite(v)]
                mean, sd = _mean_sd(values)
                summary[method][key] = {"mean": mean, "sd": sd, "min": min(kept, default=math.nan),
                                        "max": max(kept, default=math.nan), "values": values}
            means[method] = _as_entry({key: figures["mean"] for key, figures in summary[method].items()})
        settings[name] = summary
        mean_settings[name] = means

    per_seed_targets = {seed: {t["target"]: t for t in evaluate_targets(run["settings"])}
                        for seed, run in runs.items()}
    targets = []
    for target in evaluate_targets(mean_settings):
        measured = [per_seed_targets[seed].get(target["target"], {}).get("measured") for seed in runs]
        met = [per_seed_targets[seed].get(target["target"], {}).get("met") for seed in runs]
        targets.append({**target, "sd": _mean_sd(measured)[1],
                        "measured_seeds": sum(m is not None for m in met), "met_seeds": sum(m is True for m in met)})
    return {"seeds": list(runs), "quick": first.get("quick"), "split": first.get("data", {}).get("split", "test"),
            "train_config": setup(first)["train_config"], "settings": settings, "targets": targets,
            "runs": [{"seed": seed, "date": run.get("date"), "device": _devices(run),
                      "source_commit": run.get("environment", {}).get("source_commit")}
                     for seed, run in runs.items()]}


def _devices(run: dict) -> str:
    devices = {entry["protoseg"].get("device") for entry in run["settings"].values()}
    return ", ".join(sorted(d for d in devices if d)) or "?"


def _cell(figures: dict | None, digits: int = 3) -> str:
    if not figures or not math.isfinite(figures["mean"]):
        return "-"
    if len([v for v in figures["values"] if v is not None]) == 1:
        return f"{figures['mean']:.{digits}f}"
    return f"{figures['mean']:.{digits}f} ± {figures['sd']:.{digits}f}"


def render_seed_markdown(summary: dict) -> str:
    """The Markdown report of :func:`summarize_seeds`."""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    split = "validation rows of sections 0-9" if summary["split"] == "validation" else "test sections 10-19"
    lines = [f"## Across seeds ({len(summary['seeds'])} runs: seeds {seeds}; {split})", "",
             "Mean ± sample standard deviation over the seeds that ran each setting (n).", "",
             "| setting | n | mIoU | peer mIoU | protoseg - peer | mIoU range |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, entry in summary["settings"].items():
        ours, peer = entry["protoseg"]["miou"], entry["peer"].get("miou")
        diffs = [a - b for a, b in zip(ours["values"], (peer or {}).get("values", []))
                 if a is not None and b is not None]
        mean, sd = _mean_sd(diffs)
        diff = "-" if not diffs else f"{mean:+.3f}" + (f" ± {sd:.3f}" if len(diffs) > 1 else "")
        lines.append(f"| `{name}` | {entry['n']} | {_cell(ours)} | {_cell(peer)} | {diff} | "
                     f"{ours['min']:.3f} - {ours['max']:.3f} |")
    lines += ["", "Class IoU (protoseg, mean ± sd):", "",
              "| setting | " + " | ".join(CLASS_NAMES.values()) + " |",
              "| --- |" + " --- |" * len(CLASS_NAMES)]
    for name, entry in summary["settings"].items():
        lines.append(f"| `{name}` | " + " | ".join(_cell(entry["protoseg"].get(f"iou/{c}")) for c in CLASS_NAMES.values())
                     + " |")
    instance_rows = [name for name in INSTANCE_SETTINGS if name in summary["settings"]
                     and any(f"ap50/{d}" in summary["settings"][name]["protoseg"] for d in DECODERS)]
    if instance_rows:
        lines += ["", "Mitochondrion AP50 (mean ± sd):", "",
                  "| setting | " + " | ".join(DECODERS) + " | peer components |", "| --- |" + " --- |" * (len(DECODERS) + 1)]
        for name in instance_rows:
            entry = summary["settings"][name]
            lines.append(f"| `{name}` | " + " | ".join(_cell(entry["protoseg"].get(f"ap50/{d}")) for d in DECODERS)
                         + f" | {_cell(entry['peer'].get('ap50/components'))} |")
    lines += ["", "Targets, on the mean figures and seed by seed:", "",
              "| target | on the mean | sd over seeds | threshold | met on the mean | seeds that met it |",
              "| --- | --- | --- | --- | --- | --- |"]
    for t in summary["targets"]:
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        sd = "-" if not math.isfinite(t["sd"]) or t["measured_seeds"] < 2 else f"{t['sd']:.3f}"
        lines.append(f"| {t['target']} | {t['measured_text']} | {sd} | {t['threshold_text']} | {met} | "
                     f"{t['met_seeds']} of {t['measured_seeds']} |")
    lines += ["", "Runs: " + "; ".join(f"seed {r['seed']} on {r['device']}"
                                       + (f" at {r['source_commit']}" if r.get("source_commit") else "")
                                       + (f" ({r['date']})" if r.get("date") else "") for r in summary["runs"]), ""]
    return "\n".join(lines)


def write_seed_summary(result_files: list[str | Path], out_dir: str | Path, docs_path: str | Path | None = None,
                       progress=print) -> dict:
    """Summarize the ``results.json`` files of runs at several seeds into ``seeds.json`` and
    ``seeds.md`` in ``out_dir`` (the Markdown also to ``docs_path`` if given)."""
    parts = [json.loads(Path(f).read_text()) for f in result_files]
    summary = summarize_seeds(parts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / SUMMARY_JSON, summary)
    markdown = render_seed_markdown(summary)
    (out_dir / SUMMARY_MD).write_text(markdown)
    if docs_path is not None:
        Path(docs_path).write_text(markdown)
    progress(f"summarized {len(parts)} runs at seeds {', '.join(map(str, summary['seeds']))}: "
             f"{out_dir / SUMMARY_MD}")
    return summary
