"""The noise-conditioned perceptual encoder of NCP (Gambashidze et al. 2024, section 3).

The errors of DPO / CPO / SFT are measured in the feature space of the frozen base U-Net's down stack,
evaluated one step back along the reverse process:

    x_{t-1}^pred = previous_sample(x_t, t, pred, z)          eq. 2, the DDPM posterior sample
    x_{t-1}^*    = previous_sample(x_t, t, target, z)        the exact posterior sample (target: the true noise)
    e^NCP        = || E(x_{t-1}^pred, t-1, c) - E(x_{t-1}^*, t-1, c) ||^2     eq. 13, mean over C, H, W

E is the base U-Net (LoRA adapters disabled, so no second copy of the weights) up to the last down block
("down") or through the mid block ("mid"). Its weights get no gradient; gradients flow through it into
`pred` and from there into the LoRA weights of the policy.

The file reads in the order a step does: the errors (perceptual_errors, eq. 13; latent_error, eq. 3), the step
back (noised, previous_sample), the encoder's stages (U-Net or MMDiT), the JVP, and base_weights.

Two ways to compute e^NCP (`method`), chosen by the precision the encoder runs in (method_for):

- "direct" (fp32): E(x_{t-1}^pred) - E(x_{t-1}^*), two passes, exactly eq. 13.
- "jvp" (bf16 / fp16): the two inputs differ by delta = x_{t-1}^pred - x_{t-1}^* = c_t (target - pred), c_t of
  0.004-0.03 on SD's schedule, so delta is 0.1-0.4% of x_{t-1}. bf16 resolves 0.4%: the direct path's two
  inputs round to the same or adjacent values and its e^NCP is rounding noise (12x-19x too large on the SD1.5
  architecture: docs/precision.md). Instead one forward-mode pass carries delta itself as a tangent, at its own
  scale:
      E(x_{t-1}^pred) - E(x_{t-1}^*) = J_E(x_mid) delta + O(delta^3),   x_mid = (x_{t-1}^pred + x_{t-1}^*) / 2,
  the central difference, exact to second order (within ~1e-4 of the fp32 direct value at a prediction
  error of ~1 per element). The frozen weights stay in half precision. The policy's gradient flows through the
  tangent; x_mid is a constant for it, which drops a term of relative size O(delta). For DPO the policy's and the
  reference's errors share one primal point and the tangents J d_ref and J(d_pol - d_ref), so that their
  difference, the margin, keeps full relative precision too.
  Its cost and memory (see `jvp` below, and docs/precision.md for the measurements): one primal pass for all
  tangents, a tangent pass each, and a backward stage by stage that never holds more than one stage's
  activations nor any whole attention matrix.

Beyond the U-Net: Stable Diffusion 3.5 (rectified flow, an MMDiT). The same construction, derived for a flow:
- the process: x_s = (1 - s) x0 + s eps, s in (0, 1]; the model predicts the velocity v = eps - x0. s is drawn as
  SD3 trains: u ~ logit-normal(0, 1) picks a point of the scheduler's 1000-point grid, after its shift
  (FlowMatchEulerDiscreteScheduler, shift 3 for SD3.5), with unit loss weights (diffusers' SD3 LoRA script with
  its default weighting, "logit_normal"). Latent errors are velocity errors, ||v_theta - (eps - x0)||^2: with
  them Diffusion-DPO's loss is Flow-DPO's, and CPO and SFT change the same way (`target` is eps - x0).
- the step back: the reverse process is the ODE dx/ds = v, deterministic, so "one step back" is an Euler step
  by Delta = s - s', s' the grid point `step_back` points below s (0 past the end):
      x^pred = x_s - Delta v_theta,     x^* = x_s - Delta (eps - x0) = the straight path's own point at s'.
  There is no z. One grid point is Delta = 1/1000 before the shift, 1/3000 (near s = 1) to 3/1000 (near s = 0)
  after it: the difference x^pred - x^* = -Delta (v_theta - v) is as far below bf16's resolution as a DDPM
  step's, and the JVP carries it the same way.
- the encoder E: the frozen transformer's patch embedding (with its positions), its time and pooled-text
  embedding and context embedder, and its first K joint blocks, at s'. The features are the image tokens'
  hidden states after block K, (B, tokens, width); the text tokens take part in every block's joint attention
  and get tangents of their own from block 1 on, but are not compared. K ("depth"): an integer, or "third", a
  third of the blocks (8 of SD3.5 Medium's 24): the U-Net's down stack is about 31% of SD1.5's FLOPs.

Copy this file as it is: it depends on torch, peft, and a diffusers UNet2DConditionModel or SD3Transformer2DModel.
"""

