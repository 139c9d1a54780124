"""Everything a training run needs that is not its objective: the scaffolding of ncp_dpo.py, ncp_cpo.py, ncp_sft.py
and spo.py, written once.

A trainer reads as its method (docstring, loss, errors, flags, main) and leaves the rest to this module:

- distributed setup, per-step seeds, the all-ranks-fail-together agreement of the start;
- the common flags and their checks, the model presets, the resume policy (which flags a resume may change);
- the run folder: checkpoint save and restore (and the repair of a save killed half way), the LoRA file;
- signals (preemption, Ctrl-C: stop at the next micro-batch and save) and the scripts' entry wrapper;
- logging: the console and log.txt, metrics.jsonl, TensorBoard or W&B, the window's reduction over the ranks;
- the optimizer, its schedule and its step;
- `Run`: a preference run of the three pair trainers, from the checks to the last save, around the trainer's loop.

It takes what differs per objective as arguments (its presets, the flags a resume may change, its own flags) and
never asks which objective it serves.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import encoder
import sample

# -----------------------------------------------------------------------------
# Distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain python runs one process.


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


def cores_per_rank():
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def step_seed(seed, step, k):
    """A distinct seed for each (step, global micro-batch k): results do not depend on the world size."""
    return ((seed * 1_000_003 + step) * 1_000_003 + k) % 2**63


def stop_signal(stop, ddp, device):
    """The signal that asked the run to stop (0: none), the same on every rank: one tiny all-reduce."""
    flag = torch.tensor([stop[0][0] if stop else 0], device=device)
    if ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def ranks_agree(params, world_size, device):
    """Whether every rank holds the same LoRA: each tensor's sum and sum of squares, gathered and compared."""
    sums = torch.stack([s for p in params for s in (p.double().sum(), p.double().square().sum())]).to(device)
    gathered = [torch.zeros_like(sums) for _ in range(world_size)]
    dist.all_gather(gathered, sums)
    return all(torch.equal(gathered[0], x) for x in gathered)


def load_together(load, ddp, local_rank, master):
    """load(made): every check and download of a run's start, local rank 0 first, so that each node downloads from
    the hub once and the others read its files. A user error (ValueError, OSError) is one line on every rank and
    every rank exits; rank 0 then removes the folders `load` appended to `made` (those it created), so that a run
    that fails here leaves nothing behind. Returns what load returned."""
    slow = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7)) if ddp else None  # waits for downloads
    if ddp and local_rank != 0:
        dist.barrier(group=slow)
    error, made, loaded = None, [], None
    try:
        loaded = load(made)
    except (ValueError, OSError) as e:  # ModelError and DataError are ValueErrors: a user error, no traceback
        error = f"error: {e}"
    if ddp and local_rank == 0:
        dist.barrier(group=slow)
    failed = torch.tensor([float(error is not None), float(master and error is not None)])  # anywhere, on rank 0
    if ddp:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=slow)
    if failed[0]:
        # Every rank exits with the error, not killed by the launcher, which stops the others once one has exited:
        # each ignores SIGTERM first, and none exits before all have (the barrier below).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if master:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
        if ddp:  # every rank is here: leave no gloo thread alive at exit (it aborts the process, SIGABRT)
            dist.barrier(group=slow)
            dist.destroy_process_group()
        sys.exit(error if master or (error and not failed[1]) else 1)  # one message: rank 0's if it has one
    return loaded


# -----------------------------------------------------------------------------
# Flags: the ones every run has, defaults per model preset, and what the command line itself said.


def preset_help(presets, key):
    """What --help says of a flag whose default comes from the model's preset."""
    return "(default: " + ", ".join(f"{model} {settings[key]}" for model, settings in presets.items()) + ")"


def parser(doc):
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def pair_flags(p, presets):
    """The model, space and data flags of the three pair trainers."""
    p.add_argument("--model", default="sdxl", help="sd15, sdxl, sd35-medium, sd35-large, flux2-klein-4b, "
                   "flux2-klein-9b, tiny, tiny-sdxl, tiny-sd3, tiny-flux2, a diffusers pipeline dir or hub id "
                   "(default: %(default)s)")
    p.add_argument("--encoder-depth", help="perceptual encoder: U-Net: down (the down blocks) or mid (through the "
                   "mid block); SD3, FLUX.2: K, its first K transformer blocks, or third (a third of them) (default: "
                   + ", ".join(f"{k} {v}" for k, v in encoder.DEPTHS.items()) + ")")
    p.add_argument("--step-back", type=int, default=1, help="SD3, FLUX.2: the encoder's Euler step back, in points of the "
                   "1000-point training grid (default: %(default)s; DDPM's step back is always one step)")
    p.add_argument("--t5", action=argparse.BooleanOptionalAction, default=True,
                   help="SD3: encode prompts with its T5 too (--no-t5: zeros in its place, as SD3 allows; saves T5's "
                   "memory) (default: %(default)s)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank r (alpha = r) " + preset_help(presets, "lora_rank"))
    p.add_argument("--space", choices=["ncp", "latent"], default="ncp", help="ncp: the errors in the U-Net encoder's "
                   "space at t-1 (eq. 13), NCP; latent: in noise space (eq. 3), the baseline (default: %(default)s)")
    p.add_argument("--data", default=data.PICKAPIC,
                   help="preference data: a directory, glob or file of Pick-a-Pic parquet, chosen/rejected parquet, "
                   "WebDataset tars or HPDv2/v3 JSON (told apart by content), a hub dataset id, or 'synthetic' "
                   "(default: %(default)s)")
    p.add_argument("--split", default="train", help="dataset split to train on (default: %(default)s)")
    p.add_argument("--filter", choices=["none", "absolute-winners"],
                   help="absolute-winners: keep pairs whose winner never lost or drew, the paper's filter "
                   + preset_help(presets, "filter"))
    p.add_argument("--resolution", type=int, help="training resolution in pixels " + preset_help(presets, "resolution"))
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes per rank (default: this node's "
                   "cores per rank less one, at most 4)")
    p.add_argument("--cache-latents", metavar="DIR", help="run the VAE on each image once, into DIR, and train on "
                   "the cached latents (centre crops, no flips); any run with the same VAE, data, filter and "
                   "resolution reuses them")
    p.add_argument("--image-store", metavar="DIR", help="copy the pairs' images once into flat files in DIR, "
                   "so that each item reads its own bytes rather than its parquet row group (for shards "
                   "with big row groups; costs the disk space of the images)")


