"""Redis under faults, end to end: paused, killed and restarted, cut and blackholed while two nodes serve.

The engine is tests/chaos.py (bench/chaos.py runs it for longer). The per-socket promise: ids strictly
increase, nothing at or below `since`, no gap without `recovered: false`; the sender's: a 200 is delivered
once, a 503 or 404 never, a 504 at most once; and no POST, status or DELETE takes over 3 s.
"""

from __future__ import annotations

import pytest

from tests.chaos import DEADLINE, Plan, run


@pytest.mark.anyio
@pytest.mark.slow
async def test_redis_faults_lose_duplicate_reorder_and_misreport_nothing() -> None:
    report = await run(Plan(duration=26.0, seed=13), print)
    print(report.summary())
    assert report.faults.keys() == {"pause", "kill", "cut", "blackhole"}, report.summary()
    assert report.posts > 500, report.summary()
    assert report.reconnects > 50, report.summary()
    assert report.answers[200] > report.posts // 2, report.summary()
    assert (report.lost, report.duplicated, report.reordered, report.false_answers) == (0, 0, 0, 0), (
        report.summary(),
        report.problems,
    )
    assert report.slow == 0, (report.summary(), report.problems)
    # /readyz says 503 within the deadline of Redis going away (killed, cut or blackholed).
    assert len(report.readyz_503_after) == 3, report.summary()
    assert max(report.readyz_503_after) <= DEADLINE + 1, report.summary()
    assert not report.problems, report.problems
