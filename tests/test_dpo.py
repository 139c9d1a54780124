"""ncp_dpo.py: the loss against the official Diffusion-DPO formula, the sign of a step, and whole runs."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import encoder
import ncp_dpo
import run
import sample
from helpers import FAST, ROOT, env, lora, metrics, train


def official_diffusion_dpo(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, beta_dpo=5000.0):
    """The loss as the Diffusion-DPO reference training code writes it."""
    model_diff = model_losses_w - model_losses_l
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean(), (inside_term > 0).sum().float() / inside_term.size(0)


def test_dpo_loss_matches_official_formula_and_is_ln2_at_init():
    g = torch.Generator().manual_seed(0)
    e = [torch.rand(16, generator=g) * 1e-3 for _ in range(4)]
    loss, metrics = ncp_dpo.dpo_loss(*e, beta=2500.0)
    expected, accuracy = official_diffusion_dpo(*e)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["accuracy"], accuracy)  # no ties here
    torch.testing.assert_close(metrics["margin"], ((e[2] - e[3]) - (e[0] - e[1])).mean())
    loss, metrics = ncp_dpo.dpo_loss(e[0], e[1], e[0], e[1], beta=2500.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and metrics["accuracy"].item() == 0.5
    # hand-computed: one pair, the policy lowers the winner's error by 1e-4 more than the reference
    e_w, e_l, ref = torch.tensor([0.1999], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    loss, _ = ncp_dpo.dpo_loss(e_w, e_l, ref, ref, 2500.0)
    assert math.isclose(loss.item(), math.log1p(math.exp(-2500 * 1e-4)), rel_tol=1e-9)  # log(1 + e^-0.25)


@pytest.mark.parametrize("space", ["ncp", "latent"])
def test_one_step_lowers_winner_error_relative_to_reference(models, space):
    params = list(sample.add_lora(models.unet, rank=4).values())
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.data = torch.randn(p.shape, generator=g) * 0.05  # off the identity, so the policy differs from the base
    x0 = torch.randn(4, 4, 16, 16, generator=g)  # 2 winners, then 2 losers
    t = torch.tensor([50, 300]).repeat(2)
    noise = torch.randn(2, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
    z = torch.randn(2, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
    x_t = models.scheduler.add_noise(x0, noise, t)
    cond = sample.repeat_cond(sample.encode_prompt(models, ["a red circle", "a blue square"]), 2)

    def errors(policy):
        with torch.set_grad_enabled(policy), (encoder.base_weights(models.unet) if not policy else torch.enable_grad()):
            pred = models.unet(x_t, t, **cond).sample
        if space == "latent":
            return encoder.latent_error(pred, noise)
        return encoder.perceptual_errors(models.unet, models.scheduler, x_t=x_t, t=t, pred=pred, target=noise, z=z,
                                         cond=cond, depth="mid")

    ref = errors(False).detach()

    def gap():  # (e_w - e_l) - (ref_e_w - ref_e_l): DPO should push it down
        e = errors(True)
        return ((e[:2] - e[2:]) - (ref[:2] - ref[2:])).mean(), e

    before, e = gap()
    loss, _ = ncp_dpo.dpo_loss(e[:2], e[2:], ref[:2], ref[2:], beta=2500.0)
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 1e-3 * p.grad / p.grad.norm().clamp(min=1e-12)
    after, _ = gap()
    assert after.item() < before.item()


# -----------------------------------------------------------------------------
# Whole runs

KEYS = {"step", "loss", "accuracy", "margin", "e_w", "e_l", "ref_e_w", "ref_e_l", "lr", "grad_norm", "pairs_per_s",
        "step_time", "skipped_pairs", "converted_images", "nonfinite_steps", "beta_margin_p10", "beta_margin_p50",
        "beta_margin_p90", "saturated"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train("ncp_dpo.py", out, "--model", "tiny", "--max-steps", "4")
    return out


def _check_run(out):
    rows = metrics(out)
    assert KEYS <= set(rows[0]) and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert math.isclose(rows[0]["loss"], math.log(2), rel_tol=1e-5)  # policy == reference before the first update
    assert rows[0]["accuracy"] == 0.5
    assert rows[0]["beta_margin_p10"] == rows[0]["beta_margin_p90"] == rows[0]["saturated"] == 0  # margins all 0
    assert any(r["beta_margin_p90"] > r["beta_margin_p10"] for r in rows[1:])
    assert all(math.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in rows)
    assert rows[-1]["loss"] != rows[0]["loss"]
    state = lora(out)
    assert state and all(k.startswith("unet.") and torch.isfinite(v).all() for k, v in state.items())
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora.up" in k)  # it trained


def test_tiny_ncp_run(straight):
    _check_run(straight)
    # The LoRA file is as readable as the run's other files (safetensors alone writes it 0600): shared storage.
    mode = lambda name: os.stat(straight / name).st_mode & 0o777  # noqa: E731
    assert mode("pytorch_lora_weights.safetensors") == mode("metrics.jsonl") == 0o666 & ~_umask()


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.mark.parametrize("model,space", [("tiny", "latent"), ("tiny-sdxl", "ncp"), ("tiny-sdxl", "latent")])
def test_runs_for_both_models_and_spaces(tmp_path, model, space):
    proc = train("ncp_dpo.py", tmp_path, "--model", model, "--space", space, "--max-steps", "2")
    assert f"dpo in {space} space" in proc.stdout
    _check_run(tmp_path)


def test_saved_lora_loads_in_the_diffusers_pipeline(straight, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sample.save_pipeline(sample.build_tiny("sd15"), str(tmp_path / "pipe")))
    run = lambda: pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    before = run()
    pipe.load_lora_weights(str(straight))
    assert abs(run() - before).max() > 0


def test_resume_gives_the_same_lora_as_a_straight_run(straight, tmp_path):
    train("ncp_dpo.py", tmp_path, "--model", "tiny", "--max-steps", "2")
    proc = train("ncp_dpo.py", tmp_path, "--model", "tiny", "--max-steps", "4", "--resume")
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    a, b = lora(straight), lora(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    machine = {"step_time", "pairs_per_s", "peak_mem_gib"}  # measurements of the machine, not of the run
    same = lambda rows: [{k: v for k, v in r.items() if k not in machine} for r in rows[2:]]  # noqa: E731
    assert same(metrics(tmp_path)) == same(metrics(straight))


def test_torchrun_two_ranks_agree_and_match_one_process(straight, tmp_path):
    # 2 ranks x micro 2 x accum 1 sees the same pairs, t and noise per step as 1 rank x micro 2 x accum 2.
    proc = train("ncp_dpo.py", tmp_path, "--model", "tiny", "--max-steps", "4", nproc=2)
    assert "world 2 x micro 2 x accum 1" in proc.stdout
    assert "LoRA weights identical on all 2 ranks: True" in proc.stdout
    a, b = lora(straight), lora(tmp_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    for one, two in zip(metrics(straight), metrics(tmp_path)):  # percentiles over the pairs of both ranks
        for key in ("beta_margin_p10", "beta_margin_p50", "beta_margin_p90", "saturated"):
            assert one[key] == pytest.approx(two[key], rel=1e-3, abs=1e-6), key


def test_regime_metrics_are_percentiles_of_beta_times_margin_over_the_window():
    """reduce_window against numpy: two steps' per-pair values are pooled, not averaged per step."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(8, generator=g, dtype=torch.float64) * 2 for _ in range(2)]
    window = {"loss": torch.tensor(1.4), "beta_margin": [steps[0][:4], steps[0][4:], steps[1]]}
    means, _ = run.reduce_window(window, 2, False, 1, torch.device("cpu"), torch.zeros(2, dtype=torch.float64))
    pooled = torch.cat(steps).numpy()
    assert means["loss"] == pytest.approx(0.7)
    for q in (10, 50, 90):
        assert means[f"beta_margin_p{q}"] == pytest.approx(np.percentile(pooled, q))
    assert means["saturated"] == pytest.approx(np.mean(np.abs(pooled) > 1)) and 0 < means["saturated"] < 1
    _, metrics = ncp_dpo.dpo_loss(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]), torch.tensor([1.5, 1.5]),
                                  torch.tensor([1.5, 1.5]), beta=3.0)
    assert metrics["beta_margin"].tolist() == [3.0, -3.0]  # beta * ((ref_w - ref_l) - (e_w - e_l)), per pair


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "ncp_dpo.py"), "--model", "tiny", "--output-dir", str(tmp_path),
           "--data", "synthetic", "--num-workers", "1", "--optimizer", "adamw", "--global-batch-size", "2",
           "--micro-batch-size", "2", "--log-every", "1", "--max-steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = os.path.join(tmp_path, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(log) and len(open(log).readlines()) >= 2) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    step = torch.load(os.path.join(tmp_path, "checkpoint.pt"), weights_only=False)["step"]
    assert 2 <= step < 100000 and f"checkpoint of step {step} saved" in out and "after the signal" in out
    resumed = train("ncp_dpo.py", tmp_path, "--model", "tiny", "--global-batch-size", "2", "--max-steps",
                    str(step + 1), "--resume")
    assert f"at step {step}" in resumed.stdout and metrics(tmp_path)[-1]["step"] == step + 1


