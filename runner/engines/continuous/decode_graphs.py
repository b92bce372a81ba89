"""Decode passes of fixed shape, recorded once per bucket of rows as CUDA graphs and replayed
(`engine.cuda_graphs=true`).

Why: a decode pass launches a few hundred small kernels (every op of every layer); for a small
model, or a small batch, on a GPU the launches set the pace, not the GPU. A CUDA graph replays the
whole pass in one launch. A graph fixes its tensors' shapes and addresses, so each bucket of rows
(1, 2, 4, 8, then multiples of 16 up to batch_size) gets its own: the pass runs over slots
0..bucket-1 (slots above the batch's rows are free and are fed padding at position 0), reads every
slot's whole capacity (the mask hides what a row has not written), and takes its tokens and
positions from fixed buffers that each step fills (the cache holds slots in the same buckets).
Resizing the cache moves its tensors, so the graphs are recorded again after a resize (into a new
memory pool: the graphs of one cache allocation share one). Recording uses the engine's own
capture stream, so graphs of engines freed later cannot touch it.

Without recording (off CUDA) the same fixed-shape pass runs eagerly, which is how the tests check
its arithmetic on a CPU. Recording itself needs a GPU; if it fails, the engine says so once and
decodes as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runner.engines.continuous.forward import Forward
from runner.engines.continuous.slot_cache import StepPlan

log = logging.getLogger(__name__)


def buckets(batch_size: int) -> list[int]:
    """The row counts a graph is recorded for: 1, 2, 4, 8, 16, 32, 48, ... and batch_size."""
    sizes = [size for size in (1, 2, 4, 8) if size < batch_size]
    sizes += range(16, batch_size, 16)
    return [*sizes, batch_size]


@dataclass
class Bucket:
    """One bucket's fixed buffers, and its graph once recorded."""

    input_ids: torch.Tensor  # [rows, 1]
    positions: torch.Tensor  # [rows, 1]
    logits: torch.Tensor | None = None  # the pass's output, [rows, vocab]
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Decode passes over `forward`'s model and cache at fixed shapes, recorded as CUDA graphs when
    `record` (see the module docstring)."""

    def __init__(self, forward: Forward, batch_size: int, pad: int, record: bool):
        self.forward, self.pad, self.record = forward, pad, record
        self.sizes = buckets(batch_size)
        self.buckets: dict[int, Bucket] = {}
        self.used: set[int] = set()  # the bucket sizes passes have run at
        self.recorded = 0  # graphs recorded (again after each resize)
        self.version = -1  # the cache's allocation the buckets were made for
        self.pool = None  # the memory pool the buckets' graphs share
        self.stream = None  # the stream they are recorded on (made at the first recording)

    def __call__(self, input_ids: list[list[int]], starts: list[int]) -> torch.Tensor:
        """One token per row at positions `starts` of slots 0..rows-1: the logits, [rows, vocab]."""
        rows = len(input_ids)
        size = next(size for size in self.sizes if size >= rows)
        cache = self.forward.cache
        cache.reserve(max(starts) + 1)
        if cache.version != self.version:  # the cache's tensors moved: record again
            self.release()
            self.version = cache.version
        bucket = self.buckets.get(size)
        self.used.add(size)
        padding = size - rows
        cache.wrote(range(size), [start + 1 for start in starts] + [1] * padding)
        ids = torch.tensor([token for (token,) in input_ids] + [self.pad] * padding)
        positions = torch.tensor(starts + [0] * padding)
        if bucket is None:
            device = self.forward.device
            bucket = Bucket(ids[:, None].to(device), positions[:, None].to(device))
            self.buckets[size] = bucket
        else:
            bucket.input_ids.copy_(ids[:, None], non_blocking=True)
            bucket.positions.copy_(positions[:, None], non_blocking=True)
        if self.record and bucket.graph is None:
            self.record = self._record(bucket)
        if not self.record:
            return self._pass(bucket)[:rows]
        bucket.graph.replay()
        return bucket.logits[:rows]

    def release(self) -> None:
        """Drop every bucket and graph, and their pool (a pool no graph holds cannot be recorded
        into again)."""
        self.buckets.clear()
        self.pool = None

    def _pass(self, bucket: Bucket) -> torch.Tensor:
        """The fixed-shape pass over the bucket's buffers (what a graph records)."""
        cache, rows = self.forward.cache, bucket.input_ids.shape[0]
        every_row = torch.arange(rows, device=bucket.positions.device)[:, None]
        cache.step = StepPlan(slice(0, rows), bucket.positions, every_row, cache.capacity)
        return self.forward.run(bucket.input_ids, bucket.positions, cache.capacity)

    def _record(self, bucket: Bucket) -> bool:
        """Warm the pass up on a side stream (as CUDA graphs ask), then record it; False, said
        once, where recording fails. The warm-up writes this step's keys and values, which the
        replay writes again, the same."""
        current = torch.cuda.current_stream()
        try:
            self.stream = self.stream or torch.cuda.Stream()
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                self._pass(bucket)
            current.wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                bucket.logits = self._pass(bucket)
        except torch.OutOfMemoryError:
            torch.cuda.set_stream(current)
            raise  # the engine's out-of-memory policy takes it
        except RuntimeError as error:
            torch.cuda.set_stream(current)  # a capture that failed to begin leaves its stream set
            log.warning("engine.cuda_graphs: recording a decode pass failed (%s); decoding without", error)
            for each in self.buckets.values():
                each.graph = each.logits = None
            self.pool = None
            return False
        self.pool = graph.pool()
        bucket.graph = graph
        self.recorded += 1
        return True
