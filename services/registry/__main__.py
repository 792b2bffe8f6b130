"""Entry point: ``python -m services.registry``."""

from plinth_common.entrypoint import main
from services.registry.app import RegistryApp, RegistrySettings

if __name__ == "__main__":
    main("registry", lambda: RegistryApp(RegistrySettings.from_env()))
