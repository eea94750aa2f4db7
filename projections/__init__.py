"""Projections: pure folds from recorded events to read-model rows.

A projection turns one recorded event into SQL statements against its own tables; the store executes
them in the same transaction as the append, so what enforcement reads is never stale. Nothing here does
I/O, reads a clock or knows HTTP; replaying the log gives the same rows, byte for byte.
"""

from projections.agents import AgentsProjection
from projections.approvals import ApprovalsProjection
from projections.base import Projection
from projections.policies import PoliciesProjection
from projections.runs import RunsProjection
from projections.webhooks import WebhooksProjection
from rungate.store.base import Statement

ALL: tuple[Projection, ...] = (AgentsProjection(), PoliciesProjection(), RunsProjection(), ApprovalsProjection(),
                              WebhooksProjection())

__all__ = ["ALL", "Projection", "Statement"]
