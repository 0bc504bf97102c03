"""pgqueuer's drain of a pre-filled queue: the reference `queues --prefill` prints
beside Berth's figure. N no-op jobs are enqueued in batches of 1,000, then W worker
processes (pgqueuer's QueueManager in drain mode, fetching `--batch` at a time) empty
the queue; prints the drain rate as JSON.

    python pgqueuer_drain.py --dsn postgres://… --jobs 50000 --workers 4 --batch 10
"""

import argparse
import asyncio
import json
import multiprocessing
import time
from datetime import timedelta

import asyncpg
from pgqueuer.db import AsyncpgDriver
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode


async def prefill(dsn: str, jobs: int) -> None:
    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    for start in range(0, jobs, 1000):
        n = min(1000, jobs - start)
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    await conn.close()


async def drain(dsn: str, batch: int) -> None:
    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job) -> None:  # noqa: ARG001
        return None

    await qm.run(
        batch_size=batch,
        mode=QueueExecutionMode.drain,
        dequeue_timeout=timedelta(seconds=1),
    )
    await conn.close()


def work(dsn: str, batch: int) -> None:
    asyncio.run(drain(dsn, batch))


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--dsn", required=True)
    args.add_argument("--jobs", type=int, default=50000)
    args.add_argument("--workers", type=int, default=4)
    args.add_argument("--batch", type=int, default=10)
    a = args.parse_args()
    asyncio.run(prefill(a.dsn, a.jobs))
    started = time.monotonic()
    procs = [
        multiprocessing.Process(target=work, args=(a.dsn, a.batch)) for _ in range(a.workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    elapsed = time.monotonic() - started
    left = asyncio.run(remaining(a.dsn))
    print(json.dumps({"jobs": a.jobs, "seconds": elapsed, "per_second": (a.jobs - left) / elapsed, "left": left}))


async def remaining(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    n = await conn.fetchval("select count(*) from pgqueuer")
    await conn.close()
    return n


if __name__ == "__main__":
    main()