NAN_LOSS = "import torch.nn.functional as F\nF.logsigmoid = lambda x: x * float('nan')  # DPO's loss: NaN\n"


def test_nonfinite_loss_skips_the_update(tmp_path):
    """A NaN loss (logsigmoid made to return NaN by a start-up hook; --beta inf is refused now) skips each update."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(NAN_LOSS)
    cmd = [sys.executable, os.path.join(ROOT, "ncp_dpo.py"), "--output-dir", str(tmp_path / "out"), *FAST, "--model",
           "tiny", "--max-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                          env={**env(), "PYTHONPATH": f"{tmp_path / 'hook'}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    tmp_path = tmp_path / "out"
    rows = metrics(tmp_path)
    assert rows[-1]["nonfinite_steps"] == 2
    assert all(torch.isfinite(v).all() for v in lora(tmp_path).values())
    ups = [v for k, v in lora(tmp_path).items() if "lora.up" in k]  # B of the LoRA starts at zero
    assert ups and all(v.abs().sum() == 0 for v in ups)  # never updated


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny", "--global-batch-size", "6", "--micro-batch-size", "4"], "must be a positive multiple"),
    (["--model", "tiny", "--resume"], "nothing to resume"),
    (["--model", "sd-15"], "unknown --model 'sd-15'"),
    (["--model", "tiny", "--data", "/no/such/dir"], "is not a directory, a file, a glob"),
])
def test_bad_input_fails_before_loading_a_model(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        ncp_dpo.main(ncp_dpo.parse_args(argv + ["--output-dir", str(tmp_path / "out")]))
    assert message in str(exit_info.value.code)


def test_another_runs_checkpoint_is_refused(straight, monkeypatch):
    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    for argv, message in [([], "holds a run at step 4: pass --resume"),
                          (["--resume", "--space", "latent"], "--resume cannot change space ncp -> latent")]:
        with pytest.raises(SystemExit) as exit_info:
            ncp_dpo.main(ncp_dpo.parse_args(["--model", "tiny", "--data", "synthetic", "--output-dir", str(straight),
                                             "--global-batch-size", "4", "--micro-batch-size", "2", *argv]))
        assert message in str(exit_info.value.code)


def test_fp16_ncp_dpo_gets_a_gradient_at_step_one_and_moves_the_lora(tmp_path):
    """At step 1 the policy is the reference: the NCP tangent d_pol - d_ref is exactly zero. In fp16 its gradient
    once underflowed to zero at every step (grad_norm 0.0, the LoRA never moved, exit 0)."""
    train("ncp_dpo.py", tmp_path, "--model", "tiny", "--precision", "fp16", "--max-steps", "3", "--global-batch-size",
          "2", "--micro-batch-size", "2", "--lr", "1e-4")
    records = metrics(tmp_path)
    assert records[0]["step"] == 1 and records[0]["grad_norm"] > 0
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in records)
    assert sum(v.float().abs().sum().item() for k, v in lora(tmp_path).items() if k.endswith(("lora_B.weight", "lora.up.weight"))) > 0


def test_the_winner_error_guard_is_logged_and_warns_once_past_twice_the_reference(straight):
    """winner_error_ratio = e_w / ref_e_w each window (1 before the first update); the warning names the step."""
    rows = metrics(straight)
    assert all(math.isclose(r["winner_error_ratio"], r["e_w"] / r["ref_e_w"], rel_tol=1e-6) for r in rows)
    assert rows[0]["winner_error_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert run.winner_warning(1.5, 7) is None
    assert run.winner_warning(2.5, 7).startswith("warning: at step 7 the policy's error on the preferred images is 2.50x")
