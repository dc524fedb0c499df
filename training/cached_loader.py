"""Batches from the decoded-image cache, augmented on the training device (`--pipeline cache`).

A background thread reads each batch's rows from the memory-mapped cache (and pins them on CUDA) while the
device trains on the previous one; the main thread draws the batch order and the augmentation parameters,
so the global RNG is used in one fixed order and resumed runs stay exact.
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
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(batches, q, stop), daemon=True, name="tuneserve-cache-reader")
        reader.start()
        try:
            for _ in batches:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                pixels, labels = item
                x = self.augment(pixels.to(self.device, non_blocking=True))  # float32 (B, 3, s, s)
                yield x, labels.to(self.device, non_blocking=True)
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    reader.join(timeout=0.05)

    def _read(self, batches: list[np.ndarray], q: queue.Queue, stop: threading.Event) -> None:
        pin = self.device.type == "cuda"
        try:
            for idx in batches:
                if stop.is_set():
                    return
                rows = np.sort(idx)  # ascending reads from the memmap, then back to the sampled order
                data = self.cache[rows][np.argsort(np.argsort(idx))]
                pixels = torch.from_numpy(data)  # uint8 (B, S, S, 3)
                labels = torch.from_numpy(self.labels[idx])
                q.put((pixels.pin_memory() if pin else pixels, labels.pin_memory() if pin else labels))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            q.put(e)
