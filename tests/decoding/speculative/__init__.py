"""Tests of the `decoding.speculative` package."""
