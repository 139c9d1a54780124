"""Reading shards at a bounded cost: the image store gives the same items as the parquet shards while reading
only each pair's bytes, the latent-cache fill reads each row group once, and the scripts train from the store."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from helpers import lora, train


def write_shards(directory, n=24, shards=2, row_group_size=3, seed=0):
    """Pick-a-Pic-format shards of distinct images (sizes vary), small row groups; pair 5 has no loser image."""
    rng = np.random.default_rng(seed)
    images = [data.jpeg_bytes(Image.fromarray(rng.integers(0, 255, (24 + i % 3 * 8, 32, 3), dtype=np.uint8)))
              for i in range(2 * n)]
    rows = {"caption": [f"c{i}" for i in range(n)], "label_0": [float(i % 2) for i in range(n)],
            "label_1": [1.0 - i % 2 for i in range(n)], "image_0_uid": [f"a{i}" for i in range(n)],
            "image_1_uid": [f"b{i}" for i in range(n)], "jpg_0": images[:n], "jpg_1": images[n:]}
    rows["jpg_0" if rows["label_0"][5] == 0 else "jpg_1"][5] = None
    table = pa.table(rows)
    os.makedirs(directory, exist_ok=True)
    for s, idx in enumerate(np.array_split(np.arange(n), shards)):
        path = os.path.join(directory, f"train-{s:05d}-of-{shards:05d}.parquet")
        pq.write_table(table.take(idx), path, row_group_size=row_group_size, use_dictionary=False)
    return str(directory)


def rchar():
    """Bytes this process has read with read()/pread() so far, page cache or not."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def bytes_read(fn):
    """fn's result and the bytes it read, less the reading of /proc/self/io itself (within a few digits)."""
    a = rchar()
    b = rchar()
    out = fn()
    return out, rchar() - b - (b - a)


def quiet(*args):
    pass


def test_image_store_gives_the_parquet_items_and_reads_only_the_pairs_bytes(tmp_path):
    pairs, _ = data.preference_pairs(write_shards(tmp_path / "d"), "train")
    for winners_only in (False, True):
        direct = data.PreferenceDataset(pairs, 32, train=True, seed=3, winners_only=winners_only)
        stored = data.stored_dataset(direct, str(tmp_path / "store"), log=quiet)
        assert stored.store is not None and stored.store.sides == (1 if winners_only else 2)
        for i in range(len(direct)):
            a, b = direct[(i, 7 * i)], stored[(i, 7 * i)]
            assert torch.equal(a["pixels"], b["pixels"]) and a["pixels"].shape[0] == (1 if winners_only else 2)
            assert (a["caption"], a["skipped"], a["index"]) == (b["caption"], b["skipped"], b["index"])
    assert direct[5]["skipped"] == 0 and data.PreferenceDataset(pairs, 32)[5]["skipped"] == 1  # the missing loser

    pair = [len(b) for b in direct._read_images(8)]  # a winner alone: the reads are exact
    stored.store.read(8, 1)  # opens the file and maps the index
    got, n = bytes_read(lambda: stored.store.read(8, 1))
    assert abs(n - sum(pair)) <= 4 and sum(map(len, got)) == sum(pair)
    both = data.PreferenceDataset(pairs, 32)
    _, parquet = bytes_read(lambda: both._read_images(13))
    store = data.stored_dataset(both, str(tmp_path / "store"), log=quiet).store
    store.read(13, 2)
    got, n = bytes_read(lambda: store.read(13, 2))
    assert abs(n - sum(map(len, got))) <= 4 and 2.5 * n < parquet  # parquet read the row group's three rows
    assert len(os.listdir(tmp_path / "store")) == 2  # one store for the pairs, one for their winners


