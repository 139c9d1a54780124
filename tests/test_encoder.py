"""encoder.py against independent oracles: diffusers' DDPMScheduler.step and the U-Net's own forward."""

import os
import sys

import pytest
import torch
from diffusers import DDPMScheduler

import encoder
import sample


def sd_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, prediction_type="epsilon")


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_previous_sample_matches_ddpm_step(t):
    scheduler = sd_scheduler()
    x_t, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    # DDPMScheduler.step draws its variance noise with randn_tensor(generator); draw the same z here.
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    got = encoder.previous_sample(scheduler, x_t, torch.full((3,), t), eps, z)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_previous_sample_per_sample_timesteps_and_t0_is_x0_hat():
    scheduler = sd_scheduler()
    ts = torch.tensor([0, 1, 500, 999])
    x_t, eps, z = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    batch = encoder.previous_sample(scheduler, x_t, ts, eps, z)
    for i, t in enumerate(ts):
        one = encoder.previous_sample(scheduler, x_t[i:i + 1], t[None], eps[i:i + 1], z[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], one)
    abar0 = scheduler.alphas_cumprod[0]
    x0_hat = (x_t[0] - (1 - abar0).sqrt() * eps[0]) / abar0.sqrt()
    torch.testing.assert_close(batch[0], x0_hat)  # no noise added at t = 0


def _hooked_state(unet, block, x, t, cond):
    seen = {}

    def hook(module, inputs, output):  # returns None, so the forward is left unchanged
        seen["h"] = output[0] if isinstance(output, tuple) else output

    handle = block.register_forward_hook(hook)
    unet(x, t, **cond)
    handle.remove()
    return seen["h"]


@pytest.mark.parametrize("depth", ["down", "mid"])
def test_down_stack_matches_unet_forward(models, depth):
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 700])
    cond = sample.encode_prompt(models, ["a red circle", "a blue square"], original_sizes=[[40, 32], [32, 32]],
                                crops_top_left=[[4, 0], [0, 0]], target_size=[32, 32])
    block = models.unet.down_blocks[-1] if depth == "down" else models.unet.mid_block
    expected = _hooked_state(models.unet, block, x, t, cond)
    torch.testing.assert_close(encoder.down_stack(models.unet, x, t, cond, depth), expected)


def _setup(models, seed=0):
    """A LoRA'd U-Net whose adapters are not the identity, and one noisy batch."""
    g = torch.Generator().manual_seed(seed)
    lora = list(sample.add_lora(models.unet, rank=4).values())
    for p in lora:
        p.data = torch.randn(p.shape, generator=g) * 0.1
    x0, noise, z = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
    t = torch.tensor([0, 400])
    x_t = models.scheduler.add_noise(x0, noise, t)
    cond = sample.encode_prompt(models, ["a red circle", "a blue square"])
    return lora, x_t, t, noise, z, cond


