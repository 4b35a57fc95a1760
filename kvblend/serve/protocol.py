"""OpenAI chat-completions schema: request validation and response bodies. Pure Python (no torch).

A request maps onto kvblend's prompt pieces the way the pipeline builds them (kvblend/data/prompt.py):
system (and developer) messages -> prefix; `documents` (or passages retrieved from --corpus) -> one chunk
each, in order; the last user message -> query (earlier user/assistant turns are written before it as
"role: text" lines). The chat template wraps prefix..query in one user turn, as in the pipeline.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvblend.vocab import MODES

MAX_STOP_SEQUENCES = 4
MAX_CACHE_SALT_CHARS = 256
# fields that change what the model must produce and that kvblend does not implement: refused, not ignored
UNSUPPORTED_IF_SET = {
    "logprobs": lambda v: v not in (None, False),
    "top_logprobs": lambda v: v is not None,
    "tools": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none"),
    "functions": lambda v: bool(v),
    "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}


class ApiError(Exception):
    """An error answered as the OpenAI error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("rate_limit_error" if status == 429 else
                              "invalid_request_error" if 400 <= status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # pickled whole (an engine replica of `kvblend serve --replicas` sends it to the ingress)
        return ApiError, (self.status, self.message, self.param, self.code, self.type, self.headers)


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may ask for, checked before anything is tokenised. Characters bound the tokeniser's
    work: a text of more characters than tokens x MAX_CHARS_PER_TOKEN is refused unread (no tokenizer this project
    serves averages that many characters per token on text that fits); token counts are checked after."""

    max_documents: int = 64
    max_document_tokens: int = 4096
    context_tokens: int = 8192  # the model's context: bounds the characters of the messages
    max_json_depth: int = 32

    MAX_CHARS_PER_TOKEN = 16

    @property
    def max_document_chars(self) -> int:
        return self.max_document_tokens * self.MAX_CHARS_PER_TOKEN

    @property
    def max_message_chars(self) -> int:
        return self.context_tokens * self.MAX_CHARS_PER_TOKEN


def _scalar_problem(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"'{path or 'body'}' holds invalid Unicode (a lone surrogate at character {exc.start}); send UTF-8 text"
    return None


def check_json_tree(body: Any, max_depth: int) -> None:
    """400 for a body nested deeper than max_depth or holding a string that is not valid Unicode (a lone
    surrogate such as \\ud800, which JSON can spell but no tokenizer takes). Iterative: no recursion limit."""
    stack = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise bad(f"request body is nested deeper than {max_depth} levels (at '{path}')", None, "too_deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                problem = _scalar_problem(k, path)
                if problem:
                    raise bad(problem, path or None, "invalid_unicode")
                stack.append((v, f"{path}.{k}" if isinstance(k, str) and path else
                              (k if isinstance(k, str) else f"{path}[{k}]"), depth + 1))
        else:
            problem = _scalar_problem(value, path)
            if problem:
                raise bad(problem, path or None, "invalid_unicode")


@dataclass(frozen=True, slots=True)
class Document:
    """One chunk of the prompt; title may be empty."""

    text: str
    title: str = ""
    doc_id: str = ""
    score: float | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str | None
    system: str  # prefix text
    query: str  # query text (history lines + last user message)
    documents: tuple[Document, ...] | None  # None: none given (retrieve if retrieval_top_k)
    retrieval_top_k: int | None
    max_tokens: int | None  # None: the server's default, clipped to the context left
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    mode: str | None = None
    ratio: float | None = None
    cache_salt: str = ""  # the caller's isolation salt ("": the shared namespace)
    request_id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _number(body: dict, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a number, got {_type_name(value)}", name, "invalid_type")
    if value > hi or value < lo or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise bad(f"'{name}' must be in {left}{lo:g}, {hi:g}], got {value}", name)
    return float(value)


def _int(obj: dict, name: str, param: str, minimum: int | None = None) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{param}' must be an integer, got {_type_name(value)}", param, "invalid_type")
    if minimum is not None and value < minimum:
        raise bad(f"'{param}' must be >= {minimum}, got {value}", param)
    return value


def _bool(obj: dict, name: str, param: str) -> bool:
    value = obj.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{param}' must be a boolean, got {_type_name(value)}", param, "invalid_type")
    return value


def _object(obj: dict, name: str, param: str) -> dict:
    value = obj.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"'{param}' must be an object, got {_type_name(value)}", param, "invalid_type")
    return value


def message_text(content: Any, param: str) -> str:
    """A message's text: a string, or an array of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"'{param}[{i}]': only text content parts ({{\"type\": \"text\", \"text\": ...}}) are "
                          f"supported", f"{param}[{i}]", "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"'{param}' must be a string or an array of text parts, got {_type_name(content)}", param,
              "invalid_type")


