"""The files of ``deploy/prometheus`` and ``deploy/grafana``, generated from the SLOs
(:mod:`plinth_common.slo`) and the metric catalog (:mod:`plinth_common.metrics`), so the rules,
the dashboard and the platform's own figures cannot drift apart.

``python -m plinth_common.monitoring`` rewrites them; ``--check`` fails when they are stale.

The rules select each component by the scrape job ``plinth-<component>`` (as the scrape
configuration written here names them). For every SLO they record the error ratio over each
burn-rate window and the SLO window, the compliance, the remaining budget and the 1 h / 1 d burn
rates, and they alert with the SRE workbook's multi-window, multi-burn-rate policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from plinth_common.config import DEFAULT_METRICS_PORTS
from plinth_common.slo import BURN_RATE_ALERTS, BURN_WINDOWS, DEFAULT_SLOS, Slo

ROOT = Path(__file__).resolve().parents[2]
RULES_PATH = ROOT / "deploy" / "prometheus" / "plinth-rules.yaml"
SCRAPE_PATH = ROOT / "deploy" / "prometheus" / "prometheus.yaml"
DASHBOARD_PATH = ROOT / "deploy" / "grafana" / "plinth-overview.json"

#: gRPC codes that count against availability: the server failed, not the caller.
SERVER_ERROR_CODES = ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED")
#: Recording-rule names (``level:metric:operation``).
ERROR_RATIO = "plinth_slo:sli_error:ratio_rate"
COMPLIANCE = "plinth_slo:compliance:ratio"
BUDGET_REMAINING = "plinth_slo:error_budget_remaining:ratio"
BURN_RATE = "plinth_slo:error_budget_burn:rate"
OBJECTIVE = "plinth_slo:objective:ratio"
#: Burn rates recorded for the dashboard and ``plinth status``.
RECORDED_BURNS = ("1h", "1d")


def duration(span: timedelta) -> str:
    """A PromQL duration: ``5m``, ``6h``, ``28d``."""
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _le(threshold: float) -> str:
    # Clients write 600 as "600.0" and Prometheus 3 normalises it to "600": match both.
    if float(threshold).is_integer():
        return f'le=~"{int(threshold)}(\\\\.0)?"'
    return 'le=~"{}"'.format(repr(float(threshold)).replace(".", "\\\\."))


def _job(component: str) -> str:
    return f'job="plinth-{component}"'


def error_ratio(slo: Slo, window: str) -> str:
    """The PromQL of the SLO's bad-event ratio over ``window`` (by its scope label)."""
    by = f" by ({slo.per})" if slo.per else ""
    threshold = slo.target.threshold_s
    if slo.name == "gateway-availability":
        # Health and reflection calls are the orchestrator's, not the users'.
        select = f'{_job("gateway")},service!~"grpc\\\\..*"'
        codes = "|".join(SERVER_ERROR_CODES)
        metric = "plinth_grpc_server_requests_total"
        return (
            f'sum{by} (rate({metric}{{{select},code=~"{codes}"}}[{window}]))'
            f" / sum{by} (rate({metric}{{{select}}}[{window}]))"
        )
    if slo.name == "registry-alias-latency" and threshold is not None:
        select = f'{_job("registry")},method="GetModelVersionByAlias"'
        metric = "plinth_grpc_server_request_duration_seconds"
        return (
            f"1 - (sum{by} (rate({metric}_bucket{{{select},{_le(threshold)}}}[{window}]))"
            f" / sum{by} (rate({metric}_count{{{select}}}[{window}])))"
        )
    if slo.name == "queue-wait" and threshold is not None:
        metric = "plinth_scheduler_queue_wait_seconds"
        return (
            f"1 - (sum{by} (rate({metric}_bucket{{{_le(threshold)}}}[{window}]))"
            f" / sum{by} (rate({metric}_count[{window}])))"
        )
    if slo.name == "job-start-success":
        metric = "plinth_scheduler_job_starts_total"
        return (
            f'sum{by} (rate({metric}{{result="failed"}}[{window}]))'
            f" / sum{by} (rate({metric}[{window}]))"
        )
    if slo.name in ("inference-availability", "inference-latency"):
        # The latency SLI is counted on the data path against each deployment's own target.
        bad = (
            "plinth_serving_inference_errors_total"
            if slo.kind == "availability"
            else "plinth_serving_inference_slow_requests_total"
        )
        return (
            f"sum{by} (rate({bad}[{window}]))"
            f" / sum{by} (rate(plinth_serving_inference_requests_total[{window}]))"
        )
    raise ValueError(f"no Prometheus SLI for the SLO {slo.name!r}")


