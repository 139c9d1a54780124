"""spo.py: the DDIM step against diffusers, the pair rule, the loss against SPO's published form, the NCP-space
log-ratios against the latent ones, sampling's independence of the batch, and whole runs under torchrun."""

import copy
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import encoder
import sample
import spm
import spo
import launch
from helpers import ROOT, env

# --data is left to the tiny models' default, synthetic
SPO_FAST = ["--preference-model", "tiny", "--log-every", "1", "--save-every", "1000", "--epochs", "1"]


def spo_train(out, *args, nproc=1, check=True):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + [os.path.join(ROOT, "spo.py"), "--output-dir", str(out), *SPO_FAST, *args]
    if nproc == 1:
        proc = launch.python(cmd, env(), ROOT, 600)
    else:
        cmd, environ = launch.for_torchrun(cmd, env())
        proc = subprocess.run(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc


def ddim(alpha_to_one=True, steps=20):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      steps_offset=1, set_alpha_to_one=alpha_to_one)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_ddim_step_matches_diffusers_with_eta_one(alpha_to_one):
    scheduler = ddim(alpha_to_one)
    g = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:  # 951 ... 1, the last step included
        x, eps, z = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).float() for _ in range(3))
        expected = scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        mean, std, x0 = spo.ddim_step(scheduler, x, t.expand(2), eps)
        torch.testing.assert_close(mean + std * z, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, scheduler.step(eps, t, x, eta=1.0, variance_noise=z).pred_original_sample)
        a_t = scheduler.alphas_cumprod[t]
        prev = t - 50
        a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # DDIM eq. 16 at eta = 1
        torch.testing.assert_close(std.flatten(), sigma.float().expand(2))
    assert (std == 0).all() == alpha_to_one  # the last step of a final alpha of 1 is deterministic


def test_pick_pairs_takes_best_and_worst_and_the_softmax_gap():
    scores = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.2, 0.1], [2.0, 4.0, 0.05]])  # 3 candidates x 3 prompts
    best, worst, keep = spo.pick_pairs(scores, threshold=0.3)
    assert best.tolist() == [1, 1, 1] and worst.tolist() == [0, 2, 0]
    gaps = [math.tanh((3 - 1) / 2), math.tanh((5.2 - 4) / 2), math.tanh((0.1 - 0) / 2)]  # p0 - p1 = tanh(gap / 2)
    assert keep.tolist() == [g > 0.3 for g in gaps] == [True, True, False]
    assert spo.pick_pairs(torch.ones(2, 1), 0.0)[2].tolist() == [False]  # equal scores never make a pair


