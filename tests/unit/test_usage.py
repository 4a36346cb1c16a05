"""
jano.usage against real backend captures, hand-built samples and hostile
bytes.  The properties at the end check the two promises that matter to the
tee: nothing raises, and no token count is reported that is not in the bytes.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import re
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jano.records import Usage
from jano.usage import TailBuffer, extract_usage, with_router_timing
from jano.usage.formats import _extract
from wire import header_value, load_capture, load_capture_chunks

HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@functools.lru_cache(maxsize=None)
def capture(name: str) -> tuple[bytes, Optional[str]]:
    """Body (chunked framing removed) and Content-Type of a fixture."""
    _, headers, body = load_capture(name)
    return body, header_value(headers, "Content-Type")


def llama(
    prompt: int,
    cached: int,
    completion: int,
    prompt_ms: float,
    generation_ms: float,
    gen_tok_s: float,
    prompt_tok_s: float,
) -> Usage:
    return Usage(
        source="llamacpp-timings",
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        prompt_ms=prompt_ms,
        generation_ms=generation_ms,
        gen_tok_s=gen_tok_s,
        prompt_tok_s=prompt_tok_s,
        timed_by="backend",
    )


def ollama(prompt: int, completion: int, prompt_ns: int, eval_ns: int) -> Usage:
    return Usage(
        source="ollama",
        prompt_tokens=prompt,
        completion_tokens=completion,
        prompt_ms=prompt_ns / 1e6,
        generation_ms=eval_ns / 1e6,
        gen_tok_s=completion / eval_ns * 1e9,
        prompt_tok_s=prompt / prompt_ns * 1e9,
        timed_by="backend",
    )


def openai(prompt: int, completion: int, cached: Optional[int] = None) -> Usage:
    return Usage(
        source="openai-usage",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
    )


# Every number below was read from the capture's bytes.
EXPECTED: dict[str, Usage] = {
    # Native /completion: prompt is tokens_evaluated; cached_tokens is
    # timings.cache_n (1), not tokens_cached (37, the slot's KV cache).
    "llamacpp-completion-stream.txt": llama(
        6, 1, 32, 36.653, 538.56, 57.560903149138454, 136.4144817613838
    ),
    "llamacpp-completion-nonstream.json": llama(
        6, 0, 32, 40.547, 563.936, 54.97077682573909, 147.97642242336053
    ),
    # Finish chunk with timings and no usage: prompt = prompt_n 5 + cache_n 24.
    "llamacpp-chat-stream-openai.txt": llama(
        29, 24, 32, 28.69, 486.18, 63.76239252951582, 174.27675148135236
    ),
    "llamacpp-chat-stream-include-usage.txt": llama(
        29, 24, 32, 30.133, 562.239, 55.13669453737645, 165.9310390601666
    ),
    "llamacpp-chat-nonstream.json": llama(
        29, 0, 32, 96.591, 491.034, 63.132084539970755, 300.23501154351857
    ),
    "llamacpp-v1-completions-stream.txt": llama(
        6, 1, 32, 28.127, 492.284, 62.97178051693738, 177.76513670139013
    ),
    "llamacpp-v1-completions-nonstream.json": llama(
        6, 1, 32, 34.001, 564.805, 54.8861996618302, 147.054498397106
    ),
    "llamacpp-error-unknown-model.json": llama(
        25, 0, 8, 85.795, 120.484, 58.099000697188, 291.39227227693925
    ),
    "llamarouter-chat-stream-swap-to-q8.txt": llama(
        29, 0, 32, 83.191, 536.768, 57.75307022773339, 348.5954009448137
    ),
    "llamarouter-chat-nonstream-autoload-q4.json": llama(
        29, 0, 32, 88.542, 553.735, 55.9834577911817, 327.52817871744486
    ),
    "llamarouter-completion-nonstream-swap-to-q4.json": llama(
        6, 0, 32, 108.215, 3354.594, 9.241058679530221, 55.445178579679336
    ),
    "ollama-generate-stream.ndjson": ollama(6, 32, 68446000, 514609000),
    "ollama-chat-stream.ndjson": ollama(15, 32, 36702000, 483479000),
    "ollama-generate-nonstream.json": ollama(6, 32, 25778000, 475604000),
    "ollama-chat-nonstream.json": ollama(15, 32, 25545000, 482708000),
    "ollama-generate-context-overflow.json": ollama(2051, 8, 12358673000, 1787137000),
    "ollama-openai-chat-stream-include-usage.txt": openai(15, 32),
    "ollama-openai-chat-nonstream.json": openai(15, 32),
    "ollama-openai-completions-nonstream.json": openai(6, 32),
    "llamacpppython-chat-nonstream.json": openai(15, 32),
    "llamacpppython-v1-completions-nonstream.json": openai(6, 32),
    "llamacpppython-error-missing-messages.json": openai(4, 8),
    "llamacpppython-error-unknown-model.json": openai(10, 8),
    # Hand-built from the API docs (see tests/fixtures/README.rst).
    "handbuilt-openai-chat-stream-include-usage.txt": openai(2006, 5, cached=1920),
    "handbuilt-openai-chat-nonstream.json": openai(19, 10, cached=0),
    "handbuilt-sse-crlf.txt": openai(7, 2),
    "handbuilt-ollama-chat-stream-no-prompt-eval.ndjson": Usage(
        source="ollama",
        completion_tokens=12,
        generation_ms=180.0,
        gen_tok_s=12 / 0.18,
        timed_by="backend",
    ),
    "handbuilt-ollama-generate-zero-eval.json": Usage(
        source="ollama",
        prompt_tokens=0,
        completion_tokens=0,
        prompt_ms=0.0,
        generation_ms=0.0,
    ),
}

NO_USAGE = [
    # Streams that carry no usage at all.
    "ollama-openai-chat-stream.txt",
    "ollama-openai-completions-stream.txt",
    "llamacpppython-chat-stream-openai.txt",
    "llamacpppython-chat-stream-include-usage.txt",  # include_usage is ignored
    "llamacpppython-v1-completions-stream.txt",
    "llamacpppython-error-context-exceeded-stream.txt",  # 200 with an empty body
    # Ollama load and unload answers: done, but nothing counted.
    "ollama-generate-load.json",
    "ollama-unload.json",
    # Errors and other bodies.
    "llamacpp-error-404.json",
    "llamacpp-error-bad-json.json",
    "llamacpp-error-completion-bad-json.json",
    "llamacpp-error-context-exceeded.json",
    "llamacpp-error-context-exceeded-chat-stream.txt",
    "llamacpp-error-missing-messages.json",
    "llamacpp-health-loading.json",
    "llamacpp-metrics.txt",
    "llamarouter-error-unknown-model-stream.txt",
    "llamacpppython-error-404.json",
    "llamacpppython-error-bad-json.json",
    "llamacpppython-error-context-exceeded.json",
    "ollama-error-404.txt",
    "ollama-error-bad-json-chat.json",
    "ollama-error-bad-json-openai.json",
    "ollama-error-unknown-model-chat.json",
    "ollama-error-unknown-model-openai-stream.txt",
]

ALL_CAPTURES = sorted(EXPECTED) + NO_USAGE
STREAMED = [name for name in ALL_CAPTURES if len(load_capture_chunks(name)) > 1]

USAGE_FIELDS = (
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "prompt_ms",
    "generation_ms",
    "gen_tok_s",
    "prompt_tok_s",
)
COUNT_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens")


def assert_same(actual: Optional[Usage], expected: Optional[Usage]) -> None:
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    assert (actual.source, actual.timed_by) == (expected.source, expected.timed_by)
    for name in USAGE_FIELDS:
        got, want = getattr(actual, name), getattr(expected, name)
        if name in COUNT_FIELDS or want is None:
            assert got == want, name
            assert type(got) is type(want), name
        else:
            assert got == pytest.approx(want, rel=1e-12), name


def assert_part_of(actual: Optional[Usage], whole: Optional[Usage]) -> None:
    """What a cut tail reports is what the whole body reports, or less."""
    if actual is None:
        return
    assert whole is not None
    assert actual.source == whole.source
    for name in USAGE_FIELDS:
        got = getattr(actual, name)
        if got is not None:
            assert got == pytest.approx(getattr(whole, name), rel=1e-12), name


def decimal_literals(data: bytes) -> set[int]:
    return {int(run) for run in re.findall(rb"[0-9]+", data) if len(run) <= 30}


def assert_honest(result: Optional[Usage], data: bytes) -> None:
    """Counts are decimal literals found in `data`; everything else is sane."""
    if result is None:
        return
    assert isinstance(result, Usage)
    assert result.source in ("llamacpp-timings", "openai-usage", "ollama")
    assert any(getattr(result, name) is not None for name in USAGE_FIELDS)
    literals = decimal_literals(data)
    for name in COUNT_FIELDS:
        value = getattr(result, name)
        if value is None:
            continue
        assert type(value) is int and value >= 0, (name, value)
        if value in literals:
            continue
        # The one derived count: llama.cpp's prompt_n + cache_n.
        assert name == "prompt_tokens" and result.source == "llamacpp-timings", (name, value)
        assert any(value - a in literals for a in literals if a <= value), value
    for name in ("prompt_ms", "generation_ms", "gen_tok_s", "prompt_tok_s"):
        value = getattr(result, name)
        if value is not None:
            assert type(value) is float and math.isfinite(value) and value >= 0, (name, value)
    for name in ("gen_tok_s", "prompt_tok_s"):
        value = getattr(result, name)
        assert value is None or value > 0, (name, value)
    assert result.timed_by == ("backend" if result.gen_tok_s is not None else None)


# -- real captures and hand-built samples ------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_gives_the_numbers_in_it(name: str) -> None:
    body, content_type = capture(name)
    result = extract_usage(body, content_type)
    assert_same(result, EXPECTED[name])
    assert_honest(result, body)


@pytest.mark.parametrize("name", NO_USAGE)
def test_capture_without_usage_gives_none(name: str) -> None:
    body, content_type = capture(name)
    assert extract_usage(body, content_type) is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_content_type_is_optional(name: str) -> None:
    body, _ = capture(name)
    assert_same(extract_usage(body, None), EXPECTED[name])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_truncated_flag_on_a_whole_body_changes_nothing(name: str) -> None:
    # The tee may say "truncated" when the tail starts exactly at a record.
    body, content_type = capture(name)
    assert_same(extract_usage(body, content_type, truncated=True), EXPECTED[name])


def test_llamacpp_timings_and_usage_agree_on_the_prompt() -> None:
    """Why a usage-less finish chunk reports prompt_n + cache_n."""
    body, _ = capture("llamacpp-chat-stream-include-usage.txt")
    final = json.loads(body.split(b"data: ")[-2])
    timings, usage = final["timings"], final["usage"]
    assert usage["prompt_tokens"] == timings["prompt_n"] + timings["cache_n"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == timings["cache_n"]


@pytest.mark.parametrize(
    "name", [name for name, usage in EXPECTED.items() if usage.source == "llamacpp-timings"]
)
def test_llamacpp_rate_leaves_out_the_first_token(name: str) -> None:
    """Why the backend's own predicted_per_second is kept, not n / ms."""
    result = EXPECTED[name]
    assert result.completion_tokens and result.generation_ms and result.gen_tok_s
    recomputed = (result.completion_tokens - 1) / result.generation_ms * 1e3
    assert result.gen_tok_s == pytest.approx(recomputed, rel=1e-9)


