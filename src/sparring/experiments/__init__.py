"""Experiments that test the papers' claims on proving grounds built for them (docs/RESULTS.md)."""
