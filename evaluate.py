"""Scores of sample.py folders, their per-prompt win rates and a matrix of them: the protocol of the papers' tables.

    python sample.py --model sdxl --prompts validation_unique --out samples/base
    python sample.py --model sdxl --lora runs/dpo-ncp-sdxl-absolute-winners --prompts validation_unique \
        --out samples/ncp
    python evaluate.py samples/ncp samples/base [samples/dpo ...] --out report.json --markdown report.md

The folders come from sample.py over the same prompts and seeds, under the same protocol (refused otherwise);
images pair up by file name. Win rate of A over B: for each prompt, the share of its images where A scores
higher (image j against image j, ties half), averaged over prompts, with a 95% bootstrap interval over prompts.
Mean scores are per prompt, then over prompts, with the same kind of interval. PickScore is CLIP-H's logit scale
times the cosine similarity of image and prompt embeddings.
"""
import argparse
import json
import os
import sys

import torch

import sample

PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP = "openai/clip-vit-large-patch14"  # CLIP score, and the aesthetic head's image encoder
# The LAION aesthetic predictor v2 (sac+logos+ava1, linear MSE head), at the commit that added it, and its SHA-256.
AESTHETIC = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
             "61f2f07a2b16be5ffb40a10ba5adae4a74c9d0d9/sac%2Blogos%2Bava1-l14-linearMSE.pth")
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
SCORERS = ["pickscore", "clip", "aesthetic", "hpsv2"]


def read_index(folder):
    """index.json of a sample.py folder -> ({file: prompt}, protocol). Raises ValueError if missing or incomplete."""
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no index.json: make it with sample.py")
    with open(path) as f:
        index = json.load(f)
    files = {name: item["prompt"] for item in index["images"] for name in item["files"]}
    missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} of its images (first: {missing[0]}); finish sample.py first")
    return files, index.get("protocol")