def test_llamacpp_native_does_not_report_tokens_cached() -> None:
    body, content_type = capture("llamacpp-completion-nonstream.json")
    assert json.loads(body)["tokens_cached"] == 37
    result = extract_usage(body, content_type)
    assert result is not None and result.cached_tokens == 0


def test_ollama_numbers_follow_the_documented_formula() -> None:
    body, content_type = capture("ollama-generate-stream.ndjson")
    final = json.loads(body.splitlines()[-1])
    result = extract_usage(body, content_type)
    assert result is not None
    assert result.generation_ms == final["eval_duration"] / 1e6
    assert result.gen_tok_s == pytest.approx(final["eval_count"] / final["eval_duration"] * 1e9)
    assert result.prompt_tok_s == pytest.approx(
        final["prompt_eval_count"] / final["prompt_eval_duration"] * 1e9
    )


def test_sse_content_type_with_parameters_and_case() -> None:
    body, _ = capture("llamacpp-chat-stream-openai.txt")
    expected = EXPECTED["llamacpp-chat-stream-openai.txt"]
    assert_same(extract_usage(body, "Text/Event-Stream; charset=UTF-8"), expected)


def test_quoted_usage_inside_content_is_not_read() -> None:
    body, content_type = capture("handbuilt-openai-chat-stream-include-usage.txt")
    assert b'\\"prompt_tokens\\":999' in body
    # Without the real usage chunk, the quoted one must not be picked up.
    without_usage = b"".join(
        event + b"\n\n"
        for event in body.split(b"\n\n")
        if event and b'"choices":[]' not in event
    )
    assert extract_usage(without_usage, content_type) is None
    for cut in range(len(without_usage)):
        assert extract_usage(without_usage[cut:], content_type, truncated=True) is None


