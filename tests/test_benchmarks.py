"""The benchmark's random architectures are the real ones, and step_cost.py measures what it says."""

import json
import os
import sys

import pytest
import torch

import launch
from helpers import ROOT, env

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import step_cost  # noqa: E402

# Parameter counts of the published checkpoints' components (their model cards / safetensors headers).
PUBLISHED = {"sd15": {"unet": 859_520_964, "vae": 83_653_863, "text": [123_060_480]},
             "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text": [123_060_480, 694_659_840]}}


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_random_architectures_have_the_published_sizes(kind):
    with torch.device("meta"):  # shapes only: no memory, no time
        models = step_cost.build_random(kind)
    assert count(models.unet) == PUBLISHED[kind]["unet"] and count(models.vae) == PUBLISHED[kind]["vae"]
    assert [count(e) for e in models.text_encoders] == PUBLISHED[kind]["text"]
    assert models.kind == kind and models.tokenizers[0].model_max_length == 77


def test_step_cost_on_the_tiny_model(tmp_path):
    out = tmp_path / "cost.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "step_cost.py"), "--model", "tiny", "--steps", "3",
           "--warmup", "1", "--micro-batch-size", "2", "--num-workers", "0", "--flops", "--out", str(out),
           "--only", "dpo-latent", "dpo-ncp", "dpo-ncp-cached", "--", "--optimizer", "adamw",
           "--gradient-checkpointing"]
    proc = launch.python(cmd, {**env(), "TMPDIR": str(tmp_path)}, ROOT, 600, merge=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert set(rows) == {"dpo-latent", "dpo-ncp", "dpo-ncp-cached"}
    assert all(r["step_s"] > 0 and r["peak_mem_gib"] > 0 and r["nonfinite_steps"] == 0 for r in rows.values())
    # each step after the one of warm-up timed on its own: the mean and its spread
    assert report["args"]["warmup"] == 1
    assert all(r["timed_steps"] == 3 and r["step_s_min"] <= r["step_s"] <= r["step_s_max"] for r in rows.values())
    low, high = report["ratios"]["dpo"]["time_range"]
    assert low <= report["ratios"]["dpo"]["time"] <= high
    # the executed FLOPs are the timed workload's: gradient checkpointing recomputes forwards, model FLOPs do not
    assert all(r["executed_tflops_per_step"] > r["tflops_per_step"] for r in rows.values())
    # NCP adds encoder passes; the cache removes the VAE encode, which the tiny model's step also pays.
    assert rows["dpo-ncp"]["tflops_per_step"] > rows["dpo-latent"]["tflops_per_step"] > 0
    assert rows["dpo-ncp-cached"]["tflops_per_step"] < rows["dpo-ncp"]["tflops_per_step"]
    assert report["ratios"]["dpo"]["flops"] == pytest.approx(rows["dpo-ncp"]["tflops_per_step"] / rows["dpo-latent"]["tflops_per_step"])
    assert "| dpo |" in proc.stdout and "| dpo-cached |" in proc.stdout


@pytest.mark.parametrize("kind, depth, published", [("sd15", "mid", 0.32), ("sdxl", "mid", 0.43)])
def test_encoder_is_the_published_share_of_a_unet_forward(kind, depth, published):
    """The method's cost analysis: the encoder through the mid block is 32% (SD1.5) / 43% (SDXL) of a forward."""
    share = step_cost.encoder_share(kind)
    assert share[depth] == pytest.approx(published, abs=0.01)
    assert 0 < share["down"] < share["mid"] < 1


def test_encoder_share_at_another_resolution():
    """--resolution: convolutions and projections scale with the pixels (1/4 at half the side), self-attention's
    token-by-token products with their square (1/16), so a 512 px SDXL forward is between the two."""
    full, half = step_cost.encoder_share("sdxl"), step_cost.encoder_share("sdxl", 512)
    assert (full["size"], half["size"]) == (128, 64)
    assert full["unet_tflops"] / 16 < half["unet_tflops"] < full["unet_tflops"] / 4
    assert 0 < half["down"] < half["mid"] < 1


def test_precision_benchmark_on_the_tiny_model(tmp_path):
    """precision.py: the scripts' half-precision path meets the targets against fp32; the direct one in bf16 does
    not (what the JVP path fixes), while latent-space errors are unaffected by the encoder's method."""
    import precision

    out = tmp_path / "precision.json"
    results = precision.main(["--model", "tiny", "--pairs", "8", "--paths", "fp32,bf16,bf16-direct", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"fp32", "bf16", "bf16-direct"}
    jvp, direct = results["bf16"], results["bf16-direct"]
    assert jvp["ncp"]["e_rel_median"] < 0.05 and jvp["ncp"]["grad_cosine"] > 0.99
    assert jvp["ncp"]["pairs_not_negligible"] > 0 and jvp["ncp"]["sign_agreement"] >= 0.95
    assert direct["ncp"]["e_rel_median"] > 0.5  # the rounding floor the JVP removes
    assert jvp["latent"] == direct["latent"]
    assert all(results[p]["encoder_cost"]["tflops"] > 0 for p in results)


def test_loader_speed_measures_bytes_read_per_item(tmp_path):
    out = tmp_path / "loader.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "loader_speed.py"), "--row-group-mb", "0.5", "4",
           "--shard-mb", "12", "--seconds", "1", "--resolution", "64", "--out", str(out)]
    proc = launch.python(cmd, {**env(), "TMPDIR": str(tmp_path)}, ROOT, 600, merge=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    small, large = report["results"]["0.5MB"], report["results"]["4MB"]
    for row in (small, large):
        assert row["store_read"]["mb_read_per_item"] == pytest.approx(row["pair_mb"], rel=0.05)  # the pair's bytes
        assert row["store_build"]["mb_read"] == pytest.approx(row["store_build"]["shard_mb"], rel=0.1)  # once
        assert row["store_item"]["items_per_s"] > 0 and row["parquet_item"]["items_per_s"] > 0
    # Without the store an item reads its row group's two image columns: about the row group.
    assert large["parquet_read"]["mb_read_per_item"] == pytest.approx(large["largest_row_group_mb"], rel=0.2)
    assert large["parquet_read"]["mb_read_per_item"] > 5 * small["parquet_read"]["mb_read_per_item"]
    need = report["needed"]
    assert need["sdxl_1024px"]["tflop_per_pair"] > need["sd15_512px"]["tflop_per_pair"] > 0


def test_sample_speed_times_each_batch_size(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "sample_speed.py"), "--model", "tiny", "--batch-sizes",
           "1", "2", "--prompts", "2", "--steps", "2", "--out", str(out)]
    proc = launch.python(cmd, env(), ROOT, 600, merge=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"1", "2"} and all(r["images_per_s"] > 0 and r["seconds"] > 0 for r in results.values())


def test_spo_cost_splits_an_iteration_on_the_tiny_model(tmp_path):
    out = tmp_path / "spo_cost.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "spo_cost.py"), "--model", "tiny", "--prompts", "2",
           "--out", str(out)]
    proc = launch.python(cmd, {**env(), "TMPDIR": str(tmp_path)}, ROOT, 600, merge=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.load(open(out))["results"]
    assert set(results) == {"latent", "ncp"}
    for r in results.values():
        # 20 steps from step 4 on: 16 comparisons a prompt, the last (deterministic, std 0) never kept
        assert r["transitions"] == 2 * 15 == r["trained"]
        assert all(r[k] > 0 for k in ("sample_s", "score_s", "train_s"))
        assert abs(sum(r["shares"].values()) - 1) < 1e-9


def test_precision_benchmark_on_tiny_sd3():
    """The same on SD3's flow: velocity errors, the Euler step back, the first joint blocks as the encoder."""
    import precision

    results = precision.main(["--model", "tiny-sd3", "--latent-size", "16", "--pairs", "8",
                              "--paths", "fp32,bf16,bf16-direct"])
    jvp, direct = results["bf16"], results["bf16-direct"]
    assert jvp["ncp"]["e_rel_median"] < 0.05 and jvp["ncp"]["grad_cosine"] > 0.99
    assert direct["ncp"]["e_rel_median"] > 0.5 and direct["ncp"]["grad_cosine"] < 0.95
    assert jvp["latent"] == direct["latent"] and results["fp32"]["latent"]["e_median"] > 1  # velocity errors: ~2


def test_filter_speed_filters_a_generated_table_without_its_images(tmp_path):
    out = tmp_path / "filter.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "filter_speed.py"), "--rows", "3000", "--shards", "4",
           "--out", str(out)]
    proc = launch.python(cmd, {**env(), "TMPDIR": str(tmp_path)}, ROOT, 600, merge=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert result["format"] == "pickapic" and result["rows"] == 3000 and result["seconds"] > 0
    assert 0 < result["pairs"] < 3000 and result["ties"] > 0  # the filter kept some pairs and dropped the ties


def test_frontier_reuses_earlier_sweeps_and_draws_the_chosen_points(tmp_path, monkeypatch, capsys):
    """frontier.py takes a run from an earlier sweep before the work folder, lists what neither holds, picks the best
    point of each space and the closest pair in log drift, and copies each grid from the lowest seed whose row was
    trained in the work folder (never from a run whose row came from elsewhere)."""
    import frontier

    def runs(space, beta, seeds, radius, drift):
        return {frontier.key(space, beta, s): [{"step": 0, "radius": 7.0, "colour_right": 0.3, "heldout_accuracy": 0.5},
                                              {"step": 100, "radius": radius + s, "colour_right": 0.2,
                                               "heldout_accuracy": 0.9, "drift": drift, "saturated": 0.1}]
                for s in seeds}

    earlier, work = tmp_path / "earlier", tmp_path / "work"
    (earlier).mkdir()
    (earlier / "results.json").write_text(json.dumps({"runs": {**runs("ncp", 10, [0, 1, 2], 11.0, 0.02),
                                                               **runs("latent", 1, [0], 8.0, 0.001)}}))
    for folder, found in (("unet", {**runs("latent", 1, [1], 8.0, 0.001), **runs("latent", 2, [0, 1], 9.0, 0.05)}),
                          ("unet-b", runs("ncp", 10, [1], 99.0, 0.02))):  # ncp seed 1 is taken from `earlier` first
        (work / folder / frontier.key("latent", 2, 0)).mkdir(parents=True)
        (work / folder / "results.json").write_text(json.dumps({"runs": found}))
    for name in (frontier.key("latent", 2, 1), frontier.key("ncp", 10, 1)):
        (work / ("unet-b" if "ncp" in name else "unet") / name).mkdir(parents=True, exist_ok=True)
        (work / ("unet-b" if "ncp" in name else "unet") / name / "samples.png").write_bytes(name.encode())
    (work / "unet" / "log.txt").write_text("run a step 100\n")
    monkeypatch.setattr(frontier, "REUSE", {"unet": [str(earlier)], "sd3": []})
    monkeypatch.setattr(frontier, "BETAS", {("unet", "ncp"): [10], ("unet", "latent"): [1, 2, 3]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples-unet-best-ncp-beta1.png").write_bytes(b"stale")
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--no-train", "--work", str(work), "--out", str(out)])
    frontier.main()
    printed = capsys.readouterr().out
    assert "not run yet: unet dpo-latent-bf16-beta3-lr0.001 seeds [0, 1]" in printed
    rows = json.loads((out / "results.json").read_text())
    at100 = {(r["space"], r["beta"], r["seed"]): r["radius"] for r in rows if r["step"] == 100}
    assert at100 == {("ncp", 10, 0): 11.0, ("ncp", 10, 1): 12.0, ("ncp", 10, 2): 13.0, ("latent", 1, 0): 8.0,
                     ("latent", 1, 1): 9.0, ("latent", 2, 0): 9.0, ("latent", 2, 1): 10.0}
    assert (out / "reused.txt").read_text().count("earlier: ") == 4
    # latent's curve at ncp's drift 0.02, between its drifts 0.001 (mean radius 8.5) and 0.05 (9.5), linear in log
    # drift: 8.5 + ln(20) / ln(50) = 9.266, a gain of 2.27 over the base's 7 px; ncp's own is 12 - 7
    # and each seed (radius 11, 12, 13) against that curve at its own drift
    assert "- ncp beta 10 at drift 0.02: +5.00 px, colour 0.20; latent +2.27 px, colour 0.20 (between its betas 1 " \
        "and 2); seed by seed, each at its own drift (3 of 3 inside latent's): +1.73 to +3.73 px, colour +0.00 to " \
        "+0.00 against latent" in (out / "summary.md").read_text().splitlines()
    grids = sorted(p.name for p in out.glob("samples-*.png"))
    # latent beta 2: seed 0's run has no grid, seed 1's does; ncp beta 10: every row reused, so no grid without
    # training seed 0 again (unet-b's seed-1 grid is not the reused row's run), and --no-train trains nothing
    assert grids == ["samples-unet-best-latent-beta2-seed1.png", "samples-unet-matched-latent-beta2-seed1.png"]
    assert (out / "samples-unet-best-latent-beta2-seed1.png").read_bytes() == frontier.key("latent", 2, 1).encode()
    assert (out / "frontier.png").stat().st_size > 0
    # a fresh clone: no work folder, the filed results.json and grids are the record; nothing is lost or retrained
    filed, summary = (out / "results.json").read_text(), (out / "summary.md").read_text()
    assert (out / "logs" / "unet.txt").read_text() == "run a step 100\n"
    (work / "unet" / "log.txt").write_text("run a step 100\nrun b step 100\n")  # the same folder, grown
    frontier.main()
    assert (out / "logs" / "unet.txt").read_text() == "run a step 100\nrun b step 100\n"
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--no-train", "--work", str(tmp_path / "fresh"), "--out",
                                      str(out)])
    (tmp_path / "fresh" / "unet").mkdir(parents=True)
    (tmp_path / "fresh" / "unet" / "log.txt").write_text("run c step 100\n")  # a new log: the filed lines stay
    for _ in range(2):  # and a second reading adds nothing
        frontier.main()
        assert (out / "logs" / "unet.txt").read_text() == "run a step 100\nrun b step 100\nrun c step 100\n"
    assert (out / "results.json").read_text() == filed and (out / "summary.md").read_text() == summary
    assert sorted(p.name for p in out.glob("samples-*.png")) == grids
    assert (out / "reused.txt").read_text().count("earlier: ") == 4


def test_toy_alignment_starts_over_a_run_folder_left_by_an_interrupted_invocation(tmp_path):
    """A leftover run folder (its checkpoint at step 60, say) is removed before the run trains its first checkpoint:
    resumed, the row labelled 25 would measure the step-60 model."""
    import toy_alignment

    out, said = tmp_path / "dpo-ncp-bf16-seed0", []
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"step 60")
    toy_alignment.start_over(str(out), said.append)
    assert not out.exists() and said == ["dpo-ncp-bf16-seed0: a folder left by an interrupted run, started over"]
    toy_alignment.start_over(str(out), said.append)  # nothing there: nothing said
    assert len(said) == 1
