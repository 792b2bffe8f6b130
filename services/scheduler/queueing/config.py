"""The admin's queue configuration: parsed, validated as a whole, and written back.

The document (YAML or JSON, loaded into dicts by the caller) uses Kueue's vocabulary::

    flavors:                         # ResourceFlavors: named classes of capacity
      - name: cpu                    # DNS label
        labels: {pool: general}      # node labels -> a node selector (optional)
        taints: [{key: spot, value: "true", effect: NoSchedule}]   # -> tolerations (optional)
        executor: local              # which executor runs jobs admitted here (default local)
        executor_options: {}         # the executor's own settings, strings (optional)
        spot: false                  # capacity the engine may take back (optional)
    priority_classes:                # optional; omitted: low=100, normal=500, high=1000
      - {name: low, value: 100, description: "batch"}     # value: a 32-bit integer
      - {name: normal, value: 500}
      - {name: high, value: 1000}
    cohorts:                         # optional: queues may name undeclared cohorts (roots)
      - {name: research, parent: ""} # parent nests cohorts; queues under one root share
    cluster_queues:
      - name: vision                 # DNS label
        teams: [vision]              # each team in at most one queue
        cohort: research             # '' or omitted: borrows and lends nothing
        fair_weight: 2               # > 0; the queue's weight in its cohort's fair share
        default_priority: normal     # omitted: 'normal' if declared, else the lowest class
        preemption:                  # never | lower_priority | any
          within_queue: lower_priority        # default lower_priority
          reclaim_within_cohort: any          # default any
        flavors:                     # in order of preference
          - flavor: cpu
            resources:               # cpu, memory, gpu; a resource not named has no quota
              cpu: {nominal: 8, borrowing_limit: 4, lending_limit: 2}
              memory: {nominal: 32Gi}
              gpu: {nominal: 0}
    default_queue: ""                # where a team in no queue goes ('' : it cannot submit)

Quantities: cpu in cores (``8``, ``0.5``, ``"500m"``), memory in bytes or with a suffix
(``Ki Mi Gi Ti`` binary, ``K M G T`` decimal), gpu in whole devices. ``borrowing_limit``
omitted: as much as the cohort can lend; ``lending_limit`` omitted: all of the nominal quota.

:func:`parse_config` refuses a document as a whole, listing every problem at once (one
:class:`~plinth_common.errors.InvalidArgument` with a violation per problem, each naming its
field path such as ``cluster_queues[1].flavors[0].resources.gpu.nominal``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from plinth_common.errors import InvalidArgument
from plinth_common.names import check_team, shown
from services.scheduler.queueing.model import (
    RESOURCE_NAMES,
    ClusterQueue,
    Cohort,
    FlavorQuotas,
    PreemptionPolicy,
    PreemptionRules,
    PriorityClass,
    QueueConfig,
    ResourceFlavor,
    ResourceQuota,
    Taint,
)
from services.scheduler.queueing.quantity import parse_quantity

__all__ = [
    "DEFAULT_FLAVOR",
    "DEFAULT_PRIORITY_CLASSES",
    "DEFAULT_QUEUE",
    "config_to_document",
    "default_config",
    "parse_config",
]

#: The one flavor and queue of a platform nobody configured.
DEFAULT_FLAVOR = "local"
DEFAULT_QUEUE = "default"
#: The priority classes a document that declares none gets (and the default configuration).
DEFAULT_PRIORITY_CLASSES: tuple[PriorityClass, ...] = (
    PriorityClass(name="low", value=100),
    PriorityClass(name="normal", value=500),
    PriorityClass(name="high", value=1000),
)
_DEFAULT_PRIORITY = "normal"
_INT32 = (-(2**31), 2**31 - 1)
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_POLICIES = tuple(p.value for p in PreemptionPolicy)

_TOP_KEYS = ("flavors", "priority_classes", "cohorts", "cluster_queues", "default_queue")
_FLAVOR_KEYS = ("name", "labels", "taints", "executor", "executor_options", "spot")
_TAINT_KEYS = ("key", "value", "effect")
_PRIORITY_KEYS = ("name", "value", "description")
_COHORT_KEYS = ("name", "parent")
_QUEUE_KEYS = (
    "name",
    "teams",
    "cohort",
    "fair_weight",
    "default_priority",
    "preemption",
    "flavors",
)
_PREEMPTION_KEYS = ("within_queue", "reclaim_within_cohort")
_FLAVOR_QUOTA_KEYS = ("flavor", "resources")
_QUOTA_KEYS = ("nominal", "borrowing_limit", "lending_limit")


class _Problems:
    """Collects ``(field, problem)`` pairs; the document is refused if there is any."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, field: str, problem: str) -> None:
        self.found.append((field, problem))

    def keys(self, value: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
        """Unknown keys, listed with what is allowed (typo protection)."""
        for key in value:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.add(where, f"unknown key; expected one of {', '.join(allowed)}")

    def mapping(self, value: object, path: str) -> Mapping[str, Any] | None:
        if isinstance(value, Mapping):
            return value
        self.add(path, f"expected a mapping, got {_kind(value)}")
        return None

    def sequence(self, value: object, path: str) -> Sequence[Any]:
        if value is None:
            return ()
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            return value
        self.add(path, f"expected a list, got {_kind(value)}")
        return ()

    def string(self, value: object, path: str, *, default: str = "") -> str:
        if value is None:
            return default
        if isinstance(value, str):
            return value
        self.add(path, f"expected a string, got {_kind(value)}")
        return default

    def label(self, value: object, path: str, *, required: bool = True) -> str:
        """A DNS label (the names rule for teams and jobs)."""
        text = self.string(value, path)
        if not text:
            if required:
                self.add(path, "required")
            return ""
        try:
            check_team(text, path)
        except InvalidArgument as error:
            self.add(error.field, error.problem)
        return text

    def strings(self, value: object, path: str) -> dict[str, str]:
        mapping = {} if value is None else self.mapping(value, path)
        out: dict[str, str] = {}
        for key, item in (mapping or {}).items():
            if not isinstance(key, str) or not isinstance(item, str | int | float | bool):
                self.add(f"{path}.{key}", f"expected a string, got {_kind(item)}")
                continue
            out[key] = str(item).lower() if isinstance(item, bool) else str(item)
        return out


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, str):
        return f"the string {shown(value)}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, Sequence):
        return "a list"
    return type(value).__name__