# -- replaying streams through a TailBuffer ----------------------------------


def final_record_start(body: bytes) -> int:
    """Offset of the line holding the last usage-bearing member."""
    keys = (b'"timings":', b'"usage":{', b'"eval_count":', b'"eval_duration":')
    at = max(body.rfind(key) for key in keys)
    return len(body) if at < 0 else body.rfind(b"\n", 0, at) + 1


@pytest.mark.parametrize("limit", [200, 1024, 4096, 65536])
@pytest.mark.parametrize("name", STREAMED)
def test_replay_chunk_by_chunk(name: str, limit: int) -> None:
    body, content_type = capture(name)
    whole = extract_usage(body, content_type)
    tail = TailBuffer(limit)
    for chunk in load_capture_chunks(name):
        tail.feed(chunk)
    assert tail.getvalue() == body[-limit:]
    assert tail.truncated == (len(body) > limit)
    result = extract_usage(tail.getvalue(), content_type, truncated=tail.truncated)
    if len(body) - final_record_start(body) <= limit:
        assert_same(result, whole)
    else:
        assert_part_of(result, whole)


def test_replay_sees_the_streams_it_should() -> None:
    assert len(STREAMED) >= 15
    assert "llamacpp-completion-stream.txt" in STREAMED
    assert "ollama-generate-stream.ndjson" in STREAMED


