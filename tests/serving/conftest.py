"""One Ray cluster and one deployed grok-tiny app shared by the serving tests (Ray is slow to start).

The cluster simulates two 2-"GPU" nodes (custom resources), so the sharded test can deploy a G = 4
replica across them next to the G = 1 app the other tests use.
"""

import pytest

from grokserve.serving.config import ServingConfig
from testkit.serving import LIMITS, MODEL, free_port


@pytest.fixture(scope="session")
def serving():
    from grokserve.serving.launcher import ClusterShape, LocalServing

    config = ServingConfig(name=MODEL, model={"preset": MODEL}, serving=LIMITS)
    shape = ClusterShape(nodes=2, gpus_per_node=2)
    with LocalServing(config, port=free_port(), shape=shape) as local:
        yield local


@pytest.fixture(scope="session")
def base_url(serving):
    return serving.url
