"""Cost of one optimizer step for each objective (DPO, CPO, SFT) in each space (ncp, latent), side by side.

    python benchmarks/step_cost.py --model tiny --steps 20                       # CPU
    python benchmarks/step_cost.py --model sd15 --micro-batch-size 8 --steps 20  # GPU (weights must be present)

Runs the training scripts themselves, one after another in this one invocation, with the same model, batch and
precision, on synthetic data. The first --steps optimizer steps are a warm-up and are not counted; the next
--steps are timed (the scripts' own step_time, averaged over that window). Reports seconds per step, pairs per
second, peak memory (GPU: peak allocated; CPU: peak resident set of the process) and the NCP / latent ratio.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"dpo": "ncp_dpo.py", "cpo": "ncp_cpo.py", "sft": "ncp_sft.py"}


def measure(script, space, args, out):
    cmd = [sys.executable, os.path.join(ROOT, script), "--model", args.model, "--space", space, "--data", "synthetic",
           "--output-dir", out, "--max-steps", str(2 * args.steps), "--log-every", str(args.steps),
           "--save-every", str(10**9), "--global-batch-size", str(args.micro_batch_size),
           "--micro-batch-size", str(args.micro_batch_size), "--num-workers", str(args.num_workers), *args.extra]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]  # the second window: warm


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="any --model the training scripts take")
    p.add_argument("--steps", type=int, default=20, help="warm-up steps, then as many timed steps")
    p.add_argument("--micro-batch-size", type=int, default=8, help="pairs per step (one micro-batch, one rank)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("extra", nargs="*", help="more flags for the training scripts, after --")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for objective, script in SCRIPTS.items():
            for space in ("latent", "ncp"):
                r = measure(script, space, args, os.path.join(tmp, f"{objective}-{space}"))
                results[f"{objective}-{space}"] = {"step_s": r["step_time"], "pairs_per_s": r["pairs_per_s"],
                                                   "peak_mem_gib": r["peak_mem_gib"]}
                print(f"{objective} {space:6s}  {r['step_time']:.4f} s/step  {r['pairs_per_s']:.1f} pairs/s  "
                      f"peak {r['peak_mem_gib']:.2f} GiB", flush=True)
    print(f"\n| objective | latent s/step | ncp s/step | ncp / latent | latent peak GiB | ncp peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for objective in SCRIPTS:
        lat, ncp = results[f"{objective}-latent"], results[f"{objective}-ncp"]
        ratio = ncp["step_s"] / lat["step_s"]
        results[f"{objective}-ratio"] = ratio
        print(f"| {objective} | {lat['step_s']:.4f} | {ncp['step_s']:.4f} | {ratio:.2f} | "
              f"{lat['peak_mem_gib']:.2f} | {ncp['peak_mem_gib']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
