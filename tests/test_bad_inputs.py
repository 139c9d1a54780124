"""Bad input, tried as a user would: each case is a command and how it must end. A one-line message naming what is
wrong, a non-zero exit, no traceback, no hang, and, for a fresh run, nothing left behind. The faults the README
promises to handle are here too (a truncated shard among good ones, a truncated tar, HPD JSON whose images are
missing, null image cells). Tiny models, one step at most; the hangs and checkpoints are in test_hardening.py."""

import json
import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
import run as run_py
import sample
import launch
from helpers import ROOT, env, lora, metrics, train
from test_formats import write_hpdv3, write_pickapic, write_webdataset
from test_sample_eval import make_folder, scorer_dir  # noqa: F401 (a fixture)


def truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def jsonl_with_a_bad_line(root):
    write_hpdv3(root)
    records = json.load(open(root / "train.json"))
    os.remove(root / "train.json")
    lines = [json.dumps(r) for r in records]
    lines[3] = '{"prompt": "a cut line", '
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")


def two_parquet_shards_one_truncated(root):
    write_pickapic(root)
    first = root / "data" / "train-00000-of-00002.parquet"
    os.rename(root / "data" / "train-00000-of-00001.parquet", first)
    shutil.copy(first, root / "data" / "train-00001-of-00002.parquet")
    truncate(root / "data" / "train-00001-of-00002.parquet", keep=0.9)


def null_images(root):
    os.makedirs(root / "data")
    n = 6
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(n)], "chosen": pa.array([None] * n, pa.binary()),
                             "rejected": pa.array([None] * n, pa.binary())}), root / "data" / "train-00000-of-00001.parquet")


def two_tars_one_truncated(root):
    write_webdataset(root, shards=2)
    truncate(root / "00001.tar")


def symlink_loops(root):
    """No data, but folders that lead back to themselves (the search for data once followed them forever)."""
    os.makedirs(root / "a")
    os.symlink("..", root / "a" / "up")
    os.symlink(".", root / "self")
    os.symlink(os.path.join("..", root.name), root / "a" / "back")
    (root / "a" / "notes.txt").write_text("no data here")


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def pickled_text_encoder(root):
    """Good data, and a model folder whose text encoder is a pickle holding an object to call (not tensors)."""
    write_pickapic(root)
    folder = sample.save_pipeline(sample.build_tiny("sd15"), str(root / "pipe"))
    weights = {k: v for k, v in sample.build_tiny("sd15").text_encoders[0].state_dict().items()}
    for name in os.listdir(os.path.join(folder, "text_encoder")):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(folder, "text_encoder", name))
    torch.save({**weights, "extra": RunsCode()}, os.path.join(folder, "text_encoder", "pytorch_model.bin"))


# (name, make the source at tmp_path / "src" (or None: synthetic), flags, fragment of the one-line message)
TRAINING = [
    ("output dir is a file", None, ["--output-dir", "{tmp}/file"], "--output-dir {tmp}/file is a file"),
    ("output dir under a file", None, ["--output-dir", "{tmp}/file/run"], "cannot be made: {tmp}/file is a file"),
    ("latent cache is a file", None, ["--cache-latents", "{tmp}/file"], "--cache-latents {tmp}/file is a file"),
    ("image store is a file", None, ["--image-store", "{tmp}/file"], "--image-store {tmp}/file is a file"),
    ("max steps 0", None, ["--max-steps", "0"], "--max-steps 0 must be positive"),
    ("truncated parquet shard", two_parquet_shards_one_truncated, [],
     "train-00001-of-00002.parquet cannot be read"),
    ("truncated tar", two_tars_one_truncated, [], "00001.tar cannot be read (unexpected end of data)"),
    ("JSON-lines bad line", jsonl_with_a_bad_line, [], "train.jsonl, line 4: not a JSON record"),
    ("null image cells", null_images, ["--num-workers", "2"], "could not be decoded"),
    ("symlink loops and no data", symlink_loops, [], "no train data in {tmp}/src"),
    ("pickled text encoder", pickled_text_encoder, ["--model", "{tmp}/src/pipe"],
     "a pickled weights file (.bin) in {tmp}/src/pipe holds objects other than tensors: refused"),
    # the second campaign's minor flags (issue 39): each was a traceback or a run that trained nothing with exit 0
    ("lr inf", None, ["--lr", "inf"], "--lr inf must be in (0, 1]"),
    ("lr nan", None, ["--lr", "nan"], "--lr nan must be in (0, 1]"),
    ("lr 1e30", None, ["--lr", "1e30"], "--lr 1e+30 must be in (0, 1]"),
    ("beta inf", None, ["--beta", "inf"], "--beta inf must be positive"),
    ("beta 1e300", None, ["--beta", "1e300"], "and at most 1e+20"),
    ("global batch size 0", None, ["--global-batch-size", "0"], "--global-batch-size 0 must be a positive multiple"),
    ("global batch size -4", None, ["--global-batch-size", "-4"], "--global-batch-size -4 must be a positive"),
    ("dist timeout 1e30", None, ["--dist-timeout", "1e30"], "--dist-timeout 1e+30 must be positive and at most"),
    ("step back 1e11 on a flow model", None, ["--model", "tiny-sd3", "--step-back", "100000000000"],
     "--step-back 100000000000 must be between 1 and 999"),
]


