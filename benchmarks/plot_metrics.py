"""Training curves of one or more runs, from their metrics.jsonl, in one PNG.

    python benchmarks/plot_metrics.py runs/dpo-ncp-tiny runs/dpo-latent-tiny --out curves.png

One panel per quantity against the optimizer step, the runs overlaid, one legend for all panels above them:
the loss, the implicit accuracy, the margin, the errors e_w and e_l (the reference's dashed), the loss's regime
(beta x margin: its median, with the 10th-90th percentile band; |beta x margin| > 1 is the saturated side) and the
share of saturated pairs, the gradient norm and the learning rate. A panel whose values are all positive and span
more than a decade has a log axis: NCP's errors (about 1e-4) and latent errors (about 1) can share one. A quantity
a run does not log (SFT has no margin) leaves out that run's line; a quantity no run logs leaves out its panel.
"""

import argparse
import json
import math
import os

# (title, [(metric, style)]): the reference's errors dashed beside the policy's
PANELS = [("loss", [("loss", "-")]), ("implicit accuracy", [("accuracy", "-")]), ("margin", [("margin", "-")]),
          ("errors: e_w solid, e_l dotted\nthe reference's: dashed, dash-dot",
           [("e_w", "-"), ("e_l", ":"), ("ref_e_w", "--"), ("ref_e_l", "-.")]),
          ("beta x margin: median, 10th-90th percentile", [("beta_margin_p50", "-")]),
          ("share of saturated pairs, |beta x margin| > 1", [("saturated", "-")]),
          ("gradient norm", [("grad_norm", "-")]), ("learning rate", [("lr", "-")])]


def read_metrics(run_dir):
    """The records of RUN_DIR/metrics.jsonl, in order. Raises ValueError if there are none."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} has no metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def spans_decades(values):
    values = [v for v in values if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def plot(panels, path, columns=3, size=(360, 240), xlabel="optimizer step", bands=None):
    """Write panels {title: {line name: [(x, y), ...]}} as a grid of line plots to the PNG `path`, each panel
    `size` pixels; a panel whose values span decades gets a log axis. bands: {title: {line name: [(x, lo, hi)]}}
    drawn as shaded ranges under their lines. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = bands or {}
    rows = math.ceil(len(panels) / columns)
    cols = min(columns, len(panels))
    dpi = 100
    names = list(dict.fromkeys(name.split(" | ")[0] for curves in panels.values() for name in curves))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols / dpi, size[1] * rows / dpi + 0.35), dpi=dpi,
                             squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels.items()):
        for name, points in curves.items():
            run, _, style = name.partition(" | ")
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, style or "-", color=colour[run], linewidth=1.6, marker="o" if len(xs) == 1 else None,
                    markersize=3)
            band = bands.get(title, {}).get(name)
            if band:
                ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=colour[run],
                                alpha=0.15, linewidth=0)
        values = [p[1] for points in curves.values() for p in points]
        if title in bands:  # beta x margin, signed: linear inside |x| < 1, log outside where it reaches beyond 10
            spread = [v for band in bands[title].values() for b in band for v in b[1:]] + values
            if max(abs(v) for v in spread) > 10:
                ax.set_yscale("symlog", linthresh=1)
            if max(abs(v) for v in spread) > 1:
                for edge in (-1, 1):
                    ax.axhline(edge, color="grey", linestyle=":", linewidth=1)
        elif spans_decades(values):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()  # no empty panel
    handles = [matplotlib.lines.Line2D([], [], color=colour[n], linewidth=2) for n in names]
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def panels_of(records):
    """{run: [records]} -> (panels, bands) for plot()."""
    panels, bands = {}, {}
    for title, metrics in PANELS:
        curves = {}
        for run, rows in records.items():
            for metric, style in metrics:
                points = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
                if points:
                    curves[f"{run} | {style}" if len(metrics) > 1 or style != "-" else run] = points
                if metric == "beta_margin_p50" and points:
                    bands.setdefault(title, {})[run] = [(r["step"], r["beta_margin_p10"], r["beta_margin_p90"])
                                                        for r in rows if r.get("beta_margin_p10") is not None]
        if curves:
            panels[title] = curves
    return panels, bands


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="training output directories (each with a metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        records = {os.path.basename(os.path.normpath(r)): read_metrics(r) for r in args.runs}
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    panels, bands = panels_of(records)
    print(plot(panels, args.out, bands=bands))


if __name__ == "__main__":
    main()