def parse_config(document: Mapping[str, Any], *, version: int = 0) -> QueueConfig:
    """Validates the admin's document and builds the configuration it declares.

    Args:
        document: the loaded YAML or JSON (see the module docstring for its shape).
        version: the stored version this configuration will have.

    Raises:
        InvalidArgument: field ``config``, with one violation per problem found (every one,
            not the first): the document is refused as a whole.
    """
    problems = _Problems()
    if not isinstance(document, Mapping):
        problems.add("config", f"expected a mapping at the top, got {_kind(document)}")
        _raise(problems)
    problems.keys(document, _TOP_KEYS, "")
    flavors = _flavors(document.get("flavors"), problems)
    priorities = _priorities(document, problems)
    cohorts = _cohorts(document.get("cohorts"), problems)
    queues = _queues(document.get("cluster_queues"), flavors, priorities, problems)
    _check_cohort_tree(cohorts, problems)
    _check_flavors_have_resources(document.get("flavors"), flavors, queues, problems)
    default_queue = problems.string(document.get("default_queue"), "default_queue")
    if default_queue and default_queue not in queues:
        problems.add("default_queue", f"no cluster queue {shown(default_queue)}")
    if problems.found:
        _raise(problems)
    return QueueConfig(
        flavors=flavors,
        cluster_queues=queues,
        cohorts=cohorts,
        priority_classes=priorities,
        default_queue=default_queue,
        version=version,
    )


def _raise(problems: _Problems) -> None:
    count = len(problems.found)
    noun = "problem" if count == 1 else "problems"
    raise InvalidArgument(
        "config",
        f"{count} {noun}; the configuration is refused as a whole",
        violations=problems.found,
    )


