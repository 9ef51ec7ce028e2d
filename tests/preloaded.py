"""Commands the suite runs as a user would (``python -m experiments.x ...``, ``python -c CODE``), each in its own
process forked from a server that has already imported codi_lens and its libraries.

Importing codi_lens takes about 6 s on the 2-core machines (transformer_lens brings transformers, datasets and
torch's compiler stack), and the suite runs dozens of commands: the README's alone are over twenty. A forked child
starts with those modules imported and nothing else shared: its own working folder, argv, ``sys.path[0]`` as
``python -m`` or ``-c`` sets it, stdout and stderr, and exit status. The server never computes with torch (a child
forked after torch's thread pool ran hangs in its first parallel operation), so the pytest process, which does,
cannot serve as the parent.

The server imports once, when the suite starts it: a module edited while the suite runs is seen as it was then.
``.ci/run`` still runs the README's demo in a fresh interpreter, and ``benchmarks.real_scale_experiments`` without
``--preload`` starts one per experiment.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Completed:
    """What ``subprocess.run(..., capture_output=True, text=True)`` gives: the exit status and both streams."""

    returncode: int
    stdout: str
    stderr: str


class PreloadedPython:
    """A server process holding the imports; :meth:`run` forks a child per command. Use as a context manager."""

    def __init__(self) -> None:
        self.server = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        self.scratch = Path(tempfile.mkdtemp(prefix="codi_lens_preloaded_"))
        self.count = 0

    def run(self, argv: list[str], cwd: Path | str = ROOT, timeout: float = 900) -> Completed:
        """Run ``python *argv`` (``["-m", module, ...]`` or ``["-c", code]``) from ``cwd``; a child past
        ``timeout`` seconds is killed and :class:`subprocess.TimeoutExpired` raised."""
        if argv[0] not in ("-m", "-c"):
            raise ValueError(f"argv must start with -m or -c, not {argv[0]!r}")
        self.count += 1
        streams = {name: self.scratch / f"{self.count}.{name}" for name in ("stdout", "stderr")}
        request = {"argv": argv, "cwd": str(cwd), **{k: str(v) for k, v in streams.items()}}
        self.server.stdin.write(json.dumps(request) + "\n")
        pid = json.loads(self._reply(timeout=60))["pid"]
        try:
            returncode = json.loads(self._reply(timeout))["returncode"]
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self._reply(timeout=60)
            raise
        return Completed(returncode, *(streams[k].read_text(errors="replace") for k in ("stdout", "stderr")))

    def _reply(self, timeout: float) -> str:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired(self.server.args, timeout)
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"the preloaded server exited with status {self.server.wait()}")
        return line

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)

    def __enter__(self) -> PreloadedPython:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve() -> None:
    """Import, then fork a child per request line on stdin; reply with its pid, then its exit status."""
    from benchmarks.common import preload

    preload()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(request))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(request: dict) -> int:
    """Run one command as ``python -m`` or ``python -c`` would, and return its exit status."""
    os.chdir(request["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(os.devnull)  # noqa: SIM115 (the server's reader holds read-ahead requests)
    from benchmarks.common import exit_status  # imported by the server already (serve)

    flag, target, *rest = request["argv"]
    return exit_status(lambda: _run_as_python(flag, target, rest))


def _run_as_python(flag: str, target: str, rest: list[str]) -> None:
    """What ``python -m target *rest`` or ``python -c target *rest`` runs, with the ``sys.argv`` and
    ``sys.path[0]`` each sets."""
    if flag == "-m":
        sys.argv = [target, *rest]
        sys.path[0] = os.getcwd()
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(target, "<string>", "exec"), main.__dict__)


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        raise SystemExit("usage: python tests/preloaded.py --serve (the suite starts it)")
    sys.path[0] = str(ROOT)
    serve()
