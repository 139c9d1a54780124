"""sample.py: loading, prompt encoding, and LoRA files that diffusers' own pipelines load."""

import os

import pytest
import torch

import sample


def test_named_tiny_models_load_on_cpu():
    for name, kind in [("tiny", "sd15"), ("tiny-sdxl", "sdxl")]:
        models = sample.load_models(name)
        assert models.kind == kind and models.unet.device.type == "cpu"
        assert not any(p.requires_grad for p in models.unet.parameters())


def test_encoded_prompts_fit_the_unet(models):
    cond = sample.encode_prompt(models, ["a red circle", "a blue square", ""])
    x = torch.randn(3, 4, 16, 16)
    assert models.unet(x, torch.tensor([1, 500, 999]), **cond).sample.shape == x.shape
    if models.kind == "sdxl":
        assert cond["encoder_hidden_states"].shape == (3, 16, 64)  # both encoders' penultimate states
        assert cond["added_cond_kwargs"]["text_embeds"].shape == (3, 32)
        assert cond["added_cond_kwargs"]["time_ids"][0].tolist() == [128, 128, 0, 0, 128, 128]
    else:
        assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].shape == (3, 16, 32)


def test_sdxl_time_ids_follow_micro_conditioning(_tiny_models):
    models = _tiny_models["sdxl"]
    cond = sample.encode_prompt(models, ["a", "b"], original_sizes=[[600, 400], [32, 32]],
                                crops_top_left=[[3, 4], [0, 0]], target_size=[32, 32])
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[600, 400, 3, 4, 32, 32], [32, 32, 0, 0, 32, 32]]


def test_repeat_encodes_each_caption_once_for_several_images(models):
    sizes, crops = [[40, 32], [32, 32], [32, 48], [64, 64]], [[1, 2], [0, 0], [3, 4], [0, 8]]
    once = sample.encode_prompt(models, ["a red circle", "a blue square"], sizes, crops, [32, 32], repeat=2)
    twice = sample.encode_prompt(models, ["a red circle", "a blue square"] * 2, sizes, crops, [32, 32])
    torch.testing.assert_close(once, twice)


def test_images_encode_scaled_and_decode(_tiny_models):
    vae = _tiny_models["sd15"].vae
    pixels = torch.rand(5, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    latents = sample.encode_images(vae, pixels, generator=g, chunk=2)
    mean = torch.cat([vae.encode(p[None]).latent_dist.mean for p in pixels])
    # the latent is a sample around the mean, times the scaling factor
    assert latents.shape == (5, 4, 16, 16)
    assert (latents / vae.config.scaling_factor - mean).abs().mean() < 3 * vae.encode(pixels).latent_dist.std.mean()
    assert sample.decode_latents(vae, latents).shape == (5, 3, 32, 32)


def _randomize(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.data = torch.randn(p.shape, generator=g) * 0.2


def test_lora_save_load_round_trip_is_exact(models, tmp_path):
    params = list(sample.add_lora(models.unet, rank=4).values())
    assert params and all(p.dtype == torch.float32 for p in params)
    _randomize(params)
    sample.save_lora(models.unet, str(tmp_path))
    assert os.path.isfile(tmp_path / sample.LORA_FILE)
    fresh = sample.build_tiny(models.kind).unet
    sample.load_lora(fresh, str(tmp_path))
    saved = sample.lora_state_dict(models.unet)
    loaded = sample.lora_state_dict(fresh)
    assert saved.keys() == loaded.keys() and len(saved) == len(params)
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    cond = sample.encode_prompt(models, ["x"])
    torch.testing.assert_close(fresh(x, t, **cond).sample, models.unet(x, t, **cond).sample)


def test_saved_lora_loads_in_diffusers_pipeline_and_changes_output(models, tmp_path):
    from diffusers import DiffusionPipeline

    pipe_dir = sample.save_pipeline(models, str(tmp_path / "pipe"))
    params = list(sample.add_lora(models.unet, rank=4).values())
    _randomize(params)
    sample.save_lora(models.unet, str(tmp_path / "lora"))

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if models.kind == "sdxl" else "StableDiffusionPipeline")

    def run():
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = run()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    after = run()
    assert after.shape == before.shape and abs(after - before).max() > 1e-3
    pipe.unload_lora_weights()
    assert abs(run() - before).max() < 1e-5


def test_local_pipeline_dir_loads_with_its_kind(models, tmp_path):
    pipe_dir = sample.save_pipeline(models, str(tmp_path / "pipe"))
    loaded = sample.load_models(pipe_dir)
    assert loaded.kind == models.kind
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([3])
    cond = sample.encode_prompt(models, ["x"])
    torch.testing.assert_close(loaded.unet(x, t, **cond).sample, models.unet(x, t, **cond).sample)
    assert loaded.scheduler.config.clip_sample is False


def test_bad_models_fail_with_what_was_expected(tmp_path):
    with pytest.raises(sample.ModelError,
                       match="unknown --model .sd-15.*sd15, sdxl, sd35-medium, sd35-large, flux2-klein-4b, "
                             "flux2-klein-9b, tiny, tiny-sdxl, tiny-sd3, tiny-flux2"):
        sample.resolve_model("sd-15")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(sample.ModelError, match="not a diffusers pipeline.*weights.bin"):
        sample.resolve_model(str(tmp_path))
    with pytest.raises(sample.ModelError, match="could not fetch"):
        sample.resolve_model("nobody/no-such-model")  # offline in tests
    with pytest.raises(sample.ModelError, match="holds no pytorch_lora_weights.safetensors"):
        sample.load_lora(sample.build_tiny().unet, str(tmp_path))