from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

METHODS = ("direct", "jvp")
# The authors' launchers: through the mid block for SD1.5, not for SDXL. SD3: a third of the joint blocks.
DEPTHS = {"sd15": "mid", "sdxl": "down", "sd3": "third", "flux2": "third"}


# -----------------------------------------------------------------------------
# The errors: eq. 13 in the encoder's space, eq. 3 in latent space.


def perceptual_errors(unet, scheduler, *, x_t, t, pred, target, z, cond, depth, ref_pred=None, step_back=1,
                      method=None):
    """Eq. 13: the per-sample mean of (E(x_{t-1}^pred) - E(x_{t-1}^*))^2, E the base weights of `unet`. (B,) fp32;
    with ref_pred, the policy's and the reference's, (err, ref_err), sharing the exact step's features.

    x_t: (B, C, h, w) at the model's timesteps t (B,); pred: the policy's prediction (with grad), ref_pred the
    reference's (without); target: what the model predicts (the noise, or a flow's velocity eps - x0); z: the
    reverse step's noise (None for a flow); cond: the model's keyword arguments; depth: E's depth ("down", "mid",
    or SD3's "third" / K); step_back: a flow's Euler step, in grid points (DDPM's is one step). method: "direct" or
    "jvp" (module docstring); by default the one the encoder's precision needs (method_for). In "jvp", e_pol and
    e_ref come from one primal pass with the tangents J d_ref and J (d_pol - d_ref), so their difference keeps full
    relative precision; the backward runs through the second tangent only. Gradients flow into `pred`; the
    model's weights get none from this call.
    """
    preds = [pred] if ref_pred is None else [pred, ref_pred]
    method = method or method_for(_compute_dtype(unet, x_t))
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "jvp":
        if ref_pred is not None and ref_pred.requires_grad:
            raise ValueError("ref_pred is the reference's prediction and must carry no grad")
        errors = _linearised_errors(unet, scheduler, x_t, t, preds, target, z, cond, depth, step_back)
    else:
        features = target_features(unet, scheduler, x_t=x_t, t=t, target=target, z=z, cond=cond, depth=depth,
                                   step_back=step_back)
        errors = [_direct_error(unet, scheduler, x_t, t, p, z, cond, depth, features, step_back) for p in preds]
    return errors[0] if ref_pred is None else tuple(errors)


def latent_error(pred, target):
    """Eq. 3: per-sample mean of (eps - eps_theta)^2 over C, H, W, the latent-space baseline; for a flow the
    velocity error (v_theta - (eps - x0))^2 (target = eps - x0). (B,) fp32."""
    return _mean_square(pred.float() - target.float())


def method_for(dtype):
    """The e^NCP method for an encoder whose weights and autocast are `dtype`: "direct" in fp32, else "jvp"."""
    return "direct" if dtype == torch.float32 else "jvp"


def _compute_dtype(unet, x):
    """The precision E runs in: autocast's dtype where autocast is on, else the lowest of the model's weights."""
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return min((p.dtype for p in unet.parameters() if p.is_floating_point()), key=lambda d: torch.finfo(d).bits)


@torch.no_grad()
def target_features(unet, scheduler, *, x_t, t, target, z, cond, depth, step_back=1):
    """E(x_{t-1}^*, t-1, c): the features of the exact step back (taken with `target`), without grad. (B, ...) as
    down_stack."""
    x_prev = previous_sample(scheduler, x_t, t, target, z, step_back)
    return encode(unet, x_prev, previous_timestep(scheduler, t, step_back), cond, depth)


