"""SPO's learning proof on a CPU, on the toy task of toy_alignment.py (larger discs preferred), beside its DPO runs.

    python benchmarks/toy_spo.py --out runs/toy_spo --base benchmarks/results/toy/base --seeds 0,1,2

1. A step-aware preference model for the toy: the tiny SPM (spm.build_tiny), trained from scratch on toy pairs as
   SPO trains its SPM (SPO.md section 2): both images noised to one random t, their x0 predicted by the frozen base
   model, decoded, scored at t; PickScore's two-way cross-entropy. Reported: its held-out accuracy per range of t.
2. The scale of the NCP-space log-ratios: for the same sampled transitions and a policy a little off the base,
   D in NCP space (fp32, direct) against D in latent space, per timestep (what --beta of `spo.py --space ncp` rests
   on).
3. spo.py itself, in latent and NCP space, at the DPO runs' budget (global batch 16, lr 1e-3, LoRA rank 8, the
   same checkpoints), bf16 autocast as a GPU runs by default; measured as toy_alignment.py measures: the mean disc
   radius of samples drawn with fixed seeds.

Writes OUT/spm.bin, OUT/spo_results.json and OUT/spo_results.md. Deterministic given --seed and --seeds.
"""

import argparse
import json
import os
import random
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import sample  # noqa: E402
import spm  # noqa: E402
import spo  # noqa: E402
import toy_alignment as toy  # noqa: E402


def toy_pairs(n, seed):
    """n (prompt, winner pixels, loser pixels): two renders of one prompt's disc, radii at least 2 px apart."""
    rng = random.Random(seed)
    prompts, w, l = [], [], []
    for _ in range(n):
        color = rng.choice(list(toy.COLORS))
        small = rng.uniform(3, 10)
        big = rng.uniform(small + 2, 12)
        prompts.append(f"a {color} circle")
        w.append(toy.render(color, big, rng))
        l.append(toy.render(color, small, rng))
    return prompts, toy.to_pixels(w), toy.to_pixels(l)


@torch.no_grad()
def predicted_x0(models, pixels, prompts, t, generator):
    """SPM training inputs: the images noised to t (one noise per pair, shared by its two images) and the base
    model's x0 prediction from there, decoded to pixels in [-1, 1]."""
    x0 = sample.encode_images(models.vae, pixels, generator=generator)
    n = len(prompts)
    noise = torch.randn(x0[:n].shape, generator=generator).repeat(2, 1, 1, 1)
    t2 = t.repeat(2)
    x_t = models.scheduler.add_noise(x0, noise, t2)
    eps = models.unet(x_t, t2, **sample.encode_prompt(models, prompts, repeat=2)).sample
    abar = models.scheduler.alphas_cumprod[t2].view(-1, 1, 1, 1)
    return sample.decode_latents(models.vae, (x_t - (1 - abar).sqrt() * eps) / abar.sqrt())


