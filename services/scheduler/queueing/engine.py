"""Kueue-style admission: quotas with borrowing and lending in cohorts, priorities, weighted
dominant-resource fair share, preemption, EASY backfill and gang admission. Pure: no I/O; the
scheduler service feeds it workloads and acts on its decisions.

The rules (the README quotes them):

1. **Order within a cluster queue**: priority (higher first), then ``order`` (smaller first:
   submission time, kept when a job is preempted; the retry time for a retried failure), then
   job id.
2. **Quota** per (queue, flavor, resource): ``guaranteed = nominal - lendable`` where
   ``lendable`` is the lending limit (all of nominal when unset). A queue may hold ``u + x`` if
   ``u + x <= nominal + borrowing_limit`` (no limit set: as much as the cohort lends; no cohort:
   ``u + x <= nominal``) and its cohort still holds: the sum over the cohort's queues of
   ``max(0, u_i - guaranteed_i)`` stays within the sum of their ``lendable_i``. The cohort is the
   root of the cohort tree: all queues under one root share. Never exceeded.
3. **Gang**: a job's ``replicas x request`` must fit in ONE flavor, all or nothing; nothing is
   held while it waits.
4. **Flavor**: the queue's flavors in order, the first where the job fits without borrowing; if
   none, the first where it fits by borrowing. A flavor without quota for a requested resource
   cannot hold the job.
5. **Fair share across a cohort**: first, every queue's jobs that fit its own nominal quota (from
   the front of the queue, Kueue's order: nobody borrows what a lender's next job would take
   back by preemption); then the next candidate comes from the queue whose weighted dominant
   share, ``max over resources r of (usage_r / cohort nominal total_r) / fair_weight``, would be
   the lowest with the candidate admitted (ties: the candidates' priority, then order, then
   queue name). Queues without a cohort are independent.
6. **Head of line and EASY backfill**, per queue: the first job of a queue that does not fit
   (its head) gets a reservation at its estimated start (when enough running jobs end by their
   expected run time). A later job of that queue is admitted now only if it fits now AND either
   it ends (by its expected run time) no later than the head's estimated start, or it fits
   beside the head's reservation at that time. A job with no expected run time backfills only
   beside the reservation; a head with no estimate lets nothing past. The scan past a blocked
   head stops after ``backfill_depth`` jobs per cycle (SLURM's ``bf_max_job_part``, for a
   bounded cycle).
7. **Backoff**: a job whose ``not_before`` is in the future is skipped (it blocks nobody).
8. **Preemption**, only for a queue's head, only when it cannot be admitted otherwise, and only
   if it then fits within its queue's NOMINAL quota (no borrowing by preemption):
   ``within_queue``: ``lower_priority`` takes admitted jobs of the same queue with strictly lower
   priority; ``any`` also those of equal priority that come later in queue order (so two jobs
   never preempt each other back and forth). ``reclaim_within_cohort``: jobs of OTHER queues of
   the cohort while those queues borrow (use more than their nominal quota of a resource the
   job needs in that flavor); ``lower_priority`` only lower-priority ones. Victims: other
   queues' borrowers first (the queue with the highest dominant share first), then by lowest
   priority, then most recently admitted; chosen greedily until the job fits, then every victim
   not needed is dropped. Never preempts if the job would still not fit; never picks a job that
   is already being preempted. The preemptor is not admitted in the same cycle: it waits
   ("waiting for N preempted jobs to stop") and, once its victims are removed, goes first in
   its cohort's next cycle.
9. **Determinism**: the same state and time give the same decisions.

**Estimates** (:meth:`QueueEngine.report`): a simulation per cohort from the usage once the
preemptions under way complete. Running jobs end at ``admitted_at + expected run time`` (now,
if overdue); pending jobs start in the order rules 1 and 5 give (no backfill assumed, so an
estimate errs late), each when it fits, and then end by their own expected run time. A job with
no expected run time never ends in the simulation: whoever waits for its capacity gets no
estimate, and the basis names that job (of another team: only its queue). Reasons are judged
against the usage the next cycle will see (the jobs that fit now taken first, in queue order).

The engine is incremental: usage per queue, flavor and cohort is kept as jobs are admitted and
removed; a cycle only looks at cohorts where something changed (a job arrived or ended, a
backoff expired); within a cycle a request shape that did not fit a queue is not tried again
(admissions only take capacity away).
"""

from __future__ import annotations

import functools
import heapq
import math
import re
from bisect import bisect_left, insort
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from plinth_common.errors import InvalidArgument
from plinth_common.names import shown
from services.scheduler.queueing.model import (
    RESOURCE_NAMES,
    Admission,
    ClusterQueue,
    PreemptionPolicy,
    QueueConfig,
    Workload,
)
from services.scheduler.queueing.quantity import amount, format_amount
from services.scheduler.queueing.report import (
    PendingWorkload,
    QueueReport,
    QueueStatus,
    ResourceUsage,
    plural,
)

__all__ = ["DEFAULT_BACKFILL_DEPTH", "Decisions", "Preemption", "QueueEngine", "preemptor_of"]

#: Jobs looked at past a blocked head, per queue and cycle.
DEFAULT_BACKFILL_DEPTH = 100

_R = range(len(RESOURCE_NAMES))
_EPS = 1e-6
_INF = math.inf
Vec = list[float]
Totals = tuple[float, ...]
_Key = tuple[int, float, str]  # (-priority, order, id): a queue's order


@dataclass(frozen=True)
class Preemption:
    """An admitted workload to stop so that ``preemptor_id`` can be admitted.

    ``reason`` is a sentence: "preempted by job j-abc (priority high 1000 > normal 500) in queue
    vision", or "reclaimed by queue nlp for job j-abc: it lends 4 cpu of flavor cpu to vision".
    """

    victim: Admission
    preemptor_id: str
    reason: str


@dataclass(frozen=True)
class Decisions:
    """What one cycle decided: admissions (already counted as admitted) and preemptions."""

    admit: list[Admission] = field(default_factory=list)
    preempt: list[Preemption] = field(default_factory=list)


@dataclass(slots=True)
class _Quota:
    """One flavor of one queue, as vectors over RESOURCE_NAMES."""

    flavor: str
    has: tuple[bool, ...]
    nominal: Totals
    limit: Totals  # the most the queue may hold (nominal + borrowing; nominal without cohort)
    guaranteed: Totals
    lendable: Totals
    borrowing_limit: tuple[float | None, ...]
    lending_limit: tuple[float | None, ...]


@dataclass(slots=True)
class _Pending:
    w: Workload
    key: _Key
    totals: Totals
    not_before: float  # timestamp, -inf for none
    runtime: float | None
    # The longest it may run: what backfill ahead of a blocked head goes by (not the estimate).
    bound: float | None = None


@dataclass(slots=True)
class _Held:
    adm: Admission
    queue: str
    flavor: str
    totals: Totals
    end: float | None  # expected end (timestamp), None when unknown
    key: _Key


@dataclass(slots=True)
class _Wait:
    """A preemptor waiting for its victims to stop."""

    victims: set[str]
    flavor: str


