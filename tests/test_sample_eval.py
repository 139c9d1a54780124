"""sample.py as a command and evaluate.py: paired, deterministic, resumable images; win rates."""

import json
import os

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
    assert [i["prompt"] for i in index["images"]] == prompts and index["guidance_scale"] == 7.5
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
    (tmp_path / "server.tsv").write_bytes(published)
    spec = {"url": (tmp_path / "server.tsv").as_uri(), "sha256": hashlib.sha256(published).hexdigest(),
            "file": "set.tsv"}
    monkeypatch.setitem(sample.PROMPT_SETS, "myset", spec)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert sample.read_prompts("myset") == ["A bear", "A red cube"]
    (tmp_path / "server.tsv").write_bytes(b"Prompt\nsomething else\n")  # the cached copy is what is read
    assert sample.read_prompts("myset") == ["A bear", "A red cube"]
    cached = tmp_path / "home" / "ncp" / "prompts" / "set.tsv"
    cached.write_bytes(b"Prompt\nA bear\n")  # edited or truncated: refused
    with pytest.raises(ValueError, match="is not the published myset"):
        sample.read_prompts("myset")
    cached.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in .* and HF_HUB_OFFLINE=1"):
        sample.read_prompts("myset")
    assert sample.PROMPT_SETS["partiprompts"]["url"].endswith("PartiPrompts.tsv")


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


def make_folder(folder, prompts, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        image.save(os.path.join(folder, sample.image_name(i, 0)))
    items = [{"index": i, "prompt": p, "seed": i, "files": [sample.image_name(i, 0)]} for i, p in enumerate(prompts)]
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump({"images": items}, f)


def evaluate_main(a, b, scorer, out):
    evaluate.main(evaluate.parse_args([str(a), str(b), "--pickscore-model", scorer, "--pickscore-processor", scorer,
                                       "--out", str(out)]))
    return json.load(open(out))


def test_winrate_against_itself_is_half_and_a_better_folder_wins(tmp_path, scorer_dir):
    g = torch.Generator().manual_seed(0)
    prompts = [f"prompt {c}" for c in "abcdefghij"]
    candidates = [[Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]
                  for _ in prompts]
    scorer = evaluate.PickScore(scorer_dir, scorer_dir)
    make_folder(tmp_path / "first", prompts, [c[0] for c in candidates])
    report = evaluate_main(tmp_path / "first", tmp_path / "first", scorer_dir, tmp_path / "self.json")
    assert report["pickscore_winrate"] == 0.5 and report["pairs"] == 10
    lo, hi = report["pickscore_winrate_ci95"]
    assert lo < 0.5 < hi
    # Put the higher-scoring candidate of each prompt in "better", the other in "worse".
    s = torch.stack([scorer([c[0], c[1]], [p, p]) for c, p in zip(candidates, prompts)])
    assert (s[:, 0] != s[:, 1]).all()
    make_folder(tmp_path / "better", prompts, [c[int(s[i, 1] > s[i, 0])] for i, c in enumerate(candidates)])
    make_folder(tmp_path / "worse", prompts, [c[int(s[i, 1] <= s[i, 0])] for i, c in enumerate(candidates)])
    report = evaluate_main(tmp_path / "better", tmp_path / "worse", scorer_dir, tmp_path / "r.json")
    assert report["pickscore_winrate"] == 1.0 and report["pickscore_mean_a"] > report["pickscore_mean_b"]
    assert evaluate.winrate(torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0, 1.0]))["winrate"] == 0.625


def test_evaluate_bad_input(tmp_path, scorer_dir):
    image = Image.new("RGB", (32, 32))
    make_folder(tmp_path / "a", ["x", "y"], [image, image])
    make_folder(tmp_path / "b", ["x", "z"], [image, image])
    for a, b, scorer, message in [(tmp_path / "a", tmp_path / "b", scorer_dir, "do not pair up"),
                                  (tmp_path / "a", tmp_path / "none", scorer_dir, "has no index.json"),
                                  (tmp_path / "a", tmp_path / "a", str(tmp_path / "no-scorer"), "cannot load the PickScore")]:
        with pytest.raises(SystemExit) as e:
            evaluate_main(a, b, scorer, tmp_path / "report.json")
        assert message in str(e.value.code)
        assert not os.path.exists(tmp_path / "report.json")
    os.remove(tmp_path / "a" / sample.image_name(1, 0))
    with pytest.raises(SystemExit, match="lacks 1 of its images"):
        evaluate_main(tmp_path / "a", tmp_path / "a", scorer_dir, tmp_path / "report.json")


def test_torchrun_shards_prompts_and_matches_one_process(tmp_path, prompts):
    import subprocess
    import sys

    from helpers import ROOT, env

    run_sample(tmp_path, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "sample.py"), "--model", "tiny", "--prompts", str(tmp_path / "prompts.txt"),
           "--out", str(tmp_path / "two"), "--steps", "2"]
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.load(open(tmp_path / "two" / "index.json"))["images"] == json.load(open(tmp_path / "one" / "index.json"))["images"]
    for i in range(len(prompts)):  # same seeds; only the thread count differs, which may move a pixel by a level or two
        diff = pixels(tmp_path / "one", sample.image_name(i, 0)) - pixels(tmp_path / "two", sample.image_name(i, 0))
        assert diff.abs().max() <= 3 and diff.abs().mean() < 0.1
