"""Hot registry reads through Plinth versus MLflow's own client on the same store.

Starts an embedded nats-server and two registry processes (``python -m services.registry``,
tracing on as in production, exporting nothing): the first launches the MLflow server (SQLite,
artifact proxy) and keeps its read cache (default TTL); the second uses the same MLflow
database with the cache off (``PLINTH_REGISTRY_CACHE_TTL_S=0``), i.e. a plain read-through.
Logs one run with a model through the tracking server, registers it under 30 models of three
teams and points each model's ``production`` alias at it. Then measures, one call at a time:

- ``GetModelVersionByAlias`` (rotating over the 30 models) through Plinth's gRPC, against
  ``MlflowClient.get_model_version_by_alias`` with a SQL tracking URI (in this process, on the
  same SQLite file: MLflow used in-process, without the HTTP server, DESIGN §7);
- ``SearchModels(team=..., page_size=20)`` against ``MlflowClient.search_registered_models``
  with the same filter.

Plinth's answer carries more than MLflow's single call: the owning team (a registered-model
tag) and the run's metrics, i.e. three MLflow reads when not cached. Paths alternate in rounds
so that drift in the machine's load hits all alike; each measured batch follows one unmeasured
pass over the keys it reads (hot reads, as a service re-reading the same aliases would see).

    python -m bench.registry_reads           # ~1 minute
    python -m bench.registry_reads --quick   # ~35 s smoke run

Prints figures and ratios; never asserts. Target: Plinth no slower than MLflow direct (p50).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Latency, machine_line, print_table, ratio
from plinth.registry.v1 import registry_pb2 as pb
from plinth.registry.v1 import registry_pb2_grpc
from plinth_common.devstack import LocalPlatform, PlatformConfig
from plinth_common.net import free_tcp_port

TEAMS = ("team-a", "team-b", "team-c")
MODELS_PER_TEAM = 10
PATHS = ("mlflow direct", "plinth cached", "plinth read-through")


@dataclass(frozen=True)
class Options:
    rounds: int
    calls_per_round: int


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)

    @property
    def latency(self) -> Latency:
        return Latency.of_seconds(self.seconds)


def log_model_run(tracking_uri: str, workdir: Path) -> str:
    """One finished run with metrics and an MLflow LoggedModel named ``model``, logged through the
    tracking server as a job would; returns the run id."""
    import mlflow.sklearn
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput, Metric
    from sklearn.linear_model import Ridge

    from plinth_common.mlflow_client import skip_feast_mlflow_header_provider

    skip_feast_mlflow_header_provider()  # MLflow's first HTTP call would import Feast (5-12 s)
    x = np.arange(30, dtype=float).reshape(10, 3)
    model_dir = workdir / "model"
    mlflow.sklearn.save_model(
        Ridge().fit(x, x.sum(axis=1)),
        str(model_dir),
        serialization_format="cloudpickle",
        pip_requirements=["scikit-learn"],
    )
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment("bench-registry-reads")
    run_id = client.create_run(experiment_id).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("rmse", 55.0, now, 0), Metric("r2", 0.42, now, 0)])
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    client.log_model_artifacts(logged.model_id, str(model_dir))
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, 0)])
    client.set_terminated(run_id)
    return run_id


async def timed(samples: Samples, call: Callable[[], Awaitable[Any]], n: int) -> None:
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.seconds.append(time.perf_counter() - started)


def timed_sync(samples: Samples, call: Callable[[], Any], n: int) -> None:
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.seconds.append(time.perf_counter() - started)


class Rotation:
    """Cycles through values, one per call."""

    def __init__(self, values: list[Any]) -> None:
        self._values = values
        self._i = 0

    def next(self) -> Any:
        value = self._values[self._i % len(self._values)]
        self._i += 1
        return value


async def run(opts: Options) -> dict[str, dict[str, Samples]]:
    results: dict[str, dict[str, Samples]] = {
        op: {p: Samples() for p in PATHS} for op in ("GetModelVersionByAlias", "SearchModels")
    }
    with tempfile.TemporaryDirectory(prefix="plinth-bench-registry-") as tmp:
        root = Path(tmp)
        env = {"OTEL_TRACES_EXPORTER": "none"}
        cached = LocalPlatform(
            PlatformConfig.ephemeral(root / "cached", services=("registry",), env=env)
        )
        store_uri = f"sqlite:///{root / 'cached' / 'mlflow' / 'mlflow.db'}"
        through: LocalPlatform | None = None
        try:
            t0 = time.perf_counter()
            through = LocalPlatform(
                PlatformConfig(
                    data_dir=root / "through",
                    nats_url=f"nats://127.0.0.1:{cached.config.nats_port}",
                    nats_port=0,
                    ports={"registry": free_tcp_port()},
                    mlflow_port=cached.config.mlflow_port,
                    gateway_http_port=free_tcp_port(),
                    services=("registry",),
                    env={
                        **env,
                        "PLINTH_MLFLOW_URL": cached.mlflow_url,
                        "PLINTH_MLFLOW_BACKEND_STORE_URI": store_uri,
                        "PLINTH_REGISTRY_CACHE_TTL_S": "0",
                        "PLINTH_REGISTRY_FACTS_TTL_S": "0",
                    },
                )
            )
            # Both at once: the second waits for the first's MLflow (and NATS) by itself.
            await asyncio.gather(cached.start(timeout=180), through.start(timeout=180))
            print(
                f"MLflow {cached.mlflow_url} and two registries up in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            await measure(opts, results, cached, through, store_uri, root)
        finally:
            if through is not None:
                await through.stop()
            await cached.stop()
    return results


async def measure(
    opts: Options,
    results: dict[str, dict[str, Samples]],
    cached: LocalPlatform,
    through: LocalPlatform,
    store_uri: str,
    root: Path,
) -> None:
    from mlflow import MlflowClient

    # The tracking server runs MLflow's basic-auth app: log the seed run as its admin.
    user, password = cached.mlflow_admin_credentials
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    run_id = await asyncio.to_thread(log_model_run, cached.mlflow_url, root)
    channels = {
        "plinth cached": cached.service_channel("registry"),
        "plinth read-through": through.service_channel("registry"),
    }
    try:
        stubs = {name: registry_pb2_grpc.RegistryServiceStub(ch) for name, ch in channels.items()}
        seeding = stubs["plinth cached"]
        names = [f"bench-{team}-{i:02d}" for team in TEAMS for i in range(MODELS_PER_TEAM)]
        t0 = time.perf_counter()
        for name in names:
            team = name.rsplit("-", 1)[0].removeprefix("bench-")
            await seeding.CreateModelVersion(
                pb.CreateModelVersionRequest(name=name, team=team, run_id=run_id), timeout=30
            )
            await seeding.SetAlias(
                pb.SetAliasRequest(name=name, alias="production", version="1"), timeout=30
            )
        print(
            f"registered {len(names)} models in {time.perf_counter() - t0:.1f} s; measuring",
            flush=True,
        )

        client = MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
        client.search_registered_models(max_results=1)  # build the stores before timing
        alias_names, teams = Rotation(list(names)), Rotation(list(TEAMS))

        def direct_alias() -> Any:
            return client.get_model_version_by_alias(alias_names.next(), "production")

        def direct_search() -> Any:
            return client.search_registered_models(
                filter_string=f"tags.`plinth.team` = '{teams.next()}'", max_results=20
            )

        def plinth_alias(
            stub: registry_pb2_grpc.RegistryServiceStub,
        ) -> Callable[[], Awaitable[Any]]:
            return lambda: stub.GetModelVersionByAlias(
                pb.GetModelVersionByAliasRequest(name=alias_names.next(), alias="production"),
                timeout=10,
            )

        def plinth_search(
            stub: registry_pb2_grpc.RegistryServiceStub,
        ) -> Callable[[], Awaitable[Any]]:
            return lambda: stub.SearchModels(
                pb.SearchModelsRequest(team=teams.next(), page_size=20), timeout=10
            )

        # Same answers first: Plinth's version is MLflow's, with the team and metrics added.
        direct = direct_alias()
        via = await stubs["plinth cached"].GetModelVersionByAlias(
            pb.GetModelVersionByAliasRequest(name=direct.name, alias="production")
        )
        assert (via.name, via.version, via.source) == (
            direct.name,
            str(direct.version),
            direct.source,
        )

        # Hot reads: each batch follows one unmeasured pass over every key it will read (for
        # every path alike), as a service re-reading the same aliases and queries would.
        for _ in range(opts.rounds):
            for path in PATHS:
                if path == "mlflow direct":
                    timed_sync(Samples(), direct_alias, len(names))
                    timed_sync(
                        results["GetModelVersionByAlias"][path], direct_alias, opts.calls_per_round
                    )
                    timed_sync(Samples(), direct_search, len(TEAMS))
                    timed_sync(results["SearchModels"][path], direct_search, opts.calls_per_round)
                else:
                    await timed(Samples(), plinth_alias(stubs[path]), len(names))
                    await timed(
                        results["GetModelVersionByAlias"][path],
                        plinth_alias(stubs[path]),
                        opts.calls_per_round,
                    )
                    await timed(Samples(), plinth_search(stubs[path]), len(TEAMS))
                    await timed(
                        results["SearchModels"][path],
                        plinth_search(stubs[path]),
                        opts.calls_per_round,
                    )
    finally:
        for channel in channels.values():
            await channel.close()


def report(results: dict[str, dict[str, Samples]], opts: Options) -> None:
    rows = []
    for operation, by_path in results.items():
        for path, samples in by_path.items():
            lat = samples.latency
            rows.append([f"{operation} / {path}", lat.n, *lat.cells()])
    print_table(
        f"Latency, one call at a time ({opts.rounds} alternating rounds of {opts.calls_per_round} calls per path; ms)",
        ["operation / path", "n", "p50", "p90", "p99", "max"],
        rows,
    )
    ratio_rows = []
    for operation, by_path in results.items():
        direct = by_path["mlflow direct"].latency
        for path in ("plinth cached", "plinth read-through"):
            lat = by_path[path].latency
            p50 = ratio(lat.p50, direct.p50)
            verdict = ("met" if p50 <= 1.0 else "MISSED") if path == "plinth cached" else ""
            ratio_rows.append(
                [
                    f"{operation}: {path} / direct",
                    f"{p50:.2f}x",
                    f"{ratio(lat.p99, direct.p99):.2f}x",
                    "<= 1.00x p50" if verdict else "",
                    verdict,
                ]
            )
    print_table(
        "Ratios (Plinth / MLflow direct; below 1 is faster)",
        ["measure", "p50", "p99", "target", ""],
        ratio_rows,
    )
    print(
        "Plinth answers with the owning team and the run's metrics (three MLflow reads when not cached);\n"
        "the cached registry serves hot reads from memory for PLINTH_REGISTRY_CACHE_TTL_S (default 2 s),\n"
        "dropped at once by its own writes.",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (~35 s)")
    args = parser.parse_args()
    opts = (
        Options(rounds=2, calls_per_round=25)
        if args.quick
        else Options(rounds=3, calls_per_round=60)
    )
    print(machine_line(), flush=True)
    results = asyncio.run(run(opts))
    report(results, opts)


if __name__ == "__main__":
    main()
