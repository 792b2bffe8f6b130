"""Events through the full path, against raw nats-py JetStream on the same server.

Full path: ``Outbox.add`` inside a SQL transaction (SQLite file) -> ``OutboxRelay`` -> JetStream
-> durable ``EventConsumer`` (processed-events idempotency, handler in a transaction, ack after
commit), with a real SDK tracer provider and the SQLAlchemy instrumentation, as in a service.

Topology (default: as deployed): the producer service (database + outbox + relay) runs in this
process; the consumer service (its own database file, NATS connection, tracer provider and
``EventConsumer``) runs in a separate process (``--consumer-worker``), as e.g. the scheduler and the
registry do. Commit and handling times are ``time.time()`` on the same machine clock, so the
cross-process latency is valid. ``--single-process`` runs both services in this process and its
event loop instead (the previous topology, where their costs add up on one core).

Peer, same run, same nats-server: raw nats-py JetStream with the same headers and payload:
pipelined publishes, a pull consumer fetching and acking, both at once, and publish->receive
latency at the same offered rate. In the default topology the raw consumer of "both at once" and
of the latency run is a separate process too, for fairness.

    python -m bench.event_path                 # both fsync policies, ~2 minutes
    python -m bench.event_path --quick         # ~30 s smoke run
    python -m bench.event_path --single-process  # producer and consumer in one process
    python -m bench.event_path --sync always --profile   # plus a cProfile of the producer side

Prints figures and ratios; never asserts. Targets (README): >= 2,000 events/s through the full
path, >= 1/4 of raw, p99 < 20 ms at 1,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import math
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import sqlalchemy as sa
from google.protobuf.message import Message
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncSession

from bench.common import (
    Latency,
    Pacer,
    install_production_tracing,
    machine_line,
    ms,
    print_table,
    rate,
    ratio,
    wait_until,
)
from plinth.events.v1 import events_pb2
from plinth_common.db import Database
from plinth_common.events import (
    CloudEvent,
    ConsumerSettings,
    EventBus,
    EventConsumer,
    Outbox,
    OutboxRelay,
    event_tables,
    new_event,
)
from plinth_common.events.bus import EVENTS_STREAM, StreamSettings
from plinth_common.events.tracing import traceparent_of_current
from plinth_common.nats_server import NatsServer

SUBJECT = "plinth.job.finished"
RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "bench.raw.job.finished"

TARGET_EVENTS_PER_S = 2000.0
TARGET_FRACTION_OF_RAW = 0.25
TARGET_P99_MS = 20.0

tracer = trace.get_tracer("bench.event_path")
REPO = Path(__file__).resolve().parents[1]
WORKER_MAX_SECONDS = 300.0  # a consumer worker stops by itself after this, whatever happens


@dataclass(frozen=True)
class Options:
    syncs: tuple[str, ...]
    events: int
    single_events: int
    batch: int
    rate: float
    low_rate: float
    duration: float
    warmup: float
    window: int
    fetch_batch: int
    phase_cap: float
    max_backlog: int
    drain_timeout: float
    profile: bool
    profile_lines: int
    separate: bool = True

    @property
    def topology(self) -> str:
        return "2 procs" if self.separate else "1 proc"


def payload(i: int) -> events_pb2.JobFinished:
    """A job.finished payload of realistic size (~200 bytes)."""
    return events_pb2.JobFinished(
        job_id=f"j-{i:012x}",
        name="train-churn-model",
        team="ml",
        status=events_pb2.JOB_OUTCOME_SUCCEEDED,
        duration_seconds=412.5,
        mlflow_run_id=uuid.uuid4().hex,
        outputs={"model_uri": "runs:/abc/model", "metrics": "auc=0.91"},
        register_as="churn",
        entrypoint=["python", "-m", "train", "--epochs", "3"],
    )


# --------------------------------------------------------------------------------- consumer process


class ConsumerProcess:
    """A consumer service in its own process (``python -m bench.event_path --consumer-worker``).

    Protocol: the worker prints ``ready`` once its durable consumer exists and is fetching, then
    ``n <handled>`` whenever its count changes (polled every few ms); it stops on ``stop`` (or EOF)
    on stdin, or after ``WORKER_MAX_SECONDS``, and writes ``{event id: time.time() of handling}``
    as JSON to ``out``.
    """

    def __init__(
        self,
        kind: str,
        url: str,
        durable: str,
        out: Path,
        *,
        db: Path | None = None,
        fetch_batch: int = 64,
    ) -> None:
        self.args = [
            "--consumer-worker",
            kind,
            "--url",
            url,
            "--durable",
            durable,
            "--out",
            str(out),
            "--fetch-batch",
            str(fetch_batch),
            *(["--db", str(db)] if db is not None else []),
        ]
        self.out = out
        self.handled = 0
        self._ready = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 60.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.event_path",
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(REPO),
        )
        self._reader = asyncio.create_task(self._read())
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait(
            {ready, self._reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not self._ready.is_set():
            ready.cancel()
            await self.stop()
            raise RuntimeError(f"consumer worker did not start: {' '.join(self.args)}")

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        while line := await self.proc.stdout.readline():
            text = line.decode().strip()
            if text.startswith("n "):
                self.handled = int(text[2:])
            elif text == "ready":
                self._ready.set()

    async def stop(self, timeout: float = 30.0) -> dict[str, float]:
        """Stops the worker and returns its handling times."""
        if self.proc is None:
            return {}
        try:
            assert self.proc.stdin
            self.proc.stdin.write(b"stop\n")
            await self.proc.stdin.drain()
            self.proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self.proc = None
        try:
            return {k: float(v) for k, v in json.loads(self.out.read_text()).items()}
        except (OSError, ValueError):
            return {}


async def _stdin_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line or line.strip() == b"stop":
            stop.set()
            return


async def consumer_worker(
    kind: str, url: str, durable: str, out: Path, db_path: Path | None, fetch_batch: int
) -> None:
    """The consumer service's process: handles events, reports progress, dumps handling times."""
    handled_at: dict[str, float] = {}
    stop = asyncio.Event()
    stdin_task = asyncio.create_task(_stdin_stop(stop))
    cleanup: list[Callable[[], object]] = []

    if kind == "full":
        assert db_path is not None
        db = Database(f"sqlite+aiosqlite:///{db_path}")
        metadata = sa.MetaData()
        _, processed_table = event_tables(metadata)
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        bus = EventBus(url, name=f"bench-consumer-{durable}", streams=StreamSettings())
        await bus.start()
        await bus.connected()

        async def handle(session: AsyncSession, event: CloudEvent, message: Message) -> None:
            handled_at[event.id] = time.time()

        consumer = EventConsumer(
            bus, db, processed_table, ConsumerSettings(durable=durable, subjects=[SUBJECT]), handle
        )
        await consumer.start()
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            try:
                await bus.js.consumer_info(EVENTS_STREAM, durable)
                break
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.02)

        async def close_full() -> None:
            await consumer.stop()
            await bus.nc.close()  # closed, not drained (see FullPath.close)
            await bus.stop()
            await db.close()

        cleanup.append(close_full)
    else:
        nc = await nats.connect(url, name=f"bench-raw-consumer-{durable}")
        js = nc.jetstream(timeout=10)
        await js.add_consumer(
            RAW_STREAM,
            ConsumerConfig(
                durable_name=durable,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                max_ack_pending=max(1000, fetch_batch * 4),
            ),
        )
        sub = await js.pull_subscribe_bind(durable=durable, stream=RAW_STREAM)

        async def fetch_loop() -> None:
            while True:
                try:
                    msgs = await sub.fetch(fetch_batch, timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                for msg in msgs:
                    handled_at[(msg.headers or {}).get("Nats-Msg-Id", "")] = time.time()
                    await msg.ack()

        fetcher = asyncio.create_task(fetch_loop())

        async def close_raw() -> None:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)
            await nc.close()

        cleanup.append(close_raw)

    await asyncio.sleep(0.05)  # let the first fetch go out
    print("ready", flush=True)
    started = time.perf_counter()
    last = -1
    while not stop.is_set() and time.perf_counter() - started < WORKER_MAX_SECONDS:
        if len(handled_at) != last:
            last = len(handled_at)
            print(f"n {last}", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.003)
    snapshot = dict(handled_at)
    out.write_text(json.dumps(snapshot))
    for close in cleanup:
        with contextlib.suppress(Exception):  # the worker is exiting: best effort
            await asyncio.wait_for(close(), timeout=10)  # type: ignore[arg-type]
    stdin_task.cancel()
    await asyncio.gather(stdin_task, return_exceptions=True)
    print("done", flush=True)


