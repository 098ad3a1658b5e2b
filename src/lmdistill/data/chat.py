"""Chat and instruction records -> token ids plus a per-token loss mask.

Training on a conversation should put the loss on what the assistant says, not on the
system prompt or the user's turns: the mask returned here is 1 on those tokens and 0
elsewhere. Three record shapes are recognised (``record_format``): plain ``text``, a
``messages`` conversation, and ``prompt`` + ``completion`` (two strings, or two lists
of messages).

Conversations are rendered with the tokenizer's own chat template, so the student sees
exactly the layout its model family expects. Where an assistant turn lies in that text
is found by rendering prefixes of the conversation with the same template:

* ``messages[:i]`` with the generation prompt ends where assistant turn ``i`` starts
  (after its header, e.g. ``<|assistant|>\\n``), and
* ``messages[:i + 1]`` ends where it stops, including whatever the template writes after
  the content (an end-of-turn token, a newline), so the model also learns to stop.

This needs no knowledge of any particular template and no searching for marker tokens;
it only needs a template that renders incrementally, i.e. each rendered prefix is a prefix
of the whole rendering. That is checked, and a template that does not (one that rewrites
earlier turns depending on later ones) is refused with a clear error rather than masked
wrongly. The character spans are mapped to tokens through the fast tokenizer's offset
mapping: the full text is tokenized once, and a token is trained on when its span starts
inside an assistant span. Tokenizing the whole text once (rather than piece by piece)
gives exactly the ids the model would see at inference.

Everything here is a module-level function of plain data and a tokenizer, so a data
pipeline can call it from worker processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmdistill.core.errors import LmdistillError

FORMATS = ("text", "messages", "prompt_completion")
ASSISTANT = "assistant"
Encoded = tuple[list[int], list[int]]  # (token ids, loss mask of the same length)
Span = tuple[int, int]  # [start, end) in characters of the rendered text


class NoAssistantTurn(Exception):
    """A record with nothing to train on (no assistant turn, empty completion); the caller
    skips the record and counts it."""


def record_format(record: Mapping, text_field: str = "text") -> str | None:
    """Which of ``FORMATS`` a record is, or None when it has none of their fields."""
    if record.get("messages") is not None:
        return "messages"
    if record.get("prompt") is not None and record.get("completion") is not None:
        return "prompt_completion"
    if record.get(text_field) is not None:
        return "text"
    return None


def check_chat_template(tokenizer, source: str) -> None:
    """Refuse chat data from ``source`` when the tokenizer cannot render conversations."""
    if not getattr(tokenizer, "chat_template", None):
        raise LmdistillError(
            f"{source} holds chat messages but the tokenizer has no chat template; use a tokenizer that has a "
            "chat template, or give records with a text field / prompt+completion strings"
        )


def encode_messages(messages: Any, tokenizer) -> Encoded:
    """A conversation as token ids and a mask that is 1 on every assistant turn
    (its content and what the template writes after it), 0 elsewhere."""
    return _encode_conversation(_checked_messages(messages, "messages"), tokenizer, first_trained=0)


def encode_prompt_completion(prompt: Any, completion: Any, tokenizer) -> Encoded:
    """A prompt and its completion; the mask is 1 on the completion only.

    Two strings are tokenized separately and joined, with EOS after the completion (trained
    on, so the model learns to stop). Two lists of messages are rendered as one
    conversation, and only the assistant turns that come from ``completion`` are trained on.
    """
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise NoAssistantTurn("empty completion")
        return _encode_strings(prompt, completion, tokenizer)
    if _is_sequence(prompt) and _is_sequence(completion):
        if not completion:
            raise NoAssistantTurn("empty completion")
        prompt_messages = _checked_messages(prompt, "prompt")
        completion_messages = _checked_messages(completion, "completion")
        if not any(m["role"] == ASSISTANT for m in completion_messages):
            raise NoAssistantTurn("the completion has no assistant message")
        return _encode_conversation(
            prompt_messages + completion_messages, tokenizer, first_trained=len(prompt_messages)
        )
    raise LmdistillError(
        "prompt and completion must be both strings or both lists of messages; found "
        f"{_kind(prompt)} and {_kind(completion)}"
    )


def encode_record(record: Mapping, tokenizer, fmt: str, text_field: str = "text") -> Encoded:
    """Encode a record of format ``fmt`` (see ``record_format``).

    A ``text`` record is trained on everywhere: its tokens plus EOS, as plain documents are
    packed; an empty text gives empty lists."""
    if fmt == "messages":
        return encode_messages(record["messages"], tokenizer)
    if fmt == "prompt_completion":
        return encode_prompt_completion(record["prompt"], record["completion"], tokenizer)
    if fmt == "text":
        return _encode_text(record[text_field], tokenizer, text_field)
    raise ValueError(f"unknown record format {fmt!r}; expected one of {FORMATS}")


# -- conversations ---------------------------------------------------------------------------------------------------


def _encode_conversation(messages: list[dict], tokenizer, first_trained: int) -> Encoded:
    """Ids of the rendered conversation; mask 1 on assistant turns at index >= ``first_trained``.

    An assistant turn that opens the conversation is never trained on: nothing precedes it, and
    transformers cannot render the empty conversation that would mark where it starts."""
    _require_template(tokenizer)
    trained = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT and i >= max(first_trained, 1)]
    if not trained:
        if any(m["role"] == ASSISTANT for m in messages):
            raise NoAssistantTurn("the only assistant message opens the conversation; it answers nothing")
        raise NoAssistantTurn("no assistant message")
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = [_assistant_span(tokenizer, messages, i, text) for i in trained]
    ids, starts = _tokenize_with_starts(tokenizer, text)
    return ids, [int(any(start <= s < end for start, end in spans)) for s in starts]


def _assistant_span(tokenizer, messages: list[dict], index: int, text: str) -> Span:
    """Characters of ``text`` that assistant turn ``index`` occupies, header excluded."""
    start = len(_rendered_prefix(tokenizer, messages[:index], generation_prompt=True, text=text))
    end = len(_rendered_prefix(tokenizer, messages[: index + 1], generation_prompt=False, text=text))
    return start, end


def _rendered_prefix(tokenizer, messages: list[dict], generation_prompt: bool, text: str) -> str:
    prefix = _render(tokenizer, messages, generation_prompt)
    if not text.startswith(prefix):
        raise LmdistillError(
            f"the tokenizer's chat template does not render conversations incrementally (the first {len(messages)} "
            "message(s) do not render as a prefix of the whole conversation), so the assistant's tokens cannot be "
            "located; use a chat template that appends each message without rewriting earlier ones, or give "
            "prompt+completion strings"
        )
    return prefix


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # template code can raise anything (jinja errors, raise_exception, TypeError...)
        raise LmdistillError(f"the chat template failed on this conversation: {_one_line(exc)}") from exc


def _tokenize_with_starts(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the character where each token starts."""
    if not getattr(tokenizer, "is_fast", False):
        raise LmdistillError(
            "chat records need a fast (tokenizers-backed) tokenizer to map the assistant's text "
            f"to tokens; {type(tokenizer).__name__} is not one"
        )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return list(encoding["input_ids"]), [start for start, _ in encoding["offset_mapping"]]


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise LmdistillError("the tokenizer has no chat template to render conversations with")


