"""LocalServing on a cluster it joins (RAY_ADDRESS) leaves that cluster's other applications be."""

import os
import subprocess
import sys

import pytest
import ray
from ray import serve

from grokserve.serving.launcher import APP_NAME
from testkit.serving import MODEL

pytestmark = pytest.mark.slow

JOIN_DEPLOY_CLOSE = """
import sys
from grokserve.serving.config import ServingConfig
from grokserve.serving.launcher import LocalServing

config = ServingConfig(name="joined", model={"preset": sys.argv[1]})
local = LocalServing(config, port=int(sys.argv[2]), ray_address=sys.argv[3])
local.start_ray_and_serve()
local.deploy(config, "joined", "/joined")
local.close()
"""


def test_closing_a_joined_cluster_deletes_only_its_own_application(serving):
    address = ray.get_runtime_context().gcs_address
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run(
        [sys.executable, "-c", JOIN_DEPLOY_CLOSE, MODEL, str(serving.port), address],
        env=environment,
        check=True,
        timeout=240,
    )
    applications = serve.status().applications
    assert "joined" not in applications
    assert applications[APP_NAME].status == "RUNNING"
