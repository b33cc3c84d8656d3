"""A replica of G = 4 shard workers spread over two simulated nodes serves what G = 1 serves."""

import httpx
import pytest

from testkit.serving import MODEL

pytestmark = pytest.mark.slow
PROMPTS = ["The experts", "Two nodes, four shards: ", "x"]


def _complete(base, prompt, **sampling):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, **sampling}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _greedy(base, prompt):
    return _complete(base, prompt, temperature=0)["choices"][0]["text"]


def test_four_shards_on_two_nodes_match_one_shard(serving):
    sharded = serving.shape.apply(serving.config)
    assert sharded.parallelism.shards == 4
    base = serving.deploy(sharded, "sharded", "/sharded")
    placement = httpx.get(f"{base}/v1/placement", timeout=30).json()
    shards = placement["shards"]
    assert [s["rank"] for s in shards] == [0, 1, 2, 3]
    assert placement["nodes"] == 2, "the 4 shards should span both simulated nodes"
    assert shards[0]["node_id"] == shards[1]["node_id"] != shards[2]["node_id"]
    assert all(s["resources"].get("simulated_gpu") == 1 for s in shards)
    plan = placement["plan"]
    assert plan["cluster"]["nodes"] == 2 and len(plan["ranks"]) == 4
    experts_on_node = {0: set(), 1: set()}
    for rank in plan["ranks"]:
        experts_on_node[rank["node"]] |= {e["expert"] for e in rank["experts"]}
    assert experts_on_node == {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}}, "each expert inside one node"
    assert [_greedy(base, p) for p in PROMPTS] == [_greedy(serving.url, p) for p in PROMPTS]

    # Sampling: every rank must draw the same token, also when the request brings no seed.
    seeded = {"temperature": 1.0, "seed": 11}
    assert (
        _complete(base, PROMPTS[0], **seeded)["choices"]
        == (_complete(serving.url, PROMPTS[0], **seeded)["choices"])
    )
    unseeded = _complete(base, PROMPTS[1], temperature=1.0, n=2)
    assert len(unseeded["choices"]) == 2 and unseeded["usage"]["completion_tokens"] > 0
    assert {choice["finish_reason"] for choice in unseeded["choices"]} <= {"stop", "length"}
