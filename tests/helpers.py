"""Running the training scripts as a user would: subprocesses on tiny models and synthetic data, on CPU."""

import os
import subprocess
import sys

from safetensors.torch import load_file

import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--data", "synthetic", "--num-workers", "0", "--optimizer", "adamw", "--global-batch-size", "4",
        "--micro-batch-size", "2", "--log-every", "1", "--save-every", "100"]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def train(script, out, *args, nproc=1, check=True, timeout=600):
    """Run `script` with FAST settings into `out`; returns the CompletedProcess (stdout + stderr in .stdout)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd = [sys.executable]
    cmd += [os.path.join(ROOT, script), "--output-dir", str(out), *FAST, *args]
    if nproc == 1:
        proc = launch.python(cmd, env(), ROOT, timeout)
    else:
        cmd, environ = launch.for_torchrun(cmd, env())
        proc = subprocess.run(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc


def frozen_copy(models):
    """A fresh copy of a tiny model built once (tests may add adapters or change weights), frozen and in eval mode."""
    import copy

    m = copy.deepcopy(models)
    for module in [m.unet, m.vae, *m.text_encoders]:
        module.requires_grad_(False).eval()
    return m


def lora(out):
    return load_file(os.path.join(str(out), "pytorch_lora_weights.safetensors"))


def metrics(out):
    import json

    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
