"""Preference pairs from the formats users have, the paper's absolute-winner filter, and the training dataset.

    pairs, counts = preference_pairs("/data/pickapic_v2", "train", filter="absolute-winners")
    dataset = PreferenceDataset(pairs, resolution=1024)
    loader = make_loader(dataset, micro_batch=1, rank=0, world_size=4, seed=0, start=0)

Formats (FORMATS), told apart by what the files hold, never by their names: Pick-a-Pic parquet (v1, v2 and its
copies), parquet with chosen/rejected image columns, WebDataset tars (Pick-a-Pic's members), HPDv2 and HPDv3
JSON beside their image folders. A source is a directory, a glob, a file, or a hub dataset id (parquet only; only
the chosen split is fetched). Every format becomes the same pairs table, with the same rules: ties, unlabeled
rows (a label other than 0, 0.5 or 1 counts as none), identical images and empty prompts are dropped and counted.

The filter (NCP paper, section 5, Table 2): a contradictory image, a winner in one pair and a loser or tie in
another, adds noise to the Bradley-Terry gradient (eqs. 16-17). Only pairs whose winner is an *absolute
winner* are kept: an image with at least one win and no loss or draw anywhere in the split. Images are known by
the format's uids (Pick-a-Pic), their paths (HPD), or else a hash of their bytes, computed only when filtering.
The pass reads metadata only, except for those hashes; image bytes are read per item.

write_synthetic makes a tiny generated Pick-a-Pic set.
"""
import collections
import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import random
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

# The default source: a full copy of Pick-a-Pic v2 (the original yuvalkirstain/pickapic_v2 is gone from the hub),
# the same columns and splits. Not pinned here: the hub takes only full 40-digit commit hashes, and none could be
# checked for this copy. Pin it yourself: download one commit (`hf download ... --revision COMMIT`; docs/data.md
# has the download commands) and pass its local directory.
PICKAPIC = "liuhuohuo2/pick-a-pic-v2"
SIZES = {PICKAPIC: {"train": "about 335 GB (images inside the parquet shards)"}}  # said before a download starts
META = ["caption", "label_0", "label_1", "image_0_uid", "image_1_uid", "are_different", "has_label"]
REQUIRED = ["caption", "label_0", "image_0_uid", "image_1_uid"]
OPEN_FILES = 16  # shard files a DataLoader worker keeps open


class DataError(ValueError):
    """A data source that is missing, empty or in none of the known formats."""


# -----------------------------------------------------------------------------
# Finding the source and its format

# The formats, each told by what its files hold (detect), and the image columns of side 0 and 1 in parquet.
FORMATS = {
    "pickapic": "parquet with caption, jpg_0, jpg_1, label_0 (Pick-a-Pic v1/v2 and their copies)",
    "chosen-rejected": "parquet with prompt or caption, chosen, rejected (images as bytes or {bytes, path})",
    "webdataset": "tar shards with <key>.jpg_0.*, <key>.jpg_1.*, <key>.label_0.txt, <key>.original_prompt.txt",
    "hpdv2": "JSON list of {prompt, file_path: [a, b], human_preference: [x, y]} beside the image folder",
    "hpdv3": "JSON list of {prompt, path1, path2, ...}, path1 the preferred image, beside the image folder",
}
IMAGE_COLUMNS = {"pickapic": ("jpg_0", "jpg_1"), "chosen-rejected": ("chosen", "rejected")}


def find_source(source, split="train"):
    """(format, sorted paths) of `split` in a directory, a glob, a file or a hub dataset id.

    The format is read from what is there (parquet columns, tar member names, JSON keys), never from a name."""
    if os.path.isdir(source):
        patterns = [f"{split}-*.parquet", f"data/{split}-*.parquet", f"{split}/*.parquet", f"{split}.json",
                    f"{split}.jsonl", "*.tar", f"{split}/*.tar", f"data/{split}/*.tar"]
        paths = []
        for pattern in patterns:  # the first layout that matches
            paths = paths or glob.glob(os.path.join(source, pattern))
        if not paths:
            found = sorted(os.path.relpath(os.path.join(folder, name), source)
                           for folder, _, names in os.walk(source)  # symlinked folders not followed: no loops
                           for name in names if name.endswith((".parquet", ".json", ".jsonl", ".tar")))
            raise DataError(f"no {split} data in {source}: looked for {', '.join(patterns)} (found: "
                            f"{', '.join(found[:5]) + (' ...' if len(found) > 5 else '') if found else 'nothing'})")
    elif any(c in source for c in "*?["):
        paths = glob.glob(source)
        if not paths:
            raise DataError(f"the glob {source} matches no file")
    elif os.path.isfile(source):
        paths = [source]
    elif source.count("/") == 1 and not source.startswith((".", "/")):
        return find_source(fetch(source, split), split)
    else:
        raise DataError(f"data source {source!r} is not a directory, a file, a glob or a hub dataset id")
    paths = sorted(paths)
    return detect(paths), paths


