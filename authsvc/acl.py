"""EMQX 5.8 topic matching and rule evaluation in Python: the same semantics as the Mosquitto plugin's
``acl.c`` (broker-auth-contract.md §1, §4), for ``POST /mqtt/authz``.

A wildcard in the requested filter matches only a wildcard in the rule, and ``#`` in the request only
``#`` (stricter than EMQX, which lets a rule's ``+`` match it); rule wildcards at the first level never
match topics starting with ``$``; ``$share/{group}/`` is stripped before subscribe checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from authsvc.contract import AclRule

Action = Literal["publish", "subscribe"]


def topic_matches(name: str, rule_filter: str) -> bool:
    if name.startswith("$") and rule_filter[:1] in ("+", "#"):
        return False
    names, rules = name.split("/"), rule_filter.split("/")
    for i, rule in enumerate(rules):
        if rule == "#":
            return True
        if i >= len(names):
            return False
        if rule == "+":
            if names[i] == "#":
                return False
        elif names[i] != rule:
            return False
    return len(names) == len(rules)


def strip_share(topic_filter: str) -> str | None:
    """``$share/{group}/{filter}`` -> ``{filter}``; None when malformed."""
    if not topic_filter.startswith("$share/"):
        return topic_filter
    group, _, rest = topic_filter[len("$share/") :].partition("/")
    return rest if group and rest else None


def decide(rules: Sequence[AclRule], action: Action, topic: str, qos: int) -> bool | None:
    """First matching rule's permission, or None when no rule matches."""
    name = strip_share(topic) if action == "subscribe" else topic
    if name is None:
        return False
    for rule in rules:
        if rule.action not in (action, "all"):
            continue
        if rule.qos is not None and qos not in rule.qos:
            continue
        if topic_matches(name, rule.topic):
            return rule.permission == "allow"
    return None
