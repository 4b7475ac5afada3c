"""Small text formatting shared by the command line and the napari panel."""

from __future__ import annotations

from collections.abc import Iterable


def format_duration(seconds: float, decimals: int = 0) -> str:
    """Under a minute ``12 s`` (``decimals`` after the point), then ``4 min 05 s``, ``1 h 02 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.{decimals}f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_ranges(values: Iterable[int]) -> str:
    """[5, 0, 1, 2] -> '0-2, 5'."""
    values = sorted(int(v) for v in values)
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)
