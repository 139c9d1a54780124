"""HPSv2 and ImageReward on tiny stand-ins in their own checkpoint layouts (OpenCLIP; BLIP + MLP head), each against
its reference's forward written out here in plain torch; and every scorer at once through evaluate.py."""

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
from test_sample_eval import evaluate_main, make_folder, scorer_dir  # noqa: F401 (scorer_dir is a fixture)


def rand_images(n, seed, size=(40, 32)):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def attention(x, w, heads, key=None, mask=None, causal=False):
    """torch's own multi-head attention (sequence first) on separate or fused q/k/v weights: the oracle's."""
    key = x if key is None else key
    q, k, v, out = w
    length = x.shape[0]
    causal_mask = torch.full((length, length), float("-inf")).triu(1) if causal else None
    y, _ = F.multi_head_attention_forward(
        x, key, key, x.shape[-1], heads, None, torch.cat([q[1], k[1], v[1]]), None, None, False, 0.0, out[0], out[1],
        training=False, key_padding_mask=mask, need_weights=False, attn_mask=causal_mask,
        use_separate_proj_weight=True, q_proj_weight=q[0], k_proj_weight=k[0], v_proj_weight=v[0])
    return y


# -----------------------------------------------------------------------------
# HPSv2: an OpenCLIP checkpoint


def openclip_state(config, seed=0):
    """A random OpenCLIP CLIP state dict ({"state_dict": ...}, as HPSv2 publishes it) with the sizes of a
    transformers CLIPConfig."""
    g = torch.Generator().manual_seed(seed)
    v, t, e = config.vision_config, config.text_config, config.projection_dim

    def rnd(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale or shape[-1] ** -0.5)

    def tower(prefix, width, inner, layers):
        s = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                s[p + ln + ".weight"], s[p + ln + ".bias"] = 1 + rnd(width, scale=0.1), rnd(width, scale=0.1)
            s[p + "attn.in_proj_weight"], s[p + "attn.in_proj_bias"] = rnd(3 * width, width), rnd(3 * width, scale=0.1)
            s[p + "attn.out_proj.weight"], s[p + "attn.out_proj.bias"] = rnd(width, width), rnd(width, scale=0.1)
            s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"] = rnd(inner, width), rnd(inner, scale=0.1)
            s[p + "mlp.c_proj.weight"], s[p + "mlp.c_proj.bias"] = rnd(width, inner), rnd(width, scale=0.1)
        return s

    grid = v.image_size // v.patch_size
    s = {"visual.conv1.weight": rnd(v.hidden_size, 3, v.patch_size, v.patch_size, scale=0.1),
         "visual.class_embedding": rnd(v.hidden_size, scale=0.5),
         "visual.positional_embedding": rnd(grid * grid + 1, v.hidden_size, scale=0.5),
         "visual.proj": rnd(v.hidden_size, e), "token_embedding.weight": rnd(t.vocab_size, t.hidden_size, scale=0.5),
         "positional_embedding": rnd(t.max_position_embeddings, t.hidden_size, scale=0.5),
         "text_projection": rnd(t.hidden_size, e), "logit_scale": torch.tensor(4.6052)}
    for ln, width in (("visual.ln_pre", v.hidden_size), ("visual.ln_post", v.hidden_size), ("ln_final", t.hidden_size)):
        s[ln + ".weight"], s[ln + ".bias"] = 1 + rnd(width, scale=0.1), rnd(width, scale=0.1)
    s.update(tower("visual.", v.hidden_size, v.intermediate_size, v.num_hidden_layers))
    s.update(tower("", t.hidden_size, t.intermediate_size, t.num_hidden_layers))
    return {"state_dict": s}


