"""Reads one number from Prometheus' HTTP API (`/api/v1/query`) and says precisely why when it can't.

Every failure becomes a `MetricFailure` with a CamelCase reason, the same word that ends up in the
`ScalingActive` condition, so that "Prometheus is down" and "the query matches two series" are told
apart by whoever reads `kubectl describe`.
"""

from __future__ import annotations

import asyncio
import math
import string
from enum import StrEnum
from typing import Any

import aiohttp

from grokserve.operator.autoscaling.policy import MetricFailure, QueueSample
from grokserve.operator.status import LoadingProgress

# Every Serve proxy answers /metrics with all replicas' series, so Prometheus scrapes each replica
# once per node: `max by (replica)` counts it once.
WAITING_QUERY = (
    'sum(max by (replica) (grokserve_requests_waiting{namespace="$namespace",deployment="$name"}))'
)
RUNNING_QUERY = (
    'sum(max by (replica) (grokserve_requests_running{namespace="$namespace",deployment="$name"}))'
)
PLACEHOLDERS = ("namespace", "name")

# Weight loading (the replicas' grokserve_weights_* series), summed over the replicas that are
# still loading: those without grokserve_weights_load_seconds, which a replica sets once loaded.
_SERIES = '{namespace="$namespace",deployment="$name"}'
_STILL_LOADING = f"unless on (replica) grokserve_weights_load_seconds{_SERIES}"
LOADING_DONE_QUERY = (
    f"sum(max by (replica, rank) (grokserve_weights_bytes_done{_SERIES}) {_STILL_LOADING})"
)
LOADING_NEEDED_QUERY = (
    f"sum(max by (replica, rank) (grokserve_weights_bytes_needed{_SERIES}) {_STILL_LOADING})"
)
LOADING_RATE_QUERY = (
    "sum(max by (replica, rank) (rate(grokserve_weights_bytes_fetched_total"
    f"{_SERIES}[1m])) {_STILL_LOADING})"
)


class FailureReason(StrEnum):
    UNREACHABLE = "PrometheusUnreachable"
    TIMEOUT = "PrometheusTimeout"
    QUERY_ERROR = "PrometheusQueryError"
    BAD_RESPONSE = "PrometheusBadResponse"
    NO_SERIES = "NoSeries"
    SEVERAL_SERIES = "SeveralSeries"
    NOT_A_NUMBER = "NotANumber"
    NON_NUMERIC = "NonNumericResult"
    NEGATIVE = "NegativeValue"


class QueryTemplateError(ValueError):
    """The query override uses a placeholder other than $namespace and $name, or a stray `$`."""


def render_query(template: str, namespace: str, name: str) -> str:
    """Substitute `$namespace`/`${namespace}` and `$name`/`${name}`; `$$` is a literal `$`."""
    try:
        return string.Template(template).substitute(namespace=namespace, name=name)
    except KeyError as error:
        raise QueryTemplateError(
            f"query {template!r} uses the unknown placeholder ${error.args[0]}; "
            f"only {', '.join('$' + p for p in PLACEHOLDERS)} are substituted"
        ) from None
    except ValueError as error:
        raise QueryTemplateError(
            f"query {template!r}: {error} (write $$ for a literal $)"
        ) from None


