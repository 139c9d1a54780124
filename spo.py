"""SPO: step-aware preference optimization, online, with the comparison in latent space or in NCP's feature space.

Liang et al. 2024, "Step-aware Preference Optimization", arXiv 2406.04314; with --space ncp the errors of its loss
are measured in the frozen U-Net encoder's feature space at the step's own noise level, as NCP (Gambashidze et al.
2024, arXiv 2406.17636) does for DPO. Each iteration samples with the current policy and trains on what it found:

1. DDIM, 20 steps, eta 1, guidance 5. The first --branch-from steps are plain sampling; from then on, at every step,
   k candidates x_{t-1} are drawn from the one current x_t (fresh noise each). The next step's single batched U-Net
   call over the k candidates gives both their x0 predictions, for scoring, and the eps to go on from.
2. The step-aware preference model (spm.py) scores each candidate's decoded x0 at its timestep; the best and the
   worst form a pair if softmax([s_best, s_worst]) differs by more than --threshold.
3. Sampling goes on from a candidate drawn at random (not the winner), so the next pair again shares its x_t.
4. The kept transitions (x_t, x_w, x_l, t, prompt) of every rank are gathered, shuffled with the run's seed, and
   trained on once, --global-batch-size transitions per optimizer step (a remainder of fewer is dropped), so every
   rank takes the same number of steps whatever it kept.

The loss (SPO.md section 4), with mu the DDIM (eta = 1) posterior mean of x_{t-1} under guidance and sigma_t its std:

    D_x = lp_theta(x) - lp_ref(x),  lp(x) = -mean (x - mu(x_t))^2 / (2 sigma_t^2)
    L   = -log sigmoid(beta * (log clamp(exp(D_w), 1 - eps, 1 + eps) - log clamp(exp(D_l), 1 - eps, 1 + eps)))

--space ncp replaces each squared distance by d(a, b) = mean (E(a, t', c) - E(b, t', c))^2, E the base U-Net's down
stack (encoder.py) at the candidates' timestep t'. With m = (mu_theta + mu_ref) / 2 and Delta = mu_theta - mu_ref,

    D_x^latent = mean((x - m) * Delta) / sigma_t^2                 exactly lp_theta(x) - lp_ref(x)
    D_x^ncp    = -(d(x, mu_theta) - d(x, mu_ref)) / (2 sigma_t^2)
               = mean((E(x) - E(m)) * J_E(m) Delta) / sigma_t^2 + O(|Delta|^3)

The second form is how half precision computes it (the first in fp32): Delta, the policy's move away from the
reference, is tiny beside x, and a difference of two encoder passes would be rounding noise (encoder.py explains).
J_E(m) Delta is one forward-mode pass, shared by winner and loser; E(x_w), E(x_l) and E(m) need no grad. With E the
identity both lines are the same number: the NCP loss keeps the latent loss's scaling, 1 / sigma_t^2, and only
beta changes with the feature scale (see --beta).

--beta in NCP space is 2, chosen by measurement on the toy model (benchmarks/toy_spo.py): for 480 transitions
sampled with its trained preference model and a policy a little off the base, the median |D^ncp| was 5.0x the
median |D^latent| (1.44e-5 against 2.87e-6; 2.4x to 8.5x across the timesteps). 10 / 5 gives beta * D the spread
the authors' beta 10 gives the latent loss. The two log-ratios correlate only at 0.24 (0.34-0.65 within one
timestep): NCP measures the move differently, not on another scale. eps stays 0.1, since it bounds each side's own
likelihood ratio in either space, and sigma enters as in the latent loss, so that with E the identity the two
losses are one. The ratio depends on the encoder's gain: on another model, measure it (toy_spo.measure_scale).

The reference is the U-Net with its LoRA adapters disabled; one policy and one reference forward (each a guided
pair) serve both images of a transition, as they share x_t.

    python spo.py --model tiny --preference-model tiny                 # a first run on a CPU: synthetic prompts
    torchrun --nproc_per_node=2 spo.py --model tiny --preference-model tiny --space ncp
    torchrun --nproc_per_node=4 spo.py --model sdxl --preference-model PATH/sdxl_step-aware_preference_model.bin
    torchrun --nproc_per_node=4 spo.py --model sd15 --preference-model PATH/sd-v1-5_step-aware_preference_model.bin \
        --prompts spo_prompts.txt --space latent                            # the authors' SPO
    torchrun --nproc_per_node=4 spo.py --model sdxl ... --resume           # continue the run in --output-dir

Resume: a checkpoint holds the iteration, the optimizer steps done in it and, when that is not zero, the LoRA the
iteration sampled with. A resumed run samples that iteration again with that LoRA and the same seeds, so it finds
the same transitions, then takes up the LoRA and optimizer state it had and continues at the next step: the result
is that of a run that never stopped. A signal during sampling stops at the next denoising step.

Outputs in --output-dir: pytorch_lora_weights.safetensors (pipe.load_lora_weights(dir)), checkpoint.pt,
metrics.jsonl (one line per --log-every steps, and one per iteration with the sampling, scoring and training
times) and log.txt.
"""