def test_the_unconditional_half_is_the_empty_prompt_for_sd15_and_zeros_for_sdxl(models):
    empty = spo.unconditional(models, 64)
    if models.kind == "sd15":
        torch.testing.assert_close(empty["encoder_hidden_states"],
                                   sample.encode_prompt(models, [""])["encoder_hidden_states"], rtol=0, atol=0)
    else:
        added = empty["added_cond_kwargs"]
        assert empty["encoder_hidden_states"].abs().max() == 0 and added["text_embeds"].abs().max() == 0
        assert empty["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


def authors_loss(lp_w, ref_lp_w, lp_l, ref_lp_l, beta, eps):
    """The loss as SPO's training code writes it, from log-probabilities."""
    ratio_0 = torch.clamp(torch.exp(lp_w - ref_lp_w), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(lp_l - ref_lp_l), 1 - eps, 1 + eps)
    return -torch.log(torch.sigmoid(beta * torch.log(ratio_0) - beta * torch.log(ratio_1))).mean()


def test_loss_matches_the_authors_form_is_ln2_at_init_and_clamps():
    g = torch.Generator().manual_seed(0)
    lp = [torch.randn(32, generator=g, dtype=torch.float64) * 0.1 for _ in range(4)]
    loss, _ = spo.spo_loss(lp[0] - lp[1], lp[2] - lp[3], beta=10.0, eps=0.1)
    torch.testing.assert_close(loss, authors_loss(*lp, beta=10.0, eps=0.1))
    loss, metrics = spo.spo_loss(torch.zeros(8), torch.zeros(8), beta=10.0, eps=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and metrics["accuracy"].item() == 0.5
    # outside the band [0.9, 1.1] a side gets no gradient; inside it does
    d = torch.tensor([0.2, -0.3, 0.05, -0.05], requires_grad=True)  # exp: 1.22, 0.74 outside; 1.05, 0.95 inside
    other = torch.zeros(4)
    loss, _ = spo.spo_loss(d, other, 10.0, 0.1)
    loss.backward()
    assert d.grad[:2].abs().max() == 0 and (d.grad[2:] != 0).all() and (d.grad[2:] < 0).all()
    d.grad = None
    loss, _ = spo.spo_loss(other, d, 10.0, 0.1)  # the loser side: pushed down, clamped alike
    loss.backward()
    assert d.grad[:2].abs().max() == 0 and (d.grad[2:] > 0).all()


def transitions(models, n=2, seed=0, shared=True):
    """A batch of transitions as sampling leaves them: from x_t (and, unless shared, the loser's own x_t), draws of
    the base model's DDIM step."""
    scheduler = ddim()
    g = torch.Generator().manual_seed(seed)
    t = scheduler.timesteps[[4, 9]][:n]
    x_t = torch.randn(n, 4, 16, 16, generator=g)
    x_t_l = x_t if shared else torch.randn(n, 4, 16, 16, generator=g)
    empty = spo.unconditional(models, 128)
    both, cond = spo.text_cond(models, ["a red circle", "a blue square"][:n], 128, empty)
    batch = {"x_t": x_t, "x_t_l": x_t_l, "t": t}
    for start, side in (("x_t", "x_w"), ("x_t_l", "x_l")):
        with torch.no_grad():
            eps = spo.guided_eps(models.unet, batch[start], t, both, 5.0)
        mean, std, _ = spo.ddim_step(scheduler, batch[start], t, eps)
        batch[side] = mean + std * torch.randn(mean.shape, generator=g)
    return scheduler, batch, both, cond


def perturbed_lora(models, scale=0.02, seed=1):
    params = list(sample.add_lora(models.unet, rank=4).values())
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.data = torch.randn(p.shape, generator=g) * scale
    return params


def args_for(space, depth="mid"):
    return SimpleNamespace(space=space, guidance_scale=5.0, encoder_depth=depth)


@pytest.mark.parametrize("shared", [True, False])
def test_latent_log_ratio_is_the_gaussian_log_likelihood_ratio(models, shared):
    scheduler, batch, both, cond = transitions(models, shared=shared)
    perturbed_lora(models)
    d_w, d_l = spo.log_ratios(args_for("latent"), models.unet, models.unet, scheduler, batch, both, cond, "direct")
    # the oracle: diffusers' DDIM means of the policy and the reference, and the Gaussian log density with its
    # constants, mean over C, H, W (the authors' lp)
    zero = torch.zeros_like(batch["x_t"][:1])
    for start, side, d in (("x_t", "x_w", d_w), ("x_t_l", "x_l", d_l)):
        with torch.no_grad():
            eps = spo.guided_eps(models.unet, batch[start], batch["t"], both, 5.0)
            with encoder.base_weights(models.unet):
                ref_eps = spo.guided_eps(models.unet, batch[start], batch["t"], both, 5.0)
        for i, t in enumerate(batch["t"]):
            lp = []
            for e in (eps[i:i + 1], ref_eps[i:i + 1]):
                x_t = batch[start][i:i + 1]
                mean = scheduler.step(e.double(), t, x_t.double(), eta=1.0, variance_noise=zero).prev_sample
                sigma = spo.ddim_step(scheduler, x_t, t.view(1), e)[1].double()
                x = batch[side][i:i + 1].double()
                lp.append((-(x - mean) ** 2 / (2 * sigma ** 2) - sigma.log() - 0.5 * math.log(2 * math.pi)).mean())
            torch.testing.assert_close(d[i].double(), lp[0] - lp[1], rtol=2e-3, atol=1e-6)
    assert d_w.abs().min() > 0  # the policy differs from the base: a real test of the ratio


@pytest.mark.numerics
@pytest.mark.parametrize("method,shared", [("direct", True), ("jvp", True), ("jvp", False)])
def test_ncp_log_ratios_equal_latent_ones_when_the_encoder_is_the_identity(models, method, shared, monkeypatch):
    scheduler, batch, both, cond = transitions(models, shared=shared)
    perturbed_lora(models)
    latent = spo.log_ratios(args_for("latent"), models.unet, models.unet, scheduler, batch, both, cond, "direct")

    monkeypatch.setattr(encoder, "encode", lambda unet, x, t_prev, cond, depth="mid": x)
    monkeypatch.setattr(encoder, "jvp", lambda unet, x, t_prev, cond, depth, deltas: [d.float() for d in deltas])
    ncp = spo.log_ratios(args_for("ncp"), models.unet, models.unet, scheduler, batch, both, cond, method)
    for a, b in zip(ncp, latent):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def ncp_log_ratios_float64(models, scheduler, batch, both, cond, depth="mid"):
    """The oracle for D^ncp: its definition, -(d(x, mu) - d(x, ref_mu)) / (2 sigma^2) with d(a, b) = mean (E(a) -
    E(b))^2, all in float64: the U-Net (policy and base) in float64, the DDIM means by diffusers' own step."""
    unet = copy.deepcopy(models.unet).double()
    wide = lambda c: {k: wide(v) if isinstance(v, dict) else v.double() for k, v in c.items()}  # noqa: E731
    t, zero = batch["t"], torch.zeros_like(batch["x_t"][:1]).double()
    t_prev = (t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps).clamp(min=0)
    x_t = batch["x_t"].double()
    with torch.no_grad():
        guided = lambda o: (lambda u, c: u + 5.0 * (c - u))(*o.sample.chunk(2))  # noqa: E731
        eps = guided(unet(torch.cat([x_t, x_t]), torch.cat([t, t]), **wide(both)))
        with encoder.base_weights(unet):
            ref_eps = guided(unet(torch.cat([x_t, x_t]), torch.cat([t, t]), **wide(both)))
        means = [torch.cat([scheduler.step(e[i:i + 1], t[i], x_t[i:i + 1], eta=1.0, variance_noise=zero).prev_sample
                            for i in range(len(t))]) for e in (eps, ref_eps)]
        var = spo.ddim_step(scheduler, batch["x_t"], t, eps.float())[1].double().flatten(1)[:, 0] ** 2
        features = lambda x: encoder.encode(unet, x, t_prev, wide(cond), depth)  # noqa: E731
        e_mu, e_ref = features(means[0]), features(means[1])
        out = []
        for side in ("x_w", "x_l"):
            e = features(batch[side].double())
            d = lambda a: (e - a).pow(2).mean(dim=(1, 2, 3))  # noqa: E731
            out.append(-(d(e_mu) - d(e_ref)) / (2 * var))
    return out


@pytest.mark.numerics
def test_ncp_log_ratios_match_a_float64_oracle_and_the_linearised_ones_carry_the_gradient(models):
    """Both fp32 paths against the float64 definition, in units of the quantity's scale, max |D| of the batch
    (about 2e-5 here). D is a difference of two encoder distances whose features differ by the policy's small move,
    so fp32 rounding moves it by about 1% of that scale, and by another amount on another kernel (AVX2, AVX-512 and
    SSE4.1 sum in other orders). Measured worst errors over both models and both sides: the direct fp32 path 0.32%
    (AVX2) and 1.04% (SSE4.1), the linearisation 0.44% and 0.36%. Both are held to 3%: fp32 rounding with room for
    kernels not measured, and far below the 100% a wrong sign or a missing term gives."""
    scheduler, batch, both, cond = transitions(models)
    params = perturbed_lora(models, scale=0.01)
    oracle = ncp_log_ratios_float64(models, scheduler, batch, both, cond)
    scale = max(d.abs().max().item() for d in oracle)
    assert scale > 0
    results = {}
    for method in ("direct", "jvp"):
        d_w, d_l = spo.log_ratios(args_for("ncp"), models.unet, models.unet, scheduler, batch, both, cond, method)
        grads = torch.autograd.grad((d_w - d_l).sum(), params, allow_unused=True)
        results[method] = (d_w.detach(), d_l.detach(), torch.cat([g.flatten() for g in grads if g is not None]))
    for method in ("direct", "jvp"):
        for mine, exact in zip(results[method][:2], oracle):
            error = (mine.double() - exact).abs().max().item() / scale
            assert error < 3e-2, f"{method}: {error:.3g} of max |D| = {scale:.3g}"
    gd, gj = results["direct"][2], results["jvp"][2]
    assert gd.norm() > 0 and torch.nn.functional.cosine_similarity(gd, gj, dim=0) > 0.99


def test_log_ratios_are_zero_when_policy_is_the_reference(models):
    scheduler, batch, both, cond = transitions(models)
    sample.add_lora(models.unet, rank=4)  # gaussian A, zero B: the policy is the base
    for space, method in (("latent", "direct"), ("ncp", "direct"), ("ncp", "jvp")):
        d_w, d_l = spo.log_ratios(args_for(space), models.unet, models.unet, scheduler, batch, both, cond, method)
        assert d_w.abs().max() == 0 and d_l.abs().max() == 0
        loss, _ = spo.spo_loss(d_w, d_l, 10.0, 0.1)
        assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)


def run_sampling(models, preference, prompts, seeds, k=2, threshold=0.0, stopped=lambda: False, inner=0):
    from diffusers import DDIMScheduler

    args = SimpleNamespace(candidates=k, resolution=32, steps=8, branch_from=2, guidance_scale=5.0,
                           threshold=threshold, inner_steps=inner)
    empty = spo.unconditional(models, 32)
    return spo.sample_transitions(models, models.unet, preference, DDIMScheduler.from_config(models.scheduler.config),
                                  prompts, seeds, args, empty, stopped)


@pytest.mark.numerics
def test_sampling_is_deterministic_and_a_prompts_transitions_do_not_depend_on_its_batch(models):
    preference = spm.build_tiny()
    prompts = ["a red circle", "a blue square", "a green circle"]
    both, _ = run_sampling(models, preference, prompts, [11, 12, 13], k=3)
    again, _ = run_sampling(models, preference, prompts, [11, 12, 13], k=3)
    alone, _ = run_sampling(models, preference, prompts[1:2], [12], k=3)
    assert all(torch.equal(both[k], again[k]) for k in both)
    mine = both["prompt"] == 1
    assert mine.sum() == len(alone["t"]) > 0
    for key in ("x_t", "x_w", "x_l", "t"):
        torch.testing.assert_close(both[key][mine], alone[key], rtol=1e-4, atol=1e-4)  # batched sums
    # 8 steps: 876, 751, ..., 1; branching from step 2 (t = 626) on. The tiny scheduler's last step has std 0 (its
    # final alpha is 1), so its pair is never kept: 5 per prompt, threshold 0 keeping the rest
    assert both["t"].tolist() == [t for _ in prompts for t in [626, 501, 376, 251, 126]]
    assert (both["x_w"] != both["x_l"]).any(dim=(1, 2, 3)).all()


def test_sampling_keeps_only_pairs_over_the_threshold_and_the_winner_scores_higher(models):
    preference = spm.build_tiny()
    with torch.no_grad():  # off the identity, so the time conditioning matters
        for name, p in preference.model.named_parameters():
            if "adaLN" in name or "t_embedder" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    found, info = run_sampling(models, preference, ["a red circle", "a blue square"], [1, 2], k=4, threshold=0.0)
    strict, _ = run_sampling(models, preference, ["a red circle", "a blue square"], [1, 2], k=4, threshold=0.05)
    assert 0 < len(strict["t"]) < len(found["t"])
    assert info["scores"].numel() == 4 * 2 * 6  # k x prompts x scored steps
    # rescore the kept pairs: the winner's x0 prediction at the next timestep beats the loser's
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(models.scheduler.config)
    scheduler.set_timesteps(8)
    empty = spo.unconditional(models, 32)
    captions = [["a red circle", "a blue square"][i] for i in found["prompt"].tolist()]
    both, _ = spo.text_cond(models, captions, 32, empty)
    t_next = found["t"] - 125
    s = []
    with torch.no_grad():
        for side in ("x_w", "x_l"):
            eps = spo.guided_eps(models.unet, found[side], t_next, both, 5.0)
            x0 = spo.ddim_step(scheduler, found[side], t_next, eps)[2]
            s.append(torch.stack([spo.score(models, preference, x0[i:i + 1], captions[i:i + 1], t_next[i])[0]
                                  for i in range(len(x0))]))
    assert (s[0] >= s[1] - 1e-4).all()


def test_inner_steps_keep_each_candidates_own_trajectory(models):
    found, _ = run_sampling(models, spm.build_tiny(), ["a red circle", "a blue square"], [5, 6], k=2, inner=2)
    # 876, 751 plain; branch at 626, two inner steps (501, 376), scored at 251; branch at 251, inner 126 and 1, scored
    # clean at 0 (the step at 1 has std 0 and is dropped)
    assert found["t"].tolist() == [626, 501, 376, 251, 126] * 2
    for p in range(2):
        mine = {k: v[found["prompt"] == p] for k, v in found.items()}
        shares = [torch.equal(a, b) for a, b in zip(mine["x_t"], mine["x_t_l"])]
        assert shares == [True, False, False, True, False]  # only a branching step shares its x_t
        for a, b in ((0, 1), (1, 2), (3, 4)):  # each side goes on from where it was
            assert torch.equal(mine["x_t"][b], mine["x_w"][a]) and torch.equal(mine["x_t_l"][b], mine["x_l"][a])


def test_a_rank_without_prompts_returns_no_transitions_and_still_asks_to_stop(models):
    calls = []
    found, info = run_sampling(models, spm.build_tiny(), [], [], stopped=lambda: calls.append(1) and False)
    assert len(calls) == 8 and len(found["t"]) == 0 and found["x_w"].shape == (0, 4, 4, 4)
    assert info["scores"].numel() == 0


def test_sampling_stops_when_asked(models):
    assert run_sampling(models, spm.build_tiny(), ["a red circle"], [0], stopped=lambda: True) is None


# -----------------------------------------------------------------------------
# Whole runs


def assert_lora_changes_the_pipeline(kind, folder, tmp_path):
    """The LoRA in `folder` loads into the diffusers pipeline of a tiny model of this kind and changes its images."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sample.save_pipeline(sample.build_tiny(kind), str(tmp_path / "pipe")))
    run = lambda: pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    before = run()
    pipe.load_lora_weights(str(folder))
    assert abs(run() - before).max() > 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("spo") / "straight"
    proc = spo_train(out, "--model", "tiny", "--space", "ncp", nproc=2)
    return out, proc


def test_torchrun_run_and_its_lora_loads_in_diffusers(straight, tmp_path):
    out, proc = straight
    assert "spo in ncp space" in proc.stdout and "identical on all 2 ranks: True" in proc.stdout
    rows = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert_lora_changes_the_pipeline("sd15", out, tmp_path)


def test_torchrun_resume_inside_an_iteration_equals_the_straight_run(straight, tmp_path):
    from safetensors.torch import load_file

    out, proc = straight
    steps = max(r["step"] for r in map(json.loads, open(out / "metrics.jsonl")))
    spo_train(tmp_path, "--model", "tiny", "--space", "ncp", "--max-steps", "3", nproc=2)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 0 and ckpt["iteration_step"] == 3 and ckpt["iteration_lora"] is not None
    second = spo_train(tmp_path, "--model", "tiny", "--space", "ncp", "--max-steps", str(steps), "--resume", nproc=2)
    assert "3 steps into it" in second.stdout
    a, b = load_file(out / sample.LORA_FILE), load_file(tmp_path / sample.LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_sdxl_torchrun_run_resumes_and_loads_in_the_sdxl_pipeline(tmp_path):
    spo_train(tmp_path, "--model", "tiny-sdxl", "--max-steps", "2", nproc=2)
    proc = spo_train(tmp_path, "--model", "tiny-sdxl", "--max-steps", "4", "--resume", nproc=2)
    assert "spo in ncp space" in proc.stdout and "at step 2" in proc.stdout and "done: step 4" in proc.stdout
    assert_lora_changes_the_pipeline("sdxl", tmp_path, tmp_path)


def test_bad_input_fails_at_once_with_one_line(tmp_path):
    proc = spo_train(tmp_path / "a", "--model", "tiny", "--candidates", "1", check=False)
    assert proc.returncode != 0 and "error: --candidates 1 must be at least 2" in proc.stdout
    proc = spo_train(tmp_path / "b", "--model", "tiny", "--preference-model", str(tmp_path / "none.bin"), check=False)
    assert proc.returncode != 0 and "no such file" in proc.stdout and "Traceback" not in proc.stdout
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
