"""The serving service: deployments of registered models on Triton Inference Server."""
