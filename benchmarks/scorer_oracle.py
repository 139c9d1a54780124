"""HPSv2 and ImageReward in evaluate.py against the reference packages themselves, at full size (OpenCLIP ViT-H-14;
BLIP ViT-L + BERT), on the same random weights, images and prompts: pixels, token ids and scores side by side.

The reference packages cannot live beside ours (they need torchvision and transformers 4), so the check runs in two
environments, writing and reading one folder:

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch torchvision open_clip_torch "transformers<4.50" \\
        "setuptools<70" && /tmp/ref/bin/pip install --no-build-isolation hpsv2 image-reward
    /tmp/ref/bin/python benchmarks/scorer_oracle.py reference --dir /tmp/oracle   # the packages score; weights saved
    python benchmarks/scorer_oracle.py check --dir /tmp/oracle \\
        --out benchmarks/results/scorer_oracle_cpu.json                           # evaluate.py scores the same

reference: random weights in each package's own model class (seeded), saved in the published checkpoints' layouts
(HPS_v2.1_compressed.pt's {"state_dict"}, ImageReward.pt's state dict); images of several sizes scored through
hpsv2.img_score.score and ImageReward.score, the packages' own entry points; their preprocessed pixels and token ids
kept. Nothing is downloaded: hpsv2's model is built as its img_score builds it but without pretrained weights (its
pip package lacks the BPE vocabulary: copy open_clip's bpe_simple_vocab_16e6.txt.gz into hpsv2/src/open_clip/), and
BLIP's BERT tokenizer is made from a local vocabulary of the real one's size (the real vocabulary is not needed to
compare two implementations on the same one). check: evaluate.HPSv2 and evaluate.ImageReward load those files,
with a transformers CLIP config of ViT-H-14's sizes and the same tokenizer files, and score the same images.
"""

import argparse
import json
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photograph of an astronaut riding a horse", "a red cube on a blue sphere, studio lighting",
           "an oil painting of a lighthouse in a storm", "two cats",
           "a very long prompt " + "with many repeated words " * 12 + "that the tokenizers must truncate alike"]
SIZES = [(512, 512), (640, 480), (480, 720), (1024, 1024), (333, 500)]


def images():
    """Smooth random images (gradients and blobs, not noise: resizing filters differ most on real content)."""
    from PIL import Image

    out = []
    for i, (w, h) in enumerate(SIZES):
        g = torch.Generator().manual_seed(i)
        low = torch.rand(1, 3, 6, 6, generator=g)
        x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
        x = (x + 0.05 * torch.rand(3, h, w, generator=g)).clamp(0, 1)
        out.append(Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()))
    return out


def bert_vocab(path):
    """A BERT vocabulary of bert-base-uncased's size and special-token ids, its words those of PROMPTS plus letters."""
    words = sorted({w for p in PROMPTS for w in p.replace(",", " , ").split()} | set("abcdefghijklmnopqrstuvwxyz,"))
    vocab = [f"[unused{i}]" for i in range(100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab[0] = "[PAD]"
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"[unused{i}]" for i in range(100, 100 + 30522 - len(vocab))]
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")


MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
              "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
              "encoder_width": 768, "add_cross_attention": True}  # BLIP's med_config.json, as ImageReward ships it


