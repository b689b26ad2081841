"""Metric names used by PromQL expressions (dashboard queries, alert rules), and the names hpad exports.

Not a PromQL parser: promtool checks the syntax (``promtool check rules``). This only finds the metric
names: strings, label matchers, range selectors, grouping clauses and Grafana variables are removed, then
every remaining identifier that is not a function call, a keyword or part of a number is a metric name.
"""

from __future__ import annotations

import re

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan", "start", "end"}
ALLOWED_FOREIGN = re.compile(r"^DCGM_FI_[A-Z0-9_]+$")  # dcgm-exporter (GPU) metrics
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"'(?:\\.|[^'\\])*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = match.group(0)
        before = s[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # 1e-9, 5m, 0.5s
            continue
        if s[match.end():].lstrip().startswith("(") or token.lower() in KEYWORDS:
            continue
        names.add(token)
    return names


def hpad_sample_names() -> set[str]:
    """Every series name the scorer, the tuner and `hpad alerts` expose (histograms with _bucket/_sum/_count)."""
    from consumers.alerts.metrics import AlertsMetrics
    from consumers.metrics import sample_names as scorer_samples
    from tuner.metrics import sample_names as tuner_samples

    return set(scorer_samples()) | set(tuner_samples()) | set(scorer_samples(AlertsMetrics()))


def unknown_metrics(exprs: list[str]) -> dict[str, set[str]]:
    """expression -> metric names in it that neither hpad nor dcgm-exporter exposes."""
    known = hpad_sample_names()
    out = {}
    for expr in exprs:
        bad = {n for n in metric_names(expr) if n not in known and not ALLOWED_FOREIGN.match(n)}
        if bad:
            out[expr] = bad
    return out
