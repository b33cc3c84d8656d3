"""Checkpoint directories, tokenizers and placement plans as the replica loads them."""

import pytest
import torch
from safetensors.torch import save_file

from grokserve.model import GrokModel
from grokserve.model.placement import PlacementError
from grokserve.model.sampling import SamplingParams, generate
from grokserve.serving.config import ReplicaModel, ServingConfig
from grokserve.serving.loading import (
    DEMO_CHECKPOINT,
    ByteTokenizer,
    kv_cache_tokens,
    load_shard,
    load_tokenizer,
    model_config,
    placement_plan,
)
from testkit.tokenizers import GROK_SPECIAL


def test_checkpoint_directory_round_trip(tmp_path):
    model = GrokModel.from_preset("grok-tiny", seed=3)
    model.config.to_json(tmp_path / "config.json")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors"
    )
    config = ServingConfig(model={"source": f"file://{tmp_path}"})
    loaded = load_shard(config, rank=0, master=("127.0.0.1", 0))
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(loaded(tokens), model(tokens))
    assert isinstance(load_tokenizer(config.model), ByteTokenizer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_fails_instead_of_using_the_cpu():
    config = ServingConfig(resources={"device": "cuda"})
    with pytest.raises(ValueError, match="asked to run on CUDA"):
        load_shard(config, rank=0, master=("127.0.0.1", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_device_stays_on_the_cpu_beside_cuda():
    loaded = load_shard(ServingConfig(resources={"device": "cpu"}), rank=0, master=("", 0))
    assert loaded(torch.tensor([[5, 6, 7]])).device.type == "cpu"


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="is not a checkpoint"):
        model_config(ReplicaModel(source=str(tmp_path)))
    with pytest.raises(ValueError, match="does not exist"):
        model_config(ReplicaModel(source=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"ftp://bucket/ckpt: unknown scheme ftp://"):
        model_config(ReplicaModel(source="ftp://bucket/ckpt"))


def test_byte_tokenizer_round_trips_utf8():
    tokenizer = ByteTokenizer(256, GROK_SPECIAL)
    text = "Grok – «ünïcödé» ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert min(tokenizer.encode(text)) >= 4 and max(tokenizer.encode(text)) < 256


def test_plan_follows_the_parallelism():
    config = ServingConfig(
        model={"preset": "grok-tiny"},
        parallelism={"gpusPerNode": 2, "nodesPerReplica": 2, "tensor": 2, "expert": 2},
    )
    plan = placement_plan(config)
    assert plan.world_size == 4 and plan.parallelism.tensor == 2
    assert [r.node for r in plan.ranks] == [0, 0, 1, 1]


def test_the_demo_checkpoint_ships_and_writes_words():
    config = ServingConfig(model={"source": str(DEMO_CHECKPOINT)})
    tokenizer = load_tokenizer(config.model)
    assert tokenizer.vocab_size == model_config(config.model).vocab_size
    model = load_shard(config, rank=0, master=("127.0.0.1", 0))
    prompt = tokenizer.encode("Return the")
    ids = generate(model, prompt, SamplingParams(temperature=0, max_tokens=40))
    words = tokenizer.decode(ids).split()
    # Trained on English docstrings: mostly lower-case words, not byte soup.
    assert len(words) >= 5
    assert sum(w.strip(".,()'\"").isalpha() for w in words) >= len(words) // 2, words


def test_the_kv_cache_fills_the_gpu_memory_the_plan_leaves():
    def config(**serving):
        return ServingConfig(
            model={"preset": "grok-1", "dtype": "bfloat16", "quantization": "int8"},
            parallelism={"gpusPerNode": 8},
            resources={"device": "cuda", "acceleratorResource": "GPU"},
            serving=serving,
        )

    sized = kv_cache_tokens(config())
    # grok-1 int8 on 8 × 80 GiB: 64 layers × 1 kv head × 128 × 2 (k, v) × 2 bytes = 32 KiB per token
    # per GPU, in the ~32 GB that weights (41 GB), workspace and reserve leave: ~970k tokens.
    plan = placement_plan(config(kvCacheTokens=sized))
    assert plan.ranks[0].kv_cache // sized == 64 * 128 * 2 * 2
    assert sized > 900_000 and max(rank.total for rank in plan.ranks) <= plan.cluster.gpu_memory
    with pytest.raises(PlacementError, match="does not fit"):
        placement_plan(config(kvCacheTokens=sized + 16))
    assert kv_cache_tokens(config(kvCacheTokens=4096)) == 4096
    on_cpu = ServingConfig(model={"preset": "grok-tiny"}, serving={"maxBatchSize": 4})
    assert kv_cache_tokens(on_cpu) == 4 * 512


def test_byte_ids_follow_the_configs_special_tokens() -> None:
    from grokserve.model.config import SpecialTokens

    moved = ByteTokenizer(512, SpecialTokens(pad=0, bos=1, eos=9))
    assert moved.encode("A") == [ord("A") + 11]
    assert moved.decode([9, ord("A") + 11]) == "A"
    assert ByteTokenizer(256, GROK_SPECIAL).encode("A") == [ord("A") + 4]
