"""Pick-a-Pic v2 preference pairs, the paper's absolute-winner filter, and the training dataset.

    pairs, counts = preference_pairs("yuvalkirstain/pickapic_v2", "train", filter="absolute-winners")
    dataset = PreferenceDataset(pairs, resolution=1024)
    loader = make_loader(dataset, micro_batch=1, rank=0, world_size=4, seed=0, start=0)

The filter (NCP paper, section 5, Table 2): a contradictory image, a winner in one pair and a loser or tie in
another, adds noise to the Bradley-Terry gradient (eqs. 16-17). Only pairs whose winner is an *absolute
winner* are kept: an image uid with at least one win and no loss or draw anywhere in the split. The pass reads
the metadata columns only; image bytes are read per item, one row group of two columns at a time.

Source: a directory or glob of parquet shards (`<split>-XXXXX-of-XXXXX.parquet`, with or without `data/`),
or a hub dataset id (only the chosen split is fetched). write_synthetic makes a tiny generated set.
"""

import collections
import glob
import hashlib
import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

PICKAPIC = "yuvalkirstain/pickapic_v2"
META = ["caption", "label_0", "label_1", "image_0_uid", "image_1_uid", "are_different", "has_label"]
REQUIRED = ["caption", "label_0", "image_0_uid", "image_1_uid"]
IMAGES = ["jpg_0", "jpg_1"]
OPEN_FILES = 16  # parquet files a DataLoader worker keeps open


class DataError(ValueError):
    """A data source that is missing, empty or not in Pick-a-Pic format."""


# -----------------------------------------------------------------------------
# Finding the shards


def find_shards(source, split="train"):
    """Parquet shards of `split` in a directory, a glob, a file or a hub dataset id. Sorted paths."""
    if os.path.isdir(source):
        paths = [p for pattern in (f"{split}-*.parquet", f"data/{split}-*.parquet", f"{split}/*.parquet")
                 for p in glob.glob(os.path.join(source, pattern))]
        if not paths:
            found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
            raise DataError(f"no {split}-*.parquet shards in {source} (parquet files found: "
                            f"{', '.join(found[:5]) + (' ...' if len(found) > 5 else '') if found else 'none'})")
    elif any(c in source for c in "*?["):
        paths = glob.glob(source)
        if not paths:
            raise DataError(f"the glob {source} matches no file")
    elif os.path.isfile(source):
        paths = [source]
    elif source.count("/") == 1 and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(source, repo_type="dataset", allow_patterns=[f"data/{split}-*.parquet"])
        except Exception as e:
            raise DataError(f"could not fetch split {split!r} of the hub dataset {source} ({type(e).__name__}); "
                            "download it and pass the local directory") from None
        return find_shards(local, split)
    else:
        raise DataError(f"data source {source!r} is not a directory, a parquet file, a glob or a hub dataset id")
    return sorted(paths)


def check_columns(paths, needed):
    """Fail at once, naming what was found, if a shard lacks a needed column (reads the schema only)."""
    for path in paths:
        names = pq.read_schema(path).names
        missing = [c for c in needed if c not in names]
        if missing:
            raise DataError(f"{path} is not in Pick-a-Pic format: missing columns {missing}; it has {names}")


# -----------------------------------------------------------------------------
# Pairs and the absolute-winner filter


def preference_pairs(source, split="train", filter="none"):
    """Usable preference pairs and the counts of what was dropped. Reads metadata columns only.

    Returns (pairs, counts): pairs is a pyarrow Table with one row per pair: caption, winner_uid, loser_uid,
    shard (dictionary-encoded path), row (index in the shard), winner_col (0 or 1). Ties, identical images,
    unlabeled rows and missing captions are dropped. filter="absolute-winners" keeps a pair only if its winner
    won at least once and never lost or drew (a tie is a draw for both images) anywhere in the split.
    """
    if filter not in ("none", "absolute-winners"):
        raise ValueError(f"filter must be 'none' or 'absolute-winners', got {filter!r}")
    paths = find_shards(source, split)
    check_columns(paths, REQUIRED)
    tables = []
    for i, path in enumerate(paths):
        columns = [c for c in META if c in pq.read_schema(path).names]
        table = pq.read_table(path, columns=columns)
        n = table.num_rows
        table = table.append_column("shard", pa.array(np.full(n, i, np.int32)))
        tables.append(table.append_column("row", pa.array(np.arange(n, dtype=np.int64))))
    table = pa.concat_tables(tables, promote_options="default").combine_chunks()
    n = table.num_rows

    label_0 = table["label_0"].to_numpy(zero_copy_only=False).astype(np.float64)
    labeled = _bool_column(table, "has_label", n, default=True) & ~np.isnan(label_0)
    tie = labeled & (label_0 == 0.5)
    decisive = labeled & ((label_0 == 0) | (label_0 == 1))
    different = _bool_column(table, "are_different", n, default=True)
    has_caption = table["caption"].is_valid().to_numpy(zero_copy_only=False)

    # One integer id per image uid, shared by both columns (2n strings hashed once).
    ids = pc.dictionary_encode(pa.chunked_array(table["image_0_uid"].chunks + table["image_1_uid"].chunks))
    ids = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in ids.chunks]).astype(np.int64)
    id_0, id_1 = ids[:n], ids[n:]
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

    uid_0, uid_1 = table["image_0_uid"], table["image_1_uid"]
    wc = pa.array(winner_col.astype(np.int8))
    pairs = pa.table({
        "caption": table["caption"],
        "winner_uid": pc.if_else(pc.equal(wc, 0), uid_0, uid_1),
        "loser_uid": pc.if_else(pc.equal(wc, 0), uid_1, uid_0),
        "shard": pa.DictionaryArray.from_arrays(table["shard"].combine_chunks(), pa.array(paths)),
        "row": table["row"],
        "winner_col": wc,
    }).filter(pa.array(keep))
    counts = {"rows": n, "unlabeled": int((~labeled).sum()), "ties": int(tie.sum()),
              "identical": int((decisive & ~different).sum()), "missing_caption": int((decisive & different & ~has_caption).sum()),
              "filtered_out": int((decisive & different & has_caption).sum() - keep.sum()),
              "pairs": pairs.num_rows, "prompts": int(pc.count_distinct(pairs["caption"]).as_py()) if pairs.num_rows else 0}
    return pairs, counts