def one_line_error(proc, fragment):
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.stdout[-3000:]


@pytest.mark.parametrize("name, make, flags, fragment", TRAINING, ids=[case[0] for case in TRAINING])
def test_training_input(tmp_path, name, make, flags, fragment):
    (tmp_path / "file").write_text("not a folder")
    source = []
    if make:
        make(tmp_path / "src")
        source = ["--data", str(tmp_path / "src")]
    flags = [f.format(tmp=tmp_path) for f in flags]
    proc = train("ncp_dpo.py", tmp_path / "run", "--model", "tiny", "--max-steps", "1", *source, *flags, check=False,
                 timeout=120)
    one_line_error(proc, fragment.format(tmp=tmp_path))
    assert "this ran" not in proc.stdout
    assert not (tmp_path / "run").exists()  # a fresh run leaves nothing behind


def test_missing_hpd_images_are_skipped_counted_and_trained_around(tmp_path):
    root = tmp_path / "hpd"
    write_hpdv3(root)
    os.remove(root / "images" / "m0" / "A.jpg")  # the winner of two comparisons
    train("ncp_dpo.py", tmp_path / "run", "--model", "tiny", "--data", str(root), "--max-steps", "2",
          "--global-batch-size", "4", timeout=120)
    assert metrics(tmp_path / "run")[-1]["skipped_pairs"] > 0


# -----------------------------------------------------------------------------
# sample.py


def run(script, *args, timeout=120):
    return launch.python([sys.executable, os.path.join(ROOT, script), *args], env(), ROOT, timeout)


def lora_file(folder, content):
    os.makedirs(folder)
    path = os.path.join(folder, sample.LORA_FILE)
    if isinstance(content, dict):
        from safetensors.torch import save_file

        save_file(content, path)
    else:
        open(path, "wb").write(content)
    return str(folder)


