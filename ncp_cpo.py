"""NCP-CPO: Contrastive Preference Optimization with the errors in the frozen U-Net encoder's space at t-1.

Gambashidze et al. 2024, eq. 15; CPO is Xu et al. 2024 (eqs. 9-11). No reference model: the loss compares the
policy's own winner and loser errors and adds a behaviour-cloning term on the winners. With --space latent
the errors are measured in noise space (the latent CPO baseline). The scaffolding is ncp_dpo.py's, commented
there: only the parts between "# objective:" and "# end of objective" are CPO's, and tests/test_siblings.py
checks that the rest is the same in all three scripts.

    python ncp_cpo.py --model tiny --data synthetic
    torchrun --nproc_per_node=4 ncp_cpo.py --model sdxl --data /data/pickapic_v2
    torchrun --nproc_per_node=4 ncp_cpo.py --model sd15 --sft-weight 0 ...   # as the authors' released code

Outputs in --output-dir: pytorch_lora_weights.safetensors (diffusers' format: pipe.load_lora_weights(dir)),
checkpoint.pt (everything needed to resume), metrics.jsonl and log.txt.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import encoder
import sample

# objective: CPO's loss (eqs. 11 and 15) and the flag a resume may change for it
OBJECTIVE = "cpo"
OBJECTIVE_MAY_CHANGE = ["beta"]


def cpo_loss(e_w, e_l, beta, sft_weight):
    """Eq. 11 (latent) and eq. 15 (NCP): L = -log sigmoid(-beta * (e_w - e_l)) + sft_weight * e_w, mean over B.

    e_w, e_l: (B,) per-sample errors of the policy on the winner and the loser. The first term prefers the
    winner (a lower error) without a reference model; the second is CPO's behaviour-cloning (NLL) term on the
    winners. sft_weight = 1 as in the CPO paper; 0 reproduces the NCP authors' released code. beta = 2500 as
    for DPO, in the thousands because the errors are means over many elements.
    """
    margin = e_l - e_w  # (B,) > 0: the policy fits the winner better than the loser
    preference = -torch.nn.functional.logsigmoid(beta * margin).mean()
    loss = preference + sft_weight * e_w.mean()
    metrics = {"loss": loss, "preference_loss": preference, "accuracy": (margin > 0).float().mean() +
               0.5 * (margin == 0).float().mean(), "margin": margin.mean(), "e_w": e_w.mean(), "e_l": e_l.mean(),
               "beta_margin": beta * margin}  # (B,): logsigmoid's argument, whose size says the loss's regime
    return loss, {k: v.detach().float() for k, v in metrics.items()}
# end of objective


# -----------------------------------------------------------------------------
# Settings. Defaults per model reproduce the paper's settings (its section 5 and the authors' launchers); tiny
# finishes on a CPU.

PRESETS = {
    "sd15": dict(resolution=512, global_batch_size=512, micro_batch_size=8, lr=5.12e-6, warmup_steps=250,
                 max_steps=1500, lora_rank=64, gradient_checkpointing=True, filter="absolute-winners"),
    "sdxl": dict(resolution=1024, global_batch_size=512, micro_batch_size=1, lr=5.12e-6, warmup_steps=500,
                 max_steps=2000, lora_rank=64, gradient_checkpointing=True, filter="absolute-winners"),
    # SD3.5 (no paper has NCP settings for it): SDXL's, at SD3.5's native 1024 px (docs/sd3.md says why)
    "sd3": dict(resolution=1024, global_batch_size=512, micro_batch_size=1, lr=5.12e-6, warmup_steps=500,
                max_steps=2000, lora_rank=64, gradient_checkpointing=True, filter="absolute-winners"),
    "tiny": dict(resolution=32, global_batch_size=8, micro_batch_size=8, lr=1e-3, warmup_steps=0,
                 max_steps=60, lora_rank=8, gradient_checkpointing=False, filter="none"),
}
# On --resume the flags not given take the checkpoint's values. These may be given anew and are applied; any
# other would change what the checkpoint's LoRA, optimizer state or data position mean, and is refused.
RESUME_MAY_CHANGE = ["max_steps", "micro_batch_size", "lr", "save_every", "log_every", "num_workers",
                     "cache_latents", "image_store", "report_to", "validation_prompts", "validation_every",
                     "dist_timeout"] + OBJECTIVE_MAY_CHANGE


def preset(key):
    """What --help says of a flag whose default comes from the model's preset."""
    values = {model: settings[key] for model, settings in PRESETS.items()}
    return "(default: " + ", ".join(f"{model} {value}" for model, value in values.items()) + ")"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--model", default="sdxl", help="sd15, sdxl, sd35-medium, sd35-large, tiny, tiny-sdxl, tiny-sd3, "
                   "a diffusers pipeline dir or hub id (default: %(default)s)")
    p.add_argument("--encoder-depth", help="perceptual encoder: U-Net: down (the down blocks) or mid (through the "
                   "mid block); SD3: K, its first K joint blocks, or third (a third of them) (default: "
                   + ", ".join(f"{k} {v}" for k, v in encoder.DEPTHS.items()) + ")")
    p.add_argument("--step-back", type=int, default=1, help="SD3: the encoder's Euler step back, in points of the "
                   "1000-point training grid (default: %(default)s; DDPM's step back is always one step)")
    p.add_argument("--t5", action=argparse.BooleanOptionalAction, default=True,
                   help="SD3: encode prompts with its T5 too (--no-t5: zeros in its place, as SD3 allows; saves T5's "
                   "memory) (default: %(default)s)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank r (alpha = r) " + preset("lora_rank"))
    # data
    p.add_argument("--data", default=data.PICKAPIC,
                   help="preference data: a directory, glob or file of Pick-a-Pic parquet, chosen/rejected parquet, "
                   "WebDataset tars or HPDv2/v3 JSON (told apart by content), a hub dataset id, or 'synthetic' "
                   "(default: %(default)s)")
    p.add_argument("--split", default="train", help="dataset split to train on (default: %(default)s)")
    p.add_argument("--filter", choices=["none", "absolute-winners"],
                   help="absolute-winners: keep pairs whose winner never lost or drew, the paper's filter "
                   + preset("filter"))
    p.add_argument("--resolution", type=int, help="training resolution in pixels " + preset("resolution"))
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes per rank (default: this node's "
                   "cores per rank less one, at most 4)")
    p.add_argument("--cache-latents", metavar="DIR", help="run the VAE on each image once, into DIR, and train on "
                   "the cached latents (centre crops, no flips); any run with the same VAE, data, filter and "
                   "resolution reuses them")
    p.add_argument("--image-store", metavar="DIR", help="copy the pairs' images once into flat files in DIR, "
                   "so that each item reads its own bytes rather than its parquet row group (for shards "
                   "with big row groups; costs the disk space of the images)")
    # objective: the space the errors are measured in, and the loss's own flags
    p.add_argument("--space", choices=["ncp", "latent"], default="ncp",
                   help="ncp: errors in the U-Net encoder's space at t-1 (eq. 15); latent: noise space (eq. 11)")
    p.add_argument("--beta", type=float, default=2500.0,
                   help="CPO beta on the winner-loser error gap (default: %(default)s)")
    p.add_argument("--sft-weight", type=float, default=1.0,
                   help="weight of the behaviour-cloning term on winners, 1.0: the CPO paper, 0: the NCP authors' code "
                   "(default: %(default)s)")
    # end of objective
    # optimization
    p.add_argument("--max-steps", type=int, help="optimizer steps " + preset("max_steps"))
    p.add_argument("--global-batch-size", type=int,
                   help="pairs per optimizer step over all ranks " + preset("global_batch_size"))
    p.add_argument("--micro-batch-size", type=int, help="pairs per forward per rank, lowered to divide the global "
                   "batch over the ranks if not given " + preset("micro_batch_size"))
    p.add_argument("--lr", type=float, help="learning rate, constant after warmup " + preset("lr"))
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps " + preset("warmup_steps"))
    p.add_argument("--optimizer", choices=["adamw8bit", "adamw"], default="adamw8bit",
                   help="adamw8bit: bitsandbytes 8-bit AdamW; adamw: torch AdamW in fp32 (default: %(default)s)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="frozen weights and autocast dtype; LoRA weights stay fp32 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in backward " + preset("gradient_checkpointing"))
    # run
    p.add_argument("--output-dir", help="where the LoRA, checkpoint and logs go (default: runs/" + OBJECTIVE
                   + "-SPACE-MODEL, "
                   "with -FILTER unless none)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the LoRA init, data order, t, noise and z, 0 to 2^32 - 1 (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=250,
                   help="checkpoint every N steps, and at the end (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=10,
                   help="log averaged metrics every N steps (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt; flags not given "
                   "take the checkpoint's values, and only "
                   + ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE) + " may change")
    # seeing the run
    p.add_argument("--report-to", choices=["none", *sample.REPORTERS], default="none",
                   help="also send the logged metrics and validation grids there, from rank 0 (default: %(default)s)")
    p.add_argument("--validation-prompts", metavar="FILE", help="rank 0 samples a grid of these prompts, one image "
                   "each with fixed seeds, into OUTPUT_DIR/samples/step_NNNNN.png, at step 0 and every "
                   "--validation-every steps")
    p.add_argument("--validation-every", type=int, default=100,
                   help="steps between validation grids (default: %(default)s)")
    p.add_argument("--dist-timeout", type=float, default=60.0, help="minutes a collective waits for a slow rank "
                   "(default: %(default)s; NCCL's own is 10)")
    args = p.parse_args(argv)
    for action in p._actions:  # parse again without defaults: what the command line itself says
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))
    return args


