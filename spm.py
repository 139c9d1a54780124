"""The step-aware preference model (SPM) of SPO (Liang et al. 2024, arXiv 2406.04314, section 4.1).

PickScore's CLIP (a transformers CLIPModel), told the denoising step t it judges: it scores the x0 a diffusion
model predicts at step t, so it can say which of two candidates of one step is better at that step.

    t_emb  = MLP(sinusoid_256(t))                                   the DiT timestep embedder, (B, D)
    per vision layer: shift, scale, gate (x2) = Linear(SiLU(t_emb))    adaLN, 6D
        x = x + gate_a * attn(LN1(x) * (1 + scale_a) + shift_a)
        x = x + gate_m * mlp(LN2(x) * (1 + scale_m) + shift_m)
    pooled = post_LN(x[:, 0]) * (1 + scale) + shift                 a last shift and scale, 2D
    score  = logit_scale.exp() * cos(visual_projection(pooled), text embedding)

The text tower is CLIP's, unchanged. The added modules hang on the CLIPModel under the names the released
checkpoints use (t_embedder.mlp.*, vision_model.encoder.layers.N.adaLN_modulation.1.*,
vision_model.adaLN_modulation.1.*), so `sd-v1-5_step-aware_preference_model.bin` and
`sdxl_step-aware_preference_model.bin` load strictly once their `model.` prefix is stripped. They act through
forward hooks on the layer norms, the attention, the MLP and the post layer norm: no transformers class is
subclassed or copied, so the model follows transformers' own CLIP code as it changes. Initialised to the identity
(weights 0; shifts and scales 0, gates 1), the SPM scores exactly as the CLIP it was built on.

    python spm.py --weights PATH/sd-v1-5_step-aware_preference_model.bin --image a.png --prompt "a cat" --t 500

Library: load(weights, backbone, processor, device) -> StepAwarePreferenceModel; build_tiny(); model.score(images,
prompts, t); preference_loss(scores_w, scores_l); save(model, path) in the released format.
"""

import argparse
import math
import os

import torch
from torch import nn

import sample

PICKSCORE = "yuvalkirstain/PickScore_v1"  # the backbone the released SPMs were trained from
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # its tokenizer and image statistics
RELEASED = "SPO-Diffusion-Models/Step-Aware_Preference_Models"  # sd-v1-5_... and sdxl_step-aware_preference_model.bin


class TimestepEmbedder(nn.Module):
    """t (B,) in the scheduler's units -> (B, D): a 256-dim sinusoid, cos half first, then Linear-SiLU-Linear."""

    def __init__(self, width, frequencies=256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)

    def forward(self, t):
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def modulation(width, parts, gates=()):
    """SiLU -> Linear(width, parts * width), at the identity: weight 0, bias 0 except the listed gate parts at 1."""
    layer = nn.Linear(width, parts * width)
    nn.init.zeros_(layer.weight)
    with torch.no_grad():
        layer.bias.zero_()
        for g in gates:
            layer.bias[g * width:(g + 1) * width] = 1
    return nn.Sequential(nn.SiLU(), layer)


