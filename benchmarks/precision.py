"""How faithful the DPO errors, margins and gradients are in each precision the training scripts offer, against fp32.

    python benchmarks/precision.py --model benchmarks/results/toy/base --data toy     # the trained toy LDM
    python benchmarks/precision.py --arch sd15 --latent-size 32 --pairs 16            # SD1.5 architecture, random
    python benchmarks/precision.py --arch sdxl --latent-size 32 --pairs 8             # SDXL architecture, random
    python benchmarks/precision.py --model benchmarks/results/toy_sd3/base --data toy --latent-size 16  # the SD3 toy
    python benchmarks/precision.py --model tiny-flux2 --latent-size 8      # FLUX.2 [klein]-like, random weights

Every path runs the same pairs (x0, t, noise, z, prompt) the way ncp_dpo.py does: the frozen weights in the path's
dtype under autocast, an fp32 LoRA that differs from the base (a random non-zero lora_B, so the policy is not the
reference), the policy and reference predictions, the errors of both in NCP space (eq. 13) and in latent space
(eq. 3), the DPO margin (ref_e_w - ref_e_l) - (e_w - e_l) and the gradient of the DPO loss on the LoRA weights.
Paths: fp32 (the reference; "direct" e^NCP), bf16 and fp16 (the scripts' half-precision paths: e^NCP by a JVP,
see encoder.py) and, for comparison, bf16-direct and fp16-direct (the direct path in half precision).

Reported per path and space, against fp32: the median and 90th percentile of the per-sample relative error of
e, the median relative error of the margin and the share of pairs whose margin has the fp32 sign (over the pairs
whose fp32 |margin| is at least 1% of their mean reference error: below that the policy has moved the error gap
by less than a few bf16 rounding steps of the U-Net's own output, in either space), and
the cosine between the LoRA gradient and the fp32 one. Timesteps are spread over [0, 1000) with a quarter of the
pairs below t = 50. For SD3 (a rectified flow) the same paths run on velocity errors, the timesteps the same
indices of the flow's 1000-point grid (a quarter within its last 50 points, where s and its step are smallest),
and the encoder the first third of the joint blocks (encoder.py).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import encoder  # noqa: E402
import sample  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEPTH = encoder.DEPTHS  # the presets' encoder depth
PATHS = {"fp32": ("fp32", "direct"), "fp32-jvp": ("fp32", "jvp"), "bf16": ("bf16", "jvp"), "fp16": ("fp16", "jvp"),
         "bf16-direct": ("bf16", "direct"), "fp16-direct": ("fp16", "direct")}


def timesteps(n):
    """n timesteps over [0, 1000): a quarter of them below 50 (where c_t is smallest), the rest spread evenly."""
    low = max(1, n // 4)
    return torch.cat([torch.linspace(0, 49, low), torch.linspace(50, 999, n - low)]).round().long()


def load(args, dtype, device):
    """The model in `dtype` with its seeded, random, non-zero fp32 LoRA: the same weights on every call."""
    if args.arch:
        import step_cost

        models = step_cost.build_random(args.arch, seed=args.seed)
        for module in [models.unet, models.vae, *models.text_encoders]:
            module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    else:
        models = sample.load_models(args.model, dtype, device)
    torch.manual_seed(args.seed)
    lora = sample.add_lora(models.unet, args.lora_rank)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, p in lora.items():
            if "lora_B" in name:  # gaussian init leaves B = 0 (policy == reference); make the policy differ
                p.copy_(torch.randn(p.shape, generator=g) * args.lora_std)
    return models, lora


def make_inputs(args, models, device):
    """The shared inputs: x0 (2N, 4, h, w) winners then losers, t, noise and z per pair (repeated), cond."""
    g = torch.Generator().manual_seed(args.seed + 2)
    n = args.pairs
    if args.data:
        folder = args.data
        if args.data == "toy":
            import toy_alignment

            folder = tempfile.mkdtemp()
            toy_alignment.write_pairs(folder, "validation", n, args.seed + 2)
        pairs, _ = data.preference_pairs(folder, "validation" if args.data == "toy" else args.split)
        dataset = data.PreferenceDataset(pairs, 8 * args.latent_size, train=False)
        items = [dataset[i] for i in range(n)]
        pixels = torch.stack([it["pixels"] for it in items]).transpose(0, 1).flatten(0, 1)  # (2N, 3, R, R)
        x0 = sample.encode_images(models.vae, pixels, generator=g)
        captions = [it["caption"] for it in items]
    else:
        x0 = torch.randn(2 * n, models.unet.config.in_channels, args.latent_size, args.latent_size, generator=g)
        captions = [f"a photo of thing number {i}" for i in range(n)]
    t = timesteps(n)
    if encoder.is_flow(models.scheduler):  # the same indices on the flow's grid, from its end (small s)
        t = models.scheduler.timesteps[999 - t]
    noise = torch.randn(n, *x0.shape[1:], generator=g)
    z = torch.randn(n, *x0.shape[1:], generator=g)
    cond = sample.encode_prompt(models, captions, target_size=[8 * args.latent_size] * 2, repeat=2)  # fp32
    return {"x0": x0.to(device), "t": t.repeat(2).to(device), "noise": noise.repeat(2, 1, 1, 1).to(device),
            "z": z.repeat(2, 1, 1, 1).to(device), "cond": cond, "captions": captions}


def _select(cond, rows, dtype):
    """Rows of every tensor of cond, in the path's dtype (as its text encoders would give them)."""
    return {k: _select(v, rows, dtype) if isinstance(v, dict) else
            v[rows].to(dtype) if v.is_floating_point() else v[rows] for k, v in cond.items()}  # positions stay ints


