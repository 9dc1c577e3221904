"""Small PNG line plots drawn with Pillow (no plotting library dependency).

`line_plot` draws named series against x on linear or log axes, with ticks, labels, a
legend and optional horizontal reference lines (e.g. a memory budget), and writes the PNG
atomically. Used for training curves and the memory-vs-size picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sstream.io import atomic_output

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


@dataclass
class Series:
    """One line: x and y values (same length; None values are gaps) and its legend label."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]


@dataclass
class Panel:
    """One set of axes."""

    title: str
    series: list[Series]
    xlabel: str = ""
    ylabel: str = ""
    log_x: bool = False
    log_y: bool = False
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label)
    y_format: str = "{:.3g}"


def line_plot(path: str | Path, panels: Sequence[Panel], width: int = 900,
              panel_height: int = 420, overwrite: bool = True) -> Path:
    """Draw the panels stacked vertically into a PNG at `path` (written atomically)."""
    image = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for index, panel in enumerate(panels):
        _draw_panel(draw, font, panel, (0, index * panel_height, width, panel_height))
    with atomic_output(path, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        return [10.0 ** e for e in range(first, last + 1) if low <= 10.0 ** e <= high] or [low]
    span = high - low or 1.0
    step = 10 ** math.floor(math.log10(span / 5))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= 6:
            step *= factor
            break
    start = math.ceil(low / step) * step
    return [start + i * step for i in range(int((high - start) / step) + 1)]


def _range(values: list[float], log: bool) -> tuple[float, float]:
    if log:
        values = [v for v in values if v > 0]
    if not values:
        return (1.0, 10.0) if log else (0.0, 1.0)
    low, high = min(values), max(values)
    if low == high:
        return (low / 2, high * 2) if log else (low - 1, high + 1)
    if log:
        return low / 1.3, high * 1.3
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def _draw_panel(draw: ImageDraw.ImageDraw, font, panel: Panel,
                box: tuple[int, int, int, int]) -> None:
    left, top, width, height = box
    x0, y0, x1, y1 = left + 80, top + 36, left + width - 20, top + height - 50
    xs = [float(v) for s in panel.series for v in s.x]
    ys = [float(v) for s in panel.series for v in s.y if v is not None and math.isfinite(v)]
    ys += [y for y, _ in panel.hlines]
    x_low, x_high = _range(xs, panel.log_x)
    y_low, y_high = _range(ys, panel.log_y)

    def scale(value: float, low: float, high: float, log: bool) -> float:
        if log:
            value, low, high = (math.log10(max(value, 1e-300)), math.log10(low),
                                math.log10(high))
        return (value - low) / (high - low)

    def point(x: float, y: float) -> tuple[float, float]:
        return (x0 + scale(x, x_low, x_high, panel.log_x) * (x1 - x0),
                y1 - scale(y, y_low, y_high, panel.log_y) * (y1 - y0))

    draw.text((x0, top + 10), panel.title, fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for tick in _ticks(x_low, x_high, panel.log_x):
        px = point(tick, y_low)[0]
        draw.line((px, y1, px, y1 + 4), fill="black")
        draw.line((px, y0, px, y1), fill="#eeeeee")
        draw.text((px - 12, y1 + 6), f"{tick:.4g}", fill="black", font=font)
    for tick in _ticks(y_low, y_high, panel.log_y):
        py = point(x_low, tick)[1]
        draw.line((x0 - 4, py, x0, py), fill="black")
        draw.line((x0, py, x1, py), fill="#eeeeee")
        draw.text((left + 4, py - 6), panel.y_format.format(tick), fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 3 * len(panel.xlabel), y1 + 24), panel.xlabel, fill="black",
              font=font)
    draw.text((left + 4, top + 22), panel.ylabel, fill="black", font=font)
    for y, label in panel.hlines:
        py = point(x_low, y)[1]
        for dash in range(int(x0), int(x1), 12):
            draw.line((dash, py, min(dash + 6, x1), py), fill="#555555", width=2)
        draw.text((x1 - 8 * len(label) - 4, py - 14), label, fill="#555555", font=font)
    for index, series in enumerate(panel.series):
        colour = PALETTE[index % len(PALETTE)]
        points = [point(float(x), float(y)) for x, y in zip(series.x, series.y)
                  if y is not None and math.isfinite(y) and (not panel.log_y or y > 0)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2, joint="curve")
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        legend_y = y0 + 8 + 16 * index
        draw.line((x0 + 10, legend_y + 6, x0 + 34, legend_y + 6), fill=colour, width=3)
        draw.text((x0 + 40, legend_y), series.label, fill="black", font=font)


def confusion_plot(path: str | Path, matrix: Sequence[Sequence[int]], names: Sequence[str],
                   title: str = "confusion matrix", cell: int = 64,
                   overwrite: bool = True) -> Path:
    """The confusion matrix as a PNG grid: rows true classes, columns predicted ones, each
    cell its count, shaded by its share of the row (white 0, blue all)."""
    font = ImageFont.load_default()
    classes = len(names)
    margin_left, margin_top = 40 + 7 * max(len(n) for n in names), 70
    width = max(margin_left + cell * classes + 20, 260)
    image = Image.new("RGB", (width, margin_top + cell * classes + 40), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    draw.text((margin_left, margin_top - 40), "predicted", fill="black", font=font)
    draw.text((10, margin_top - 18), "true", fill="black", font=font)
    for row, counts in enumerate(matrix):
        total = max(sum(counts), 1)
        y = margin_top + row * cell
        draw.text((10, y + cell // 2 - 6), names[row], fill="black", font=font)
        for column, count in enumerate(counts):
            x = margin_left + column * cell
            if row == 0:
                draw.text((x + 4, margin_top - 22), names[column][:cell // 7], fill="black",
                          font=font)
            share = count / total
            shade = tuple(int(255 - share * (255 - c)) for c in (31, 119, 180))
            draw.rectangle((x, y, x + cell, y + cell), fill=shade, outline="black")
            draw.text((x + cell // 2 - 4 * len(str(count)), y + cell // 2 - 6), str(count),
                      fill="white" if share > 0.5 else "black", font=font)
    with atomic_output(path, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
