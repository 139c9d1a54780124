"""The latent cache: latents equal the VAE's own, the VAE runs once, any change of key makes a new cache,
an interrupted fill goes on, undecodable pairs are skipped; and the training scripts train from it."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
import sample
from helpers import metrics, train

RED = data.jpeg_bytes(Image.new("RGB", (40, 32), (200, 10, 10)))
BLUE = data.jpeg_bytes(Image.new("RGB", (32, 48), (10, 10, 200)))


def write_pairs(directory, images, loser=RED):
    """One pair per winner image; every loser is `loser`."""
    n = len(images)
    rows = {"caption": [f"c{i}" for i in range(n)], "label_0": [1.0] * n, "label_1": [0.0] * n,
            "image_0_uid": [f"w{i}" for i in range(n)], "image_1_uid": [f"l{i}" for i in range(n)],
            "jpg_0": images, "jpg_1": [loser] * n}
    os.makedirs(directory, exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(directory, "train-00000-of-00001.parquet"), row_group_size=2)
    return str(directory)


def counting(vae, monkeypatch):
    """Count the images the VAE encodes."""
    calls = []
    real = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: calls.append(len(x)) or real(x, *a, **k))
    return calls


def fill_cache(ds, root, vae, batch_size=8, **kw):
    """data.cached_dataset with the VAE's encoder, as the training scripts call it."""
    return data.cached_dataset(ds, root, batch_size=batch_size, **sample.latent_encoder(vae, ds.resolution, batch_size),
                               **kw)


def dataset(source, resolution=32, winners_only=False):
    pairs, _ = data.preference_pairs(source, "train")
    return data.PreferenceDataset(pairs, resolution, train=True, seed=3, winners_only=winners_only)


def test_cached_latents_are_the_vaes_and_are_encoded_once(tmp_path, models, monkeypatch):
    vae = models.vae
    source = data.write_synthetic(str(tmp_path / "syn"), n=12)
    ds = dataset(source)
    calls = counting(vae, monkeypatch)
    cached = fill_cache(ds, str(tmp_path / "cache"), vae, batch_size=4, num_workers=0, log=lambda *a: None)
    assert sum(calls) == 2 * len(ds)  # every winner and loser once
    centre = data.PreferenceDataset(ds.pairs, 32, train=False)  # the cache's crop: centred, no flip
    for i in range(len(ds)):
        item, want = cached[(i, 123)], centre[i]
        with torch.no_grad():  # the oracle: the VAE's own posterior sample with the pair's own seeds
            z = torch.cat([vae.encode(want["pixels"][s:s + 1]).latent_dist.sample(torch.Generator().manual_seed(2 * i + s))
                           for s in (0, 1)]) * vae.config.scaling_factor
        assert item["latents"].shape == (2, 4, 16, 16) and item["caption"] == want["caption"]
        torch.testing.assert_close(item["latents"], z, atol=2e-3, rtol=2e-3)  # stored in float16
        assert torch.equal(item["original_sizes"], want["original_sizes"].int())
        assert torch.equal(item["crops_top_left"], want["crops_top_left"].int())
    calls.clear()
    again = fill_cache(dataset(source), str(tmp_path / "cache"), vae, num_workers=0, log=lambda *a: None)
    assert calls == [] and again.cache.dir == cached.cache.dir
    batch = next(iter(data.make_loader(again, 3, num_workers=0)))
    x0 = sample.batch_latents(vae, batch)  # winners, then losers, as the training scripts stack pixels
    assert x0.shape == (6, 4, 16, 16) and torch.equal(x0[:3], batch["latents"][:, 0]) and torch.equal(x0[3:], batch["latents"][:, 1])


def test_a_change_of_vae_resolution_or_data_makes_a_new_cache(tmp_path, models):
    vae, root = models.vae, str(tmp_path / "cache")
    source = write_pairs(tmp_path / "a", [RED, BLUE, RED])
    quiet = dict(num_workers=0, log=lambda *a: None)
    first = fill_cache(dataset(source), root, vae, **quiet).cache.dir
    assert fill_cache(dataset(source), root, vae, **quiet).cache.dir == first
    assert fill_cache(dataset(source, resolution=16), root, vae, **quiet).cache.dir != first
    weight = next(vae.parameters())
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
    assert fill_cache(dataset(source), root, vae, **quiet).cache.dir != first
    with torch.no_grad():
        weight.copy_(kept)
    assert fill_cache(dataset(source), root, vae, **quiet).cache.dir == first  # the weights, not the object
    write_pairs(tmp_path / "a", [RED, BLUE, RED], loser=BLUE)  # same captions and uids, other pixels
    assert fill_cache(dataset(source), root, vae, **quiet).cache.dir != first
    assert len(os.listdir(root)) == 4