def _direct_error(unet, scheduler, x_t, t, pred, z, cond, depth, target_features, step_back):
    """Eq. 13 by two passes (fp32): the mean square of E(x_{t-1}^pred) - target_features. (B,)."""
    x_prev = previous_sample(scheduler, x_t, t, pred, z, step_back)
    features = encode(unet, x_prev, previous_timestep(scheduler, t, step_back), cond, depth)
    return _mean_square(features.float() - target_features.float())


def _linearised_errors(unet, scheduler, x_t, t, preds, target, z, cond, depth, step_back):
    """Eq. 13 by the JVP at the central point (module docstring), for one or two predictions. [(B,) fp32]."""
    step = partial(previous_sample, scheduler, x_t.float(), t, z=z, step_back=step_back)
    x_star = step(target)  # fp32 throughout: the steps are 0.1-0.4% of x
    deltas = [step(pred) - x_star for pred in preds]  # z cancels out
    # The primal point: half way along the (mean) step, a central difference. A constant for the gradient.
    x_mid = (x_star + sum(d.detach() for d in deltas) / (2 * len(deltas))).to(x_t.dtype)
    t_prev = previous_timestep(scheduler, t, step_back)
    if len(deltas) == 1:
        return [_mean_square(jvp(unet, x_mid, t_prev, cond, depth, deltas)[0])]
    # J (d_0 - d_1), the small policy-reference difference at its own scale, and J d_1 (the reference: no grad),
    # two tangents of one primal pass.
    j01, j1 = jvp(unet, x_mid, t_prev, cond, depth, [deltas[0] - deltas[1], deltas[1].detach()])
    return [_mean_square(j1 + j01), _mean_square(j1)]


def _mean_square(x):
    """Per-sample mean of x^2 over all but the first dimension, fp32. (B,)."""
    return x.float().pow(2).flatten(1).mean(dim=1)


# -----------------------------------------------------------------------------
# The step back: the training inputs of a micro-batch, and the reverse step from x_t (DDPM) or s (a flow).


def noised(scheduler, x0, n, generator):
    """The training inputs of one micro-batch, for DDPM and for a flow alike: (x_t, t, target, z).

    x0: (s * n, C, h, w), s images per pair in blocks of n (winners, then losers). One t, noise and z per pair,
    shared by its images, so that the comparison of winner and loser carries no noise of its own. t is the model's
    timestep: DDPM's integer step, uniform; a flow's s * 1000 on the scheduler's grid, u ~ logit-normal(0, 1)
    picking the grid point (see the module docstring). target is what the model predicts: the noise (DDPM), or the
    velocity eps - x0 (flow). z is the reverse step's noise (eq. 12); a flow's step has none (None).
    """
    sides, device = len(x0) // n, x0.device
    if not is_flow(scheduler):  # DDPM
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
        noise = torch.randn(x0[:n].shape, generator=generator, device=device).repeat(sides, 1, 1, 1)
        z = torch.randn(x0[:n].shape, generator=generator, device=device).repeat(sides, 1, 1, 1)
        t = t.repeat(sides)
        return scheduler.add_noise(x0, noise, t), t, noise, z
    u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    index = (u * len(scheduler.sigmas)).long().clamp(max=len(scheduler.sigmas) - 1).repeat(sides)
    noise = torch.randn(x0[:n].shape, generator=generator, device=device).repeat(sides, 1, 1, 1)
    s = scheduler.sigmas.to(device)[index].view(-1, 1, 1, 1)
    x_t = ((1 - s) * x0.float() + s * noise).to(x0.dtype)
    return x_t, scheduler.timesteps.to(device)[index], noise - x0, None



def previous_sample(scheduler, x_t, t, eps, z, step_back=1):
    """The step back with the prediction (or the target) `eps`: DDPM's reverse step (_ddpm_step), or a flow's
    Euler step (_euler_step) with eps its velocity. x_t, eps, z: (B, C, h, w); t: (B,). x_t's dtype."""
    if is_flow(scheduler):
        return _euler_step(scheduler, x_t, t, eps, step_back)
    return _ddpm_step(scheduler, x_t, t, eps, z, step_back)


