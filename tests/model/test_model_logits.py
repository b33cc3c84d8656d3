"""The SamplingParams' logit adjustments, as the APIs that define them say."""

import pytest
import torch

from grokserve.model.logits import adjust
from grokserve.model.sampling import SamplingParams, generate

EOS = 2


def test_logit_bias_adds_to_the_named_tokens():
    logits = torch.zeros(8)
    adjusted = adjust(logits, SamplingParams(logit_bias={3: 5.0, 7: -100.0}), [], [], EOS)
    assert adjusted.tolist() == [0, 0, 0, 5, 0, 0, 0, -100]
    assert logits.tolist() == [0] * 8, "the input is not modified"


def test_presence_and_frequency_penalties_count_the_generated_tokens_only():
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    adjusted = adjust(torch.zeros(6), params, prompt=[1, 1], output=[4, 4, 5], eos_id=EOS)
    assert adjusted.tolist() == pytest.approx([0, 0, 0, 0, -1.0, -0.75])


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    adjusted = adjust(logits, SamplingParams(repetition_penalty=2.0), [0], [1], EOS)
    assert adjusted.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    params = SamplingParams(min_tokens=2, stop_token_ids=(5,))
    early = adjust(torch.zeros(6), params, [], [3], EOS)
    assert early[EOS] == float("-inf") and early[5] == float("-inf") and early[4] == 0
    assert torch.isfinite(adjust(torch.zeros(6), params, [], [3, 3], EOS)).all()


def test_generate_applies_the_adjustments():
    from grokserve.model import GrokModel

    model = GrokModel.from_preset("grok-tiny", seed=0)
    forced = SamplingParams(temperature=0, max_tokens=4, logit_bias={42: 100.0})
    assert generate(model, [5, 6], forced) == [42] * 4
