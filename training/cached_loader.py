"""Batches from the decoded-image cache, augmented on the training device (`--pipeline cache`).

A background thread reads each batch's rows from the memory-mapped cache while the device trains on the
previous one; the main thread draws the batch order and the augmentation parameters, so the global RNG is used
in one fixed order and resumed runs stay exact.

Host copies: one per image. The reader copies each row straight from the memmap (the page cache) into a
reusable batch buffer, pinned on CUDA, in the sampled order; the device copy reads that buffer directly.
A buffer is reused only after the device copy that read it has finished (a CUDA event per buffer), since the
training thread runs ahead of the GPU.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from tuneserve.training.gpu_augment import GpuAugment


class CachedLoader:
    def __init__(self, cache: np.ndarray, labels: list[int], batch_size: int, sampler: Sampler[int], drop_last: bool,
                 device: torch.device, augment: GpuAugment, prefetch: int = 4):
        self.cache = cache  # uint8 (N, S, S, 3), memory-mapped
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = drop_last
        self.device = device
        self.augment = augment
        self.prefetch = prefetch

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = batches[: len(self)]
        # The reader can be at most `prefetch` batches ahead of the queue's consumer, plus the one it fills,
        # plus the one the consumer holds.
        ring = BatchBuffers(self.prefetch + 2, (self.batch_size, *self.cache.shape[1:]), self.device)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(batches, ring, q, stop), daemon=True,
                                  name="tuneserve-cache-reader")
        reader.start()
        try:
            for _ in batches:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                slot, n, labels = item
                pixels = ring.pixels[slot][:n].to(self.device, non_blocking=True)
                ring.copied(slot)
                # On the CPU `.to` returns the buffer itself; the augmentation's first op makes a new float32
                # tensor, so the buffer is free again once it returns.
                x = self.augment(pixels)  # float32 (B, 3, s, s)
                yield x, labels.to(self.device, non_blocking=True)
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    reader.join(timeout=0.05)

    def _read(self, batches: list[np.ndarray], ring: "BatchBuffers", q: queue.Queue, stop: threading.Event) -> None:
        try:
            for k, idx in enumerate(batches):
                if stop.is_set():
                    return
                slot = k % len(ring.pixels)
                ring.wait_free(slot)
                out = ring.arrays[slot]
                # Rows in ascending order (sequential reads from the memmap), each written to its sampled place.
                for place in np.argsort(idx, kind="stable"):
                    out[place] = self.cache[idx[place]]
                labels = torch.from_numpy(self.labels[idx])
                q.put((slot, len(idx), labels.pin_memory() if ring.pinned else labels))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            q.put(e)


class BatchBuffers:
    """`n` reusable uint8 (B, S, S, 3) batch buffers, pinned when `device` is CUDA, with the event that marks
    the end of each one's last device copy."""

    def __init__(self, n: int, shape: tuple[int, ...], device: torch.device):
        self.pinned = device.type == "cuda"
        self.pixels = [torch.empty(shape, dtype=torch.uint8, pin_memory=self.pinned) for _ in range(n)]
        self.arrays = [t.numpy() for t in self.pixels]  # the same memory, for numpy's row copies
        self._events: list[torch.cuda.Event | None] = [None] * n

    def copied(self, slot: int) -> None:
        """Called right after the device copy of buffer `slot` was queued (on the current stream)."""
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            self._events[slot] = event

    def wait_free(self, slot: int) -> None:
        """Block until buffer `slot`'s last device copy has finished."""
        event = self._events[slot]
        if event is not None:
            event.synchronize()
