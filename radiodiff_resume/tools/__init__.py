"""Operator tools: commands that inspect, repair and import checkpoints and runs."""
