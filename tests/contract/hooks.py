"""Schemathesis hooks of scripts/api-contract.sh (loaded through SCHEMATHESIS_HOOKS).

A publish's `not_before` may be at most `schedule.max_delay_ms` ahead (7 days by
default): a later one is rightly answered 400, but no JSON Schema can say "within a week
from now", so generated bodies that ask for a later time are left out of the
"schema-valid means accepted" runs. Every other generated body is sent as it is.
"""

from datetime import datetime, timedelta, timezone

import schemathesis

# schedule.max_delay_ms of the contract config (its default), less a margin for the run.
MAX_AHEAD = timedelta(days=7) - timedelta(minutes=10)


def _too_far(value):
    if not isinstance(value, str):
        return False
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    if at.tzinfo is None:
        return False
    return at - datetime.now(timezone.utc) > MAX_AHEAD


def _messages(body):
    if not isinstance(body, dict):
        return []
    items = [body]
    batch = body.get("messages")
    if isinstance(batch, list):
        items.extend(m for m in batch if isinstance(m, dict))
    return items


@schemathesis.hook
def filter_body(context, body):
    return not any(_too_far(m.get("not_before")) for m in _messages(body))
