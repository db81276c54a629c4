"""Runs untrusted, model-generated Python programs, one isolated subprocess each.

`run_program(source)` executes `source` and reports how it ended (`SandboxResult`): "passed"
(exit status 0), "failed" (an exception escaped, e.g. an AssertionError of a unit test or a
MemoryError at the memory limit, a non-zero exit, or a crash by a signal), "timeout" (the
wall-clock limit or the CPU-time limit was reached) or "error" (the sandbox could not run
the program: the interpreter did not start, the launch failed). This is how code-generation
benchmarks score a completion (HumanEval's pass@1, "Evaluating Large Language Models
Trained on Code", Chen et al. 2021; the program is the prompt, the completion and the
problem's tests).

The layers of isolation, each one cheap:

* a fresh interpreter, `sys.executable -I -S`: isolated mode ignores PYTHON* variables and
  the user's site directory and puts neither the script's directory nor the working
  directory on `sys.path`; `-S` skips `site`, so no site-packages either (the project is
  installed there in editable mode, so `import decoding` would otherwise work). Programs get
  the standard library only;
* a fresh temporary working directory, deleted afterwards with whatever the program wrote;
  `HOME` and `TMPDIR` point into it, the environment is otherwise only `PATH` and `LANG`;
* resource limits (`resource.setrlimit`), set by the sandboxed interpreter itself before
  the program's first line and inherited by anything it starts: address space (RLIMIT_AS:
  an allocation past it raises MemoryError), CPU seconds (RLIMIT_CPU: SIGXCPU, then
  SIGKILL), file size (RLIMIT_FSIZE: a longer write fails with EFBIG, as Python ignores
  SIGXFSZ; it also bounds what the program prints, as its output goes to files), open
  files (RLIMIT_NOFILE) and no core files (RLIMIT_CORE = 0). Not in a `preexec_fn`:
  Python code run between fork and exec of a multithreaded process (every JAX process is
  one) can deadlock, and JAX warns about it; `start_new_session` happens in C;
* its own session (process group): at the wall-clock limit, and after a normal exit too,
  the whole group is killed, so children the program started do not outlive it;
* no network: a prelude replaces `socket.socket` (and `_socket.socket`, `socketpair`,
  `fromfd`) with versions that raise PermissionError before the program runs. A program can
  get around a Python-level prelude (ctypes, a subprocess), so where the kernel allows
  unprivileged user namespaces the interpreter also runs in new user, network and mount
  namespaces (`unshare -rmn`, level "namespaces"): its only network interface is a loopback
  device that is down, so nothing, not even 127.0.0.1, is reachable; the root filesystem is
  remounted read-only except the working directory; /dev/shm is a fresh tmpfs; and the
  project's directory is hidden under an empty tmpfs (`hidden_paths`), so the program cannot
  read the repository by absolute path either.

Which level works is checked once per process by running `true` under it
(`isolation_level()`): "namespaces", else "network" (`unshare -rn`: user and network
namespaces only), else "none" (some containers forbid user namespaces; the prelude, the
working directory and the limits still apply). Other mounted filesystems (e.g. a /tmp of
its own) stay writable at every level: this is a harness for benchmark programs, not a
jail for adversarial code.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

STATUSES = ("passed", "failed", "timeout", "error")
ISOLATION_LEVELS = ("namespaces", "network", "none")  # strongest first

#: the project's root (the folder holding `decoding/`): hidden from programs where possible
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM_FILE = "program.py"

# Runs in the sandboxed interpreter before the program (passed with -c; argv: the status
# descriptor, the program's path, the memory, CPU and file-size limits). It sets the limits,
# blocks sockets, reports on the status descriptor "S" once the program starts and
# "E<exception type>" if an exception ends it, so the parent can tell a program that failed
# from an interpreter that never started (status "error"). The socket replacements subclass
# the real class, so code that subclasses or isinstance-checks socket.socket (ssl, asyncio)
# still imports.
_DRIVER = r'''
import os, resource, sys
_fd = int(sys.argv[1])
def _report(text):
    try:
        os.write(_fd, text.encode())
    except OSError:
        pass
_memory, _cpu, _fsize = (int(v) for v in sys.argv[3:6])
resource.setrlimit(resource.RLIMIT_AS, (_memory, _memory))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
import _socket, socket
def _no_network(*args, **kwargs):
    raise PermissionError(13, "network access is disabled in the sandbox")
class _NoSocket(socket.socket):
    __slots__ = ()
    def __init__(self, *args, **kwargs):
        _no_network()
socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = _NoSocket
socket.socketpair = _socket.socketpair = socket.fromfd = _no_network
if hasattr(socket, "fromshare"):
    socket.fromshare = _no_network
del socket, _socket, resource
sys.argv = [sys.argv[2]]
with open(sys.argv[0], encoding="utf-8") as _f:
    _source = _f.read()
_globals = {"__name__": "__main__", "__file__": sys.argv[0], "__builtins__": __builtins__}
_report("S")
try:
    exec(compile(_source, sys.argv[0], "exec"), _globals)
except SystemExit:
    raise
except BaseException as _e:
    _report("E" + type(_e).__name__)
    raise
'''


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """How one program ended. `stdout` and `stderr` are the last `tail_chars` characters."""
  status: str  # one of STATUSES
  returncode: Optional[int]  # exit status; -N: killed by signal N; None: it never ran
  seconds: float  # wall time of the subprocess
  stdout: str = ""
  stderr: str = ""
  exception: Optional[str] = None  # type name of the exception that ended the program
  isolation: str = "none"  # the level it ran at (ISOLATION_LEVELS)

  @property
  def passed(self) -> bool:
    return self.status == "passed"


def _setup_script(num_hidden: int) -> str:
  """The shell script run as root of the new user namespace: `$1` is the working directory,
  `$2..` the directories to hide, then the command. Binding the working directory onto
  itself makes it a mount of its own, so it stays writable when the root filesystem is
  remounted read-only; /dev/shm gets a fresh tmpfs; each hidden directory an empty one."""
  steps = ['mount --bind "$1" "$1"', "mount -o remount,bind,ro /",
           "mount -t tmpfs -o size=64m none /dev/shm"]
  steps += [f'mount -t tmpfs -o size=16k,mode=0 none "${i + 2}"' for i in range(num_hidden)]
  # cd again: the inherited working directory still refers to the (now read-only) mount below
  return " && ".join(steps + ['cd "$1"', "unset PWD OLDPWD", f'shift {num_hidden + 1}',
                              'exec "$@"'])


def _unshare_prefix(level: str, work: str, hidden: Sequence[str]) -> list[str]:
  if level == "namespaces":
    return ["unshare", "-rmn", "--", "/bin/sh", "-c", _setup_script(len(hidden)), "sandbox",
            work, *hidden]
  if level == "network":
    return ["unshare", "-rn", "--"]
  return []


@functools.cache
def isolation_level() -> str:
  """The strongest isolation that works here, checked once per process by running `true`
  under it: "namespaces" (user + network + mount namespaces: no network, read-only root
  filesystem, the project hidden), "network" (user + network namespaces only) or "none"
  (unprivileged user namespaces are not allowed, or `unshare` is missing)."""
  if shutil.which("unshare") is None:
    return "none"
  with tempfile.TemporaryDirectory(prefix="decodax-sandbox-check-") as work:
    for level in ISOLATION_LEVELS[:2]:
      hidden = _hideable([PROJECT_ROOT], sys.executable)
      try:
        done = subprocess.run(_unshare_prefix(level, work, hidden) + ["true"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10)
      except (OSError, subprocess.SubprocessError):
        continue
      if done.returncode == 0:
        return level
  return "none"


def _hideable(paths: Sequence[str], python: str) -> list[str]:
  """The existing directories of `paths` that can be hidden without hiding the interpreter
  or its standard library (a virtual environment inside the project, say)."""
  needed = [os.path.realpath(p) for p in (python, sys.base_prefix)]
  out = []
  for p in paths:
    real = os.path.realpath(p)
    if not os.path.isdir(real):
      continue
    if any(n == real or n.startswith(real.rstrip(os.sep) + os.sep) for n in needed):
      continue
    out.append(real)
  return out


def _command(python: str, status_fd: int, program: str, level: str, work: str,
             hidden: Sequence[str], limits: Sequence[int]) -> list[str]:
  return _unshare_prefix(level, work, hidden) + [
      python, "-I", "-S", "-c", _DRIVER, str(status_fd), program, *map(str, limits)]


def _tail(path: str, chars: int) -> str:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * chars))
    text = f.read().decode("utf-8", errors="replace")
  return text[-chars:] if chars > 0 else ""


def _kill_group(pid: int) -> None:
  try:
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                cpu_s: Optional[int] = None, file_mb: int = 16, tail_chars: int = 2000,
                python: Optional[str] = None, isolation: Optional[str] = None,
                hidden_paths: Sequence[str] = (PROJECT_ROOT,)) -> SandboxResult:
  """Runs the Python program `source` in a sandbox (see the module docstring).

  timeout_s: wall-clock limit; memory_mb: address-space limit; cpu_s: CPU-time limit
  (default: the wall-clock limit rounded up, plus one); file_mb: largest file (and output)
  the program may write; python: the interpreter (default `sys.executable`, run with
  `-I -S`); isolation: one of ISOLATION_LEVELS (default: `isolation_level()`, the strongest
  that works here; a level that does not work here gives status "error"); hidden_paths:
  directories hidden under an empty tmpfs at level "namespaces".
  """
  if not timeout_s > 0 or memory_mb < 64 or file_mb < 1:
    raise ValueError(f"need timeout_s > 0, memory_mb >= 64 and file_mb >= 1; got {timeout_s}, "
                     f"{memory_mb}, {file_mb}")
  level = isolation_level() if isolation is None else isolation
  if level not in ISOLATION_LEVELS:
    raise ValueError(f"isolation must be one of {ISOLATION_LEVELS}, got {isolation!r}")
  python = os.path.realpath(python or sys.executable)
  cpu_s = int(cpu_s if cpu_s is not None else -(-timeout_s // 1) + 1)
  hidden = _hideable(hidden_paths, python) if level == "namespaces" else []
  # The program's folder holds only what it may touch; its captured output lives in a
  # sibling file it is not told about (deleted with the rest).
  with tempfile.TemporaryDirectory(prefix="decodax-sandbox-") as root:
    work = os.path.join(root, "work")
    os.mkdir(work, 0o700)
    path = os.path.join(work, PROGRAM_FILE)
    with open(path, "w", encoding="utf-8") as f:
      f.write(source)
    out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work,
           "TMPDIR": work}
    status_r, status_w = os.pipe()
    os.set_blocking(status_r, False)
    start = time.perf_counter()
    timed_out = False
    try:
      with open(out_path, "wb") as out, open(err_path, "wb") as err:
        try:
          proc = subprocess.Popen(
              _command(python, status_w, path, level, work, hidden,
                       (memory_mb << 20, cpu_s, file_mb << 20)),
              cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
              pass_fds=(status_w,), start_new_session=True)
        except OSError as e:
          return SandboxResult("error", None, time.perf_counter() - start,
                               stderr=f"could not start the sandbox: {e}", isolation=level)
        os.close(status_w)
        status_w = -1
        try:
          proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
          timed_out = True
        _kill_group(proc.pid)  # the program's children too, whether or not it timed out
        proc.wait()
      seconds = time.perf_counter() - start
      report = b""
      try:
        while chunk := os.read(status_r, 4096):
          report += chunk
      except BlockingIOError:  # a process outside the group still holds the pipe open
        pass
    finally:
      os.close(status_r)
      if status_w >= 0:
        os.close(status_w)
    text = report.decode("utf-8", errors="replace")
    started = text.startswith("S")
    exception = text[2:] if text[1:2] == "E" else None
    code = proc.returncode
    # RLIMIT_CPU's soft limit sends SIGXCPU, whose default action ends the process
    if timed_out or (started and code == -signal.SIGXCPU):
      status = "timeout"
    elif started:
      status = "passed" if code == 0 else "failed"
    else:
      status = "error"
    return SandboxResult(status, code, seconds, stdout=_tail(out_path, tail_chars),
                         stderr=_tail(err_path, tail_chars), exception=exception,
                         isolation=level)


def run_programs(sources: Sequence[str], *, workers: int = 2, **kwargs) -> list[SandboxResult]:
  """`run_program` on each source, `workers` at a time (each is its own process), in order."""
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(lambda s: run_program(s, **kwargs), sources))
