"""The sandbox for generated programs (decoding/sandbox.py): outcomes, limits and isolation."""
from __future__ import annotations

import os
import signal
import socket
import textwrap
import time

import pytest

from decoding import sandbox

LEVEL = sandbox.isolation_level()
# Every level the prelude-level checks run at: the detected one, and "none" (the fallback
# where user namespaces are forbidden) when that is not already it.
LEVELS = sorted({LEVEL, "none"})
NAMESPACED = [lvl for lvl in ("network", "namespaces")
              if sandbox.ISOLATION_LEVELS.index(lvl) >= sandbox.ISOLATION_LEVELS.index(LEVEL)]


def run(source: str, **kw) -> sandbox.SandboxResult:
  kw.setdefault("timeout_s", 10.0)
  return sandbox.run_program(textwrap.dedent(source), **kw)


def test_passing_program():
  r = run("print(sum(range(10)))")
  assert r.status == "passed" and r.passed and r.returncode == 0
  assert r.stdout.strip() == "45" and r.exception is None
  assert r.isolation == LEVEL


def test_assertion_failure_fails():
  r = run("""
      def add(a, b):
          return a - b
      assert add(2, 2) == 4, "add is wrong"
      """)
  assert r.status == "failed" and not r.passed
  assert r.exception == "AssertionError" and "add is wrong" in r.stderr


def test_other_endings_fail():
  assert run("import sys; sys.exit(3)").returncode == 3
  assert run("import sys; sys.exit(3)").status == "failed"
  bad = run("def f(:\n  pass")
  assert bad.status == "failed" and bad.exception == "SyntaxError"


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
  r = run("while True:\n  pass", timeout_s=1.5)
  assert r.status == "timeout" and not r.passed
  assert 1.5 <= r.seconds < 8


def test_sleeping_children_are_killed_too():
  """The whole process group goes at the timeout: a child the program started is not left."""
  r = run("""
      import subprocess, sys, time
      child = subprocess.Popen(["sleep", "60"])
      print(child.pid, flush=True)
      time.sleep(60)
      """, timeout_s=1.5)
  assert r.status == "timeout"
  pid = int(r.stdout.split()[0])
  deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
  while time.monotonic() < deadline:
    try:
      with open(f"/proc/{pid}/status") as f:
        state = [line for line in f if line.startswith("State:")][0]
    except FileNotFoundError:
      return
    if "Z" in state:  # a zombie waiting for init to reap it
      return
    time.sleep(0.05)
  pytest.fail(f"the program's child {pid} survived the timeout: {state}")


def test_cpu_time_limit():
  r = run("while True:\n  pass", timeout_s=30, cpu_s=1)
  assert r.status == "timeout" and r.returncode == -signal.SIGXCPU
  assert r.seconds < 15


@pytest.mark.parametrize("bomb", ["x = bytearray(1 << 36)",
                                  "a = []\nwhile True:\n  a.append(' ' * 10**6)"])
def test_memory_bomb_is_stopped(bomb):
  r = run(bomb, memory_mb=256, timeout_s=20)
  assert r.status == "failed" and r.exception == "MemoryError"
  assert r.seconds < 15  # stopped by the memory limit, not the clock


@pytest.mark.parametrize("level", LEVELS)
def test_opening_a_socket_fails(level):
  r = run("""
      import socket
      for make in (lambda: socket.socket(),
                   lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                   lambda: socket.create_connection(("127.0.0.1", 9), timeout=1),
                   lambda: socket.socketpair()):
          try:
              make()
          except OSError as e:
              print("blocked", type(e).__name__)
          else:
              raise SystemExit("a socket was created")
      import ssl, asyncio  # modules that subclass socket.socket still import
      """, isolation=level)
  assert r.status == "passed", r.stderr
  assert r.stdout.split().count("blocked") == 4


