"""A process that has imported the heavy libraries once and forks a fresh child for each script a test runs.

Most of a tiny training run's wall time is Python importing torch, diffusers, transformers and peft (about 10 of its
15 seconds on 2 cores). A forked child starts with those modules already in memory, and is otherwise the process
`python SCRIPT ARGS` would be: its own pid and process group, working directory, environment, argv, sys.path[0],
signal dispositions, stdin, stdout and stderr, exit code and exit handlers. It has imported none of this project's
modules.

Two ways in:
- the test process (launch.py), one JSON object a line on stdin: {"argv", "cwd", "env", "out", "err", "timeout"}
  (err "": stderr into out), answered on stdout by {"rc", "timed_out"} when the child has exited;
- torchrun's workers (worker.py, a small client torchrun starts in place of the script), over the UNIX socket
  named by argv[1]: {"argv", "cwd", "env"} with the client's stdin, stdout and stderr passed along, answered by
  {"pid"} and then {"rc"}. The client forwards the signals it gets to the child; if the client dies, its child is
  killed with it.

What a fork cannot give, tests keep on real processes: warnings printed while a library imports, an environment
that differs in a variable read at import time (a start-up hook on PYTHONPATH, say), `python -m` / `-c`, and
signals a test sends to the process itself.
"""

import json
import os
import selectors
import signal
import socket
import sys
import time

PRELOAD = ["numpy", "PIL.Image", "pyarrow", "pyarrow.parquet", "safetensors.torch", "tqdm", "torch",
           "torch.distributed", "torch.utils.data", "transformers", "peft", "diffusers", "diffusers.models",
           "diffusers.schedulers", "diffusers.pipelines"]
# Names resolved lazily by diffusers and transformers, imported now so that children do not each import them.
ATTRIBUTES = {"diffusers": ["AutoencoderKL", "UNet2DConditionModel", "SD3Transformer2DModel", "DDPMScheduler",
                            "DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
                            "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                            "AutoencoderKLFlux2", "Flux2Transformer2DModel", "Flux2KleinPipeline"],
              "transformers": ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "T5EncoderModel",
                               "CLIPModel", "CLIPVisionModelWithProjection", "Qwen3ForCausalLM"]}
# What torchrun adds to a worker's environment: read when the process group starts, never while a library imports.
LAUNCHER = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
            "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
            "NCCL_ASYNC_ERROR_HANDLING", "PYTHONUNBUFFERED"}
# Variables no library reads while it imports: a child may have them set otherwise than the zygote.
RUNTIME_ONLY = {"TMPDIR", "WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "WANDB_PROJECT", "MASTER_PORT",
                "PYTEST_CURRENT_TEST", "NCP_ZYGOTE_SOCKET"}


def preload():
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for module, names in ATTRIBUTES.items():
        for name in names:
            getattr(sys.modules[module], name, None)


def same_imports(env, own):
    """Whether a process with environment `env` would import the libraries as this one did (`own`)."""
    key = lambda e: {k: v for k, v in e.items() if k not in LAUNCHER | RUNTIME_ONLY  # noqa: E731
                     and not k.startswith("TORCHELASTIC_")}
    return key(env) == key(own)


ADDED = {}  # what the libraries added to the environment as they imported; a real start would have it too


def child(request, fds, unbuffered=False):
    """Become `python argv[1] argv[2:]` in this forked process, on the file descriptors `fds` (stdin, stdout,
    stderr); never returns."""
    os.setpgid(0, 0)  # a timeout or a dead client kills the child's whole group, its DataLoader workers included
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as the interpreter sets it at start-up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    if unbuffered:  # python -u, as torchrun starts its workers
        sys.stdout.reconfigure(write_through=True)
        sys.stderr.reconfigure(write_through=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**ADDED, **request["env"]})
    import tempfile

    tempfile.tempdir = None  # TMPDIR is read again
    script, args = request["argv"][1], request["argv"][2:]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    rc = 0
    try:
        import runpy

        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            rc = 0
        elif isinstance(e.code, int):
            rc = e.code
        else:
            print(e.code, file=sys.stderr)
            rc = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        rc = 1
    try:
        import threading

        threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc)


def fork(request, fds, unbuffered=False):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            child(request, fds, unbuffered)
        finally:
            os._exit(1)
    return pid


def exit_code(status):
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_group(pid, sig=signal.SIGKILL):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def serve(socket_path, own):
    """The event loop: requests on stdin and on the socket, children reaped as they exit. own: the environment
    this process started with (the libraries may add to it as they import: torch its inductor cache folder)."""
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    selector.register(listener, selectors.EVENT_READ, "listen")
    from_stdin = {}  # pid -> (deadline, timed_out)
    from_socket = {}  # pid -> connection
    while True:
        for key, _ in selector.select(timeout=0.02):
            if key.data == "stdin":
                line = sys.stdin.readline()
                if not line:  # the test session is over
                    for pid in [*from_stdin, *from_socket]:
                        kill_group(pid)
                    return
                request = json.loads(line)
                out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if request["err"] else out
                null = os.open(os.devnull, os.O_RDONLY)
                pid = fork(request, (null, out, err))
                for fd in {null, out, err}:
                    os.close(fd)
                from_stdin[pid] = [time.monotonic() + request["timeout"], False]
            elif key.data == "listen":
                connection, _ = listener.accept()
                selector.register(connection, selectors.EVENT_READ, "client")
            else:
                connection = key.fileobj
                try:
                    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
                except OSError:
                    message, fds = b"", []
                pid = next((p for p, c in from_socket.items() if c is connection), None)
                if not message:  # the client is gone: so is its child
                    selector.unregister(connection)
                    connection.close()
                    if pid is not None:
                        kill_group(pid)
                    continue
                request = json.loads(message)
                if not same_imports(request["env"], own):
                    connection.sendall(b'{"fallback": true}\n')
                    for fd in fds:
                        os.close(fd)
                    continue
                pid = fork(request, fds, unbuffered=True)
                for fd in fds:
                    os.close(fd)
                from_socket[pid] = connection
                connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        for pid, entry in from_stdin.items():  # timeouts of the test process's requests
            if not entry[1] and time.monotonic() > entry[0]:
                entry[1] = True
                kill_group(pid)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            if pid in from_stdin:
                _, timed_out = from_stdin.pop(pid)
                print(json.dumps({"rc": exit_code(status), "timed_out": timed_out}), flush=True)
            elif pid in from_socket:
                connection = from_socket.pop(pid)
                try:
                    connection.sendall(json.dumps({"rc": exit_code(status)}).encode() + b"\n")
                except OSError:
                    pass


if __name__ == "__main__":
    started_with = dict(os.environ)
    saved = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # the libraries' import-time notices are not the tests' output
    preload()
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    ADDED.update({k: v for k, v in os.environ.items() if started_with.get(k) != v})
    serve(sys.argv[1], started_with)