def _messages(body: dict) -> tuple[str, str]:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad(f"'messages' must be an array, got {_type_name(messages)}", "messages", "invalid_type")
    if not messages:
        raise bad("'messages' must contain at least one message", "messages", "empty_array")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"'messages[{i}]' must be an object, got {_type_name(m)}", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"'messages[{i}].role' must be system, developer, user or assistant, got {role!r}",
                      f"messages[{i}].role")
        text = message_text(m.get("content"), f"messages[{i}].content") if m.get("content") is not None else ""
        if role in ("system", "developer"):
            system.append(text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise bad("the last non-system message must be a user message (the question)", "messages")
    if not turns[-1][1].strip():
        raise bad("the last user message is empty", "messages")
    history = "".join(f"{role}: {text}\n" for role, text in turns[:-1])
    return "\n".join(system), history + turns[-1][1]


def _documents(body: dict, limits: RequestLimits) -> tuple[Document, ...] | None:
    docs = body.get("documents")
    if docs is None:
        return None
    if not isinstance(docs, list):
        raise bad(f"'documents' must be an array, got {_type_name(docs)}", "documents", "invalid_type")
    if len(docs) > limits.max_documents:
        raise bad(f"'documents' holds {len(docs)} documents; this server takes at most {limits.max_documents} per "
                  f"request (--max-documents)", "documents", "too_many_documents")
    out = []
    for i, d in enumerate(docs):
        param = f"documents[{i}]"
        if isinstance(d, str):
            text, title = d, ""
        elif isinstance(d, dict):
            text, title = d.get("text"), d.get("title", "")
            if not isinstance(text, str) or not isinstance(title, str):
                raise bad(f"'{param}' must have a string 'text' (and an optional string 'title')", param,
                          "invalid_type")
        else:
            raise bad(f"'{param}' must be a string or {{\"title\", \"text\"}} object, got {_type_name(d)}", param,
                      "invalid_type")
        if not text.strip():
            raise bad(f"'{param}' is empty", param)
        if len(text) + len(title) > limits.max_document_chars:
            raise bad(f"'{param}' has {len(text) + len(title)} characters, more than any document of at most "
                      f"{limits.max_document_tokens} tokens (--max-document-tokens); split it", param,
                      "document_too_long")
        out.append(Document(text=text, title=title))
    return tuple(out)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"'stop' must be a string or an array of strings, got {_type_name(stop)}", "stop", "invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad(f"'stop' holds at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad("'stop' sequences must not be empty", "stop")
    return tuple(stops)


def _load_json(raw: bytes, limits: RequestLimits) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"request body is not valid JSON ({exc})", None, "invalid_json") from None
    except RecursionError:
        raise bad(f"request body is nested deeper than {limits.max_json_depth} levels", None, "too_deep") from None
    check_json_tree(body, limits.max_json_depth)
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {_type_name(body)}", None, "invalid_type")
    return body


def _cache_salt(body: dict) -> str:
    salt = body.get("cache_salt")
    if salt is None:
        return ""
    if not isinstance(salt, str) or not salt or len(salt) > MAX_CACHE_SALT_CHARS:
        raise bad(f"'cache_salt' must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters",
                  "cache_salt", "invalid_value")
    return salt


