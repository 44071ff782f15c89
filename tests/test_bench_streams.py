"""The raw model-streams yardstick counts each stream's own rate, not its idle tail.

bench.predict.streams_rate runs whole batches from several threads until a time budget
has passed. A stream whose last batch ends early then waits for the others; dividing
every image by the time until the last stream is done counted that wait as if the
streams were slower, which on a slow CPU (a batch longer than the budget) biased the raw
figure low and every service/raw ratio high.

The model here is a stand-in whose batches take a known time (a sleep, which releases
the GIL like ONNX Runtime does), different per thread, so the right answer is known.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bench.predict import streams_rate

FAST_S, SLOW_S = 0.05, 0.6  # seconds per batch in the first and the second stream


class TimedSession:
    """Quacks like an ONNX Runtime session for service.classifier.run; each batch takes
    FAST_S in the first thread that runs after the warm-up, SLOW_S in every other one."""

    def __init__(self) -> None:
        self.fast_thread: int | None = None
        self.lock = threading.Lock()
        self.calls = 0

    def get_inputs(self) -> list[object]:
        class Input:
            name = "input"

        return [Input()]

    def run(self, outputs: object, feed: dict[str, np.ndarray], options: object) -> list:
        with self.lock:
            self.calls += 1
            warm_up = self.calls == 1
            if not warm_up and self.fast_thread is None:
                self.fast_thread = threading.get_ident()
            fast = threading.get_ident() == self.fast_thread
        time.sleep(0 if warm_up else FAST_S if fast else SLOW_S)
        return [np.zeros((feed["input"].shape[0], 10), np.float32)]


def test_streams_rate_is_the_sum_of_each_streams_own_rate() -> None:
    batch = np.zeros((4, 3, 8, 8), np.float32)
    rate, images = streams_rate(TimedSession(), batch, streams=2, budget_s=0.2)
    # Each stream on its own: 4 images per FAST_S and 4 per SLOW_S. The old figure, all
    # images over the time until the slow stream was done, gave about (0.25 / 0.05 + 1)
    # * 4 / 0.6 = 40 images/s here, against 87 running.
    running = 4 / FAST_S + 4 / SLOW_S
    assert rate == pytest.approx(running, rel=0.3)
    assert images >= 4 * (1 + 1 + 1)  # the warm-up and at least one batch per stream
