"""Scores of sample.py folders, their per-prompt win rates and a matrix of them: the protocol of the papers' tables.

    python sample.py --model sdxl --prompts validation_unique --out samples/base
    python sample.py --model sdxl --lora runs/dpo-ncp-sdxl-absolute-winners --prompts validation_unique \
        --out samples/ncp
    python evaluate.py samples/ncp samples/base [samples/dpo ...] --out report.json --markdown report.md
    python evaluate.py samples/ncp samples/base --scorers all --html report/

The folders come from sample.py over the same prompts and seeds, under the same protocol (refused otherwise);
images pair up by file name. Win rate of A over B: for each prompt, the share of its images where A scores
higher (image j against image j, ties half), averaged over prompts, with a 95% bootstrap interval over prompts.
Mean scores are per prompt, then over prompts, with the same kind of interval. Scorers: PickScore (CLIP-H's logit
scale times the cosine of image and prompt embeddings), HPSv2.1 (OpenCLIP ViT-H-14's cosine, run in transformers'
CLIP), ImageReward (BLIP, run in transformers' BLIP models), the LAION aesthetic predictor v2 and CLIP score; each
preprocesses images as its reference does.
"""
import argparse
import json
import os
import sys

import torch

import data
import run
import sample

PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP = "openai/clip-vit-large-patch14"  # CLIP score, and the aesthetic head's image encoder
# The LAION aesthetic predictor v2 (sac+logos+ava1, linear MSE head), at the commit that added it, and its SHA-256.
AESTHETIC = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
             "61f2f07a2b16be5ffb40a10ba5adae4a74c9d0d9/sac%2Blogos%2Bava1-l14-linearMSE.pth")
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
# HPSv2.1: its OpenCLIP checkpoint (hub repo/file, or a local .pt), run in a transformers CLIPModel whose architecture
# and tokenizer come from the HF copy of the OpenCLIP ViT-H-14 it was fine-tuned from (the processor PickScore uses).
HPSV2 = "xswu/HPSv2/HPS_v2.1_compressed.pt"
HPSV2_BASE = PICKSCORE_PROCESSOR
# ImageReward v1.0: the checkpoint and the BERT config of its BLIP text encoder, and BLIP's tokenizer.
IMAGEREWARD = "THUDM/ImageReward/ImageReward.pt"
IMAGEREWARD_CONFIG = "THUDM/ImageReward/med_config.json"
IMAGEREWARD_TOKENIZER = "google-bert/bert-base-uncased"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SCORERS = ["pickscore", "hpsv2", "imagereward", "aesthetic", "clip"]


def read_index(folder, seeds=None):
    """index.json of a sample.py folder -> ({file: prompt}, protocol); `seeds`, a dict, gets {file: seed}. Raises
    ValueError if missing, not sample.py's JSON, or incomplete."""
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no index.json: make it with sample.py")
    try:
        with open(path) as f:
            index = json.load(f)
        files = {}
        for item in index["images"]:
            if not (isinstance(item["prompt"], str) and isinstance(item["files"], list)
                    and all(isinstance(n, str) for n in item["files"])):
                raise TypeError
            files.update((name, item["prompt"]) for name in item["files"])
            if seeds is not None:
                seeds.update(zip(item["files"], item.get("seeds") or [None] * len(item["files"])))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): make it with sample.py") from None
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a sample.py index (an object with \"images\": a list of {{\"prompt\": text, "
                         "\"files\": [names]}}): make it with sample.py") from None
    outside = [n for n in files if not data.inside(folder, n)]
    if outside:  # a tampered index: nothing outside the folder is read, scored or embedded in a report
        raise ValueError(f"{path} names {len(outside)} files outside {folder} (first: {outside[0]}); make it with "
                         "sample.py")
    missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} of its images (first: {missing[0]}); finish sample.py first")
    return files, index.get("protocol")


def sampled_from(folder):
    """{model, lora, lora_scale} a sample.py folder was sampled from, as its index.json records them."""
    with open(os.path.join(folder, "index.json")) as f:
        index = json.load(f)
    return {k: index.get(k) for k in ("model", "lora", "lora_scale")}


def pair_up(folders, allow_protocols=False):
    """[(file, prompt)] of the images every folder holds for the same prompts; ValueError if the folders do not pair
    up, or were sampled under different protocols (unless allow_protocols)."""
    seeds = [{} for _ in folders]
    indexes = [read_index(folder, s) for folder, s in zip(folders, seeds)]
    (first, protocol), name = indexes[0], folders[0]
    for folder, (files, other), own in zip(folders[1:], indexes[1:], seeds[1:]):
        if other != protocol and not allow_protocols:
            raise ValueError(f"{name} and {folder} were sampled under different protocols ({protocol} and {other}): "
                             "their scores do not compare; --allow-protocol-mismatch to compare them anyway")
        if files.keys() != first.keys() or any(files[k] != first[k] for k in first):
            differ = sorted(set(files) ^ set(first))[:3] or [k for k in first if files[k] != first[k]][:3]
            raise ValueError(f"{name} and {folder} do not pair up (same prompts and files expected; differ: {differ})")
        other_seed = next((f for f in first if own.get(f) != seeds[0].get(f)), None)
        if other_seed:  # a paired comparison pairs images of the same initial noise
            raise ValueError(f"{name} and {folder} were sampled with different seeds ({other_seed}: "
                             f"{seeds[0].get(other_seed)} and {own.get(other_seed)}): sample both with the same --seed")
    return sorted(first.items())


