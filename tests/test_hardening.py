"""Hardening. A run that fails inside its training loop ends promptly, its DataLoader workers with it, alone or under
torchrun; a signal that no loop will act on ends the process. (The workers ignore SIGTERM, so that a preemption
signal sent to the whole process group leaves the main process time to save; that once made any failure in the
loop hang in multiprocessing's exit hook, deaf to SIGTERM.) A checkpoint is read as data only, and one that is not
a checkpoint of the script reading it is refused in one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import launch
from helpers import FAST, ROOT, env

# Runs a training script with one function replaced: at its second call it records the DataLoader workers' pids
# and then fails (RuntimeError) or sleeps (a loop that never reaches its next micro-batch).
INJECT = """
import json, multiprocessing, os, sys, time
sys.path.insert(0, {root!r})
import run
script = __import__({module!r})
real, calls = getattr(script, {function!r}), []

def injected(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        rank = os.environ.get("RANK", "0")
        with open(os.path.join({out!r}, "workers-" + rank + ".json"), "w") as f:
            json.dump([c.pid for c in multiprocessing.active_children()], f)
        if {mode!r} == "sleep":
            time.sleep(3600)
        raise RuntimeError("injected failure in the step")
    return real(*args, **kwargs)

setattr(script, {function!r}, injected)
run.run_main(script.main, script.parse_args())
"""


def injector(tmp_path, script, function, mode="raise"):
    path = tmp_path / "inject.py"
    path.write_text(INJECT.format(root=ROOT, module=script.removesuffix(".py"), function=function, out=str(tmp_path),
                                  mode=mode))
    return str(path)


def command(tmp_path, script, function, mode="raise", nproc=1):
    runner = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    return [*runner, injector(tmp_path, script, function, mode), "--model", "tiny", "--output-dir",
            str(tmp_path / "run"), *FAST, "--num-workers", "2", "--max-steps", "5"]


def gone(pid):
    """The process has exited (a zombie left to an init that does not reap counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def workers(tmp_path):
    pids = []
    for name in os.listdir(tmp_path):
        if name.startswith("workers-"):
            with open(tmp_path / name) as f:
                pids += json.load(f)
    return pids


@pytest.mark.parametrize("script, function", [("ncp_dpo.py", "dpo_loss"), ("ncp_cpo.py", "cpo_loss")])
def test_a_failure_in_the_loop_ends_the_process_and_its_workers(tmp_path, script, function):
    start = time.time()
    proc = subprocess.run(command(tmp_path, script, function), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode != 0 and "injected failure in the step" in proc.stderr, proc.stderr[-3000:]
    assert time.time() - start < 150
    pids = workers(tmp_path)
    assert len(pids) == 2, pids  # the two DataLoader workers were running when the step failed
    time.sleep(1)
    assert all(gone(pid) for pid in pids)


def test_under_torchrun_a_failing_rank_releases_the_others(tmp_path):
    proc = subprocess.run(command(tmp_path, "ncp_dpo.py", "dpo_loss", nproc=2), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "injected failure in the step" in proc.stdout + proc.stderr
    pids = workers(tmp_path)
    assert len(pids) == 4, pids
    time.sleep(1)
    assert all(gone(pid) for pid in pids)


def test_a_signal_no_loop_acts_on_ends_the_process(tmp_path):
    """The step never returns: the first SIGTERM is recorded for a micro-batch boundary that never comes; a second,
    2 s later, ends the process and its workers."""
    proc = subprocess.Popen(command(tmp_path, "ncp_dpo.py", "dpo_loss", mode="sleep"), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not workers(tmp_path) and time.time() < deadline:
            time.sleep(0.2)
        assert workers(tmp_path), "the run never reached its second step"
        proc.send_signal(signal.SIGTERM)
        time.sleep(2.5)
        assert proc.poll() is None  # the first one waits for the loop, as a preemption signal should
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
    finally:
        proc.kill()
    time.sleep(1)
    assert all(gone(pid) for pid in workers(tmp_path))


# -----------------------------------------------------------------------------
# checkpoint.pt is data: nothing in it runs, and what is not a checkpoint of this script is one line


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line_error(proc, fragment):
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert fragment in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("script", ["ncp_dpo.py", "spo.py"])
def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(tmp_path, script):
    import torch

    from helpers import train

    out, marker = tmp_path / "run", tmp_path / "ran"
    out.mkdir()
    torch.save({"step": 1, "args": {}, "lora": {}, "payload": _RunsCode(marker)}, out / "checkpoint.pt")
    for resume in ([], ["--resume"]):  # the file was once loaded before --resume was even checked
        if script == "spo.py":
            proc = launch.python([sys.executable, os.path.join(ROOT, script), "--model", "tiny", "--output-dir", out,
                                  *resume], env(), ROOT, 300)
        else:
            proc = train(script, out, "--model", "tiny", *resume, check=False)
        _one_line_error(proc, "refused, since loading them could run code")
        assert not marker.exists()


@pytest.mark.parametrize("content, fragment", [(b"", "empty"), (b"PK\x03\x04 truncated", "corrupt or truncated"),
                                               (bytes(range(256)) * 16, "corrupt or truncated")],
                         ids=["empty", "truncated", "garbage"])
def test_an_unreadable_checkpoint_is_one_line(tmp_path, content, fragment):
    from helpers import train

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(content)
    _one_line_error(train("ncp_sft.py", tmp_path / "run", "--model", "tiny", "--resume", check=False), fragment)


def test_a_run_of_another_script_or_a_damaged_checkpoint_is_not_resumed(tmp_path):
    """Another script's checkpoint is refused; so is one whose parts were edited (each was a traceback: a step that
    is a list, flags that are a string, another model's LoRA, an optimizer state without its moments or with
    moments of other shapes), in one line, and the run's files stay as they were."""
    import torch

    from helpers import train

    out = tmp_path / "run"
    train("ncp_cpo.py", out, "--model", "tiny", "--max-steps", "1", "--save-every", "1")
    _one_line_error(train("ncp_dpo.py", out, "--model", "tiny", "--max-steps", "2", "--resume", check=False),
                    "was written by ncp_cpo.py, not ncp_dpo.py")
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    first = next(iter(good["optimizer"]["state"]))
    moments = {**good["optimizer"]["state"][first], "exp_avg": torch.zeros(3)}
    damaged = {
        "a step that is a list": ({**good, "step": [1]}, "is damaged: its step, flags or LoRA"),
        "flags that are a string": ({**good, "args": "x"}, "is damaged: its step, flags or LoRA"),
        "another model's LoRA": ({**good, "lora": {"a.lora_A.weight": torch.zeros(2, 2)}},
                                 "LoRA does not fit this run's model"),
        "no optimizer state": ({**good, "optimizer": {}}, "its optimizer, schedule or random state cannot be restored"),
        "moments of other shapes": ({**good, "optimizer": {**good["optimizer"], "state": {
            **good["optimizer"]["state"], first: moments}}}, "the optimizer's moments are not the LoRA's shapes"),
    }
    for name, (ckpt, fragment) in damaged.items():
        torch.save(ckpt, out / "checkpoint.pt")
        model = [] if name == "flags that are a string" else ["--model", "tiny"]  # the model is read from the flags
        _one_line_error(train("ncp_cpo.py", out, *model, "--max-steps", "2", "--resume", check=False), fragment)
        assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1], name


def test_a_damaged_latent_cache_or_image_store_is_one_line(tmp_path):
    """A cache or store file cut short, replaced by other arrays or by pickled objects was a NumPy traceback (or a
    store shard cut short, "is the data corrupt?" after 32 skipped pairs): one line naming the folder to delete.
    Restored, the store is read again."""
    import shutil

    import numpy as np

    import data
    from helpers import train

    source = data.write_synthetic(str(tmp_path / "pairs"))
    for flag, name, spoil, fragment in [
        ("--cache-latents", "latents.npy", lambda p: os.truncate(p, 1000), "latents.npy: mmap length is greater"),
        ("--cache-latents", "state.npy", lambda p: np.save(p, np.zeros(3, "U5")), "state.npy: <U5 (3,), not int8"),
        ("--cache-latents", "micro.npy", lambda p: np.save(p, np.array([{}]), allow_pickle=True),
         "micro.npy: it holds Python objects, not numbers"),
        ("--image-store", "done.npy", lambda p: os.truncate(p, 10), "done.npy: EOF"),
        ("--image-store", "index.npy", lambda p: np.save(p, -np.load(p)), "index.npy: negative offsets or lengths"),
        ("--image-store", "shard-00000.bin", lambda p: os.truncate(p, 100), "shard-00000.bin is shorter than its"),
    ]:
        root = tmp_path / flag.strip("-")
        if not root.exists():  # filled once, then each file spoiled and restored in turn
            train("ncp_dpo.py", tmp_path / "fill", "--model", "tiny", "--max-steps", "1", "--data", source, flag, root)
            shutil.rmtree(tmp_path / "fill")
        folder = next(p for p in root.iterdir() if p.is_dir())
        keep = (folder / name).read_bytes()
        spoil(str(folder / name))
        proc = train("ncp_dpo.py", tmp_path / "bad", "--model", "tiny", "--max-steps", "1", "--data", source, flag,
                     root, check=False)
        _one_line_error(proc, f"{flag[2:].replace('-', ' ').replace('cache latents', 'latent cache')} {folder} is "
                              f"damaged ({fragment}")
        shutil.rmtree(tmp_path / "bad")
        (folder / name).write_bytes(keep)
    train("ncp_dpo.py", tmp_path / "again", "--model", "tiny", "--max-steps", "1", "--data", source, flag, root)


# -----------------------------------------------------------------------------
# Numeric flags out of range: one line naming the flag, before any model loads, and nothing left behind


@pytest.mark.parametrize("script, flag, value, fragment", [
    ("ncp_dpo.py", "--lr", "-1", "--lr -1.0 must be in (0, 1]"),
    ("ncp_dpo.py", "--lora-rank", "0", "--lora-rank 0 must be at least 1"),
    ("ncp_dpo.py", "--save-every", "0", "--save-every 0 must be at least 1"),
    ("ncp_dpo.py", "--resolution", "30", "--resolution 30 must be a positive multiple of 8"),
    ("ncp_sft.py", "--resolution", "0", "--resolution 0 must be a positive multiple of 8"),
    ("ncp_cpo.py", "--num-workers", "-1", "--num-workers -1 must be 0 or more"),
    ("ncp_dpo.py", "--beta", "0", "--beta 0.0 must be positive"),
    ("ncp_cpo.py", "--beta", "-5", "--beta -5.0 must be positive"),
])
def test_a_numeric_flag_out_of_range_is_one_line_and_leaves_nothing(tmp_path, script, flag, value, fragment):
    from helpers import train

    out = tmp_path / "run"
    proc = train(script, out, "--model", "tiny", flag, value, check=False)
    _one_line_error(proc, fragment)
    assert not out.exists()


# -----------------------------------------------------------------------------
# Second round. Major 1 and 2: one run per folder. Major 3: no pair left is one line with the data's counts.


def test_major_1_2_a_held_run_folder_refuses_a_second_run_resume_and_sampler_and_is_freed_when_its_holder_dies(
        tmp_path):
    """The holder is another process, killed with SIGKILL at the end: the kernel releases its lock."""
    from helpers import train

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {ROOT!r}); import run; "
                               f"run.claim_folder({str(out)!r}, '--output-dir'); print('held', flush=True); "
                               "time.sleep(600)"], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "theirs.txt").write_text("the live run's file")
        for script, args in (("ncp_dpo.py", []), ("ncp_sft.py", ["--resume"])):
            _one_line_error(train(script, out, "--model", "tiny", *args, check=False),
                            f"--output-dir {out} is in use by process {holder.pid} on ")
        (tmp_path / "prompts.txt").write_text("a red circle\n")
        proc = launch.python([sys.executable, os.path.join(ROOT, "sample.py"), "--model", "tiny", "--prompts",
                              tmp_path / "prompts.txt", "--out", out], env(), ROOT, 300, merge=False)
        assert proc.returncode != 0 and f"--out {out} is in use by process {holder.pid}" in proc.stderr, proc.stderr
        assert (out / "theirs.txt").read_text() == "the live run's file"  # a refused run removes nothing
        assert sorted(os.listdir(out)) == [".lock", "theirs.txt"]
    finally:
        holder.kill()
        holder.wait()
    import run

    run.claim_folder(str(out), "--output-dir")  # free again once its holder is dead


def test_major_3_no_pair_left_is_one_line_with_the_counts(tmp_path):
    import data
    from helpers import train

    source = data.write_synthetic(str(tmp_path / "ties"), n=8, tie_every=1)  # every pair a tie
    proc = train("ncp_dpo.py", tmp_path / "run", "--model", "tiny", "--data", source, check=False)
    _one_line_error(proc, "no preference pairs to train on")
    assert "ties 8" in proc.stdout and "ZeroDivisionError" not in proc.stdout
    assert not (tmp_path / "run").exists()


STORE_BUILD = """
import sys
sys.path.insert(0, sys.argv[1])
import data
pairs, _ = data.preference_pairs(sys.argv[2], "train")
store = data.ImageStore(sys.argv[3], pairs)
store.create()
store.build(data.PreferenceDataset(pairs, 32, train=False), store.missing())
"""


def test_major_4_two_builds_of_one_image_store_take_turns_and_every_pair_reads_right(tmp_path):
    """Two processes (two runs) build one --image-store at the same moment: each shard is written once, under its
    lock, by whichever comes first; the other finds it done. Every pair then reads its own bytes."""
    import data
    from test_io import write_shards

    shards = write_shards(tmp_path / "d", n=48, shards=4, row_group_size=4)
    script = tmp_path / "build.py"
    script.write_text(STORE_BUILD)
    procs = [subprocess.Popen([sys.executable, str(script), ROOT, shards, str(tmp_path / "store")], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    pairs, _ = data.preference_pairs(shards, "train")
    store, direct = data.ImageStore(str(tmp_path / "store"), pairs), data.PreferenceDataset(pairs, 32, train=False)
    assert store.missing().tolist() == [] and not [n for n in os.listdir(store.dir) if n.endswith("tmp")]
    for i in range(len(direct)):
        assert store.read(i, 2) == [b or b"" for b in direct._read_images(i)]


def test_major_5_a_full_disk_for_the_latent_cache_is_one_line_not_a_sigbus(tmp_path, monkeypatch):
    """The cache's arrays get their disk blocks when they are made, so writing through the memory maps cannot fault
    later; no room is a DataError with the space needed and free. Where this machine lets a test mount a small
    tmpfs, on a real full disk; always, with posix_fallocate answering ENOSPC."""
    import errno

    import data
    from test_io import write_shards

    pairs, _ = data.preference_pairs(write_shards(tmp_path / "d", n=8, shards=1), "train")
    cache = data.LatentCache(str(tmp_path / "cache"), pairs, 32, {"vae": "tiny"}, (4, 4, 4))
    cache.create()  # room enough: the blocks are held, the file no longer sparse
    latents = os.path.join(cache.dir, "latents.npy")
    assert os.stat(latents).st_blocks * 512 >= os.path.getsize(latents)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    size = r"[\d.]+ (B|KiB|MiB|GiB)"
    with pytest.raises(data.DataError, match=f"the latent cache needs {size} more disk in .* and {size} is free"):
        data.LatentCache(str(tmp_path / "other"), pairs, 32, {"vae": "tiny"}, (4, 4, 4)).create()
    monkeypatch.undo()
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        return  # no mount here: the ENOSPC path above is the check
    try:
        big = data.LatentCache(str(small), pairs, 32, {"vae": "tiny"}, (4, 64, 64))  # 8 x 2 x 32 KiB: 512 KiB
        with pytest.raises(data.DataError, match="the latent cache needs"):
            big.create()
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_major_7_paths_in_a_json_or_an_index_never_reach_outside_their_folder(tmp_path, monkeypatch):
    """An HPDv3-style train.json naming an absolute path, a ../ path, a symlink out, a FIFO and an oversized file:
    nothing outside the image root is read, nothing blocks, and each such pair is skipped and counted. evaluate.py
    refuses an index.json naming a file outside its folder."""
    import data
    import evaluate
    from test_formats import write_hpdv3

    root = tmp_path / "hpd"
    write_hpdv3(root)
    records = json.load(open(root / "train.json"))
    (tmp_path / "secret.jpg").write_bytes((root / records[0]["path1"]).read_bytes())  # a readable image, outside
    os.symlink("/dev/zero", root / "images" / "zero.jpg")
    os.mkfifo(root / "images" / "pipe.jpg")
    (root / "images" / "big.jpg").write_bytes(b"\xff" * 4096)
    bad = {0: str(tmp_path / "secret.jpg"), 1: "../secret.jpg", 2: "images/zero.jpg", 3: "images/pipe.jpg",
           6: "images/big.jpg"}  # the records that are pairs (4 compares an image with itself, 5 is a tie)
    for k, path in bad.items():
        records[k]["path1"] = path
    json.dump(records, open(root / "train.json", "w"))
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", 2048)
    pairs, _ = data.preference_pairs(str(root), "train")
    dataset = data.PreferenceDataset(pairs, 32, train=False)
    paths = [dataset.places["winner_path"][i] for i in range(len(dataset))]
    assert not [p for p in paths if p and not p.startswith(os.path.realpath(root) + os.sep)]  # none outside
    assert paths.count("") == 3 and {str(root / "images" / n) for n in ("pipe.jpg", "big.jpg")} <= set(paths)
    unreadable = []
    for i in range(len(dataset)):
        try:
            dataset._read_images(i)
        except (OSError, ValueError) as e:
            unreadable.append(type(e).__name__)
    assert sorted(unreadable) == ["FileNotFoundError"] * 3 + ["ValueError"] * 2  # each fails at once, the FIFO too
    with pytest.raises(data.DataError, match="could not be decoded"):  # every pair here is bad: skipped, then one line
        dataset[0]  # (a missing image among good ones is skipped and counted: test_missing_hpd_images_...)
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({"images": [{"prompt": "p", "files": ["../secret.jpg"]}]}))
    with pytest.raises(ValueError, match="names 1 files outside"):
        evaluate.read_index(str(folder))


def test_a_save_the_disk_refuses_is_one_line_and_keeps_the_previous_save(tmp_path, monkeypatch):
    """A full disk during a save: torch.save's writer said "unexpected pos" (a traceback), the LoRA writer ENOSPC.
    Now one line naming the folder, and the save before it whole; on a real 64 KiB tmpfs too, where there is one."""
    import errno

    import torch

    import run as run_py
    import sample

    unet = sample.build_tiny().unet
    sample.add_lora(unet, rank=2)
    out = tmp_path / "run"
    out.mkdir()
    run_py.save_run(str(out), unet, {"step": 1})
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    real_save = torch.save

    def full_writer(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 4021")

    monkeypatch.setattr(torch, "save", full_writer)
    with pytest.raises(run_py.SaveError, match=f"could not save in {out} .*unexpected pos.*kept whole"):
        run_py.save_run(str(out), unet, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sample, "save_lora", no_space)
    with pytest.raises(run_py.SaveError, match=r"\(No space left on device\)"):
        run_py.save_run(str(out), unet, {"step": 2})
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # nothing half-written, no temp
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        return  # no mount here: the two failures above are the check
    try:
        big = sample.build_tiny().unet
        sample.add_lora(big, rank=64)  # about 1 MiB of LoRA: more than the disk holds
        with pytest.raises(run_py.SaveError, match="could not save in"):
            run_py.save_run(str(small), big, {"step": 1})
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