# --------------------------------------------------------------------------------- full path


class FullPath:
    """A producer service (database + outbox + relay) and a consumer service (database + consumer).

    With ``separate`` (the deployed topology) the consumer service is a :class:`ConsumerProcess`;
    otherwise it shares this process and event loop. Times are ``time.time()`` in both cases.
    """

    def __init__(
        self, url: str, folder: Path, name: str, *, separate: bool, fetch_batch: int = 64
    ) -> None:
        self.name = name
        self.separate = separate
        self.producer_db = Database(f"sqlite+aiosqlite:///{folder / f'{name}-producer.db'}")
        self.metadata = sa.MetaData()
        outbox_table, processed_table = event_tables(self.metadata)
        self.producer_bus = EventBus(url, name=f"bench-producer-{name}", streams=StreamSettings())
        self.outbox = Outbox(outbox_table, source="/plinth/bench")
        self.relay = OutboxRelay(self.producer_db, outbox_table, self.producer_bus)
        self.committed_at: dict[str, float] = {}
        self.handled_at: dict[str, float] = {}
        self._seq = 0
        self.worker: ConsumerProcess | None = None
        if separate:
            self.worker = ConsumerProcess(
                "full",
                url,
                name,
                folder / f"{name}-handled.json",
                db=folder / f"{name}-consumer.db",
                fetch_batch=fetch_batch,
            )
        else:
            self.consumer_db = Database(f"sqlite+aiosqlite:///{folder / f'{name}-consumer.db'}")
            self.consumer_bus = EventBus(
                url, name=f"bench-consumer-{name}", streams=StreamSettings()
            )
            self.consumer = EventConsumer(
                self.consumer_bus,
                self.consumer_db,
                processed_table,
                ConsumerSettings(durable=name, subjects=[SUBJECT]),
                self._handle,
            )

    async def _handle(self, session: AsyncSession, event: CloudEvent, message: Message) -> None:
        self.handled_at[event.id] = time.time()

    @property
    def handled(self) -> int:
        return self.worker.handled if self.worker is not None else len(self.handled_at)

    async def start(self, *, relay: bool = True, consumer: bool = True) -> None:
        async with self.producer_db.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)
        await self.producer_bus.start()
        js = await self.producer_bus.connected()
        if not self.separate:
            async with self.consumer_db.engine.begin() as conn:
                await conn.run_sync(self.metadata.create_all)
            await self.consumer_bus.start()
            await self.consumer_bus.connected()
        await js.purge_stream(EVENTS_STREAM)  # each phase starts from an empty stream
        if relay:
            await self.relay.start()
        if consumer:
            await self.start_consumer()

    async def start_consumer(self) -> None:
        if self.worker is not None:
            await self.worker.start()
            return
        await self.consumer.start()

        async def exists() -> bool:
            try:
                await self.consumer_bus.js.consumer_info(EVENTS_STREAM, self.name)
                return True
            except Exception:  # noqa: BLE001
                return False

        deadline = time.perf_counter() + 10
        while not await exists() and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # let the first fetch go out

    async def wait_handled(self, count: int, timeout: float) -> bool:
        return await wait_until(lambda: self.handled >= count, timeout=timeout, interval=0.002)

    async def collect(self) -> dict[str, float]:
        """The handling times (stops the consumer process, if any)."""
        if self.worker is not None:
            self.handled_at = await self.worker.stop()
        return self.handled_at

    async def emit(self, count: int) -> list[str]:
        """One transaction carrying ``count`` events, under a request span as in a service."""
        ids = []
        with tracer.start_as_current_span("bench request", kind=SpanKind.SERVER):
            async with self.producer_db.transaction() as session:
                for _ in range(count):
                    self._seq += 1
                    event = await self.outbox.add(
                        session, payload(self._seq), subject=f"j-{self._seq:012x}", team="ml"
                    )
                    ids.append(event.id)
        now = time.time()
        for event_id in ids:
            self.committed_at[event_id] = now
        return ids

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        else:
            await self.consumer.stop()
        await self.relay.stop()
        await self.producer_bus.stop()
        if not self.separate:
            # Closed, not drained: a stopped pull consumer may leave fetched messages in the
            # subscription's queue, and draining would then wait out EventBus.stop's 5 s timeout.
            await self.consumer_bus.nc.close()
            await self.consumer_bus.stop()
            await self.consumer_db.close()
        await self.producer_db.close()


