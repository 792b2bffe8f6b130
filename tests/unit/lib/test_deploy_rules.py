"""deploy/prometheus and deploy/grafana: current with their generator, in the shape Prometheus
and Grafana load, every expression parses (balanced brackets, known functions, well-formed
selectors and ranges; there is no promtool here) and names only metrics the catalog declares or
the rules record, every SLO has its recordings and both alert severities with the workbook's
thresholds, and the README lists the catalog and the SLO defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from plinth_common import metrics, monitoring, slo
from plinth_common.metrics import CATALOG, exposed_names
from plinth_common.slo import BURN_RATE_ALERTS, BURN_WINDOWS, DEFAULT_SLOS

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy" / "prometheus" / "plinth-rules.yaml"
SCRAPE = ROOT / "deploy" / "prometheus" / "prometheus.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "plinth-overview.json"

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count_over_time", "delta", "deriv", "exp", "floor",
    "histogram_quantile", "histogram_count", "histogram_sum", "holt_winters", "idelta",
    "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log2",
    "log10", "max_over_time", "min_over_time", "predict_linear", "quantile_over_time", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time",
    "sum_over_time", "time", "timestamp", "vector",
}  # fmt: skip
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}  # fmt: skip
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATOR_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<duration>(?<=\[)\d+[smhdwy](?:\d+[smhdwy])*(?::\d+[smhdwy])?(?=\]))
    |(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?|\.\d+)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<matchop>=~|!~|!=|==|<=|>=)
    |(?P<op>[-+*/%^<>=])
    |(?P<punct>[(){}\[\],])
    """,
    re.VERBOSE,
)


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; raises on a character PromQL does not have."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    found: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"unexpected {expr[position : position + 10]!r} at {position}")
        kind = match.lastgroup or ""
        if kind != "space":
            found.append((kind, match.group()))
        position = match.end()
    return found


def promql_problems(expr: str, known: set[str]) -> list[str]:
    """What a simple PromQL check finds wrong with ``expr`` (empty when nothing)."""
    try:
        toks = tokens(expr)
    except ValueError as exc:
        return [str(exc)]
    problems: list[str] = []
    stack: list[str] = []
    closing = {")": "(", "}": "{", "]": "["}
    for kind, text in toks:
        if kind != "punct":
            continue
        if text in ("(", "{", "["):
            stack.append(text)
        elif text in closing and (not stack or stack.pop() != closing[text]):
            return [f"unbalanced {text!r}"]
    if stack:
        return [f"unclosed {stack[-1]!r}"]

    def label_list(at: int) -> int:
        if at >= len(toks) or toks[at][1] != "(":
            problems.append(f"a label list must follow {toks[at - 1][1]!r}")
            return at
        at += 1
        while toks[at][1] != ")":
            if toks[at][0] != "ident":
                problems.append(f"not a label name in a label list: {toks[at][1]!r}")
            at += 1
            if toks[at][1] == ",":
                at += 1
        return at + 1

    def matchers(at: int) -> int:
        at += 1  # past "{"
        while toks[at][1] != "}":
            name, op, value = toks[at : at + 3]
            if name[0] != "ident" or op[1] not in ("=", "!=", "=~", "!~") or value[0] != "string":
                problems.append(f"bad label matcher {name[1]}{op[1]}{value[1]}")
                return at + 1
            at += 3
            if toks[at][1] == ",":
                at += 1
        return at + 1

    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident":
            if text in AGGREGATIONS:
                i += 1
                if following in ("by", "without"):
                    i = label_list(i + 1)
                if i >= len(toks) or toks[i][1] != "(":
                    problems.append(f"{text} needs its argument in parentheses")
                continue
            if text in FUNCTIONS:
                if following != "(":
                    problems.append(f"function {text} not called")
                i += 1
                continue
            if text in LABEL_LIST_KEYWORDS:
                if following == "(":
                    i = label_list(i + 1)
                elif text in ("by", "without", "on", "ignoring"):
                    problems.append(f"{text} needs a label list")
                    i += 1
                else:
                    i += 1
                continue
            if text == "offset":  # "offset 5m": a number, then its unit
                number, unit = toks[i + 1 : i + 3]
                if number[0] != "number" or not re.fullmatch(r"[smhdwy]", unit[1]):
                    problems.append(f"bad offset {number[1]}{unit[1]}")
                i += 3
                continue
            if text in OPERATOR_KEYWORDS or text.lower() in ("inf", "nan"):
                i += 1
                continue
            if following == "(":
                problems.append(f"unknown function {text!r}")
            elif text not in known:
                problems.append(f"unknown metric {text!r}")
            i += 1
            if following == "{":
                i = matchers(i)
            continue
        if text == "{":  # a selector without a name
            i = matchers(i)
            continue
        if text == "[":
            if toks[i + 1][0] != "duration" or toks[i + 2][1] != "]":
                problems.append(f"bad range {toks[i + 1][1]!r}")
            i += 3
            continue
        i += 1
    return problems