import json
import math
import os
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
import run
import sample
import spm

OBJECTIVE = "spo"
ETA = 1.0  # DDIM's eta: every step a Gaussian of std sigma_t, so candidates differ and log-probabilities exist


def spo_loss(d_w, d_l, beta, eps):
    """SPO's loss from the log-ratios D = lp_theta - lp_ref of winner and loser, (B,) each; mean over B.

    The clamp of the ratio exp(D) to [1 - eps, 1 + eps] stops the gradient of a side whose ratio has left the band:
    the policy may not move a transition's likelihood more than eps away from the reference's. It is ln 2 at
    policy == reference (D = 0)."""
    log_w = torch.log(torch.exp(d_w).clamp(1 - eps, 1 + eps))
    log_l = torch.log(torch.exp(d_l).clamp(1 - eps, 1 + eps))
    margin = log_w - log_l
    loss = -torch.nn.functional.logsigmoid(beta * margin).mean()
    metrics = {"loss": loss, "accuracy": (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean(),
               "margin": margin.mean(), "ratio_w": log_w.exp().mean(), "ratio_l": log_l.exp().mean(),
               "d_w": d_w.mean(), "d_l": d_l.mean()}
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def ddim_step(scheduler, x_t, t, eps, eta=ETA):
    """DDIMScheduler.step's x_t -> x_{t-1} as (mean, std, x0), per-sample t (B,): x_{t-1} = mean + std * noise.

    scheduler: a DDIMScheduler after set_timesteps (its step size, alphas and final alpha). fp32 results."""
    abar = scheduler.alphas_cumprod.to(device=x_t.device, dtype=torch.float32)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = abar[t].view(-1, 1, 1, 1)
    final = torch.full_like(abar[t], float(scheduler.final_alpha_cumprod))  # past the first timestep
    a_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
    a_prev = a_prev.view(-1, 1, 1, 1)
    x0 = (x_t.float() - (1 - a_t).sqrt() * eps.float()) / a_t.sqrt()
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps.float()
    return mean, std, x0


def softmax_gap(scores):
    """Scores (k, P) of k candidates for P prompts -> (best (P,), worst (P,), gap (P,)): the gap is
    softmax([s_best, s_worst])[0] - softmax(...)[1]."""
    order = scores.argsort(dim=0, descending=True)
    best, worst = order[0], order[-1]
    columns = torch.arange(scores.shape[1], device=scores.device)
    p = torch.stack([scores[best, columns], scores[worst, columns]]).float().softmax(dim=0)
    return best, worst, p[0] - p[1]


def pick_pairs(scores, threshold):
    """(best (P,), worst (P,), keep (P,) bool): keep a pair when its softmax gap exceeds the threshold."""
    best, worst, gap = softmax_gap(scores)
    return best, worst, gap > threshold


# -----------------------------------------------------------------------------
# Settings. Per model, the authors' (their SD1.5 and SDXL configs, scaled to the global batch of 4 GPUs); tiny
# finishes on a CPU.

PRESETS = {
    "sd15": dict(resolution=512, prompts_per_iteration=40, global_batch_size=40, micro_batch_size=10, lr=6e-5,
                 warmup_steps=0, epochs=10, lora_rank=4, candidates=4, inner_steps=0, threshold=0.3,
                 gradient_checkpointing=False),
    "sdxl": dict(resolution=1024, prompts_per_iteration=8, global_batch_size=16, micro_batch_size=2, lr=1e-5,
                 warmup_steps=0, epochs=10, lora_rank=64, candidates=2, inner_steps=3, threshold=0.4,
                 gradient_checkpointing=True),
    "tiny": dict(resolution=32, prompts_per_iteration=4, global_batch_size=8, micro_batch_size=4, lr=1e-3,
                 warmup_steps=0, epochs=2, lora_rank=8, candidates=2, inner_steps=0, threshold=0.0,
                 gradient_checkpointing=False),
}
BETA = {"latent": 10.0, "ncp": 2.0}  # the authors' 10 for latents; ncp: see the module docstring
# On --resume the flags not given take the checkpoint's values; these may be given anew.
RESUME_MAY_CHANGE = ["max_steps", "epochs", "micro_batch_size", "lr", "save_every", "log_every", "report_to",
                     "wandb_project", "wandb_entity", "run_name", "validation_prompts", "validation_every", "dist_timeout", "beta", "eps"]


def parse_args(argv=None):
    p = run.parser(__doc__)
    # model
    p.add_argument("--model", default="sdxl",
                   help="sd15, sdxl, tiny, tiny-sdxl, a diffusers pipeline dir or hub id (default: %(default)s)")
    p.add_argument("--preference-model", default="tiny", help="the step-aware preference model: a .bin of "
                   f"{spm.RELEASED} (with --spm-backbone); identity: the backbone alone, PickScore not told the step; "
                   "tiny: random, for a CPU run (default: %(default)s)")
    p.add_argument("--spm-backbone", help=f"the CLIP the .bin was trained from (default: {spm.PICKSCORE}; tiny for "
                   "--preference-model tiny or a .bin saved from a tiny one)")
    p.add_argument("--encoder-depth", choices=["down", "mid"], help="--space ncp's encoder: the down blocks, or "
                   "through the mid block (default: " + ", ".join(f"{k} {v}" for k, v in encoder.DEPTHS.items()) + ")")
    p.add_argument("--lora-rank", type=int, help="LoRA rank r (alpha = r) " + run.preset_help(PRESETS, "lora_rank"))
    # prompts
    p.add_argument("--prompts", help="the training prompts: a text file (one a line), a .tsv with a Prompt column, "
                   "or a split name of --data (default: --split of --data)")
    p.add_argument("--data", help="a preference source whose captions are the prompts (any format data.py reads; "
                   "a hub id fetches the whole split), or synthetic (default: synthetic for the tiny models, else "
                   f"{data.PICKAPIC})")
    p.add_argument("--split", default="train", help="its split (default: %(default)s)")
    p.add_argument("--resolution", type=int,
                   help="sampling resolution in pixels " + run.preset_help(PRESETS, "resolution"))
    # sampling and the preference pairs
    p.add_argument("--prompts-per-iteration", type=int, help="prompts sampled per iteration over all ranks "
                   + run.preset_help(PRESETS, "prompts_per_iteration"))
    p.add_argument("--candidates", type=int, help="k, candidates per step " + run.preset_help(PRESETS, "candidates"))
    p.add_argument("--threshold", type=float, help="keep a pair when its softmax gap exceeds this "
                   + run.preset_help(PRESETS, "threshold"))
    p.add_argument("--steps", type=int, default=20, help="DDIM sampling steps (default: %(default)s)")
    p.add_argument("--inner-steps", type=int, help="steps each candidate takes on its own before the scoring "
                   + run.preset_help(PRESETS, "inner_steps"))
    p.add_argument("--branch-from", type=int, default=4,
                   help="plain sampling steps before the candidates start (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=5.0,
                   help="classifier-free guidance, in sampling and in the loss (default: %(default)s)")
    # objective
    p.add_argument("--space", choices=["latent", "ncp"], default="ncp",
                   help="latent: SPO's loss; ncp: its distances in the U-Net encoder's space (default: %(default)s)")
    p.add_argument("--beta", type=float, help="beta of the loss (default: latent "
                   f"{BETA['latent']:g}, the authors'; ncp {BETA['ncp']:g}: docs/spo.md says why)")
    p.add_argument("--eps", type=float, default=0.1, help="the ratio clamp [1 - eps, 1 + eps] (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="passes over the prompts " + run.preset_help(PRESETS, "epochs"))
    run.run_flags(p, PRESETS, OBJECTIVE, RESUME_MAY_CHANGE, unit="transitions", optimizer="adamw", save_every=50,
                  max_steps="stop after this many optimizer steps (default: the epochs' end)")
    return run.parse(p, argv)


def fill_defaults(args, kind):
    """Fill the unset arguments: run.py's (the model's preset, ...), then beta by space, the data and the backbone."""
    args = run.fill_defaults(args, PRESETS, kind, OBJECTIVE)
    args.beta = BETA[args.space] if args.beta is None else args.beta
    args.data = args.data or ("synthetic" if args.model.startswith("tiny") else data.PICKAPIC)
    if args.spm_backbone is None:
        args.spm_backbone = "tiny" if args.preference_model == "tiny" else spm.PICKSCORE
    return args


def check_run(args, kind, made):
    """Fail fast, before any model is loaded; take the output folder (appended to `made` if this run makes it).
    Returns the checkpoint to resume from, or None."""
    run.check_flags(args, kind)
    for key, low in (("candidates", 2), ("steps", 2), ("prompts_per_iteration", 1), ("epochs", 1)):
        if getattr(args, key) < low:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)} must be at least {low}")
    if args.inner_steps < 0:
        raise ValueError(f"--inner-steps {args.inner_steps} must not be negative")
    if not 0 <= args.branch_from < args.steps:
        raise ValueError(f"--branch-from {args.branch_from} must be between 0 and --steps - 1 = {args.steps - 1}")
    if args.threshold >= 1:
        raise ValueError(f"--threshold {args.threshold} must be below 1: a softmax gap is, so no pair would be kept")
    if not 0 < args.eps < 1:
        raise ValueError(f"--eps {args.eps} must be between 0 and 1")
    if args.preference_model not in ("tiny", "identity") and not os.path.isfile(args.preference_model):
        raise ValueError(f"--preference-model {args.preference_model}: no such file (download the .bin of "
                         f"{spm.RELEASED}, or pass tiny)")
    if int(os.environ.get("RANK", "0")) == 0:  # one run per folder, before anything is written into it
        run.claim_folder(args.output_dir, "--output-dir", made)
    return run.resume_point(args, "spo.py", RESUME_MAY_CHANGE)


