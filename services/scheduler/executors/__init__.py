"""Executors for cluster engines, behind :class:`services.scheduler.executor.Executor`.

- :class:`~services.scheduler.executors.ray.RayExecutor`: Ray's job REST API.
- :class:`~services.scheduler.executors.slurm.SlurmExecutor`: ``sbatch``/``squeue``/``scontrol``.
- :class:`~services.scheduler.executors.router.FlavorRouter`: one executor that hands each job
  to the executor its flavor names.

Nothing is imported here, so that importing one executor does not import the others.
"""