def cores_per_rank():
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def fill_defaults(args, kind):
    """Fill the unset arguments from the model's preset. Returns args."""
    preset = PRESETS["tiny" if args.model.startswith("tiny") else kind]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.encoder_depth = args.encoder_depth or encoder.DEPTHS[kind]
    args.precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    if args.num_workers is None:  # workers beside the main process, without taking its cores
        args.num_workers = max(0, min(4, cores_per_rank() - 1))
    model = os.path.basename(args.model.rstrip("/"))
    args.output_dir = args.output_dir or os.path.join("runs", "-".join([OBJECTIVE, args.space, model] +
                                                                       [args.filter] * (args.filter != "none")))
    args.objective = OBJECTIVE
    return args


def check_run(args, kind):
    """Fail fast, before any model is loaded. Returns the checkpoint to resume from, or None."""
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed {args.seed} must be between 0 and 2^32 - 1")
    for flag, value, ok, what in [
            ("lr", args.lr, args.lr > 0, "positive"), ("lora-rank", args.lora_rank, args.lora_rank >= 1, "at least 1"),
            ("save-every", args.save_every, args.save_every >= 1, "at least 1"),
            ("log-every", args.log_every, args.log_every >= 1, "at least 1"),
            ("validation-every", args.validation_every, args.validation_every >= 1, "at least 1"),
            ("resolution", args.resolution, args.resolution >= 8 and args.resolution % 8 == 0,
             "a positive multiple of 8 (the VAE's factor)"),
            ("num-workers", args.num_workers, args.num_workers >= 0, "0 or more"),
            ("dist-timeout", args.dist_timeout, args.dist_timeout > 0, "positive"),
            ("beta", getattr(args, "beta", 1), getattr(args, "beta", 1) > 0, "positive (0 learns nothing, a "
             "negative beta prefers the loser)"),
            ("step-back", args.step_back, args.step_back == 1 or kind == "sd3" and args.step_back > 1,
             "1 (a DDPM model's step back is one step)" if kind != "sd3" else "at least 1"),
            ("encoder-depth", args.encoder_depth, args.encoder_depth in ("down", "mid") if kind != "sd3" else
             args.encoder_depth == "third" or args.encoder_depth.isdigit() and int(args.encoder_depth) >= 1,
             "down or mid for a U-Net" if kind != "sd3" else "third or a number of joint blocks")]:
        if not ok:
            raise ValueError(f"--{flag} {value} must be {what}")
    for flag in ("output_dir", "cache_latents", "image_store"):
        if getattr(args, flag, None):
            sample.check_output(getattr(args, flag), "--" + flag.replace("_", "-"))
    path = os.path.join(args.output_dir, "checkpoint.pt")
    if not os.path.exists(path):
        if args.resume:
            raise ValueError(f"--resume: nothing to resume, there is no {path}")
        return None
    ckpt = sample.load_checkpoint(path, f"ncp_{OBJECTIVE}.py")
    if not args.resume:
        raise ValueError(f"{args.output_dir} holds a run at step {ckpt['step']}: pass --resume to continue it, "
                         "or choose another --output-dir")
    changed, refused = [], []
    for key, before in ckpt["args"].items():
        if key in ("resume", "output_dir") or not hasattr(args, key):
            continue
        if key not in args.given:
            setattr(args, key, before)  # not on the command line: the run's own value
        elif getattr(args, key) != before:
            change = f"{key.replace('_', '-')} {before} -> {getattr(args, key)}"
            (changed if key in RESUME_MAY_CHANGE else refused).append(change)
    if refused:
        raise ValueError(f"--resume cannot change {'; '.join(refused)}: the checkpoint's LoRA, optimizer state and "
                         f"data position belong to its own values (only {', '.join(RESUME_MAY_CHANGE)} may change)")
    if args.max_steps < ckpt["step"]:
        raise ValueError(f"--max-steps {args.max_steps}: the checkpoint is already at step {ckpt['step']}")
    args.changed_on_resume = changed
    return ckpt


