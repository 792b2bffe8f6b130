"""Helpers shared by the benchmarks: latency summaries, pacing, tables, production-like tracing."""

from __future__ import annotations

import asyncio
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, linear between ranks (nan if empty)."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return sorted_values[0]
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


@dataclass(frozen=True)
class Latency:
    """A latency distribution, in milliseconds."""

    n: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of_seconds(cls, samples: Iterable[float]) -> Latency:
        """Summarizes samples given in seconds."""
        values = sorted(s * 1000.0 for s in samples)
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            n=len(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            max=values[-1],
            mean=sum(values) / len(values),
        )

    def cells(self) -> list[str]:
        """p50, p90, p99, max as table cells."""
        return [ms(self.p50), ms(self.p90), ms(self.p99), ms(self.max)]


def ms(value: float) -> str:
    """Milliseconds for a table cell."""
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def rate(value: float) -> str:
    """A per-second figure for a table cell."""
    return "-" if math.isnan(value) else f"{value:,.0f}"


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, nan when either is missing."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Prints a plain-text table (first column left-aligned, the others right-aligned)."""
    body = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(f"\n{title}")
    print(line(list(headers)))
    print("  ".join("-" * w for w in widths))
    for row in body:
        print(line(row))
    print(flush=True)


def machine_line() -> str:
    """One line describing where the figures were taken."""
    try:
        load = "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load ?"
    return (
        f"{platform.node()} | {os.cpu_count()} cpus | Python {platform.python_version()} | {load}"
    )


class _DiscardingExporter(SpanExporter):
    """Accepts spans and drops them: the cost of span creation and batching stays, export goes."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def install_production_tracing(service_name: str, *, sqlalchemy: bool = True) -> TracerProvider:
    """A real SDK tracer provider with a batch processor (export discarded), plus the SQLAlchemy
    instrumentation that :func:`plinth_common.telemetry.setup_telemetry` installs: spans are
    created, sampled and batched as in a service whose OTLP collector is configured.

    Call before any engine is created (the SQLAlchemy instrumentation hooks engine creation).
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(
        BatchSpanProcessor(_DiscardingExporter(), schedule_delay_millis=200)
    )
    trace.set_tracer_provider(provider)
    if sqlalchemy:
        from plinth_common.telemetry import instrument_sqlalchemy

        instrument_sqlalchemy()
    return provider


class Pacer:
    """Yields at a fixed offered rate (catching up without sleeping when behind).

    Args:
        per_second: the offered rate.
    """

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self.start = time.perf_counter()
        self.count = 0

    async def next(self) -> None:
        """Waits for the next slot."""
        target = self.start + self.count * self.interval
        self.count += 1
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    def achieved(self) -> float:
        """The rate actually offered so far."""
        elapsed = time.perf_counter() - self.start
        return self.count / elapsed if elapsed > 0 else math.nan


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.005
) -> bool:
    """Polls ``predicate``; True once it holds, False after ``timeout`` seconds."""
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(interval)
    return True