def run_path(models, lora, inputs, dtype, method, beta, micro):
    """Errors, margins and DPO-loss gradients of one path, in both spaces. Micro-batches of `micro` pairs."""
    unet, scheduler = models.unet, models.scheduler
    n = len(inputs["captions"])
    autocast = torch.autocast(inputs["x0"].device.type, dtype=dtype, enabled=dtype != torch.float32)
    out = {space: {"e": [], "ref_e": [], "grad": None} for space in ("ncp", "latent")}
    cost = {"seconds": 0.0, "tflops": 0.0}
    loss_scale = 2.0**16 if dtype == torch.float16 else 1.0
    for start in range(0, n, micro):
        rows = torch.cat([torch.arange(start, min(n, start + micro)), n + torch.arange(start, min(n, start + micro))])
        x0, t, noise, z = (inputs[k][rows] for k in ("x0", "t", "noise", "z"))
        cond = _select(inputs["cond"], rows.to(x0.device), dtype)
        if encoder.is_flow(scheduler):  # SD3: x_s on the straight path, the velocity as the target, no z
            s = scheduler.sigmas.to(x0.device)[(scheduler.timesteps.to(x0.device)[None] - t[:, None]).abs().argmin(1)]
            x_t, noise, z = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise, noise - x0, None
        else:
            x_t = scheduler.add_noise(x0, noise, t)
        with autocast:
            pred = sample.denoise(unet, x_t, t, cond)
            with torch.no_grad(), encoder.base_weights(unet):
                ref_pred = sample.denoise(unet, x_t, t, cond)
            errors = {"latent": (encoder.latent_error(pred, noise), encoder.latent_error(ref_pred, noise))}
            # The encoder's cost: e^NCP of both predictions and its backward into pred, timed and FLOP-counted.
            start_time = time.perf_counter()
            with FlopCounterMode(display=False) as counter:
                leaf = pred.detach().requires_grad_()
                e = encoder.perceptual_errors(unet, scheduler, x_t=x_t, t=t, pred=leaf, ref_pred=ref_pred, target=noise,
                                              z=z, cond=cond, depth=DEPTH[models.kind], method=method)
                grad_pred, = torch.autograd.grad(e[0].sum(), leaf, retain_graph=True)
            cost["seconds"] += time.perf_counter() - start_time
            cost["tflops"] += counter.get_total_flops() / 1e12
            errors["ncp"] = e
        for i, (space, (e, ref_e)) in enumerate(errors.items()):
            e_w, e_l = e.chunk(2)
            ref_e_w, ref_e_l = ref_e.chunk(2)
            margin = (ref_e_w - ref_e_l) - (e_w - e_l)
            # The DPO loss of eq. 8 / 14 over all n pairs; in fp16 scaled as the scripts' GradScaler starts (2^16).
            loss = -F.logsigmoid(beta * margin).sum() / n * loss_scale
            if space == "ncp":  # through the encoder into pred (above), then pred into the LoRA
                g_pred, = torch.autograd.grad(loss, leaf)
                grads = torch.autograd.grad(pred, list(lora.values()), grad_outputs=g_pred, retain_graph=True)
            else:
                grads = torch.autograd.grad(loss, list(lora.values()), retain_graph=True)
            flat = torch.cat([g.reshape(-1).double() for g in grads]) / loss_scale
            out[space]["grad"] = flat if out[space]["grad"] is None else out[space]["grad"] + flat
            out[space]["e"].append(e.detach().double().cpu())
            out[space]["ref_e"].append(ref_e.detach().double().cpu())
    for space in out:
        # (2, n): winners, losers, gathered over the micro-batches
        e, ref_e = (torch.cat([x.view(2, -1) for x in out[space][k]], 1) for k in ("e", "ref_e"))
        out[space].update(e=e.flatten(), ref_e=ref_e.flatten(), margin=(ref_e[0] - ref_e[1]) - (e[0] - e[1]),
                          scale=(ref_e[0] + ref_e[1]) / 2)
    return out, cost


