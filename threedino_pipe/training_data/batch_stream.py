"""A resumable, endless stream of batches made by batchgenerators workers (pretraining and finetuning).

Batch number ``n`` is made by :meth:`IndexedBatchLoader.make` as a pure function of ``(seed, n)``.
With ``W`` workers, worker ``w`` makes batches ``start + w + k*W`` (k = 0, 1, ...) and
batchgenerators' ``MultiThreadedAugmenter`` hands them out round-robin, so the stream is the same
for every ``W`` (0 = in-process). :meth:`BatchStream.state_dict` records how many batches the caller
has consumed; batches prefetched but not consumed are made again after ``load_state_dict``, so a
resume is exact for any ``W``.
"""

from __future__ import annotations

from typing import Any

import blosc2
import numpy as np
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from threedino_pipe.runtime.errors import UserError


class IndexedBatchLoader(DataLoader):
    """batchgenerators loader whose worker ``w`` of ``W`` makes batches ``start + w + k*W``.

    Subclasses implement :meth:`make` (batch number ``index`` -> dict of numpy arrays).
    """

    def __init__(self, data: Any, batch_size: int, seed: int, num_workers: int, start: int, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(data, batch_size, num_threads_in_multithreaded=max(1, num_workers), seed_for_shuffle=None,
                         infinite=True)  # sampling uses make()'s own generators
        self.indices = list(range(len(data)))
        self.seed, self.start = int(seed), int(start)
        self.in_worker = num_workers > 0
        self.rank, self.world_size = int(rank), int(world_size)
        self.made = 0

    def make(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def generate_train_batch(self) -> dict[str, Any]:
        if self.in_worker and self.made == 0:
            # one thread per worker process: the workers are the parallelism (and OpenMP is not fork-safe)
            torch.set_num_threads(1)
            blosc2.set_nthreads(1)
        index = self.start + self.thread_id + self.made * self.number_of_threads_in_multithreaded
        self.made += 1
        return self.make(index)


class BatchStream:
    """Endless iterator over an :class:`IndexedBatchLoader`'s batches, resumable through ``state_dict``.

    Subclasses implement :meth:`_loader` (a loader starting at batch ``start``) and :meth:`_convert`
    (numpy batch -> the caller's dict), and set ``size_key`` (name of ``len(data)`` in the state),
    ``stream_name`` and ``resume_fix`` (for the error on a mismatched state).
    """

    size_key = "num_items"
    stream_name = "data stream"
    resume_fix = "resume with the same options, or start a new run"

    def __init__(self, data: Any, batch_size: int, num_workers: int, seed: int, *, deterministic: bool = True,
                 num_cached_per_worker: int = 2, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data = data
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.deterministic, self.num_cached_per_worker = deterministic, num_cached_per_worker
        self.rank, self.world_size = int(rank), int(world_size)
        self.batches_drawn = 0
        self._augmenter: Any = None

    def _loader(self, start: int) -> IndexedBatchLoader:
        raise NotImplementedError

    def _convert(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _start(self) -> None:
        loader = self._loader(self.batches_drawn)
        if self.num_workers == 0:
            self._augmenter = SingleThreadedAugmenter(loader, None)
            return
        seeds = [int(np.random.SeedSequence([self.seed, w]).generate_state(1)[0]) for w in range(self.num_workers)]
        if self.deterministic:
            self._augmenter = MultiThreadedAugmenter(loader, None, self.num_workers, self.num_cached_per_worker,
                                                     seeds=seeds, pin_memory=False)
        else:
            self._augmenter = NonDetMultiThreadedAugmenter(loader, None, self.num_workers,
                                                           self.num_cached_per_worker * self.num_workers,
                                                           seeds=seeds, pin_memory=False)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._augmenter is None:
            self._start()
        batch = next(self._augmenter)
        self.batches_drawn += 1
        return self._convert(batch)

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint needs to continue the exact same stream: seed, batch size, size, batches consumed."""
        return {"seed": self.seed, "batch_size": self.batch_size, self.size_key: len(self.data),
                "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after ``state["batches_drawn"]`` batches; refuses a state made for another stream."""
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size), (self.size_key, len(self.data))):
            if int(state[key]) != mine:
                raise UserError(f"the checkpoint's {self.stream_name} has {key}={state[key]}, this run has {mine}",
                                fix=self.resume_fix)
        self.close()
        self.batches_drawn = int(state["batches_drawn"])

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` starts them again where the stream stands)."""
        if self._augmenter is not None and hasattr(self._augmenter, "_finish"):
            self._augmenter._finish()
        self._augmenter = None

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