SAMPLING = [
    ("no images per prompt", ["--num-images-per-prompt", "0"], "--num-images-per-prompt 0 must be at least 1"),
    ("no steps", ["--steps", "0"], "--steps 0 must be at least 1"),
    ("resolution 30", ["--resolution", "30"], "--resolution 30 must be a positive multiple of 8"),
    ("batch size 0", ["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    ("out is a file", ["--out", "{tmp}/file"], "--out {tmp}/file is a file"),
    ("empty LoRA file", ["--lora", "empty"], "is not a readable safetensors file"),
    ("garbage LoRA file", ["--lora", "garbage"], "is not a readable safetensors file"),
    ("truncated LoRA file", ["--lora", "truncated"], "is not a readable safetensors file"),
    ("LoRA without U-Net keys", ["--lora", "text-only"], "holds no U-Net or transformer LoRA weights"),
    ("LoRA holding NaN", ["--lora", "nan"], "holds NaN or inf (unet."),
    ("LoRA of another U-Net's names", ["--lora", "other-names"], "does not fit this model's U-Net"),
    ("seed 2^32", ["--seed", str(2**32)], "--seed 4294967296 must be between 0 and 2^32 - 1"),
]


@pytest.mark.parametrize("name, flags, fragment", SAMPLING, ids=[case[0] for case in SAMPLING])
def test_sampling_input(tmp_path, name, flags, fragment):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    loras = {"empty": b"", "garbage": b"garbage" * 10, "text-only": {"text_encoder.q.lora_A.weight": torch.zeros(2, 2)},
             "nan": {"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.tensor([[0.0, float("nan")]])},
             "other-names": {"unet.down_blocks.99.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight":
                             torch.zeros(2, 32)}}  # diffusers raised an IndexError on these
    if "--lora" in flags:
        kind = flags[1]
        if kind == "truncated":
            unet = sample.build_tiny().unet
            sample.add_lora(unet, rank=2)
            sample.save_lora(unet, str(tmp_path / kind))
            truncate(tmp_path / kind / sample.LORA_FILE)
        else:
            lora_file(tmp_path / kind, loras[kind])
        flags = ["--lora", str(tmp_path / kind)]
    flags = [f.format(tmp=tmp_path) for f in flags]
    out = ["--out", str(tmp_path / "out")] if "--out" not in flags else []
    proc = run("sample.py", "--model", "tiny", "--prompts", tmp_path / "prompts.txt", "--steps", "1", *out, *flags)
    one_line_error(proc, fragment.format(tmp=tmp_path))
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# evaluate.py


@pytest.fixture()
def folders(tmp_path):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    for name in ("a", "b"):
        make_folder(tmp_path / name, ["x", "y"], [image, image])
    return tmp_path / "a", tmp_path / "b"


EVALUATION = [
    ("the same folder twice", ["{a}", "{a}/"], "is given twice"),
    ("batch size 0", ["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    ("report under a file", ["--out", "{tmp}/file/report.json"], "--out {tmp}/file/report.json cannot be made"),
    ("report is a folder", ["--out", "{tmp}"], "--out {tmp} is a folder"),
    ("page folder is a file", ["--html", "{tmp}/file"], "--html {tmp}/file is a file"),
    ("markdown in a missing folder", ["--markdown", "{tmp}/none/t.md"], "--markdown {tmp}/none/t.md cannot be made"),
    ("a corrupt image", ["corrupt"], "00001_0.png is not a readable image"),
    ("index.json not JSON", ["index:{\"images\": ["], "index.json is not valid JSON"),
    ("index.json a list", ["index:[1, 2]"], "index.json is not a sample.py index"),
    ("index.json without files", ["index:{\"images\": [{\"prompt\": \"x\"}]}"], "index.json is not a sample.py index"),
    ("index.json of strings", ["index:{\"images\": [\"x\", \"y\"]}"], "index.json is not a sample.py index"),
    ("other seeds", ["seeds"], "were sampled with different seeds (00000_0.png: 0 and 7)"),
    ("report inside a compared folder", ["--out", "{a}/index.json"], "--out {a}/index.json is inside the compared folder"),
    ("page inside a compared folder", ["--html", "{a}"], "--html {a} is inside the compared folder"),
    ("empty folders", ["index:{\"images\": []}", "empty"], "hold no images to compare"),
]


@pytest.mark.parametrize("name, flags, fragment", EVALUATION, ids=[case[0] for case in EVALUATION])
def test_evaluation_input(tmp_path, folders, scorer_dir, name, flags, fragment):  # noqa: F811
    (tmp_path / "file").write_text("not a folder")
    a, b = folders
    given = [f.format(tmp=tmp_path, a=a) for f in flags] if not flags[0].startswith("index:") else []
    if flags == ["corrupt"]:
        truncate(b / "00001_0.png")
        given = []
    elif flags[0].startswith("index:"):  # a tampered or hand-written index
        for folder in (a, b) if flags[1:] == ["empty"] else (b,):
            (folder / "index.json").write_text(flags[0].removeprefix("index:"))
        given = []
    elif flags == ["seeds"]:  # the same prompts and names, other noise: not a paired comparison
        for folder, seed in ((a, 0), (b, 7)):
            index = json.load(open(folder / "index.json"))
            for item in index["images"]:
                item["seeds"] = [seed + item["index"]]
            (folder / "index.json").write_text(json.dumps(index))
        given = []
    if not given or not given[0].startswith(str(a)):
        given = [str(a), str(b), *given]
    if "--out" not in given:
        given += ["--out", str(tmp_path / "report.json")]
    proc = run("evaluate.py", *given, "--pickscore-model", scorer_dir, "--pickscore-processor", scorer_dir)
    one_line_error(proc, fragment.format(tmp=tmp_path, a=a))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("report")]  # no report, no stray .tmp


# -----------------------------------------------------------------------------
# spo.py: a run that trains nothing says so


def test_spo_that_keeps_no_pair_warns_and_fails(tmp_path):
    proc = run("spo.py", "--model", "tiny", "--output-dir", tmp_path / "run", "--preference-model", "tiny",
               "--epochs", "1", "--threshold", "0.9", "--log-every", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if "kept no pair" in line]
    assert warnings and all("is not above --threshold 0.9" in w for w in warnings)
    assert proc.stdout.strip().splitlines()[-1].startswith("error: the run took no optimizer step")


@pytest.mark.parametrize("flags, fragment", [
    (["--threshold", "1.0"], "--threshold 1.0 must be below 1"),
    (["--preference-model", "{tmp}/garbage.bin"], "garbage.bin is not a preference model's weights (unreadable"),
])
def test_spo_input(tmp_path, flags, fragment):
    (tmp_path / "garbage.bin").write_bytes(b"not a state dict")
    proc = run("spo.py", "--model", "tiny", "--output-dir", tmp_path / "run", "--spm-backbone", "tiny",
               *[f.format(tmp=tmp_path) for f in flags])
    one_line_error(proc, fragment.format(tmp=tmp_path))
    assert "weights_only" not in proc.stdout and not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# A save killed half way


def test_a_save_killed_between_its_renames_is_made_whole_on_resume(tmp_path):
    """The state a kill -9 between the LoRA's rename and the checkpoint's leaves: the LoRA of step 2 beside the
    checkpoint of step 1, a temporary folder, and step 2's line in metrics.jsonl. A resume removes the folder,
    writes the checkpoint's LoRA back, and logs step 2 once."""
    run_dir, saved = tmp_path / "run", tmp_path / "step1"
    steps = ["--save-every", "1"]
    train("ncp_dpo.py", run_dir, "--model", "tiny", "--max-steps", "1", *steps)
    shutil.copytree(run_dir, saved)
    train("ncp_dpo.py", run_dir, "--model", "tiny", "--max-steps", "2", "--resume", *steps)
    straight = lora(run_dir)
    shutil.copy(saved / "checkpoint.pt", run_dir / "checkpoint.pt")  # the kill: the checkpoint is step 1's still
    (run_dir / (run_py.SAVE_PREFIX + "x1y2")).mkdir()
    (run_dir / ".save-mine").mkdir()  # a user's own folder: only the saves' own name is removed
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]

    train("ncp_dpo.py", run_dir, "--model", "tiny", "--max-steps", "1", "--resume", *steps)
    assert all(torch.equal(a, b) for a, b in zip(lora(run_dir).values(), lora(saved).values()))
    assert not [n for n in os.listdir(run_dir) if n.startswith(run_py.SAVE_PREFIX)]
    assert (run_dir / ".save-mine").is_dir()
    assert [r["step"] for r in metrics(run_dir)] == [1]
    with open(run_dir / "metrics.jsonl", "a") as f:  # issue 39, major 6: a kill or full disk during the append
        f.write('{"step": 2, "loss": 0.69')
    proc = train("ncp_dpo.py", run_dir, "--model", "tiny", "--max-steps", "2", "--resume", *steps)
    assert "its last line was cut short" in proc.stdout
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(lora(run_dir).values(), straight.values()))


def test_major_8_a_sliver_of_an_image_is_skipped_not_resized_to_gigabytes():
    """A 1 x 40000 image would be resized to 256 x 10,240,000 pixels at 256 px: refused by a ValueError, which the
    dataset counts as a skipped image; an ordinary shape keeps its pixels."""
    from PIL import Image

    with pytest.raises(ValueError, match="more than 16:1"):
        data.resize_crop(Image.new("RGB", (1, 40000)), 256, 0.5, 0.5, False)
    image = Image.effect_noise((48, 30), 50).convert("RGB")
    pixels, size, crop = data.resize_crop(image, 16, 0.25, 0.5, False)
    expected = image.resize((26, 16), Image.Resampling.BICUBIC).crop((2, 0, 18, 16))
    assert torch.equal(pixels, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    assert size == (30, 48) and crop == (0, 2)



def test_major_9_10_a_v_prediction_model_is_refused_in_one_line_and_every_rank_exits_cleanly(tmp_path):
    """An SD2.x-768-style pipeline (its scheduler says v_prediction) would be trained as if it predicted noise:
    refused by name before any training, by the loader every script uses. Under torchrun every rank exits 1 after
    that one line, its process group destroyed (a live gloo thread made a rank abort, SIGABRT)."""
    from helpers import train

    import json

    path = sample.save_pipeline(sample.build_tiny("sd15"), str(tmp_path / "v"))
    config = json.load(open(os.path.join(path, "scheduler", "scheduler_config.json")))
    json.dump({**config, "prediction_type": "v_prediction"}, open(os.path.join(path, "scheduler",
                                                                               "scheduler_config.json"), "w"))
    with pytest.raises(sample.ModelError, match="predicts 'v_prediction'.*epsilon"):
        sample.load_models(path)
    proc = train("ncp_dpo.py", tmp_path / "out", "--model", path, "--data", "synthetic", nproc=2, check=False)
    assert proc.returncode != 0 and proc.stdout.count("error: ") == 1 and "predicts 'v_prediction'" in proc.stdout
    assert "terminate called" not in proc.stdout and "SIGABRT" not in proc.stdout and "exitcode  : -" not in proc.stdout
    assert not os.path.exists(tmp_path / "out")


def test_a_non_finite_lora_is_never_saved_and_spo_checks_its_flags_first(tmp_path):
    """The save refuses a LoRA holding NaN or inf, in one line, and writes nothing (sample.py would render black
    images from it; --lr is bounded so that Adam cannot overflow it, this is the last guard). spo.py refuses a
    non-finite --lr and --beta before loading anything."""
    import run as run_py

    unet = sample.build_tiny().unet
    sample.add_lora(unet, rank=2)
    next(p for n, p in unet.named_parameters() if "lora_B" in n).data[0, 0] = float("inf")
    (tmp_path / "out").mkdir()
    with pytest.raises(run_py.NonFiniteLoRA, match="the LoRA holds NaN or inf"):
        run_py.save_run(str(tmp_path / "out"), unet, {"step": 1})
    assert os.listdir(tmp_path / "out") == []
    for flag, fragment in (("--lr", "--lr inf must be in (0, 1]"), ("--beta", "--beta inf must be positive")):
        proc = run("spo.py", "--model", "tiny", "--output-dir", tmp_path / "spo", flag, "inf")
        one_line_error(proc, fragment)
        assert not (tmp_path / "spo").exists()


def test_a_low_open_file_limit_is_one_line_or_raised_to_what_a_run_needs(tmp_path):
    """`ulimit -n 16` failed in a loader worker (a traceback, log.txt left behind); a soft limit of 24 hung the run.
    A hard limit under run.MIN_OPEN_FILES is refused before anything is written; a low soft limit is raised."""
    import resource
    import subprocess

    def limited(soft, hard, out, *flags):
        def lower():
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        cmd = [sys.executable, os.path.join(ROOT, "ncp_dpo.py"), "--output-dir", str(out), "--model", "tiny",
               "--data", "synthetic", "--global-batch-size", "4", "--micro-batch-size", "2", *flags]
        return subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=120, preexec_fn=lower)  # a real process: the limit is the process's own

    proc = limited(16, 16, tmp_path / "refused", "--max-steps", "1")
    one_line_error(proc, "the open-file limit (ulimit -n) is 16; a run needs at least 256")
    assert not (tmp_path / "refused").exists()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = limited(24, hard, tmp_path / "raised", "--max-steps", "2", "--num-workers", "2", "--log-every", "1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [m["step"] for m in metrics(tmp_path / "raised")] == [1, 2]


def test_a_write_the_disk_refuses_is_one_line_and_loses_nothing(tmp_path, folders, scorer_dir):  # noqa: F811
    """A full disk (here: a file that cannot be made, its temporary name taken by a folder). sample.py gave a
    traceback and left a .tmp; evaluate.py left report.json written, the page not, and a 0-byte index.html.tmp.
    Now one line each: sample.py keeps the images it wrote and the same command goes on; evaluate.py writes its
    report, table and page all or none."""
    (tmp_path / "prompts.txt").write_text("a red circle\na blue circle\n")
    out = tmp_path / "samples"
    (out / "00001_0.png.tmp").mkdir(parents=True)
    command = ["sample.py", "--model", "tiny", "--prompts", tmp_path / "prompts.txt", "--out", out, "--steps", "1"]
    one_line_error(run(*command), f"could not write 00001_0.png in {out} (Is a directory)")
    first = (out / "00000_0.png").read_bytes()
    assert not (out / "index.json").exists() and [p.name for p in out.glob("*.tmp")] == ["00001_0.png.tmp"]
    (out / "00001_0.png.tmp").rmdir()
    assert run(*command).returncode == 0
    assert (out / "00000_0.png").read_bytes() == first  # kept, not drawn again
    assert (out / "00001_0.png").exists() and (out / "index.json").exists()

    a, b = folders
    (tmp_path / "page" / "index.html.tmp").mkdir(parents=True)
    proc = run("evaluate.py", a, b, "--out", tmp_path / "report.json", "--markdown", tmp_path / "table.md", "--html",
               tmp_path / "page", "--pickscore-model", scorer_dir, "--pickscore-processor", scorer_dir)
    one_line_error(proc, "(Is a directory): none of")
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "table.md").exists()
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == [] and os.listdir(tmp_path / "page") == ["index.html.tmp"]
