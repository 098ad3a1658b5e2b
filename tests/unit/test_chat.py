"""Chat records -> ids and a loss mask on the assistant's tokens (``lmdistill.data.chat``).

Every expectation is computed independently of the code under test: the rendered text is
written out by hand (``chat_fixtures.render``), and the assistant's tokens are counted by
tokenizing each expected assistant string on its own. That count is exact here because
the template separates turns with special tokens and a newline, which no merge crosses.
"""

from __future__ import annotations

import copy
import pickle

import pytest

from chat_fixtures import CHAT_TEMPLATE, chat_tokenizer, render
from lmdistill.core.errors import LmdistillError
from lmdistill.data.chat import (
    FORMATS,
    NoAssistantTurn,
    check_chat_template,
    encode_messages,
    encode_prompt_completion,
    encode_record,
    record_format,
)

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
MULTI_TURN = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a keyword of Python."},
    {"role": "assistant", "content": "lambda"},
    {"role": "user", "content": "And a café with a non-ASCII name ✓?"},
    {"role": "assistant", "content": "Café Müller ✓, then return None."},
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return chat_tokenizer(tiny_tokenizer)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def masked_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each run of consecutive mask-1 tokens."""
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def expected_assistant_texts(messages: list[dict]) -> list[str]:
    return [m["content"] + "<|end|>\n" for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("messages", [TWO_TURNS, MULTI_TURN], ids=["two-turns", "multi-turn"])
def test_mask_covers_exactly_the_assistant_turns(tok, messages):
    ids, mask = encode_messages(messages, tok)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    assert ids == ids_of(tok, render(messages))
    assert masked_runs(tok, ids, mask) == expected_assistant_texts(messages)
    assert sum(mask) == sum(len(ids_of(tok, text)) for text in expected_assistant_texts(messages))


def test_the_assistant_header_is_not_trained_on(tok):
    ids, mask = encode_messages(TWO_TURNS, tok)
    header_end = len(ids_of(tok, render(TWO_TURNS[:1]) + "<|assistant|>\n"))
    assert mask[:header_end] == [0] * header_end
    assert mask[header_end:] == [1] * (len(ids) - header_end)


def test_an_assistant_turn_that_opens_the_conversation_is_context(tok):
    messages = [{"role": "assistant", "content": "Hello."}, *TWO_TURNS]
    ids, mask = encode_messages(messages, tok)
    assert ids == ids_of(tok, render(messages))
    assert masked_runs(tok, ids, mask) == [TWO_TURNS[1]["content"] + "<|end|>\n"]
    with pytest.raises(NoAssistantTurn):
        encode_messages(messages[:1], tok)


def test_no_assistant_turn(tok):
    with pytest.raises(NoAssistantTurn):
        encode_messages([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}], tok)


def test_none_valued_keys_and_tuples_are_accepted(tok):
    messages = tuple({**m, "tool_calls": None} for m in TWO_TURNS)
    assert encode_messages(messages, tok) == encode_messages(TWO_TURNS, tok)


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", r"messages must be a list of \{role, content\} messages; found a str"),
        ({"role": "user", "content": "hi"}, "found a dict"),
        ([], r"messages is an empty list; give its \{role, content\} messages or leave the record out"),
        (["hi"], r"messages\[0\] is a str, not a \{role, content\} message"),
        ([{"content": "hi"}], r"messages\[0\] has no role"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], r"messages\[1\] has no content"),
        ([{"role": "user", "content": ["a", "b"]}], r"messages\[0\]\.content is a list, not a string"),
        ([{"role": 1, "content": "hi"}], r"messages\[0\]\.role is an int, not a string"),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(LmdistillError, match=match) as info:
        encode_messages(messages, tok)
    assert "\n" not in str(info.value)


def test_check_chat_template_names_the_source(tiny_tokenizer, tok):
    with pytest.raises(LmdistillError, match=r"chats\.jsonl.*has no chat template.*text field") as info:
        check_chat_template(tiny_tokenizer, "data.path 'chats.jsonl'")
    assert "\n" not in str(info.value)
    check_chat_template(tok, "data.path 'chats.jsonl'")
    with pytest.raises(LmdistillError, match="no chat template"):
        encode_messages(TWO_TURNS, tiny_tokenizer)


def test_a_template_that_does_not_render_incrementally_is_refused(tok):
    counting = copy.deepcopy(tok)
    counting.chat_template = "{{ messages|length }}\n" + CHAT_TEMPLATE
    with pytest.raises(LmdistillError, match="does not render conversations incrementally") as info:
        encode_messages(TWO_TURNS, counting)
    assert "\n" not in str(info.value)


def test_template_errors_become_one_line(tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate\nuser/assistant') }}"
    with pytest.raises(LmdistillError, match="chat template failed.*roles must alternate user/assistant") as info:
        encode_messages(TWO_TURNS, strict)
    assert "\n" not in str(info.value)


def test_prompt_completion_strings(tok):
    prompt, completion = "Question: what is two plus two?\nAnswer:", " four"
    ids, mask = encode_prompt_completion(prompt, completion, tok)
    prompt_ids, completion_ids = ids_of(tok, prompt), ids_of(tok, completion)
    assert ids == prompt_ids + completion_ids + [tok.eos_token_id]
    assert mask == [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)
    with pytest.raises(NoAssistantTurn):
        encode_prompt_completion(prompt, "", tok)


def test_prompt_completion_strings_need_eos(tok):
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    with pytest.raises(LmdistillError, match="no EOS token"):
        encode_prompt_completion("a", "b", no_eos)


def test_conversational_prompt_completion_trains_on_the_completion_only(tok):
    prompt, completion = MULTI_TURN[:4], MULTI_TURN[4:]
    ids, mask = encode_prompt_completion(prompt, completion, tok)
    assert ids == ids_of(tok, render(MULTI_TURN))
    assert masked_runs(tok, ids, mask) == expected_assistant_texts(completion)
    with pytest.raises(NoAssistantTurn):
        encode_prompt_completion(prompt, [{"role": "user", "content": "More?"}], tok)
    with pytest.raises(NoAssistantTurn):
        encode_prompt_completion(prompt, [], tok)


@pytest.mark.parametrize(
    "prompt, completion, found",
    [
        ("Hi", [{"role": "assistant", "content": "Hello"}], "found a str and a list"),
        ([{"role": "user", "content": "Hi"}], "Hello", "found a list and a str"),
        ("Hi", None, "found a str and null"),
    ],
)
def test_mixed_prompt_completion_types(tok, prompt, completion, found):
    with pytest.raises(LmdistillError, match=f"both strings or both lists of messages; {found}"):
        encode_prompt_completion(prompt, completion, tok)


def test_record_format():
    assert FORMATS == ("text", "messages", "prompt_completion")
    assert record_format({"messages": TWO_TURNS, "text": "x"}) == "messages"
    assert record_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert record_format({"text": "plain"}) == "text"
    assert record_format({"body": "plain"}, text_field="body") == "text"
    assert record_format({"messages": None, "prompt": "a", "completion": None, "text": None}) is None
    assert record_format({"body": "plain"}) is None
    assert record_format({}) is None


def test_encode_record_dispatches(tok):
    assert encode_record({"messages": TWO_TURNS}, tok, "messages") == encode_messages(TWO_TURNS, tok)
    assert encode_record({"prompt": "a b", "completion": " c"}, tok, "prompt_completion") == encode_prompt_completion(
        "a b", " c", tok
    )
    ids, mask = encode_record({"body": "plain text"}, tok, "text", text_field="body")
    assert ids == ids_of(tok, "plain text") + [tok.eos_token_id] and mask == [1] * len(ids)
    assert encode_record({"text": ""}, tok, "text") == ([], [])
    with pytest.raises(ValueError, match="unknown record format"):
        encode_record({}, tok, "chat")


def test_chat_tokenizer_survives_save_and_load(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert len(loaded) == len(tok)
    assert encode_messages(MULTI_TURN, loaded) == encode_messages(MULTI_TURN, tok)


def test_the_tokenizer_and_functions_pickle(tok):
    # The data pipeline calls these from worker processes.
    restored_encode, restored_tok = pickle.loads(pickle.dumps((encode_messages, tok)))
    assert restored_encode(TWO_TURNS, restored_tok) == encode_messages(TWO_TURNS, tok)
