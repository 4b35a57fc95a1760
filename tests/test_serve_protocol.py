"""Request validation and streamed stop-sequence handling of `kvblend serve` (pure Python, no server)."""

from __future__ import annotations

import json

import pytest

from kvblend.serve.metrics import Histogram, ServerMetrics, parse_prometheus
from kvblend.serve.protocol import ApiError, StopText, parse_chat_request


def parse(**body):
    return parse_chat_request(json.dumps(body).encode())


def test_messages_map_to_prefix_and_query():
    req = parse(messages=[{"role": "system", "content": "S1"}, {"role": "developer", "content": "S2"},
                          {"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"},
                          {"role": "user", "content": [{"type": "text", "text": "last "},
                                                       {"type": "text", "text": "q"}]}],
                documents=["a", {"title": "T", "text": "b"}], kvblend={"mode": "reuse", "ratio": 0.5}, stop="x")
    assert req.system == "S1\nS2" and req.query == "user: first\nassistant: reply\nlast q"
    assert [(d.title, d.text) for d in req.documents] == [("", "a"), ("T", "b")]
    assert (req.mode, req.ratio, req.stop, req.temperature, req.stream) == ("reuse", 0.5, ("x",), 1.0, False)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "documents": ["ok", ""]}, "documents[1]"),
    ({"messages": [{"role": "user", "content": "x"}], "documents": ["a"], "retrieval": {"top_k": 2}}, "retrieval"),
    ({"messages": [{"role": "user", "content": "x"}], "retrieval": {"top_k": 0}}, "retrieval.top_k"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "temperature"),
])
def test_bad_fields_name_their_param(body, param):
    with pytest.raises(ApiError) as info:
        parse_chat_request(json.dumps(body).encode())
    assert info.value.status == 400 and info.value.body()["error"]["param"] == param


def test_stop_text_holds_back_partial_stop_and_cuts_before_it():
    st = StopText(("END",))
    assert st.update("hello E") == ("hello ", False)  # "E" may start "END"
    assert st.update("hello EN") == ("", False)
    assert st.update("hello ENX") == ("ENX", False)  # not a stop after all
    assert st.update("hello ENX and END more") == (" and ", True)
    assert st.finish("hello ENX and END more tokens") == ("", "hello ENX and ")


def test_stop_text_without_stops_holds_back_only_incomplete_characters():
    st = StopText(())
    assert st.update("ab\ufffd") == ("ab", False)
    assert st.update("abc") == ("c", False)
    assert st.finish("abcd") == ("d", "abcd")


def test_histogram_buckets_are_cumulative_and_metrics_parse():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 5.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 1', 'x_bucket{le="1"} 3', 'x_bucket{le="+Inf"} 4',
                            "x_sum 6.050000", "x_count 4"]
    m = ServerMetrics()
    m.count_request("ok")
    m.observe_request(0.2, None, 0.0, {"prompt": 10})
    m.publish_store({"stats": {"hits": {"gpu": 3}, "misses": 2, "evictions": {}}, "used_bytes": {"disk": 7}})
    got = parse_prometheus(m.render(queue_depth=2, queue_capacity=8))
    assert got['kvblend_requests_total{outcome="ok"}'] == 1 and got["kvblend_queue_depth"] == 2
    assert got['kvblend_store_hits_total{tier="gpu"}'] == 3 and got["kvblend_store_misses_total"] == 2
    assert got['kvblend_store_bytes{tier="disk"}'] == 7 and got["kvblend_tpot_seconds_count"] == 0
    assert got['kvblend_tokens_total{kind="prompt"}'] == 10
