"""Start test processes from a Python that has torch and ember imported already.

Every test process used to be a fresh interpreter paying ~2 s to import torch and ember; on a
2-core machine, hundreds of them were a third of the suite's CPU. Here one server per pytest process
imports them once and forks a child per request; the child takes the request's environment,
working directory, argv, ``__main__`` and output files, then runs the code or script as
``python -c CODE`` / ``python SCRIPT`` would (uncaught exceptions print and exit 1, ``SystemExit``
sets the code, atexit handlers run).

    process = start([PYTHON, "-c", code], env=env, cwd=path, stdout=log, stderr=subprocess.STDOUT)
    process.wait(timeout=60)        # a Popen-like handle: pid, poll, wait, kill, send_signal

A request the server cannot honour exactly (another interpreter, interpreter options, or an
environment variable read while torch is imported, as OMP_NUM_THREADS is by OpenMP) starts a real
subprocess instead. A test that is about a fresh interpreter (start-up time, what importing ember
loads) starts its own subprocess.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

# Read while the server imports torch (OpenMP reads its thread count when the library loads) or by
# the interpreter at start-up: a request that sets them differently gets a real subprocess.
_FIXED_AT_START = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TORCH_CPP_LOG_LEVEL",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
)
# Interpreter variables the child applies itself (the rest fall back to a subprocess).
_APPLIED_IN_CHILD = ("PYTHONUNBUFFERED", "PYTHONFAULTHANDLER", "PYTHONPATH")
# torch._dynamo: the first optimizer of every process imports it (~1.5-2.3 s); torchmetrics (~2-3 s,
# with SciPy) the runs whose module holds a metric object. Neither starts a thread at import.
_PRELOAD = ("torch", "numpy", "ember", "ember.trainer", "torch.distributed", "torch.utils.data", "torch._dynamo",
            "torchmetrics")  # fmt: skip


class WarmProcess:
    """A process forked by the server: the subset of ``subprocess.Popen`` the tests use."""

    def __init__(self, args: list[str], pid: int, channel: socket.socket) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self._channel = channel

    def poll(self) -> int | None:
        return self._read(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._read(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)

    def terminate(self) -> None:
        self.send_signal(15)

    def _read(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self._channel.settimeout(timeout if timeout is None else max(timeout, 1e-6))
        try:
            data = self._channel.recv(64)
        except (TimeoutError, BlockingIOError):
            return None
        if not data:
            raise RuntimeError(f"the warm-Python server stopped before process {self.pid} finished")
        self.returncode = int(data.decode())
        self._channel.close()
        return self.returncode


class _Server:
    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path = f"/tmp/ember-warm-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.env = _server_env()
        code = (
            "import importlib.util as u\n"
            f"s = u.spec_from_file_location('_ember_warm_server', {__file__!r})\n"
            "m = u.module_from_spec(s)\n"
            "s.loader.exec_module(m)\n"
            f"m.main({self.listener.fileno()})\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            env=self.env,
            stdin=subprocess.DEVNULL,
            pass_fds=(self.listener.fileno(),),
        )
        atexit.register(self.close)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.listener.close()
        Path(self.path).unlink(missing_ok=True)


_server: _Server | None = None


def _server_env() -> dict[str, str]:
    from dist_helpers import base_env

    return base_env()


def _plan(args: list[str], env: dict[str, str]) -> dict[str, Any] | None:
    """What the child runs for ``args``, or None when only a real interpreter runs it exactly."""
    if len(args) < 2 or args[0] != sys.executable:
        return None
    server_env = _server_env()
    if any(env.get(k) != server_env.get(k) for k in _FIXED_AT_START):
        return None
    if any(
        k.startswith("PYTHON") and k not in _APPLIED_IN_CHILD and env.get(k) != server_env.get(k)
        for k in {*env, *server_env}
    ):
        return None
    if args[1] == "-c" and len(args) >= 3:
        return {"code": args[2], "argv": ["-c", *args[3:]]}
    if not args[1].startswith("-"):
        return {"script": args[1], "argv": args[1:]}
    return None


def start(
    args: list[str],
    *,
    env: dict[str, str],
    cwd: str | Path,
    stdout: IO[Any],
    stderr: IO[Any] | int,
) -> WarmProcess | subprocess.Popen[bytes]:
    """Start ``args`` (``[sys.executable, "-c", code]`` or ``[sys.executable, script, ...]``) as a
    forked child of the warm server; ``stderr`` is a file or ``subprocess.STDOUT``."""
    plan = _plan(args, env)
    if plan is None:
        return subprocess.Popen(args, env=env, cwd=str(cwd), stdout=stdout, stderr=stderr)
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _Server()
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.connect(_server.path)
    request = json.dumps({**plan, "env": env, "cwd": str(cwd)}).encode()
    err = stdout if stderr == subprocess.STDOUT else stderr
    assert not isinstance(err, int)
    socket.send_fds(channel, [len(request).to_bytes(8, "big") + request], [stdout.fileno(), err.fileno()])
    pid = int.from_bytes(_receive(channel, 8), "big")
    return WarmProcess(args, pid, channel)


def _receive(channel: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = channel.recv(size - len(data))
        if not chunk:
            raise RuntimeError("the warm-Python server closed the connection")
        data += chunk
    return data


# --- the server (runs in its own process) -----------------------------------------------------------


def main(listener_fd: int) -> None:
    """Import torch and ember, then fork a child per request; in a child, run the request."""
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    request = _serve(socket.socket(fileno=listener_fd))
    _run(request)


def _serve(listener: socket.socket) -> dict[str, Any]:
    """Answer requests until the parent goes; returns only in a forked child, with its request."""
    parent = os.getppid()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        if selector.select(timeout=0.05):
            channel, _ = listener.accept()
            head, fds, _, _ = socket.recv_fds(channel, 8, 2)
            size = int.from_bytes(head, "big")
            request = json.loads(_receive(channel, size))
            pid = os.fork()
            if pid == 0:
                selector.close()
                listener.close()
                channel.close()
                for other in children.values():
                    other.close()
                os.dup2(fds[0], 1)
                os.dup2(fds[1], 2)
                for fd in fds:
                    os.close(fd)
                return request
            for fd in fds:
                os.close(fd)
            channel.sendall(pid.to_bytes(8, "big"))
            children[pid] = channel
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            channel = children.pop(pid)
            channel.sendall(str(os.waitstatus_to_exitcode(status)).encode())
            channel.close()
    os._exit(0)


def _run(request: dict[str, Any]) -> None:
    """Become ``python -c CODE`` / ``python SCRIPT`` for ``request`` (in the forked child)."""
    import builtins
    import tempfile
    import types

    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    tempfile.tempdir = None
    if "numpy" in sys.modules:  # a fresh interpreter seeds NumPy's global generator from the OS
        sys.modules["numpy"].random.seed()
    if os.environ.get("PYTHONFAULTHANDLER"):
        import faulthandler

        faulthandler.enable()
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base = [p for p in sys.path[1:] if p not in extra]
    sys.argv = list(request["argv"])
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    if "code" in request:
        sys.path[:] = ["", *extra, *base]
        source, filename = request["code"], "<string>"
    else:
        script = os.path.abspath(request["script"])
        sys.path[:] = [os.path.dirname(script), *extra, *base]
        main.__file__ = script
        source, filename = Path(script).read_text(encoding="utf-8"), script
    sys.modules["__main__"] = main
    exec(compile(source, filename, "exec"), main.__dict__)
