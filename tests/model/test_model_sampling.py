from pathlib import Path

import pytest
import torch

from grokserve.model import GrokModel
from grokserve.model.sampling import SamplingParams, generate, sample
from grokserve.model.tokenizer import Tokenizer, TokenizerError
from testkit.tokenizers import GROK_SPECIAL, train_tokenizer

SHARED_TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "grok1" / "tokenizer.model"


def test_greedy_picks_the_lowest_id_among_equal_maxima() -> None:
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0]])
    assert sample(logits, temperature=0).tolist() == [1]


def test_top_k_one_and_tiny_top_p_reduce_to_greedy() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), greedy)


def test_top_k_only_draws_from_the_k_best() -> None:
    logits = torch.arange(10.0)[None].repeat(200, 1)
    drawn = sample(logits, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert set(drawn.tolist()) == {7, 8, 9}


def test_same_seed_same_draws() -> None:
    logits = torch.zeros(1, 100)
    first = [int(sample(logits, generator=torch.Generator().manual_seed(5))) for _ in range(3)]
    second = [int(sample(logits, generator=torch.Generator().manual_seed(5))) for _ in range(3)]
    assert first == second


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1.0),
        ("top_k", -1),
        ("top_p", 0.0),
        ("max_tokens", -1),
        ("repetition_penalty", 0.0),
        ("min_tokens", -1),
        ("logprobs", -1),
    ],
)
def test_invalid_sampling_params_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_generate_greedy_matches_repeated_full_forward_and_stops_at_max_tokens() -> None:
    model = GrokModel.from_preset("grok-tiny", seed=2)
    prompt = [5, 6, 7]
    produced = generate(
        model, prompt, SamplingParams(temperature=0, max_tokens=5, stop_on_eos=False)
    )
    sequence = list(prompt)
    for _ in range(5):
        sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert produced == sequence[3:]


def test_generate_stops_at_eos() -> None:
    model = GrokModel.from_preset("grok-tiny", seed=2)
    with torch.no_grad():
        model.embed.weight[model.config.eos_token] *= (
            50  # make EOS the most likely continuation everywhere
        )
    produced = generate(model, [5, 6], SamplingParams(temperature=0, max_tokens=10))
    assert produced == [model.config.eos_token]


def test_trained_tokenizer_round_trips_and_has_grok_special_ids(tmp_path) -> None:
    tokenizer = Tokenizer(train_tokenizer(tmp_path), GROK_SPECIAL)
    assert [tokenizer.piece(i) for i in GROK_SPECIAL] == ["[PAD]", "[BOS]", "[EOS]"]
    ids = tokenizer.encode("the quick fox has 8 experts", add_bos=True)
    assert ids[0] == GROK_SPECIAL.bos
    assert tokenizer.decode(ids) == "the quick fox has 8 experts"


def test_missing_or_corrupt_tokenizer_is_reported(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "nope.model", GROK_SPECIAL)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(bad, GROK_SPECIAL)


@pytest.mark.skipif(
    not SHARED_TOKENIZER.exists(), reason=f"Grok-1's tokenizer is not at {SHARED_TOKENIZER}"
)
def test_real_grok1_tokenizer_vocabulary() -> None:
    tokenizer = Tokenizer(SHARED_TOKENIZER, GROK_SPECIAL)
    assert tokenizer.vocab_size == 131072
    assert [tokenizer.piece(i) for i in range(4)] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    ids = tokenizer.encode("Grok has 314 billion parameters")
    assert tokenizer.decode(ids) == "Grok has 314 billion parameters"
    assert [tokenizer.piece(i) for i in tokenizer.encode("314")][-3:] == [
        "3",
        "1",
        "4",
    ]  # digits split
