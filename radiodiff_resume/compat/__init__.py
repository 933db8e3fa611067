"""Compatibility with RadioDiff: its configs and checkpoints."""
