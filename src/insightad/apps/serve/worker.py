"""The inference worker: one thread owns the model; requests reach it through a bounded queue.

Requests are admitted (a slot reserved) before their images are decoded, so memory is bounded by
``queue_size`` requests however fast clients send; a full queue is answered at once with 503
(``QueueFull``) rather than queued without limit. The thread takes the first waiting job, lets
others join for up to ``batch_wait_ms`` (and takes every job already waiting), and runs them as
micro-batches of at most ``max_batch`` images, so concurrent requests share forward passes while
the event loop stays free to accept and decode.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from insightad.methods.base import Detector

log = logging.getLogger("insightad.serve")


class QueueFull(Exception):
    """Every queue slot is taken: the caller answers 503."""


class WorkerStopped(Exception):
    """The worker is shutting down or has stopped: the caller answers 503."""


@dataclass
class Result:
    """One image's raw score and, when asked, its map at model size (CPU tensor)."""

    score: float
    map: torch.Tensor | None = None


@dataclass
class Job:
    """One request's images (uint8 C, H, W at model size); its future gets one Result per image."""

    images: list[torch.Tensor]
    want_maps: bool = False
    future: Future = field(default_factory=Future)


class InferenceWorker:
    """Runs ``detector.forward_batch`` on micro-batches in a background thread."""

    def __init__(self, detector: Detector, max_batch: int = 8, batch_wait_ms: float = 2.0, queue_size: int = 64,
                 threads: int = 0, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.detector = detector
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000.0
        self.queue_size, self.threads = queue_size, threads
        self.on_batch = on_batch
        self._slots = threading.BoundedSemaphore(queue_size)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._admitted = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ admission
    def admit(self) -> None:
        """Reserve a queue slot (call before decoding); raises QueueFull or WorkerStopped."""
        if self._stopping:
            raise WorkerStopped("the server is shutting down")
        if not self._slots.acquire(blocking=False):
            raise QueueFull(f"the inference queue is full ({self.queue_size} requests waiting)")
        with self._lock:
            self._admitted += 1

    def release(self) -> None:
        """Give back a slot whose request will not be submitted (decoding failed, client left)."""
        with self._lock:
            self._admitted -= 1
        self._slots.release()

    def submit(self, job: Job) -> Future:
        """Queue an admitted job; its slot is freed when the worker picks it up."""
        if self._stopping:
            self.release()
            raise WorkerStopped("the server is shutting down")
        self.start()
        self._queue.put(job)
        return job.future

    @property
    def pending(self) -> int:
        """Requests admitted and not yet picked up by the worker."""
        return self._admitted

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="insightad-inference", daemon=True)
                self._thread.start()

    def warm_up(self) -> None:
        """One forward pass on a blank image so the first request does not pay for lazy initialisation."""
        p = self.detector.preprocessing_
        self.detector.forward_batch(torch.zeros((1, p.channels, *p.size), dtype=torch.uint8))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, fail what is still queued, and end the thread."""
        self._stopping = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._picked_up()
                self._refuse(job)

    @staticmethod
    def _refuse(job: Job) -> None:
        if job.future.set_running_or_notify_cancel():
            job.future.set_exception(WorkerStopped("the server is shutting down"))

    # ------------------------------------------------------------------ the thread
    def _picked_up(self) -> None:
        with self._lock:
            self._admitted -= 1
        self._slots.release()

    def _gather(self, first: Job) -> list[Job]:
        """The first job plus those that arrive within the wait window, up to max_batch images."""
        jobs, n = [first], len(first.images)
        deadline = time.monotonic() + self.batch_wait
        while n < self.max_batch:
            wait = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop signal: handle what we have, then stop
                self._queue.put(None)
                break
            self._picked_up()
            jobs.append(job)
            n += len(job.images)
        return jobs

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            first = self._queue.get()
            if first is None:
                return
            self._picked_up()
            if self._stopping:  # stopping: refuse what is still queued rather than work through it
                self._refuse(first)
                continue
            jobs = [j for j in self._gather(first) if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._serve(jobs)

    def _serve(self, jobs: list[Job]) -> None:
        try:
            results = self._infer(jobs)
        except Exception as e:  # noqa: BLE001 - one bad batch must never kill the worker
            if len(jobs) > 1:  # retry alone, so one failing request cannot fail its neighbours
                for job in jobs:
                    self._serve_one(job)
                return
            log.exception("inference failed")
            jobs[0].future.set_exception(e)
            return
        for job, res in zip(jobs, results):
            job.future.set_result(res)

    def _serve_one(self, job: Job) -> None:
        try:
            job.future.set_result(self._infer([job])[0])
        except Exception as e:  # noqa: BLE001
            log.exception("inference failed")
            job.future.set_exception(e)

    def _infer(self, jobs: list[Job]) -> list[list[Result]]:
        """Forward all images of ``jobs`` in chunks of max_batch; results regrouped per job."""
        images = [img for job in jobs for img in job.images]
        want = [job.want_maps for job in jobs for _ in job.images]
        flat: list[Result] = []
        for i in range(0, len(images), self.max_batch):
            t0 = time.perf_counter()
            scores, maps = self.detector.forward_batch(list(images[i:i + self.max_batch]))
            for j, s in enumerate(scores.cpu().double().tolist()):
                m = maps[j].cpu().clone() if (maps is not None and want[i + j]) else None
                flat.append(Result(float(s), m))
            if self.on_batch:
                self.on_batch(len(scores), time.perf_counter() - t0)
        out, k = [], 0
        for job in jobs:
            out.append(flat[k:k + len(job.images)])
            k += len(job.images)
        return out