def openclip_reference(s, pixels, tokens, heads, layers):
    """OpenCLIP's CLIP.forward (ViT image tower, causal text tower, features at the highest token id) and HPSv2's
    score, the cosine of the two unit features."""

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"])

    def blocks(x, prefix, causal):
        x = x.transpose(0, 1)
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            (wq, wk, wv), (bq, bk, bv) = s[p + "attn.in_proj_weight"].chunk(3), s[p + "attn.in_proj_bias"].chunk(3)
            w = ((wq, bq), (wk, bk), (wv, bv), (s[p + "attn.out_proj.weight"], s[p + "attn.out_proj.bias"]))
            x = x + attention(norm(x, p + "ln_1"), w, heads, causal=causal)
            h = F.gelu(F.linear(norm(x, p + "ln_2"), s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"]))
            x = x + F.linear(h, s[p + "mlp.c_proj.weight"], s[p + "mlp.c_proj.bias"])
        return x.transpose(0, 1)

    patch = s["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + s["visual.positional_embedding"]
    x = blocks(norm(x, "visual.ln_pre"), "visual.", causal=False)
    image = norm(x[:, 0], "visual.ln_post") @ s["visual.proj"]
    x = s["token_embedding.weight"][tokens] + s["positional_embedding"][:tokens.shape[1]]
    x = norm(blocks(x, "", causal=True), "ln_final")
    text = x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ s["text_projection"]
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory, scorer_dir):  # noqa: F811
    from transformers import CLIPConfig

    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save(openclip_state(CLIPConfig.from_pretrained(scorer_dir)), path)
    return str(path)


def test_hpsv2_is_openclips_forward_on_its_checkpoint(hps_file, scorer_dir):  # noqa: F811
    from transformers import CLIPTokenizer

    images, prompts = rand_images(3, 0, size=(50, 45)), ["a cat", "a dog on a red cube", "x"]
    scorer = evaluate.HPSv2(hps_file, scorer_dir)
    tokens = CLIPTokenizer.from_pretrained(scorer_dir)(prompts, padding="max_length", truncation=True,
                                                        return_tensors="pt")["input_ids"]
    state = torch.load(hps_file)["state_dict"]
    want = openclip_reference(state, evaluate.reference_pixels(images, 32, letterbox=True), tokens, heads=4,
                              layers=2)
    got = scorer(images, prompts)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert got.std() > 1e-3  # the images and prompts do score differently
    # A key of another architecture is one clear error, not a silent partial load.
    torch.save({"state_dict": {**state, "visual.attnpool.weight": torch.zeros(1)}}, hps_file + ".bad")
    with pytest.raises(ValueError, match="not an OpenCLIP ViT CLIP state dict"):
        evaluate.HPSv2(hps_file + ".bad", scorer_dir)


def test_reference_pixels_crop_and_letterbox_size_as_torchvision():
    """Sizes and offsets as torchvision computes them (the pixel values against torchvision itself:
    benchmarks/scorer_oracle.py). Crop: an image whose short side is already the size is only cropped, its offset
    round((23 - 20) / 2) = 2. Letterbox: 45 x 30 -> 20 x round(13.33) = 13 rows, padded 3 above and 4 below."""
    mean, std = torch.tensor(evaluate.CLIP_MEAN)[:, None, None], torch.tensor(evaluate.CLIP_STD)[:, None, None]
    exact = rand_images(1, 4, size=(23, 20))[0]
    raw = torch.tensor(list(exact.getdata()), dtype=torch.float32).view(20, 23, 3).permute(2, 0, 1) / 255
    assert torch.equal(evaluate.reference_pixels([exact], 20)[0], (raw[:, :, 2:22] - mean) / std)
    x = evaluate.reference_pixels(rand_images(1, 3, size=(45, 30)), 20, letterbox=True)[0] * std + mean
    assert x.shape == (3, 20, 20)
    rows = (x.abs() > 1e-6).any(dim=0).any(dim=1)
    assert rows.tolist() == [False] * 3 + [True] * 13 + [False] * 4
    square = rand_images(1, 5, size=(20, 20))[0]  # already the size: neither resized nor padded
    raw = torch.tensor(list(square.getdata()), dtype=torch.float32).view(20, 20, 3).permute(2, 0, 1) / 255
    assert torch.equal(evaluate.reference_pixels([square], 20, letterbox=True)[0], (raw - mean) / std)


# -----------------------------------------------------------------------------
# ImageReward: BLIP's ViT and BERT with cross-attention, and an MLP head


VISION = dict(width=128, layers=2, patch=8, image=32, inner=256)  # two 64-wide heads, as BLIP's ViTs have
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    """ImageReward.pt, med_config.json and a BERT tokenizer directory, tiny, in the reference's layouts."""
    from transformers import BertTokenizer

    out = tmp_path_factory.mktemp("imagereward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + \
        [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + ["a", "cat", "dog", "on", "red", "cube"]
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(out / "tokenizer")
    config = dict(TEXT, vocab_size=len(dict.fromkeys(words)) + 2, architectures=["BertModel"], model_type="bert",
                  encoder_width=VISION["width"], add_cross_attention=True, type_vocab_size=2)
    (out / "med_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(5)

    def rnd(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale or shape[-1] ** -0.5)

    def linear(s, name, o, i):
        s[name + ".weight"], s[name + ".bias"] = rnd(o, i), rnd(o, scale=0.1)

    def ln(s, name, n):
        s[name + ".weight"], s[name + ".bias"] = 1 + rnd(n, scale=0.1), rnd(n, scale=0.1)

    w, grid, s = VISION["width"], VISION["image"] // VISION["patch"], {}
    v = "blip.visual_encoder."
    s[v + "cls_token"], s[v + "pos_embed"] = rnd(1, 1, w, scale=0.5), rnd(1, grid * grid + 1, w, scale=0.5)
    s[v + "patch_embed.proj.weight"] = rnd(w, 3, VISION["patch"], VISION["patch"], scale=0.1)
    s[v + "patch_embed.proj.bias"] = rnd(w, scale=0.1)
    for i in range(VISION["layers"]):
        p = f"{v}blocks.{i}."
        ln(s, p + "norm1", w), ln(s, p + "norm2", w), linear(s, p + "attn.qkv", 3 * w, w)
        linear(s, p + "attn.proj", w, w), linear(s, p + "mlp.fc1", VISION["inner"], w)
        linear(s, p + "mlp.fc2", w, VISION["inner"])
    ln(s, v + "norm", w)
    h, t = TEXT["hidden_size"], "blip.text_encoder."
    s[t + "embeddings.word_embeddings.weight"] = rnd(config["vocab_size"], h, scale=0.5)
    s[t + "embeddings.position_embeddings.weight"] = rnd(TEXT["max_position_embeddings"], h, scale=0.5)
    s[t + "embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    ln(s, t + "embeddings.LayerNorm", h)
    for i in range(TEXT["num_hidden_layers"]):
        p = f"{t}encoder.layer.{i}."
        for kind, width in (("attention", h), ("crossattention", w)):
            linear(s, p + kind + ".self.query", h, h), linear(s, p + kind + ".self.key", h, width)
            linear(s, p + kind + ".self.value", h, width), linear(s, p + kind + ".output.dense", h, h)
            ln(s, p + kind + ".output.LayerNorm", h)
        linear(s, p + "intermediate.dense", TEXT["intermediate_size"], h)
        linear(s, p + "output.dense", h, TEXT["intermediate_size"]), ln(s, p + "output.LayerNorm", h)
    linear(s, "blip.vision_proj", 16, w), linear(s, "blip.text_proj", 16, h)  # in the file, unused by the score
    for i, (o, n) in zip((0, 2, 4, 6, 7), [(1024, h), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        linear(s, f"mlp.layers.{i}", o, n)
    torch.save(s, out / "ImageReward.pt")
    return {k: str(out / f) for k, f in (("weights", "ImageReward.pt"), ("config", "med_config.json"),
                                         ("tokenizer", "tokenizer"))}


def imagereward_reference(s, pixels, ids, mask):
    """ImageReward.score: BLIP's ViT (pre-norm blocks, eps 1e-6), BERT (post-norm, eps 1e-12) attending to itself
    with the padding masked and then to every image token, the [CLS] state through the head, standardised."""

    def norm(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps)

    def lin(x, name):
        return F.linear(x, s[name + ".weight"], s[name + ".bias"])

    v, patch = "blip.visual_encoder.", s["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=patch)
    x = torch.cat([s[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + s[v + "pos_embed"]
    x = x.transpose(0, 1)
    for i in range(VISION["layers"]):
        p = f"{v}blocks.{i}."
        (wq, wk, wv), (bq, bk, bv) = s[p + "attn.qkv.weight"].chunk(3), s[p + "attn.qkv.bias"].chunk(3)
        w = ((wq, bq), (wk, bk), (wv, bv), (s[p + "attn.proj.weight"], s[p + "attn.proj.bias"]))
        x = x + attention(norm(x, p + "norm1", 1e-6), w, VISION["width"] // 64)
        x = x + lin(F.gelu(lin(norm(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    image = norm(x, v + "norm", 1e-6)
    t = "blip.text_encoder."
    x = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = norm(x, t + "embeddings.LayerNorm", 1e-12).transpose(0, 1)
    heads = TEXT["num_attention_heads"]
    for i in range(TEXT["num_hidden_layers"]):
        p = f"{t}encoder.layer.{i}."
        for kind, key, key_mask in (("attention", None, mask == 0), ("crossattention", image, None)):
            w = [(s[f"{p}{kind}.self.{n}.weight"], s[f"{p}{kind}.self.{n}.bias"]) for n in ("query", "key", "value")]
            w.append((s[f"{p}{kind}.output.dense.weight"], s[f"{p}{kind}.output.dense.bias"]))
            x = norm(x + attention(x, w, heads, key=key, mask=key_mask), f"{p}{kind}.output.LayerNorm", 1e-12)
        x = norm(x + lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm", 1e-12)
    r = x[0]
    for i in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{i}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_is_blips_forward_on_its_checkpoint(imagereward_files):
    images, prompts = rand_images(3, 1, size=(50, 45)), ["a cat", "a dog on a red cube", "cube"]
    f = imagereward_files
    scorer = evaluate.ImageReward(f["weights"], f["config"], f["tokenizer"])
    tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (3, 35) and (tokens["input_ids"][:, 0] == scorer.tokenizer.cls_token_id).all()
    state = torch.load(f["weights"])
    want = imagereward_reference(state, evaluate.reference_pixels(images, 32), tokens["input_ids"],
                                 tokens["attention_mask"])
    got = scorer(images, prompts)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert got.std() > 1e-3
    del state["blip.text_encoder.encoder.layer.1.output.dense.weight"]
    torch.save(state, f["weights"] + ".bad")
    with pytest.raises(RuntimeError, match="Missing key"):
        evaluate.ImageReward(f["weights"] + ".bad", f["config"], f["tokenizer"])


# -----------------------------------------------------------------------------
# All scorers through evaluate.py


def all_scorers(scorer_dir, hps_file, imagereward_files, head):  # noqa: F811
    f = imagereward_files
    return ["--scorers", "all", "--clip-model", scorer_dir, "--aesthetic-head", head, "--hpsv2-weights", hps_file,
            "--hpsv2-base", scorer_dir, "--imagereward-weights", f["weights"], "--imagereward-config", f["config"],
            "--imagereward-tokenizer", f["tokenizer"]]


def test_all_scorers_self_half_better_wins_per_prompt_and_the_page(tmp_path, scorer_dir, hps_file,  # noqa: F811
                                                                    imagereward_files):
    g = torch.Generator().manual_seed(3)
    dims = [(1024, 16), (128, 1024), (64, 128), (16, 64), (1, 16)]
    torch.save({f"layers.{i}.{p}": torch.randn(o, n, generator=g) if p == "weight" else torch.randn(o, generator=g)
                for i, (o, n) in zip((0, 2, 4, 6, 7), dims) for p in ("weight", "bias")}, tmp_path / "head.pth")
    extra = all_scorers(scorer_dir, hps_file, imagereward_files, str(tmp_path / "head.pth"))
    prompts = ["a cat", "a dog", "red cube", "cube on a cat"]
    candidates = rand_images(4 * len(prompts), 6, size=(32, 32))  # 4 candidates a prompt
    a = candidates[::2]  # 2 images a prompt
    make_folder(tmp_path / "a", prompts, a, per_prompt=2)
    make_folder(tmp_path / "copy", prompts, a, per_prompt=2)
    report = evaluate_main(tmp_path / "a", tmp_path / "copy", scorer=scorer_dir, out=tmp_path / "self.json",
                           extra=extra)
    assert sorted(report["scorers"]) == sorted(evaluate.SCORERS)
    for name in evaluate.SCORERS:
        assert report["scorers"][name]["winrates"][str(tmp_path / "a")][str(tmp_path / "copy")]["winrate"] == 0.5

    # For HPSv2 and ImageReward: from each prompt's 4 candidates, the 2 best into "better" and the 2 worst into
    # "worse", each pair ordered so that image j of better beats image j of worse: 100% on that scorer.
    for name, scorer in (("hpsv2", evaluate.HPSv2(hps_file, scorer_dir)),
                         ("imagereward", evaluate.ImageReward(imagereward_files["weights"], imagereward_files["config"],
                                                              imagereward_files["tokenizer"]))):
        better, worse = [], []
        for i, p in enumerate(prompts):
            group = candidates[4 * i:4 * i + 4]
            order = scorer(group, [p] * 4).argsort(descending=True).tolist()
            better += [group[k] for k in order[:2]]
            worse += [group[k] for k in order[2:]]
        make_folder(tmp_path / f"better-{name}", prompts, better, per_prompt=2)
        make_folder(tmp_path / f"worse-{name}", prompts, worse, per_prompt=2)
        report = evaluate_main(tmp_path / f"better-{name}", tmp_path / f"worse-{name}", tmp_path / "a",
                               scorer=scorer_dir, out=tmp_path / f"{name}.json",
                               extra=extra + ["--html", str(tmp_path / f"page-{name}")])
        w = report["scorers"][name]["winrates"][str(tmp_path / f"better-{name}")][str(tmp_path / f"worse-{name}")]
        assert w["winrate"] == 1.0 and w["prompts"] == 4 and w["images"] == 8
        assert len(report["scorers"][name]["winrates"]) == 3  # the matrix: every folder against the two others
    page = (tmp_path / "page-imagereward" / "index.html").read_text()
    assert all(f"<h3>{evaluate.NAMES[name]}</h3>" in page for name in evaluate.SCORERS)  # each ranked
    assert all(f" on {evaluate.NAMES[name]}: win rate " in page for name in evaluate.SCORERS)  # each in the verdict
    assert page.count("<svg class=\"hist\"") == 2 * 5 and page.count("<svg class=\"summary\"") == 1  # the first vs 2
    assert re.search(r"<svg class=\"summary\".*?</svg>", page).group(0).count("<circle") == 2 * 5  # 2 folders, 5 scorers


def test_a_scorer_that_cannot_load_is_named(tmp_path, scorer_dir, hps_file, imagereward_files):  # noqa: F811
    images = rand_images(2, 7, size=(32, 32))
    make_folder(tmp_path / "a", ["p", "q"], images)
    make_folder(tmp_path / "b", ["p", "q"], images)
    base = ["--hpsv2-base", scorer_dir, "--imagereward-config", imagereward_files["config"],
            "--imagereward-tokenizer", imagereward_files["tokenizer"]]
    for scorer, missing in (("hpsv2", "--hpsv2-weights"), ("imagereward", "--imagereward-weights")):
        with pytest.raises(SystemExit, match=f"cannot load the {scorer} scorer .*{tmp_path / 'none.pt'}"):
            evaluate_main(tmp_path / "a", tmp_path / "b", scorer=scorer_dir, out=tmp_path / "r.json",
                          extra=["--scorers", scorer, missing, str(tmp_path / "none.pt"), *base])
    assert not os.path.exists(tmp_path / "r.json")