@pytest.mark.parametrize("level", NAMESPACED)
def test_network_namespace_stops_a_program_that_gets_around_the_prelude(level):
  """The C socket type is still reachable from Python (the prelude's class derives from it);
  in the network namespace even a real socket reaches nothing, not the host's loopback."""
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  port = server.getsockname()[1]
  try:
    r = run(f"""
        import socket
        real = socket.socket.__mro__[-2]  # the C type _socket.socket, below the prelude
        s = real(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(("127.0.0.1", {port}))
        """, isolation=level)
  finally:
    server.close()
  assert r.status == "failed" and r.exception in ("OSError", "ConnectionRefusedError",
                                                  "TimeoutError"), r.stderr
  # without the namespace the same program does connect (what the test relies on)
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  try:
    port = server.getsockname()[1]
    r = run(f"""
        import socket
        s = socket.socket.__mro__[-2](socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", {port}))
        """, isolation="none")
  finally:
    server.close()
  assert r.status == "passed", r.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_program_cannot_see_the_project(level):
  r = run("""
      import json, os, sys
      out = {"cwd": os.getcwd(), "path": sys.path, "env": dict(os.environ), "imports": {}}
      for name in ("decoding", "models", "train", "benchmarks", "jax", "numpy"):
          try:
              __import__(name)
              out["imports"][name] = True
          except ImportError:
              out["imports"][name] = False
      print(json.dumps(out))
      """, isolation=level)
  assert r.status == "passed", r.stderr
  import json
  seen = json.loads(r.stdout)
  root = sandbox.PROJECT_ROOT
  assert not seen["cwd"].startswith(root) and os.path.basename(seen["cwd"]) == "work"
  assert not any(p == "" or p.startswith(root) or "site-packages" in p for p in seen["path"])
  assert not any(seen["imports"].values()), seen["imports"]
  assert "PYTHONPATH" not in seen["env"] and seen["env"]["HOME"] == seen["cwd"]
  assert set(seen["env"]) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}


@pytest.mark.skipif(LEVEL != "namespaces", reason="needs user + mount namespaces")
def test_namespaces_hide_the_project_and_make_the_root_read_only():
  readme = os.path.join(sandbox.PROJECT_ROOT, "README.md")
  assert os.path.exists(readme)
  r = run(f"""
      import os
      assert os.listdir({sandbox.PROJECT_ROOT!r}) == []
      try:
          open({readme!r})
      except OSError:
          print("hidden")
      try:
          open("/var/tmp/decodax-sandbox-probe", "w")
      except OSError as e:
          print("read-only", e.errno)
      open("mine.txt", "w").write("the working directory stays writable")
      """)
  assert r.status == "passed", r.stderr
  assert r.stdout.split()[:3] == ["hidden", "read-only", "30"]  # EROFS
  assert not os.path.exists("/var/tmp/decodax-sandbox-probe")


def test_files_written_vanish_afterwards():
  r = run("""
      import os
      os.makedirs("sub/dir")
      with open("sub/dir/data.txt", "w") as f:
          f.write("x" * 1000)
      print(os.path.abspath("sub/dir/data.txt"))
      print(os.path.abspath(os.path.join(os.getcwd(), "..")))
      """)
  assert r.status == "passed", r.stderr
  written, root = r.stdout.split()
  assert written.startswith(root) and not os.path.exists(written) and not os.path.exists(root)


def test_file_size_limit():
  r = run("open('big', 'wb').write(b'x' * (4 << 20))", file_mb=1)
  # Python ignores SIGXFSZ, so the write fails with EFBIG
  assert r.status == "failed" and "File too large" in r.stderr


def test_a_program_that_never_starts_is_an_error(tmp_path):
  r = sandbox.run_program("print(1)", python=str(tmp_path / "no-such-python"))
  assert r.status == "error" and not r.passed and r.exception is None


def test_bad_arguments():
  with pytest.raises(ValueError, match="timeout_s"):
    sandbox.run_program("pass", timeout_s=0)
  with pytest.raises(ValueError, match="isolation"):
    sandbox.run_program("pass", isolation="chroot")


def test_run_programs_keeps_the_order():
  sources = [f"assert {i} % 2 == 0" for i in range(5)]
  results = sandbox.run_programs(sources, workers=2)
  assert [r.passed for r in results] == [True, False, True, False, True]