def reference(folder):
    os.makedirs(folder, exist_ok=True)
    pics = images()
    for i, image in enumerate(pics):
        image.save(os.path.join(folder, f"{i}.png"))
    out = {"prompts": PROMPTS}

    # HPSv2.1, through hpsv2.img_score.score with its model built as initialize_model builds it, minus the download.
    import hpsv2.img_score as hps
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer

    torch.manual_seed(0)
    model, _, preprocess_val = create_model_and_transforms(
        "ViT-H-14", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    torch.save({"state_dict": model.state_dict()}, os.path.join(folder, "HPS_v2.1_compressed.pt"))
    hps.model_dict.update(model=model, preprocess_val=preprocess_val)
    out["hpsv2"] = [float(hps.score(im, p, cp=os.path.join(folder, "HPS_v2.1_compressed.pt"))[0])
                    for im, p in zip(pics, PROMPTS)]
    out["hpsv2_pixels"] = torch.stack([preprocess_val(im) for im in pics])
    out["hpsv2_tokens"] = get_tokenizer("ViT-H-14")(PROMPTS)
    from hpsv2.src.open_clip.tokenizer import _tokenizer as tok  # the BPE that tokenize() uses, written out as
    # transformers' CLIPTokenizer files for the check
    os.makedirs(os.path.join(folder, "vit-h-14"), exist_ok=True)
    with open(os.path.join(folder, "vit-h-14", "vocab.json"), "w") as f:
        specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # transformers' names
        json.dump({specials.get(k, k): v for k, v in tok.encoder.items()}, f)
    with open(os.path.join(folder, "vit-h-14", "merges.txt"), "w") as f:
        merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n")

    # ImageReward, through ImageReward.score, BLIP's tokenizer from the local vocabulary.
    sys.modules.setdefault("clip", types.ModuleType("clip"))  # the package's __init__ imports OpenAI's clip for
    # another scorer; ImageReward itself does not use it
    from transformers import BertTokenizer

    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.ImageReward import ImageReward

    os.makedirs(os.path.join(folder, "bert"), exist_ok=True)
    bert_vocab(os.path.join(folder, "bert", "vocab.txt"))
    BertTokenizer(os.path.join(folder, "bert", "vocab.txt")).save_pretrained(os.path.join(folder, "bert"))

    def init_tokenizer():  # BLIP's init_tokenizer, from the local vocabulary
        t = BertTokenizer.from_pretrained(os.path.join(folder, "bert"))
        t.add_special_tokens({"bos_token": "[DEC]"})
        t.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        t.enc_token_id = t.additional_special_tokens_ids[0]
        return t

    blip_pretrain.init_tokenizer = init_tokenizer
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump(MED_CONFIG, f)
    torch.manual_seed(1)
    reward = ImageReward(med_config=os.path.join(folder, "med_config.json"), device="cpu").eval()
    for layer in reward.mlp.layers:  # its own init (std 1/769, zero bias) leaves the head near 0 for every input
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            torch.nn.init.normal_(layer.bias, std=0.1)
    torch.save(reward.state_dict(), os.path.join(folder, "ImageReward.pt"))
    with torch.no_grad():
        out["imagereward"] = [float(reward.score(p, im)) for im, p in zip(pics, PROMPTS)]
    out["imagereward_pixels"] = torch.stack([reward.preprocess(im) for im in pics])
    out["imagereward_tokens"] = reward.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35,
                                                      return_tensors="pt")["input_ids"]
    torch.save(out, os.path.join(folder, "reference.pt"))
    print({k: v for k, v in out.items() if k in ("hpsv2", "imagereward")})


def check(folder, out_path):
    from PIL import Image
    from transformers import CLIPConfig, CLIPTokenizer

    sys.path.insert(0, ROOT)
    import evaluate

    ref = torch.load(os.path.join(folder, "reference.pt"))
    pics = [Image.open(os.path.join(folder, f"{i}.png")) for i in range(len(SIZES))]
    base = os.path.join(folder, "vit-h-14")  # OpenCLIP ViT-H-14's sizes, as transformers spells them
    CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
               vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu"),
               projection_dim=1024).save_pretrained(base)
    CLIPTokenizer(os.path.join(base, "vocab.json"), os.path.join(base, "merges.txt"),
                  model_max_length=77).save_pretrained(base)
    result = {"sizes": SIZES, "prompts": PROMPTS}
    with torch.no_grad():
        hps = evaluate.HPSv2(os.path.join(folder, "HPS_v2.1_compressed.pt"), base)
        tokens = hps.tokenizer(PROMPTS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
        want = ref["hpsv2_tokens"]  # OpenCLIP pads with zeros to 77: compare up to each end of text
        same = tokens.shape == want.shape and all(torch.equal(tokens[i, :e + 1], want[i, :e + 1])
                                                  for i, e in enumerate(want.argmax(dim=-1).tolist()))
        pixels = evaluate.reference_pixels(pics, 224, letterbox=True)
        got = hps(pics, PROMPTS)
        result["hpsv2"] = {"reference": ref["hpsv2"], "ours": got.tolist(),
                           "max_abs_score_diff": (got - torch.tensor(ref["hpsv2"])).abs().max().item(),
                           "max_abs_pixel_diff": (pixels - ref["hpsv2_pixels"]).abs().max().item(),
                           "tokens_equal": same}
        del hps
        rew = evaluate.ImageReward(os.path.join(folder, "ImageReward.pt"), os.path.join(folder, "med_config.json"),
                                   os.path.join(folder, "bert"))
        tokens = rew.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35,
                               return_tensors="pt")["input_ids"]
        pixels = evaluate.reference_pixels(pics, 224)
        got = rew(pics, PROMPTS)
        result["imagereward"] = {"reference": ref["imagereward"], "ours": got.tolist(),
                                 "max_abs_score_diff": (got - torch.tensor(ref["imagereward"])).abs().max().item(),
                                 "max_abs_pixel_diff": (pixels - ref["imagereward_pixels"]).abs().max().item(),
                                 "tokens_equal": torch.equal(tokens, ref["imagereward_tokens"])}
    print(json.dumps(result, indent=1))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["reference", "check"])
    p.add_argument("--dir", required=True, help="the folder the two stages share")
    p.add_argument("--out", help="check: write the comparison here as JSON")
    args = p.parse_args()
    reference(args.dir) if args.stage == "reference" else check(args.dir, args.out)
