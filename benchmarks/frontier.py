"""The reward-drift frontier on both toys: at the same distance from the reference, which space buys more preference?

    python benchmarks/frontier.py                 # trains what is missing (about 4 minutes a run on 2 cores)
    python benchmarks/frontier.py --no-train      # only gathers, plots and draws the sample grids it has

RLHF compares objectives by the reward they reach at a given KL from the reference. Here the reward is the mean disc
radius of samples (the property the preferences reward), the distance is toy_alignment.py's drift (the mean squared
difference of the policy's and the reference's predictions on held-out pairs: up to each timestep's weight, the KL
of the reverse steps), and the cost is the share of samples in the prompt's colour. Every run is toy_alignment.py's
DPO in bf16, 100 steps, 16 pairs a step, for each space at betas from its linear regime (few pairs with
|beta x margin| > 1) to saturation (most of them), on the U-Net toy (DDPM) and on the SD3 toy (rectified flow).

The learning rate follows one rule, fixed before any frontier run: the toy's default, 1e-3, for every run of both
spaces and both toys. It is the rate every earlier toy comparison started from and was tuned for neither space; with
Adam, it sets how far a step can move whatever beta is, so beta alone decides how many pairs still pull.

Runs of earlier sweeps with identical settings (same base, pairs, seeds, lr, precision, steps, checkpoints) are
reused from their results files (REUSE) rather than trained again, and so are the rows this script filed in an
earlier run (OUT/results.json: a fresh clone has those rows, not the work folder they were trained in). Writes
OUT/results.json (one row per run and checkpoint), OUT/summary.md (each point's means and seed ranges, and each
point against the other space's curve at its drift), OUT/frontier.png, OUT/logs/ (the work folders' logs) and
OUT/samples-*.png (step 100 of the best point of each space and of the pair of points, one per space, whose drifts
are closest, from the lowest seed trained here, or the grid an earlier run drew); a point whose every seed was
reused and that has no grid yet is drawn by training its seed 0 again, and the script prints both radii.
"""

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BASES = {"unet": os.path.join(RESULTS, "toy", "base"), "sd3": os.path.join(RESULTS, "toy_sd3", "base")}
REUSE = {"unet": [os.path.join(RESULTS, "toy_beta")], "sd3": [os.path.join(RESULTS, "toy_sd3")]}
BETAS = {("unet", "ncp"): [2500, 25000, 250000, 2.5e6, 2.5e7], ("unet", "latent"): [2.5, 25, 250, 2500],
         ("sd3", "ncp"): [2500, 25000, 250000, 2.5e6], ("sd3", "latent"): [0.025, 0.25, 2.5, 25, 250, 2500]}
SEEDS = [0, 1]  # trained where missing
EXTRA_SEEDS = [2]  # taken too where an earlier sweep ran them
LR = 1e-3
STEPS = [0, 25, 50, 100]
SPACE_STYLE = {"ncp": ("tab:blue", "o"), "latent": ("tab:orange", "s")}


def key(space, beta, seed):
    """toy_alignment.py's name of a run."""
    return f"dpo-{space}-bf16-beta{beta:g}-lr{LR:g}-seed{seed}"


def train(arch, work, space, beta, seeds):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "toy_alignment.py"), "--out", work, "--base", BASES[arch],
           "--runs", f"dpo-{space}", "--precision", "bf16", "--lr", str(LR), "--beta", str(beta),
           "--checkpoints", ",".join(map(str, STEPS)), "--seeds", ",".join(map(str, seeds))]
    cmd += ["--arch", "sd3"] if arch == "sd3" else []
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def load_runs(folder):
    path = os.path.join(folder, "results.json")
    return json.load(open(path))["runs"] if os.path.exists(path) else {}


def filed_runs(path):
    """The runs an earlier frontier.py filed in `path` (its results.json), as toy_alignment.py's results
    {arch: {run name: rows}}: a fresh clone has no work folder, and the filed rows are the record."""
    out = {}
    for r in json.load(open(path)) if os.path.exists(path) else []:
        if r["lr"] == LR:
            out.setdefault(r["arch"], {}).setdefault(key(r["space"], r["beta"], r["seed"]), []).append(
                {"step": r["step"], "radius": r["radius"], "colour_right": r["colour"], "drift": r["drift"],
                 "saturated": r["saturated"], "heldout_accuracy": r["heldout_accuracy"]})
    return out


