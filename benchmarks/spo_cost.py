"""Where an SPO iteration's time goes: sampling (the U-Net over the candidates), scoring (VAE decode and the
preference model) and training, in latent and NCP space, side by side.

    python benchmarks/spo_cost.py --model tiny --prompts 4                        # the tiny model and tiny SPM, CPU
    python benchmarks/spo_cost.py --arch sd15 --resolution 128 --prompts 1        # SD1.5 + PickScore's ViT-H, CPU
    python benchmarks/spo_cost.py --arch sdxl --resolution 128 --prompts 1 --spaces ncp
    python benchmarks/spo_cost.py --arch sd15 --prompts 10 --precision bf16       # at 512 px, the authors' 10, GPU

Runs spo.py itself for one iteration. --arch builds the real architectures with random weights in code (the U-Net,
VAE and text encoders of benchmarks/step_cost.py, and PickScore's CLIP ViT-H/14 as the preference model, at the
identity): time does not depend on the weights' values. Every pair is kept (--threshold -1), so the iteration
trains on all of its transitions (k candidates, 20 DDIM steps, branching from step 4: 16 comparisons per prompt,
less the last where the scheduler's final step is deterministic). Reports seconds of sampling, scoring and
training per iteration and per prompt or transition, and their shares.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import sample  # noqa: E402
import step_cost  # noqa: E402


def pickscore_architecture(folder):
    """PickScore_v1's CLIP (ViT-H/14 vision, 1024-wide text tower) with random weights, saved with a processor
    (character tokenizer padded to 77, CLIP's 224 px image processor) as a directory spm.load reads."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = sample._tiny_tokenizer(max_length=77)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", **ids),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           patch_size=14, image_size=224, hidden_act="gelu"),
        projection_dim=1024)
    torch.manual_seed(0)
    CLIPModel(config).to(torch.float16).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, tiny-sdxl or a pipeline directory (with --arch: unused)")
    p.add_argument("--arch", choices=["sd15", "sdxl"], help="the real architecture with random weights")
    p.add_argument("--resolution", type=int, help="sampling resolution (default: the model's)")
    p.add_argument("--prompts", type=int, default=1, help="prompts in the iteration")
    p.add_argument("--candidates", type=int, default=2, help="k")
    p.add_argument("--spaces", default="latent,ncp")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--micro-batch-size", type=int, default=5, help="transitions per forward and per optimizer step")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="spo-cost-")
    model, backbone, preference = args.model, "tiny", "tiny"
    if args.arch:
        model = sample.save_pipeline(step_cost.build_random(args.arch), os.path.join(tmp, "pipe"))
        backbone, preference = pickscore_architecture(os.path.join(tmp, "pickscore")), "identity"
    prompts = os.path.join(tmp, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("".join(f"a photo of thing number {i}\n" for i in range(args.prompts)))
    results = {}
    for space in args.spaces.split(","):
        out = os.path.join(tmp, space)
        cmd = [sys.executable, os.path.join(ROOT, "spo.py"), "--model", model, "--preference-model", preference,
               "--spm-backbone", backbone, "--prompts", prompts, "--prompts-per-iteration", str(args.prompts),
               "--epochs", "1", "--candidates", str(args.candidates), "--threshold", "-1", "--space", space,
               "--global-batch-size", str(args.micro_batch_size), "--micro-batch-size", str(args.micro_batch_size),
               "--precision", args.precision, "--no-gradient-checkpointing", "--optimizer", "adamw",
               "--log-every", "1000", "--output-dir", out]
        cmd += ["--resolution", str(args.resolution)] if args.resolution else []
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            sys.exit(f"spo.py failed:\n{proc.stdout[-3000:]}")
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        it = next(r for r in rows if "sample_s" in r)
        total = it["sample_s"] + it["score_s"] + it["train_s"]
        trained = it["optimizer_steps"] * args.micro_batch_size
        results[space] = {"transitions": it["transitions"], "trained": trained, "sample_s": it["sample_s"],
                          "score_s": it["score_s"], "train_s": it["train_s"],
                          "sample_s_per_prompt": it["sample_s"] / args.prompts,
                          "score_s_per_prompt": it["score_s"] / args.prompts,
                          "train_s_per_transition": it["train_s"] / max(1, trained),
                          "shares": {k: it[k] / total for k in ("sample_s", "score_s", "train_s")}}
        r = results[space]
        print(f"{space}: {r['transitions']} transitions ({trained} trained) | sampling {r['sample_s']:.1f} s "
              f"({r['shares']['sample_s']:.0%}) | scoring {r['score_s']:.1f} s ({r['shares']['score_s']:.0%}) | "
              f"training {r['train_s']:.1f} s ({r['shares']['train_s']:.0%}), {r['train_s_per_transition']:.2f} s a "
              "transition", flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
            f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        with open(args.out, "w") as f:
            json.dump({"machine": {"device": device, "torch": torch.__version__}, "args": vars(args),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
