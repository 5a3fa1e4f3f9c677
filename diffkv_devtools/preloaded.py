"""Many short SGLang command lines run from one interpreter that imported SGLang once (the start-up tests).

A start-up refusal takes about 17 s on the 2-core CI machine, 11 s of them importing SGLang. ``run_preloaded``
pays that import once: it starts one interpreter in the CPU environment (:func:`~diffkv_devtools.sglang_server
.cpu_env`), imports the ``preload`` modules there, and runs every :class:`Job` in a child forked from it. The
child sets the job's environment variables, working directory and ``sys.argv``, sends its file descriptors 1 and
2 into files, and then runs the module as ``__main__`` (``python -m``) or executes the code (``python -c``).
Nothing of the job has run before the fork (importing is all the parent does), and the child ends as that process
would: with its exit status, after Python's normal shutdown (``atexit`` handlers, buffered output flushed), a
traceback on stderr for an uncaught exception. Each result is a :class:`subprocess.CompletedProcess`.

What a fork cannot give is a fresh interpreter's import-time reads of the environment: a job's variables are set
after the preloaded modules were imported, so they must be read at run time (the plugin reads ``DIFFKV_*`` when
it resolves the arguments). Keep at least one start-up test in a fresh process to guard that.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from .sglang_server import cpu_env


@dataclasses.dataclass(frozen=True)
class Job:
    """One command line: ``python -m module *args`` (``module`` given) or ``python -c code *args`` (``code``).

    ``env`` is applied on top of the CPU environment: a value sets the variable, ``None`` removes it."""
    args: Sequence[str] = ()
    module: str | None = None
    code: str | None = None
    env: Mapping[str, str | None] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if (self.module is None) == (self.code is None):
            raise ValueError("a Job needs exactly one of module= and code=")


def run_preloaded(jobs: Sequence[Job], preload: Sequence[str] = ("sglang.launch_server",),
                  timeout: float = 900.0) -> list[subprocess.CompletedProcess]:
    """Run ``jobs`` one after another in children of one interpreter that imported ``preload`` first.

    Returns one ``CompletedProcess`` per job, in order (``args`` is the equivalent command line; ``stdout`` and
    ``stderr`` are text). ``timeout`` (s) bounds the whole run, imports included."""
    workdir = Path(tempfile.mkdtemp(prefix="sglang-preloaded-"))
    (workdir / "jobs.json").write_text(json.dumps({"preload": list(preload),
                                                   "jobs": [dataclasses.asdict(j) for j in jobs]}))
    done = subprocess.run([sys.executable, "-m", "diffkv_devtools.preloaded", str(workdir)], cwd=workdir,
                          env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the preloaded interpreter failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = []
    for i, job in enumerate(jobs):
        job_dir = workdir / str(i)
        line = ["-m", job.module] if job.module else ["-c", "<code>"]
        results.append(subprocess.CompletedProcess(
            [sys.executable, *line, *job.args], int((job_dir / "returncode").read_text()),
            (job_dir / "stdout").read_text(errors="replace"), (job_dir / "stderr").read_text(errors="replace")))
    return results


def _run_job(job: dict, job_dir: Path) -> None:
    """In the forked child: become the job's process and run it. Never returns: the job's ``SystemExit`` (or an
    uncaught exception) unwinds to the interpreter, which exits as ``python -m``/``-c`` would."""
    for name, value in job["env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.chdir(job_dir)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(job_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    if job["module"] is not None:
        sys.path[0] = os.getcwd()                      # what ``python -m`` puts first
        sys.argv = [job["module"], *job["args"]]
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = ""                               # what ``python -c`` puts first
        sys.argv = ["-c", *job["args"]]
        exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    sys.exit(0)


def main(workdir: str) -> None:
    """The preloaded interpreter: import, then fork one child per job and record its exit status."""
    spec = json.loads((Path(workdir) / "jobs.json").read_text())
    for name in spec["preload"]:
        importlib.import_module(name)
    for i, job in enumerate(spec["jobs"]):
        job_dir = Path(workdir) / str(i)
        job_dir.mkdir()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_job(job, job_dir)                     # the child never comes back here
        _, status = os.waitpid(pid, 0)
        (job_dir / "returncode").write_text(str(os.waitstatus_to_exitcode(status)))


if __name__ == "__main__":
    main(sys.argv[1])
