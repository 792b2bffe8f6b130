"""Events through the full path, against raw nats-py JetStream on the same server.

Full path: ``Outbox.add`` inside a SQL transaction (SQLite file) -> ``OutboxRelay`` -> JetStream
-> durable ``EventConsumer`` (processed-events idempotency, handler in a transaction, ack after
commit), with a real SDK tracer provider and the SQLAlchemy instrumentation, as in a service.
The producer (with its relay) and the consumer each have their own database file and NATS
connection, as two services would; they share this process and its event loop.

Peer, same run, same nats-server: raw nats-py JetStream with the same headers and payload:
pipelined publishes, a pull consumer fetching and acking, both at once, and publish->receive
latency at the same offered rate.

    python -m bench.event_path                 # both fsync policies, ~2 minutes
    python -m bench.event_path --quick         # ~20 s smoke run
    python -m bench.event_path --sync always --profile   # plus a cProfile of the full path

Prints figures and ratios; never asserts. Targets (README): >= 2,000 events/s through the full
path, >= 1/4 of raw, p99 < 20 ms at 1,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import math
import pstats
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
from nats.aio.msg import Msg
import sqlalchemy as sa
from google.protobuf.message import Message
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncSession

from bench.common import Latency, Pacer, install_production_tracing, machine_line, ms, print_table, rate, ratio, wait_until
from plinth.events.v1 import events_pb2
from plinth_common.db import Database
from plinth_common.events import CloudEvent, ConsumerSettings, EventBus, EventConsumer, Outbox, OutboxRelay, event_tables, new_event
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


# --------------------------------------------------------------------------------- full path


class FullPath:
    """A producer service (database + outbox + relay) and a consumer service (database + consumer)."""

    def __init__(self, url: str, folder: Path, name: str) -> None:
        self.name = name
        self.producer_db = Database(f"sqlite+aiosqlite:///{folder / f'{name}-producer.db'}")
        self.consumer_db = Database(f"sqlite+aiosqlite:///{folder / f'{name}-consumer.db'}")
        self.metadata = sa.MetaData()
        outbox_table, processed_table = event_tables(self.metadata)
        self.producer_bus = EventBus(url, name=f"bench-producer-{name}", streams=StreamSettings())
        self.consumer_bus = EventBus(url, name=f"bench-consumer-{name}", streams=StreamSettings())
        self.outbox = Outbox(outbox_table, source="/plinth/bench")
        self.relay = OutboxRelay(self.producer_db, outbox_table, self.producer_bus)
        self.consumer = EventConsumer(
            self.consumer_bus, self.consumer_db, processed_table, ConsumerSettings(durable=name, subjects=[SUBJECT]), self._handle
        )
        self.committed_at: dict[str, float] = {}
        self.handled_at: dict[str, float] = {}
        self.expected = 0
        self.all_handled = asyncio.Event()
        self._seq = 0

    async def _handle(self, session: AsyncSession, event: CloudEvent, message: Message) -> None:
        self.handled_at[event.id] = time.perf_counter()
        if len(self.handled_at) >= self.expected:
            self.all_handled.set()

    async def start(self, *, relay: bool = True, consumer: bool = True) -> None:
        for db in (self.producer_db, self.consumer_db):
            async with db.engine.begin() as conn:
                await conn.run_sync(self.metadata.create_all)
        await self.producer_bus.start()
        await self.consumer_bus.start()
        js = await self.producer_bus.connected()
        await self.consumer_bus.connected()
        await js.purge_stream(EVENTS_STREAM)  # each phase starts from an empty stream
        if relay:
            await self.relay.start()
        if consumer:
            await self.start_consumer()

    async def start_consumer(self) -> None:
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

    async def emit(self, count: int) -> None:
        """One transaction carrying ``count`` events, under a request span as in a service."""
        ids = []
        with tracer.start_as_current_span("bench request", kind=SpanKind.SERVER):
            async with self.producer_db.transaction() as session:
                for _ in range(count):
                    self._seq += 1
                    event = await self.outbox.add(session, payload(self._seq), subject=f"j-{self._seq:012x}", team="ml")
                    ids.append(event.id)
        now = time.perf_counter()
        for event_id in ids:
            self.committed_at[event_id] = now

    async def close(self) -> None:
        await self.consumer.stop()
        await self.relay.stop()
        await self.producer_bus.stop()
        # Closed, not drained: a stopped pull consumer may leave fetched messages in the
        # subscription's queue, and draining would then wait out EventBus.stop's 5 s timeout.
        await self.consumer_bus.nc.close()
        await self.consumer_bus.stop()
        await self.producer_db.close()
        await self.consumer_db.close()


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


async def full_throughput(url: str, folder: Path, opts: Options, *, per_txn: int, events: int, profiler: cProfile.Profile | None = None) -> Throughput:
    stack = FullPath(url, folder, f"tput{per_txn}-{uuid.uuid4().hex[:6]}")
    await stack.start()
    stack.expected = events
    try:
        if profiler:
            profiler.enable()
        t0 = time.perf_counter()
        sent = 0
        while sent < events and time.perf_counter() - t0 < opts.phase_cap:
            if sent - len(stack.handled_at) >= opts.max_backlog:
                await asyncio.sleep(0.001)  # flow control: a bounded backlog keeps the run and its drain short
                continue
            await stack.emit(min(per_txn, events - sent))
            sent += min(per_txn, events - sent)
        stack.expected = sent
        if len(stack.handled_at) >= sent:
            stack.all_handled.set()
        committed = time.perf_counter()
        try:
            await asyncio.wait_for(stack.all_handled.wait(), timeout=opts.drain_timeout)
            complete = True
        except TimeoutError:
            complete = False
        if profiler:
            profiler.disable()
        last = max(stack.handled_at.values(), default=time.perf_counter())
        return Throughput(f"{per_txn} ev/txn", sent, len(stack.handled_at), last - t0, committed - t0, complete)
    finally:
        await stack.close()


@dataclass
class Stages:
    """Each stage of the full path alone, on a backlog (capacity of one stage)."""

    commit_per_s: float
    relay_per_s: float
    consume_per_s: float


async def full_stages(url: str, folder: Path, opts: Options, *, per_txn: int, events: int) -> Stages:
    stack = FullPath(url, folder, f"stages{per_txn}-{uuid.uuid4().hex[:6]}")
    await stack.start(relay=False, consumer=False)
    stack.expected = events
    try:
        t0 = time.perf_counter()
        sent = 0
        while sent < events and time.perf_counter() - t0 < opts.phase_cap:
            await stack.emit(min(per_txn, events - sent))
            sent += min(per_txn, events - sent)
        stack.expected = events = sent
        t1 = time.perf_counter()
        await stack.relay.start()
        await wait_until(lambda: stack.relay.published >= events, timeout=opts.drain_timeout, interval=0.002)
        t2 = time.perf_counter()
        consume_start = time.perf_counter()
        await stack.start_consumer()
        try:
            await asyncio.wait_for(stack.all_handled.wait(), timeout=opts.drain_timeout)
        except TimeoutError:
            pass
        last = max(stack.handled_at.values(), default=time.perf_counter())
        return Stages(events / (t1 - t0), stack.relay.published / (t2 - t1), len(stack.handled_at) / (last - consume_start))
    finally:
        await stack.close()


@dataclass
class LatencyRun:
    offered_per_s: float
    latency: Latency
    handled: int
    sent: int


async def full_latency(url: str, folder: Path, opts: Options, *, per_s: float, duration: float) -> LatencyRun:
    stack = FullPath(url, folder, f"lat-{uuid.uuid4().hex[:6]}")
    await stack.start()
    total = int(per_s * (opts.warmup + duration))
    stack.expected = total
    try:
        pacer = Pacer(per_s)
        measured_from = pacer.start + opts.warmup
        stop_at = pacer.start + opts.warmup + duration
        for _ in range(total):
            await pacer.next()
            if time.perf_counter() > stop_at:
                break
            await stack.emit(1)
        offered = pacer.achieved()
        total = stack.expected = len(stack.committed_at)
        if len(stack.handled_at) >= total:
            stack.all_handled.set()
        try:
            await asyncio.wait_for(stack.all_handled.wait(), timeout=opts.drain_timeout)
        except TimeoutError:
            pass
        samples = [
            stack.handled_at[i] - t for i, t in stack.committed_at.items() if t >= measured_from and i in stack.handled_at
        ]
        return LatencyRun(offered, Latency.of_seconds(samples), len(stack.handled_at), total)
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
        event = new_event(payload(0), source="/plinth/bench", subject="j-0", team="ml", extensions=traceparent_of_current())
    return event.headers(), event.data


class RawPeer:
    def __init__(self, url: str, opts: Options) -> None:
        self.url = url
        self.opts = opts
        self.headers, self.data = raw_message()

    async def __aenter__(self) -> "RawPeer":
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
            await asyncio.gather(*(self.js.publish(RAW_SUBJECT, self.data, headers=self._headers()) for _ in range(n)))
            sent += n
        self.published = sent
        return time.perf_counter() - t0

    async def _consumer(self, durable: str, deliver: DeliverPolicy = DeliverPolicy.ALL):  # type: ignore[no-untyped-def]
        await self.js.add_consumer(
            RAW_STREAM,
            ConsumerConfig(durable_name=durable, deliver_policy=deliver, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=max(1000, self.opts.fetch_batch * 4)),
        )
        return await self.js.pull_subscribe_bind(durable=durable, stream=RAW_STREAM)

    async def consume(self, count: int | list[int], on_msg: Callable[[Msg], None] | None = None, *, durable: str | None = None, deliver: DeliverPolicy = DeliverPolicy.ALL, budget: float | None = None) -> tuple[int, float]:
        """Fetches and acks until ``count`` messages arrived or the drain timeout; returns (count, seconds)."""
        sub = await self._consumer(durable or f"raw-{uuid.uuid4().hex[:6]}", deliver)
        got = 0
        t0 = time.perf_counter()
        deadline = t0 + (budget if budget is not None else self.opts.phase_cap + self.opts.drain_timeout)
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
        t0 = time.perf_counter()
        expected = [count]
        consumer = asyncio.create_task(self.consume(expected))
        await self.publish_pipelined(count)
        expected[0] = self.published
        got, _ = await consumer
        raw.both_per_s = got / (time.perf_counter() - t0)
        await self.js.purge_stream(RAW_STREAM)
        raw.latency = await self.latency()
        await self.js.purge_stream(RAW_STREAM)
        return raw

    async def latency(self) -> LatencyRun:
        opts = self.opts
        total = int(opts.rate * (opts.warmup + opts.duration))
        sent: dict[str, float] = {}
        received: dict[str, float] = {}

        def on_msg(msg: Msg) -> None:
            received[(msg.headers or {}).get("Nats-Msg-Id", "")] = time.perf_counter()

        expected = [total]
        budget = 0.3 + opts.warmup + opts.duration + opts.drain_timeout
        consumer = asyncio.create_task(self.consume(expected, on_msg, deliver=DeliverPolicy.NEW, budget=budget))
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
            print(f"[sync_interval={sync}] nats-server on {server.url}", flush=True)
            async with RawPeer(server.url, opts) as peer:
                result.raw = await peer.run(opts.events)
            r = result.raw
            assert r.latency is not None
            print(
                f"  raw: publish {rate(r.publish_per_s)}/s, fetch+ack {rate(r.consume_per_s)}/s, both {rate(r.both_per_s)}/s, "
                f"latency p50 {ms(r.latency.latency.p50)} ms p99 {ms(r.latency.latency.p99)} ms",
                flush=True,
            )
            profiler = cProfile.Profile() if opts.profile else None
            result.batched = await full_throughput(server.url, folder, opts, per_txn=opts.batch, events=opts.events, profiler=profiler)
            print(f"  full path {opts.batch} ev/txn: {rate(result.batched.per_s)} events/s (commits {rate(result.batched.commit_per_s)}/s)", flush=True)
            result.single = await full_throughput(server.url, folder, opts, per_txn=1, events=opts.single_events)
            print(f"  full path 1 ev/txn: {rate(result.single.per_s)} events/s (commits {rate(result.single.commit_per_s)}/s)", flush=True)
            result.latency = await full_latency(server.url, folder, opts, per_s=opts.rate, duration=opts.duration)
            print(f"  full path latency @{opts.rate:g}/s: p50 {ms(result.latency.latency.p50)} ms p99 {ms(result.latency.latency.p99)} ms", flush=True)
            if opts.low_rate:
                result.low_latency = await full_latency(server.url, folder, opts, per_s=opts.low_rate, duration=min(opts.duration / 2, 3.0))
                print(f"  full path latency @{opts.low_rate:g}/s: p50 {ms(result.low_latency.latency.p50)} ms p99 {ms(result.low_latency.latency.p99)} ms", flush=True)
            if opts.profile:
                for per_txn, n in ((opts.batch, opts.events), (1, opts.single_events)):
                    result.stages[per_txn] = await full_stages(server.url, folder, opts, per_txn=per_txn, events=n)
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                # Self time only: cumulative times of coroutines and greenlets count nested awaits twice.
                stats.sort_stats("tottime").print_stats(opts.profile_lines)
                result.profile = out.getvalue()
        finally:
            await server.stop()
    return result


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: list[ModeResult], opts: Options) -> None:
    rows = []
    for r in results:
        raw, b, s, lat = r.raw, r.batched, r.single, r.latency
        assert b and s and lat and raw.latency
        rows += [
            [f"{r.sync}", f"full path, {opts.batch} ev/txn ({b.handled}/{b.events}{'' if b.complete else ' INCOMPLETE'})", rate(b.per_s), "", ""],
            [f"{r.sync}", f"full path, 1 ev/txn ({s.handled}/{s.events}{'' if s.complete else ' INCOMPLETE'})", rate(s.per_s), "", ""],
            [f"{r.sync}", f"raw publish (windows of {opts.window})", rate(raw.publish_per_s), "", ""],
            [f"{r.sync}", f"raw pull fetch({opts.fetch_batch})+ack", rate(raw.consume_per_s), "", ""],
            [f"{r.sync}", "raw publish + fetch/ack at once", rate(raw.both_per_s), "", ""],
            [f"{r.sync}", f"full path latency @{lat.offered_per_s:,.0f}/s ({lat.handled}/{lat.sent})", "", ms(lat.latency.p50), ms(lat.latency.p99)],
            *(
                [[f"{r.sync}", f"full path latency @{r.low_latency.offered_per_s:,.0f}/s ({r.low_latency.handled}/{r.low_latency.sent})", "", ms(r.low_latency.latency.p50), ms(r.low_latency.latency.p99)]]
                if r.low_latency
                else []
            ),
            [f"{r.sync}", f"raw latency @{raw.latency.offered_per_s:,.0f}/s ({raw.latency.handled}/{raw.latency.sent})", "", ms(raw.latency.latency.p50), ms(raw.latency.latency.p99)],
        ]
    print_table("Summary (events or msgs per second; latency in ms, commit/publish -> handler/receive)", ["sync", "measure", "per s", "p50", "p99"], rows)

    ratio_rows = []
    for r in results:
        raw, b, s, lat = r.raw, r.batched, r.single, r.latency
        assert b and s and lat and raw.latency
        f_b = ratio(b.per_s, raw.both_per_s)
        f_s = ratio(s.per_s, raw.both_per_s)
        ratio_rows += [
            [r.sync, f"full {opts.batch} ev/txn / raw both", f"{f_b:.3f}", f"{rate(b.per_s)} >= 2,000/s and >= 1/4 raw", _mark(b.per_s >= TARGET_EVENTS_PER_S and f_b >= TARGET_FRACTION_OF_RAW)],
            [r.sync, "full 1 ev/txn / raw both", f"{f_s:.3f}", f"{rate(s.per_s)} >= 2,000/s and >= 1/4 raw", _mark(s.per_s >= TARGET_EVENTS_PER_S and f_s >= TARGET_FRACTION_OF_RAW)],
            [r.sync, f"full {opts.batch} ev/txn / raw publish", f"{ratio(b.per_s, raw.publish_per_s):.3f}", "", ""],
            [r.sync, "full p50 / raw p50", f"{ratio(lat.latency.p50, raw.latency.latency.p50):.1f}", "", ""],
            [r.sync, "full p99 / raw p99", f"{ratio(lat.latency.p99, raw.latency.latency.p99):.1f}", f"p99 {ms(lat.latency.p99)} ms < 20 ms", _mark(lat.latency.p99 < TARGET_P99_MS and lat.latency.n > 0 and lat.handled == lat.sent)],
        ]
    print_table("Ratios and targets", ["sync", "ratio", "value", "target", ""], ratio_rows)

    for r in results:
        if r.stages:
            print_table(
                f"Stage capacity, each stage alone on a backlog (sync_interval={r.sync})",
                ["ev/txn", "commit (Outbox.add+commit)/s", "relay (select+publish+mark)/s", "consumer (fetch+txn+ack)/s"],
                [[k, rate(v.commit_per_s), rate(v.relay_per_s), rate(v.consume_per_s)] for k, v in r.stages.items()],
            )
        if r.profile:
            print(f"cProfile of the full path, {opts.batch} ev/txn, sync_interval={r.sync} (producer, relay and consumer share this thread):")
            print(r.profile)


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.event_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sync", choices=("always", "2m", "both"), default="both", help="nats-server JetStream sync_interval (default: both; the platform uses 'always')")
    parser.add_argument("--events", type=int, default=None, help="events for the batched throughput and the raw peer (default 20000)")
    parser.add_argument("--single-events", type=int, default=None, help="events for the one-event-per-transaction throughput (default 5000)")
    parser.add_argument("--batch", type=int, default=100, help="events per transaction in the batched run")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered rate of the latency runs, events/s")
    parser.add_argument("--low-rate", type=float, default=100.0, help="offered rate of a second, lighter full-path latency run (0: skip)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds of each latency run (default 10)")
    parser.add_argument("--window", type=int, default=256, help="concurrent publishes per window (raw peer)")
    parser.add_argument("--fetch-batch", type=int, default=ConsumerSettings(durable="x", subjects=["x"]).batch, help="raw pull consumer batch (default: the EventConsumer's)")
    parser.add_argument("--phase-cap", type=float, default=None, help="max seconds of producing in a throughput run (default 6)")
    parser.add_argument("--max-backlog", type=int, default=2000, help="committed but unhandled events at most, in throughput runs")
    parser.add_argument("--drain-timeout", type=float, default=None, help="max seconds to wait for a run to be handled (default 5)")
    parser.add_argument("--quick", action="store_true", help="~20 s smoke run")
    parser.add_argument("--profile", action="store_true", help="cProfile the batched full path and measure each stage alone")
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
    )


async def amain(opts: Options) -> None:
    print(f"bench.event_path | {machine_line()}")
    print(
        f"events {opts.events} ({opts.batch}/txn), {opts.single_events} (1/txn); latency {opts.rate:,.0f}/s for {opts.duration:g} s "
        f"(+{opts.warmup:g} s warm-up); sync_interval {', '.join(opts.syncs)}",
        flush=True,
    )
    started = time.perf_counter()
    results = [await run_mode(sync, opts) for sync in opts.syncs]
    report(results, opts)
    print(f"total {time.perf_counter() - started:.0f} s | at the end: {machine_line()}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.ERROR)
    # Stopping a consumer or relay cancels it, possibly inside a pooled connection's reset,
    # which SQLAlchemy logs as an error; it is harmless here and would clutter the figures.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
    opts = parse(argv)
    provider = install_production_tracing("plinth-bench")
    try:
        asyncio.run(amain(opts))
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
