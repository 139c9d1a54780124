"""Every data format users have today, each generated here in its exact layout: the pairs, ties, the winner's
side, the filter and bad data; and training runs on each under torchrun, with an exact resume on WebDataset."""

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from helpers import lora, metrics, train

COLORS = {k: (20 * i, 255 - 20 * i, (90 * i) % 256) for i, k in enumerate("ABCDEFGHIJKLM")}
IMAGE = {k: data.jpeg_bytes(Image.new("RGB", (40, 32), c)) for k, c in COLORS.items()}
# caption, image 0, image 1, label_0 (1: image 0 wins, 0: image 1 wins, 0.5 tie, nan unlabeled)
ROWS = [("p0", "A", "B", 1.0), ("p0", "A", "C", 1.0), ("p1", "B", "D", 0.5), ("p2", "E", "F", 0.0),
        ("p3", "G", "A", 0.0), ("p4", "H", "H", 1.0), ("", "I", "J", 1.0), ("p5", "K", "L", float("nan")),
        ("p6", "M", "A", 1.0)]
WINNERS = ["A", "A", "F", "A", "M"]  # rows 0, 1, 3, 4, 8
ABSOLUTE = ["F", "M"]  # A lost in row 8, so only F and M never lost or drew
COUNTS = {"unlabeled": 1, "ties": 1, "identical": 1, "missing_caption": 1}


def decisive_rows():
    """The rows a format that always knows its winner can hold, winner first: no ties, nothing unlabeled."""
    return [(c, a, b) if label == 1 else (c, b, a) for c, a, b, label in ROWS if label in (0.0, 1.0)]


def write_chosen_rejected(root):
    rows = decisive_rows()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"prompt": [c for c, _, _ in rows],
                      "chosen": pa.array([{"bytes": IMAGE[a], "path": f"{a}.jpg"} for _, a, _ in rows], struct),
                      "rejected": [IMAGE[b] for _, _, b in rows], "__index_level_0__": list(range(len(rows)))})
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    pq.write_table(table, os.path.join(root, "data", "train-00000-of-00001.parquet"), row_group_size=3)
    return str(root)


