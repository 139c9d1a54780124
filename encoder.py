"""The noise-conditioned perceptual encoder of NCP (Gambashidze et al. 2024, section 3).

The errors of DPO / CPO / SFT are measured in the feature space of the frozen base U-Net's down stack,
evaluated one step back along the reverse process:

    x_{t-1}^pred = previous_sample(x_t, t, pred, z)          eq. 2, the DDPM posterior sample
    x_{t-1}^*    = previous_sample(x_t, t, noise, z)         the exact posterior sample (target)
    e^NCP        = || E(x_{t-1}^pred, t-1, c) - E(x_{t-1}^*, t-1, c) ||^2     eq. 13, mean over C, H, W

E is the base U-Net (LoRA adapters disabled, so no second copy of the weights) up to the last down block
("down") or through the mid block ("mid"). Its weights get no gradient; gradients flow through it into
`pred` and from there into the LoRA weights of the policy.

Copy this file as it is: it depends on torch and on a diffusers UNet2DConditionModel only.
"""

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint


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
    mu = (abar_prev.sqrt() * beta_t / (1 - abar_t)) * x0_hat + ((1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x_t32
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
    blocks = [m for b in [*unet.down_blocks, unet.mid_block] for m in b.modules() if hasattr(m, "gradient_checkpointing")]
    flags = [m.gradient_checkpointing for m in blocks]
    for m in blocks:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, flag in zip(blocks, flags):
            m.gradient_checkpointing = flag


def _base_features(unet, x, s, cond, depth):
    with base_weights(unet), _no_block_checkpointing(unet):
        return down_stack(unet, x, s, cond, depth)


def encode(unet, x, s, cond, depth="mid"):
    """E(x, s, c) with the base weights. Safe under gradient checkpointing (see below). (B, C', h', w')."""
    if torch.is_grad_enabled() and getattr(unet, "is_gradient_checkpointing", False):
        # The blocks' own checkpointing would recompute them during backward, when the adapters are on
        # again, and silently differentiate the LoRA model instead of the base. So the blocks do not
        # checkpoint here; the whole encoder is checkpointed by a function that disables the adapters
        # itself, and its recomputation runs on the base weights too.
        return checkpoint(_base_features, unet, x, s, cond, depth, use_reentrant=False)
    return _base_features(unet, x, s, cond, depth)


@torch.no_grad()
def target_features(unet, scheduler, x_t, t, noise, z, cond, depth="mid"):
    """E(x_{t-1}^*, t-1, c): the features of the exact posterior sample, without grad. (B, C', h', w')."""
    x_prev = previous_sample(scheduler, x_t, t, noise, z)
    return encode(unet, x_prev, (t - 1).clamp(min=0), cond, depth)


def perceptual_error(unet, scheduler, x_t, t, pred, noise, z, cond, depth="mid", target=None):
    """Eq. 13: per-sample mean of (E(x_{t-1}^pred) - E(x_{t-1}^*))^2 with the base weights. (B,) fp32.

    `target` may hold target_features(...) computed once and shared between the policy and reference
    terms. Gradients flow into `pred`; the U-Net's weights get none from this call.
    """
    if target is None:
        target = target_features(unet, scheduler, x_t, t, noise, z, cond, depth)
    x_prev = previous_sample(scheduler, x_t, t, pred, z)
    features = encode(unet, x_prev, (t - 1).clamp(min=0), cond, depth)
    return (features.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def latent_error(pred, noise):
    """Eq. 3: per-sample mean of (eps - eps_theta)^2 over C, H, W, the latent-space baseline. (B,) fp32."""
    return (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
