import json
import re
from dataclasses import replace

import pytest

from grokserve.model import PRESETS, ConfigError, GrokConfig, preset
from testkit.checkpoints import TWELVE_LAYERS, hf_config


def test_grok1_preset_has_the_released_sizes() -> None:
    config = preset("grok-1")
    assert config.ffn_size == 32768
    assert config.num_parameters() == 315_684_820_992
    assert (config.pad_token, config.bos_token, config.eos_token) == (0, 1, 2)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(tmp_path, name: str) -> None:
    path = tmp_path / "config.json"
    PRESETS[name].to_json(path)
    assert GrokConfig.from_json(path) == PRESETS[name]


def test_reference_config_nested_as_in_run_py_is_read(tmp_path) -> None:
    grok = preset("grok-1").to_dict()
    model_fields = (
        "emb_size",
        "widening_factor",
        "key_size",
        "num_q_heads",
        "num_kv_heads",
        "num_layers",
        "attn_output_multiplier",
        "num_experts",
        "num_selected_experts",
    )
    nested = {k: v for k, v in grok.items() if k not in model_fields}
    nested["model"] = {k: grok[k] for k in model_fields}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(nested))
    assert GrokConfig.from_json(path) == preset("grok-1")


def test_hugging_face_config_is_read(tmp_path) -> None:
    hf = {
        "vocab_size": 131072,
        "hidden_size": 6144,
        "intermediate_size": 32768,
        "num_hidden_layers": 64,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "attn_output_multiplier": 0.08838834764831845,
        "embedding_multiplier_scale": 78.38367176906169,
        "output_multiplier_scale": 0.5773502691896257,
        "max_attn_value": 30.0,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    config = GrokConfig.from_json(path)
    assert config.ffn_size == 32768 and config.key_size == 128
    assert config.num_parameters() == preset("grok-1").num_parameters()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_kv_heads": 7}, "num_q_heads .* multiple of num_kv_heads"),
        ({"num_selected_experts": 9}, "num_selected_experts .* cannot exceed num_experts"),
        ({"emb_size": 0}, "emb_size must be a positive integer, got 0"),
        ({"num_experts": 2.5}, "num_experts must be a positive integer, got 2.5"),
        ({"num_layers": "64"}, "num_layers must be a positive integer, got '64'"),
        ({"pad_token": -1}, "pad_token must be an integer of at least 0"),
        ({"rope_theta": "1e4"}, "rope_theta must be a finite number"),
        ({"key_size": 127}, "key_size must be even"),
        ({"eos_token": 131072}, "eos_token .* below vocab_size"),
        ({"output_multiplier_scale": float("nan")}, "output_multiplier_scale must be a finite"),
    ],
)
def test_unworkable_configs_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        replace(preset("grok-1"), **change)


def test_missing_fields_and_unknown_presets_are_reported(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(ConfigError, match="missing required field.*emb_size"):
        GrokConfig.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GrokConfig.from_json(path)
    with pytest.raises(ConfigError, match="unknown preset 'grok-2'.*grok-1"):
        preset("grok-2")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads must be a positive"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
        ({"hidden_size": "16"}, "hidden_size must be a positive integer, got '16'"),
        ({"hidden_size": 16.5}, "hidden_size must be a positive integer, got 16.5"),
        ({"num_experts": 0}, "num_experts must be a positive integer, got 0"),
        ({"num_key_value_heads": -2}, "num_key_value_heads must be a positive integer, got -2"),
        ({"vocab_size": None}, "vocab_size must be a positive integer, got None"),
        ({"eos_token_id": True}, "eos_token_id must be an integer of at least 0, got True"),
        ({"rms_norm_eps": "small"}, "rms_norm_eps must be a finite number, got 'small'"),
    ],
)
def test_bad_hugging_face_fields_are_named(tmp_path, change: dict, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**hf_config(TWELVE_LAYERS), **change}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        GrokConfig.from_json(path)
