"""ncp_cpo.py and ncp_sft.py: the objectives by hand, and whole runs as for ncp_dpo.py."""

import math

import pytest
import torch

import data
import ncp_cpo
import ncp_sft
from helpers import lora, metrics, train


def test_cpo_loss_by_hand():
    e_w, e_l = torch.tensor([0.1000, 0.3000], dtype=torch.float64), torch.tensor([0.1002, 0.2999], dtype=torch.float64)
    loss, m = ncp_cpo.cpo_loss(e_w, e_l, beta=2500.0, sft_weight=1.0)
    # pair 1: margin +2e-4 -> log(1 + e^-0.5); pair 2: margin -1e-4 -> log(1 + e^0.25); plus mean(e_w) = 0.2
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.25))) / 2 + 0.2
    assert math.isclose(loss.item(), expected, rel_tol=1e-7)
    assert m["accuracy"].item() == 0.5 and math.isclose(m["margin"].item(), 0.5e-4, rel_tol=1e-5)
    loss0, m0 = ncp_cpo.cpo_loss(e_w, e_l, beta=2500.0, sft_weight=0.0)  # the authors' released setting
    assert math.isclose(loss0.item(), expected - 0.2, rel_tol=1e-7) and math.isclose(m0["preference_loss"].item(), loss0.item(), rel_tol=1e-6)
    _, tie = ncp_cpo.cpo_loss(e_w, e_w, beta=2500.0, sft_weight=1.0)
    assert tie["accuracy"].item() == 0.5  # ties count half


def test_sft_loss_by_hand():
    loss, m = ncp_sft.sft_loss(torch.tensor([0.1, 0.2, 0.6]))
    assert math.isclose(loss.item(), 0.3, rel_tol=1e-6) and set(m) == {"loss", "e_w"}


def test_sft_dataset_decodes_winners_only(tmp_path, monkeypatch):
    pairs, _ = data.preference_pairs(data.write_synthetic(str(tmp_path), n=4), "train")
    ds = data.PreferenceDataset(pairs, 16, winners_only=True)
    read = []
    real = data.pq.ParquetFile.read_row_group
    monkeypatch.setattr(data.pq.ParquetFile, "read_row_group", lambda self, g, columns=None, **k: read.append(columns) or real(self, g, columns=columns, **k))
    item = ds[0]
    assert item["pixels"].shape == (1, 3, 16, 16) and read == [["jpg_0" if pairs["winner_col"][0].as_py() == 0 else "jpg_1"]]


SCRIPTS = {"ncp_cpo.py": {"loss", "preference_loss", "accuracy", "margin", "e_w", "e_l"}, "ncp_sft.py": {"loss", "e_w"}}


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def straight(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param.replace(".py", ""))
    train(request.param, out, "--model", "tiny", "--max-steps", "4")
    return request.param, out


def _check_run(script, out):
    rows = metrics(out)
    assert SCRIPTS[script] | {"step", "lr", "grad_norm", "pairs_per_s"} <= set(rows[0])
    assert not {"ref_e_w", "ref_e_l"} & set(rows[0])  # no reference model
    regime = {"beta_margin_p10", "beta_margin_p50", "beta_margin_p90", "saturated"}
    if script == "ncp_sft.py":
        assert "e_l" not in rows[0] and not regime & set(rows[0])  # no loser branch, no beta
    else:
        assert regime <= set(rows[0]) and rows[0]["beta_margin_p10"] < rows[0]["beta_margin_p90"]
    assert all(math.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in rows)
    assert any(v.abs().sum() > 0 for k, v in lora(out).items() if "lora.up" in k)  # it trained


def test_tiny_ncp_runs(straight):
    _check_run(*straight)


@pytest.mark.parametrize("model,space", [("tiny", "latent"), ("tiny-sdxl", "ncp"), ("tiny-sdxl", "latent")])
def test_runs_for_both_models_and_spaces(straight, tmp_path, model, space):
    script = straight[0]
    proc = train(script, tmp_path, "--model", model, "--space", space, "--max-steps", "2")
    assert f"in {space} space" in proc.stdout
    _check_run(script, tmp_path)


def test_resume_gives_the_same_lora(straight, tmp_path):
    script, out = straight
    train(script, tmp_path, "--model", "tiny", "--max-steps", "2")
    assert "at step 2" in train(script, tmp_path, "--model", "tiny", "--max-steps", "4", "--resume").stdout
    a, b = lora(out), lora(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks(straight, tmp_path):
    script, out = straight
    proc = train(script, tmp_path, "--model", "tiny", "--max-steps", "4", nproc=2)
    assert "LoRA weights identical on all 2 ranks: True" in proc.stdout
    a, b = lora(out), lora(tmp_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_lora_loads_in_the_diffusers_pipeline(straight, tmp_path):
    from diffusers import DiffusionPipeline

    import sample

    pipe = DiffusionPipeline.from_pretrained(sample.save_pipeline(sample.build_tiny("sd15"), str(tmp_path / "pipe")))
    run = lambda: pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    before = run()
    pipe.load_lora_weights(str(straight[1]))
    assert abs(run() - before).max() > 0


def test_cpo_checkpoint_refuses_another_sft_weight(tmp_path):
    train("ncp_cpo.py", tmp_path, "--model", "tiny", "--max-steps", "1")
    proc = train("ncp_cpo.py", tmp_path, "--model", "tiny", "--max-steps", "2", "--resume", "--sft-weight", "0",
                 check=False)
    assert proc.returncode != 0 and "--resume cannot change sft-weight 1.0 -> 0.0" in proc.stdout
