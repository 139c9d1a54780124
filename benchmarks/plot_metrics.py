"""Training curves of one or more runs, from their metrics.jsonl, in one PNG.

    python benchmarks/plot_metrics.py runs/dpo-ncp-tiny runs/dpo-latent-tiny --out curves.png

One panel per metric (loss, implicit accuracy, margin, e_w, e_l, grad norm, lr) against the optimizer step, the
runs overlaid in colours named in each panel's legend. A metric a run does not log (SFT has no margin) is left
out of that run's lines. Drawn with PIL, so it needs nothing beyond the training scripts' packages.
"""

import argparse
import json
import math
import os

from PIL import Image, ImageDraw

METRICS = ["loss", "accuracy", "margin", "e_w", "e_l", "grad_norm", "lr"]
PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def read_metrics(run_dir):
    """The records of RUN_DIR/metrics.jsonl, in order. Raises ValueError if there are none."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} has no metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def draw_panel(draw, box, curves, title):
    """Line plot of curves {name: [(x, y), ...]} inside box (left, top, right, bottom) of an ImageDraw."""
    left, top, right, bottom = box
    m = 45  # room for the axis labels
    points = [p for c in curves.values() for p in c if math.isfinite(p[1])]
    draw.text((left + m, top + 2), title, fill="black")
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    px = lambda x: left + m + (right - left - m - 10) * (x - x0) / ((x1 - x0) or 1)  # noqa: E731
    py = lambda y: bottom - 20 - (bottom - top - 40) * (y - y0) / (y1 - y0)  # noqa: E731
    draw.line((left + m, bottom - 20, right - 10, bottom - 20), fill="black")
    draw.line((left + m, top + 20, left + m, bottom - 20), fill="black")
    digits = 3 + max(0, int(math.log10(max(abs(y0), abs(y1)) / (y1 - y0))))  # enough to tell the labels apart
    for value in (y0, (y0 + y1) / 2, y1):
        draw.text((left + 2, py(value) - 6), f"{value:.{digits}g}", fill="black")
    for value in (x0, x1):
        draw.text((px(value) - 8, bottom - 16), f"{value:g}", fill="black")
    for i, (name, curve) in enumerate(curves.items()):
        line = [(px(x), py(y)) for x, y in curve if math.isfinite(y)]
        colour = PALETTE[i % len(PALETTE)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), fill=colour)
        label = name[:48]
        draw.text((right - 10 - 6 * len(label), top + 18 + 12 * i), label, fill=colour)  # about 6 px a character


def plot(panels, path, columns=4, size=(360, 240)):
    """Write panels {title: {run name: [(x, y), ...]}} as a grid of line plots to the PNG `path`."""
    rows = math.ceil(len(panels) / columns)
    w, h = size
    image = Image.new("RGB", (w * min(columns, len(panels)), h * rows), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, curves) in enumerate(panels.items()):
        left, top = (k % columns) * w, (k // columns) * h
        draw_panel(draw, (left, top, left + w, top + h), curves, title)
    image.save(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="training output directories (each with a metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        records = {os.path.basename(os.path.normpath(r)): read_metrics(r) for r in args.runs}
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    panels = {metric: {name: [(r["step"], r[metric]) for r in rows if metric in r] for name, rows in records.items()}
              for metric in METRICS}
    panels = {metric: curves for metric, curves in panels.items() if any(curves.values())}
    print(plot(panels, args.out))


if __name__ == "__main__":
    main()