def prompt_seed(seed, iteration, index):
    """The seed of one prompt's sampling in one iteration: the same on any rank, whatever the world size."""
    return ((seed * 1_000_003 + iteration) * 1_000_003 + index) % 2**63


def load_run(args, world_size, device, made):
    """Everything that can fail on a user's input, before anything is written (run.load_together runs it, local rank
    0 first). Returns (args, checkpoint or None, prompts, validation prompts, dtype, models, preference model)."""
    _, kind = sample.resolve_model(run.resumed_model(args))
    if sample.FAMILIES[kind].flow:  # its sampler is a deterministic ODE: there is no step to draw candidates from
        raise ValueError(f"spo.py trains SD1.5 and SDXL only: its candidates are stochastic DDIM steps, and "
                         f"{args.model} is a rectified flow ({kind.upper()}); train it with ncp_dpo.py, ncp_cpo.py "
                         "or ncp_sft.py")
    args = fill_defaults(args, kind)
    ckpt = check_run(args, kind, made)
    run.check_batch(args, world_size, fit=ckpt is None)
    source = args.data
    if source == "synthetic":
        source = data.write_synthetic(os.path.join(args.output_dir, "synthetic-data"))
    prompts = sample.read_prompts(args.prompts or args.split, source)
    validation = sample.read_prompts(args.validation_prompts) if args.validation_prompts else []
    run.check_reporter(args.report_to)
    dtype = run.DTYPES[args.precision]
    preference = spm.load(None if args.preference_model in ("tiny", "identity") else args.preference_model,
                          args.spm_backbone, device=device)  # fp32: its keep rule compares small gaps
    return args, ckpt, prompts, validation, dtype, sample.load_models(args.model, dtype, device), preference


