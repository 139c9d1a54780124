"""NCP on FLUX.2 [klein]: the prompt embedding, the latents and the transformer's call against Flux2KleinPipeline's
own, the encoder against the transformer's forward truncated at K blocks, Flow-DPO written out, the bf16 JVP
against fp32, and the training scripts on tiny-flux2 (both spaces, torchrun and resume, CPO and SFT, the LoRA in
Flux2KleinPipeline, sample.py)."""

import copy
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import encoder
import launch
import ncp_dpo
import sample
from helpers import ROOT, env, frozen_copy, lora, metrics, train

FLUX2 = ["--model", "tiny-flux2"]


@pytest.fixture(scope="module")
def _tiny_flux2():
    return sample.build_tiny("flux2")


@pytest.fixture
def flux2(_tiny_flux2):
    return frozen_copy(_tiny_flux2)


def test_prompts_latents_and_the_call_are_the_pipelines(flux2):
    """Exactly the pipeline's: encode_prompt (Qwen3's layers 9, 18, 27 and the text RoPE ids), the VAE's latents
    patchified and normalised by its batch-norm statistics (and back), and the transformer's call on packed tokens
    at time t / 1000."""
    pipe = sample.make_pipeline(flux2)
    captions = ["a red circle", "two blue squares on grey"]
    cond = sample.encode_prompt(flux2, captions, repeat=2)
    embeds, ids = pipe.encode_prompt(captions, device="cpu", max_sequence_length=flux2.text_tokens)
    assert torch.equal(cond["encoder_hidden_states"], embeds.repeat(2, 1, 1))
    assert torch.equal(cond["txt_ids"], ids.repeat(2, 1, 1))
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = sample.encode_images(flux2.vae, pixels)
    assert x0.shape == (4, 32, 8, 8) and torch.equal(x0, pipe._encode_vae_image(pixels, generator=None))
    bn_mean = flux2.vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(flux2.vae.bn.running_var.view(1, -1, 1, 1) + flux2.vae.config.batch_norm_eps)
    torch.testing.assert_close(sample._flux2_denormalise(flux2.vae, x0), pipe._unpatchify_latents(x0 * bn_std + bn_mean))
    t = torch.tensor([1000.0, 700.0, 300.0, 10.0])
    tokens, image_ids = pipe._pack_latents(x0), pipe._prepare_latent_ids(x0)
    own = flux2.unet(hidden_states=tokens, timestep=t / 1000, encoder_hidden_states=cond["encoder_hidden_states"],
                     txt_ids=cond["txt_ids"], img_ids=image_ids).sample
    assert torch.equal(sample.denoise(flux2.unet, x0, t, cond), pipe._unpack_latents_with_ids(own, image_ids))
    # the training grid: the scheduler's own, unshifted (dynamic shifting moves only the sampler's), as diffusers'
    # klein LoRA script indexes it
    torch.testing.assert_close(flux2.scheduler.sigmas, torch.linspace(1.0, 1e-3, 1000), rtol=0, atol=1e-6)


def _inputs(models, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2 * n, 32, 8, 8, generator=g)
    x_t, t, target, z = encoder.noised(models.scheduler, x0, n, g)
    cond = sample.encode_prompt(models, ["a red circle", "a blue square", "a green disc"][:n], repeat=2)
    return x_t, t, target, z, cond


@pytest.mark.parametrize("depth, k", [("1", 1), ("third", 2), ("3", 3), ("5", 5)])
def test_the_encoder_is_the_transformers_forward_up_to_block_k(flux2, depth, k):
    """K counts the double-stream blocks (2) then the single-stream ones (4): K = 2 ends in a double block (its
    image stream), 3 and 5 in single blocks (the image tokens of the joint sequence)."""
    x_t, t, _, _, cond = _inputs(flux2)
    blocks = [*flux2.unet.transformer_blocks, *flux2.unet.single_transformer_blocks]
    seen = {}
    hook = blocks[k - 1].register_forward_hook(lambda mod, i, out: seen.update(out=out))
    sample.denoise(flux2.unet, x_t, t, cond)
    hook.remove()
    n = cond["encoder_hidden_states"].shape[1]
    expected = seen["out"][1] if isinstance(seen["out"], tuple) else seen["out"][:, n:]
    features = encoder.down_stack(flux2.unet, x_t, t, cond, depth)
    assert features.shape == expected.shape == (6, 64, 32)  # 8 x 8 patchified latents, width 32
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    for bad in ("6", "0", "mid"):
        with pytest.raises(ValueError, match="'third' or a number of joint blocks from 1 to 5"):
            encoder.down_stack(flux2.unet, x_t, t, cond, bad)


