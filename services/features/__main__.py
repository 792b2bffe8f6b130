"""Entry point: ``python -m services.features``."""

from plinth_common.entrypoint import main
from services.features.app import FeaturesApp, FeaturesSettings

if __name__ == "__main__":
    main("features", lambda: FeaturesApp(FeaturesSettings.from_env()))