def _bool_column(table, name, n, default):
    if name not in table.column_names:
        return np.full(n, default)
    return table[name].fill_null(default).to_numpy(zero_copy_only=False).astype(bool)


def largest_row_group(pairs):
    """Bytes read from disk for one image of the largest row group: its image columns' chunks (footers only)."""
    largest = 0
    for path in (pairs["shard"].combine_chunks().dictionary.to_pylist() if pairs.num_rows else []):
        meta = pq.read_metadata(path)
        names = [meta.schema.column(c).name for c in range(meta.num_columns)]
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            largest = max(largest, sum(group.column(c).total_compressed_size for c, name in enumerate(names)
                                       if name in IMAGES))
    return largest


# -----------------------------------------------------------------------------
# The training dataset


def load_image(data):
    """JPEG/PNG bytes -> RGB PIL image, and whether it had to be converted from another mode (RGBA, L, CMYK)."""
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so that a corrupt file fails here
    if image.mode == "RGB":
        return image, False
    if image.mode in ("RGBA", "LA", "P"):  # composite transparency over white rather than black
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), True
    return image.convert("RGB"), True


def resize_crop(image, resolution, u, v, flip):
    """Resize the shorter side to `resolution`, crop at relative offset (u, v), maybe flip.

    Returns pixels (3, R, R) in [-1, 1] and the SDXL micro-conditioning: the original (h, w) of the image and
    the crop's (top, left) in the resized image (mirrored when flipped), as in SDXL's training recipe.
    """
    w, h = image.size
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
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
        if store is None:
            check_columns(sorted(set(self.paths)), IMAGES)
        elif store.sides < (1 if winners_only else 2):
            raise ValueError("this image store holds the winners only")
        self.shard = pairs["shard"].combine_chunks().indices.to_numpy(zero_copy_only=False)
        self.row = pairs["row"].to_numpy()
        self.winner_col = pairs["winner_col"].to_numpy()
        self.captions = pairs["caption"].to_pylist()
        self._files = collections.OrderedDict()  # per worker process: shard -> (ParquetFile, row-group starts)
        self._group = (None, {})  # per worker process: (shard, row group), {column: its values}

    def __len__(self):
        return self.pairs.num_rows

    def __getstate__(self):
        return {**self.__dict__, "_files": collections.OrderedDict(), "_group": (None, {})}

    def _file(self, shard):
        """The open ParquetFile of a shard and its row groups' first rows; at most OPEN_FILES stay open."""
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            f = pq.ParquetFile(self.paths[shard])
            starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
            self._files[shard] = (f, starts)
            if len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)[1][0].close()
        return self._files[shard]

    def row_groups(self, indices):
        """(shard, row group) of each pair index, as one int64 per pair that sorts like the shards' order."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty(len(indices), np.int64)
        for shard in np.unique(self.shard[indices]):
            at = self.shard[indices] == shard
            starts = self._file(int(shard))[1]
            out[at] = (int(shard) << 32) + np.searchsorted(starts, self.row[indices[at]], side="right") - 1
        return out

    def _read_images(self, i):
        if self.store is not None:
            return self.store.read(i, 1 if self.winners_only else 2)
        w = int(self.winner_col[i])
        shard = int(self.shard[i])
        f, starts = self._file(shard)
        group = int(np.searchsorted(starts, self.row[i], side="right") - 1)
        if self._group[0] != (shard, group):
            self._group = ((shard, group), {})
        values = self._group[1]
        columns = [IMAGES[w]] if self.winners_only else [IMAGES[w], IMAGES[1 - w]]
        for c in columns:
            if c not in values:  # each column chunk of the row group is read once while the rows stay in it
                values[c] = f.read_row_group(group, columns=[c]).column(0)
        offset = int(self.row[i] - starts[group])
        return [values[c][offset].as_py() for c in columns]

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
            except (OSError, ValueError, pa.ArrowException, Image.DecompressionBombError):  # corrupt or missing: skip, count
                skipped += 1
                continue
            if not self.captions[i]:
                skipped += 1
                continue
            out = [resize_crop(image, self.resolution, u, v, flip) for image, _ in images]
            return {"pixels": torch.stack([o[0] for o in out]),  # (2, 3, R, R): winner, loser
                    "index": i, "original_sizes": torch.tensor([o[1] for o in out]), "crops_top_left": torch.tensor([o[2] for o in out]),
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
        self._index, self._fds = None, collections.OrderedDict()

    def create(self):
        """Make the (empty) index if it does not exist yet. Call on one process, before any other opens it."""
        if os.path.exists(os.path.join(self.dir, "key.json")):
            return
        os.makedirs(self.dir, exist_ok=True)
        np.lib.format.open_memmap(os.path.join(self.dir, "index.npy"), "w+", np.int64, (self.n, 2, 2)).flush()
        np.lib.format.open_memmap(os.path.join(self.dir, "done.npy"), "w+", np.int8, (self.shards,)).flush()
        write_key(self.dir, self.key)

    def __getstate__(self):
        return {**self.__dict__, "_index": None, "_fds": collections.OrderedDict()}

    def missing(self):
        """The shards not copied yet."""
        return np.flatnonzero(np.load(os.path.join(self.dir, "done.npy")) == 0)

    def build(self, dataset, todo, rank=0, world_size=1, progress=False):
        """Copy this rank's share of the shards `todo` (self.missing(), read by every rank before any starts).

        dataset: a PreferenceDataset over the same pairs, reading parquet. Shards are dealt to ranks whole and in
        turn; an interrupted build starts its unfinished shards again. Returns the bytes written by this rank."""
        from tqdm import tqdm

        index = np.load(os.path.join(self.dir, "index.npy"), mmap_mode="r+")
        done = np.load(os.path.join(self.dir, "done.npy"), mmap_mode="r+")
        mine = [int(s) for s in todo[rank::world_size]]
        pairs = [np.flatnonzero(self.shard == s) for s in mine]
        bar = tqdm(total=sum(map(len, pairs)), disable=not progress, desc="image store", unit="pair",
                   dynamic_ncols=True)
        written = 0
        for shard, rows in zip(mine, pairs):
            path = os.path.join(self.dir, f"shard-{shard:05d}.bin")
            offsets = np.zeros((len(rows), 2, 2), np.int64)
            with open(path + ".tmp", "wb") as f:
                for j, i in enumerate(rows):  # rows in shard order: the dataset reads each row group once
                    for side, image in enumerate(dataset._read_images(i)[:self.sides]):
                        image = image or b""  # a missing image stays empty, and fails to decode when read
                        offsets[j, side] = (f.tell(), len(image))
                        f.write(image)
                    bar.update(1)
                written += f.tell()
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
            index[rows] = offsets
            index.flush()
            done[shard] = 1  # only after the file and its index rows are on disk
            done.flush()
        bar.close()
        return written

    def read(self, i, sides):
        """The image bytes of pair i: [winner] or [winner, loser]."""
        if self._index is None:
            self._index = np.load(os.path.join(self.dir, "index.npy"), mmap_mode="r")
        shard = int(self.shard[i])
        if shard in self._fds:
            self._fds.move_to_end(shard)
        else:
            self._fds[shard] = os.open(os.path.join(self.dir, f"shard-{shard:05d}.bin"), os.O_RDONLY)
            if len(self._fds) > OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        return [os.pread(self._fds[shard], int(n), int(o)) for o, n in self._index[i, :sides]]


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

    def create(self):
        """Make the (sparse) arrays if they do not exist yet. Call on one process, before any other opens them."""
        if os.path.exists(os.path.join(self.dir, "key.json")):
            return
        os.makedirs(self.dir, exist_ok=True)
        for name, dtype, shape in [("latents", np.float16, (self.n, 2, *self.latent_shape)),
                                   ("micro", np.int32, (self.n, 2, 4)), ("state", np.int8, (self.n, 2))]:
            np.lib.format.open_memmap(os.path.join(self.dir, f"{name}.npy"), "w+", dtype, shape).flush()
        write_key(self.dir, self.key)

    def arrays(self, mode="r"):
        if self._arrays is None or self._arrays[0] != mode:
            self._arrays = (mode, *(np.load(os.path.join(self.dir, f"{k}.npy"), mmap_mode=mode)
                                    for k in ("latents", "micro", "state")))
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
        bad = good if i % identical_every == identical_every - 1 else jpeg_bytes(draw_shape(COLORS[wrong], shape, wh, rng))
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
        rows["are_different"].append(bad is not good)
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
