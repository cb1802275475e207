"""Decoding: chat-template prompts and generation that stops on the model's end-of-turn tokens.

Below training (the evaluations' generations use it) and below ``use/`` (generate, chat, report).
Decoding is transformers' ``generate``; the stop tokens are ``families.stop_token_ids`` (the
generation config's eos ids, the tokenizer's eos, the template's end-of-turn token), never part
of the reply.
"""

from typing import List, Sequence

import torch

from ..data.encoding import template_inputs
from .families import stop_token_ids


def chat_ids(tokenizer, messages: Sequence[dict]) -> List[int]:
    """Token ids of ``messages`` through the chat template, with the assistant header appended."""
    chat, kwargs = template_inputs(messages)  # as training: tools= for templates that read it
    out = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, **kwargs)
    if hasattr(out, "keys"):  # a BatchEncoding (transformers 5)
        out = out["input_ids"]
    out = out.tolist() if hasattr(out, "tolist") else list(out)
    return [int(t) for t in (out[0] if out and isinstance(out[0], list) else out)]


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: Sequence[Sequence[int]], temperature: float = 0.0,
                 top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
                 streamer=None) -> List[List[int]]:
    """New token ids for each prompt (left-padded batch), cut before the first stop token.
    temperature 0: greedy; else sampling with ``top_p`` (no top-k), seeded."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    sample = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                              use_cache=True, **sample)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         generation_config=config, streamer=streamer)
    replies = []
    for row in out[:, width:].tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        replies.append(row[:cut])
    return replies


def generate_reply(model, tokenizer, messages: Sequence[dict], temperature: float = 0.7,
                   top_p: float = 0.9, max_new_tokens: int = 256, seed: int = 0,
                   stream: bool = False) -> str:
    """The assistant's reply to ``messages`` (stop tokens excluded); ``stream`` prints it as it comes."""
    streamer = None
    if stream:
        from transformers import TextStreamer
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    (reply,) = generate_ids(model, tokenizer, [chat_ids(tokenizer, messages)], temperature, top_p,
                            max_new_tokens, seed, streamer)
    return tokenizer.decode(reply, skip_special_tokens=True).strip()