def _flavors(raw: object, problems: _Problems) -> dict[str, ResourceFlavor]:
    items = problems.sequence(raw, "flavors")
    if raw is None or not items:
        problems.add("flavors", "at least one flavor is required")
    out: dict[str, ResourceFlavor] = {}
    for i, item in enumerate(items):
        path = f"flavors[{i}]"
        value = problems.mapping(item, path)
        if value is None:
            continue
        problems.keys(value, _FLAVOR_KEYS, path)
        name = problems.label(value.get("name"), f"{path}.name")
        taints: list[Taint] = []
        for j, taint_raw in enumerate(problems.sequence(value.get("taints"), f"{path}.taints")):
            taint_path = f"{path}.taints[{j}]"
            taint = problems.mapping(taint_raw, taint_path)
            if taint is None:
                continue
            problems.keys(taint, _TAINT_KEYS, taint_path)
            key = problems.string(taint.get("key"), f"{taint_path}.key")
            if not key:
                problems.add(f"{taint_path}.key", "required")
            effect = problems.string(
                taint.get("effect"), f"{taint_path}.effect", default="NoSchedule"
            )
            if effect not in _TAINT_EFFECTS:
                problems.add(
                    f"{taint_path}.effect",
                    f"expected one of {', '.join(_TAINT_EFFECTS)}, got {shown(effect)}",
                )
            raw_value = taint.get("value")
            taint_value = str(raw_value).lower() if isinstance(raw_value, bool) else raw_value
            taints.append(
                Taint(
                    key=key,
                    value=problems.string(taint_value, f"{taint_path}.value"),
                    effect=effect,
                )
            )
        spot = value.get("spot", False)
        if not isinstance(spot, bool):
            problems.add(f"{path}.spot", f"expected true or false, got {_kind(spot)}")
            spot = False
        executor = problems.string(value.get("executor"), f"{path}.executor", default="local")
        if not executor:
            problems.add(f"{path}.executor", "must not be empty")
        flavor = ResourceFlavor(
            name=name,
            labels=problems.strings(value.get("labels"), f"{path}.labels"),
            taints=tuple(taints),
            executor=executor,
            executor_options=problems.strings(
                value.get("executor_options"), f"{path}.executor_options"
            ),
            spot=spot,
        )
        if name in out:
            problems.add(f"{path}.name", f"duplicate flavor {shown(name)}")
        elif name:
            out[name] = flavor
    return out


def _priorities(document: Mapping[str, Any], problems: _Problems) -> dict[str, PriorityClass]:
    if "priority_classes" not in document:
        return {p.name: p for p in DEFAULT_PRIORITY_CLASSES}
    items = problems.sequence(document["priority_classes"], "priority_classes")
    if not items:
        problems.add("priority_classes", "at least one priority class is required")
    out: dict[str, PriorityClass] = {}
    # value -> the class that has it: two with one value would be indistinguishable (the engine
    # knows a job's priority by value, and would report it under either name).
    by_value: dict[int, str] = {}
    for i, item in enumerate(items):
        path = f"priority_classes[{i}]"
        value = problems.mapping(item, path)
        if value is None:
            continue
        problems.keys(value, _PRIORITY_KEYS, path)
        name = problems.label(value.get("name"), f"{path}.name")
        number = value.get("value")
        if isinstance(number, bool) or not isinstance(number, int):
            problems.add(f"{path}.value", f"expected an integer, got {_kind(number)}")
            number = 0
        elif not _INT32[0] <= number <= _INT32[1]:
            problems.add(
                f"{path}.value",
                f"must be a 32-bit integer ({_INT32[0]} to {_INT32[1]}), got {number}",
            )
        description = problems.string(value.get("description"), f"{path}.description")
        if name in out:
            problems.add(f"{path}.name", f"duplicate priority class {shown(name)}")
        elif name:
            if number in by_value and isinstance(value.get("value"), int):
                problems.add(
                    f"{path}.value",
                    f"{number} is already the value of priority class {shown(by_value[number])}; "
                    "each class needs a value of its own",
                )
            by_value.setdefault(number, name)
            out[name] = PriorityClass(name=name, value=number, description=description)
    return out