def pair_up(folders, allow_protocols=False):
    """[(file, prompt)] of the images every folder holds for the same prompts; ValueError if the folders do not pair
    up, or were sampled under different protocols (unless allow_protocols)."""
    indexes = [read_index(folder) for folder in folders]
    (first, protocol), name = indexes[0], folders[0]
    for folder, (files, other) in zip(folders[1:], indexes[1:]):
        if other != protocol and not allow_protocols:
            raise ValueError(f"{name} and {folder} were sampled under different protocols ({protocol} and {other}): "
                             "their scores do not compare; --allow-protocol-mismatch to compare them anyway")
        if files.keys() != first.keys() or any(files[k] != first[k] for k in first):
            differ = sorted(set(files) ^ set(first))[:3] or [k for k in first if files[k] != first[k]][:3]
            raise ValueError(f"{name} and {folder} do not pair up (same prompts and files expected; differ: {differ})")
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
    normalisation: the reference preprocessing of all CLIP-based scorers here), with normalised embeddings."""

    def __init__(self, model, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(model)
        self.model = CLIPModel.from_pretrained(model).eval().to(device)
        self.device = device

    @torch.no_grad()
    def images(self, images):
        """(N, D) unit image embeddings: the vision tower's pooled output through the visual projection."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        embeds = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    @torch.no_grad()
    def texts(self, prompts):
        """(N, D) unit text embeddings (prompts truncated to the model's length)."""
        tokens = self.processor(text=prompts, padding=True, truncation=True, return_tensors="pt")
        out = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                    attention_mask=tokens["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)


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
        sizes = [state[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
        drop = [0.2, 0.2, 0.1]
        layers = []
        for i, (out, inp) in enumerate(sizes):
            layers += [torch.nn.Linear(inp, out)] + ([torch.nn.Dropout(drop[i])] if i < 3 else [])
        self.head = torch.nn.Module()
        self.head.layers = torch.nn.Sequential(*layers)  # the reference's keys: layers.0, .2, .4, .6, .7
        self.head.load_state_dict(state, strict=True)
        self.head.eval().to(device)

    @torch.no_grad()
    def __call__(self, images, prompts):
        return self.head.layers(self.clip.images(images)).squeeze(-1).cpu()


def hpsv2_scorer():
    """HPSv2's score function when the hpsv2 package is installed, else None."""
    try:
        import hpsv2
    except ImportError:
        return None
    return lambda images, prompts: torch.tensor([float(hpsv2.score(im, p)[0]) for im, p in zip(images, prompts)])


def by_prompt(values, prompts):
    """(N,) values of images -> (P,) their mean per prompt, prompts in first-seen order."""
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return torch.stack([values[idx].mean() for idx in groups.values()])


def bootstrap(per_prompt, resamples=2000, seed=0):
    """95% percentile interval of the mean of (P,) per-prompt values, resampling prompts with replacement."""
    g = torch.Generator().manual_seed(seed)
    draws = per_prompt[torch.randint(0, len(per_prompt), (resamples, len(per_prompt)), generator=g)].mean(dim=1)
    return [draws.quantile(0.025).item(), draws.quantile(0.975).item()]


def winrate(a, b, prompts):
    """A's win rate over B per prompt: for each prompt, the share of its images (image j of A against image j of B)
    where A scores higher, ties half; then the mean over prompts, with a bootstrap 95% interval over prompts."""
    share = by_prompt((a > b).double() + 0.5 * (a == b).double(), prompts)
    return {"winrate": share.mean().item(), "ci95": bootstrap(share), "prompts": len(share), "images": len(a)}


def compare(scores, prompts):
    """{folder: (N,) scores} -> the mean score of each folder (per prompt, then over prompts) with its interval, and
    the win rate of every folder over every other."""
    means = {}
    for folder, s in scores.items():
        per_prompt = by_prompt(s.double(), prompts)
        means[folder] = {"mean": per_prompt.mean().item(), "ci95": bootstrap(per_prompt)}
    winrates = {a: {b: winrate(scores[a], scores[b], prompts) for b in scores if b != a} for a in scores}
    return {"means": means, "winrates": winrates}


def markdown(report):
    """The report as Markdown tables: each scorer's mean scores, then its matrix of win rates (row over column)."""
    folders, lines = report["folders"], []
    for name, result in report["scorers"].items():
        lines += [f"**{name}** ({report['prompts']} prompts, {report['images']} images per folder)", "",
                  "| folder | mean | 95% CI |" + "".join(f" vs {os.path.basename(f.rstrip('/'))} |" for f in folders),
                  "| --- | --- | --- |" + " --- |" * len(folders)]
        for a in folders:
            m = result["means"][a]
            cells = ["" if a == b else f"{100 * result['winrates'][a][b]['winrate']:.1f}%" for b in folders]
            lines.append(f"| {a} | {m['mean']:.4g} | {m['ci95'][0]:.4g}-{m['ci95'][1]:.4g} | " + " | ".join(cells)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def score_folder(scorer, folder, pairs, batch_size):
    from PIL import Image

    scores = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        images = [Image.open(os.path.join(folder, name)).convert("RGB") for name, _ in chunk]
        scores.append(scorer(images, [prompt for _, prompt in chunk]))
    return torch.cat(scores)


def html_report(report, scores, pairs, path, top=4, thumb=256):
    """One self-contained HTML page: each scorer's tables; for each pair of folders, the prompts where their scores
    differ most, side by side with the images (embedded JPEG thumbnails) and scores; a histogram (SVG) of the
    per-prompt score differences. scores: {scorer: {folder: (N,) scores}} in the order of pairs."""
    import base64
    import html
    import io

    from PIL import Image

    def image_tag(folder, name, score):
        image = Image.open(os.path.join(folder, name)).convert("RGB")
        image.thumbnail((thumb, thumb))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = base64.b64encode(buffer.getvalue()).decode()
        return f'<figure><img src="data:image/jpeg;base64,{data}" alt="{html.escape(name)}"><figcaption>' \
               f'{score:.4g}</figcaption></figure>'

    def histogram(diffs, width=360, height=120, bins=20):
        lo, hi = min(diffs.min().item(), -1e-12), max(diffs.max().item(), 1e-12)
        counts = torch.histc(diffs.float(), bins=bins, min=lo, max=hi)
        bar = width / bins
        rects = "".join(f'<rect x="{i * bar:.1f}" y="{height - height * c / counts.max():.1f}" width="{bar - 1:.1f}" '
                        f'height="{height * c / counts.max():.1f}"/>' for i, c in enumerate(counts.tolist()))
        zero = width * (0 - lo) / (hi - lo)
        return (f'<svg width="{width}" height="{height + 16}" class="hist">{rects}<line x1="{zero:.1f}" '
                f'x2="{zero:.1f}" y1="0" y2="{height}"/><text x="0" y="{height + 14}">{lo:.3g}</text>'
                f'<text x="{width - 40}" y="{height + 14}">{hi:.3g}</text></svg>')

    def label(folder):  # the folder's own name, its path on hover
        return f'<span title="{html.escape(folder)}">{html.escape(os.path.basename(folder.rstrip("/")))}</span>'

    prompts = [p for _, p in pairs]
    order = list(dict.fromkeys(prompts))
    rows = {p: [i for i, q in enumerate(prompts) if q == p] for p in order}
    body = [f"<h1>{len(report['folders'])} folders, {report['prompts']} prompts, {report['images']} images each</h1>",
            f"<p>protocol: {html.escape(json.dumps(report['protocol']))}</p>"]
    for name, result in report["scorers"].items():
        folders = report["folders"]
        head = "".join(f"<th>vs {label(b)}</th>" for b in folders)
        lines = ""
        for a in folders:
            mean, (lo, hi) = result["means"][a]["mean"], result["means"][a]["ci95"]
            wins = "".join("<td></td>" if a == b else f"<td>{100 * result['winrates'][a][b]['winrate']:.1f}%</td>"
                           for b in folders)
            lines += f"<tr><td>{label(a)}</td><td>{mean:.4g}</td><td>{lo:.4g}-{hi:.4g}</td>{wins}</tr>"
        body.append(f"<h2>{html.escape(name)}</h2><table><tr><th>folder</th><th>mean</th><th>95% CI</th>{head}</tr>"
                    f"{lines}</table><p>vs: the row's win rate over the column's, per prompt (ties half)</p>")
        for ia, a in enumerate(folders):
            for b in folders[ia + 1:]:
                diff = scores[name][a].double() - scores[name][b].double()
                per_prompt = torch.stack([diff[rows[p]].mean() for p in order])
                body.append(f"<h3>{label(a)} against {label(b)}: per-prompt score difference</h3>"
                            + histogram(per_prompt))
                for k in per_prompt.abs().argsort(descending=True)[:top].tolist():
                    p, idx = order[k], rows[order[k]]
                    cells = "".join(f'<div class="side"><b>{label(f)}</b><br>' + "".join(
                        image_tag(f, pairs[i][0], scores[name][f][i].item()) for i in idx) + "</div>" for f in (a, b))
                    body.append(f'<div class="pair"><p>{html.escape(p)} (difference {per_prompt[k].item():+.4g})</p>'
                                f"{cells}</div>")
    page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>evaluation</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px}figure{display:inline-block;margin:4px}.side{display:inline-block;vertical-align:top;"
            "margin-right:2em}.hist rect{fill:#4a7}.hist line{stroke:#c33}</style></head><body>" + "".join(body)
            + "<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded=[...document.images]"
            ".filter(i=>i.complete&&i.naturalWidth>0).length})</script></body></html>")
    with open(path + ".tmp", "w") as f:
        f.write(page)
    os.replace(path + ".tmp", path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="sample.py folders, same prompts and seeds (two or more; the first is "
                   "A of the printed lines)")
    p.add_argument("--scorers", default="pickscore", help="comma-separated, or all: pickscore, clip (CLIP score), "
                   "aesthetic (LAION v2), hpsv2 (needs the hpsv2 package) (default: %(default)s)")
    p.add_argument("--clip-model", default=CLIP, help="CLIP for CLIP score and the aesthetic head (dir or hub id)")
    p.add_argument("--aesthetic-head", default=AESTHETIC, help="the aesthetic MLP's .pth (path or URL; the default is "
                   "checked by SHA-256)")
    p.add_argument("--pickscore-model", default=PICKSCORE, help="PickScore model (dir or hub id)")
    p.add_argument("--pickscore-processor", default=PICKSCORE_PROCESSOR, help="its CLIP processor (dir or hub id)")
    p.add_argument("--batch-size", type=int, default=16, help="images scored at once")
    p.add_argument("--allow-protocol-mismatch", action="store_true", help="compare folders sampled under different "
                   "protocols (sample.py --protocol)")
    p.add_argument("--out", default="report.json", help="JSON report (written only when everything succeeded)")
    p.add_argument("--markdown", help="also write the tables as Markdown here")
    p.add_argument("--html", metavar="DIR", help="also write a page to look at, DIR/index.html (self-contained)")
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
        if (scorer := hpsv2_scorer()) is None:
            raise ImportError("the hpsv2 package is not installed")
        return scorer
    raise ValueError(f"no scorer {name!r}; the scorers: {', '.join(SCORERS)}")


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = args.folders
    try:
        if len(folders) < 2:
            raise ValueError("give two or more folders to compare")
        pairs = pair_up(folders, args.allow_protocol_mismatch)
    except ValueError as e:
        sys.exit(f"error: {e}")
    scorers = {}
    for name in SCORERS if args.scorers == "all" else args.scorers.split(","):
        try:
            scorers[name] = load_scorer(name, args, device)
        except Exception as e:  # any failure to load a scorer is the user's to fix: say which and why
            where = f" ({args.pickscore_model} / {args.pickscore_processor})" if name == "pickscore" else ""
            sys.exit(f"error: cannot load the {name} scorer{where}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}")
    prompts = [prompt for _, prompt in pairs]
    report = {"folders": folders, "prompts": len(set(prompts)), "images": len(pairs),
              "protocol": read_index(folders[0])[1], "scorers": {}}
    all_scores = {}
    for name, scorer in scorers.items():
        all_scores[name] = scores = {folder: score_folder(scorer, folder, pairs, args.batch_size) for folder in folders}
        report["scorers"][name] = result = compare(scores, prompts)
        a = folders[0]
        for b in folders[1:]:
            w = result["winrates"][a][b]
            print(f"{name}: {a} wins {100 * w['winrate']:.1f}% of {w['prompts']} prompts over {b} "
                  f"(95% CI {100 * w['ci95'][0]:.1f}-{100 * w['ci95'][1]:.1f}); mean {result['means'][a]['mean']:.4g}"
                  f" against {result['means'][b]['mean']:.4g}")
    table = markdown(report)
    print(table)
    for path, text in ((args.out, json.dumps(report, indent=1)), (args.markdown, table)):
        if path:
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
    if args.html:
        os.makedirs(args.html, exist_ok=True)
        html_report(report, all_scores, pairs, os.path.join(args.html, "index.html"))
        print(f"page: {os.path.join(args.html, 'index.html')}")


if __name__ == "__main__":
    main(parse_args())
