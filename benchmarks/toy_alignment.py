"""A learning proof that runs on a CPU: align a tiny trained latent diffusion model towards larger discs.

    python benchmarks/toy_alignment.py --out runs/toy --base benchmarks/results/toy/base   # the saved base model
    python benchmarks/toy_alignment.py --out runs/toy --base benchmarks/results/toy/base --runs dpo-ncp,dpo-latent \
        --precision bf16 --seeds 0,1,2

1. Pretrain: a tiny VAE and U-Net (sample.build_tiny's architecture) on 32 px images of a coloured disc on grey,
   prompt "a <colour> circle", radius uniform in 3-12 px. The VAE must reconstruct; the U-Net must draw a disc
   of the prompt's colour (both are measured and reported).
2. Preferences: Pick-a-Pic-format pairs of two renders for one prompt; the larger disc is preferred.
3. Align with the training scripts themselves, at the same budget (steps, pairs, lr, beta): NCP-DPO, latent
   DPO, NCP-CPO and NCP-SFT, resuming from checkpoint to checkpoint.
4. Measure at each checkpoint, on samples drawn with fixed seeds: the mean disc radius in pixels (the property
   the preference rewards) and the implicit accuracy on held-out pairs (the policy prefers the winner more
   than the base does, in the run's own space, averaged over fixed timesteps and noise).

Writes OUT/results.json, OUT/results.md (the table) and OUT/radius.png (the plot). Deterministic given --seed.
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import data  # noqa: E402
import encoder  # noqa: E402
import plot_metrics  # noqa: E402
import run  # noqa: E402
import sample  # noqa: E402

COLORS = data.COLORS
GREY = (128, 128, 128)
RUNS = [("ncp_dpo.py", "ncp"), ("ncp_dpo.py", "latent"), ("ncp_cpo.py", "ncp"), ("ncp_sft.py", "ncp")]
SCRIPTS = ["ncp_dpo.py", "ncp_cpo.py", "ncp_sft.py"]


def render(color, radius, rng, size=32):
    """A disc of `radius` px in the named colour at a random place on grey. PIL image."""
    image = Image.new("RGB", (size, size), GREY)
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    ImageDraw.Draw(image).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=COLORS[color])
    return image


def to_pixels(images):
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for im in images])


def disc_stats(pixels, colors):
    """Radius in px (from the area that is not grey) and whether the disc has the prompt's colour. (N,), (N,)."""
    grey = torch.tensor(GREY, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    mask = (pixels - grey).abs().amax(dim=1) > 0.25  # (N, H, W)
    radius = (mask.float().sum(dim=(1, 2)) / math.pi).sqrt()
    mean = (pixels * mask[:, None]).sum(dim=(2, 3)) / mask.sum(dim=(1, 2)).clamp(min=1)[:, None]  # (N, 3)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 127.5 - 1
    nearest = torch.cdist(mean, palette).argmin(dim=1)
    right = nearest == torch.tensor([list(COLORS).index(c) for c in colors])
    return radius, right & (mask.sum(dim=(1, 2)) > 0)


# -----------------------------------------------------------------------------
# 1. Pretraining


def pretrain(out, seed, vae_steps, unet_steps, log, kind="sd15"):
    """kind sd15: a U-Net trained on DDPM's noise prediction; sd3: tiny-sd3's transformer (MMDiT) trained on rectified
    flow's velocity, with s drawn as SD3 trains (encoder.noised), and its VAE's shift and scale set from the data;
    flux2: tiny-flux2's transformer trained the same way, its VAE's batch-norm statistics (of the patchified
    latents) set from the data."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    colors = [rng.choice(list(COLORS)) for _ in range(4096)]
    pixels = to_pixels([render(c, rng.uniform(3, 12), rng) for c in colors])
    models = sample.build_tiny(kind, seed)
    vae, unet = models.vae.train(), models.unet.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(vae_steps):
        x = pixels[torch.randint(0, len(pixels), (32,))]
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(x).latent_dist.mean for x in pixels.split(256)])
        recon = torch.cat([vae.decode(m).sample for m in means[:256].split(64)]).clamp(-1, 1)
    if kind == "sd3":  # SD3's VAE config has a shift: latents = (z - shift) * scale
        vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1 / means.std()))
    elif kind == "flux2":  # FLUX.2's: the patchified latents' per-channel statistics, as its batch norm keeps them
        patches = sample.flux2_patchify(means)
        vae.bn.running_mean.copy_(patches.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(patches.var(dim=(0, 2, 3)) - vae.config.batch_norm_eps)
    else:
        vae.register_to_config(scaling_factor=float(1 / means.std()))
    r_true, _ = disc_stats(pixels[:256], colors[:256])
    r_rec, right = disc_stats(recon, colors[:256])
    vae_report = {"recon_mse": F.mse_loss(recon, pixels[:256]).item(), "radius_error_px": (r_rec - r_true).abs().mean().item(),
                  "colour_right": right.float().mean().item()}
    log(f"vae: {vae_report}")

    latents = (sample._flux2_normalise(vae, means) if kind == "flux2" else
               (means - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor)
    prompts = [f"a {c} circle" for c in COLORS]
    for module in models.text_encoders:
        module.eval()
    with torch.no_grad():
        text = sample.encode_prompt(models, prompts)
    which = torch.tensor([list(COLORS).index(c) for c in colors])
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    sched = models.scheduler
    for step in range(unet_steps):
        idx = torch.randint(0, len(latents), (32,))
        cond = {k: v[which[idx]] for k, v in text.items()}
        if kind in ("sd3", "flux2"):  # the flow's velocity, s drawn as SD3 trains
            x_t, t, target, _ = encoder.noised(sched, latents[idx], 32, None)
        else:  # DDPM's noise (these draws made the saved base in benchmarks/results/toy)
            x0, target = latents[idx], torch.randn(32, *latents.shape[1:])
            t = torch.randint(0, sched.config.num_train_timesteps, (32,))
            x_t = sched.add_noise(x0, target, t)
        loss = F.mse_loss(sample.denoise(unet, x_t, t, cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == unet_steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    unet.eval().requires_grad_(False)
    path = sample.save_pipeline(models, os.path.join(out, "base"))
    return path, vae_report, float(r_true.mean())


# -----------------------------------------------------------------------------
# 2. Preference pairs


def write_pairs(folder, split, n, seed):
    rng = random.Random(seed)
    rows = {k: [] for k in ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid",
                            "has_label", "are_different"]}
    for i in range(n):
        color = rng.choice(list(COLORS))
        r0 = rng.uniform(3, 12)
        r1 = rng.choice([rng.uniform(3, max(3, r0 - 2)), rng.uniform(min(12, r0 + 2), 12)])
        rows["caption"].append(f"a {color} circle")
        rows["jpg_0"].append(data.jpeg_bytes(render(color, r0, rng), 95))
        rows["jpg_1"].append(data.jpeg_bytes(render(color, r1, rng), 95))
        rows["label_0"].append(float(r0 > r1))
        rows["label_1"].append(float(r0 <= r1))
        rows["image_0_uid"].append(f"{split}-{i}-0")
        rows["image_1_uid"].append(f"{split}-{i}-1")
        rows["has_label"].append(True)
        rows["are_different"].append(True)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{split}-00000-of-00001.parquet")
    pq.write_table(pa.table(rows), path + f".{os.getpid()}.tmp", row_group_size=64)
    os.replace(path + f".{os.getpid()}.tmp", path)  # the same rows each time: a run reading them never sees half


# -----------------------------------------------------------------------------
# 4. Measurements


@torch.no_grad()
def sample_radius(base, lora_dir, n_per_color, seed):
    models = sample.load_models(base)
    if lora_dir:
        sample.load_lora(models.unet, lora_dir)
    pipe = sample.sampling_pipeline(models)
    colors = [c for c in COLORS for _ in range(n_per_color)]
    size = {"height": 32, "width": 32} if models.kind == "flux2" else {}  # klein's default is its 1024 px
    images = pipe(prompt=[f"a {c} circle" for c in colors], num_inference_steps=25, guidance_scale=1.0,
                  output_type="pt", generator=torch.Generator().manual_seed(seed), **sample.text_length(models),
                  **size).images * 2 - 1
    radius, right = disc_stats(images.float(), colors)
    return radius.mean().item(), right.float().mean().item(), images


@torch.no_grad()
def heldout_accuracy(base, lora_dir, folder, space, depth, seed, timesteps=(50, 200, 400, 700), step_back=1):
    """(implicit accuracy, drift) on the held-out pairs at fixed timesteps and noise. The drift is the mean squared
    difference of the policy's and the reference's noise predictions, ||eps_theta - eps_ref||^2 per element: up to
    each timestep's weight, the KL divergence of the policy's reverse step from the reference's, the quantity
    DPO's implicit regularisation holds down, measured on the data whatever the space the run trained in. For a
    flow (SD3) the predictions are velocities, the timesteps the grid points 999 - t (s of 0.95 to 0.3 before the
    shift), and the errors velocity errors."""
    models = sample.load_models(base)
    sample.load_lora(models.unet, lora_dir)
    pairs, _ = data.preference_pairs(folder, "validation")
    batch = [data.PreferenceDataset(pairs, 32, train=False)[i] for i in range(len(pairs))]
    pixels = torch.cat([torch.stack([b["pixels"][0] for b in batch]), torch.stack([b["pixels"][1] for b in batch])])
    g = torch.Generator().manual_seed(seed)
    x0 = sample.encode_images(models.vae, pixels, generator=g)
    cond = sample.encode_prompt(models, [b["caption"] for b in batch], repeat=2)
    n, wins, drift = len(batch), [], []
    sched = models.scheduler
    for step in timesteps:
        noise = torch.randn(x0[:n].shape, generator=g).repeat(2, 1, 1, 1)
        z = torch.randn(x0[:n].shape, generator=g).repeat(2, 1, 1, 1)
        if encoder.is_flow(sched):
            s = sched.sigmas[999 - step]
            t, x_t, goal, z = sched.timesteps[999 - step].repeat(2 * n), (1 - s) * x0 + s * noise, noise - x0, None
        else:
            t = torch.full((2 * n,), step)
            x_t, goal = sched.add_noise(x0, noise, t), noise
        preds = []
        for policy in (True, False):
            with encoder.base_weights(models.unet) if not policy else contextlib.nullcontext():
                preds.append(sample.denoise(models.unet, x_t, t, cond))
        if space == "latent":
            e, ref = (encoder.latent_error(pred, goal) for pred in preds)
        else:  # the exact step's features once for both; the two-pass form, as the toy was measured with
            e, ref = encoder.perceptual_errors(models.unet, sched, x_t=x_t, t=t, pred=preds[0], ref_pred=preds[1],
                                               target=goal, z=z, cond=cond, depth=depth, step_back=step_back,
                                               method="direct")
        preds = [pred.float() for pred in preds]
        drift.append((preds[0] - preds[1]).square().mean())
        inside = (ref[:n] - ref[n:]) - (e[:n] - e[n:])
        wins.append((inside > 0).float() + 0.5 * (inside == 0).float())
    return torch.stack(wins).mean().item(), torch.stack(drift).mean().item()


def save_grid(images, path, per_row):
    """Samples in [-1, 1] (N, 3, H, W) as one PNG, `per_row` to a row (one row per prompt), drawn at twice the size."""
    rows = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
    n, h, w, _ = rows.shape
    grid = rows.reshape(n // per_row, per_row, h, w, 3).permute(0, 2, 1, 3, 4).reshape(n // per_row * h, per_row * w, 3)
    Image.fromarray(grid.numpy()).resize((per_row * w * 2, n // per_row * h * 2), Image.NEAREST).save(path)


# -----------------------------------------------------------------------------


def run_name(name, args, seed):
    back = f"-back{args.step_back}" if args.step_back != 1 else ""
    return f"{name}-{args.precision}-beta{args.beta:g}-lr{args.lr:g}{back}-seed{seed}"


def winner_guard(folder):
    """The highest winner_error_ratio (the policy's error on the preferred images over the reference's, which
    run.py warns about past run.WINNER_ERROR_WARN) a run logged, from its metrics.jsonl; None without one."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        ratios = [r["winner_error_ratio"] for r in map(json.loads, f) if "winner_error_ratio" in r]
    return max(ratios) if ratios else None


def summarise(runs, steps, out=None):
    """Runs that differ only by seed -> one row: mean and spread (min-max) of the radius at each checkpoint; with
    out, the highest winner-error ratio the runs' folders in it logged."""
    groups, guards = {}, {}
    for key, rows in runs.items():
        group = key.rsplit("-seed", 1)[0]
        groups.setdefault(group, []).append(rows)
        guard = winner_guard(os.path.join(out, key)) if out else None
        if guard is not None:
            guards[group] = max(guards.get(group, 0.0), guard)
    lines = ["| run | seeds | " + " | ".join(f"step {s}" for s in steps) + " | held-out accuracy at the end | "
             "drift at the end | beta x margin, median at the end | saturated at the end | winner error / "
             "reference's, highest logged |",
             "| --- | --- |" + " --- |" * (len(steps) + 5)]
    for group, members in groups.items():
        cells = []
        for i in range(len(steps)):
            values = [m[i]["radius"] for m in members if len(m) > i]
            cells.append(f"{np.mean(values):.2f}" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""))
        ends = {k: [m[-1][k] for m in members if k in m[-1]] for k in ("heldout_accuracy", "drift",
                                                                          "beta_margin_p50", "saturated")}
        ends = [f"{np.mean(v):.3g}" if v else "" for v in ends.values()]  # runs measured before: no drift, regime
        ends.append(f"{guards[group]:.3g}" if group in guards else "")
        lines.append(f"| {group} | {len(members)} | " + " | ".join(cells + ends) + " |")
    return lines