class _Queue:
    """A cluster queue's static quotas and live pending list."""

    __slots__ = (
        "admitted",
        "cq",
        "dirty",
        "entries",
        "floor",
        "fresh",
        "group",
        "keys",
        "last_head",
        "name",
        "priorities",
        "quota_of",
        "quotas",
        "shapes",
        "weight",
    )

    def __init__(self, cq: ClusterQueue, group: _Group) -> None:
        self.cq = cq
        self.name = cq.name
        self.group = group
        self.weight = cq.fair_weight
        cohort = bool(group.cohort)
        self.quotas: list[_Quota] = []
        for fq in cq.flavors:
            rq = [fq.resources.get(r) for r in RESOURCE_NAMES]
            nominal = tuple(q.nominal if q else 0.0 for q in rq)
            lendable = tuple(
                (q.nominal if q.lending_limit is None else q.lending_limit) if q and cohort else 0.0
                for q in rq
            )
            limit = tuple(
                0.0
                if q is None
                else q.nominal
                if not cohort
                else q.nominal + (_INF if q.borrowing_limit is None else q.borrowing_limit)
                for q in rq
            )
            self.quotas.append(
                _Quota(
                    flavor=fq.flavor,
                    has=tuple(q is not None for q in rq),
                    nominal=nominal,
                    limit=limit,
                    guaranteed=tuple(n - ln for n, ln in zip(nominal, lendable, strict=True)),
                    lendable=lendable,
                    borrowing_limit=tuple(q.borrowing_limit if q else None for q in rq),
                    lending_limit=tuple(q.lending_limit if q else None for q in rq),
                )
            )
        self.quota_of = {q.flavor: q for q in self.quotas}
        self.keys: list[_Key] = []  # pending, sorted
        self.entries: dict[str, _Pending] = {}
        self.shapes: dict[Totals, int] = {}  # pending request shapes and their counts
        self.floor: Totals | None = None  # cached least shape (see _floor)
        self.admitted: dict[str, _Held] = {}
        self.priorities: dict[int, int] = {}  # admitted jobs per priority value
        # Something that may let one of its jobs in: a new job, a head gone. Capacity freed
        # dirties the whole group instead (cohort members share it).
        self.dirty = True
        # Jobs queued since its last cycle, when nothing else changed (None: something did);
        # and the head that blocked it then: new jobs behind an unchanged head are all that
        # needs a look (as backfill), without freed capacity.
        self.fresh: list[_Pending] | None = None
        self.last_head: str | None = None


class _State:
    """Usage of one group: per (queue, flavor), per queue, and the cohort's borrowing per flavor."""

    __slots__ = ("borrowed", "qtotal", "usage")

    def __init__(
        self,
        usage: dict[tuple[str, str], Vec],
        qtotal: dict[str, Vec],
        borrowed: dict[str, Vec],
    ) -> None:
        self.usage = usage
        self.qtotal = qtotal
        self.borrowed = borrowed

    def copy(self) -> _State:
        return _State(
            {k: v[:] for k, v in self.usage.items()},
            {k: v[:] for k, v in self.qtotal.items()},
            {k: v[:] for k, v in self.borrowed.items()},
        )


class _Group:
    """A root cohort with its queues, or a queue without cohort on its own."""

    __slots__ = (
        "backoffs",
        "cohort",
        "dirty",
        "ends",
        "key",
        "lendable",
        "nominal_total",
        "queues",
        "quota_of",
        "state",
    )

    def __init__(self, key: str, cohort: str) -> None:
        self.key = key
        self.cohort = cohort  # the root cohort, '' for a lone queue
        self.queues: list[_Queue] = []
        self.lendable: dict[str, Vec] = {}
        self.nominal_total: Vec = [0.0] * len(RESOURCE_NAMES)
        self.state = _State({}, {}, {})
        self.ends: list[tuple[float, str]] = []  # (expected end, job id), sorted
        self.dirty = True
        self.backoffs: dict[str, float] = {}  # pending job id -> not before (timestamp)
        self.quota_of: dict[tuple[str, str], _Quota] = {}

    def finish(self) -> None:
        self.queues.sort(key=lambda q: q.name)
        for q in self.queues:
            self.state.qtotal[q.name] = [0.0] * len(RESOURCE_NAMES)
            for quota in q.quotas:
                self.state.usage[(q.name, quota.flavor)] = [0.0] * len(RESOURCE_NAMES)
                self.quota_of[(q.name, quota.flavor)] = quota
                for r in _R:
                    self.nominal_total[r] += quota.nominal[r]
                if self.cohort:
                    lend = self.lendable.setdefault(quota.flavor, [0.0] * len(RESOURCE_NAMES))
                    self.state.borrowed.setdefault(quota.flavor, [0.0] * len(RESOURCE_NAMES))
                    for r in _R:
                        lend[r] += quota.lendable[r]


def _fits(group: _Group, state: _State, q: _Queue, quota: _Quota, x: Totals, borrow: bool) -> bool:
    """Whether ``q`` may hold ``x`` more in ``quota``'s flavor (rule 2)."""
    # The hottest function of a cycle: the queue's limit first, for all three resources at
    # once, then the cohort's lending (unrolled: RESOURCE_NAMES has three names).
    u = state.usage[(q.name, quota.flavor)]
    cap = quota.limit if borrow else quota.nominal
    x0, x1, x2 = x
    if (
        (x0 > 0.0 and u[0] + x0 > cap[0] + _EPS)
        or (x1 > 0.0 and u[1] + x1 > cap[1] + _EPS)
        or (x2 > 0.0 and u[2] + x2 > cap[2] + _EPS)
    ):
        return False
    if not group.cohort:
        return True
    borrowed = state.borrowed[quota.flavor]
    lendable = group.lendable[quota.flavor]
    g = quota.guaranteed
    for r, xr in ((0, x0), (1, x1), (2, x2)):
        if xr <= 0.0:
            continue
        old = u[r]
        new = old + xr
        gr = g[r]
        if new <= gr:
            continue  # within what it does not lend: the cohort is not involved
        delta = (new - gr) - (old - gr if old > gr else 0.0)
        if borrowed[r] + delta > lendable[r] + _EPS:
            return False
    return True


def _add(group: _Group, state: _State, queue: str, flavor: str, x: Totals, sign: float) -> None:
    u = state.usage.get((queue, flavor))
    if u is None:  # a flavor the queue no longer has (an older configuration's admission)
        u = state.usage[(queue, flavor)] = [0.0] * len(RESOURCE_NAMES)
    total = state.qtotal.setdefault(queue, [0.0] * len(RESOURCE_NAMES))
    quota = group.quota_of.get((queue, flavor))
    borrowed = state.borrowed.get(flavor) if group.cohort and quota is not None else None
    for r in _R:
        xr = x[r]
        if not xr:
            continue
        old = u[r]
        new = old + sign * xr
        if -_EPS < new < _EPS:
            new = 0.0  # keep float drift from piling up across many admissions
        u[r] = new
        total[r] += sign * xr
        if borrowed is not None and quota is not None:
            g = quota.guaranteed[r]
            borrowed[r] += (new - g if new > g else 0.0) - (old - g if old > g else 0.0)


def _share(group: _Group, state: _State, q: _Queue, x: Totals | None = None) -> float:
    """The queue's weighted dominant share (rule 5), with ``x`` admitted when given."""
    total = state.qtotal[q.name]
    nominal = group.nominal_total
    best = 0.0
    for r in _R:
        if nominal[r] > 0.0:
            s = (total[r] + (x[r] if x is not None else 0.0)) / nominal[r]
            if s > best:
                best = s
    return best / q.weight


@dataclass(slots=True)
class _Reservation:
    """A blocked head's estimated start and the usage projected at that time (it included)."""

    head: str
    start: float | None
    state: _State | None


@dataclass(slots=True)
class _Scan:
    """A queue's walk within one cycle."""

    cursor: int = 0
    blocked: _Pending | None = None  # the head that did not fit
    waits: bool = False  # the head waits for preempted jobs to stop
    head: _Reservation | None = None  # its reservation, made when a backfill needs it
    scanned: int = 0
    failed: set[Totals] = field(default_factory=set)  # shapes that do not fit now
    beside_failed: set[Totals] = field(default_factory=set)  # nor beside the reservation
    until: float = -_INF  # the head's estimated start (+ tolerance) once reserved
    done: bool = False


_PREEMPTOR = re.compile(r"(?:preempted by job |for job )([^\s:()]+)")


def preemptor_of(reason: str) -> str:
    """The preemptor's job id in a :class:`Preemption`'s reason ('' if it names none)."""
    found = _PREEMPTOR.search(reason)
    return found.group(1) if found else ""


