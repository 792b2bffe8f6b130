"""Feature repositories, materialization and online/offline retrieval: ``plinth.features``.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     plinth.features.apply("examples/feature_repo")
    ...     plinth.features.materialize_incremental()
    ...     rows = plinth.features.online(
    ...         ["driver_stats:conv_rate"], [{"driver_id": 1001}, {"driver_id": 1002}]
    ...     )
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from plinth.features.v1 import features_pb2, features_pb2_grpc
from plinth_sdk.models import (
    AppliedRepository,
    FeatureView,
    Materialization,
    OnlineRow,
    online_rows_from_proto,
    plain_row,
    to_struct,
)
from plinth_sdk.transport import Transport

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["EVENT_TIMESTAMP", "FeaturesAPI", "read_repository"]

EVENT_TIMESTAMP = "event_timestamp"
# Materialization and point-in-time joins take longer than an ordinary call.
_LONG_TIMEOUT = 600.0
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "venv"})
_MAX_REPOSITORY_BYTES = 3 * 2**20  # under gRPC's default 4 MiB message limit


class FeaturesAPI:
    """Feature views and their values: ``plinth.features``.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(features_pb2_grpc.FeaturesServiceStub)

    def apply(self, path: str | os.PathLike[str]) -> AppliedRepository:
        """Sends a feature repository's Python files to the features service, which applies
        them (like ``feast apply``).

        Args:
            path: The repository folder; its ``*.py`` files (sub-folders included; hidden
                names, ``__pycache__`` and what ``.feastignore`` lists left out) are sent by
                relative path. The service applies them as ``feast apply`` does: objects the
                files no longer define are deleted.

        Returns:
            The entities and feature views the repository defines.

        Raises:
            ValueError: the folder does not exist, holds no Python files, or is too large.
            InvalidArgument: the service could not apply the definitions.
        """
        files = read_repository(path)
        request = features_pb2.ApplyRepositoryRequest(files=files)
        response = self._transport.unary(
            self._stub.ApplyRepository, request, timeout=max(self._transport.timeout, 120.0)
        )
        return AppliedRepository.from_proto(response)

    def list_views(self) -> builtins.list[FeatureView]:
        """Returns the feature views the service knows."""
        response = self._transport.unary(
            self._stub.ListFeatureViews, features_pb2.ListFeatureViewsRequest()
        )
        return [FeatureView.from_proto(view) for view in response.feature_views]

    def materialize(
        self,
        start: datetime,
        end: datetime | None = None,
        *,
        views: Iterable[str] = (),
        timeout: float = _LONG_TIMEOUT,
    ) -> Materialization:
        """Loads feature values with event times in ``[start, end]`` into the online store.

        Args:
            start: Earliest event time; a naive datetime is taken as UTC.
            end: Latest event time; now when None.
            views: Only these feature views; empty for all.
            timeout: Seconds to wait for the service.
        """
        request = features_pb2.MaterializeRequest(
            feature_views=builtins.list(views),
            start_time=_timestamp(start),
            end_time=_timestamp(end or _now()),
        )
        response = self._transport.unary(self._stub.Materialize, request, timeout=timeout)
        return Materialization.from_proto(response)

    def materialize_incremental(
        self,
        end: datetime | None = None,
        *,
        views: Iterable[str] = (),
        timeout: float = _LONG_TIMEOUT,
    ) -> Materialization:
        """Loads what is new since each view's last materialization, up to ``end``.

        Args:
            end: Latest event time; now when None. A naive datetime is taken as UTC.
            views: Only these feature views; empty for all.
            timeout: Seconds to wait for the service.
        """
        request = features_pb2.MaterializeIncrementalRequest(
            feature_views=builtins.list(views), end_time=_timestamp(end or _now())
        )
        response = self._transport.unary(
            self._stub.MaterializeIncremental, request, timeout=timeout
        )
        return Materialization.from_proto(response)

    def online(
        self, features: Sequence[str], entity_rows: Sequence[Mapping[str, Any]]
    ) -> builtins.list[OnlineRow]:
        """Reads feature values from the online store.

        Args:
            features: ``"view:feature"`` references.
            entity_rows: One mapping of entity key to value per row, e.g.
                ``[{"driver_id": 1001}, {"driver_id": 1002}]``.

        Returns:
            One row per entity row, in order, with each value and its status.

        Raises:
            ValueError: ``features`` is a bare string, or an entity value cannot be sent.
            InvalidArgument: the service does not know a feature or an entity key.
        """
        if isinstance(features, str):
            raise ValueError("features must be a sequence of 'view:feature' strings")
        rows = [plain_row(row) for row in entity_rows]
        request = features_pb2.GetOnlineFeaturesRequest(
            features=builtins.list(features), entity_rows=[to_struct(row) for row in rows]
        )
        response = self._transport.unary(self._stub.GetOnlineFeatures, request)
        return online_rows_from_proto(response, rows)

    def push(
        self, push_source: str, rows: Sequence[Mapping[str, Any]], *, to_offline: bool = False
    ) -> int:
        """Writes rows to a push source (online store; also offline when ``to_offline``).

        Returns:
            The number of rows the service wrote.
        """
        request = features_pb2.PushFeaturesRequest(
            push_source=push_source,
            rows=[to_struct(row) for row in rows],
            to_offline=to_offline,
        )
        return int(self._transport.unary(self._stub.PushFeatures, request).rows)

    def historical(
        self,
        features: Sequence[str],
        entity_df: pd.DataFrame,
        *,
        full_feature_names: bool = False,
        timeout: float = _LONG_TIMEOUT,
    ) -> pd.DataFrame:
        """Point-in-time correct feature values for training, from the offline store.

        Args:
            features: ``"view:feature"`` references.
            entity_df: Entity keys and an ``event_timestamp`` column, one row per example.
            full_feature_names: Name the feature columns ``view__feature`` instead of
                ``feature`` (needed when two views share a feature name).
            timeout: Seconds to wait for the service.

        Returns:
            ``entity_df``'s columns plus one column per feature.

        Raises:
            ValueError: ``entity_df`` has no ``event_timestamp`` column.
        """
        import pyarrow as pa

        if isinstance(features, str):
            raise ValueError("features must be a sequence of 'view:feature' strings")
        if EVENT_TIMESTAMP not in entity_df.columns:
            raise ValueError(f"entity_df needs an {EVENT_TIMESTAMP!r} column")
        table = pa.Table.from_pandas(entity_df, preserve_index=False)
        request = features_pb2.GetHistoricalFeaturesRequest(
            features=builtins.list(features),
            entity_table=_arrow_ipc_bytes(table),
            format=features_pb2.TABLE_FORMAT_ARROW_IPC,
            full_feature_names=full_feature_names,
        )
        response = self._transport.unary(self._stub.GetHistoricalFeatures, request, timeout=timeout)
        return _read_table(response.table, response.format).to_pandas()


