"""From a model, with or without an NCP LoRA, to images; and the model plumbing the training scripts share.

Generate images for a prompt list (same per-prompt seeds for every model, so runs pair up for evaluate.py):

    python sample.py --model sdxl --lora runs/dpo-ncp-sdxl-absolute-winners --prompts prompts.txt --out samples/ncp
    torchrun --nproc_per_node=4 sample.py --model sd15 --prompts validation_unique --out samples/base

Library part (imported by ncp_dpo.py, ncp_cpo.py, ncp_sft.py):
    load_models(model, dtype, device)  -> Models  (sd15 | sdxl | sd35-medium | sd35-large | tiny | tiny-sdxl |
                                                   tiny-sd3 | local dir | hub id)
    encode_prompt(models, captions, ...) -> cond  (the denoiser's keyword arguments, for SD1.5, SDXL and SD3)
    encode_images(vae, pixels)          -> latents shifted and scaled as the VAE's config says
    add_lora / save_lora / load_lora    -> PEFT LoRA on the attention projections, diffusers' file format
The denoiser is a U-Net (SD1.5, SDXL) or SD3's MMDiT transformer; the scripts call both `unet`.
"""

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch

import encoder

# Messages the libraries log on every run that are known to be harmless here: silenced by logger and text alone.
KNOWN_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",  # a 4-bit CPU kernel this never uses
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",  # the PIL processors
    "diffusers.models.modeling_utils": "that should be kept in float32: []",  # .to(dtype) when no module is exempt
}
for _name, _text in KNOWN_NOISE.items():
    logging.getLogger(_name).addFilter(lambda record, text=_text: text not in record.getMessage())

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"  # the SDXL VAE rescaled to run in fp16/bf16 without overflow
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
SD35_LARGE = "stabilityai/stable-diffusion-3.5-large"
# FLUX.2 [klein]: the undistilled base models, made for fine-tuning (4B: Apache-2.0; 9B: a non-commercial licence).
FLUX2_KLEIN_4B = "black-forest-labs/FLUX.2-klein-base-4B"
FLUX2_KLEIN_9B = "black-forest-labs/FLUX.2-klein-base-9B"
# What the first load of a named model downloads (the components the scripts load, in the repository's own
# precision), said before the download starts. Approximate: parameters x bytes per weight.
DOWNLOAD = {SD15: "about 4.3 GB", SDXL: "about 14 GB", SD35_MEDIUM: "about 16 GB", SD35_LARGE: "about 27 GB",
            FLUX2_KLEIN_4B: "about 16 GB", FLUX2_KLEIN_9B: "about 34 GB"}
NAMED = {"sd15": (SD15, "sd15"), "sdxl": (SDXL, "sdxl"), "sd35-medium": (SD35_MEDIUM, "sd3"),
         "sd35-large": (SD35_LARGE, "sd3"), "flux2-klein-4b": (FLUX2_KLEIN_4B, "flux2"),
         "flux2-klein-9b": (FLUX2_KLEIN_9B, "flux2"), "tiny": ("tiny", "sd15"), "tiny-sdxl": ("tiny-sdxl", "sdxl"),
         "tiny-sd3": ("tiny-sd3", "sd3"), "tiny-flux2": ("tiny-flux2", "flux2")}
