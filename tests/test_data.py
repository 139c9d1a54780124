"""data.py: the pair table and the absolute-winner filter on hand-computed cases, bad data, sharding, resume."""

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
import sample

JPG = data.jpeg_bytes(Image.new("RGB", (40, 32), (200, 10, 10)))


def write_rows(path, rows, jpg=JPG):
    """rows: (caption, uid_0, uid_1, label_0[, are_different]) -> a Pick-a-Pic-format shard."""
    table = {"caption": [r[0] for r in rows], "image_0_uid": [r[1] for r in rows], "image_1_uid": [r[2] for r in rows],
             "label_0": [float(r[3]) for r in rows], "label_1": [1 - float(r[3]) for r in rows],
             "are_different": [r[4] if len(r) > 4 else True for r in rows], "has_label": [True] * len(rows),
             "jpg_0": [jpg] * len(rows), "jpg_1": [jpg] * len(rows)}
    pq.write_table(pa.table(table), path, row_group_size=2)


ROWS = [
    ("p1", "A", "B", 1),        # A beats B
    ("p1", "A", "C", 1),        # A beats C            -> A: 2 wins, absolute
    ("p2", "D", "E", 0),        # E beats D            -> E: win ...
    ("p2", "E", "F", 0),        # ... and F beats E    -> E lost once: not absolute; F absolute
    ("p3", "G", "H", 0.5),      # tie: a draw for G and H, dropped
    ("p3", "G", "I", 1),        # G wins but drew above: not absolute
    ("p4", "J", "K", 1, False), # identical images: dropped; J won here
    ("p5", "L", "M", 1),        # L absolute
    (None, "N", "O", 1),        # missing caption: dropped
]


def test_pairs_hand_computed(tmp_path):
    write_rows(tmp_path / "train-00000-of-00001.parquet", ROWS)
    pairs, counts = data.preference_pairs(str(tmp_path), "train")
    assert pairs["winner_uid"].to_pylist() == ["A", "A", "E", "F", "G", "L"]
    assert pairs["loser_uid"].to_pylist() == ["B", "C", "D", "E", "I", "M"]
    assert pairs["winner_col"].to_pylist() == [0, 0, 1, 1, 0, 0]
    assert counts == {"format": "pickapic", "rows": 9, "unlabeled": 0, "ties": 1, "identical": 1, "missing_caption": 1,
                      "filtered_out": 0, "pairs": 6, "prompts": 4}

    pairs, counts = data.preference_pairs(str(tmp_path), "train", filter="absolute-winners")
    assert pairs["winner_uid"].to_pylist() == ["A", "A", "F", "L"]
    assert counts["filtered_out"] == 2 and counts["pairs"] == 4 and counts["prompts"] == 3


def test_filter_spans_shards_and_reads_no_image_bytes(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data" / "train-00000-of-00002.parquet", ROWS[:3])
    write_rows(tmp_path / "data" / "train-00001-of-00002.parquet", ROWS[3:])
    write_rows(tmp_path / "data" / "validation-00000-of-00001.parquet", [("q", "E", "Z", 0)])  # other split
    read = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda p, columns=None, **k: read.append(columns) or real(p, columns=columns, **k))
    pairs, _ = data.preference_pairs(str(tmp_path), "train", filter="absolute-winners")
    assert pairs["winner_uid"].to_pylist() == ["A", "A", "F", "L"]
    assert len(read) == 2 and all(c is not None and "jpg_0" not in c and "jpg_1" not in c for c in read)
    assert pairs["shard"].to_pylist()[2].endswith("train-00001-of-00002.parquet")
    assert pairs["row"].to_pylist() == [0, 1, 0, 4]


def test_bad_sources_fail_with_what_was_found(tmp_path):
    with pytest.raises(data.DataError, match=r"no train data in .* looked for train-\*.parquet"):
        data.preference_pairs(str(tmp_path), "train")
    pq.write_table(pa.table({"caption": ["x"], "label_0": [1.0]}), tmp_path / "train-0.parquet")
    with pytest.raises(data.DataError, match=r"none of the known formats \(columns \['caption', 'label_0'\]\)"):
        data.preference_pairs(str(tmp_path), "train")
    pq.write_table(pa.table({"caption": ["x"], "label_0": [1.0], "jpg_0": [b""], "jpg_1": [b""]}),
                   tmp_path / "train-0.parquet")
    with pytest.raises(data.DataError, match=r"lacks the columns \['image_0_uid', 'image_1_uid'\]"):
        data.preference_pairs(str(tmp_path), "train")
    with pytest.raises(data.DataError, match="not a directory"):
        data.preference_pairs(str(tmp_path / "nope"), "train")


