"""The ownership tag: every host object an instance creates carries it, and cleanup only ever
removes objects that carry it (link alias, firewall comments, children's environment)."""

from __future__ import annotations


def owner_tag(instance: str) -> str:
    return f"wsnic:{instance}"
