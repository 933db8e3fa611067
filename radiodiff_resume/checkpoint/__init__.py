"""Verified checkpoints: atomic commit, manifest with hashes, verification, discovery."""