def start_over(out, log):
    """Remove a run's folder left by an invocation stopped mid-run. Its rows were never written, and its checkpoint
    may be past the first step this run measures: resumed, that row would measure a later model (or the trainer
    would refuse --max-steps below its step)."""
    if os.path.exists(out):
        log(f"{os.path.basename(out)}: a folder left by an interrupted run, started over")
        shutil.rmtree(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/toy", help="output folder (results.json gathers every invocation's runs)")
    p.add_argument("--base", help="a pretrained toy pipeline dir to reuse (default: OUT/base, pretrained if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pretraining, the pairs and the measurements")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the alignment runs (LoRA init, order, noise)")
    p.add_argument("--runs", default=",".join(f"{s[4:7]}-{sp}" for s, sp in RUNS),
                   help="comma-separated runs: dpo-ncp, dpo-latent, cpo-ncp, sft-ncp, ...")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the training scripts' --precision (bf16: the default on a GPU, as autocast on this CPU)")
    p.add_argument("--vae-steps", type=int, default=400, help="VAE pretraining steps")
    p.add_argument("--unet-steps", type=int, default=1200, help="U-Net pretraining steps")
    p.add_argument("--pairs", type=int, default=1024, help="training preference pairs")
    p.add_argument("--checkpoints", default="0,25,50,100,200", help="steps at which to measure")
    p.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate, every run")
    p.add_argument("--beta", type=float, default=2500.0, help="beta, every run (SFT has none)")
    p.add_argument("--arch", choices=["sd15", "sd3", "flux2"], default="sd15", help="the toy's model when it is "
                   "pretrained: an SD1.5-like U-Net (DDPM), tiny-sd3's MMDiT or tiny-flux2's transformer (rectified "
                   "flow) (default: %(default)s)")
    p.add_argument("--step-back", type=int, default=1, help="SD3: the encoder's step back in grid points, every "
                   "NCP run (default: %(default)s)")
    p.add_argument("--samples-per-color", type=int, default=16, help="samples per prompt for the radius")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "log.txt"), "a")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    base = args.base or os.path.join(args.out, "base")
    if not os.path.isdir(base):
        base, vae_report, data_radius = pretrain(args.out, args.seed, args.vae_steps, args.unet_steps, log, args.arch)
        json.dump({"vae": vae_report, "data_radius": data_radius}, open(os.path.join(base, "pretrain.json"), "w"))
    pre = json.load(open(os.path.join(base, "pretrain.json")))
    kind = sample.resolve_model(base)[1]
    folder = os.path.join(args.out, "pairs")
    write_pairs(folder, "train", args.pairs, args.seed + 1)
    write_pairs(folder, "validation", 128, args.seed + 2)

    radius0, right0, images = sample_radius(base, None, args.samples_per_color, args.seed)
    save_grid(images, os.path.join(args.out, "base_samples.png"), args.samples_per_color)
    log(f"base model: mean radius {radius0:.2f} px (data {pre['data_radius']:.2f}), right colour {right0:.2f}")
    steps = [int(s) for s in args.checkpoints.split(",")]
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"runs": {}}
    results.update({"pretrain": pre, "base": {"radius": radius0, "colour_right": right0}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    scripts = {f"{s[4:7]}-{sp}": (s, sp) for s in SCRIPTS for sp in ("ncp", "latent")}
    for name in args.runs.split(","):
        script, space = scripts[name]
        for seed in [int(s) for s in args.seeds.split(",")]:
            key = run_name(name, args, seed)
            out = os.path.join(args.out, key)
            start_over(out, log)
            rows = [{"step": 0, "radius": radius0, "colour_right": right0, "heldout_accuracy": 0.5}]
            for k in steps[1:]:
                cmd = [sys.executable, os.path.join(ROOT, script), "--model", base, "--data", folder, "--space", space,
                       "--output-dir", out, "--max-steps", str(k), "--global-batch-size", str(args.batch),
                       "--micro-batch-size", str(args.batch), "--lr", str(args.lr), "--warmup-steps", "0",
                       "--lora-rank", "8", "--resolution", "32", "--no-gradient-checkpointing", "--precision",
                       args.precision, "--optimizer", "adamw", "--num-workers", "1", "--log-every", "25",
                       "--seed", str(seed)]
                cmd += ["--beta", str(args.beta)] if script != "ncp_sft.py" else []
                cmd += ["--step-back", str(args.step_back)] if args.step_back != 1 else []
                cmd += ["--resume"] if os.path.exists(os.path.join(out, "checkpoint.pt")) else []
                subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                radius, right, images = sample_radius(base, out, args.samples_per_color, args.seed)
                if k == steps[-1]:  # the trained model's samples, one row per prompt
                    save_grid(images, os.path.join(out, "samples.png"), args.samples_per_color)
                acc, drift = heldout_accuracy(base, out, folder, space, encoder.DEPTHS[kind], args.seed,
                                              step_back=args.step_back)
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    last = json.loads(f.readlines()[-1])  # the loss's regime over the last logged window
                regime = {k: last[k] for k in ("beta_margin_p10", "beta_margin_p50", "beta_margin_p90", "saturated")
                          if k in last}
                rows.append({"step": k, "radius": radius, "colour_right": right, "heldout_accuracy": acc,
                             "drift": drift, **regime})
                log(f"{key} step {k}: radius {radius:.2f} px, right colour {right:.2f}, held-out accuracy {acc:.3f}, "
                    f"drift {drift:.3g}" + "".join(f", {k} {v:.3g}" for k, v in regime.items()))
            with data.flocked(path + ".lock"):  # after every run, merged into what other invocations wrote since:
                if os.path.exists(path):  # an interrupted sweep keeps its runs, and sweeps may run side by side
                    with open(path) as f:
                        results["runs"] = json.load(f)["runs"]
                results["runs"][key] = rows
                run.write_together({path: json.dumps(results, indent=1)})
    lines = summarise(results["runs"], steps, args.out)
    open(os.path.join(args.out, "results.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    curves = {}
    for key, rows in results["runs"].items():
        curves.setdefault(key.rsplit("-seed", 1)[0], []).append([r["radius"] for r in rows])
    mean = {g: [(s, float(np.mean([c[i] for c in cs]))) for i, s in enumerate(steps)] for g, cs in curves.items()}
    plot_metrics.plot({"mean disc radius (px) of samples against the alignment step, mean over seeds": mean},
                      os.path.join(args.out, "radius.png"), columns=1, size=(720, 420))


if __name__ == "__main__":
    main()