def _adapters_on(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and all(not m.disable_adapters for m in layers)


def ncp(models, x_t, t, pred, target, z, cond, depth="mid", **kwargs):
    """encoder.perceptual_errors on a test model."""
    return encoder.perceptual_errors(models.unet, models.scheduler, x_t=x_t, t=t, pred=pred, target=target, z=z,
                                     cond=cond, depth=depth, **kwargs)


def test_perceptual_error_zero_when_pred_is_noise(models):
    _, x_t, t, noise, z, cond = _setup(models)
    err = ncp(models, x_t, t, noise, noise, z, cond)
    assert err.shape == (2,)
    assert torch.all(err == 0)
    err = ncp(models, x_t, t, noise + 0.1, noise, z, cond)
    assert torch.all(err > 0)


def test_encoder_uses_base_weights_and_restores_adapters(models):
    import copy

    base = copy.deepcopy(models.unet)
    _, x_t, t, noise, z, cond = _setup(models)
    lora_out = models.unet(x_t, t, **cond).sample
    assert not torch.allclose(lora_out, base(x_t, t, **cond).sample)  # the adapters do change the model
    s = (t - 1).clamp(min=0)
    torch.testing.assert_close(encoder.encode(models.unet, x_t, s, cond, "down"),
                               encoder.down_stack(base, x_t, s, cond, "down"))
    assert _adapters_on(models.unet)
    torch.testing.assert_close(models.unet(x_t, t, **cond).sample, lora_out)


def test_adapters_restored_when_encoder_raises(models, monkeypatch):
    _, x_t, t, noise, z, cond = _setup(models)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(models.unet.conv_in, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ncp(models, x_t, t, noise, noise, z, cond)
    assert _adapters_on(models.unet)


def test_gradient_reaches_pred_and_lora_but_no_base_weight(models):
    lora, x_t, t, noise, z, cond = _setup(models)
    pred = models.unet(x_t, t, **cond).sample  # the policy: base + LoRA
    err = ncp(models, x_t, t, pred, noise, z, cond)
    err.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    lora_ids = {id(p) for p in lora}
    assert all(p.grad is None for p in models.unet.parameters() if id(p) not in lora_ids)
    assert _adapters_on(models.unet)


def test_target_features_can_be_shared_and_gradient_checkpointing_gives_same_grad(models):
    _, x_t, t, noise, z, cond = _setup(models)
    target = encoder.target_features(models.unet, models.scheduler, x_t=x_t, t=t, target=noise, z=z, cond=cond,
                                     depth="mid")
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            models.unet.enable_gradient_checkpointing()
        pred = (noise + 0.3 * torch.randn_like(noise)).requires_grad_() if not grads else pred.detach().requires_grad_()
        err = ncp(models, x_t, t, pred, noise, z, cond)
        err.sum().backward()
        grads.append(pred.grad)
        with torch.no_grad():  # the target features are E of the exact step, as eq. 13 compares them
            x_prev = encoder.previous_sample(models.scheduler, x_t, t, pred, z)
            features = encoder.encode(models.unet, x_prev, (t - 1).clamp(min=0), cond, "mid")
        torch.testing.assert_close(err.detach(), (features - target).pow(2).mean(dim=(1, 2, 3)))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


# -----------------------------------------------------------------------------
# Half precision: the "jvp" method the scripts use in bf16 / fp16, against the exact fp32 "direct" one


def _old_perceptual_error(unet, scheduler, x_t, t, pred, noise, z, cond, depth):
    """eq. 13 written out: two passes of the base encoder at t-1, the mean squared feature difference."""
    s = (t - 1).clamp(min=0)
    with torch.no_grad(), encoder.base_weights(unet):
        target = encoder.down_stack(unet, encoder.previous_sample(scheduler, x_t, t, noise, z), s, cond, depth)
    with encoder.base_weights(unet):
        features = encoder.down_stack(unet, encoder.previous_sample(scheduler, x_t, t, pred, z), s, cond, depth)
    return (features.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def test_fp32_path_is_bit_equal_to_eq13_written_out(models):
    _, x_t, t, noise, z, cond = _setup(models)
    pred = noise + 0.3 * torch.randn_like(noise)
    assert encoder.method_for(torch.float32) == "direct"
    expected = _old_perceptual_error(models.unet, models.scheduler, x_t, t, pred, noise, z, cond, "mid")
    assert torch.equal(ncp(models, x_t, t, pred, noise, z, cond), expected)
    both = ncp(models, x_t, t, pred, noise, z, cond, ref_pred=noise + 0.1, method=encoder.method_for(torch.float32))
    assert torch.equal(both[0], expected)


def _half_setup(models, n=8):
    """A policy LoRA that differs from the base, n pairs at timesteps over [0, 1000) (t < 50 included)."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)  # add_lora's own draws (lora_A) too: the same LoRA whatever ran before
    lora = sample.add_lora(models.unet, rank=4)
    with torch.no_grad():
        for name, p in lora.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x0 = torch.randn(2 * n, 4, 8, 8, generator=g)
    noise, z = (torch.randn(n, 4, 8, 8, generator=g).repeat(2, 1, 1, 1) for _ in range(2))
    t = torch.tensor([0, 3, 20, 49, 150, 400, 700, 999][:n]).repeat(2)
    cond = sample.encode_prompt(models, ["a red circle"] * n, repeat=2)
    return lora, models.scheduler.add_noise(x0, noise, t), t, noise, z, cond


def _dpo_figures(models, lora, x_t, t, noise, z, cond, dtype):
    """e^NCP of policy and reference, the DPO margins and the loss gradient on the LoRA, as ncp_dpo.py runs them."""
    unet = models.unet
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        pred = unet(x_t, t, **cond).sample
        with torch.no_grad(), encoder.base_weights(unet):
            ref_pred = unet(x_t, t, **cond).sample
        e, ref_e = ncp(models, x_t, t, pred, noise, z, cond, ref_pred=ref_pred, method=encoder.method_for(dtype))
    inside = ref_e - e
    margin = inside.chunk(2)[0] - inside.chunk(2)[1]
    loss = -torch.nn.functional.logsigmoid(2500 * margin).mean()
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(lora.values()))])
    return e.detach(), margin.detach(), grad


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_perceptual_error_agrees_with_fp32(models, dtype):
    import copy

    lora, x_t, t, noise, z, cond = _half_setup(models)
    e32, margin32, grad32 = _dpo_figures(models, lora, x_t, t, noise, z, cond, torch.float32)
    half = copy.deepcopy(models)
    half.unet.to(dtype)
    lora_half = {n: p for n, p in half.unet.named_parameters() if "lora" in n}
    for p in lora_half.values():
        p.data = p.data.float()  # as sample.add_lora keeps them
    e, margin, grad = _dpo_figures(half, lora_half, x_t, t, noise, z, cond, dtype)
    rel = ((e - e32).abs() / e32).median()
    assert rel < 0.05, f"median relative error of e^NCP {rel:.3f}"
    big = margin32.abs() >= 0.01 * e32.view(2, -1).mean(0)
    assert big.sum() >= 4 and (torch.sign(margin[big]) == torch.sign(margin32[big])).all()
    assert torch.nn.functional.cosine_similarity(grad, grad32, dim=0) > 0.99


@pytest.mark.numerics
def test_linearised_error_matches_direct_in_fp32_with_grad_and_checkpointing(models):
    """The "jvp" method in fp32 against the exact one, at t = 0 too; checkpointing changes nothing."""
    _, x_t, t, noise, z, cond = _setup(models)
    pred = (noise + 0.5 * torch.randn_like(noise)).requires_grad_()
    exact = ncp(models, x_t, t, pred, noise, z, cond)
    g_exact, = torch.autograd.grad(exact.sum(), pred)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            models.unet.enable_gradient_checkpointing()
        lin = ncp(models, x_t, t, pred, noise, z, cond, method="jvp")
        torch.testing.assert_close(lin, exact, rtol=2e-3, atol=0)
        grads.append(torch.autograd.grad(lin.sum(), pred)[0])
        assert _adapters_on(models.unet)
    torch.testing.assert_close(grads[0], grads[1])
    assert torch.nn.functional.cosine_similarity(grads[0].flatten(), g_exact.flatten(), dim=0) > 0.999
    zero = ncp(models, x_t, t, noise, noise, z, cond, method="jvp")
    assert torch.all(zero == 0)


def test_linearised_errors_take_channels_last_latents(models):
    """The VAE can hand back channels-last latents; group_norm's forward-mode rule fails on such input."""
    _, x_t, t, noise, z, cond = _setup(models)
    preds = [noise + 0.3 * torch.randn_like(noise), noise + 0.2 * torch.randn_like(noise)]
    plain = ncp(models, x_t, t, preds[0], noise, z, cond, ref_pred=preds[1], method="jvp")
    last = x_t.to(memory_format=torch.channels_last)
    assert not last.is_contiguous()
    got = ncp(models, last, t, preds[0], noise, z, cond, ref_pred=preds[1], method="jvp")
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="must carry no grad"):  # its gradient would be dropped
        ncp(models, x_t, t, preds[0], noise, z, cond, ref_pred=preds[1].requires_grad_(), method="jvp")


# -----------------------------------------------------------------------------
# The bounded-memory JVP against the composite forward mode it replaced (PyTorch's own rules, math attention)


def _composite_attention_jvp(attn, x, dx, context=None):
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
        out = fwAD.unpack_dual(attn(fwAD.make_dual(x, dx), encoder_hidden_states=context))
    return out.primal, out.tangent


@pytest.mark.parametrize("cross", [False, True])
def test_chunked_attention_tangent_equals_composite_on_an_sd15_sized_layer(cross, monkeypatch):
    """SD1.5's first attention level: 4096 tokens, 320 channels, 8 heads; self- and cross-attention (whose keys and
    values have no tangent). In fp32, chunked into 8 blocks of queries, and into 64 with a smaller budget."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(320, cross_attention_dim=768 if cross else None, heads=8, dim_head=40).requires_grad_(False)
    x, dx = torch.randn(1, 4096, 320), torch.randn(1, 4096, 320)
    context = torch.randn(1, 77, 768) if cross else None
    primal, tangent = _composite_attention_jvp(attn, x, dx, context)
    for chunk in (encoder.ATTENTION_CHUNK, 2**19):
        monkeypatch.setattr(encoder, "ATTENTION_CHUNK", chunk)
        with torch.no_grad(), encoder._JvpMode():
            got_primal, got = torch.func.jvp(lambda h: attn(h, encoder_hidden_states=context), (x,), (dx,))
        torch.testing.assert_close(got_primal, primal, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, tangent, rtol=1e-4, atol=1e-5 * tangent.abs().max().item())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_jvp_equals_the_composite_forward_mode_with_its_gradient(models, checkpointing):
    """encoder.jvp (one primal for two tangents, chunked attention, stage-wise backward through the primal) against
    torch.autograd.forward_ad with PyTorch's rules and math attention, in fp32: both tangents and the gradient."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import encoder_cost

    lora, x_t, t, noise, z, cond = _setup(models)
    if checkpointing:
        models.unet.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(5)
    d0, d1 = (torch.randn(x_t.shape, generator=g) * 0.01 for _ in range(2))
    results = []
    for fn in (encoder.jvp, encoder_cost.composite_jvp):
        leaf = d0.clone().requires_grad_()
        j0, j1 = fn(models.unet, x_t, t, cond, "mid", [leaf, d1])
        assert not j1.requires_grad
        direction = torch.randn(j0.shape, generator=torch.Generator().manual_seed(6))  # the same for both
        grad, = torch.autograd.grad((j0 * direction).sum(), leaf)
        results.append((j0.detach(), j1, grad))
        assert _adapters_on(models.unet)
    for got, expected in zip(*results):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_fp16_jvp_gradient_survives_a_zero_step(models):
    """Policy == reference gives a zero tangent (d_pol - d_ref = 0); the gradient through it must not underflow in
    fp16 (a scale clamped to 1e-30 once zeroed it), nor through a tiny step."""
    _, x_t, t, noise, z, cond = _setup(models)
    models.unet.to(torch.float16)
    x = x_t.to(torch.float16)
    grads = {}
    for size in (0.0, 1e-12, 1.0):
        leaf = (torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1)) * size).requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            j, = encoder.jvp(models.unet, x, t, cond, "mid", [leaf])
        assert torch.isfinite(j).all() and (j.abs().sum() > 0) == (size > 0)
        grads[size], = torch.autograd.grad((j * 1e-6 + j.detach().mean()).sum(), leaf)  # a small upstream gradient
        assert torch.isfinite(grads[size]).all() and grads[size].abs().sum() > 0
    # linear in the tangent: the gradient does not depend on the step, so all three agree
    torch.testing.assert_close(grads[0.0], grads[1.0], rtol=1e-2, atol=1e-3 * grads[1.0].abs().max().item())
    torch.testing.assert_close(grads[1e-12], grads[1.0], rtol=1e-2, atol=1e-3 * grads[1.0].abs().max().item())


def test_jvp_runs_on_a_unet_in_train_mode(models):
    """spo.py trains with unet.train(): the frozen encoder then calls dropout (p = 0), which vmap must allow."""
    _, x_t, t, noise, z, cond = _setup(models)
    d = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(2))
    expected, = encoder.jvp(models.unet.eval(), x_t, t, cond, "mid", [d])
    got, = encoder.jvp(models.unet.train(), x_t, t, cond, "mid", [d])
    torch.testing.assert_close(got, expected)