# -----------------------------------------------------------------------------
# Sampling the transitions


def guided_eps(unet, x, t, cond, guidance):
    """Classifier-free guided eps of x (N, C, h, w) at t (int or (N,)): one U-Net call over [uncond; cond].
    cond: the U-Net's keyword arguments for 2N rows, the N unconditional ones first."""
    t = torch.as_tensor(t, device=x.device).expand(len(x))
    uncond, text = unet(torch.cat([x, x]), torch.cat([t, t]), **cond).sample.float().chunk(2)
    return uncond + guidance * (text - uncond)


def cat_cond(a, b):
    """Two cond dicts (the U-Net's keyword arguments) stacked along the batch."""
    return {k: cat_cond(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]]) for k, v in a.items()}


def unconditional(models, resolution):
    """The cond of the unconditional half of guidance, one row: the empty prompt's encoding for SD1.5 (as the
    authors), zeros for SDXL (as SDXL's pipeline, force_zeros_for_empty_prompt, and the authors' SDXL script)."""
    empty = sample.encode_prompt(models, [""], target_size=[resolution] * 2)
    if models.kind == "sdxl":
        added = empty["added_cond_kwargs"]
        empty = {"encoder_hidden_states": torch.zeros_like(empty["encoder_hidden_states"]),
                 "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                       "time_ids": added["time_ids"]}}
    return empty


def text_cond(models, captions, resolution, empty):
    """cond for the guided U-Net call of these captions: the empty prompt's rows first, then the captions'."""
    cond = sample.encode_prompt(models, captions, target_size=[resolution] * 2)
    return cat_cond(sample.repeat_cond(empty, len(captions)), cond), cond


@torch.no_grad()
def sample_transitions(models, unet, preference, ddim, prompts, seeds, args, empty, stopped):
    """Run SPO's sampling for P prompts; returns (kept transitions, {"sample_s", "score_s", "scores"}) or None if
    stopped() said so between two denoising steps.

    From step --branch-from on, k candidates are drawn from the one current x_t. With --inner-steps m (the authors'
    SDXL setting, 3) each candidate then takes m more steps on its own before the candidates are scored, and a kept
    pair holds all m + 1 transitions of winner and loser (only the first pair shares its x_t); with m = 0 (SD1.5)
    they are scored at the very next step. Then sampling goes on from one candidate at random and branches again.
    The last candidates are clean images, scored at t = 0.

    Each prompt draws all its noise and its random continuations from a generator of its own seed, so what it finds
    does not depend on the other prompts of its batch or the rank it ran on. Candidates are stored candidate-major:
    row j * P + p is candidate j of prompt p. Transitions: {"x_t", "x_w", "x_t_l", "x_l" (n, C, h, w): the winner's
    and the loser's x_t and x_{t-1}; "t" (n,); "prompt" (n,) index into `prompts`}, on the CPU."""
    device, n_prompts, k = models.unet.device, len(prompts), args.candidates
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    shape = (models.unet.config.in_channels, args.resolution // 8, args.resolution // 8)
    ddim.set_timesteps(args.steps, device=device)
    if not prompts:  # a rank left without prompts (the end of an epoch): it still takes part in every collective
        for _ in ddim.timesteps:
            if stopped():
                return None
        empty_images = torch.zeros(0, *shape)
        return ({"x_t": empty_images, "x_w": empty_images, "x_t_l": empty_images, "x_l": empty_images,
                 "t": torch.zeros(0, dtype=torch.long), "prompt": torch.zeros(0, dtype=torch.long)},
                {"sample_s": 0.0, "score_s": 0.0, "scores": torch.zeros(0), "gap": 0.0})
    noise = lambda: torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])  # noqa: E731
    both, _ = text_cond(models, prompts, args.resolution, empty)
    last = len(ddim.timesteps) - 1
    x = noise()
    kept, scores_seen, gaps, score_s, start = [], [], [], 0.0, time.time()
    segment, inner_left = [], 0  # the candidates' transitions since they branched: (x_t, x_{t-1}, t, std), k * P rows
    for i, t in enumerate(ddim.timesteps):
        n = len(x) // n_prompts  # 1, or k candidates per prompt
        eps = guided_eps(unet, x, t, sample.repeat_cond(both, n), args.guidance_scale)
        mean, std, x0 = ddim_step(ddim, x, t.expand(len(x)), eps)
        if n > 1 and inner_left == 0 and not (i == last and args.inner_steps):
            # the candidates' x0 at their own timestep t: score, keep a pair, go on from one of them at random
            score_start = time.time()
            scores = score(models, preference, x0, prompts * n, t).view(n, n_prompts)
            score_s += time.time() - score_start
            scores_seen.append(scores.flatten())
            gaps.append(softmax_gap(scores)[2])
            kept.append(keep(segment, scores, args.threshold))
            chosen = torch.stack([torch.randint(n, (), generator=g, device=device) for g in gens])
            rows = chosen * n_prompts + torch.arange(n_prompts, device=device)
            x, mean, std, n = x[rows], mean[rows], std[rows], 1
        branch = n == 1 and i >= args.branch_from
        draws = torch.stack([noise() for _ in range(k if branch or n > 1 else 1)])  # [j, p]: prompt p's j-th draw
        if branch:  # k candidates of x_{t-1} from the one x_t
            x_next = mean.repeat(k, 1, 1, 1) + std.repeat(k, 1, 1, 1) * draws.flatten(0, 1)
            segment, inner_left = [(x.repeat(k, 1, 1, 1), x_next, t, std.repeat(k, 1, 1, 1))], args.inner_steps
        elif n > 1:  # an inner step: each candidate on its own
            x_next = mean + std * draws.flatten(0, 1)
            segment.append((x, x_next, t, std))
            inner_left -= 1
        else:
            x_next = mean + std * draws[0]
        x = x_next
        if stopped():
            return None
    score_start = time.time()
    scores = score(models, preference, x, prompts * k, 0).view(k, n_prompts)
    score_s += time.time() - score_start
    scores_seen.append(scores.flatten())
    gaps.append(softmax_gap(scores)[2])
    kept.append(keep(segment, scores, args.threshold))
    return in_order(kept), {"sample_s": time.time() - start - score_s, "score_s": score_s,
                            "scores": torch.cat(scores_seen).float().cpu(), "gap": torch.cat(gaps).max().item()}