@dataclass
class Throughput:
    label: str
    events: int
    handled: int
    elapsed: float
    commit_elapsed: float
    complete: bool

    @property
    def per_s(self) -> float:
        return self.handled / self.elapsed if self.elapsed > 0 else math.nan

    @property
    def commit_per_s(self) -> float:
        return self.events / self.commit_elapsed if self.commit_elapsed > 0 else math.nan


async def full_throughput(
    url: str,
    folder: Path,
    opts: Options,
    *,
    per_txn: int,
    events: int,
    profiler: cProfile.Profile | None = None,
) -> Throughput:
    stack = FullPath(url, folder, f"tput{per_txn}-{uuid.uuid4().hex[:6]}", separate=opts.separate)
    await stack.start()
    try:
        if profiler:
            profiler.enable()
        t0 = time.time()
        sent = 0
        while sent < events and time.time() - t0 < opts.phase_cap:
            if sent - stack.handled >= opts.max_backlog:
                await asyncio.sleep(
                    0.001
                )  # flow control: a bounded backlog keeps the run and its drain short
                continue
            await stack.emit(min(per_txn, events - sent))
            sent += min(per_txn, events - sent)
        committed = time.time()
        complete = await stack.wait_handled(sent, opts.drain_timeout)
        if profiler:
            profiler.disable()
        handled_at = await stack.collect()
        last = max(handled_at.values(), default=time.time())
        return Throughput(
            f"{per_txn} ev/txn",
            sent,
            len(handled_at),
            last - t0,
            committed - t0,
            complete and len(handled_at) >= sent,
        )
    finally:
        await stack.close()


