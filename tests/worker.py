"""What torchrun starts for a worker in the tests: `python -u worker.py SCRIPT ARGS` asks the zygote (zygote.py, at
the socket NCP_ZYGOTE_SOCKET names) to fork `python SCRIPT ARGS` on this process's stdin, stdout and stderr, passes
on the signals it gets (torchrun's SIGTERM), and exits as the child did, with its code or by its signal. Without the
socket, or where the zygote's imports would not be this environment's, it becomes the real process (exec)."""

import json
import os
import signal
import socket
import sys


def real():
    os.execv(sys.executable, [sys.executable, "-u", *sys.argv[1:]])


def main():
    path = os.environ.get("NCP_ZYGOTE_SOCKET")
    if not path or not os.path.exists(path):
        real()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError:
        real()
    request = {"argv": [sys.executable, *sys.argv[1:]], "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(connection, [json.dumps(request).encode()], [0, 1, 2])
    replies = connection.makefile("r")
    reply = json.loads(replies.readline() or '{"fallback": true}')
    if reply.get("fallback"):
        connection.close()
        real()
    pid = reply["pid"]

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    line = replies.readline()
    rc = json.loads(line)["rc"] if line else 1
    if rc < 0:  # killed by a signal: die by the same one, so that torchrun reads the same exit
        signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
    sys.exit(rc)


if __name__ == "__main__":
    main()