def score(models, preference, latents, prompts, t):
    """The preference model's scores of latents (decoded) for their prompts at timestep t, in fp32."""
    pixels = sample.decode_latents(models.vae, latents)
    with torch.autocast(pixels.device.type, enabled=False):
        return preference.score(pixels.float(), prompts, int(t))


def keep(segment, scores, threshold):
    """The transitions of a segment whose winner and loser (by scores (k, P)) pass the threshold, on the CPU. A step of
    std 0 (the last step when the scheduler's final alpha is 1) is deterministic and has no likelihood: never kept."""
    n_prompts = scores.shape[1]
    best, worst, passed = pick_pairs(scores, threshold)
    columns = torch.arange(n_prompts, device=scores.device)
    out = {key: [] for key in ("x_t", "x_w", "x_t_l", "x_l", "t", "prompt")}
    for x_t, x_prev, t, std in segment:
        rows = passed & (std.view(-1, n_prompts)[0].flatten() > 0)
        x_t, x_prev = x_t.view(-1, n_prompts, *x_t.shape[1:]), x_prev.view(-1, n_prompts, *x_prev.shape[1:])
        for key, value in (("x_t", x_t[best, columns]), ("x_w", x_prev[best, columns]),
                           ("x_t_l", x_t[worst, columns]), ("x_l", x_prev[worst, columns]),
                           ("t", t.expand(n_prompts).long()), ("prompt", columns)):
            out[key].append(value[rows].cpu())
    return {key: torch.cat(v) for key, v in out.items()}


def in_order(parts):
    """Transition dicts joined into one, ordered by prompt, then by step (t falling)."""
    out = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    order = sorted(range(len(out["t"])), key=lambda j: (int(out["prompt"][j]), -int(out["t"][j])))
    return {key: v[order] for key, v in out.items()}


def gather(transitions, ddp, world_size):
    """Every rank's transitions, on every rank, in the order of their prompts (global indices) and steps."""
    if not ddp:
        return transitions
    parts = [None] * world_size
    dist.all_gather_object(parts, transitions)
    return in_order(parts)


# -----------------------------------------------------------------------------
# The log-ratios of the loss


