"""Tests of mamba-equinox beyond the shared conformance suite."""
