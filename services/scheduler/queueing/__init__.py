"""Admission of jobs to cluster queues: the model, its configuration, the engine."""
