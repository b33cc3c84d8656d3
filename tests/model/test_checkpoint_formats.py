"""Every checkpoint format loads to the same model, to the bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from grokserve.model import GrokModel, load_model
from grokserve.model.checkpoint import CheckpointError, open_checkpoint, save_pretrained
from grokserve.model.quantization import QuantizedWeight
from testkit.checkpoints import (
    TWELVE_LAYERS,
    Checkpoints,
    per_block_product,
    write_all,
    write_released,
)

FORMATS = {
    "xai": "xai",
    "hf-transformer": "hf",
    "hf-model": "hf",
    "hf-transformer-sharded": "hf",
    "hf-model-sharded": "hf",
    "grokserve": "grokserve",
    "grokserve-int8": "grokserve",
}
TOKENS = torch.tensor([[5, 9, 13, 2, 40, 63, 1], [0, 0, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return write_all(tmp_path_factory.mktemp("checkpoints"))


@pytest.mark.parametrize("kind", list(FORMATS))
def test_every_format_loads_to_the_same_float32_logits(checkpoints: Checkpoints, kind: str) -> None:
    reader = open_checkpoint(checkpoints.paths[kind])
    assert reader.format == FORMATS[kind]
    assert reader.config == TWELVE_LAYERS
    model = load_model(checkpoints.paths[kind], dtype="float32")
    assert torch.equal(model(TOKENS), checkpoints.dense(TOKENS))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoints.dense.state_dict()[name]), name


@pytest.mark.parametrize("kind", ["xai", "grokserve-int8"])
def test_int8_loading_keeps_weights_and_scales_as_stored(
    checkpoints: Checkpoints, kind: str
) -> None:
    model = load_model(checkpoints.paths[kind], quantization="int8")
    stored = checkpoints.quantized.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == stored.keys()
    for name, tensor in stored.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert isinstance(model.layers[10].attn.wo, QuantizedWeight)
    assert model.layers[10].attn.wo.row_blocks == 8
    assert torch.equal(model(TOKENS), checkpoints.quantized(TOKENS))


def test_dequantised_matrix_is_weight_times_scale_per_row_block(checkpoints: Checkpoints) -> None:
    reader = open_checkpoint(checkpoints.paths["xai"])
    model = load_model(checkpoints.paths["xai"])
    for name in ("layers.11.attn.wo", "layers.2.moe.w_down", "layers.0.moe.w_gate"):
        stored = reader.read(name)
        assert isinstance(stored, QuantizedWeight)
        owner, attribute = name.rsplit(".", 1)
        loaded = getattr(model.get_submodule(owner), attribute)
        assert torch.equal(loaded, per_block_product(stored.weight, stored.scales)), name
    bf16 = load_model(checkpoints.paths["xai"], dtype="bfloat16")
    expected = per_block_product(
        reader.read("layers.3.attn.wq").weight, reader.read("layers.3.attn.wq").scales
    )
    assert bf16.layers[3].attn.wq.dtype == torch.bfloat16
    assert torch.equal(bf16.layers[3].attn.wq, expected.to(torch.bfloat16))
    assert bf16.layers[3].moe.router.dtype == torch.float32


def test_release_files_follow_lexicographic_layer_order(checkpoints: Checkpoints) -> None:
    reader = open_checkpoint(checkpoints.paths["xai"] / "ckpt-0")  # the ckpt-0 directory itself
    # Layers sorted as strings: 0, 1, 10, 11, 2, ...; 12 files per layer after the 2 global ones;
    # within a layer multi_head_attention/query is the 6th file.
    assert reader.files["embed.weight"].name == "tensor00000_000"
    assert reader.files["final_norm.scale"].name == "tensor00001_000"
    assert reader.files["layers.10.attn.wq"].name == f"tensor{2 + 12 * 2 + 5:05d}_000"
    assert reader.files["layers.2.moe.router"].name == f"tensor{2 + 12 * 4 + 11:05d}_000"
    assert reader.files["layers.9.moe.w_gate"].name == f"tensor{2 + 12 * 11:05d}_000"


def test_release_without_config_json_uses_the_argument_or_else_grok_1(
    checkpoints: Checkpoints, tmp_path: Path
) -> None:
    bare = write_released(checkpoints.quantized, tmp_path / "bare", with_config=False)
    model = load_model(bare, config=TWELVE_LAYERS)
    assert torch.equal(model(TOKENS), checkpoints.dense(TOKENS))
    with pytest.raises(CheckpointError, match="64-layer config expects 770 files"):
        open_checkpoint(bare)


def test_numpy_1_protocol_2_pickles_load_too(checkpoints: Checkpoints, tmp_path: Path) -> None:
    old = write_released(checkpoints.quantized, tmp_path / "old", protocol=2)
    for file in (old / "ckpt-0").iterdir():  # as numpy 1.x names its module
        data = file.read_bytes()
        assert b"numpy._core.multiarray" in data
        file.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert torch.equal(load_model(old)(TOKENS), checkpoints.dense(TOKENS))


@pytest.mark.parametrize("kind", FORMATS)
def test_bfloat16_load_equals_the_float_model_cast_to_bfloat16(
    checkpoints: Checkpoints, kind: str
) -> None:
    # int8 sources included: dequantising must happen in float32, before the cast to bf16.
    model = load_model(checkpoints.paths[kind], dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.layers[0].pre_attn_norm.scale.dtype == torch.float32
    assert torch.equal(model(TOKENS), checkpoints.dense.astype(torch.bfloat16)(TOKENS))


def test_float_source_loads_as_int8_with_the_release_row_blocks(checkpoints: Checkpoints) -> None:
    model = load_model(checkpoints.paths["hf-transformer"], quantization="int8")
    assert model.layers[4].moe.w_down.row_blocks == 8
    assert model.layers[4].moe.w_up.row_blocks == 1
    assert (model(TOKENS) - checkpoints.dense(TOKENS)).abs().max() < 0.05


def test_save_pretrained_round_trips_a_bfloat16_model(tmp_path: Path) -> None:
    model = GrokModel.from_preset("grok-tiny", seed=3, dtype=torch.bfloat16)
    loaded = load_model(save_pretrained(model, tmp_path / "saved"), dtype="bfloat16")
    tokens = torch.tensor([[4, 5, 6, 7]])
    assert torch.equal(loaded(tokens), model(tokens))


def test_reader_info_matches_the_tensors_it_reads(checkpoints: Checkpoints) -> None:
    for kind in FORMATS:
        reader = open_checkpoint(checkpoints.paths[kind])
        for name in (
            "embed.weight",
            "layers.10.attn.wo",
            "layers.1.moe.w_up",
            "layers.5.moe.router",
        ):
            info, tensor = reader.info(name), reader.read(name)
            assert info.shape == tuple(tensor.shape), (kind, name)
            if isinstance(tensor, QuantizedWeight):
                assert (info.dtype, info.scales_dtype) == ("int8", "bfloat16")
                assert info.scales_shape == tuple(tensor.scales.shape)
            else:
                assert info.dtype == str(tensor.dtype).removeprefix("torch.")


def test_a_sharded_port_reads_only_the_shards_it_needs(
    checkpoints: Checkpoints, tmp_path: Path
) -> None:
    copy = shutil.copytree(checkpoints.paths["hf-model-sharded"], tmp_path / "port")
    (copy / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint shard .*model-00002-of-00003"):
        open_checkpoint(copy)


def test_progress_bar_reports_tensors_loaded(
    checkpoints: Checkpoints, capsys: pytest.CaptureFixture[str]
) -> None:
    load_model(checkpoints.paths["xai"], progress=True)
    assert f"{2 + 12 * 12}/{2 + 12 * 12}" in capsys.readouterr().err
    load_model(checkpoints.paths["xai"])  # small checkpoints load quietly
    assert capsys.readouterr().err == ""