def fetch(repo, split):
    """A local copy of a hub dataset's parquet shards of `split` (only those are fetched)."""
    from huggingface_hub import snapshot_download

    patterns = [f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}/*.parquet"]
    size = SIZES.get(repo, {}).get(split)
    print(f"data: fetching split {split!r} of the hub dataset {repo}" + (f", {size}," if size else "")
          + " into the hub cache; docs/data.md shows how to download it once to a local directory", flush=True)
    try:
        return snapshot_download(repo, repo_type="dataset", allow_patterns=patterns)
    except Exception as e:
        raise DataError(f"could not fetch split {split!r} of the hub dataset {repo} ({type(e).__name__}); "
                        "download it (docs/data.md has the commands) and pass the local directory") from None


def detect(paths):
    """The format of these files, from their columns, members or keys. Raises DataError naming what it found."""
    kinds = {os.path.splitext(p)[1] for p in paths}
    if len(kinds) > 1:
        raise DataError(f"the source mixes file types {sorted(kinds)}; give one format at a time")
    kind = kinds.pop()
    with readable(paths[0]):
        return _detect(kind, paths)


def _detect(kind, paths):
    if kind == ".parquet":
        names = set(pq.read_schema(paths[0]).names)
        if {"jpg_0", "jpg_1", "label_0", "caption"} <= names:
            return "pickapic"
        if {"chosen", "rejected"} <= names and names & {"prompt", "caption"}:
            return "chosen-rejected"
        found = f"columns {sorted(names)}"
    elif kind == ".tar":
        with tarfile.open(paths[0]) as tar:
            members = [m.name for _, m in zip(range(20), tar)]
        if any(".jpg_0." in m for m in members) and any(m.endswith(".label_0.txt") for m in members):
            return "webdataset"
        found = f"members {members[:6]}"
    elif kind in (".json", ".jsonl"):
        first = next(iter(read_json(paths[0])), {})
        keys = set(first) if isinstance(first, dict) else set()
        if {"prompt", "path1", "path2"} <= keys:
            return "hpdv3"
        if {"prompt", "file_path", "human_preference"} <= keys:
            return "hpdv2"
        found = f"keys {sorted(keys)}"
    else:
        found = f"files {[os.path.basename(p) for p in paths[:3]]}"
    raise DataError(f"{paths[0]} is in none of the known formats ({found}); the formats: "
                    + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()))


@contextlib.contextmanager
def readable(path):
    """Reading `path`: a file that cannot be read (truncated, partly downloaded, not what its name says) is one
    DataError that names it."""
    try:
        yield
    except DataError:
        raise
    except (OSError, EOFError, ValueError, tarfile.TarError, pa.ArrowException) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} cannot be read ({why}): truncated or partly downloaded? Fetch it again, or move it "
                        "out of the source") from None


def check_columns(paths, needed):
    """Fail at once, naming what was found, if a shard lacks a needed column (reads the schema only)."""
    for path in paths:
        with readable(path):
            names = pq.read_schema(path).names
        missing = [c for c in needed if c not in names]
        if missing:
            raise DataError(f"{path} lacks the columns {missing} of its format; it has {names}")


def read_json(path):
    """The records of a JSON list or a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = []
            for number, line in enumerate(f, 1):
                try:
                    records += [json.loads(line.strip())] if line.strip() else []
                except ValueError as e:
                    raise DataError(f"{path}, line {number}: not a JSON record ({e})") from None
            return records
        try:
            records = json.load(f)
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise DataError(f"{path} is not a JSON list of comparisons")
    return records


# -----------------------------------------------------------------------------
# Pairs and the absolute-winner filter


def preference_pairs(source, split="train", filter="none"):
    """Usable preference pairs and the counts of what was dropped. Reads metadata only (see IDENTITIES).

    Returns (pairs, counts): pairs is a pyarrow Table with one row per pair: caption, winner_uid, loser_uid,
    shard (dictionary-encoded path), row (index in the shard), winner_col (0 or 1), and where the format keeps
    its images outside the shard rows, their place (winner_at/_size, loser_at/_size in a tar; winner_path,
    loser_path). Its schema metadata names the format. Ties (equal labels), identical images, unlabeled rows (no
    label, or a label that is not a number) and missing or empty captions are dropped, in every format.
    filter="absolute-winners" keeps a pair only if its winner won at least once and never lost or drew (a tie is a
    draw for both images) anywhere in the split.
    """
    if filter not in ("none", "absolute-winners"):
        raise ValueError(f"filter must be 'none' or 'absolute-winners', got {filter!r}")
    fmt, paths = find_source(source, split)
    if filter == "absolute-winners" and fmt in ("chosen-rejected", "webdataset"):
        table = hashed_metadata(fmt, paths, source)  # identities from the bytes: the pass is kept as a manifest
    else:
        table = read_metadata(fmt, paths)
    n = table.num_rows
    if not n:
        raise DataError(f"the {split} split of {source} has no rows ({len(paths)} files, all empty)")

    label_0 = table["label_0"].to_numpy(zero_copy_only=False).astype(np.float64)
    tie = label_0 == 0.5
    decisive = (label_0 == 0) | (label_0 == 1)
    labeled = tie | decisive  # NaN, or any other value (0.7, 2, -1): no label this project can read
    different = table["different"].to_numpy(zero_copy_only=False).astype(bool)
    caption = table["caption"]
    has_caption = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(caption)), 0), False)
    has_caption = has_caption.to_numpy(zero_copy_only=False)

    # One integer id per image identity, shared by both sides (2n strings hashed once).
    ids = pc.dictionary_encode(pa.chunked_array(table["id_0"].chunks + table["id_1"].chunks))
    ids = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in ids.chunks]).astype(np.int64)
    id_0, id_1 = ids[:n], ids[n:]
    different &= id_0 != id_1
    winner_col = np.where(label_0 == 1, 0, 1)
    winner = np.where(winner_col == 0, id_0, id_1)
    loser = np.where(winner_col == 0, id_1, id_0)

    keep = decisive & different & has_caption
    if filter == "absolute-winners":
        size = int(ids.max()) + 1 if n else 0
        wins = np.bincount(winner[decisive], minlength=size)
        losses_or_draws = (np.bincount(loser[decisive], minlength=size)
                           + np.bincount(id_0[tie], minlength=size) + np.bincount(id_1[tie], minlength=size))
        absolute = (wins > 0) & (losses_or_draws == 0)
        keep &= absolute[winner]

    first = pc.equal(pa.array(winner_col.astype(np.int8)), 0)
    columns = {"caption": caption, "winner_uid": pc.if_else(first, table["id_0"], table["id_1"]),
               "loser_uid": pc.if_else(first, table["id_1"], table["id_0"]),
               "shard": pa.DictionaryArray.from_arrays(table["shard"], pa.array(paths)), "row": table["row"],
               "winner_col": pa.array(winner_col.astype(np.int8))}
    for place in ("at", "size", "path"):  # where the images are, for formats that keep them outside the rows
        if f"{place}_0" in table.column_names:
            columns[f"winner_{place}"] = pc.if_else(first, table[f"{place}_0"], table[f"{place}_1"])
            columns[f"loser_{place}"] = pc.if_else(first, table[f"{place}_1"], table[f"{place}_0"])
    pairs = pa.table(columns).filter(pa.array(keep)).replace_schema_metadata({"format": fmt})
    counts = {"format": fmt, "rows": n, "unlabeled": int((~labeled).sum()), "ties": int(tie.sum()),
              "identical": int((decisive & ~different).sum()),
              "missing_caption": int((decisive & different & ~has_caption).sum()),
              "filtered_out": int((decisive & different & has_caption).sum() - keep.sum()),
              "pairs": pairs.num_rows,
              "prompts": int(pc.count_distinct(pairs["caption"]).as_py()) if pairs.num_rows else 0}
    return pairs, counts


def pairs_format(pairs):
    """The format a pairs table was read from (its schema metadata; pickapic for tables made before formats)."""
    return (pairs.schema.metadata or {}).get(b"format", b"pickapic").decode()


def comparisons(columns, shard):
    """The common metadata table of one shard: columns as arrays, plus the shard index and the row."""
    n = len(columns["label_0"])
    return pa.table({**columns, "shard": pa.array(np.full(n, shard, np.int32)),
                     "row": pa.array(np.arange(n, dtype=np.int64))})


def positions(shard, n):
    """Identities that are only places (shard, row, side): enough when no filter needs to recognise an image."""
    return [f"{shard}/{r}/0" for r in range(n)], [f"{shard}/{r}/1" for r in range(n)]


def content_id(data):
    """An image's identity from its bytes (BLAKE2b, 128 bits); '' for a missing image."""
    return hashlib.blake2b(data, digest_size=16).hexdigest() if data else ""


def image_bytes(value):
    """The bytes of a parquet image value: bytes, or a {bytes, path} struct as datasets writes images."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value


def check_types(path, schema):
    """DataError naming the column if a Pick-a-Pic shard's caption is not text, its label not a number, or its images
    not bytes (a copy written with other types reads as nonsense, or fails deep inside a computation)."""
    kinds = {"caption": (pa.types.is_string, pa.types.is_large_string, "text"),
             "label_0": (pa.types.is_floating, pa.types.is_integer, "a number"),
             "jpg_0": (pa.types.is_binary, pa.types.is_large_binary, "image bytes"),
             "jpg_1": (pa.types.is_binary, pa.types.is_large_binary, "image bytes")}
    for name, (one, other, what) in kinds.items():
        if name in schema.names:
            kind = schema.field(name).type
            if not (one(kind) or other(kind) or pa.types.is_null(kind) or pa.types.is_struct(kind) and "jpg" in name):
                raise DataError(f"{path}: its column {name} holds {kind}, not {what}; this is not a Pick-a-Pic shard "
                                "as written, convert it or move it out of the source")


def read_pickapic(path, i):
    schema = pq.read_schema(path)
    check_types(path, schema)
    t = pq.read_table(path, columns=[c for c in META if c in schema.names])
    n = t.num_rows
    label_0 = t["label_0"].to_numpy(zero_copy_only=False).astype(np.float64)
    label_0[~_bool_column(t, "has_label", n, default=True)] = np.nan
    return comparisons({"caption": t["caption"], "label_0": label_0, "id_0": t["image_0_uid"],
                        "id_1": t["image_1_uid"], "different": _bool_column(t, "are_different", n, True)}, i)


def read_chosen_rejected(path, i, hash_images):
    """chosen wins: label_0 = 1. Identities: content hashes when filtering (reads every image once), else places."""
    f = pq.ParquetFile(path)
    prompt = "prompt" if "prompt" in f.schema_arrow.names else "caption"
    caption = f.read(columns=[prompt])[prompt].cast(pa.string())
    n = len(caption)
    if hash_images:
        ids = [[], []]
        for g in range(f.num_row_groups):
            group = f.read_row_group(g, columns=["chosen", "rejected"])
            for side, column in enumerate(["chosen", "rejected"]):
                ids[side] += [content_id(image_bytes(v)) for v in group[column].to_pylist()]
    else:
        ids = positions(i, n)
    return comparisons({"caption": caption, "label_0": np.ones(n), "id_0": pa.array(ids[0]),
                        "id_1": pa.array(ids[1]), "different": np.ones(n, bool)}, i)


def read_webdataset(path, i, hash_images):
    """One comparison per sample key. Reads the tar headers (seeking past the data) and the small text members;
    the images' places are kept, so an item reads its own bytes. Identities: content hashes when filtering (reads
    every image once: the whole tar set), else places."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key, _, suffix = os.path.basename(member.name).partition(".")
                samples.setdefault(os.path.join(os.path.dirname(member.name), key), {})[suffix] = member
        rows = {k: [] for k in ("caption", "label_0", "at_0", "size_0", "at_1", "size_1")}
        ids = [[], []]
        for members in samples.values():
            def text(suffix):
                m = members.get(suffix)
                return tar.extractfile(m).read().decode("utf-8", "replace").strip() if m else None
            try:
                label = float(text("label_0.txt"))
            except (TypeError, ValueError):
                label = np.nan  # missing or not a number: unlabeled
            rows["caption"].append(text("original_prompt.txt") or text("caption.txt") or text("txt"))
            rows["label_0"].append(label)
            for side in (0, 1):
                m = next((m for s, m in members.items() if s.startswith(f"jpg_{side}.")), None)
                rows[f"at_{side}"].append(m.offset_data if m else -1)
                rows[f"size_{side}"].append(m.size if m else 0)
                if hash_images:
                    ids[side].append(content_id(tar.extractfile(m).read() if m else b""))
    n = len(rows["label_0"])
    if not hash_images:
        ids = positions(i, n)
    return comparisons({**{k: pa.array(v) for k, v in rows.items()}, "id_0": pa.array(ids[0], pa.string()),
                        "id_1": pa.array(ids[1], pa.string()), "different": np.ones(n, bool)}, i)


def image_root(path, records, side_paths):
    """The folder the JSON's image paths are relative to: its own folder, or the split's folder beside it."""
    base, split = os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(path))[0]
    sample = [p for r in records[:20] for p in side_paths(r) if isinstance(p, str)][:10]
    for root in (base, os.path.join(base, split), os.path.join(base, "images")):
        found = sum(os.path.exists(os.path.join(root, p)) for p in sample)
        if found and 2 * found >= len(sample):  # most of them: a few missing images are skipped when read
            return root
    raise DataError(f"the images of {path} are not under {base} or {os.path.join(base, split)} (looked for "
                    f"{sample[:2]}); unpack the dataset's image archives beside the JSON")


def inside(root, relative):
    """ROOT/RELATIVE if it resolves (symlinks and .. followed) to a place under ROOT, else "": an absolute or ../
    path in a downloaded JSON reads nothing outside the dataset (the pair is skipped and counted as missing)."""
    if not relative:
        return ""
    path = os.path.realpath(os.path.join(root, relative))
    return path if path.startswith(os.path.realpath(root) + os.sep) else ""


MAX_IMAGE_BYTES = 2**28  # 256 MiB: no image file of any dataset here comes near; /dev/zero would read forever


def read_file(path):
    """The bytes of a regular file of at most MAX_IMAGE_BYTES; else OSError or ValueError (the pair is skipped and
    counted). Opened without blocking, so a FIFO cannot hang the run."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"{path} is larger than {MAX_IMAGE_BYTES} bytes")
        return data
    finally:
        os.close(fd)


def read_hpd(fmt, path, i):
    """HPDv2 (human_preference decides; equal is a tie) or HPDv3 (path1 always wins). Identities: the image paths,
    which the comparisons of a prompt share."""
    records = read_json(path)
    if fmt == "hpdv3":
        sides = lambda r: [r.get("path1"), r.get("path2")]  # noqa: E731
    else:
        sides = lambda r: list(r.get("file_path") or [])  # noqa: E731
    root = image_root(path, records, sides)
    rows = {k: [] for k in ("caption", "label_0", "id_0", "id_1", "path_0", "path_1")}
    for r in records:
        pair = sides(r)
        label = 1.0 if fmt == "hpdv3" else np.nan
        if fmt == "hpdv2":
            try:
                a, b = (float(x) for x in r.get("human_preference"))
                label = 1.0 if a > b else 0.0 if a < b else 0.5
            except (TypeError, ValueError):
                pass  # not two numbers: unlabeled
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            label, pair = np.nan, ["", ""]
        prompt = r.get("prompt")
        rows["caption"].append(prompt if isinstance(prompt, str) else None)
        rows["label_0"].append(label)
        for side in (0, 1):
            rows[f"id_{side}"].append(pair[side])
            rows[f"path_{side}"].append(inside(root, pair[side]))
    n = len(records)
    return comparisons({**{k: pa.array(v) for k, v in rows.items()}, "different": np.ones(n, bool)}, i)


def read_metadata(fmt, paths, hash_images=False):
    """The comparisons of the files of one format, as one table: caption, label_0, id_0, id_1, different, shard,
    row, and the images' places where they lie outside the rows."""
    if fmt == "pickapic":
        check_columns(paths, REQUIRED)
    tables = []
    for i, path in enumerate(paths):
        with readable(path):
            extra = (hash_images,) if fmt in ("chosen-rejected", "webdataset") else ()
            tables.append(READERS[fmt](path, i, *extra))
    return pa.concat_tables(tables).combine_chunks()


def hashed_metadata(fmt, paths, source, root=None):
    """read_metadata with identities hashed from the image bytes, which reads every image once (the WebDataset
    copy of Pick-a-Pic: 563 GB). The result is kept as a manifest under `root`, named by the files' names, sizes
    and modification times, so a later run, or another user of the same copy, reads it instead."""
    root = root or os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache")), "ncp", "manifests")
    files = [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]
    path = os.path.join(root, hashlib.sha256(json.dumps([fmt, files]).encode()).hexdigest()[:16] + ".parquet")
    if os.path.exists(path):
        return pq.read_table(path).combine_chunks()
    table = read_metadata(fmt, paths, hash_images=True)
    os.makedirs(root, exist_ok=True)
    about = {"source": source, "format": fmt, "identities": "blake2b-128 of the image bytes", "files": files}
    pq.write_table(table.replace_schema_metadata({"manifest": json.dumps(about)}), path + f".{os.getpid()}.tmp")
    os.replace(path + f".{os.getpid()}.tmp", path)
    return table


def split_captions(source, split):
    """The distinct non-empty captions of a split, in order (for prompt lists), from the metadata only."""
    fmt, paths = find_source(source, split)
    if fmt in IMAGE_COLUMNS:
        column = "prompt" if "prompt" in pq.read_schema(paths[0]).names and fmt != "pickapic" else "caption"
        captions = [c for p in paths for c in pq.read_table(p, columns=[column])[column].to_pylist()]
    else:
        captions = read_metadata(fmt, paths)["caption"].to_pylist()
    return list(dict.fromkeys(c.strip() for c in captions if c and c.strip()))


READERS = {"pickapic": read_pickapic, "chosen-rejected": read_chosen_rejected, "webdataset": read_webdataset,
           "hpdv2": lambda path, i: read_hpd("hpdv2", path, i), "hpdv3": lambda path, i: read_hpd("hpdv3", path, i)}


def _bool_column(table, name, n, default):
    if name not in table.column_names:
        return np.full(n, default)
    return table[name].fill_null(default).to_numpy(zero_copy_only=False).astype(bool)


def largest_row_group(pairs):
    """Bytes read from disk for one image of the largest row group: its image columns' chunks (footers only).
    0 for formats outside parquet, whose items read their own bytes."""
    fmt = pairs_format(pairs)
    largest = 0
    shards = pairs["shard"].combine_chunks().dictionary.to_pylist() if pairs.num_rows else []
    for path in shards if fmt in IMAGE_COLUMNS else []:
        meta = pq.read_metadata(path)
        names = [meta.schema.column(c).path.split(".")[0] for c in range(meta.num_columns)]
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            largest = max(largest, sum(group.column(c).total_compressed_size for c, name in enumerate(names)
                                       if name in IMAGE_COLUMNS[fmt]))
    return largest


# -----------------------------------------------------------------------------
# The training dataset


class OpenFiles(collections.OrderedDict):
    """key -> an open file: a descriptor, or a tuple whose first item has close(). At most OPEN_FILES stay open, the
    least recently used is closed first. A copy for another process (a DataLoader worker) starts empty."""

    def opened(self, key, opener):
        if key in self:
            self.move_to_end(key)
        else:
            self[key] = opener()
            if len(self) > OPEN_FILES:
                old = self.popitem(last=False)[1]
                if isinstance(old, int):
                    os.close(old)
                else:
                    old[0].close()
        return self[key]

    def __reduce__(self):
        return OpenFiles, ()


def load_image(data):
    """JPEG/PNG bytes -> RGB PIL image, and whether it had to be converted from another mode (RGBA, L, CMYK, 16-bit
    grey). A photo's EXIF orientation is applied, as every viewer (and the rater who saw it) applies it."""
    from PIL import ImageOps

    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so that a corrupt file fails here
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: its top 8 bits, not its values clipped at 255
        grey = (np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), True
    if image.mode == "RGB":
        return image, False
    if image.mode in ("RGBA", "LA", "P"):  # composite transparency over white rather than black
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), True
    return image.convert("RGB"), True


MAX_ASPECT = 16  # the longest side of a training image, over its shortest; Pick-a-Pic's are within 2:1


def resize_crop(image, resolution, u, v, flip):
    """Resize the shorter side to `resolution`, crop at relative offset (u, v), maybe flip.

    Returns pixels (3, R, R) in [-1, 1] and the SDXL micro-conditioning: the original (h, w) of the image and
    the crop's (top, left) in the resized image (mirrored when flipped), as in SDXL's training recipe.
    """
    w, h = image.size
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if max(rw, rh) > MAX_ASPECT * resolution:  # a sliver: resizing it would ask for gigabytes; the item is skipped
        raise ValueError(f"an image of {w} x {h} pixels is more than {MAX_ASPECT}:1")
    image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    top, left = round(v * (rh - resolution)), round(u * (rw - resolution))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = rw - left - resolution
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return pixels, (h, w), (top, left)


class PreferenceDataset(torch.utils.data.Dataset):
    """Item i -> winner and loser pixels (2, 3, R, R), caption and SDXL micro-conditioning, decoded lazily.

    Keys are an index, or (index, position) from PairSampler: the position seeds the random crop and flip,
    so an item looks the same whatever the number of workers or ranks, and after a resume. A pair whose image
    cannot be decoded is replaced by the next usable pair and counted in "skipped"; images in another mode than
    RGB are converted and counted in "converted". winners_only=True decodes the winner alone (SFT).

    Image bytes come from the parquet shards, one row group's column at a time (the last one read is kept, so
    reading rows in order reads each row group once), or, given a built ImageStore, the pair's own bytes only.
    """

    def __init__(self, pairs, resolution, train=True, seed=0, winners_only=False, max_tries=32, store=None):
        self.pairs, self.resolution, self.train, self.seed = pairs, resolution, train, seed
        self.winners_only, self.max_tries, self.store = winners_only, max_tries, store
        self.paths = pairs["shard"].combine_chunks().dictionary.to_pylist() if pairs.num_rows else []
        self.format = pairs_format(pairs)
        if store is None and self.format in IMAGE_COLUMNS:
            check_columns(sorted(set(self.paths)), IMAGE_COLUMNS[self.format])
        elif store is not None and store.sides < (1 if winners_only else 2):
            raise ValueError("this image store holds the winners only")
        self.places = {k: pairs[k].to_numpy() if k.endswith(("_at", "_size")) else pairs[k].to_pylist()
                       for k in pairs.column_names if k.endswith(("_at", "_size", "_path"))}
        self.shard = pairs["shard"].combine_chunks().indices.to_numpy(zero_copy_only=False)
        self.row = pairs["row"].to_numpy()
        self.winner_col = pairs["winner_col"].to_numpy()
        self.captions = pairs["caption"].to_pylist()
        self._files = OpenFiles()  # per worker process: shard -> (ParquetFile, row-group starts), or a tar's fd
        self._group = (None, {})  # per worker process: (shard, row group), {column: its values}

    def __len__(self):
        return self.pairs.num_rows

    def __getstate__(self):
        return {**self.__dict__, "_group": (None, {})}

    def _file(self, shard):
        """The open shard: a ParquetFile and its row groups' first rows, or a tar's descriptor."""
        return self._files.opened(shard, lambda: self._open(shard))

    def _open(self, shard):
        if self.format == "webdataset":
            return os.open(self.paths[shard], os.O_RDONLY)
        f = pq.ParquetFile(self.paths[shard])
        return f, np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])

    def row_groups(self, indices):
        """(shard, row group) of each pair index, as one int64 per pair that sorts like the shards' order. Formats
        outside parquet have no row groups: each pair is its own."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.format not in IMAGE_COLUMNS:
            return indices
        out = np.empty(len(indices), np.int64)
        for shard in np.unique(self.shard[indices]):
            at = self.shard[indices] == shard
            starts = self._file(int(shard))[1]
            out[at] = (int(shard) << 32) + np.searchsorted(starts, self.row[indices[at]], side="right") - 1
        return out

    def _read_images(self, i):
        """The image bytes of pair i, [winner] or [winner, loser]; b"" or None for a missing image."""
        sides = ["winner"] if self.winners_only else ["winner", "loser"]
        if self.store is not None:
            return self.store.read(i, len(sides))
        if self.format == "webdataset":  # the members' own bytes, by their place in the tar
            fd = self._file(int(self.shard[i]))
            return [os.pread(fd, int(self.places[f"{s}_size"][i]), int(self.places[f"{s}_at"][i]))
                    if self.places[f"{s}_at"][i] >= 0 else b"" for s in sides]
        if self.format in ("hpdv2", "hpdv3"):
            return [read_file(self.places[f"{s}_path"][i]) for s in sides]
        w = int(self.winner_col[i])
        shard = int(self.shard[i])
        f, starts = self._file(shard)
        group = int(np.searchsorted(starts, self.row[i], side="right") - 1)
        if self._group[0] != (shard, group):
            self._group = ((shard, group), {})
        values = self._group[1]
        images = IMAGE_COLUMNS[self.format]
        columns = [images[w]] if self.winners_only else [images[w], images[1 - w]]
        for c in columns:
            if c not in values:  # each column chunk of the row group is read once while the rows stay in it
                values[c] = f.read_row_group(group, columns=[c]).column(0)
        offset = int(self.row[i] - starts[group])
        return [image_bytes(values[c][offset].as_py()) for c in columns]

    def __getitem__(self, key):
        index, position = key if isinstance(key, tuple) else (key, key)
        rng = random.Random(self.seed * 1_000_003 + position)
        u, v = (rng.random(), rng.random()) if self.train else (0.5, 0.5)
        flip = self.train and rng.random() < 0.5
        skipped = 0
        for attempt in range(self.max_tries):
            i = (index + attempt) % len(self)
            try:
                images = [load_image(b) for b in self._read_images(i)]
            except DataError:  # a damaged image store: not the pair's fault, and no other pair would read
                raise
            except (OSError, ValueError, pa.ArrowException, Image.DecompressionBombError):  # corrupt, missing: skip
                skipped += 1
                continue
            if not self.captions[i]:
                skipped += 1
                continue
            out = [resize_crop(image, self.resolution, u, v, flip) for image, _ in images]
            return {"pixels": torch.stack([o[0] for o in out]),  # (2, 3, R, R): winner, loser
                    "index": i, "original_sizes": torch.tensor([o[1] for o in out]),
                    "crops_top_left": torch.tensor([o[2] for o in out]),
                    "caption": self.captions[i], "skipped": skipped, "converted": sum(c for _, c in images)}
        raise DataError(f"{self.max_tries} pairs in a row from pair {index} could not be decoded; is the data corrupt?")


# -----------------------------------------------------------------------------
# Caches on disk, named by what they hold


def pairs_key(pairs):
    """What identifies a pairs table on disk: a hash of its rows (captions, uids, shard rows: so the data, split
    and filter) and each shard's name, size and modification time."""
    shard = pairs["shard"].combine_chunks()
    shards = shard.dictionary.to_pylist() if pairs.num_rows else []
    columns = pairs.select(["caption", "winner_uid", "loser_uid", "row", "winner_col"])
    digest = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, columns.schema) as writer:
        writer.write_table(columns)
    digest.update(sink.getvalue().to_pybytes())
    digest.update(shard.indices.to_numpy(zero_copy_only=False).tobytes())
    files = [[os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in shards]
    return {"pairs": digest.hexdigest(), "shards": files}


def key_dir(root, key):
    return os.path.join(root, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])


def write_key(directory, key):
    """key.json, written last and atomically: its presence says the arrays beside it exist."""
    with open(os.path.join(directory, "key.json.tmp"), "w") as f:
        json.dump(key, f, indent=1)
    os.replace(os.path.join(directory, "key.json.tmp"), os.path.join(directory, "key.json"))


@contextlib.contextmanager
def flocked(path):
    """An exclusive fcntl.flock on the file `path` (made if need be), waited for, for the length of the block: two
    processes building one store or cache take turns at the same shard, and the kernel frees it if one dies."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def make_arrays(directory, key, arrays):
    """Create the arrays [(name, dtype, shape)] and key.json in `directory` once, whoever else tries at the same
    moment: under a lock, each array written under a temporary name and renamed, key.json last (its presence says
    the rest is complete). A process that already maps the arrays never sees them truncated."""
    os.makedirs(directory, exist_ok=True)
    with flocked(os.path.join(directory, ".create.lock")):
        if os.path.exists(os.path.join(directory, "key.json")):
            return
        for name, dtype, shape in arrays:
            tmp = os.path.join(directory, f"{name}.{os.getpid()}.tmp.npy")
            np.lib.format.open_memmap(tmp, "w+", dtype, shape).flush()
            os.replace(tmp, os.path.join(directory, f"{name}.npy"))
        write_key(directory, key)


def open_arrays(directory, specs, what, mode="r"):
    """Memory maps of the arrays [(name, dtype, shape)] that make_arrays made in `directory`, each checked to be
    what it was made as: a file cut short, edited or replaced is a DataError naming it, not a NumPy traceback."""
    arrays = []
    for name, dtype, shape in specs:
        path = os.path.join(directory, f"{name}.npy")
        try:
            array = np.load(path, mmap_mode=mode)  # allow_pickle stays False: an object array is refused
            why = (f"{array.dtype} {tuple(array.shape)}, not {np.dtype(dtype)} {tuple(shape)}"
                   if array.dtype != dtype or array.shape != tuple(shape) else None)
        except (ValueError, OSError, EOFError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "pickle" in why or "Python objects" in why:  # never NumPy's advice to load it unsafely
                why = "it holds Python objects, not numbers"
        if why:
            raise DataError(f"the {what} {directory} is damaged ({name}.npy: {why}): delete that folder and the next "
                            "run makes it again")
        arrays.append(array)
    return arrays


def allocate(path, what):
    """Give the sparse file `path` its disk blocks now (posix_fallocate), so that writing through its memory map
    cannot fault with SIGBUS on a full disk: a DataError saying how much it needs and how much is free instead."""
    import shutil

    size = os.path.getsize(path)
    if not hasattr(os, "posix_fallocate") or size == 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):  # a file system without fallocate: go on as before
            return
        need = max(size - os.stat(path).st_blocks * 512, 0)
        free = shutil.disk_usage(os.path.dirname(path)).free
        unit = lambda n: next(f"{n / 2**k:.1f} {u}" for k, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))  # noqa: E731
                              if n >= 2**k or k == 0)
        raise DataError(f"{what} needs {unit(need)} more disk in {os.path.dirname(path)} and {unit(free)} is free: "
                        "free some space, or put it elsewhere") from None
    finally:
        os.close(fd)


class ImageStore:
    """The pairs' image bytes copied once out of the parquet shards, so that an item reads its own bytes only.

    A parquet reader reads a whole column chunk of a row group to get one value: one image of Pick-a-Pic costs
    the read of its row group, hundreds of MB on some shards. The store keeps the same bytes back to back, one
    file per shard, and an index, so a pair costs two preads of its images' size, whatever the row groups were.
    Building it reads each needed row group once, in order; it takes the disk space of the kept pairs' images.

    root/<key>/ holds
        shard-NNNNN.bin  the images of the pairs from shard NNNNN: winner then loser (sides=2) or winner only
        index.npy        (n, 2, 2) int64   byte offset and length of each pair's winner and loser in its file
        done.npy         (shards,) int8    1 when the shard's file and its index rows are complete
        key.json         what the key is a hash of (the pairs, as in LatentCache, and the sides)
    """

    def __init__(self, root, pairs, sides=2):
        self.key = {**pairs_key(pairs), "sides": sides}
        self.dir, self.n, self.sides = key_dir(root, self.key), pairs.num_rows, sides
        shard = pairs["shard"].combine_chunks()
        self.shard = shard.indices.to_numpy(zero_copy_only=False)
        self.shards = len(shard.dictionary) if pairs.num_rows else 0
        self._index, self._fds = None, OpenFiles()

    def specs(self):
        return [("index", np.int64, (self.n, 2, 2)), ("done", np.int8, (self.shards,))]

    def create(self):
        """Make the (empty) index if it does not exist yet. Call on one process, before any other opens it."""
        make_arrays(self.dir, self.key, self.specs())

    def arrays(self, mode="r"):
        """(index, done), checked; an index with a negative offset or length is damaged too (pread would fail)."""
        index, done = open_arrays(self.dir, self.specs(), "image store", mode)
        if self.n and index.min() < 0:
            raise DataError(f"the image store {self.dir} is damaged (index.npy: negative offsets or lengths): delete "
                            "that folder and the next run makes it again")
        return index, done

    def __getstate__(self):
        return {**self.__dict__, "_index": None}

    def missing(self):
        """The shards not copied yet (polled while other ranks build: reads done.npy, not the whole index)."""
        return np.flatnonzero(open_arrays(self.dir, self.specs(), "image store")[1] == 0)

    def build(self, dataset, todo, rank=0, world_size=1, progress=False):
        """Copy this rank's share of the shards `todo` (self.missing(), read by every rank before any starts).

        dataset: a PreferenceDataset over the same pairs, reading parquet. Shards are dealt to ranks whole and in
        turn; an interrupted build starts its unfinished shards again. Returns the bytes written by this rank."""
        from tqdm import tqdm

        index, done = self.arrays("r+")
        mine = [int(s) for s in todo[rank::world_size]]
        pairs = [np.flatnonzero(self.shard == s) for s in mine]
        bar = tqdm(total=sum(map(len, pairs)), disable=not progress, desc="image store", unit="pair",
                   dynamic_ncols=True)
        written = 0
        for shard, rows in zip(mine, pairs):
            path = os.path.join(self.dir, f"shard-{shard:05d}.bin")
            offsets = np.zeros((len(rows), 2, 2), np.int64)
            with flocked(path + ".lock"):  # another build of this store (another run) waits, then finds it done
                if done[shard]:
                    bar.update(len(rows))
                    continue
                for left in glob.glob(glob.escape(path) + ".*tmp"):  # a killed build's: no one else writes it now
                    os.remove(left)
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    for j, i in enumerate(rows):  # rows in shard order: the dataset reads each row group once
                        for side, image in enumerate(dataset._read_images(i)[:self.sides]):
                            image = image or b""  # a missing image stays empty, and fails to decode when read
                            offsets[j, side] = (f.tell(), len(image))
                            f.write(image)
                        bar.update(1)
                    written += f.tell()
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                index[rows] = offsets
                index.flush()
                done[shard] = 1  # only after the file and its index rows are on disk
                done.flush()
        bar.close()
        return written

    def read(self, i, sides):
        """The image bytes of pair i: [winner] or [winner, loser]."""
        if self._index is None:
            self._index = self.arrays()[0]
        shard = int(self.shard[i])
        fd = self._fds.opened(shard, lambda: os.open(os.path.join(self.dir, f"shard-{shard:05d}.bin"), os.O_RDONLY))
        images = [os.pread(fd, int(n), int(o)) for o, n in self._index[i, :sides]]
        if any(len(image) != n for image, (_, n) in zip(images, self._index[i, :sides])):
            raise DataError(f"the image store {self.dir} is damaged (shard-{shard:05d}.bin is shorter than its index "
                            "says): delete that folder and the next run makes it again")
        return images


# -----------------------------------------------------------------------------
# The latent cache: the VAE runs on each image once


class LatentCache:
    """VAE latents of every pair on disk, filled once and reused by every later run with the same key.

    root/<key>/ holds NumPy arrays (memory-mapped, so ranks and DataLoader workers share them):
        latents.npy  (n, 2, C, h, w) float16   winner, loser
        micro.npy    (n, 2, 4) int32            SDXL micro-conditioning: original h, w, crop top, left
        state.npy    (n, 2) int8                0 not yet encoded, 1 encoded, -1 the pair cannot be decoded
        key.json     what the key is a hash of
    The key hashes the pairs (captions, uids, shard rows: so the data, split and filter), each shard's name,
    size and modification time, the resolution, and the encoder (the VAE's weights and dtype, given by the
    caller): change any of them and another directory is used, so a stale latent is never read. Images are
    centre-cropped and never flipped: the cache fixes the augmentation. Each latent is one sample of the VAE
    posterior, drawn with a seed of its own (2 * pair + side).
    """

    def __init__(self, root, pairs, resolution, encoder_key, latent_shape):
        self.key = {**pairs_key(pairs), "resolution": resolution, "encoder": encoder_key,
                    "latent_shape": list(latent_shape)}
        self.dir, self.n, self.latent_shape = key_dir(root, self.key), pairs.num_rows, tuple(latent_shape)
        self._arrays = None

    def specs(self):
        return [("latents", np.float16, (self.n, 2, *self.latent_shape)), ("micro", np.int32, (self.n, 2, 4)),
                ("state", np.int8, (self.n, 2))]

    def create(self):
        """Make the arrays if they do not exist yet, and give them their disk blocks. Call on one process, before any
        other opens them."""
        make_arrays(self.dir, self.key, self.specs())
        for name in ("latents", "micro", "state"):  # the disk it will take, taken before any write: a full disk
            allocate(os.path.join(self.dir, f"{name}.npy"), "the latent cache")  # is one line, not a SIGBUS

    def arrays(self, mode="r"):
        if self._arrays is None or self._arrays[0] != mode:
            self._arrays = (mode, *open_arrays(self.dir, self.specs(), "latent cache", mode))
        return self._arrays[1:]

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def missing(self, sides):
        """Indices of the pairs whose images on these sides (0 winner, 1 loser) are not encoded yet."""
        state = self.arrays()[2]
        return np.flatnonzero((state[:, sides] == 0).any(axis=1))

    def fill(self, dataset, encode, todo, rank=0, world_size=1, batch_size=8, num_workers=2, progress=False):
        """Encode this rank's share of the pairs `todo` of `dataset` (a PreferenceDataset with train=False).

        todo: self.missing(sides), read by every rank before any rank starts to fill. encode(pixels (N, 3, R, R),
        seeds: list of N ints) -> latents (N, C, h, w). Progress is written after every batch, so an interrupted
        fill goes on where it stopped. Returns {"encoded", "skipped", "converted"} for this rank.
        """
        from tqdm import tqdm

        sides = [0] if dataset.winners_only else [0, 1]
        todo = np.sort(np.asarray(todo, dtype=np.int64))
        todo = split_at_groups(todo, dataset.row_groups(todo), world_size)[rank]  # contiguous shares of row groups
        # Each worker reads a contiguous run of whole row groups, so each row group is read once.
        runs = split_at_groups(todo, dataset.row_groups(todo), max(1, num_workers))
        loader = torch.utils.data.DataLoader(InOrder(dataset, runs, batch_size), batch_size=None,
                                             num_workers=num_workers, worker_init_fn=ignore_stop_signals)
        latents, micro, state = self.arrays("r+")
        counts = {"encoded": 0, "skipped": 0, "converted": 0}
        bar = tqdm(total=len(todo), disable=not progress, desc="latent cache", dynamic_ncols=True)
        for batch in loader:
            asked = batch["asked"].numpy()
            good = batch["index"].numpy() == asked  # else the pair could not be decoded, and the next one came
            keep = torch.from_numpy(good)
            state[asked[~good]] = -1
            rows = asked[good]
            if len(rows):
                pixels = batch["pixels"][keep]  # (b, sides, 3, R, R)
                seeds = [2 * int(r) + s for s in sides for r in rows]
                z = encode(pixels.transpose(0, 1).flatten(0, 1), seeds).view(len(sides), len(rows), *self.latent_shape)
                sizes = torch.cat([batch["original_sizes"], batch["crops_top_left"]], dim=-1)[keep]
                for j, s in enumerate(sides):
                    latents[rows, s] = z[j].cpu().numpy().astype(np.float16)
                    micro[rows, s] = sizes[:, j].numpy()
                latents.flush()
                micro.flush()
                state[np.ix_(rows, sides)] = 1  # only after the latents are on disk
            state.flush()
            counts["encoded"] += len(rows) * len(sides)
            counts["skipped"] += int((~good).sum())
            counts["converted"] += int(batch["converted"][keep].sum())
            bar.update(len(asked))
        bar.close()
        return counts


class InOrder(torch.utils.data.IterableDataset):
    """Batches of the dataset's items, DataLoader worker w taking the indices of runs[w] in order; each batch also
    says which indices it "asked" for (an undecodable pair is replaced by the next one)."""

    def __init__(self, dataset, runs, batch_size):
        self.dataset, self.runs, self.batch_size = dataset, runs, batch_size

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        run = self.runs[worker.id] if worker else np.concatenate(self.runs)
        for k in range(0, len(run), self.batch_size):
            asked = run[k:k + self.batch_size]
            batch = torch.utils.data.default_collate([self.dataset[int(i)] for i in asked])
            yield {**batch, "asked": torch.from_numpy(np.asarray(asked, dtype=np.int64))}


def split_at_groups(items, groups, parts):
    """Split items into `parts` contiguous runs of about equal length, cutting only where the (sorted) group
    changes, so that no group is split between two runs. Some runs may be empty."""
    n = len(items)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(np.asarray(groups))) + 1, [n]])
    cuts = [0]
    for k in range(1, parts):
        nearest = int(bounds[np.argmin(np.abs(bounds - k * n / parts))])
        cuts.append(max(nearest, cuts[-1]))
    cuts.append(n)
    return [items[a:b] for a, b in zip(cuts, cuts[1:])]


class CachedDataset(torch.utils.data.Dataset):
    """PreferenceDataset's items from a filled LatentCache: "latents" (2 or 1, C, h, w) in place of "pixels".

    A pair marked as undecodable is replaced by the next cached pair and counted in "skipped", as in
    PreferenceDataset. "converted" is 0: conversions were counted when the cache was filled.
    """

    def __init__(self, cache, pairs, winners_only=False):
        self.cache, self.captions = cache, pairs["caption"].to_pylist()
        self.sides = [0] if winners_only else [0, 1]

    def __len__(self):
        return self.cache.n

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        latents, micro, state = self.cache.arrays()
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            if (state[i, self.sides] == 1).all():
                m = torch.from_numpy(np.array(micro[i, self.sides]))
                return {"latents": torch.from_numpy(np.array(latents[i, self.sides])).float(), "index": i,
                        "original_sizes": m[:, :2], "crops_top_left": m[:, 2:], "caption": self.captions[i],
                        "skipped": attempt, "converted": 0}
            if state[i, self.sides].min() == 0:
                raise DataError(f"the latent cache {self.cache.dir} has no latents for pair {i}: fill it first")
        raise DataError(f"the latent cache {self.cache.dir} holds no usable pair")


def cached_dataset(dataset, root, encode, encoder_key, latent_shape, rank=0, world_size=1, barrier=None, batch_size=8,
                   num_workers=2, log=print):
    """Fill the latent cache under `root` for this PreferenceDataset's pairs, where needed; return a CachedDataset.

    encode, encoder_key, latent_shape: see LatentCache (sample.latent_encoder(vae, resolution) gives them). The VAE
    runs once per image over all ranks and runs: a later run, of any objective or space, with the same VAE (weights
    and dtype), data, filter and resolution reads the cache and never runs the VAE. barrier: the ranks' barrier,
    when there are several."""
    barrier = barrier or (lambda: None)
    cache = LatentCache(root, dataset.pairs, dataset.resolution, encoder_key, latent_shape)
    if rank == 0:
        cache.create()
    barrier()
    sides = [0] if dataset.winners_only else [0, 1]
    todo = cache.missing(sides)
    barrier()  # every rank has the same list before any rank writes
    log(f"latent cache {cache.dir}: {cache.n - len(todo)} of {cache.n} pairs cached, {len(todo)} to encode")
    if len(todo):
        source = PreferenceDataset(dataset.pairs, dataset.resolution, train=False, winners_only=dataset.winners_only)
        counts = cache.fill(source, encode, todo, rank, world_size, batch_size, num_workers, progress=rank == 0)
        log(f"latent cache: this rank encoded {counts['encoded']} images, skipped {counts['skipped']} undecodable "
            f"pairs, converted {counts['converted']} images to RGB")
        wait_for_ranks(lambda: len(cache.missing(sides)), "latent cache", "pairs still to encode", log)
    return CachedDataset(cache, dataset.pairs, dataset.winners_only)


def stored_dataset(dataset, root, rank=0, world_size=1, barrier=None, log=print):
    """Copy the pairs' images into an ImageStore under `root` where needed; return the dataset reading from it.

    Every later run on the same pairs (data, split, filter) reads the store; each item then reads its pair's bytes
    only, whatever the row-group size of the parquet shards."""
    barrier = barrier or (lambda: None)
    store = ImageStore(root, dataset.pairs, sides=1 if dataset.winners_only else 2)
    if rank == 0:
        store.create()
    barrier()
    todo = store.missing()
    barrier()  # every rank has the same list before any rank writes
    log(f"image store {store.dir}: {store.shards - len(todo)} of {store.shards} shards copied, {len(todo)} to copy")
    if len(todo):
        source = PreferenceDataset(dataset.pairs, dataset.resolution, train=False, winners_only=dataset.winners_only)
        written = store.build(source, todo, rank, world_size, progress=rank == 0)
        log(f"image store: this rank copied {written / 2**30:.2f} GiB")
        wait_for_ranks(lambda: len(store.missing()), "image store", "shards still to copy", log)
    return PreferenceDataset(dataset.pairs, dataset.resolution, dataset.train, dataset.seed, dataset.winners_only,
                             dataset.max_tries, store=store)


def wait_for_ranks(left, name, what, log, every=60):
    """Wait until left() is 0 by watching the disk, not at a barrier: one rank's share of a fill can take hours
    longer than another's, and a collective would time out. Says where it is every `every` seconds."""
    last = time.time()
    while n := left():
        if time.time() - last > every:
            log(f"{name}: waiting for the other ranks, {n} {what}")
            last = time.time()
        time.sleep(1)


# -----------------------------------------------------------------------------
# Distributed, resumable order


class PairSampler(torch.utils.data.Sampler):
    """An endless, seeded, epoch-aware stream of (index, position), split over ranks; resumable at `start`.

    The global stream is the concatenation of one permutation of the pairs per epoch (seeded by seed + epoch).
    Position p is the p-th pair of that stream. Micro-batches of `micro_batch` positions are dealt to the ranks
    in turn, so within an epoch each rank sees a disjoint share, and the pairs of an optimizer step do not depend
    on the world size. `start` is the number of positions already consumed by all ranks (step * global batch).
    """

    def __init__(self, n, micro_batch, rank=0, world_size=1, seed=0, start=0, shuffle=True):
        if n == 0:
            raise DataError("no preference pairs to train on (every pair was dropped or filtered out)")
        if start % (micro_batch * world_size):
            raise ValueError("start must be a multiple of micro_batch * world_size")
        self.n, self.micro_batch, self.rank, self.world_size = n, micro_batch, rank, world_size
        self.seed, self.start, self.shuffle = seed, start, shuffle

    def order(self, epoch):
        if not self.shuffle:
            return np.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()

    def __iter__(self):
        chunk = self.micro_batch * self.world_size
        position, epoch, order = self.start, None, None
        while True:
            for p in range(position + self.rank * self.micro_batch, position + (self.rank + 1) * self.micro_batch):
                if p // self.n != epoch:
                    epoch = p // self.n
                    order = self.order(epoch)
                yield int(order[p % self.n]), p
            position += chunk


def ignore_stop_signals(worker_id=None):
    """DataLoader worker init: leave SIGTERM and SIGINT to the main process.

    Slurm and torchrun signal the whole process group. A worker that died of it would take the main process down
    with it ("DataLoader worker ... is killed by signal") before it could save; this way the main process stops at
    its next micro-batch, saves, and shuts its workers down itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, micro_batch, rank=0, world_size=1, seed=0, start=0, num_workers=2):
    """An endless DataLoader of micro-batches for this rank, starting at global position `start`."""
    sampler = PairSampler(len(dataset), micro_batch, rank, world_size, seed, start)
    return torch.utils.data.DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                                       prefetch_factor=4 if num_workers > 0 else None,
                                       worker_init_fn=ignore_stop_signals)


# -----------------------------------------------------------------------------
# Synthetic Pick-a-Pic-format data

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ["circle", "square"]


def draw_shape(color, shape, size, rng, background=(235, 235, 235)):
    """A shape of the given colour on a plain background, at a random place and scale. PIL image."""
    from PIL import ImageDraw

    w, h = size
    image = Image.new("RGB", (w, h), background)
    r = rng.uniform(0.2, 0.35) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return image


def jpeg_bytes(image, quality=90):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_synthetic(out_dir, n=64, seed=0, size=64, split="train", tie_every=10, identical_every=16):
    """Write a Pick-a-Pic-format shard of n rows with real JPEG bytes; return out_dir (idempotent).

    Prompt "a <colour> <shape>"; the preferred image shows the shape in the prompt's colour, the other in a
    wrong colour. Every tie_every-th row is a tie and every identical_every-th a pair of identical images.
    Image sizes vary (some landscape), so SDXL micro-conditioning has something to report.
    """
    path = os.path.join(out_dir, f"{split}-00000-of-00001.parquet")
    if os.path.exists(path):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    rows = {k: [] for k in ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid",
                            "best_image_uid", "has_label", "are_different", "model_0", "model_1", "ranking_id",
                            "user_id", "created_at", "num_example_per_prompt", "image_0_url", "image_1_url"]}
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        wrong = rng.choice([c for c in COLORS if c != color])
        wh = (size, size) if i % 3 else (size * 5 // 4, size)
        good = jpeg_bytes(draw_shape(COLORS[color], shape, wh, rng))
        identical = i % identical_every == identical_every - 1
        bad = good if identical else jpeg_bytes(draw_shape(COLORS[wrong], shape, wh, rng))
        label_0 = 0.5 if i % tie_every == tie_every - 1 else float(rng.random() < 0.5)
        jpg_0, jpg_1 = (good, bad) if label_0 != 0 else (bad, good)
        uid_0, uid_1 = f"{i:06d}-0", f"{i:06d}-1"
        rows["caption"].append(f"a {color} {shape}")
        rows["jpg_0"].append(jpg_0)
        rows["jpg_1"].append(jpg_1)
        rows["label_0"].append(label_0)
        rows["label_1"].append(1 - label_0)
        rows["image_0_uid"].append(uid_0)
        rows["image_1_uid"].append(uid_1)
        rows["best_image_uid"].append("" if label_0 == 0.5 else (uid_0 if label_0 == 1 else uid_1))
        rows["has_label"].append(True)
        rows["are_different"].append(not identical)
        rows["model_0"].append("synthetic")
        rows["model_1"].append("synthetic")
        rows["ranking_id"].append(i)
        rows["user_id"].append(rng.randrange(10))
        rows["created_at"].append("2024-01-01 00:00:00")
        rows["num_example_per_prompt"].append(1)
        rows["image_0_url"].append("")
        rows["image_1_url"].append("")
    table = pa.table(rows)
    tmp = f"{path}.{os.getpid()}.tmp"
    pq.write_table(table, tmp, row_group_size=16)
    os.replace(tmp, path)  # atomic: ranks that race here all see a complete file
    with open(os.path.join(out_dir, "README.json"), "w") as f:
        json.dump({"rows": n, "seed": seed, "size": size}, f)
    return out_dir