TINY = {"tiny": "sd15", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux2": "flux2"}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# SD3's joint attention has a second set of projections for the text stream: the LoRA covers both streams.
LORA_TARGETS_SD3 = LORA_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# FLUX.2: both streams of the double blocks, and the single blocks' fused QKV+MLP input and their output (named
# one by one: a double block's attn.to_out is a list, which a bare "to_out" would name too).
LORA_TARGETS_FLUX2 = LORA_TARGETS_SD3 + ["to_qkv_mlp_proj"]
QWEN3_LAYERS = (9, 18, 27)  # the Qwen3 hidden states FLUX.2 [klein] stacks as its prompt embedding (the pipeline's)
FLUX2_TOKENS = 512  # Flux2KleinPipeline's max_sequence_length
T5_TOKENS = 256  # SD3's T5 sequence length, StableDiffusion3Pipeline's default max_sequence_length
LORA_FILE = "pytorch_lora_weights.safetensors"


class ModelError(ValueError):
    """A --model, --lora or similar argument that names nothing usable."""


# -----------------------------------------------------------------------------
# Loading


@dataclass
class Models:
    """The frozen components of a text-to-image latent diffusion model."""

    name: str
    kind: str  # "sd15" (one CLIP text encoder), "sdxl" (two, plus micro-conditioning), "sd3" (two CLIPs and T5),
    # "flux2" (one Qwen3)
    unet: torch.nn.Module  # the denoiser: UNet2DConditionModel, SD3Transformer2DModel, Flux2Transformer2DModel
    vae: torch.nn.Module
    text_encoders: list  # SD3: CLIP-L, CLIP-G, and T5 or None (dropped: its embeddings are zeros, as SD3 allows)
    tokenizers: list
    scheduler: object  # DDPMScheduler (training mode, epsilon, clip_sample=False); SD3: FlowMatchEulerDiscreteScheduler
    text_tokens: int = T5_TOKENS  # SD3: T5's sequence length


def resolve_model(model):
    """Map a --model value to (source, kind) without loading weights. Raises ModelError for bad input."""
    if model in NAMED:
        return NAMED[model]
    if os.path.isdir(model):
        index = os.path.join(model, "model_index.json")
        if not os.path.isfile(index):
            found = sorted(os.listdir(model))
            shown = ", ".join(name[:40] for name in found[:5])
            shown += f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise ModelError(f"{model} is a directory but not a diffusers pipeline: it has no model_index.json "
                             f"(it holds {shown or 'nothing'})")
        with open(index) as f:
            return model, _kind_of(json.load(f), model)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not os.path.exists(model):
        from huggingface_hub import hf_hub_download

        try:
            with open(hf_hub_download(model, "model_index.json")) as f:
                return model, _kind_of(json.load(f), model)
        except Exception as e:
            raise ModelError(f"could not fetch {model}/model_index.json from the hub ({type(e).__name__}); "
                             "download the pipeline and pass its local directory") from None
    raise ModelError(f"unknown --model {model!r}: expected one of {', '.join(NAMED)}, a local diffusers "
                     "pipeline directory (with model_index.json), or a hub id like owner/name")


def _kind_of(index, where):
    if "transformer" in index and index.get("_class_name", "").startswith("Flux2Klein"):
        return "flux2"
    if "transformer" in index and "text_encoder_3" in index and index.get("_class_name", "").startswith(
            "StableDiffusion3"):
        return "sd3"
    if "text_encoder_2" in index and "unet" in index:
        return "sdxl"
    if "text_encoder" in index and "unet" in index:
        return "sd15"
    raise ModelError(f"{where}: model_index.json describes {index.get('_class_name')}, not an SD1.5-, "
                     "SDXL-, SD3- or FLUX.2 [klein]-like pipeline (it needs unet, vae, text_encoder and, for SDXL, "
                     "text_encoder_2; or SD3's transformer and three text encoders; or a Flux2KleinPipeline)")


def load_models(model, dtype=torch.float32, device="cpu", t5=True):
    """Load the frozen components (no grad) in `dtype` on `device`. The SDXL VAE stays fp32 unless fp16-fix.
    t5=False: SD3 without its T5 encoder (zeros in its place, as StableDiffusion3Pipeline does without it)."""
    import pickle

    source, kind = resolve_model(model)
    _announce_download(source)
    try:
        if source in TINY:
            models = build_tiny(kind)
            if not t5 and kind == "sd3":
                models.text_encoders[2] = models.tokenizers[2] = None
        else:
            models = FAMILIES[kind].load(model, source, dtype, t5)
    except pickle.UnpicklingError:  # transformers and diffusers read a .bin with torch.load(weights_only=True)
        raise ModelError(f"a pickled weights file (.bin) in {source} holds objects other than tensors: refused, since "
                         "loading it could run code") from None
    # SDXL's original VAE overflows in half precision (its config says force_upcast); the fp16-fix one does not.
    fp16_unsafe_vae = kind == "sdxl" and source not in (SDXL, "tiny-sdxl") and models.vae.config.force_upcast
    for module in [models.unet, models.vae, *filter(None, models.text_encoders)]:
        module.requires_grad_(False).eval()
        want = torch.float32 if module is models.vae and fp16_unsafe_vae else dtype
        module.to(device=device)
        if next(module.parameters()).dtype != want:
            module.to(dtype=want)
    return models


def _load_unet_family(kind, model, source, dtype, t5=None):
    """SD1.5 or SDXL from a diffusers pipeline folder or hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        sub = lambda cls, name: cls.from_pretrained(source, subfolder=name, torch_dtype=dtype)  # noqa: E731
        encoders = [sub(CLIPTextModel, "text_encoder")]
        tokenizers = [sub(CLIPTokenizer, "tokenizer")]
        if kind == "sdxl":
            encoders.append(sub(CLIPTextModelWithProjection, "text_encoder_2"))
            tokenizers.append(sub(CLIPTokenizer, "tokenizer_2"))
        vae = (AutoencoderKL.from_pretrained(SDXL_VAE, torch_dtype=dtype) if source == SDXL
               else sub(AutoencoderKL, "vae"))
        unet = sub(UNet2DConditionModel, "unet")
        config = DDPMScheduler.load_config(source, subfolder="scheduler")
        own = config.get("prediction_type", "epsilon")
        if own != "epsilon":  # the losses and the step back here are written for noise prediction
            raise ModelError(f"{source} predicts {own!r} (its scheduler config says so); the scripts train "
                             "noise-prediction (epsilon) U-Nets only, as SD1.5 and SDXL are")
        scheduler = DDPMScheduler.from_config(config, clip_sample=False)
    except OSError as e:
        raise ModelError(f"could not load {source}: {str(e).splitlines()[0]}") from None
    return Models(model, kind, unet, vae, encoders, tokenizers, scheduler)


def _announce_download(source):
    """One line before a named model's first download (a cached model says nothing)."""
    if source not in DOWNLOAD or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(source, "model_index.json"), str):
        print(f"model: downloading {source} ({DOWNLOAD[source]}) into the Hugging Face cache, once", flush=True)


def _load_sd3(model, source, dtype, t5):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    try:
        sub = lambda cls, name: cls.from_pretrained(source, subfolder=name, torch_dtype=dtype)  # noqa: E731
        encoders = [sub(CLIPTextModelWithProjection, "text_encoder"), sub(CLIPTextModelWithProjection, "text_encoder_2"),
                    sub(T5EncoderModel, "text_encoder_3") if t5 else None]
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                      CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
                      AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3") if t5 else None]  # T5's
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler")
        return Models(model, "sd3", sub(SD3Transformer2DModel, "transformer"), sub(AutoencoderKL, "vae"), encoders,
                      tokenizers, scheduler)
    except OSError as e:
        raise ModelError(f"could not load {source}: {str(e).splitlines()[0]}") from None


def _load_flux2(model, source, dtype, t5=None):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    try:
        sub = lambda cls, name: cls.from_pretrained(source, subfolder=name, torch_dtype=dtype)  # noqa: E731
        return Models(model, "flux2", sub(Flux2Transformer2DModel, "transformer"), sub(AutoencoderKLFlux2, "vae"),
                      [sub(Qwen3ForCausalLM, "text_encoder")],
                      [AutoTokenizer.from_pretrained(source, subfolder="tokenizer")],
                      FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler"),
                      text_tokens=FLUX2_TOKENS)
    except OSError as e:  # hub errors are OSErrors too; a gated repository refuses a download without its licence
        from huggingface_hub.errors import GatedRepoError

        gated = isinstance(e, GatedRepoError) or "gated" in str(e).lower()
        why = ("the hub refused the download: the repository is gated, accept its licence on its hub page and log "
               "in (hf auth login)" if gated else str(e).splitlines()[0])
        raise ModelError(f"could not load {source}: {why}") from None


def _tiny_tokenizer(max_length=16):
    from transformers import CLIPTokenizer

    vocab = {}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":  # character-level: every word is its letters
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_tiny(kind="sd15", seed=0):
    """A random, small SD1.5-, SDXL-, SD3- or FLUX.2-like model (about 1M parameters), built in code: no download."""
    return FAMILIES[kind].tiny(seed)