def _rules() -> dict[str, Any]:
    loaded = yaml.safe_load(RULES.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _all_rules() -> list[dict[str, Any]]:
    return [rule for group in _rules()["groups"] for rule in group["rules"]]


def _recorded() -> set[str]:
    return {rule["record"] for rule in _all_rules() if "record" in rule}


def _known_metrics() -> set[str]:
    return {name for spec in CATALOG.values() for name in exposed_names(spec)} | _recorded()


def _scrape_jobs() -> set[str]:
    config = yaml.safe_load(SCRAPE.read_text())
    return {job["job_name"] for job in config["scrape_configs"]}


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


# -- the checker checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        ("sum(rate(plinth_events_published_total[5m])", "unclosed"),
        ("sum(rate(plinth_events_published_total[5m])))", "unbalanced"),
        ("rates(plinth_events_published_total[5m])", "unknown function"),
        ("rate(plinth_events_sent_total[5m])", "unknown metric"),
        ("rate(plinth_events_published_total[5 minutes])", "bad range"),
        ('plinth_events_published_total{subject~"x"}', "unexpected"),
        ("plinth_events_published_total{subject=x}", "bad label matcher"),
        ("sum by plinth_events_published_total", "label list"),
    ],
)
def test_the_promql_check_rejects_what_prometheus_would(expr: str, complaint: str) -> None:
    problems = promql_problems(expr, _known_metrics())
    assert any(complaint in p for p in problems), problems


def test_the_promql_check_accepts_the_usual_forms() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, method) (rate(plinth_grpc_server_request_duration"
        '_seconds_bucket{job="plinth-registry",le=~"0\\\\.05"}[$__rate_interval]))) > on (method)'
        " group_left () 2 * 0.5 and plinth_slo:compliance:ratio offset 5m"
    )
    assert promql_problems(expr, _known_metrics()) == []


# -- the files ----------------------------------------------------------------------------------


def test_the_files_are_what_the_generator_writes() -> None:
    assert monitoring.main(["--check"]) == 0, "run: python -m plinth_common.monitoring"


def test_the_rule_file_has_prometheus_shape() -> None:
    document = _rules()
    assert set(document) == {"groups"}
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names))
    duration = re.compile(r"^\d+[smhdwy]$")
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        if "interval" in group:
            assert duration.match(group["interval"])
        assert group["rules"]
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            labels = rule.get("labels", {})
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
            if "record" in rule:
                assert set(rule) <= {"record", "expr", "labels"}
                assert re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", rule["record"])
            else:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
                assert re.match(r"^[A-Z][A-Za-z0-9]*$", rule["alert"])
                assert labels["severity"] in ("page", "ticket")
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_expression_parses_and_uses_known_metrics_and_jobs() -> None:
    known, jobs = _known_metrics(), _scrape_jobs()
    exprs = [(rule.get("record") or rule["alert"], rule["expr"]) for rule in _all_rules()]
    exprs += _dashboard_exprs()
    problems = {name: found for name, expr in exprs if (found := promql_problems(expr, known))}
    assert problems == {}
    selected_jobs = {job for _, expr in exprs for job in re.findall(r'job="([^"]+)"', expr)}
    assert selected_jobs and selected_jobs <= jobs