def check_batch(args, world_size, fit=True):
    """Fail fast on batch sizes that do not divide over the ranks. With fit, a micro-batch size that was not given
    (the preset's) is lowered until it does: the presets run on 1, 2, 4 or 8 processes as they are."""
    if fit and "micro_batch_size" not in args.given and args.global_batch_size % world_size == 0:
        per_rank = args.global_batch_size // world_size
        args.micro_batch_size = max(d for d in range(1, min(args.micro_batch_size, per_rank) + 1) if per_rank % d == 0)
    per_step = args.micro_batch_size * world_size
    if min(args.global_batch_size, args.micro_batch_size) <= 0 or args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be a positive multiple of "
                         f"--micro-batch-size x world size = {args.micro_batch_size} x {world_size} = {per_step}")
    if args.max_steps <= 0:
        raise ValueError(f"--max-steps {args.max_steps} must be positive")


def step_seed(seed, step, k):
    """A distinct seed for each (step, global micro-batch): results do not depend on the world size."""
    return ((seed * 1_000_003 + step) * 1_000_003 + k) % 2**63


def stop_signal(stop, ddp, device):
    """The signal that asked the run to stop (0: none), the same on every rank: one tiny all-reduce."""
    flag = torch.tensor([stop[0][0] if stop else 0], device=device)
    if ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def optimizer_step(step, lora_params, optimizer, scaler, lr_schedule, totals):
    """Clip, step (unless the gradient is not finite), advance the schedule. Returns (step + 1, grad norm, lr used)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, 1.0)  # DDP has averaged the grads: same on all ranks
    if torch.isfinite(grad_norm):
        scaler.step(optimizer)
    else:  # a non-finite loss or gradient: skip the update, never write NaN into the LoRA
        totals["nonfinite_steps"] += 1
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]  # the lr this step used (the schedule's next is for the next step)
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return step + 1, grad_norm, lr


def run_args(args):
    """The run's settings as a checkpoint stores them (without what this command line alone says)."""
    return {k: v for k, v in vars(args).items() if k not in ("given", "changed_on_resume")}


