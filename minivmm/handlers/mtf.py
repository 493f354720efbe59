"""Default monitor-trap-flag handler: a single step with no handler just goes on."""
from __future__ import annotations


def continue_after_step(vcpu, info):
    return None