def test_an_interrupted_fill_goes_on_where_it_stopped(tmp_path, models):
    vae = models.vae
    ds = dataset(data.write_synthetic(str(tmp_path / "syn"), n=40))  # three row groups of 16 rows
    key = {"vae": "test"}
    cache = data.LatentCache(str(tmp_path / "cache"), ds.pairs, 32, key, (4, 16, 16))
    cache.create()
    source = data.PreferenceDataset(ds.pairs, 32, train=False)
    seen = []

    def encode(pixels, seeds):
        if seen:
            raise KeyboardInterrupt
        seen.extend(seeds)
        return sample.encode_images(vae, pixels, [torch.Generator().manual_seed(s) for s in seeds])

    with pytest.raises(KeyboardInterrupt):
        cache.fill(source, encode, cache.missing([0, 1]), batch_size=4, num_workers=0)
    assert sorted(seen) == list(range(8))  # pairs 0-3: their winners and losers
    assert cache.missing([0, 1]).tolist() == list(range(4, len(ds)))
    done = []
    resumed = data.LatentCache(str(tmp_path / "cache"), ds.pairs, 32, key, (4, 16, 16))
    resumed.fill(source, lambda p, s: done.extend(s) or torch.zeros(len(s), 4, 16, 16), resumed.missing([0, 1]),
                 batch_size=4, num_workers=0)
    assert sorted(done) == list(range(8, 2 * len(ds))) and len(resumed.missing([0, 1])) == 0


def test_fill_shares_the_work_between_ranks(tmp_path, models):
    ds = dataset(data.write_synthetic(str(tmp_path / "syn"), n=40))  # three row groups of 16 rows
    cache = data.LatentCache(str(tmp_path / "cache"), ds.pairs, 32, {"vae": "test"}, (4, 16, 16))
    cache.create()
    source = data.PreferenceDataset(ds.pairs, 32, train=False, winners_only=True)  # SFT: winners only
    shares, todo = [], cache.missing([0])  # read by every rank before any fills
    for rank in range(3):
        seeds = []
        cache.fill(source, lambda p, s: seeds.extend(s) or torch.zeros(len(s), 4, 16, 16), todo, rank, 3, 2, 0)
        shares.append(seeds)
    assert sorted(s for share in shares for s in share) == [2 * i for i in range(len(ds))]  # each winner once
    groups = [set(source.row_groups([s // 2 for s in share]).tolist()) for share in shares]
    assert all(groups) and sum(map(len, groups)) == len(set.union(*groups)) == 3  # whole row groups, one per rank
    assert len(cache.missing([0])) == 0 and len(cache.missing([0, 1])) == len(ds)  # the losers are still to do


def test_undecodable_pairs_are_marked_and_skipped(tmp_path, models):
    source = write_pairs(tmp_path / "a", [RED, b"not an image", BLUE, RED[:40]])
    cached = fill_cache(dataset(source), str(tmp_path / "cache"), models.vae, num_workers=0, log=lambda *a: None)
    state = np.load(os.path.join(cached.cache.dir, "state.npy"))
    assert state.tolist() == [[1, 1], [-1, -1], [1, 1], [-1, -1]]
    assert cached[1]["caption"] == "c2" and cached[1]["skipped"] == 1
    assert cached[3]["caption"] == "c0" and cached[3]["skipped"] == 1  # wraps around


def test_training_scripts_fill_then_reuse_the_cache(tmp_path):
    cache, src = tmp_path / "cache", tmp_path / "run1" / "synthetic-data"
    out = train("ncp_dpo.py", tmp_path / "run1", "--model", "tiny", "--max-steps", "2", "--cache-latents", str(cache),
                nproc=2).stdout
    assert "54 to encode" in out and "this rank encoded" in out and "LoRA weights identical on all 2 ranks: True" in out
    out = train("ncp_sft.py", tmp_path / "run2", "--model", "tiny", "--max-steps", "2", "--data", str(src),
                "--cache-latents", str(cache)).stdout
    assert "54 of 54 pairs cached, 0 to encode" in out
    assert len(os.listdir(cache)) == 1 and [m["step"] for m in metrics(tmp_path / "run2")] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics(tmp_path / "run1"))
