"""Asynchronous checkpoint saves: the training thread takes a host snapshot, a writer thread commits it.

On the training thread a save only copies every tensor of the state into host buffers kept between
saves (pinned when the source is on CUDA, so the device→host copy is asynchronous on the training
stream; on the CPU the copy is what stops training's in-place updates from reaching the checkpoint)
and rebuilds the small non-tensor state, so later steps cannot change what is saved. Serialising,
hashing, fsync, the manifest, the commit by rename and retention then run in one writer thread; the
next save waits for the commit before it takes its snapshot (the buffers are reused).
"""

from __future__ import annotations

import threading
import typing as tp

import torch

Where = tuple[tp.Any, ...]
"""A position in a state tree: the keys and indices leading to it."""


class HostBuffers:
    """Host copies of a state tree's tensors, one buffer per position in the tree, reused by the next
    snapshot while shape, dtype and pinning stay the same."""

    def __init__(self) -> None:
        self._buffers: dict[Where, torch.Tensor] = {}
        self.event: torch.cuda.Event | None = None
        """Recorded on the training stream after the last device→host copies (None: all on the CPU)."""

    def snapshot(self, tree: tp.Any) -> tp.Any:
        """``tree`` with each tensor copied into its buffer and each dict, list and tuple rebuilt;
        the same tensor twice stays one buffer. Device copies are asynchronous: call :meth:`ready`
        before reading the buffers on another thread."""
        seen: dict[int, torch.Tensor] = {}
        on_device = False

        def walk(node: tp.Any, where: Where) -> tp.Any:
            nonlocal on_device
            if isinstance(node, torch.Tensor):
                if id(node) not in seen:
                    source = node.detach()
                    pinned = source.is_cuda
                    buffer = self._buffers.get(where)
                    if (buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype
                            or buffer.is_pinned() != pinned):
                        buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=pinned)
                        self._buffers[where] = buffer
                    buffer.copy_(source, non_blocking=pinned)
                    on_device = on_device or pinned
                    seen[id(node)] = buffer
                return seen[id(node)]
            if isinstance(node, dict):
                return {k: walk(v, (*where, k)) for k, v in node.items()}
            if isinstance(node, (list, tuple)):
                items = [walk(v, (*where, i)) for i, v in enumerate(node)]
                return items if isinstance(node, list) else tuple(items)
            return node

        copied = walk(tree, ())
        self.event = None
        if on_device:
            self.event = torch.cuda.Event()
            self.event.record()
        return copied

    def ready(self) -> None:
        """Wait (on the calling thread) until the device→host copies of the last snapshot are done."""
        if self.event is not None:
            self.event.synchronize()


class Writer:
    """One background commit at a time. :attr:`failed` is a plain host flag the training thread may
    read at every step without a sync; :meth:`wait` joins the commit and raises its error."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.failed = False

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, work: tp.Callable[[], None], name: str) -> None:
        """Run ``work`` in a new writer thread (after the previous one finished). Not a daemon: the
        interpreter waits for a commit under way before the process exits."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(work,), name=name)
        self._thread.start()

    def _run(self, work: tp.Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # handed to the training thread by wait(), never lost
            self._error = exc
            self.failed = True

    def wait(self) -> None:
        """Block until the commit under way (if any) ended; raise its error, once."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error, self._error, self.failed = self._error, None, False
        if error is not None:
            raise error