class PickScore:
    """score(images, prompts) -> (N,) logit_scale * cos(image, prompt) with a CLIP model from transformers."""

    def __init__(self, model, processor, device="cpu"):
        from transformers import AutoModel, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(processor)
        self.model = AutoModel.from_pretrained(model).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images, prompts):
        inputs = self.processor(images=images, text=prompts, padding=True, truncation=True, return_tensors="pt")
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return out.logits_per_image.diagonal().float().cpu()  # image i with its own prompt i


class ClipModel:
    """A transformers CLIP model and its processor (bicubic resize of the shorter side, centre crop, CLIP's
    normalisation: the reference preprocessing of CLIP score and the aesthetic head), with unit embeddings."""

    def __init__(self, model, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(model)
        self.model = CLIPModel.from_pretrained(model).eval().to(device)

    @torch.no_grad()
    def images(self, images):
        """(N, D) unit image embeddings."""
        return unit_image_embeds(self.model, self.processor(images=images, return_tensors="pt")["pixel_values"])

    @torch.no_grad()
    def texts(self, prompts):
        """(N, D) unit text embeddings (prompts truncated to the model's length)."""
        return unit_text_embeds(self.model, self.processor(text=prompts, padding=True, truncation=True,
                                                           return_tensors="pt"))


def unit_image_embeds(model, pixels):
    """(N, D) unit image embeddings of a transformers CLIPModel: the vision tower's pooled output through the visual
    projection."""
    pixels = pixels.to(model.logit_scale.device)
    embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return torch.nn.functional.normalize(embeds.float(), dim=-1)


def unit_text_embeds(model, tokens):
    """(N, D) unit text embeddings of a transformers CLIPModel from its tokenizer's output."""
    device = model.logit_scale.device
    out = model.text_model(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
    return torch.nn.functional.normalize(model.text_projection(out.pooler_output).float(), dim=-1)


class ClipScore:
    """score(images, prompts) -> (N,) max(100 cos(image, prompt), 0) with CLIP ViT-L/14, the usual CLIP score."""

    def __init__(self, model=CLIP, device="cpu"):
        self.clip = ClipModel(model, device)

    def __call__(self, images, prompts):
        return (100 * (self.clip.images(images) * self.clip.texts(prompts)).sum(-1)).clamp(min=0).cpu()


class Aesthetic:
    """score(images, prompts) -> (N,) the LAION aesthetic predictor v2: a linear MLP on the unit CLIP ViT-L/14
    image embedding (the prompts are not used). head: the .pth file, a local path or a URL fetched once into
    $HF_HOME/ncp/scorers; checked against sha256 when given (sample.fetch_checked)."""

    def __init__(self, head=AESTHETIC, model=CLIP, device="cpu", sha256=AESTHETIC_SHA256):
        self.clip = ClipModel(model, device)
        state = torch.load(sample.fetch_checked(head, "aesthetic head", sha256, "scorers"), map_location="cpu",
                           weights_only=True)
        self.head = mlp_head(state).to(device)

    @torch.no_grad()
    def __call__(self, images, prompts):
        return self.head.layers(self.clip.images(images)).squeeze(-1).cpu()


def hub_file(spec):
    """A local file as it is, or "owner/repo/path/in/repo" fetched from the hub (cached; HF_HUB_OFFLINE respected)."""
    if os.path.isfile(spec):
        return spec
    if spec.startswith(("/", ".", "~")) or os.path.isabs(spec):
        raise ValueError(f"no such file: {spec}")
    parts = spec.split("/")
    if len(parts) < 3:
        raise ValueError(f"{spec} is neither a file nor owner/repo/file")
    from huggingface_hub import hf_hub_download

    return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))