def log_ratios(args, raw_unet, unet, ddim, batch, both, cond, method):
    """(D_w, D_l), (B,) fp32: lp_theta - lp_ref of winner and loser, in latent or NCP space (see the docstring).
    When winner and loser share their x_t (always, unless --inner-steps), one guided policy forward (with grad,
    through DDP) and one guided reference forward serve both."""
    t = batch["t"]
    shared = torch.equal(batch["x_t"], batch["x_t_l"])
    moves = []  # for each distinct x_t: the policy's and the reference's DDIM means
    for x_t in [batch["x_t"]] if shared else [batch["x_t"], batch["x_t_l"]]:
        eps = guided_eps(unet, x_t, t, both, args.guidance_scale)
        with torch.no_grad(), encoder.base_weights(raw_unet):
            ref_eps = guided_eps(raw_unet, x_t, t, both, args.guidance_scale)
        mu, std, _ = ddim_step(ddim, x_t, t, eps)
        moves.append((mu, ddim_step(ddim, x_t, t, ref_eps)[0]))
    var = std.flatten(1)[:, 0] ** 2  # (B,)
    sides = [(batch["x_w"], 0), (batch["x_l"], 0 if shared else 1)]  # each image with the index of its x_t's move
    if args.space == "latent":  # m = (mu + ref_mu) / 2 keeps its grad here: the gradient is that of lp_theta exactly
        return [((x.float() - (mu + ref_mu) / 2) * (mu - ref_mu)).mean(dim=(1, 2, 3)) / var
                for x, (mu, ref_mu) in ((x, moves[j]) for x, j in sides)]
    t_prev = (t - ddim.config.num_train_timesteps // ddim.num_inference_steps).clamp(min=0)
    dtype, depth = next(raw_unet.parameters()).dtype, args.encoder_depth
    def encode(x):  # E(x, t', c) with the base weights, x holding one or more rows per transition
        times = len(x) // len(t)
        return encoder.encode(raw_unet, x.to(dtype).contiguous(), t_prev.repeat(times), sample.repeat_cond(cond, times),
                              depth).float()

    with torch.no_grad():
        e_x = encode(torch.cat([x for x, _ in sides])).chunk(2)  # E(x_w), E(x_l)
    if method == "direct":  # -(d(x, mu) - d(x, ref_mu)) / (2 sigma^2) in fp32, with
        # d(x, mu) - d(x, ref_mu) = mean((e_ref - e_mu) * (2 e_x - e_mu - e_ref)): no cancellation of two large means
        features = []
        for mu, ref_mu in moves:
            with torch.no_grad():
                e_ref = encode(ref_mu)
            features.append((encode(mu), e_ref))
        return [((features[j][0] - features[j][1]) * (2 * e - features[j][0] - features[j][1])).mean(dim=(1, 2, 3))
                / (2 * var) for e, (_, j) in zip(e_x, sides)]
    # half precision: mean((E(x) - E(m)) * J_E(m) Delta) / sigma^2, m a constant for the gradient (as in encoder.py),
    # J_E(m) Delta by encoder.py's own JVP, which passes the tangent at unit scale per sample
    linear = []
    for mu, ref_mu in moves:
        mid = ((mu.detach() + ref_mu) / 2).to(dtype).contiguous()
        with torch.no_grad():
            e_mid = encode(mid)
        linear.append((e_mid, encoder.jvp(raw_unet, mid, t_prev, cond, depth, [mu - ref_mu])[0]))
    return [((e - linear[j][0]) * linear[j][1]).mean(dim=(1, 2, 3)) / var for e, (_, j) in zip(e_x, sides)]


def main(args):
    # -------------------------------------------------------------------------
    # Distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain python runs one process.
    ddp, rank, local_rank, world_size, device = run.setup_distributed(args.dist_timeout)
    cuda, master = device.type == "cuda", rank == 0

    # -------------------------------------------------------------------------
    # Check, then read the prompts and load the models (local rank 0 first: one download per node).
    args, ckpt, prompts, validation, dtype, models, preference = run.load_together(
        lambda made: load_run(args, world_size, device, made), ddp, local_rank, master)
    accum = args.global_batch_size // (args.micro_batch_size * world_size)
    per_epoch = math.ceil(len(prompts) / args.prompts_per_iteration)
    iterations = args.epochs * per_epoch
    os.makedirs(args.output_dir, exist_ok=True)
    if master:  # a killed save's temporary folder removed; lines logged after the checkpoint dropped
        if run.start_run(args.output_dir, ckpt["step"] if ckpt is not None else 0):
            print(f"{args.output_dir}/metrics.jsonl: its last line was cut short (a kill or a full disk): dropped")
        run.write_config(args.output_dir, args)
    print0 = run.logger(os.path.join(args.output_dir, "log.txt") if master else None)
    print0(f"prompts: {len(prompts)}, {per_epoch} iterations of {args.prompts_per_iteration} an epoch, "
           f"{args.epochs} epochs")
    print0(f"{OBJECTIVE} in {args.space} space | {args.model} | preference model {args.preference_model} | "
           f"k {args.candidates}, threshold {args.threshold} | world {world_size} x micro {args.micro_batch_size} x "
           f"accum {accum} = {args.global_batch_size} transitions/step | {args.precision}")
    if ckpt is not None and args.changed_on_resume:
        print0(f"changed on resume: {'; '.join(args.changed_on_resume)}")
    report = run.reporter(args, master)

    # -------------------------------------------------------------------------
    # Models: frozen components in half precision, an fp32 LoRA on the U-Net, DDP over the U-Net.
    from diffusers import DDIMScheduler

    raw_unet = models.unet
    ddim = DDIMScheduler.from_config(models.scheduler.config)
    ddim.set_timesteps(args.steps)
    torch.manual_seed(args.seed)  # the same LoRA init on every rank
    lora = sample.add_lora(raw_unet, args.lora_rank)  # {name: fp32 parameter}
    lora_params = list(lora.values())
    if args.gradient_checkpointing:
        raw_unet.enable_gradient_checkpointing()
    unet = DDP(raw_unet, device_ids=[local_rank] if cuda else None) if ddp else raw_unet
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    ncp_method = encoder.method_for(dtype)  # "jvp" in half precision: see the module docstring
    empty = unconditional(models, args.resolution)

    # -------------------------------------------------------------------------
    # Optimizer, schedule, resume.
    optimizer, lr_schedule, scaler = run.make_optimizer(args, lora_params, device, weight_decay=1e-4)  # the authors'
    step, totals = 0, {"kept_transitions": 0, "dropped_transitions": 0, "nonfinite_steps": 0}
    iteration, iteration_step, iteration_lora = 0, 0, None
    if ckpt is not None:
        step, totals = run.restore(ckpt, lora, optimizer, lr_schedule, scaler, args.lr)
        iteration, iteration_step, iteration_lora = ckpt["iteration"], ckpt["iteration_step"], ckpt["iteration_lora"]
        print0(f"resumed from {args.output_dir}/checkpoint.pt at step {step} (iteration {iteration}, "
               f"{iteration_step} steps into it)")
        if master:  # the LoRA file is the checkpoint's again (a save killed between its renames left it ahead)
            run.save_run(args.output_dir, raw_unet)

    def save():
        if master:
            state = run.checkpoint_state("spo.py", lora, optimizer, lr_schedule, scaler, step, totals, args,
                                         iteration=iteration, iteration_step=iteration_step,
                                         iteration_lora=iteration_lora if iteration_step else None)
            run.save_run(args.output_dir, raw_unet, state)
        if ddp:
            dist.barrier()

    stop = []  # SIGTERM / SIGINT (preemption, Ctrl-C): stop at the next micro-batch or denoising step, save, exit
    run.stop_on_signals(stop)

    # -------------------------------------------------------------------------
    # Training loop: sample an iteration's transitions with the current policy, then train one pass over them.
    window, window_steps, window_start = {}, 0, time.time()  # metrics summed since the last log line
    stopping = 0  # the signal that stopped the run (0: none)
    max_steps = args.max_steps or float("inf")
    if master and validation and ckpt is None:
        path, seconds = run.validate(models, validation, args, step, report, autocast)
        print0(f"validation grid {path}: {seconds:.1f} s")
    bar = tqdm(total=iterations, initial=iteration, disable=not master, desc=f"{args.space}-spo", unit="iteration",
               dynamic_ncols=True)
    while iteration < iterations and step < max_steps and not stopping:
        # This iteration's prompts: a seeded permutation per epoch, prompts_per_iteration of it, dealt over the ranks.
        epoch, position = divmod(iteration, per_epoch)
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        chosen = order[position * args.prompts_per_iteration:(position + 1) * args.prompts_per_iteration].tolist()
        mine = chosen[rank::world_size]
        current = {n: p.detach().clone() for n, p in lora.items()}
        if iteration_step:  # resumed inside this iteration: sample it again with the LoRA it sampled with
            run.set_lora(lora, iteration_lora)
        iteration_lora = {n: p.detach().cpu().clone() for n, p in lora.items()}
        start = time.time()
        unet.eval()
        denoised = [0]

        def stopped():  # once per denoising step: the bar shows the phase, then asks whether to stop
            denoised[0] += 1
            bar.set_postfix_str(f"sampling {len(chosen)} prompts: step {denoised[0]}/{args.steps}")
            return run.stop_signal(stop, ddp, device)

        bar.set_postfix_str(f"sampling {len(chosen)} prompts")
        with autocast:
            found = sample_transitions(models, raw_unet, preference, ddim, [prompts[i] for i in mine],
                                       [prompt_seed(args.seed, iteration, i) for i in mine], args, empty, stopped)
        run.set_lora(lora, current)
        if found is None:
            stopping = run.stop_signal(stop, ddp, device)
            print0(f"{signal.Signals(stopping).name}: stopping during the sampling of iteration {iteration}")
            break
        local, timing = found
        local["prompt"] = torch.tensor(mine, dtype=torch.long)[local["prompt"]]  # global prompt indices
        transitions = gather(local, ddp, world_size)
        n = len(transitions["t"])
        steps_here = n // args.global_batch_size
        shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(prompt_seed(args.seed, iteration, 2**32)))
        if not iteration_step:
            totals["kept_transitions"] += n
            totals["dropped_transitions"] += n - steps_here * args.global_batch_size
        scores = timing["scores"].to(device)
        scores_sum = torch.stack([scores.sum(), torch.tensor(float(len(scores)), device=device)])  # sum, count
        if ddp:
            dist.all_reduce(scores_sum)
        scores_mean = (scores_sum[0] / scores_sum[1]).item()
        gap = torch.tensor(timing["gap"], device=device)  # the largest softmax gap of any rank's pairs
        if ddp:
            dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        if n == 0:
            print0(f"warning: iteration {iteration} kept no pair: its largest softmax gap, {gap.item():.3g}, is not "
                   f"above --threshold {args.threshold}")
        elif steps_here == 0:
            print0(f"warning: iteration {iteration} kept {n} transitions, fewer than one optimizer step's "
                   f"--global-batch-size {args.global_batch_size}: none trained on")
        sample_time = time.time() - start

        unet.train()
        train_start = time.time()
        while iteration_step < steps_here and step < max_steps:
            step_metrics = {}
            for micro in range(accum):
                stopping = run.stop_signal(stop, ddp, device)  # every rank stops at the same micro-batch
                if stopping:
                    break
                first = iteration_step * args.global_batch_size + (micro * world_size + rank) * args.micro_batch_size
                rows = shuffle[first:first + args.micro_batch_size]
                batch = {k: v[rows].to(device) for k, v in transitions.items()}
                both, cond = text_cond(models, [prompts[i] for i in batch["prompt"].tolist()], args.resolution, empty)
                sync = micro == accum - 1 or not ddp
                with autocast, (nullcontext() if sync else unet.no_sync()):
                    d_w, d_l = log_ratios(args, raw_unet, unet, ddim, batch, both, cond, ncp_method)
                    loss, metrics = spo_loss(d_w, d_l, args.beta, args.eps)
                    scaler.scale(loss / accum).backward()
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / accum
            if stopping:  # drop the partial accumulation: the LoRA and optimizer state of the last step are intact
                optimizer.zero_grad(set_to_none=True)
                print0(f"{signal.Signals(stopping).name}: stopping at step {step}, {micro} of {accum} micro-batches "
                       "dropped")
                break
            step, grad_norm, lr = run.optimizer_step(step, lora_params, optimizer, scaler, lr_schedule, totals)
            iteration_step += 1
            bar.set_postfix_str(f"training on {n} transitions: step {iteration_step}/{steps_here}")
            for k, v in step_metrics.items():
                window[k] = window.get(k, 0.0) + v
            window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.detach().float()
            window_steps += 1
            if step % args.log_every == 0 or step % args.save_every == 0:
                means, _ = run.reduce_window(window, window_steps, ddp, world_size, device)
                elapsed = (time.time() - window_start) / window_steps
                record = {"step": step, "iteration": iteration, **means, "lr": lr, "step_time": elapsed,
                          "peak_mem_gib": run.peak_memory(cuda), **totals}
                if master:
                    run.write_record(record, os.path.join(args.output_dir, "metrics.jsonl"), report, bar, print0)
                window, window_steps, window_start = {}, 0, time.time()
            if step % args.save_every == 0:
                save()
            if master and validation and step % args.validation_every == 0:
                path, seconds = run.validate(models, validation, args, step, report, autocast)
                print0(f"validation grid {path}: {seconds:.1f} s")
                window_start += seconds
        if stopping or iteration_step < steps_here:  # stopped, or --max-steps reached inside the iteration
            break
        if master:  # the iteration's own line: what sampling found and where the time went
            record = {"iteration": iteration, "step": step, "transitions": n, "optimizer_steps": steps_here,
                      "scores_mean": scores_mean, "sample_s": timing["sample_s"], "score_s": timing["score_s"],
                      "gather_s": sample_time - timing["sample_s"] - timing["score_s"],
                      "train_s": time.time() - train_start}
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print0(run.log_line(record))
        iteration, iteration_step = iteration + 1, 0
        bar.update(1)

    # -------------------------------------------------------------------------
    bar.close()
    if window_steps:
        means, _ = run.reduce_window(window, window_steps, ddp, world_size, device)
        if master:
            run.write_record({"step": step, "iteration": iteration, **means, **totals},
                         os.path.join(args.output_dir, "metrics.jsonl"), report, bar, print0)
    save()
    if stopping:
        print0(f"checkpoint of step {step} saved {time.time() - stop[0][1]:.1f} s after the signal" if stop else
               f"checkpoint of step {step} saved; continue with --resume")
    if ddp:  # a cheap proof that the ranks stayed in step
        print0(f"LoRA weights identical on all {world_size} ranks: {run.ranks_agree(lora_params, world_size, device)}")
    print0(f"done: step {step}, iteration {iteration}, LoRA in {args.output_dir}/{sample.LORA_FILE}")
    report.close()
    if ddp:
        dist.destroy_process_group()
    if stopping:
        sys.exit(128 + stopping)
    if step == 0:
        sys.exit(f"error: the run took no optimizer step, so its LoRA is untrained: no iteration kept "
                 f"--global-batch-size {args.global_batch_size} transitions (see the warnings above; lower "
                 "--threshold, or sample more --prompts-per-iteration)")


if __name__ == "__main__":
    run.run_main(main, parse_args())
