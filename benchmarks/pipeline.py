"""Push N access cases through the coordinator and both reference workers, and compare with a
raw aiokafka produce-and-consume baseline on the same broker in the same run.

    .venv/bin/python benchmarks/pipeline.py [--cases 1000] [--broker apache|tansu|host:port]

Reports cases per second (burst of N), p50/p99 request-to-completion latency (under the
burst, and at a light steady load), and the ratio of dsrflow's throughput to the baseline's.
Each case is 1 request, 2 tasks, 2 receipts and CaseUpdated events, two PostgreSQL
transactions at the workers' side and a zip bundle, so the ratio is per case, not per message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsrflow import codec, demo, launcher  # noqa: E402
from dsrflow.client import submit  # noqa: E402
from dsrflow.events import RightsRequested  # noqa: E402
from dsrflow.settings import Settings  # noqa: E402
from dsrflow.stack.postgres import EmbeddedPostgres, create_database  # noqa: E402
from dsrflow.testing.brokers import start_test_broker  # noqa: E402
from examples.people import PEOPLE  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def baseline(settings: Settings, n: int, size: int) -> float:
    """Messages per second for produce (acks=all) + consume of n messages of `size` bytes."""
    topic = f"bench.baseline.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])
    await admin.close()
    producer = AIOKafkaProducer(**settings.producer_options(), linger_ms=2)
    consumer = AIOKafkaConsumer(topic, **settings.kafka_client_options(), group_id=f"bench-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest")
    await producer.start()
    await consumer.start()
    payload = b"x" * size
    t0 = time.perf_counter()
    try:
        futures = [await producer.send(topic, payload, key=str(i).encode()) for i in range(n)]
        await asyncio.gather(*futures)
        got = 0
        while got < n:
            for recs in (await consumer.getmany(timeout_ms=1000, max_records=1000)).values():
                got += len(recs)
        return n / (time.perf_counter() - t0)
    finally:
        await producer.stop()
        await consumer.stop()


def requests(n: int, tag: str) -> list[RightsRequested]:
    return [
        RightsRequested(
            request_id=f"bench-{tag}-{i}", right="access", verified=True, received_at=datetime.now(UTC),
            subject={"identifiers": PEOPLE[i % len(PEOPLE)].identifiers()},  # type: ignore[arg-type]
        )
        for i in range(n)
    ]


async def wait_done(dsn: str, prefix: str, n: int, timeout: float) -> list[float]:
    """Latencies (s) of the n cases, received_at -> completed_at, once all are complete."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while True:
            done = await conn.fetchval(
                "SELECT count(*) FROM cases WHERE request_id LIKE $1 AND completed_at IS NOT NULL", prefix + "%")
            if done >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done}/{n} cases complete after {timeout}s")
            await asyncio.sleep(0.2)
        rows = await conn.fetch(
            """SELECT status, extract(epoch FROM completed_at - received_at) AS s FROM cases
               WHERE request_id LIKE $1""", prefix + "%")
        bad = [r["status"] for r in rows if r["status"] != "completed"]
        if bad:
            raise RuntimeError(f"{len(bad)} cases did not complete: {set(bad)}")
        return [float(r["s"]) for r in rows]
    finally:
        await conn.close()


async def run(settings: Settings, n: int, steady: int, services: launcher.Services) -> dict[str, float]:
    await demo.approve_systems(settings, demo.SYSTEMS, services)
    # warm-up: consumer groups joined, pools open
    await submit(settings, requests(10, "warm"))
    await wait_done(settings.dsn, "bench-warm-", 10, 120)

    reqs = requests(n, "burst")
    value, _ = codec.encode(reqs[0], source="bench")
    t0 = time.perf_counter()
    await submit(settings, reqs)
    burst = await wait_done(settings.dsn, "bench-burst-", n, 600)
    elapsed = time.perf_counter() - t0

    steady_lat: list[float] = []
    for i in range(steady):  # light load: one case at a time, 10 per second at most
        await submit(settings, requests(1, f"steady{i}"))
        steady_lat += await wait_done(settings.dsn, f"bench-steady{i}-", 1, 60)
        await asyncio.sleep(0.1)

    base = await baseline(settings, n * 8, len(value))
    return {
        "cases": n,
        "cases_per_s": n / elapsed,
        "burst_p50_ms": pct(burst, 50) * 1000,
        "burst_p99_ms": pct(burst, 99) * 1000,
        "steady_p50_ms": pct(steady_lat, 50) * 1000 if steady_lat else float("nan"),
        "steady_p99_ms": pct(steady_lat, 99) * 1000 if steady_lat else float("nan"),
        "steady_mean_ms": statistics.mean(steady_lat) * 1000 if steady_lat else float("nan"),
        "baseline_msgs_per_s": base,
        "baseline_cases_per_s": base / 8,
        "ratio": (n / elapsed) / (base / 8),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--steady", type=int, default=30, help="cases sent one at a time for the light-load latency")
    ap.add_argument("--broker", default=os.environ.get("DSRFLOW_TEST_BROKER"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dsrflow-bench-"))
    bootstrap, kind, stop_broker = start_test_broker(args.broker)
    pg = EmbeddedPostgres(work / "pg", fast=True, remove=True, log_path=work / "postgres.log").start()
    try:
        dsn = asyncio.run(create_database(pg.dsn, "dsrflow"))
        env = {
            "DSRFLOW_CRM_DSN": asyncio.run(create_database(pg.dsn, "crm")),
            "DSRFLOW_BILLING_DSN": asyncio.run(create_database(pg.dsn, "billing")),
        }
        os.environ.update(env)
        settings = Settings(state_dir=work / "state", kafka_bootstrap=bootstrap, pg_dsn=dsn,
                            export_dir=work / "exports", kafka_idempotent_producer=kind != "tansu",
                            log_level="WARNING")
        asyncio.run(demo.prepare(settings))
        print(f"broker: {stop_broker.description}; {os.cpu_count()} cores", flush=True)
        with launcher.running(settings, demo.SYSTEMS, log_dir=work / "logs", cwd=ROOT, extra_env=env) as services:
            res = asyncio.run(run(settings, args.cases, args.steady, services))
        print(f"cases (burst)                 {res['cases']:.0f}")
        print(f"dsrflow cases/s               {res['cases_per_s']:.1f}")
        print(f"latency under burst p50/p99   {res['burst_p50_ms']:.0f} / {res['burst_p99_ms']:.0f} ms")
        print(f"latency light load p50/p99    {res['steady_p50_ms']:.0f} / {res['steady_p99_ms']:.0f} ms")
        print(f"baseline aiokafka msgs/s      {res['baseline_msgs_per_s']:.0f} (produce acks=all + consume)")
        print(f"baseline at 8 msgs per case   {res['baseline_cases_per_s']:.0f} cases/s")
        print(f"ratio dsrflow / baseline      {res['ratio']:.3f}")
        return 0
    finally:
        pg.stop()
        stop_broker()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