def parse_chat_request(raw: bytes, limits: RequestLimits | None = None) -> ChatRequest:
    """Validate a /v1/chat/completions body; ApiError(400) naming the first bad field. Nothing here tokenises:
    limits bound what the worker will tokenise."""
    limits = limits or RequestLimits()
    body = _load_json(raw, limits)
    for name, is_set in UNSUPPORTED_IF_SET.items():
        if is_set(body.get(name)):
            raise bad(f"'{name}' is not supported by kvblend serve", name, "unsupported_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_type_name(model)}", "model", "invalid_type")
    n = _int(body, "n", "n")
    if n is not None and n != 1:
        raise bad(f"'n' must be 1 (one choice per request), got {n}", "n", "unsupported_parameter")
    system, query = _messages(body)
    if len(system) + len(query) > limits.max_message_chars:
        raise bad(f"the messages have {len(system) + len(query)} characters, more than this model's context of "
                  f"{limits.context_tokens} tokens can hold; send a shorter conversation", "messages",
                  "context_length_exceeded")
    max_tokens = _int(body, "max_completion_tokens", "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", "max_tokens", 1)
    seed = _int(body, "seed", "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise bad(f"'seed' must be in [0, 2^63), got {seed}", "seed")
    stream = _bool(body, "stream", "stream")
    options = _object(body, "stream_options", "stream_options")
    include_usage = _bool(options, "include_usage", "stream_options.include_usage")
    documents = _documents(body, limits)
    retrieval = body.get("retrieval")
    top_k = None
    if retrieval is not None:
        retrieval = _object(body, "retrieval", "retrieval")
        top_k = _int(retrieval, "top_k", "retrieval.top_k", 1) or 5
        if documents is not None:
            raise bad("give either 'documents' or 'retrieval', not both", "retrieval")
    kv = _object(body, "kvblend", "kvblend")
    mode = kv.get("mode")
    if mode is not None and mode not in MODES:
        raise bad(f"'kvblend.mode' must be one of {', '.join(MODES)}, got {mode!r}", "kvblend.mode")
    ratio = None
    if kv.get("ratio") is not None:
        ratio = _number(kv, "ratio", 0.0, 1.0, 0.0)
    return ChatRequest(
        model=model, system=system, query=query, documents=documents, retrieval_top_k=top_k,
        max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True), seed=seed, stop=_stop(body), stream=stream,
        include_usage=include_usage, mode=mode, ratio=ratio, cache_salt=_cache_salt(body),
    )


# responses ------------------------------------------------------------------------------------------------
def completion_body(req: ChatRequest, model: str, text: str, finish_reason: str, usage: dict,
                    extra: dict | None = None) -> dict:
    body = {"id": req.request_id, "object": "chat.completion", "created": req.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage}
    if extra:
        body["kvblend"] = extra
    return body


def chunk_body(req: ChatRequest, model: str, delta: dict, finish_reason: str | None = None,
               usage: dict | None = None, with_choice: bool = True) -> dict:
    body = {"id": req.request_id, "object": "chat.completion.chunk", "created": req.created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
            if with_choice else []}
    if usage is not None:
        body["usage"] = usage
    return body


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class StopText:
    """Incremental text of an answer with stop sequences: what may be streamed so far, where to stop.

    `update(text)` takes the decoded text so far and returns (new text safe to send, stopped). Text that
    could still become the start of a stop sequence, or an incomplete UTF-8 character, is held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.sent = 0  # characters already released
        self.final: str | None = None  # set once a stop sequence was found
        self.stopped = False  # the text was cut at a stop sequence

    def _cut(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def update(self, text: str) -> tuple[str, bool]:
        cut = self._cut(text)
        if cut is not None:
            self.final, self.stopped = text[:cut], True
            delta = self.final[self.sent:]
            self.sent = max(self.sent, cut)
            return delta, True
        safe = len(text)
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if text[:safe].endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe -= hold
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, False

    def finish(self, text: str) -> tuple[str, str]:
        """(remaining delta, final text) once decoding ended with the full decoded text."""
        if self.final is None:
            cut = self._cut(text)
            self.final = text if cut is None else text[:cut]
            self.stopped = cut is not None
        delta = self.final[self.sent:] if len(self.final) > self.sent else ""
        self.sent = max(self.sent, len(self.final))
        return delta, self.final
