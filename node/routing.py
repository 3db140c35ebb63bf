"""Routing rules: which complete studies get an inference job, with what priority and destination.

Rules are tried in configuration order; the first that matches wins. A rule matches a study when the
calling AE is allowed by the rule and at least one source series (not the node's own output) matches
its modality, body part and series-description filters. Empty filters match anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from db.ingest import SeriesFacts
from node.config import RoutingRule


def series_matches(rule: RoutingRule, series: SeriesFacts) -> bool:
    if rule.modalities and series.modality.upper() not in rule.modalities:
        return False
    if rule.body_parts and series.body_part.upper() not in rule.body_parts:
        return False
    return not (rule.series_description and not re.search(rule.series_description, series.series_description, re.I))


def rule_matches(rule: RoutingRule, calling_ae: str, series: Sequence[SeriesFacts]) -> bool:
    if rule.calling_ae and calling_ae not in rule.calling_ae:
        return False
    return any(series_matches(rule, s) for s in series)


def select_rule(rules: Sequence[RoutingRule], calling_ae: str, series: Sequence[SeriesFacts]) -> RoutingRule | None:
    """The first rule that matches, or None (the study is complete but gets no job)."""
    return next((rule for rule in rules if rule_matches(rule, calling_ae, series)), None)