def gather(work, may_train, filed):
    """{(arch, space, beta, seed): (rows, source)}, training the runs no results file holds. Sources in order: the
    earlier sweeps, the work folders, then `filed` (this script's own results.json from an earlier run)."""
    found, earlier = {}, filed_runs(filed)
    for (arch, space), betas in BETAS.items():
        sources = REUSE[arch] + sorted(glob.glob(os.path.join(work, arch + "*")))  # unet, unet-250, ...
        runs = {source: load_runs(source) for source in sources}  # each results file read once
        sources, runs[filed] = sources + [filed], earlier.get(arch, {})
        for beta in betas:
            missing = []
            for seed in sorted(set(SEEDS) | set(EXTRA_SEEDS)):
                hit = next((f for f in sources if key(space, beta, seed) in runs[f]), None)
                if hit is not None:
                    found[arch, space, beta, seed] = (runs[hit][key(space, beta, seed)], hit)
                elif seed in SEEDS:
                    missing.append(seed)
            if missing and may_train:
                train(arch, os.path.join(work, arch), space, beta, missing)
                trained = load_runs(os.path.join(work, arch))
                for seed in missing:
                    found[arch, space, beta, seed] = (trained[key(space, beta, seed)], os.path.join(work, arch))
            elif missing:
                print(f"not run yet: {arch} {key(space, beta, 0)[:-6]} seeds {missing}")
    return found


def rows_of(found):
    rows = []
    for (arch, space, beta, seed), (runs, _) in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                                                          kv[0][3])):
        for r in runs:
            rows.append({"arch": arch, "space": space, "beta": beta, "lr": LR, "seed": seed, "step": r["step"],
                         "radius": r["radius"], "drift": r.get("drift", 0.0), "colour": r["colour_right"],
                         "saturated": r.get("saturated"), "heldout_accuracy": r["heldout_accuracy"]})
    return rows


def points(rows, arch, space, step=100):
    """[(beta, [row of each seed])] at `step`, betas in increasing order."""
    out = {}
    for r in rows:
        if r["arch"] == arch and r["space"] == space and r["step"] == step:
            out.setdefault(r["beta"], []).append(r)
    return sorted(out.items())


def mean(rs, field):
    return float(np.mean([r[field] for r in rs]))


def chosen(rows, arch):
    """The points whose samples are drawn: the best (largest mean radius) of each space, and the pair of points,
    one per space, whose mean drifts are closest on a log scale. {name: (space, beta)}."""
    ncp, latent = points(rows, arch, "ncp"), points(rows, arch, "latent")
    best = {f"best-{s}": (s, max(p, key=lambda bp: mean(bp[1], "radius"))[0]) for s, p in (("ncp", ncp),
                                                                                           ("latent", latent))}
    pairs = [(abs(math.log(mean(a, "drift") / mean(b, "drift"))), ba, bb) for ba, a in ncp for bb, b in latent]
    _, ba, bb = min(pairs)
    return {**best, "matched-ncp": ("ncp", ba), "matched-latent": ("latent", bb)}


def at_drift(pts, drift, field):
    """The curve of points [(beta, rows)] read at `drift`: linear in log drift between the two points (adjacent in
    drift) around it. (value, beta, beta) or None outside the curve's drifts."""
    curve = sorted((math.log(mean(rs, "drift")), mean(rs, field), beta) for beta, rs in pts)
    x = math.log(drift)
    for (x0, y0, b0), (x1, y1, b1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0 if x1 > x0 else 1.0), b0, b1
    return None