def validate(models, prompts, args, step, report, autocast):
    """Rank 0: the validation grid of `step`, saved and reported. Returns (its path, the seconds it took)."""
    start = time.time()
    with autocast:
        grid = sample.validation_grid(models, prompts, args.resolution, args.seed)
    path = os.path.join(args.output_dir, "samples", f"step_{step:05d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    report.image("validation", grid, step)
    return path, time.time() - start


def peak_memory(cuda):
    """GiB: the peak of allocated GPU memory on GPU; the process's peak resident memory on CPU."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def setup_distributed(timeout_minutes):
    """(ddp, rank, local rank, world size, device) of this process; joins the process group under torchrun."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, local_rank, world_size = (int(os.environ.get(k, "0" if k != "WORLD_SIZE" else "1"))
                                    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:  # collectives wait --dist-timeout for a slow rank; slow work (downloads, the latent cache) waits apart
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return ddp, rank, local_rank, world_size, device


def make_optimizer(args, params, device):
    """AdamW (8-bit or not) on the LoRA, a linear warmup to a constant lr, and fp16's gradient scaler."""
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    return optimizer, lr_schedule, scaler


def restore(ckpt, lora, optimizer, lr_schedule, scaler, lr):
    """Load a checkpoint's LoRA, optimizer, schedule, scaler and RNG; the schedule then runs at this command's lr.
    Returns (step, totals)."""
    with torch.no_grad():
        for name, p in lora.items():
            p.copy_(ckpt["lora"][name])
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_schedule.load_state_dict(ckpt["lr_schedule"])
    lr_schedule.base_lrs = [lr]  # this command's lr, which may have changed on resume
    optimizer.param_groups[0]["lr"] = lr * lr_schedule.lr_lambdas[0](lr_schedule.last_epoch)
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["step"], ckpt["totals"]


def reduce_window(window, steps, data_counts, ddp, world_size, device):
    """The logged window's metrics, averaged over its steps and the ranks, and its data counts summed over the ranks:
    ({name: float}, [skipped pairs, converted images]). A per-pair metric (a list of (B,) tensors: the loss's
    argument, beta * margin) is gathered over the ranks into its 10th, 50th and 90th percentiles and the share of
    pairs where its size is over 1, where logsigmoid curves: below that the loss is nearly linear in the margin."""
    per_pair = {k: torch.cat(v).to(device).double() for k, v in window.items() if isinstance(v, list)}
    names = sorted(k for k in window if k not in per_pair)
    values = torch.stack([torch.as_tensor(window[k], device=device).float() for k in names]) / steps
    data_counts = data_counts.to(device)
    if ddp:
        dist.all_reduce(values)
        values /= world_size
        dist.all_reduce(data_counts)
    out = {k: v.item() for k, v in zip(names, values)}
    for k, v in per_pair.items():
        if ddp:
            parts = [torch.zeros_like(v) for _ in range(world_size)]
            dist.all_gather(parts, v)
            v = torch.cat(parts)
        q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=v.dtype, device=device)).tolist()
        out.update({f"{k}_p10": q[0], f"{k}_p50": q[1], f"{k}_p90": q[2],
                    "saturated": (v.abs() > 1).double().mean().item()})
    return out, [int(c) for c in data_counts]


