"""A pool's ``retries``: which failures are tried again, how long to wait, and how much.

The policy that applies them is ``proxy.upstream.retry``; here are its settings and
defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, PlainSerializer, PlainValidator, model_validator

from proxy.config.base import ConfigModel, Duration, Kind, Size, Timeout

RETRY_CONDITIONS: tuple[str, ...] = ("connect_failure", "reset_before_response", "timeout")


def _check_retry_on(value: object) -> tuple[str | int, ...]:
    items = value if isinstance(value, list | tuple) else [value]
    out: list[str | int] = []
    for item in items:
        if isinstance(item, str) and item in RETRY_CONDITIONS:
            out.append(item)
            continue
        text = str(item).strip()
        if text.isdigit() and 400 <= int(text) <= 599:
            out.append(int(text))
            continue
        names = ", ".join(RETRY_CONDITIONS)
        raise ValueError(f"unknown retry condition {item!r}; use {names} or a status 400-599")
    return tuple(out)


#: Retry conditions: the names in ``RETRY_CONDITIONS`` and status codes.
RetryOn = Annotated[
    tuple[str | int, ...],
    PlainValidator(_check_retry_on),
    PlainSerializer(list),
    Kind("list of conditions"),
]


class BackoffSpec(ConfigModel):
    """Wait before retry n: a random time up to ``min(max, base * 2**(n-1))`` (full jitter)."""

    base: Annotated[Duration, Field(ge=0)] = 0.025
    """The first retry waits up to this; each later one up to twice the one before."""
    max: Annotated[Duration, Field(ge=0)] = 0.25
    """The longest wait before a retry."""


class RetryBudgetSpec(ConfigModel):
    """Retries may add at most ``percent`` % to a pool's requests (over about ten
    seconds), plus a reserve of ``min_retries_per_second`` so that a quiet or freshly
    started pool can still retry (Finagle's ``minRetriesPerSec``)."""

    percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    """Retries may add at most this percentage to the pool's requests."""
    min_retries_per_second: Annotated[float, Field(ge=0)] = 10.0
    """Retries always allowed on top, refilled every second (at most one second's worth
    held), so that a quiet or freshly started pool can retry at all."""

    @model_validator(mode="before")
    @classmethod
    def _replaced_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "min_retries" in data:
            raise ValueError(
                "'min_retries' (a fixed reserve of retries) was replaced by "
                "'min_retries_per_second' (a reserve that refills every second; "
                "default 10): rename the key"
            )
        return data


class RetriesSpec(ConfigModel):
    """Try a failed request again on another upstream.

    ``attempts`` counts every try, the first included (nginx's
    ``proxy_next_upstream_tries``): the default 2 is one retry. Only safe requests are
    retried: idempotent methods, or any method when nothing reached the upstream; a
    request body only while it fits ``buffer``. ``per_try_timeout``: from the request
    sent to the response head, per try (default: ``timeouts.response_header``).
    """

    attempts: Annotated[int, Field(ge=1)] = 2
    """Tries in all, the first included (2: one retry)."""
    retry_on: RetryOn = ("connect_failure", "reset_before_response")
    """Failures that are retried: ``connect_failure``, ``reset_before_response``,
    ``timeout`` and status codes such as ``502``, ``503``, ``504``."""
    per_try_timeout: Timeout | None = None
    """From the request sent to the response head, per try; null:
    ``timeouts.response_header``."""
    backoff: BackoffSpec = BackoffSpec()
    """Wait before each retry: exponential, with full jitter."""
    budget: RetryBudgetSpec = RetryBudgetSpec()
    """How much retrying the pool may do."""
    buffer: Annotated[Size, Field(ge=0)] = 65536
    """Request bodies up to this size are kept for a retry; larger ones are not retried."""