class QueueEngine:
    """Admission against one :class:`QueueConfig` (replace the engine to change the config).

    Args:
        config: the validated configuration.
        backfill_depth: jobs looked at past a blocked head per queue and cycle (rule 6).
    """

    def __init__(self, config: QueueConfig, *, backfill_depth: int = DEFAULT_BACKFILL_DEPTH):
        self.config = config
        self.backfill_depth = backfill_depth
        self._priority_names: dict[int, str] = {}
        for pc in sorted(config.priority_classes.values(), key=lambda p: p.name, reverse=True):
            self._priority_names[pc.value] = pc.name
        self._team_queue = {t: q.name for q in config.cluster_queues.values() for t in q.teams}
        self._build()

    # ------------------------------------------------------------------ state

    def _build(self) -> None:
        roots: dict[str, str] = {}

        def root(cohort: str) -> str:
            seen: set[str] = set()
            while cohort in self.config.cohorts and self.config.cohorts[cohort].parent:
                if cohort in seen:  # parse_config refuses cycles; stay total anyway
                    break
                seen.add(cohort)
                cohort = self.config.cohorts[cohort].parent
            return cohort

        self._groups: dict[str, _Group] = {}
        self._queues: dict[str, _Queue] = {}
        for cq in self.config.cluster_queues.values():
            cohort = roots.setdefault(cq.cohort, root(cq.cohort)) if cq.cohort else ""
            key = f"cohort/{cohort}" if cohort else f"queue/{cq.name}"
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(key, cohort)
            queue = _Queue(cq, group)
            group.queues.append(queue)
            self._queues[cq.name] = queue
        for group in self._groups.values():
            group.finish()
        self._group_order = sorted(self._groups.values(), key=lambda g: g.key)
        self._held: dict[str, _Held] = {}
        self._foreign: dict[str, _Held] = {}  # admitted to a queue the config does not have
        self._stranded: dict[str, Workload] = {}  # pending in a queue the config does not have
        self._waiting: dict[str, _Wait] = {}  # preemptor id -> victims not yet stopped
        self._preempting: dict[str, str] = {}  # victim id -> preemptor id
        self._where: dict[str, _Queue] = {}  # pending job id -> its queue
        # Per group, during its cycle: usage once the preemptions under way complete.
        self._claims: dict[str, _State | None] = {}

    def load(
        self,
        *,
        admitted: Iterable[Admission],
        pending: Iterable[Workload],
        stopping: Mapping[str, str] | None = None,
    ) -> None:
        """Replaces the whole state: what holds quota now, and what waits.

        Args:
            admitted: what holds quota.
            pending: what waits.
            stopping: preemptions under way (victim id -> preemptor id, '' if unknown; see
                :func:`preemptor_of`): the victims are not chosen again, and a preemptor still
                pending waits for them with its claim, as before the reload (a restart or a
                new configuration must not forget them and preempt more).
        """
        self._build()
        for adm in admitted:
            self._hold(adm)
        for w in pending:
            self.add_pending(w)
        for victim, preemptor in sorted((stopping or {}).items()):
            held = self._held.get(victim) or self._foreign.get(victim)
            if held is None:
                continue
            self._preempting[victim] = preemptor
            if preemptor in self._where:
                wait = self._waiting.setdefault(preemptor, _Wait(set(), held.flavor))
                wait.victims.add(victim)

    def _hold(self, adm: Admission) -> _Held:
        w = adm.workload
        known = self._held.get(w.id) or self._foreign.get(w.id)
        if known is not None:
            return known  # held once: a second admission of the same job would count it twice
        runtime = w.expected_runtime_s
        # Admitted to a queue the configuration no longer has: it still uses its flavor, so
        # it is charged to a queue that has that flavor (its team's now, else the first by
        # name); otherwise the capacity it holds would be handed out again.
        q = self._queues.get(w.queue) or self._charged_queue(w.team, adm.flavor)
        held = _Held(
            adm=adm,
            queue=q.name if q is not None else w.queue,
            flavor=adm.flavor,
            totals=_totals(w),
            end=None if runtime is None else adm.admitted_at.timestamp() + runtime,
            key=(-w.priority, w.order, w.id),
        )
        if q is None:
            self._foreign[w.id] = held  # a flavor no queue has: nobody can overcommit it
            return held
        group = q.group
        _add(group, group.state, q.name, adm.flavor, held.totals, 1.0)
        q.admitted[w.id] = held
        q.priorities[w.priority] = q.priorities.get(w.priority, 0) + 1
        self._held[w.id] = held
        if held.end is not None:
            insort(group.ends, (held.end, w.id))
        return held

    def _charged_queue(self, team: str, flavor: str) -> _Queue | None:
        """Where an admission of a vanished queue is counted: the team's queue now if it has
        the flavor, else the first queue (by name) that has it."""
        own = self._queues.get(self._team_queue.get(team) or self.config.default_queue or "")
        if own is not None and flavor in own.quota_of:
            return own
        return next(
            (self._queues[n] for n in sorted(self._queues) if flavor in self._queues[n].quota_of),
            None,
        )

    def add_pending(self, w: Workload) -> None:
        """Queues a workload (replacing a pending one of the same id).

        A job the engine holds (admitted) is not queued as well: it would be admitted twice
        and its quota counted twice. :meth:`remove` it first (requeued, not launched).
        """
        if w.id in self._held or w.id in self._foreign:
            return
        self._drop_pending(w.id, keep_wait=True)  # an update of a preemptor still waits
        q = self._queues.get(w.queue)
        if q is None:
            self._stranded[w.id] = w
            return
        entry = _Pending(
            w=w,
            key=(-w.priority, w.order, w.id),
            totals=_totals(w),
            not_before=w.not_before.timestamp() if w.not_before else -_INF,
            runtime=w.expected_runtime_s,
            bound=w.runtime_bound_s if w.runtime_bound_s is not None else w.expected_runtime_s,
        )
        insort(q.keys, entry.key)
        q.entries[w.id] = entry
        if entry.totals not in q.shapes:
            q.floor = None
        q.shapes[entry.totals] = q.shapes.get(entry.totals, 0) + 1
        self._where[w.id] = q
        if not q.dirty:
            q.fresh = []
        if q.fresh is not None:
            q.fresh.append(entry)
        q.dirty = True
        if entry.not_before > -_INF:
            q.group.backoffs[w.id] = entry.not_before

    def remove(self, job_id: str) -> None:
        """Forgets a job: finished, cancelled, or preempted and stopped (its quota is freed)."""
        held = self._held.pop(job_id, None)
        if held is not None:
            q = self._queues[held.queue]
            group = q.group
            _add(group, group.state, held.queue, held.flavor, held.totals, -1.0)
            del q.admitted[job_id]
            prio = held.adm.workload.priority
            if q.priorities[prio] > 1:
                q.priorities[prio] -= 1
            else:
                del q.priorities[prio]
            if held.end is not None:
                i = bisect_left(group.ends, (held.end, job_id))
                if i < len(group.ends) and group.ends[i] == (held.end, job_id):
                    del group.ends[i]
            group.dirty = True
        self._foreign.pop(job_id, None)
        preemptor = self._preempting.pop(job_id, None)
        if preemptor is not None and preemptor in self._waiting:
            self._waiting[preemptor].victims.discard(job_id)
        self._drop_pending(job_id)

    def _drop_pending(self, job_id: str, *, keep_wait: bool = False) -> None:
        self._stranded.pop(job_id, None)
        if not keep_wait:
            self._waiting.pop(job_id, None)
        q = self._where.pop(job_id, None)
        if q is None:
            return
        entry = q.entries.pop(job_id)
        del q.keys[bisect_left(q.keys, entry.key)]
        count = q.shapes[entry.totals] - 1
        if count:
            q.shapes[entry.totals] = count
        else:
            del q.shapes[entry.totals]
            q.floor = None
        q.group.backoffs.pop(job_id, None)
        q.dirty = True
        q.fresh = None

    # ------------------------------------------------------------------ lookups

    def queue_of(self, team: str) -> ClusterQueue:
        """The cluster queue a team's jobs go to.

        Raises:
            InvalidArgument: ``spec.team``: the team is in no queue and there is no default.
        """
        name = self._team_queue.get(team) or self.config.default_queue
        if not name:
            raise InvalidArgument(
                "spec.team",
                f"team {shown(team)} is in no cluster queue and the platform has no default "
                "queue; an admin adds the team to a queue (plinth admin queues apply)",
            )
        return self.config.cluster_queues[name]

    def admitted(self) -> list[Admission]:
        """Every admission holding quota, by job id."""
        return [self._held[k].adm for k in sorted(self._held)]

    def pending_ids(self) -> list[str]:
        """Every pending job id (stranded ones included), sorted."""
        return sorted([*self._where, *self._stranded])

    def preempting(self) -> dict[str, str]:
        """Victims being preempted and their preemptors (victim id -> preemptor id)."""
        return dict(self._preempting)

    def check_satisfiable(self, w: Workload) -> None:
        """Refuses a workload that no flavor of its queue could ever hold.

        Raises:
            InvalidArgument: naming ``spec.replicas``, ``spec.resources.<name>`` or
                ``spec.team`` (its queue does not exist).
        """
        q = self._queues.get(w.queue)
        if q is None:
            raise InvalidArgument("spec.team", f"no cluster queue {shown(w.queue)}")
        if w.replicas < 1:
            raise InvalidArgument("spec.replicas", f"must be at least 1, got {w.replicas}")
        for name, value in w.request.items():
            if name not in RESOURCE_NAMES:
                raise InvalidArgument(
                    f"spec.resources.{name}", "unknown resource; expected cpu, memory or gpu"
                )
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"spec.resources.{name}", f"must be >= 0, got {value}")
        totals = _totals(w)
        per_replica = tuple(float(w.request.get(r, 0.0)) for r in RESOURCE_NAMES)
        most = [self._most_ever(q, quota) for quota in q.quotas]

        def fits_some(x: Totals) -> bool:
            return any(all(x[r] <= m[r] + _EPS for r in _R) for m in most)

        if fits_some(totals):
            return
        if w.replicas > 1 and fits_some(per_replica):
            raise InvalidArgument(
                "spec.replicas",
                f"{w.replicas} replicas of {_describe(per_replica)} need "
                f"{_describe(totals)} in one flavor, more than any flavor of queue {q.name} "
                "can ever give (a gang is admitted whole, in one flavor)",
            )
        for r in _R:
            if totals[r] <= 0:
                continue
            best = max(
                ((m[r], quota.flavor) for m, quota in zip(most, q.quotas, strict=True)),
                key=lambda pair: pair[0],  # the first flavor of the most
                default=(0.0, ""),
            )
            if totals[r] > best[0] + _EPS:
                name = RESOURCE_NAMES[r]
                asked = (
                    f"{amount(name, per_replica[r])} {name} per replica x {w.replicas} replicas"
                    if w.replicas > 1
                    else format_amount(name, totals[r])
                )
                limit = (
                    f"at most {format_amount(name, best[0])} in flavor {best[1]}"
                    if best[0] > 0
                    else f"no flavor of it has any {name}"
                )
                raise InvalidArgument(
                    f"spec.resources.{name}",
                    f"{asked} exceeds what any flavor of queue {q.name} can ever give ({limit})",
                )
        raise InvalidArgument(
            "spec.resources",
            f"{_describe(totals)} together fit no single flavor of queue {q.name} (each "
            "flavor lacks one of them)",
        )

    def _most_ever(self, q: _Queue, quota: _Quota) -> list[float]:
        """The most ``q`` could ever hold in a flavor (everyone else idle)."""
        group = q.group
        out = []
        for r in _R:
            if not quota.has[r]:
                out.append(0.0)
            elif not group.cohort:
                out.append(quota.nominal[r])
            else:
                pool = group.lendable[quota.flavor][r]
                out.append(min(quota.limit[r], quota.guaranteed[r] + pool))
        return out

    # ------------------------------------------------------------------ admission

    def cycle(self, now: datetime) -> Decisions:
        """One admission cycle at ``now``: admits (they move to admitted) and preempts."""
        t = now.timestamp()
        decisions = Decisions()
        for group in self._group_order:
            for job_id, nb in group.backoffs.items():
                if nb <= t:  # a backoff over: its queue gets another look
                    self._where[job_id].dirty = True
                    self._where[job_id].fresh = None
            if group.dirty or any(q.dirty for q in group.queues):
                self._cycle_group(group, now, t, decisions)
        return decisions

    def _choose(
        self, group: _Group, state: _State, q: _Queue, x: Totals, also: _State | None = None
    ) -> _Quota | None:
        """The flavor ``x`` goes to (rule 4), or None; with ``also``, it must fit that too."""
        if not group.cohort:  # nothing to borrow: one pass
            for quota in q.quotas:
                if _fits(group, state, q, quota, x, False) and (
                    also is None or _fits(group, also, q, quota, x, False)
                ):
                    return quota
            return None
        borrowing: _Quota | None = None
        for quota in q.quotas:
            # Fitting within nominal implies fitting with borrowing: test the weaker first.
            if not _fits(group, state, q, quota, x, True) or (
                also is not None and not _fits(group, also, q, quota, x, True)
            ):
                continue
            if _fits(group, state, q, quota, x, False) and (
                also is None or _fits(group, also, q, quota, x, False)
            ):
                return quota
            if borrowing is None:
                borrowing = quota
        return borrowing

    def _cycle_group(self, group: _Group, now: datetime, t: float, out: Decisions) -> None:
        state = group.state
        admitted_now: set[str] = set()
        reservations: list[_Reservation] = []
        borrowed = False
        self._claims[group.key] = None

        def admit(q: _Queue, entry: _Pending, quota: _Quota) -> None:
            nonlocal borrowed
            adm = Admission(workload=entry.w, flavor=quota.flavor, admitted_at=now)
            held = self._hold(adm)
            admitted_now.add(entry.w.id)
            out.admit.append(adm)
            claims = self._claims[group.key]
            if claims is not None:
                _add(group, claims, q.name, quota.flavor, entry.totals, 1.0)
            if not borrowed:
                u = state.usage[(q.name, quota.flavor)]
                borrowed = any(u[r] > quota.nominal[r] + _EPS for r in _R)
            for res in reservations:  # it holds capacity at their start unless it ends first
                if (
                    res.state is not None
                    and res.start is not None
                    and (held.end is None or held.end > res.start)
                ):
                    _add(group, res.state, q.name, quota.flavor, entry.totals, 1.0)

        # Preemptors whose victims have all stopped go first: the capacity was freed for them.
        for pid in sorted(self._waiting, key=self._wait_key):
            wait = self._waiting[pid]
            if wait.victims:
                continue
            q, entry = self._pending_entry(pid)
            if q is None or entry is None or q.group is not group:
                continue
            del self._waiting[pid]
            quota = self._choose(group, state, q, entry.totals)
            if quota is not None and entry.not_before <= t:
                admit(q, entry, quota)
        # Preemptions under way hold what they free for their preemptors: whatever is admitted
        # meanwhile must fit beside those claims too, or the preemptor would not fit after all.
        if any(
            w.victims and self._where.get(pid) in group.queues for pid, w in self._waiting.items()
        ):
            self._claims[group.key] = self._projected(group)

        # Without freed capacity only the queues that changed can admit: the others were left
        # where nothing of theirs fits, and admissions only take capacity away.
        active = [q for q in group.queues if group.dirty or q.dirty]
        # A queue that only gained jobs behind the head that blocked it last time: the head,
        # its preemption and the jobs behind it are as they were; only the new jobs need a
        # look, as backfill candidates.
        behind = [
            q
            for q in active
            if not group.dirty
            and q.fresh is not None
            and q.last_head is not None
            and q.keys
            and q.keys[0][2] == q.last_head
        ]
        active = [q for q in active if q not in behind]
        if group.cohort:
            # Rule 5: what fits a queue's own nominal quota goes first (Kueue's order), so that
            # nobody borrows what its lender's next job could take without preempting.
            self._walk(group, active, t, admitted_now, admit, reservations, out, own_quota=True)
        scans = self._walk(group, active, t, admitted_now, admit, reservations, out)
        for q in behind:
            head = q.entries[q.keys[0][2]]
            backfill = _Scan(blocked=head, waits=head.w.id in self._waiting)
            for entry in sorted(q.fresh or (), key=lambda e: e.key):
                if entry.w.id in q.entries and entry.key > head.key and not backfill.done:
                    self._consider(group, q, entry, backfill, t, admit, reservations, out)
        if borrowed and len(active) < len(group.queues):
            # Someone borrows now: the other queues may reclaim their lent quota (rule 8).
            rest = [q for q in group.queues if q not in active]
            scans.update(self._walk(group, rest, t, admitted_now, admit, reservations, out))
        for q in group.queues:
            walked = scans.get(q.name)
            if walked is not None:
                q.last_head = walked.blocked.w.id if walked.blocked is not None else None
        for job_id in sorted(admitted_now):
            self._drop_pending(job_id)
        self._claims[group.key] = None
        group.dirty = False
        for q in group.queues:
            q.dirty = False
            q.fresh = None
        # Expired backoffs have had their chance; later ones wake the group up.
        for job_id in [i for i, nb in group.backoffs.items() if nb <= t]:
            del group.backoffs[job_id]

    def _walk(
        self,
        group: _Group,
        queues: list[_Queue],
        t: float,
        admitted_now: set[str],
        admit: Callable[[_Queue, _Pending, _Quota], None],
        reservations: list[_Reservation],
        out: Decisions,
        *,
        own_quota: bool = False,
    ) -> dict[str, _Scan]:
        """Candidates of ``queues`` in fair-share order (rule 5), until none can be admitted.

        With ``own_quota``, each queue's jobs from its front while they fit its nominal quota,
        no further (no borrowing, backfill or preemption).
        """
        state = group.state
        scans = {q.name: _Scan() for q in queues}
        heap: list[tuple[float, int, float, str]] = []
        for q in queues:
            if q.keys:
                k = q.keys[0]
                x = q.entries[k[2]].totals
                heap.append((_share(group, state, q, x), k[0], k[1], q.name))
        heapq.heapify(heap)
        by_name = {q.name: q for q in queues}
        depth = self.backfill_depth
        while heap:
            _, _, _, name = heapq.heappop(heap)
            q = by_name[name]
            scan = scans[name]
            keys = q.keys
            entries = q.entries
            n = len(keys)
            # The queue keeps the turn while its next candidate still sorts first (rule 5), so
            # most steps need no heap operation.
            while True:
                while scan.cursor < n and keys[scan.cursor][2] in admitted_now:
                    scan.cursor += 1
                if scan.cursor >= n or scan.done:
                    break
                entry = entries[keys[scan.cursor][2]]
                scan.cursor += 1
                if scan.blocked is not None and (
                    entry.totals in scan.failed
                    or (
                        entry.totals in scan.beside_failed
                        and (entry.bound is None or t + entry.bound > scan.until)
                    )
                ):
                    # Fast path: this shape does not fit now (or not beside the head's
                    # reservation, and the job would not end before the head starts).
                    scan.scanned += 1
                    if scan.scanned > depth:
                        scan.done = True
                    continue
                if own_quota:
                    self._own_quota(group, q, entry, scan, t, admit)
                else:
                    self._consider(group, q, entry, scan, t, admit, reservations, out)
                while scan.cursor < n and keys[scan.cursor][2] in admitted_now:
                    scan.cursor += 1
                if scan.cursor >= n or scan.done:
                    break
                if heap:
                    k = keys[scan.cursor]
                    step = (_share(group, state, q, entries[k[2]].totals), k[0], k[1], name)
                    if heap[0] < step:
                        heapq.heappush(heap, step)
                        break
        return scans

    def _consider(
        self,
        group: _Group,
        q: _Queue,
        entry: _Pending,
        scan: _Scan,
        t: float,
        admit: Callable[[_Queue, _Pending, _Quota], None],
        reservations: list[_Reservation],
        out: Decisions,
    ) -> bool:
        """Looks at one candidate; True if it was admitted."""
        state = group.state
        if entry.not_before > t:
            return False  # rule 7: blocks nobody
        job_id = entry.w.id
        wait = self._waiting.get(job_id)
        if scan.blocked is None:
            if wait is not None:  # victims still stopping: it is the head
                scan.blocked = entry
                scan.waits = True
                return False
            claims = self._claims[group.key]
            quota = self._choose(group, state, q, entry.totals, claims)
            if quota is not None:
                admit(q, entry, quota)
                return True
            found = self._preempt(group, q, entry, claims or state)
            if found is not None:
                quota, victims, reasons = found
                self._waiting[job_id] = _Wait({v.adm.workload.id for v in victims}, quota.flavor)
                for v, reason in zip(victims, reasons, strict=True):
                    self._preempting[v.adm.workload.id] = job_id
                    out.preempt.append(Preemption(v.adm, job_id, reason))
                if claims is None:
                    self._claims[group.key] = self._projected(group)
                else:
                    for v in victims:
                        _add(group, claims, v.queue, v.flavor, v.totals, -1.0)
                    _add(group, claims, q.name, quota.flavor, entry.totals, 1.0)
                scan.waits = True
            scan.blocked = entry
            if self._choose(group, state, q, _floor(q)) is None:
                scan.done = True  # nothing this queue has pending fits now
            return False
        # Backfill past a blocked head (rule 6).
        if wait is not None:
            return False
        scan.scanned += 1
        if scan.scanned > self.backfill_depth:
            scan.done = True
            return False
        quota = self._choose(group, state, q, entry.totals, self._claims[group.key])
        if quota is None:
            scan.failed.add(entry.totals)
            if (
                len(scan.failed) >= len(q.shapes)
                or self._choose(group, state, q, _floor(q)) is None
            ):
                scan.done = True  # nothing this queue has pending fits any more this cycle
            return False
        head = scan.head
        if head is None:  # made now, on the usage as it is after this cycle's admissions so far
            if scan.waits:  # its victims are stopping: it starts once they have (now)
                head = _Reservation(scan.blocked.w.id, t, self._projected(group))
            else:
                head = self._reserve(group, q, scan.blocked, t)
            scan.head = head
            scan.until = (head.start if head.start is not None else -_INF) + _EPS
            reservations.append(head)
        if head.start is None or head.state is None:
            scan.done = True  # a head without estimate lets nothing past (rule 6)
            return False
        if entry.bound is not None and t + entry.bound <= head.start + _EPS:
            admit(q, entry, quota)
            return True
        if entry.totals in scan.beside_failed:
            return False
        if _fits(group, head.state, q, quota, entry.totals, True):
            admit(q, entry, quota)
            return True
        scan.beside_failed.add(entry.totals)  # the reservation only grows in this cycle
        return False

    def _own_quota(
        self,
        group: _Group,
        q: _Queue,
        entry: _Pending,
        scan: _Scan,
        t: float,
        admit: Callable[[_Queue, _Pending, _Quota], None],
    ) -> bool:
        if entry.not_before > t:
            return False
        if entry.w.id in self._waiting:
            scan.done = True
            return False
        claims = self._claims[group.key]
        x = entry.totals
        for quota in q.quotas:
            if _fits(group, group.state, q, quota, x, False) and (
                claims is None or _fits(group, claims, q, quota, x, False)
            ):
                admit(q, entry, quota)
                return True
        scan.done = True
        return False

    def _wait_key(self, job_id: str) -> _Key:
        _, entry = self._pending_entry(job_id)
        return entry.key if entry is not None else (0, 0.0, job_id)

    def _pending_entry(self, job_id: str) -> tuple[_Queue | None, _Pending | None]:
        q = self._where.get(job_id)
        return (q, q.entries[job_id]) if q is not None else (None, None)

    def _projected(self, group: _Group, placed: set[str] | None = None) -> _State:
        """Usage once every preemption under way completes (victims gone, preemptors in).

        Args:
            group: whose usage.
            placed: receives the ids of the preemptors counted in.
        """
        state = group.state.copy()
        for vid in sorted(self._preempting):
            v = self._held.get(vid)
            if v is not None and self._queues[v.queue].group is group:
                _add(group, state, v.queue, v.flavor, v.totals, -1.0)
        for pid in sorted(self._waiting):
            q, entry = self._pending_entry(pid)
            if q is None or entry is None or q.group is not group:
                continue
            _add(group, state, q.name, self._waiting[pid].flavor, entry.totals, 1.0)
            if placed is not None:
                placed.add(pid)
        return state

    def _reserve(self, group: _Group, q: _Queue, entry: _Pending, t: float) -> _Reservation:
        """The head's estimated start: the first expected end after which it fits."""
        state = self._projected(group)
        x = entry.totals
        quota = self._choose(group, state, q, x)
        start: float | None = t if quota is not None else None
        if quota is None:
            # Release in order of expected end; fitting is monotone in releases, so probe at
            # doubling steps and then walk back to the first end that lets it fit.
            ends = group.ends
            held_of = self._held
            stopping = self._preempting  # released by the projection already

            def release(begin: int, end: int, sign: float) -> None:
                for _, job_id in ends[begin:end]:
                    if job_id not in stopping:
                        held = held_of[job_id]
                        _add(group, state, held.queue, held.flavor, held.totals, sign)

            done = 0
            step = 1
            while done < len(ends):
                upto = min(len(ends), done + step)
                release(done, upto, -1.0)
                if self._choose(group, state, q, x) is None:
                    done = upto
                    step *= 2
                    continue
                # The first k in (done, upto] after which it fits: a binary search, the state
                # kept at the releases of the first ``hi`` ends.
                lo, hi = done, upto
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    release(mid, hi, 1.0)
                    if self._choose(group, state, q, x) is not None:
                        hi = mid
                    else:
                        release(mid, hi, -1.0)
                        lo = mid
                quota = self._choose(group, state, q, x)
                start = max(ends[hi - 1][0], t)
                break
        if quota is None:
            return _Reservation(entry.w.id, None, None)
        _add(group, state, q.name, quota.flavor, x, 1.0)
        return _Reservation(entry.w.id, start, state)

    # ------------------------------------------------------------------ preemption

    def _preempt(
        self, group: _Group, q: _Queue, entry: _Pending, base: _State
    ) -> tuple[_Quota, list[_Held], list[str]] | None:
        """The smallest victim set found greedily that lets ``entry`` fit its nominal quota.

        ``base`` is the usage to start from: the live one, or the one once the preemptions
        under way complete.
        """
        rules = q.cq.preemption
        within = rules.within_queue
        reclaim = rules.reclaim_within_cohort if group.cohort else PreemptionPolicy.NEVER
        if within is PreemptionPolicy.NEVER and reclaim is PreemptionPolicy.NEVER:
            return None
        x = entry.totals
        prio = entry.w.priority
        lowest = min(q.priorities, default=prio + 1)
        own_possible = within is not PreemptionPolicy.NEVER and (
            lowest < prio or (within is PreemptionPolicy.ANY and lowest == prio)
        )
        for quota in q.quotas:
            if any(x[r] > 0 and not quota.has[r] for r in _R):
                continue
            if any(x[r] > quota.nominal[r] + _EPS for r in _R):
                continue  # cannot fit its nominal quota even alone
            u = base.usage[(q.name, quota.flavor)]
            if not own_possible and any(u[r] + x[r] > quota.nominal[r] + _EPS for r in _R):
                continue  # above its nominal quota, with nobody of its own to preempt
            own: list[_Held] = []
            if own_possible:
                for held in q.admitted.values():
                    if held.flavor != quota.flavor or held.adm.workload.id in self._preempting:
                        continue
                    vp = held.adm.workload.priority
                    if vp < prio or (
                        within is PreemptionPolicy.ANY and vp == prio and held.key > entry.key
                    ):
                        own.append(held)
                _victim_order(own, lambda h: h.adm.workload.priority)
            # Only its own victims lower its usage: without enough of them it cannot come
            # within its nominal quota, whatever the other queues give back.
            freeable = [sum(h.totals[r] for h in own) for r in _R]
            if any(u[r] + x[r] - freeable[r] > quota.nominal[r] + _EPS for r in _R):
                continue
            others: list[_Held] = []
            if reclaim is not PreemptionPolicy.NEVER:
                for qq in group.queues:
                    theirs = qq.quota_of.get(quota.flavor)
                    if qq is q or theirs is None:
                        continue
                    used = base.usage[(qq.name, quota.flavor)]
                    if not any(x[r] > 0 and used[r] > theirs.nominal[r] + _EPS for r in _R):
                        continue  # it borrows nothing this job needs: nothing to reclaim
                    for held in qq.admitted.values():
                        if held.flavor != quota.flavor or held.adm.workload.id in self._preempting:
                            continue
                        if reclaim is PreemptionPolicy.LOWER_PRIORITY and (
                            held.adm.workload.priority >= prio
                        ):
                            continue
                        others.append(held)
            if not own and not others:
                continue
            # Necessary: it fits once every candidate has gone (a cheap filter before the greedy
            # choice, which re-checks the fit at every victim).
            state = base.copy()
            for held in others:
                _add(group, state, held.queue, held.flavor, held.totals, -1.0)
            for held in own:
                _add(group, state, held.queue, held.flavor, held.totals, -1.0)
            if not _fits(group, state, q, quota, x, False):
                continue
            shares = {qq.name: _share(group, base, qq) for qq in group.queues}
            _victim_order(others, functools.partial(_reclaim_rank, shares))
            state = base.copy()
            chosen: list[_Held] = []
            fitted = False
            for held in [*others, *own]:
                if held.queue != q.name and not self._borrows(state, held, x):
                    continue  # reclaim only from a queue still above its nominal quota
                _add(group, state, held.queue, held.flavor, held.totals, -1.0)
                chosen.append(held)
                if _fits(group, state, q, quota, x, False):
                    fitted = True
                    break
            if not fitted:
                continue
            # Put back every victim the job can do without, the last chosen kept.
            for held in reversed(chosen[:-1]):
                _add(group, state, held.queue, held.flavor, held.totals, 1.0)
                if _fits(group, state, q, quota, x, False):
                    chosen.remove(held)
                else:
                    _add(group, state, held.queue, held.flavor, held.totals, -1.0)
            chosen.sort(key=lambda h: h.adm.workload.id)
            return quota, chosen, [self._reason(q, entry, h) for h in chosen]
        return None

    def _borrows(self, state: _State, held: _Held, x: Totals) -> bool:
        qq = self._queues[held.queue]
        quota = qq.quota_of.get(held.flavor)
        if quota is None:
            return True  # holds quota in a flavor the queue no longer has: all of it borrowed
        u = state.usage[(held.queue, held.flavor)]
        return any(x[r] > 0 and held.totals[r] > 0 and u[r] > quota.nominal[r] + _EPS for r in _R)

    def _priority(self, value: int) -> str:
        name = self._priority_names.get(value)
        return f"{name} {value}" if name else str(value)

    def _reason(self, q: _Queue, entry: _Pending, victim: _Held) -> str:
        w = entry.w
        vw = victim.adm.workload
        if victim.queue == q.name:
            relation = ">" if w.priority > vw.priority else "="
            later = "" if relation == ">" else ", and it was queued first"
            return (
                f"preempted by job {w.id} (priority {self._priority(w.priority)} {relation} "
                f"{self._priority(vw.priority)}{later}) in queue {q.name}"
            )
        qq = self._queues[victim.queue]
        quota = qq.quota_of.get(victim.flavor)
        u = qq.group.state.usage.get((victim.queue, victim.flavor), [0.0] * len(RESOURCE_NAMES))
        lent = ""
        for r in _R:
            nominal = quota.nominal[r] if quota else 0.0
            if entry.totals[r] > 0 and u[r] > nominal + _EPS:
                lent = format_amount(RESOURCE_NAMES[r], u[r] - nominal)
                break
        return (
            f"reclaimed by queue {q.name} for job {w.id}: it lends {lent or 'quota'} of flavor "
            f"{victim.flavor} to {victim.queue}"
        )

    # ------------------------------------------------------------------ report

    def report(self, now: datetime, *, teams: Collection[str] | None = None) -> QueueReport:
        """The queues and pending jobs (of ``teams``' queues; all when None) at ``now``."""
        t = now.timestamp()
        if teams is None:
            names = set(self._queues)
        else:
            names = set()
            for team in teams:
                name = self._team_queue.get(team) or self.config.default_queue
                if name in self._queues:
                    names.add(name)
        pending: list[PendingWorkload] = []
        statuses: list[QueueStatus] = []
        for group in self._group_order:
            if not any(q.name in names for q in group.queues):
                continue
            estimates = self._simulate(group, t)
            running = group.state.copy()
            for q in group.queues:
                if q.name not in names:
                    continue
                statuses.append(self._status(group, q))
                pending.extend(self._pending_rows(group, q, t, estimates, teams, running))
        for w in sorted(self._stranded.values(), key=lambda w: (w.queue, w.id)):
            if teams is None or w.team in teams:
                pending.append(
                    PendingWorkload(
                        job_id=w.id,
                        team=w.team,
                        queue=w.queue,
                        priority=w.priority,
                        position_in_queue=0,
                        position_in_cohort=0,
                        reason=f"its queue {shown(w.queue)} is not in the configuration",
                        estimated_start=None,
                        estimate_basis="unknown: its queue does not exist",
                    )
                )
        statuses.sort(key=lambda s: s.name)
        return QueueReport(generated_at=now, queues=tuple(statuses), pending=tuple(pending))

    def _status(self, group: _Group, q: _Queue) -> QueueStatus:
        state = group.state
        rows: list[ResourceUsage] = []
        for quota in q.quotas:
            u = state.usage[(q.name, quota.flavor)]
            lent = self._lent(group, q, quota)
            for r in _R:
                if not quota.has[r]:
                    continue
                rows.append(
                    ResourceUsage(
                        flavor=quota.flavor,
                        resource=RESOURCE_NAMES[r],
                        nominal=quota.nominal[r],
                        usage=u[r],
                        borrowed=max(0.0, u[r] - quota.nominal[r]),
                        lent=lent[r],
                        borrowing_limit=quota.borrowing_limit[r],
                        lending_limit=quota.lending_limit[r],
                    )
                )
        return QueueStatus(
            name=q.name,
            cohort=q.cq.cohort,
            teams=q.cq.teams,
            resources=tuple(rows),
            pending=len(q.keys),
            admitted=len(q.admitted),
            fair_weight=q.weight,
            dominant_share=_share(group, state, q),
        )

    def _lent(self, group: _Group, q: _Queue, quota: _Quota) -> list[float]:
        if not group.cohort:
            return [0.0] * len(RESOURCE_NAMES)
        state = group.state
        out = []
        for r in _R:
            borrowed = 0.0
            unused_total = 0.0
            mine = 0.0
            for qq in group.queues:
                other = qq.quota_of.get(quota.flavor)
                if other is None:
                    continue
                u = state.usage[(qq.name, quota.flavor)][r]
                borrowed += max(0.0, u - other.nominal[r])
                unused = max(0.0, min(other.lendable[r], other.nominal[r] - u))
                unused_total += unused
                if qq is q:
                    mine = unused
            out.append(borrowed * mine / unused_total if unused_total > 0 else 0.0)
        return out

    def _simulate(self, group: _Group, t: float) -> dict[str, tuple[float | None, str, int]]:
        """Predicted start, its basis, and position in the cohort of every pending job."""
        placed: set[str] = set()
        state = self._projected(group, placed)
        stopping = any(
            self._queues[h.queue].group is group
            for h in (self._held.get(v) for v in self._preempting)
            if h is not None
        )
        events: list[tuple[float, int, str, str, Totals, str, bool]] = []
        unknown_holders: list[tuple[str, str, str]] = []  # (job id, team, queue)
        seq = 0
        for end, job_id in group.ends:
            if job_id in self._preempting:
                continue
            held = self._held[job_id]
            events.append(
                (
                    max(end, t),
                    seq,
                    held.queue,
                    held.flavor,
                    held.totals,
                    held.adm.workload.runtime_basis or "expected run time",
                    False,
                )
            )
            seq += 1
        for held in sorted(
            (h for qq in group.queues for h in qq.admitted.values()), key=lambda h: h.key
        ):
            if held.end is None and held.adm.workload.id not in self._preempting:
                w = held.adm.workload
                unknown_holders.append((w.id, w.team, w.queue))
        # events are sorted already (ends is), a heap from here on
        out: dict[str, tuple[float | None, str, int]] = {}
        by_name = {q.name: q for q in group.queues}
        cursor = {q.name: 0 for q in group.queues}
        ready: list[tuple[float, int, float, str]] = []
        stuck: set[str] = set()
        for q in group.queues:
            if q.keys:
                k = q.keys[0]
                x = q.entries[k[2]].totals
                ready.append((_share(group, state, q, x), k[0], k[1], q.name))
        heapq.heapify(ready)
        clock = t
        ended_running = 0
        ended_queued = 0
        bases: set[str] = set()
        position = 0
        while True:
            while ready:
                _, _, _, name = heapq.heappop(ready)
                q = by_name[name]
                i = cursor[name]
                entry = q.entries[q.keys[i][2]]
                preemptor = entry.w.id in placed  # counted in by the projection already
                quota = (
                    q.quota_of.get(self._waiting[entry.w.id].flavor)
                    if preemptor
                    else self._choose(group, state, q, entry.totals)
                )
                if quota is None:
                    stuck.add(name)
                    continue
                start = max(clock, entry.not_before)
                position += 1
                if preemptor:
                    basis = "as soon as the jobs it preempted have stopped (their grace period)"
                elif (
                    stopping
                    and not ended_running + ended_queued
                    and self._choose(group, group.state, q, entry.totals) is None
                ):
                    basis = "as soon as the jobs being preempted have stopped"
                else:
                    basis = self._basis(start, t, entry, ended_running, ended_queued, bases)
                out[entry.w.id] = (start, basis, position)
                if not preemptor:
                    _add(group, state, name, quota.flavor, entry.totals, 1.0)
                if entry.runtime is not None:
                    heapq.heappush(
                        events,
                        (
                            start + entry.runtime,
                            seq,
                            name,
                            quota.flavor,
                            entry.totals,
                            entry.w.runtime_basis or "expected run time",
                            True,
                        ),
                    )
                    seq += 1
                else:
                    unknown_holders.append((entry.w.id, entry.w.team, name))
                cursor[name] = i + 1
                if i + 1 < len(q.keys):
                    k = q.keys[i + 1]
                    x = q.entries[k[2]].totals
                    heapq.heappush(ready, (_share(group, state, q, x), k[0], k[1], name))
            if not events or not stuck:
                break
            end, _, name, flavor, totals, basis, queued = heapq.heappop(events)
            clock = max(clock, end)
            _add(group, state, name, flavor, totals, -1.0)
            bases.add(basis)
            if queued:
                ended_queued += 1
            else:
                ended_running += 1
            for name in sorted(stuck):
                q = by_name[name]
                k = q.keys[cursor[name]]
                x = q.entries[k[2]].totals
                heapq.heappush(ready, (_share(group, state, q, x), k[0], k[1], name))
            stuck.clear()
        # What the simulation could not place: behind a job with no known run time.
        rest: list[tuple[_Key, str, str]] = []
        for name in sorted(stuck):
            q = by_name[name]
            head = q.entries[q.keys[cursor[name]][2]]
            blocker = next((h for h in unknown_holders if h[2] == name), None) or next(
                iter(unknown_holders), None
            )
            if blocker is None:
                basis = (
                    "unknown: it does not fit the queue's quota even once every running job "
                    "has ended"
                )
            elif blocker[1] == head.w.team:
                basis = f"unknown: job {blocker[0]} ahead has no run time limit and no history"
            else:
                basis = (
                    f"unknown: a job of another team (queue {blocker[2]}) ahead has no run time "
                    "limit and no history"
                )
            behind = f"unknown: behind job {head.w.id}, " + basis.removeprefix("unknown: ")
            first = cursor[name]
            rest.append((head.key, head.w.id, basis))
            rest.extend((key, key[2], behind) for key in q.keys[first + 1 :])
        for _key, job_id, why in sorted(rest):
            position += 1
            out[job_id] = (None, why, position)
        return out

    @staticmethod
    def _basis(
        start: float, t: float, entry: _Pending, running: int, queued: int, bases: set[str]
    ) -> str:
        if entry.not_before > t and start <= entry.not_before:
            return "after its retry backoff"
        if running == 0 and queued == 0:
            return "now: it fits"
        parts = []
        if running:
            parts.append(f"{plural(running, 'running job')} end")
        if queued:
            parts.append(f"{plural(queued, 'job')} ahead of it run")
        how = sorted(bases)
        by = ", ".join(how[:2]) + (" and others" if len(how) > 2 else "")
        return f"when {' and '.join(parts)}, by {by}"

    def _pending_rows(
        self,
        group: _Group,
        q: _Queue,
        t: float,
        estimates: dict[str, tuple[float | None, str, int]],
        teams: Collection[str] | None,
        running: _State,
    ) -> list[PendingWorkload]:
        """One row per pending job of ``q`` (of ``teams``).

        Reasons are judged against ``running``: the usage once the jobs that fit now, taken in
        queue order, are admitted (what the next cycle will do), so that a job behind one that
        takes the last core does not read "fits now".
        """
        rows: list[PendingWorkload] = []
        fit_cache: dict[Totals, _Quota | None] = {}
        short_cache: dict[tuple[Totals, int], str] = {}
        ahead_cache: dict[tuple[int, int], str] = {}
        waiting = self._waiting
        blocked_head: str | None = None
        higher_ahead = 0
        prio_seen: int | None = None
        same_ahead = 0
        for position, key in enumerate(q.keys, start=1):
            entry = q.entries[key[2]]
            w = entry.w
            if prio_seen != w.priority:
                higher_ahead = position - 1
                prio_seen = w.priority
                same_ahead = 0
            else:
                same_ahead += 1
            wait = waiting.get(w.id) if waiting else None
            if entry.not_before > t:
                reason = "retrying after backoff, not before " + _iso(entry.not_before)
            elif wait is not None and wait.victims:
                reason = f"waiting for {plural(len(wait.victims), 'preempted job')} to stop"
                blocked_head = blocked_head or w.id
            else:
                if entry.totals not in fit_cache:
                    fit_cache[entry.totals] = self._choose(group, running, q, entry.totals)
                quota = fit_cache[entry.totals]
                if quota is not None and blocked_head is None:
                    reason = "fits now: admitted at the next admission cycle"
                    _add(group, running, q.name, quota.flavor, entry.totals, 1.0)
                    fit_cache.clear()
                    short_cache.clear()
                elif quota is not None:
                    reason = (
                        f"fits now, but waits behind job {blocked_head} so as not to delay "
                        "its start (backfill takes only jobs that end before it or fit beside it)"
                    )
                else:
                    shape = (entry.totals, w.replicas)
                    if shape not in short_cache:
                        short_cache[shape] = self._short(group, running, q, entry)
                    ahead = (higher_ahead, same_ahead)
                    if ahead not in ahead_cache:
                        ahead_cache[ahead] = _ahead(higher_ahead, same_ahead)
                    reason = short_cache[shape] + ahead_cache[ahead]
                    blocked_head = blocked_head or w.id
            if teams is not None and w.team not in teams:
                continue
            start, basis, cohort_position = estimates.get(w.id, (None, "unknown", 0))
            rows.append(
                PendingWorkload(  # positional, in field order: thousands per report
                    w.id,
                    w.team,
                    q.name,
                    w.priority,
                    position,
                    cohort_position,
                    reason,
                    None if start is None else _datetime(start),
                    basis,
                )
            )
        return rows

    def _short(self, group: _Group, state: _State, q: _Queue, entry: _Pending) -> str:
        """What is missing, in the first flavor that has quota for everything it asks."""
        x = entry.totals
        quota = next(
            (qt for qt in q.quotas if all(x[r] <= 0 or qt.has[r] for r in _R)), q.quotas[0]
        )
        u = state.usage[(q.name, quota.flavor)]
        for r in _R:
            if x[r] <= 0:
                continue
            name = RESOURCE_NAMES[r]
            need = format_amount(name, x[r])
            if entry.w.replicas > 1:
                need += f" ({amount(name, x[r] / entry.w.replicas)} per replica x "
                need += f"{entry.w.replicas} replicas)"
            if not quota.has[r]:
                return f"waiting for {need}: no flavor of queue {q.name} has {name} quota"
            over_limit = u[r] + x[r] > quota.limit[r] + _EPS
            pool_short = False
            to_lend = 0.0
            if group.cohort:
                lendable = group.lendable[quota.flavor][r]
                to_lend = max(0.0, lendable - state.borrowed[quota.flavor][r])
                g = quota.guaranteed[r]
                delta = max(0.0, u[r] + x[r] - g) - max(0.0, u[r] - g)
                pool_short = delta > to_lend + _EPS
            if not over_limit and not pool_short:
                continue
            text = (
                f"waiting for {need} in flavor {quota.flavor}: queue {q.name} uses "
                f"{amount(name, u[r])} of its {amount(name, quota.nominal[r])}"
            )
            limit = quota.borrowing_limit[r]
            if group.cohort:
                if over_limit and limit is not None:
                    text += f" (it may borrow {amount(name, limit)} at most)"
                text += f", the cohort has {amount(name, to_lend)} to lend"
            if len(q.quotas) > 1:
                text += ", and no other flavor of the queue has room"
            return text
        return f"waiting for room in flavor {quota.flavor} of queue {q.name}"


