"""Time and memory of the absolute-winner filter on a generated Pick-a-Pic metadata table.

    python benchmarks/filter_speed.py --rows 1000000

Writes a shard set of --rows rows in --shards shards, Pick-a-Pic v2's columns with empty image cells (the
filter reads the metadata columns only, never the images'), with Pick-a-Pic-like statistics (UUID strings, images recurring across pairs, about 11% ties), then
runs data.preference_pairs(..., filter="absolute-winners") in a fresh process pinned to one thread and
reports wall time and peak resident memory of that process.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_metadata(out_dir, rows, shards, seed=0):
    rng = np.random.default_rng(seed)
    n_images = int(rows * 1.3)  # images recur: some appear in several pairs
    uids = np.array([str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**63, n_images)], dtype=object)
    n_prompts = rows // 16
    captions = np.array([f"prompt number {i}" for i in range(n_prompts)], dtype=object)
    for s, idx in enumerate(np.array_split(np.arange(rows), shards)):
        n = len(idx)
        a, b = rng.integers(0, n_images, n), rng.integers(0, n_images, n)
        label = rng.choice([0.0, 1.0, 0.5], size=n, p=[0.445, 0.445, 0.11])
        table = pa.table({"caption": captions[rng.integers(0, n_prompts, n)], "image_0_uid": uids[a],
                          "image_1_uid": uids[b], "label_0": label, "label_1": 1 - label,
                          "has_label": np.ones(n, bool), "are_different": rng.random(n) > 0.01,
                          "ranking_id": idx, "user_id": rng.integers(0, 10000, n),
                          "jpg_0": pa.array([b""] * n, pa.binary()), "jpg_1": pa.array([b""] * n, pa.binary())})
        pq.write_table(table, os.path.join(out_dir, f"train-{s:05d}-of-{shards:05d}.parquet"))


def run_filter(source):
    """Runs in a child process: one thread, then report time and peak RSS as JSON."""
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    sys.path.insert(0, ROOT)
    import data

    start = time.perf_counter()
    pairs, counts = data.preference_pairs(source, "train", filter="absolute-winners")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_gib": round(peak, 3), **counts}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of generated metadata")
    p.add_argument("--shards", type=int, default=690, help="number of parquet shards (the train split has ~690)")
    p.add_argument("--out", help="write the result, with the machine, as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_filter(args.child)
    with tempfile.TemporaryDirectory() as tmp:
        write_metadata(tmp, args.rows, args.shards)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ARROW_NUM_THREADS": "1"}
        out = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--child", tmp], env=env,
                             check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"{args.rows} rows in {args.shards} shards, one core: {result['seconds']} s, "
          f"peak memory {result['peak_rss_gib']} GiB")
    print(json.dumps(result))
    if args.out:
        import platform

        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "cores_used": 1,
                   "python": platform.python_version()}
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "args": {"rows": args.rows, "shards": args.shards}, "result": result}, f,
                      indent=1)


if __name__ == "__main__":
    main()
