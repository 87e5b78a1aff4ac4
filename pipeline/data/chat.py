"""Prompts as one user turn or as a conversation, in one place.

A prompt is either a string (one user turn: what `data.prompts` held before conversations) or a conversation: a
list of `{role, content}` messages (TRL's conversational format) with optional system messages first, user and
assistant turns after, ending with a user turn. Tables keep both views: `prompt` is the text people read (the user
turn itself, or the conversation rendered as plain text by `plain_text`) and `prompt_messages` the conversation
(null for a single user turn, so plain prompts stay exactly what they were). Every model sees the conversation
under its own chat template (`pipeline.compute.logprobs.prompt_ids`); text-only consumers (HTTP and local judges' templates,
Python labellers and metrics) get `plain_text`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

Message = dict[str, str]
Prompt = str | list[Message]
ROLES = ("system", "user", "assistant")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def as_messages(prompt: Prompt) -> list[Message]:
    """The prompt as a conversation (a string is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def simplify(messages: list[Message]) -> Prompt:
    """A conversation of one user turn is that turn's text; anything else stays a conversation."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def plain_text(prompt: Prompt) -> str:
    """The text of a prompt for readers and text-only judges: a single user turn as is, a conversation as
    'System: …', 'User: …', 'Assistant: …' paragraphs."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in prompt)


def with_prefix(prompt: Prompt, prefix: str) -> Prompt:
    """`prefix` before the last user turn's text (Sr-DPO's quality instruction P ⊕ x, METHODS §4)."""
    if isinstance(prompt, str):
        return f"{prefix} {prompt}"
    messages = as_messages(prompt)
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last] = {"role": "user", "content": f"{prefix} {messages[last]['content']}"}
    return messages


def check_prompt(messages: Any, where: str) -> list[Message]:
    """A conversation usable as a prompt, or an error naming `where`: messages with a known role and text content,
    at least one user turn, ending with a user turn (the model answers next)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: a conversation must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be {{role: system|user|assistant, content: text}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise ValueError(f"{where}: the conversation has no user turn")
    if out[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt ends with a {out[-1]['role']} turn; a prompt must end with a user turn")
    return out


def prompts_of(table: pa.Table) -> list[Prompt]:
    """Each row's prompt: its `prompt_messages` conversation when set, else its `prompt` text."""
    texts = table.column("prompt").to_pylist()
    if "prompt_messages" not in table.column_names:
        return texts
    convs = table.column("prompt_messages").to_pylist()
    return [t if c is None else [{"role": m["role"], "content": m["content"]} for m in c] for t, c in zip(texts, convs)]


def messages_column(prompts: list[Prompt]) -> list[list[Message] | None]:
    """The `prompt_messages` values of `prompts`: null for a single user turn."""
    return [None if isinstance(p, str) else as_messages(p) for p in prompts]
