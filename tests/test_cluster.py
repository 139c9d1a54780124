"""Runs on a cluster: preemption with DataLoader workers, torchrun and process-group signals, slow ranks, several
nodes, and what may change on resume."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import ncp_dpo
import run
import sample
import launch
from helpers import FAST, ROOT, env, lora, metrics, train

# A long step: 32 micro-batches of 2 pairs each, on 2 DataLoader workers.
LONG = ["--model", "tiny", "--num-workers", "2", "--global-batch-size", "64", "--micro-batch-size", "2"]


def _launch(cmd, environ=None, **kwargs):
    return subprocess.Popen(cmd, cwd=ROOT, env=environ or env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kwargs)


def _wait_for_step(out, step, proc, timeout=300):
    path, deadline = os.path.join(out, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and any(f'"step": {step},' in line for line in open(path)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {path}: {proc.communicate()[0][-3000:] if proc.poll() is not None else ''}")


def _same_lora(a, b):
    a, b = lora(a), lora(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_process_group_sigterm_mid_step_saves_within_a_micro_batch_and_resumes_exactly(tmp_path):
    """Slurm's way: SIGTERM to the whole process group, workers included, in the middle of a long step."""
    straight = tmp_path / "straight"
    train("ncp_dpo.py", straight, *LONG, "--max-steps", "3")
    out = tmp_path / "stopped"
    proc = _launch([sys.executable, os.path.join(ROOT, "ncp_dpo.py"), "--output-dir", str(out), *FAST, *LONG,
                    "--max-steps", "3"])
    _wait_for_step(out, 1, proc)
    time.sleep(0.5)  # into step 2
    sent = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    exited = time.time() - sent
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "DataLoader worker" not in log
    step_time = metrics(out)[0]["step_time"]  # one step of 32 micro-batches
    saved_after = float(re.search(r"checkpoint of step 1 saved ([\d.]+) s after the signal", log).group(1))
    assert "SIGTERM: stopping at step 1" in log and "micro-batches dropped" in log
    assert saved_after < step_time / 2 and exited < step_time, (saved_after, exited, step_time)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1
    train("ncp_dpo.py", out, *LONG, "--max-steps", "3", "--resume")
    _same_lora(straight, out)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_torchrun_sigterm_to_the_launcher_then_resume_is_exact(tmp_path):
    args = ["--model", "tiny", "--num-workers", "2", "--global-batch-size", "16", "--micro-batch-size", "2"]
    straight = tmp_path / "straight"
    train("ncp_dpo.py", straight, *args, "--max-steps", "3", nproc=2)
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "ncp_dpo.py"), "--output-dir", str(out), *FAST, *args, "--max-steps", "3"]
    proc = _launch(cmd)
    _wait_for_step(out, 1, proc)
    proc.send_signal(signal.SIGTERM)  # to torchrun alone: it passes the signal on to its ranks
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "saved" in log and "DataLoader worker" not in log, log[-3000:]
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 1 <= step < 3
    train("ncp_dpo.py", out, *args, "--max-steps", "3", "--resume", nproc=2)
    _same_lora(straight, out)


SLOW_RANK = '''
import os, time
if os.environ.get("RANK") == "1":
    import data
    fill = data.LatentCache.fill
    def slow_fill(self, *args, **kwargs):
        time.sleep(float(os.environ["SLOW_FILL_SECONDS"]))
        return fill(self, *args, **kwargs)
    data.LatentCache.fill = slow_fill
'''