# -- plain strings ---------------------------------------------------------------------------------------------------


def _encode_strings(prompt: str, completion: str, tokenizer) -> Encoded:
    eos = _eos_id(tokenizer, "end a completion with")
    prompt_ids = _ids(tokenizer, prompt)
    completion_ids = _ids(tokenizer, completion) + [eos]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def _encode_text(text: Any, tokenizer, text_field: str) -> Encoded:
    if not isinstance(text, str):
        raise LmdistillError(f"field '{text_field}' is {_kind(text)}, not a string")
    ids = _ids(tokenizer, text)
    if not ids:
        return [], []
    ids.append(_eos_id(tokenizer, "end a document with"))
    return ids, [1] * len(ids)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _eos_id(tokenizer, purpose: str) -> int:
    if tokenizer.eos_token_id is None:
        raise LmdistillError(f"the tokenizer has no EOS token to {purpose}; set tokenizer.eos_token")
    return tokenizer.eos_token_id


# -- validation ------------------------------------------------------------------------------------------------------


def _checked_messages(messages: Any, name: str) -> list[dict]:
    """``messages`` as a fresh list of dicts, after checking each has a string role and content.

    Keys whose value is None are dropped: Arrow fills a key that only some messages have
    (``tool_calls``, ``name``) with None in all the others, and a template testing
    ``is defined`` would otherwise see it."""
    if not _is_sequence(messages):
        raise LmdistillError(f"{name} must be a list of {{role, content}} messages; found {_kind(messages)}")
    if not messages:
        raise LmdistillError(f"{name} is an empty list; give its {{role, content}} messages or leave the record out")
    return [_checked_message(message, f"{name}[{i}]") for i, message in enumerate(messages)]


def _checked_message(message: Any, where: str) -> dict:
    if not isinstance(message, Mapping):
        raise LmdistillError(f"{where} is {_kind(message)}, not a {{role, content}} message")
    for key in ("role", "content"):
        if message.get(key) is None:
            raise LmdistillError(f"{where} has no {key}")
        if not isinstance(message[key], str):
            raise LmdistillError(f"{where}.{key} is {_kind(message[key])}, not a string")
    return {key: value for key, value in message.items() if value is not None}


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _one_line(exc: Exception, limit: int = 200) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."
