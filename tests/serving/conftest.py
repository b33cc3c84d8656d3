"""One Ray instance and one deployed grok-tiny app shared by the serving tests (Ray is slow to start)."""

import pytest

from grokserve.serving.config import ServingConfig
from testkit.serving import LIMITS, MODEL, free_port


@pytest.fixture(scope="session")
def serving():
    from grokserve.serving.launcher import LocalServing

    config = ServingConfig(name=MODEL, model={"preset": MODEL}, serving=LIMITS)
    with LocalServing(config, port=free_port()) as local:
        yield local


@pytest.fixture(scope="session")
def base_url(serving):
    return serving.url
