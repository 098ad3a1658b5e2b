"""A chat-templated copy of the tiny test tokenizer, built offline.

The tiny tokenizer (``lmdistill.default.train_tokenizer``) is trained on plain text and has
no chat template. ``chat_tokenizer`` gives a copy with one special token per role, an
end-of-turn token and a small Jinja template in the usual shape::

    <|user|>\\nWhat is 2+2?<|end|>\\n<|assistant|>\\n4<|end|>\\n

The copy survives ``save_pretrained`` / ``AutoTokenizer.from_pretrained``, so it can also
be saved next to a tiny model as a chat-templated teacher or student.
"""

from __future__ import annotations

import copy

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
END_OF_TURN = "<|end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_tokenizer(base, template: str = CHAT_TEMPLATE):
    """A copy of ``base`` with the role and end-of-turn special tokens and ``template``."""
    tokenizer = copy.deepcopy(base)
    tokenizer.add_special_tokens({"additional_special_tokens": [*ROLE_TOKENS, END_OF_TURN]})
    tokenizer.chat_template = template
    return tokenizer


def render(messages: list[dict]) -> str:
    """What ``CHAT_TEMPLATE`` renders for ``messages``, written out by hand (no generation prompt)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}{END_OF_TURN}\n" for m in messages)
