"""The size of evaluate.py's HTML page for a real evaluation: 500 prompts x 3 folders x 4 images at 1024 px, 4 scorers.

    python benchmarks/report_size.py --out benchmarks/results/report_size_cpu.json

The page embeds thumbnails of its gallery only (evaluate.py --gallery, 24 prompts by default) and links the full
images, so its size should not grow with the prompts. The images are 64 distinct 1024 px PNGs of soft shapes on
gradients (photographs compress no better than this in JPEG thumbnails), each file of the 6,000 a hard link to one
of them; the scores are random. The same page is also written with 50 and 5,000 prompts to show the size does not
follow the count.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import sample  # noqa: E402


def picture(rng, size=1024):
    """A soft picture: a two-colour gradient and a few blurred ellipses."""
    a, b = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    ramp = torch.linspace(0, 1, size).view(size, 1, 1)
    pixels = (torch.tensor(a) * (1 - ramp) + torch.tensor(b) * ramp).expand(size, size, 3)
    image = Image.fromarray(pixels.byte().numpy())
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(40, 300)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image.filter(ImageFilter.GaussianBlur(3))


def page_bytes(root, distinct, prompts, folders=3, per_prompt=4, scorers=("pickscore", "hpsv2", "imagereward",
                                                                          "aesthetic")):
    names = [os.path.join(root, f"f{k}-{prompts}") for k in range(folders)]
    pairs = [(sample.image_name(i, j), f"prompt {i}: a picture of a thing") for i in range(prompts)
             for j in range(per_prompt)]
    for k, folder in enumerate(names):
        os.makedirs(folder)
        for n, (name, _) in enumerate(pairs):
            os.link(distinct[(n + 7 * k) % len(distinct)], os.path.join(folder, name))
    g = torch.Generator().manual_seed(0)
    scores = {s: {f: torch.randn(len(pairs), generator=g) for f in names} for s in scorers}
    prompt_of = [p for _, p in pairs]
    report = {"folders": names, "prompts": prompts, "images": len(pairs), "protocol": {}, "sources": {},
              "scorers": {s: evaluate.compare(scores[s], prompt_of) for s in scorers}}
    path = os.path.join(root, f"page-{prompts}.html")
    start = time.perf_counter()
    evaluate.html_report(report, scores, pairs, path)
    return os.path.getsize(path), time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/report_size_cpu.json")
    args = p.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as root:
        distinct = []
        for k in range(64):
            distinct.append(os.path.join(root, f"picture-{k}.png"))
            picture(rng).save(distinct[-1])
        result = {"folders": 3, "images_per_prompt": 4, "resolution": 1024, "scorers": 4, "gallery_prompts": 24,
                  "pages": {}}
        for prompts in (50, 500, 5000):
            size, seconds = page_bytes(root, distinct, prompts)
            result["pages"][prompts] = {"bytes": size, "seconds": round(seconds, 2)}
            print(f"{prompts} prompts: {size / 1e6:.2f} MB, written in {seconds:.1f} s")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