def test_a_rank_slower_than_the_dist_timeout_through_the_cache_fill_still_completes(tmp_path):
    """Rank 1 fills its share of the latent cache 24 s late, with --dist-timeout 0.15 (9 s): the other rank waits
    by watching the cache rather than at a collective, so nothing times out and the run completes."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "ncp_dpo.py"), "--output-dir", str(tmp_path / "out"), *FAST, "--model", "tiny",
           "--max-steps", "2", "--cache-latents", str(tmp_path / "cache"), "--dist-timeout", "0.15"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                          env={**env(), "PYTHONPATH": f"{tmp_path / 'hook'}{os.pathsep}{ROOT}", "SLOW_FILL_SECONDS": "24"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "done: step 2" in proc.stdout and [r["step"] for r in metrics(tmp_path / "out")] == [1, 2]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(out, cache, max_steps, *extra):
    """torchrun --nnodes 2 on this machine: two launchers, one process each, a c10d rendezvous on localhost."""
    port, procs = _free_port(), []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=ncp-test",
               os.path.join(ROOT, "ncp_dpo.py"), "--output-dir", str(out), *FAST, "--model", "tiny",
               "--max-steps", str(max_steps), "--cache-latents", str(cache), *extra]
        procs.append(_launch(*launch.for_torchrun(cmd, env())))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    return logs


def test_two_nodes_share_the_latent_cache_and_resume(tmp_path):
    cache = tmp_path / "cache"
    logs = _two_nodes(tmp_path / "run", cache, 2)
    assert "world 2 x micro 2 x accum 1" in logs[0]
    logs = _two_nodes(tmp_path / "run", cache, 4, "--resume")
    assert "resumed from" in logs[0] and "LoRA weights identical on all 2 ranks: True" in logs[0]
    assert "0 to encode" in logs[0]  # the second job found the cache the first one filled
    one = tmp_path / "one"  # the same run on one process: the same pairs, t and noise per step
    train("ncp_dpo.py", one, "--model", "tiny", "--max-steps", "4", "--cache-latents", str(cache))
    a, b = lora(one), lora(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# Resume with other flags


def test_resume_applies_allowed_changes_and_refuses_the_rest_before_loading(tmp_path, monkeypatch):
    train("ncp_dpo.py", tmp_path, "--model", "tiny", "--max-steps", "2", "--lr", "1e-3")
    proc = train("ncp_dpo.py", tmp_path, "--model", "tiny", "--max-steps", "3", "--resume", "--lr", "5e-4",
                 "--beta", "100")
    changed = proc.stdout.split("changed on resume: ")[1].split("\n")[0].split("; ")
    assert sorted(changed) == ["beta 2500.0 -> 100.0", "lr 0.001 -> 0.0005", "max-steps 2 -> 3"]
    assert metrics(tmp_path)[-1]["lr"] == 5e-4  # the lr the step used, not the schedule's next
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["args"]
    assert (saved["lr"], saved["beta"], saved["max_steps"]) == (5e-4, 100.0, 3)  # what the run really used
    # Flags not given come from the checkpoint: --resume alone continues the run as it was.
    proc = train("ncp_dpo.py", tmp_path, "--model", "tiny", "--max-steps", "4", "--resume")
    assert "lr" not in proc.stdout.split("changed on resume:")[-1].split("\n")[0]
    assert metrics(tmp_path)[-1]["lr"] == 5e-4
    monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    for argv, message in [(["--optimizer", "adamw8bit"], "--resume cannot change optimizer adamw -> adamw8bit"),
                          (["--space", "latent"], "--resume cannot change space ncp -> latent"),
                          (["--max-steps", "3"], "--max-steps 3: the checkpoint is already at step 4")]:
        with pytest.raises(SystemExit) as exit_info:
            ncp_dpo.main(ncp_dpo.parse_args(["--model", "tiny", "--data", "synthetic", "--output-dir", str(tmp_path),
                                             "--resume", *argv]))
        assert message in str(exit_info.value.code)


def test_user_errors_are_one_line_and_leave_nothing_behind(tmp_path):
    out = tmp_path / "out"
    proc = train("ncp_dpo.py", out, "--model", "sd15", "--max-steps", "1", check=False)  # offline: unreachable
    assert proc.returncode != 0 and "Traceback" not in proc.stdout and "error: could not load" in proc.stdout
    assert not out.exists()
    proc = train("ncp_dpo.py", out, "--model", "tiny", "--max-steps", "0", check=False)
    assert "--max-steps 0 must be positive" in proc.stdout and not out.exists()
    proc = train("ncp_dpo.py", out, "--model", "tiny", "--seed", str(2**40), check=False)
    assert "--seed 1099511627776 must be between 0 and 2^32 - 1" in proc.stdout
    assert run.step_seed(2**32 - 1, 10**6, 10**4) < 2**63  # the largest seed still gives valid generator seeds
