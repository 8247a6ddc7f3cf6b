"""The chaos run of tests/test_chaos.py, for as long as you like: Redis paused, killed, cut and blackholed.

    make bench BENCH_ARGS="--chaos 600"          # ten minutes, through the bench's entry point
    .venv/bin/python -m bench.chaos --seconds 600

Two nodes, reconnecting readers, a publisher and probes, as in the test, with longer faults (a pause of up
to 10 s, a restart of up to 5 s, a cut of up to 15 s, a blackhole of up to 60 s) and healthy spells between.
It prints one line per fault and the verdict (lost, duplicated, reordered, false answers, requests over
3 s, with the counts of POSTs, reconnects and faults), and writes it to bench/results/chaos.json. It
measures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path

import orjson

from tests.chaos import Plan, run

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="faults and healthy spells, after the start")
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument("--rate", type=float, default=40.0, help="POSTs per second, both nodes together")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = parser.parse_args(argv)
    plan = Plan(
        duration=args.seconds,
        readers=args.readers,
        rate=args.rate,
        healthy=(3.0, 8.0),
        lengths={"pause": (2.0, 10.0), "kill": (1.0, 5.0), "cut": (2.0, 15.0), "blackhole": (3.0, 60.0)},
        seed=args.seed,
    )
    started = time.monotonic()
    report = asyncio.run(run(plan, lambda line: print(line, flush=True)))
    print(report.summary())
    for problem in report.problems:
        print("  ", problem)
    args.out.parent.mkdir(exist_ok=True)
    verdict = {k: {str(n): c for n, c in v.items()} if isinstance(v, dict) else v
               for k, v in dataclasses.asdict(report).items()}  # fmt: skip
    doc = {"seconds": round(time.monotonic() - started, 1), "plan": dataclasses.asdict(plan), "report": verdict}
    args.out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
