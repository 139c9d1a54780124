"""`python SCRIPT ARGS` for the tests: a child forked from zygote.py (imports done once) where that is the same
process a real start would give, a real subprocess otherwise. Returns what subprocess.run(..., stdout=PIPE,
stderr=STDOUT, text=True) returns, and raises subprocess.TimeoutExpired the same way. for_torchrun: a torchrun
command whose workers are forked the same way (worker.py)."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from zygote import RUNTIME_ONLY  # variables a child may set differently from the zygote's

HERE = os.path.dirname(os.path.abspath(__file__))
_zygote = {}  # the one live server, under the key of the environment it imported with
_lock = threading.Lock()  # one request at a time on the server's pipes


def _server(env):
    key = json.dumps(sorted((k, v) for k, v in env.items() if k not in RUNTIME_ONLY))
    server = _zygote.get(key)
    if server is None or server.poll() is not None:
        _close()
        folder = tempfile.mkdtemp(prefix="ncp-zygote-")
        socket_path = os.path.join(folder, "socket")
        server = subprocess.Popen([sys.executable, os.path.join(HERE, "zygote.py"), socket_path], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        server.socket_path = socket_path
        _zygote[key] = server
    return server


def _close():
    for server in _zygote.values():
        server.stdin.close()
        server.wait(timeout=30)
        shutil.rmtree(os.path.dirname(server.socket_path), ignore_errors=True)
    _zygote.clear()


atexit.register(_close)


def python(argv, env, cwd, timeout=600, merge=True):
    """argv = [sys.executable, script.py, *args]: the script's CompletedProcess, text; stderr in .stdout when
    `merge`, else in .stderr (as capture_output=True gives)."""
    argv = [str(a) for a in argv]
    if os.environ.get("NCP_TESTS_NO_FORK") or argv[0] != sys.executable or not argv[1].endswith(".py"):
        return subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True, timeout=timeout)
    with _lock:
        return _forked(argv, env, cwd, timeout, merge)


def _forked(argv, env, cwd, timeout, merge):
    server = _server(env)
    with tempfile.NamedTemporaryFile("r", prefix="ncp-test-out-") as out, \
            tempfile.NamedTemporaryFile("r", prefix="ncp-test-err-") as err:
        server.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "out": out.name,
                                       "err": "" if merge else err.name, "timeout": timeout}) + "\n")
        server.stdin.flush()
        reply = json.loads(server.stdout.readline())
        stdout, stderr = out.read(), (None if merge else err.read())
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(argv, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(argv, reply["rc"], stdout, stderr)


def for_torchrun(cmd, env):
    """(cmd, env) of a torchrun command [python, -m, torch.distributed.run, options..., script.py, args...] whose
    workers are forked by the zygote: worker.py goes before the script, and env names the zygote's socket."""
    cmd = [str(c) for c in cmd]
    if os.environ.get("NCP_TESTS_NO_FORK"):
        return cmd, env
    at = next(i for i, c in enumerate(cmd) if i > 2 and c.endswith(".py"))
    with _lock:
        server = _server(env)
    deadline = time.monotonic() + 120  # the socket is there once the imports are done
    while not os.path.exists(server.socket_path) and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return cmd[:at] + [os.path.join(HERE, "worker.py")] + cmd[at:], {**env, "NCP_ZYGOTE_SOCKET": server.socket_path}