class StepAwarePreferenceModel(nn.Module):
    """A CLIPModel with SPO's timestep conditioning attached to its vision tower.

    clip: a transformers CLIPModel (PickScore_v1, or a tiny one); tokenizer: its CLIP tokenizer; image_size, mean,
    std: its image processor's crop size and normalisation. The CLIP is kept as `self.model`, so this module's own
    state dict has the released files' `model.` prefix."""

    def __init__(self, clip, tokenizer, image_size, mean, std):
        super().__init__()
        self.model, self.tokenizer, self.image_size = clip, tokenizer, image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        vision = clip.vision_model
        width = clip.config.vision_config.hidden_size
        clip.t_embedder = TimestepEmbedder(width)
        vision.adaLN_modulation = modulation(width, 2)  # shift, scale of the pooled output
        self._mods = None  # this forward's per-layer (shift, scale, gate) x 2, set by image_embeds
        for i, layer in enumerate(vision.encoder.layers):
            layer.adaLN_modulation = modulation(width, 6, gates=(2, 5))  # shift, scale, gate; attention, then MLP
            layer.layer_norm1.register_forward_hook(self._modulate(i, 0))
            layer.self_attn.register_forward_hook(self._gate(i, 2))
            layer.layer_norm2.register_forward_hook(self._modulate(i, 3))
            layer.mlp.register_forward_hook(self._gate(i, 5))
        vision.post_layernorm.register_forward_hook(self._modulate("pooled", 0))

    def _modulate(self, key, first):
        def hook(module, inputs, out):
            if self._mods is None:
                return out
            shift, scale = self._mods[key][first], self._mods[key][first + 1]
            return out * (1 + scale) + shift

        return hook

    def _gate(self, key, index):
        def hook(module, inputs, out):
            if self._mods is None:
                return out
            gate = self._mods[key][index]
            return (out[0] * gate, *out[1:]) if isinstance(out, tuple) else out * gate

        return hook

    def preprocess(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> CLIP pixels: bicubic resize of the shortest side to image_size, centre
        crop, [0, 1], CLIP normalisation (SPO's own preprocessing, on tensors)."""
        h, w = images.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (int(h * scale + 0.5), int(w * scale + 0.5))
        x = nn.functional.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        top, left = (round((n - self.image_size) / 2) for n in size)  # as torchvision's CenterCrop rounds
        x = x[..., top:top + self.image_size, left:left + self.image_size]
        x = (x / 2 + 0.5).clamp(0, 1)
        return ((x - self.mean) / self.std).to(self.model.dtype)

    def image_embeds(self, pixels, t):
        """Unit image embeddings (B, P) of preprocessed pixels at timesteps t (B,)."""
        vision = self.model.vision_model
        c = self.model.t_embedder(t.to(pixels.device))
        mods = {i: layer.adaLN_modulation(c)[:, None].chunk(6, dim=-1) for i, layer in enumerate(vision.encoder.layers)}
        mods["pooled"] = vision.adaLN_modulation(c).chunk(2, dim=-1)
        self._mods = mods
        try:
            pooled = vision(pixel_values=pixels).pooler_output
        finally:
            self._mods = None
        return nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeds(self, prompts):
        """Unit text embeddings (B, P) of the prompts, truncated to the tokenizer's length."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        device = self.model.logit_scale.device
        out = self.model.text_model(input_ids=tokens["input_ids"].to(device),
                                    attention_mask=tokens["attention_mask"].to(device))
        return nn.functional.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def score(self, images, prompts, t):
        """(B,) fp32 scores of images (B, 3, H, W) in [-1, 1] for their prompts at timesteps t (B,) or an int:
        logit_scale.exp() * cos(image, prompt), PickScore's scale."""
        t = torch.as_tensor(t, device=images.device).expand(len(images))
        cos = (self.image_embeds(self.preprocess(images), t) * self.text_embeds(prompts)).sum(-1)
        return self.model.logit_scale.exp().float() * cos


def preference_loss(scores_w, scores_l):
    """PickScore's two-way cross-entropy, the SPM's training loss: -log softmax([s_w, s_l])[0], mean over B."""
    return -torch.log_softmax(torch.stack([scores_w, scores_l], dim=-1), dim=-1)[..., 0].mean()


# -----------------------------------------------------------------------------
# Building and loading


def tiny_clip(seed=0, image_size=32):
    """A random tiny CLIPModel (width 32, 2 layers a tower, 8 px patches) and its character tokenizer: no download."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tokenizer = sample._tiny_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(**tower, **ids, vocab_size=len(tokenizer), max_position_embeddings=16),
                        vision_config=dict(**tower, image_size=image_size, patch_size=8), projection_dim=32)
    return CLIPModel(config), tokenizer


def build_tiny(seed=0):
    """A random tiny SPM at the identity (its CLIP random too), for tests and the CPU demo."""
    clip, tokenizer = tiny_clip(seed)
    return StepAwarePreferenceModel(clip, tokenizer, clip.config.vision_config.image_size,
                                    [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def load(weights=None, backbone=PICKSCORE, processor=PROCESSOR, device="cpu", dtype=torch.float32):
    """The SPM: `backbone` (a CLIPModel hub id or directory, or "tiny") with the timestep modules at the identity, then
    `weights` (a released .bin, or one written by save()) loaded strictly. Raises ValueError for bad input."""
    if backbone == "tiny":
        model = build_tiny()
    else:
        from transformers import CLIPModel, CLIPProcessor

        saved = ("preprocessor_config.json", "processor_config.json")
        if any(os.path.isfile(os.path.join(backbone, name)) for name in saved):
            processor = backbone  # a local CLIP saved with its processor
        try:
            clip, proc = CLIPModel.from_pretrained(backbone), CLIPProcessor.from_pretrained(processor)
        except OSError as e:
            raise ValueError(f"could not load the preference model's CLIP {backbone} / {processor}: "
                             f"{str(e).splitlines()[0]}") from None
        size = int(proc.image_processor.size["shortest_edge"])  # SPO resizes and centre-crops to this size
        model = StepAwarePreferenceModel(clip, proc.tokenizer, size, proc.image_processor.image_mean,
                                         proc.image_processor.image_std)
    if weights:
        load_weights(model, weights)
    return model.requires_grad_(False).eval().to(device=device, dtype=dtype)


def load_weights(model, path):
    """Load a state dict with the released format's `model.` prefix (or without it) strictly into model.model."""
    state = sample.load_data(path, "a preference model's weights")
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a preference model's weights (no state dict)")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    own = model.model.state_dict()
    for key in [k for k in state if k.endswith("embeddings.position_ids") and k not in own]:
        # older transformers saved this buffer (0, 1, ..., L-1); it is not a weight and is no longer saved
        if not torch.equal(state[key].flatten(), torch.arange(state[key].numel())):
            raise ValueError(f"{path}: {key} is not 0..{state[key].numel() - 1}")
        del state[key]
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise ValueError(f"{path} is not a step-aware preference model for this backbone: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    try:
        model.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        shape = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise ValueError(f"{path} does not fit this backbone: {shape}") from None
    return model


def save(model, path):
    """Write the SPM's weights as the released files hold them: fp32, keys prefixed `model.`."""
    torch.save({f"model.{k}": v.detach().float().cpu() for k, v in model.model.state_dict().items()}, path)


def main():
    p = argparse.ArgumentParser(description="Score images with a step-aware preference model.")
    p.add_argument("--weights", help=f"a .bin from {RELEASED} (none: the backbone at the identity)")
    p.add_argument("--backbone", default=PICKSCORE,
                   help="CLIPModel hub id or directory, or tiny (default: %(default)s)")
    p.add_argument("--processor", default=PROCESSOR, help="tokenizer and image processor (default: %(default)s)")
    p.add_argument("--image", nargs="+", required=True, help="image files")
    p.add_argument("--prompt", required=True, help="the prompt, for every image")
    p.add_argument("--t", type=int, default=0, help="the timestep the images stand for (default: %(default)s)")
    args = p.parse_args()
    import numpy as np
    from PIL import Image

    model = load(args.weights, args.backbone, args.processor)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                          / 127.5 - 1 for f in args.image])
    with torch.no_grad():
        for f, s in zip(args.image, model.score(images, [args.prompt] * len(images), args.t)):
            print(f"{s.item():.4f}  {f}")


if __name__ == "__main__":
    main()