def summary(rows):
    """summary.md: each point's means and seed ranges at step 100, and each point against the other space's curve at
    the same drift (the frontier's verdict, read off the data)."""
    lines = []
    for arch in BASES:
        if not any(r["arch"] == arch for r in rows):
            continue
        base = next(r for r in rows if r["arch"] == arch and r["step"] == 0)
        lines += [f"## {arch}: step 100 (base radius {base['radius']:.2f} px, right colour {base['colour']:.2f})", "",
                  "| space | beta | seeds | radius gain (px) | drift | right colour | saturated | held-out accuracy |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]

        def spread(rs, field, fmt, offset=0.0):
            vals = [r[field] - offset for r in rs]
            return f"{np.mean(vals):{fmt}} ({min(vals):{fmt}} to {max(vals):{fmt}})" if len(rs) > 1 else \
                f"{vals[0]:{fmt}}"

        for space in ("ncp", "latent"):
            for beta, rs in points(rows, arch, space):
                lines.append(f"| {space} | {beta:g} | {len(rs)} | {spread(rs, 'radius', '+.2f', base['radius'])} | "
                             f"{spread(rs, 'drift', '.3g')} | {spread(rs, 'colour', '.2f')} | "
                             f"{mean(rs, 'saturated'):.0%} | {mean(rs, 'heldout_accuracy'):.2f} |")
        lines += ["", "At the same drift (the other space's curve read between its two points around that drift, "
                  "linear in log drift):", ""]
        for space, other in (("ncp", "latent"), ("latent", "ncp")):
            curve = points(rows, arch, other)
            for beta, rs in points(rows, arch, space):
                drift = mean(rs, "drift")
                gain, colour = at_drift(curve, drift, "radius"), at_drift(curve, drift, "colour")
                there = (f"{other} {gain[0] - base['radius']:+.2f} px, colour {colour[0]:.2f} (between its betas "
                         f"{gain[1]:g} and {gain[2]:g})" if gain else f"outside {other}'s drifts")
                own = [(r["radius"] - at_drift(curve, r["drift"], "radius")[0],  # each seed at its own drift
                        r["colour"] - at_drift(curve, r["drift"], "colour")[0])
                       for r in rs if at_drift(curve, r["drift"], "radius")]
                if len(rs) > 1 and own:
                    there += (f"; seed by seed, each at its own drift ({len(own)} of {len(rs)} inside {other}'s): "
                              f"{min(d for d, _ in own):+.2f} to {max(d for d, _ in own):+.2f} px, colour "
                              f"{min(c for _, c in own):+.2f} to {max(c for _, c in own):+.2f} against {other}")
                gained = mean(rs, "radius") - base["radius"]
                lines.append(f"- {space} beta {beta:g} at drift {drift:.3g}: {gained:+.2f} px, colour "
                             f"{mean(rs, 'colour'):.2f}; {there}")
        lines.append("")
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = [a for a in BASES if any(r["arch"] == a for r in rows)]
    fig, axes = plt.subplots(len(archs), 2, figsize=(12, 4.6 * len(archs)), squeeze=False)
    for row, arch in zip(axes, archs):
        base = next(r for r in rows if r["arch"] == arch and r["step"] == 0)
        for space in ("ncp", "latent"):
            color, marker = SPACE_STYLE[space]
            pts = points(rows, arch, space)
            if not pts:
                continue
            for ax, field, offset in ((row[0], "radius", base["radius"]), (row[1], "colour", 0.0)):
                for _, rs in pts:
                    ax.scatter([r["drift"] for r in rs], [r[field] - offset for r in rs], color=color, marker=marker,
                               alpha=0.35, s=22, linewidths=0)
                xs = [mean(rs, "drift") for _, rs in pts]
                ys = [mean(rs, field) - offset for _, rs in pts]
                ax.plot(xs, ys, color=color, marker=marker, label=f"{space} DPO, mean over seeds")
                rank = {x: i for i, x in enumerate(sorted(xs))}
                for (beta, rs), x, y in zip(pts, xs, ys):  # NCP's labels right, latent's left; in drift order,
                    sat = mean(rs, "saturated")  # above and below in turn: points of near-equal drift stay legible
                    side = 1 if space == "ncp" else -1
                    ax.annotate(f"β={beta:g}\n{sat:.0%} sat.", (x, y), textcoords="offset points", fontsize=7,
                                xytext=(6 * side, 4 if rank[x] % 2 == 0 else -20), color=color,
                                ha="left" if side == 1 else "right")
        row[1].axhline(base["colour"], color="grey", linestyle=":", linewidth=1, label="base model")
        row[0].axhline(0, color="grey", linestyle=":", linewidth=1, label="base model")
        name = {"unet": "U-Net toy (DDPM)", "sd3": "SD3 toy (MMDiT, rectified flow)"}[arch]
        row[0].set_title(f"{name}: radius gain at step 100")
        row[1].set_title(f"{name}: share of samples in the prompt's colour")
        row[0].set_ylabel("mean disc radius - base's (px)")
        row[1].set_ylabel("right-colour share")
        for ax in row:
            ax.set_xscale("log")
            ax.set_xlabel("drift from the reference, mean ||pred - pred_ref||² (log)")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle("Preference bought against distance from the reference (lr 1e-3, bf16, 100 steps; "
                 "faint points: single seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def file_log(log, filed):
    """Add a work folder's log to the one filed under its name: the filed lines stay (a fresh clone's work folder
    starts a new log) and the new ones follow, those both hold (the same folder, grown since) once."""
    new = open(log).read().splitlines(keepends=True)
    old = open(filed).read().splitlines(keepends=True) if os.path.exists(filed) else []
    overlap = next(k for k in range(min(len(old), len(new)), -1, -1) if k == 0 or old[-k:] == new[:k])
    with open(filed, "w") as f:
        f.write("".join(old + new[overlap:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(RESULTS, "frontier"), help="where results.json, the plot and the "
                   "sample grids go (default: %(default)s)")
    p.add_argument("--work", default="runs/frontier", help="where new runs are trained, one folder per toy; "
                   "runs in WORK/unet-*, WORK/sd3-* (sweeps run beside it) are read too (default: %(default)s)")
    p.add_argument("--no-train", action="store_true", help="train nothing: gather, plot and draw what exists")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    filed = os.path.join(args.out, "results.json")
    found = gather(args.work, not args.no_train, filed)
    rows = rows_of(found)
    reused = sorted({f"{os.path.relpath(src, ROOT)}: {key(s, b, seed)}" for (a, s, b, seed), (_, src) in found.items()
                     if src in REUSE[a]})
    lines = summary(rows)
    sys.path.insert(0, ROOT)
    import run  # the project's all-or-none writer (run.py imports torch: here, not at start-up)

    run.write_together({filed: json.dumps(rows, indent=1),
                        os.path.join(args.out, "reused.txt"): "\n".join(reused) + "\n",
                        os.path.join(args.out, "summary.md"): "\n".join(lines) + "\n"})
    plot(rows, os.path.join(args.out, "frontier.png"))
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    for log in glob.glob(os.path.join(args.work, "*", "log.txt")) + glob.glob(os.path.join(args.work, "*", "again",
                                                                                            "log.txt")):
        name = os.path.relpath(os.path.dirname(log), args.work).replace(os.sep, "-")
        file_log(log, os.path.join(args.out, "logs", f"{name}.txt"))  # the runs' own lines, beside the rows
    kept = set()  # the grids of the points chosen now; the others are of points no longer chosen
    for arch in BASES:
        if not points(rows, arch, "ncp") or not points(rows, arch, "latent"):
            continue
        for name, (space, beta) in chosen(rows, arch).items():
            grids = {seed: os.path.join(source, key(space, beta, seed), "samples.png")  # of the rows' own runs
                     for (a, s, b, seed), (_, source) in found.items() if (a, s, b) == (arch, space, beta)
                     and source not in REUSE[arch] + [filed]}
            grids = {seed: g for seed, g in grids.items() if os.path.exists(g)}
            drawn = sorted(glob.glob(os.path.join(args.out, f"samples-{arch}-{name}-beta{beta:g}-seed*.png")))
            if not grids and drawn:  # drawn by an earlier run of this script, from a run whose row it filed
                kept.add(drawn[0])
                continue
            if not grids:  # every seed reused: seed 0 trained again, apart, for its samples
                again = os.path.join(args.work, arch, "again", key(space, beta, 0), "samples.png")
                if not os.path.exists(again) and not args.no_train:
                    train(arch, os.path.join(args.work, arch, "again"), space, beta, [0])
                    redo = load_runs(os.path.join(args.work, arch, "again"))[key(space, beta, 0)][-1]["radius"]
                    print(f"{arch} {key(space, beta, 0)}: radius {redo:.4f} trained again, "
                          f"{found[arch, space, beta, 0][0][-1]['radius']:.4f} reused")
                grids = {0: again} if os.path.exists(again) else {}
            for seed, grid in sorted(grids.items())[:1]:  # the lowest seed that has one
                kept.add(os.path.join(args.out, f"samples-{arch}-{name}-beta{beta:g}-seed{seed}.png"))
                shutil.copy(grid, os.path.join(args.out, f"samples-{arch}-{name}-beta{beta:g}-seed{seed}.png"))
        base_grid = os.path.join(args.work, arch, "base_samples.png")
        kept.add(os.path.join(args.out, f"samples-{arch}-base.png"))
        if os.path.exists(base_grid):
            shutil.copy(base_grid, os.path.join(args.out, f"samples-{arch}-base.png"))
    for stale in set(glob.glob(os.path.join(args.out, "samples-*.png"))) - kept:
        os.remove(stale)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