# The pair trainers' settings per model: the paper's (its section 5 and the authors' launchers), the same for DPO,
# CPO and SFT; tiny finishes on a CPU.
PAPER_PRESETS = {
    "sd15": dict(resolution=512, global_batch_size=512, micro_batch_size=8, lr=5.12e-6, warmup_steps=250,
                 max_steps=1500, lora_rank=64, gradient_checkpointing=True, filter="absolute-winners"),
    "sdxl": dict(resolution=1024, global_batch_size=512, micro_batch_size=1, lr=5.12e-6, warmup_steps=500,
                 max_steps=2000, lora_rank=64, gradient_checkpointing=True, filter="absolute-winners"),
    # SD3.5 (no paper has NCP settings for it): SDXL's, at SD3.5's native 1024 px (docs/sd3.md says why)
    "sd3": dict(resolution=1024, global_batch_size=512, micro_batch_size=1, lr=5.12e-6, warmup_steps=500,
                max_steps=2000, lora_rank=64, gradient_checkpointing=True, filter="absolute-winners"),
    # FLUX.2 [klein] (no paper has NCP or DPO settings for it): SDXL's too, at its native 1024 px (docs/flux2.md)
    "flux2": dict(resolution=1024, global_batch_size=512, micro_batch_size=1, lr=5.12e-6, warmup_steps=500,
                  max_steps=2000, lora_rank=64, gradient_checkpointing=True, filter="absolute-winners"),
    "tiny": dict(resolution=32, global_batch_size=8, micro_batch_size=8, lr=1e-3, warmup_steps=0,
                 max_steps=60, lora_rank=8, gradient_checkpointing=False, filter="none"),
}

# On --resume the flags not given take the checkpoint's values. These may be given anew and are applied (with the
# objective's own); any other would change what the checkpoint's LoRA, optimizer state or data position mean.
MAY_CHANGE = ["max_steps", "micro_batch_size", "lr", "save_every", "log_every", "num_workers", "cache_latents",
              "image_store", "report_to", "wandb_project", "wandb_entity", "run_name", "validation_prompts",
              "validation_every", "dist_timeout"]


def run_flags(p, presets, objective, may_change, unit="pairs", optimizer="adamw8bit", save_every=250,
              max_steps=None):
    """The optimization, run and reporting flags of every trainer. unit: what a batch counts; max_steps: --max-steps'
    help where the presets do not set it."""
    p.add_argument("--max-steps", type=int, help=max_steps or "optimizer steps " + preset_help(presets, "max_steps"))
    p.add_argument("--global-batch-size", type=int,
                   help=f"{unit} per optimizer step over all ranks " + preset_help(presets, "global_batch_size"))
    p.add_argument("--micro-batch-size", type=int, help=f"{unit} per forward per rank, lowered to divide the global "
                   "batch over the ranks if not given " + preset_help(presets, "micro_batch_size"))
    p.add_argument("--lr", type=float, help="learning rate, constant after warmup " + preset_help(presets, "lr"))
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps " + preset_help(presets, "warmup_steps"))
    p.add_argument("--optimizer", choices=["adamw8bit", "adamw"], default=optimizer,
                   help="adamw8bit: bitsandbytes 8-bit AdamW; adamw: torch AdamW in fp32 (default: %(default)s)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="frozen weights and autocast dtype; LoRA weights stay fp32 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in backward " + preset_help(presets, "gradient_checkpointing"))
    p.add_argument("--output-dir", help=f"where the LoRA, checkpoint and logs go (default: runs/{objective}-SPACE-MODEL"
                   + (", with -FILTER unless none)" if "filter" in next(iter(presets.values())) else ")"))
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, data order, t, noise and sampling, "
                   "0 to 2^32 - 1 (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=save_every,
                   help="checkpoint every N steps, and at the end (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=10,
                   help="log averaged metrics every N steps (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt; flags not given "
                   "take the checkpoint's values, and only "
                   + ", ".join("--" + k.replace("_", "-") for k in may_change) + " may change")
    p.add_argument("--report-to", choices=["none", *REPORTERS], default="none",
                   help="also send the logged metrics and validation grids there, from rank 0 (default: %(default)s)")
    p.add_argument("--wandb-project", help="W&B project (default: WANDB_PROJECT, else ncp)")
    p.add_argument("--wandb-entity", help="W&B entity (default: WANDB_ENTITY, else your default entity)")
    p.add_argument("--run-name", help="the run's name in W&B (default: WANDB_NAME, else the output folder's name)")
    p.add_argument("--validation-prompts", metavar="FILE", help="rank 0 samples a grid of these prompts, one image "
                   "each with fixed seeds, into OUTPUT_DIR/samples/step_NNNNN.png, at step 0 and every "
                   "--validation-every steps")
    p.add_argument("--validation-every", type=int, default=100,
                   help="steps between validation grids (default: %(default)s)")
    p.add_argument("--dist-timeout", type=float, default=60.0, help="minutes a collective waits for a slow rank "
                   "(default: %(default)s; NCCL's own is 10)")


def pair_args(doc, objective, own_flags, may_change, argv=None):
    """A pair trainer's command line: the model, space and data flags, the objective's own (own_flags(p)), then
    every run's. may_change: the objective's flags that a --resume may change."""
    p = parser(doc)
    pair_flags(p, PAPER_PRESETS)
    own_flags(p)
    run_flags(p, PAPER_PRESETS, objective, MAY_CHANGE + may_change)
    return parse(p, argv)


def parse(p, argv=None):
    """p's arguments, with args.given: the flags the command line itself names (a resume keeps the others)."""
    args = p.parse_args(argv)
    for action in p._actions:  # parse again without defaults: what the command line itself says
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))
    return args


