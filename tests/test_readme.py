"""The README's test command is what CI runs."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
  readme = open(os.path.join(ROOT, "README.md")).read()
  ci = [l for l in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
        if l.startswith("pip install")]
  assert len(ci) == 1
  assert ci[0].replace(" -q", "") in readme