def _cohorts(raw: object, problems: _Problems) -> dict[str, Cohort]:
    out: dict[str, Cohort] = {}
    for i, item in enumerate(problems.sequence(raw, "cohorts")):
        path = f"cohorts[{i}]"
        value = problems.mapping(item, path)
        if value is None:
            continue
        problems.keys(value, _COHORT_KEYS, path)
        name = problems.label(value.get("name"), f"{path}.name")
        parent = problems.label(value.get("parent"), f"{path}.parent", required=False)
        if name in out:
            problems.add(f"{path}.name", f"duplicate cohort {shown(name)}")
        elif name:
            out[name] = Cohort(name=name, parent=parent)
    return out


def _check_cohort_tree(cohorts: Mapping[str, Cohort], problems: _Problems) -> None:
    index = {name: i for i, name in enumerate(cohorts)}
    reported: set[str] = set()
    for name, cohort in cohorts.items():
        path = f"cohorts[{index[name]}].parent"
        if cohort.parent and cohort.parent not in cohorts:
            problems.add(path, f"no cohort {shown(cohort.parent)} is declared")
            continue
        chain = [name]
        current = cohort.parent
        while current and current in cohorts:
            if current in chain:
                cycle = [*chain[chain.index(current) :], current]
                if not reported.intersection(cycle):
                    problems.add(path, f"cohort cycle: {' -> '.join(cycle)}")
                reported.update(cycle)
                break
            chain.append(current)
            current = cohorts[current].parent