def fill_defaults(args, presets, kind, objective):
    """Fill the unset arguments from the model's preset, the encoder depth, precision, workers and output folder."""
    for key, value in presets["tiny" if args.model.startswith("tiny") else kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.encoder_depth = args.encoder_depth or encoder.DEPTHS[kind]
    args.precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    if getattr(args, "num_workers", 0) is None:  # workers beside the main process, without taking its cores
        args.num_workers = max(0, min(4, cores_per_rank() - 1))
    model = os.path.basename(args.model.rstrip("/"))
    filters = [args.filter] if getattr(args, "filter", "none") != "none" else []
    args.output_dir = args.output_dir or os.path.join("runs", "-".join([objective, args.space, model] + filters))
    args.objective = objective
    return args


MAX_BETA = 1e20  # with |margin| < 1e18 (errors are means of squares of bounded features) beta x margin < 3.4e38
MAX_DIST_TIMEOUT = 525600  # minutes; a larger timedelta overflows the process group's millisecond count


# Open files a run may need at once: a tiny run with 3 loader workers peaked at 48 descriptors (each tensor a worker
# hands over is one while in flight; then model files, sockets, logs); 256 leaves five times that.
MIN_OPEN_FILES = 256


def check_open_files():
    """Raise this process's open-file limit (ulimit -n) to MIN_OPEN_FILES if it is lower and the hard limit allows;
    ValueError if it does not (a low limit failed mid-run, in a loader worker, or hung it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        if hard != resource.RLIM_INFINITY and hard < MIN_OPEN_FILES:
            raise ValueError(f"the open-file limit (ulimit -n) is {hard}; a run needs at least {MIN_OPEN_FILES}: "
                             f"raise it (ulimit -n {MIN_OPEN_FILES * 4}) and start again")
        resource.setrlimit(resource.RLIMIT_NOFILE, (MIN_OPEN_FILES, hard))


def check_flags(args, kind):
    """ValueError for a flag out of its range, before any model is loaded; and the open-file limit."""
    check_open_files()
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed {args.seed} must be between 0 and 2^32 - 1")
    beta = getattr(args, "beta", 1)
    checks = [("lr", args.lr, 0 < args.lr <= 1, "in (0, 1] (Adam moves each weight by about lr a step; beyond 1 "
               "the LoRA overflows or its outputs do)"),
              ("lora-rank", args.lora_rank, args.lora_rank >= 1, "at least 1"),
              ("save-every", args.save_every, args.save_every >= 1, "at least 1"),
              ("log-every", args.log_every, args.log_every >= 1, "at least 1"),
              ("validation-every", args.validation_every, args.validation_every >= 1, "at least 1"),
              ("resolution", args.resolution, args.resolution >= 8 and args.resolution % 8 == 0,
               "a positive multiple of 8 (the VAE's factor)"),
              ("dist-timeout", args.dist_timeout, 0 < args.dist_timeout <= MAX_DIST_TIMEOUT,
               f"positive and at most {MAX_DIST_TIMEOUT} minutes (a year)"),
              ("beta", beta, 0 < beta <= MAX_BETA, f"positive (0 learns nothing, a negative beta prefers the loser) "
               f"and at most {MAX_BETA:g} (beta x margin must stay finite in fp32)")]
    if kind == "flux2":
        checks.append(("resolution", args.resolution, args.resolution % 16 == 0,
                       "a multiple of 16 for FLUX.2 (its VAE's factor 8 times its 2 x 2 latent patches)"))
    if hasattr(args, "num_workers"):
        checks.append(("num-workers", args.num_workers, args.num_workers >= 0, "0 or more"))
    if hasattr(args, "step_back"):
        unet = not sample.FAMILIES[kind].flow
        checks += [("step-back", args.step_back, args.step_back == 1 or not unet and 1 < args.step_back < 1000,
                    "1 (a DDPM model's step back is one step)" if unet else
                    "between 1 and 999 (steps on the scheduler's grid of 1000)"),
                   ("encoder-depth", args.encoder_depth, args.encoder_depth in ("down", "mid") if unet else
                    args.encoder_depth == "third" or args.encoder_depth.isdigit() and int(args.encoder_depth) >= 1,
                    "down or mid for a U-Net" if unet else "third or a number of joint blocks")]
    for flag, value, ok, what in checks:
        if not ok:
            raise ValueError(f"--{flag} {value} must be {what}")
    for flag in ("output_dir", "cache_latents", "image_store"):
        if getattr(args, flag, None):
            check_output(getattr(args, flag), "--" + flag.replace("_", "-"))


def resumed_model(args):
    """args.model, or on --resume without --model the checkpoint's own model: a run's flags are checked against
    the model it trains (an SD3 run's --step-back 3 is refused against the default SDXL's U-Net)."""
    path = os.path.join(args.output_dir or "", "checkpoint.pt")
    if args.resume and "model" not in args.given and args.output_dir and os.path.isfile(path):
        saved = read_checkpoint(path, keep=True)
        flags = saved.get("args") if isinstance(saved, dict) else None
        model = flags.get("model") if isinstance(flags, dict) else None
        if isinstance(model, str):
            args.model = model
    return args.model


_kept = {}  # (path, size, mtime) -> the checkpoint resumed_model read, until resume_point takes it


def read_checkpoint(path, keep=False):
    """sample.load_data of a checkpoint, read from disk once for resumed_model (keep) and resume_point."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    ckpt = _kept.pop(key) if key in _kept else sample.load_data(path, "a checkpoint")
    _kept.clear()
    if keep:
        _kept[key] = ckpt
    return ckpt


def resume_point(args, script, may_change):
    """The checkpoint to resume from, or None. On --resume the flags not given take its values, and a flag given
    anew that is not in may_change is refused. args.changed_on_resume lists what changed."""
    path = os.path.join(args.output_dir, "checkpoint.pt")
    if not os.path.exists(path):
        if args.resume:
            raise ValueError(f"--resume: nothing to resume, there is no {path}")
        return None
    ckpt = load_checkpoint(path, script)
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
            (changed if key in may_change else refused).append(change)
    if refused:
        raise ValueError(f"--resume cannot change {'; '.join(refused)}: the checkpoint's LoRA, optimizer state and "
                         f"data position belong to its own values (only {', '.join(may_change)} may change)")
    if args.max_steps is not None and args.max_steps < ckpt["step"]:
        raise ValueError(f"--max-steps {args.max_steps}: the checkpoint is already at step {ckpt['step']}")
    args.changed_on_resume = changed
    return ckpt


def check_batch(args, world_size, fit=True):
    """Fail fast on batch sizes that do not divide over the ranks. With fit, a micro-batch size that was not given
    (the preset's) is lowered until it does: the presets run on 1, 2, 4 or 8 processes as they are."""
    if fit and "micro_batch_size" not in args.given and args.global_batch_size > 0 and \
            args.global_batch_size % world_size == 0:
        per_rank = args.global_batch_size // world_size
        args.micro_batch_size = max(d for d in range(1, min(args.micro_batch_size, per_rank) + 1) if per_rank % d == 0)
    per_step = args.micro_batch_size * world_size
    if min(args.global_batch_size, args.micro_batch_size) <= 0 or args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be a positive multiple of "
                         f"--micro-batch-size x world size = {args.micro_batch_size} x {world_size} = {per_step}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError(f"--max-steps {args.max_steps} must be positive")


def run_args(args):
    """The run's settings as a checkpoint stores them (without what this command line alone says)."""
    return {k: v for k, v in vars(args).items() if k not in ("given", "changed_on_resume")}


# -----------------------------------------------------------------------------
# The run folder: the LoRA file and the checkpoint, saved so that a kill at any moment leaves a consistent pair.


def check_output(path, flag, folder=True):
    """ValueError unless `path` can be written as a folder (or, folder=False, a file in an existing folder): checked
    before any model loads, so that a run never fails at its first save."""
    where = os.path.abspath(path)
    if os.path.exists(where):
        if os.path.isdir(where) != folder:
            raise ValueError(f"{flag} {path} is a {'file' if folder else 'folder'}")
        if not os.access(where if folder else os.path.dirname(where), os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path} is not writable")
        return
    parent = os.path.dirname(where)
    while folder and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        what = "a file" if os.path.exists(parent) else "missing"
        raise ValueError(f"{flag} {path} cannot be made: {parent} is {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be made: {parent} is not writable")


LOCK_FILE = ".lock"  # held (flock) by the process that writes the folder; the kernel releases it when it dies
_held = {}  # the folders this process holds, and their open lock files: held until it exits


def claim_folder(path, flag, made=None):
    """Make `path` if need be and take its exclusive lock (fcntl.flock on PATH/.lock), before anything is written
    into it: a second run, or a second --resume of a run still alive, into the same folder is refused in one line
    that names the holder. The kernel releases the lock when the holder dies, however it dies. A folder this call
    made is appended to `made`, so that a run that fails removes only what it created itself."""
    import fcntl
    import socket

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        created = False
    if os.path.realpath(path) in _held:  # this process holds it already (a second main() in one process)
        return
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(f"{flag} {path} is in use by {holder}: wait for it to end, or choose another {flag}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _held[os.path.realpath(path)] = fd
    if created and made is not None:
        made.append(path)


SAVE_PREFIX = ".ncp-save-"  # a save's temporary folder inside the run directory (a name no user's folder has)


class RunError(ValueError):
    """A run that cannot go on for a reason its user can act on: one line, exit 1 (run_main)."""


class NonFiniteLoRA(RunError):
    """The LoRA holds NaN or inf (a learning rate large enough to overflow it): it is never saved."""


class SaveError(RunError):
    """A save that could not be written (a full disk, a quota): the previous save is kept whole."""


def save_run(out_dir, unet, state=None):
    """Write the LoRA (diffusers' format) and the checkpoint `state` into a temporary folder, then rename each into
    OUT_DIR, the checkpoint last: a save killed between the two renames leaves the LoRA one save ahead, and the next
    --resume rewrites it from the checkpoint (start_run). state None: the LoRA only. The LoRA file gets the mode
    every other file has (0666 less the umask; safetensors writes 0600). NonFiniteLoRA if it is not finite;
    SaveError, the previous save untouched, if the disk refuses the writes."""
    bad = [n for n, p in unet.named_parameters() if "lora_" in n and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLoRA(f"the LoRA holds NaN or inf ({len(bad)} tensors, first {bad[0]}): not saved; a lower "
                            "--lr keeps it finite")
    from safetensors import SafetensorError

    try:
        _save(out_dir, unet, state)
    except (OSError, RuntimeError, SafetensorError) as e:  # ENOSPC, EDQUOT; torch.save's writer says "unexpected
        # pos" on a full disk, safetensors' "I/O error: No space left on device"
        written = ("unexpected pos", "PytorchStreamWriter", "I/O error")
        if not isinstance(e, OSError) and not any(s in str(e) for s in written):
            raise  # not a write that failed
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e).strip().splitlines()[-1]
        raise SaveError(f"could not save in {out_dir} ({reason}): the previous save there is kept whole; free some "
                        "space (or raise the quota) and --resume") from None


def _save(out_dir, unet, state):
    import tempfile

    with tempfile.TemporaryDirectory(prefix=SAVE_PREFIX, dir=out_dir) as tmp:
        sample.save_lora(unet, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(tmp, sample.LORA_FILE), 0o666 & ~umask)
        if state is not None:
            torch.save(state, os.path.join(tmp, "checkpoint.pt"))
        os.replace(os.path.join(tmp, sample.LORA_FILE), os.path.join(out_dir, sample.LORA_FILE))
        if state is not None:
            os.replace(os.path.join(tmp, "checkpoint.pt"), os.path.join(out_dir, "checkpoint.pt"))


def write_together(files):
    """Write {path: text or bytes} all or none: each file goes to PATH.tmp first, and only when all are written are
    they renamed into place (a reader never sees half a file); a failure (a full disk) removes the temporary files
    and raises, leaving what was there."""
    try:
        for path, content in files.items():
            with open(path + ".tmp", "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
    except OSError:
        for path in files:
            if os.path.isfile(path + ".tmp"):
                os.remove(path + ".tmp")
        raise
    for path in files:
        os.replace(path + ".tmp", path)


def write_config(out_dir, args):
    """OUTPUT_DIR/config.json: the run's settings, readable without torch (a resume rewrites it with the values it
    runs with)."""
    write_together({os.path.join(out_dir, "config.json"): json.dumps(run_args(args), indent=1, sort_keys=True,
                                                                     default=str)})


def start_run(out_dir, step):
    """Rank 0, as a run starts in OUT_DIR at `step`: the temporary folders of a save that was killed are removed,
    and metrics.jsonl loses the lines logged after the checkpoint (a resume logs those steps again), and a last line
    torn by a kill or a full disk. Returns the number of torn lines dropped (0 or 1)."""
    for name in os.listdir(out_dir):
        if name.startswith(SAVE_PREFIX):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    path, torn = os.path.join(out_dir, "metrics.jsonl"), 0
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        if lines:  # a last line cut short by a kill or a full disk: dropped (its step is logged again)
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                lines, torn = lines[:-1], 1
        lines = [line.rstrip("\n") + "\n" for line in lines if json.loads(line).get("step", 0) <= step]
        write_together({path: "".join(lines)})
    return torn


def load_checkpoint(path, script):
    """A run's checkpoint.pt, read as data only (torch.load with weights_only=True: tensors, numbers, strings,
    lists, dicts), so that nothing in a run directory can run code. A file that is not that, or that another
    script wrote (its optimizer state would go on under another loss), is refused in one line."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"step", "args", "lora"} <= ckpt.keys():
        raise ValueError(f"{path} is not a checkpoint of this project's training scripts")
    if not (type(ckpt["step"]) is int and ckpt["step"] >= 0 and type(ckpt.get("data_position", 0)) is int
            and isinstance(ckpt["args"], dict)
            and isinstance(ckpt["lora"], dict) and all(torch.is_tensor(v) for v in ckpt["lora"].values())):
        raise ValueError(f"{path} is damaged: its step, flags or LoRA are not what a checkpoint holds")
    written = ckpt.get("script", "spo.py" if "iteration" in ckpt else script)
    if written != script:
        raise ValueError(f"{path} was written by {written}, not {script}: resume it with {written}, or choose "
                         "another --output-dir")
    return ckpt


def checkpoint_state(script, lora, optimizer, lr_schedule, scaler, step, totals, args, **extra):
    """Everything a resume needs: LoRA, optimizer, schedule, scaler, step, totals and args, and the trainer's own
    `extra` (its data position, RNG state, ...)."""
    return {"script": script, "lora": {n: p.detach().cpu() for n, p in lora.items()},
            "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
            "scaler": scaler.state_dict(), "step": step, **extra, "totals": totals, "args": run_args(args)}


def set_lora(lora, values):
    with torch.no_grad():
        for name, p in lora.items():
            p.copy_(values[name])


def restore(ckpt, lora, optimizer, lr_schedule, scaler, lr):
    """Load a checkpoint's LoRA, optimizer, schedule, scaler and, where it holds one, RNG state; the schedule then
    runs at this command's lr. Returns (step, totals). A checkpoint whose parts do not fit this run (edited, or
    another model's LoRA) is a RunError: one line."""
    shapes = {n: tuple(p.shape) for n, p in lora.items()}
    if {n: tuple(v.shape) for n, v in ckpt["lora"].items()} != shapes:
        raise RunError("checkpoint.pt's LoRA does not fit this run's model (its names or shapes differ): it is "
                       "damaged or another model's")
    try:
        set_lora(lora, ckpt["lora"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for p, state in optimizer.state.items():  # Adam's moments are the LoRA's shapes, or its step would fail
            if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for v in state.values()):
                raise ValueError("the optimizer's moments are not the LoRA's shapes")
        lr_schedule.load_state_dict(ckpt["lr_schedule"])
        lr_schedule.base_lrs = [lr]  # this command's lr, which may have changed on resume
        optimizer.param_groups[0]["lr"] = lr * lr_schedule.lr_lambdas[0](lr_schedule.last_epoch)
        scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["cpu"])
            if torch.cuda.is_available() and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        return ckpt["step"], dict(ckpt["totals"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise RunError(f"checkpoint.pt is damaged: its optimizer, schedule or random state cannot be restored "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


# -----------------------------------------------------------------------------
# The optimizer and its step.


def make_optimizer(args, params, device, weight_decay=1e-2):
    """AdamW (8-bit or not) on the LoRA, a linear warmup to a constant lr, and fp16's gradient scaler."""
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    return optimizer, lr_schedule, scaler


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


# -----------------------------------------------------------------------------
# Signals and the scripts' entry wrapper.


def stop_on_signals(stop):
    """The run's SIGTERM / SIGINT handler (preemption, Ctrl-C): the first signal is recorded in `stop`, and the
    training loop stops at its next micro-batch and saves; another one, 2 s or more later (a loop that did not act
    on the first, a second Ctrl-C), ends the process at once, its DataLoader workers too. Within 2 s it is the same
    stop delivered twice, as Slurm (to every process of the step) and torchrun (forwarding it) both do."""

    def handler(signum, frame):
        if stop and time.time() - stop[0][1] >= 2:
            _release(signum)
        stop.append((signum, time.time()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def _release(signum=None):
    """Default signal handlers again, every DataLoader worker killed; with a signal number: die of it."""
    import multiprocessing

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):  # SIGCHLD: torch's loader reports a killed worker
        signal.signal(s, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()  # SIGKILL: the workers ignore SIGTERM (data.ignore_stop_signals)
    if signum is not None:
        os.kill(os.getpid(), signum)


def run_main(main, args):
    """main(args), released on any way out by an exception (an error in the loop, CUDA out of memory, a data error,
    the run's own sys.exit): the workers ignore SIGTERM, and multiprocessing's exit hook, which stops them by
    SIGTERM and then waits, would wait forever. Under torchrun the other ranks then fail their next collective, or
    torchrun stops them."""
    try:
        return main(args)
    except data.DataError as e:  # bad data met in the loop (read in a DataLoader worker, whose traceback torch adds)
        _release()
        sys.exit(f"error: {str(e).strip().splitlines()[-1].removeprefix('data.DataError: ')}")
    except RunError as e:  # a LoRA that overflowed, a save that could not be written
        _release()
        sys.exit(f"error: {e}")
    except BaseException:
        _release()
        raise


# -----------------------------------------------------------------------------
# Seeing the run: the console and log.txt, metrics.jsonl, TensorBoard or W&B, validation grids.


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


CONSOLE_FIRST = ["step", "loss", "accuracy", "margin", "beta_margin_p50", "saturated", "grad_norm", "lr", "pairs_per_s",
                 "peak_mem_gib"]
CONSOLE_HIDDEN = {"e_w", "e_l", "ref_e_w", "ref_e_l", "beta_margin_p10", "beta_margin_p90", "step_time",
                  "winner_error_ratio"}
# A DPO run's winner error over the reference's. On the U-Net toy, latent DPO runs that learned (betas 2.5 to 250,
# 100 steps) ended at 1.09-1.17: the winner's error rises a little as the loser's rises more. Twice the reference's
# is far past that: the collapse users report for Diffusion-DPO on flow models, which the falling loss hides.
WINNER_ERROR_WARN = 2.0


def winner_warning(ratio, step):
    """One line when the policy's winner error passes WINNER_ERROR_WARN times the reference's, else None."""
    if ratio > WINNER_ERROR_WARN:
        return (f"warning: at step {step} the policy's error on the preferred images is {ratio:.2f}x the reference's "
                f"(winner_error_ratio in metrics.jsonl): the loss can fall while the model collapses; a lower --lr "
                "or --beta, or an earlier checkpoint, is the usual way out")
    return None


COUNTERS = {"skipped_pairs", "converted_images", "nonfinite_steps"}  # on the console only when not zero


def log_line(record):
    """The console's view of a metrics.jsonl record: the quantities that matter each window, first in CONSOLE_FIRST's
    order; the errors and percentiles stay in metrics.jsonl, the counters show only when they are not zero."""
    keys = [k for k in CONSOLE_FIRST if k in record] + [k for k in record if k not in CONSOLE_FIRST]
    keys = [k for k in keys if k not in CONSOLE_HIDDEN and not (k in COUNTERS and not record[k])]
    return " | ".join(f"{k} {record[k]:.4g}" if isinstance(record[k], float) else f"{k} {record[k]}" for k in keys)


def write_record(record, path, report, bar, print0):
    """Rank 0's outputs of one log line: metrics.jsonl, the reporter, the progress bar, the console and log.txt."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    report.scalars(record, record["step"])
    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "accuracy") if k in record})
    print0(log_line(record))


def reduce_window(window, steps, ddp, world_size, device, data_counts=None):
    """The logged window's metrics, averaged over its steps and the ranks, and its data counts summed over the ranks:
    ({name: float}, [skipped pairs, converted images]). A per-pair metric (a list of (B,) tensors: the loss's
    argument, beta * margin) is gathered over the ranks into its 10th, 50th and 90th percentiles and the share of
    pairs where its size is over 1, where logsigmoid curves: below that the loss is nearly linear in the margin."""
    per_pair = {k: torch.cat(v).to(device).double() for k, v in window.items() if isinstance(v, list)}
    names = sorted(k for k in window if k not in per_pair)
    values = torch.stack([torch.as_tensor(window[k], device=device).float() for k in names]) / steps
    data_counts = (torch.zeros(2, dtype=torch.float64) if data_counts is None else data_counts).to(device)
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


def peak_memory(cuda):
    """GiB: the peak of allocated GPU memory on GPU; the process's peak resident memory on CPU."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def validate(models, prompts, args, step, report, autocast):
    """Rank 0: the validation grid of `step`, saved and reported. Returns (its path, the seconds it took)."""
    start = time.time()
    with autocast:
        grid = sample.validation_grid(models, prompts, args.resolution, args.seed)
    path = os.path.join(args.output_dir, "samples", f"step_{step:05d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    report.image("validation", grid, step, caption=" | ".join(prompts))  # the grid's images, left to right
    return path, time.time() - start


REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to -> the package it needs


def check_reporter(kind):
    """Fail at start, with the command that fixes it, if --report-to names a package that is not installed."""
    import importlib.util

    if kind in REPORTERS and importlib.util.find_spec(REPORTERS[kind]) is None:
        raise ValueError(f"--report-to {kind} needs the {REPORTERS[kind]} package: pip install {REPORTERS[kind]}")


class Reporter:
    """The metrics of metrics.jsonl, and the validation grids, sent to TensorBoard or W&B; "none" sends nothing.
    The run's settings go to both as its config (TensorBoard's hparams). W&B: the project, entity and name are the
    flags', else WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, else "ncp", your default entity and the output folder's
    name; the run's id is kept in OUTPUT_DIR/wandb_id, so a --resume (a requeued job) continues the same W&B run."""

    def __init__(self, kind, output_dir, config, project=None, entity=None, name=None):
        self.kind, self.writer = kind, None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            shown = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
            for summary in hparams(shown, {}):  # the HPARAMS tab, in the run's own event file
                self.writer.file_writer.add_summary(summary)
        elif kind == "wandb":
            import wandb

            id_file = os.path.join(output_dir, "wandb_id")
            if os.path.exists(id_file):
                run_id = open(id_file).read().strip()
            else:
                run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
                with open(id_file, "w") as f:
                    f.write(run_id + "\n")
            self.writer = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "ncp",
                                     entity=entity or os.environ.get("WANDB_ENTITY"), dir=output_dir, config=config,
                                     name=name or os.environ.get("WANDB_NAME") or os.path.basename(
                                         os.path.normpath(output_dir)), id=run_id, resume="allow")

    def scalars(self, record, step):
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        elif self.kind == "wandb":
            self.writer.log(values, step=step)

    def image(self, name, image, step, caption=""):
        if self.kind == "tensorboard":
            import numpy as np

            self.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
            if caption:
                self.writer.add_text(f"{name}/prompts", caption, step)
        elif self.kind == "wandb":
            import wandb

            self.writer.log({name: wandb.Image(image, caption=caption or None)}, step=step)

    def close(self):
        if self.writer is not None:
            (self.writer.close if self.kind == "tensorboard" else self.writer.finish)()


def reporter(args, master):
    """The run's Reporter: rank 0 sends to --report-to, with the run's settings and its W&B names; others nothing."""
    return Reporter(args.report_to if master else "none", args.output_dir, run_args(args), args.wandb_project,
                    args.wandb_entity, args.run_name)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -----------------------------------------------------------------------------
# A run of a pair trainer (DPO, CPO, SFT), around the trainer's own loop:
#
#     run = Run(args, "dpo", may_change=["beta"])
#     while run.step < args.max_steps and not run.stopping:
#         for batch, generator, forward in run.micro_batches():
#             ... with forward: the errors, the loss, run.backward(loss, metrics)
#         run.optimizer_step()
#     run.finish()


class Run:
    """Checks, data, models (an fp32 LoRA on the frozen U-Net, DDP), optimizer and resume on construction; then the
    accumulation of micro-batches, the optimizer step, logging, checkpoints, validation and signals.

    Attributes a trainer uses: args, models, unet (the U-Net with its LoRA), policy (the same U-Net as the forward
    should call it: through DDP under torchrun), step, stopping, print0."""

    def __init__(self, args, objective, may_change, winners_only=False):
        """objective: its name (the script is ncp_OBJECTIVE.py); may_change: its flags a --resume may change;
        winners_only: the loader reads the winners alone (SFT)."""
        self.objective, self.script = objective, f"ncp_{objective}.py"
        presets, may_change = PAPER_PRESETS, MAY_CHANGE + may_change
        self.ddp, self.rank, local_rank, self.world_size, self.device = setup_distributed(args.dist_timeout)
        cuda, self.master = self.device.type == "cuda", self.rank == 0
        # Check, then load the data and the models (local rank 0 first: one download per node).
        args, ckpt, pairs, counts, dataset, validation, dtype, models = load_together(
            lambda made: self._load(args, presets, may_change, winners_only, made), self.ddp, local_rank, self.master)
        self.args, self.models, self.validation, self.cuda = args, models, validation, cuda
        self.accum = args.global_batch_size // (args.micro_batch_size * self.world_size)
        if not cuda and "OMP_NUM_THREADS" not in os.environ:  # compute threads on the cores the workers leave free:
            torch.set_num_threads(max(1, cores_per_rank() - args.num_workers))  # on a busy machine, spinning ones crawl
        os.makedirs(args.output_dir, exist_ok=True)
        # Rank 0 repairs what a kill left: a save's temporary folder, lines logged after the checkpoint, a torn line.
        torn = start_run(args.output_dir, ckpt["step"] if ckpt is not None else 0) if self.master else 0
        print0 = self.print0 = logger(os.path.join(args.output_dir, "log.txt") if self.master else None)
        if self.master:
            write_config(args.output_dir, args)
        if torn:
            print0("metrics.jsonl: its last line was cut short (a kill or a full disk while it was written): dropped")
        print0(f"data: {json.dumps(counts)}")
        if (self.master and not (args.cache_latents or args.image_store)
                and (group := data.largest_row_group(pairs)) > 2**26):
            print0(f"data: each item reads a parquet row group of up to {group / 2**20:.0f} MB; "
                   "--image-store DIR or --cache-latents DIR reads each once")
        print0(f"{args.objective} in {args.space} space | {args.model} | world {self.world_size} x micro "
               f"{args.micro_batch_size} x accum {self.accum} = {args.global_batch_size} pairs/step | {args.precision} "
               f"| {args.max_steps} steps")
        if ckpt is not None and args.changed_on_resume:
            print0(f"changed on resume: {'; '.join(args.changed_on_resume)}")
        self.report = reporter(args, self.master)

        # Models: frozen components in half precision, an fp32 LoRA on the U-Net, DDP over the U-Net.
        self.unet = models.unet
        torch.manual_seed(args.seed)  # the same LoRA init on every rank
        self.lora = sample.add_lora(self.unet, args.lora_rank)  # {name: fp32 parameter}
        if args.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.policy = DDP(self.unet, device_ids=[local_rank] if cuda else None) if self.ddp else self.unet
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

        # Optimizer, schedule, resume.
        self.optimizer, self.lr_schedule, self.scaler = make_optimizer(args, list(self.lora.values()), self.device)
        self.step, self.totals = 0, {"skipped_pairs": 0, "converted_images": 0, "nonfinite_steps": 0}
        if ckpt is not None:
            self.step, self.totals = restore(ckpt, self.lora, self.optimizer, self.lr_schedule, self.scaler, args.lr)
            print0(f"resumed from {args.output_dir}/checkpoint.pt at step {self.step} (data position "
                   f"{ckpt['data_position']})")
            if self.master:  # the LoRA file is the checkpoint's again (a save killed between its renames left it ahead)
                save_run(args.output_dir, self.unet)
        ranks = dict(rank=self.rank, world_size=self.world_size, barrier=dist.barrier if self.ddp else None, log=print0)
        if args.cache_latents:  # after this, the VAE never runs again
            dataset = data.cached_dataset(dataset, args.cache_latents, **ranks, batch_size=args.micro_batch_size,
                                          num_workers=args.num_workers,
                                          **sample.latent_encoder(models.vae, args.resolution, args.micro_batch_size))
        elif args.image_store:  # each item reads its pair's bytes, not its row group
            dataset = data.stored_dataset(dataset, args.image_store, **ranks)

        # Data: an endless loader of this rank's micro-batches, starting where the run left off.
        self.loader = iter(data.make_loader(dataset, args.micro_batch_size, self.rank, self.world_size, args.seed,
                                            start=self.step * args.global_batch_size, num_workers=args.num_workers))
        self.stop = []  # SIGTERM / SIGINT (preemption, Ctrl-C): stop at the next micro-batch, save the last step, exit
        stop_on_signals(self.stop)
        self.window, self.window_steps, self.window_start = {}, 0, time.time()  # metrics summed since the last log
        self.data_counts = torch.zeros(2, dtype=torch.float64)  # this rank's skipped pairs and converted images
        self.stopping = 0  # the signal that stopped the run (0: none)
        self.winner_warned = False  # winner_warning is said once a process
        if self.master and validation and ckpt is None:
            self._validate()
        self.bar = tqdm(total=args.max_steps, initial=self.step, disable=not self.master,
                        desc=f"{args.space}-{args.objective}", dynamic_ncols=True)

    def _load(self, args, presets, may_change, winners_only, made):
        """Everything that can fail on a user's input, before anything is written (load_together runs it)."""
        _, kind = sample.resolve_model(resumed_model(args))
        args = fill_defaults(args, presets, kind, self.objective)
        check_flags(args, kind)
        if self.master:  # one run per folder, before anything is written into it
            claim_folder(args.output_dir, "--output-dir", made)
        ckpt = resume_point(args, self.script, may_change)
        check_batch(args, self.world_size, fit=ckpt is None)
        source = args.data
        if source == "synthetic":
            source = data.write_synthetic(os.path.join(args.output_dir, "synthetic-data"))
        pairs, counts = data.preference_pairs(source, args.split, args.filter)
        if not counts["pairs"]:
            raise data.DataError(f"no preference pairs to train on in {args.data}: every pair was dropped or filtered "
                                 f"out ({', '.join(f'{k} {v}' for k, v in counts.items())})")
        dataset = data.PreferenceDataset(pairs, args.resolution, train=True, seed=args.seed, winners_only=winners_only)
        if self.master:  # one item read now: data none of which decodes (all images null) fails here, in one line
            dataset[0]  # (a parquet row group, up to hundreds of MB: once, not once per rank)
        validation = sample.read_prompts(args.validation_prompts) if args.validation_prompts else []
        check_reporter(args.report_to)
        dtype = DTYPES[args.precision]
        models = sample.load_models(args.model, dtype, self.device, t5=args.t5)
        if sample.FAMILIES[kind].flow:
            encoder.blocks_of(models.unet, args.encoder_depth)  # within the transformer's depth, or one line
        return args, ckpt, pairs, counts, dataset, validation, dtype, models

    def micro_batches(self):
        """This step's micro-batches: (batch, generator, forward) each. batch: B pairs, s images each (2: the winner,
        then the loser; 1 for SFT), "pixels" (B, s, 3, R, R) in [-1, 1] or "latents" (B, s, C, R/8, R/8) from the
        cache, "caption" (B strings), SDXL's "original_sizes" and "crops_top_left" (B, s, 2), the data counts
        "skipped" and "converted" (B,). generator: the micro-batch's own seed, the same on any number of ranks.
        forward: the context of its forward and backward (autocast; DDP syncs gradients on the last micro-batch).
        A stop signal ends the step early, on every rank at the same micro-batch (self.stopping)."""
        self.step_metrics, self.step_counts = {}, torch.zeros(2, dtype=torch.float64)
        for micro in range(self.accum):
            self.micro, self.stopping = micro, stop_signal(self.stop, self.ddp, self.device)
            if self.stopping:
                return
            batch = next(self.loader)
            k = micro * self.world_size + self.rank  # the global micro-batch
            generator = torch.Generator(self.device).manual_seed(step_seed(self.args.seed, self.step, k))
            yield batch, generator, self._forward(micro == self.accum - 1 or not self.ddp)
            self.step_counts += torch.tensor([batch["skipped"].sum(), batch["converted"].sum()], dtype=torch.float64)

    @contextmanager
    def _forward(self, sync):
        with self.autocast, (nullcontext() if sync else self.policy.no_sync()):
            yield

    def backward(self, loss, metrics):
        """The micro-batch's share of the step's gradient, and its metrics: a scalar averaged over the micro-batches,
        a per-pair tensor kept whole."""
        self.scaler.scale(loss / self.accum).backward()
        for k, v in metrics.items():
            m = self.step_metrics
            m[k] = m.get(k, []) + [v] if v.dim() else m.get(k, 0.0) + v / self.accum

    def optimizer_step(self):
        """Clip and step (or, after a stop signal, drop the partial step), then log, save and validate on schedule."""
        args, print0 = self.args, self.print0
        if self.stopping:  # drop the partial accumulation: the LoRA and optimizer state of the last step are intact
            self.optimizer.zero_grad(set_to_none=True)
            print0(f"{signal.Signals(self.stopping).name}: stopping at step {self.step}, {self.micro} of {self.accum} "
                   "micro-batches dropped")
        else:
            self.step, grad_norm, self.lr = optimizer_step(self.step, list(self.lora.values()), self.optimizer,
                                                           self.scaler, self.lr_schedule, self.totals)
            for k, v in self.step_metrics.items():
                self.window[k] = self.window[k] + v if k in self.window else v
            self.window["grad_norm"] = self.window.get("grad_norm", 0.0) + grad_norm.detach().float()
            self.data_counts += self.step_counts
            self.window_steps += 1
            self.bar.update(1)
        step = self.step
        save_now = step % args.save_every == 0 or step == args.max_steps or self.stopping
        if self.window_steps and (step % args.log_every == 0 or save_now):  # a checkpoint's totals are the logged ones
            self._log()
        if save_now:
            self.save()
        if self.master and self.validation and not self.stopping and step % args.validation_every == 0:
            self._validate()
        if self.stopping:
            print0(f"checkpoint of step {step} saved {time.time() - self.stop[0][1]:.1f} s after the signal"
                   if self.stop else f"checkpoint of step {step} saved; continue with --resume")

    def _log(self):
        args = self.args
        means, (skipped, converted) = reduce_window(self.window, self.window_steps, self.ddp, self.world_size,
                                                    self.device, self.data_counts)
        self.totals["skipped_pairs"] += skipped
        self.totals["converted_images"] += converted
        elapsed = (time.time() - self.window_start) / self.window_steps
        if means.get("ref_e_w"):  # DPO: the policy's winner error against the reference's (winner_warning)
            means["winner_error_ratio"] = means["e_w"] / means["ref_e_w"]
            warning = None if self.winner_warned else winner_warning(means["winner_error_ratio"], self.step)
            if warning:
                self.winner_warned = True
                self.print0(warning)
        record = {"step": self.step, **means, "lr": self.lr, "step_time": elapsed,
                  "pairs_per_s": args.global_batch_size / elapsed, "peak_mem_gib": peak_memory(self.cuda),
                  **self.totals}
        if self.master:
            write_record(record, os.path.join(args.output_dir, "metrics.jsonl"), self.report, self.bar, self.print0)
        self.window, self.window_steps, self.window_start = {}, 0, time.time()
        self.data_counts = torch.zeros(2, dtype=torch.float64)

    def _validate(self):
        path, seconds = validate(self.models, self.validation, self.args, self.step, self.report, self.autocast)
        self.print0(f"validation grid {path}: {seconds:.1f} s")
        self.window_start += seconds  # not part of the step time

    def save(self):
        if self.master:
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
            state = checkpoint_state(self.script, self.lora, self.optimizer, self.lr_schedule, self.scaler, self.step,
                                     self.totals, self.args, data_position=self.step * self.args.global_batch_size,
                                     rng=rng)
            save_run(self.args.output_dir, self.unet, state)
        if self.ddp:
            dist.barrier()

    def finish(self):
        """Close the bar and the reporter, prove the ranks agree, leave the process group; after a signal, exit
        with 128 + its number."""
        self.bar.close()
        if self.ddp:  # a cheap proof that the ranks stayed in step
            agree = ranks_agree(list(self.lora.values()), self.world_size, self.device)
            self.print0(f"LoRA weights identical on all {self.world_size} ranks: {agree}")
        self.print0(f"done: step {self.step}, LoRA in {self.args.output_dir}/{sample.LORA_FILE}")
        self.report.close()
        if self.ddp:
            dist.destroy_process_group()
        if self.stopping:
            sys.exit(128 + self.stopping)