def _lora(models, seed, scale):
    sample.add_lora(models.unet, rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in models.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return [p for n, p in models.unet.named_parameters() if "lora" in n]


def test_flow_dpo_is_diffusion_dpo_with_velocity_errors_written_out(flux2):
    _lora(flux2, 0, 0.05)
    x_t, t, target, _, cond = _inputs(flux2)
    with torch.no_grad():
        v = sample.denoise(flux2.unet, x_t, t, cond)
        with encoder.base_weights(flux2.unet):
            v_ref = sample.denoise(flux2.unet, x_t, t, cond)
    loss, _ = ncp_dpo.dpo_loss(*encoder.latent_error(v, target).chunk(2), *encoder.latent_error(v_ref, target).chunk(2),
                               2500.0)
    n, terms = 3, []
    for i in range(n):  # float64, from the inputs: the velocity target is eps - x0
        err = lambda pred, j: ((pred[j].double() - target[j].double()) ** 2).mean().item()  # noqa: E731
        inside = (err(v, i) - err(v, n + i)) - (err(v_ref, i) - err(v_ref, n + i))
        terms.append(-math.log(1 / (1 + math.exp(2500.0 * inside))))
    assert loss.item() == pytest.approx(sum(terms) / n, rel=1e-3)
    assert abs(loss.item() - math.log(2)) > 1e-3


def _figures(encoder_model, dtype, method, x_t, t, pred, ref_pred, target, cond):
    """e^NCP of a policy's and a reference's predictions (fp32, given) with E in `dtype`, their DPO margin, and the
    loss's gradient with respect to the policy's prediction."""
    pred = pred.detach().requires_grad_()
    if dtype != torch.float32:
        x_t, cond = x_t.to(dtype), {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        e, ref_e = encoder.perceptual_errors(encoder_model.unet, encoder_model.scheduler, x_t=x_t, t=t, pred=pred,
                                             ref_pred=ref_pred, target=target, z=None, cond=cond, depth="third",
                                             method=method)
    inside = ref_e - e
    margin = inside.chunk(2)[0] - inside.chunk(2)[1]
    loss = -torch.nn.functional.logsigmoid(2500 * margin).mean()
    return e.detach(), margin.detach(), torch.autograd.grad(loss, pred)[0].flatten()


def test_the_bf16_jvp_carries_the_step_the_direct_path_loses(flux2):
    """The Euler step back, about 1e-3 of x_s, is below bf16's resolution. With the same predictions, E in bf16
    by the JVP (text and image tokens, the RoPE angles constants) keeps e^NCP, the margin's sign and the gradient
    close to fp32's direct path; the direct difference in bf16 does not."""
    _lora(flux2, 3, 0.3)
    x_t, t, target, _, cond = _inputs(flux2, n=3, seed=5)
    with torch.no_grad():
        pred = sample.denoise(flux2.unet, x_t, t, cond)
        with encoder.base_weights(flux2.unet):
            ref_pred = sample.denoise(flux2.unet, x_t, t, cond)
    e32, margin32, grad32 = _figures(flux2, torch.float32, "direct", x_t, t, pred, ref_pred, target, cond)
    half = copy.deepcopy(flux2)
    half.unet.to(torch.bfloat16)
    e, margin, grad = _figures(half, torch.bfloat16, "jvp", x_t, t, pred, ref_pred, target, cond)
    # measured here: 0.06% (e), 0.85% (margin), cosine 0.99997; the direct path: 103% and cosine 0.59
    assert ((e - e32).abs() / e32).median() < 0.01, (e, e32)
    assert ((margin - margin32).abs() / margin32.abs()).max() < 0.05, (margin, margin32)
    assert torch.nn.functional.cosine_similarity(grad, grad32, dim=0) > 0.999
    e_direct, _, grad_direct = _figures(half, torch.bfloat16, "direct", x_t, t, pred, ref_pred, target, cond)
    assert ((e_direct - e32).abs() / e32).median() > 0.5, (e_direct, e32)  # the reason for the JVP
    assert torch.nn.functional.cosine_similarity(grad_direct, grad32, dim=0) < 0.9


# -----------------------------------------------------------------------------
# The training scripts on tiny-flux2


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("flux2-straight")
    train("ncp_dpo.py", out, *FLUX2, "--max-steps", "4", "--precision", "bf16")
    return out


def test_torchrun_two_ranks_match_one_and_resume_is_exact(straight, tmp_path):
    two = tmp_path / "two"
    proc = train("ncp_dpo.py", two, *FLUX2, "--max-steps", "2", "--precision", "bf16", nproc=2)
    assert "world 2 x micro 2 x accum 1" in proc.stdout and "identical on all 2 ranks: True" in proc.stdout
    proc = train("ncp_dpo.py", two, *FLUX2, "--max-steps", "4", "--resume", nproc=2)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    a, b = lora(straight), lora(two)
    assert a.keys() == b.keys()
    assert {"add_q_proj", "to_qkv_mlp_proj", "single_transformer_blocks.3.attn.to_out"} <= {
        part for k in a for part in ("add_q_proj", "to_qkv_mlp_proj", "single_transformer_blocks.3.attn.to_out")
        if part in k}  # both streams and every single block
    for k in a:  # one process against two: the same step, summed in another order (bit-exact resume: test_dpo.py)
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) and r["e_w"] > 0 for r in rows)