@dataclass
class Stages:
    """Each stage of the full path alone, on a backlog (capacity of one stage)."""

    commit_per_s: float
    relay_per_s: float
    consume_per_s: float


async def full_stages(
    url: str, folder: Path, opts: Options, *, per_txn: int, events: int
) -> Stages:
    # In one process: each stage runs alone here, so the topology does not matter.
    stack = FullPath(url, folder, f"stages{per_txn}-{uuid.uuid4().hex[:6]}", separate=False)
    await stack.start(relay=False, consumer=False)
    try:
        t0 = time.perf_counter()
        sent = 0
        while sent < events and time.perf_counter() - t0 < opts.phase_cap:
            await stack.emit(min(per_txn, events - sent))
            sent += min(per_txn, events - sent)
        events = sent
        t1 = time.perf_counter()
        await stack.relay.start()
        await wait_until(
            lambda: stack.relay.published >= events, timeout=opts.drain_timeout, interval=0.002
        )
        t2 = time.perf_counter()
        consume_start = time.time()
        await stack.start_consumer()
        await stack.wait_handled(events, opts.drain_timeout)
        last = max(stack.handled_at.values(), default=time.time())
        return Stages(
            events / (t1 - t0),
            stack.relay.published / (t2 - t1),
            len(stack.handled_at) / (last - consume_start),
        )
    finally:
        await stack.close()


@dataclass
class LatencyRun:
    offered_per_s: float
    latency: Latency
    handled: int
    sent: int


async def full_latency(
    url: str, folder: Path, opts: Options, *, per_s: float, duration: float
) -> LatencyRun:
    stack = FullPath(url, folder, f"lat-{uuid.uuid4().hex[:6]}", separate=opts.separate)
    await stack.start()
    total = int(per_s * (opts.warmup + duration))
    try:
        measured: list[str] = []
        pacer = Pacer(per_s)
        measured_from = pacer.start + opts.warmup
        stop_at = pacer.start + opts.warmup + duration
        for _ in range(total):
            await pacer.next()
            if time.perf_counter() > stop_at:
                break
            warm = time.perf_counter() < measured_from
            ids = await stack.emit(1)
            if not warm:
                measured += ids
        offered = pacer.achieved()
        total = len(stack.committed_at)
        await stack.wait_handled(total, opts.drain_timeout)
        handled_at = await stack.collect()
        samples = [handled_at[i] - stack.committed_at[i] for i in measured if i in handled_at]
        return LatencyRun(offered, Latency.of_seconds(samples), len(handled_at), total)
    finally:
        await stack.close()


# --------------------------------------------------------------------------------- raw peer


@dataclass
class Raw:
    publish_per_s: float = math.nan
    consume_per_s: float = math.nan
    both_per_s: float = math.nan
    latency: LatencyRun | None = None


def raw_message() -> tuple[dict[str, str], bytes]:
    """The headers and body a real event carries (CloudEvents + traceparent), for a fair peer."""
    with tracer.start_as_current_span("bench request", kind=SpanKind.SERVER):
        event = new_event(
            payload(0),
            source="/plinth/bench",
            subject="j-0",
            team="ml",
            extensions=traceparent_of_current(),
        )
    return event.headers(), event.data


