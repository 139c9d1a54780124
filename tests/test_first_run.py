"""What a new user sees: the README's first commands as written, their messages, and no noise from the libraries."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ncp_dpo
import sample
from helpers import ROOT, env

NOISE = ["gemm_4bit_forward", "requires torchvision", "worker processes", "FutureWarning", "should be kept in float32",
         "Traceback"]


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


def test_the_tiny_preset_runs_under_torchrun_on_two_processes(tmp_path):
    out = run(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              os.path.join(ROOT, "ncp_dpo.py"), "--model", "tiny", "--data", "synthetic", "--max-steps", "1")
    assert "world 2 x micro 4 x accum 1 = 8 pairs/step" in out and "done: step 1" in out


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        ncp_dpo.parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, some inside hyphenated words
    for shown in ["(default: sdxl)", "(default: train)", "(default: 0)", "(default: 250)", "(default: 10)",
                  "(default: sd15 5.12e-06, sdxl 5.12e-06, tiny 0.001)", "(default: sd15 512, sdxl 512, tiny 8)",
                  "(default: sd15 absolute-winners, sdxl absolute-winners, tiny none)", "(default: 2500.0)",
                  "cores per rank less one, at most 4"]:
        assert "".join(shown.split()) in text, shown
    args = ncp_dpo.fill_defaults(ncp_dpo.parse_args(["--model", "sd15"]), "sd15")
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


FAKES = {
    "wandb.py": '''
import json, os
class _Run:
    def log(self, values, step):
        with open(os.environ["FAKE_REPORT"], "a") as f:
            f.write(json.dumps({"step": step, **{k: (v if isinstance(v, (int, float)) else "image") for k, v in values.items()}}) + "\\n")
    def finish(self):
        pass
def init(project, dir, config, name):
    assert config["model"] == "tiny"
    return _Run()
class Image:
    def __init__(self, image):
        self.size = image.size
''',
    "tensorboard/__init__.py": "",
    "sitecustomize.py": '''
import json, os, sys, types
fake = types.ModuleType("torch.utils.tensorboard")
class SummaryWriter:
    def __init__(self, log_dir):
        self.rows = {}
    def add_scalar(self, name, value, step):
        self.rows.setdefault(step, {"step": step})[name] = value
    def add_image(self, name, array, step, dataformats):
        self.rows.setdefault(step, {"step": step})[name] = "image"
    def close(self):
        with open(os.environ["FAKE_REPORT"], "a") as f:
            for row in self.rows.values():
                f.write(json.dumps(row) + "\\n")
fake.SummaryWriter = SummaryWriter
sys.modules["torch.utils.tensorboard"] = fake
''',
}


@pytest.mark.parametrize("kind", ["wandb", "tensorboard"])
def test_report_to_sends_what_metrics_jsonl_holds(tmp_path, kind):
    """The packages are optional and not installed here: stand-ins record what the run sends them."""
    import json

    from helpers import FAST, metrics

    for name, text in FAKES.items():
        (tmp_path / "fakes" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fakes" / name).write_text(text)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    report = tmp_path / "report.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "ncp_dpo.py"), "--output-dir", str(tmp_path / "out"), *FAST,
           "--model", "tiny", "--max-steps", "2", "--report-to", kind, "--validation-prompts", str(tmp_path / "prompts.txt"),
           "--validation-every", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                          env={**env(), "PYTHONPATH": f"{tmp_path / 'fakes'}{os.pathsep}{ROOT}", "FAKE_REPORT": str(report)})
    assert proc.returncode == 0, proc.stdout[-3000:]
    sent = {}
    for line in report.read_text().splitlines():
        row = json.loads(line)
        sent.setdefault(row.pop("step"), {}).update(row)
    assert sent[0] == {"validation": "image"} and sent[2]["validation"] == "image"
    for record in metrics(tmp_path / "out"):
        assert {k: v for k, v in sent[record["step"]].items() if k != "validation"} == \
            {k: v for k, v in record.items() if k != "step"}


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
    """benchmarks/plot_metrics.py: one panel per logged metric, a line per run; a run without metrics is an error."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import plot_metrics

    for name, scale in [("a", 1.0), ("b", 2.0)]:
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": 0.69 - 0.01 * s * scale, "accuracy": 0.5, "lr": 1e-3} for s in range(1, 6)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves.png"
    plot_metrics.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (240, 3 * 360, 3)  # loss, accuracy, lr: the metrics the runs logged
    red, blue = (np.all(image == colour, axis=-1).sum() for colour in ([0xd6, 0x27, 0x28], [0x1f, 0x77, 0xb4]))
    assert red > 50 and blue > 50  # both runs drawn
    with pytest.raises(SystemExit, match="has no metrics.jsonl"):
        plot_metrics.main([str(tmp_path), "--out", str(out)])
