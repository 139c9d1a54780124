"""The noise-conditioned perceptual encoder of NCP (Gambashidze et al. 2024, section 3).

The errors of DPO / CPO / SFT are measured in the feature space of the frozen base U-Net's down stack,
evaluated one step back along the reverse process:

    x_{t-1}^pred = previous_sample(x_t, t, pred, z)          eq. 2, the DDPM posterior sample
    x_{t-1}^*    = previous_sample(x_t, t, noise, z)         the exact posterior sample (target)
    e^NCP        = || E(x_{t-1}^pred, t-1, c) - E(x_{t-1}^*, t-1, c) ||^2     eq. 13, mean over C, H, W

E is the base U-Net (LoRA adapters disabled, so no second copy of the weights) up to the last down block
("down") or through the mid block ("mid"). Its weights get no gradient; gradients flow through it into
`pred` and from there into the LoRA weights of the policy.

Two ways to compute e^NCP (`method`), chosen by the precision the encoder runs in:

- "direct" (fp32): E(x_{t-1}^pred) - E(x_{t-1}^*), two passes, exactly eq. 13.
- "jvp" (bf16 / fp16): the two inputs differ by delta = x_{t-1}^pred - x_{t-1}^* = c_t (noise - pred), c_t of
  0.004-0.03 on SD's schedule, so delta is 0.1-0.4% of x_{t-1}. bf16 resolves 0.4%: the direct path's two
  inputs round to the same or adjacent values and its e^NCP is rounding noise (12x-116x too large on the SD1.5
  architecture). Instead one forward-mode pass carries delta itself as a tangent, at its own scale:
      E(x_{t-1}^pred) - E(x_{t-1}^*) = J_E(x_mid) delta + O(delta^3),   x_mid = (x_{t-1}^pred + x_{t-1}^*) / 2,
  the central difference, exact to second order (within ~1e-4 of the fp32 direct value at a prediction
  error of ~1 per element). The frozen weights stay in half precision; attention runs in its composite form
  (the fused kernels have no forward-mode derivative). The policy's gradient flows through the tangent; x_mid
  is a constant for it, which drops a term of relative size O(delta). For DPO the policy's and the
  reference's errors share one primal point and the tangents J d_ref and J(d_pol - d_ref), so that their
  difference, the margin, keeps full relative precision too (perceptual_errors).
  Its cost: a forward-mode pass is a primal and a tangent pass, about twice a forward.

Copy this file as it is: it depends on torch and on a diffusers UNet2DConditionModel only.
"""

from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

METHODS = ("direct", "jvp")
DEPTHS = {"sd15": "mid", "sdxl": "down"}  # the authors' launchers: through the mid block for SD1.5, not for SDXL


def method_for(dtype):
    """The e^NCP method for an encoder whose weights and autocast are `dtype`: "direct" in fp32, else "jvp"."""
    return "direct" if dtype == torch.float32 else "jvp"


def previous_sample(scheduler, x_t, t, eps, z):
    """DDPM reverse step x_t -> x_{t-1} with "fixed_small" variance (eq. 2), per-sample timesteps.

    x_t, eps, z: (B, C, h, w); t: (B,) long. At t = 0 it returns x0_hat (abar_prev = 1, sigma = 0), as
    diffusers.DDPMScheduler.step does. Coefficients in fp32; the result has x_t's dtype.
    """
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


def down_stack(unet, x, t, cond, depth="mid"):
    """The U-Net's time (+ SDXL text_time) embedding, conv_in, every down block, and the mid block if depth="mid".

    x: (B, C, h, w); t: (B,) long; cond: the U-Net's keyword arguments (encoder_hidden_states, and
    added_cond_kwargs for SDXL). Returns the last hidden state (B, C', h', w'), not the skip connections.
    """
    if depth not in ("down", "mid"):
        raise ValueError(f"depth must be 'down' or 'mid', got {depth!r}")
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
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=hidden)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if depth == "mid":
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=hidden)
        else:
            h = unet.mid_block(h, emb)
    return h


