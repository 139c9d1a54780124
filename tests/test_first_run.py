"""What a new user sees: the README's first commands as written, their messages, and no noise from the libraries."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ncp_dpo
import run as run_py
import sample
import launch
from helpers import ROOT, env
from test_sample_eval import scorer_dir  # noqa: F401 (a fixture)

NOISE = [*sample.KNOWN_NOISE.values(), "worker processes", "FutureWarning", "Traceback"]


def run(cwd, *cmd, check=True):
    proc = subprocess.run(list(cmd), cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert not check or proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def test_first_run_as_written_is_quiet_and_default_output_dirs_do_not_collide(tmp_path):
    """`python ncp_dpo.py --model tiny --data synthetic`, shortened, then the latent baseline beside it."""
    script = os.path.join(ROOT, "ncp_dpo.py")
    out = run(tmp_path, sys.executable, script, "--model", "tiny", "--data", "synthetic", "--max-steps", "2")
    assert not [n for n in NOISE if n in out], out[-3000:]
    out = run(tmp_path, sys.executable, script, "--model", "tiny", "--data", "synthetic", "--max-steps", "2",
              "--space", "latent")
    assert "holds a run" not in out
    assert sorted(os.listdir(tmp_path / "runs")) == ["dpo-latent-tiny", "dpo-ncp-tiny"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = run(tmp_path, sys.executable, os.path.join(ROOT, "sample.py"), "--model", "tiny", "--lora",
              "runs/dpo-ncp-tiny", "--prompts", str(prompts), "--out", "samples/ncp", "--steps", "2")
    assert not [n for n in NOISE if n in out], out[-3000:]


def test_every_entry_point_is_quiet(tmp_path, scorer_dir):  # noqa: F811
    """evaluate.py, spo.py and spm.py print none of the libraries' known noise either (the training scripts and
    sample.py: the test above)."""
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    run(tmp_path, sys.executable, os.path.join(ROOT, "sample.py"), "--model", "tiny", "--prompts", "prompts.txt",
        "--out", "a", "--steps", "1")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same seeds (a paired comparison), another image
    Image.open(tmp_path / "a" / "00000_0.png").transpose(Image.Transpose.ROTATE_90).save(tmp_path / "b" / "00000_0.png")
    outputs = {
        "evaluate.py": run(tmp_path, sys.executable, os.path.join(ROOT, "evaluate.py"), "a", "b", "--pickscore-model",
                           scorer_dir, "--pickscore-processor", scorer_dir, "--html", "page"),
        "spo.py": run(tmp_path, sys.executable, os.path.join(ROOT, "spo.py"), "--model", "tiny", "--preference-model",
                      "tiny", "--epochs", "1", "--max-steps", "1", "--output-dir", "spo"),
        "spm.py": run(tmp_path, sys.executable, os.path.join(ROOT, "spm.py"), "--backbone", "tiny", "--image",
                      "a/00000_0.png", "--prompt", "a red circle", "--t", "500"),
    }
    for script, out in outputs.items():
        assert not [n for n in NOISE if n in out], f"{script}: {out[-3000:]}"
    assert re.search(r"^a (beats|loses to|is not told apart from) b on PickScore: win rate \d+% \[\d+, \d+\] over 1 "
                     r"prompts, mean [+-]", outputs["evaluate.py"], re.M) and "done: step 1" in outputs["spo.py"]
    assert outputs["spm.py"].strip().endswith("a/00000_0.png")
    assert "warning: one prompt: its 95% intervals have no width" in outputs["evaluate.py"]


def test_the_tiny_preset_runs_under_torchrun_on_two_processes(tmp_path):
    cmd, environ = launch.for_torchrun([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2", os.path.join(ROOT, "ncp_dpo.py"), "--model", "tiny",
                                        "--data", "synthetic", "--max-steps", "1"], env())
    proc = subprocess.run(cmd, cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout
    assert "world 2 x micro 4 x accum 1 = 8 pairs/step" in out and "done: step 1" in out


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        ncp_dpo.parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, some inside hyphenated words
    for shown in ["(default: sdxl)", "(default: train)", "(default: 0)", "(default: 250)", "(default: 10)",
                  "(default: sd15 5.12e-06, sdxl 5.12e-06, sd3 5.12e-06, flux2 5.12e-06, tiny 0.001)",
                  "(default: sd15 512, sdxl 512, sd3 512, flux2 512, tiny 8)",
                  "(default: sd15 absolute-winners, sdxl absolute-winners, sd3 absolute-winners, flux2 "
                  "absolute-winners, tiny none)", "(default: 2500.0)", "cores per rank less one, at most 4",
                  "(default: sd15 mid, sdxl down, sd3 third, flux2 third)",
                  "--step-back STEP_BACK", "(default: 1;", "--t5, --no-t5"]:
        assert "".join(shown.split()) in text, shown
    args = run_py.fill_defaults(ncp_dpo.parse_args(["--model", "sd15"]), run_py.PAPER_PRESETS, "sd15", "dpo")
    assert args.filter == "absolute-winners" and args.output_dir == os.path.join("runs", "dpo-ncp-sd15-absolute-winners")


def test_messages_name_the_real_problem(tmp_path):
    with pytest.raises(ValueError, match="no prompt file"):
        sample.read_prompts(str(tmp_path / "missing.txt"))
    for i in range(30):
        (tmp_path / f"a_rather_long_file_name_number_{i:02d}_of_a_directory.bin").write_text("")
    with pytest.raises(sample.ModelError) as e:
        sample.resolve_model(str(tmp_path))
    assert "and 25 more" in str(e.value) and len(str(e.value)) < 400


# -----------------------------------------------------------------------------
# Seeing training: validation grids and --report-to


def test_validation_grids_change_nothing_in_the_run(tmp_path):
    from helpers import lora, metrics, train

    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    train("ncp_dpo.py", tmp_path / "plain", "--model", "tiny", "--max-steps", "2")
    proc = train("ncp_dpo.py", tmp_path / "seen", "--model", "tiny", "--max-steps", "2", "--validation-prompts",
                 str(tmp_path / "prompts.txt"), "--validation-every", "1")
    a, b = lora(tmp_path / "plain"), lora(tmp_path / "seen")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same LoRA, bit for bit
    assert sorted(os.listdir(tmp_path / "seen" / "samples")) == ["step_00000.png", "step_00001.png", "step_00002.png"]
    assert proc.stdout.count("validation grid") == 3 and len(metrics(tmp_path / "seen")) == 2
    grid = Image.open(tmp_path / "seen" / "samples" / "step_00000.png")
    assert grid.size == (64, 32)  # two 32 px images side by side
    first, last = (np.asarray(Image.open(tmp_path / "seen" / "samples" / f"step_0000{k}.png")) for k in (0, 2))
    assert (first != last).any()  # the LoRA changed the samples


def reporter_run(tmp_path, kind, max_steps=2, extra=(), environ=None):
    """A tiny run sending its metrics and validation images (steps 0, 2, ...) to `kind`, offline."""
    from helpers import FAST

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    cmd = [sys.executable, os.path.join(ROOT, "ncp_dpo.py"), "--output-dir", str(tmp_path / "out"), *FAST, "--model",
           "tiny", "--max-steps", str(max_steps), "--report-to", kind, "--validation-prompts",
           str(tmp_path / "prompts.txt"), "--validation-every", "2", *extra]
    proc = launch.python(cmd, {**env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(environ or {})}, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return tmp_path / "out"


def logged(out):
    """metrics.jsonl as {step: {name: value}}, the numbers a reporter must have received."""
    from helpers import metrics

    return {r["step"]: {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
            for r in metrics(out)}


def test_tensorboard_event_file_holds_the_metrics_and_the_validation_grids(tmp_path):
    """Read back with tensorboard's own reader."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    out = reporter_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={SCALARS: 0, IMAGES: 0}).Reload()
    sent = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            sent.setdefault(event.step, {})[tag] = event.value
    expected = logged(out)
    assert sent.keys() == expected.keys() == {1, 2} and all(sent[s].keys() == expected[s].keys() for s in sent)
    for step, values in expected.items():
        for name, value in values.items():  # stored as float32
            assert sent[step][name] == pytest.approx(value, rel=1e-6, abs=1e-30), (step, name)
    grids = events.Images("validation")
    assert [g.step for g in grids] == [0, 2]
    assert Image.open(io.BytesIO(grids[-1].encoded_image_string)).size == (32, 32)  # one 32 px image
    assert "validation/prompts/text_summary" in events.Tags()["tensors"]  # the grid's caption: its prompts
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]  # the HPARAMS tab
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert start["model"].string_value == "tiny" and start["max_steps"].number_value == 2
    assert json.load(open(out / "config.json"))["beta"] == 2500  # the settings, readable in the run folder