def build_tiny_unet(kind="sd15", seed=0):
    """A random, small SD1.5- or SDXL-like model: U-Net, VAE, one or two CLIP text encoders, SD's DDPM schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    unet = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=16)
    if kind == "sdxl":
        encoders = [CLIPTextModel(CLIPTextConfig(**text)),
                    CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32))]
        unet.update(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True)
    else:
        encoders = [CLIPTextModel(CLIPTextConfig(**text))]
        unet.update(cross_attention_dim=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, prediction_type="epsilon", steps_offset=1)  # as SD's
    return Models(f"tiny{'-sdxl' if kind == 'sdxl' else ''}", kind, UNet2DConditionModel(**unet), vae, encoders,
                  [tokenizer] * len(encoders), scheduler)


def build_tiny_sd3(seed=0, layers=6):
    """A random, small SD3.5-like model built in code: an SD3Transformer2DModel of `layers` joint blocks (QK-norm and,
    as in SD3.5 Medium, dual attention in its first blocks), a 16-channel VAE with SD3's shift and scaling factors,
    tiny CLIP-L, CLIP-G and T5 encoders (the T5 reads the same character-level vocabulary), and SD3.5's
    FlowMatchEulerDiscreteScheduler (shift 3)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=layers, attention_head_dim=16, num_attention_heads=2,
                                        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=16, dual_attention_layers=(0, 1), qk_norm="rms_norm")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=32, shift_factor=0.0609, scaling_factor=1.5305,
                        use_quant_conv=False, use_post_quant_conv=False)  # SD3's VAE config
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3.5's scheduler config
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**text)) for _ in range(2)] + [t5]
    return Models("tiny-sd3", "sd3", transformer, vae, encoders, [tokenizer] * 3, scheduler, text_tokens=16)


def build_tiny_flux2(seed=0):
    """A random, small FLUX.2 [klein]-like model built in code: a Flux2Transformer2DModel of 2 double-stream and 4
    single-stream blocks (4-axis RoPE, no guidance embedding, as the base models), an AutoencoderKLFlux2 of 8 latent
    channels (patchified to 32, with its batch-norm statistics), a 27-layer Qwen3 of width 16 whose hidden states 9,
    18 and 27 are the prompt embedding, a character-level Qwen2 tokenizer with Qwen3's chat template, and a
    dynamically shifted FlowMatchEulerDiscreteScheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = _tiny_qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=max(QWEN3_LAYERS),
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    vae = AutoencoderKLFlux2(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=8, norm_num_groups=16,
                             layers_per_block=1, sample_size=32)
    with torch.no_grad():  # batch-norm statistics other than 0 and 1, so that the normalisation is exercised
        vae.bn.running_mean.uniform_(-0.2, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=2, num_single_layers=4,
                                          attention_head_dim=16, num_attention_heads=2,
                                          joint_attention_dim=16 * len(QWEN3_LAYERS), timestep_guidance_channels=32,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, time_shift_type="exponential")
    return Models("tiny-flux2", "flux2", transformer, vae, [text_encoder], [tokenizer], scheduler, text_tokens=64)


def _tiny_qwen_tokenizer():
    """A character-level Qwen2 tokenizer with Qwen3's special tokens and the part of its chat template the
    pipeline uses (a user turn, then the assistant's turn with thinking turned off)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?'-\n<>/|_"
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {c: i for i, c in enumerate(chars)} | {s: len(chars) + i for i, s in enumerate(special)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.add_special_tokens(special)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]", model_max_length=FLUX2_TOKENS)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
        "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
    return tokenizer


def save_pipeline(models, out_dir):
    """Save the components as a diffusers pipeline directory (loadable by --model DIR)."""
    pipe = make_pipeline(models)
    pipe.save_pretrained(out_dir)
    return out_dir


def make_pipeline(models):
    """The diffusers text-to-image pipeline over these components (StableDiffusion, StableDiffusionXL,
    StableDiffusion3 or Flux2Klein)."""
    import diffusers

    family = FAMILIES[models.kind]
    return getattr(diffusers, family.pipeline)(**family.components(models))


def _sd15_components(models):
    return dict(vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0],
                unet=models.unet, scheduler=models.scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def _sdxl_components(models):
    return dict(vae=models.vae, text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1],
                tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1], unet=models.unet,
                scheduler=models.scheduler)


def _sd3_components(models):
    (te, te2, te3), (tok, tok2, tok3) = models.text_encoders, models.tokenizers
    return dict(transformer=models.unet, scheduler=models.scheduler, vae=models.vae, text_encoder=te, tokenizer=tok,
                text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)


def _flux2_components(models):
    return dict(scheduler=models.scheduler, vae=models.vae, text_encoder=models.text_encoders[0],
                tokenizer=models.tokenizers[0], transformer=models.unet, is_distilled=False)


# -----------------------------------------------------------------------------
# Encoding prompts and images


@torch.no_grad()
def encode_prompt(models, captions, original_sizes=None, crops_top_left=None, target_size=None, repeat=1):
    """Captions -> cond, the keyword arguments of unet(x_t, t, **cond). The one place SD1.5 and SDXL differ.

    SD1.5: {"encoder_hidden_states": (B, 77, 768)}, the last hidden state of CLIP-L.
    SDXL:  {"encoder_hidden_states": (B, 77, 2048), the penultimate hidden states of both encoders concatenated,
            "added_cond_kwargs": {"text_embeds": (B, 1280) pooled, "time_ids": (B, 6)}}; time_ids are
           (original h, w, crop top, left, target h, w): original_sizes and crops_top_left are (B, 2).
    SD3:   {"encoder_hidden_states": (B, 77 + 256, 4096), both CLIPs' penultimate hidden states side by side, padded
            to T5's width, then T5's last hidden state (zeros without T5), "pooled_projections": (B, 2048) both
            CLIPs' pooled outputs}: StableDiffusion3Pipeline.encode_prompt's, without classifier-free guidance.
    FLUX.2: {"encoder_hidden_states": (B, 512, 3 x width), Qwen3's hidden states 9, 18 and 27 of the prompt in
            its chat template, side by side per token; "txt_ids": (B, 512, 4) the text tokens' RoPE positions}:
            Flux2KleinPipeline.encode_prompt's.
    repeat: each caption serves `repeat` images (winner and loser): the text is encoded once and its embeddings
    repeated, B captions -> repeat * B rows; original_sizes and crops_top_left are then per image.
    """
    device = models.unet.device
    text = FAMILIES[models.kind].text
    if text is not None:  # no micro-conditioning: the prompt's embeddings alone
        return repeat_cond(text(models, list(captions), device), repeat)
    hidden, pooled = [], None
    for tokenizer, text_encoder in zip(models.tokenizers, models.text_encoders):
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out = text_encoder(ids, output_hidden_states=models.kind == "sdxl")
        if models.kind == "sd15":
            return repeat_cond({"encoder_hidden_states": out.last_hidden_state}, repeat)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of the projection model (the last encoder)
    b = len(captions) * repeat
    size = torch.tensor(target_size or [models.unet.config.sample_size * 8] * 2, dtype=torch.float32).expand(b, 2)
    original = size if original_sizes is None else torch.as_tensor(original_sizes, dtype=torch.float32)
    crops = torch.zeros(b, 2) if crops_top_left is None else torch.as_tensor(crops_top_left, dtype=torch.float32)
    time_ids = torch.cat([original, crops, size], dim=1).to(device=device, dtype=pooled.dtype)  # (B, 6)
    text = repeat_cond({"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}, repeat)
    return {"encoder_hidden_states": text["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": text["text_embeds"], "time_ids": time_ids}}


def _sd3_text(models, captions, device):
    hidden, pooled = [], []
    for tokenizer, text_encoder in zip(models.tokenizers[:2], models.text_encoders[:2]):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = text_encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])  # text_embeds
    clip = torch.cat(hidden, dim=-1)
    width = models.unet.config.joint_attention_dim
    if models.text_encoders[2] is None:
        t5 = torch.zeros(len(captions), models.text_tokens, width, device=device, dtype=clip.dtype)
    else:
        ids = models.tokenizers[2](captions, padding="max_length", max_length=models.text_tokens, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        t5 = models.text_encoders[2](ids)[0]
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1)}


