"""Win rate of one image folder over another, scored with PickScore (and HPSv2 when installed): Table 1's protocol.

    python sample.py --model sdxl --prompts validation_unique --out samples/base
    python sample.py --model sdxl --lora runs/dpo-ncp-sdxl-absolute-winners --prompts validation_unique \
        --out samples/ncp
    python evaluate.py samples/ncp samples/base --out report.json

Both folders come from sample.py over the same prompts and seeds; images pair up by file name. For each pair,
A wins if its score is higher, ties count half; the win rate comes with a 95% Wilson interval and the mean
scores. PickScore is CLIP-H's logit scale times the cosine similarity of image and prompt embeddings.
"""

import argparse
import json
import math
import os
import sys

import torch

PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def read_index(folder):
    """index.json of a sample.py folder -> {file: prompt}. Raises ValueError if missing or incomplete."""
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no index.json: make it with sample.py")
    with open(path) as f:
        items = json.load(f)["images"]
    files = {name: item["prompt"] for item in items for name in item["files"]}
    missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} of its images (first: {missing[0]}); finish sample.py first")
    return files


def pair_up(folder_a, folder_b):
    """[(file, prompt)] present in both folders with the same prompt; ValueError if the folders do not pair up."""
    a, b = read_index(folder_a), read_index(folder_b)
    if a.keys() != b.keys() or any(a[k] != b[k] for k in a):
        differ = sorted(set(a) ^ set(b))[:3] or [k for k in a if a[k] != b[k]][:3]
        raise ValueError(f"{folder_a} and {folder_b} do not pair up (same prompts and files expected; "
                         f"differ: {differ})")
    return sorted(a.items())


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


def hpsv2_scorer():
    """HPSv2's score function when the hpsv2 package is installed, else None."""
    try:
        import hpsv2
    except ImportError:
        return None
    return lambda images, prompts: torch.tensor([float(hpsv2.score(im, p)[0]) for im, p in zip(images, prompts)])


def winrate(a, b):
    """Share of pairs where a > b, ties counting half, with its 95% Wilson interval. a, b: (N,)."""
    n = len(a)
    p = ((a > b).float().sum() + 0.5 * (a == b).float().sum()).item() / n
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"winrate": p, "winrate_ci95": [max(0.0, centre - half), min(1.0, centre + half)], "n": n}


def score_folder(scorer, folder, pairs, batch_size):
    from PIL import Image

    scores = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        images = [Image.open(os.path.join(folder, name)).convert("RGB") for name, _ in chunk]
        scores.append(scorer(images, [prompt for _, prompt in chunk]))
    return torch.cat(scores)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir_a", help="sample.py folder of model A (e.g. with the NCP LoRA)")
    p.add_argument("dir_b", help="sample.py folder of model B, same prompts and seeds")
    p.add_argument("--pickscore-model", default=PICKSCORE, help="PickScore model (dir or hub id)")
    p.add_argument("--pickscore-processor", default=PICKSCORE_PROCESSOR, help="its CLIP processor (dir or hub id)")
    p.add_argument("--batch-size", type=int, default=16, help="images scored at once")
    p.add_argument("--out", default="report.json", help="JSON report (written only when everything succeeded)")
    return p.parse_args(argv)


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        pairs = pair_up(args.dir_a, args.dir_b)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        scorers = {"pickscore": PickScore(args.pickscore_model, args.pickscore_processor, device)}
    except Exception as e:  # any failure to load the scorer is the user's to fix: say which and why
        sys.exit(f"error: cannot load the PickScore model {args.pickscore_model} / processor "
                 f"{args.pickscore_processor}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if (hps := hpsv2_scorer()) is not None:
        scorers["hpsv2"] = hps
    report = {"dir_a": args.dir_a, "dir_b": args.dir_b, "pairs": len(pairs)}
    for name, scorer in scorers.items():
        a, b = (score_folder(scorer, folder, pairs, args.batch_size) for folder in (args.dir_a, args.dir_b))
        result = winrate(a, b)
        report[f"{name}_winrate"] = result["winrate"]
        report[f"{name}_winrate_ci95"] = result["winrate_ci95"]
        report[f"{name}_mean_a"], report[f"{name}_mean_b"] = a.mean().item(), b.mean().item()
        lo, hi = result["winrate_ci95"]
        print(f"{name}: A wins {100 * result['winrate']:.1f}% of {len(pairs)} pairs "
              f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}), "
              f"mean A {a.mean():.3f}, mean B {b.mean():.3f}")
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main(parse_args())
