"""The test suite, laid out like the packages: tests/models, tests/decoding (speculative decoding
in tests/decoding/speculative) and tests/train hold each package's tests; tests that span the
project stay here. `fakes.py` and `helpers.py` are shared (`from tests.fakes import BigramLM`)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
