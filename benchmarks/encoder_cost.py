"""The perceptual encoder's work alone, per path, side by side: seconds, peak memory and FLOPs.

    python benchmarks/encoder_cost.py --arch sd15 --pairs 1 --paths jvp composite          # SD1.5 at 512 px
    python benchmarks/encoder_cost.py --arch sdxl --pairs 1 --paths jvp                    # SDXL at 1024 px

What is measured is what ncp_dpo.py does with the encoder in one micro-batch: e^NCP of the policy and the reference
(`encoder.perceptual_errors`, winners and losers, so 2 x --pairs images) and its backward into the policy's
prediction, with gradient checkpointing on as in the presets, on the real U-Net architecture with random weights
(speed, memory and FLOPs do not depend on their values) and a rank-64 LoRA, under autocast in --precision.
The U-Net's own forward and backward, the VAE and the text encoders are not in it (benchmarks/step_cost.py has
the whole step).

Paths:
- jvp: the scripts' half-precision path (encoder.jvp: one primal pass for both tangents, attention tangent by
  query chunks, a backward stage by stage through the fused attention kernels).
- composite: the path it replaced, kept here as the baseline: a forward-mode pass per tangent with PyTorch's
  composite attention, the whole encoder checkpointed as one piece.
- direct: eq. 13 as two encoder passes, the fp32 path (in half precision it is not faithful; see encoder.py).

Each path runs in a process of its own. Peak memory is the process' peak resident set (CPU) or peak allocated
(GPU) during the encoder work, above what the weights and inputs held before it. FLOPs are counted by
torch.utils.flop_counter in a separate pass without gradient checkpointing (recomputation not counted; the JVP's
stage-wise backward is part of the method and is counted).
"""

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import encoder  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def composite_jvp(unet, x, t_prev, cond, depth, deltas):
    """The replaced path: [J_E(x) d] by torch.autograd.forward_ad, one primal + tangent pass per tangent, the
    composite (math) attention, the whole encoder checkpointed as one piece when the U-Net checkpoints."""
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.checkpoint import checkpoint

    def tangent(x, d):
        with (encoder.base_weights(unet), encoder._no_block_checkpointing(unet), sdpa_kernel(SDPBackend.MATH),
              fwAD.dual_level()):
            return fwAD.unpack_dual(encoder.down_stack(unet, fwAD.make_dual(x, d), t_prev, cond, depth)).tangent

    out = []
    for i, d in enumerate(deltas):
        scale = d.detach().flatten(1).pow(2).mean(1).sqrt().clamp(min=1e-30).view(-1, 1, 1, 1)
        u = (d / scale).to(x.dtype).contiguous()
        with torch.no_grad() if i else torch.enable_grad():
            if torch.is_grad_enabled() and unet.is_gradient_checkpointing:
                j = checkpoint(tangent, x.contiguous(), u, use_reentrant=False)
            else:
                j = tangent(x.contiguous(), u)
        out.append(j.float() * scale)
    return out


def composite_errors(unet, scheduler, x_t, t, preds, noise, z, cond, depth):
    """encoder.perceptual_errors' "jvp" method on the composite path (two tangents, as ncp_dpo.py)."""
    x_star = encoder.previous_sample(scheduler, x_t.float(), t, noise, z)
    d0, d1 = (encoder.previous_sample(scheduler, x_t.float(), t, p, z) - x_star for p in preds)
    x_mid = (x_star + (d0.detach() + d1) / 4).to(x_t.dtype)
    j01, j1 = composite_jvp(unet, x_mid, (t - 1).clamp(min=0), cond, depth, [d0 - d1, d1])
    return [(j1 + j01).pow(2).mean(dim=(1, 2, 3)), j1.pow(2).mean(dim=(1, 2, 3))]


def _peak(cuda):
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def _reset_peak(cuda):
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets the peak resident set (VmHWM) to the current one
            f.write("5")


