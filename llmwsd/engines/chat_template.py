"""A conversation to the model's prompt ids, and the tokens that end its answer: any engine's.

Both engines render prompts and stop answers the same way, with the model's own
tokenizer (transformers' ``AutoTokenizer``), so that a client cannot tell them
apart but by speed.
"""

from __future__ import annotations

import json
import re
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


# A template that renders tools itself names them: it is given them (and the calls as they are).
TEMPLATE_TOOLS = re.compile(r"\btools\b")

# The tools of a model whose template has none: one system text (docs/http-api.md#tools).
TOOLS_INSTRUCTION = (
    "You can call these functions (each line: its name, what it does and the JSON schema "
    "of its arguments):\n{functions}\n"
    'To call one, answer with only a JSON object {{"name": "<the function\'s name>", '
    '"arguments": {{<its arguments>}}}} and nothing else. A call\'s result comes back '
    'in a message that begins "Result of <the function\'s name>:". Otherwise, answer as usual.'
)


def template_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders tools (its text uses ``tools``)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default and, maybe, "tool_use"
        template = " ".join(str(t) for t in template.values())
    return bool(template) and TEMPLATE_TOOLS.search(str(template)) is not None


def tools_instruction(tools: list[dict[str, Any]]) -> str:
    """The fallback's system text, listing ``tools`` (OpenAI's function tools)."""
    lines = []
    for tool in tools:
        function = tool["function"]
        entry = {
            "name": function["name"],
            "description": function.get("description") or "",
            "parameters": function.get("parameters") or {"type": "object", "properties": {}},
        }
        lines.append(json.dumps(entry, ensure_ascii=False))
    return TOOLS_INSTRUCTION.format(functions="\n".join(lines))


def plain_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, str]]:
    """The conversation for a template without tools: role and text only.

    The tools become a system text (merged into the first system message), an assistant's
    calls the JSON objects it would have answered, and tool results (consecutive ones
    together) a user message each, "Result of NAME: ...".
    """
    plain: list[dict[str, str]] = []
    results = False  # the last message is tool results
    for message in messages:
        content = message.get("content") or ""
        if message["role"] == "tool":
            result = f"Result of {message.get('name') or 'the call'}: {content}"
            if results:
                plain[-1]["content"] += "\n" + result
            else:
                plain.append({"role": "user", "content": result})
            results = True
            continue
        results = False
        calls = message.get("tool_calls") or []
        if calls:
            objects = [
                json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                for c in calls
            ]
            content = "\n".join(([content] if content else []) + objects)
        plain.append({"role": message["role"], "content": content})
    if tools:
        instruction = tools_instruction(tools)
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{instruction}"}
        else:
            plain.insert(0, {"role": "system", "content": instruction})
    return plain


def template_ids(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """The prompt's token ids: the chat template with the assistant's turn opened.

    ``tools`` (OpenAI's function tools) and the messages' tool calls and results go to a
    template that renders tools; for one that does not, they become text (plain_messages):
    this is the one place either engine renders them.
    """
    if len(messages) == 1 and messages[0]["role"] == RAW_PROMPT_ROLE:
        return list(tokenizer(messages[0]["content"])["input_ids"])
    native = template_tools(tokenizer)
    if not native:
        messages = plain_messages(messages, tools)
    if getattr(tokenizer, "chat_template", None):
        more = {"tools": tools} if native and tools else {}
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, **more
        )
        return list(encoded["input_ids"])
    # A base model without a template: the contents, one per line.
    text = "".join(f"{m.get('content', '')}\n" for m in messages)
    return list(tokenizer(text)["input_ids"])
