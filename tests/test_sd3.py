"""NCP on Stable Diffusion 3.5's MMDiT with rectified flow: the flow's step back against diffusers' scheduler, the
encoder against the transformer's own forward, the prompt encoding against the pipeline's, the Flow-DPO loss
written out, the bf16 JVP against fp32, and the training scripts on tiny-sd3 (torchrun, resume, the latent cache,
a data format, the LoRA in StableDiffusion3Pipeline)."""

import copy
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import encoder
import ncp_dpo
import sample
from helpers import frozen_copy, lora, metrics, train
from test_bad_inputs import one_line_error, run
from test_formats import write_webdataset


@pytest.fixture(scope="module")
def _tiny_sd3():
    return sample.build_tiny("sd3")


@pytest.fixture
def sd3(_tiny_sd3):
    return frozen_copy(_tiny_sd3)


def _grid_scheduler(models):
    """diffusers' own sampler set to the 1000-point training grid (plus its terminal 0): the oracle of a step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(models.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 1000))  # unshifted; it applies the shift itself
    return scheduler


@pytest.mark.parametrize("step_back", [1, 5])
def test_the_step_back_is_the_schedulers_euler_step(sd3, step_back):
    oracle = _grid_scheduler(sd3)
    assert torch.equal(oracle.sigmas[:-1], sd3.scheduler.sigmas) and oracle.sigmas[-1] == 0
    g = torch.Generator().manual_seed(0)
    index = [0, 1, 250, 500, 996, 998, 999]
    x, v = torch.randn(len(index), 16, 8, 8, generator=g), torch.randn(len(index), 16, 8, 8, generator=g)
    t = sd3.scheduler.timesteps[index]
    mine = encoder.previous_sample(sd3.scheduler, x, t, v, None, step_back)  # per-sample timesteps, one call
    for row, i in enumerate(index):
        expected = x[row:row + 1]
        for k in range(step_back):  # step_back grid points: as many Euler steps of the same velocity
            if i + k < 1000:
                oracle._step_index = i + k
                expected = oracle.step(v[row:row + 1], oracle.timesteps[i + k], expected).prev_sample
        torch.testing.assert_close(mine[row:row + 1], expected, rtol=0, atol=2e-6)
        sigma_prev = oracle.sigmas[min(i + step_back, 1000)]
        assert encoder.previous_timestep(sd3.scheduler, t[row:row + 1], step_back).item() == pytest.approx(
            float(sigma_prev) * 1000, abs=1e-3)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    x_t, t, target, _ = encoder.noised(sd3.scheduler, x0, 2, g)
    s_prev = torch.tensor([float(oracle.sigmas[min(int(torch.argmin((oracle.timesteps - ti).abs())) + step_back,
                                                   1000)]) for ti in t]).view(-1, 1, 1, 1)
    x_star = encoder.previous_sample(sd3.scheduler, x_t, t, target, None, step_back)
    # the true velocity's step lands on the straight path itself: (1 - s') x0 + s' eps
    eps = target + x0
    torch.testing.assert_close(x_star, (1 - s_prev) * x0 + s_prev * eps, rtol=0, atol=1e-5)


def test_noised_draws_sd3s_training_inputs_and_leaves_ddpm_as_it_was(sd3):
    n, g = 4000, torch.Generator().manual_seed(1)
    x0 = torch.randn(2 * n, 16, 2, 2, generator=g)
    x_t, t, target, z = encoder.noised(sd3.scheduler, x0, n, g)
    assert z is None
    index = torch.tensor([int(torch.argmin((sd3.scheduler.timesteps - ti).abs())) for ti in t[:n]])
    assert torch.equal(sd3.scheduler.timesteps[index], t[:n]) and torch.equal(t[:n], t[n:])  # the pair's images share
    s = sd3.scheduler.sigmas[index].repeat(2).view(-1, 1, 1, 1)
    eps = target + x0
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(eps[:n], eps[n:])
    # u ~ logit-normal(0, 1) on the grid: P(1/3 < u < 2/3) = P(|N(0, 1)| < ln 2) = 0.512
    middle = ((index >= 333) & (index < 667)).float().mean().item()
    assert abs(middle - math.erf(math.log(2) / math.sqrt(2))) < 0.03, middle
    # DDPM: the draws the training scripts made before, in the same order (old runs replay exactly)
    ddpm = sample.build_tiny("sd15").scheduler
    x0 = torch.randn(6, 4, 4, 4)
    x_t, t, noise, z = encoder.noised(ddpm, x0, 3, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t_old = torch.randint(0, 1000, (3,), generator=g).repeat(2)
    noise_old = torch.randn(3, 4, 4, 4, generator=g).repeat(2, 1, 1, 1)
    z_old = torch.randn(3, 4, 4, 4, generator=g).repeat(2, 1, 1, 1)
    assert torch.equal(t, t_old) and torch.equal(noise, noise_old) and torch.equal(z, z_old)
    assert torch.equal(x_t, ddpm.add_noise(x0, noise_old, t_old))


def _inputs(models, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2 * n, 16, 16, 16, generator=g)
    x_t, t, target, z = encoder.noised(models.scheduler, x0, n, g)
    cond = sample.encode_prompt(models, ["a red circle", "a blue square", "a green disc"][:n], repeat=2)
    return x_t, t, target, z, cond


@pytest.mark.parametrize("depth, k", [("1", 1), ("third", 2), ("5", 5)])
def test_the_encoder_is_the_transformers_forward_up_to_block_k(sd3, depth, k):
    x_t, t, _, _, cond = _inputs(sd3)
    seen = {}
    hook = sd3.unet.transformer_blocks[k - 1].register_forward_hook(lambda mod, i, out: seen.update(image=out[1]))
    sd3.unet(x_t, timestep=t, **cond)
    hook.remove()
    features = encoder.down_stack(sd3.unet, x_t, t, cond, depth)
    assert features.shape == seen["image"].shape == (6, 64, 32)  # 16 x 16 latents in 2 x 2 patches, width 32
    torch.testing.assert_close(features, seen["image"], rtol=0, atol=0)
    for bad in ("6", "0", "mid"):
        with pytest.raises(ValueError, match="'third' or a number of joint blocks from 1 to 5"):
            encoder.down_stack(sd3.unet, x_t, t, cond, bad)


@pytest.mark.parametrize("t5", [True, False])
def test_prompt_encoding_is_the_pipelines(sd3, t5):
    if not t5:
        sd3.text_encoders[2] = sd3.tokenizers[2] = None
    captions = ["a red circle", "two blue squares on grey"]
    cond = sample.encode_prompt(sd3, captions, repeat=2)
    embeds, _, pooled, _ = sample.make_pipeline(sd3).encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                                   max_sequence_length=sd3.text_tokens)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds.repeat(2, 1, 1))
    torch.testing.assert_close(cond["pooled_projections"], pooled.repeat(2, 1))
    assert (cond["encoder_hidden_states"][:, 16:].abs().sum() == 0) == (not t5)  # zeros in T5's place


def test_flow_dpo_is_diffusion_dpo_with_velocity_errors_written_out(sd3):
    sample.add_lora(sd3.unet, rank=4)
    with torch.no_grad():
        for name, p in sd3.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    x_t, t, target, _, cond = _inputs(sd3)
    with torch.no_grad():
        v = sd3.unet(x_t, timestep=t, **cond).sample
        with encoder.base_weights(sd3.unet):
            v_ref = sd3.unet(x_t, timestep=t, **cond).sample
    loss, _ = ncp_dpo.dpo_loss(*encoder.latent_error(v, target).chunk(2), *encoder.latent_error(v_ref, target).chunk(2),
                               2500.0)
    # Flow-DPO written out in float64 from the inputs: the velocity target is eps - x0, the pair's x_s share s and eps
    n, terms = 3, []
    for i in range(n):
        w, l = i, n + i
        err = lambda pred, j: ((pred[j].double() - target[j].double()) ** 2).mean().item()  # noqa: E731
        inside = (err(v, w) - err(v, l)) - (err(v_ref, w) - err(v_ref, l))
        terms.append(-math.log(1 / (1 + math.exp(2500.0 * inside))))  # -log sigmoid(-beta * inside)
    assert loss.item() == pytest.approx(sum(terms) / n, rel=1e-3)  # fp32 means of errors near 4, times 2500
    assert abs(loss.item() - math.log(2)) > 1e-3  # the policy differs from the reference: not the trivial ln 2


def _figures(models, lora_params, x_t, t, target, cond, dtype, method):
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        pred = models.unet(x_t, timestep=t, **cond).sample
        with torch.no_grad(), encoder.base_weights(models.unet):
            ref_pred = models.unet(x_t, timestep=t, **cond).sample
        e, ref_e = encoder.perceptual_errors(models.unet, models.scheduler, x_t=x_t, t=t, pred=pred, ref_pred=ref_pred,
                                             target=target, z=None, cond=cond, depth="third", method=method)
    inside = ref_e - e
    margin = inside.chunk(2)[0] - inside.chunk(2)[1]
    loss = -torch.nn.functional.logsigmoid(2500 * margin).mean()
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, lora_params)])
    return e.detach(), margin.detach(), grad


def test_the_bf16_jvp_carries_the_step_the_direct_path_loses(sd3):
    """The flow's step, 1e-3 of x_s, is below bf16's resolution: the JVP keeps e^NCP, its margin and its gradient
    within a few percent of fp32's; the direct difference in bf16 does not."""
    sample.add_lora(sd3.unet, rank=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sd3.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x_t, t, target, _, cond = _inputs(sd3, n=3, seed=5)
    params = lambda m: [p for n, p in m.unet.named_parameters() if "lora" in n]  # noqa: E731
    e32, margin32, grad32 = _figures(sd3, params(sd3), x_t, t, target, cond, torch.float32, "direct")
    half = copy.deepcopy(sd3)
    half.unet.to(torch.bfloat16)
    for p in params(half):
        p.data = p.data.float()  # as sample.add_lora keeps them
    cond16 = {k: v.to(torch.bfloat16) for k, v in cond.items()}
    e, margin, grad = _figures(half, params(half), x_t.to(torch.bfloat16), t, target, cond16, torch.bfloat16, "jvp")
    assert ((e - e32).abs() / e32).median() < 0.05, (e, e32)
    assert (torch.sign(margin) == torch.sign(margin32)).all()  # as for the U-Net: the policy's preference holds
    assert torch.nn.functional.cosine_similarity(grad, grad32, dim=0) > 0.98
    e_direct, _, _ = _figures(half, params(half), x_t.to(torch.bfloat16), t, target, cond16, torch.bfloat16, "direct")
    assert ((e_direct - e32).abs() / e32).median() > 1.0, (e_direct, e32)  # the reason for the JVP


@pytest.mark.numerics
def test_the_fp32_jvp_equals_the_direct_path_with_its_gradient(sd3):
    x_t, t, target, _, cond = _inputs(sd3, n=2, seed=9)
    g = torch.Generator().manual_seed(2)
    pred = (target + 0.3 * torch.randn(target.shape, generator=g)).requires_grad_()
    out = {}
    for method in encoder.METHODS:
        e = encoder.perceptual_errors(sd3.unet, sd3.scheduler, x_t=x_t, t=t, pred=pred, target=target, z=None,
                                      cond=cond, depth="third", method=method)
        out[method] = (e.detach(), torch.autograd.grad(e.sum(), pred)[0])
    torch.testing.assert_close(out["jvp"][0], out["direct"][0], rtol=2e-3, atol=0)
    torch.testing.assert_close(out["jvp"][1], out["direct"][1], rtol=2e-2, atol=1e-9)


# -----------------------------------------------------------------------------
# The training scripts on tiny-sd3

SD3 = ["--model", "tiny-sd3"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3-straight")
    train("ncp_dpo.py", out, *SD3, "--max-steps", "4", "--precision", "bf16")
    return out


def test_torchrun_two_ranks_match_one_and_resume_is_exact(straight, tmp_path):
    two = tmp_path / "two"
    proc = train("ncp_dpo.py", two, *SD3, "--max-steps", "2", "--precision", "bf16", nproc=2)
    assert "world 2 x micro 2 x accum 1" in proc.stdout and "identical on all 2 ranks: True" in proc.stdout
    proc = train("ncp_dpo.py", two, *SD3, "--max-steps", "4", "--resume", nproc=2)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    a, b = lora(straight), lora(two)
    assert a.keys() == b.keys() and any("add_q_proj" in k for k in a)  # both streams
    for k in a:  # (bit-exact resume in one process is model-independent: test_dpo.py checks it)
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(0 < r["e_w"] < 1e-2 for r in rows)


def test_a_resume_without_model_checks_the_flags_against_the_runs_own_model(tmp_path):
    """An SD3 run with --step-back 3 (refused for a U-Net) resumed without --model: the model is the checkpoint's,
    not the default SDXL, before any flag is checked."""
    train("ncp_dpo.py", tmp_path, *SD3, "--max-steps", "1", "--step-back", "3", "--save-every", "1")
    proc = train("ncp_dpo.py", tmp_path, "--max-steps", "2", "--resume")
    assert "resumed from" in proc.stdout and "tiny-sd3" in proc.stdout and [r["step"] for r in metrics(tmp_path)] == [1, 2]


def test_the_lora_loads_in_stablediffusion3pipeline_and_changes_the_images(straight, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    folder = sample.save_pipeline(sample.build_tiny("sd3"), str(tmp_path / "pipe"))
    assert sample.resolve_model(folder) == (folder, "sd3")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    run_pipe = lambda p: p("a red circle", num_inference_steps=3, height=32, width=32, output_type="np",  # noqa: E731
                           max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
    before = run_pipe(pipe)
    pipe.load_lora_weights(str(straight))
    after = run_pipe(pipe)
    assert abs(after - before).max() > 1e-4
    models = sample.load_models(folder)  # this repository's own loading gives the same images
    sample.load_lora(models.unet, str(straight))
    torch.testing.assert_close(torch.from_numpy(run_pipe(sample.sampling_pipeline(models))), torch.from_numpy(after))


@pytest.mark.parametrize("script, space", [("ncp_cpo.py", "ncp"), ("ncp_sft.py", "latent")])
def test_cpo_and_sft_train_tiny_sd3(tmp_path, script, space):
    """Each objective on SD3 (DPO's two spaces are above; CPO's and SFT's branches are the U-Net's, tested there)."""
    train(script, tmp_path, *SD3, "--max-steps", "2", "--space", space, "--no-t5", "--step-back", "5")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert any("add_q_proj" in k for k in load_file(str(tmp_path / sample.LORA_FILE)))


def test_latent_dpo_with_a_16_channel_cache_on_webdataset(tmp_path):
    source = write_webdataset(tmp_path / "wds")
    cache = tmp_path / "cache"
    out = train("ncp_dpo.py", tmp_path / "run", *SD3, "--max-steps", "2", "--space", "latent", "--data", source,
                "--cache-latents", str(cache)).stdout
    assert '"format": "webdataset"' in out and "to encode" in out
    shapes = {np.load(os.path.join(root, f), mmap_mode="r").shape[1:] for root, _, files in os.walk(cache)
              for f in files if f == "latents.npy"}
    assert shapes == {(2, 16, 16, 16)}, shapes  # a pair of 16-channel latents at 32 px
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]


@pytest.mark.parametrize("args, fragment", [
    (["ncp_dpo.py", "--model", "tiny-sd3", "--encoder-depth", "mid"], "--encoder-depth mid must be third or a number"),
    (["ncp_dpo.py", "--model", "tiny-sd3", "--encoder-depth", "6"], "from 1 to 5, got '6'"),
    (["ncp_cpo.py", "--model", "tiny", "--step-back", "3"], "--step-back 3 must be 1 (a DDPM model's step back"),
    (["spo.py", "--model", "tiny-sd3"], "spo.py trains SD1.5 and SDXL only"),
    (["spo.py", "--model", "tiny-flux2"], "tiny-flux2 is a rectified flow (FLUX2)"),
], ids=["unet depth on sd3", "too deep", "step back on ddpm", "spo on sd3", "spo on flux2"])
def test_sd3_flags_a_model_cannot_take_are_one_line(tmp_path, args, fragment):
    proc = run(*args, "--data", "synthetic", "--output-dir", tmp_path / "run", "--max-steps", "1")
    one_line_error(proc, fragment)
    assert not (tmp_path / "run").exists()


def test_sample_py_refuses_ddim_and_another_models_lora_for_sd3(straight, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    one_line_error(run("sample.py", "--model", "tiny-sd3", "--prompts", prompts, "--out", tmp_path / "a",
                       "--protocol", "spo"), "SD3 samples with its flow-matching Euler scheduler")
    one_line_error(run("sample.py", "--model", "tiny", "--lora", straight, "--prompts", prompts, "--out", tmp_path / "b",
                       "--steps", "2"), "is for a transformer")