class RawPeer:
    def __init__(self, url: str, opts: Options, folder: Path) -> None:
        self.url = url
        self.opts = opts
        self.folder = folder
        self.headers, self.data = raw_message()

    async def __aenter__(self) -> RawPeer:
        self.nc = await nats.connect(self.url, name="bench-raw")
        self.js = self.nc.jetstream(timeout=10)
        settings = StreamSettings()
        config = StreamConfig(
            name=RAW_STREAM,
            subjects=[RAW_SUBJECT],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=settings.max_age_s,
            duplicate_window=settings.duplicate_window_s,
        )
        await self.js.add_stream(config)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.js.delete_stream(RAW_STREAM)
        finally:
            await self.nc.close()

    def _headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        headers["Nats-Msg-Id"] = headers["ce-id"] = uuid.uuid4().hex
        return headers

    async def publish_pipelined(self, count: int) -> float:
        """Publishes ``count`` messages in concurrent windows; returns seconds taken."""
        t0 = time.perf_counter()
        sent = 0
        while sent < count and time.perf_counter() - t0 < self.opts.phase_cap:
            n = min(self.opts.window, count - sent)
            await asyncio.gather(
                *(
                    self.js.publish(RAW_SUBJECT, self.data, headers=self._headers())
                    for _ in range(n)
                )
            )
            sent += n
        self.published = sent
        return time.perf_counter() - t0

    async def _consumer(self, durable: str, deliver: DeliverPolicy = DeliverPolicy.ALL):  # type: ignore[no-untyped-def]
        await self.js.add_consumer(
            RAW_STREAM,
            ConsumerConfig(
                durable_name=durable,
                deliver_policy=deliver,
                ack_policy=AckPolicy.EXPLICIT,
                max_ack_pending=max(1000, self.opts.fetch_batch * 4),
            ),
        )
        return await self.js.pull_subscribe_bind(durable=durable, stream=RAW_STREAM)

    async def consume(
        self,
        count: int | list[int],
        on_msg: Callable[[Msg], None] | None = None,
        *,
        durable: str | None = None,
        deliver: DeliverPolicy = DeliverPolicy.ALL,
        budget: float | None = None,
    ) -> tuple[int, float]:
        """Fetches and acks until ``count`` messages arrived or the drain timeout; returns (count, seconds)."""
        sub = await self._consumer(durable or f"raw-{uuid.uuid4().hex[:6]}", deliver)
        got = 0
        t0 = time.perf_counter()
        deadline = t0 + (
            budget if budget is not None else self.opts.phase_cap + self.opts.drain_timeout
        )
        target = count if isinstance(count, list) else [count]
        while got < target[0] and time.perf_counter() < deadline:
            try:
                msgs = await sub.fetch(self.opts.fetch_batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in msgs:
                if on_msg is not None:
                    on_msg(msg)
                await msg.ack()
            got += len(msgs)
        return got, time.perf_counter() - t0

    async def run(self, count: int) -> Raw:
        raw = Raw()
        seconds = await self.publish_pipelined(count)
        raw.publish_per_s = self.published / seconds
        got, seconds = await self.consume(self.published)
        raw.consume_per_s = got / seconds
        await self.js.purge_stream(RAW_STREAM)
        # Both at once: the peer of the full path's end-to-end throughput.
        if self.opts.separate:
            raw.both_per_s = await self.both_separate(count)
        else:
            t0 = time.perf_counter()
            expected = [count]
            consumer = asyncio.create_task(self.consume(expected))
            await self.publish_pipelined(count)
            expected[0] = self.published
            got, _ = await consumer
            raw.both_per_s = got / (time.perf_counter() - t0)
        await self.js.purge_stream(RAW_STREAM)
        raw.latency = await (self.latency_separate() if self.opts.separate else self.latency())
        await self.js.purge_stream(RAW_STREAM)
        return raw

    def _worker(self, tag: str) -> ConsumerProcess:
        durable = f"raw-{tag}-{uuid.uuid4().hex[:6]}"
        return ConsumerProcess(
            "raw",
            self.url,
            durable,
            self.folder / f"{durable}.json",
            fetch_batch=self.opts.fetch_batch,
        )

    async def both_separate(self, count: int) -> float:
        """Publishes here while a consumer process fetches and acks; messages/s end to end."""
        worker = self._worker("both")
        await worker.start()
        try:
            t0 = time.time()
            await self.publish_pipelined(count)
            await wait_until(
                lambda: worker.handled >= self.published,
                timeout=self.opts.drain_timeout,
                interval=0.002,
            )
        finally:
            received = await worker.stop()
        last = max(received.values(), default=time.time())
        return len(received) / (last - t0)

    async def latency_separate(self) -> LatencyRun:
        """Paced publishes here, received by a consumer process; publish -> receive latency."""
        opts = self.opts
        total = int(opts.rate * (opts.warmup + opts.duration))
        sent: dict[str, float] = {}
        measured: list[str] = []
        worker = self._worker("lat")
        await worker.start()
        try:
            pacer = Pacer(opts.rate)
            measured_from = pacer.start + opts.warmup
            stop_at = measured_from + opts.duration
            inflight: set[asyncio.Task[object]] = set()
            for _ in range(total):
                await pacer.next()
                now = time.perf_counter()
                if now > stop_at:
                    break
                headers = self._headers()
                sent[headers["Nats-Msg-Id"]] = time.time()
                if now >= measured_from:
                    measured.append(headers["Nats-Msg-Id"])
                task = asyncio.create_task(self.js.publish(RAW_SUBJECT, self.data, headers=headers))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            offered = pacer.achieved()
            await asyncio.gather(*inflight, return_exceptions=True)
            await wait_until(
                lambda: worker.handled >= len(sent), timeout=opts.drain_timeout, interval=0.002
            )
        finally:
            received = await worker.stop()
        samples = [received[i] - sent[i] for i in measured if i in received]
        return LatencyRun(offered, Latency.of_seconds(samples), len(received), len(sent))

    async def latency(self) -> LatencyRun:
        opts = self.opts
        total = int(opts.rate * (opts.warmup + opts.duration))
        sent: dict[str, float] = {}
        received: dict[str, float] = {}

        def on_msg(msg: Msg) -> None:
            received[(msg.headers or {}).get("Nats-Msg-Id", "")] = time.perf_counter()

        expected = [total]
        budget = 0.3 + opts.warmup + opts.duration + opts.drain_timeout
        consumer = asyncio.create_task(
            self.consume(expected, on_msg, deliver=DeliverPolicy.NEW, budget=budget)
        )
        await asyncio.sleep(0.3)  # consumer created and its first fetch waiting
        pacer = Pacer(opts.rate)
        measured_from = pacer.start + opts.warmup
        stop_at = measured_from + opts.duration
        inflight: set[asyncio.Task[object]] = set()
        for _ in range(total):
            await pacer.next()
            if time.perf_counter() > stop_at:
                break
            headers = self._headers()
            sent[headers["Nats-Msg-Id"]] = time.perf_counter()
            task = asyncio.create_task(self.js.publish(RAW_SUBJECT, self.data, headers=headers))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        offered = pacer.achieved()
        expected[0] = len(sent)
        await asyncio.gather(*inflight, return_exceptions=True)
        await consumer
        samples = [received[i] - t for i, t in sent.items() if t >= measured_from and i in received]
        return LatencyRun(offered, Latency.of_seconds(samples), len(received), len(sent))


# --------------------------------------------------------------------------------- driver


@dataclass
class ModeResult:
    sync: str
    raw: Raw = field(default_factory=Raw)
    batched: Throughput | None = None
    single: Throughput | None = None
    latency: LatencyRun | None = None
    low_latency: LatencyRun | None = None
    stages: dict[int, Stages] = field(default_factory=dict)
    profile: str = ""


async def run_mode(sync: str, opts: Options) -> ModeResult:
    result = ModeResult(sync)
    with tempfile.TemporaryDirectory(prefix="plinth-bench-events-") as tmp:
        folder = Path(tmp)
        server = NatsServer(folder / "nats", sync_interval=sync)
        await server.start()
        try:
            print(
                f"[sync_interval={sync}] nats-server on {server.url}; topology: {TOPOLOGY[opts.separate]}",
                flush=True,
            )
            async with RawPeer(server.url, opts, folder) as peer:
                result.raw = await peer.run(opts.events)
            r = result.raw
            assert r.latency is not None
            print(
                f"  raw: publish {rate(r.publish_per_s)}/s, fetch+ack {rate(r.consume_per_s)}/s, both {rate(r.both_per_s)}/s, "
                f"latency p50 {ms(r.latency.latency.p50)} ms p99 {ms(r.latency.latency.p99)} ms",
                flush=True,
            )
            profiler = cProfile.Profile() if opts.profile else None
            result.batched = await full_throughput(
                server.url, folder, opts, per_txn=opts.batch, events=opts.events, profiler=profiler
            )
            print(
                f"  full path {opts.batch} ev/txn: {rate(result.batched.per_s)} events/s (commits {rate(result.batched.commit_per_s)}/s)",
                flush=True,
            )
            result.single = await full_throughput(
                server.url, folder, opts, per_txn=1, events=opts.single_events
            )
            print(
                f"  full path 1 ev/txn: {rate(result.single.per_s)} events/s (commits {rate(result.single.commit_per_s)}/s)",
                flush=True,
            )
            result.latency = await full_latency(
                server.url, folder, opts, per_s=opts.rate, duration=opts.duration
            )
            print(
                f"  full path latency @{opts.rate:g}/s: p50 {ms(result.latency.latency.p50)} ms p99 {ms(result.latency.latency.p99)} ms",
                flush=True,
            )
            if opts.low_rate:
                result.low_latency = await full_latency(
                    server.url,
                    folder,
                    opts,
                    per_s=opts.low_rate,
                    duration=min(opts.duration / 2, 3.0),
                )
                print(
                    f"  full path latency @{opts.low_rate:g}/s: p50 {ms(result.low_latency.latency.p50)} ms p99 {ms(result.low_latency.latency.p99)} ms",
                    flush=True,
                )
            if opts.profile:
                for per_txn, n in ((opts.batch, opts.events), (1, opts.single_events)):
                    result.stages[per_txn] = await full_stages(
                        server.url, folder, opts, per_txn=per_txn, events=n
                    )
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                # Self time only: cumulative times of coroutines and greenlets count nested awaits twice.
                stats.sort_stats("tottime").print_stats(opts.profile_lines)
                result.profile = out.getvalue()
        finally:
            await server.stop()
    return result


TOPOLOGY = {
    True: "2 procs (deployed: producer+relay here, consumer service in its own process)",
    False: "1 proc (producer, relay and consumer share one process and event loop)",
}


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: list[ModeResult], opts: Options) -> None:
    rows = []
    t = f"[{opts.topology}]"
    for r in results:
        raw, b, s, lat = r.raw, r.batched, r.single, r.latency
        assert b and s and lat and raw.latency
        rows += [
            [
                f"{r.sync}",
                f"full path {t}, {opts.batch} ev/txn ({b.handled}/{b.events}{'' if b.complete else ' INCOMPLETE'})",
                rate(b.per_s),
                "",
                "",
            ],
            [
                f"{r.sync}",
                f"full path {t}, 1 ev/txn ({s.handled}/{s.events}{'' if s.complete else ' INCOMPLETE'})",
                rate(s.per_s),
                "",
                "",
            ],
            [
                f"{r.sync}",
                f"raw publish (windows of {opts.window})",
                rate(raw.publish_per_s),
                "",
                "",
            ],
            [
                f"{r.sync}",
                f"raw pull fetch({opts.fetch_batch})+ack",
                rate(raw.consume_per_s),
                "",
                "",
            ],
            [f"{r.sync}", f"raw publish + fetch/ack at once {t}", rate(raw.both_per_s), "", ""],
            [
                f"{r.sync}",
                f"full path {t} latency @{lat.offered_per_s:,.0f}/s ({lat.handled}/{lat.sent})",
                "",
                ms(lat.latency.p50),
                ms(lat.latency.p99),
            ],
            *(
                [
                    [
                        f"{r.sync}",
                        f"full path {t} latency @{r.low_latency.offered_per_s:,.0f}/s ({r.low_latency.handled}/{r.low_latency.sent})",
                        "",
                        ms(r.low_latency.latency.p50),
                        ms(r.low_latency.latency.p99),
                    ]
                ]
                if r.low_latency
                else []
            ),
            [
                f"{r.sync}",
                f"raw {t} latency @{raw.latency.offered_per_s:,.0f}/s ({raw.latency.handled}/{raw.latency.sent})",
                "",
                ms(raw.latency.latency.p50),
                ms(raw.latency.latency.p99),
            ],
        ]
    print(f"Topology {t}: {TOPOLOGY[opts.separate]}")
    print_table(
        f"Summary {t} (events or msgs per second; latency in ms, commit/publish -> handler/receive)",
        ["sync", "measure", "per s", "p50", "p99"],
        rows,
    )

    ratio_rows = []
    for r in results:
        raw, b, s, lat = r.raw, r.batched, r.single, r.latency
        assert b and s and lat and raw.latency
        f_b = ratio(b.per_s, raw.both_per_s)
        f_s = ratio(s.per_s, raw.both_per_s)
        ratio_rows += [
            [
                r.sync,
                f"full {opts.batch} ev/txn / raw both",
                f"{f_b:.3f}",
                f"{rate(b.per_s)} >= 2,000/s and >= 1/4 raw",
                _mark(b.per_s >= TARGET_EVENTS_PER_S and f_b >= TARGET_FRACTION_OF_RAW),
            ],
            [
                r.sync,
                "full 1 ev/txn / raw both",
                f"{f_s:.3f}",
                f"{rate(s.per_s)} >= 2,000/s and >= 1/4 raw",
                _mark(s.per_s >= TARGET_EVENTS_PER_S and f_s >= TARGET_FRACTION_OF_RAW),
            ],
            [
                r.sync,
                f"full {opts.batch} ev/txn / raw publish",
                f"{ratio(b.per_s, raw.publish_per_s):.3f}",
                "",
                "",
            ],
            [
                r.sync,
                "full p50 / raw p50",
                f"{ratio(lat.latency.p50, raw.latency.latency.p50):.1f}",
                "",
                "",
            ],
            [
                r.sync,
                "full p99 / raw p99",
                f"{ratio(lat.latency.p99, raw.latency.latency.p99):.1f}",
                f"p99 {ms(lat.latency.p99)} ms < 20 ms",
                _mark(
                    lat.latency.p99 < TARGET_P99_MS
                    and lat.latency.n > 0
                    and lat.handled == lat.sent
                ),
            ],
        ]
    print_table(f"Ratios and targets {t}", ["sync", "ratio", "value", "target", ""], ratio_rows)

    for r in results:
        if r.stages:
            print_table(
                f"Stage capacity, each stage alone on a backlog, in one process (sync_interval={r.sync})",
                [
                    "ev/txn",
                    "commit (Outbox.add+commit)/s",
                    "relay (select+publish+mark)/s",
                    "consumer (fetch+txn+ack)/s",
                ],
                [
                    [k, rate(v.commit_per_s), rate(v.relay_per_s), rate(v.consume_per_s)]
                    for k, v in r.stages.items()
                ],
            )
        if r.profile:
            who = (
                "producer and relay only; the consumer is another process"
                if opts.separate
                else "producer, relay and consumer share this thread"
            )
            print(
                f"cProfile of the full path {t}, {opts.batch} ev/txn, sync_interval={r.sync} ({who}):"
            )
            print(r.profile)


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.event_path", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sync",
        choices=("always", "2m", "both"),
        default="both",
        help="nats-server JetStream sync_interval (default: both; the platform uses 'always')",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help="events for the batched throughput and the raw peer (default 20000)",
    )
    parser.add_argument(
        "--single-events",
        type=int,
        default=None,
        help="events for the one-event-per-transaction throughput (default 5000)",
    )
    parser.add_argument(
        "--batch", type=int, default=100, help="events per transaction in the batched run"
    )
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="offered rate of the latency runs, events/s"
    )
    parser.add_argument(
        "--low-rate",
        type=float,
        default=100.0,
        help="offered rate of a second, lighter full-path latency run (0: skip)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measured seconds of each latency run (default 10)",
    )
    parser.add_argument(
        "--window", type=int, default=256, help="concurrent publishes per window (raw peer)"
    )
    parser.add_argument(
        "--fetch-batch",
        type=int,
        default=ConsumerSettings(durable="x", subjects=["x"]).batch,
        help="raw pull consumer batch (default: the EventConsumer's)",
    )
    parser.add_argument(
        "--phase-cap",
        type=float,
        default=None,
        help="max seconds of producing in a throughput run (default 6)",
    )
    parser.add_argument(
        "--max-backlog",
        type=int,
        default=2000,
        help="committed but unhandled events at most, in throughput runs",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="max seconds to wait for a run to be handled (default 5)",
    )
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    parser.add_argument(
        "--single-process",
        action="store_true",
        help="run the consumer service in this process and event loop (not as deployed)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the batched full path and measure each stage alone",
    )
    parser.add_argument("--profile-lines", type=int, default=30)
    a = parser.parse_args(argv)
    quick = a.quick
    return Options(
        syncs=("always", "2m") if a.sync == "both" else (a.sync,),
        events=a.events or (3000 if quick else 20000),
        single_events=a.single_events or (1000 if quick else 5000),
        batch=a.batch,
        rate=a.rate,
        low_rate=a.low_rate,
        duration=a.duration or (1.0 if quick else 10.0),
        warmup=0.5 if quick else 1.0,
        window=a.window,
        fetch_batch=a.fetch_batch,
        phase_cap=a.phase_cap or (1.0 if quick else 6.0),
        max_backlog=a.max_backlog,
        drain_timeout=a.drain_timeout or (2.0 if quick else 5.0),
        profile=a.profile,
        profile_lines=a.profile_lines,
        separate=not a.single_process,
    )


