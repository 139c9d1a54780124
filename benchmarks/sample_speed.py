"""Images/s of sample.py's batched sampling against the batch size, in one process, side by side.

    python benchmarks/sample_speed.py --model tiny --out benchmarks/results/sample_speed_tiny_cpu.json

For each batch size, the same prompts are sampled as sample.py samples them (one generator per image, so the
images do not depend on the batch size) after one warm-up call; images/s is the number of images over the wall
time of the timed calls. --model takes what sample.py takes (tiny here; sd15 / sdxl or a local pipeline on a GPU).
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="what sample.py --model takes")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="prompts per pipeline call")
    p.add_argument("--prompts", type=int, default=16, help="prompts timed per batch size")
    p.add_argument("--protocol", choices=list(sample.PROTOCOLS), default="ncp", help="sampling protocol")
    p.add_argument("--steps", type=int, help="sampling steps (default: the protocol's)")
    p.add_argument("--resolution", type=int, help="image size (default: the model's)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision or
                                                                                   ("fp16" if cuda else "fp32")]
    models = sample.load_models(args.model, dtype, device)
    protocol = sample.PROTOCOLS[args.protocol]
    pipe = sample.sampling_pipeline(models, protocol["scheduler"])
    k = protocol["images_per_prompt"]
    call = dict(num_inference_steps=args.steps or protocol["steps"], num_images_per_prompt=k,
                guidance_scale=protocol["guidance_scale"] or sample.DEFAULTS[models.kind]["guidance_scale"],
                **({"height": args.resolution, "width": args.resolution} if args.resolution else {}))
    prompts = [f"a {['red', 'green', 'blue', 'yellow'][i % 4]} shape {i}" for i in range(args.prompts)]

    def run(chunk, start):
        gens = [torch.Generator(device).manual_seed(sample.image_seed(0, start + i, j)) for i in range(len(chunk))
                for j in range(k)]
        pipe(chunk, generator=gens, **call)

    results = {}
    for b in args.batch_sizes:
        run(prompts[:b], 0)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for s in range(0, len(prompts), b):
            run(prompts[s:s + b], s)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[b] = {"seconds": round(seconds, 3), "images_per_s": round(len(prompts) * k / seconds, 3)}
        print(f"batch {b}: {results[b]['images_per_s']} images/s", flush=True)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    out = {"machine": {"device": device_name, "torch": torch.__version__}, "args": vars(args), "results": results}
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
