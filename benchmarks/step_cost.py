"""Cost of one optimizer step for each objective (DPO, CPO, SFT) in each space (ncp, latent), side by side.

    python benchmarks/step_cost.py --model tiny --steps 20                               # tiny model, CPU
    python benchmarks/step_cost.py --arch sd15 --micro-batch-size 8 --steps 10 --flops   # SD1.5 at 512 px, GPU
    python benchmarks/step_cost.py --arch sdxl --micro-batch-size 1 --steps 10 --flops   # SDXL at 1024 px, GPU
    python benchmarks/step_cost.py --arch sdxl --encoder-share   # the encoder's FLOP share of a U-Net forward
    python benchmarks/step_cost.py --arch sdxl --resolution 512 --micro-batch-size 1 --warmup 1 --steps 3
        --only dpo-latent dpo-ncp                               # SDXL on a CPU with 24 GB: 1024 px does not fit in fp32
    python benchmarks/step_cost.py --arch sd35-medium           # SD3.5 Medium at 1024 px: FLOPs on the meta device
    python benchmarks/step_cost.py --arch flux2-klein-4b        # FLUX.2 [klein] 4B at 1024 px: the same

Runs the training scripts themselves, one after another in this one invocation, with the same model, batch
and precision, on the same synthetic data. The first --warmup optimizer steps (default: --steps) are not counted; the
next --steps are timed one by one (the scripts' own step_time, logged every step). Reports seconds per step (the
mean of the timed steps, and their spread: the fastest and the slowest), pairs per second, peak memory (GPU: peak
allocated; CPU: peak resident set of the process) and the NCP / latent ratio. The last row, dpo-ncp-cached, is
NCP-DPO with --cache-latents (the cache is filled before the timed steps): the target is that it costs no more
than dpo-latent, which runs the VAE.

--arch builds the real SD1.5 or SDXL architecture (U-Net, VAE, text encoders) with random weights, in code,
and saves it as a pipeline directory for --model DIR: speed, memory and FLOPs do not depend on the weights'
values. Its tokenizer is character-level, padded to CLIP's 77 tokens, so the text encoders do the same work.

--flops also counts the FLOPs of one optimizer step with torch.utils.flop_counter, in separate one-step runs: with
the timed runs' own flags (executed FLOPs: recomputation under gradient checkpointing counted, as timed) and without
gradient checkpointing (model FLOPs); and on a GPU the model FLOPs utilisation: model FLOPs per step / timed
seconds per step / the GPU's dense bf16 peak. Fewer than 3 timed steps give no spread worth the name: a warning.
"""

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import sample  # noqa: E402

SCRIPTS = {"dpo": "ncp_dpo.py", "cpo": "ncp_cpo.py", "sft": "ncp_sft.py"}
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense


def random_unet(kind):
    """The SD1.5 or SDXL U-Net at its real size, random weights (the current torch seed)."""
    from diffusers import UNet2DConditionModel

    if kind == "sdxl":
        return UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    return UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)


