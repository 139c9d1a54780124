"""How far sample.py's images move with the batch size and with the CPU's kernels: pixel differences, measured.

    python benchmarks/kernel_spread.py --out benchmarks/results/kernel_spread_cpu.json

Samples the same 20 prompts x 2 images with the tiny model (DDIM, 3 steps) at --batch-size 1, 3 and 4, in a child
process per kernel setting: this CPU's own kernels, and its next lower instruction set (AVX2 where it has AVX-512,
else SSE4.1: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS). Every image is compared with the
same image at batch size 1 on this CPU's own kernels: how many images differ, the largest difference in levels of
255, and the share of pixels that differ. fp32 results depend on the kernel's summation order; the 8-bit images
show it as a level here and there. tests/test_sample_eval.py bounds what it may be from this measurement.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = ["1", "3", "4"]


def lower_kernels():
    """The environment that makes torch, oneDNN and MKL use the next instruction set below this CPU's."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f" in flags:
        return "AVX2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    return "SSE4.1", {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                      "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def sample_all(out, prompts, extra_env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra_env}
    for batch in BATCHES:
        subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model", "tiny", "--prompts", prompts,
                        "--out", os.path.join(out, batch), "--steps", "3", "--num-images-per-prompt", "2",
                        "--batch-size", batch, "--protocol", "spo"], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def images(folder):
    return {n: np.asarray(Image.open(os.path.join(folder, n))).astype(np.int16)
            for n in sorted(os.listdir(folder)) if n[0].isdigit()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    lower, lower_env = lower_kernels()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("".join(f"a {c} {s}\n" for c in ["red", "blue", "green", "yellow", "white"]
                            for s in ["circle", "square", "disc", "star"]))
        for name, extra in (("own", {}), ("lower", lower_env)):
            sample_all(os.path.join(tmp, name), prompts, extra)
        reference = images(os.path.join(tmp, "own", "1"))
        rows = []
        for name in ("own", "lower"):
            for batch in BATCHES:
                mine = images(os.path.join(tmp, name, batch))
                diffs = [np.abs(mine[n] - reference[n]) for n in reference]
                rows.append({"kernels": name if name == "own" else lower, "batch_size": int(batch),
                             "images": len(diffs), "images_differing": int(sum(d.max() > 0 for d in diffs)),
                             "max_levels": int(max(d.max() for d in diffs)),
                             "pixel_share_differing": float(np.mean([(d > 0).mean() for d in diffs]))})
                print(rows[-1])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