def train_spm(base, out, steps, batch, lr, seed, log):
    models = sample.load_models(base)
    model = spm.build_tiny(seed)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    prompts, w, l = toy_pairs(steps * batch, seed + 10)
    for step in range(steps):
        sl = slice(step * batch, (step + 1) * batch)
        t = torch.randint(0, 1000, (batch,), generator=g)
        images = predicted_x0(models, torch.cat([w[sl], l[sl]]), prompts[sl], t, g)
        s = model.score(images, prompts[sl] * 2, t.repeat(2))
        loss = spm.preference_loss(s[:batch], s[batch:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"spm step {step}: loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    spm.save(model, out)
    # held-out accuracy by range of t
    prompts, w, l = toy_pairs(1024, seed + 20)
    accuracy = {}
    for low in (0, 250, 500, 750):
        t = torch.randint(low, low + 250, (len(prompts),), generator=g)
        right = []
        for sl in [slice(i, i + 256) for i in range(0, len(prompts), 256)]:
            images = predicted_x0(models, torch.cat([w[sl], l[sl]]), prompts[sl], t[sl], g)
            with torch.no_grad():
                s = model.score(images, prompts[sl] * 2, t[sl].repeat(2))
            right.append((s[:len(images) // 2] > s[len(images) // 2:]).float())
        accuracy[f"t {low}-{low + 249}"] = torch.cat(right).mean().item()
    log(f"spm held-out accuracy: {accuracy}")
    return accuracy


def measure_scale(base, spm_path, seed, log, lora_scale=0.003):
    """D^ncp / D^latent for the same transitions: sampled with the base, scored with the trained SPM, all kept;
    the policy a LoRA of gaussian weights (scale lora_scale) off the base. Per DDIM timestep: the median ratio and
    the correlation."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    models = sample.load_models(base)
    preference = spm.load(spm_path, "tiny")
    prompts = [f"a {c} circle" for c in toy.COLORS for _ in range(8)]
    args = SimpleNamespace(candidates=4, resolution=32, steps=20, branch_from=4, guidance_scale=5.0, threshold=-1.0,
                           inner_steps=0, space="latent", encoder_depth="mid")
    ddim = DDIMScheduler.from_config(models.scheduler.config)
    empty = spo.unconditional(models, 32)
    found, _ = spo.sample_transitions(models, models.unet, preference, ddim, prompts,
                                      list(range(seed, seed + len(prompts))), args, empty, lambda: False)
    g = torch.Generator().manual_seed(seed)
    for p in sample.add_lora(models.unet, 8).values():
        p.data = torch.randn(p.shape, generator=g) * lora_scale
    both, cond = spo.text_cond(models, [prompts[i] for i in found["prompt"].tolist()], 32, empty)
    with torch.no_grad():
        d = {}
        for space in ("latent", "ncp"):
            args.space = space
            d[space] = torch.stack(spo.log_ratios(args, models.unet, models.unet, ddim, found, both, cond, "direct"))
    ratio = (d["ncp"] / d["latent"]).flatten()
    t = found["t"].repeat(2)
    rows = {}
    for step in sorted(set(t.tolist()), reverse=True):
        at = t == step
        a, b = d["latent"].flatten()[at], d["ncp"].flatten()[at]
        rows[int(step)] = {"median_ratio": ratio[at].median().item(), "corr": float(np.corrcoef(a, b)[0, 1]),
                           "latent_abs": a.abs().median().item(), "ncp_abs": b.abs().median().item()}
    overall = {"median_ratio": ratio.median().item(),
               "corr": float(np.corrcoef(d["latent"].flatten(), d["ncp"].flatten())[0, 1]),
               "latent_abs": d["latent"].abs().median().item(), "ncp_abs": d["ncp"].abs().median().item(),
               "transitions": len(found["t"])}
    overall["abs_ratio"] = overall["ncp_abs"] / overall["latent_abs"]
    log(f"scale: {overall}")
    for step, row in rows.items():
        log(f"  t {step}: {row}")
    return {"overall": overall, "per_t": rows}


@torch.no_grad()
def radius_under_spo_sampling(base, lora_dir, n_per_color, seed):
    """The mean disc radius of samples drawn as SPO samples while it trains: DDIM, 20 steps, guidance 5.0."""
    models = sample.load_models(base)
    if lora_dir:
        sample.load_lora(models.unet, lora_dir)
    pipe = sample.sampling_pipeline(models, "ddim")
    colors = [c for c in toy.COLORS for _ in range(n_per_color)]
    images = pipe([f"a {c} circle" for c in colors], num_inference_steps=20, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images * 2 - 1
    return toy.disc_stats(images.float(), colors)[0].mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/toy_spo")
    p.add_argument("--base", default=os.path.join(ROOT, "benchmarks/results/toy/base"), help="the pretrained toy LDM")
    p.add_argument("--seed", type=int, default=0, help="seed of the SPM training and the measurements")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the spo.py runs")
    p.add_argument("--spaces", default="latent,ncp", help="comma-separated spaces of the spo.py runs")
    p.add_argument("--spm-steps", type=int, default=150, help="SPM training steps")
    p.add_argument("--spm-batch", type=int, default=64, help="SPM training pairs per step")
    p.add_argument("--checkpoints", default="0,25,50,100", help="optimizer steps at which to measure")
    p.add_argument("--prompts-per-iteration", type=int, default=16, help="prompts sampled per SPO iteration")
    p.add_argument("--candidates", type=int, default=4, help="k")
    p.add_argument("--threshold", type=float, default=0.3, help="the pair rule's softmax gap")
    p.add_argument("--beta", default="latent=10,ncp=2", help="beta per space (default: spo.py's)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--samples-per-color", type=int, default=16)
    p.add_argument("--also-measure", nargs="*", default=[], metavar="DIR",
                   help="other runs' output folders (toy_alignment.py's DPO runs) to measure both ways, at their end")
    p.add_argument("--skip-runs", action="store_true", help="only the SPM, the scale, --also-measure and the tables")
    p.add_argument("--dpo-results", default=os.path.join(ROOT, "benchmarks/results/toy/results.json"),
                   help="toy_alignment.py's results, whose DPO curves the plot draws beside SPO's")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "log.txt"), "a")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    path = os.path.join(args.out, "spo_results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"runs": {}}
    spm_path = os.path.join(args.out, "spm.bin")
    if not os.path.exists(spm_path):
        results["spm"] = {"steps": args.spm_steps, "batch": args.spm_batch,
                          "heldout_accuracy": train_spm(args.base, spm_path, args.spm_steps, args.spm_batch, 1e-3,
                                                        args.seed, log)}
    if "scale" not in results:
        results["scale"] = measure_scale(args.base, spm_path, args.seed, log)
    json.dump(results, open(path, "w"), indent=1)

    prompts = os.path.join(args.out, "prompts.txt")
    with open(prompts, "w") as f:  # 64 prompts: each colour 16 times, each copy its own sampling seed
        f.write("".join(f"a {c} circle\n" for c in toy.COLORS for _ in range(16)))
    radius0, right0, _ = toy.sample_radius(args.base, None, args.samples_per_color, args.seed)
    ddim0 = radius_under_spo_sampling(args.base, None, args.samples_per_color, args.seed)
    betas = dict(item.split("=") for item in args.beta.split(","))
    steps = [int(s) for s in args.checkpoints.split(",")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for folder in args.also_measure:
        radius, right, _ = toy.sample_radius(args.base, folder, args.samples_per_color, args.seed)
        ddim = radius_under_spo_sampling(args.base, folder, args.samples_per_color, args.seed)
        results.setdefault("others", {})[os.path.basename(folder.rstrip("/"))] = {"radius": radius,
                                                                                  "radius_ddim": ddim}
        log(f"{folder}: radius {radius:.2f} px (DDIM 20, guidance 5: {ddim:.2f})")
    json.dump(results, open(path, "w"), indent=1)
    for space in [] if args.skip_runs else args.spaces.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            key = (f"spo-{space}-{args.precision}-beta{float(betas[space]):g}-lr{args.lr:g}-k{args.candidates}"
                   f"-thr{args.threshold:g}-seed{seed}")
            out = os.path.join(args.out, key)
            rows = [{"step": 0, "radius": radius0, "colour_right": right0, "radius_ddim": ddim0}]
            for k in steps[1:]:
                cmd = [sys.executable, os.path.join(ROOT, "spo.py"), "--model", args.base, "--preference-model",
                       spm_path, "--spm-backbone", "tiny", "--prompts", prompts, "--space", space, "--output-dir", out,
                       "--max-steps", str(k), "--epochs", "1000", "--global-batch-size", "16", "--micro-batch-size",
                       "16", "--prompts-per-iteration", str(args.prompts_per_iteration), "--candidates",
                       str(args.candidates), "--threshold", str(args.threshold), "--lr", str(args.lr),
                       "--lora-rank", "8", "--resolution", "32", "--precision", args.precision, "--beta",
                       betas[space], "--log-every", "5", "--seed", str(seed)]
                cmd += ["--resume"] if os.path.exists(os.path.join(out, "checkpoint.pt")) else []
                subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                radius, right, _ = toy.sample_radius(args.base, out, args.samples_per_color, args.seed)
                ddim = radius_under_spo_sampling(args.base, out, args.samples_per_color, args.seed)
                rows.append({"step": k, "radius": radius, "colour_right": right, "radius_ddim": ddim})
                log(f"{key} step {k}: radius {radius:.2f} px (DDIM 20, guidance 5: {ddim:.2f}), right colour "
                    f"{right:.2f}")
            results["runs"][key] = rows
            json.dump(results, open(path, "w"), indent=1)
    lines = ["| run | seeds | measured by | " + " | ".join(f"step {s}" for s in steps) + " |",
             "| --- | --- | --- |" + " --- |" * len(steps)]
    groups = {}
    for key, rows in results["runs"].items():
        groups.setdefault(key.rsplit("-seed", 1)[0], []).append(rows)
    for group, members in groups.items():
        for measure, name in (("radius", "Euler 25, guidance 1"), ("radius_ddim", "DDIM 20, guidance 5")):
            cells = []
            for i in range(len(steps)):
                values = [m[i][measure] for m in members if len(m) > i]
                cells.append(f"{np.mean(values):.2f}" + (f" ({min(values):.2f}-{max(values):.2f})"
                                                         if len(values) > 1 else ""))
            lines.append(f"| {group} | {len(members)} | {name} | " + " | ".join(cells) + " |")
    groups = {}
    for name, row in results.get("others", {}).items():
        groups.setdefault(name.rsplit("-seed", 1)[0], []).append(row)
    for group, members in groups.items():
        for measure, name in (("radius", "Euler 25, guidance 1"), ("radius_ddim", "DDIM 20, guidance 5")):
            values = [m[measure] for m in members]
            cell = f"{np.mean(values):.2f}" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")
            dashes = " | ".join(["-"] * (len(steps) - 1))  # measured at their end only
            lines.append(f"| {group} | {len(members)} | {name} | {dashes} | {cell} |")
    open(os.path.join(args.out, "spo_results.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, args.dpo_results, os.path.join(args.out, "radius.png"))


def plot(results, dpo_results, path):
    """Mean radius over seeds against the step, one panel per way of sampling: SPO's runs, and the DPO runs of
    toy_alignment.py (their whole curve under Euler; under DDIM their end, measured here, drawn from the base)."""
    import plot_metrics

    panels = {"radius (px), Euler 25, guidance 1": {}, "radius (px), DDIM 20, guidance 5": {}}
    curves = {}
    for key, rows in results["runs"].items():
        curves.setdefault(key.rsplit("-seed", 1)[0], []).append(rows)
    for (title, panel), measure in zip(panels.items(), ("radius", "radius_ddim")):
        for group, members in curves.items():
            n = min(len(m) for m in members)
            panel[group] = [(members[0][i]["step"], float(np.mean([m[i][measure] for m in members]))) for i in range(n)]
    base = next(iter(results["runs"].values()))[0]
    dpo = json.load(open(dpo_results))["runs"] if os.path.exists(dpo_results) else {}
    ends = {}
    for name, row in results.get("others", {}).items():
        ends.setdefault(name.rsplit("-seed", 1)[0], []).append(row)
    for group, members in ends.items():
        runs = [rows for key, rows in dpo.items() if key.rsplit("-seed", 1)[0] == group]
        if runs:
            panels["radius (px), Euler 25, guidance 1"][group] = [
                (runs[0][i]["step"], float(np.mean([r[i]["radius"] for r in runs]))) for i in range(len(runs[0]))]
        end = max(step for step, _ in next(iter(panels["radius (px), DDIM 20, guidance 5"].values())))
        panels["radius (px), DDIM 20, guidance 5"][group + " (end only)"] = [
            (0, base["radius_ddim"]), (end, float(np.mean([m["radius_ddim"] for m in members])))]
    plot_metrics.plot(panels, path, columns=2, size=(560, 380))


if __name__ == "__main__":
    main()