def read_repository(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Reads a feature repository's Python files: relative POSIX path -> content.

    Raises:
        ValueError: the folder does not exist, holds no Python files, or is too large.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"feature repository {str(root)!r} is not a folder")
    ignored = _feastignored(root)
    files: dict[str, bytes] = {}
    total = 0
    for file in sorted(root.rglob("*.py")):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if any(part in _SKIPPED_DIRS for part in relative.parts[:-1]):
            continue
        if not file.is_file() or file.resolve() in ignored:
            continue
        content = file.read_bytes()
        total += len(content)
        files[relative.as_posix()] = content
    if not files:
        raise ValueError(f"feature repository {str(root)!r} holds no *.py files")
    if total > _MAX_REPOSITORY_BYTES:
        raise ValueError(
            f"feature repository {str(root)!r} is too large to send "
            f"({total} bytes of Python, at most {_MAX_REPOSITORY_BYTES})"
        )
    return files


def _feastignored(root: Path) -> set[Path]:
    """The Python files ``.feastignore`` excludes, with Feast's rules: one glob pattern per
    line relative to the repository, ``#`` starts a comment, a folder excludes its contents.
    """
    ignore_file = root / ".feastignore"
    if not ignore_file.is_file():
        return set()
    ignored: set[Path] = set()
    for line in ignore_file.read_text(encoding="utf-8").splitlines():
        pattern = line.split("#", 1)[0].strip()
        if not pattern:
            continue
        try:
            matches = list(root.glob(pattern))
        except (ValueError, NotImplementedError):  # absolute or otherwise unusable patterns
            continue
        for match in matches:
            if match.is_file():
                ignored.add(match.resolve())
            elif match.is_dir():
                ignored.update(p.resolve() for p in match.rglob("*.py") if p.is_file())
    return ignored


def _now() -> datetime:
    return datetime.now(UTC)


def _timestamp(value: datetime) -> Timestamp:
    if not isinstance(value, datetime):
        raise ValueError(f"expected a datetime, got {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


def _arrow_ipc_bytes(table: Any) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _read_table(data: bytes, table_format: int) -> Any:
    import pyarrow as pa

    if not data:
        return pa.table({})
    if table_format == features_pb2.TABLE_FORMAT_PARQUET:
        import pyarrow.parquet as pq

        return pq.read_table(pa.BufferReader(data))
    with pa.ipc.open_stream(pa.BufferReader(data)) as reader:
        return reader.read_all()