@pytest.mark.parametrize("script, space", [("ncp_dpo.py", "latent"), ("ncp_cpo.py", "ncp"), ("ncp_sft.py", "ncp")])
def test_the_other_space_and_objectives_train_tiny_flux2(tmp_path, script, space):
    train(script, tmp_path, *FLUX2, "--space", space, "--max-steps", "2")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    state = lora(tmp_path)
    assert state and all(k.startswith("transformer.") and torch.isfinite(v).all() for k, v in state.items())


def test_the_lora_loads_in_flux2kleinpipeline_and_sample_py_samples_it(straight, tmp_path):
    from diffusers import DiffusionPipeline, Flux2KleinPipeline

    folder = sample.save_pipeline(sample.build_tiny("flux2"), str(tmp_path / "pipe"))
    assert sample.resolve_model(folder) == (folder, "flux2")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, Flux2KleinPipeline)
    run_pipe = lambda p: p(prompt="a red circle", num_inference_steps=3, height=32, width=32,  # noqa: E731
                           output_type="np", max_sequence_length=64, generator=torch.Generator().manual_seed(0)).images
    before = run_pipe(pipe)
    pipe.load_lora_weights(str(straight))
    after = run_pipe(pipe)
    assert abs(after - before).max() > 1e-4
    models = sample.load_models(folder)  # this repository's own loading gives the same images
    sample.load_lora(models.unet, str(straight))
    torch.testing.assert_close(torch.from_numpy(run_pipe(sample.sampling_pipeline(models))), torch.from_numpy(after))
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    proc = launch.python([sys.executable, os.path.join(ROOT, "sample.py"), "--model", folder, "--lora", straight,
                          "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "images", "--steps", "2",
                          "--resolution", "32"], env(), ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    index = json.load(open(tmp_path / "images" / "index.json"))
    assert len(index["images"]) == 2 and np.asarray(
        __import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "images" / index["images"][0]["files"][0])).std() > 0