class QueryFailed(Exception):
    def __init__(self, failure: MetricFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class PrometheusClient:
    """An instant-query client for one Prometheus base URL, with a whole-request timeout."""

    def __init__(
        self, base_url: str, session: aiohttp.ClientSession, timeout_s: float = 5.0
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"prometheusUrl must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def scalar(self, query: str) -> float | MetricFailure:
        """The single non-negative number `query` evaluates to, or why there is none."""
        try:
            data = await self._query(query)
            return _single_value(query, data)
        except QueryFailed as error:
            return error.failure

    async def queue_sample(
        self, namespace: str, name: str, waiting_query: str | None = None
    ) -> QueueSample | MetricFailure:
        """Waiting (required) and running (optional: only needed to detect idleness) requests."""
        waiting_expr = render_query(waiting_query or WAITING_QUERY, namespace, name)
        running_expr = render_query(RUNNING_QUERY, namespace, name)
        waiting, running = await asyncio.gather(
            self.scalar(waiting_expr), self.scalar(running_expr)
        )
        if isinstance(waiting, MetricFailure):
            return waiting
        return QueueSample(
            waiting=waiting, running=None if isinstance(running, MetricFailure) else running
        )

    async def loading_progress(self, namespace: str, name: str) -> LoadingProgress | MetricFailure:
        """The weights of the deployment's replicas that are still loading (NoSeries when none
        reports any); the rate is None until Prometheus has two samples of a shard's counter."""
        done, needed, rate = await asyncio.gather(
            *(
                self.scalar(render_query(query, namespace, name))
                for query in (LOADING_DONE_QUERY, LOADING_NEEDED_QUERY, LOADING_RATE_QUERY)
            )
        )
        for value in (done, needed):
            if isinstance(value, MetricFailure):
                return value
        assert isinstance(done, float) and isinstance(needed, float)
        return LoadingProgress(done, needed, None if isinstance(rate, MetricFailure) else rate)

    async def _query(self, query: str) -> dict[str, Any]:
        url = f"{self.base_url}/api/v1/query"
        try:
            async with self._session.get(
                url, params={"query": query}, timeout=self._timeout
            ) as resp:
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    raise _failed(
                        FailureReason.BAD_RESPONSE,
                        f"{url} answered HTTP {resp.status} with a body that is not JSON",
                    ) from None
        except TimeoutError:
            raise _failed(
                FailureReason.TIMEOUT,
                f"{url} did not answer within {self._timeout.total:g}s",
            ) from None
        except aiohttp.ClientError as error:
            raise _failed(FailureReason.UNREACHABLE, f"{url}: {error}") from None
        if not isinstance(body, dict):
            raise _failed(FailureReason.BAD_RESPONSE, f"{url} answered {type(body).__name__} JSON")
        if body.get("status") != "success":
            raise _failed(
                FailureReason.QUERY_ERROR,
                f"query {query!r} failed (HTTP {resp.status}, {body.get('errorType')}): "
                f"{body.get('error')}",
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise _failed(FailureReason.BAD_RESPONSE, f"{url} answered without a data object")
        return data


def _failed(reason: FailureReason, message: str) -> QueryFailed:
    return QueryFailed(MetricFailure(reason=str(reason), message=message))


def _single_value(query: str, data: dict[str, Any]) -> float:
    result_type, result = data.get("resultType"), data.get("result")
    if result_type == "vector" and isinstance(result, list):
        if not result:
            raise _failed(FailureReason.NO_SERIES, f"query {query!r} returned no series")
        if len(result) > 1:
            labels = ", ".join(str(series.get("metric", {})) for series in result[:3])
            raise _failed(
                FailureReason.SEVERAL_SERIES,
                f"query {query!r} returned {len(result)} series where one is expected "
                f"(e.g. {labels}); aggregate it, e.g. with sum(...)",
            )
        sample = result[0].get("value") if isinstance(result[0], dict) else None
    elif result_type == "scalar":
        sample = result
    else:
        raise _failed(
            FailureReason.NON_NUMERIC,
            f"query {query!r} returned a {result_type} result where a number is expected",
        )
    if not (isinstance(sample, list) and len(sample) == 2):
        raise _failed(FailureReason.BAD_RESPONSE, f"query {query!r}: malformed sample {sample!r}")
    return _parse_number(query, sample[1])


def _parse_number(query: str, text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _failed(
            FailureReason.NON_NUMERIC, f"query {query!r} returned {text!r}, not a number"
        ) from None
    if math.isnan(value):
        raise _failed(FailureReason.NOT_A_NUMBER, f"query {query!r} returned NaN")
    if math.isinf(value) or value < 0:
        raise _failed(
            FailureReason.NEGATIVE if value < 0 else FailureReason.NON_NUMERIC,
            f"query {query!r} returned {text}, not a queue length",
        )
    return value


def read_loading_progress(
    base_url: str, namespace: str, name: str, timeout_s: float = 5.0
) -> LoadingProgress | MetricFailure:
    """`PrometheusClient.loading_progress` for a caller in a thread (a reconcile pass)."""

    async def query() -> LoadingProgress | MetricFailure:
        # As the autoscaler's: no DNS cache, whose resolving task would outlive this loop.
        connector = aiohttp.TCPConnector(use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = PrometheusClient(base_url, session, timeout_s=timeout_s)
            return await client.loading_progress(namespace, name)

    return asyncio.run(query())
