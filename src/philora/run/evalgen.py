"""Greedy replies to held-out prompts: ``training_config.eval_generations`` during training and
the end-of-run report's generations.

A held-out prompt is an eval conversation up to its last assistant turn, and that turn is the
reference. ``eval_generations: N`` replies to the first N eval conversations at every evaluation,
so the same prompts show how the answers change over training (``metrics.jsonl``, TensorBoard
text, the report's table). Decoding is ``decoding.generate_ids``: transformers' ``generate``,
greedy, stopping on the model's end-of-turn tokens, in eval mode (no dropout, no NEFTune noise).
"""

import json
from typing import List, Sequence, Tuple

from ..data.encoding import TEMPLATE_KEYS
from ..model.decoding import chat_ids, generate_ids

MAX_NEW_TOKENS = 128


def held_out(messages: Sequence[dict]) -> Tuple[List[dict], str]:
    """(prompt: the conversation before its last assistant turn, as the template reads it, earlier
    tool calls included; reference: that turn's text, or its tool calls as JSON when it has no text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = [{k: m[k] for k in TEMPLATE_KEYS if k in m} for m in messages[:last]]
    turn = messages[last]
    return prompt, turn.get("content") or (json.dumps(turn["tool_calls"]) if turn.get("tool_calls") else "")


def eval_generations(model, tokenizer, examples: Sequence[dict],
                     max_new_tokens: int = MAX_NEW_TOKENS) -> List[dict]:
    """[{"prompt": messages, "reference": text, "output": greedy reply}] for ``examples`` (with
    their "messages"); the model is put back in the mode it was in."""
    prompts = [held_out(ex["messages"]) for ex in examples]
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    try:
        replies = generate_ids(model, tokenizer, [chat_ids(tokenizer, p) for p, _ in prompts],
                               max_new_tokens=max_new_tokens)
    finally:
        model.train(was_training)
    return [{"prompt": p, "reference": r, "output": tokenizer.decode(x, skip_special_tokens=True).strip()}
            for (p, r), x in zip(prompts, replies)]