def write_webdataset(root, rows=ROWS, shards=2, bad=()):
    """Tars of Pick-a-Pic samples; the keys restart in each shard, as in the hub's tars. bad: (row, what)."""
    os.makedirs(root, exist_ok=True)
    for s, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tar:
            for key, r in enumerate(part):
                caption, a, b, label = rows[r]
                members = {"jpg_0.jpg": IMAGE[a], "jpg_1.jpg": IMAGE[b], "original_prompt.txt": caption.encode(),
                           "label_0.txt": b"abc" if label != label else str(label).encode(),
                           "label_1.txt": b"abc" if label != label else str(1 - label).encode()}
                for row, what in bad:
                    if row == r and what == "missing":
                        del members["jpg_1.jpg"]
                    elif row == r and what == "corrupt":
                        members["jpg_0.jpg"] = b"not a jpeg"
                for suffix, payload in members.items():
                    info = tarfile.TarInfo(f"{key:06d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root)


def write_images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        path = os.path.join(folder, f"{name}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(IMAGE[os.path.basename(name)])


def write_hpdv2(root):
    """train.json at the root, its file_path relative to the unpacked train/ folder."""
    records = []
    for caption, a, b, label in ROWS:
        pref = ["x", 0] if label != label else [1, 1] if label == 0.5 else [int(label), 1 - int(label)]
        records.append({"prompt": caption, "file_path": [f"{a}.jpg", f"{b}.jpg"], "human_preference": pref,
                        "user_hash": "u"})
    write_images(os.path.join(root, "train"), list(COLORS))
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump(records, f)
    return str(root)


def write_hpdv3(root):
    """train.json at the root, paths relative to it; path1 always the preferred image."""
    model = {k: f"m{i % 3}" for i, k in enumerate(COLORS)}  # an image keeps its path in all its comparisons
    records = [{"prompt": c, "path1": f"images/{model[a]}/{a}.jpg", "path2": f"images/{model[b]}/{b}.jpg",
                "model1": model[a], "model2": model[b], "choice_dist": [3, 1], "confidence": 0.9}
               for c, a, b in decisive_rows()]
    write_images(os.path.join(root, "images"), [f"{model[k]}/{k}" for k in COLORS])
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump(records, f)
    return str(root)


def write_pickapic(root):
    rows = {"caption": [r[0] for r in ROWS], "jpg_0": [IMAGE[r[1]] for r in ROWS], "jpg_1": [IMAGE[r[2]] for r in ROWS],
            "label_0": [r[3] for r in ROWS], "label_1": [1 - r[3] for r in ROWS],
            "image_0_uid": [r[1] for r in ROWS], "image_1_uid": [r[2] for r in ROWS],
            "are_different": [r[1] != r[2] for r in ROWS], "has_label": [r[3] == r[3] for r in ROWS],
            "__index_level_0__": list(range(len(ROWS)))}  # the stray column of the hub's copy
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(root, "data", "train-00000-of-00001.parquet"))
    return str(root)


WRITERS = {"pickapic": write_pickapic, "chosen-rejected": write_chosen_rejected, "webdataset": write_webdataset,
           "hpdv2": write_hpdv2, "hpdv3": write_hpdv3}


def winners(pairs):
    """The winner of each pair, read back from its image bytes: the side is never taken on trust."""
    ds = data.PreferenceDataset(pairs, 16, train=False)
    by_bytes = {v: k for k, v in IMAGE.items()}
    return [by_bytes[ds._read_images(i)[0]] for i in range(len(ds))], [by_bytes[ds._read_images(i)[1]] for i in range(len(ds))]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_gives_the_same_pairs_and_filter(tmp_path, fmt):
    source = WRITERS[fmt](tmp_path / fmt)
    pairs, counts = data.preference_pairs(source, "train")
    full_rows = fmt in ("pickapic", "webdataset", "hpdv2")  # formats with labels: ties, unlabeled rows
    assert counts["format"] == fmt and counts["rows"] == (9 if full_rows else 7)
    won, lost = winners(pairs)
    # Identities: uids (pickapic) and paths (HPD) see the identical pair; byte hashes only when filtering.
    identical = fmt in ("pickapic", "hpdv2", "hpdv3")
    assert sorted(won) == sorted(WINNERS + ([] if identical else ["H"]))
    assert all(w != ll or w == "H" for w, ll in zip(won, lost))
    expected = {"unlabeled": 1 if full_rows else 0, "ties": 1 if full_rows else 0,
                "identical": 1 if identical else 0, "missing_caption": 1}
    assert {k: counts[k] for k in expected} == expected and counts["pairs"] == len(won)

    pairs, counts = data.preference_pairs(source, "train", filter="absolute-winners")
    won, _ = winners(pairs)
    assert sorted(won) == ABSOLUTE and counts["identical"] == 1  # with identities every format sees H = H
    assert counts["filtered_out"] == len(WINNERS) - len(ABSOLUTE)


def test_webdataset_reads_each_member_in_place_and_counts_bad_data(tmp_path):
    source = write_webdataset(tmp_path / "wds", bad=[(0, "missing"), (3, "corrupt")])
    pairs, counts = data.preference_pairs(source, "train")
    assert counts["pairs"] == 6 and pairs["shard"].to_pylist()[-1].endswith("00001.tar")  # H-H: no hashes
    assert pairs["winner_uid"].to_pylist()[0] != pairs["winner_uid"].to_pylist()[-1]  # keys repeat across shards
    ds = data.PreferenceDataset(pairs, 16, train=False)
    assert ds[0]["skipped"] == 1 and ds[0]["caption"] == "p0"  # row 0 lacks its loser: row 1 comes instead
    assert ds[2]["skipped"] == 1 and ds[2]["caption"] == "p3"  # row 3's winner is corrupt
    with open(ds.paths[ds.shard[3]], "rb") as f:  # the place of a member is its bytes in the tar
        f.seek(int(ds.places["winner_at"][3]))
        assert f.read(int(ds.places["winner_size"][3])) == IMAGE["A"]


def test_the_hashing_pass_is_kept_as_a_manifest(tmp_path, monkeypatch):
    source = write_webdataset(tmp_path / "wds")
    hashed = []
    real = data.content_id
    monkeypatch.setattr(data, "content_id", lambda b: hashed.append(1) or real(b))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    first, counts = data.preference_pairs(source, "train", filter="absolute-winners")
    assert len(hashed) == 2 * len(ROWS)  # every image once
    again, counts_again = data.preference_pairs(source, "train", filter="absolute-winners")
    assert len(hashed) == 2 * len(ROWS) and again.equals(first) and counts_again == counts  # read, not hashed
    manifest = os.listdir(tmp_path / "home" / "ncp" / "manifests")
    about = json.loads(pq.read_schema(tmp_path / "home" / "ncp" / "manifests" / manifest[0]).metadata[b"manifest"])
    assert about["format"] == "webdataset" and about["source"] == source and len(about["files"]) == 2
    os.utime(os.path.join(source, "00001.tar"), ns=(1, 1))  # a changed shard: the pass runs again
    data.preference_pairs(source, "train", filter="absolute-winners")
    assert len(hashed) == 4 * len(ROWS)


def test_hpd_missing_image_is_skipped_and_unpacked_images_are_required(tmp_path):
    source = write_hpdv3(tmp_path / "v3")
    os.remove(os.path.join(source, "images", "m0", "A.jpg"))  # the first pair's winner
    pairs, _ = data.preference_pairs(source, "train")
    item = data.PreferenceDataset(pairs, 16, train=False)[0]
    assert item["skipped"] == 2 and item["caption"] == "p2"  # both of A's pairs as winner are skipped
    empty = tmp_path / "v2"
    os.makedirs(empty)
    with open(empty / "train.json", "w") as f:
        json.dump([{"prompt": "p", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]}], f)
    with pytest.raises(data.DataError, match="not under .* unpack the dataset's image archives"):
        data.preference_pairs(str(empty), "train")


