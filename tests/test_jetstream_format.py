"""The log's message format and settings, without servers: the capture-record fields
round-trip through a message's headers; a hostile message is a ``MalformedMessage`` (never
another exception); every [log] setting is checked at load (exit 2 naming the key)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingestor import config as config_mod
from ingestor.cli import main
from ingestor.feed.capture import KIND_BINARY, KIND_TEXT, RECORD_HEADER, iter_records
from ingestor.feed.jetstream import (MalformedMessage, decode_message, decode_records,
                                     encode_batch_headers, encode_headers, label_of_stream,
                                     subject_of)

streams = st.from_regex(r"[A-Za-z0-9_.\-]{1,128}", fullmatch=True)


@given(streams, st.integers(0, (1 << 62) - 1), st.integers(0, (1 << 64) - 1),
       st.sampled_from([KIND_BINARY, KIND_TEXT]))
def test_headers_round_trip_every_field(stream, seq, recv_ns, kind):
    h = encode_headers(stream, seq, recv_ns, kind)
    assert all(isinstance(v, str) for v in h.values())  # NATS headers are text
    assert h["Nats-Msg-Id"] == f"{stream}:{seq}"  # JetStream's duplicate key
    assert decode_message(h) == (stream, seq, recv_ns, kind)


@given(st.one_of(st.none(), st.text(), st.dictionaries(
    st.sampled_from(["Nats-Msg-Id", "Ingestor-Recv-Ns", "Ingestor-Kind", "X"]),
    st.one_of(st.text(max_size=40), st.integers(), st.none()))))
def test_hostile_headers_are_malformed_never_a_crash(headers):
    try:
        stream, seq, recv_ns, kind = decode_message(headers)
    except MalformedMessage:
        return
    assert 0 <= seq < 1 << 62 and 0 <= recv_ns < 1 << 64 and kind in (1, 2) and stream


@pytest.mark.parametrize("headers", [
    {"Nats-Msg-Id": "s:1", "Ingestor-Recv-Ns": "1", "Ingestor-Kind": "3"},
    {"Nats-Msg-Id": "s:-1", "Ingestor-Recv-Ns": "1", "Ingestor-Kind": "1"},
    {"Nats-Msg-Id": "s:١", "Ingestor-Recv-Ns": "1", "Ingestor-Kind": "1"},  # not ASCII digits
    {"Nats-Msg-Id": ":1", "Ingestor-Recv-Ns": "1", "Ingestor-Kind": "1"},
    {"Nats-Msg-Id": "a b:1", "Ingestor-Recv-Ns": "1", "Ingestor-Kind": "1"},
    {"Nats-Msg-Id": "s:1", "Ingestor-Recv-Ns": str(1 << 64), "Ingestor-Kind": "1"},
    {"Nats-Msg-Id": "s:1", "Ingestor-Kind": "1"},
])
def test_each_bad_field_named(headers):
    with pytest.raises(MalformedMessage):
        decode_message(headers)


records = st.lists(st.tuples(st.binary(max_size=64), st.sampled_from([KIND_BINARY, KIND_TEXT]),
                             st.integers(0, (1 << 64) - 1)), min_size=1, max_size=20)


def _chunk(recs) -> bytes:
    return b"".join(RECORD_HEADER.pack(ns, kind, len(p)) + p for p, kind, ns in recs)


@given(streams, st.integers(0, (1 << 62) - 1 - 20), records)
def test_a_batch_round_trips_every_record_field(stream, first, recs):
    """Several capture records in one message: its headers name the range, its payload is
    the records as the spool holds them."""
    last = first + len(recs) - 1
    h = encode_batch_headers(stream, first, last, recs[-1][2])
    assert all(isinstance(v, str) for v in h.values())
    assert h["Nats-Msg-Id"] == f"{stream}:{first}-{last}"  # JetStream's duplicate key
    got_stream, got_first, n, recv0, data = decode_records(h, _chunk(recs))
    assert (got_stream, got_first, n, recv0) == (stream, first, len(recs), recs[0][2])
    assert [(data[off:off + ln], kind, ns) for off, ln, ns, kind in iter_records(data)] == recs


@given(streams, st.integers(0, (1 << 62) - 1), st.binary(max_size=64),
       st.sampled_from([KIND_BINARY, KIND_TEXT]), st.integers(0, (1 << 64) - 1))
def test_a_single_record_message_of_earlier_versions_is_read(stream, seq, payload, kind, ns):
    got = decode_records(encode_headers(stream, seq, ns, kind), payload)
    assert got == (stream, seq, 1, ns, RECORD_HEADER.pack(ns, kind, len(payload)) + payload)


@given(st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["Nats-Msg-Id", "Ingestor-Recv-Ns", "Ingestor-Records", "Ingestor-Kind"]),
    st.one_of(st.text(max_size=30), st.from_regex(r"s:[0-9]{1,3}-[0-9]{1,3}", fullmatch=True),
              st.from_regex(r"[0-9]{1,3}", fullmatch=True), st.integers(), st.none()))),
    st.one_of(st.binary(max_size=200), records.map(_chunk), st.none()))
def test_hostile_messages_are_malformed_never_a_crash(headers, data):
    try:
        stream, first, n, _, recs = decode_records(headers, data)
    except MalformedMessage:
        return
    assert stream and 0 <= first < 1 << 62 and n >= 1
    assert sum(1 for _ in iter_records(recs)) == n  # the records fill the payload


@pytest.mark.parametrize("headers, data", [
    # the count does not match the range
    ({"Nats-Msg-Id": "s:1-2", "Ingestor-Records": "3", "Ingestor-Recv-Ns": "1"}, b""),
    # the range runs backwards
    ({"Nats-Msg-Id": "s:5-2", "Ingestor-Records": "-2", "Ingestor-Recv-Ns": "1"}, b""),
    # two records promised, one in the payload
    ({"Nats-Msg-Id": "s:1-2", "Ingestor-Records": "2", "Ingestor-Recv-Ns": "1"},
     RECORD_HEADER.pack(1, 1, 2) + b"ab"),
    # a record running past the payload's end
    ({"Nats-Msg-Id": "s:1-1", "Ingestor-Records": "1", "Ingestor-Recv-Ns": "1"},
     RECORD_HEADER.pack(1, 1, 9) + b"ab"),
    # a record of an unknown kind
    ({"Nats-Msg-Id": "s:1-1", "Ingestor-Records": "1", "Ingestor-Recv-Ns": "1"},
     RECORD_HEADER.pack(1, 7, 2) + b"ab"),
    # no range in the id
    ({"Nats-Msg-Id": "s:1", "Ingestor-Records": "1", "Ingestor-Recv-Ns": "1"},
     RECORD_HEADER.pack(1, 1, 2) + b"ab"),
])
def test_each_bad_batch_named(headers, data):
    with pytest.raises(MalformedMessage):
        decode_records(headers, data)


def test_records_of_a_spool_chunk():
    recs = [(b"\x00\x01", 1, 10), (b"", 2, 11), (b"x" * 300, 1, 12)]
    chunk = b"".join(RECORD_HEADER.pack(ns, kind, len(p)) + p for p, kind, ns in recs)
    got = [(chunk[off:off + n], kind, ns) for off, n, ns, kind in iter_records(chunk)]
    assert got == recs


def test_subjects_and_labels():
    assert subject_of("ingestor", "kite-0") == "ingestor.raw.kite-0"
    assert label_of_stream("kite-0-3fdf2a78254b") == "kite-0"


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("body, key", [
    ('servers = ["http://h:4222"]', "log.servers"),
    ('servers = ["nats://u:p@h:4222"]', "log.servers"),
    ('servers = ["nats://h:4222"]\nreplicas = 7', "log.replicas"),
    ('servers = ["nats://h:4222"]\nduplicate_window = 30.0\nmax_feed_restart = 60.0',
     "log.duplicate_window"),
    ('servers = ["nats://h:4222"]\nmax_age = 60.0', "log.max_age"),
    ('servers = ["nats://h:4222"]\nstream = "a.b"', "log.stream"),
    ('servers = ["nats://h:4222"]\nsubject_prefix = "a.>"', "log.subject_prefix"),
    ('servers = ["nats://h:4222"]\nmax_in_flight = 0', "log.max_in_flight"),
    ('servers = ["nats://h:4222"]\nack_timeout = nan', "log.ack_timeout"),
    ('servers = ["nats://h:4222"]\ncredentials_file = "/nonexistent/x.creds"',
     "log.credentials_file"),
    ('servers = ["nats://h:4222"]\nsurprise = 1', "log.surprise"),
    ('servers = ["nats://h:4222"]\nlease_ttl = 0.1', "log.lease_ttl"),
    ('servers = ["nats://h:4222"]\nrole = "reader"', "log.role"),
    ('role = "writer"', "log.role"),
    ('servers = ["nats://h:4222"]\nlease_ttl = inf', "log.lease_ttl"),
    ('servers = ["nats://h:4222"]\nlease_renew = 0.0', "log.lease_renew"),
    ('servers = ["nats://h:4222"]\nlease_ttl = 6.0\nlease_renew = 2.5', "log.lease_renew"),
    # a replicated lease bucket elects for up to ~9 s: the holders would stop themselves
    ('servers = ["nats://h:4222"]\nreplicas = 3', "log.lease_ttl"),
    ('servers = ["nats://h:4222"]\nfeed_lease = 1', "log.feed_lease"),
    ('servers = ["nats://h:4222"]\npublish_candles = "yes"', "log.publish_candles"),
    ('servers = ["nats://h:4222"]\ncandles_prefix = "c.*"', "log.candles_prefix"),
    ('servers = ["nats://h:4222"]\ncandles_prefix = "ingestor.candles"', "log.candles_prefix"),
])
def test_bad_log_settings_refused_naming_the_key(tmp_path, capsys, body, key):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[feed]\ntokens = [1]\n[log]\n{body}\n")
    with pytest.raises(config_mod.ConfigError, match=key.replace(".", r"\.")):
        config_mod.load(str(cfg))
    assert main(["run", "--config", str(cfg), "--role", "feed"]) == 2
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--accept-new-log-stream", "--accept-log-loss"])
def test_accepting_a_new_log_stream_or_a_loss_is_for_writers(tmp_path, capsys, flag):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[feed]\ntokens = [1]\n[log]\nservers = ["nats://h:4222"]\n')
    assert main(["run", "--config", str(cfg), "--role", "feed", flag]) == 2
    assert flag in capsys.readouterr().err


def test_role_needs_the_log(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[feed]\ntokens = [1]\n")
    assert main(["run", "--config", str(cfg), "--role", "writer"]) == 2
    assert "log.servers" in capsys.readouterr().err


def test_defaults_are_off_and_valid():
    cfg = config_mod.load(None)
    assert not cfg.log.enabled
    assert cfg.log.duplicate_window >= cfg.log.max_feed_restart
