"""The etcd driver's pure parts, without a server: range ends and the stream decoder."""

from __future__ import annotations

from podkit.backends.etcd import StreamDecoder, prefix_end


def test_prefix_end_is_the_first_key_after_the_prefix() -> None:
    assert prefix_end(b"t1/svc/") == b"t1/svc0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\x00"  # nothing above: every key
    assert prefix_end(b"") == b"\x00"


def test_stream_decoder_splits_lines_across_chunks() -> None:
    d = StreamDecoder()
    assert d.feed(b'{"result":{"created":true}}\n{"res') == [{"result": {"created": True}}]
    assert d.feed(b'ult":{"events":[]}}') == []
    assert d.feed(b"\n\n") == [{"result": {"events": []}}]