def ranks_agree(params, world_size, device):
    """Whether every rank holds the same LoRA: each tensor's sum and sum of squares, gathered and compared."""
    sums = torch.stack([s for p in params for s in (p.double().sum(), p.double().square().sum())]).to(device)
    gathered = [torch.zeros_like(sums) for _ in range(world_size)]
    dist.all_gather(gathered, sums)
    return all(torch.equal(gathered[0], x) for x in gathered)


def load_run(args, ddp, local_rank, world_size, master, device):
    """Check everything that can be checked, then fetch and load the data and the models. Local rank 0 goes first,
    so that each node downloads from the hub once; the others read its files. A user error is one line on every
    rank (the process exits), and a run that fails here leaves nothing behind.
    Returns (args, checkpoint or None, pairs, counts, dataset, validation prompts, dtype, models)."""
    slow = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7)) if ddp else None  # waits for downloads
    if ddp and local_rank != 0:
        dist.barrier(group=slow)
    error, fresh, loaded = None, False, None
    try:
        _, kind = sample.resolve_model(args.model)
        args = fill_defaults(args, kind)
        fresh = not os.path.exists(args.output_dir)
        ckpt = check_run(args, kind)
        check_batch(args, world_size, fit=ckpt is None)
        source = args.data
        if source == "synthetic":
            source = data.write_synthetic(os.path.join(args.output_dir, "synthetic-data"))
        pairs, counts = data.preference_pairs(source, args.split, args.filter)
        dataset = data.PreferenceDataset(pairs, args.resolution, train=True, seed=args.seed,
                                         winners_only=OBJECTIVE == "sft")
        if master:  # one item read now: data none of which decodes (all images null) fails here, in one line
            dataset[0]  # (a parquet row group, up to hundreds of MB: once, not once per rank)
        validation = sample.read_prompts(args.validation_prompts) if args.validation_prompts else []
        sample.check_reporter(args.report_to)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
        models = sample.load_models(args.model, dtype, device, t5=args.t5)
        if kind == "sd3":
            encoder.blocks_of(models.unet, args.encoder_depth)  # within the transformer's depth, or one line
        loaded = (args, ckpt, pairs, counts, dataset, validation, dtype, models)
    except (ValueError, OSError) as e:  # ModelError and DataError are ValueErrors: a user error, no traceback
        error = f"error: {e}"
    if ddp and local_rank == 0:
        dist.barrier(group=slow)
    failed = torch.tensor([float(error is not None), float(master and error is not None)])  # anywhere, on rank 0
    if ddp:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=slow)
    if failed[0]:
        if fresh and master:
            shutil.rmtree(args.output_dir, ignore_errors=True)
        sys.exit(error if master or (error and not failed[1]) else 1)  # one message: rank 0's if it has one
    return loaded