def _budget(slo: Slo) -> str:
    return f"{1 - slo.target.objective:.6g}"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def _alert(slo: Slo, severity: str) -> dict[str, Any]:
    conditions = [
        f'({ERROR_RATIO}{duration(a.long)}{{slo="{slo.name}"}} > ({a.factor:g} * {_budget(slo)})'
        f' and {ERROR_RATIO}{duration(a.short)}{{slo="{slo.name}"}} > ({a.factor:g} * {_budget(slo)}))'
        for a in BURN_RATE_ALERTS
        if a.severity == severity
    ]
    spend = ", ".join(
        f"{a.factor:g}x over {duration(a.long)} and {duration(a.short)}"
        for a in BURN_RATE_ALERTS
        if a.severity == severity
    )
    scope = f" for {slo.per} {{{{ $labels.{slo.per} }}}}" if slo.per else ""
    return {
        "alert": f"Plinth{_camel(slo.name)}ErrorBudgetBurn",
        "expr": " or ".join(conditions),
        "labels": {"severity": severity, "slo": slo.name, "component": slo.component},
        "annotations": {
            "summary": f"{slo.name}{scope}: the error budget burns too fast ({spend})",
            "description": f"{slo.description} Budget window: {duration(slo.window)}.",
        },
    }


def prometheus_rules(slos: tuple[Slo, ...] = DEFAULT_SLOS) -> dict[str, Any]:
    """The Prometheus rule file: SLI recording rules, budget figures, burn-rate alerts."""
    sli_rules: list[dict[str, Any]] = []
    budget_rules: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    for slo in slos:
        labels = {"slo": slo.name, "component": slo.component}
        for window in BURN_WINDOWS:
            sli_rules.append(
                {"record": ERROR_RATIO + window, "expr": error_ratio(slo, window), "labels": labels}
            )
        window = duration(slo.window)
        this = f'{{slo="{slo.name}"}}'
        budget_rules += [
            {"record": ERROR_RATIO + window, "expr": error_ratio(slo, window), "labels": labels},
            {"record": OBJECTIVE, "expr": f"vector({slo.target.objective:g})", "labels": labels},
            {"record": COMPLIANCE, "expr": f"1 - {ERROR_RATIO}{window}{this}", "labels": labels},
            {
                "record": BUDGET_REMAINING,
                "expr": f"1 - {ERROR_RATIO}{window}{this} / {_budget(slo)}",
                "labels": labels,
            },
            *(
                {
                    "record": BURN_RATE + burn,
                    "expr": f"{ERROR_RATIO}{burn}{this} / {_budget(slo)}",
                    "labels": labels,
                }
                for burn in RECORDED_BURNS
            ),
        ]
        alerts += [_alert(slo, "page"), _alert(slo, "ticket")]
    return {
        "groups": [
            {"name": "plinth-slo-sli", "interval": "30s", "rules": sli_rules},
            # The SLO window's ratio reads weeks of samples: evaluate it less often.
            {"name": "plinth-slo-budget", "interval": "5m", "rules": budget_rules},
            {"name": "plinth-slo-alerts", "rules": alerts},
        ]
    }


def scrape_config() -> dict[str, Any]:
    """A Prometheus configuration scraping every service of a local platform (``make run``)."""
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "30s"},
        "rule_files": [RULES_PATH.name],
        "scrape_configs": [
            {
                "job_name": f"plinth-{service}",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
            for service, port in DEFAULT_METRICS_PORTS.items()
        ],
    }