async def amain(opts: Options) -> None:
    print(f"bench.event_path | {machine_line()}")
    print(
        f"events {opts.events} ({opts.batch}/txn), {opts.single_events} (1/txn); latency {opts.rate:,.0f}/s for {opts.duration:g} s "
        f"(+{opts.warmup:g} s warm-up); sync_interval {', '.join(opts.syncs)}; topology {TOPOLOGY[opts.separate]}",
        flush=True,
    )
    started = time.perf_counter()
    results = [await run_mode(sync, opts) for sync in opts.syncs]
    report(results, opts)
    print(f"total {time.perf_counter() - started:.0f} s | at the end: {machine_line()}")


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.event_path --consumer-worker")
    parser.add_argument("--consumer-worker", choices=("full", "raw"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--durable", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--db", type=Path, default=None)
    parser.add_argument("--fetch-batch", type=int, default=64)
    a = parser.parse_args(argv)
    provider = install_production_tracing(
        "plinth-bench-consumer", sqlalchemy=a.consumer_worker == "full"
    )
    try:
        asyncio.run(
            consumer_worker(a.consumer_worker, a.url, a.durable, a.out, a.db, a.fetch_batch)
        )
    finally:
        provider.shutdown()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.ERROR)
    # Stopping a consumer or relay cancels it, possibly inside a pooled connection's reset,
    # which SQLAlchemy logs as an error; it is harmless here and would clutter the figures.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
    args = sys.argv[1:] if argv is None else argv
    if "--consumer-worker" in args:
        worker_main(args)
        return
    opts = parse(argv)
    provider = install_production_tracing("plinth-bench")
    try:
        asyncio.run(amain(opts))
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
