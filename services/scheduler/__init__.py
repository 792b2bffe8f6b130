"""The scheduler service: training jobs, their queue and their execution."""
