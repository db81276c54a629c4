"""The README's test command is what CI runs."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
  readme = open(os.path.join(ROOT, "README.md")).read()
  lines = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
  commands = [l for l in lines if l and not l.startswith(("#", "set ", "cd "))]
  assert len(commands) == 1
  assert commands[0].replace(" -q", "") in readme
  assert "python -m pytest" in commands[0]