def _qwen3_text(models, captions, device):
    tokenizer, text_encoder = models.tokenizers[0], models.text_encoders[0]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False) for c in captions]
    tokens = tokenizer(chats, padding="max_length", max_length=models.text_tokens, truncation=True,
                       return_tensors="pt").to(device)
    # The causal LM's body: its hidden states are the pipeline's, without the vocabulary head it never reads.
    out = text_encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                             output_hidden_states=True, use_cache=False)
    hidden = torch.stack([out.hidden_states[k] for k in QWEN3_LAYERS], dim=2)  # (B, L, 3, width)
    ids = torch.zeros(len(captions), models.text_tokens, 4, dtype=torch.long, device=device)
    ids[..., 3] = torch.arange(models.text_tokens, device=device)  # (t, h, w, l) = (0, 0, 0, token)
    return {"encoder_hidden_states": hidden.flatten(2), "txt_ids": ids}


def denoise(model, x, t, cond):
    """The denoiser's prediction at x (B, C, h, w) and timesteps t (B,) on the scheduler's 0-1000 scale, shaped as
    x: the U-Net's or SD3's call; for FLUX.2 (cond has txt_ids), its call on the packed tokens of x, one per
    latent position with RoPE positions (0, row, column, 0), at time t / 1000 (Flux2KleinPipeline's convention)."""
    if "txt_ids" not in cond:
        return model(x, timestep=t, **cond).sample
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (B, h w, C), row-major: the pipeline's _pack_latents
    out = model(tokens, timestep=t / 1000, img_ids=encoder.latent_ids(x), **cond).sample
    return out.transpose(1, 2).reshape(b, c, h, w)


def repeat_cond(cond, n):
    """Repeat every tensor of cond n times along the batch (B -> nB), e.g. one prompt for winner and loser."""
    return {k: repeat_cond(v, n) if isinstance(v, dict) else v.repeat(n, *[1] * (v.dim() - 1)) for k, v in cond.items()}


@torch.no_grad()
def encode_images(vae, pixels, generator=None, chunk=8):
    """Pixels in [-1, 1], (N, 3, H, W) -> (latents - shift_factor) * scaling_factor, (N, C, H/8, W/8) fp32, in
    chunks (SD3's VAE has a shift factor; SD1.5's and SDXL's none).

    generator: one torch.Generator for the whole batch, or a list of N, one per image."""
    out = []
    for i, x in zip(range(0, len(pixels), chunk), pixels.split(chunk)):
        dist = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist
        if is_flux2_vae(vae):  # the posterior's mode, as Flux2KleinPipeline and diffusers' klein LoRA script take it
            out.append(dist.mode().float())
            continue
        out.append(dist.sample(generator=generator[i:i + chunk] if isinstance(generator, list) else generator).float())
    if is_flux2_vae(vae):
        return _flux2_normalise(vae, torch.cat(out))
    return (torch.cat(out) - _shift(vae)) * vae.config.scaling_factor


def is_flux2_vae(vae):
    """FLUX.2's VAE normalises its (patchified) latents by batch-norm statistics, not by a scaling factor."""
    return hasattr(vae, "bn")


def _flux2_bn(vae, z):
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, torch.float32)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).to(z.device, torch.float32) + vae.config.batch_norm_eps)
    return mean, std


def flux2_patchify(z):
    """(N, C, H/8, W/8) -> (N, 4C, H/16, W/16): 2x2 patches into channels, channel-major, as the pipeline's
    _patchify_latents."""
    n, c, h, w = z.shape
    return z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


def _flux2_normalise(vae, z):
    """The patchified latents, (z - mean) / std by the VAE's batch-norm statistics."""
    z = flux2_patchify(z)
    mean, std = _flux2_bn(vae, z)
    return (z - mean) / std


def _flux2_denormalise(vae, z):
    mean, std = _flux2_bn(vae, z)
    z = z.float() * std + mean
    n, c4, h, w = z.shape
    return z.view(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, 2 * h, 2 * w)


def _shift(vae):
    return getattr(vae.config, "shift_factor", None) or 0.0


def batch_latents(vae, batch, generator=None):
    """A training batch -> x0 (B * images per pair, C, h, w), all winners first, then all losers.

    From the latent cache when the batch holds "latents" (--cache-latents); else the VAE encodes "pixels"."""
    if "latents" in batch:
        return batch["latents"].transpose(0, 1).flatten(0, 1).to(vae.device, torch.float32)
    return encode_images(vae, batch["pixels"].transpose(0, 1).flatten(0, 1), generator)


def model_inputs(models, batch, resolution, generator=None):
    """A micro-batch -> (x0, cond): x0 (s * B, C, h, w) the latents of its s images per pair (s = 2: the B winners,
    then the B losers; s = 1: the winners alone), cond the U-Net's keyword arguments for them, one text encoding
    per pair (see encode_prompt)."""
    sides = batch["latents" if "latents" in batch else "pixels"].shape[1]
    x0 = batch_latents(models.vae, batch, generator=generator)
    cond = encode_prompt(models, batch["caption"], batch["original_sizes"].transpose(0, 1).flatten(0, 1),
                         batch["crops_top_left"].transpose(0, 1).flatten(0, 1), [resolution] * 2, repeat=sides)
    return x0, cond


