"""The scheduler's queues: ``plinth.queues``.

Anyone may read the queues of their teams (usage against quota, and each pending job's
position, reason and estimated start); the configuration of flavors, queues, cohorts, quotas and
priority classes is the platform admin's (one document, applied as a whole).

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     for job in plinth.queues.get(team="vision").pending:
    ...         print(job.job_id, job.info.position_in_queue, job.info.reason)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth_sdk.models import QueueConfigInfo, QueueStatus
from plinth_sdk.transport import Transport

__all__ = ["QueuesAPI"]


class QueuesAPI:
    """The scheduler's queues: ``plinth.queues``.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(scheduler_pb2_grpc.SchedulerServiceStub)

    def get(self, *, team: str | None = None) -> QueueStatus:
        """The queues the caller may see and their pending jobs, in admission order.

        Args:
            team: Only this team's queue; None for every queue of the caller's teams (an
                admin: every queue).

        Raises:
            NotFound: the team does not exist or the caller is not a member.
        """
        request = scheduler_pb2.GetQueueRequest(team=team or "")
        return QueueStatus.from_proto(self._transport.unary(self._stub.GetQueue, request))

    def apply(self, document: str | Mapping[str, Any], *, dry_run: bool = False) -> QueueConfigInfo:
        """Replaces the queue configuration (admins), live; see the README for the format.

        Args:
            document: The YAML or JSON text, or the document as a mapping.
            dry_run: Only validate; nothing changes.

        Returns:
            The configuration now in force (after a dry run: as it would be), with warnings.

        Raises:
            InvalidArgument: the document is refused as a whole; ``field_violations`` lists
                every problem (the previous configuration stays in force).
            PermissionDenied: the caller is not an admin.
        """
        text = document if isinstance(document, str) else json.dumps(dict(document))
        request = scheduler_pb2.ApplyQueueConfigRequest(document=text, dry_run=dry_run)
        return QueueConfigInfo.from_proto(
            self._transport.unary(self._stub.ApplyQueueConfig, request)
        )

    def config(self) -> QueueConfigInfo:
        """The configuration in force (admins); version 0 is the built-in default."""
        request = scheduler_pb2.GetQueueConfigRequest()
        return QueueConfigInfo.from_proto(self._transport.unary(self._stub.GetQueueConfig, request))
