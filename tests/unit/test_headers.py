"""jano.headers.WireHeaders: Twisted's Headers API, names kept as spelled."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from jano.headers import WireHeaders


def test_names_keep_their_spelling_and_lookups_ignore_case() -> None:
    h = WireHeaders.from_pairs([(b"X-Request-ID", b"1"), (b"content-type", b"application/json"),
                                (b"x-request-id", b"2")])
    assert list(h.getAllRawHeaders()) == [(b"X-Request-ID", [b"1", b"2"]),
                                          (b"content-type", [b"application/json"])]
    assert h.getRawHeaders(b"X-REQUEST-ID") == [b"1", b"2"]
    assert h.getRawHeaders("Content-Type") == ["application/json"]  # str in, str out, as Twisted
    assert h.hasHeader(b"CONTENT-TYPE") and not h.hasHeader(b"accept")
    assert h.getRawHeaders(b"accept", [b"default"]) == [b"default"]


def test_setting_again_keeps_the_first_spelling_and_removal_forgets_it() -> None:
    h = WireHeaders()
    h.setRawHeaders(b"Retry-After", [b"5"])
    h.setRawHeaders(b"retry-after", [b"7"])
    assert list(h.getAllRawHeaders()) == [(b"Retry-After", [b"7"])]
    h.removeHeader(b"RETRY-AFTER")
    h.addRawHeader(b"retry-after", b"9")
    assert list(h.getAllRawHeaders()) == [(b"retry-after", [b"9"])]


def test_values_set_through_the_api_cannot_smuggle_a_line_break() -> None:
    h = WireHeaders()
    h.setRawHeaders(b"x-a", [b"one\r\nInjected: yes"])
    h.addRawHeader("x-b", "two\nthree")
    assert h.getRawHeaders(b"x-a") == [b"one Injected: yes"]
    assert h.getRawHeaders(b"x-b") == [b"two three"]


def test_copy_from_drops_what_it_is_told_from_either_kind_of_headers() -> None:
    src = WireHeaders.from_pairs([(b"Keep-Me", b"1"), (b"Connection", b"close"), (b"TE", b"x")])
    out = WireHeaders()
    out.copy_from(src, frozenset({b"connection", b"te"}))
    assert list(out.getAllRawHeaders()) == [(b"Keep-Me", [b"1"])]
    out.getRawHeaders(b"keep-me").append(b"mutated")  # type: ignore[union-attr]
    assert src.getRawHeaders(b"keep-me") == [b"1"]  # a copy, not shared lists

    twisted_headers = Headers({b"x-one": [b"a"], b"connection": [b"close"]})
    out2 = WireHeaders()
    out2.copy_from(twisted_headers, frozenset({b"connection"}))
    assert out2.getRawHeaders(b"x-one") == [b"a"] and not out2.hasHeader(b"connection")


def test_it_is_a_twisted_headers_and_copies_are_independent() -> None:
    h = WireHeaders({b"A": [b"1"]})
    assert isinstance(h, Headers)
    c = h.copy()
    c.addRawHeader(b"a", b"2")
    assert h.getRawHeaders(b"a") == [b"1"] and c.getRawHeaders(b"a") == [b"1", b"2"]
    assert "A" in repr(h)