def test_sources_in_no_format_name_what_they_hold(tmp_path):
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        info = tarfile.TarInfo("a.png")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(data.DataError, match=r"none of the known formats \(members \['a.png'\]\)"):
        data.preference_pairs(str(tmp_path / "x.tar"), "train")
    with open(tmp_path / "train.json", "w") as f:
        json.dump([{"text": "p", "img": "a.jpg"}], f)
    with pytest.raises(data.DataError, match=r"none of the known formats \(keys \['img', 'text'\]\)"):
        data.preference_pairs(str(tmp_path / "train.json"), "train")
    pq.write_table(pa.table({"question": ["q"], "chosen": ["a"]}), tmp_path / "train-0.parquet")
    with pytest.raises(data.DataError, match=r"columns \['chosen', 'question'\]"):
        data.preference_pairs(str(tmp_path / "train-0.parquet"), "train")


@pytest.mark.parametrize("fmt, nproc", [("chosen-rejected", 1), ("webdataset", 2), ("hpdv2", 1), ("hpdv3", 1)])
def test_training_on_each_format_and_under_torchrun(tmp_path, fmt, nproc):
    """Each format trains. Under torchrun, every rank reads the same pairs from the format's reader and the shared
    loader shards them (data.make_loader, the same for every format): one format there covers them; the tar
    reader, the one with state of its own, is that one."""
    source = WRITERS[fmt](tmp_path / fmt)
    out = train("ncp_dpo.py", tmp_path / "run", "--model", "tiny", "--max-steps", "2", "--data", source,
                "--filter", "absolute-winners", nproc=nproc).stdout
    assert f'"format": "{fmt}"' in out and '"pairs": 2' in out
    assert nproc == 1 or "LoRA weights identical on all 2 ranks: True" in out
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]


def test_webdataset_resume_is_exact(tmp_path):
    rows = [(f"p{i}", "ABCDEFGHIJKLM"[i % 13], "ABCDEFGHIJKLM"[(i + 5) % 13], float(i % 2)) for i in range(20)]
    source = write_webdataset(tmp_path / "wds", rows=rows, shards=3)
    train("ncp_dpo.py", tmp_path / "straight", "--model", "tiny", "--max-steps", "4", "--data", source)
    train("ncp_dpo.py", tmp_path / "resumed", "--model", "tiny", "--max-steps", "2", "--data", source)
    train("ncp_dpo.py", tmp_path / "resumed", "--model", "tiny", "--max-steps", "4", "--data", source, "--resume")
    a, b = lora(tmp_path / "straight"), lora(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
