"""The inference worker alone: micro-batches form from concurrent jobs, the queue is bounded, stop is clean."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from insightad.apps.serve.worker import InferenceWorker, Job, QueueFull, WorkerStopped
from insightad.scoring import Scorer


class FakeDetector(Scorer):
    """forward_batch returns each image's mean as its score; the first call blocks until released."""

    has_maps = True

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[int] = []

    def forward_batch(self, x: np.ndarray):
        self.calls.append(len(x))
        self.gate.wait(10)
        scores = x.astype(np.float32).mean(axis=(1, 2, 3))
        return scores, x.astype(np.float32).mean(1)


def image(value: int) -> np.ndarray:
    return np.full((3, 4, 4), value, dtype=np.uint8)


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def submit(worker: InferenceWorker, job: Job):
    worker.admit()
    return worker.submit(job)


def test_waiting_jobs_share_one_forward_pass():
    det = FakeDetector()
    sizes: list[int] = []
    worker = InferenceWorker(det, max_batch=4, batch_wait_ms=0, queue_size=8, on_batch=lambda n, s: sizes.append(n))
    try:
        first = submit(worker, Job([image(1)]))
        wait_for(lambda: det.calls == [1])  # the worker is busy with the first job
        later = [submit(worker, Job([image(v)], want_maps=(v == 3))) for v in (2, 3, 4, 5, 6)]
        assert worker.pending == 5
        det.gate.set()
        results = [f.result(5) for f in [first, *later]]
    finally:
        worker.stop()
    assert det.calls == [1, 4, 1] and sizes == [1, 4, 1]  # waiting jobs batched, max_batch respected
    assert [r[0].score for r in results] == [1, 2, 3, 4, 5, 6]  # each job gets its own image's result
    assert results[2][0].map is not None and results[2][0].map.shape == (4, 4)
    assert all(r[0].map is None for i, r in enumerate(results) if i != 2)  # maps only where asked


def test_multi_image_jobs_are_split_into_micro_batches():
    det = FakeDetector()
    det.gate.set()
    worker = InferenceWorker(det, max_batch=3, batch_wait_ms=0, queue_size=2)
    try:
        res = submit(worker, Job([image(v) for v in range(7)])).result(5)
    finally:
        worker.stop()
    assert det.calls == [3, 3, 1] and [r.score for r in res] == list(range(7))


def test_queue_is_bounded_and_slots_come_back():
    det = FakeDetector()
    worker = InferenceWorker(det, max_batch=1, batch_wait_ms=0, queue_size=2)
    try:
        running = submit(worker, Job([image(1)]))
        wait_for(lambda: det.calls == [1])
        submit(worker, Job([image(2)]))
        worker.admit()  # a third request being decoded
        with pytest.raises(QueueFull):
            worker.admit()
        worker.release()  # its decoding failed: the slot is free again
        worker.admit()
        worker.release()
        det.gate.set()
        assert running.result(5)[0].score == 1
    finally:
        worker.stop()


def test_stop_fails_queued_jobs_and_refuses_new_ones():
    det = FakeDetector()
    worker = InferenceWorker(det, max_batch=1, batch_wait_ms=0, queue_size=4)
    running = submit(worker, Job([image(1)]))
    wait_for(lambda: det.calls == [1])
    queued = submit(worker, Job([image(2)]))
    threading.Timer(0.2, det.gate.set).start()
    worker.stop()
    assert running.result(5)[0].score == 1  # the batch in progress finishes
    with pytest.raises(WorkerStopped):
        queued.result(5)
    with pytest.raises(WorkerStopped):
        worker.admit()
    assert not worker.alive and worker.pending == 0


def test_a_failing_job_does_not_fail_its_batch_neighbours():
    class Picky(FakeDetector):
        def forward_batch(self, x):
            if (x == 13).any():
                raise RuntimeError("bad input")
            return super().forward_batch(x)

    det = Picky()
    worker = InferenceWorker(det, max_batch=4, batch_wait_ms=0, queue_size=8)
    try:
        blocker = submit(worker, Job([image(1)]))
        wait_for(lambda: det.calls == [1])
        good, bad = submit(worker, Job([image(2)])), submit(worker, Job([image(13)]))
        det.gate.set()
        assert blocker.result(5)[0].score == 1 and good.result(5)[0].score == 2
        with pytest.raises(RuntimeError, match="bad input"):
            bad.result(5)
    finally:
        worker.stop()


def test_mmap_threshold_is_pinned_on_glibc(monkeypatch):
    import platform

    from insightad.runtime import TRAIN_ARENAS, TRAIN_MMAP_THRESHOLD, TRAIN_TRIM_THRESHOLD, pin_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_mmap_threshold() is False  # the user's own setting wins
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    if platform.libc_ver()[0] == "glibc":
        assert pin_mmap_threshold() is True
        assert pin_mmap_threshold(TRAIN_MMAP_THRESHOLD, TRAIN_TRIM_THRESHOLD, TRAIN_ARENAS) is True