def test_every_slo_is_recorded_and_alerted_with_the_workbook_thresholds() -> None:
    rules = _all_rules()
    for s in DEFAULT_SLOS:
        recorded = {r["record"] for r in rules if "record" in r and r["labels"]["slo"] == s.name}
        windows = [*BURN_WINDOWS, monitoring.duration(s.window)]
        assert {monitoring.ERROR_RATIO + w for w in windows} <= recorded
        assert {monitoring.COMPLIANCE, monitoring.BUDGET_REMAINING} <= recorded
        alerts = {
            r["labels"]["severity"]: r["expr"]
            for r in rules
            if "alert" in r and r["labels"]["slo"] == s.name
        }
        assert set(alerts) == {"page", "ticket"}
        budget = f"{1 - s.target.objective:.6g}"
        for a in BURN_RATE_ALERTS:
            for window in (a.long, a.short):
                condition = (
                    f'{monitoring.ERROR_RATIO}{monitoring.duration(window)}{{slo="{s.name}"}}'
                    f" > ({a.factor:g} * {budget})"
                )
                assert condition in alerts[a.severity].replace("\n", " ")
        if s.per:  # a per-team SLO keeps its scope label in every ratio
            for r in rules:
                if r.get("record", "").startswith(monitoring.ERROR_RATIO) and (
                    r["labels"]["slo"] == s.name
                ):
                    assert f"by ({s.per})" in r["expr"]


def test_the_latency_slis_read_the_bucket_of_their_threshold() -> None:
    ratio = monitoring.error_ratio
    by_name = {s.name: s for s in DEFAULT_SLOS}
    assert 'le=~"0\\\\.05"' in ratio(by_name["registry-alias-latency"], "5m")
    assert 'le=~"600(\\\\.0)?"' in ratio(by_name["queue-wait"], "5m")
    # Each threshold is a bucket bound, so the ratio is exact, not interpolated.
    assert 0.05 in metrics.GRPC_SERVER_DURATION.buckets
    assert 600.0 in metrics.SCHEDULER_QUEUE_WAIT.buckets


def test_the_dashboard_shows_what_a_platform_team_looks_at() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "plinth-overview" and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["type"] in ("timeseries", "stat", "bargauge", "table")
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])
    exprs: dict[str, str] = {}
    for title, expr in _dashboard_exprs():
        exprs[title] = exprs.get(title, "") + "\n" + expr
    wanted = {
        "Job success rate by team": "plinth_scheduler_jobs_finished_total",
        "Queue wait p90 by team": "histogram_quantile(0.9, sum by (team, le)",
        "Inference p99 by deployment": "histogram_quantile(0.99, sum by (deployment, le)",
        "Registry calls by method": 'plinth_grpc_server_requests_total{job="plinth-registry"}',
        "Registry latency p99 by method": "plinth_grpc_server_request_duration_seconds_bucket",
        "Error-budget burn rate (1 h, 1 d)": monitoring.BURN_RATE + "1h",
        "Error budget remaining (SLO window)": monitoring.BUDGET_REMAINING,
    }
    for title, fragment in wanted.items():
        assert fragment in exprs[title], title


# -- the README ---------------------------------------------------------------------------------


def _between(text: str, marker: str) -> str:
    start = f"<!-- {marker}: start -->\n"
    end = f"\n<!-- {marker}: end -->"
    return text[text.index(start) + len(start) : text.index(end)]


def test_the_readme_lists_every_metric_and_the_slo_defaults() -> None:
    readme = (ROOT / "README.md").read_text()
    assert _between(readme, "metrics-table") == metrics.markdown_table()
    assert _between(readme, "slo-table") == slo.markdown_table()
    for spec in CATALOG.values():
        assert f"| `{spec.name}` | {spec.kind} |" in readme