def _reclaim_rank(shares: dict[str, float], h: _Held) -> tuple[float, ...]:
    """Reclaim victims: the queue with the highest share first, then the lowest priority."""
    return (-shares[h.queue], h.adm.workload.priority)


def _victim_order(helds: list[_Held], first: Callable[[_Held], tuple[float, ...] | int]) -> None:
    """Sorts by ``first``, then most recently admitted, then last in queue order (stable sorts)."""
    helds.sort(key=lambda h: h.key, reverse=True)
    helds.sort(key=lambda h: -h.adm.admitted_at.timestamp())
    helds.sort(key=first)


def _ahead(higher: int, same: int) -> str:
    if higher == 0 and same == 0:
        return "; first in its queue"
    parts = []
    if higher:
        parts.append(f"{plural(higher, 'job')} of higher priority")
    if same:
        parts.append(f"{plural(same, 'job')} of its priority queued earlier")
    return "; " + " and ".join(parts) + " ahead"


@functools.lru_cache(maxsize=4096)
def _datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _floor(q: _Queue) -> Totals:
    """The least of every resource over the queue's pending shapes (fits is monotone: if this
    does not fit, no pending job of the queue does)."""
    if q.floor is None:
        shapes = q.shapes
        q.floor = (
            tuple(min(shape[r] for shape in shapes) for r in _R)
            if shapes
            else (0.0,) * len(RESOURCE_NAMES)
        )
    return q.floor


def _totals(w: Workload) -> Totals:
    n = w.replicas
    return tuple(float(w.request.get(r, 0.0)) * n for r in RESOURCE_NAMES)


def _describe(x: Totals) -> str:
    parts = [format_amount(RESOURCE_NAMES[r], x[r]) for r in _R if x[r] > 0]
    return ", ".join(parts) or "nothing"