@contextmanager
def base_weights(unet):
    """Run `unet` with its PEFT adapters disabled (the frozen base model); re-enable them even on error."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        yield unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@contextmanager
def _no_block_checkpointing(unet):
    blocks = [m for b in [*unet.down_blocks, unet.mid_block] for m in b.modules()
              if hasattr(m, "gradient_checkpointing")]
    flags = [m.gradient_checkpointing for m in blocks]
    for m in blocks:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, flag in zip(blocks, flags):
            m.gradient_checkpointing = flag


def _base_features(unet, x, t_prev, cond, depth):
    with base_weights(unet), _no_block_checkpointing(unet):
        return down_stack(unet, x, t_prev, cond, depth)


def _base_tangent(unet, x, t_prev, cond, depth, tangent):
    """J_E(x) tangent: the forward-mode derivative of E at x along `tangent`, with the base weights."""
    with base_weights(unet), _no_block_checkpointing(unet), sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
        return fwAD.unpack_dual(down_stack(unet, fwAD.make_dual(x, tangent), t_prev, cond, depth)).tangent


def encode(unet, x, t_prev, cond, depth="mid", tangent=None):
    """E(x, t_prev, c) with the base weights, or J_E(x) tangent if a tangent is given. (B, C', h', w').

    Safe under gradient checkpointing (see below)."""
    if tangent is None:
        fn, inputs = _base_features, (unet, x, t_prev, cond, depth)
    else:
        fn, inputs = _base_tangent, (unet, x, t_prev, cond, depth, tangent)
    if torch.is_grad_enabled() and getattr(unet, "is_gradient_checkpointing", False):
        # The blocks' own checkpointing would recompute them during backward, when the adapters are on
        # again, and silently differentiate the LoRA model instead of the base. So the blocks do not
        # checkpoint here; the whole encoder is checkpointed by a function that disables the adapters
        # itself, and its recomputation runs on the base weights too.
        return checkpoint(fn, *inputs, use_reentrant=False)
    return fn(*inputs)


@torch.no_grad()
def target_features(unet, scheduler, x_t, t, noise, z, cond, depth="mid"):
    """E(x_{t-1}^*, t-1, c): the features of the exact posterior sample, without grad. (B, C', h', w')."""
    x_prev = previous_sample(scheduler, x_t, t, noise, z)
    return encode(unet, x_prev, (t - 1).clamp(min=0), cond, depth)


def perceptual_error(unet, scheduler, x_t, t, pred, noise, z, cond, depth="mid", target=None, method="direct"):
    """Eq. 13: per-sample mean of (E(x_{t-1}^pred) - E(x_{t-1}^*))^2 with the base weights. (B,) fp32.

    method "direct" (fp32) or "jvp" (half precision), see the module docstring. `target` may hold
    target_features(...) computed once and shared between the policy and reference terms ("direct" only).
    Gradients flow into `pred`; the U-Net's weights get none from this call.
    """
    if method == "jvp":
        return perceptual_errors(unet, scheduler, x_t, t, [pred], noise, z, cond, depth, method)[0]
    if method != "direct":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if target is None:
        target = target_features(unet, scheduler, x_t, t, noise, z, cond, depth)
    x_prev = previous_sample(scheduler, x_t, t, pred, z)
    features = encode(unet, x_prev, (t - 1).clamp(min=0), cond, depth)
    return (features.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def perceptual_errors(unet, scheduler, x_t, t, preds, noise, z, cond, depth="mid", method="direct"):
    """Eq. 13 for one or two predictions from the same x_t (policy, reference): [(B,) fp32], sharing the target.

    "direct" computes the target features once for both. "jvp" linearises both at one shared point and carries
    J d_1 (without grad: the reference's) and J (d_0 - d_1) as tangents, so e_0 - e_1 = mean(2 J d_1 J(d_0 - d_1) +
    (J(d_0 - d_1))^2) keeps full relative precision, and so does the DPO margin built from it; the backward runs
    through the second tangent only.
    """
    if method not in METHODS or not 1 <= len(preds) <= 2:
        raise ValueError(f"method must be one of {METHODS} (got {method!r}), with one or two predictions")
    if method == "jvp":
        if len(preds) == 2 and preds[1].requires_grad:
            raise ValueError("the second prediction is the reference's and must carry no grad")
        return _linearised_errors(unet, scheduler, x_t, t, preds, noise, z, cond, depth)
    target = target_features(unet, scheduler, x_t, t, noise, z, cond, depth)
    return [perceptual_error(unet, scheduler, x_t, t, pred, noise, z, cond, depth, target) for pred in preds]


def _linearised_errors(unet, scheduler, x_t, t, preds, noise, z, cond, depth):
    x_star = previous_sample(scheduler, x_t.float(), t, noise, z)  # fp32 throughout: the steps are 0.1-0.4% of x
    deltas = [previous_sample(scheduler, x_t.float(), t, pred, z) - x_star for pred in preds]  # z cancels out
    # The primal point: half way along the (mean) step, a central difference. A constant for the gradient.
    x_mid = (x_star + sum(d.detach() for d in deltas) / (2 * len(deltas))).to(x_t.dtype).contiguous()
    t_prev = (t - 1).clamp(min=0)
    if len(deltas) == 1:
        return [_tangent(unet, x_mid, t_prev, cond, depth, deltas[0]).pow(2).mean(dim=(1, 2, 3))]
    # J d_1 (the reference: no grad), and J (d_0 - d_1), the small policy-reference difference at its own scale.
    with torch.no_grad():
        j1 = _tangent(unet, x_mid, t_prev, cond, depth, deltas[1])
    j01 = _tangent(unet, x_mid, t_prev, cond, depth, deltas[0] - deltas[1])
    return [(j1 + j01).pow(2).mean(dim=(1, 2, 3)), j1.pow(2).mean(dim=(1, 2, 3))]


def _tangent(unet, x, t_prev, cond, depth, delta):
    """J_E(x) delta in fp32, delta passed at unit scale per sample (no fp16 underflow; the JVP is linear)."""
    scale = delta.detach().flatten(1).pow(2).mean(dim=1).sqrt().clamp(min=1e-30).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    tangent = (delta / scale).to(x.dtype).contiguous()  # group_norm's forward-mode rule fails on channels-last input
    return encode(unet, x, t_prev, cond, depth, tangent=tangent).float() * scale


def latent_error(pred, noise):
    """Eq. 3: per-sample mean of (eps - eps_theta)^2 over C, H, W, the latent-space baseline. (B,) fp32."""
    return (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
