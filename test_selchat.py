"""Tests for selchat.py, read as its specification.

Three layers, from the inside out:

* unit tests of the module-level helpers (framing, pack/unpack, time, sanitiser,
  nick colours and nickname checks), with Hypothesis where a property says more
  than examples;
* the server started as a real process and driven over real sockets by raw
  peers that speak the wire protocol themselves (they never use selchat's own
  framing code, so a bug there cannot hide itself);
* the client started in a real pseudo-terminal (pexpect) or with pipes, talking
  to a real server and to raw peers.

Every wait is on an event with a deadline (socket timeouts, pexpect timeouts,
polling with a deadline); every process a test starts is stopped by a fixture,
even when the test fails. The raw peer and the process helpers that every test
file shares are in selchat_testkit.py, their fixtures in conftest.py.
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import selchat
from selchat_testkit import (
    HERE,
    SCRIPT,
    SHOWN_NOW,
    SHUTDOWN_NOTICE,
    TIMEOUT,
    UTC,
    chat_payload,
    clean_env,
    frame,
    free_port,
    needs_pty,
    pty_output,
    shown_times,
    wait_pty_exit,
    welcome_text,
)

try:
    from zoneinfo import ZoneInfo
except ImportError:  # pragma: no cover - Python 3.8
    ZoneInfo = None

needs_zoneinfo = pytest.mark.skipif(ZoneInfo is None, reason="needs zoneinfo")


# What must never reach a terminal raw: C0 (all of it), DEL, C1, the bidi
# controls and the line/paragraph separators.
DANGEROUS = (
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\u061c", "\u200e", "\u200f"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
    + ["\u2028", "\u2029"]
)
DANGEROUS_SET = frozenset(DANGEROUS)
SGR = re.compile(rb"\x1b\[[0-9;]*m")
# The per-client message rate limit (SPEC section 6) is off for tests that
# push volume through the server to test framing and queueing, not the rate.
NO_RATE_LIMIT = ("--rate", "0")


# ---------------------------------------------------------------------------
# Unit: framing
# ---------------------------------------------------------------------------


def test_module_constants_match_the_contract():
    assert selchat.HEADER_SIZE == 10
    assert selchat.DEFAULT_PORT == 9009
    assert selchat.DEFAULT_MAX_MESSAGE == 1 << 20
    assert issubclass(selchat.ProtocolError, ValueError)


def test_encode_frame_writes_left_aligned_space_padded_length():
    assert selchat.encode_frame(b"hello") == b"5         hello"
    assert selchat.encode_frame(b"") == b"0         "
    payload = "привет".encode()
    assert selchat.encode_frame(payload) == b"12        " + payload


@pytest.mark.parametrize(
    "header, size",
    [
        (b"5         ", 5),  # left-aligned, as written
        (b"         5", 5),  # right-aligned
        (b"0000000005", 5),  # zero-padded
        (b"   42     ", 42),  # blanks on both sides
        (b"0         ", 0),
        (b"1048576   ", 1048576),
        (b"9999999999", 9999999999),
    ],
)
def test_parse_header_accepts_left_right_aligned_and_zero_padded_lengths(header, size):
    assert selchat.parse_header(header) == size


@pytest.mark.parametrize(
    "header",
    [
        b"-5        ",  # sign
        b"+5        ",  # sign
        b"1_0       ",  # underscore, which int() accepts
        b"1 0       ",  # inner space
        "٥".encode().ljust(10),  # ARABIC-INDIC DIGIT FIVE, which int() accepts
        "５".encode().ljust(10),  # FULLWIDTH DIGIT FIVE, which int() accepts
        b"          ",  # all blank
        b"abc       ",
        b"0x10      ",
        b"5.0       ",
        b"1e3       ",
        b"\x005        ",
    ],
)
def test_parse_header_rejects_anything_but_ascii_digits(header):
    with pytest.raises(selchat.ProtocolError):
        selchat.parse_header(header)


def test_frame_decoder_returns_complete_payloads_as_bytes_and_keeps_the_tail():
    decoder = selchat.FrameDecoder()
    stream = selchat.encode_frame(b"one") + selchat.encode_frame(b"two") + b"5    "
    assert decoder.feed(stream) == [b"one", b"two"]
    assert decoder.feed(b"     hel") == []
    result = decoder.feed(b"lo" + selchat.encode_frame(b""))
    assert result == [b"hello", b""]
    assert all(type(payload) is bytes for payload in result)


@settings(max_examples=300, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), max_size=25), data=st.data())
def test_frame_decoder_gets_the_same_payloads_back_wherever_the_stream_is_cut(payloads, data):
    stream = b"".join(selchat.encode_frame(payload) for payload in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    decoder = selchat.FrameDecoder()
    received = []
    start = 0
    for cut in [*cuts, len(stream)]:
        received.extend(decoder.feed(stream[start:cut]))
        start = cut
    assert [bytes(payload) for payload in received] == payloads


def test_frame_decoder_accepts_a_frame_of_exactly_max_size():
    decoder = selchat.FrameDecoder(max_size=5)
    assert decoder.feed(selchat.encode_frame(b"12345")) == [b"12345"]


def test_frame_decoder_rejects_an_oversized_frame_from_its_header_alone():
    # Nothing a peer sends may make the reader hold more than the limit:
    # the header is enough to know the frame is too long.
    decoder = selchat.FrameDecoder(max_size=5)
    with pytest.raises(selchat.ProtocolError):
        decoder.feed(b"6         ")


def test_frame_decoder_without_limit_accepts_large_frames():
    payload = b"x" * 300_000
    assert selchat.FrameDecoder().feed(selchat.encode_frame(payload)) == [payload]
    assert selchat.FrameDecoder(0).feed(selchat.encode_frame(payload)) == [payload]


def test_frame_decoder_rejects_a_bad_header_after_good_frames():
    decoder = selchat.FrameDecoder()
    assert decoder.feed(selchat.encode_frame(b"ok")) == [b"ok"]
    with pytest.raises(selchat.ProtocolError):
        decoder.feed(b"-1        x")


# ---------------------------------------------------------------------------
# Unit: pack / unpack
# ---------------------------------------------------------------------------

PLUS3 = timezone(timedelta(hours=3))


def test_pack_message_writes_time_nick_and_text_separated_by_nul():
    when = datetime(2026, 11, 27, 7, 37, 12, tzinfo=PLUS3)
    assert (
        selchat.pack_message("hi there", "alice", when)
        == b"2026-11-27T07:37:12+03:00\0alice\0hi there"
    )


def test_pack_message_encodes_utf8():
    when = datetime(2026, 11, 27, 7, 37, 12, tzinfo=PLUS3)
    payload = selchat.pack_message("привет 🎉", "жора", when)
    assert payload == "2026-11-27T07:37:12+03:00\0жора\0привет 🎉".encode()


def test_pack_message_without_time_stamps_now_with_an_offset():
    before = datetime.now(UTC).replace(microsecond=0)
    payload = selchat.pack_message("hi", "alice")
    after = datetime.now(UTC)
    stamp, nick, text = payload.decode("utf-8").split("\0")
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None
    assert before <= parsed <= after
    assert (nick, text) == ("alice", "hi")


def test_unpack_message_splits_a_chat_message_on_the_first_two_nuls_only():
    assert selchat.unpack_message(b"T\0nick\0a\0b\0c") == ("T", "nick", "a\0b\0c")
    assert selchat.unpack_message(b"T\0nick\0") == ("T", "nick", "")
    assert selchat.unpack_message("2026-11-27T07:37:12+03:00\0жора\0да".encode()) == (
        "2026-11-27T07:37:12+03:00",
        "жора",
        "да",
    )


def test_unpack_message_returns_a_service_message_as_text_alone():
    assert selchat.unpack_message(b"bob joined the chat (2 online)") == (
        None,
        None,
        "bob joined the chat (2 online)",
    )
    assert selchat.unpack_message(b"") == (None, None, "")


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"T\0nick\0\xc3(", b"caf\xe9", b"\xed\xa0\x80"])
def test_unpack_message_raises_protocol_error_on_invalid_utf8(payload):
    with pytest.raises(selchat.ProtocolError):
        selchat.unpack_message(payload)


@settings(max_examples=200, deadline=None)
@given(text=st.text(), nick=st.text(min_size=1).filter(lambda n: "\0" not in n))
def test_pack_then_unpack_gives_back_time_nick_and_text(text, nick):
    when = datetime(2026, 3, 8, 1, 59, 59, tzinfo=timezone(timedelta(hours=-5)))
    stamp = "2026-03-08T01:59:59-05:00"
    assert selchat.unpack_message(selchat.pack_message(text, nick, when)) == (stamp, nick, text)


# ---------------------------------------------------------------------------
# Unit: time
# ---------------------------------------------------------------------------

STAMP_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


def test_now_stamp_is_iso8601_local_time_with_offset_to_the_second():
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = selchat.now_stamp()
    after = datetime.now(UTC)
    assert STAMP_FORMAT.fullmatch(stamp), stamp
    assert before <= datetime.fromisoformat(stamp) <= after


def run_python(code, tz, **env):
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env(TZ=tz, **env),
        cwd=str(HERE),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(
    "tz, offset", [("Asia/Kolkata", "+05:30"), ("America/Sao_Paulo", "-03:00"), ("UTC", "+00:00")]
)
def test_now_stamp_follows_the_tz_environment_variable(tz, offset):
    stamp = run_python("import selchat; print(selchat.now_stamp())", tz)
    assert STAMP_FORMAT.fullmatch(stamp), stamp
    assert stamp.endswith(offset)


@needs_zoneinfo
def test_format_time_converts_to_the_given_zone():
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert selchat.format_time("2026-11-27T07:37:12+03:00", now=now, tz=UTC) == "04:37:12"
    tokyo = ZoneInfo("Asia/Tokyo")
    assert selchat.format_time("2026-11-27T07:37:12+03:00", now=now, tz=tokyo) == "13:37:12"
    kolkata = ZoneInfo("Asia/Kolkata")
    assert selchat.format_time("2026-11-27T07:37:12+03:00", now=now, tz=kolkata) == "10:07:12"


@needs_zoneinfo
def test_format_time_across_the_spring_forward_gap_in_new_york():
    # 2026-03-08: 02:00 EST becomes 03:00 EDT. Two messages written an hour apart
    # at +03:00 straddle the gap and read two hours apart on the wall clock.
    new_york = ZoneInfo("America/New_York")
    now = datetime(2026, 3, 8, 12, 0, tzinfo=new_york)
    assert selchat.format_time("2026-03-08T09:30:00+03:00", now=now, tz=new_york) == "01:30:00"
    assert selchat.format_time("2026-03-08T10:30:00+03:00", now=now, tz=new_york) == "03:30:00"


@needs_zoneinfo
def test_format_time_across_the_fall_back_overlap_in_new_york():
    # 2026-11-01: 02:00 EDT becomes 01:00 EST. Messages written an hour apart
    # at +03:00 both read 01:30:00 (first EDT, then EST).
    new_york = ZoneInfo("America/New_York")
    now = datetime(2026, 11, 1, 12, 0, tzinfo=new_york)
    assert selchat.format_time("2026-11-01T08:30:00+03:00", now=now, tz=new_york) == "01:30:00"
    assert selchat.format_time("2026-11-01T09:30:00+03:00", now=now, tz=new_york) == "01:30:00"
    assert selchat.format_time("2026-11-01T10:30:00+03:00", now=now, tz=new_york) == "02:30:00"


@needs_zoneinfo
def test_format_time_shows_the_date_when_the_readers_date_is_not_today():
    # Written on the 27th at +03:00, it is still the 26th in New York.
    new_york = ZoneInfo("America/New_York")
    now = datetime(2026, 11, 27, 10, 0, tzinfo=new_york)
    assert (
        selchat.format_time("2026-11-27T03:00:00+03:00", now=now, tz=new_york)
        == "2026-11-26 19:00:00"
    )


@needs_zoneinfo
def test_format_time_shows_no_date_when_only_the_writers_date_differs():
    # Written on the 28th at +03:00, it is the 27th (today) in New York.
    new_york = ZoneInfo("America/New_York")
    now = datetime(2026, 11, 27, 10, 0, tzinfo=new_york)
    assert selchat.format_time("2026-11-28T01:30:00+03:00", now=now, tz=new_york) == "17:30:00"


@needs_zoneinfo
def test_format_time_compares_dates_in_the_readers_zone_not_in_nows_zone():
    # now is given in UTC, where it is already the 28th; in New York it is the 27th.
    new_york = ZoneInfo("America/New_York")
    now = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
    assert selchat.format_time("2026-11-27T20:00:00-05:00", now=now, tz=new_york) == "20:00:00"
    assert (
        selchat.format_time("2026-11-26T20:00:00-05:00", now=now, tz=new_york)
        == "2026-11-26 20:00:00"
    )


@needs_zoneinfo
def test_format_time_shows_the_date_across_a_year_boundary():
    sao_paulo = ZoneInfo("America/Sao_Paulo")
    now = datetime(2027, 1, 1, 9, 0, tzinfo=sao_paulo)
    assert (
        selchat.format_time("2027-01-01T01:30:00+03:00", now=now, tz=sao_paulo)
        == "2026-12-31 19:30:00"
    )


def test_format_time_without_now_treats_a_fresh_stamp_as_today():
    while True:  # again if the day ended in between (then either form is right)
        written = datetime.now(UTC).replace(microsecond=0)
        shown = selchat.format_time(written.isoformat(), tz=UTC)
        if datetime.now(UTC).date() == written.date():
            break
    assert shown == written.strftime("%H:%M:%S")


@pytest.mark.parametrize(
    "tz, expected",
    [
        ("America/Sao_Paulo", "2020-02-29 15:00:00"),
        ("Asia/Tokyo", "2020-03-01 03:00:00"),
        ("UTC", "2020-02-29 18:00:00"),
    ],
)
def test_format_time_default_zone_follows_the_tz_environment_variable(tz, expected):
    code = "import selchat; print(selchat.format_time('2020-02-29T23:30:00+05:30'))"
    assert run_python(code, tz) == expected


@pytest.mark.parametrize(
    "stamp",
    [
        "yesterday",
        "",
        "2026-13-45T99:99:99+03:00",
        "\x1b[2J12:00",
        "12:00:00\u202e",
        "2026-11-27T07:37:12+99:00",
    ],
)
def test_format_time_shows_an_unreadable_time_as_received_but_sanitised(stamp):
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert selchat.format_time(stamp, now=now, tz=UTC) == selchat.sanitize(stamp)


# ---------------------------------------------------------------------------
# Unit: sanitiser
# ---------------------------------------------------------------------------

ESCAPE = re.compile(r"\\x[0-9A-Fa-f]{2}|\\u[0-9A-Fa-f]{4}")


def lower_escapes(text):
    """Hex digits of escapes in either case compare equal."""
    return ESCAPE.sub(lambda m: m.group(0).lower(), text)


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("\x1b[2J", r"\x1b[2J"),
        ("\x1b]52;c;cHduZWQ=\x07", r"\x1b]52;c;cHduZWQ=\x07"),
        ("\x1b[31mred\x1b[0m", r"\x1b[31mred\x1b[0m"),
        ("a\tb\nc\rd", r"a\x09b\x0ac\x0dd"),
        ("\x00\x01\x08\x1f", r"\x00\x01\x08\x1f"),
        ("del\x7f", r"del\x7f"),
        ("csi\x9b2J", r"csi\x9b2J"),
        ("\x80\x85\x9f", r"\x80\x85\x9f"),
        ("abc\u202edcba", r"abc\u202edcba"),
        ("\u202a\u202b\u202c\u202d", r"\u202a\u202b\u202c\u202d"),
        ("\u2066\u2067\u2068\u2069", r"\u2066\u2067\u2068\u2069"),
        ("\u061c\u200e\u200f", r"\u061c\u200e\u200f"),
        ("line\u2028para\u2029", r"line\u2028para\u2029"),
    ],
)
def test_sanitize_turns_control_characters_into_visible_escapes(raw, shown):
    assert lower_escapes(selchat.sanitize(raw)) == lower_escapes(shown)


@pytest.mark.parametrize(
    "text",
    [
        "hello, world",
        "Привет, мир!",
        "你好，世界 こんにちは 안녕하세요",
        "emoji 🎉👍🏽 and family 👨\u200d👩\u200d👧 and flag 🇺🇦",
        "café naïve e\u0301 ½ ∑ — “quotes”",
        "back\\slash and \\x1b literally",
        "non-breaking\u00a0space and soft\u00adhyphen",
        "שלום مرحبا",
        "",
    ],
)
def test_sanitize_leaves_ordinary_text_unchanged(text):
    assert selchat.sanitize(text) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_sanitize_never_lets_a_dangerous_character_through(text):
    shown = selchat.sanitize(text)
    assert not DANGEROUS_SET.intersection(shown)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_characters=DANGEROUS, blacklist_categories=("Cs",)))
)
def test_sanitize_is_the_identity_on_safe_text(text):
    assert selchat.sanitize(text) == text


# ---------------------------------------------------------------------------
# Unit: nick colours and nickname checks
# ---------------------------------------------------------------------------

RED_CODES = {"31", "91", "41", "101"}
RED_256 = {"1", "9", "52", "88", "124", "160", "196"}


def assert_not_red(code):
    assert re.fullmatch(r"\d+(;\d+)*", code), code
    parts = code.split(";")
    assert not RED_CODES.intersection(parts), code
    for index, part in enumerate(parts[:-2]):
        if part in ("38", "48") and parts[index + 1] == "5":
            assert parts[index + 2] not in RED_256, code


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=32))
def test_nick_color_is_never_red(nick):
    assert_not_red(selchat.nick_color(nick))


def test_nick_color_is_stable_for_a_nick():
    for nick in ["alice", "bob", "Жора", "日本", "x"]:
        assert selchat.nick_color(nick) == selchat.nick_color(nick)


def test_nick_color_is_the_same_in_every_process_whatever_the_hash_seed():
    nicks = ["alice", "bob", "carol", "Жора", "日本", "mallory", "z"]
    code = "import selchat; print(' '.join(selchat.nick_color(n) for n in %r))" % (nicks,)
    here = " ".join(selchat.nick_color(n) for n in nicks)
    assert run_python(code, "UTC", PYTHONHASHSEED="1") == here
    assert run_python(code, "UTC", PYTHONHASHSEED="2") == here


def test_nick_color_gives_different_nicks_different_colours():
    colours = {selchat.nick_color(f"user{i}") for i in range(64)}
    assert len(colours) >= 3


@pytest.mark.parametrize(
    "nick", ["alice", "Bob_42", "a", "é" * 32, "x" * 32, "日本語", "Жора", "o'neil", "🎉"]
)
def test_check_nick_accepts_valid_nicknames(nick):
    assert selchat.check_nick(nick) is None


@pytest.mark.parametrize(
    "nick",
    [
        "",
        "x" * 33,
        "é" * 33,
        "two words",
        "tab\there",
        "new\nline",
        "bell\x07",
        "esc\x1b[2J",
        "nul\0byte",
        "del\x7f",
        "c1\x85",
        "zero\u200bwidth",
        "rtl\u202eoverride",
        "ideographic\u3000space",
        "line\u2028sep",
        "nb\u00a0sp",
    ],
)
def test_check_nick_gives_a_reason_for_invalid_nicknames(nick):
    reason = selchat.check_nick(nick)
    assert isinstance(reason, str) and reason.strip()


# ---------------------------------------------------------------------------
# Server over real sockets
# ---------------------------------------------------------------------------


def test_server_version_flag_prints_name_and_version():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--version"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(),
    )
    assert result.returncode == 0
    assert re.fullmatch(r"selchat \d+\.\d+\.\d+", result.stdout.strip()), result.stdout


@pytest.mark.parametrize(
    "level, options",
    [
        (
            "server",
            [
                "--host",
                "--port",
                "--max-message",
                "--max-queue",
                "--max-clients",
                "--handshake-timeout",
            ],
        ),
        ("client", ["--host", "--port", "--nick", "--no-color"]),
    ],
)
def test_help_of_each_subcommand_lists_its_options(level, options):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), level, "-h"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(),
    )
    assert result.returncode == 0
    for option in options:
        assert option in result.stdout


def test_server_prints_listening_line_with_the_real_port(server, connect):
    assert re.search(r"listening on 127\.0\.0\.1:%d\b" % server.port, server.log)
    connect(server.port, "alice", online=1)


def test_welcome_is_the_first_frame_and_names_quit(server, connect):
    alice = connect(server.port)
    alice.send_frame("alice")
    assert alice.recv_service() == welcome_text("alice", 1)
    bob = connect(server.port)
    bob.send_frame("bob")
    assert bob.recv_service() == welcome_text("bob", 2)


def test_welcome_has_no_limit_note_when_the_rate_limit_is_off(start_server, connect):
    server = start_server(*NO_RATE_LIMIT)
    alice = connect(server.port)
    alice.send_frame("alice")
    assert alice.recv_service() == welcome_text("alice", 1, limit_note="")


def test_welcome_counts_users_online(server, connect):
    connect(server.port, "alice", online=1)
    connect(server.port, "bob", online=2)
    connect(server.port, "carol", online=3)


def test_join_and_leave_notices_go_to_the_others_without_naming_quit(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    joined = alice.recv_service()
    assert joined == "bob joined the chat (2 online)"
    bob.close()
    left = alice.recv_service()
    assert left == "bob left the chat (1 online)"
    assert "<quit<" not in joined + left


ROOM_NOTICE = re.compile(r"(.+) (joined|left) the chat \((\d+) online\)")
WELCOME_COUNT = re.compile(r"Welcome to selchat, .*! (\d+) users? online\.")


class RoomView:
    """What one user has been told about the room: the latest count (welcome,
    then notices) and who was announced as joining; and when it joined."""

    def __init__(self, peer, nick, count=None):
        self.peer, self.nick = peer, nick
        self.count = count
        self.place = None  # when it joined, from the server's log
        self.joined = []  # names announced as joining
        self.unnamed = 0  # "... and N others joined"

    def read_until_synced(self):
        """Read up to the answer to a command sent now: since the server has
        handled everything before it, all it owes this user has arrived."""
        self.peer.send_frame("/sync-the-test")
        while True:
            text = self.peer.recv_service()
            if text.startswith("Unknown command /sync-the-test"):
                return
            welcome = WELCOME_COUNT.match(text)
            if welcome:
                self.count = int(welcome.group(1))
                continue
            notice = ROOM_NOTICE.fullmatch(text)
            assert notice, "%s got %r" % (self.nick, text)
            who, event, online = notice.groups()
            self.count = int(online)
            if event == "joined":
                more = re.fullmatch(r"(.+) and (\d+) others", who)
                if more:
                    self.joined += more.group(1).split(", ")
                    self.unnamed += int(more.group(2))
                else:
                    first, _, last = who.rpartition(" and ")
                    self.joined += (first.split(", ") if first else []) + [last]


def assert_everyone_knows_the_room(views, log):
    """Each user's latest count is the number online, and each heard of
    everyone present who joined after it (named, or counted among "others")."""
    order = re.findall(r"joined as (\S+)", log)
    for view in views:
        view.place = order.index(view.nick)
    for view in views:
        later = {other.nick for other in views if other.place > view.place}
        assert view.count == len(views), (view.nick, view.count, len(views))
        unheard = later - set(view.joined)
        assert len(unheard) <= view.unnamed, (view.nick, sorted(unheard), view.unnamed)


@contextlib.contextmanager
def paused(server):
    """SIGSTOP the server until the with-block ends: what peers send meanwhile
    waits in the kernel and reaches one turn of the loop together."""
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_a_burst_of_joins_in_one_turn_tells_each_user_of_everyone_after_it(server, connect):
    zed = connect(server.port, "zed", online=1)
    newcomers = [connect(server.port) for _ in range(12)]
    with paused(server):
        for index, peer in enumerate(newcomers):
            peer.send_frame("n%02d" % index)
    views = [RoomView(zed, "zed", count=1)]
    views += [RoomView(peer, "n%02d" % index) for index, peer in enumerate(newcomers)]
    assert server.wait_for_count("joined as n", 12) == 12
    for view in views:
        view.read_until_synced()
    assert_everyone_knows_the_room(views, server.log)
    for view in views:  # and each newcomer once, to those before it alone
        later = [other for other in views if other.place > view.place]
        assert len(view.joined) == len(set(view.joined)), view.joined
        assert set(view.joined) <= {other.nick for other in later}, (view.nick, view.joined)
        assert len(view.joined) + view.unnamed == len(later), (view.nick, view.joined)


def test_a_burst_of_joins_and_leaves_ends_with_every_count_right(server, connect):
    zed = connect(server.port, "zed", online=1)
    old = [connect(server.port, "old%d" % index, online=index + 2) for index in range(4)]
    views = [RoomView(zed, "zed", count=1)]
    views += [RoomView(peer, "old%d" % index, count=index + 2) for index, peer in enumerate(old)]
    for view in views:
        view.read_until_synced()
    view_of = {view.nick: view for view in views}
    staying = [connect(server.port) for _ in range(4)]
    passing = [connect(server.port) for _ in range(2)]  # join and leave in the same turn
    with paused(server):
        for index, peer in enumerate(staying):
            peer.send_frame("new%d" % index)
            if index == 1:
                old[0].close()
                old[2].close()
        for index, peer in enumerate(passing):
            peer.send_frame("gone%d" % index)
            peer.close()
        old[3].close()
    for nick in ("old0", "old2", "old3"):
        views.remove(view_of[nick])
    assert server.wait_for_count("joined as", 11) == 11
    assert server.wait_for_count("disconnected", 5) == 5
    views += [RoomView(peer, "new%d" % index) for index, peer in enumerate(staying)]
    for view in views:
        view.read_until_synced()
    assert_everyone_knows_the_room(views, server.log)


# ---------------------------------------------------------------------------
# Join storms: notices gathered over a window in a large room (issue 14)
# ---------------------------------------------------------------------------


@pytest.fixture
def windowed(monkeypatch):
    """A server in a thread of this process whose rooms count as large from
    three users on, with a window of 1.5 s for three (online / 2 seconds)."""
    monkeypatch.setattr(selchat, "NOTICE_ROOM", 2)
    monkeypatch.setattr(selchat, "NOTICE_USERS_PER_SECOND", 2.0)
    server = selchat.ChatServer(selchat.ServerConfig(host="127.0.0.1", port=0))
    _, port = server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.stop()
    thread.join(TIMEOUT)


def test_in_a_large_room_a_newcomer_is_not_held_up_and_its_join_is_told_with_the_next(
    windowed, connect
):
    alice = connect(windowed, "alice", online=1)
    bob = connect(windowed, "bob", online=2)
    assert alice.recv_service() == "bob joined the chat (2 online)"  # small: at once
    carol = connect(windowed, "carol", online=3)  # welcome and history at once
    carol.send_chat("hi all", nick="carol")
    # Carol's first words are not held up by the window; her join is.
    for user in (alice, bob):
        assert user.recv_frame().split(b"\0")[1:] == [b"carol", b"hi all"]
    dave = connect(windowed, "dave", online=4)
    assert alice.recv_service() == "carol and dave joined the chat (4 online)"
    assert bob.recv_service() == "carol and dave joined the chat (4 online)"
    assert carol.recv_service() == "dave joined the chat (4 online)"
    dave.close()
    assert carol.recv_service() == "dave left the chat (3 online)"
    assert alice.recv_service() == "dave left the chat (3 online)"


def test_in_a_room_past_a_hundred_joins_one_by_one_are_gathered_and_counts_end_right(
    start_server, connect
):
    server = start_server("--history", "0")
    peers, counts = [], []
    for index in range(130):  # one by one: each waits for its welcome
        peer = connect(server.port)
        counts.append(int(WELCOME_COUNT.match(peer.register("u%03d" % index)).group(1)))
        peers.append(peer)
    first = peers[0]
    # Every user ends with the right count, and the first heard of the last
    # 29 joins (past NOTICE_ROOM) in far fewer than 29 notices.
    notices = {}
    for index, peer in enumerate(peers):
        count, told = counts[index], []
        while count != 130:
            text = peer.recv_service()
            who, event, online = ROOM_NOTICE.fullmatch(text).groups()
            assert event == "joined" and who.count(", ") <= 2  # a few names at most
            count = int(online)
            told.append(text)
        notices[index] = told
    past = [t for t in notices[0] if int(ROOM_NOTICE.fullmatch(t).group(3)) > 100]
    assert 1 <= len(past) <= 15, past
    # /who in a large room: the first names and how many more, or by prefix.
    first.send_frame("/who")
    answer = first.recv_service()
    assert answer.startswith("130 users online: u000 (joined ")
    assert answer.endswith(", and 30 more (/who NAME lists those whose nickname starts with NAME)")
    assert answer.count(" (joined ") == 100
    first.send_frame("/who U12")
    answer = first.recv_service()
    assert answer.startswith("10 users online whose nickname starts with U12: u120 (joined ")
    assert answer.count(" (joined ") == 10
    first.send_frame("/who zz")
    assert first.recv_service() == "0 users online whose nickname starts with zz"


def test_server_stamps_registered_nick_on_relayed_messages(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    carol = connect(server.port, "carol", online=3)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    assert alice.recv_service() == "carol joined the chat (3 online)"
    assert bob.recv_service() == "carol joined the chat (3 online)"
    stamp = "2026-11-27T07:37:12+03:00"
    bob.send_chat("I am alice, trust me", nick="alice", stamp=stamp)
    assert alice.recv_chat() == (stamp, "bob", "I am alice, trust me")
    assert carol.recv_chat() == (stamp, "bob", "I am alice, trust me")


def test_server_relays_the_time_field_as_written(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    alice.recv_service()
    for stamp in ["2026-11-27T07:37:12+03:00", "1999-01-01T00:00:00-12:00", "whenever", ""]:
        bob.send_chat("tick", nick="bob", stamp=stamp)
        assert alice.recv_chat() == (stamp, "bob", "tick")


def test_text_with_nul_is_relayed_whole(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    alice.recv_service()
    bob.send_chat("a\0b\0c", nick="bob", stamp="T")
    assert alice.recv_chat() == ("T", "bob", "a\0b\0c")


def test_own_message_is_not_echoed_to_the_sender(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    alice.send_chat("mine", nick="alice")
    assert bob.recv_chat()[1:] == ("alice", "mine")
    # The server has relayed "mine" before bob sends this, so an echo would
    # have been queued for alice ahead of it.
    bob.send_chat("marker", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "marker")


def test_partial_frames_byte_by_byte_are_reassembled(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port)
    for byte in frame("bob"):
        bob.send_raw(bytes([byte]))
        time.sleep(0.002)  # separate TCP segments; not used to wait for anything
    assert bob.recv_service() == welcome_text("bob", 2)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    message = frame(chat_payload("slowly, byte by byte: ünïcödé 🎉", nick="bob", stamp="T"))
    for byte in message:
        bob.send_raw(bytes([byte]))
        time.sleep(0.002)
    assert alice.recv_chat() == ("T", "bob", "slowly, byte by byte: ünïcödé 🎉")


def test_frames_split_across_sends_at_awkward_points_are_reassembled(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    alice.recv_service()
    stream = b"".join(frame(chat_payload(f"m{i}", nick="bob", stamp="T")) for i in range(5))
    # header split, payload split, two frames glued, split inside a UTF-8 char
    for piece in (stream[:3], stream[3:12], stream[12:30], stream[30:]):
        bob.send_raw(piece)
        time.sleep(0.01)
    for i in range(5):
        assert alice.recv_chat() == ("T", "bob", f"m{i}")
    multibyte = frame(chat_payload("жёлтый", nick="bob", stamp="T"))
    cut = len(multibyte) - 3  # between the two bytes of "ы"
    bob.send_raw(multibyte[:cut])
    time.sleep(0.01)
    bob.send_raw(multibyte[cut:])
    assert alice.recv_chat() == ("T", "bob", "жёлтый")


def test_many_frames_in_one_send_are_all_relayed_in_order(start_server, connect):
    server = start_server(*NO_RATE_LIMIT)
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    alice.recv_service()
    count = 200
    bob.send_raw(
        b"".join(frame(chat_payload(f"message {i}", nick="bob", stamp="T")) for i in range(count))
    )
    received = [alice.recv_chat() for _ in range(count)]
    assert received == [("T", "bob", f"message {i}") for i in range(count)]


def test_half_megabyte_message_is_relayed_intact(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    carol = connect(server.port, "carol", online=3)
    alice.recv_service()
    alice.recv_service()
    bob.recv_service()
    text = "".join(chr(0x41 + (i * 7) % 26) for i in range(256 * 1024)) + "é" * (128 * 1024)
    assert len(text.encode("utf-8")) == 512 * 1024
    bob.send_chat(text, nick="bob", stamp="T")
    bob.send_chat("after", nick="bob", stamp="T")
    assert alice.recv_chat() == ("T", "bob", text)
    assert alice.recv_chat() == ("T", "bob", "after")
    assert carol.recv_chat() == ("T", "bob", text)
    assert carol.recv_chat() == ("T", "bob", "after")


def test_message_of_exactly_max_message_bytes_is_accepted(start_server, connect):
    server = start_server("--max-message", "100")
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    alice.recv_service()
    payload = chat_payload("x" * (100 - len("T\0bob\0")), nick="bob", stamp="T")
    assert len(payload) == 100
    bob.send_frame(payload)
    assert alice.recv_chat() == ("T", "bob", "x" * 94)


def test_oversized_frame_gets_a_notice_and_is_closed_and_others_only_see_a_leave(
    start_server, connect
):
    server = start_server("--max-message", "100")
    alice = connect(server.port, "alice", online=1)
    mallory = connect(server.port, "mallory", online=2)
    assert alice.recv_service() == "mallory joined the chat (2 online)"
    # Only the header: the server must not need the payload to refuse it.
    mallory.send_raw(b"101       ")
    frames = mallory.recv_until_closed()
    assert frames == ["Message too long: 101 bytes (limit 100 bytes)"]
    assert alice.recv_service() == "mallory left the chat (1 online)"
    bob = connect(server.port, "bob", online=2)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    bob.send_chat("still here", nick="bob", stamp="T")
    assert alice.recv_chat() == ("T", "bob", "still here")


def test_oversized_frame_with_its_payload_is_refused_and_nothing_of_it_relayed(
    start_server, connect
):
    server = start_server("--max-message", "1000")
    alice = connect(server.port, "alice", online=1)
    mallory = connect(server.port, "mallory", online=2)
    alice.recv_service()
    payload = chat_payload("A" * 5000, nick="mallory", stamp="T")
    mallory.send_raw(frame(payload))
    frames = mallory.recv_until_closed()
    assert frames[:1] == [f"Message too long: {len(payload)} bytes (limit 1000 bytes)"]
    assert alice.recv_service() == "mallory left the chat (1 online)"


@pytest.mark.parametrize(
    "header",
    [
        b"-5        ",
        b"+5        ",
        b"1_0       ",
        b"1 0       ",
        "٥".encode().ljust(10),
        "５".encode().ljust(10),
        b"          ",
        b"hello worl",
    ],
    ids=[
        "minus",
        "plus",
        "underscore",
        "inner-space",
        "arabic-indic-5",
        "fullwidth-5",
        "all-blank",
        "text",
    ],
)
def test_malformed_header_is_closed_with_protocol_error_and_others_carry_on(
    server, connect, header
):
    alice = connect(server.port, "alice", online=1)
    mallory = connect(server.port, "mallory", online=2)
    assert alice.recv_service() == "mallory joined the chat (2 online)"
    mallory.send_raw(header + b"hello")
    frames = mallory.recv_until_closed()
    assert len(frames) == 1 and frames[0].startswith("Protocol error: "), frames
    assert alice.recv_service() == "mallory left the chat (1 online)"
    bob = connect(server.port, "bob", online=2)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    bob.send_chat("still fine", nick="bob", stamp="T")
    assert alice.recv_chat() == ("T", "bob", "still fine")


def test_malformed_header_instead_of_a_nickname_is_closed_with_protocol_error(server, connect):
    alice = connect(server.port, "alice", online=1)
    mallory = connect(server.port)
    mallory.send_raw(b"-3        abc")
    frames = mallory.recv_until_closed()
    assert len(frames) == 1 and frames[0].startswith("Protocol error: "), frames
    # mallory never joined, so alice hears of carol next, not of mallory
    connect(server.port, "carol", online=2)
    assert alice.recv_service() == "carol joined the chat (2 online)"


@pytest.mark.parametrize("payload", [b"T\0mallory\0\xff\xfe", b"\xc3(", b"T\0mallory\0caf\xe9"])
def test_invalid_utf8_is_closed_with_protocol_error_and_others_carry_on(server, connect, payload):
    alice = connect(server.port, "alice", online=1)
    mallory = connect(server.port, "mallory", online=2)
    alice.recv_service()
    mallory.send_frame(payload)
    frames = mallory.recv_until_closed()
    assert len(frames) == 1 and frames[0].startswith("Protocol error: "), frames
    assert alice.recv_service() == "mallory left the chat (1 online)"
    bob = connect(server.port, "bob", online=2)
    alice.recv_service()
    bob.send_chat("ok", nick="bob", stamp="T")
    assert alice.recv_chat() == ("T", "bob", "ok")


def test_invalid_utf8_nickname_is_closed_with_protocol_error(server, connect):
    mallory = connect(server.port)
    mallory.send_frame(b"mal\xfflory")
    frames = mallory.recv_until_closed()
    assert len(frames) == 1 and frames[0].startswith("Protocol error: "), frames


def test_reset_mid_frame_does_not_hurt_the_others(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    mallory = connect(server.port, "mallory", online=3)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    assert alice.recv_service() == "mallory joined the chat (3 online)"
    assert bob.recv_service() == "mallory joined the chat (3 online)"
    mallory.send_raw(b"100       " + b"only part of it")
    mallory.reset()
    assert alice.recv_service() == "mallory left the chat (2 online)"
    assert bob.recv_service() == "mallory left the chat (2 online)"
    bob.send_chat("after the reset", nick="bob", stamp="T")
    assert alice.recv_chat() == ("T", "bob", "after the reset")
    # the server still accepts newcomers
    connect(server.port, "carol", online=3)


def test_half_closed_client_is_treated_as_leaving_after_its_messages(server, connect):
    alice = connect(server.port, "alice", online=1)
    mallory = connect(server.port, "mallory", online=2)
    alice.recv_service()
    mallory.send_chat("last words", nick="mallory", stamp="T")
    mallory.sock.shutdown(socket.SHUT_WR)
    assert alice.recv_chat() == ("T", "mallory", "last words")
    assert alice.recv_service() == "mallory left the chat (1 online)"
    mallory.recv_until_closed()


def test_reader_that_stops_reading_is_cut_off_and_the_others_get_everything(start_server, connect):
    server = start_server("--max-queue", "65536", "--max-message", "32768", *NO_RATE_LIMIT)
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    slow = connect(server.port, "slow", online=3, rcvbuf=4096)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    assert alice.recv_service() == "slow joined the chat (3 online)"
    assert bob.recv_service() == "slow joined the chat (3 online)"

    received = []
    arrived = threading.Condition()
    slow_left = threading.Event()
    done = threading.Event()
    failure = []

    def bob_reads():
        try:
            while True:
                payload = bob.recv_frame(timeout=30)
                if b"\0" in payload:
                    _stamp, _nick, text = payload.decode("utf-8").split("\0", 2)
                    if text == "done":
                        done.set()
                        return
                    with arrived:
                        received.append(text[: len("msg 0000000")])
                        arrived.notify_all()
                elif payload.decode("utf-8") == "slow left the chat (2 online)":
                    slow_left.set()
                else:
                    failure.append(payload[:200])
        except Exception as exc:  # reported by the main thread
            failure.append(repr(exc))
        finally:
            done.set()
            slow_left.set()
            with arrived:
                arrived.notify_all()

    reader = threading.Thread(target=bob_reads, daemon=True)
    reader.start()
    # alice chats at the pace of a healthy reader: never more than a few
    # messages ahead of what bob has read (bob must not be the slow one).
    filler = "f" * 16000
    window = 3
    sent = []
    deadline = time.monotonic() + 30
    limit = 64 * 1024 * 1024 // len(filler)  # 64 MiB at most
    while not slow_left.is_set():
        assert time.monotonic() < deadline, "slow reader was never cut off"
        assert len(sent) < limit, "slow reader was never cut off (64 MiB sent)"
        with arrived:
            while len(received) < len(sent) - window and not done.is_set():
                assert arrived.wait(max(0.0, deadline - time.monotonic())), "bob stopped receiving"
        label = f"msg {len(sent):07d}"
        alice.send_chat(label + filler, nick="alice", stamp="T")
        sent.append(label)
    alice.send_chat("done", nick="alice", stamp="T")
    assert done.wait(30), "bob never got the final message"
    reader.join(timeout=TIMEOUT)
    assert not failure, failure
    assert received == sent
    assert alice.recv_service() == "slow left the chat (2 online)"
    # slow can still read what it was sent, whole frames, then the notice,
    # and then its connection is closed by the server
    frames = slow.recv_until_closed(timeout=TIMEOUT)
    assert not slow.buffer, (
        f"the stream ended inside a frame; its last bytes: {bytes(slow.buffer[-120:])!r}"
    )
    assert frames and frames[-1].startswith("Disconnected: "), [text[:40] for text in frames[-2:]]
    assert all("\0" in text for text in frames[:-1])


@pytest.mark.parametrize(
    "nick, reason_part",
    [
        ("x" * 33, "1 to 32"),
        ("", "1 to 32"),
        ("two words", None),
        ("tab\tnick", None),
        ("bell\x07", None),
        ("esc\x1b[2J", None),
        ("zero\u200bwidth", None),
        ("nul\0byte", None),
    ],
    ids=["too-long", "empty", "space", "tab", "control", "escape", "format-char", "nul"],
)
def test_bad_nickname_is_rejected_with_a_reason_and_closed(server, connect, nick, reason_part):
    alice = connect(server.port, "alice", online=1)
    mallory = connect(server.port)
    mallory.send_frame(nick)
    frames = mallory.recv_until_closed()
    assert len(frames) == 1, frames
    assert frames[0].startswith("Nickname rejected: ") and len(frames[0]) > len(
        "Nickname rejected: "
    )
    if reason_part:
        assert reason_part in frames[0]
    # no join or leave notice for a rejected nickname
    connect(server.port, "carol", online=2)
    assert alice.recv_service() == "carol joined the chat (2 online)"


def test_nickname_of_32_non_ascii_characters_is_accepted(server, connect):
    connect(server.port, "é" * 32, online=1)


@pytest.mark.parametrize(
    "taken, attempt", [("alice", "alice"), ("alice", "ALICE"), ("straße", "STRASSE")]
)
def test_nickname_in_use_is_rejected_whatever_its_case(server, connect, taken, attempt):
    first = connect(server.port, taken, online=1)
    mallory = connect(server.port)
    mallory.send_frame(attempt)
    frames = mallory.recv_until_closed()
    assert len(frames) == 1, frames
    assert frames[0].startswith("Nickname rejected: ") and "already in use" in frames[0]
    connect(server.port, "carol", online=2)
    assert first.recv_service() == "carol joined the chat (2 online)"


def test_nickname_is_free_again_after_its_user_left(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    alice.close()
    assert bob.recv_service() == "alice left the chat (1 online)"
    connect(server.port, "Alice", online=2)


@pytest.mark.parametrize("payload", [b"", b"hello without time and nick", b"   "])
def test_empty_or_non_command_payload_gets_not_sent_and_stays_connected(server, connect, payload):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    alice.recv_service()
    bob.send_frame(payload)
    assert bob.recv_service().startswith("Not sent: ")
    bob.send_chat("still connected", nick="bob", stamp="T")
    assert alice.recv_chat() == ("T", "bob", "still connected")


def test_messages_over_the_rate_limit_are_not_relayed_and_the_sender_is_told(start_server, connect):
    server = start_server("--rate", "1", "--burst", "3")
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    bob.send_raw(
        b"".join(frame(chat_payload(f"burst {i}", nick="bob", stamp="T")) for i in range(10))
    )
    for i in range(3):
        assert alice.recv_chat() == ("T", "bob", f"burst {i}")
    notice = bob.recv_service()
    assert notice and "3" in notice and "1" in notice, notice
    # bob is still connected; nothing more of his burst reached alice
    carol = connect(server.port, "carol", online=3)
    carol.send_chat("after the burst", nick="carol", stamp="T")
    assert alice.recv_service() == "carol joined the chat (3 online)"
    assert alice.recv_chat() == ("T", "carol", "after the burst")
    assert bob.recv_service() == "carol joined the chat (3 online)"


def test_unknown_command_gets_a_notice_and_stays_connected(server, connect):
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    alice.recv_service()
    bob.send_frame("/frobnicate now")
    assert bob.recv_service().startswith("Unknown command")
    bob.send_chat("still connected", nick="bob", stamp="T")
    assert alice.recv_chat() == ("T", "bob", "still connected")


def test_server_full_refuses_the_extra_client_with_a_notice(start_server, connect):
    server = start_server("--max-clients", "2")
    alice = connect(server.port, "alice", online=1)
    connect(server.port, "bob", online=2)
    alice.recv_service()
    carol = connect(server.port)
    carol.send_frame("carol")
    frames = carol.recv_until_closed()
    assert frames == ["Server is full (2 clients); try again later"]


def test_silent_connection_is_closed_after_the_handshake_timeout(start_server, connect):
    server = start_server("--handshake-timeout", "1")
    alice = connect(server.port, "alice", online=1)
    silent = connect(server.port)
    started = time.monotonic()
    frames = silent.recv_until_closed(timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    assert len(frames) == 1 and frames[0].startswith("No nickname received within"), frames
    assert 0.5 <= elapsed <= 5, elapsed
    connect(server.port, "carol", online=2)
    assert alice.recv_service() == "carol joined the chat (2 online)"


def test_server_logs_nicknames_with_timestamps(server, connect):
    alice = connect(server.port, "alice", online=1)
    server.wait_for_log(r"\d\d:\d\d:\d\d.*\balice\b")
    alice.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_shutdown_notifies_every_one_of_many_clients_and_exits_zero(server, connect, signum):
    peers = [connect(server.port, f"user{i:02d}", online=i + 1) for i in range(50)]
    assert peers[0].recv_service() == "user01 joined the chat (2 online)"
    started = time.monotonic()
    server.proc.send_signal(signum)
    for index, peer in enumerate(peers):
        frames = peer.recv_until_closed(timeout=TIMEOUT)
        assert frames, f"user{index:02d} got nothing"
        assert frames[-1] == SHUTDOWN_NOTICE, (index, frames[-3:])
    assert server.wait_exit(timeout=TIMEOUT) == 0
    assert time.monotonic() - started < 4.0
    assert "Traceback" not in server.log


def test_shutdown_gives_up_on_a_stalled_reader_after_about_two_seconds(start_server, connect):
    server = start_server("--max-queue", str(64 * 1024 * 1024), *NO_RATE_LIMIT)
    alice = connect(server.port, "alice", online=1)
    connect(server.port, "stalled", online=2, rcvbuf=4096)
    bob = connect(server.port, "bob", online=3)
    alice.recv_service()
    alice.recv_service()
    filler = "s" * 60000
    for i in range(64):  # ~4 MB, far more than the stalled socket takes
        alice.send_chat(f"{i} {filler}", nick="alice", stamp="T")
    for i in range(64):
        assert bob.recv_chat()[2].startswith(f"{i} ")
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert bob.recv_until_closed() == [SHUTDOWN_NOTICE]
    assert server.wait_exit(timeout=TIMEOUT) == 0
    assert time.monotonic() - started < 4.0


def test_selchat_port_environment_variable_sets_the_default_port(start_server, connect):
    port = free_port()
    server = start_server(
        "--host", "127.0.0.1", env=clean_env(SELCHAT_PORT=str(port)), address=False
    )
    assert server.port == port
    connect(server.port, "alice", online=1)


def test_port_flag_wins_over_selchat_port(start_server, connect):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        server = start_server(env=clean_env(SELCHAT_PORT=str(taken)))
        assert server.port != taken
        connect(server.port, "alice", online=1)


def test_selchat_host_environment_variable_sets_the_default_host(start_server, connect):
    server = start_server(env=clean_env(SELCHAT_HOST="127.0.0.1", SELCHAT_PORT="0"), address=False)
    assert re.search(r"listening on 127\.0\.0\.1:%d\b" % server.port, server.log)
    connect(server.port, "alice", online=1)


# ---------------------------------------------------------------------------
# Client in a pseudo-terminal
# ---------------------------------------------------------------------------


def local_now_stamp(offset_hours, offset_minutes=0):
    zone = timezone(timedelta(hours=offset_hours, minutes=offset_minutes))
    return datetime.now(zone).replace(microsecond=0)


@needs_pty
def test_client_shows_the_welcome(server, pty_client):
    child = pty_client(server.port, "alice")
    child.expect_exact(welcome_text("alice", 1).encode())


@needs_pty
def test_client_asks_for_a_nickname_when_none_is_given(server, connect, pty_client):
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, None)
    child.expect_exact(b"Nickname: ")
    child.sendline(b"dave")
    child.expect_exact(welcome_text("dave", 2).encode())
    assert bob.recv_service() == "dave joined the chat (2 online)"


@needs_pty
@needs_zoneinfo
@pytest.mark.parametrize("tz", ["America/Sao_Paulo", "UTC"])
def test_client_shows_a_message_with_the_time_in_its_own_zone(server, connect, pty_client, tz):
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, "alice", tz=tz)
    child.expect_exact(welcome_text("alice", 2).encode())
    assert bob.recv_service() == "alice joined the chat (2 online)"
    written = local_now_stamp(5, 30)  # the sender is in India
    bob.send_chat("namaste", nick="bob", stamp=written.isoformat())
    # today's form when it is still the day it was written in tz (the day
    # before or after India's), the date's once that day is over there
    forms = shown_times(written, ZoneInfo(tz), since=written)
    child.expect_exact([f"[{form}] bob: namaste".encode() for form in forms])
    # an old message shows its date, converted too
    bob.send_chat("old news", nick="bob", stamp="2020-02-29T23:30:00+05:30")
    old = (
        datetime(2020, 2, 29, 18, 0, tzinfo=UTC)
        .astimezone(ZoneInfo(tz))
        .strftime("%Y-%m-%d %H:%M:%S")
    )
    child.expect_exact(f"[{old}] bob: old news".encode())


@needs_pty
def test_client_shows_service_messages_from_the_server(server, connect, pty_client):
    child = pty_client(server.port, "alice")
    child.expect_exact(welcome_text("alice", 1).encode())
    bob = connect(server.port, "bob", online=2)
    child.expect_exact(b"bob joined the chat (2 online)")
    bob.close()
    child.expect_exact(b"bob left the chat (1 online)")


HOSTILE_TEXT = (
    "A\x1b[2JB\x1b]52;c;cHduZWQ=\x07C\u202eD\u009b31mE\x7fF\u2028G\x1b[1;1HH\rI\nJ\x08K\u0085L"
)


@needs_pty
def test_client_shows_hostile_text_inert(server, connect, pty_client):
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, "alice")
    child.expect_exact(welcome_text("alice", 2).encode())
    bob.recv_service()
    start = len(pty_output(child))
    bob.send_chat(HOSTILE_TEXT, nick="bob", stamp="\x1b[2J\x9b1mnot a time")
    bob.send_chat("end of hostile", nick="bob", stamp=datetime.now(UTC).isoformat())
    child.expect_exact(b"end of hostile")
    shown = pty_output(child)[start:]
    for raw in [
        b"\x1b[2J",
        b"\x1b]52",
        b"\x07",
        "\u202e".encode(),
        "\u009b".encode(),
        b"\x9b",
        b"\x7f",
        "\u2028".encode(),
        b"\x1b[1;1H",
        "\u0085".encode(),
    ]:
        assert raw not in shown, f"{raw!r} reached the terminal: {shown!r}"
    lowered = re.sub(rb"\\(x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4})", lambda m: m.group(0).lower(), shown)
    expected_text = (
        rb"A\x1b[2JB\x1b]52;c;cHduZWQ=\x07C\u202eD\x9b31mE\x7fF\u2028G"
        rb"\x1b[1;1HH\x0dI\x0aJ\x08K\x85L"
    )
    assert rb"[\x1b[2J\x9b1mnot a time] bob: " + expected_text in lowered, shown


@needs_pty
def test_client_keeps_a_half_typed_line_when_a_message_arrives(server, connect, pty_client):
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, "alice", tz="Asia/Kolkata")
    child.expect_exact(welcome_text("alice", 2).encode())
    assert bob.recv_service() == "alice joined the chat (2 online)"
    child.expect_exact(b"> ")
    child.send(b"hel")
    child.expect_exact(b"hel")
    bob.send_chat(
        "interrupting you", nick="bob", stamp=datetime.now(UTC).replace(microsecond=0).isoformat()
    )
    child.expect_exact(b"bob: interrupting you")
    child.expect_exact(b"> hel")  # the prompt and the typed text drawn again
    child.send(b"lo\r")
    before = datetime.now(UTC).replace(microsecond=0)
    stamp, nick, text = bob.recv_chat()
    assert (nick, text) == ("alice", "hello")
    assert STAMP_FORMAT.fullmatch(stamp) and stamp.endswith("+05:30"), stamp
    assert abs(datetime.fromisoformat(stamp) - before) < timedelta(seconds=10)
    written = datetime.fromisoformat(stamp)
    forms = shown_times(written, written.tzinfo, since=written)
    child.expect_exact([f"[{form}] alice: hello".encode() for form in forms])  # own, same form


@needs_pty
def test_client_typing_through_a_stream_of_messages_loses_nothing_and_ctrl_c_still_leaves(
    server, connect, pty_client
):
    # Messages land while keys are typed and while the client waits; each is
    # printed above the prompt, in order, and the typed text stays whole.
    # Ctrl+C then leaves at once.
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, "alice")
    child.expect_exact(welcome_text("alice", 2).encode())
    assert bob.recv_service() == "alice joined the chat (2 online)"
    child.expect_exact(b"> ")
    typed = b""
    for i in range(30):
        bob.send_chat(f"stream {i}", nick="bob")
        if i % 3 == 0:
            key = b"abcdefghij"[i // 3 : i // 3 + 1]
            child.send(key)
            typed += key
    for i in range(30):
        child.expect_exact(f"bob: stream {i}\r\n".encode())
    child.expect_exact(b"> " + typed)  # drawn again below the last one, whole
    child.sendintr()
    assert wait_pty_exit(child) == 0
    assert bob.recv_service() == "alice left the chat (1 online)"
    output = pty_output(child)
    assert b"Traceback" not in output and b"Exception ignored" not in output, output[-2000:]


@needs_pty
def test_client_quit_command_exits_zero_and_is_not_sent(server, connect, pty_client):
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, "alice")
    child.expect_exact(welcome_text("alice", 2).encode())
    assert bob.recv_service() == "alice joined the chat (2 online)"
    child.sendline(b"<quit<")
    assert wait_pty_exit(child) == 0
    assert bob.recv_service() == "alice left the chat (1 online)"
    assert b"Traceback" not in pty_output(child)


@needs_pty
def test_client_ctrl_c_exits_zero_without_traceback(server, connect, pty_client):
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, "alice")
    child.expect_exact(welcome_text("alice", 2).encode())
    child.expect_exact(b"> ")
    child.send(b"half typed")
    child.expect_exact(b"half typed")
    child.send(b"\x03")
    assert wait_pty_exit(child, timeout=5) == 0
    output = pty_output(child)
    assert b"Traceback" not in output and b"KeyboardInterrupt" not in output
    assert bob.recv_service() == "alice joined the chat (2 online)"
    assert bob.recv_service() == "alice left the chat (1 online)"


@needs_pty
def test_client_ctrl_d_exits_zero(server, connect, pty_client):
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, "alice")
    child.expect_exact(welcome_text("alice", 2).encode())
    child.expect_exact(b"> ")
    child.send(b"\x04")
    assert wait_pty_exit(child, timeout=5) == 0
    assert b"Traceback" not in pty_output(child)
    bob.recv_service()
    assert bob.recv_service() == "alice left the chat (1 online)"


@needs_pty
def test_client_exits_zero_by_itself_on_server_shutdown(server, pty_client):
    child = pty_client(server.port, "alice")
    child.expect_exact(welcome_text("alice", 1).encode())
    child.expect_exact(b"> ")
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    child.expect_exact(SHUTDOWN_NOTICE.encode(), timeout=5)
    assert wait_pty_exit(child, timeout=5) == 0
    assert time.monotonic() - started < 2.5
    assert b"Traceback" not in pty_output(child)
    assert server.wait_exit(timeout=TIMEOUT) == 0


@needs_pty
def test_client_says_the_connection_was_lost_and_exits_one(server, pty_client):
    child = pty_client(server.port, "alice", "--no-reconnect")
    child.expect_exact(welcome_text("alice", 1).encode())
    server.proc.kill()
    child.expect(rb"selchat: connection to 127\.0\.0\.1:%d lost" % server.port, timeout=5)
    assert wait_pty_exit(child, timeout=5) == 1
    assert b"Traceback" not in pty_output(child)


@needs_pty
def test_client_refused_connection_in_a_terminal_exits_one(pty_client):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = unused.getsockname()[1]
        child = pty_client(port, "alice")
        child.expect(rb"selchat: cannot connect to 127\.0\.0\.1:%d" % port)
        assert wait_pty_exit(child) == 1
    assert b"Traceback" not in pty_output(child)


@needs_pty
def test_client_with_rejected_nickname_prints_the_reason_once_and_asks_again(
    server, connect, pty_client
):
    # A person gets a second chance (test_client.py covers giving up, and the password).
    connect(server.port, "alice", online=1)
    child = pty_client(server.port, "ALICE")
    child.expect_exact(b'Nickname rejected: "ALICE" is already in use')
    child.expect_exact(b"Nickname: ")
    child.sendline(b"alicia")
    child.expect_exact(b"Welcome to selchat, alicia!")
    child.sendline(b"<quit<")
    assert wait_pty_exit(child) == 0
    output = pty_output(child)
    assert output.count(b"Nickname rejected") == 1 and b"Traceback" not in output, output


# -- colours -----------------------------------------------------------------


def colour_session(server, connect, pty_client, *extra, **env):
    """Run a short session; return the pty output."""
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, "alice", *extra, **env)
    child.expect_exact(b"Type <quit< to leave.")
    assert bob.recv_service() == "alice joined the chat (2 online)"
    bob.send_chat(
        "colour check", nick="bob", stamp=datetime.now(UTC).replace(microsecond=0).isoformat()
    )
    child.expect_exact(b"colour check")
    child.sendline(b"<quit<")
    assert wait_pty_exit(child) == 0
    return pty_output(child)


@needs_pty
def test_client_colours_service_messages_bold_red_and_nicks_on_a_terminal(
    server, connect, pty_client
):
    output = colour_session(server, connect, pty_client, NO_COLOR=None)
    assert b"\x1b[1;31m" + welcome_text("alice", 2).encode() + b"\x1b[0m" in output
    code = selchat.nick_color("bob").encode()
    match = re.search(rb"\x1b\[" + re.escape(code) + rb"mbob(.*?)colour check", output)
    assert match, output
    assert re.search(rb"\x1b\[(0|39)?m", match.group(1)), (
        "the text must keep the terminal's colours"
    )


@needs_pty
def test_client_empty_no_color_does_not_turn_colours_off(server, connect, pty_client):
    output = colour_session(server, connect, pty_client, NO_COLOR="")
    assert b"\x1b[1;31m" + welcome_text("alice", 2).encode() + b"\x1b[0m" in output


@needs_pty
def test_client_force_color_turns_colours_on_even_on_a_dumb_terminal(server, connect, pty_client):
    output = colour_session(
        server, connect, pty_client, NO_COLOR=None, TERM="dumb", FORCE_COLOR="1"
    )
    assert b"\x1b[1;31m" + welcome_text("alice", 2).encode() + b"\x1b[0m" in output
    assert b"\x1b[" + selchat.nick_color("bob").encode() + b"mbob" in output


@needs_pty
@pytest.mark.parametrize(
    "extra, env",
    [
        ((), {"NO_COLOR": "1", "FORCE_COLOR": "1"}),
        (("--no-color",), {"NO_COLOR": None, "FORCE_COLOR": "1"}),
        ((), {"NO_COLOR": None, "TERM": "dumb"}),
        ((), {"NO_COLOR": None, "TERM": "dumb", "FORCE_COLOR": "0"}),
    ],
    ids=[
        "NO_COLOR-beats-FORCE_COLOR",
        "no-color-flag-beats-FORCE_COLOR",
        "TERM-dumb",
        "FORCE_COLOR-0-forces-nothing",
    ],
)
def test_client_writes_no_colour_codes_when_colour_is_off(server, connect, pty_client, extra, env):
    output = colour_session(server, connect, pty_client, *extra, **env)
    assert welcome_text("alice", 2).encode() in output
    assert not SGR.search(output), SGR.findall(output)


# ---------------------------------------------------------------------------
# Client with pipes (stdin not a terminal)
# ---------------------------------------------------------------------------


def test_pipe_mode_sends_every_non_blank_line_in_order_and_exits_zero_at_eof(
    start_server, connect, piped_client
):
    server = start_server(*NO_RATE_LIMIT)
    bob = connect(server.port, "bob", online=1)
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "alice")
    lines = [f"line {i} ünï 🎉" for i in range(100)]
    client.write("\n".join(lines[:50]) + "\n\n   \n\t\n" + "\n".join(lines[50:]) + "\n")
    client.close_stdin()
    assert client.wait_exit() == 0
    assert bob.recv_service() == "alice joined the chat (2 online)"
    received = [bob.recv_chat()[1:] for _ in lines]
    assert received == [("alice", line) for line in lines]
    assert bob.recv_service() == "alice left the chat (1 online)"
    assert b"\x1b" not in client.out
    assert b"Traceback" not in client.err


def test_pipe_mode_prints_arrivals_without_colour(server, connect, piped_client):
    bob = connect(server.port, "bob", online=1)
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "alice")
    client.write("first\n")
    assert bob.recv_service() == "alice joined the chat (2 online)"
    assert bob.recv_chat()[1:] == ("alice", "first")
    bob.send_chat("hi alice \x1b[2J", nick="bob", stamp="2020-02-29T23:30:00+05:30")
    client.wait_for_output(b"bob: hi alice")
    client.close_stdin()
    assert client.wait_exit() == 0
    output = bytes(client.out).decode("utf-8")
    assert "\x1b" not in output
    assert re.search(r"^\[2020-02-29 18:00:00\] bob: hi alice \\x1b\[2J$", output, re.M), output
    assert welcome_text("alice", 2) in output


def test_pipe_mode_stops_at_quit(server, connect, piped_client):
    bob = connect(server.port, "bob", online=1)
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "alice")
    client.write("before\n<quit<\nafter\n")
    assert client.wait_exit() == 0
    assert bob.recv_service() == "alice joined the chat (2 online)"
    assert bob.recv_chat()[1:] == ("alice", "before")
    assert bob.recv_service() == "alice left the chat (1 online)"


def test_pipe_mode_client_exits_zero_on_server_shutdown_with_stdin_open(server, piped_client):
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "alice")
    client.wait_for_output(b"Type <quit< to leave.")
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert client.wait_exit(timeout=5) == 0
    assert time.monotonic() - started < 2.5
    assert SHUTDOWN_NOTICE.encode() in client.out


def test_client_refused_connection_prints_one_line_with_host_and_port_and_exits_one(piped_client):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        client = piped_client("--host", "127.0.0.1", "--port", port, "--nick", "alice")
        client.close_stdin()
        assert client.wait_exit() == 1
    lines = bytes(client.err).decode("utf-8").strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"selchat: cannot connect to 127.0.0.1:{port}: "), lines
    assert len(lines[0]) > len(f"selchat: cannot connect to 127.0.0.1:{port}: ")


def test_client_with_rejected_nickname_prints_the_reason_and_one_stderr_line_and_exits_one(
    server, connect, piped_client
):
    connect(server.port, "alice", online=1)
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "two words")
    assert client.wait_exit() == 1  # stdin stays open: the rejection alone ends it
    assert b"Nickname rejected: " in client.out
    lines = bytes(client.err).decode("utf-8").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selchat: "), lines
    assert "Traceback" not in lines[0]


def test_client_lost_connection_prints_one_line_and_exits_one(server, piped_client):
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "alice")
    client.wait_for_output(b"Type <quit< to leave.")
    server.proc.kill()
    assert client.wait_exit(timeout=5) == 1
    lines = bytes(client.err).decode("utf-8").strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"selchat: connection to 127.0.0.1:{server.port} lost: "), lines


def test_client_uses_selchat_port_and_host_from_the_environment(server, connect, piped_client):
    bob = connect(server.port, "bob", online=1)
    env = clean_env(SELCHAT_PORT=str(server.port), SELCHAT_HOST="127.0.0.1")
    client = piped_client("--nick", "alice", env=env)
    client.write("via env\n")
    client.close_stdin()
    assert client.wait_exit() == 0
    assert bob.recv_service() == "alice joined the chat (2 online)"
    assert bob.recv_chat()[1:] == ("alice", "via env")


def test_client_port_flag_wins_over_selchat_port(server, connect, piped_client):
    bob = connect(server.port, "bob", online=1)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        env = clean_env(SELCHAT_PORT=str(unused.getsockname()[1]))
        client = piped_client(
            "--host", "127.0.0.1", "--port", server.port, "--nick", "alice", env=env
        )
        client.write("via flag\n")
        client.close_stdin()
        assert client.wait_exit() == 0
    assert bob.recv_service() == "alice joined the chat (2 online)"
    assert bob.recv_chat()[1:] == ("alice", "via flag")


# ---------------------------------------------------------------------------
# The command line: asking for a nickname, bad options, start-up failures
# ---------------------------------------------------------------------------


@needs_pty
def test_client_asks_for_a_nickname_until_it_gets_a_valid_one(server, connect, pty_client):
    bob = connect(server.port, "bob", online=1)
    child = pty_client(server.port, None)
    child.expect_exact(b"Nickname: ")
    child.sendline(b"two words")
    child.expect_exact(b"A nickname must not contain whitespace, control or format characters.")
    child.expect_exact(b"Nickname: ")
    child.sendline(b"carol")
    child.expect_exact(welcome_text("carol", 2).encode())
    assert bob.recv_service() == "carol joined the chat (2 online)"
    child.sendline(b"<quit<")
    assert wait_pty_exit(child) == 0


def test_pipe_mode_without_nick_takes_the_first_line_as_the_nickname(server, connect, piped_client):
    bob = connect(server.port, "bob", online=1)
    client = piped_client("--host", "127.0.0.1", "--port", server.port)
    client.write("carol\nhello from a script\n")
    client.close_stdin()
    assert client.wait_exit() == 0
    assert bob.recv_service() == "carol joined the chat (2 online)"
    assert bob.recv_chat()[1:] == ("carol", "hello from a script")


def test_pipe_mode_with_an_invalid_first_line_nickname_exits_one_with_one_line(
    server, piped_client
):
    client = piped_client("--host", "127.0.0.1", "--port", server.port)
    client.write("two words\nhello\n")
    client.close_stdin()
    assert client.wait_exit() == 1
    err = bytes(client.err).decode()
    assert err == (
        "selchat: cannot join 127.0.0.1:%d: invalid nickname 'two words': "
        "must not contain whitespace, control or format characters\n" % server.port
    ), err


def test_pipe_mode_shows_the_users_own_messages_like_everyone_elses(server, connect, piped_client):
    bob = connect(server.port, "bob", online=1)
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "alice")
    client.write("hello there\n")
    assert bob.recv_service() == "alice joined the chat (2 online)"
    assert bob.recv_chat()[1:] == ("alice", "hello there")
    bob.send_chat("hi alice", nick="bob")
    client.wait_for_output(b"bob: hi alice")
    status, out, err = client.finish()
    assert status == 0, err
    shown = [line for line in out.splitlines() if not line.startswith("Welcome")]
    assert len(shown) == 2, out
    assert re.fullmatch(SHOWN_NOW.decode() + r" alice: hello there", shown[0]), out
    assert re.fullmatch(SHOWN_NOW.decode() + r" bob: hi alice", shown[1]), out


def test_pipe_mode_without_any_nickname_exits_one_with_one_line_naming_the_server(
    server, piped_client
):
    client = piped_client("--host", "127.0.0.1", "--port", server.port)
    status, _, err = client.finish()
    assert status == 1
    assert err == (
        "selchat: cannot join 127.0.0.1:%d: no nickname (give --nick NICK, or the "
        "nickname as the first line of input)\n" % server.port
    ), err


def test_typing_at_a_terminal_with_the_output_in_a_pipe_writes_no_escape_codes(server, connect):
    # stdin a terminal, stdout a pipe: colour is off, and so is every cursor
    # movement ("off means no colour codes at all"); no prompt lands in the pipe.
    bob = connect(server.port, "bob", online=1)
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "client", "--port", str(server.port), "--nick", "alice"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(TERM="xterm-256color", FORCE_COLOR=None),
    )
    os.close(slave)
    out = bytearray()
    arrived = threading.Condition()

    def drain():
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            with arrived:
                out.extend(chunk)
                arrived.notify_all()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert bob.recv_service() == "alice joined the chat (2 online)"
        os.write(master, b"typed here\r")
        assert bob.recv_chat()[1:] == ("alice", "typed here")
        bob.send_chat("hi alice", nick="bob")
        with arrived:
            assert arrived.wait_for(lambda: b"bob: hi alice" in out, TIMEOUT), bytes(out)
        os.write(master, b"<quit<\r")
        assert proc.wait(TIMEOUT) == 0
        reader.join(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert b"\x1b" not in out and b"> " not in out, bytes(out)
    lines = out.decode().splitlines()
    assert lines[0].startswith("Welcome to selchat, alice!"), lines
    assert [line.split("] ", 1)[1] for line in lines[1:]] == ["alice: typed here", "bob: hi alice"]
    assert b"Traceback" not in err, err


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["server", "--port", "70000"], "port must be 0 to 65535"),
        (["server", "--port", "nine"], "is not a port number"),
        (["server", "--max-message", "-1"], "must not be negative"),
        (["server", "--max-queue", "lots"], "is not a whole number"),
        (["server", "--rate", "-2"], "must not be negative"),
        (["server", "--rate", "fast"], "is not a number"),
        (["server", "--burst", "0"], "must be at least 1"),
        (["server", "--handshake-timeout", "0"], "must be more than 0"),
        (["server", "--handshake-timeout", "soon"], "is not a number of seconds"),
        (["client", "--port", "-1"], "port must be 0 to 65535"),
    ],
)
def test_bad_option_values_are_refused_with_a_clear_message(args, complaint):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(),
    )
    assert done.returncode == 2
    assert complaint in done.stderr and "Traceback" not in done.stderr, done.stderr


def run_server_briefly(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "server", "--host", "127.0.0.1", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(),
    )


@pytest.mark.parametrize(
    "make_args, complaint",
    [
        (
            lambda tmp: ["--password-file", str(tmp / "missing.txt")],
            "cannot read the password file",
        ),
        (lambda tmp: ["--password-file", str(tmp / "empty.txt")], "is empty"),
        (lambda tmp: ["--tls-key", str(tmp / "key.pem")], "--tls-key needs --tls-cert"),
        (lambda tmp: ["--tls-cert", str(tmp / "missing.pem")], "cannot load the TLS certificate"),
    ],
)
def test_server_start_up_failures_are_one_line_and_exit_one(tmp_path, make_args, complaint):
    (tmp_path / "empty.txt").write_text("\n")
    done = run_server_briefly(*make_args(tmp_path))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and complaint in lines[0], done.stderr


def test_server_on_a_port_in_use_says_so_and_exits_one():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "server", "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=clean_env(),
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_piped_client_keeps_under_the_servers_rate_so_nothing_is_dropped(
    start_server, connect, piped_client
):
    # The server times a read's messages by when it handles them: a server
    # held up (by a loaded machine) for longer than the burst lasts sees
    # paced messages bunched. Bursts of 5 at 20/s leave it 250 ms.
    server = start_server("--rate", "20", "--burst", "5")
    bob = connect(server.port, "bob", online=1)
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "alice")
    client.write("".join("line %d\n" % i for i in range(12)))
    client.close_stdin()
    assert client.wait_exit() == 0
    assert bob.recv_service() == "alice joined the chat (2 online)"
    assert [bob.recv_chat()[2] for _ in range(12)] == ["line %d" % i for i in range(12)]
    assert b"Slow down" not in client.out
    assert "told to slow down" not in server.log


def test_a_large_frame_whose_header_came_in_pieces_is_read_whole(start_server, connect):
    server = start_server(*NO_RATE_LIMIT)
    alice = connect(server.port, "alice", online=1)
    bob = connect(server.port, "bob", online=2)
    text = "L" * 200_000
    data = frame(chat_payload(text, nick="alice"))
    alice.send_raw(data[:4])  # not even the whole header
    assert alice.recv_service() == "bob joined the chat (2 online)"
    alice.send_raw(data[4:70_000])
    alice.send_raw(data[70_000:])
    assert bob.recv_chat()[1:] == ("alice", text)
