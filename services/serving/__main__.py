"""Entry point: ``python -m services.serving``."""

from plinth_common.entrypoint import main
from services.serving.app import ServingApp, ServingSettings

if __name__ == "__main__":
    main("serving", lambda: ServingApp(ServingSettings.from_env()))