def test_huge_final_event_still_gives_its_timings() -> None:
    # The /completion final event (1.6 KB: settings, prompt) does not fit in
    # 1 KiB; its trailing timings do, and they give the same numbers.
    name = "llamacpp-completion-stream.txt"
    body, content_type = capture(name)
    assert len(body) - final_record_start(body) > 1024
    tail = TailBuffer(1024)
    for chunk in load_capture_chunks(name):
        tail.feed(chunk)
    result = extract_usage(tail.getvalue(), content_type, truncated=True)
    assert_same(result, EXPECTED[name])


@pytest.mark.parametrize("limit", [200, 1024, 4096])
def test_nonstream_body_whose_start_is_gone(limit: int) -> None:
    # Ollama /api/generate with a 36 KB context array before the counts.
    name = "ollama-generate-context-overflow.json"
    body, content_type = capture(name)
    assert extract_usage(body[:-limit], content_type) is None
    result = extract_usage(body[-limit:], content_type, truncated=True)
    assert_same(result, EXPECTED[name])


def test_nonstream_cut_before_usage_keeps_the_timings() -> None:
    name = "llamacpp-chat-nonstream.json"
    body, content_type = capture(name)
    tail = body[body.index(b',"id":') :]  # usage is gone, timings are not
    result = extract_usage(tail, content_type, truncated=True)
    assert_same(result, EXPECTED[name])  # prompt_n + cache_n == prompt_tokens


# -- framing edge cases --------------------------------------------------------

USAGE_EVENT = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}'


def test_sse_events_with_crlf_and_several_per_read() -> None:
    first = b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n'
    body = first + USAGE_EVENT + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    result = extract_usage(body, "text/event-stream")
    assert result == openai(5, 7)


def test_sse_last_usage_event_wins() -> None:
    older = b'data: {"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    assert extract_usage(older + USAGE_EVENT + b"\n\n", "text/event-stream") == openai(5, 7)


def test_sse_multiline_data_and_comments() -> None:
    body = (
        b": ping\n\n"
        b"event: message\n"
        b'data: {"usage":\n'
        b'data: {"prompt_tokens":5,"completion_tokens":7}}\n\n'
    )
    assert extract_usage(body, "text/event-stream") == openai(5, 7)


def test_sse_partial_first_event_is_not_parsed_as_json() -> None:
    no_usage = b'data: {"choices":[]}\n\n'
    garbage = b'\xff\xfe"}}]]\\\\"\x00{[\n\n'
    tail = garbage + USAGE_EVENT + b"\n\n"
    assert extract_usage(tail, "text/event-stream", truncated=True) == openai(5, 7)
    assert extract_usage(garbage + no_usage, "text/event-stream", truncated=True) is None
    # The end of an event whose usage object was nested: its first line would
    # parse on its own, but it is not the event's top level.
    nested = b'{"usage":{"prompt_tokens":999,"completion_tokens":999}}}\n\n'
    assert json.loads(nested.strip()[:-1])["usage"]["prompt_tokens"] == 999
    assert extract_usage(nested + no_usage, "text/event-stream", truncated=True) is None
    assert extract_usage(b"ta: " + nested + no_usage, "text/event-stream", truncated=True) is None


def test_sse_partial_first_event_top_level_members_are_read() -> None:
    # The documented fallback: cut inside the data: prefix, the event's own
    # top-level members are still known for certain.
    no_usage = b'data: {"choices":[]}\n\n'
    for cut in range(len(b"data: ")):
        tail = USAGE_EVENT[cut:] + b"\n\n" + no_usage
        assert extract_usage(tail, "text/event-stream", truncated=True) == openai(5, 7)


