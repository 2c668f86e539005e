"""Tests of mamba-flax beyond the shared conformance suite."""