def wandb_records(path):
    """The records of a .wandb file, in wandb's own protobuf types. The file is a LevelDB-style log: a 7-byte
    header (':W&B', magic, version), then 32 KiB blocks of chunks (CRC32, length, type: 1 whole, 2 first,
    3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (kind == 0 and length == 0):  # the block's zero padding
            pos += left
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_args_and_the_metrics_and_a_resume_continues_it(tmp_path):
    """WANDB_MODE=offline: no account, no network. The run file's config and history, read back; a --resume (a
    requeued job) continues the same W&B run, in the project WANDB_PROJECT names, under --run-name."""
    import glob
    import json

    def read(path):
        run, config, history = None, {}, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            run = record.run if kind == "run" else run
            updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
            config.update({u.key: json.loads(u.value_json) for u in updates})
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(row.pop("_step"), {}).update(row)
        return run, config, history

    out = reporter_run(tmp_path, "wandb", environ={"WANDB_PROJECT": "ncp-tests"})
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    run, config, history = read(path)
    assert run.project == "ncp-tests" and run.display_name == "out" and run.run_id == (out / "wandb_id").read_text().strip()
    assert config["model"] == "tiny" and config["max_steps"] == 2
    assert config["beta"] == 2500 and config["space"] == "ncp"
    for step, values in logged(out).items():
        assert {k: history[step][k] for k in values} == values  # exact: JSON round trip
    for step in (0, 2):  # the grid as wandb keeps an image: its fields under nested keys, its prompts as caption
        assert history[step]["validation/_type"] == "image-file" and history[step]["validation/width"] == 32
        assert history[step]["validation/caption"] == "a red circle"
    assert len(glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "images" / "validation_*.png"))) == 2
    reporter_run(tmp_path, "wandb", 3, ["--resume", "--run-name", "requeued"], {"WANDB_PROJECT": "ncp-tests"})
    (again,) = set(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))) - {path}
    resumed, _, history = read(again)
    assert resumed.run_id == run.run_id and resumed.project == "ncp-tests"  # one W&B run, synced or not
    assert resumed.display_name == "requeued" and min(history) == 3 and history[3]["loss"] == logged(out)[3]["loss"]
    assert json.load(open(out / "config.json"))["max_steps"] == 3  # rewritten with what the resume runs


def test_a_missing_reporter_package_fails_at_start_with_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        ncp_dpo.main(ncp_dpo.parse_args(["--model", "tiny", "--data", "synthetic", "--report-to", "wandb",
                                         "--output-dir", str(tmp_path / "out")]))
    assert "--report-to wandb needs the wandb package: pip install wandb" in str(e.value.code)


def test_plot_metrics_overlays_runs(tmp_path):
    """benchmarks/plot_metrics.py: one panel per logged quantity, a line per run, log axes where values span
    decades (NCP's errors beside latent ones); a run without metrics is an error."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import plot_metrics

    for name, scale in [("a", 1.0), ("b", 1e-4)]:  # a latent run's errors (about 1) and an NCP run's (about 1e-4)
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": 0.69 - 0.01 * s, "accuracy": 0.5, "e_w": scale, "e_l": 1.1 * scale, "lr": 1e-3}
                for s in range(1, 6)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    panels, _ = plot_metrics.panels_of({n: plot_metrics.read_metrics(tmp_path / n) for n in "ab"})
    assert list(panels) == ["loss", "implicit accuracy", "errors: e_w solid, e_l dotted\nthe reference's: dashed, "
                            "dash-dot", "learning rate"]  # what the runs logged, nothing else
    errors = [y for points in panels[list(panels)[2]].values() for _, y in points]
    assert plot_metrics.spans_decades(errors) and not plot_metrics.spans_decades([0.69, 0.64])
    out = tmp_path / "curves.png"
    plot_metrics.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape == (2 * 240 + 35, 3 * 360, 3)  # 4 panels on 3 columns, the legend above them
    blue, orange = (np.all(np.abs(image - colour) < 30, axis=-1).sum() for colour in ([0x1f, 0x77, 0xb4],
                                                                                       [0xff, 0x7f, 0x0e]))
    assert blue > 200 and orange > 200  # both runs drawn
    with pytest.raises(SystemExit, match="has no metrics.jsonl"):
        plot_metrics.main([str(tmp_path), "--out", str(out)])


def test_a_named_models_first_download_is_announced_with_its_size(monkeypatch, capsys):
    """`python ncp_dpo.py` with no flags starts SDXL's download: one line first says what and how much; a tiny model
    and an offline run say nothing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    sample._announce_download(sample.SDXL)  # the tests' hub cache is empty
    sample._announce_download("tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sample._announce_download(sample.FLUX2_KLEIN_4B)
    assert capsys.readouterr().out.splitlines() == [
        "model: downloading stabilityai/stable-diffusion-xl-base-1.0 (about 14 GB) into the Hugging Face cache, once"]
