"""Items/s and bytes read per item of the training dataset, from parquet shards and from the image store.

    python benchmarks/loader_speed.py --row-group-mb 1 100 500 --out benchmarks/results/loader_cpu.json

Writes one generated Pick-a-Pic-format shard per row-group size (distinct JPEG bytes, 512 px, about 150 KB an
image; no dictionary, snappy, as the hub's shards), then, in one process on one core, for each shard:
  - parquet: PreferenceDataset items in a random order, reading the shard as training does without a store;
  - store:   the same items from an ImageStore, after building it (its build time and bytes read are reported).
Bytes read are the process's read()/pread() bytes (/proc/self/io rchar), so they do not depend on the page
cache; the seconds were taken on a warm page cache. "read" times the image bytes alone, "item" also decodes,
resizes and crops them, as a DataLoader worker does.

The rate the GPUs need is estimated from step_cost.py's FLOP counts (benchmarks/results/step_cost_*.json):
NCP-DPO's TFLOP per pair at SD1.5 512 px, scaled to SDXL 1024 px by the ratio of the U-Net forwards, at an
H100's dense bf16 peak and an assumed MFU.
"""

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402

H100_BF16_TFLOPS = 989.0  # dense, SXM
SDXL_UNET_TFLOPS, SD15_UNET_TFLOPS = 6.761, 0.803  # one U-Net forward per image, 1024 px / 512 px (step_cost.py)


def jpeg_pool(n, size=512, seed=0):
    """n distinct-looking JPEGs: smooth random colour fields with grain, about 150 KB each at 512 px."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        field = Image.fromarray(rng.integers(0, 255, (size // 4, size // 4, 3), dtype=np.uint8))
        pixels = np.asarray(field.resize((size, size), Image.Resampling.BICUBIC)).astype(np.int16)
        pixels = (pixels + rng.integers(-12, 12, pixels.shape)).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    return pool


def write_shard(path, pool, rows, row_group_mb):
    """A shard of `rows` pairs whose images are all different bytes (a counter after the JPEG's end marker)."""
    images = [pool[i % len(pool)] + b"unique%010d" % i for i in range(2 * rows)]
    pair_bytes = sum(map(len, images)) / rows
    table = pa.table({"caption": [f"prompt {i // 4}" for i in range(rows)],
                      "label_0": [float(i % 2) for i in range(rows)],
                      "label_1": [1.0 - i % 2 for i in range(rows)], "image_0_uid": [f"{i}-0" for i in range(rows)],
                      "image_1_uid": [f"{i}-1" for i in range(rows)], "jpg_0": images[:rows], "jpg_1": images[rows:]})
    group_rows = max(1, round(row_group_mb * 2**20 / pair_bytes))
    pq.write_table(table, path, row_group_size=group_rows, use_dictionary=False, compression="snappy")
    return group_rows, pair_bytes


def rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def forget(dataset):
    dataset._group = (None, {})
    return dataset


def measure(fn, order, seconds):
    """Run fn(i) over `order` until it ends or `seconds` pass: items/s, bytes read per item."""
    fn(int(order[0]))  # open the file, map the index
    start_bytes, start, n = rchar(), time.perf_counter(), 0
    for i in order:
        fn(int(i))
        n += 1
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"items": n, "items_per_s": round(n / elapsed, 2),
            "mb_read_per_item": round((rchar() - start_bytes) / n / 2**20, 3)}


