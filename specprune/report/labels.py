"""Point and phase labels that do not overlap: each label takes the first of a few candidate offsets
whose box clears the labels already placed, the legend, the axes' edges and the given obstacles
(markers, a sampled curve), all in display space after the figure's layout has run. Points closer than
a few pixels share one label ("int6, plan")."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

# (dx, dy) in points and the text's alignment: below right first, then the other corners, then farther
OFFSETS: tuple[tuple[float, float, str, str], ...] = (
    (5, -4, "left", "top"), (5, 4, "left", "bottom"), (-5, -4, "right", "top"), (-5, 4, "right", "bottom"),
    (0, 9, "center", "bottom"), (0, -9, "center", "top"),
    (12, -10, "left", "top"), (12, 10, "left", "bottom"), (-12, -10, "right", "top"), (-12, 10, "right", "bottom"),
)
MERGE_PX = 6.0  # points nearer than this (display pixels) share one label


def merge_close(ax: Axes, points: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (x, y, text) in data coordinates, those within :data:`MERGE_PX` of an earlier one folded
    into it (texts joined by ", ", duplicates once)."""
    out: list[list[Any]] = []
    for x, y, text in points:
        px = ax.transData.transform((x, y))
        for group in out:
            if np.hypot(*(px - group[3])) < MERGE_PX:
                if text and text not in group[2]:
                    group[2].append(text)
                break
        else:
            out.append([x, y, [text] if text else [], px])
    return [(x, y, ", ".join(texts)) for x, y, texts, _ in out if texts]


def curve_obstacle(ax: Axes, x: np.ndarray, y: np.ndarray, step_px: float = 2.0) -> np.ndarray:
    """Display points along the polyline (x, y) (data coordinates), about ``step_px`` apart, to keep
    labels off a curve."""
    pts = ax.transData.transform(np.column_stack([x, y]))
    pts = pts[np.isfinite(pts).all(axis=1)]
    out = [pts[:1]]
    for a, b in pairwise(pts):
        n = max(1, int(np.ceil(np.hypot(*(b - a)) / step_px)))
        out.append(a + (b - a) * (np.arange(1, n + 1)[:, None] / n))
    return np.concatenate(out) if len(pts) else np.empty((0, 2))


def place_labels(ax: Axes, points: Sequence[tuple[float, float, str]], obstacles: np.ndarray | None = None,
                 offsets: Sequence[tuple[float, float, str, str]] = OFFSETS, **text_kw: Any) -> list:
    """Annotate each (x, y, text) (data coordinates) at the first offset whose text box overlaps no
    earlier label, the legend, no obstacle point (display coordinates) and stays inside the axes; where
    none does, the offset with the fewest clashes. Returns the annotations (gid ``label``), kept out of
    the figure's layout so placing them does not move the axes."""
    fig = ax.figure
    fig.canvas.draw()  # run the layout: display coordinates are final from here on
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = [leg.get_window_extent(renderer)] if (leg := ax.get_legend()) is not None else []
    obst = np.empty((0, 2)) if obstacles is None else np.asarray(obstacles, dtype=np.float64).reshape(-1, 2)
    placed = []
    for x, y, text in points:
        best, best_clash = None, None
        for dx, dy, ha, va in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              gid="label", **text_kw)
            ann.set_in_layout(False)
            bb = ann.get_window_extent(renderer)
            inside = (bb.x0 >= frame.x0 and bb.x1 <= frame.x1 and bb.y0 >= frame.y0 and bb.y1 <= frame.y1)
            clash = (sum(bb.overlaps(o) for o in boxes) + (bb.count_contains(obst) if len(obst) else 0)
                     + (0 if inside else 1))
            if best_clash is None or clash < best_clash:
                if best is not None:
                    best.remove()
                best, best_clash, best_box = ann, clash, bb
            else:
                ann.remove()
            if clash == 0:
                break
        boxes.append(best_box)
        placed.append(best)
    return placed
