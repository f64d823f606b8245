"""Shared by the benchmark scripts: peak memory of a training loop on CPU."""

from __future__ import annotations

import os
import threading


class RssSampler:
    """Samples this process's resident set size every 5 ms in a thread; stop() returns the maximum."""

    def __init__(self) -> None:
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss())
            self._done.wait(0.005)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
