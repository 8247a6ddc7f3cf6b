"""A wrong wall clock for one test process: FAKE_CLOCK_OFFSET seconds added to time.time() and time.time_ns().

tests/test_redis_faults.py starts a node with this directory on PYTHONPATH, so Python's `site` imports this
module at startup (https://docs.python.org/3/library/site.html): the node then believes it is minutes ahead
of (or behind) Redis and the other node. Monotonic clocks are left alone, as a real skew would leave them.
"""

from __future__ import annotations

import os
import time

_offset = float(os.environ.get("FAKE_CLOCK_OFFSET") or 0)
if _offset:
    _time, _time_ns = time.time, time.time_ns

    def _skewed() -> float:
        return _time() + _offset

    def _skewed_ns() -> int:
        return _time_ns() + int(_offset * 1_000_000_000)

    time.time = _skewed
    time.time_ns = _skewed_ns