def _euler_step(scheduler, x_s, t, v, step_back):
    """A flow's step back: x_s - (s - s') v, s' the grid point `step_back` below s (module docstring); no z."""
    s, s_prev = _flow_sigmas(scheduler, t, step_back)
    return (x_s.float() - (s - s_prev).view(-1, 1, 1, 1) * v.float()).to(x_s.dtype)


def _ddpm_step(scheduler, x_t, t, eps, z, step_back):
    """DDPM's reverse step x_t -> x_{t-1} with "fixed_small" variance (eq. 2), per-sample timesteps (B,) long. At
    t = 0 it returns x0_hat (abar_prev = 1, sigma = 0), as diffusers.DDPMScheduler.step does. Coefficients in
    fp32."""
    if step_back != 1:
        raise ValueError("a DDPM step back is one step (step_back=1)")
    abar = scheduler.alphas_cumprod.to(device=x_t.device, dtype=torch.float32)
    abar_t = abar[t].view(-1, 1, 1, 1)
    abar_prev = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones_like(abar[t])).view(-1, 1, 1, 1)
    beta_t = 1 - abar_t / abar_prev  # the scheduler's beta_t, recovered exactly as DDPMScheduler does
    x_t32, eps32 = x_t.float(), eps.float()
    x0_hat = (x_t32 - (1 - abar_t).sqrt() * eps32) / abar_t.sqrt()
    mu = ((abar_prev.sqrt() * beta_t / (1 - abar_t)) * x0_hat
          + ((1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x_t32)
    var = (1 - abar_prev) / (1 - abar_t) * beta_t  # exactly 0 at t = 0
    return (mu + var.clamp(min=0).sqrt() * z.float()).to(x_t.dtype)


def previous_timestep(scheduler, t, step_back=1):
    """The timestep E is evaluated at: t - 1 (DDPM, 0 at 0), or a flow's s' * 1000 (see _flow_sigmas)."""
    if not is_flow(scheduler):
        return (t - 1).clamp(min=0)
    return _flow_sigmas(scheduler, t, step_back)[1] * scheduler.config.num_train_timesteps


def _flow_sigmas(scheduler, t, step_back):
    """(s, s') of a flow's timesteps t (B,): s on the scheduler's grid, s' the grid point `step_back` below (0 past
    the end). fp32, (B,) each."""
    if step_back < 1:
        raise ValueError(f"step_back must be at least 1, got {step_back}")
    grid = scheduler.timesteps.to(t.device, torch.float32)
    index = (grid[None] - t.float()[:, None]).abs().argmin(dim=1)
    sigmas = torch.cat([scheduler.sigmas.to(t.device, torch.float32), torch.zeros(step_back, device=t.device)])
    return sigmas[index], sigmas[index + step_back]


def is_flow(scheduler):
    """Whether the process is a rectified flow (FlowMatchEulerDiscreteScheduler: SD3) rather than DDPM."""
    return not hasattr(scheduler, "alphas_cumprod")


# -----------------------------------------------------------------------------
# The encoder E as a chain of stages, each a function of one hidden state: the U-Net's, or the MMDiT's.


def encode(unet, x, t_prev, cond, depth="mid"):
    """E(x, t_prev, c) with the base weights. (B, ...) as down_stack. Safe under gradient checkpointing (see below)."""
    if torch.is_grad_enabled() and getattr(unet, "is_gradient_checkpointing", False):
        # The blocks' own checkpointing would recompute them during backward, when the adapters are on
        # again, and silently differentiate the LoRA model instead of the base. So the blocks do not
        # checkpoint here; the whole encoder is checkpointed by a function that disables the adapters
        # itself, and its recomputation runs on the base weights too.
        return checkpoint(_base_features, unet, x, t_prev, cond, depth, use_reentrant=False)
    return _base_features(unet, x, t_prev, cond, depth)


def _base_features(unet, x, t_prev, cond, depth):
    with base_weights(unet), _no_block_checkpointing(unet):
        return down_stack(unet, x, t_prev, cond, depth)


def down_stack(unet, x, t, cond, depth="mid"):
    """E: the U-Net's time (+ SDXL text_time) embedding, conv_in, every down block, and the mid block if
    depth="mid"; or SD3's embeddings and first K joint blocks (depth K or "third", module docstring).

    x: (B, C, h, w); t: (B,) the model's timesteps; cond: the model's keyword arguments (encoder_hidden_states,
    and added_cond_kwargs for SDXL, pooled_projections for SD3). Returns the last hidden state, (B, C', h', w') for
    a U-Net (not the skip connections), the image tokens (B, tokens, width) for SD3.
    """
    h = x
    for stage in _stages(unet, x, t, cond, depth):
        h = stage(h)
    return h


def _stages(unet, x, t, cond, depth):
    """E as a list of stages, chosen once by the model's family: the U-Net's, SD3's or FLUX.2's. The time and text
    embeddings, which do not depend on x, are computed here, once."""
    stages = {"sd15": _unet_stages, "sd3": _mmdit_stages, "flux2": _flux2_stages}[family(unet)]
    return stages(unet, x, t, cond, depth)


def _unet_stages(unet, x, t, cond, depth):
    """conv_in, each down block, and the mid block if depth="mid"."""
    if depth not in ("down", "mid"):
        raise ValueError(f"depth must be 'down' or 'mid' for a U-Net, got {depth!r}")
    hidden = cond["encoder_hidden_states"]
    added = cond.get("added_cond_kwargs") or {}
    # The same embedding path as UNet2DConditionModel.forward, through the model's own helpers.
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added)
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.process_encoder_hidden_states(encoder_hidden_states=hidden, added_cond_kwargs=added)

    def run(block, h):
        if getattr(block, "has_cross_attention", False):
            out = block(h, temb=emb, encoder_hidden_states=hidden)
        else:
            out = block(h, temb=emb)
        return out[0] if isinstance(out, tuple) else out  # a down block also returns its skip connections

    blocks = [*unet.down_blocks, unet.mid_block] if depth == "mid" else list(unet.down_blocks)
    return [unet.conv_in] + [partial(run, block) for block in blocks]


def _mmdit_stages(model, x, t, cond, depth):
    """SD3's E as stages of one state, its first K = blocks_of(depth) joint blocks: the text tokens and the image
    tokens side by side along the sequence,
    (B, text + image tokens, width), so that each joint block is a function of one tensor; the last stage keeps the
    image tokens. The same path as SD3Transformer2DModel.forward up to block k."""
    k = blocks_of(model, depth)
    temb = model.time_text_embed(t, cond["pooled_projections"])
    context = model.context_embedder(cond["encoder_hidden_states"])
    n = context.shape[1]

    def embed(x):
        return torch.cat([context.to(x.dtype), model.pos_embed(x)], dim=1)

    def run(block, last, h):
        text, image = block(hidden_states=h[:, n:], encoder_hidden_states=h[:, :n], temb=temb)
        return image if last else torch.cat([text, image], dim=1)

    return [embed] + [partial(run, block, i == k - 1) for i, block in enumerate(model.transformer_blocks[:k])]


def _flux2_stages(model, x, t, cond, depth):
    """FLUX.2's E as stages of one state, its first K = blocks_of(depth) blocks counting the double-stream blocks,
    then the single-stream ones: text and image tokens side by side, (B, text + image tokens, width); the last stage
    keeps the image tokens. The time embedding, the blocks' modulations, the text tokens' embedding and the RoPE
    angles of both streams do not depend on x: computed once, constants of E. The same path as
    Flux2Transformer2DModel.forward up to block K (t: the scheduler's 0-1000 scale, the model's time x 1000)."""
    k = blocks_of(model, depth)
    temb = model.time_guidance_embed(t.to(x.dtype), None)
    mod_img, mod_txt = model.double_stream_modulation_img(temb), model.double_stream_modulation_txt(temb)
    mod_single = model.single_stream_modulation(temb)
    context = model.context_embedder(cond["encoder_hidden_states"])
    n = context.shape[1]
    txt_ids = cond["txt_ids"][0] if cond["txt_ids"].dim() == 3 else cond["txt_ids"]
    text_rope, image_rope = model.pos_embed(txt_ids), model.pos_embed(latent_ids(x))
    rope = tuple(torch.cat([a, b], dim=0) for a, b in zip(text_rope, image_rope))

    def embed(x):
        tokens = x.flatten(2).transpose(1, 2)  # (B, h w, C): the pipeline's packing
        return torch.cat([context.to(x.dtype), model.x_embedder(tokens)], dim=1)

    def double(block, last, h):
        text, image = block(hidden_states=h[:, n:], encoder_hidden_states=h[:, :n], temb_mod_img=mod_img,
                            temb_mod_txt=mod_txt, image_rotary_emb=rope)
        return image if last else torch.cat([text, image], dim=1)

    def single(block, last, h):
        h = block(hidden_states=h, encoder_hidden_states=None, temb_mod=mod_single, image_rotary_emb=rope)
        return h[:, n:] if last else h

    blocks = [partial(double, b) for b in model.transformer_blocks] + \
             [partial(single, b) for b in model.single_transformer_blocks]
    return [embed] + [partial(run, i == k - 1) for i, run in enumerate(blocks[:k])]


def latent_ids(x):
    """FLUX.2's RoPE positions of x's latent grid (B, C, h, w), one token per position: (h w, 4), rows
    (0, row, column, 0), row-major as the pipeline packs the tokens."""
    h, w = x.shape[-2:]
    rows, cols = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    zero = torch.zeros_like(rows)
    return torch.stack([zero, rows, cols, zero], dim=-1).flatten(0, 1)


def family(denoiser):
    """The denoiser's family, from the model itself: "flux2" (single-stream blocks), "sd3" (joint blocks only) or
    "sd15" (a U-Net; SDXL's has the same stages)."""
    if hasattr(denoiser, "single_transformer_blocks"):
        return "flux2"
    return "sd3" if hasattr(denoiser, "transformer_blocks") else "sd15"


def blocks_of(model, depth):
    """The number K of transformer blocks E runs for `depth` (an integer, or "third"): SD3's joint blocks; FLUX.2's
    double-stream then single-stream blocks, counted together (a block of either kind costs 13 d^2 multiply-adds per
    token in its projections: docs/flux2.md). ValueError if out of range."""
    total = len(model.transformer_blocks) + len(getattr(model, "single_transformer_blocks", []))
    k = max(1, total // 3) if depth == "third" else int(depth) if str(depth).isdigit() else None
    if k is None or not 1 <= k < total:
        raise ValueError(f"encoder depth for this transformer must be 'third' or a number of joint blocks from 1 to "
                         f"{total - 1}, got {depth!r}")
    return k


@contextmanager
def _no_block_checkpointing(unet):
    blocks = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
    flags = [m.gradient_checkpointing for m in blocks]
    for m in blocks:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, flag in zip(blocks, flags):
            m.gradient_checkpointing = flag


# -----------------------------------------------------------------------------
# The JVP: J_E(x) delta for one or more tangents, bounded in memory, at unit scale in both directions.
#
# Forward: one pass without grad carries every tangent through E at once (torch.func.jvp under vmap over the
# tangents, so the primal is computed once), stage by stage (conv_in, each down block, the mid block), keeping
# only each stage's input. Attention's tangent is computed by query chunks (_attention_tangent), so no whole
# attention matrix of the encoder is ever held, with or without its tangent.
# Backward: the map delta -> J delta is linear, so its vector-Jacobian product is the primal's, J^T g: each
# stage is run again on its saved input, with grad and the fused attention kernels, and differentiated on its
# own, last stage first. The backward holds one stage's activations at a time and never needs the tangents.
# Why this form rather than PyTorch's own forward-mode rules: docs/precision.md, with the measurements.
# Scale: each stage's tangent and each stage's incoming gradient are renormalised to unit RMS per sample (the
# scale kept in fp32), so that neither a tiny step (policy == reference gives exactly zero) nor a tiny gradient
# underflows in fp16, where a step's scale of 1e-30 once zeroed every gradient.

ATTENTION_CHUNK = 2**24  # elements of one (batch, heads, queries, keys) block of the attention tangent


def jvp(unet, x, t_prev, cond, depth, deltas):
    """[J_E(x) d for d in deltas], fp32, with the base weights; E at (x, t_prev, cond). deltas: (B, C, h, w) each.

    Only the first tangent may carry grad (its backward flows into it); the others are computed without grad."""
    if any(d.requires_grad for d in deltas[1:]):
        raise ValueError("only the first tangent may carry grad")
    stacked = torch.stack([d.float() for d in deltas])  # (n, B, C, h, w)
    out = _Jvp.apply(stacked[0], stacked.detach(), unet, x.contiguous(), t_prev, cond, depth)  # grad: first only
    return [out[0]] + [out[i].detach() for i in range(1, len(deltas))]


def _rms(x, lead):
    """Per-sample RMS over all but the `lead` leading (tangent, sample) dimensions, in fp32; 1 where it is 0.
    Shape x.shape[:lead]."""
    rms = x.detach().float().flatten(lead).pow(2).mean(-1).sqrt()
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def _per(scale, x):
    """A per-(tangent, sample) scale viewed to broadcast against x, whatever x's trailing dimensions."""
    return scale.view(*scale.shape, *[1] * (x.dim() - scale.dim()))


class _Jvp(torch.autograd.Function):
    """Forward: J_E(x) for every row of `deltas` (n, B, C, h, w); backward: J_E(x)^T g into `first` (= deltas[0])."""

    @staticmethod
    def forward(ctx, first, deltas, unet, x, t_prev, cond, depth):
        device = x.device.type
        enabled = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)  # (the meta device has none)
        ctx.autocast = (device, torch.get_autocast_dtype(device) if enabled else None, enabled)
        scale = _rms(deltas, 2)  # (n, B)
        tangents = (deltas / _per(scale, deltas)).to(x.dtype)
        inputs = []
        with base_weights(unet), _no_block_checkpointing(unet), _JvpMode():
            stages = _stages(unet, x, t_prev, cond, depth)
            h = x
            for stage in stages:
                inputs.append(h)
                # randomness="same": a U-Net in train mode calls dropout (p = 0 in SD's configs) even when frozen
                h, tangents = torch.func.vmap(partial(torch.func.jvp, stage, (h,)), out_dims=(None, 0),
                                              randomness="same")((tangents,))
                r = _rms(tangents, 2)
                scale, tangents = scale * r, (tangents / _per(r, tangents)).to(h.dtype)
        ctx.stages, ctx.unet = stages, unet
        ctx.save_for_backward(*inputs)
        return tangents.float() * _per(scale, tangents)

    @staticmethod
    def backward(ctx, grad):
        g = grad[0]
        device, dtype, enabled = ctx.autocast
        autocast = torch.autocast(device, dtype) if enabled else nullcontext()
        with base_weights(ctx.unet), _no_block_checkpointing(ctx.unet), autocast:
            for stage, h in reversed(list(zip(ctx.stages, ctx.saved_tensors))):
                r = _per(_rms(g, 1), g)
                with torch.enable_grad():
                    h = h.detach().requires_grad_()
                    out = stage(h.view_as(h))  # not the leaf itself: module hooks (FlopCounterMode's) reject leaves here
                g, = torch.autograd.grad(out, h, (g / r).to(out.dtype))
                g = g.float() * _per(r.flatten(), g)
        return g, None, None, None, None, None, None


class _JvpMode(TorchFunctionMode):
    """Routes the encoder's attention, linear and conv2d calls to functions with lean forward-mode rules: the
    attention's never holds a whole attention matrix (_Attention); linear and conv2d take their weights as the
    constants they are (_FrozenWeights: PyTorch's own rule also convolves the input with the weights' zero
    tangent, a third pass of every layer)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, dropout, causal, scale, gqa = _arguments(_SDPA, args, kwargs)
            if mask is None and not dropout and not causal and not gqa:
                return _Attention.apply(q, k, v, scale)
            with sdpa_kernel(SDPBackend.MATH):  # any other form: the composite one, which has a forward-mode rule
                return func(*args, **kwargs)
        if func in (F.linear, F.conv2d):
            return _FrozenWeights.apply(func, *_arguments(_LINEAR if func is F.linear else _CONV2D, args, kwargs))
        return func(*args, **kwargs)


# The parameters (name, default) of the calls _JvpMode routes, in their positional order.
_SDPA = [("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
         ("is_causal", False), ("scale", None), ("enable_gqa", False)]
_LINEAR = [("input", None), ("weight", None), ("bias", None)]
_CONV2D = _LINEAR + [("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)]


def _arguments(parameters, args, kwargs):
    """A call's arguments as one positional list, in `parameters`' order, defaults filled in."""
    given = dict(zip((name for name, _ in parameters), args), **kwargs)
    return [given.get(name, default) for name, default in parameters]


class _FrozenWeights(torch.autograd.Function):
    """op(x, weight, bias, *args) for an op linear in x (F.linear, F.conv2d), whose tangent is op(dx, weight):
    the weights are constants of E, and their (zero) tangents are not used. Used without grad only."""
    generate_vmap_rule = True

    @staticmethod
    def forward(op, x, weight, bias, *args):
        return op(x, weight, bias, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op, _, ctx.weight, _, *ctx.args = inputs

    @staticmethod
    def jvp(ctx, _, dx, *unused):
        return ctx.op(dx, ctx.weight, None, *ctx.args)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("encoder._FrozenWeights is forward-mode only")


class _Attention(torch.autograd.Function):
    """softmax(q k^T scale) v, with a forward-mode rule (jvp) by query chunks. Used without grad only."""
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, ctx.scale = inputs
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _):
        q, k, v = ctx.saved_tensors
        return _attention_tangent(q, k, v, dq, dk, dv, ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("encoder._Attention is forward-mode only: the JVP's backward runs the fused kernels")


def _attention_tangent(q, k, v, dq, dk, dv, scale=None):
    """The tangent of softmax(q k^T scale) v along (dq, dk, dv), any of them None (zero), by query chunks:
    with P the attention and dS = (dq k^T + q dk^T) scale, dP = P * (dS - rowsum(P * dS)), do = dP v + P dv.
    Matmuls in the inputs' dtype, the softmax and dP in fp32. (B, heads, queries, dv)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kt = k.transpose(-2, -1)
    rows = max(1, ATTENTION_CHUNK // (q.shape[:-2].numel() * k.shape[-2]))
    out = []
    for i in range(0, q.shape[-2], rows):
        qc = q[..., i:i + rows, :]
        p = torch.softmax((qc @ kt).float() * scale, dim=-1)
        ds = (dq[..., i:i + rows, :] @ kt).float() if dq is not None else torch.zeros_like(p)
        if dk is not None:
            ds = ds + (qc @ dk.transpose(-2, -1)).float()
        dp = p * (ds * scale)
        dp = dp - p * dp.sum(-1, keepdim=True)
        do = dp.to(v.dtype) @ v
        if dv is not None:
            do = do + p.to(dv.dtype) @ dv
        out.append(do)
    return torch.cat(out, dim=-2)


# -----------------------------------------------------------------------------
# The base weights: the policy's model with its adapters off is the reference and the encoder.


@contextmanager
def base_weights(unet):
    """Run `unet` with its LoRA adapters off (the frozen base model), however they were added: by diffusers
    (add_adapter, load_lora_weights) or by peft directly (inject_adapter_in_model, get_peft_model). Each of peft's
    adapter layers is switched by its own API, and those that were on are switched on again, even on error."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)
