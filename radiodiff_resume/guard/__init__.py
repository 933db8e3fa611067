"""Numerical guards: batches, losses, gradients and running statistics (see ``policy``)."""