def _item_dataset(tmp_path, images):
    """One pair per image (winner = that image, loser = a good JPEG)."""
    rows = {"caption": [f"c{i}" for i in range(len(images))], "label_0": [1.0] * len(images),
            "label_1": [0.0] * len(images), "image_0_uid": [f"w{i}" for i in range(len(images))],
            "image_1_uid": [f"l{i}" for i in range(len(images))], "jpg_0": images, "jpg_1": [JPG] * len(images)}
    pq.write_table(pa.table(rows), tmp_path / "train-00000-of-00001.parquet", row_group_size=2)
    pairs, _ = data.preference_pairs(str(tmp_path), "train")
    return data.PreferenceDataset(pairs, resolution=16, train=False)


def _png(mode, color):
    buffer = io.BytesIO()
    Image.new(mode, (20, 24), color).save(buffer, format="PNG" if mode != "CMYK" else "JPEG")
    return buffer.getvalue()


def test_corrupt_images_skipped_and_modes_converted(tmp_path):
    images = [JPG, JPG[:50], b"not an image", _png("RGBA", (0, 0, 255, 0)), _png("L", 128), _png("CMYK", (0, 0, 0, 0))]
    ds = _item_dataset(tmp_path, images)
    item = ds[1]  # corrupt -> skipped twice, lands on the RGBA pair
    assert item["skipped"] == 2 and item["caption"] == "c3" and item["converted"] == 1
    assert torch.allclose(item["pixels"][0], torch.ones(3, 16, 16))  # transparent -> composited on white
    for i in (4, 5):
        item = ds[i]
        assert item["skipped"] == 0 and item["converted"] == 1 and item["pixels"].shape == (2, 3, 16, 16)
    assert ds[0]["skipped"] == 0 and ds[0]["converted"] == 0


def test_micro_conditioning_and_joint_flip(tmp_path):
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 30))  # white stripe on the left
    stripe = data.jpeg_bytes(image, 95)
    ds = _item_dataset(tmp_path, [stripe])
    item = ds[0]
    assert item["original_sizes"].tolist() == [[30, 60], [32, 40]]  # (h, w) of each stored image
    assert item["crops_top_left"][0].tolist() == [0, 8]  # resized to 16 x 32, the centre crop starts at 8
    rows = {"caption": ["c"], "label_0": [1.0], "label_1": [0.0], "image_0_uid": ["a"], "image_1_uid": ["b"],
            "jpg_0": [stripe], "jpg_1": [stripe]}
    pq.write_table(pa.table(rows), tmp_path / "train-00000-of-00001.parquet")
    pairs, _ = data.preference_pairs(str(tmp_path), "train")
    train = data.PreferenceDataset(pairs, resolution=16, train=True, seed=0)
    flipped = set()
    for position in range(20):
        a = train[(0, position)]
        assert torch.equal(a["pixels"], train[(0, position)]["pixels"])  # the position fixes crop and flip
        assert torch.equal(a["pixels"][0], a["pixels"][1])  # winner and loser cropped and flipped together
        top, left = a["crops_top_left"][0].tolist()
        is_flipped = bool(a["pixels"][0, 0, 8, -1] > a["pixels"][0, 0, 8, 0])  # the stripe moved to the right
        assert top == 0 and 0 <= left <= 16
        flipped.add(is_flipped)
    assert flipped == {True, False}