def compare(path, ref):
    """The figures of one path's space against the fp32 path's."""
    rel = ((path["e"] - ref["e"]).abs() / ref["e"].abs().clamp(min=1e-30))
    margin_rel = (path["margin"] - ref["margin"]).abs() / ref["margin"].abs().clamp(min=1e-30)
    big = ref["margin"].abs() >= 1e-2 * ref["scale"]
    same_sign = torch.sign(path["margin"]) == torch.sign(ref["margin"])
    agree = same_sign[big]
    return {"e_rel_median": rel.median().item(), "e_rel_p90": rel.quantile(0.9).item(),
            "margin_rel_median": margin_rel.median().item(),
            "sign_agreement": agree.float().mean().item() if big.any() else None,
            "pairs_not_negligible": int(big.sum()), "sign_agreement_all": same_sign.float().mean().item(),
            "grad_cosine": F.cosine_similarity(path["grad"], ref["grad"], dim=0).item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="any --model the training scripts take (a trained pipeline dir)")
    p.add_argument("--arch", choices=["sd15", "sdxl"], help="instead of --model: the real architecture, random weights")
    p.add_argument("--data", help="a Pick-a-Pic-format folder whose pairs the VAE encodes, or 'toy' (the toy "
                   "benchmark's held-out pairs); default: random latents")
    p.add_argument("--split", default="validation", help="split of --data")
    p.add_argument("--pairs", type=int, default=16, help="preference pairs (two images each)")
    p.add_argument("--latent-size", type=int, default=4, help="latent height and width (pixels / 8)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the random policy LoRA")
    p.add_argument("--lora-std", type=float, default=0.05, help="std of its lora_B weights (0 would be the base)")
    p.add_argument("--beta", type=float, default=2500.0, help="DPO beta of the loss whose gradient is compared")
    p.add_argument("--paths", default="fp32,bf16,fp16,bf16-direct,fp16-direct",
                   help="comma-separated: " + ", ".join(PATHS))
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA and the inputs")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    paths = args.paths.split(",")
    if paths[0] != "fp32" or any(x not in PATHS for x in paths):
        p.error(f"--paths must start with fp32 and name only {', '.join(PATHS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # the fp32 reference must be fp32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    results, ref, inputs = {}, None, None
    for name in paths:
        precision, method = PATHS[name]
        models, lora = load(args, DTYPES[precision], device)
        if inputs is None:  # from the fp32 model: every path gets the same inputs
            inputs = make_inputs(args, models, device)
        out, cost = run_path(models, lora, inputs, DTYPES[precision], method, args.beta, args.micro_batch)
        del models, lora
        if ref is None:
            ref = out
            results[name] = {space: {"e_median": out[space]["e"].median().item(),
                                     "margin_abs_median": out[space]["margin"].abs().median().item()} for space in out}
            results[name]["encoder_cost"] = cost
        else:
            results[name] = {space: compare(out[space], ref[space]) for space in out}
            results[name]["encoder_cost"] = cost
        print(name, json.dumps(results[name]), flush=True)

    what = args.arch or args.model
    print(f"\n{what}, {args.pairs} pairs, latent {args.latent_size}x{args.latent_size}, {machine}\n")
    print("| path | space | e rel. error (median / p90) | margin rel. error (median) | margin sign agreement, not negligible | "
          "gradient cosine |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in paths[1:]:
        for space in ("ncp", "latent"):
            r = results[name][space]
            sign = f"{r['sign_agreement']:.0%} of {r['pairs_not_negligible']}" if r["sign_agreement"] is not None else "none"
            sign += f" ({r['sign_agreement_all']:.0%} of all)"
            print(f"| {name} | {space} | {r['e_rel_median']:.2%} / {r['e_rel_p90']:.2%} | {r['margin_rel_median']:.2%} | "
                  f"{sign} | {r['grad_cosine']:.5f} |")
    print("\nThe encoder's cost (e^NCP of policy and reference and its backward into pred, all pairs), side by side:\n")
    print("| path | seconds | TFLOP |")
    print("| --- | --- | --- |")
    for name in paths:
        c = results[name]["encoder_cost"]
        print(f"| {name} | {c['seconds']:.3g} | {c['tflops']:.4g} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "args": vars(args), "results": results}, f,
                      indent=1)
    return results


if __name__ == "__main__":
    main()