def latent_encoder(vae, resolution, batch_size=8):
    """What data.cached_dataset needs of a VAE, as its keyword arguments: encode(pixels (N, 3, R, R), seeds) ->
    latents (N, C, h, w), one posterior sample per image drawn with its seed; the encoder's key (a hash of the
    weights, the dtype and the scaling factor: another VAE gets another cache); the latent shape at `resolution`."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    if is_flux2_vae(vae):  # patchified 2 x 2
        factor, channels = 2 * factor, 4 * channels

    def encode(pixels, seeds):
        return encode_images(vae, pixels, [torch.Generator(vae.device).manual_seed(s) for s in seeds], chunk=batch_size)

    return {"encode": encode, "latent_shape": (channels, resolution // factor, resolution // factor),
            "encoder_key": {"vae": digest.hexdigest(), "dtype": str(vae.dtype),
                            "scaling_factor": getattr(vae.config, "scaling_factor", None), "shift_factor": _shift(vae)}}


@torch.no_grad()
def decode_latents(vae, latents, chunk=8):
    """Latents (scaled) -> pixels in [-1, 1], (N, 3, H, W) fp32: undoes the scaling (and shift) first."""
    unscale = ((lambda z: _flux2_denormalise(vae, z)) if is_flux2_vae(vae) else
               (lambda z: z / vae.config.scaling_factor + _shift(vae)))
    out = [vae.decode(unscale(z).to(device=vae.device, dtype=vae.dtype)).sample.float() for z in latents.split(chunk)]
    return torch.cat(out).clamp(-1, 1)


# -----------------------------------------------------------------------------
# LoRA


def add_lora(unet, rank=64):
    """Add a rank-r LoRA (alpha = r, gaussian init) on to_q/to_k/to_v/to_out.0, and for SD3's transformer on the
    text stream's add_q/k/v_proj and to_add_out too; return {name: fp32 parameter}."""
    from peft import LoraConfig

    targets = FAMILIES[encoder.family(unet)].lora_targets(unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    for p in params.values():
        p.data = p.data.float()  # LoRA weights train in fp32 while the frozen weights stay in half precision
    return params


def _prefix(model):
    """The LoRA file's key prefix for this denoiser: "transformer" (SD3, FLUX.2) or "unet"."""
    return "transformer" if FAMILIES[encoder.family(model)].flow else "unet"


def lora_state_dict(unet):
    """The LoRA weights as pipe.load_lora_weights reads them, without the 'unet.' / 'transformer.' prefix: diffusers'
    names for a U-Net; PEFT's own (lora_A / lora_B) for SD3's transformer, as diffusers' SD3 LoRA script saves them
    (diffusers' older names cover only some of its layers)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    weights = get_peft_model_state_dict(unet)
    return weights if _prefix(unet) == "transformer" else convert_state_dict_to_diffusers(weights)


def load_data(path, what):
    """torch.load as data only (weights_only=True: tensors, numbers, strings, lists, dicts): a file holding anything
    else, which could run code as it loads, is refused; either way the error is one line that never suggests
    loading it unsafely."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a class or function to import and call
            raise ValueError(f"{path} holds objects other than tensors, numbers, strings, lists and dicts: refused, "
                             "since loading them could run code") from None
        raise ValueError(f"{path} is not {what} (unreadable: corrupt or truncated)") from None
    except (EOFError, RuntimeError, OSError) as e:
        why = "empty" if isinstance(e, EOFError) else "corrupt or truncated"
        raise ValueError(f"{path} is not {what} ({why})") from None


def save_lora(unet, out_dir):
    """Write OUT_DIR/pytorch_lora_weights.safetensors, loadable by pipe.load_lora_weights(out_dir)."""
    import diffusers

    # "unet." + diffusers names (the SD1.5 and SDXL pipelines write and read U-Net LoRA keys alike); "transformer."
    # + PEFT names for SD3 and FLUX.2, as their pipelines read them
    prefix = _prefix(unet)
    pipeline = getattr(diffusers, FAMILIES[encoder.family(unet)].pipeline)
    pipeline.save_lora_weights(out_dir, **{f"{prefix}_lora_layers": lora_state_dict(unet)})


def check_lora(lora_dir):
    """ModelError unless LORA_DIR/pytorch_lora_weights.safetensors is a readable safetensors file with U-Net (or SD3
    transformer) LoRA weights (diffusers would load one without them and quietly sample the base model). Returns
    the prefix its keys have: "unet" or "transformer"."""
    from safetensors import safe_open

    path = os.path.join(lora_dir, LORA_FILE)
    if not os.path.isfile(path):
        raise ModelError(f"--lora {lora_dir} holds no {LORA_FILE}")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            bad = next((k for k in keys if not torch.isfinite(f.get_tensor(k)).all()), None)
    except Exception as e:  # safetensors' own error type: empty, truncated, not safetensors at all
        raise ModelError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}): truncated or "
                         "partly copied?") from None
    for prefix in ("unet", "transformer"):
        if any(k.startswith(prefix + ".") for k in keys):
            if bad:
                raise ModelError(f"{path} holds NaN or inf ({bad}): a run that diverged; it would render black images")
            return prefix
    raise ModelError(f"{path} holds no U-Net or transformer LoRA weights (its {len(keys)} keys begin {keys[:2]}); "
                     "this project's LoRA files name them unet.* (SD1.5, SDXL) or transformer.* (SD3)")


def load_lora(unet, lora_dir, adapter_name="default"):
    """Load OUT_DIR/pytorch_lora_weights.safetensors into the U-Net (or SD3 transformer) as a PEFT adapter."""
    found, want = check_lora(lora_dir), _prefix(unet)
    if found != want:
        raise ModelError(f"the LoRA in {lora_dir} is for a {found} (its keys are {found}.*), and this model's "
                         f"denoiser is a {want}: it was trained on another kind of model")
    try:
        unet.load_lora_adapter(lora_dir, weight_name=LORA_FILE, prefix=want, adapter_name=adapter_name)
    except (RuntimeError, ValueError, IndexError, KeyError) as e:  # shapes or names of another model's U-Net
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise ModelError(f"the LoRA in {lora_dir} does not fit this model's U-Net (trained on another one?): "
                         f"{first}") from None
    return unet


# -----------------------------------------------------------------------------
# Model families: what differs between SD1.5, SDXL, SD3.5 and FLUX.2 [klein], in one table. What a family does
# not say is the same for all: the trainers, the losses and the encoder's step back read only `flow`; the encoder's
# stages (encoder.py) follow the denoiser's own blocks; sample.denoise and encode_images follow the model they get.