def test_sse_event_without_the_final_blank_line() -> None:
    assert extract_usage(USAGE_EVENT, "text/event-stream") == openai(5, 7)
    assert extract_usage(USAGE_EVENT[:-3], "text/event-stream") is None


def test_openai_null_usage_on_every_chunk_is_no_usage() -> None:
    body = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\ndata: [DONE]\n\n'
    assert extract_usage(body, "text/event-stream") is None


def test_ndjson_stream_cut_before_done_gives_none() -> None:
    body, content_type = capture("ollama-generate-stream.ndjson")
    cut = body[: body.rindex(b"\n", 0, len(body) - 1) + 1]  # drop the done line
    assert extract_usage(cut, content_type) is None
    assert extract_usage(cut[-300:], content_type, truncated=True) is None


def test_ndjson_labelled_as_json_still_works() -> None:
    body, _ = capture("ollama-chat-stream.ndjson")
    assert_same(extract_usage(body, "application/json"), EXPECTED["ollama-chat-stream.ndjson"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gzip_compressed_body_gives_none(name: str) -> None:
    body, content_type = capture(name)
    packed = gzip.compress(body)
    assert extract_usage(packed, content_type) is None
    assert extract_usage(packed[len(packed) // 2 :], content_type, truncated=True) is None


def test_empty_and_whitespace_bodies() -> None:
    for body in (b"", b"\n", b"\r\n\r\n", b"data: [DONE]\n\n", b"{}", b"[]", b"null", b"}"):
        for truncated in (False, True):
            assert extract_usage(body, None, truncated=truncated) is None


def test_non_json_encodings_give_none() -> None:
    body, _ = capture("ollama-chat-nonstream.json")
    assert extract_usage(body.decode().encode("utf-16"), "application/json") is None
    assert extract_usage(body.decode().encode("utf-32-le"), None) is None


def test_hostile_json_does_not_raise() -> None:
    cases = [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"eval_count":' + b"9" * 5000 + b',"eval_duration":1}',
        b'{"eval_count":1e999,"eval_duration":NaN,"prompt_eval_count":-Infinity}',
        b'{"timings":' + b"{" * 50_000 + b"}" * 50_000 + b"}",
        b'{"usage":{"prompt_tokens":' + b"[" * 50_000,
        b"\x00" * 1000,
    ]
    for body in cases:
        for truncated in (False, True):
            for content_type in (None, "application/json", "text/event-stream"):
                result = _extract(body, content_type, truncated)
                assert_honest(result, body)
                assert result is None or result.completion_tokens is None


def test_extract_usage_never_raises_even_on_wrong_argument_types() -> None:
    assert extract_usage(None, None) is None  # type: ignore[arg-type]
    odd_type: object = 42
    result = extract_usage(b'{"usage":{"prompt_tokens":1}}', odd_type)  # type: ignore[arg-type]
    assert result == Usage(source="openai-usage", prompt_tokens=1)


# -- values of the wrong type are not reported ---------------------------------

BAD_VALUES = ["12", True, False, -5, 12.0, 10**30, None, [12], {"n": 12}, "NaN"]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=repr)
def test_ollama_bad_values_are_unknown(bad: object) -> None:
    record = {
        "done": True,
        "prompt_eval_count": bad,
        "prompt_eval_duration": bad,
        "eval_count": 12,
        "eval_duration": bad,
    }
    result = extract_usage(json.dumps(record).encode(), "application/json")
    assert result is not None
    assert result.completion_tokens == 12
    assert result.prompt_tokens is None
    if bad != 12.0:  # a float duration in ns is still a duration
        assert (result.prompt_ms, result.generation_ms, result.gen_tok_s) == (None, None, None)


@pytest.mark.parametrize("bad", BAD_VALUES, ids=repr)
def test_llamacpp_bad_values_are_unknown(bad: object) -> None:
    record = {
        "stop": True,
        "tokens_predicted": bad,
        "tokens_evaluated": bad,
        "timings": {
            "prompt_n": bad,
            "cache_n": bad,
            "predicted_n": 3,
            "predicted_ms": bad,
            "predicted_per_second": bad,
        },
    }
    result = extract_usage(b"data: " + json.dumps(record).encode() + b"\n\n", "text/event-stream")
    assert result is not None
    assert (result.prompt_tokens, result.cached_tokens, result.completion_tokens) == (None, None, 3)
    if bad != 12.0:
        assert (result.generation_ms, result.gen_tok_s, result.timed_by) == (None, None, None)


@pytest.mark.parametrize("bad", BAD_VALUES, ids=repr)
def test_openai_bad_values_are_unknown(bad: object) -> None:
    record = {"usage": {"prompt_tokens": bad, "completion_tokens": bad, "total_tokens": 24}}
    assert extract_usage(json.dumps(record).encode(), "application/json") is None


def test_zero_count_and_zero_duration_give_no_rate() -> None:
    ollama_zero = (
        b'{"done":true,"eval_count":0,"eval_duration":0,'
        b'"prompt_eval_count":0,"prompt_eval_duration":0}'
    )
    result = extract_usage(ollama_zero, "application/json")
    assert result is not None
    assert (result.gen_tok_s, result.prompt_tok_s, result.timed_by) == (None, None, None)
    assert (result.completion_tokens, result.generation_ms) == (0, 0.0)
    llama_zero = (
        b'{"timings":{"prompt_n":0,"prompt_ms":0,"prompt_per_second":null,'
        b'"predicted_n":0,"predicted_ms":0.0,"predicted_per_second":null}}'
    )
    result = extract_usage(llama_zero, "application/json")
    assert result is not None
    assert (result.gen_tok_s, result.prompt_tok_s, result.timed_by) == (None, None, None)
    # A count with no duration is still no rate.
    result = extract_usage(b'{"done":true,"eval_count":5,"eval_duration":0}', None)
    assert result is not None and result.gen_tok_s is None


def test_zero_count_or_duration_overrides_a_reported_rate() -> None:
    for timings in (
        b'{"predicted_n":0,"predicted_ms":0,"predicted_per_second":5.0}',
        b'{"predicted_n":0,"predicted_ms":12.5,"predicted_per_second":5.0}',
        b'{"predicted_n":3,"predicted_ms":0,"predicted_per_second":5.0}',
    ):
        result = extract_usage(b'{"timings":' + timings + b"}", "application/json")
        assert result is not None and result.gen_tok_s is None, timings


def test_absent_ollama_fields_are_unknown_not_zero() -> None:
    result = extract_usage(b'{"done":true,"eval_count":4}', "application/json")
    assert result == Usage(source="ollama", completion_tokens=4)


def test_ollama_partial_lines_are_not_final() -> None:
    assert extract_usage(b'{"done":false,"eval_count":4}', "application/x-ndjson") is None


# -- text inside JSON strings cannot pose as members ---------------------------

FAKE_TEXT = (
    'x\\", "eval_count": 999, "prompt_eval_count": 998, "usage": {"prompt_tokens": 997}, '
    '"timings": {"predicted_n": 996, "prompt_n": 995}, "tokens_predicted": 994}\n'
    'data: {"usage":{"prompt_tokens":993}}\n\n\\\\\\"eval_duration\\\\":992,\\'
)
FAKE_NUMBERS = {999, 998, 997, 996, 995, 994, 993, 992}


def counts(result: Optional[Usage]) -> set[int]:
    if result is None:
        return set()
    return {getattr(result, name) for name in COUNT_FIELDS} - {None}


def test_a_key_starting_at_the_cut_is_not_trusted() -> None:
    # Its opening quote may have been escaped by a backslash that was cut off.
    assert extract_usage(b'"eval_count":8}', "application/json", truncated=True) is None
    assert extract_usage(b'\\"eval_count":8}', "application/json", truncated=True) is None
    result = extract_usage(b',"eval_count":8}', "application/json", truncated=True)
    assert result == Usage(source="ollama", completion_tokens=8)


def test_ollama_body_cut_anywhere_never_reads_text() -> None:
    record = {
        "model": "m",
        "response": FAKE_TEXT,
        "done": True,
        "context": list(range(40)),
        "total_duration": 900,
        "prompt_eval_count": 6,
        "prompt_eval_duration": 300,
        "eval_count": 32,
        "eval_duration": 500,
        "trailer": FAKE_TEXT,
    }
    body = json.dumps(record).encode()
    whole = extract_usage(body, "application/json")
    assert whole is not None and counts(whole) == {6, 32}
    # Cut before the comma that precedes the first count, nothing is lost:
    # the trailing string (escaped quotes, backslashes) is skipped whole.
    complete_until = body.index(b', "prompt_eval_count"')
    for cut in range(len(body)):
        result = _extract(body[cut:], "application/json", True)
        assert not counts(result) & FAKE_NUMBERS, cut
        assert_part_of(result, whole)
        if cut <= complete_until:
            assert_same(result, whole)


def test_llamacpp_final_event_cut_anywhere_never_reads_text() -> None:
    event = {
        "content": FAKE_TEXT,
        "stop": True,
        "tokens_predicted": 32,
        "tokens_evaluated": 6,
        "prompt": FAKE_TEXT,
        "timings": {
            "cache_n": 1,
            "prompt_n": 5,
            "predicted_n": 32,
            "predicted_ms": 500.0,
            "predicted_per_second": 62.0,
        },
    }
    body = b'data: {"content":"a","stop":false}\n\ndata: ' + json.dumps(event).encode() + b"\n\n"
    whole = extract_usage(body, "text/event-stream")
    assert whole is not None and counts(whole) == {6, 1, 32}
    complete_until = body.index(b', "prompt"')  # the timings are whole after this
    for cut in range(len(body)):
        for content_type in ("text/event-stream", None):
            result = _extract(body[cut:], content_type, True)
            assert not counts(result) & FAKE_NUMBERS, cut
            assert_part_of(result, whole)
            if cut <= complete_until:
                assert_same(result, whole)


# -- TailBuffer ----------------------------------------------------------------


def test_tail_buffer_keeps_the_last_bytes() -> None:
    tail = TailBuffer(10)
    assert (tail.getvalue(), tail.truncated) == (b"", False)
    tail.feed(b"0123456789")
    assert (tail.getvalue(), tail.truncated) == (b"0123456789", False)
    tail.feed(b"ab")
    assert (tail.getvalue(), tail.truncated) == (b"23456789ab", True)
    tail.feed(b"")
    tail.feed(bytearray(b"c"))
    tail.feed(memoryview(b"xyz"))
    assert (tail.getvalue(), tail.truncated) == (b"6789abcxyz", True)


def test_tail_buffer_limit_zero_and_negative() -> None:
    tail = TailBuffer(0)
    assert tail.truncated is False
    tail.feed(b"abc")
    assert (tail.getvalue(), tail.truncated) == (b"", True)
    with pytest.raises(ValueError):
        TailBuffer(-1)


def test_tail_buffer_default_limit() -> None:
    assert TailBuffer().limit == 65536


def test_tail_buffer_memory_stays_bounded() -> None:
    tail = TailBuffer(100)
    for i in range(20_000):
        tail.feed(bytes([i % 256]))
        # Private, on purpose: the point is that nothing grows with the body.
        assert len(tail._buf) <= 2 * 100
    tail.feed(b"x" * 1_000_000)
    assert len(tail._buf) == 100 and tail.getvalue() == b"x" * 100


@HYPOTHESIS
@given(st.lists(st.binary(max_size=300), max_size=40), st.integers(0, 2000))
def test_tail_buffer_matches_the_end_of_the_body(chunks: list[bytes], limit: int) -> None:
    tail = TailBuffer(limit)
    for chunk in chunks:
        tail.feed(chunk)
    body = b"".join(chunks)
    assert tail.getvalue() == body[max(0, len(body) - limit) :]
    assert tail.truncated == (len(body) > limit)


# -- router timing ---------------------------------------------------------------


def test_router_timing_fills_in_a_missing_rate() -> None:
    result = with_router_timing(openai(15, 32), 10.0, 10.5)
    assert result == Usage(
        source="openai-usage",
        prompt_tokens=15,
        completion_tokens=32,
        gen_tok_s=62.0,
        timed_by="router",
    )
    assert result is not None and result.generation_ms is None


def test_router_timing_leaves_backend_timing_alone() -> None:
    timed = EXPECTED["ollama-chat-stream.ndjson"]
    assert with_router_timing(timed, 10.0, 10.5) is timed
    assert timed.timed_by == "backend"


@pytest.mark.parametrize(
    "completion, first, last",
    [
        (None, 10.0, 11.0),
        (0, 10.0, 11.0),
        (1, 10.0, 11.0),
        (32, None, 11.0),
        (32, 10.0, None),
        (32, 11.0, 11.0),
        (32, 11.0, 10.0),
        (32, 10.0, math.inf),
        (32, math.nan, 11.0),
    ],
)
def test_router_timing_needs_two_tokens_and_a_positive_span(
    completion: Optional[int], first: Optional[float], last: Optional[float]
) -> None:
    usage = openai(15, completion)  # type: ignore[arg-type]
    assert with_router_timing(usage, first, last) is usage


def test_router_timing_of_nothing_is_nothing() -> None:
    assert with_router_timing(None, 1.0, 2.0) is None


def test_router_timing_on_a_real_stream_without_backend_rate() -> None:
    body, content_type = capture("ollama-openai-chat-stream-include-usage.txt")
    result = with_router_timing(extract_usage(body, content_type), 0.0, 0.5)
    assert result is not None
    assert (result.gen_tok_s, result.timed_by) == (62.0, "router")


# -- properties ------------------------------------------------------------------

CONTENT_TYPES = [
    None,
    "text/event-stream",
    "application/json; charset=utf-8",
    "application/x-ndjson",
    "text/plain",
    "application/octet-stream",
]
USAGE_CAPTURES = sorted(EXPECTED)
PIECES = [
    b"{", b"}", b"[", b"]", b'"', b"\\", b'\\"', b",", b":", b" ", b"\n", b"\n\n", b"\r\n",
    b"data: ", b"data:", b"[DONE]", b"0", b"12", b"-3", b"1e400", b"NaN", b"true", b"null",
    b'"12"', b'"usage":', b'"timings":', b'"prompt_tokens":', b'"completion_tokens":',
    b'"cached_tokens":', b'"prompt_tokens_details":', b'"eval_count":', b'"eval_duration":',
    b'"prompt_eval_count":', b'"prompt_eval_duration":', b'"done":', b'"prompt_n":',
    b'"cache_n":', b'"predicted_n":', b'"predicted_ms":', b'"predicted_per_second":',
    b'"tokens_predicted":', b'"tokens_evaluated":', b"\x1f\x8b", b"\xff", b"\xc3",
]
json_soup = st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join)


@HYPOTHESIS
@given(st.one_of(st.binary(max_size=600), json_soup), st.sampled_from(CONTENT_TYPES), st.booleans())
def test_any_bytes_never_raise_and_invent_nothing(
    data: bytes, content_type: Optional[str], truncated: bool
) -> None:
    result = _extract(data, content_type, truncated)
    assert_honest(result, data)
    assert extract_usage(data, content_type, truncated=truncated) == result


@HYPOTHESIS
@given(st.sampled_from(USAGE_CAPTURES), st.data())
def test_any_slice_of_a_capture_is_honest(name: str, data: st.DataObject) -> None:
    body, content_type = capture(name)
    start = data.draw(st.integers(0, len(body)), label="start")
    end = data.draw(st.integers(start, len(body)), label="end")
    tail = body[start:end]
    result = _extract(tail, content_type, start > 0)
    assert_honest(result, tail)
    if end == len(body):
        assert_part_of(result, EXPECTED[name])


@HYPOTHESIS
@given(
    st.sampled_from(USAGE_CAPTURES),
    st.lists(st.integers(1, 500), max_size=30),
    st.integers(0, 3000),
)
def test_any_split_into_a_tail_buffer_agrees(name: str, sizes: list[int], limit: int) -> None:
    body, content_type = capture(name)
    tail = TailBuffer(limit)
    pos = 0
    for size in sizes:
        tail.feed(body[pos : pos + size])
        pos += size
    tail.feed(body[pos:])
    result = _extract(tail.getvalue(), content_type, tail.truncated)
    assert_honest(result, tail.getvalue())
    assert_part_of(result, EXPECTED[name])
    if len(body) - final_record_start(body) <= limit:
        assert_same(result, EXPECTED[name])


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = [p.strip(b'":').decode() for p in PIECES if p.startswith(b'"') and p.endswith(b'":')]
records = st.dictionaries(
    st.sampled_from(KEYS),
    st.one_of(json_values, st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)),
    max_size=8,
)


@HYPOTHESIS
@given(records, st.sampled_from(["json", "ndjson", "sse"]), st.integers(0, 400), st.booleans())
def test_structured_records_are_read_honestly(
    record: dict[str, object], framing: str, cut: int, indent: bool
) -> None:
    # Random key order, so a cut tail may legitimately read other members
    # than the whole record (say timings without usage): honesty only.
    text = json.dumps(record, indent=2 if indent and framing == "json" else None).encode()
    if framing == "json":
        body, content_type = text, "application/json"
    elif framing == "ndjson":
        body, content_type = b'{"done":false}\n' + text + b"\n", "application/x-ndjson"
    else:
        body = b"data: {}\n\ndata: " + text + b"\n\ndata: [DONE]\n\n"
        content_type = "text/event-stream"
    assert_honest(_extract(body, content_type, False), body)
    tail = body[min(cut, len(body)) :]
    assert_honest(_extract(tail, content_type, cut > 0), tail)
