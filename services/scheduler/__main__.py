"""Entry point: ``python -m services.scheduler``."""

from plinth_common.entrypoint import main
from services.scheduler.app import SchedulerApp, SchedulerSettings

if __name__ == "__main__":
    main("scheduler", lambda: SchedulerApp(SchedulerSettings.from_env()))