def _queues(
    raw: object,
    flavors: Mapping[str, ResourceFlavor],
    priorities: Mapping[str, PriorityClass],
    problems: _Problems,
) -> dict[str, ClusterQueue]:
    items = problems.sequence(raw, "cluster_queues")
    if raw is None or not items:
        problems.add("cluster_queues", "at least one cluster queue is required")
    out: dict[str, ClusterQueue] = {}
    team_queue: dict[str, str] = {}
    for i, item in enumerate(items):
        path = f"cluster_queues[{i}]"
        value = problems.mapping(item, path)
        if value is None:
            continue
        problems.keys(value, _QUEUE_KEYS, path)
        name = problems.label(value.get("name"), f"{path}.name")
        cohort = problems.label(value.get("cohort"), f"{path}.cohort", required=False)
        teams: list[str] = []
        for j, team_raw in enumerate(problems.sequence(value.get("teams"), f"{path}.teams")):
            team = problems.label(team_raw, f"{path}.teams[{j}]")
            if not team:
                continue
            if team in team_queue:
                problems.add(
                    f"{path}.teams[{j}]",
                    f"team {shown(team)} is already in cluster queue {shown(team_queue[team])}; "
                    "a team submits to one queue",
                )
                continue
            team_queue[team] = name
            teams.append(team)
        weight = value.get("fair_weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            problems.add(f"{path}.fair_weight", f"must be a positive number, got {_kind(weight)}")
            weight = 1.0
        default_priority = _queue_priority(value, priorities, path, problems)
        preemption = _preemption(value.get("preemption"), f"{path}.preemption", problems)
        quotas = _flavor_quotas(value.get("flavors"), flavors, cohort, path, problems)
        queue = ClusterQueue(
            name=name,
            teams=tuple(teams),
            flavors=quotas,
            cohort=cohort,
            preemption=preemption,
            fair_weight=float(weight),
            default_priority=default_priority,
        )
        if name in out:
            problems.add(f"{path}.name", f"duplicate cluster queue {shown(name)}")
        elif name:
            out[name] = queue
    return out


def _queue_priority(
    value: Mapping[str, Any],
    priorities: Mapping[str, PriorityClass],
    path: str,
    problems: _Problems,
) -> str:
    raw = value.get("default_priority")
    if raw is None:
        if _DEFAULT_PRIORITY in priorities or not priorities:
            return _DEFAULT_PRIORITY
        return min(priorities.values(), key=lambda p: (p.value, p.name)).name
    name = problems.string(raw, f"{path}.default_priority")
    if name and name not in priorities:
        problems.add(
            f"{path}.default_priority",
            f"no priority class {shown(name)}; declared: {', '.join(sorted(priorities))}",
        )
    return name


def _preemption(raw: object, path: str, problems: _Problems) -> PreemptionRules:
    if raw is None:
        return PreemptionRules()
    value = problems.mapping(raw, path)
    if value is None:
        return PreemptionRules()
    problems.keys(value, _PREEMPTION_KEYS, path)
    chosen: dict[str, PreemptionPolicy] = {}
    for key in _PREEMPTION_KEYS:
        if key not in value:
            continue
        text = problems.string(value[key], f"{path}.{key}")
        if text not in _POLICIES:
            problems.add(
                f"{path}.{key}", f"expected one of {', '.join(_POLICIES)}, got {shown(text)}"
            )
            continue
        chosen[key] = PreemptionPolicy(text)
    return PreemptionRules(**chosen)


def _flavor_quotas(
    raw: object,
    flavors: Mapping[str, ResourceFlavor],
    cohort: str,
    path: str,
    problems: _Problems,
) -> tuple[FlavorQuotas, ...]:
    items = problems.sequence(raw, f"{path}.flavors")
    if not items:
        problems.add(f"{path}.flavors", "a cluster queue needs at least one flavor")
    out: list[FlavorQuotas] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        fpath = f"{path}.flavors[{i}]"
        value = problems.mapping(item, fpath)
        if value is None:
            continue
        problems.keys(value, _FLAVOR_QUOTA_KEYS, fpath)
        flavor = problems.string(value.get("flavor"), f"{fpath}.flavor")
        if not flavor:
            problems.add(f"{fpath}.flavor", "required")
        elif flavor not in flavors:
            known = ", ".join(sorted(flavors)) or "none"
            problems.add(f"{fpath}.flavor", f"no flavor {shown(flavor)}; declared: {known}")
        elif flavor in seen:
            problems.add(f"{fpath}.flavor", f"flavor {shown(flavor)} is listed twice")
        seen.add(flavor)
        resources_raw = value.get("resources")
        resources = problems.mapping(resources_raw, f"{fpath}.resources") if resources_raw else None
        if not resources:
            if not resources_raw:  # else mapping() has said what is wrong
                problems.add(f"{fpath}.resources", "at least one of cpu, memory, gpu is required")
            resources = {}
        problems.keys(resources, RESOURCE_NAMES, f"{fpath}.resources")
        quotas: dict[str, ResourceQuota] = {}
        for resource in RESOURCE_NAMES:
            if resource in resources:
                quota = _quota(
                    resource, resources[resource], cohort, f"{fpath}.resources.{resource}", problems
                )
                if quota is not None:
                    quotas[resource] = quota
        out.append(FlavorQuotas(flavor=flavor, resources=quotas))
    return tuple(out)


def _quota(
    resource: str, raw: object, cohort: str, path: str, problems: _Problems
) -> ResourceQuota | None:
    value = problems.mapping(raw, path)
    if value is None:
        return None
    problems.keys(value, _QUOTA_KEYS, path)
    amounts: dict[str, float | None] = {}
    for key in _QUOTA_KEYS:
        if value.get(key) is None:
            if key == "nominal":
                problems.add(f"{path}.nominal", "required")
            amounts[key] = None
            continue
        try:
            amounts[key] = parse_quantity(resource, value[key])
        except ValueError as error:
            problems.add(f"{path}.{key}", str(error))
            amounts[key] = None
    nominal = amounts["nominal"]
    lending = amounts["lending_limit"]
    borrowing = amounts["borrowing_limit"]
    if nominal is not None and lending is not None and lending > nominal:
        problems.add(
            f"{path}.lending_limit",
            f"must not exceed nominal ({value['lending_limit']} > {value['nominal']})",
        )
    if borrowing is not None and not cohort:
        problems.add(
            f"{path}.borrowing_limit",
            "the queue has no cohort to borrow from; set its cohort or drop the limit",
        )
    return ResourceQuota(
        nominal=nominal if nominal is not None else 0.0,
        borrowing_limit=borrowing,
        lending_limit=lending,
    )


def _check_flavors_have_resources(
    raw: object,
    flavors: Mapping[str, ResourceFlavor],
    queues: Mapping[str, ClusterQueue],
    problems: _Problems,
) -> None:
    """A declared flavor that no queue gives any nominal quota could never run a job."""
    given = {
        fq.flavor
        for queue in queues.values()
        for fq in queue.flavors
        if any(q.nominal > 0 for q in fq.resources.values())
    }
    names = [
        item.get("name") if isinstance(item, Mapping) else None
        for item in (raw if isinstance(raw, Sequence) and not isinstance(raw, str) else ())
    ]
    for i, name in enumerate(names):
        if isinstance(name, str) and name in flavors and name not in given:
            problems.add(
                f"flavors[{i}]",
                f"flavor {shown(name)} has no resources: no cluster queue gives it a nominal "
                "quota above 0",
            )


def default_config(capacity: Mapping[str, float]) -> QueueConfig:
    """The configuration of a platform nobody configured.

    One flavor ``local`` (the local executor) and one cluster queue ``default`` whose nominal
    quota is the machine's capacity; every team lands there (``default_queue``); priority
    classes low=100, normal=500, high=1000, default ``normal``.

    Args:
        capacity: the machine's capacity by resource name (cores, bytes, devices).
    """
    resources = {
        name: ResourceQuota(nominal=float(capacity.get(name, 0.0))) for name in RESOURCE_NAMES
    }
    queue = ClusterQueue(
        name=DEFAULT_QUEUE,
        flavors=(FlavorQuotas(flavor=DEFAULT_FLAVOR, resources=resources),),
        default_priority=_DEFAULT_PRIORITY,
    )
    return QueueConfig(
        flavors={DEFAULT_FLAVOR: ResourceFlavor(name=DEFAULT_FLAVOR, executor="local")},
        cluster_queues={DEFAULT_QUEUE: queue},
        priority_classes={p.name: p for p in DEFAULT_PRIORITY_CLASSES},
        default_queue=DEFAULT_QUEUE,
        version=0,
    )


def config_to_document(config: QueueConfig) -> dict[str, Any]:
    """The document that :func:`parse_config` turns back into ``config`` (its version aside).

    Used by GetQueueConfig and the CLI; quantities are written as an admin would (``32Gi``,
    ``0.5``), exactly.
    """
    return {
        "flavors": [_flavor_document(f) for f in config.flavors.values()],
        "priority_classes": [
            {
                "name": p.name,
                "value": p.value,
                **({"description": p.description} if p.description else {}),
            }
            for p in config.priority_classes.values()
        ],
        "cohorts": [{"name": c.name, "parent": c.parent} for c in config.cohorts.values()],
        "cluster_queues": [_queue_document(q) for q in config.cluster_queues.values()],
        "default_queue": config.default_queue,
    }


def _flavor_document(flavor: ResourceFlavor) -> dict[str, Any]:
    out: dict[str, Any] = {"name": flavor.name, "executor": flavor.executor}
    if flavor.labels:
        out["labels"] = dict(flavor.labels)
    if flavor.taints:
        out["taints"] = [
            {"key": t.key, "value": t.value, "effect": t.effect} for t in flavor.taints
        ]
    if flavor.executor_options:
        out["executor_options"] = dict(flavor.executor_options)
    if flavor.spot:
        out["spot"] = True
    return out


def _queue_document(queue: ClusterQueue) -> dict[str, Any]:
    out: dict[str, Any] = {"name": queue.name, "teams": list(queue.teams)}
    if queue.cohort:
        out["cohort"] = queue.cohort
    out["fair_weight"] = _number(queue.fair_weight)
    out["default_priority"] = queue.default_priority
    out["preemption"] = {
        "within_queue": queue.preemption.within_queue.value,
        "reclaim_within_cohort": queue.preemption.reclaim_within_cohort.value,
    }
    out["flavors"] = [
        {
            "flavor": fq.flavor,
            "resources": {
                name: _quota_document(name, quota) for name, quota in fq.resources.items()
            },
        }
        for fq in queue.flavors
    ]
    return out


def _quota_document(resource: str, quota: ResourceQuota) -> dict[str, Any]:
    out: dict[str, Any] = {"nominal": _quantity(resource, quota.nominal)}
    if quota.borrowing_limit is not None:
        out["borrowing_limit"] = _quantity(resource, quota.borrowing_limit)
    if quota.lending_limit is not None:
        out["lending_limit"] = _quantity(resource, quota.lending_limit)
    return out


def _quantity(resource: str, value: float) -> int | float | str:
    if resource == "memory":
        for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
            if value >= size and (value / size).is_integer():
                return f"{int(value / size)}{suffix}"
    return _number(value)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
