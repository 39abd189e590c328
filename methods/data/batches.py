"""Training batch sources: synthetic moving-shapes clips or precomputed shards -> `Batch`.

A source is an iterator of `Batch` with `state_dict()` / `load_state_dict()` (its position), so the
trainer's checkpoints resume the data stream exactly. `Prefetched` renders upcoming batches in a
background thread (rendering and text encoding release the GIL in torch ops) and reports the
position of the last batch *consumed*, not produced, so prefetching never breaks exact resume.
"""

from __future__ import annotations

import queue
import threading

from vdistill.methods.data.batch import Batch
from vdistill.methods.data.shapes import MovingShapes, ShapesConfig, ShapesStream
from vdistill.methods.data.text import TextEncoder
from vdistill.methods.train import distributed


class ShapesBatches:
    """Moving-shapes clips with text embeddings from a `TextEncoder`, rendered on `device`; under torchrun
    each rank renders its share of the global batch of `batch_size` clips."""

    def __init__(self, data_cfg: ShapesConfig, text: TextEncoder, batch_size: int, seed: int = 0, device: str = "cpu"):
        part = distributed.shard_of(batch_size)
        self.stream = ShapesStream(MovingShapes(data_cfg, seed=seed), batch_size, seed=seed, device=device, part=part)
        self.text = text
        self.device = device
        self.null = text.null(1, device)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        videos, prompts, labels = next(self.stream)
        return Batch(videos, self.text.encode(prompts, self.device), self.null, labels)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class Prefetched:
    """Wrap a batch source; keep up to `depth` batches ready from a daemon thread."""

    def __init__(self, source, depth: int = 4):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.source, self.depth = source, depth
        self._state = source.state_dict()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

    def _work(self, stop: threading.Event, out: queue.Queue) -> None:
        try:
            while not stop.is_set():
                batch = next(self.source)
                item = (batch, self.source.state_dict())
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the consumer
            out.put((e, None))

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._work, args=(self._stop, self._queue), daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._start()
        batch, state = self._queue.get()
        if isinstance(batch, BaseException):
            self._thread = None
            raise batch
        self._state = state
        return batch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._halt()
        self.source.load_state_dict(state)
        self._state = self.source.state_dict()

    def close(self) -> None:
        self._halt()
