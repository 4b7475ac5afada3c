"""The ``protoseg`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .project import ProjectError, read_annotations

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def _format_summary(folder: Path, summary: dict) -> str:
    shape = " x ".join(str(s) for s in summary["image_shape"])
    totals = summary["totals"]
    lines = [
        f"{folder}: valid annotation project",
        f"image: {shape}",
        f"annotations: {totals['mask_pixels']} mask pixels, {totals['boxes']} boxes, "
        f"{totals['points']} points, {totals['tags']} tags",
        "",
        f"{'class':<24}{'mask px':>10}{'boxes':>8}{'points':>8}{'tags +':>8}{'tags -':>8}",
    ]
    for name, counts in summary["classes"].items():
        lines.append(f"{name:<24}{counts['mask_pixels']:>10}{counts['boxes']:>8}{counts['points']:>8}"
                     f"{counts['tags_present']:>8}{counts['tags_absent']:>8}")
    planes = summary["planes_annotated"]
    lines += ["", f"planes annotated ({len(planes)}): {_ranges(planes) if planes else 'none'}"]
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def cmd_validate(args) -> int:
    folder = Path(args.project)
    try:
        annotations = read_annotations(folder)
    except ProjectError as err:
        print(f"{folder}: not a valid annotation project", file=sys.stderr)
        for problem in err.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_INVALID
    print(_format_summary(folder, annotations.summary()))
    return EXIT_OK


def cmd_demo(args) -> int:
    import napari

    viewer = napari.Viewer(title="protoseg demo", show=args.screenshot is None)
    viewer.open_sample("napari-protoseg", "synthetic_em")
    if args.screenshot is not None:
        viewer.window._qt_window.resize(1400, 900)
        viewer.screenshot(str(args.screenshot), canvas_only=False, flash=False)
        viewer.close()
        print(f"screenshot written to {args.screenshot}")
        return EXIT_OK
    napari.run()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protoseg",
        description="Organelle segmentation trained from any mix of masks, boxes, points and tags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    validate = sub.add_parser("validate", help="check an annotation project folder and summarise it")
    validate.add_argument("project", help="project folder (image.tif, classes.json, annotations)")
    validate.set_defaults(func=cmd_validate)
    demo = sub.add_parser("demo", help="open napari with the synthetic EM sample and its annotations")
    demo.add_argument("--screenshot", metavar="PNG", type=Path,
                      help="save a screenshot of the window to PNG and quit (for checks without a person)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
