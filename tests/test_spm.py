"""spm.py: the step-aware preference model against plain CLIP at the identity, against SPO's equations with the
timestep modules off the identity, and loading the released file format strictly."""

import copy

import pytest
import torch

import spm


def images(n=3, h=40, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


PROMPTS = ["a red circle", "a blue square", "x"]


def plain_clip_scores(clip, model, pixels, prompts):
    """PickScore's score with the CLIP alone: logit_scale.exp() * cos(image, text)."""
    image = torch.nn.functional.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output),
                                          dim=-1)
    return clip.logit_scale.exp() * (image * model.text_embeds(PROMPTS)).sum(-1)


def test_at_the_identity_it_scores_exactly_as_its_clip():
    model = spm.build_tiny()
    clip = copy.deepcopy(model.model)  # hooks are not copied with the module: a plain CLIP
    with torch.no_grad():
        for t in (0, 500, 999):
            torch.testing.assert_close(model.score(images(), PROMPTS, t),
                                       plain_clip_scores(clip, model, model.preprocess(images()), PROMPTS),
                                       rtol=0, atol=0)


def randomise_time_modules(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "adaLN" in name or "t_embedder" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def oracle_image_embeds(model, pixels, t):
    """SPO's equations, written out on the CLIP's own submodules: adaLN around each sublayer, then the pooled shift
    and scale."""
    vision = model.model.vision_model
    c = model.model.t_embedder(t)
    x = vision.pre_layrnorm(vision.embeddings(pixels))
    for layer in vision.encoder.layers:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = layer.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], layer.layer_norm1.weight, layer.layer_norm1.bias,
                                           layer.layer_norm1.eps) * (1 + sc_a) + sh_a
        x = x + g_a * layer.self_attn(hidden_states=h, attention_mask=None)[0]
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], layer.layer_norm2.weight, layer.layer_norm2.bias,
                                           layer.layer_norm2.eps) * (1 + sc_m) + sh_m
        x = x + g_m * layer.mlp(h)
    ln = vision.post_layernorm
    pooled = torch.nn.functional.layer_norm(x[:, 0], x.shape[-1:], ln.weight, ln.bias, ln.eps)
    shift, scale = vision.adaLN_modulation(c).chunk(2, dim=-1)
    return torch.nn.functional.normalize(model.model.visual_projection(pooled * (1 + scale) + shift), dim=-1)


def test_the_hooks_compute_spos_equations_and_depend_on_t():
    model = spm.build_tiny()
    randomise_time_modules(model)
    pixels = model.preprocess(images())
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        torch.testing.assert_close(model.image_embeds(pixels, t), oracle_image_embeds(model, pixels, t),
                                   rtol=1e-5, atol=1e-6)
        a, b = model.score(images(), PROMPTS, 0), model.score(images(), PROMPTS, 700)
    assert (a - b).abs().max() > 1e-3


def test_preprocessing_resizes_the_short_side_and_crops_the_centre_as_torchvision():
    model = spm.build_tiny()  # image size 32
    columns = torch.arange(35, dtype=torch.float32).expand(1, 3, 32, 35) / 35 * 2 - 1  # each pixel its column
    pixels = model.preprocess(columns)
    assert pixels.shape == (1, 3, 32, 32)
    back = ((pixels * model.std + model.mean) - 0.5) * 2  # undo the normalisation: back in [-1, 1]
    torch.testing.assert_close(back[0, 0, 0], columns[0, 0, 0, 2:34], rtol=0, atol=1e-5)  # round(3 / 2) = 2 crop
    wide = model.preprocess(images(1, 64, 96))
    assert wide.shape == (1, 3, 32, 32)


def test_released_format_loads_strictly_and_bad_files_fail_clearly(tmp_path):
    model = spm.build_tiny()
    randomise_time_modules(model)
    state = {f"model.{k}": v.clone() for k, v in model.model.state_dict().items()}
    # files written by older transformers also hold the position ids buffer
    state["model.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    assert any(k.startswith("model.vision_model.encoder.layers.0.adaLN_modulation.1.") for k in state)
    assert {"model.t_embedder.mlp.0.weight", "model.t_embedder.mlp.2.bias",
            "model.vision_model.adaLN_modulation.1.weight"} <= set(state)
    torch.save(state, tmp_path / "released.bin")
    loaded = spm.load(str(tmp_path / "released.bin"), backbone="tiny")
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(images(), PROMPTS, 300), model.score(images(), PROMPTS, 300),
                                   rtol=0, atol=0)
    spm.save(loaded, tmp_path / "again.bin")
    again = torch.load(tmp_path / "again.bin", weights_only=True)
    assert all(k.startswith("model.") for k in again) and len(again) == len(state) - 2

    del state["model.t_embedder.mlp.0.weight"]
    torch.save(state, tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="missing.*t_embedder.mlp.0.weight"):
        spm.load(str(tmp_path / "missing.bin"), backbone="tiny")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a preference model.s weights .unreadable"):
        spm.load(str(tmp_path / "junk.bin"), backbone="tiny")


def test_preference_loss_is_pickscores_two_way_cross_entropy():
    s_w, s_l = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    expected = torch.tensor([-torch.log(torch.sigmoid(torch.tensor(1.0))), torch.log(torch.tensor(2.0))]).mean()
    torch.testing.assert_close(spm.preference_loss(s_w, s_l), expected)


def test_a_backbone_directory_with_its_processor_loads_like_the_hub_layout(tmp_path):
    """The non-tiny path of spm.load: a CLIPModel directory (as PickScore_v1 is) plus a processor (here saved beside
    it, as the laion processor is fetched); its resize size comes from the processor."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    clip, tokenizer = spm.tiny_clip(0)
    clip.save_pretrained(tmp_path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                  tokenizer=tokenizer).save_pretrained(tmp_path)
    loaded, built = spm.load(None, str(tmp_path)), spm.build_tiny(0)
    assert loaded.image_size == 32
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(images(), PROMPTS, 100), built.score(images(), PROMPTS, 100))
    with pytest.raises(ValueError, match="could not load"):
        spm.load(None, str(tmp_path / "nothing"))
