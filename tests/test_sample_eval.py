"""sample.py as a command and evaluate.py: paired, deterministic, resumable images; win rates."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample


def run_sample(tmp_path, out, *extra):
    sample.main(sample.parse_args(["--model", "tiny", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
                                   "--steps", "2", *extra]))


@pytest.fixture()
def prompts(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\na green circle\n")
    return ["a red circle", "a blue square", "a green circle"]


@pytest.fixture()
def lora_dir(tmp_path):
    unet = sample.build_tiny().unet
    g = torch.Generator().manual_seed(0)
    for p in sample.add_lora(unet, rank=4).values():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    sample.save_lora(unet, str(tmp_path / "lora"))
    return str(tmp_path / "lora")


def pixels(folder, name):
    return torch.tensor(list(Image.open(os.path.join(folder, name)).getdata()), dtype=torch.float32)


def test_paired_deterministic_images_lora_changes_them_and_resume_skips(tmp_path, prompts, lora_dir):
    run_sample(tmp_path, tmp_path / "a", "--num-images-per-prompt", "2")
    run_sample(tmp_path, tmp_path / "b", "--num-images-per-prompt", "2")
    run_sample(tmp_path, tmp_path / "lora_out", "--num-images-per-prompt", "2", "--lora", lora_dir)
    index = json.load(open(tmp_path / "a" / "index.json"))
    assert [i["prompt"] for i in index["images"]] == prompts and index["protocol"]["guidance_scale"] == 7.5
    names = [n for item in index["images"] for n in item["files"]]
    assert names == ["00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png", "00002_0.png", "00002_1.png"]
    assert os.path.isfile(tmp_path / "a" / "grid.png")
    for n in names:
        assert torch.equal(pixels(tmp_path / "a", n), pixels(tmp_path / "b", n))  # same seed, same image
    assert not torch.equal(pixels(tmp_path / "a", names[0]), pixels(tmp_path / "a", names[2]))
    assert any(not torch.equal(pixels(tmp_path / "a", n), pixels(tmp_path / "lora_out", n)) for n in names)
    mtime = os.path.getmtime(tmp_path / "a" / names[0])
    os.remove(tmp_path / "a" / names[3])
    run_sample(tmp_path, tmp_path / "a", "--num-images-per-prompt", "2")
    assert os.path.getmtime(tmp_path / "a" / names[0]) == mtime  # finished prompts are skipped
    assert torch.equal(pixels(tmp_path / "a", names[3]), pixels(tmp_path / "b", names[3]))

    # A folder never describes images it does not hold: another model, LoRA, scale or seed over it is refused, and
    # the folder's images and index.json stay as they were (issue 37: the LoRA's name over the base's images).
    index = (tmp_path / "a" / "index.json").read_text()
    for extra, change in ((["--lora", lora_dir], "lora None -> "), (["--seed", "3"], "seed 0 -> 3"),
                          (["--steps", "3"], "'steps': 3")):
        with pytest.raises(SystemExit) as e:
            run_sample(tmp_path, tmp_path / "a", "--num-images-per-prompt", "2", *extra)
        assert "holds images made by another command" in str(e.value.code) and change in str(e.value.code)
        assert (tmp_path / "a" / "index.json").read_text() == index
        assert torch.equal(pixels(tmp_path / "a", names[0]), pixels(tmp_path / "b", names[0]))


def test_prompt_sources(tmp_path):
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\nA cat\tAnimals\nA dog\tAnimals\n")
    assert sample.read_prompts(str(tmp_path / "parti.tsv")) == ["A cat", "A dog"]
    import data

    src = data.write_synthetic(str(tmp_path / "pickapic"), n=12, split="validation_unique")
    got = sample.read_prompts("validation_unique", src)
    assert got and len(got) == len(set(got)) and all(p.startswith("a ") for p in got)


def test_named_prompt_sets_are_fetched_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    published = "Prompt\tCategory\nA bear\tAnimals\nA red cube\tShapes\n".encode()
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "set.tsv").write_bytes(published)
    spec = [("file://" + str(tmp_path / "server" / "set.tsv"), hashlib.sha256(published).hexdigest())]
    monkeypatch.setitem(sample.PROMPT_SETS, "myset", spec)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert sample.read_prompts("myset") == ["A bear", "A red cube"]
    (tmp_path / "server" / "set.tsv").write_bytes(b"Prompt\nsomething else\n")  # the cached copy is what is read
    assert sample.read_prompts("myset") == ["A bear", "A red cube"]
    cached = tmp_path / "home" / "ncp" / "prompts" / "set.tsv"
    cached.write_bytes(b"Prompt\nA bear\n")  # edited or truncated: refused
    with pytest.raises(ValueError, match="is not the published prompt set myset"):
        sample.read_prompts("myset")
    cached.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in .* and HF_HUB_OFFLINE=1"):
        sample.read_prompts("myset")
    assert sample.PROMPT_SETS["partiprompts"][0][0].endswith("PartiPrompts.tsv")


def test_hps_benchmark_prompts_are_its_four_style_files_in_order(tmp_path, monkeypatch):
    """`--prompts hps`: HPSv2's four JSON lists of 800 prompts each, in hpsv2's style order; hps-STYLE one of them.
    With no SHA-256 to check them by, a file of another size is refused."""
    assert [url.rsplit("/", 2)[1:] for url, _ in sample.PROMPT_SETS["hps"]] == \
        [["benchmark", f"{s}.json"] for s in sample.HPS_STYLES]
    (tmp_path / "server").mkdir()
    sets = {}
    for style in sample.HPS_STYLES:
        (tmp_path / "server" / f"{style}.json").write_text(json.dumps([f"{style} {i} " for i in range(800)]))
        sets[style] = ("file://" + str(tmp_path / "server" / f"{style}.json"), None)
    monkeypatch.setitem(sample.PROMPT_SETS, "hps", [sets[s] for s in sample.HPS_STYLES])
    monkeypatch.setitem(sample.PROMPT_SETS, "hps-paintings", [sets["paintings"]])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    got = sample.read_prompts("hps")
    assert len(got) == 3200 and got[0] == "anime 0" and got[800] == "concept-art 0" and got[-1] == "photo 799"
    assert sample.read_prompts("hps-paintings") == [f"paintings {i}" for i in range(800)]
    (tmp_path / "home" / "ncp" / "prompts" / "photo.json").write_text(json.dumps(["one", "two"]))  # truncated copy
    with pytest.raises(ValueError, match=r"hps has \[800, 800, 800, 2\] prompts, not \[800, 800, 800, 800\]"):
        sample.read_prompts("hps")
    (tmp_path / "bad.json").write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match="not a JSON list of prompts"):
        sample.read_prompts(str(tmp_path / "bad.json"))


def test_split_prompts_from_other_formats(tmp_path):
    from test_formats import write_hpdv3

    got = sample.read_prompts("train", write_hpdv3(tmp_path / "v3"))
    assert got == ["p0", "p2", "p3", "p4", "p6"]  # every comparison's caption, in order, each once


def test_bad_sampling_input_fails_cleanly(tmp_path, prompts):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "nolora").mkdir()
    for argv, message in [(["--prompts", str(tmp_path / "empty.txt")], "no prompts"),
                          (["--prompts", str(tmp_path / "prompts.txt"), "--lora", str(tmp_path / "nolora")], "holds no"),
                          (["--prompts", str(tmp_path / "bad.tsv")], "")]:
        if argv[1].endswith("bad.tsv"):
            (tmp_path / "bad.tsv").write_text("Text\nx\n")
            message = "no Prompt column"
        with pytest.raises(SystemExit) as e:
            sample.main(sample.parse_args(["--model", "tiny", "--out", str(tmp_path / "o"), *argv]))
        assert message in str(e.value.code)
        assert not os.path.exists(tmp_path / "o")  # nothing half-written


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sdxl_pipeline_dir_whose_vae_asks_for_upcast_samples_in_half_precision(tmp_path, prompts, precision):
    """A local SDXL pipeline with the original VAE (force_upcast): kept fp32 for training, upcast by the pipeline."""
    models = sample.build_tiny("sdxl")
    models.vae.register_to_config(force_upcast=True)
    pipe_dir = sample.save_pipeline(models, str(tmp_path / "sdxl"))
    assert sample.load_models(pipe_dir, torch.bfloat16).vae.dtype == torch.float32  # training: fp32 VAE
    sample.main(sample.parse_args(["--model", pipe_dir, "--prompts", str(tmp_path / "prompts.txt"), "--out",
                                   str(tmp_path / "o"), "--steps", "2", "--resolution", "32", "--precision", precision]))
    assert len([n for n in os.listdir(tmp_path / "o") if n.endswith("_0.png")]) == 3


def test_a_lora_of_another_model_is_one_clear_line(tmp_path, prompts, lora_dir):
    with pytest.raises(SystemExit) as e:  # lora_dir was trained on tiny (SD1.5-like); tiny-sdxl's shapes differ
        sample.main(sample.parse_args(["--model", "tiny-sdxl", "--prompts", str(tmp_path / "prompts.txt"), "--out",
                                       str(tmp_path / "o"), "--lora", lora_dir]))
    message = str(e.value.code)
    assert message.startswith("error: the LoRA in") and "does not fit" in message and "\n" not in message


# -----------------------------------------------------------------------------
# evaluate.py


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    """A tiny random CLIP model and processor saved as a PickScore stand-in."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = tmp_path_factory.mktemp("scorer")
    tokenizer = sample._tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=len(tokenizer), max_position_embeddings=16,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(out)
    return str(out)


