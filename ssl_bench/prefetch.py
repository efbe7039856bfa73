"""Background preparation of the next training batch (issue 10): host work overlaps device work.

``PrefetchStream`` wraps a :class:`ssl_bench.data.TrainStream`. While iteration i computes, a background
thread draws batch i+1 (sampling, crop, augmentation) and the stage's host-side targets for it
(:meth:`ssl_bench.method.Stage.host_targets`, e.g. DTC's signed distances), attached as
``batch.host_targets``.

What stays exact:

* the batches, in the same order: one batch is in flight at a time and only that thread touches the
  wrapped stream while it runs; the draws come from the stream's own numpy generator, never from
  torch's global generator (the thread draws nothing else);
* the checkpointed stream state: :meth:`PrefetchStream.state_dict` is the stream's state right after the
  last batch handed out by :meth:`next` (so BEFORE the prefetched one was drawn), captured by the thread
  before it draws anything further. A run resumed from it draws what the uninterrupted run drew.

On CUDA the thread enqueues its device work on its own CUDA stream; the consumer's stream waits for it
when the batch is handed over (and the tensors are recorded as used there, for the caching allocator).

``enabled=False`` does the same work in the calling thread (``Trainer.prefetch``; the bench compares).
"""
from __future__ import annotations

import copy
import threading
from typing import Callable

import torch

__all__ = ["PrefetchStream"]


class PrefetchStream:
    """``next()``, ``state_dict()``, ``load_state_dict()`` as the wrapped stream; ``close()`` (or ``with``) ends it."""

    def __init__(self, stream, host_targets: Callable | None = None, enabled: bool = True):
        self.stream = stream
        self.host_targets = host_targets
        self.enabled = enabled
        self._pending: tuple[threading.Thread, dict] | None = None
        self._state = None  # the stream state after the last batch handed out; None: ask the stream
        device = getattr(stream, "device", None)
        self._device = device if isinstance(device, torch.device) and device.type == "cuda" else None
        self._side = None  # the thread's CUDA stream, made on first use

    # -- the work of one batch ----------------------------------------------------------------
    def _produce(self):
        batch = self.stream.next()
        if self.host_targets is not None:
            targets = self.host_targets(batch)
            if targets:
                batch.host_targets = {**(getattr(batch, "host_targets", None) or {}), **targets}
        # the state after this batch = before the next one: what a checkpoint taken after this batch holds
        return batch, copy.deepcopy(self.stream.state_dict())

    def _produce_on_side_stream(self):
        if self._device is None:
            return self._produce()
        if self._side is None:
            self._side = torch.cuda.Stream(device=self._device)
        with torch.cuda.stream(self._side):
            return self._produce()

    def _start(self) -> None:
        box: dict = {}

        def work():
            try:
                box["result"] = self._produce_on_side_stream()
            except BaseException as exc:  # handed to the consumer, raised there by _take
                box["error"] = exc

        thread = threading.Thread(target=work, name="ssl-bench-prefetch", daemon=True)
        thread.start()
        self._pending = (thread, box)

    def _take(self):
        thread, box = self._pending
        thread.join()  # a Ctrl-C here leaves it pending, so close() still waits for it
        self._pending = None
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _hand_over(self, batch):
        if self._side is not None:
            consumer = torch.cuda.current_stream(self._device)
            consumer.wait_stream(self._side)
            tensors = [getattr(batch, "image", None), getattr(batch, "label", None)]
            tensors += list((getattr(batch, "host_targets", None) or {}).values())
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(consumer)  # made on the side stream, used on the consumer's
        return batch

    # -- the stream interface -----------------------------------------------------------------
    def next(self):
        if not self.enabled:
            batch, self._state = self._produce()
            return batch
        if self._pending is None:
            self._start()
        batch, state = self._take()
        self._state = state
        self._start()  # batch i+1 while the caller computes with batch i
        return self._hand_over(batch)

    def state_dict(self) -> dict:
        if self._state is not None:
            return copy.deepcopy(self._state)
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._discard()
        self.stream.load_state_dict(state)
        self._state = None

    def _discard(self) -> None:
        """Wait for the batch in flight and drop it, rewinding the stream to just after the last batch handed out."""
        if self._pending is not None:
            thread, _ = self._pending
            self._pending = None
            thread.join()
            if self._state is not None:
                self.stream.load_state_dict(copy.deepcopy(self._state))

    def close(self) -> None:
        """End the background work: waits for the batch in flight (at most one batch's time) and drops it.

        The wrapped stream is left where the consumer is (after the last batch handed out), so a later
        ``next()`` (prefetching again) continues the same sequence."""
        self._discard()

    def __enter__(self) -> "PrefetchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