def logger(path):
    """print0(*parts): on rank 0 (path given), a line to the console, above the progress bar, and to `path`."""
    log_file = open(path, "a") if path else None

    def print0(*parts):
        if log_file:
            line = " ".join(str(p) for p in parts)
            tqdm.write(line)
            log_file.write(line + "\n")
            log_file.flush()

    return print0


def write_record(record, path, report, bar, print0):
    """Rank 0's outputs of one log line: metrics.jsonl, the reporter, the progress bar, the console and log.txt."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    report.scalars(record, record["step"])
    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "accuracy") if k in record})
    print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))


def checkpoint_state(lora, optimizer, lr_schedule, scaler, step, totals, args):
    """Everything a resume needs: LoRA, optimizer, schedule, scaler, step, data position, totals, args, RNG."""
    return {"script": f"ncp_{OBJECTIVE}.py", "lora": {n: p.detach().cpu() for n, p in lora.items()},
            "optimizer": optimizer.state_dict(),
            "lr_schedule": lr_schedule.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "data_position": step * args.global_batch_size, "totals": totals, "args": run_args(args),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}


def main(args):
    # -------------------------------------------------------------------------
    # Distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain python runs one process.
    ddp, rank, local_rank, world_size, device = setup_distributed(args.dist_timeout)
    cuda, master = device.type == "cuda", rank == 0

    # -------------------------------------------------------------------------
    # Check, then load the data and the models (local rank 0 first: one download per node).
    args, ckpt, pairs, counts, dataset, validation, dtype, models = load_run(args, ddp, local_rank, world_size,
                                                                            master, device)
    accum = args.global_batch_size // (args.micro_batch_size * world_size)
    if not cuda and "OMP_NUM_THREADS" not in os.environ:  # compute threads on the cores the workers leave free: on a
        torch.set_num_threads(max(1, cores_per_rank() - args.num_workers))  # busy machine, spinning threads crawl
    os.makedirs(args.output_dir, exist_ok=True)
    if master:  # a killed save's temporary folder removed; lines logged after the checkpoint dropped
        sample.start_run(args.output_dir, ckpt["step"] if ckpt is not None else 0)
    print0 = logger(os.path.join(args.output_dir, "log.txt") if master else None)
    print0(f"data: {json.dumps(counts)}")
    if master and not (args.cache_latents or args.image_store) and (group := data.largest_row_group(pairs)) > 2**26:
        print0(f"data: each item reads a parquet row group of up to {group / 2**20:.0f} MB; "
               "--image-store DIR or --cache-latents DIR reads each once")
    print0(f"{OBJECTIVE} in {args.space} space | {args.model} | world {world_size} x micro {args.micro_batch_size} x "
           f"accum {accum} = {args.global_batch_size} pairs/step | {args.precision} | {args.max_steps} steps")
    if ckpt is not None and args.changed_on_resume:
        print0(f"changed on resume: {'; '.join(args.changed_on_resume)}")
    report = sample.Reporter(args.report_to if master else "none", args.output_dir, run_args(args))

    # -------------------------------------------------------------------------
    # Models: frozen components in half precision, an fp32 LoRA on the U-Net, DDP over the U-Net.
    raw_unet, scheduler = models.unet, models.scheduler
    torch.manual_seed(args.seed)  # the same LoRA init on every rank
    lora = sample.add_lora(raw_unet, args.lora_rank)  # {name: fp32 parameter}
    lora_params = list(lora.values())
    if args.gradient_checkpointing:
        raw_unet.enable_gradient_checkpointing()
    unet = DDP(raw_unet, device_ids=[local_rank] if cuda else None) if ddp else raw_unet
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    ncp_method = encoder.method_for(dtype)  # "jvp" in half precision, which cannot resolve one step: see encoder.py

    # -------------------------------------------------------------------------
    # Optimizer, schedule, resume.
    optimizer, lr_schedule, scaler = make_optimizer(args, lora_params, device)
    step, totals = 0, {"skipped_pairs": 0, "converted_images": 0, "nonfinite_steps": 0}  # over the whole run
    if ckpt is not None:
        step, totals = restore(ckpt, lora, optimizer, lr_schedule, scaler, args.lr)
        print0(f"resumed from {args.output_dir}/checkpoint.pt at step {step} (data position {ckpt['data_position']})")
        if master:  # the LoRA file is the checkpoint's again (a save killed between its renames left it ahead)
            sample.save_run(args.output_dir, raw_unet)

    def save():
        if master:
            state = checkpoint_state(lora, optimizer, lr_schedule, scaler, step, totals, args)
            sample.save_run(args.output_dir, raw_unet, state)
        if ddp:
            dist.barrier()

    ranks = dict(rank=rank, world_size=world_size, barrier=dist.barrier if ddp else None, log=print0)
    if args.cache_latents:  # after this, the VAE never runs again
        dataset = data.cached_dataset(dataset, args.cache_latents, **ranks, batch_size=args.micro_batch_size,
                                      num_workers=args.num_workers,
                                      **sample.latent_encoder(models.vae, args.resolution, args.micro_batch_size))
    elif args.image_store:  # each item reads its pair's bytes, not its row group
        dataset = data.stored_dataset(dataset, args.image_store, **ranks)

    # -------------------------------------------------------------------------
    # Data: an endless loader of this rank's micro-batches, starting where the run left off.
    loader = iter(data.make_loader(dataset, args.micro_batch_size, rank, world_size, args.seed,
                                   start=step * args.global_batch_size, num_workers=args.num_workers))
    stop = []  # SIGTERM / SIGINT (preemption, Ctrl-C): stop at the next micro-batch, save the last step, exit
    data.stop_on_signals(stop)

    # -------------------------------------------------------------------------
    # Training loop.
    window, window_steps, window_start = {}, 0, time.time()  # metrics summed since the last log line
    data_counts = torch.zeros(2, dtype=torch.float64)  # this rank's skipped pairs and converted images, same window
    stopping = 0  # the signal that stopped the run (0: none)
    if master and validation and ckpt is None:
        path, seconds = validate(models, validation, args, step, report, autocast)
        print0(f"validation grid {path}: {seconds:.1f} s")
        window_start += seconds  # not part of the step time
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, desc=f"ncp-{OBJECTIVE}", dynamic_ncols=True)
    while step < args.max_steps:
        step_metrics, step_counts = {}, torch.zeros(2, dtype=torch.float64)  # this step's, kept once it completes
        for micro in range(accum):
            stopping = stop_signal(stop, ddp, device)  # every rank stops at the same micro-batch
            if stopping:
                break
            # A micro-batch of B pairs, s images each (2: the winner, then the loser; 1 for SFT): "pixels" (B, s, 3, R,
            # R) in [-1, 1], or "latents" (B, s, C, R/8, R/8) from the cache (C: 4, SD3's 16); "caption" (B strings); "original_sizes"
            # and "crops_top_left" (B, s, 2), SDXL's micro-conditioning; "skipped", "converted" (B,) data counts.
            batch = next(loader)
            g = torch.Generator(device).manual_seed(step_seed(args.seed, step, micro * world_size + rank))
            n = len(batch["caption"])  # B pairs
            x0, cond = sample.model_inputs(models, batch, args.resolution, generator=g)  # (sB, C, h, w): s = 2, or 1
            # One t, noise and z (the reverse step's noise, eq. 12) per pair, shared by its images: the comparison
            # of winner and loser then carries no noise of its own. target: the noise, or SD3's velocity eps - x0.
            x_t, t, target, z = encoder.noised(scheduler, x0, n, g)
            sync = micro == accum - 1 or not ddp
            with autocast, (nullcontext() if sync else unet.no_sync()):
                # objective: the policy's (and reference's) errors, and the loss
                pred = unet(x_t, timestep=t, **cond).sample  # the policy, through DDP; CPO has no reference forward
                if args.space == "latent":
                    err = encoder.latent_error(pred, target)
                else:
                    err = encoder.perceptual_error(raw_unet, scheduler, x_t, t, pred, target, z, cond,
                                                   args.encoder_depth, method=ncp_method, step_back=args.step_back)
                e_w, e_l = err.chunk(2)
                loss, metrics = cpo_loss(e_w, e_l, args.beta, args.sft_weight)
                # end of objective
                scaler.scale(loss / accum).backward()
            for k, v in metrics.items():  # a scalar is averaged over the micro-batches; a per-pair tensor kept whole
                step_metrics[k] = step_metrics.get(k, []) + [v] if v.dim() else step_metrics.get(k, 0.0) + v / accum
            step_counts += torch.tensor([batch["skipped"].sum(), batch["converted"].sum()], dtype=torch.float64)
        if stopping:  # drop the partial accumulation: the LoRA and optimizer state of the last step are intact
            optimizer.zero_grad(set_to_none=True)
            print0(f"{signal.Signals(stopping).name}: stopping at step {step}, {micro} of {accum} micro-batches "
                   "dropped")
        else:
            step, grad_norm, lr = optimizer_step(step, lora_params, optimizer, scaler, lr_schedule, totals)
            for k, v in step_metrics.items():
                window[k] = window[k] + v if k in window else v
            window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.detach().float()
            data_counts += step_counts
            window_steps += 1
            bar.update(1)

        save_now = step % args.save_every == 0 or step == args.max_steps or stopping
        if window_steps and (step % args.log_every == 0 or save_now):  # a checkpoint's totals are the logged ones
            means, (skipped, converted) = reduce_window(window, window_steps, data_counts, ddp, world_size, device)
            totals["skipped_pairs"] += skipped
            totals["converted_images"] += converted
            elapsed = (time.time() - window_start) / window_steps
            record = {"step": step, **means, "lr": lr, "step_time": elapsed,
                      "pairs_per_s": args.global_batch_size / elapsed, "peak_mem_gib": peak_memory(cuda), **totals}
            if master:
                write_record(record, os.path.join(args.output_dir, "metrics.jsonl"), report, bar, print0)
            window, window_steps, window_start = {}, 0, time.time()
            data_counts = torch.zeros(2, dtype=torch.float64)
        if save_now:
            save()
        if master and validation and not stopping and step % args.validation_every == 0:
            path, seconds = validate(models, validation, args, step, report, autocast)
            print0(f"validation grid {path}: {seconds:.1f} s")
            window_start += seconds
        if stopping:
            print0(f"checkpoint of step {step} saved {time.time() - stop[0][1]:.1f} s after the signal"
                   if stop else f"checkpoint of step {step} saved; continue with --resume")
            break

    # -------------------------------------------------------------------------
    bar.close()
    if ddp:  # a cheap proof that the ranks stayed in step
        print0(f"LoRA weights identical on all {world_size} ranks: {ranks_agree(lora_params, world_size, device)}")
    print0(f"done: step {step}, LoRA in {args.output_dir}/{sample.LORA_FILE}")
    report.close()
    if ddp:
        dist.destroy_process_group()
    if stopping:
        sys.exit(128 + stopping)


if __name__ == "__main__":
    data.run_main(main, parse_args())
