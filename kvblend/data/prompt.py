"""Prompt pieces -> token ids: [prefix] [chunk 1] ... [chunk n] [query].

Each piece is tokenised on its own (no special tokens added), so a chunk's ids are the same wherever it
appears and its cached KV lines up; the full-prefill baseline uses the very same ids. Ids are never
decoded and re-encoded.

Untrusted text: documents are always tokenised with special tokens *not* parsed (a document holding the text
`<|im_end|>` gets the ids of those characters, never the control token), and so are the messages (system and
user text) unless trust_messages. Only the chat template's own text emits control tokens: it is split where its
control tokens end (head) or start (tail), so joining it to the untrusted text tokenises exactly as before.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvblend.types import PromptIds

_SENTINEL = "\x00KVBLEND_USER_MESSAGE\x00"


def encode(tokenizer: Any, text: str, parse_special: bool = False) -> tuple[int, ...]:
    """Token ids of `text`; special-token strings in it are control tokens only with parse_special (trusted
    text such as the chat template), otherwise plain characters."""
    extra = {} if parse_special else {"split_special_tokens": True}
    return tuple(tokenizer(text, add_special_tokens=False, **extra)["input_ids"])


def control_strings(tokenizer: Any) -> tuple[str, ...]:
    """The text of every special (control) token of the tokenizer."""
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    return tuple(sorted((t for t in found if t), key=len, reverse=True))


def _control_span(tokenizer: Any, text: str) -> tuple[int, int]:
    """(start of the first, end of the last) control-token string in text; (len, 0) when none."""
    first, last = len(text), 0
    for tok in control_strings(tokenizer):
        i = text.find(tok)
        if i >= 0:
            first = min(first, i)
            last = max(last, text.rfind(tok) + len(tok))
    return first, last


def chat_wrappers(tokenizer: Any) -> tuple[str, str]:
    """(head, tail) text around a single user message in the tokenizer's chat template ('' if none)."""
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    head, sep, tail = rendered.partition(_SENTINEL)
    if not sep:
        return "", ""
    return head, tail


def build_prompt(tokenizer: Any, prefix_text: str, chunk_texts: Sequence[str], query_text: str,
                 chat_template: bool = True, trust_messages: bool = False) -> PromptIds:
    """Token ids of the prompt; with chat_template the pieces sit inside one user turn. Chunks never parse
    special tokens; prefix and query text do only with trust_messages (see the module docstring)."""
    head, tail = chat_wrappers(tokenizer) if chat_template else ("", "")
    bos = ()
    if not head and getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        bos = (int(tokenizer.bos_token_id),)
    cut_head = _control_span(tokenizer, head)[1]  # the head's control tokens end here
    cut_tail = min(_control_span(tokenizer, tail)[0], len(tail))  # the tail's start here
    return PromptIds(
        prefix_ids=bos + encode(tokenizer, head[:cut_head], True)
        + encode(tokenizer, head[cut_head:] + prefix_text, trust_messages),
        chunk_ids=tuple(encode(tokenizer, t) for t in chunk_texts),
        query_ids=encode(tokenizer, query_text + tail[:cut_tail], trust_messages)
        + encode(tokenizer, tail[cut_tail:], True),
    )


def sink_ids(tokenizer: Any, mode: str = "auto") -> tuple[int, ...]:
    """Tokens prefilled before each chunk (and dropped): the BOS when the tokenizer prepends one."""
    if mode == "none" or tokenizer is None:
        return ()
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(with_special) > len(plain) and with_special[0] == bos:
        return (int(bos),)
    return ()


# the fixed context of chunk_sink "text": a short neutral line that takes the attention-sink role a chunk's
# first tokens would otherwise play (CacheClip, EPIC)
SINK_TEXT = "Passage:\n"


def chunk_context_ids(tokenizer: Any, mode: str = "auto", prefix_ids: Sequence[int] | None = None) -> tuple[int, ...]:
    """Ids each chunk is prefilled after (their rows are dropped); part of the chunk's store key.

    auto / none: sink_ids(); prefix: the prompt's shared prefix (the chunk then sits at the local positions
    the first chunk has in the prompt, and no chunk carries its own attention sink); text: BOS (if any) +
    SINK_TEXT. prefix_ids is required for mode prefix, so every path (build, decode, serve, speculative)
    keys a chunk by the same context.
    """
    if mode in ("auto", "none"):
        return sink_ids(tokenizer, mode)
    if mode == "prefix":
        if prefix_ids is None:
            raise ValueError("chunk_sink 'prefix' needs the prompt's prefix ids to key and build a chunk")
        return tuple(int(i) for i in prefix_ids)
    if mode == "text":
        if tokenizer is None:
            raise ValueError("chunk_sink 'text' needs a tokenizer")
        return sink_ids(tokenizer, "auto") + encode(tokenizer, SINK_TEXT)
    raise ValueError(f"unknown chunk_sink '{mode}'; use auto, none, prefix or text")
