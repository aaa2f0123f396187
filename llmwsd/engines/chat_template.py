"""A conversation to the model's prompt ids, and the tokens that end its answer: any engine's.

Both engines render prompts and stop answers the same way, with the model's own
tokenizer (transformers' ``AutoTokenizer``), so that a client cannot tell them
apart but by speed.
"""

from __future__ import annotations

from typing import Any

# Chat templates end a turn with one of these; generation stops on any that exists.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>")

# The role of a raw prompt (OpenAI's /v1/completions): its one message is the whole prompt,
# tokenized as it is, without the chat template.
RAW_PROMPT_ROLE = "raw_prompt"


def end_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """EOS ids of the generation config and tokenizer, plus the chat template's end tokens."""
    ids: set[int] = set()
    for eos in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(i for i in eos if isinstance(i, int))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[name] for name in END_OF_TURN_TOKENS if name in vocab)
    return sorted(ids)


def template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids: the chat template with the assistant's turn opened."""
    if len(messages) == 1 and messages[0]["role"] == RAW_PROMPT_ROLE:
        return list(tokenizer(messages[0]["content"])["input_ids"])
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])
    # A base model without a template: the contents, one per line.
    text = "".join(f"{m.get('content', '')}\n" for m in messages)
    return list(tokenizer(text)["input_ids"])