def _panel(
    pid: int,
    title: str,
    targets: list[tuple[str, str]],
    *,
    x: int,
    y: int,
    unit: str,
    kind: str = "timeseries",
    width: int = 12,
    description: str = "",
    exemplars: bool = False,
    thresholds: list[tuple[str, float | None]] | None = None,
) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for color, value in (thresholds or [("green", None)])]
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": width, "h": 8},
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "exemplar": exemplars,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def grafana_dashboard() -> dict[str, Any]:
    """The overview dashboard: SLO budgets and burn, jobs, queues, inference, registry, events."""
    rate = "[$__rate_interval]"
    burn_lines = [("green", None), ("orange", 6.0), ("red", 14.4)]
    panels = [
        _panel(
            1,
            "Error budget remaining (SLO window)",
            [(BUDGET_REMAINING, "{{slo}} {{team}}{{deployment}}")],
            x=0,
            y=0,
            unit="percentunit",
            kind="bargauge",
            description="1 = untouched, 0 = spent, below 0 = overspent.",
            thresholds=[("red", None), ("orange", 0.0), ("green", 0.25)],
        ),
        _panel(
            2,
            "Error-budget burn rate (1 h, 1 d)",
            [
                (BURN_RATE + "1h", "{{slo}} {{team}}{{deployment}} 1h"),
                (BURN_RATE + "1d", "{{slo}} {{team}}{{deployment}} 1d"),
            ],
            x=12,
            y=0,
            unit="none",
            description="1 spends the budget exactly over the window; 14.4 over 1 h pages.",
            thresholds=burn_lines,
        ),
        _panel(
            3,
            "Job success rate by team",
            [
                (
                    'sum by (team) (rate(plinth_scheduler_jobs_finished_total{state="succeeded"}'
                    "[1h])) / sum by (team) (rate(plinth_scheduler_jobs_finished_total[1h]))",
                    "{{team}}",
                )
            ],
            x=0,
            y=8,
            unit="percentunit",
        ),
        _panel(
            4,
            "Queue wait p90 by team",
            [
                (
                    "histogram_quantile(0.9, sum by (team, le) "
                    f"(rate(plinth_scheduler_queue_wait_seconds_bucket{rate})))",
                    "{{team}}",
                )
            ],
            x=12,
            y=8,
            unit="s",
            exemplars=True,
            thresholds=[("green", None), ("red", 600.0)],
        ),
        _panel(
            5,
            "Pending jobs by queue and reason",
            [("sum by (queue, reason) (plinth_scheduler_pending_jobs)", "{{queue}} {{reason}}")],
            x=0,
            y=16,
            unit="none",
        ),
        _panel(
            6,
            "Quota used / nominal by queue",
            [
                (
                    "sum by (queue, resource) (plinth_scheduler_quota_used) / sum by (queue,"
                    " resource) (plinth_scheduler_quota_nominal)",
                    "{{queue}} {{resource}}",
                )
            ],
            x=12,
            y=16,
            unit="percentunit",
        ),
        _panel(
            7,
            "Inference p99 by deployment",
            [
                (
                    "histogram_quantile(0.99, sum by (deployment, le) "
                    f"(rate(plinth_serving_inference_request_duration_seconds_bucket{rate})))",
                    "{{deployment}}",
                )
            ],
            x=0,
            y=24,
            unit="s",
            exemplars=True,
        ),
        _panel(
            8,
            "Inference requests and errors by deployment",
            [
                (
                    f"sum by (deployment) (rate(plinth_serving_inference_requests_total{rate}))",
                    "{{deployment}} requests",
                ),
                (
                    f"sum by (deployment) (rate(plinth_serving_inference_errors_total{rate}))",
                    "{{deployment}} errors",
                ),
            ],
            x=12,
            y=24,
            unit="reqps",
        ),
        _panel(
            9,
            "Registry calls by method",
            [
                (
                    "sum by (method) (rate(plinth_grpc_server_requests_total"
                    f"{{{_job('registry')}}}{rate}))",
                    "{{method}}",
                )
            ],
            x=0,
            y=32,
            unit="reqps",
        ),
        _panel(
            10,
            "Registry latency p99 by method",
            [
                (
                    "histogram_quantile(0.99, sum by (method, le) (rate("
                    "plinth_grpc_server_request_duration_seconds_bucket"
                    f"{{{_job('registry')}}}{rate})))",
                    "{{method}}",
                )
            ],
            x=12,
            y=32,
            unit="s",
            exemplars=True,
            thresholds=[("green", None), ("red", 0.05)],
        ),
        _panel(
            11,
            "Gateway calls by status code",
            [
                (
                    "sum by (code) (rate(plinth_grpc_server_requests_total"
                    f"{{{_job('gateway')}}}{rate}))",
                    "{{code}}",
                )
            ],
            x=0,
            y=40,
            unit="reqps",
        ),
        _panel(
            12,
            "Event publish-to-handle lag p99 by subject",
            [
                (
                    "histogram_quantile(0.99, sum by (subject, le) "
                    f"(rate(plinth_events_handle_lag_seconds_bucket{rate})))",
                    "{{subject}}",
                )
            ],
            x=12,
            y=40,
            unit="s",
            exemplars=True,
        ),
        _panel(
            13,
            "Outbox backlog by service",
            [("sum by (job) (plinth_events_outbox_backlog)", "{{job}}")],
            x=0,
            y=48,
            unit="none",
        ),
        _panel(
            14,
            "Redeliveries and dead letters",
            [
                (
                    f"sum by (job, consumer) (rate(plinth_events_redeliveries_total{rate}))",
                    "{{job}} {{consumer}} redelivered",
                ),
                (
                    "sum by (job, consumer) (increase(plinth_events_dead_letters_total[1h]))",
                    "{{job}} {{consumer}} dead letters / h",
                ),
            ],
            x=12,
            y=48,
            unit="none",
        ),
        _panel(
            15,
            "Online feature freshness by view",
            [("max by (feature_view) (plinth_features_freshness_seconds)", "{{feature_view}}")],
            x=0,
            y=56,
            unit="s",
        ),
        _panel(
            16,
            "Online feature read p99 by view",
            [
                (
                    "histogram_quantile(0.99, sum by (feature_view, le) "
                    f"(rate(plinth_features_online_read_duration_seconds_bucket{rate})))",
                    "{{feature_view}}",
                )
            ],
            x=12,
            y=56,
            unit="s",
            exemplars=True,
        ),
    ]
    return {
        "uid": "plinth-overview",
        "title": "Plinth overview",
        "description": "SLOs and error budgets, jobs and queues, inference, registry, events.",
        "tags": ["plinth"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "1m",
        "timezone": "utc",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                }
            ]
        },
        "panels": panels,
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes shared label dicts out in full (no ``&id001`` anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def rendered() -> dict[Path, str]:
    """Each generated file's path and content."""
    header = (
        "# Generated by `python -m plinth_common.monitoring` from plinth_common.slo; do not edit.\n"
    )

    def dump(document: dict[str, Any]) -> str:
        return header + yaml.dump(document, Dumper=_PlainDumper, sort_keys=False, width=100)

    return {
        RULES_PATH: dump(prometheus_rules()),
        SCRAPE_PATH: dump(scrape_config()),
        DASHBOARD_PATH: json.dumps(grafana_dashboard(), indent=2) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    """Writes the files (``--check``: only says which are stale, exit 1)."""
    parser = argparse.ArgumentParser(prog="python -m plinth_common.monitoring")
    parser.add_argument("--check", action="store_true", help="fail when a file is stale")
    args = parser.parse_args(argv)
    stale = [
        path for path, text in rendered().items() if not path.exists() or path.read_text() != text
    ]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python -m plinth_common.monitoring")
        return 1 if stale else 0
    for path, text in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