class Family(NamedTuple):
    load: Callable  # (name, source, dtype, t5) -> Models, from a diffusers pipeline folder or hub id
    tiny: Callable  # (seed) -> Models: a random model of about 1M parameters, built in code
    text: Optional[Callable]  # (models, captions, device) -> cond; None: CLIP with SDXL's micro-conditioning
    pipeline: str  # the diffusers pipeline: sampling, and its save_lora_weights writes the LoRA file
    components: Callable  # (models) -> that pipeline's keyword arguments
    lora_targets: Callable  # (denoiser) -> the module names the LoRA adapts
    scale_kwarg: str  # the pipeline call's keyword that scales a LoRA
    flow: bool  # rectified flow (velocity, Euler steps on sigmas) rather than DDPM noise prediction


def _single_block_targets(transformer):  # FLUX.2: every single block's output, by its index (see LORA_TARGETS_FLUX2)
    return LORA_TARGETS_FLUX2 + [f"single_transformer_blocks.{i}.attn.to_out"
                                 for i in range(len(transformer.single_transformer_blocks))]


FAMILIES = {
    "sd15": Family(partial(_load_unet_family, "sd15"), partial(build_tiny_unet, "sd15"), None,
                   "StableDiffusionPipeline", _sd15_components, lambda unet: LORA_TARGETS, "cross_attention_kwargs",
                   flow=False),
    "sdxl": Family(partial(_load_unet_family, "sdxl"), partial(build_tiny_unet, "sdxl"), None,
                   "StableDiffusionXLPipeline", _sdxl_components, lambda unet: LORA_TARGETS, "cross_attention_kwargs",
                   flow=False),
    "sd3": Family(_load_sd3, build_tiny_sd3, _sd3_text, "StableDiffusion3Pipeline", _sd3_components,
                  lambda transformer: LORA_TARGETS_SD3, "joint_attention_kwargs", flow=True),
    "flux2": Family(_load_flux2, build_tiny_flux2, _qwen3_text, "Flux2KleinPipeline", _flux2_components,
                    _single_block_targets, "attention_kwargs", flow=True),
}


# -----------------------------------------------------------------------------
# Sampling: prompts -> paired image folders

# SD3: the SD3.5 Medium model card's guidance (4.5); its 40 steps are the protocols' steps here.
# FLUX.2 [klein] base: Flux2KleinPipeline's defaults (guidance 4.0 with a negative "" prompt, 50 steps).
DEFAULTS = {"sd15": dict(guidance_scale=7.5, steps=50), "sdxl": dict(guidance_scale=5.0, steps=50),
            "sd3": dict(guidance_scale=4.5, steps=40), "flux2": dict(guidance_scale=4.0, steps=50)}
# Published evaluation protocols. guidance None: the model's default above. The NCP paper gives neither sampler nor
# steps nor guidance, only one image per prompt and the same seeds for both models (NCP.md section 6); its entry is
# this repository's default. SPO's (and LPO's) table: DDIM, 20 steps, guidance 5.0, 4 images per prompt.
PROTOCOLS = {"ncp": dict(scheduler="euler", steps=50, guidance_scale=None, images_per_prompt=1),
             "spo": dict(scheduler="ddim", steps=20, guidance_scale=5.0, images_per_prompt=4)}


# Named prompt sets: fetched once into the cache, and checked, so that everyone evaluates on the same prompts.
# PartiPrompts (Apache-2.0): the TSV at the commit that last changed it, 1,632 prompts in its Prompt column.
# Named prompt sets: the files each is read from, and their SHA-256 where one was checked.
HPS_STYLES = ["anime", "concept-art", "paintings", "photo"]
PROMPT_SETS = {
    "partiprompts": [("https://raw.githubusercontent.com/google-research/parti/"
                      "2c99f6652cbc7f0d0441aa91f4c7e7055bcb0071/PartiPrompts.tsv",
                      "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb")],
    # HPSv2's benchmark: 800 prompts in each of four styles (hps-STYLE for one), from the dataset repository the
    # hpsv2 package reads them from, in its order. No SHA-256 was checked for these files (README, Limits); the
    # count of each is checked, and every sample folder keeps its prompts in index.json.
    "hps": [(f"https://huggingface.co/datasets/zhwang/HPDv2/resolve/main/benchmark/{style}.json", None)
            for style in HPS_STYLES],
}
PROMPT_SETS.update({f"hps-{style}": [file] for style, file in zip(HPS_STYLES, PROMPT_SETS["hps"])})
SET_SIZES = {"hps": [800] * 4, **{f"hps-{style}": [800] for style in HPS_STYLES}}  # where no SHA-256 checks them


def fetch_checked(source, what, sha256=None, folder="files"):
    """The local path of a published file: a path as it is, or a URL fetched once into $HF_HOME/ncp/<folder>/. Checked
    against its SHA-256 when one is given. what: how errors name it. Raises ValueError."""
    import hashlib
    import urllib.parse
    import urllib.request

    path = source
    if urllib.parse.urlparse(source).scheme in ("http", "https", "file"):
        cache = os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache")), "ncp", folder)
        path = os.path.join(cache, urllib.parse.unquote(os.path.basename(source)))
        if not os.path.exists(path):
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise ValueError(f"{what} is not in {cache} and HF_HUB_OFFLINE=1; fetch {source} there")
            os.makedirs(cache, exist_ok=True)
            try:
                with urllib.request.urlopen(source, timeout=120) as r:
                    payload = r.read()
            except OSError as e:
                raise ValueError(f"could not fetch {what} from {source} ({e})") from None
            with open(path + ".tmp", "wb") as f:
                f.write(payload)
            os.replace(path + ".tmp", path)
    if sha256:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != sha256:
            raise ValueError(f"{path} is not the published {what} (SHA-256 {digest[:12]}..., expected "
                             f"{sha256[:12]}...); delete it to fetch it again")
    return path


