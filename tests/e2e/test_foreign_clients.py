"""Requests published by clients no one here wrote open their cases on the real coordinator:
confluent-kafka (librdkafka) in every codec and kcat, with only the plain ``ce_*`` headers.
An undecodable request among them goes to the dead-letter topic and intake keeps going."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from dsrflow import demo, launcher, topics
from dsrflow.codec import read_dead_letter
from dsrflow.coordinator.service import INTAKE
from dsrflow.events import DeadLetter
from dsrflow.settings import Settings
from dsrflow.testing.brokers import in_ci
from tests.conftest import CODECS, librdkafka_produce, stored_codecs

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def _headers(source: str) -> list[tuple[str, bytes]]:
    return [("ce_specversion", b"1.0"), ("ce_id", str(uuid.uuid4()).encode()), ("ce_source", source.encode()),
            ("ce_type", b"dsrflow.rights.requested.v1"), ("content-type", b"application/json")]


def _request(request_id: str, email: str) -> bytes:
    return orjson.dumps({"request_id": request_id, "right": "access", "verified": True,
                         "subject": {"identifiers": {"email": email}}})


def _kcat(bootstrap: str, request_id: str, email: str) -> None:
    """kcat -P with lz4, the way the README shows a request published from a shell."""
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        if in_ci():
            pytest.fail("kcat is not installed (CI=true: .ci/run installs it)")
        pytest.skip("kcat is not installed (apt-get install kcat)")
    # Sent twice (a client's retry: the same request id), in one batch, so lz4 pays and is used.
    args = [kcat, "-P", "-b", bootstrap, "-t", topics.REQUESTS, "-k", request_id, "-z", "lz4",
            "-X", "linger.ms=500"]
    for name, value in _headers("kcat"):
        args += ["-H", f"{name}={value.decode()}"]
    body = _request(request_id, email)
    subprocess.run(args, input=body + b"\n" + body + b"\n", check=True, timeout=60, capture_output=True)


async def test_requests_from_librdkafka_in_every_codec_and_from_kcat_open_their_cases(
    e2e_settings: Settings, broker_data_dir: Path, tmp_path: Path
) -> None:
    from examples.people import PEOPLE

    settings = e2e_settings
    await demo.prepare(settings)
    extra = {k: os.environ[k] for k in ("DSRFLOW_CRM_DSN", "DSRFLOW_BILLING_DSN")}
    run = uuid.uuid4().hex[:8]
    wanted = {f"rdk-{run}-{name}": (name, PEOPLE[i].email) for i, name in enumerate(CODECS)}
    bad_key = f"rdk-{run}-bad"
    conn = await asyncpg.connect(settings.dsn)
    try:
        with launcher.running(settings, demo.SYSTEMS, log_dir=tmp_path / "logs", cwd=ROOT,
                             extra_env=extra) as services:
            await demo.approve_systems(settings, demo.SYSTEMS, services)
            for request_id, (name, email) in wanted.items():
                # The request and a retry of it (same request id): one batch, so compressing pays.
                batch = [(request_id.encode(), _request(request_id, email), _headers("librdkafka"))
                         for _ in range(2)]
                if name == "zstd":  # a record that decompresses but is no request, ahead of a good one
                    batch.insert(0, (request_id.encode(), b'{"request_id": "x", "right": "teleport"}',
                                     [*_headers("librdkafka"), ("marker", bad_key.encode())]))
                await asyncio.to_thread(librdkafka_produce, settings.bootstrap, topics.REQUESTS, batch,
                                        compression=name)
            stored = stored_codecs(broker_data_dir, topics.REQUESTS)
            assert {"gzip", "snappy", "lz4", "zstd"} <= set(stored), stored  # the broker holds them compressed
            kcat_id = f"kcat-{run}"
            await asyncio.to_thread(_kcat, settings.bootstrap, kcat_id, PEOPLE[5].email)
            assert stored_codecs(broker_data_dir, topics.REQUESTS).count("lz4") == stored.count("lz4") + 1
            wanted[kcat_id] = ("kcat lz4", PEOPLE[5].email)

            deadline = time.monotonic() + 90
            while True:
                rows = await conn.fetch("SELECT request_id, status FROM cases WHERE request_id = ANY($1::text[])",
                                        list(wanted))
                done = {r["request_id"]: r["status"] for r in rows}
                if len(done) == len(wanted) and all(s == "completed" for s in done.values()):
                    break
                services.check_alive()
                assert time.monotonic() < deadline, (done, services.log_tail("coordinator"))
                await asyncio.sleep(0.3)
            services.check_alive()  # the invalid record stopped nothing
            letter = await _dead_letter(settings, bad_key.encode())
    finally:
        await conn.close()
    assert letter.error_type == "invalid" and letter.original_topic == topics.REQUESTS
    assert letter.consumer == INTAKE


async def _dead_letter(settings: Settings, key: bytes) -> DeadLetter:
    consumer = AIOKafkaConsumer(topics.DEADLETTER, **settings.kafka_client_options(), auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    if dict(r.headers).get("marker") == key:
                        return read_dead_letter(r.headers)
        raise AssertionError(f"no dead letter for {key!r}")
    finally:
        await consumer.stop()