def measure(args, path, queue):
    """Child process: build the U-Net, run the path --repeats times, report seconds, peak GiB and TFLOP."""
    import sample
    import step_cost
    from diffusers import DDPMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.precision]
    torch.manual_seed(0)
    unet = step_cost.random_unet(args.arch).requires_grad_(False).to(device=device, dtype=dtype)
    sample.add_lora(unet, 64)
    unet.enable_gradient_checkpointing()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, prediction_type="epsilon")
    size, n = args.resolution // 8, 2 * args.pairs
    g = torch.Generator().manual_seed(1)
    noise, x0 = (torch.randn(n, 4, size, size, generator=g).to(device) for _ in range(2))
    z = torch.randn(n, 4, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (n,), generator=g).to(device)
    x_t = scheduler.add_noise(x0, noise, t).to(dtype)
    cond = {"encoder_hidden_states": torch.randn(n, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)}
    if args.arch == "sdxl":
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(n, 1280, generator=g).to(device, dtype),
                                     "time_ids": torch.tensor([[args.resolution] * 2 + [0, 0] + [args.resolution] * 2]
                                                              * n, dtype=dtype, device=device)}
    pred = (noise + 0.5 * torch.randn(noise.shape, generator=g).to(device)).to(dtype)
    ref_pred = (pred.float() + 0.01 * torch.randn(noise.shape, generator=g).to(device)).to(dtype)
    depth = encoder.DEPTHS[args.arch]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def work():
        leaf = pred.detach().requires_grad_()
        with autocast:
            if path == "composite":
                e = composite_errors(unet, scheduler, x_t, t, [leaf, ref_pred], noise, z, cond, depth)
            else:
                e = encoder.perceptual_errors(unet, scheduler, x_t=x_t, t=t, pred=leaf, ref_pred=ref_pred, target=noise,
                                              z=z, cond=cond, depth=depth, method=path)
        grad, = torch.autograd.grad((e[0] - e[1]).sum(), leaf)
        return grad

    work()  # warm-up
    _reset_peak(cuda)
    before = _peak(cuda)
    seconds = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    result = {"seconds": min(seconds), "peak_gib": _peak(cuda) - before, "weights_and_inputs_gib": before}
    if args.flops:
        unet.disable_gradient_checkpointing()
        with FlopCounterMode(display=False) as counter:
            work()
        result["tflops"] = counter.get_total_flops() / 1e12
    queue.put(result)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15", help="the real U-Net architecture, random weights")
    p.add_argument("--resolution", type=int, help="pixels (default: 512 for sd15, 1024 for sdxl)")
    p.add_argument("--pairs", type=int, default=1, help="preference pairs (2 images each), one micro-batch")
    p.add_argument("--precision", choices=list(DTYPES), default="bf16", help="weights and autocast dtype")
    p.add_argument("--paths", nargs="+", choices=["jvp", "composite", "direct"], default=["jvp", "composite"],
                   help="the paths to measure, each in its own process")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats after one warm-up (the fastest is kept)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.resolution = args.resolution or (1024 if args.arch == "sdxl" else 512)
    cuda = torch.cuda.is_available()
    machine = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    print(json.dumps({"machine": machine, "torch": torch.__version__}), flush=True)
    results = {}
    ctx = multiprocessing.get_context("spawn")
    for path in args.paths:
        queue = ctx.Queue()
        child = ctx.Process(target=measure, args=(args, path, queue))
        child.start()
        child.join()
        if child.exitcode:
            raise SystemExit(f"the {path} path failed (exit code {child.exitcode})")
        results[path] = queue.get()
        print(path, json.dumps(results[path]), flush=True)
    print(f"\n{args.arch} at {args.resolution} px, {args.pairs} pair(s), {args.precision}, {machine}\n")
    print("| path | seconds | peak GiB above the weights | TFLOP |")
    print("| --- | --- | --- | --- |")
    for path, r in results.items():
        print(f"| {path} | {r['seconds']:.3g} | {r['peak_gib']:.2f} | {r.get('tflops', float('nan')):.4g} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "args": vars(args), "results": results}, f,
                      indent=1)
    return results


if __name__ == "__main__":
    main()