def needed_rates(gpus, mfu):
    """Pairs/s that `gpus` H100s need at an MFU, for NCP-DPO at SD1.5 512 px and SDXL 1024 px, from the FLOPs of the
    path the scripts train with (bf16: the JVP; step_cost.py's filed SD1.5 bf16 run)."""
    with open(os.path.join(ROOT, "benchmarks", "results", "step_cost_sd15_bf16_mb1_cpu.json")) as f:
        sd15 = json.load(f)["results"]["dpo-ncp"]["tflops_per_step"]  # one pair per step
    per_pair = {"sd15_512px": sd15, "sdxl_1024px": sd15 * SDXL_UNET_TFLOPS / SD15_UNET_TFLOPS}
    return {k: {"tflop_per_pair": round(v, 2), "pairs_per_s": round(gpus * H100_BF16_TFLOPS * mfu / v, 1)}
            for k, v in per_pair.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row-group-mb", type=float, nargs="+", default=[1, 100, 500], help="row-group sizes to test")
    p.add_argument("--shard-mb", type=float, default=520, help="size of each generated shard (the hub's are ~520 MB)")
    p.add_argument("--resolution", type=int, default=512, help="crop size of an item")
    p.add_argument("--seconds", type=float, default=20, help="time limit of each measurement")
    p.add_argument("--gpus", type=int, default=4, help="GPUs to feed, for the needed rate")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation, for the needed rate")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: the rate of one DataLoader worker
    torch.set_num_threads(1)
    pool = jpeg_pool(64)
    rows = int(args.shard_mb * 2**20 / (2 * np.mean([len(b) for b in pool])))
    order = np.random.default_rng(0).permutation(rows)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.row_group_mb:
            directory = os.path.join(tmp, f"rg{mb:g}")
            os.makedirs(directory)
            shard = os.path.join(directory, "train-00000-of-00001.parquet")
            group_rows, pair_bytes = write_shard(shard, pool, rows, mb)
            pairs, _ = data.preference_pairs(directory, "train")
            direct = data.PreferenceDataset(pairs, args.resolution, train=True)
            row = {"row_group_rows": group_rows, "pair_mb": round(pair_bytes / 2**20, 3),
                   "largest_row_group_mb": round(data.largest_row_group(pairs) / 2**20, 1)}
            # The 335 GB set has about a thousand row groups per GB of 1 MB groups, and never the same group twice
            # in a row in a random order: forget the last row group read before each item, as training would.
            row["parquet_read"] = measure(lambda i: forget(direct)._read_images(i), order, args.seconds)
            row["parquet_item"] = measure(lambda i: forget(direct)[(i, i)], order, args.seconds)
            store = data.ImageStore(os.path.join(tmp, "store"), pairs)
            store.create()
            before, start = rchar(), time.perf_counter()
            store.build(data.PreferenceDataset(pairs, args.resolution, train=False), store.missing())
            row["store_build"] = {"seconds": round(time.perf_counter() - start, 2),
                                  "mb_read": round((rchar() - before) / 2**20, 1), "shard_mb": round(args.shard_mb, 1)}
            stored = data.PreferenceDataset(pairs, args.resolution, train=True, store=store)
            row["store_read"] = measure(stored._read_images, order, args.seconds)
            row["store_item"] = measure(lambda i: stored[(i, i)], order, args.seconds)
            results[f"{mb:g}MB"] = row
            print(f"row groups of {mb:g} MB ({group_rows} pairs): "
                  f"parquet {row['parquet_item']['items_per_s']} items/s, {row['parquet_read']['mb_read_per_item']} MB "
                  f"read/item; store {row['store_item']['items_per_s']} items/s, "
                  f"{row['store_read']['mb_read_per_item']} MB read/item (pair {row['pair_mb']} MB); "
                  f"store built in {row['store_build']['seconds']} s reading {row['store_build']['mb_read']} MB",
                  flush=True)
            shutil.rmtree(directory)
            shutil.rmtree(os.path.join(tmp, "store"))
    need = needed_rates(args.gpus, args.mfu)
    for k, v in need.items():
        print(f"{args.gpus} H100s at {args.mfu:.0%} MFU, NCP-DPO {k}: {v['tflop_per_pair']} TFLOP/pair, "
              f"{v['pairs_per_s']} pairs/s")
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores_used": 1},
           "args": vars(args), "results": results, "needed": need}
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
