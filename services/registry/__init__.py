"""The registry service: runs, registered models, versions, aliases and promotions, on MLflow."""
