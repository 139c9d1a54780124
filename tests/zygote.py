"""A process that has imported the heavy libraries once and forks a fresh child for each script a test runs.

Most of a tiny training run's wall time is Python importing torch, diffusers, transformers and peft (about 10 of its
15 seconds on 2 cores). A forked child starts with those modules already in memory, and is otherwise the process
`python SCRIPT ARGS` would be: its own pid, working directory, environment, argv, sys.path[0], signal dispositions,
stdout and stderr (one file), exit code and exit handlers. It has imported none of this project's modules.

What a fork cannot give, tests keep on real subprocesses (see launch.py): warnings printed while a library imports,
an environment that differs in a variable read at import time, `python -m`/`-c`, torchrun, and signals sent by the
test to the process.

Protocol, one JSON object a line: {"argv", "cwd", "env", "out", "err", "timeout"} in (err "": stderr into out), {"rc", "timed_out"} out.
"""

import json
import os
import signal
import sys
import time

PRELOAD = ["numpy", "PIL.Image", "pyarrow", "pyarrow.parquet", "safetensors.torch", "tqdm", "torch",
           "torch.distributed", "torch.utils.data", "transformers", "peft", "diffusers", "diffusers.models",
           "diffusers.schedulers", "diffusers.pipelines"]
# Names resolved lazily by diffusers and transformers, imported now so that children do not each import them.
ATTRIBUTES = {"diffusers": ["AutoencoderKL", "UNet2DConditionModel", "SD3Transformer2DModel", "DDPMScheduler",
                            "DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
                            "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline"],
              "transformers": ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "T5EncoderModel",
                               "CLIPModel", "CLIPVisionModelWithProjection"]}


def preload():
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for module, names in ATTRIBUTES.items():
        for name in names:
            getattr(sys.modules[module], name, None)


def child(request):
    """Become `python argv[1] argv[2:]` in this forked process; never returns."""
    os.setpgid(0, 0)  # the test may kill the child's whole group on a timeout, workers included
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as the interpreter sets it at start-up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if request["err"] else out
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in {out, err, null}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
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


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        deadline = time.monotonic() + request["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline and not timed_out:
                timed_out = True
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.01)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": rc, "timed_out": timed_out}), flush=True)


if __name__ == "__main__":
    saved = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # the libraries' import-time notices are not the tests' output
    preload()
    sys.stderr.flush()
    os.dup2(saved, 2)
    serve()
