"""Deterministic data for the example driver repository, and the files to apply.

    python -m examples.feature_repo.generate_data [<feast-repository>/data]

writes ``driver_stats.parquet``: one row per driver and hour (``driver_id``, ``event_timestamp``,
``created``, ``conv_rate``, ``acc_rate``, ``avg_daily_trips``), from a fixed seed, so every run
produces the same values. Nothing is downloaded. Without a folder, the data goes where the
features service started with the same environment reads it: ``$PLINTH_FEAST_REPO/data``, by
default ``$PLINTH_DATA_DIR/feast/data``.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

REPO_DIR = Path(__file__).resolve().parent
DEFINITION_FILES = ("driver_repo.py",)
PARQUET_NAME = "driver_stats.parquet"
FIRST_DRIVER_ID = 1001
DEFAULT_DRIVERS = 200
DEFAULT_HOURS = 48
DEFAULT_START = datetime(2024, 1, 1, tzinfo=UTC)
DEFAULT_SEED = 20240101


def definition_files() -> dict[str, bytes]:
    """The repository's Feast definition files, as ``ApplyRepository`` takes them."""
    return {name: (REPO_DIR / name).read_bytes() for name in DEFINITION_FILES}


def generate(
    data_dir: Path,
    *,
    drivers: int = DEFAULT_DRIVERS,
    hours: int = DEFAULT_HOURS,
    start: datetime = DEFAULT_START,
    seed: int = DEFAULT_SEED,
) -> pd.DataFrame:
    """Writes ``data_dir/driver_stats.parquet`` and returns the rows written.

    Args:
        data_dir: the Feast repository's ``data`` folder (created if missing).
        drivers: number of drivers, ids from 1001 upwards.
        hours: hourly rows per driver, from ``start``.
        start: timestamp of the first row (timezone-aware).
        seed: random seed; the same arguments always give the same file.

    Returns:
        The table, sorted by driver and time.
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(FIRST_DRIVER_ID, FIRST_DRIVER_ID + drivers, dtype=np.int64), hours)
    stamps = pd.date_range(start, periods=hours, freq="h", tz="UTC")
    event_ts = np.tile(stamps.values, drivers)
    frame = pd.DataFrame(
        {
            "driver_id": ids,
            "event_timestamp": pd.to_datetime(event_ts, utc=True),
            "conv_rate": rng.random(drivers * hours).astype(np.float32),
            "acc_rate": rng.random(drivers * hours).astype(np.float32),
            "avg_daily_trips": rng.integers(0, 1000, drivers * hours, dtype=np.int64),
        }
    )
    # Rows are recorded a little after the hour they describe.
    frame["created"] = frame["event_timestamp"] + timedelta(minutes=5)
    data_dir.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(data_dir / PARQUET_NAME, index=False)
    return frame


def service_data_dir() -> Path:
    """The data folder of the features service's Feast repository, as its settings resolve it."""
    from services.features.app import FeaturesSettings

    return FeaturesSettings.from_env().feast.repo_path / "data"


def main() -> None:
    """Command line: writes the Parquet file into the given folder (or the service's)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "data_dir",
        type=Path,
        nargs="?",
        help="the Feast repository's data folder (default: the features service's, which "
        "follows PLINTH_FEAST_REPO and PLINTH_DATA_DIR)",
    )
    parser.add_argument("--drivers", type=int, default=DEFAULT_DRIVERS)
    parser.add_argument("--hours", type=int, default=DEFAULT_HOURS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    data_dir = args.data_dir or service_data_dir()
    frame = generate(data_dir, drivers=args.drivers, hours=args.hours, seed=args.seed)
    print(f"wrote {len(frame)} rows to {data_dir / PARQUET_NAME}")


if __name__ == "__main__":
    main()