def read_prompts(spec, data_source=None):
    """A text file (one prompt a line), a TSV with a Prompt column (PartiPrompts), a named set (PROMPT_SETS), or a
    split name of a preference source, such as validation_unique (its unique captions, in order). Raises ValueError
    when there is none."""
    if spec in PROMPT_SETS:
        files = [fetch_checked(url, f"prompt set {spec}", sha256, "prompts") for url, sha256 in PROMPT_SETS[spec]]
        parts = [read_prompts(path) for path in files]
        if [len(part) for part in parts] != SET_SIZES.get(spec, [len(part) for part in parts]):
            raise ValueError(f"prompt set {spec} has {[len(part) for part in parts]} prompts, not {SET_SIZES[spec]}: "
                             f"delete {os.path.dirname(files[0])} to fetch it again")
        return [p for part in parts for p in part]
    if not os.path.isfile(spec) and (os.sep in spec or spec.endswith((".txt", ".tsv", ".json"))):
        raise ValueError(f"no prompt file {spec}")  # a path, not a split name
    if os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the prompt file {spec}: {e}") from None
        if spec.endswith(".tsv"):
            import csv

            rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
            if rows and "Prompt" not in rows[0]:
                raise ValueError(f"{spec} has no Prompt column (columns: {list(rows[0])})")
            prompts = [r["Prompt"].strip() for r in rows]
        elif spec.endswith(".json"):  # a JSON list of prompts, as HPSv2's benchmark files are
            try:
                prompts = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{spec} is not JSON: {e}") from None
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"{spec} is not a JSON list of prompts")
            prompts = [p.strip() for p in prompts]
        else:
            prompts = [line.strip() for line in text.splitlines()]
    else:
        import data  # a split of a preference source: its captions, from the metadata only

        prompts = data.split_captions(data_source or data.PICKAPIC, spec)
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"no prompts in {spec}")
    return prompts


def image_name(index, j):
    """File name of image j of prompt `index`: the same in every run over the same prompts, so runs pair up."""
    return f"{index:05d}_{j}.png"


def prompt_seed(seed, index):
    return seed * 100_003 + index


def image_seed(seed, index, j):
    """The seed of image j of prompt `index`: each image has a generator of its own, so an image is the same
    whatever the batch it was drawn in."""
    return prompt_seed(seed, index) * 1_000 + j


def make_grid(images, columns=4):
    """PIL images (or paths to them) side by side, `columns` a row, all at the first one's size."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") if isinstance(p, str) else p for p in images]
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (w * min(columns, len(images)), h * rows), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return grid


def sampling_pipeline(models, scheduler="euler"):
    """make_pipeline with the Euler (or DDIM) sampler built from the model's scheduler config, no progress bar. SD3
    samples with its own flow-matching Euler scheduler (its ODE has no DDIM)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    pipe = make_pipeline(models)
    if FAMILIES[models.kind].flow:
        if scheduler != "euler":
            raise ValueError(f"{models.kind.upper()} samples with its flow-matching Euler scheduler, not {scheduler}")
        pipe.scheduler = type(models.scheduler).from_config(models.scheduler.config)
    else:
        pipe.scheduler = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[scheduler].from_config(
            models.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def text_length(models):
    """The pipeline call's T5 length for SD3, the one training encodes with (none for the others)."""
    return {"max_sequence_length": models.text_tokens} if FAMILIES[models.kind].flow else {}


def lora_scale(models, scale):
    """The pipeline call's keyword argument that scales a LoRA: SD3's joint_attention_kwargs, FLUX.2's
    attention_kwargs, else cross_attention_kwargs."""
    return {FAMILIES[models.kind].scale_kwarg: {"scale": scale}}


def validation_grid(models, prompts, resolution, seed=0, steps=20):
    """One image per prompt with the seeds sample.py gives them, the LoRA on, as one grid: the training scripts'
    view of a run. It draws from its own generators only, so the training's random state is left as it was."""
    pipe = sampling_pipeline(models)
    device = models.unet.device
    images = [pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=DEFAULTS[models.kind]["guidance_scale"],
                   height=resolution, width=resolution, **text_length(models),
                   generator=torch.Generator(device).manual_seed(image_seed(seed, i, 0))).images[0]
              for i, prompt in enumerate(prompts)]
    return make_grid(images)


COMMAND_FILE = ".command.json"  # in a sample folder: the settings its images were made with


def check_folder(out, command, prompts):
    """ValueError unless the images already in `out` were made by this same command (model, LoRA and its scale,
    resolution, protocol, seed, precision, and the same prompts), so that a resumed folder only ever holds what
    its index.json says. A folder of images that no record vouches for is refused too."""
    record = os.path.join(out, COMMAND_FILE)
    if os.path.isfile(record):
        with open(record) as f:
            before = json.load(f)
    elif os.path.isfile(os.path.join(out, "index.json")):  # a folder written before the record existed
        with open(os.path.join(out, "index.json")) as f:
            index = json.load(f)
        before = {key: index.get(key) for key in ("model", "t5", "lora", "lora_scale", "resolution", "protocol")}
        before.update(seed=command["seed"] if [i["seeds"] for i in index["images"]] == [
            [image_seed(command["seed"], i, j) for j in range(len(item["seeds"]))]
            for i, item in enumerate(index["images"])] else "another", precision=command["precision"])
    elif os.path.isdir(out) and any(re.fullmatch(r"\d{5}_\d+\.png", n) for n in os.listdir(out)):
        raise ValueError(f"--out {out} holds images with no record of what made them: choose another --out")
    else:
        return
    changed = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in command.items() if before.get(key) != value]
    if changed:
        raise ValueError(f"--out {out} holds images made by another command ({'; '.join(changed)}): choose another "
                         "--out, or remove that folder")
    index = os.path.join(out, "index.json")
    if os.path.isfile(index):
        with open(index) as f:
            if [i["prompt"] for i in json.load(f)["images"]] != prompts:
                raise ValueError(f"--out {out} holds images of other prompts: choose another --out")


def parse_args(argv=None):
    import data

    p = argparse.ArgumentParser(description="Generate paired images for a prompt list, with or without a LoRA.")
    p.add_argument("--model", default="sdxl", help="sd15, sdxl, sd35-medium, sd35-large, tiny, tiny-sdxl, tiny-sd3, a "
                   "diffusers pipeline dir or hub id (default: %(default)s)")
    p.add_argument("--t5", action=argparse.BooleanOptionalAction, default=True, help="SD3: with its T5 text encoder "
                   "(--no-t5: zeros in its place, as the LoRA's training run had if it was trained so)")
    p.add_argument("--lora", help="a training output dir holding pytorch_lora_weights.safetensors (none: the base)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (default: %(default)s)")
    p.add_argument("--prompts", required=True, help="a text file, a .tsv with a Prompt column, a .json list, a named "
                   "set fetched once (partiprompts; hps, HPSv2's benchmark, or hps-anime, hps-concept-art, "
                   "hps-paintings, hps-photo), or a split name of --data such as validation_unique")
    p.add_argument("--data", default=data.PICKAPIC, help="where --prompts SPLIT is read from (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder: images, index.json and grid.png")
    p.add_argument("--resolution", type=int, help="image size (default: the model's, 512 / 1024)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="ncp", help="a published sampling protocol: "
                   + "; ".join(f"{k}: {v['scheduler']}, {v['steps']} steps, guidance {v['guidance_scale'] or 'default'}"
                               f", {v['images_per_prompt']} per prompt" for k, v in PROTOCOLS.items())
                   + " (default: %(default)s); the flags below override it")
    p.add_argument("--num-images-per-prompt", type=int, help="images per prompt (default: the protocol's)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the protocol's, else 7.5 "
                   "SD1.5, 5.0 SDXL, 4.5 SD3)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the protocol's)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call; the images do not depend on "
                   "it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image j of prompt i has a seed derived from it, "
                   "i and j (default: %(default)s)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default fp16 on GPU, fp32 on CPU")
    return p.parse_args(argv)