def build_random(kind, seed=0):
    """The SD1.5 or SDXL architecture, every component at its real size, with random weights. sample.Models."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = sample._tiny_tokenizer(max_length=77)
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", projection_dim=768, **ids)
    encoders = [CLIPTextModel(clip_l)]
    if kind == "sdxl":
        big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               hidden_act="gelu", projection_dim=1280, **ids)
        encoders.append(CLIPTextModelWithProjection(big_g))
    unet = random_unet(kind)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=1024 if kind == "sdxl" else 512, scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
                        force_upcast=False)  # as the fp16-fix SDXL VAE the training scripts load: runs in bf16
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, prediction_type="epsilon", steps_offset=1)
    return sample.Models(f"random-{kind}", kind, unet, vae, encoders, [tokenizer] * len(encoders), scheduler)


def save_random(kind, path):
    """build_random(kind), saved as a diffusers pipeline directory in bf16."""
    models = build_random(kind)
    for module in [models.unet, models.vae, *models.text_encoders]:
        module.to(torch.bfloat16)  # half the bytes to write and read; the scripts cast to --precision
    sample.save_pipeline(models, path)


def encoder_share(kind, resolution=None):
    """FLOPs of the perceptual encoder / FLOPs of a U-Net forward, one image at `resolution` px (default: the
    model's), for both depths. Counted on the meta device: shapes only, no memory, no time."""
    import encoder
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        models = build_random(kind)
        size = resolution // 8 if resolution else models.unet.config.sample_size
        x, t = torch.randn(1, 4, size, size), torch.tensor([500])
        cond = {"encoder_hidden_states": torch.randn(1, 77, models.unet.config.cross_attention_dim)}
        if kind == "sdxl":
            cond["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
    flops = {}
    with torch.no_grad():
        for name, fn in [("unet", lambda: models.unet(x, t, **cond)),
                         ("down", lambda: encoder.down_stack(models.unet, x, t, cond, "down")),
                         ("mid", lambda: encoder.down_stack(models.unet, x, t, cond, "mid"))]:
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = counter.get_total_flops()
    return {"size": size, "unet_tflops": flops["unet"] / 1e12,
            "down": flops["down"] / flops["unet"], "mid": flops["mid"] / flops["unet"]}


SD35 = {  # the transformers' configs of stabilityai/stable-diffusion-3.5-medium and -large
    "sd35-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13))),
    "sd35-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                       dual_attention_layers=())}


# FLUX.2 [klein] base 4B and 9B: their transformers' configs (the rest of Flux2Transformer2DModel's defaults are
# theirs: 128 input channels, head width 128, RoPE axes 4 x 32, no guidance embedding) and their Qwen3 text encoders
# (Qwen3-4B and Qwen3-8B).
FLUX2 = {"flux2-klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                                text=dict(hidden_size=2560, intermediate_size=9728)),
         "flux2-klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                                text=dict(hidden_size=4096, intermediate_size=12288))}


def _sd3_parts(arch, n, size, pairs):
    """SD3.5 on the meta device: (transformer, text encoders' forward, VAE, x0, cond, scheduler)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                      attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048,
                                      qk_norm="rms_norm", **SD35[arch])
        clip = dict(vocab_size=49408, max_position_embeddings=77)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                               num_hidden_layers=12, num_attention_heads=12,
                                                               projection_dim=768, **clip)),
                    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                               num_hidden_layers=32, num_attention_heads=20,
                                                               projection_dim=1280, **clip)),
                    T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                            num_heads=64, feed_forward_proj="gated-gelu"))]  # T5 v1.1 XXL
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            use_quant_conv=False, use_post_quant_conv=False)
        x0 = torch.randn(n, 16, size, size)
        cond = {"encoder_hidden_states": torch.randn(n, 77 + sample.T5_TOKENS, 4096),
                "pooled_projections": torch.randn(n, 2048)}

    def text():
        for encoder, length in zip(encoders, (77, 77, sample.T5_TOKENS)):
            encoder(torch.zeros(pairs, length, dtype=torch.long, device="meta"))

    return model, text, vae, x0, cond, FlowMatchEulerDiscreteScheduler(shift=3.0)


def _flux2_parts(arch, n, size, pairs):
    """FLUX.2 [klein] on the meta device: (transformer, the Qwen3's forward, VAE, x0, cond, scheduler)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    config = dict(FLUX2[arch])
    text_config = config.pop("text")
    with torch.device("meta"):
        model = Flux2Transformer2DModel(guidance_embeds=False, **config)
        qwen = Qwen3Model(Qwen3Config(vocab_size=151936, num_hidden_layers=36, num_attention_heads=32,
                                      num_key_value_heads=8, head_dim=128, **text_config))
        vae = AutoencoderKLFlux2()  # its defaults are the model's: 32 latent channels, 4 levels
        x0 = torch.randn(n, 128, size // 2, size // 2)  # patchified 2 x 2
        cond = {"encoder_hidden_states": torch.randn(n, sample.FLUX2_TOKENS, config["joint_attention_dim"]),
                "txt_ids": torch.zeros(n, sample.FLUX2_TOKENS, 4, dtype=torch.long)}

    def text():
        qwen(input_ids=torch.zeros(pairs, sample.FLUX2_TOKENS, dtype=torch.long, device="meta"),
             output_hidden_states=True)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    return model, text, vae, x0, cond, scheduler


def flow_costs(arch, resolution=1024, pairs=1, step_back=1):
    """FLOPs of SD3.5's or FLUX.2 [klein]'s parts and of one NCP-DPO and one latent Flow-DPO step, counted on the
    meta device (shapes only: the 8B-parameter SD3.5 Large, T5-XXL or Qwen3-8B need no memory). The step is ncp_dpo.py's objective block as written:
    the policy's forward, the reference's forward without grad, the errors (latent, or the encoder's JVP in bf16's
    method), the loss and its backward into the LoRA; plus the text encoders and the VAE's encoder, which both
    spaces run alike. One image's transformer forward and the encoder's share of it, for K = a third of the blocks.
    Returns a dict of TFLOP figures."""
    from torch.utils.flop_counter import FlopCounterMode

    import encoder
    import ncp_dpo

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    n, size = 2 * pairs, resolution // 8
    model, text_forward, vae, x0, cond, scheduler = (_flux2_parts if arch in FLUX2 else _sd3_parts)(arch, n, size,
                                                                                                   pairs)
    with torch.device("meta"):
        model.requires_grad_(False)
        sample.add_lora(model, rank=64)
    scheduler.timesteps, scheduler.sigmas = scheduler.timesteps.to("meta"), scheduler.sigmas.to("meta")
    x_t, t, target, _ = encoder.noised(scheduler, x0, pairs, None)
    one = {k: v[:1] for k, v in cond.items()}
    with torch.no_grad():
        text = count(text_forward)
        images = count(lambda: vae.encode(torch.randn(n, 3, resolution, resolution, device="meta")))
        forward = count(lambda: sample.denoise(model, x_t[:1], t[:1], one))
        encode = count(lambda: encoder.down_stack(model, x_t[:1], t[:1], one, "third"))

    def step(space):
        pred = sample.denoise(model, x_t, t, cond)
        with torch.no_grad(), encoder.base_weights(model):
            ref_pred = sample.denoise(model, x_t, t, cond)
        if space == "latent":
            err, ref_err = encoder.latent_error(pred, target), encoder.latent_error(ref_pred, target)
        else:
            err, ref_err = encoder.perceptual_errors(model, scheduler, x_t=x_t, t=t, pred=pred, ref_pred=ref_pred,
                                                     target=target, z=None, cond=cond, depth="third", method="jvp",
                                                     step_back=step_back)
        loss, _ = ncp_dpo.dpo_loss(*err.chunk(2), *ref_err.chunk(2), 2500.0)
        loss.backward()

    steps = {space: count(lambda: step(space)) for space in ("latent", "ncp")}
    blocks = len(model.transformer_blocks) + len(getattr(model, "single_transformer_blocks", []))
    return {"arch": arch, "resolution": resolution, "pairs": pairs, "blocks": blocks,
            "encoder_blocks": encoder.blocks_of(model, "third"), "transformer_forward_tflops": forward,
            "encoder_share": encode / forward, "text_encoders_tflops": text, "vae_encode_tflops": images,
            "dpo_latent_tflops": steps["latent"] + text + images, "dpo_ncp_tflops": steps["ncp"] + text + images,
            "ncp_over_latent": (steps["ncp"] + text + images) / (steps["latent"] + text + images)}


def run(script, space, args, out, model, source, extra=(), steps=None, flops=None):
    """Run one training script; return its metrics records of the timed steps (after the warm-up), or, with flops
    "model" or "executed", the FLOPs of one step without gradient checkpointing or with the timed flags."""
    flags = ["--model", model, "--space", space, "--data", source, "--output-dir", out,
             "--global-batch-size", str(args.micro_batch_size), "--micro-batch-size", str(args.micro_batch_size),
             "--num-workers", str(args.num_workers), "--save-every", str(10**9), *extra, *args.extra]
    if args.resolution:
        flags += ["--resolution", str(args.resolution)]
    if flops:
        cmd = [sys.executable, os.path.abspath(__file__), "--count-flops", script, "--", *flags, "--max-steps", "1"]
        cmd += ["--no-gradient-checkpointing"] if flops == "model" else []
    else:
        cmd = [sys.executable, os.path.join(ROOT, script), *flags, "--max-steps", str(args.warmup + steps),
               "--log-every", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    if flops:
        with open(os.path.join(out, "flops.json")) as f:
            return json.load(f)["flops"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["step"] > args.warmup]


def count_flops(script, argv):
    """Child process: run SCRIPT's main for one step under FlopCounterMode; write OUTPUT_DIR/flops.json."""
    import importlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    module = importlib.import_module(script.removesuffix(".py"))
    args = module.parse_args(argv)
    # On CPU the fused attention kernel is not counted by FlopCounterMode: count the same product as matmuls.
    backend = sdpa_kernel(SDPBackend.MATH) if not torch.cuda.is_available() else sdpa_kernel(list(SDPBackend))
    with backend, FlopCounterMode(display=False) as counter:
        module.main(args)
    with open(os.path.join(args.output_dir, "flops.json"), "w") as f:
        json.dump({"flops": counter.get_total_flops()}, f)


def peak_tflops():
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="any --model the training scripts take")
    p.add_argument("--arch", choices=["sd15", "sdxl", *SD35, *FLUX2], help="instead of --model: the real "
                   "architecture, random weights; sd35-*, flux2-*: FLOPs only, on the meta device (flow_costs)")
    p.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: as many as --steps; on a CPU, where a "
                   "step takes minutes, the first step is the one that differs: 1 is enough)")
    p.add_argument("--resolution", type=int, help="pixels (default: the model's, 512 for sd15, 1024 for sdxl)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="pairs per step (one micro-batch, one rank)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--rows", type=int, default=64, help="rows of synthetic data (fewer: a faster cache fill)")
    p.add_argument("--only", nargs="+", help="run only these rows (e.g. dpo-latent dpo-ncp)")
    p.add_argument("--flops", action="store_true", help="also count FLOPs per step (and MFU on a GPU)")
    p.add_argument("--encoder-share", action="store_true", help="print the encoder's share of a U-Net forward "
                   "for --arch (meta device, instant) and exit")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--count-flops", metavar="SCRIPT", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="more flags for the training scripts, after --")
    args = p.parse_args()
    if args.count_flops:
        return count_flops(args.count_flops, args.extra)
    if args.steps < 1:
        p.error(f"--steps {args.steps} must be at least 1 (3 or more for a spread)")
    args.warmup = args.steps if args.warmup is None else args.warmup
    if args.warmup < 1:
        p.error(f"--warmup {args.warmup} must be at least 1: the first step allocates and is not timed")
    if args.steps < 3 and not (args.arch in SD35 or args.arch in FLUX2 or args.encoder_share):
        print(f"warning: --steps {args.steps} times {args.steps} step(s): no spread worth the name; 3 or more "
              "for ratios to quote", flush=True)

    cuda = torch.cuda.is_available()
    machine = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores)", "torch": torch.__version__, "python": platform.python_version()}
    print(json.dumps(machine), flush=True)
    peak = args.peak_tflops or (peak_tflops() if cuda else None)
    rows = [(f"{o}-{s}", SCRIPTS[o], s, []) for o in SCRIPTS for s in ("latent", "ncp")]
    results, share = {}, None
    if args.arch in SD35 or args.arch in FLUX2:
        costs = flow_costs(args.arch, args.resolution or 1024, args.micro_batch_size)
        print(json.dumps(costs, indent=1))
        print(f"\n{args.arch} at {costs['resolution']} px, {costs['pairs']} pair(s) a step: NCP-DPO "
              f"{costs['dpo_ncp_tflops']:.1f} TFLOP, latent Flow-DPO {costs['dpo_latent_tflops']:.1f} TFLOP, ratio "
              f"{costs['ncp_over_latent']:.2f}; the encoder ({costs['encoder_blocks']} of {costs['blocks']} transformer "
              f"blocks) is {costs['encoder_share']:.1%} of a transformer forward")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"machine": machine, "args": vars(args), "costs": costs}, f, indent=1)
        return
    if args.arch:
        share = encoder_share(args.arch, args.resolution)
        print(f"{args.arch} at {8 * share['size']} px: U-Net forward {share['unet_tflops']:.3f} TFLOP an image; "
              f"the encoder is {share['down']:.1%} of it through the down blocks, {share['mid']:.1%} through the mid "
              "block", flush=True)
        if args.encoder_share:
            return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        model = args.model
        if args.arch:
            model = os.path.join(tmp, f"random-{args.arch}")
            # In a child process: the freed heap of a 3.5B-parameter build would stay with this one for the whole run.
            child = multiprocessing.get_context("spawn").Process(target=save_random, args=(args.arch, model))
            child.start()
            child.join()
            if child.exitcode:
                raise SystemExit(f"building the random {args.arch} pipeline failed (exit code {child.exitcode})")
        source = data.write_synthetic(os.path.join(tmp, "data"), n=args.rows)  # one data set for all rows: one cache key
        rows.append(("dpo-ncp-cached", "ncp_dpo.py", "ncp", ["--cache-latents", os.path.join(tmp, "cache")]))
        for name, script, space, extra in rows:
            if args.only and name not in args.only:
                continue
            timed = run(script, space, args, os.path.join(tmp, name), model, source, extra, steps=args.steps)
            times = [r["step_time"] for r in timed]
            mean = sum(times) / len(times)
            results[name] = {"step_s": mean, "step_s_min": min(times), "step_s_max": max(times),
                             "timed_steps": len(times), "pairs_per_s": args.micro_batch_size / mean,
                             "peak_mem_gib": max(r["peak_mem_gib"] for r in timed),
                             "nonfinite_steps": sum(r["nonfinite_steps"] for r in timed)}
            if args.flops:
                with open(os.path.join(tmp, name, "config.json")) as f:  # the flags the timed run resolved
                    checkpointing = json.load(f)["gradient_checkpointing"]
                for kind, key in (("model", "tflops_per_step"), ("executed", "executed_tflops_per_step")):
                    if kind == "executed" and not checkpointing:  # nothing recomputed: the same count
                        results[name][key] = results[name]["tflops_per_step"]
                        continue
                    results[name][key] = run(script, space, args, os.path.join(tmp, f"{name}-{kind}-flops"), model,
                                             source, extra, flops=kind) / 1e12
                if peak:
                    results[name]["mfu"] = results[name]["tflops_per_step"] / results[name]["step_s"] / peak
            print(name, json.dumps(results[name]), flush=True)

    flops = args.flops
    print(f"\n| row | s/step (fastest-slowest of n) | pairs/s | peak GiB |"
          f"{' TFLOP/step (model, executed) | MFU |' if flops else ''}")
    print(f"| --- | --- | --- | --- |{' --- | --- |' if flops else ''}")
    for name, r in results.items():
        counted = f" {r['tflops_per_step']:.4g}, {r['executed_tflops_per_step']:.4g} |" if flops else ""
        extra = counted + (f" {r['mfu']:.1%} |" if "mfu" in r else " - |" if flops else "")
        print(f"| {name} | {r['step_s']:.4f} ({r['step_s_min']:.4f}-{r['step_s_max']:.4f} of {r['timed_steps']}) | "
              f"{r['pairs_per_s']:.3g} | {r['peak_mem_gib']:.2f} |{extra}")
    print(f"\n| objective | ncp / latent (time: of the means; range: fastest/slowest to slowest/fastest) |"
          f"{' ncp / latent (model FLOPs) |' if flops else ''}")
    print(f"| --- | --- |{' --- |' if flops else ''}")
    ratios = {}
    for objective in [*SCRIPTS, "dpo-cached"]:
        ncp = "dpo-ncp-cached" if objective == "dpo-cached" else f"{objective}-ncp"
        latent = f"{objective.split('-')[0]}-latent"
        if ncp not in results or latent not in results:
            continue
        ratios[objective] = {"time": results[ncp]["step_s"] / results[latent]["step_s"],
                             "time_range": [results[ncp]["step_s_min"] / results[latent]["step_s_max"],
                                            results[ncp]["step_s_max"] / results[latent]["step_s_min"]]}
        if flops:
            ratios[objective]["flops"] = results[ncp]["tflops_per_step"] / results[latent]["tflops_per_step"]
            ratios[objective]["executed_flops"] = (results[ncp]["executed_tflops_per_step"]
                                                   / results[latent]["executed_tflops_per_step"])
        low, high = ratios[objective]["time_range"]
        print(f"| {objective} | {ratios[objective]['time']:.2f} ({low:.2f}-{high:.2f}) |"
              f"{' %.2f |' % ratios[objective]['flops'] if flops else ''}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "encoder_share": share, "results": results, "ratios": ratios},
                      f, indent=1)


if __name__ == "__main__":
    main()
