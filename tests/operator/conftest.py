"""Fixtures of the autoscaling tests: a test exporter and a real Prometheus scraping it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.autoscaling import scraping
from testkit.prometheus import PrometheusServer, TestExporter

# Kubernetes service discovery labels the serving pods' series with their namespace.
SCRAPED_NAMESPACE = "llm"


@pytest.fixture
def exporter() -> Iterator[TestExporter]:
    with TestExporter() as test_exporter:
        yield test_exporter


@pytest.fixture
def prometheus(exporter: TestExporter) -> Iterator[PrometheusServer]:
    with scraping(exporter, SCRAPED_NAMESPACE) as server:
        yield server
