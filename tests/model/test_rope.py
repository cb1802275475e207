"""rope.py: LongRoPE's factor set chosen per conversation, against the model's own rotary module
run on each conversation alone."""

import pytest
import torch

from philora.model.rope import PerConversationRoPE, install, span_ends


def longrope_config(switch=16):
    from transformers import Phi3Config
    return Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4 * switch,
                      original_max_position_embeddings=switch, pad_token_id=0,
                      rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                    "long_factor": [3.0 + i for i in range(8)]})


def test_span_ends_are_each_runs_last_position_plus_one():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [1, 1, 1, 0, 1, 2, 3, 4, 5]])
    assert span_ends(pos).tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4], [2, 2, 2, 6, 6, 6, 6, 6, 6]]
    assert span_ends(torch.tensor([[5000]])).tolist() == [[5001]]  # a decoding step far in


@pytest.mark.parametrize("lengths", [[10, 30, 16, 17], [5, 9], [20, 40]])
def test_each_conversation_gets_the_factors_it_gets_alone(lengths):
    from transformers import Phi3ForCausalLM
    model = Phi3ForCausalLM(longrope_config(16))
    rotary = model.model.rotary_emb
    assert install(model) == 16 and install(model) == 16  # idempotent
    wrapped = model.model.rotary_emb
    assert isinstance(wrapped, PerConversationRoPE) and wrapped.rotary is rotary
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    x = torch.zeros(1, pos.shape[1], 32)
    cos, sin = wrapped(x, pos)
    at = 0
    for n in lengths:
        c, s = rotary(x[:, at:at + n], torch.arange(n)[None])
        torch.testing.assert_close(cos[:, at:at + n], c, rtol=0, atol=0)
        torch.testing.assert_close(sin[:, at:at + n], s, rtol=0, atol=0)
        at += n
    if min(lengths) <= 16 < max(lengths):  # mixed: the plain module would give the short ones long factors
        c, _ = rotary(x, pos)
        assert (c - cos).abs().max() > 1e-2


def test_other_models_are_left_alone():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2))
    rotary = model.model.rotary_emb
    assert install(model) is None and model.model.rotary_emb is rotary