def reference_pixels(images, size, letterbox=False):
    """PIL images -> (N, 3, size, size), normalised with CLIP's mean and std, as the references' torchvision
    transforms make them. Default (ImageReward): Resize(size, bicubic) of the PIL image, the short side to size and the
    long one truncated, then CenterCrop(size), its offset rounded. letterbox (HPSv2's evaluation transform, its
    ResizeMaxSize): ToTensor, an antialiased bicubic resize of the long side to size (the short one rounded), then
    zeros padded evenly around it, the odd pixel to the right or bottom."""
    from PIL import Image

    def to_tensor(image):  # torchvision's ToTensor: (3, H, W) in [0, 1]
        w, h = image.size
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1) / 255

    out = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        if letterbox:
            x, scale = to_tensor(image), size / max(h, w)
            if scale != 1.0:
                new_h, new_w = round(h * scale), round(w * scale)
                x = torch.nn.functional.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False,
                                                    antialias=True)[0]
                top, left = (size - new_h) // 2, (size - new_w) // 2
                x = torch.nn.functional.pad(x, (left, size - new_w - left, top, size - new_h - top))
        else:
            new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            x = to_tensor(image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), Image.BICUBIC))
            top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
            x = x[:, top:top + size, left:left + size]
        out.append(x.float())
    return (torch.stack(out) - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def mlp_head(state, prefix=""):
    """The linear MLP head of the LAION aesthetic predictor and of ImageReward (Linear layers 0, 2, 4, 6, 7 with
    dropout between, no activations), loaded strictly from state's `{prefix}layers.N.*` keys."""
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    sizes = [state[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
    drop = [0.2, 0.2, 0.1]
    layers = []
    for i, (out, inp) in enumerate(sizes):
        layers += [torch.nn.Linear(inp, out)] + ([torch.nn.Dropout(drop[i])] if i < 3 else [])
    head = torch.nn.Module()
    head.layers = torch.nn.Sequential(*layers)  # the reference's keys: layers.0, .2, .4, .6, .7
    head.load_state_dict(state, strict=True)
    return head.eval()


def openclip_to_transformers(state):
    """An OpenCLIP CLIP state dict (ViT image tower) -> the same weights under transformers' CLIPModel names: the
    fused attention input projection split into q, k and v, the two output projections transposed. Raises ValueError
    on a key it does not know."""
    import re

    names = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight", "logit_scale": "logit_scale"}
    norms = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
             "ln_final": "text_model.final_layer_norm"}
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    out, unknown = {}, []
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        layer = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
        if key in names:
            out[names[key]] = value
        elif key in ("visual.proj", "text_projection"):
            out[f"{'visual' if key == 'visual.proj' else 'text'}_projection.weight"] = value.T
        elif module in norms:
            out[f"{norms[module]}.{kind}"] = value
        elif key == "attn_mask":
            continue  # the causal mask, a buffer
        elif layer:
            prefix = f"{'vision' if layer[1] else 'text'}_model.encoder.layers.{layer[2]}"
            part, _, kind = layer[3].rpartition(".")
            if layer[3] in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for name, chunk in zip("qkv", value.chunk(3)):
                    out[f"{prefix}.self_attn.{name}_proj.{layer[3].removeprefix('attn.in_proj_')}"] = chunk
            elif part in block:
                out[f"{prefix}.{block[part]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an OpenCLIP ViT CLIP state dict: {len(unknown)} unknown keys ({unknown[:3]})")
    return out


class HPSv2:
    """score(images, prompts) -> (N,) HPSv2.1: cos(image, prompt) of OpenCLIP ViT-H-14 fine-tuned on HPDv2, the value
    hpsv2.score returns (papers often print it times 100). The checkpoint, an OpenCLIP state dict, runs here in a
    transformers CLIPModel of the same architecture; images letterboxed, not cropped, as HPSv2's evaluation transform
    makes them. base: a transformers CLIP directory or hub id giving the architecture and tokenizer (its weights are
    not read)."""

    def __init__(self, weights=HPSV2, base=HPSV2_BASE, device="cpu"):
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        config = CLIPConfig.from_pretrained(base)
        config.text_config.hidden_act = config.vision_config.hidden_act = "gelu"  # OpenCLIP ViT-H-14: exact GELU
        self.tokenizer = CLIPTokenizer.from_pretrained(base)
        state = torch.load(hub_file(weights), map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
        self.model = CLIPModel(config)
        self.model.load_state_dict(openclip_to_transformers(state), strict=True)
        self.model.eval().to(device)
        self.size = config.vision_config.image_size

    @torch.no_grad()
    def __call__(self, images, prompts):
        image = unit_image_embeds(self.model, reference_pixels(images, self.size, letterbox=True))
        text = unit_text_embeds(self.model, self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt"))
        return (image * text).sum(-1).cpu()


def blip_vision_config(state):
    """BLIP's ViT (its patch size, width, depth and image size read off the weights; 64-wide heads, as BLIP's base and
    large ViTs have) as a transformers BlipVisionConfig."""
    from transformers import BlipVisionConfig

    width, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    return BlipVisionConfig(hidden_size=width, intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                            num_attention_heads=width // 64, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6,
                            image_size=patch * round((state["pos_embed"].shape[1] - 1) ** 0.5))


def blip_vit_name(key):
    """A key of BLIP's ViT (timm's layout) -> its name in transformers' BlipVisionModel. KeyError if unknown."""
    names = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if key in names:
        return names[key]
    parts = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    blocks, i, rest = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
    module, _, kind = rest.rpartition(".")
    if blocks != "blocks" or module not in parts:
        raise KeyError(key)
    return f"encoder.layers.{i}.{parts[module]}.{kind}"


class ImageReward:
    """score(images, prompts) -> (N,) ImageReward v1.0: BLIP's BERT reads the prompt, cross-attending to BLIP's ViT
    image tokens; its [CLS] state through the MLP head, standardised by the reference's mean and std. The checkpoint
    runs in transformers' BLIP vision and text models (BLIP's own layout, keys renamed); images as ImageReward's
    transform. Keys the reference does not use (BLIP's contrastive projections) are ignored, as its strict=False
    load does."""

    MEAN, STD = 0.16717362830052426, 1.0333394966054072  # the reference's standardisation of the raw head output
    MAX_LENGTH = 35  # the reference's prompt length (padded to it, truncated at it)

    def __init__(self, weights=IMAGEREWARD, config=IMAGEREWARD_CONFIG, tokenizer=IMAGEREWARD_TOKENIZER, device="cpu"):
        from transformers import BertTokenizer, BlipTextConfig, BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        state = torch.load(hub_file(weights), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        vit = {k.removeprefix("blip.visual_encoder."): v for k, v in state.items()
               if k.startswith("blip.visual_encoder.")}
        text = {k.removeprefix("blip.text_encoder."): v for k, v in state.items()
                if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
        if not vit or not text:
            raise ValueError("not an ImageReward checkpoint: no blip.visual_encoder.* or blip.text_encoder.* weights")
        self.vision = BlipVisionModel(blip_vision_config(vit))
        try:
            vit = {blip_vit_name(k): v for k, v in vit.items()}
        except KeyError as e:
            raise ValueError(f"not BLIP's ViT: unknown key {e}") from None
        self.vision.load_state_dict(vit, strict=True)
        with open(hub_file(config)) as f:
            med = json.load(f)
        keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
        # transformers builds the cross-attention only for a decoder config; the forward below is an encoder's
        # (is_decoder=False: no causal mask), as ImageReward's BLIP text encoder runs.
        self.text = BlipTextModel(BlipTextConfig(**{k: med[k] for k in keep if k in med}, is_decoder=True,
                                                 encoder_hidden_size=self.vision.config.hidden_size),
                                  add_pooling_layer=False)
        self.text.load_state_dict(text, strict=True)
        self.head = mlp_head(state, "mlp.")
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # as BLIP
        for m in (self.vision, self.text, self.head):
            m.eval().to(device)
        self.size, self.device = self.vision.config.image_size, device

    @torch.no_grad()
    def __call__(self, images, prompts):
        pixels = reference_pixels(images, self.size).to(self.device)
        image = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.MAX_LENGTH,
                                return_tensors="pt").to(self.device)
        out = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        encoder_hidden_states=image, is_decoder=False).last_hidden_state[:, 0]
        return ((self.head.layers(out.float()).squeeze(-1) - self.MEAN) / self.STD).cpu()


def by_prompt(values, prompts):
    """(N,) values of images -> (P,) their mean per prompt, prompts in first-seen order."""
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return torch.stack([values[idx].mean() for idx in groups.values()])


def bootstrap(per_prompt, resamples=2000, seed=0):
    """95% percentile interval of the mean of (P,) per-prompt values, resampling prompts with replacement. For a
    paired quantity (a difference, a win share) the prompts are resampled once for both folders."""
    g = torch.Generator().manual_seed(seed)
    draws = per_prompt[torch.randint(0, len(per_prompt), (resamples, len(per_prompt)), generator=g)].mean(dim=1)
    return [draws.quantile(0.025).item(), draws.quantile(0.975).item()]


def winrate(a, b, prompts):
    """A's win rate over B per prompt: for each prompt, the share of its images (image j of A against image j of B)
    where A scores higher, ties half; then the mean over prompts, with a bootstrap 95% interval over prompts."""
    share = by_prompt((a > b).double() + 0.5 * (a == b).double(), prompts)
    return {"winrate": share.mean().item(), "ci95": bootstrap(share), "prompts": len(share), "images": len(a)}


def difference(a, b, prompts):
    """A's mean score minus B's, per prompt then over prompts, with a paired bootstrap 95% interval: the prompts
    are resampled together, so the interval is on the difference, not on either mean."""
    per_prompt = by_prompt(a.double() - b.double(), prompts)
    return {"mean": per_prompt.mean().item(), "ci95": bootstrap(per_prompt)}


def compare(scores, prompts):
    """{folder: (N,) scores} -> the mean score of each folder (per prompt, then over prompts; its interval is the
    spread of one folder's mean, not a comparison), and for every ordered pair of folders the win rate and the
    paired difference of means."""
    means = {}
    for folder, s in scores.items():
        per_prompt = by_prompt(s.double(), prompts)
        means[folder] = {"mean": per_prompt.mean().item(), "ci95": bootstrap(per_prompt)}
    winrates = {a: {b: winrate(scores[a], scores[b], prompts) for b in scores if b != a} for a in scores}
    differences = {a: {b: difference(scores[a], scores[b], prompts) for b in scores if b != a} for a in scores}
    return {"means": means, "winrates": winrates, "differences": differences}


NAMES = {"pickscore": "PickScore", "hpsv2": "HPSv2.1", "imagereward": "ImageReward", "aesthetic": "LAION aesthetic",
         "clip": "CLIP score"}


def verdict(report, scorer, a, b, name=lambda f: f):
    """One sentence: does A beat B on this scorer? 'beats' or 'loses to' only when the paired interval on the
    difference of means leaves out zero."""
    w, d = report["scorers"][scorer]["winrates"][a][b], report["scorers"][scorer]["differences"][a][b]
    verb = "beats" if d["ci95"][0] > 0 else "loses to" if d["ci95"][1] < 0 else "is not told apart from"
    return (f"{name(a)} {verb} {name(b)} on {NAMES.get(scorer, scorer)}: win rate {100 * w['winrate']:.0f}% "
            f"[{100 * w['ci95'][0]:.0f}, {100 * w['ci95'][1]:.0f}] over {w['prompts']} prompts, mean "
            f"{d['mean']:+.3g} [{d['ci95'][0]:+.3g}, {d['ci95'][1]:+.3g}]")


def markdown(report):
    """The report as Markdown: the verdicts (the first folder against each other, per scorer), then per scorer its
    mean scores and its matrix of win rates (row over column)."""
    folders = report["folders"]
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731 (a | in a folder name would split its cell)
    lines = [f"- {verdict(report, name, folders[0], b)}" for name in report["scorers"] for b in folders[1:]] + [""]
    for name, result in report["scorers"].items():
        lines += [f"**{NAMES.get(name, name)}** ({report['prompts']} prompts, {report['images']} images per folder)",
                  "", f"| folder | mean | {cell(folders[0])} minus it, paired 95% |"
                  + "".join(f" vs {cell(os.path.basename(os.path.normpath(f)))} |" for f in folders),
                  "| --- | --- | --- |" + " --- |" * len(folders)]
        for a in sorted(folders, key=lambda f: -result["means"][f]["mean"]):
            d = result["differences"][folders[0]].get(a)
            gap = f"{d['mean']:+.3g} [{d['ci95'][0]:+.3g}, {d['ci95'][1]:+.3g}]" if d else ""
            cells = ["" if a == b else f"{100 * result['winrates'][a][b]['winrate']:.1f}%" for b in folders]
            lines.append(f"| {cell(a)} | {result['means'][a]['mean']:.4g} | {gap} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def open_image(path):
    """An RGB image; a file that does not decode (corrupt, truncated) is a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as e:  # more pixels than PIL will decode (a crafted header): refused
        raise ValueError(f"{path} is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a broken file
        raise ValueError(f"{path} is not a readable image ({e}): delete it and run sample.py again") from None


def score_folder(scorer, folder, pairs, batch_size, name=""):
    from tqdm import tqdm

    scores = []
    with tqdm(total=len(pairs), desc=f"{name} {os.path.basename(os.path.normpath(folder))}", unit="image",
              dynamic_ncols=True) as bar:  # unit image: the rate reads images/s
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            images = [open_image(os.path.join(folder, name)) for name, _ in chunk]
            scores.append(scorer(images, [prompt for _, prompt in chunk]))
            bar.update(len(chunk))
    return torch.cat(scores)


def html_report(report, scores, pairs, path, gallery=24, screen=1366):
    """Write html_page's page to `path`."""
    run.write_together({path: html_page(report, scores, pairs, path, gallery, screen)})


def html_page(report, scores, pairs, path, gallery=24, screen=1366):
    """The text of one self-contained HTML page, to be written at `path` (its links to the images are relative to
    it) (inline SVG and CSS, a few lines of script for zooming; no library), in the
    order a reader needs it:
    - the verdict: one sentence per scorer and folder, the first folder against each other (verdict());
    - per scorer, the folders ranked by mean score, with the paired difference from the first and its win rate;
    - a chart of the first folder's win rate over each other, per scorer, with its interval;
    - one gallery: the `gallery` prompts where the first folder and another differ most on the first scorer, the
      images of a prompt in one row on a `screen` px wide screen, as embedded thumbnails that link to the full
      images in their folders; each image titled with its prompt and scores;
    - the histograms of per-prompt differences, the folders and the protocol.
    The page's size depends on `gallery`, not on the number of prompts. scores: {scorer: {folder: (N,) scores}} in
    the order of pairs."""
    import base64
    import html
    import io

    folders, scorers = report["folders"], list(report["scorers"])
    first = folders[0]
    name_of = {f: os.path.basename(os.path.normpath(f)) for f in folders}
    esc = html.escape
    page_dir = os.path.dirname(os.path.abspath(path))

    def label(folder):  # the folder's own name, its path on hover
        return f'<span title="{esc(folder)}">{esc(name_of[folder])}</span>'

    def table(header, rows, cls=""):
        return (f'<table class="{cls}"><tr>' + "".join(f"<th>{c}</th>" for c in header) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")

    def text_width(text, size=12):  # room for SVG text, generous for a sans-serif face
        return 0.62 * size * len(text) + 4

    def chart(rows, w=640, row_h=26, right=24):
        """rows: [(label, winrate, (lo, hi))] -> an SVG: a dot and its interval per row on a 0-100% axis, the left
        margin as wide as the longest label."""
        left = max(text_width(name) for name, _, _ in rows) + 12
        caption = f"win rate of {name_of[first]}, per prompt, with its 95% interval"
        w = max(w, left + 240, left + text_width(caption) + right)
        height = row_h * len(rows) + 46
        x = lambda v: left + v * (w - left - right)  # noqa: E731
        parts = [f'<line class="axis" x1="{x(0)}" x2="{x(1)}" y1="{height - 36}" y2="{height - 36}"/>',
                 f'<line class="even" x1="{x(.5)}" x2="{x(.5)}" y1="4" y2="{height - 36}"/>']
        for v in (0, .25, .5, .75, 1):
            parts.append(f'<text x="{x(v)}" y="{height - 22}" text-anchor="middle">{100 * v:.0f}%</text>')
        parts.append(f'<text x="{x(0)}" y="{height - 4}" text-anchor="start">{esc(caption)}</text>')
        for k, (name, rate, (lo, hi)) in enumerate(rows):
            y = 14 + k * row_h
            parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{esc(name)}</text>'
                         f'<line class="ci" x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="{y}" y2="{y}"/>'
                         f'<circle cx="{x(rate):.1f}" cy="{y}" r="5"><title>{100 * rate:.1f}% '
                         f'({100 * lo:.1f}-{100 * hi:.1f}%)</title></circle>')
        return f'<svg class="summary" width="{w:.0f}" height="{height}" role="img">{"".join(parts)}</svg>'

    def histogram(diffs, a, b, bins=20, h=110, left=44, bottom=34):
        caption = f"score of {a} minus score of {b}, per prompt"
        w = max(420, text_width(caption) + left)
        lo, hi = min(diffs.min().item(), 0.0), max(diffs.max().item(), 0.0)
        hi = hi if hi > lo else lo + 1e-12
        counts = torch.histc(diffs.float(), bins=bins, min=lo, max=hi)
        top_count, bar = max(counts.max().item(), 1), (w - left - 24) / bins
        rects = "".join(f'<rect x="{left + i * bar:.1f}" y="{h - h * c / top_count:.1f}" width="{bar - 1:.1f}" '
                        f'height="{h * c / top_count:.1f}"><title>{int(c)} prompts</title></rect>'
                        for i, c in enumerate(counts.tolist()))
        end = left + bins * bar
        zero = left + (end - left) * (0 - lo) / (hi - lo)
        return (f'<svg class="hist" width="{w:.0f}" height="{h + bottom + 12}"><g transform="translate(0 8)">{rects}'
                f'<line class="zero" x1="{zero:.1f}" x2="{zero:.1f}" y1="0" y2="{h}"/>'
                f'<line class="axis" x1="{left}" x2="{end:.1f}" y1="{h}" y2="{h}"/>'
                f'<line class="axis" x1="{left}" x2="{left}" y1="0" y2="{h}"/>'
                f'<text x="{left}" y="{h + 14}" text-anchor="start">{lo:.3g}</text>'
                + (f'<text x="{zero:.1f}" y="{h + 14}" text-anchor="middle">0</text>'
                   if left + 40 < zero < end - 40 else "") +
                f'<text x="{end:.1f}" y="{h + 14}" text-anchor="end">{hi:.3g}</text>'
                f'<text x="{left}" y="{h + 30}" text-anchor="start">{esc(caption)}</text>'
                f'<text x="{left - 6}" y="10" text-anchor="end">{int(top_count)}</text>'
                f'<text x="{left - 6}" y="{h}" text-anchor="end">0</text>'
                f'<text transform="translate(12 {h / 2}) rotate(-90)" text-anchor="middle">prompts</text></g></svg>')

    prompts = [p for _, p in pairs]
    order = list(dict.fromkeys(prompts))
    by = {p: [i for i, q in enumerate(prompts) if q == p] for p in order}
    per_row = len(folders) * max(len(v) for v in by.values())
    # thumbnails: a prompt's images side by side within `screen` px (2 em margins, 4 px around each, 12 px a folder)
    thumb = int(max(48, min(192, (screen - 64 - 20 - 12 * len(folders)) // per_row - 8)))

    def thumbnail(folder, i, prompt):
        name = pairs[i][0]
        image = open_image(os.path.join(folder, name))
        image.thumbnail((thumb, thumb))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=82)
        data = base64.b64encode(buffer.getvalue()).decode()
        scored = ", ".join(f"{NAMES.get(n, n)} {scores[n][folder][i].item():.4g}" for n in scorers)
        link = os.path.relpath(os.path.abspath(os.path.join(folder, name)), page_dir)
        return (f'<figure><a href="{esc(link)}"><img class="zoom" width="{image.width}" height="{image.height}" '
                f'src="data:image/jpeg;base64,{data}" alt="{esc(prompt)}" title="{esc(name_of[folder])}: '
                f'{esc(prompt)} ({esc(scored)}); click for the full image"></a><figcaption>'
                f"{scores[scorers[0]][folder][i].item():.3g}</figcaption></figure>")

    title = f"{name_of[first]} against {', '.join(name_of[f] for f in folders[1:])}"
    verdicts = [verdict(report, n, first, b, lambda f: name_of[f]) for n in scorers for b in folders[1:]]
    body = [f"<h1>{esc(title)}</h1>", '<div id="verdict"><ul>' + "".join(f"<li>{esc(v)}</li>" for v in verdicts)
            + f"</ul><p class=\"note\">{report['prompts']} prompts, {report['images']} images a folder. Win rate: the "
            f"share of a prompt's images (image j against image j) where {esc(name_of[first])} scores higher, ties "
            "half, averaged over prompts. Mean: the difference of the two folders' mean scores. Brackets: 95% "
            "bootstrap intervals over prompts, paired (both folders' scores of a prompt resampled together). "
            "'Beats' only where the interval of the mean difference leaves out zero.</p></div>",
            '<nav><b>Contents</b>: <a href="#ranking">Ranking</a> · <a href="#winrates">Win rates</a> · '
            '<a href="#gallery">Gallery</a> · <a href="#differences">Per-prompt differences</a> · '
            '<a href="#folders">Folders and protocol</a></nav>', '<h2 id="ranking">Ranking</h2>']
    for n in scorers:
        result = report["scorers"][n]
        ranked = sorted(folders, key=lambda f: -result["means"][f]["mean"])
        rows = []
        for rank, f in enumerate(ranked, 1):
            if f == first:
                rows.append([str(rank), f"<b>{label(f)}</b>", f"{result['means'][f]['mean']:.4g}", "", ""])
                continue
            d, w = result["differences"][first][f], result["winrates"][first][f]
            rows.append([str(rank), label(f), f"{result['means'][f]['mean']:.4g}",
                         f"{d['mean']:+.3g} [{d['ci95'][0]:+.3g}, {d['ci95'][1]:+.3g}]",
                         f"{100 * w['winrate']:.1f}% [{100 * w['ci95'][0]:.1f}, {100 * w['ci95'][1]:.1f}]"])
        body.append(f"<h3>{esc(NAMES.get(n, n))}</h3>" + table(
            ["rank", "folder", "mean score", f"{esc(name_of[first])} minus it, paired 95% interval",
             f"win rate of {esc(name_of[first])} over it"], rows, "ranking"))
    rows = [(f"over {name_of[b]}, {NAMES.get(n, n)}", report["scorers"][n]["winrates"][first][b]["winrate"],
             report["scorers"][n]["winrates"][first][b]["ci95"]) for n in scorers for b in folders[1:]]
    body += ['<h2 id="winrates">Win rates</h2>', chart(rows)]
    gap = torch.stack([by_prompt(scores[scorers[0]][first].double() - scores[scorers[0]][b].double(), prompts)
                       for b in folders[1:]]).abs().amax(dim=0)
    shown = [order[k] for k in gap.argsort(descending=True)[:gallery].tolist()]
    body.append(f'<h2 id="gallery">Gallery</h2><p class="note">The {len(shown)} of {len(order)} prompts where '
                f"{esc(name_of[first])} and another folder differ most on {esc(NAMES.get(scorers[0], scorers[0]))} "
                f"(under each image its score; every score in its title; a click shows the full image from its "
                f"folder).</p>")
    for prompt in shown:
        cells = "".join(f'<div class="side"><b>{label(f)}</b><br>'
                        + "".join(thumbnail(f, i, prompt) for i in by[prompt]) + "</div>" for f in folders)
        body.append(f'<div class="prompt"><p>{esc(prompt)}</p><div class="row">{cells}</div></div>')
    body.append('<h2 id="differences">Per-prompt differences</h2>')
    for n in scorers:
        for b in folders[1:]:
            diff = by_prompt(scores[n][first].double() - scores[n][b].double(), prompts)
            body.append(f"<h3>{esc(NAMES.get(n, n))}: {label(first)} against {label(b)}</h3>"
                        + histogram(diff, name_of[first], name_of[b]))
    sources = report.get("sources", {})
    body += ['<h2 id="folders">Folders and protocol</h2>', table(["folder", "model", "LoRA", "LoRA scale"], [
        [label(f), esc(str(sources.get(f, {}).get("model") or "")), esc(str(sources.get(f, {}).get("lora") or "none")),
         esc(str(sources.get(f, {}).get("lora_scale", "")) if sources.get(f, {}).get("lora") else "")]
        for f in folders])]
    protocol = report.get("protocol") or {}
    body.append(table(["setting", "value"], [[esc(k.replace("_", " ")), esc(str(v))] for k, v in protocol.items()]))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1280px;color:#222}h1{font-size:1.5em;margin:.2em 0}"
             "#verdict li{font-size:1.15em;margin:.3em 0}.note{color:#555;font-size:.9em}nav{margin:1em 0}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             "figure{display:inline-block;margin:4px;text-align:center}figcaption{font-size:11px;color:#555}"
             "img.zoom{cursor:zoom-in}.row{display:flex;flex-wrap:nowrap}.side{margin-right:12px;white-space:nowrap}"
             ".side b{font-size:12px}.prompt p{margin:.6em 0 .1em}"
             "svg text{font-size:12px;fill:#333}.hist rect{fill:#4a7}.zero{stroke:#c33}.axis{stroke:#555}"
             ".even{stroke:#999;stroke-dasharray:4 3}.summary circle{fill:#2563eb}.ci{stroke:#2563eb;stroke-width:3}"
             "#full{display:none;position:fixed;inset:0;background:rgba(0,0,0,.85);cursor:zoom-out;"
             "align-items:center;justify-content:center}#full.on{display:flex}#full img{max-width:95vw;max-height:95vh}")
    # A click on a thumbnail shows its full image (the link's target) over the page; the checks a browser test reads
    # are written on <body> once everything has loaded.
    script = ("const full=document.getElementById('full');document.addEventListener('click',e=>{"
              "if(e.target.classList.contains('zoom')){e.preventDefault();full.firstChild.src="
              "e.target.parentElement.href;full.classList.add('on')}"
              "else if(full.contains(e.target)){full.classList.remove('on')}});"
              "window.addEventListener('load',()=>{const b=document.body.dataset,"
              "shown=[...document.querySelectorAll('img.zoom')];"
              "b.imagesLoaded=shown.filter(i=>i.complete&&i.naturalWidth>0).length;"
              "b.verdictBottom=Math.round(document.getElementById('verdict').getBoundingClientRect().bottom);"
              "b.pageWidth=document.documentElement.scrollWidth;"
              "b.widestRow=Math.max(...[...document.querySelectorAll('.row')].map(r=>Math.round("
              "r.getBoundingClientRect().left+r.scrollWidth)));"
              "b.clippedLabels=[...document.querySelectorAll('svg text')].filter(t=>{const s=t.ownerSVGElement"
              ".getBoundingClientRect(),r=t.getBoundingClientRect();return r.left<s.left-.5||r.top<s.top-.5||"
              "r.right>s.right+.5||r.bottom>s.bottom+.5}).length})")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(body)}<div id=\"full\"><img alt=\"full image\"></div>"
            f"<script>{script}</script></body></html>")
    return page


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="sample.py folders, same prompts and seeds (two or more; the first is "
                   "A of the printed lines)")
    p.add_argument("--scorers", default="pickscore", help="comma-separated, or all: pickscore, hpsv2 (HPSv2.1), "
                   "imagereward, aesthetic (LAION v2), clip (CLIP score) (default: %(default)s)")
    p.add_argument("--clip-model", default=CLIP, help="CLIP for CLIP score and the aesthetic head (dir or hub id) "
                   "(default: %(default)s)")
    p.add_argument("--aesthetic-head", default=AESTHETIC, help="the aesthetic MLP's .pth (path or URL; the default is "
                   "checked by SHA-256)")
    p.add_argument("--pickscore-model", default=PICKSCORE, help="PickScore model (dir or hub id) (default: "
                   "%(default)s)")
    p.add_argument("--pickscore-processor", default=PICKSCORE_PROCESSOR, help="its CLIP processor (dir or hub id) "
                   "(default: %(default)s)")
    p.add_argument("--hpsv2-weights", default=HPSV2, help="HPSv2 checkpoint: a .pt, or owner/repo/file on the hub "
                   "(default: %(default)s)")
    p.add_argument("--hpsv2-base", default=HPSV2_BASE, help="transformers CLIP (dir or hub id) with HPSv2's "
                   "architecture and tokenizer: OpenCLIP ViT-H-14 (default: %(default)s)")
    p.add_argument("--imagereward-weights", default=IMAGEREWARD, help="ImageReward checkpoint: a .pt, or "
                   "owner/repo/file on the hub (default: %(default)s)")
    p.add_argument("--imagereward-config", default=IMAGEREWARD_CONFIG, help="its text encoder's med_config.json "
                   "(default: %(default)s)")
    p.add_argument("--imagereward-tokenizer", default=IMAGEREWARD_TOKENIZER, help="BLIP's BERT tokenizer (dir or hub "
                   "id) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images scored at once (default: %(default)s)")
    p.add_argument("--allow-protocol-mismatch", action="store_true", help="compare folders sampled under different "
                   "protocols (sample.py --protocol)")
    p.add_argument("--out", default="report.json", help="JSON report (written only when everything succeeded)")
    p.add_argument("--markdown", help="also write the tables as Markdown here")
    p.add_argument("--html", metavar="DIR", help="also write a page to look at, DIR/index.html (self-contained "
                   "but for the full images, linked from their folders)")
    p.add_argument("--gallery", type=int, default=24, help="prompts in the page's gallery: those where the first "
                   "folder and another differ most (default: %(default)s)")
    return p.parse_args(argv)


def load_scorer(name, args, device):
    if name == "pickscore":
        return PickScore(args.pickscore_model, args.pickscore_processor, device)
    if name == "clip":
        return ClipScore(args.clip_model, device)
    if name == "aesthetic":
        return Aesthetic(args.aesthetic_head, args.clip_model, device,
                         AESTHETIC_SHA256 if args.aesthetic_head == AESTHETIC else None)
    if name == "hpsv2":
        return HPSv2(args.hpsv2_weights, args.hpsv2_base, device)
    if name == "imagereward":
        return ImageReward(args.imagereward_weights, args.imagereward_config, args.imagereward_tokenizer, device)
    raise ValueError(f"no scorer {name!r}; the scorers: {', '.join(SCORERS)}")


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = args.folders
    try:  # every check before a scorer loads
        if len(folders) < 2:
            raise ValueError("give two or more folders to compare")
        same = [f for i, f in enumerate(folders) if os.path.realpath(f) in map(os.path.realpath, folders[:i])]
        if same:
            raise ValueError(f"{same[0]} is given twice: compare different folders")
        if args.gallery < 0:
            raise ValueError(f"--gallery {args.gallery} must be 0 or more")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
        for flag, path, folder in (("--out", args.out, False), ("--markdown", args.markdown, False),
                                   ("--html", args.html, True)):
            if path:
                inside = next((f for f in folders if data.inside(f, os.path.abspath(path))
                               or os.path.realpath(path) == os.path.realpath(f)), None)
                if inside:  # a report written there could replace the folder's index.json or its images
                    raise ValueError(f"{flag} {path} is inside the compared folder {inside}: write it elsewhere")
                run.check_output(path, flag, folder)
        pairs = pair_up(folders, args.allow_protocol_mismatch)
        if not pairs:
            raise ValueError(f"{folders[0]} and the other folders hold no images to compare (their index.json lists "
                             "none): sample some with sample.py")
    except ValueError as e:
        sys.exit(f"error: {e}")
    scorers = {}
    for name in SCORERS if args.scorers == "all" else args.scorers.split(","):
        try:
            scorers[name] = load_scorer(name, args, device)
        except Exception as e:  # any failure to load a scorer is the user's to fix: say which and why
            where = {"pickscore": f" ({args.pickscore_model} / {args.pickscore_processor})",
                     "hpsv2": f" ({args.hpsv2_weights} / {args.hpsv2_base})",
                     "imagereward": f" ({args.imagereward_weights})"}.get(name, "")
            sys.exit(f"error: cannot load the {name} scorer{where}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}")
    prompts = [prompt for _, prompt in pairs]
    if len(set(prompts)) < 2:  # the bootstrap resamples prompts: with one, every interval is a single point
        print("warning: one prompt: its 95% intervals have no width and say nothing; compare over many prompts",
              flush=True)
    report = {"folders": folders, "prompts": len(set(prompts)), "images": len(pairs),
              "protocol": read_index(folders[0])[1], "sources": {f: sampled_from(f) for f in folders}, "scorers": {}}
    all_scores = {}
    for name, scorer in scorers.items():
        try:
            scores = {folder: score_folder(scorer, folder, pairs, args.batch_size, name) for folder in folders}
        except ValueError as e:
            sys.exit(f"error: {e}")
        all_scores[name] = scores
        report["scorers"][name] = compare(scores, prompts)
        for b in folders[1:]:
            print(verdict(report, name, folders[0], b))
    table = markdown(report)
    print(table)
    files = {path: text for path, text in ((args.out, json.dumps(report, indent=1)), (args.markdown, table)) if path}
    if args.html:
        os.makedirs(args.html, exist_ok=True)
        page = os.path.join(args.html, "index.html")
        files[page] = html_page(report, all_scores, pairs, page, args.gallery)
    try:
        run.write_together(files)  # the report, the table and the page, all or none
    except OSError as e:
        sys.exit(f"error: could not write {e.filename or 'the reports'} ({e.strerror or e}): none of "
                 f"{', '.join(files)} was written")
    if args.html:
        print(f"page: {os.path.join(args.html, 'index.html')}")


if __name__ == "__main__":
    run.run_main(main, parse_args())