def test_sampler_shares_disjoint_cover_and_resume():
    n, micro, world = 24, 3, 2
    streams = []
    for rank in range(world):
        it = iter(data.PairSampler(n, micro, rank, world, seed=5))
        streams.append([next(it) for _ in range(n // world)])
    firsts = [{i for i, _ in s} for s in streams]
    assert firsts[0].isdisjoint(firsts[1]) and firsts[0] | firsts[1] == set(range(n))
    positions = sorted(p for s in streams for _, p in s)
    assert positions == list(range(n))
    # The next epoch is a different order; a resumed sampler continues exactly where the straight one was.
    straight = iter(data.PairSampler(n, micro, 1, world, seed=5))
    seq = [next(straight) for _ in range(30)]
    resumed = iter(data.PairSampler(n, micro, 1, world, seed=5, start=5 * micro * world))
    assert [next(resumed) for _ in range(15)] == seq[15:]
    # One rank with twice the micro-batch sees the same pairs per step as two ranks together.
    one = iter(data.PairSampler(n, micro * world, 0, 1, seed=5))
    assert sorted(next(one)[0] for _ in range(micro * world)) == sorted(i for s in streams for i, _ in s[:micro])


def test_loader_resume_matches_straight_run(tmp_path):
    src = data.write_synthetic(str(tmp_path / "syn"), n=20)
    pairs, counts = data.preference_pairs(src, "train")
    assert counts["ties"] == 2 and counts["identical"] == 1 and counts["pairs"] == 17
    ds = data.PreferenceDataset(pairs, resolution=16, seed=1)
    straight = iter(data.make_loader(ds, 2, seed=1, num_workers=0))
    batches = [next(straight) for _ in range(12)]  # crosses an epoch boundary (17 pairs)
    resumed = iter(data.make_loader(ds, 2, seed=1, start=14, num_workers=2))
    for a, b in zip(batches[7:], [next(resumed) for _ in range(5)]):
        assert a["caption"] == b["caption"] and torch.equal(a["pixels"], b["pixels"])


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_batch_shapes_for_training(tmp_path, kind):
    models = sample.build_tiny(kind)
    src = data.write_synthetic(str(tmp_path / "syn"), n=8)
    pairs, _ = data.preference_pairs(src, "train")
    batch = next(iter(data.make_loader(data.PreferenceDataset(pairs, 32), 3, num_workers=0)))
    assert batch["pixels"].shape == (3, 2, 3, 32, 32) and batch["original_sizes"].shape == (3, 2, 2)
    pixels = batch["pixels"].transpose(0, 1).flatten(0, 1)  # (2B, 3, R, R): winners, then losers
    latents = sample.encode_images(models.vae, pixels)
    cond = sample.encode_prompt(models, batch["caption"] * 2, batch["original_sizes"].transpose(0, 1).flatten(0, 1),
                                batch["crops_top_left"].transpose(0, 1).flatten(0, 1), [32, 32])
    assert models.unet(latents, torch.tensor([1] * 6), **cond).sample.shape == latents.shape == (6, 4, 16, 16)


def test_a_16_bit_grey_png_keeps_its_levels_and_exif_orientation_is_applied():
    """A 16-bit grey PNG once clipped to white above 255 (of 65535); a phone photo's EXIF orientation was ignored."""
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(buf, "PNG")
    image, converted = data.load_image(buf.getvalue())
    assert converted and np.asarray(image)[0, :, 0].tolist() == [0, 128, 255]
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[0, 0] = 255  # the top-left corner, white
    photo = Image.fromarray(pixels)
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    photo.save(buf, "PNG", exif=exif)
    image, converted = data.load_image(buf.getvalue())
    assert image.size == (2, 4) and not converted
    assert np.asarray(image)[0, 1].tolist() == [255, 255, 255]  # the white corner, now at the top right


def test_labels_other_than_0_half_and_1_are_counted_as_unlabeled(tmp_path):
    """A label of 0.7 or 2 (a copy that rescaled them) once vanished from every count."""
    write_rows(tmp_path / "train-00000-of-00001.parquet",
               [("p1", "A", "B", 1), ("p1", "C", "D", 0.7), ("p2", "E", "F", 2.0), ("p2", "G", "H", float("nan"))])
    pairs, counts = data.preference_pairs(str(tmp_path), "train")
    assert pairs.num_rows == 1 and counts["unlabeled"] == 3 and counts["ties"] == 0


@pytest.mark.parametrize("change, message", [
    ({"caption": pa.array([1, 2])}, "its column caption holds int64, not text"),
    ({"jpg_0": pa.array(["x", "y"])}, "its column jpg_0 holds string, not image bytes"),
    ({"label_0": pa.array(["abc", "1"])}, "its column label_0 holds string, not a number"),  # once blamed on truncation
    ("empty", "has no rows (1 files, all empty)"),
])
def test_a_shard_of_other_types_or_no_rows_is_one_line(tmp_path, change, message):
    columns = {"caption": pa.array(["a", "b"]), "jpg_0": pa.array([b"x", b"y"]), "jpg_1": pa.array([b"x", b"y"]),
               "label_0": pa.array([1.0, 0.0]), "label_1": pa.array([0.0, 1.0]), "image_0_uid": pa.array(["u", "v"]),
               "image_1_uid": pa.array(["w", "z"])}
    table = pa.table(columns).slice(0, 0) if change == "empty" else pa.table({**columns, **change})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.preference_pairs(str(tmp_path), "train")