def main(args):
    import io
    import sys

    import run  # the run folder's checks (run.py imports this module)

    import torch.distributed as dist

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda and "OMP_NUM_THREADS" not in os.environ:  # one share of the cores per process, as the trainers: on a
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))  # busy machine, spinners crawl
    error, made = None, []  # made: the folder, if this command makes it (removed again if no model loads)
    try:  # every check before a model is loaded or a file written
        _, kind = resolve_model(args.model)
        for flag in ("num_images_per_prompt", "steps", "batch_size", "resolution"):
            value = getattr(args, flag)
            if value is not None and (value < 1 or flag == "resolution" and value % 8):
                raise ValueError(f"--{flag.replace('_', '-')} {value} must be "
                                 + ("a positive multiple of 8 (the VAE's factor)" if flag == "resolution" else
                                    "at least 1"))
        if not 0 <= args.seed < 2**32:
            raise ValueError(f"--seed {args.seed} must be between 0 and 2^32 - 1")
        run.check_output(args.out, "--out")
        if FAMILIES[kind].flow and PROTOCOLS[args.protocol]["scheduler"] != "euler":
            raise ValueError(f"--protocol {args.protocol} samples with {PROTOCOLS[args.protocol]['scheduler']}; "
                             f"{kind.upper()} samples with its flow-matching Euler scheduler (--protocol ncp)")
        if args.lora:
            check_lora(args.lora)
        prompts = read_prompts(args.prompts, args.data)
        protocol = {**PROTOCOLS[args.protocol], "name": args.protocol}
        protocol["guidance_scale"] = protocol["guidance_scale"] or DEFAULTS[kind]["guidance_scale"]
        for key, value in (("guidance_scale", args.guidance_scale), ("steps", args.steps),
                           ("images_per_prompt", args.num_images_per_prompt)):
            if value is not None and value != protocol[key]:
                protocol[key], protocol["name"] = value, f"{args.protocol}, changed"
        precision = args.precision or ("fp16" if cuda else "fp32")
        command = {"model": args.model, "t5": args.t5, "lora": args.lora, "lora_scale": args.lora_scale,
                   "resolution": args.resolution, "protocol": protocol, "seed": args.seed, "precision": precision}
        check_folder(args.out, command, prompts)
        if rank == 0:  # one sampler per folder: a second is refused in one line, naming the first
            run.claim_folder(args.out, "--out", made)
    except (ValueError, OSError) as e:
        error = f"error: {e}"
    if world_size > 1:  # every rank stops if one found an error
        failed = torch.tensor([float(error is not None)])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            sys.exit(1)
    if error:
        sys.exit(error)
    k = protocol["images_per_prompt"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]

    from tqdm import tqdm

    try:
        models = load_models(args.model, dtype, device, t5=args.t5)
        if args.lora:
            load_lora(models.unet, args.lora)
    except ModelError as e:
        for path in made:
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        sys.exit(f"error: {e}")
    # A VAE that asks for force_upcast stays in fp32 for training; here the pipeline itself upcasts it to decode, and
    # it wants the VAE in the pipeline's dtype to begin with.
    if models.vae.dtype != dtype:
        models.vae.to(dtype)
    pipe = sampling_pipeline(models, protocol["scheduler"])
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:  # what made the images in this folder, before the first of them: a resume is checked against it
        run.write_together({os.path.join(args.out, COMMAND_FILE): json.dumps(command, indent=1)})
    done = lambda i: all(os.path.exists(os.path.join(args.out, image_name(i, j))) for j in range(k))  # noqa: E731
    mine = [i for i in range(rank, len(prompts), world_size) if not done(i)]  # sharded over ranks; resumable
    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    bar = tqdm(total=len(mine) * k, disable=rank != 0, desc="sampling", unit="image")
    for start in range(0, len(mine), args.batch_size):
        chunk = mine[start:start + args.batch_size]
        images = pipe(prompt=[prompts[i] for i in chunk], num_inference_steps=protocol["steps"],
                      guidance_scale=protocol["guidance_scale"], num_images_per_prompt=k, **size,
                      generator=[torch.Generator(device).manual_seed(image_seed(args.seed, i, j))
                                 for i in chunk for j in range(k)],  # the pipeline's order: prompt-major
                      **text_length(models), **(lora_scale(models, args.lora_scale) if args.lora else {})).images
        for (i, j), image in zip([(i, j) for i in chunk for j in range(k)], images):
            png = io.BytesIO()
            image.save(png, format="PNG")
            try:  # a file that exists is complete
                run.write_together({os.path.join(args.out, image_name(i, j)): png.getvalue()})
            except OSError as e:  # a full disk or quota: the images so far are whole, and the same command goes on
                bar.close()
                sys.exit(f"error: could not write {image_name(i, j)} in {args.out} ({e.strerror or e}); the images "
                         "written so far are kept: free some space and run the same command again to go on")
        bar.update(len(chunk) * k)
    bar.close()
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        index = [{"index": i, "prompt": p, "seeds": [image_seed(args.seed, i, j) for j in range(k)],
                  "files": [image_name(i, j) for j in range(k)]} for i, p in enumerate(prompts)]
        meta = {"model": args.model, "t5": args.t5, "lora": args.lora, "lora_scale": args.lora_scale,
                "prompts": args.prompts,
                "resolution": args.resolution, "protocol": protocol, "images": index}
        grid = io.BytesIO()
        make_grid([os.path.join(args.out, n) for item in index[:16] for n in item["files"][:1]]).save(grid, "PNG")
        try:
            run.write_together({os.path.join(args.out, "index.json"): json.dumps(meta, indent=1),
                                os.path.join(args.out, "grid.png"): grid.getvalue()})
        except OSError as e:
            sys.exit(f"error: could not write index.json and grid.png in {args.out} ({e.strerror or e}); every image "
                     "is written: free some space and run the same command again")
        print(f"{len(prompts)} prompts x {k} images in {args.out} (index.json, grid.png), protocol {protocol}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    import run

    run.run_main(main, parse_args())
