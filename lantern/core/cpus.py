"""How many CPUs this process may use: what the service's sessions, model streams and
decode threads are sized by, and what the export's OpenVINO check compiles for."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (respects affinity masks and container cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