def test_image_store_build_is_shared_between_ranks_and_resumes(tmp_path):
    pairs, _ = data.preference_pairs(write_shards(tmp_path / "d", shards=3), "train")
    direct = data.PreferenceDataset(pairs, 32, train=False)
    store = data.ImageStore(str(tmp_path / "store"), pairs)
    store.create()
    todo = store.missing()
    assert todo.tolist() == [0, 1, 2]
    store.build(direct, todo, rank=1, world_size=2)  # rank 1 of 2: shard 1 only
    assert store.missing().tolist() == [0, 2]
    with open(os.path.join(store.dir, "shard-00000.bin.4242.tmp"), "wb") as f:
        f.write(b"left by a killed build")
    again = data.ImageStore(str(tmp_path / "store"), pairs)
    assert again.dir == store.dir
    again.build(direct, again.missing())
    assert again.missing().tolist() == [] and not any(p.endswith(".tmp") for p in os.listdir(store.dir))
    for i in range(len(direct)):
        assert again.read(i, 2) == [b or b"" for b in direct._read_images(i)]  # a missing image stays empty
    assert data.ImageStore(str(tmp_path / "store"), pairs, sides=1).dir != store.dir
    assert data.ImageStore(str(tmp_path / "store"), pairs.slice(1)).dir != store.dir


def test_latent_cache_fill_reads_each_row_group_once(tmp_path, monkeypatch):
    pairs, _ = data.preference_pairs(write_shards(tmp_path / "d", n=40, row_group_size=4), "train")
    log = tmp_path / "reads.log"
    real = pq.ParquetFile.read_row_group

    def logged(self, i, columns=None, **kw):
        with open(log, "a") as f:  # DataLoader workers are forked: they log to the same file
            f.write(f"{self.metadata.row_group(i).column(0).statistics.min} {columns}\n")  # first caption
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", logged)
    cache = data.LatentCache(str(tmp_path / "cache"), pairs, 32, {"vae": "test"}, (4, 4, 4))
    cache.create()
    source = data.PreferenceDataset(pairs, 32, train=False)
    todo, seeds = cache.missing([0, 1]), []
    for rank in range(2):
        cache.fill(source, lambda p, s: seeds.extend(s) or torch.zeros(len(s), 4, 4, 4), todo, rank, 2,
                   batch_size=3, num_workers=2)
    assert sorted(seeds) == [s for s in range(2 * len(pairs)) if s // 2 != 5]  # pair 5 lacks its loser
    assert len(cache.missing([0, 1])) == 0
    groups = source.row_groups(np.arange(len(pairs)))
    reads = log.read_text().splitlines()
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 2 * len(np.unique(groups)), sorted(reads)


def test_fill_shares_are_whole_row_groups(tmp_path):
    pairs, _ = data.preference_pairs(write_shards(tmp_path / "d", n=30, shards=1, row_group_size=4), "train")
    source = data.PreferenceDataset(pairs, 32, train=False, winners_only=True)
    groups = source.row_groups(np.arange(len(pairs)))
    shares = data.split_at_groups(np.arange(len(pairs)), groups, 3)
    assert np.concatenate(shares).tolist() == list(range(len(pairs)))
    assert [len(s) for s in shares] == [8, 12, 10]  # cuts at the group bounds nearest 10 (8 or 12: the first) and 20
    for a, b in zip(shares, shares[1:]):
        assert groups[a[-1]] != groups[b[0]]


def test_training_from_the_image_store_is_the_same_run(tmp_path):
    store = tmp_path / "store"
    out = train("ncp_dpo.py", tmp_path / "a", "--model", "tiny", "--max-steps", "2", "--image-store", str(store),
                "--num-workers", "2").stdout
    assert "0 of 1 shards copied, 1 to copy" in out and "this rank copied" in out
    train("ncp_dpo.py", tmp_path / "b", "--model", "tiny", "--max-steps", "2")
    a, b = lora(tmp_path / "a"), lora(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = train("ncp_dpo.py", tmp_path / "a", "--model", "tiny", "--max-steps", "3", "--resume",
                "--image-store", str(store)).stdout
    assert "1 of 1 shards copied, 0 to copy" in out


def test_open_files_are_bounded_and_not_inherited_by_a_pickled_copy(tmp_path):
    import pickle

    (tmp_path / "f").write_bytes(b"x")
    files = data.OpenFiles()
    fds = [files.opened(k, lambda: os.open(tmp_path / "f", os.O_RDONLY)) for k in range(data.OPEN_FILES + 1)]
    assert len(files) == data.OPEN_FILES and 0 not in files  # the least recently used went first
    with pytest.raises(OSError):
        os.fstat(fds[0])  # and was closed
    assert files.opened(5, lambda: -1) == fds[5] and list(files)[-1] == 5  # a hit opens nothing, moves to the end
    assert len(pickle.loads(pickle.dumps(files))) == 0