def make_folder(folder, prompts, images, per_prompt=1, protocol=None):
    """A sample.py-layout folder: images[per_prompt * i + j] is image j of prompt i."""
    os.makedirs(folder, exist_ok=True)
    for n, image in enumerate(images):
        image.save(os.path.join(folder, sample.image_name(n // per_prompt, n % per_prompt)))
    items = [{"index": i, "prompt": p, "files": [sample.image_name(i, j) for j in range(per_prompt)]}
             for i, p in enumerate(prompts)]
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump({"images": items, "protocol": protocol or sample.PROTOCOLS["ncp"]}, f)


def evaluate_main(*folders, scorer, out, extra=()):
    evaluate.main(evaluate.parse_args([*map(str, folders), "--pickscore-model", scorer, "--pickscore-processor",
                                       scorer, "--out", str(out), *extra]))
    return json.load(open(out))


def pickscore(report, a, b):
    return report["scorers"]["pickscore"]["winrates"][str(a)][str(b)]


def test_winrate_against_itself_is_half_and_a_better_folder_wins(tmp_path, scorer_dir):
    g = torch.Generator().manual_seed(0)
    prompts = [f"prompt {c}" for c in "abcdefghij"]
    candidates = [[Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]
                  for _ in prompts]
    scorer = evaluate.PickScore(scorer_dir, scorer_dir)
    make_folder(tmp_path / "first", prompts, [c[0] for c in candidates])
    make_folder(tmp_path / "copy", prompts, [c[0] for c in candidates])
    report = evaluate_main(tmp_path / "first", tmp_path / "copy", scorer=scorer_dir, out=tmp_path / "self.json")
    w = pickscore(report, tmp_path / "first", tmp_path / "copy")
    assert w["winrate"] == 0.5 and w["ci95"] == [0.5, 0.5] and report["prompts"] == 10  # every pair a tie
    # Put the higher-scoring candidate of each prompt in "better", the other in "worse".
    s = torch.stack([scorer([c[0], c[1]], [p, p]) for c, p in zip(candidates, prompts)])
    assert (s[:, 0] != s[:, 1]).all()
    worse = tmp_path / "wo|rse"  # a | in a folder name is escaped in the Markdown table
    make_folder(tmp_path / "better", prompts, [c[int(s[i, 1] > s[i, 0])] for i, c in enumerate(candidates)])
    make_folder(worse, prompts, [c[int(s[i, 1] <= s[i, 0])] for i, c in enumerate(candidates)])
    report = evaluate_main(tmp_path / "better", worse, tmp_path / "first", scorer=scorer_dir,
                           out=tmp_path / "r.json", extra=["--markdown", str(tmp_path / "r.md")])
    means = report["scorers"]["pickscore"]["means"]
    assert pickscore(report, tmp_path / "better", worse)["winrate"] == 1.0
    assert pickscore(report, worse, tmp_path / "better")["winrate"] == 0.0
    assert means[str(tmp_path / "better")]["mean"] > means[str(worse)]["mean"]
    w = pickscore(report, tmp_path / "better", tmp_path / "first")  # the matrix: every folder against every other
    assert 0.5 <= w["winrate"] <= 1.0 and w["ci95"][0] <= w["winrate"] <= w["ci95"][1]
    table = (tmp_path / "r.md").read_text()
    assert "| vs better | vs wo\\|rse | vs first |" in table and "100.0%" in table and table.count("\n|") == 5
    rows = [re.split(r"(?<!\\)\|", line) for line in table.splitlines() if line.startswith("|")]
    assert len({len(r) for r in rows}) == 1  # every row has the header's cells


def test_win_rate_is_counted_per_prompt():
    # Prompt p0 has 2 images: A wins one, ties the other (0.75); p1 has 2: A loses both (0); p2 one win (1).
    a, b = torch.tensor([2.0, 1.0, 0.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, 3.0, 4.0])
    w = evaluate.winrate(a, b, ["p0", "p0", "p1", "p1", "p2"])
    assert w["winrate"] == pytest.approx((0.75 + 0 + 1) / 3) and w["prompts"] == 3 and w["images"] == 5
    assert evaluate.winrate(a, b, ["p0", "p1", "p2", "p3", "p4"])["winrate"] == pytest.approx(2.5 / 5)  # per image
    lo, hi = w["ci95"]
    assert 0 <= lo < w["winrate"] < hi <= 1


def test_folders_of_other_protocols_are_refused(tmp_path, scorer_dir):
    image = Image.new("RGB", (32, 32))
    make_folder(tmp_path / "a", ["x", "y"], [image] * 2)
    make_folder(tmp_path / "b", ["x", "y"], [image] * 8, per_prompt=4, protocol=sample.PROTOCOLS["spo"])
    with pytest.raises(SystemExit, match="different protocols"):
        evaluate_main(tmp_path / "a", tmp_path / "b", scorer=scorer_dir, out=tmp_path / "r.json")
    make_folder(tmp_path / "c", ["x", "y"], [image] * 2, protocol={**sample.PROTOCOLS["ncp"], "steps": 20})
    with pytest.raises(SystemExit, match="different protocols"):
        evaluate_main(tmp_path / "a", tmp_path / "c", scorer=scorer_dir, out=tmp_path / "r.json")
    report = evaluate_main(tmp_path / "a", tmp_path / "c", scorer=scorer_dir, out=tmp_path / "r.json",
                           extra=["--allow-protocol-mismatch"])
    assert pickscore(report, tmp_path / "a", tmp_path / "c")["winrate"] == 0.5


@pytest.mark.numerics
def test_batched_sampling_draws_the_same_noise_and_the_same_images_to_a_level(tmp_path, prompts):
    """What --batch-size keeps: each image's own seed, hence its initial noise and its sampler noise (one generator
    per image), exactly; and its pixels to within one level of 255. Not bit for bit: a batch of another size runs
    other fp32 kernels (another blocking, another summation order), and the 8-bit image shows that as a level here
    and there. benchmarks/kernel_spread.py measured at most one level, on at most 0.0073% of the pixels (7 of 40
    images touched), over batch sizes 1, 3 and 4 on AVX2 and SSE4.1 kernels; 0.1% holds that with room, and a real
    dependence on the batch (another image's noise, a wrong order) moves most pixels by many levels."""
    (tmp_path / "five.txt").write_text("a red circle\na blue square\na green circle\na yellow square\na red one\n")
    for batch in ("1", "3"):
        sample.main(sample.parse_args(["--model", "tiny", "--prompts", str(tmp_path / "five.txt"), "--out",
                                       str(tmp_path / batch), "--steps", "3", "--num-images-per-prompt", "2",
                                       "--batch-size", batch, "--protocol", "spo"]))
    one, three = (json.load(open(tmp_path / b / "index.json")) for b in ("1", "3"))
    assert [i["seeds"] for i in one["images"]] == [i["seeds"] for i in three["images"]]
    names = [sample.image_name(i, j) for i in range(5) for j in range(2)]
    diffs = [np.abs(np.asarray(Image.open(tmp_path / "1" / n), dtype=np.int16)
                    - np.asarray(Image.open(tmp_path / "3" / n), dtype=np.int16)) for n in names]
    assert max(d.max() for d in diffs) <= 1 and np.mean([(d > 0).mean() for d in diffs]) < 1e-3
    first, second = (np.asarray(Image.open(tmp_path / "1" / n), dtype=np.int16) for n in names[:2])
    assert np.abs(first - second).mean() > 5  # two seeds of one prompt: other images, by far more than a level
    assert three["protocol"] == {"scheduler": "ddim", "steps": 3, "guidance_scale": 5.0, "images_per_prompt": 2,
                                 "name": "spo, changed"}


def test_evaluate_bad_input(tmp_path, scorer_dir):
    image = Image.new("RGB", (32, 32))
    make_folder(tmp_path / "a", ["x", "y"], [image, image])
    make_folder(tmp_path / "b", ["x", "z"], [image, image])
    make_folder(tmp_path / "c", ["x", "y"], [image, image])
    for a, b, scorer, message in [(tmp_path / "a", tmp_path / "b", scorer_dir, "do not pair up"),
                                  (tmp_path / "a", tmp_path / "none", scorer_dir, "has no index.json"),
                                  (tmp_path / "a", tmp_path / "c", str(tmp_path / "no-scorer"),
                                   "cannot load the pickscore scorer")]:
        with pytest.raises(SystemExit) as e:
            evaluate_main(a, b, scorer=scorer, out=tmp_path / "report.json")
        assert message in str(e.value.code)
        assert not os.path.exists(tmp_path / "report.json")
    os.remove(tmp_path / "a" / sample.image_name(1, 0))
    with pytest.raises(SystemExit, match="lacks 1 of its images"):
        evaluate_main(tmp_path / "a", tmp_path / "c", scorer=scorer_dir, out=tmp_path / "report.json")


def test_torchrun_shards_prompts_and_matches_one_process(tmp_path, prompts):
    import subprocess
    import sys

    import launch
    from helpers import ROOT, env

    run_sample(tmp_path, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "sample.py"), "--model", "tiny", "--prompts", str(tmp_path / "prompts.txt"),
           "--out", str(tmp_path / "two"), "--steps", "2"]
    cmd, environ = launch.for_torchrun(cmd, env())
    proc = subprocess.run(cmd, env=environ, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.load(open(tmp_path / "two" / "index.json"))["images"] == json.load(open(tmp_path / "one" / "index.json"))["images"]
    for i in range(len(prompts)):  # same seeds; only the thread count differs, which may move a pixel by a level or two
        diff = pixels(tmp_path / "one", sample.image_name(i, 0)) - pixels(tmp_path / "two", sample.image_name(i, 0))
        assert diff.abs().max() <= 3 and diff.abs().mean() < 0.1


def test_html_report_gives_the_verdict_first_and_fits_a_laptop_screen_in_a_browser(tmp_path, scorer_dir):
    import html
    import shutil
    import subprocess

    g = torch.Generator().manual_seed(1)
    prompts = ["a cat", "a dog", "a cube"]
    long = "ncp-dpo-sdxl-absolute-winners-beta5000-lr1e-8-step2000"  # a folder name as runs name them
    folders = [tmp_path / name for name in (long, "base", "dpo")]
    for folder in folders:  # 4 images a prompt, larger than a thumbnail
        make_folder(folder, prompts, [Image.fromarray((torch.rand(200, 200, 3, generator=g) * 255).byte().numpy())
                                      for _ in range(4 * len(prompts))], per_prompt=4)
    evaluate_main(*folders, scorer=scorer_dir, out=tmp_path / "r.json", extra=["--html", str(tmp_path / "page")])
    page = (tmp_path / "page" / "index.html").read_text()
    report = json.load(open(tmp_path / "r.json"))
    first, base = str(folders[0]), str(folders[1])
    assert page.index("<h1>") < page.index('<div id="verdict">') < page.index('id="ranking"')
    name = {str(f): f.name for f in folders}.get
    for b in folders[1:]:  # the verdict says the first folder against each other, as the title does
        sentence = evaluate.verdict(report, "pickscore", first, str(b), name)
        assert html.escape(sentence) in page and sentence.startswith(long + " ")
    w = report["scorers"]["pickscore"]["winrates"][first][base]
    d = report["scorers"]["pickscore"]["differences"][first][base]
    assert d["mean"] == pytest.approx(report["scorers"]["pickscore"]["means"][first]["mean"]
                                      - report["scorers"]["pickscore"]["means"][base]["mean"], abs=1e-9)
    summary = re.search(r'<svg class="summary".*?</svg>', page).group(0)  # the first's win rate over the others
    assert summary.count("<circle") == 2 and f"win rate of {long}" in summary
    assert f"<title>{100 * w['winrate']:.1f}% ({100 * w['ci95'][0]:.1f}-{100 * w['ci95'][1]:.1f}%)</title>" in summary
    ranking = re.search(r'<table class="ranking">.*?</table>', page).group(0)
    means = report["scorers"]["pickscore"]["means"]
    ranked = sorted(folders, key=lambda f: -means[str(f)]["mean"])
    assert [ranking.index(f'title="{f}"') for f in ranked] == sorted(ranking.index(f'title="{f}"') for f in ranked)
    # one gallery (3 prompts x 3 folders x 4 thumbnails), thumbnails linking to the full images in their folders
    assert page.count('<img class="zoom"') == 36 and page.count('<svg class="hist"') == 2
    links = re.findall(r'<a href="([^"]+)"><img class="zoom"', page)
    assert len(links) == 36 and all((tmp_path / "page" / link).resolve().is_file() for link in links)
    assert 'title="dpo: a cube (PickScore ' in page and "<td>scheduler</td><td>euler</td>" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium to render the page in (.ci/run installs Debian's chromium)")
    run = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--window-size=1366,768"]
    url = (tmp_path / "page" / "index.html").as_uri()
    dom = subprocess.run(run + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    body = {k: int(v) for k, v in re.findall(r'data-([a-z-]+)="(\d+)"', dom.split("<body", 1)[1].split(">", 1)[0])}
    assert body["images-loaded"] == 36  # every thumbnail decoded by the browser
    assert body["verdict-bottom"] <= 768  # the first screen of a 1366 x 768 laptop holds the verdict
    assert body["widest-row"] <= 1366 and body["page-width"] <= 1366  # a prompt's 12 images in one row, no scrolling
    assert body["clipped-labels"] == 0  # every chart label inside its chart, the long folder name too
    subprocess.run(run + [f"--screenshot={tmp_path / 'shot.png'}", url], capture_output=True, timeout=120)
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("L"))
    assert shot.shape == (768, 1366) and shot.std() > 10  # not a blank page


def test_clip_score_and_aesthetic_match_their_formulas(tmp_path, scorer_dir):
    """CLIP score = max(100 cos, 0) and the aesthetic head on the unit image embedding, each against the CLIP
    model's own forward as the oracle; the head loads strictly from a state dict in the reference's layout."""
    from transformers import CLIPModel, CLIPProcessor

    g = torch.Generator().manual_seed(2)
    images = [Image.fromarray((torch.rand(40, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(3)]
    prompts = ["a cat", "a dog", "a red cube"]
    model, processor = CLIPModel.from_pretrained(scorer_dir).eval(), CLIPProcessor.from_pretrained(scorer_dir)
    with torch.no_grad():
        out = model(**processor(images=images, text=prompts, padding=True, return_tensors="pt"))
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert torch.allclose(evaluate.ClipScore(scorer_dir)(images, prompts), (100 * cos).clamp(min=0), atol=1e-4)

    dims = [(1024, 16), (128, 1024), (64, 128), (16, 64), (1, 16)]  # the reference's head, on a 16-d tiny CLIP
    state = {}
    for i, (o, n) in zip((0, 2, 4, 6, 7), dims):
        state[f"layers.{i}.weight"], state[f"layers.{i}.bias"] = torch.randn(o, n, generator=g) / n ** 0.5, torch.randn(o)
    torch.save(state, tmp_path / "head.pth")
    want = out.image_embeds  # unit, projected
    for i in (0, 2, 4, 6, 7):
        want = want @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    got = evaluate.Aesthetic(str(tmp_path / "head.pth"), scorer_dir, sha256=None)(images, prompts)
    assert torch.allclose(got, want.squeeze(-1), atol=1e-4)
    with pytest.raises(ValueError, match="is not the published aesthetic head"):
        evaluate.Aesthetic(str(tmp_path / "head.pth"), scorer_dir, sha256="0" * 64)


def test_every_scorer_here_rates_a_folder_against_itself_at_half(tmp_path, scorer_dir):
    g = torch.Generator().manual_seed(3)
    dims = [(1024, 16), (128, 1024), (64, 128), (16, 64), (1, 16)]
    torch.save({f"layers.{i}.{p}": torch.randn(o, n, generator=g) if p == "weight" else torch.randn(o, generator=g)
                for i, (o, n) in zip((0, 2, 4, 6, 7), dims) for p in ("weight", "bias")}, tmp_path / "head.pth")
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(4)]
    make_folder(tmp_path / "a", ["p", "q"], images, per_prompt=2)
    make_folder(tmp_path / "b", ["p", "q"], images, per_prompt=2)
    report = evaluate_main(tmp_path / "a", tmp_path / "b", scorer=scorer_dir, out=tmp_path / "r.json",
                           extra=["--scorers", "pickscore,clip,aesthetic", "--clip-model", scorer_dir,
                                  "--aesthetic-head", str(tmp_path / "head.pth")])
    for name in ("pickscore", "clip", "aesthetic"):
        assert report["scorers"][name]["winrates"][str(tmp_path / "a")][str(tmp_path / "b")]["winrate"] == 0.5
    with pytest.raises(SystemExit, match="cannot load the nope scorer"):
        evaluate_main(tmp_path / "a", tmp_path / "b", scorer=scorer_dir, out=tmp_path / "r.json",
                      extra=["--scorers", "nope"])


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, monkeypatch):
    """An image with more pixels than PIL decodes safely (a crafted header) was a traceback; now a ValueError
    naming the file, which main reports in one line."""
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels: past twice the limit, PIL refuses
    with pytest.raises(ValueError, match="big.png is too large to decode safely"):
        evaluate.open_image(str(tmp_path / "big.png"))
