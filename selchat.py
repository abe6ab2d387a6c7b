#!/usr/bin/env python3
"""selchat: a console chat in one file, server and client, standard library only.

Run ``python selchat.py server`` on one machine and
``python selchat.py client --nick alice`` on the others.

The wire protocol
-----------------
Every message travels in a *frame*: a 10-byte header holding the payload length
in ASCII decimal digits (left-aligned and padded with spaces, ``b"5         "``;
right-aligned or zero-padded lengths are accepted too), then the payload, UTF-8.

* A payload without ``"\\0"`` is a *service message* (server to client) or a
  *command* starting with ``/`` (client to server).
* A payload with ``"\\0"`` is a *chat message*: ``time "\\0" nick "\\0" text``,
  split on the first two ``"\\0"`` only. ``time`` is ISO-8601 with a UTC offset,
  written by the sending client; each reader shows it in its own time zone.

A session: the client connects and sends its nickname as the first frame; the
server answers with a welcome service message (or a reason, and closes), then
relays every chat message to everyone else, with the nickname field set to the
sender's registered nickname. ``<quit<`` (or Ctrl+D, Ctrl+C) leaves.

Right after the welcome a newcomer gets the last ``--history`` chat messages as
they were relayed, between the service messages ``--- N messages from before
you joined ---`` and ``--- end of earlier messages ---``. Commands (``/help``,
``/who``, ``/msg NICK TEXT``, ``/nick NEW``, ``/me ACTION``) are answered with
service messages, except two that make chat messages whose nick field holds a
space, which no registered nickname can: a private message
``time "\\0" "[private] alice -> bob" "\\0" text`` (to both ends, never kept in
the history) and an action ``time "\\0" "* alice" "\\0" "waves"`` (to everyone).
A client that knows only the seed's protocol shows both readably as they are.
Their time is the server's clock, in UTC: the one thing the server writes.

A server started with ``--password`` answers the nickname with the service
message ``Password required``, and the client's next frame is the password.
With ``--tls-cert`` the same frames travel inside TLS. Every limit (message
size, queued output per client, clients at once, per address, time to send the
nickname, messages per second) is an option with a default and a notice.

What selchat does not do
------------------------
Without ``--tls-cert`` it does not encrypt, and without ``--password`` it does
not authenticate: anyone who can reach the port can join under any free
nickname and read the room. Even with both there are no accounts (one shared
password, nicknames first come, first served) and no private rooms, and the
history lives in the server's memory only: a restart forgets it (unless
``--store`` keeps it in SQLite, or the room is shared through Redis, below).
One server is one thread: it scales to thousands of users, not to more than
one core; for more, several servers share one room through Redis.

Running a room: ``--ops-password`` lets ``/op PASSWORD`` make operators, who
may ``/kick``, ``/ban`` and ``/unban`` addresses and set the ``/topic`` (which
ends every welcome). ``--store PATH`` keeps the history, the topic and the
bans in an SQLite database written by a thread of its own, and ``/search``
looks through it.

Several servers can share one room through Redis (``server --redis URL``, the
``redis`` package needed then only): messages, notices, nicknames, ``/who``,
``/msg`` and the history span them all. A helper thread reads Redis and a
second one writes to it, so the selector loop never waits on it.

Optional extras: ``pytz`` and ``tzlocal`` are used, when installed, to find the
reader's time zone; without them the standard library's idea of local time is
used (which follows ``TZ``).
"""

from __future__ import annotations

import argparse
import bisect
import codecs
import collections
import datetime as dt
import errno
import functools
import hashlib
import hmac
import ipaddress
import itertools
import math
import os
import random
import re
import select
import selectors
import signal
import socket
import sys
import threading
import time
import unicodedata
import zlib
from typing import Any, Callable, ClassVar, List, Sequence, Tuple, TypeVar

__version__ = "1.0.0"

# ---------------------------------------------------------------------------
# Constants and colours
# ---------------------------------------------------------------------------

HEADER_SIZE = 10
MAX_HEADER_LENGTH = 10**HEADER_SIZE - 1
DEFAULT_HOST = ""
DEFAULT_CLIENT_HOST = "127.0.0.1"
DEFAULT_PORT = 9009
DEFAULT_MAX_MESSAGE = 1 << 20
DEFAULT_MAX_QUEUE = 16 << 20
DEFAULT_MAX_CLIENTS = 10_000
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# Far above what anyone types, far below what a script floods with; the burst
# lets a pasted screenful or a piped file through at once.
DEFAULT_RATE = 100.0
DEFAULT_BURST = 1000
# Connections from one address; loopback (ssh tunnels, tests, benchmarks) is
# exempt unless --max-per-address is given.
DEFAULT_MAX_PER_ADDRESS = 256
# Memory for large messages still arriving, all connections together.
DEFAULT_MAX_PENDING = 256 << 20
# Everything the server holds for peers (queued output, unfinished input, the
# history), all together: a 2-core, 4 GB box keeps its footing. One address
# may hold an eighth of it (but at least two full queues).
DEFAULT_MAX_MEMORY = 1 << 30
ADDRESS_MEMORY_SHARE = 8
# Bytes a second one user may send: more than a person types or pastes, less
# than a terminal client can show; the burst lets a few large messages through.
DEFAULT_BYTE_RATE = 1 << 20
DEFAULT_BYTE_BURST = 4 << 20
# The rates of one address (all its connections and users together) are this
# many times one user's, unless given.
ADDRESS_RATE_FACTOR = 4
# New users (nicknames accepted) a second from one address, and at once: every
# join sends the history and a notice to everyone.
DEFAULT_JOIN_RATE = 10.0
DEFAULT_JOIN_BURST = 1000
# A frame that has not moved on for this long is dropped and its memory freed.
DEFAULT_FRAME_TIMEOUT = 30.0
# ... and one must come in within the timeout plus its size at this rate.
MIN_FRAME_RATE = 16 << 10
# Wrong passwords from one address before it is locked out; each further one
# doubles the lockout, from 1 s up to PASSWORD_LOCKOUT_MAX.
DEFAULT_PASSWORD_TRIES = 10
PASSWORD_LOCKOUT_MAX = 300.0
# /who costs one message, and one more for every this many users it lists.
WHO_USERS_PER_TOKEN = 50
NICK_COST = 10  # a rename is told to everyone
# A client whose dropped messages in this many seconds exceed what the rate
# allows in the same time is flooding on purpose and is disconnected.
FLOOD_WINDOW = 10.0
DEFAULT_HISTORY = 50
MAX_NICK_LENGTH = 32
# The nickname and password frames of the handshake are never longer than this.
MAX_HANDSHAKE_FRAME = 1024
PASSWORD_REQUEST = "Password required"
QUIT_COMMAND = "<quit<"
SHUTDOWN_NOTICE = "Server is shutting down. Goodbye!"
# How long the server keeps delivering what it owes after SIGINT/SIGTERM, and
# how long a connection being closed may take to take its last notice.
SHUTDOWN_GRACE = 1.5  # what is owed goes out within this, so that the exit takes about 2 s at most
CLOSE_GRACE = 2.0
# One recv() this large drains a busy socket in few calls and holds many frames
# that are then relayed together.
RECV_SIZE = 256 * 1024
TLS_JOIN = 64 * 1024
# Frames announced larger than this are read with recv_into() a buffer of their
# own size instead of being assembled from pieces.
LARGE_FRAME = 64 * 1024
# UTF-8 is checked by decoding (and throwing away) at most this much at once.
UTF8_CHUNK = 1 << 20
# The client refuses frames larger than this from a server.
CLIENT_MAX_FRAME = 256 << 20
CONNECT_TIMEOUT = 15.0
LISTEN_BACKLOG = 4096
HOUSEKEEPING_INTERVAL = 0.25
FORGET_INTERVAL = 5.0  # how often accounts and rates nobody needs are forgotten
LOG_EXIT_WAIT = 1.0  # seconds the last log lines may wait for stderr at exit
LOG_HELD = 10000  # log lines held while stderr takes nothing (pipe unread, Ctrl+S)
# Join and leave notices are coalesced per turn of the event loop; at most this
# many names are spelled out in one notice.
NOTICE_NAMES = 10
# Up to this many online, every join and leave is told at once. In a larger
# room they are gathered over a window of online / NOTICE_USERS_PER_SECOND
# seconds (5 s at most: 0.5 s for 1,000 users, 5 s for 10,000), and a notice
# names only the first NOTICE_NAMES_LARGE: a join storm costs a few notices
# to everyone, not one per join.
NOTICE_ROOM = 100
NOTICE_USERS_PER_SECOND = 2000.0
NOTICE_WINDOW_MAX = 5.0
NOTICE_NAMES_LARGE = 3
# /who in a room larger than this lists the first WHO_NAMES (by name) and how
# many more; /who PREFIX lists those whose nickname starts with PREFIX.
WHO_NAMES = 100
# Private messages and actions travel as chat messages whose nick field holds a
# space ("[private] alice -> bob", "* alice"): no registered nickname can, so
# nobody can forge one with an ordinary message, and a seed client shows them
# readably as they are.
PRIVATE_MARK = "[private]"
ACTION_MARK = "*"
# The replayed history is framed by these service messages.
HISTORY_BEGIN = "--- %s from before you joined ---"
HISTORY_END = "--- end of earlier messages ---"
RENAMED = "You are now known as "
# The interactive client reconnects after this many seconds, doubling up to
# the maximum; a client remembers this many shown messages so that history
# replayed after a reconnect shows only what it missed.
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 30.0
SEEN_MEMORY = 2000
try:
    IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (AttributeError, ValueError, OSError):
    IOV_MAX = 16

RESET = "\x1b[0m"
BOLD_RED = "\x1b[1;31m"
PRIVATE_STYLE = "\x1b[1;35m"
MENTION_STYLE = "\x1b[1;7m"  # bold, reversed: stands out on every theme
BELL = "\a"
# SGR colours for nicknames: every foreground colour but red (31, 91), which
# belongs to service messages, and black/white, which vanish on some themes.
NICK_COLORS = (
    "32",
    "33",
    "34",
    "35",
    "36",
    "92",
    "93",
    "94",
    "95",
    "96",
    "1;32",
    "1;33",
    "1;34",
    "1;35",
    "1;36",
)


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------


class ProtocolError(ValueError):
    """A peer sent something that is not a well-formed selchat frame."""


def parse_header(header: bytes) -> int:
    """Return the payload length a 10-byte header announces.

    With spaces removed from both ends the header must be a non-empty run of
    ASCII digits; ``int()`` alone would also take signs, underscores and
    non-ASCII digits.
    """
    digits = header.strip(b" ")
    if not digits.isdigit():  # bytes.isdigit() is ASCII-only
        raise ProtocolError("bad frame header %r" % bytes(header))
    return int(digits)


def frame_header(length: int) -> bytes:
    return b"%-10d" % length


def encode_frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its header."""
    if len(payload) > MAX_HEADER_LENGTH:
        raise ValueError("payload too long for a frame")
    return b"%-10d" % len(payload) + payload


class FrameDecoder:
    """Turns a byte stream cut at arbitrary points back into payloads.

    Used by the client and the tests; the server does the same job in
    ``ChatServer._consume`` without copying whole frames.
    """

    def __init__(self, max_size: int = 0) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        payloads = []
        pos = 0
        while len(buffer) - pos >= HEADER_SIZE:
            length = parse_header(bytes(buffer[pos : pos + HEADER_SIZE]))
            if self.max_size and length > self.max_size:
                raise ProtocolError(
                    "frame of %d bytes is over the limit of %d" % (length, self.max_size)
                )
            end = pos + HEADER_SIZE + length
            if end > len(buffer):
                break
            payloads.append(bytes(buffer[pos + HEADER_SIZE : end]))
            pos = end
        if pos:
            del buffer[:pos]
        return payloads

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held so far."""
        return len(self._buffer)


# ---------------------------------------------------------------------------
# Messages: pack, unpack, time, sanitise
# ---------------------------------------------------------------------------


def pack_message(text: str, nick: str, when: dt.datetime | None = None) -> bytes:
    """Payload of a chat message, stamped with ``when`` (default: now)."""
    stamp = now_stamp() if when is None else when.isoformat(timespec="seconds")
    return "\0".join((stamp, nick, text)).encode("utf-8", "surrogatepass")


def unpack_message(payload: bytes) -> tuple[str | None, str | None, str]:
    """Split a payload into (time, nick, text); a service message has no time or nick."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("payload is not valid UTF-8: %s" % exc) from None
    if "\0" not in text:
        return None, None, text
    parts = text.split("\0", 2)
    if len(parts) == 2:
        return parts[0], parts[1], ""
    return parts[0], parts[1], parts[2]


@functools.lru_cache(maxsize=None)
def local_zone() -> dt.tzinfo | None:
    """The reader's time zone from tzlocal when installed, else None (use the C library's)."""
    try:
        import tzlocal  # optional extra; returns a zoneinfo or pytz zone

        zone: dt.tzinfo | None = tzlocal.get_localzone()
        return zone
    except Exception:  # noqa: BLE001 - not installed, or it cannot make sense of this system
        return None


def _to_zone(moment: dt.datetime, tz: dt.tzinfo | None) -> dt.datetime:
    # datetime.astimezone() goes through tz.fromutc(), which pytz zones implement
    # correctly, so zoneinfo and pytz zones are handled alike.
    return moment.astimezone(tz) if tz is not None else moment.astimezone()


def now_stamp() -> str:
    """The current local time as ISO-8601 with its UTC offset, to the second."""
    now = _to_zone(dt.datetime.now(dt.timezone.utc), local_zone())
    return now.isoformat(timespec="seconds")


def utc_stamp() -> str:
    """The server's time, for the lines it composes itself (actions, private messages)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def parse_stamp(stamp: str) -> dt.datetime:
    """Read an ISO-8601 time with a UTC offset; ValueError when it is not one."""
    text = stamp.strip()
    if text[-1:] in ("Z", "z"):  # fromisoformat() takes "Z" only from 3.11 on
        text = text[:-1] + "+00:00"
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("time without a UTC offset")
    return moment


def format_time(stamp: str, now: dt.datetime | None = None, tz: dt.tzinfo | None = None) -> str:
    """Show a sender's time in the reader's zone: HH:MM:SS today, else with the date.

    ``tz`` defaults to the local zone. A time that cannot be read is returned as
    received, sanitised.
    """
    zone = tz if tz is not None else local_zone()
    try:
        local = _to_zone(parse_stamp(stamp), zone)
        today = _to_zone(now if now is not None else dt.datetime.now(dt.timezone.utc), zone)
    except (ValueError, OverflowError, OSError):
        return sanitize(stamp)
    if local.date() == today.date():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M:%S")


def read_nick_field(field: str) -> tuple[str, str, str]:
    """What a chat message's nick field says: (kind, nick, other).

    ``("chat", "alice", "")`` for an ordinary message, ``("action", "alice", "")``
    for ``* alice``, ``("private", "alice", "bob")`` for ``[private] alice -> bob``.
    Only the server writes a field with a space in it.
    """
    if " " in field:
        mark, _, rest = field.partition(" ")
        if mark == ACTION_MARK and " " not in rest:
            return "action", rest, ""
        sender, arrow, receiver = rest.partition(" -> ")
        if mark == PRIVATE_MARK and arrow and " " not in sender + receiver:
            return "private", sender, receiver
    return "chat", field, ""


@functools.lru_cache(maxsize=16)
def _mention_pattern(nick: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)%s(?!\w)" % re.escape(nick), re.IGNORECASE)


def find_mentions(text: str, nick: str) -> list[tuple[int, int]]:
    """Where ``nick`` appears in ``text`` as a word of its own, in any case."""
    if not nick:
        return []
    return [match.span() for match in _mention_pattern(nick).finditer(text)]


def _escape_table() -> dict[int, str]:
    table = {code: "\\x%02x" % code for code in itertools.chain(range(0x20), range(0x7F, 0xA0))}
    # Bidirectional controls (they reorder what follows them, "Trojan Source")
    # and the Unicode line and paragraph separators.
    for code in (
        0x061C,
        0x200E,
        0x200F,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
        0x2028,
        0x2029,
    ):
        table[code] = "\\u%04x" % code
    return table


_ESCAPES = _escape_table()


def sanitize(text: str) -> str:
    """Make untrusted text inert for a terminal.

    C0 and C1 controls, DEL and ESC (so every escape sequence) become ``\\xHH``;
    bidirectional controls and line/paragraph separators become ``\\uXXXX``.
    Printable text, emoji and every script are left as they are.
    """
    return text.translate(_ESCAPES)


def nick_color(nick: str, palette: Sequence[str] = NICK_COLORS) -> str:
    """An SGR colour for ``nick``: the same on every machine, never red, and
    the same whatever its case (a rename that changes only the case keeps it)."""
    digest = zlib.crc32(nick.casefold().encode("utf-8", "surrogatepass"))
    return palette[digest % len(palette)]


# Characters that draw nothing or look like a blank, though Unicode does not
# call them spaces: a nickname holding one could pass for another, or fake the
# spaces of "[private] alice -> bob". With them, every Default_Ignorable code
# point outside the Cf category (variation selectors, Hangul fillers, the
# combining grapheme joiner, Khmer inherent vowels).
_INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f"
    "\uffa0\ufff0-\ufff8\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
_NICK_CATEGORIES_REFUSED = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"))
# Letters that look like Latin ones in common fonts, for the confusable check.
# NFKC already folds fullwidth and mathematical forms, and casefold the cases.
_LOOKALIKES = str.maketrans(
    {
        # Cyrillic
        "\u0430": "a",
        "\u0435": "e",
        "\u043e": "o",
        "\u0440": "p",
        "\u0441": "c",
        "\u0443": "y",
        "\u0445": "x",
        "\u0455": "s",
        "\u0456": "l",
        "\u0458": "j",
        "\u0501": "d",
        "\u04bb": "h",
        "\u04cf": "l",
        "\u051b": "q",
        "\u051d": "w",
        "\u0475": "v",
        "\u04af": "y",
        "\u043a": "k",
        "\u0432": "b",
        "\u043d": "h",
        "\u043c": "m",
        "\u0442": "t",
        "\u0457": "l",
        "\u0491": "r",
        "\u0454": "e",
        # Greek
        "\u03b1": "a",
        "\u03bf": "o",
        "\u03bd": "v",
        "\u03c1": "p",
        "\u03b9": "l",
        "\u03ba": "k",
        "\u03c4": "t",
        "\u03c5": "u",
        "\u03c7": "x",
        "\u03b5": "e",
        "\u03b3": "y",
        "\u03c9": "w",
        "\u03b2": "b",
        "\u03b7": "n",
        "\u03bc": "u",
        "\u03b6": "z",
        # Latin and digits that pass for each other
        "i": "l",
        "1": "l",
        "|": "l",
        "0": "o",
        "5": "s",
    }
)


# Capitals that look like Latin capitals but casefold to letters that do not
# (Greek eta to "n", mu to "u"...), and Latin letters the table misses.
_LOOKALIKE_CAPITALS = str.maketrans(
    {
        "\u0391": "A", "\u0392": "B", "\u0395": "E", "\u0396": "Z", "\u0397": "H",
        "\u0399": "I", "\u039a": "K", "\u039c": "M", "\u039d": "N", "\u039f": "O",
        "\u03a1": "P", "\u03a4": "T", "\u03a5": "Y", "\u03a7": "X",
        "\u0410": "A", "\u0412": "B", "\u0415": "E", "\u041a": "K", "\u041c": "M",
        "\u041d": "H", "\u041e": "O", "\u0420": "P", "\u0421": "C", "\u0422": "T",
        "\u0423": "Y", "\u0425": "X", "\u0405": "S", "\u0406": "I", "\u0408": "J",
        "\u0131": "i", "\u0251": "a", "\u0261": "g", "\u026a": "i",
    }
)  # fmt: skip


def nick_skeleton(nick: str) -> str:
    """What ``nick`` looks like: two nicknames with one skeleton are confusable."""
    shaped = unicodedata.normalize("NFKC", nick).translate(_LOOKALIKE_CAPITALS)
    folded = shaped.casefold()
    folded = "".join(
        c for c in unicodedata.normalize("NFD", folded) if not "\u0300" <= c <= "\u036f"
    )
    return folded.translate(_LOOKALIKES).replace("rn", "m").replace("vv", "w")


def check_nick(nick: str) -> str | None:
    """Why ``nick`` cannot be a nickname, or None when it can."""
    if not 1 <= len(nick) <= MAX_NICK_LENGTH:
        return "must be 1 to %d characters" % MAX_NICK_LENGTH
    for char in nick:
        if char.isspace() or unicodedata.category(char) in _NICK_CATEGORIES_REFUSED:
            if unicodedata.category(char) in ("Cn", "Co"):
                return "must not contain unassigned or private-use characters"
            return "must not contain whitespace, control or format characters"
    if _INVISIBLE.search(nick):
        return "must not contain invisible or blank-looking characters"
    if unicodedata.combining(nick[0]) or unicodedata.category(nick[0]).startswith("M"):
        return "must not begin with a combining mark"
    return None


def plural(count: int, word: str) -> str:
    return "%d %s%s" % (count, word, "" if count == 1 else "s")


def duration(seconds: float) -> str:
    """A short, rounded-down length of time: ``40 s``, ``12 min``, ``3 h 5 min``, ``2 d 1 h``."""
    whole = max(int(seconds), 0)
    minutes, hours, days = whole // 60, whole // 3600, whole // 86400
    if whole < 60:
        return "%d s" % whole
    if whole < 3600:
        return "%d min" % minutes
    if whole < 86400:
        return "%d h %d min" % (hours, minutes % 60)
    return "%d d %d h" % (days, hours % 24)


class TokenBucket:
    """``rate`` tokens a second, held up to ``burst``; each use takes ``cost``.

    The server's rates per user and per address and the client's pacing are
    all this. A rate of 0 means no limit.
    """

    __slots__ = ("burst", "rate", "time", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.time = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many; False (taking none) if not."""
        if not self.rate:
            return True
        tokens = self.tokens + (now - self.time) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.time = now
        if tokens >= cost:
            self.tokens = tokens - cost
            return True
        self.tokens = tokens
        return False

    def give_back(self, cost: float) -> None:
        if self.rate:
            self.tokens += cost

    def borrow(self, now: float, cost: float) -> bool:
        """Take ``cost`` tokens even when there are not that many, down to -burst:
        the reserve. False (taking none) when that is used up too."""
        if self.take(now, cost):
            return True
        if self.tokens - cost < -self.burst:
            return False
        self.tokens -= cost
        return True

    def light(self) -> bool:
        """More than half of the burst is left (as of the last take)."""
        return not self.rate or self.tokens * 2 > self.burst

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are there (0 when they are now)."""
        if not self.rate:
            return 0.0
        tokens = min(self.tokens + (now - self.time) * self.rate, self.burst)
        return max(0.0, (min(cost, self.burst) - tokens) / self.rate)

    def full(self, now: float) -> bool:
        """True once waiting longer could not add a token: forgetting it is harmless."""
        return not self.rate or self.tokens + (now - self.time) * self.rate >= self.burst


# The server's log must never stop the server: stderr may be a pipe that nobody
# reads or a terminal stopped with Ctrl+S, where a plain write() would block
# the one thread until someone reads. What stderr cannot take at once is held
# here (up to LOG_HELD lines, the oldest dropped and counted) and written as
# soon as it can take it.
_log_held: collections.deque[str] = collections.deque()
_log_dropped = 0


def log(message: str) -> None:
    global _log_dropped
    line = "%s selchat: %s\n" % (dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), message)
    if not _log_held and _stderr_ready(0.0):
        _write_log(line)
        return
    if len(_log_held) >= LOG_HELD:
        _log_held.popleft()
        _log_dropped += 1
    _log_held.append(line)


def flush_log(timeout: float = 0.0) -> None:
    """Write what the log holds, as far as stderr takes it within timeout seconds."""
    global _log_dropped
    deadline = time.monotonic() + timeout
    while _log_held and _stderr_ready(max(deadline - time.monotonic(), 0.0)):
        if _log_dropped:
            stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            _write_log(
                "%s selchat: (%d log lines dropped: stderr took nothing for a while)\n"
                % (stamp, _log_dropped)
            )
            _log_dropped = 0
            continue
        _write_log(_log_held.popleft())


def _stderr_ready(timeout: float) -> bool:
    """Whether stderr takes a log line now without blocking."""
    if os.name != "posix":  # select() takes only sockets on Windows
        return True
    try:
        fd = sys.stderr.fileno()
        return bool(select.select([], [fd], [], timeout)[1])
    except (AttributeError, OSError, ValueError):  # no real file behind it: write() decides
        return True


def _write_log(line: str) -> None:
    # A line is far below PIPE_BUF: once select() says the pipe or terminal
    # has room, it takes the whole line without blocking.
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):  # stderr gone (or None): keep serving
        pass


def _utf8_valid(buffer: Any, start: int, stop: int) -> bool:
    """Whether buffer[start:stop] is UTF-8, without decoding a large one in one piece."""
    view = memoryview(buffer)[start:stop]
    try:
        if stop - start <= UTF8_CHUNK:
            str(view, "utf-8")
        else:
            decoder = codecs.getincrementaldecoder("utf-8")()
            for offset in range(0, stop - start, UTF8_CHUNK):
                decoder.decode(view[offset : offset + UTF8_CHUNK])
            decoder.decode(b"", True)
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

Buffer = Any  # bytes, bytearray or memoryview: anything socket.sendmsg() takes


TLS_NONE, TLS_PEEK, TLS_HANDSHAKE, TLS_ON = range(4)

# Where a connection is in its life, in order (Connection.state). Its frames
# are: its nickname (NAMING), its password (PASSWORD), held while the shared
# room is asked whether the nickname is free (CLAIMING), chat and commands
# (CHATTING); then nothing it sends is handled while it is told why it goes
# and given what it is owed (CLOSING), until its socket is closed (CLOSED).
NAMING, PASSWORD, CLAIMING, CHATTING, CLOSING, CLOSED = range(6)


class Budget:
    """Bytes one holder may keep alive (``limit``, 0 for no limit) and keeps now."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def over(self) -> bool:
        return 0 < self.limit < self.held


class Lockout:
    """Wrong passwords in a row from one address, and the lockout they earned:
    after ``tries`` of them, 1 s, doubling with every further one up to
    PASSWORD_LOCKOUT_MAX. They are remembered that long after the last one."""

    __slots__ = ("failed_at", "failures", "locked_until", "refused")

    def __init__(self) -> None:
        self.failures = 0  # wrong passwords in a row
        self.failed_at = 0.0  # when the last one came
        self.locked_until = 0.0
        self.refused = 0  # passwords refused unchecked in the lockout, not yet logged

    def locked(self, now: float) -> bool:
        return now < self.locked_until

    def fail(self, now: float, tries: int) -> float:
        """Count a wrong one; the lockout it starts (0: none yet)."""
        self.failures += 1
        self.failed_at = now
        if self.failures < tries:
            return 0.0
        lockout = min(2.0 ** (self.failures - tries), PASSWORD_LOCKOUT_MAX)
        self.locked_until = now + lockout
        return lockout

    def forgettable(self, now: float) -> bool:
        return now >= self.locked_until and (
            not self.failures or now >= self.failed_at + PASSWORD_LOCKOUT_MAX
        )


class Account(Budget):
    """What one address holds, how fast it may send and join, and its wrong passwords.

    It outlives its connections until forgetting it is harmless (its buckets
    full again, no lockout running), so reconnecting refills nothing.
    """

    __slots__ = ("bytes", "conns", "host", "joins", "messages", "ops", "password", "searches")

    def __init__(self, host: str, limit: int, config: ServerConfig, now: float) -> None:
        super().__init__(limit)
        self.host = host
        self.conns: set[Connection] = set()
        self.messages = TokenBucket(config.address_rate, config.address_burst, now)
        self.bytes = TokenBucket(config.address_byte_rate, config.address_byte_burst, now)
        self.joins = TokenBucket(config.join_rate, config.join_burst, now)
        self.password = Lockout()  # wrong server passwords
        self.ops = Lockout()  # wrong /op passwords
        self.searches = 0  # /search of its users running or waiting

    def forgettable(self, now: float) -> bool:
        return (
            not self.conns
            and not self.searches
            # wrong passwords are remembered long enough for the lockout to grow
            and self.password.forgettable(now)
            and self.ops.forgettable(now)
            and self.messages.full(now)
            and self.bytes.full(now)
            and self.joins.full(now)
        )


class Held:
    """One buffer on its way out, shared by every queue (and the history) it is in.

    ``size`` is what it keeps alive. A memoryview keeps its whole object alive,
    however small the slice: a slice under half of its object is copied out,
    once for every queue it joins, and a larger one is charged the whole object.
    """

    __slots__ = ("buffer", "refs", "size")

    def __init__(self, buffer: Buffer) -> None:
        size = len(buffer)
        if isinstance(buffer, memoryview):
            kept = len(buffer.obj)  # type: ignore[arg-type]
            if size * 2 < kept:
                buffer = bytes(buffer)
            else:
                size = kept
        self.buffer = buffer
        self.size = size
        self.refs = 0  # queues (and the history) holding it


def hold(buffers: Sequence[Buffer]) -> tuple[Held, ...]:
    return tuple(Held(buffer) for buffer in buffers)


class OutputQueue:
    """Everything the server will send one connection, in order.

    Every byte goes out through a queue, and a queue charges what each buffer
    keeps alive to itself, to its address's Account and to the server's Budget
    (a buffer shared by many queues is charged to the server once). Whoever
    appends checks ``over()``; ChatServer._queue and _broadcast are the only
    ones that append.
    """

    __slots__ = ("account", "entries", "memory", "sent", "size")

    def __init__(self, account: Budget, memory: Budget) -> None:
        self.entries: collections.deque[Held] = collections.deque()
        self.size = 0  # what the entries keep alive
        self.sent = 0  # bytes of entries[0] already sent
        self.account = account
        self.memory = memory

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, held: Held) -> None:
        self.entries.append(held)
        if not held.refs:
            self.memory.held += held.size
        held.refs += 1
        self.size += held.size
        self.account.held += held.size

    def buffers(self, count: int) -> list[Buffer]:
        """The first ``count`` buffers still to send (what sendmsg() takes)."""
        entries = self.entries
        if not self.sent:
            if len(entries) == 1:  # the usual case: one run since the last turn
                return [entries[0].buffer]
            return [held.buffer for held in itertools.islice(entries, count)]
        first = memoryview(entries[0].buffer)[self.sent :]
        return [first] + [held.buffer for held in itertools.islice(entries, 1, count)]

    def advance(self, sent: int) -> bool:
        """Forget ``sent`` bytes that went out; True when a buffer went out in part."""
        entries = self.entries
        sent += self.sent
        self.sent = 0
        freed = 0  # what the entries that went out kept alive (_release, inlined)
        memory = self.memory
        while entries:
            held = entries[0]
            length = len(held.buffer)
            if sent < length:
                self.sent = sent
                break
            sent -= length
            entries.popleft()
            freed += held.size
            held.refs -= 1
            if not held.refs:
                memory.held -= held.size
        self.size -= freed
        self.account.held -= freed
        return self.sent > 0

    def clear(self, keep: Buffer | None = None) -> None:
        """Forget everything queued; ``keep`` is queued again alone (a frame half sent)."""
        for held in self.entries:
            self._release(held)
        self.entries.clear()
        self.sent = 0
        if keep is not None:
            self.push(Held(keep))

    def _release(self, held: Held) -> None:
        self.size -= held.size
        self.account.held -= held.size
        held.refs -= 1
        if not held.refs:
            self.memory.held -= held.size


class History:
    """The last chat messages (frames as relayed), replayed to every newcomer.

    It keeps at most ``count`` messages and ``limit`` bytes, and holds its
    frames like a queue does, so the server's Budget counts them once.
    """

    def __init__(self, count: int, limit: int, memory: Budget) -> None:
        self.count = count
        self.limit = limit
        self.memory = memory
        self.frames: collections.deque[tuple[int, tuple[Held, ...]]] = collections.deque()
        self.size = 0

    def __len__(self) -> int:
        return len(self.frames)

    def remember(self, frame: tuple[Held, ...]) -> None:
        size = 0
        for held in frame:
            if not held.refs:
                self.memory.held += held.size
            held.refs += 1
            size += held.size
        self.frames.append((size, frame))
        self.size += size
        while len(self.frames) > self.count or self.size > self.limit:
            size, old = self.frames.popleft()
            self.size -= size
            for held in old:
                held.refs -= 1
                if not held.refs:
                    self.memory.held -= held.size

    def remember_run(self, data: bytes, start: int, stop: int) -> None:
        """Remember the frames of a relayed run. Only the last ``count`` of them
        can stay, so only those are copied out of what was received (a slice
        would keep the whole read alive)."""
        starts = []
        while start < stop:
            starts.append(start)
            start += HEADER_SIZE + int(data[start : start + HEADER_SIZE])  # checked already
        starts.append(stop)
        for index in range(max(0, len(starts) - 1 - self.count), len(starts) - 1):
            self.remember((Held(data[starts[index] : starts[index + 1]]),))

    def replay(self) -> list[Held]:
        """The history framed by its begin and end notices; empty when there is none."""
        if not self.frames:
            return []
        begin = HISTORY_BEGIN % plural(len(self.frames), "message")
        helds = [Held(encode_frame(begin.encode("utf-8")))]
        for _, frame in self.frames:
            helds.extend(frame)
        helds.append(Held(encode_frame(HISTORY_END.encode("utf-8"))))
        return helds


class ServerConfig:
    """Everything the server can be told, with its defaults."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_queue: int = 0,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
        max_per_address: int | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        password: str | None = None,
        history: int = DEFAULT_HISTORY,
        max_memory: int = DEFAULT_MAX_MEMORY,
        max_address_memory: int | None = None,
        byte_rate: float | None = None,
        byte_burst: int = DEFAULT_BYTE_BURST,
        address_rate: float | None = None,
        address_byte_rate: float | None = None,
        join_rate: float = DEFAULT_JOIN_RATE,
        join_burst: int = DEFAULT_JOIN_BURST,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        password_tries: int = DEFAULT_PASSWORD_TRIES,
        ops_password: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.max_message = max_message if max_message > 0 else MAX_HEADER_LENGTH
        # A healthy reader must be able to take a maximum-size message while a
        # few more are queued behind it.
        self.max_queue = max_queue or max(DEFAULT_MAX_QUEUE, 2 * max_message)
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.rate = rate
        self.burst = max(burst, 1)
        self.max_per_address = max_per_address
        self.max_pending = max_pending or MAX_HEADER_LENGTH
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.password = password
        self.history = history
        # 0 turns a budget off; every budget holds at least one full queue.
        self.max_memory = max(max_memory, self.max_queue) if max_memory else 0
        if max_address_memory is None:
            max_address_memory = max(self.max_memory // ADDRESS_MEMORY_SHARE, 2 * self.max_queue)
            if self.max_memory:
                max_address_memory = min(max_address_memory, self.max_memory)
        self.max_address_memory = (
            max(max_address_memory, self.max_queue) if max_address_memory else 0
        )
        # Rates: --rate 0 (no message limit) turns the byte rate off too, unless given.
        if byte_rate is None:
            byte_rate = DEFAULT_BYTE_RATE if rate else 0.0
        self.byte_rate = byte_rate
        # A maximum-size message must always be able to pass.
        self.byte_burst = max(byte_burst, self.max_message + HEADER_SIZE)
        self.address_rate = rate * ADDRESS_RATE_FACTOR if address_rate is None else address_rate
        self.address_burst = self.burst * ADDRESS_RATE_FACTOR
        self.address_byte_rate = (
            byte_rate * ADDRESS_RATE_FACTOR if address_byte_rate is None else address_byte_rate
        )
        self.address_byte_burst = self.byte_burst * ADDRESS_RATE_FACTOR
        self.join_rate = join_rate
        self.join_burst = max(join_burst, 1)
        self.frame_timeout = frame_timeout
        self.password_tries = max(password_tries, 1)
        self.ops_password = ops_password


class Connection:
    """One client socket and the state that belongs to it."""

    __slots__ = (
        "account",
        "address",
        "asked_nick",
        "bytes",
        "deadline",
        "dirty",
        "dropped",
        "eof",
        "flood_since",
        "handler",
        "held",
        "held_raw",
        "host",
        "input_held",
        "input_since",
        "input_started",
        "joined",
        "large",
        "large_got",
        "messages",
        "nick",
        "nick_bytes",
        "nick_field",
        "nick_key",
        "op",
        "out",
        "searching",
        "skip",
        "sock",
        "state",
        "tail",
        "tls",
        "tls_chunk",
        "warned_at",
        "writing",
    )

    def __init__(
        self, sock: socket.socket, account: Account, memory: Budget, address: str, deadline: float
    ) -> None:
        self.sock = sock
        self.account = account  # what its address holds and may send
        self.host = account.host  # the peer's address, for per-address limits
        self.address = address  # host:port, for the log
        self.nick: str | None = None  # set once the nickname is accepted
        self.asked_nick: str | None = None  # the nickname, while the password is awaited
        self.nick_bytes = b""
        self.nick_field = b""  # b"\0nick\0": how the hot path knows it
        self.nick_key = ""
        self.tail = bytearray()  # the unfinished frame of the last read
        self.large: bytearray | None = None  # a large frame being read in place
        self.large_got = 0
        self.skip = 0  # bytes of a refused frame still to discard
        self.out = OutputQueue(account, memory)  # everything it will be sent, in order
        self.input_held = 0  # bytes of unfinished input held (tail or large frame)
        self.input_since = 0.0  # when that input last moved on
        self.input_started = 0.0  # when the frame it belongs to began
        self.writing = False  # EVENT_WRITE registered
        self.dirty = False  # has output to try at the end of this turn
        self.state = NAMING
        self.eof = False  # the peer has closed its side
        self.deadline = deadline  # handshake or close deadline (monotonic)
        self.handler: Callable[[int], None] = lambda mask: None
        self.tls = TLS_NONE  # TLS_PEEK, TLS_HANDSHAKE, TLS_ON
        self.tls_chunk: bytes | None = None  # a TLS write to repeat as it was
        # The user's rates (messages, bytes): shared by its connections, and
        # kept by the server for a while after it leaves.
        self.messages: TokenBucket | None = None
        self.bytes: TokenBucket | None = None
        self.dropped = 0  # messages over the rate since flood_since
        self.flood_since = 0.0
        self.warned_at = -FLOOD_WINDOW  # last "slow down" notice
        self.joined = 0.0  # when the nickname was accepted (monotonic)
        # With --redis, what arrives while Redis is asked about the nickname.
        self.held: bytearray | None = None
        self.held_raw: bytearray | None = None
        self.op = False  # an operator, for this session (/op)
        self.searching = False  # a /search of its is running

    @property
    def name(self) -> str:
        return "%s (%s)" % (self.nick, self.address) if self.nick else self.address

    @property
    def closing(self) -> bool:
        """Told why it goes (or gone): nothing it sends is handled any more."""
        return self.state >= CLOSING

    @property
    def charge(self) -> int:
        """Every byte the server holds for this connection, as it is charged."""
        return self.out.size + self.input_held

    def name_as(self, nick: str) -> None:
        """Set the nickname and the forms of it that the server compares."""
        self.nick = nick
        self.nick_bytes = nick.encode("utf-8")
        self.nick_field = b"\0" + self.nick_bytes + b"\0"
        self.nick_key = nick.casefold()


class ChatServer:
    """The selector loop: accepts, reads, relays and writes, in one thread.

    One turn of the loop (serve_forever), and the methods below in that order:

    1. select() returns the sockets that are ready; each key's data is its
       handler: _accept for the listener, _on_client_event for a client
       (_tls_step first while TLS is set up).
    2. Reading: _receive takes up to 256 KiB; _consume walks the frames in it.
       Chat messages that already carry the sender's nickname form a run
       relayed as one slice (_relay_run); anything else goes to _handle_frame
       (nickname, password, commands, chat to restamp). An unfinished tail is
       kept (_keep_tail, _complete_tail); a large frame gets a buffer of its
       own (_start_large, _receive_large). Every byte held is charged
       (_hold_input), every message passes the rates (_admit).
    3. Relaying: every byte for a client goes into its OutputQueue through
       _queue (one client) or _broadcast (the room), charged at what it keeps
       alive, to the client, its address (Account) and the server (Budget).
    4. The end of the turn (_end_of_turn): readers past --max-queue are cut,
       the turn's joins and leaves announced (_announce), every queue given
       to its socket at once (_send), then the budgets of addresses and of
       the server enforced on what stayed queued (_enforce_budgets), and four
       times a second _housekeeping: deadlines of handshakes, of closing
       connections and of frames that stopped arriving (_stalled).
    5. Closing: _reject (tell why, close once sent), _cut (drop what is
       queued first), _lost and _destroy (at once).

    The hooks a room shared with other servers overrides (SharedChatServer):
    _may_relay and _relayed (chat to and from the room), _notice and _online
    (notices and counts), _join, _rename and _leave_room (nicknames claimed
    elsewhere), _handle_frame (input held while a claim is pending), the
    commands that ask the room (/who, /msg), and the loop's own _end_of_turn,
    _housekeeping and _shutdown.
    """

    def __init__(self, config: ServerConfig | None = None, store: Store | None = None) -> None:
        self.config = config = config or ServerConfig()
        self.max_message = config.max_message
        self.max_queue = config.max_queue
        self.rate = config.rate
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.tls_context: Any = None  # an ssl.SSLContext with --tls-cert
        self.password_digest = (
            hashlib.sha256(config.password.encode("utf-8")).digest() if config.password else None
        )
        self.connections: set[Connection] = set()
        self._waiting: set[Connection] = set()  # with a deadline: handshake or closing
        # Connections on their way out (told why, in their grace time), oldest first.
        self._closing: dict[Connection, None] = {}
        self.users: dict[str, Connection] = {}  # casefolded nickname -> connection
        self.skeletons: dict[str, Connection] = {}  # nick_skeleton() -> connection
        self._who_snapshot: list[Connection] | None = None  # users by name, for /who
        # Budgets: the whole server's, and one per address (with its rates).
        self.memory = Budget(config.max_memory)
        self.accounts: dict[str, Account] = {}
        self._over: set[Budget] = set()  # budgets past their limit this turn
        # Users' rates (messages, bytes), by casefolded nickname: a user who
        # comes back finds them as it left them.
        self.user_rates: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self._limited = bool(
            config.rate or config.byte_rate or config.address_rate or config.address_byte_rate
        )
        self._unfinished: set[Connection] = set()  # holding part of a frame
        self.pending_bytes = 0  # large frames arriving, all together
        self._now = time.monotonic()  # when this turn of the loop began
        self._dirty: list[Connection] = []
        self._overflowed: list[Connection] = []
        # Who joined and left since the last notices, in order: each newcomer
        # with its place among these joins; each leaver's nickname with how
        # many of those joins came before it left, and its own place if it was
        # one of them (else -1). _announce() tells each user what it missed.
        self._joined: dict[Connection, int] = {}
        self._left: list[tuple[str, int, int]] = []
        self._notices_due = 0.0  # when the gathered joins and leaves are told
        self._stopping = False
        self._accept_paused_until = 0.0
        self._next_housekeeping = 0.0
        self._next_forget = 0.0
        self._spare_fd: int | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        # The last chat messages, replayed to every newcomer. It must fit in
        # one client's queue, so it also keeps to half of --max-queue.
        self.history_size = config.history
        self.history = History(config.history, self.max_queue // 2, self.memory)
        # Running the room: operators, the topic, bans, and the history on disk.
        self.ops_digest = (
            hashlib.sha256(config.ops_password.encode("utf-8")).digest()
            if config.ops_password
            else None
        )
        self.topic: tuple[str, str, float] | None = None  # text, who set it, when (Unix time)
        self.bans: dict[str, Ban] = {}  # by network ("203.0.113.7/32")
        self.store = store
        self._to_store: list[Buffer] = []  # this turn's chat, for the store
        self._store_behind_at = -STORE_RETRY  # when "not keeping up" was last logged
        self._search_rate = TokenBucket(SEARCH_RATE, SEARCH_BURST, self._now)

    def restore(
        self, frames: list[bytes], topic: tuple[str, str, float] | None, bans: list[Ban]
    ) -> None:
        """Take up what a store (or Redis) kept: the history (unless there is
        one already), the topic and the bans."""
        if self.history_size and not len(self.history):
            for frame in frames[-self.history_size :]:
                self.history.remember((Held(frame),))
        if topic is not None and topic[0] and self.topic is None:  # the room's (Redis) first
            self.topic = topic
        for ban in bans:
            self.bans[ban.key] = ban

    # -- setting up -------------------------------------------------------

    def listen(self) -> tuple[str, int]:
        """Load the TLS certificate if any, bind and listen; return the real (host, port)."""
        config = self.config
        if config.tls_cert:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(config.tls_cert, config.tls_key)
            except OSError as exc:  # ssl.SSLError included
                raise OSError(
                    "cannot load the TLS certificate %s: %s" % (config.tls_cert, _reason(exc))
                ) from None
            self.tls_context = context
        _raise_file_limit()
        if config.host in ("", "::") and socket.has_dualstack_ipv6():
            sock = socket.create_server(
                ("", config.port),
                family=socket.AF_INET6,
                backlog=LISTEN_BACKLOG,
                dualstack_ipv6=True,
            )
        else:
            host = config.host or "0.0.0.0"
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, config.port), family=family, backlog=LISTEN_BACKLOG)
        sock.setblocking(False)
        self.listener = sock
        self.selector.register(sock, selectors.EVENT_READ, self._accept)
        self._spare_fd = _open_spare_fd()
        bound = sock.getsockname()
        host = bound[0]
        shown = "[%s]" % host if ":" in host else host
        self.address = "%s:%d" % (shown, bound[1])
        return host, bound[1]

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down cleanly."""
        if self.listener is None:
            self.listen()
        self._install_signal_handlers()
        if self.store is not None:
            self.selector.register(self.store.wakeup[0], selectors.EVENT_READ, self._on_store)
            self.store.start()
            log(
                "storing the history in %s (%s)"
                % (
                    self.store.path,
                    "kept for %g days" % (self.store.keep / 86400)
                    if self.store.keep
                    else "kept for ever",
                )
            )
        log("listening on %s%s" % (self.address, " (TLS)" if self.tls_context else ""))
        select = self.selector.select
        try:
            while not self._stopping:
                events = select(HOUSEKEEPING_INTERVAL)
                self._now = time.monotonic()
                for key, mask in events:
                    key.data(mask)
                self._end_of_turn()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stopping = True

    def _install_signal_handlers(self) -> None:
        # The handlers only set a flag; the wakeup socket makes select() return
        # at once instead of at its next timeout.
        if threading.current_thread() is not threading.main_thread():
            return
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self.selector.register(reader, selectors.EVENT_READ, self._drain_wakeup)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

        def on_signal(signum: int, frame: Any) -> None:
            self._stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        if hasattr(signal, "SIGHUP"):  # the terminal closed, the ssh session dropped
            signal.signal(signal.SIGHUP, on_signal)

    def _drain_wakeup(self, mask: int) -> None:
        assert self._wakeup is not None
        try:
            self._wakeup[0].recv(4096)
        except OSError:
            pass

    # -- accepting --------------------------------------------------------

    def _accept(self, mask: int) -> None:
        assert self.listener is not None
        for _ in range(256):  # a burst of connects is taken in few turns, but not forever
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._out_of_descriptors(exc)
                    return
                # ECONNABORTED and friends concern only that one connection.
                log("accept failed: %s" % exc)
                continue
            self._add_connection(sock, peer)

    def _out_of_descriptors(self, exc: OSError) -> None:
        # The pending connection would wake us again and again: close the spare
        # descriptor, take the connection, tell it why and let it go. Without a
        # spare, stop accepting for a second rather than spin.
        log("accept failed: %s; refusing new connections until descriptors free up" % exc)
        if self._spare_fd is not None and self.listener is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
            try:
                sock, _ = self.listener.accept()
                _send_and_close(sock, "Server is out of resources; try again later")
            except OSError:
                pass
            self._spare_fd = _open_spare_fd()
        if self._spare_fd is None:
            self._pause_accepting(1.0)

    def _pause_accepting(self, seconds: float) -> None:
        if self.listener is not None and not self._accept_paused_until:
            self.selector.unregister(self.listener)
            self._accept_paused_until = time.monotonic() + seconds

    def _add_connection(self, sock: socket.socket, peer: Any) -> None:
        config = self.config
        host = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]  # IPv4 via IPv6
        address = "[%s]:%d" % (host, peer[1]) if ":" in host else "%s:%d" % (host, peer[1])
        full = config.max_clients and len(self.connections) >= config.max_clients
        if full and not self._closing:
            clients = plural(config.max_clients, "client")
            log("refused %s: server full (%s)" % (address, clients))
            _send_and_close(sock, "Server is full (%s); try again later" % clients)
            return
        if self.bans:
            ban = self._ban_for(host)
            if ban is not None:
                if not ban.refused:  # the first is logged; the rest counted (_forget)
                    log("refused %s: banned (%s)" % (address, ban.shown()))
                ban.refused += 1
                _send_and_close(sock, ban.notice(self._bans_last))
                return
        per_address = config.max_per_address
        if per_address is None and not _is_loopback(host):
            per_address = DEFAULT_MAX_PER_ADDRESS
        key = _address_key(host)
        account = self.accounts.get(key)
        if per_address and account is not None and len(account.conns) >= per_address:
            log("refused %s: %d connections from that address" % (address, per_address))
            _send_and_close(
                sock, "Too many connections from your address (%d); try again later" % per_address
            )
            return
        if full:
            # One on its way out makes room: a newcomer must not be turned away
            # by connections the server has already refused. (An event of its
            # own later in this turn finds it gone: see _on_client_event.)
            self._destroy(next(iter(self._closing)))
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if account is None:
            account = Account(key, config.max_address_memory, config, self._now)
            self.accounts[key] = account
        conn = Connection(sock, account, self.memory, address, self._now + config.handshake_timeout)
        conn.handler = functools.partial(self._on_client_event, conn)
        if self.tls_context is not None:
            conn.tls = TLS_PEEK
        self.connections.add(conn)
        self._waiting.add(conn)
        account.conns.add(conn)
        self.selector.register(sock, selectors.EVENT_READ, conn.handler)
        log("connection from %s" % address)

    # -- TLS --------------------------------------------------------------

    def _tls_step(self, conn: Connection) -> None:
        """Move a TLS connection on, without ever blocking the loop.

        The first byte tells a TLS ClientHello (0x16) from a plain selchat
        client, which is told in plain text what to do instead.
        """
        if conn.tls == TLS_PEEK:
            try:
                first = conn.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(conn, "connection error: %s" % _reason(exc))
                return
            if not first:
                self._lost(conn, "closed the connection before TLS")
                return
            if first != b"\x16":
                log("%s disconnected: plain TCP to a TLS server" % conn.address)
                self._destroy(
                    conn,
                    "Protocol error: this server speaks TLS; "
                    "connect with the client's --tls option",
                )
                return
            self.selector.unregister(conn.sock)
            conn.sock = self.tls_context.wrap_socket(
                conn.sock, server_side=True, do_handshake_on_connect=False
            )
            self.selector.register(conn.sock, selectors.EVENT_READ, conn.handler)
            conn.tls = TLS_HANDSHAKE
        import ssl

        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            self._lost(conn, "TLS handshake failed: %s" % _reason(exc))
            return
        conn.tls = TLS_ON
        self._want(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0))
        self._receive(conn)  # the handshake may have brought the first frames along

    def _want(self, conn: Connection, events: int) -> None:
        conn.writing = bool(events & selectors.EVENT_WRITE)
        self.selector.modify(conn.sock, events, conn.handler)

    # -- reading ----------------------------------------------------------

    def _on_client_event(self, conn: Connection, mask: int) -> None:
        if conn.state == CLOSED:  # closed earlier in this turn
            return
        if conn.tls and conn.tls != TLS_ON:
            self._tls_step(conn)
            return
        if mask & selectors.EVENT_WRITE:
            self._send(conn)
        if mask & selectors.EVENT_READ and conn.state != CLOSED:
            self._receive(conn)

    def _receive(self, conn: Connection) -> None:
        # A TLS socket can hold decrypted data that select() does not see:
        # read on while it has some (a few records at most per turn).
        for _ in range(8):
            try:
                if conn.large is not None:
                    self._receive_large(conn)
                else:
                    data = conn.sock.recv(RECV_SIZE)
                    if not data:
                        self._peer_closed(conn)
                        return
                    if not conn.closing:
                        self._consume(conn, data)
            except _WOULD_BLOCK:
                return
            except OSError as exc:
                self._lost(conn, "connection error: %s" % _reason(exc))
                return
            if conn.tls != TLS_ON or conn.state == CLOSED or not conn.sock.pending():  # type: ignore[attr-defined]
                return

    def _consume(self, conn: Connection, data: bytes) -> None:
        """Handle every frame in ``data``, keeping only an unfinished tail.

        Chat messages that can be relayed as they came (the nickname field is
        already the sender's) are collected into one run and broadcast as a
        single slice of ``data``: a read full of small messages costs one queue
        entry per receiver, not one per message.
        """
        pos = 0
        end = len(data)
        if conn.skip:  # the rest of a frame refused for want of memory
            pos = min(conn.skip, end)
            conn.skip -= pos
        if conn.tail:
            pos = self._complete_tail(conn, data, pos)
            if pos < 0:
                return
        run = -1  # start of the run of frames to relay verbatim
        nick_field = conn.nick_field  # b"\0nick\0" once registered
        limited = self._limited
        while end - pos >= HEADER_SIZE:
            length = self._frame_length(conn, data[pos : pos + HEADER_SIZE])
            if length < 0:
                break
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            if nick_field:
                # The hot path: a chat message that already carries the sender's
                # nickname and some text joins the run, unread beyond that.
                first = data.find(b"\0", start, stop)
                if (
                    first >= 0
                    and data.startswith(nick_field, first)
                    and first + len(nick_field) < stop
                ):
                    if not limited or self._admit(conn, stop - pos):
                        if run < 0:
                            run = pos
                        pos = stop
                        continue
                    # Over the rate: the frame is dropped and ends the run.
                    if run >= 0 and not self._relay_run(conn, data, run, pos):
                        return
                    run = -1
                    if conn.closing:
                        return
                    pos = stop
                    continue
            if run >= 0:
                if not self._relay_run(conn, data, run, pos):
                    return
                run = -1
            if not self._handle_frame(conn, data, start, stop) or conn.closing:
                return
            # That frame may have been the nickname or a /nick: what follows
            # in this read must be matched against the name it now has.
            nick_field = conn.nick_field
            pos = stop
        if run >= 0 and not self._relay_run(conn, data, run, pos):
            return
        if pos < end and not conn.closing:
            self._keep_tail(conn, data, pos)

    def _relay_run(self, conn: Connection, data: bytes, run: int, stop: int) -> bool:
        """Broadcast the frames in data[run:stop] as one shared slice.

        Headers are ASCII, so the run is UTF-8 exactly when every payload in it
        is: one check covers them all. When it fails, the frames before the bad
        one still go out, and the sender is closed.
        """
        good = stop if _utf8_valid(data, run, stop) else _utf8_frames_end(data, run, stop)
        if good > run and self._may_relay(conn, good - run):
            held = Held(memoryview(data)[run:good])
            self._broadcast((held,), conn)
            if self.history_size:
                self.history.remember_run(data, run, good)
            self._relayed((held.buffer,))
        if good == stop:
            return True
        self._reject(conn, "Protocol error: message is not valid UTF-8", "invalid UTF-8")
        return False

    def _frame_length(self, conn: Connection, header: bytes) -> int:
        """The announced length, or -1 after closing a connection that broke the rules."""
        try:
            length = parse_header(header)
        except ProtocolError:
            self._reject(
                conn,
                "Protocol error: a frame header must be the payload length "
                "in ASCII digits, padded with spaces to %d bytes" % HEADER_SIZE,
                "bad frame header %r" % header,
            )
            return -1
        if conn.state <= PASSWORD and length > MAX_HANDSHAKE_FRAME:
            notice = (
                "Protocol error: a password is at most %d bytes" % MAX_HANDSHAKE_FRAME
                if conn.state == PASSWORD
                else "Nickname rejected: must be 1 to %d characters" % MAX_NICK_LENGTH
            )
            self._reject(conn, notice, "handshake frame of %d bytes" % length)
            return -1
        if length > self.max_message:
            self._reject(
                conn,
                "Message too long: %d bytes (limit %d bytes)" % (length, self.max_message),
                "frame of %d bytes over --max-message" % length,
            )
            return -1
        return length

    def _complete_tail(self, conn: Connection, data: bytes, pos: int) -> int:
        """Finish the frame begun in an earlier read; return where ``data`` goes on,
        or -1 when it is all used up (or the connection is done)."""
        tail = conn.tail
        if len(tail) < HEADER_SIZE:
            take = HEADER_SIZE - len(tail)
            tail += data[pos : pos + take]
            pos += take
            if len(tail) < HEADER_SIZE:
                self._hold_input(conn, len(tail))
                return -1
        length = self._frame_length(conn, bytes(tail[:HEADER_SIZE]))
        if length < 0:
            return -1
        if length >= LARGE_FRAME:
            conn.tail = bytearray()
            self._hold_input(conn, 0)
            pos += self._start_large(conn, length, tail[HEADER_SIZE:], data, pos)
            return -1 if conn.large is not None or conn.skip or pos >= len(data) else pos
        need = HEADER_SIZE + length - len(tail)
        tail += data[pos : pos + need]
        if len(tail) < HEADER_SIZE + length:
            self._hold_input(conn, len(tail))
            return -1
        conn.tail = bytearray()
        self._hold_input(conn, 0)
        frame = bytes(tail)
        if not self._handle_frame(conn, frame, HEADER_SIZE, len(frame)) or conn.closing:
            return -1
        return pos + need

    def _keep_tail(self, conn: Connection, data: bytes, pos: int) -> None:
        if len(data) - pos >= HEADER_SIZE:
            length = parse_header(data[pos : pos + HEADER_SIZE])  # checked by _frame_length
            if length >= LARGE_FRAME:
                self._start_large(conn, length, b"", data, pos + HEADER_SIZE)
                return
        conn.tail = bytearray(data[pos:])
        self._hold_input(conn, len(conn.tail))

    def _hold_input(self, conn: Connection, size: int) -> None:
        """Charge ``size`` bytes of unfinished input to conn, its address and the server."""
        change = size - conn.input_held
        if change:
            if not conn.input_held:
                conn.input_started = self._now
            conn.input_held = size
            account = conn.account
            account.held += change
            self.memory.held += change
            if change > 0:
                conn.input_since = self._now
                if account.over():
                    self._over.add(account)
                if self.memory.over():
                    self._over.add(self.memory)
        if size:
            self._unfinished.add(conn)
        else:
            self._unfinished.discard(conn)

    def _start_large(
        self, conn: Connection, length: int, head: Buffer, data: bytes, pos: int
    ) -> int:
        """Begin a large frame; return how many bytes of data[pos:] belong to it.

        It gets a buffer of its announced size, filled in place by recv_into():
        no concatenation (quadratic), no second copy. When all large frames
        arriving at once would pass --max-pending, this one is read and thrown
        away instead, and its sender is told: the server refuses new work and
        recovers by itself as the others complete.
        """
        got = len(head)
        piece = data[pos : pos + length - got]
        if self.pending_bytes + length > self.config.max_pending:
            refusal: str | None = "the server is busy receiving other large messages"
            log(
                "%s: large message refused, %d bytes already arriving"
                % (conn.name, self.pending_bytes)
            )
        else:
            refusal = self._make_room(conn, length)
            if refusal is not None:
                log("%s: large message refused: %s" % (conn.name, refusal))
        if refusal is not None:
            conn.skip = length - got - len(piece)
            self._tell(conn, "Not sent: %s; try again later" % refusal)
            return len(piece)
        large = bytearray(length)
        large[:got] = head
        large[got : got + len(piece)] = piece
        conn.large = large
        conn.large_got = got + len(piece)
        self.pending_bytes += length
        self._hold_input(conn, length)
        if conn.large_got == length:
            self._finish_large(conn)
        return len(piece)

    def _make_room(self, conn: Connection, size: int) -> str | None:
        """Make room for ``size`` more bytes held for conn, or say why there is none.

        Past the address's budget or the server's, the connection holding
        the most is cut, as long as it holds at least what conn would then
        hold: when conn would be the biggest, conn is the one refused. (Past
        --max-pending, _start_large refuses the new frame for a while: the
        frames arriving complete or time out.)
        """
        account, memory = conn.account, self.memory
        wanted = self._frees(conn) + size
        levels: list[tuple[str, int, Any]] = []
        if 0 < account.limit < account.held + size:
            excess = self._address_holds(account) + size - account.limit
            levels.append(("your address holds too much of the server's memory", excess, account))
        if 0 < memory.limit < memory.held + size:
            levels.append(
                ("the server is short of memory", memory.held + size - memory.limit, memory)
            )
        for refusal, excess, budget in levels:
            if budget is memory:
                excess = memory.held + size - memory.limit  # cuts at the first level count
            pool = self.connections if budget is memory else account.conns
            # The one that frees the most first; of equals, the one whose input
            # stalled longest.
            holders = sorted(
                ((self._frees(c), c) for c in pool if c is not conn and not c.closing),
                key=lambda pair: (-pair[0], pair[1].input_since),
            )
            for frees, victim in holders:
                if excess <= 0:
                    break
                if frees < wanted:
                    return refusal
                self._cut(victim, refusal + ", and you held the most", "over a memory budget")
                excess -= frees
            if excess > 0:
                return refusal
        return None

    def _address_holds(self, account: Account) -> int:
        """What the connections of an address really keep alive: a buffer that
        several of them have queued (a broadcast, the history) counts once."""
        seen: set[int] = set()
        total = 0
        for conn in account.conns:
            total += conn.input_held
            for held in conn.out.entries:
                if id(held) not in seen:
                    seen.add(id(held))
                    total += held.size
        return total

    @staticmethod
    def _frees(conn: Connection) -> int:
        """What cutting conn would free: its input, and what no other queue holds."""
        return conn.input_held + sum(held.size for held in conn.out.entries if held.refs == 1)

    def _receive_large(self, conn: Connection) -> None:
        large = conn.large
        assert large is not None
        count = conn.sock.recv_into(memoryview(large)[conn.large_got :])
        if not count:
            self._peer_closed(conn)
            return
        conn.large_got += count
        conn.input_since = self._now
        if conn.large_got == len(large):
            self._finish_large(conn)

    def _drop_large(self, conn: Connection) -> bytearray | None:
        large = conn.large
        if large is not None:
            conn.large = None
            conn.large_got = 0
            self.pending_bytes -= len(large)
            self._hold_input(conn, 0)
        return large

    def _finish_large(self, conn: Connection) -> None:
        large = self._drop_large(conn)
        assert large is not None
        self._handle_frame(conn, large, 0, len(large))

    # -- handling one frame -----------------------------------------------

    def _handle_frame(self, conn: Connection, data: Buffer, start: int, stop: int) -> bool:
        """Handle the payload data[start:stop]; False when the connection is done."""
        if conn.state == NAMING:
            return self._register(conn, data, start, stop)
        if conn.state == PASSWORD:
            return self._check_password(conn, data, start, stop)
        if self._limited and not self._admit(conn, HEADER_SIZE + stop - start):
            return not conn.closing
        if not _utf8_valid(data, start, stop):
            self._reject(conn, "Protocol error: message is not valid UTF-8", "invalid UTF-8")
            return False
        first = data.find(b"\0", start, stop)
        if first < 0:
            self._command(conn, str(memoryview(data)[start:stop], "utf-8"))
            return not conn.closing
        second = data.find(b"\0", first + 1, stop)
        if second < 0:
            self._tell(conn, "Not sent: a chat message has three parts, time, nick and text")
            return True
        if second + 1 == stop:
            self._tell(conn, "Not sent: the message is empty")
            return True
        # Relay with the registered nickname in place of whatever was sent.
        head = b"".join((bytes(data[start:first]), b"\0", conn.nick_bytes, b"\0"))
        size = len(head) + stop - second - 1
        frame: tuple[Buffer, ...]
        if size < LARGE_FRAME:
            frame = (b"".join((frame_header(size), head, bytes(data[second + 1 : stop]))),)
        else:  # the text is shared by every receiver, never copied
            frame = (frame_header(size) + head, memoryview(data)[second + 1 : stop])
        self._relay_chat(hold(frame), conn)
        return True

    def _relay_chat(
        self, frame: tuple[Held, ...], conn: Connection, to_sender: bool = False
    ) -> None:
        """Send a chat message (or action) the server wrote for conn to the room
        (conn too when ``to_sender``), and remember it."""
        if not self._may_relay(conn, sum(len(held.buffer) for held in frame)):
            return
        self._broadcast(frame, None if to_sender else conn)
        if self.history_size:
            self.history.remember(frame)
        self._relayed([held.buffer for held in frame])

    # Hooks for a room shared with other servers (SharedChatServer).

    def _may_relay(self, conn: Connection, size: int) -> bool:
        """Whether ``size`` bytes of chat from conn may go to the room now."""
        return True

    def _relayed(self, buffers: Sequence[Buffer]) -> None:
        """Chat frames that went to the room (and the history): to the store too."""
        if self.store is not None:
            self._to_store.extend(buffers)

    def _register(self, conn: Connection, data: Buffer, start: int, stop: int) -> bool:
        try:
            nick = str(memoryview(data)[start:stop], "utf-8")
        except UnicodeDecodeError:
            self._reject(
                conn,
                "Protocol error: the nickname is not valid UTF-8",
                "nickname is not valid UTF-8",
            )
            return False
        if self.password_digest is not None and conn.state == NAMING:
            # The nickname is checked only once the password is right: before
            # that a peer learns nothing, not even who is online.
            conn.state = PASSWORD
            conn.asked_nick = nick
            self._tell(conn, PASSWORD_REQUEST)
            return True
        return self._accept_nick(conn, nick)

    def _accept_nick(self, conn: Connection, nick: str) -> bool:
        """Let conn in as ``nick`` if it may have it and its address may bring one more in."""
        reason = self._nick_refused(conn, nick)
        if reason is not None:
            self._reject(
                conn,
                "Nickname rejected: %s" % reason.replace("'", '"'),
                "nickname rejected: %s" % reason,
            )
            return False
        account = conn.account
        if not account.joins.take(self._now):
            wait = account.joins.wait(self._now)
            self._reject(
                conn,
                "Too many users joined from your address; try again in %d s" % (wait + 1),
                "over --join-rate for its address",
            )
            return False
        conn.asked_nick = None
        return self._join(conn, nick)

    def _nick_refused(self, conn: Connection, nick: str) -> str | None:
        """Why ``nick`` cannot be conn's nickname now, or None when it can."""
        reason = check_nick(nick)
        if reason is not None:
            return reason
        taken = self.users.get(nick.casefold())
        if taken is not None and taken is not conn:
            return "%r is already in use" % nick
        like = self.skeletons.get(nick_skeleton(nick))
        if like is not None and like is not conn:
            return "%r looks too much like %r, who is online" % (nick, like.nick)
        return None

    def _name(self, conn: Connection, nick: str | None) -> None:
        """Give conn its nickname (None: take it away) in every index of them."""
        if conn.nick is not None and self.users.get(conn.nick_key) is conn:
            del self.users[conn.nick_key]
            skeleton = nick_skeleton(conn.nick)
            if self.skeletons.get(skeleton) is conn:
                del self.skeletons[skeleton]
        self._who_snapshot = None
        if nick is not None:
            conn.name_as(nick)
            self.users[conn.nick_key] = conn
            self.skeletons.setdefault(nick_skeleton(nick), conn)

    def _join(self, conn: Connection, nick: str) -> bool:
        """Admit a checked nickname: welcome, history, and a notice for the others."""
        self._waiting.discard(conn)
        conn.state = CHATTING
        self._name(conn, nick)
        rates = self.user_rates.get(conn.nick_key)
        if rates is None:
            config = self.config
            rates = (
                TokenBucket(config.rate, config.burst, self._now),
                TokenBucket(config.byte_rate, config.byte_burst, self._now),
            )
            self.user_rates[conn.nick_key] = rates
        conn.messages, conn.bytes = rates
        limit = (
            " Limit: %g messages a second, bursts of %d." % (self.rate, self.config.burst)
            if self.rate
            else ""
        )
        topic = " Topic: %s" % self.topic[0] if self.topic else ""
        self._tell(
            conn,
            "Welcome to selchat, %s! %s online. Type %s to leave.%s%s"
            % (nick, plural(self._online(), "user"), QUIT_COMMAND, limit, topic),
        )
        conn.joined = time.monotonic()
        self._replay_history(conn)
        self._gather()
        self._joined[conn] = len(self._joined)
        log("%s joined as %s" % (conn.address, nick))
        return True

    def _check_password(self, conn: Connection, data: Buffer, start: int, stop: int) -> bool:
        # Both sides hashed first: compare_digest() is constant-time only for
        # inputs of equal length.
        account = conn.account
        lockout = account.password
        now = self._now
        if lockout.locked(now):
            # Not checked, and not logged one by one: counted, and logged once.
            lockout.refused += 1
            self._close_when_done(
                conn,
                "Too many wrong passwords from your address; try again in %d s"
                % (lockout.locked_until - now + 1),
            )
            return False
        self._log_refused(account)
        digest = hashlib.sha256(memoryview(data)[start:stop]).digest()
        assert self.password_digest is not None and conn.asked_nick is not None
        if not hmac.compare_digest(digest, self.password_digest):
            seconds = lockout.fail(now, self.config.password_tries)
            if not seconds:
                self._reject(conn, "Wrong password", "wrong password")
                return False
            self._reject(
                conn,
                "Wrong password; too many from your address, try again in %d s" % seconds,
                "wrong password, %d in a row from %s: locked out for %d s"
                % (lockout.failures, conn.host, seconds),
            )
            return False
        lockout.failures = 0
        return self._accept_nick(conn, conn.asked_nick)

    def _admit(self, conn: Connection, size: int, cost: float = 1.0) -> bool:
        """The user's and its address's token buckets, in messages and in bytes:
        True when a message of ``size`` bytes (costing ``cost`` messages) may go.

        A user within its own rates who has sent little lately (more than half
        of its bursts left) may go on past its address's rates, into a reserve
        of one more burst: those rates stop the heavy senders of a busy
        address before their neighbours.
        """
        now = self._now
        messages, nbytes = conn.messages, conn.bytes
        if messages is None or nbytes is None:  # not a user yet
            return True
        if not messages.take(now, cost):
            why = "at most %g messages a second, bursts of %d" % (messages.rate, messages.burst)
        elif not nbytes.take(now, size):
            messages.give_back(cost)
            why = "at most %d bytes a second, bursts of %d" % (nbytes.rate, nbytes.burst)
        else:
            account = conn.account
            if account.messages.take(now, cost):
                if account.bytes.take(now, size):
                    return True
                account.messages.give_back(cost)
            if messages.light() and nbytes.light() and account.messages.borrow(now, cost):
                if account.bytes.borrow(now, size):
                    return True
                account.messages.give_back(cost)
            messages.give_back(cost)
            nbytes.give_back(size)
            why = "your address may send at most %s a second" % _amount(
                account.messages.rate, account.bytes.rate
            )
        if now - conn.flood_since > FLOOD_WINDOW:
            conn.flood_since = now
            conn.dropped = 0
        conn.dropped += 1
        rate = self.rate
        if conn.dropped > max(rate * FLOOD_WINDOW, self.config.burst):
            self._reject(
                conn,
                "Disconnected: flooding (far over %s a second)"
                % ("%g messages" % rate if rate else "%d bytes" % self.config.byte_rate),
                "flooding",
            )
        elif now - conn.warned_at >= 1.0:
            conn.warned_at = now
            log("%s: over the rate (%s), told to slow down" % (conn.name, why))
            self._tell(conn, "Slow down: %s; messages over that are not sent" % why)
        return False

    def _command(self, conn: Connection, line: str) -> None:
        if not line.startswith("/"):
            self._tell(
                conn,
                "Not sent: a message must be a chat message or a /command"
                if line
                else "Not sent: the message is empty",
            )
            return
        name = line.split(None, 1)[0] if line.strip() else line
        handler = self.COMMANDS.get(name.lower())
        if handler is None:
            self._tell(conn, "Unknown command %s; /help lists the commands" % name[:40])
        else:
            handler(self, conn, line)

    # -- commands ---------------------------------------------------------
    # Each handler's docstring is its line in /help. Each costs a message of
    # the sender's rate, and those that cost the server more take more.

    def _charge_command(self, conn: Connection, extra: float) -> bool:
        """Take ``extra`` more messages of conn's rates for a costly command."""
        return extra <= 0 or not self._limited or self._admit(conn, 0, extra)

    def _cmd_help(self, conn: Connection, line: str) -> None:
        """/help: this list"""
        usage = "; ".join((handler.__doc__ or "").strip() for handler in self.COMMANDS.values())
        self._tell(
            conn,
            "Commands: %s. Start a message with // to send it with a single /. "
            "Type %s to leave." % (usage, QUIT_COMMAND),
        )

    def _cmd_who(self, conn: Connection, line: str) -> None:
        """/who [NAME]: who is online and since when (NAME: whose nickname starts with it)"""
        listed = min(self._online(), WHO_NAMES)
        if not self._charge_command(conn, listed // WHO_USERS_PER_TOKEN):
            return
        parts = line.split(None, 1)
        self._who(conn, parts[1].strip() if len(parts) > 1 else "")

    def _who(self, conn: Connection, prefix: str) -> None:
        """Answer /who from a snapshot of the users sorted by name, taken at most
        once for every change of who is online: in a large room the first names
        and how many more, so no /who stalls the loop."""
        users = self._who_snapshot
        if users is None:
            users = self._who_snapshot = sorted(self.users.values(), key=lambda u: u.nick_key)
        now = time.monotonic()
        self._tell(
            conn,
            _who_text(
                [user.nick_key for user in users],
                lambda i: (
                    "%s (%sjoined %s ago)"
                    % (
                        users[i].nick,
                        "operator, " if users[i].op else "",
                        duration(now - users[i].joined),
                    )
                ),
                prefix,
            ),
        )

    def _cmd_msg(self, conn: Connection, line: str) -> None:
        """/msg NICK TEXT: a private message to NICK alone"""
        parts = line.split(None, 2)
        if len(parts) < 3:
            self._tell(conn, "Not sent: type /msg NICK TEXT")
            return
        target = self.users.get(parts[1].casefold())
        if target is None:
            self._tell(
                conn,
                "Not sent: nobody called %s is online (/who lists who is)"
                % parts[1][:MAX_NICK_LENGTH],
            )
            return
        field = "%s %s -> %s" % (PRIVATE_MARK, conn.nick, target.nick)
        frame = (Held(encode_frame("\0".join((utc_stamp(), field, parts[2])).encode("utf-8"))),)
        # Both ends see it, so the sender knows it went out and to whom.
        self._deliver(target, frame)
        if target is not conn:
            self._deliver(conn, frame)

    def _cmd_nick(self, conn: Connection, line: str) -> None:
        """/nick NEW: change your nickname"""
        if not self._charge_command(conn, NICK_COST - 1):  # a notice to everyone
            return
        parts = line.split(None, 1)
        if len(parts) != 2:
            self._tell(conn, "Nickname not changed: type /nick NEW")
            return
        # All that follows the command is the new nickname, checked as at login
        # ("/nick two words" is told that a nickname has no whitespace).
        old, new = conn.nick or "", parts[1].strip()
        if new == old:
            self._tell(conn, "Nickname not changed: you are %s already" % new)
            return
        reason = self._nick_refused(conn, new)
        if reason is not None:
            self._tell(conn, "Nickname not changed: %s" % reason.replace("'", '"'))
            return
        joins = conn.account.joins  # a new name is told to everyone, as a join is
        if not joins.take(self._now):
            self._tell(
                conn,
                "Nickname not changed: too many new names from your address; "
                "try again in %d s" % (joins.wait(self._now) + 1),
            )
            return
        self._rename(conn, old, new)

    def _rename(self, conn: Connection, old: str, new: str) -> None:
        rates = self.user_rates.pop(conn.nick_key, None)
        if conn.op:
            self._control("deop", conn.nick_key)
        self._name(conn, new)
        if conn.op:
            self._opped(conn)
        if rates is not None:  # the rates go with the user, not with the name
            self.user_rates[conn.nick_key] = rates
        self._tell(conn, RENAMED + new)
        if conn not in self._joined:  # otherwise the join notice names the new nickname
            self._notice("%s is now known as %s" % (old, new), conn)
        log("%s (%s) is now known as %s" % (old, conn.address, new))

    def _cmd_me(self, conn: Connection, line: str) -> None:
        """/me ACTION: tell the room what you do (* alice waves)"""
        parts = line.split(None, 1)
        if len(parts) < 2:
            self._tell(conn, "Not sent: type /me ACTION")
            return
        field = "%s %s" % (ACTION_MARK, conn.nick)
        frame = encode_frame("\0".join((utc_stamp(), field, parts[1])).encode("utf-8"))
        self._relay_chat((Held(frame),), conn, to_sender=True)  # the server wrote this line

    # -- running the room: operators, the topic, bans, search --------------

    def _ops_only(self, conn: Connection, what: str) -> bool:
        if conn.op:
            return True
        self._tell(
            conn,
            "Only operators can %s%s"
            % (
                what,
                " (/op PASSWORD makes you one)"
                if self.ops_digest is not None
                else "; this server has none (it was started without --ops-password)",
            ),
        )
        return False

    def _cmd_op(self, conn: Connection, line: str) -> None:
        """/op PASSWORD: become an operator (/kick, /ban, /unban, /bans, /topic TEXT)"""
        if not self._charge_command(conn, OP_COST - 1):
            return
        parts = line.split(None, 1)
        if self.ops_digest is None:
            self._tell(conn, "No operators here: the server was started without --ops-password")
            return
        if len(parts) < 2:
            self._tell(conn, "Type /op PASSWORD")
            return
        if conn.op:
            self._tell(conn, "You are an operator already")
            return
        account = conn.account
        lockout = account.ops
        now = self._now
        if lockout.locked(now):
            lockout.refused += 1  # not checked, and logged once (_forget)
            self._tell(
                conn,
                "Too many wrong operator passwords from your address; try again in %d s"
                % (lockout.locked_until - now + 1),
            )
            return
        self._log_refused(account)
        digest = hashlib.sha256(parts[1].encode("utf-8")).digest()
        if not hmac.compare_digest(digest, self.ops_digest):
            seconds = lockout.fail(now, self.config.password_tries)
            if seconds:
                log(
                    "%s: wrong operator password, %d in a row from %s: locked out for %d s"
                    % (conn.name, lockout.failures, conn.host, seconds)
                )
                self._tell(
                    conn,
                    "Wrong operator password; too many from your address, try again in %d s"
                    % seconds,
                )
            else:
                log("%s: wrong operator password" % conn.name)
                self._tell(conn, "Wrong operator password")
            return
        lockout.failures = 0
        conn.op = True
        self._who_snapshot = None
        self._opped(conn)
        log("%s is an operator" % conn.name)
        self._tell(
            conn,
            "You are an operator now: /kick NICK [REASON], /ban NICK|ADDRESS [DURATION] "
            "[REASON], /unban ADDRESS, /bans and /topic TEXT",
        )
        if self.store is not None and self.store.failure is not None:
            self._tell(conn, self._store_failed_text(self.store.failure))

    def _cmd_kick(self, conn: Connection, line: str) -> None:
        """/kick NICK [REASON]: disconnect NICK, telling why (operators)"""
        if not self._ops_only(conn, "kick"):
            return
        parts = line.split(None, 2)
        if len(parts) < 2:
            self._tell(conn, "Type /kick NICK [REASON]")
            return
        reason = parts[2].strip() if len(parts) > 2 else ""
        if len(reason) > MAX_TOPIC:
            self._tell(conn, "Not kicked: a reason has at most %d characters" % MAX_TOPIC)
            return
        if not self._charge_command(conn, NICK_COST - 1):  # told to everyone
            return
        target = self.users.get(parts[1].casefold())
        if target is conn:
            self._tell(conn, "You cannot kick yourself out; type %s to leave" % QUIT_COMMAND)
        elif target is not None:
            self._kick(target, conn.nick or "", reason)
        else:
            self._kick_elsewhere(conn, parts[1], reason)

    def _kick_elsewhere(self, conn: Connection, nick: str, reason: str) -> None:
        self._tell(conn, _nobody(nick))

    def _kick(self, target: Connection, by: str, reason: str) -> None:
        why = ": " + reason if reason else ""
        self._notice("%s was kicked out by %s%s" % (target.nick, by, why), target)
        self._reject(
            target,
            "You were kicked out by %s%s" % (by, why),
            "kicked out by %s%s" % (by, sanitize(why)),  # the log is a terminal too
        )

    def _cmd_ban(self, conn: Connection, line: str) -> None:
        """/ban NICK|ADDRESS [DURATION] [REASON]: refuse an address, 30m, 2h, 7d... (operators)"""
        if not self._ops_only(conn, "ban"):
            return
        parts = line.split(None, 3)
        if len(parts) < 2:
            self._tell(
                conn, "Type /ban NICK|ADDRESS [DURATION] [REASON]; DURATION like 30m, 2h or 7d"
            )
            return
        seconds = parse_duration(parts[2]) if len(parts) > 2 else None
        if seconds is None and len(parts) > 2 and parts[2][:1].isdigit():
            self._tell(
                conn,
                "Not banned: %s is no duration; DURATION is like 90s, 30m, 2h, 7d or 1w "
                "(at most 100 years)" % sanitize(parts[2][:20]),
            )
            return
        reason = " ".join(parts[3 if seconds is not None else 2 :]).strip()
        if len(reason) > MAX_TOPIC:
            self._tell(conn, "Not banned: a reason has at most %d characters" % MAX_TOPIC)
            return
        if not self._charge_command(conn, NICK_COST - 1):  # told to everyone
            return
        until = time.time() + seconds if seconds is not None else None
        target = self.users.get(parts[1].casefold())
        if target is not None:
            network, nick = host_network(target.host), target.nick or ""
        else:
            network, nick = parse_network(parts[1]), ""
            if network is None:
                if self._ban_elsewhere(conn, parts[1], until, reason):
                    return
                self._tell(
                    conn,
                    "Not banned: %s is neither an address nor the nickname of someone online"
                    % sanitize(parts[1][:64]),
                )
                return
        if network is None:  # a connection whose address cannot be parsed
            self._tell(conn, "Not banned: %s's address cannot be banned" % nick)
            return
        own = parse_network(conn.host)
        if own is not None and own.version == network.version and own.subnet_of(network):
            self._tell(conn, "Not banned: %s is your own address" % shown_network(network))
            return
        ban = Ban(network, until, conn.nick or "", reason, nick)
        self._ban(ban)
        self._tell(
            conn,
            "Banned %s %s"
            % (ban.shown() + (" (%s)" % nick if nick else ""), ban.end_text(self._bans_last)),
        )

    def _ban_elsewhere(self, conn: Connection, nick: str, until: float | None, reason: str) -> bool:
        """Ban a user of another server by nickname; False when there is none to ask."""
        return False

    def _ban(self, ban: Ban, shared: bool = True) -> None:
        """Add (or replace) a ban and disconnect everyone it covers."""
        self.bans[ban.key] = ban
        if self.store is not None:
            self.store.job(functools.partial(Store.save_ban, ban))
        if shared:
            self._control(
                "ban",
                ban.key,
                "" if ban.until is None else repr(ban.until),
                ban.nick,
                ban.by,
                ban.reason,
                repr(ban.at),
            )
        log(
            "%s banned %s %s%s"
            % (
                ban.by,
                ban.shown(),
                ban.end_text(self._bans_last),
                ": " + sanitize(ban.reason) if ban.reason else "",
            )
        )
        notice = ban.notice(self._bans_last)
        for conn in [c for c in self.connections if not c.closing]:
            address = _ip_address(conn.host)
            if address is None or not ban.covers(address):
                continue
            if conn.nick is not None and conn.state == CHATTING:
                self._notice(
                    "%s was banned by %s%s"
                    % (conn.nick, ban.by, ": " + ban.reason if ban.reason else ""),
                    conn,
                )
            self._reject(conn, notice, "banned")

    def _cmd_unban(self, conn: Connection, line: str) -> None:
        """/unban ADDRESS: end a ban (operators)"""
        if not self._ops_only(conn, "unban"):
            return
        parts = line.split(None, 1)
        if len(parts) < 2:
            self._tell(conn, "Type /unban ADDRESS (/bans lists them)")
            return
        wanted = parts[1].strip()
        network = parse_network(wanted)
        ban = self.bans.get(str(network)) if network is not None else None
        if ban is None:  # the nickname it was banned with
            folded = wanted.casefold()
            ban = next(
                (b for b in self.bans.values() if b.nick and b.nick.casefold() == folded), None
            )
        if ban is None:
            self._tell(conn, "No ban on %s (/bans lists them)" % sanitize(wanted[:64]))
            return
        self._unban(ban.key)
        log("%s unbanned %s" % (conn.nick, ban.shown()))
        self._tell(conn, "Unbanned %s" % ban.shown())

    def _unban(self, key: str, shared: bool = True) -> None:
        self.bans.pop(key, None)
        if self.store is not None:
            self.store.job(functools.partial(Store.drop_ban, key))
        if shared:
            self._control("unban", key)

    def _cmd_bans(self, conn: Connection, line: str) -> None:
        """/bans: the addresses banned, and until when (operators)"""
        if not self._ops_only(conn, "list the bans"):
            return
        now = time.time()
        bans = sorted((b for b in self.bans.values() if not b.ended(now)), key=lambda b: b.at)
        if not bans:
            self._tell(conn, "No bans")
            return
        shown = [
            "%s (%s%s %s%s)"
            % (
                ban.shown(),
                ban.nick + ", " if ban.nick else "",
                "by " + ban.by + ",",
                ban.end_text(self._bans_last),
                ": " + ban.reason if ban.reason else "",
            )
            for ban in bans[:WHO_NAMES]
        ]
        more = ", and %d more" % (len(bans) - WHO_NAMES) if len(bans) > WHO_NAMES else ""
        self._tell(conn, "%s: %s%s" % (plural(len(bans), "ban"), ", ".join(shown), more))

    def _cmd_topic(self, conn: Connection, line: str) -> None:
        """/topic [TEXT]: the room's topic; operators set it (/topic - clears it)"""
        parts = line.split(None, 1)
        if len(parts) < 2:
            if self.topic is None:
                self._tell(conn, "No topic is set")
            else:
                text, nick, at = self.topic
                self._tell(conn, "Topic: %s (set by %s, %s)" % (text, nick, _utc_time(at)))
            return
        if not self._ops_only(conn, "set the topic"):
            return
        text = parts[1].strip()
        if text == "-":
            text = ""
        if len(text) > MAX_TOPIC:
            self._tell(conn, "Topic not set: at most %d characters" % MAX_TOPIC)
            return
        if not self._charge_command(conn, NICK_COST - 1):  # told to everyone
            return
        self._set_topic(text, conn.nick or "", time.time())
        self._notice(
            "%s set the topic: %s" % (conn.nick, text)
            if text
            else "%s cleared the topic" % conn.nick
        )
        log(
            "%s %s"
            % (conn.name, "set the topic: %s" % sanitize(text) if text else "cleared the topic")
        )

    def _set_topic(self, text: str, nick: str, at: float, shared: bool = True) -> None:
        self.topic = (text, nick, at) if text else None
        if self.store is not None:
            self.store.job(functools.partial(Store.save_topic, text, nick, at))
        if shared:
            self._control("topic", text, nick, repr(at))

    def _cmd_search(self, conn: Connection, line: str) -> None:
        """/search WORDS: the last 20 messages with all of them ("quotes" for a phrase)"""
        store = self.store
        if store is None:
            self._tell(
                conn,
                "Not searched: this server keeps no history on disk "
                "(it was started without --store)",
            )
            return
        parts = line.split(None, 1)
        query = parts[1].strip()[:MAX_SEARCH] if len(parts) > 1 else ""
        if not search_terms(query):
            self._tell(conn, 'Type /search WORDS ("a phrase" in quotes)')
            return
        if conn.searching:
            self._tell(conn, "Not searched: your last search is still running")
            return
        if conn.account.searches >= SEARCHES_PER_ADDRESS:  # a second connection is no way round
            self._tell(
                conn,
                "Not searched: %d searches from your address are running; try again in a moment"
                % SEARCHES_PER_ADDRESS,
            )
            return
        if not self._charge_command(conn, SEARCH_COST - 1):
            return
        if self._to_store:  # what it has seen, this turn too
            self._flush_store()
        if not self._search_rate.take(self._now) or not store.search(
            query, functools.partial(self._found, conn, query)
        ):
            self._tell(conn, "Not searched: the server is busy searching; try again in a moment")
            return
        conn.searching = True
        conn.account.searches += 1

    def _found(self, conn: Connection, query: str, result: Any) -> None:
        conn.searching = False
        conn.account.searches -= 1
        if conn.state != CHATTING:
            return
        shown = _quoted(query)
        if isinstance(result, SearchTooSlow):
            self._tell(
                conn,
                "Not searched: that search takes too long; try fewer words, or longer ones",
            )
            return
        if isinstance(result, BaseException):
            self._tell(conn, "Not searched: the history cannot be read now (%s)" % result)
            return
        if not result:
            self._tell(conn, "No messages match %s" % shown)
            return
        # The newest that fit in a quarter of a queue: a reader is never cut for asking.
        room = self.max_queue // 4
        frames: list[bytes] = []
        for frame in reversed(result):
            if frames and len(frame) > room:
                break
            room -= len(frame)
            frames.append(frame)
        frames.reverse()
        begin = "--- %s matching %s, oldest first ---" % (plural(len(frames), "message"), shown)
        helds = [Held(encode_frame(begin.encode("utf-8")))]
        helds.extend(Held(frame) for frame in frames)
        helds.append(Held(encode_frame(SEARCH_END.encode("utf-8"))))
        self._queue(conn, helds)

    # -- the store ---------------------------------------------------------

    def _flush_store(self) -> None:
        buffers, self._to_store = self._to_store, []
        assert self.store is not None
        if not self.store.write(buffers) and self._now - self._store_behind_at >= STORE_RETRY:
            self._store_behind_at = self._now
            log("the store is not keeping up: messages not stored (they are kept in memory)")

    def _on_store(self, mask: int) -> None:
        store = self.store
        assert store is not None
        try:
            store.wakeup[0].recv(65536)
        except OSError:
            pass
        while store.inbox:
            kind, value = store.inbox.popleft()
            if kind == "done":
                done, result = value
                done(result)
            elif kind == "down":
                store.failure = value
                log(
                    "the store %s failed (%s): the history is kept in memory only; "
                    "tried again every %g s" % (store.path, value, STORE_RETRY)
                )
                self._tell_ops(self._store_failed_text(value))
            elif kind == "up":
                store.failure = None
                lost = " (%s not stored meanwhile)" % plural(value, "message") if value else ""
                log("the store %s works again%s" % (store.path, lost))
                self._tell_ops("The store works again%s" % lost)

    def _store_failed_text(self, why: str) -> str:
        return (
            "The history cannot be stored (%s): it is kept in memory only, and the chat "
            "goes on" % why
        )

    def _tell_ops(self, text: str) -> None:
        for conn in self.users.values():
            if conn.op:
                self._tell(conn, text)

    # -- bans --------------------------------------------------------------

    @property
    def _bans_last(self) -> bool:
        """Whether a ban without an end outlives a restart (it is stored)."""
        return self.store is not None

    def _ban_for(self, host: str) -> Ban | None:
        address = _ip_address(host)
        if address is None:
            return None
        now = time.time()
        for ban in self.bans.values():
            if ban.covers(address) and not ban.ended(now):
                return ban
        return None

    # Hooks for a room shared with other servers.

    def _control(self, verb: str, *args: str) -> None:
        """Tell the room's other servers of a topic, ban or kick (SharedChatServer)."""

    def _opped(self, conn: Connection) -> None:
        """conn became an operator."""

    COMMANDS: ClassVar[dict[str, Callable[[ChatServer, Connection, str], None]]] = {
        "/help": _cmd_help,
        "/who": _cmd_who,
        "/msg": _cmd_msg,
        "/nick": _cmd_nick,
        "/me": _cmd_me,
        "/topic": _cmd_topic,
        "/search": _cmd_search,
        "/op": _cmd_op,
        "/kick": _cmd_kick,
        "/ban": _cmd_ban,
        "/unban": _cmd_unban,
        "/bans": _cmd_bans,
    }

    def _replay_history(self, conn: Connection) -> None:
        helds = self.history.replay()
        if helds:
            self._queue(conn, helds)

    # -- writing ----------------------------------------------------------

    def _tell(self, conn: Connection, text: str) -> None:
        self._queue(conn, (Held(encode_frame(text.encode("utf-8"))),))

    def _queue(self, conn: Connection, helds: Sequence[Held]) -> None:
        """Queue output for one connection: the one way to it besides _broadcast.

        Past --max-queue the queue is offered to the socket at once, and the
        connection cut if it is still past it (one message, however large, may
        always wait alone): no reply it asks for can pile up, and a reader
        that keeps up is never cut for what one turn brought.
        """
        out = conn.out
        if not out and not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)
        for held in helds:
            out.push(held)
        if conn.closing:  # its last words: what it was owed is gone already
            return
        if self._over_queue(conn, len(helds)):
            if conn.tls in (TLS_NONE, TLS_ON):
                self._send(conn)  # a reader that keeps up takes it now
            if conn.state < CLOSING and self._over_queue(conn, len(helds)):
                self._drop_slow_reader(conn)
        elif out.account.over():
            self._over.add(out.account)
        if self.memory.over():
            self._over.add(self.memory)

    _deliver = _queue  # a message from another user: the same limits

    def _over_queue(self, conn: Connection, last: int) -> bool:
        """Past --max-queue with more than the ``last`` buffers queued (one
        message, however large, may always wait alone)."""
        return conn.out.size > self.max_queue and len(conn.out) > last

    def _broadcast(
        self,
        helds: Sequence[Held],
        sender: Connection | None = None,
        skip: set[Connection] | None = None,
    ) -> None:
        """Queue the same buffers for every user but the sender: encoded once, shared."""
        if self._joined and self._now >= self._notices_due:
            self._announce()  # in a small room, whoever joined is announced before they speak
        size = 0
        for held in helds:
            size += held.size
        dirty = self._dirty
        limit = self.max_queue
        over = self._over
        single = helds[0] if len(helds) == 1 else None
        count = 0
        for conn in self.users.values():
            if conn is sender or (skip is not None and conn in skip):
                continue
            count += 1
            out = conn.out
            entries = out.entries
            if not entries and not conn.dirty:
                conn.dirty = True
                dirty.append(conn)
            if single is not None:
                entries.append(single)
            else:
                entries.extend(helds)
            out.size += size
            account = out.account
            account.held += size
            # One message, however large, may always wait alone in the queue.
            if out.size > limit and len(entries) > len(helds):
                self._overflowed.append(conn)
            if 0 < account.limit < account.held:
                over.add(account)
        if count:  # what OutputQueue.push() does, once for all of them
            memory = self.memory
            for held in helds:
                if not held.refs:
                    memory.held += held.size
                held.refs += count
            if memory.over():
                over.add(memory)

    def _send(self, conn: Connection) -> None:
        """Send as much queued output as the socket takes now, without blocking."""
        out = conn.out
        sock = conn.sock
        while out.entries:
            try:
                if conn.tls:
                    sent = self._send_tls(conn)
                elif _HAVE_SENDMSG:
                    # Many queued frames, one system call.
                    sent = sock.sendmsg(out.buffers(IOV_MAX))
                else:
                    sent = sock.send(out.buffers(1)[0])
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                self._lost(conn, "connection error: %s" % _reason(exc))
                return
            if out.advance(sent):
                break  # the socket took part of a buffer: it is full
        if out.entries:
            if not conn.writing:
                conn.writing = True
                self.selector.modify(
                    sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn.handler
                )
        else:
            if conn.writing:
                conn.writing = False
                self.selector.modify(sock, selectors.EVENT_READ, conn.handler)
            if conn.closing:
                self._finish_closing(conn)

    def _send_tls(self, conn: Connection) -> int:
        # SSL sockets have no sendmsg(): join the head of the queue into one
        # chunk. A write that must wait has to be repeated with the very same
        # bytes, so the chunk is kept until it has gone.
        chunk = conn.tls_chunk
        if chunk is None:
            # Small buffers are joined into a copy of at most TLS_JOIN bytes
            # (what a write may hold on to, uncharged); a large one goes alone.
            parts: list[Buffer] = []
            size = 0
            for buffer in conn.out.buffers(IOV_MAX):
                if parts and size + len(buffer) > TLS_JOIN:
                    break
                parts.append(buffer)
                size += len(buffer)
            chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        conn.tls_chunk = chunk
        sent: int = conn.sock.send(chunk)
        conn.tls_chunk = None
        return sent

    # -- the end of each turn ---------------------------------------------

    def _end_of_turn(self) -> None:
        if self._notices_owed():
            self._announce()
        if self._dirty:
            # Optimistic sending: most sockets take everything at once, and
            # EVENT_WRITE is asked for only by those that did not.
            dirty, self._dirty = self._dirty, []
            for conn in dirty:
                conn.dirty = False
                if conn.state != CLOSED:
                    self._send(conn)
        if self._to_store:  # once the readers have theirs
            self._flush_store()
        if self._overflowed:  # past --max-queue in a broadcast: cut if still so
            overflowed, self._overflowed = self._overflowed, []
            for conn in overflowed:
                if not conn.closing and self._over_queue(conn, 1):
                    self._drop_slow_reader(conn)
        if self._over:
            self._enforce_budgets()
        if _log_held:
            flush_log()
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
            self._housekeeping(now)

    def _enforce_budgets(self) -> None:
        """Bring every budget that went past its limit back under it.

        Checked once the turn's output was offered to the sockets, so what
        counts is what stays queued: a reader that keeps up holds nothing.
        The connection holding the most is cut, again until the budget holds.
        """
        over, self._over = self._over, set()
        memory = self.memory
        for budget in sorted(over, key=lambda b: b is memory):  # addresses first
            if not budget.over():
                continue
            if budget is memory:
                pool: Any = self.connections
                excess = memory.held - memory.limit
                why = "the server is short of memory (limit %d bytes), and you held the most"
            else:
                assert isinstance(budget, Account)
                # Its figure counts a buffer once per queue: what is real?
                excess = self._address_holds(budget) - budget.limit
                pool = budget.conns
                why = "your address holds too much (limit %d bytes), and you held the most"
            holders = sorted(
                ((self._frees(c), c) for c in pool if not c.closing), key=lambda pair: -pair[0]
            )
            for frees, victim in holders:
                if excess <= 0 or not frees:
                    break
                log(
                    "%s holds %d bytes, the most: cut (%s over its %d bytes)"
                    % (
                        victim.name,
                        frees,
                        "the server" if budget is memory else "its address",
                        budget.limit,
                    )
                )
                self._cut(victim, why % budget.limit, "over a memory budget")
                if victim.state != CLOSED:
                    self._send(victim)
                excess -= frees

    def _announce(self) -> None:
        """Tell every user who joined and left since the last notices, each with
        the number online now.

        Users who were already here hear of every newcomer still present and of
        every user of theirs who left. A newcomer's welcome counted everyone
        before it, so it hears only of those who came after it and of those it
        counted who left since: whatever a turn brings, each user's latest count
        is the number online, and nobody present goes unannounced to anyone who
        was here first.
        """
        joined, self._joined = self._joined, {}
        left, self._left = self._left, []
        online = self._online()
        limit = NOTICE_NAMES if online <= NOTICE_ROOM else NOTICE_NAMES_LARGE
        present = [c for c in joined if not c.closing and self.users.get(c.nick_key) is c]

        def joined_after(place: int) -> str:  # the newcomers after present[place]
            first = present[place + 1 : place + 2 + limit]
            names = _names([c.nick or "" for c in first], len(present) - place - 1, limit)
            return "%s joined the chat (%d online)" % (names, online)

        newcomers = set(present)
        if present:
            self._notice(joined_after(-1), skip=newcomers)
        gone = [nick for nick, _, own in left if own < 0]
        if gone:
            self._notice(
                "%s left the chat (%d online)" % (_names(gone, 0, limit), online), skip=newcomers
            )
        # Leaves in order of the joins before them: a newcomer missed those after it.
        after = [at for _, at, _ in left]
        for place, conn in enumerate(present):
            if place + 1 < len(present):
                self._tell_room(conn, joined_after(place))
            index = joined[conn]
            missed = [
                nick for nick, _, own in left[bisect.bisect_right(after, index) :] if own < index
            ]
            if missed:
                self._tell_room(
                    conn, "%s left the chat (%d online)" % (_names(missed, 0, limit), online)
                )

    def _gather(self) -> None:
        """A join or leave is about to be gathered: the first of a batch sets when
        the batch is told (at once in a small room, later in a large one)."""
        if not self._joined and not self._left:
            online = self._online()
            window = (
                0.0
                if online <= NOTICE_ROOM
                else min(NOTICE_WINDOW_MAX, online / NOTICE_USERS_PER_SECOND)
            )
            self._notices_due = self._now + window

    def _notices_owed(self) -> bool:
        """Whether the gathered joins and leaves are to be told now."""
        return bool(self._joined or self._left) and self._now >= self._notices_due

    def _notice(
        self, text: str, sender: Connection | None = None, skip: set[Connection] | None = None
    ) -> None:
        """A service message about the room (joins, leaves, renames) for its users."""
        self._broadcast((Held(encode_frame(text.encode("utf-8"))),), sender, skip)

    def _tell_room(self, conn: Connection, text: str) -> None:
        """A notice about the room for one user alone, counted like the others."""
        self._deliver(conn, (Held(encode_frame(text.encode("utf-8"))),))

    def _online(self) -> int:
        return len(self.users)

    def _housekeeping(self, now: float) -> None:
        timeout = self.config.frame_timeout
        if timeout:
            # No progress for the timeout, or slower on the whole than
            # MIN_FRAME_RATE: a frame trickled a byte at a time is no frame.
            for conn in [
                c
                for c in self._unfinished
                if now - c.input_since >= timeout
                or now - c.input_started >= timeout + c.input_held / MIN_FRAME_RATE
            ]:
                self._stalled(conn, timeout)
        if now >= self._next_forget:
            self._next_forget = now + FORGET_INTERVAL
            self._forget(now)
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            if self.listener is not None:
                self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        for conn in [c for c in self._waiting if now >= c.deadline]:
            if conn.closing or conn.tls in (TLS_PEEK, TLS_HANDSHAKE):  # nothing to say to it
                if not conn.closing:
                    log("%s disconnected: handshake timeout" % conn.address)
                self._destroy(conn)
            else:
                self._waiting.discard(conn)
                timeout = self.config.handshake_timeout
                self._reject(
                    conn,
                    "No %s received within %g second%s"
                    % (
                        "password" if conn.state == PASSWORD else "nickname",
                        timeout,
                        "" if timeout == 1 else "s",
                    ),
                    "handshake timeout",
                )

    def _stalled(self, conn: Connection, timeout: float) -> None:
        """Drop the frame conn stopped sending ``timeout`` seconds ago, and free it.

        The rest of it, if it ever comes, is skipped. A header that never
        came whole leaves nothing to skip by: that connection is closed.
        """
        waited = "%g second%s" % (timeout, "" if timeout == 1 else "s")
        trickled = self._now - conn.input_since < timeout  # it moves, but too slowly
        if conn.large is not None:
            conn.skip = len(conn.large) - conn.large_got
            self._drop_large(conn)
        elif len(conn.tail) >= HEADER_SIZE:
            conn.skip = HEADER_SIZE + parse_header(bytes(conn.tail[:HEADER_SIZE])) - len(conn.tail)
            conn.tail = bytearray()
            self._hold_input(conn, 0)
        elif not conn.tail or conn.state == CLAIMING:  # input held during a claim
            return
        else:
            self._reject(
                conn,
                "Disconnected: a frame header stopped arriving for %s" % waited,
                "unfinished frame header for %s" % waited,
            )
            return
        if trickled:
            log("%s: unfinished message dropped, arriving too slowly" % conn.name)
            self._tell(conn, "Not sent: your message arrived too slowly and was dropped")
            return
        log("%s: unfinished message dropped after %s" % (conn.name, waited))
        self._tell(conn, "Not sent: your message stopped arriving for %s and was dropped" % waited)

    def _log_refused(self, account: Account) -> None:
        for lockout, what in ((account.password, "password"), (account.ops, "operator password")):
            if lockout.refused:
                log(
                    "%s: %s refused unchecked while the address was locked out"
                    % (account.host, plural(lockout.refused, what))
                )
                lockout.refused = 0

    def _forget(self, now: float) -> None:
        """Forget the accounts and users' rates that nothing needs any more,
        and the bans that ended."""
        if self.bans:
            wall = time.time()
            for ban in list(self.bans.values()):
                if ban.refused > 1:
                    log(
                        "refused %s more from %s: banned"
                        % (plural(ban.refused - 1, "connection"), ban.shown())
                    )
                ban.refused = 0
                if ban.ended(wall):
                    del self.bans[ban.key]
                    log("the ban on %s ended" % ban.shown())
        for host in [h for h, a in self.accounts.items() if a.forgettable(now)]:
            self._log_refused(self.accounts.pop(host))
        for key in [
            k
            for k, (m, b) in self.user_rates.items()
            if k not in self.users and m.full(now) and b.full(now)
        ]:
            del self.user_rates[key]

    # -- closing ----------------------------------------------------------

    def _leave_room(self, conn: Connection, why: str) -> None:
        if conn.nick is not None and self.users.get(conn.nick_key) is conn:
            self._name(conn, None)
            self._gather()
            self._left.append((conn.nick, len(self._joined), self._joined.get(conn, -1)))
        log("%s disconnected: %s" % (conn.name, why))

    def _reject(self, conn: Connection, notice: str, why: str) -> None:
        """Tell the peer why and close once that is sent ("close when done")."""
        self._leave_room(conn, why)
        self._close_when_done(conn, notice)

    def _drop_slow_reader(self, conn: Connection) -> None:
        self._cut(
            conn,
            "you were not reading and over %d bytes were waiting for you" % self.max_queue,
            "output queue over --max-queue",
        )

    def _cut(self, conn: Connection, why: str, logged: str | None = None) -> None:
        """Disconnect conn at once, freeing all it holds, because of ``why``.

        What is queued goes, but a frame already half sent is finished first,
        or the notice would land in the middle of it; and a TLS write that
        must be repeated is repeated as it was, whole.
        """
        head: Buffer | None = conn.tls_chunk
        if head is None and conn.out.sent:
            head = memoryview(conn.out.entries[0].buffer)[conn.out.sent :]
        conn.out.clear(head)
        self._reject(conn, "Disconnected: %s" % why, logged or why)

    def _close_when_done(
        self, conn: Connection, notice: str | None, grace: float = CLOSE_GRACE
    ) -> None:
        if conn.state == CLOSED:
            return
        conn.state = CLOSING
        conn.tail = bytearray()
        conn.skip = 0
        self._drop_large(conn)
        self._hold_input(conn, 0)
        conn.deadline = time.monotonic() + grace
        self._waiting.add(conn)
        self._closing[conn] = None
        if notice is not None:
            self._tell(conn, notice)
        elif not conn.out:
            self._finish_closing(conn)

    def _finish_closing(self, conn: Connection) -> None:
        # Everything owed is sent: say so with a FIN, then wait (until the
        # deadline) for the peer to close too, so that no unread input turns
        # our close into a reset that could destroy the last notice.
        if conn.eof:
            self._destroy(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._destroy(conn)

    def _peer_closed(self, conn: Connection) -> None:
        conn.eof = True
        if not conn.closing:
            why = "closed the connection"
            if conn.tail or conn.large is not None:
                why += " in the middle of a frame"
            self._leave_room(conn, why)
            self._close_when_done(conn, None)
        elif not conn.out:
            self._destroy(conn)

    def _lost(self, conn: Connection, why: str) -> None:
        if not conn.closing:
            self._leave_room(conn, why)
        self._destroy(conn)

    def _destroy(self, conn: Connection, farewell: str | None = None) -> None:
        """Close now; ``farewell`` is one last notice tried without waiting."""
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        self.connections.discard(conn)
        self._waiting.discard(conn)
        self._closing.pop(conn, None)
        conn.writing = False
        conn.account.conns.discard(conn)
        if conn.nick is not None and self.users.get(conn.nick_key) is conn:
            self._leave_room(conn, "closed")
        self._drop_large(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        if farewell is not None:
            _send_and_close(conn.sock, farewell)
        else:
            conn.sock.close()
        conn.out.clear()
        conn.tail = bytearray()
        self._hold_input(conn, 0)

    def _shutdown(self) -> None:
        """Tell everyone, deliver what is owed for up to SHUTDOWN_GRACE, close all."""
        log("shutting down: telling %s" % plural(len(self.connections), "client"))
        if self.listener is not None:
            if not self._accept_paused_until:
                self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
        for conn in list(self.connections):
            if conn.tls not in (TLS_NONE, TLS_ON):  # nothing can be said to it yet
                self._destroy(conn)
            elif not conn.closing:
                self._close_when_done(conn, SHUTDOWN_NOTICE, SHUTDOWN_GRACE)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        self._joined = {}
        self._left = []
        while self.connections:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, mask in self.selector.select(min(remaining, HOUSEKEEPING_INTERVAL)):
                key.data(mask)
            self._joined = {}
            self._left = []
            self._end_of_turn()
        unsent = sum(1 for c in self.connections if c.out)
        for conn in list(self.connections):
            self._destroy(conn)
        if self.store is not None:
            if self._to_store:
                self._flush_store()
            self.store.stop(STORE_STOP_WAIT)
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
        self.selector.close()
        log(
            "stopped%s"
            % (
                " (%s could not take everything in time)" % plural(unsent, "client")
                if unsent
                else ""
            )
        )


_HAVE_SENDMSG = hasattr(socket.socket, "sendmsg")


def _would_block() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [BlockingIOError, InterruptedError]
    try:
        import ssl

        errors += [ssl.SSLWantReadError, ssl.SSLWantWriteError]
    except ImportError:  # Python built without OpenSSL: no TLS, nothing to add
        pass
    return tuple(errors)


# What a non-blocking socket, plain or TLS, raises when it cannot go on now.
_WOULD_BLOCK = _would_block()


def _utf8_frames_end(data: bytes, start: int, stop: int) -> int:
    """Where the frames in data[start:stop] stop being UTF-8: the first bad one's start."""
    while start < stop:
        end = start + HEADER_SIZE + parse_header(data[start : start + HEADER_SIZE])
        if not _utf8_valid(data, start + HEADER_SIZE, end):
            break
        start = end
    return start


def _address_key(host: str) -> str:
    """What the limits of an address are kept by: an IPv4 address, or an IPv6
    /64 (a host can take any address of its network's /64)."""
    if ":" not in host:
        return host
    try:
        return str(ipaddress.IPv6Network((host, 64), strict=False))
    except ValueError:  # a scoped address (fe80::1%eth0) on an old Python
        return host


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"


def _amount(messages: float, nbytes: float) -> str:
    """``100 messages or 1048576 bytes``: a rate in words, leaving out what is unlimited."""
    parts = []
    if messages:
        parts.append("%g messages" % messages)
    if nbytes:
        parts.append("%d bytes" % nbytes)
    return " or ".join(parts) or "any amount"


def _who_text(keys: list[str], describe: Callable[[int], str], prefix: str) -> str:
    """The answer to /who: ``keys`` are the casefolded nicknames in order,
    ``describe(i)`` the entry of the i-th. At most WHO_NAMES are described:
    the first ones, or the first whose nickname starts with ``prefix``."""
    total = len(keys)
    if prefix:
        folded = prefix.casefold()
        start = stop = bisect.bisect_left(keys, folded)
        while stop < total and keys[stop].startswith(folded):
            stop += 1
        head = "%s online whose nickname starts with %s" % (
            plural(stop - start, "user"),
            sanitize(prefix[:MAX_NICK_LENGTH]),
        )
    else:
        start, stop = 0, total
        head = "%s online" % plural(total, "user")
    shown = range(start, min(stop, start + WHO_NAMES))
    text = "%s: %s" % (head, ", ".join(describe(i) for i in shown)) if shown else head
    if stop - start > len(shown):
        text += ", and %d more (/who NAME lists those whose nickname starts with NAME)" % (
            stop - start - len(shown)
        )
    return text


def _names(names: list[str], total: int = 0, limit: int = NOTICE_NAMES) -> str:
    """``a, b and c``; past ``limit`` of ``total`` (default: all of ``names``),
    the first ones and how many others."""
    total = max(total, len(names))
    if total > limit:
        return "%s and %d others" % (", ".join(names[:limit]), total - limit)
    if len(names) == 1:
        return names[0]
    return "%s and %s" % (", ".join(names[:-1]), names[-1])


def _send_and_close(sock: socket.socket, text: str) -> None:
    try:
        sock.setblocking(False)
        sock.send(encode_frame(text.encode("utf-8")))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


def _open_spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


def _raise_file_limit() -> None:
    """Allow as many open sockets as the system lets this process have."""
    try:
        import resource
    except ImportError:  # Windows
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft == resource.RLIM_INFINITY or soft >= hard:
            return
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


# ---------------------------------------------------------------------------
# Running a room: operators' bans, and the history on disk (--store)
# ---------------------------------------------------------------------------

DEFAULT_KEEP_DAYS = 30.0
# /search answers with at most this many messages, the last ones, oldest first;
# it costs this many messages of the asker's rate, and one search per user runs at once.
SEARCH_RESULTS = 20
SEARCH_COST = 10
MAX_SEARCHES = 16  # searches waiting for the store, all users together
# Searches a second, all users together (a scan of 200,000 messages takes
# 0.1 s of a core): the rest are told the server is busy.
SEARCH_RATE = 10.0
SEARCH_BURST = 20
# Full-text search indexes the first this many characters of a message; the
# substring scan (short words, or an SQLite without FTS5's trigram tokenizer)
# looks at that many too, in at most the last SEARCH_SCAN messages.
SEARCH_INDEXED = 4000
SEARCH_SCAN = 200_000
MAX_TOPIC = 400  # characters of a topic, or of the reason for a kick or a ban
MAX_SEARCH = 400  # characters of a /search that are looked for
SEARCH_TERMS = 8  # words (or phrases) of a /search that are looked for
SEARCH_TIME = 1.0  # seconds of the search thread one search may take
SEARCHES_PER_ADDRESS = 2  # searches of one address running or waiting at once
SEARCH_END = "--- end of search results ---"
OP_COST = 10  # /op, /kick, /ban are told to many, or checked like passwords
# Messages waiting to be written; past it a turn's messages are not stored (and logged).
STORE_MAX_BACKLOG = 16 << 20
STORE_RETRY = 10.0  # seconds between attempts at a store that failed
STORE_PRUNE_INTERVAL = 3600.0  # messages older than --keep are deleted this often
STORE_BUSY_TIMEOUT = 2.0  # a locked database is waited for this long, by the writer only
STORE_STOP_WAIT = 0.5  # at shutdown, for the last messages to be written
STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,        -- when the server relayed them (Unix time)
    frames BLOB NOT NULL     -- one turn's chat frames end to end, exactly as relayed
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,  -- the order they were relayed in
    at REAL NOT NULL,        -- when the server relayed it (Unix time; --keep counts from it)
    stamp TEXT NOT NULL,     -- the time the sender's client wrote, as sent
    nick TEXT NOT NULL,      -- the nick field as relayed: "alice", or "* alice" for an action
    text TEXT NOT NULL,
    frame BLOB NOT NULL      -- the frame exactly as relayed, replayed after a restart
);
CREATE INDEX IF NOT EXISTS messages_at ON messages (at);
CREATE TABLE IF NOT EXISTS topic (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    text TEXT NOT NULL,
    nick TEXT NOT NULL,      -- who set it
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bans (
    network TEXT PRIMARY KEY,  -- "203.0.113.7/32", "2001:db8::/64"
    until REAL,                -- Unix time; NULL: for ever
    nick TEXT NOT NULL,        -- who was online from it when it was banned, if anyone
    by TEXT NOT NULL,          -- the operator
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""
# The full-text index covers the messages up to meta's "indexed" id: it is
# brought up to date when the writer has had nothing to write for
# STORE_INDEX_IDLE, STORE_INDEX_CHUNK messages at a time (indexing costs ten
# times what storing does); a search scans the messages past it.
STORE_FTS = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
INSERT OR IGNORE INTO meta (key, value) VALUES ('indexed', 0);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5 (
    text, content='messages', content_rowid='id', tokenize='trigram'
);
CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages
WHEN old.id <= (SELECT value FROM meta WHERE key = 'indexed') BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text)
    VALUES ('delete', old.id, substr(old.text, 1, %d));
END;
"""
    % SEARCH_INDEXED
)
# While messages come, the writer stores the frames of the turns handed over
# since its last commit as one row of "turns", at most every
# STORE_COMMIT_INTERVAL: a row a message would cost the loop's core more than
# relaying it to a hundred readers, and every row is a handover of the GIL.
# Once it has had nothing to write for STORE_INDEX_IDLE, it splits them into
# "messages", about STORE_SPLIT_CHUNK at a time, then indexes those.
STORE_COMMIT_INTERVAL = 0.05
# In a room that is never quiet, a chunk of each this often: rarely, for a
# chunk holds the GIL in bits for some 20 ms, which a paced reader's p99 feels.
STORE_TIDY_EVERY = 10.0
STORE_INDEX_IDLE = 0.1
STORE_SPLIT_CHUNK = 5000
STORE_INDEX_CHUNK = 1000


class StoreError(Exception):
    """The store cannot be opened at all (a path that cannot be)."""


class SearchTooSlow(Exception):
    """A search that took more than SEARCH_TIME."""


class Ban:
    """An address (or network) refused until ``until`` (Unix time; None: no end)."""

    __slots__ = ("at", "by", "network", "nick", "reason", "refused", "until")

    def __init__(
        self,
        network: Any,
        until: float | None,
        by: str,
        reason: str = "",
        nick: str = "",
        at: float = 0.0,
    ) -> None:
        self.network = network  # an ipaddress.IPv4Network or IPv6Network
        self.until = until
        self.by = by
        self.reason = reason
        self.nick = nick
        self.at = at or time.time()
        self.refused = 0  # connections refused and not yet logged

    @property
    def key(self) -> str:
        return str(self.network)

    def covers(self, address: Any) -> bool:
        return address.version == self.network.version and address in self.network

    def ended(self, now: float) -> bool:
        return self.until is not None and now >= self.until

    def shown(self) -> str:
        return shown_network(self.network)

    def end_text(self, persistent: bool) -> str:
        if self.until is None:
            return "for ever" if persistent else "until the server restarts"
        return "until %s" % _utc_time(self.until)

    def notice(self, persistent: bool) -> str:
        """What a banned address is told."""
        return "You are banned from this server %s (by %s)%s" % (
            self.end_text(persistent),
            self.by,
            ": " + self.reason if self.reason else "",
        )


def _ip_address(host: str) -> Any:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _float(text: str) -> float:
    """A number from a store or another server; 0 when it is none."""
    try:
        value = float(text)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def _nobody(nick: str) -> str:
    return "Nobody called %s is online (/who lists who is)" % sanitize(nick[:MAX_NICK_LENGTH])


def shown_network(network: Any) -> str:
    """``203.0.113.7`` for one address, else the network (``2001:db8::/64``)."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _quoted(query: str) -> str:
    """A search as it is shown back: in quotes, unless it has its own."""
    shown = sanitize(query)
    return shown if '"' in shown else '"%s"' % shown


def _utc_time(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)\Z")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float | None:
    """Seconds in ``90``, ``90s``, ``10m``, ``2h``, ``7d``, ``1w``; None if it is none."""
    match = _DURATION.match(text.lower())
    if not match:
        return None
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return seconds if 0 < seconds < 100 * 365 * 86400 else None


def parse_network(text: str) -> Any:
    """The network an operator named (``203.0.113.7``, ``198.51.100.0/24``,
    ``2001:db8::1`` (its /64, as limits count it), ``2001:db8::/48``); None if none."""
    text = text.strip("[]")
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False)
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and getattr(address, "ipv4_mapped", None) is None:
        return ipaddress.ip_network((address, 64), strict=False)
    mapped = getattr(address, "ipv4_mapped", None)
    return ipaddress.ip_network(mapped or address)


def host_network(host: str) -> Any:
    """The network a connected host is banned by: its IPv4 address or its IPv6 /64."""
    return parse_network(host)


def search_terms(query: str) -> list[str]:
    """The words and "quoted phrases" of a /search, in lower case, each once, at
    most SEARCH_TERMS of them (each costs a pass over every message scanned).

    Lower case, not casefold(): the full-text index folds case one letter at a
    time as lower() does (so "ß" and "ss" differ), and every way a search
    goes must find the same messages."""
    terms: list[str] = []
    for phrase, word in re.findall(r'"([^"]*)"?|([^\s"]+)', query):
        term = (phrase or word).strip().lower()
        if term and term not in terms:
            terms.append(term)
    return terms[:SEARCH_TERMS]


def _fts_phrase(term: str) -> str:
    return '"%s"' % term.replace('"', '""')


def unpack_stored(frame: bytes) -> tuple[str, str, str] | None:
    """(stamp, nick field, text) of a relayed chat frame; None if it is not one."""
    payload = frame[HEADER_SIZE:]
    parts = payload.split(b"\0", 2)
    if len(parts) != 3:
        return None
    try:
        stamp, nick, text = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        return None
    return stamp, nick, text


class Store:
    """The room's history, topic and bans in an SQLite database (--store).

    The selector loop never waits on the disk: it hands each turn's messages
    to a writer thread, which writes them in one transaction (WAL mode), and
    /search runs in a thread of its own, on a connection of its own. Results
    and failures come back through ``inbox`` and a byte on a socket pair that
    the loop watches, as with Redis. A store that fails (disk full, database
    locked, read-only or corrupt) costs one log line and a notice to the
    operators; the writer tries again every STORE_RETRY seconds, and what
    came meanwhile is kept in memory only.
    """

    def __init__(self, path: str, keep_days: float = DEFAULT_KEEP_DAYS) -> None:
        self.path = path
        self.keep = keep_days * 86400.0
        self.fts = False  # FTS5 with the trigram tokenizer
        self.failure: str | None = None  # why it does not work now, as last told
        self.inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self.wakeup = socket.socketpair()
        for sock in self.wakeup:
            sock.setblocking(False)
        self._writes: list[tuple[float, bytes]] = []
        self._jobs: list[Callable[[Any], None]] = []
        self._searches: collections.deque[tuple[Callable[[Any], Any], Callable[[Any], None]]]
        self._searches = collections.deque()
        self._backlog = 0
        # Writes handed to the writer and done with (written or given up): a
        # search waits for those handed over before it, so that it finds
        # every message its asker has seen.
        self._handed = 0
        self._done = 0
        self._written = threading.Condition()
        self._ready = threading.Condition()
        self._search_ready = threading.Condition()
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._db: Any = None  # the writer's connection
        self._prepared = False
        self.indexed = 0  # the last message id in the full-text index
        self._unindexed = False  # messages past it (the writer indexes them when idle)
        self._unsplit = False  # turns not split into messages yet (the same)
        self._pause = threading.Event()  # set when stopping: no more waiting between commits
        self._tidied = 0.0  # when the writer last split or indexed
        self._failing = False
        self._retry_at = 0.0
        self._next_prune = 0.0
        self.dropped = 0  # messages not stored since the last log line

    # -- in the main thread, before the loop -------------------------------

    def open(self, history: int) -> tuple[list[bytes], tuple[str, str, float] | None, list[Ban]]:
        """Open (or create) the database; return the last ``history`` messages
        within --keep, the topic and the bans that have not ended.

        Raises StoreError when the path cannot be opened at all. A database
        that is there but cannot be written (read-only, locked, corrupt, disk
        full) is used as far as it can be: the failure is logged and the
        writer tries again later.
        """
        try:
            import sqlite3
        except ImportError:  # a Python built without it
            raise StoreError("this Python has no sqlite3 module") from None

        try:
            # The history is the room's: readable by the server's user alone
            # (SQLite gives its -wal and -shm files the same mode).
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(_reason(exc)) from None
        try:
            self._db = self._connect(STORE_BUSY_TIMEOUT / 2)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None
        frames: list[bytes] = []
        topic = None
        bans: list[Ban] = []
        try:
            self._prepare(self._db)
            while self._unsplit:  # what the last run had no quiet moment for
                self._split()
        except sqlite3.Error as exc:
            self._rollback()
            self._fail(exc)
        try:
            db = self._db
            if history:
                rows = db.execute(
                    "SELECT frame FROM messages WHERE at >= ? ORDER BY id DESC LIMIT ?",
                    (self._oldest(), history),
                ).fetchall()
                frames = [bytes(row[0]) for row in reversed(rows)]
                frames += self._unsplit_frames(db, history)
                frames = frames[-history:]
            row = db.execute("SELECT text, nick, at FROM topic WHERE id = 1").fetchone()
            if row is not None:
                topic = (str(row[0]), str(row[1]), float(row[2]))
            now = time.time()
            for network, until, nick, by, reason, at in db.execute(
                "SELECT network, until, nick, by, reason, at FROM bans"
            ):
                parsed = parse_network(str(network))
                if parsed is not None and (until is None or until > now):
                    bans.append(Ban(parsed, until, str(by), str(reason), str(nick), float(at)))
        except sqlite3.Error as exc:  # corrupt, or no tables (not prepared)
            if not self._failing:
                self._fail(exc)
        return frames, topic, bans

    def _connect(self, timeout: float) -> Any:
        import sqlite3

        db = sqlite3.connect(
            self.path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        db.create_function("fold", 1, _fold, deterministic=True)
        return db

    def _prepare(self, db: Any) -> None:
        """WAL mode and the tables: once per writer connection."""
        import sqlite3

        if self._prepared:
            return
        # Large pages: a turn's frames are one row, written in few pages (a
        # database that exists keeps its own page size).
        db.execute("PRAGMA page_size = 65536")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA wal_autocheckpoint = 64")  # 4 MiB, as with SQLite's default pages
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(STORE_SCHEMA)
        try:
            db.executescript(STORE_FTS)
            self.fts = True
            self._note_indexed(db)
        except sqlite3.OperationalError as exc:  # no FTS5, or no trigram: a scan it is
            if "no such" not in str(exc) and "tokenizer" not in str(exc):
                raise
            self.fts = False
        db.execute("PRAGMA user_version = 1")
        self._unsplit = db.execute("SELECT EXISTS (SELECT 1 FROM turns)").fetchone()[0] == 1
        self._prepared = True
        self._prune(db)

    def start(self) -> None:
        for target, name in ((self._write_loop, "store-writer"), (self._search_loop, "search")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float) -> None:
        """Write what is waiting (for ``timeout`` at most), then stop."""
        self._pause.set()
        with self._ready:
            self._stopped = True
            self._ready.notify()
        with self._search_ready:
            self._search_ready.notify()
        for thread in self._threads[:1]:
            thread.join(timeout)
        for sock in self.wakeup:
            sock.close()

    # -- in the loop ---------------------------------------------------------

    def write(self, buffers: Sequence[Buffer]) -> bool:
        """Store a turn's chat frames; False when the writer is too far behind
        to take them (they are not even copied then)."""
        size = sum(len(buffer) for buffer in buffers)
        with self._ready:
            if self._backlog + size > STORE_MAX_BACKLOG:
                return False
            self._backlog += size
            self._writes.append((time.time(), b"".join(buffers)))
            self._handed += 1
            self._ready.notify()
        return True

    def job(self, job: Callable[[Any], None]) -> None:
        """Run ``job(db)`` in the writer's next transaction (topic, bans)."""
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()

    def search(self, query: str, done: Callable[[Any], None]) -> bool:
        """Look for ``query`` off the loop; ``done(frames or exception)`` then runs in it."""
        with self._search_ready:
            if len(self._searches) >= MAX_SEARCHES:
                return False
            job = functools.partial(self._find, query, self._handed)
            self._searches.append((job, done))
            self._search_ready.notify()
        return True

    # -- the writer thread -------------------------------------------------

    def _post(self, kind: str, value: Any) -> None:
        self.inbox.append((kind, value))
        try:
            self.wakeup[1].send(b"\0")
        except OSError:  # full: the loop is being woken already (or is gone)
            pass

    def _fail(self, exc: BaseException) -> None:
        self._failing = True
        self._retry_at = time.monotonic() + STORE_RETRY
        self._post("down", str(exc) or exc.__class__.__name__)

    def _write_loop(self) -> None:
        import sqlite3

        jobs: list[Callable[[Any], None]] = []  # topic and bans not written yet
        while True:
            index = False
            with self._ready:
                while not self._writes and not self._jobs and not self._stopped:
                    if jobs and time.monotonic() >= self._retry_at:
                        break
                    if (self._unsplit or self._unindexed) and not self._failing:
                        if not self._ready.wait(STORE_INDEX_IDLE):
                            index = True  # quiet: split and index what came
                            break
                    else:
                        self._ready.wait(STORE_RETRY if jobs else None)
                writes, self._writes = self._writes, []
                jobs.extend(self._jobs)
                self._jobs = []
                self._backlog = 0
                stopping = self._stopped
            if self._failing and time.monotonic() < self._retry_at and not stopping:
                # Not tried again yet: these are kept in memory only.
                self.dropped += sum(len(_frame_spans(blob)) for _, blob in writes)
            elif writes or jobs or index:
                try:
                    if index and not writes and not jobs:
                        self._tidied = time.monotonic()
                        self._split() if self._unsplit else self._index()
                    else:
                        self._commit(writes, jobs)
                except sqlite3.Error as exc:
                    self._rollback()
                    self.dropped += sum(len(_frame_spans(blob)) for _, blob in writes)
                    if self._failing:
                        self._retry_at = time.monotonic() + STORE_RETRY
                    else:
                        self._fail(exc)
                else:
                    jobs = []
                    if self._failing:
                        self._failing = False
                        self._post("up", self.dropped)
                        self.dropped = 0
            with self._written:
                self._done += len(writes)
                self._written.notify_all()
            if stopping:
                self._close()
                return
            if writes:  # what comes meanwhile is written together
                if time.monotonic() - self._tidied >= STORE_TIDY_EVERY:
                    self._tidy()  # a room that is never quiet gets its share too
                self._pause.wait(STORE_COMMIT_INTERVAL)

    def _commit(self, writes: list[tuple[float, bytes]], jobs: list[Callable[[Any], None]]) -> None:
        import sqlite3

        db = self._db
        if db is None:
            db = self._db = self._connect(STORE_BUSY_TIMEOUT)
        self._prepare(db)
        db.execute("BEGIN IMMEDIATE")
        if writes:  # one row: each row costs the loop a handover of the GIL
            frames = writes[0][1] if len(writes) == 1 else b"".join(blob for _, blob in writes)
            db.execute("INSERT INTO turns (at, frames) VALUES (?, ?)", (writes[0][0], frames))
        for job in jobs:
            job(db)
        db.execute("COMMIT")
        if writes:
            self._unsplit = True
        if time.monotonic() >= self._next_prune:
            try:
                self._prune(db)
            except sqlite3.Error:  # tried again in an hour; what was written stays written
                self._rollback()

    def _tidy(self) -> None:
        """One chunk of splitting and one of indexing, between commits."""
        import sqlite3

        self._tidied = time.monotonic()
        try:
            if self._unsplit:
                self._split()
            if self._unindexed:
                self._index()
        except sqlite3.Error:  # the next commit says what is wrong, if anything is
            self._rollback()

    def _split(self) -> None:
        """Split the next turns, STORE_SPLIT_CHUNK messages or so, into messages."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        rows: list[tuple[float, str, str, str, bytes]] = []
        last = None
        for turn, at, blob in db.execute("SELECT id, at, frames FROM turns ORDER BY id"):
            blob = bytes(blob)
            for start, stop in _frame_spans(blob):
                frame = blob[start:stop]
                parts = unpack_stored(frame)
                if parts is not None:
                    rows.append((at, parts[0], parts[1], parts[2], frame))
            last = turn
            if len(rows) >= STORE_SPLIT_CHUNK:
                break
        if rows:
            db.executemany(
                "INSERT INTO messages (at, stamp, nick, text, frame) VALUES (?, ?, ?, ?, ?)", rows
            )
        if last is not None:
            db.execute("DELETE FROM turns WHERE id <= ?", (last,))
        db.execute("COMMIT")
        self._unsplit = db.execute("SELECT EXISTS (SELECT 1 FROM turns)").fetchone()[0] == 1
        if rows and self.fts:
            self._unindexed = True

    def _unsplit_frames(self, db: Any, limit: int) -> list[bytes]:
        """The last ``limit`` frames within --keep of the turns not split yet
        (STORE_MAX_BACKLOG bytes of them at most), in order."""
        if not limit:
            return []
        newest: list[bytes] = []
        size = 0
        for (blob,) in db.execute(
            "SELECT frames FROM turns WHERE at >= ? ORDER BY id DESC", (self._oldest(),)
        ):
            blob = bytes(blob)
            newest.extend(blob[start:stop] for start, stop in reversed(_frame_spans(blob)))
            size += len(blob)
            if len(newest) >= limit or size >= STORE_MAX_BACKLOG:
                break
        return newest[:limit][::-1]

    def _note_indexed(self, db: Any) -> None:
        row = db.execute("SELECT value FROM meta WHERE key = 'indexed'").fetchone()
        self.indexed = int(row[0]) if row else 0
        last = db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
        self._unindexed = last > self.indexed

    def _index(self) -> None:
        """Add the next STORE_INDEX_CHUNK messages to the full-text index."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        start = self.indexed
        db.execute(
            "INSERT INTO messages_fts (rowid, text) SELECT id, substr(text, 1, ?) "
            "FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            (SEARCH_INDEXED, start, STORE_INDEX_CHUNK),
        )
        db.execute(
            "UPDATE meta SET value = (SELECT coalesce(max(id), ?) FROM "
            "(SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT ?)) WHERE key = 'indexed'",
            (start, start, STORE_INDEX_CHUNK),
        )
        db.execute("COMMIT")
        self._note_indexed(db)

    def _prune(self, db: Any) -> None:
        self._next_prune = time.monotonic() + STORE_PRUNE_INTERVAL
        if self.keep:
            db.execute("DELETE FROM turns WHERE at < ?", (self._oldest(),))
            db.execute("DELETE FROM messages WHERE at < ?", (self._oldest(),))
            db.execute("DELETE FROM bans WHERE until IS NOT NULL AND until < ?", (time.time(),))

    def _oldest(self) -> float:
        return time.time() - self.keep if self.keep else 0.0

    def _rollback(self) -> None:
        try:
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - a connection that cannot roll back is reopened
            self._close()

    def _close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except Exception:  # noqa: BLE001 - closing what failed
                pass
            self._db = None
            self._prepared = False

    # -- the search thread -------------------------------------------------

    def _search_loop(self) -> None:
        import sqlite3

        db = None
        while True:
            with self._search_ready:
                while not self._searches and not self._stopped:
                    self._search_ready.wait()
                if self._stopped:
                    break
                job, done = self._searches.popleft()
            try:
                if db is None:
                    db = self._connect(STORE_BUSY_TIMEOUT)
                db.execute("BEGIN")  # one snapshot: a turn split meanwhile is seen once
                try:
                    result = job(db)
                finally:
                    db.set_progress_handler(None, 0)
                    db.execute("ROLLBACK")
            except SearchTooSlow as exc:
                result = exc
            except sqlite3.Error as exc:
                result = SearchTooSlow() if "interrupt" in str(exc) else exc
                if not isinstance(result, SearchTooSlow):
                    db = None
            self._post("done", (done, result))
        if db is not None:
            db.close()

    def _find(self, query: str, after: int, db: Any) -> list[bytes]:
        """The last SEARCH_RESULTS messages within --keep that hold every term,
        oldest first, once the first ``after`` writes are done with.

        The full-text index answers for the messages it covers, if every term
        has three characters or more (trigrams); the messages past it, or all
        of them for shorter terms, are scanned, the last SEARCH_SCAN at most.
        """
        with self._written:
            self._written.wait_for(lambda: self._done >= after, STORE_BUSY_TIMEOUT)
        terms = search_terms(query)
        deadline = time.monotonic() + SEARCH_TIME
        db.set_progress_handler(lambda: time.monotonic() > deadline, 10000)
        # The newest are in the turns not split yet: looked through here.
        found: list[bytes] = []
        for number, frame in enumerate(reversed(self._unsplit_frames(db, SEARCH_SCAN))):
            if number % 1000 == 999 and time.monotonic() > deadline:
                raise SearchTooSlow()
            parts = unpack_stored(frame)
            if parts is not None:
                text = parts[2][:SEARCH_INDEXED].lower()
                if all(term in text for term in terms):
                    found.append(frame)
                    if len(found) == SEARCH_RESULTS:
                        return found[::-1]
        # Ids grow with time: the first message within --keep bounds both ways.
        first = db.execute(
            "SELECT id FROM messages WHERE at >= ? ORDER BY at LIMIT 1", (self._oldest(),)
        ).fetchone()
        if first is None:
            return found[::-1]
        last = db.execute("SELECT max(id) FROM messages").fetchone()[0]
        lowest = first[0] - 1
        indexed = lowest
        if self.fts and min(map(len, terms)) >= 3:  # as far as this snapshot's index goes
            row = db.execute("SELECT value FROM meta WHERE key = 'indexed'").fetchone()
            indexed = max(int(row[0]), lowest) if row else lowest
        # ASCII words are matched by SQLite's lower() (no Python in the loop
        # over rows); others by Python's lower().
        match = " AND ".join(
            "instr(%s(substr(text, 1, %d)), ?) > 0"
            % ("lower" if term.isascii() else "fold", SEARCH_INDEXED)
            for term in terms
        )
        rows = db.execute(
            "SELECT frame FROM messages WHERE id > ? AND %s ORDER BY id DESC LIMIT ?" % match,
            [max(indexed, lowest, last - SEARCH_SCAN), *terms, SEARCH_RESULTS - len(found)],
        ).fetchall()
        rows[:0] = [(frame,) for frame in found]
        if indexed > lowest and len(rows) < SEARCH_RESULTS:
            rows += db.execute(
                "SELECT frame FROM messages WHERE id IN (SELECT rowid FROM messages_fts "
                "WHERE messages_fts MATCH ? AND rowid > ? AND rowid <= ? ORDER BY rowid DESC "
                "LIMIT ?) ORDER BY id DESC",
                (
                    " ".join(_fts_phrase(term) for term in terms),
                    lowest,
                    indexed,
                    SEARCH_RESULTS - len(rows),
                ),
            ).fetchall()
        return [bytes(row[0]) for row in reversed(rows)]

    # -- jobs (run by the writer, in its transaction) ----------------------

    @staticmethod
    def save_topic(text: str, nick: str, at: float, db: Any) -> None:
        if text:
            db.execute(
                "INSERT OR REPLACE INTO topic (id, text, nick, at) VALUES (1, ?, ?, ?)",
                (text, nick, at),
            )
        else:
            db.execute("DELETE FROM topic")

    @staticmethod
    def save_ban(ban: Ban, db: Any) -> None:
        db.execute(
            "INSERT OR REPLACE INTO bans (network, until, nick, by, reason, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (ban.key, ban.until, ban.nick, ban.by, ban.reason, ban.at),
        )

    @staticmethod
    def drop_ban(key: str, db: Any) -> None:
        db.execute("DELETE FROM bans WHERE network = ?", (key,))


def _fold(text: Any) -> str:
    return text.lower() if isinstance(text, str) else ""


def _frame_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, stop) of every whole frame in data."""
    spans = []
    start, end = 0, len(data)
    while end - start >= HEADER_SIZE:
        try:
            stop = start + HEADER_SIZE + parse_header(data[start : start + HEADER_SIZE])
        except ProtocolError:
            break
        if stop > end:
            break
        spans.append((start, stop))
        start = stop
    return spans


# ---------------------------------------------------------------------------
# The shared room: several servers, one Redis
# ---------------------------------------------------------------------------

DEFAULT_ROOM = "main"
# A server's users stay claimed in Redis this long after its last heartbeat
# (sent every third of it): a server that dies frees their nicknames by then.
DEFAULT_REDIS_TTL = 30.0
REDIS_TIMEOUT = 5.0
# The Redis reader reconnects after this many seconds, doubling up to the maximum.
REDIS_RETRY_FIRST = 0.5
REDIS_RETRY_MAX = 10.0
# How often the room's size is asked for (the count in join and leave notices).
REDIS_COUNT_INTERVAL = 1.0
# What one server publishes to the room, bytes a second; at once it never
# publishes more than REDIS_MAX_SHARE, Redis's default soft limit of what it
# holds for a pub/sub subscriber (past 32 MB it cuts the subscriber off).
DEFAULT_REDIS_RATE = 4 << 20
REDIS_MAX_SHARE = 8 << 20
# Output waiting for a slow Redis; past it a turn's batch is dropped (and logged).
REDIS_MAX_BACKLOG = 64 << 20
ROOM_DEGRADED = (
    "The shared room is degraded: Redis cannot be reached, so messages reach only "
    "the users of this server until it is back"
)
ROOM_BACK = "The shared room is back: messages reach the users of every server again"
# What travels on the room's channel: one kind byte, the sending server's
# instance id, then frames exactly as users receive them.
SHARED_CHAT = b"C"  # chat messages and actions: shown and remembered
SHARED_NOTICE = b"N"  # joins, leaves, renames: shown
SHARED_PRIVATE = b"P"  # casefolded nickname, "\0", one private message frame
# Running the room: frames whose payloads are "verb \0 arg \0 arg...":
# topic TEXT NICK AT, ban NETWORK UNTIL NICK BY REASON AT, unban NETWORK,
# kick KEY BY REASON and bannick KEY UNTIL BY REASON (for the server that has
# KEY), op KEY INSTANCE and deop KEY (who /who marks as an operator).
SHARED_CONTROL = b"A"
INSTANCE_SIZE = 16

# A nickname key holds its owner: "instance TAB server TAB nick TAB joined".
# The same string is a member of the room's "who" sorted set, scored by when
# the claim runs out (Redis's clock), so /who never lists a dead server's users.
# Claiming answers 0 when someone else has the nickname, else how many users
# the room has (the count in join and leave notices).
_CLAIM_SCRIPT = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ms + ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return redis.call('ZCOUNT', KEYS[2], ms, '+inf')
"""
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
_COUNT_SCRIPT = """
local now = redis.call('TIME')
return redis.call('ZCOUNT', KEYS[1], now[1] * 1000 + math.floor(now[2] / 1000), '+inf')
"""
_WHO_SCRIPT = """
local now = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], now[1] * 1000 + math.floor(now[2] / 1000), '+inf')
"""
# Claims that ran out (a server that died without a goodbye): taken out of the
# room by whichever heartbeat comes first, which announces them, so that their
# leaving is told once.
_EXPIRE_SCRIPT = """
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms)
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms) end
return gone
"""


class RedisLink:
    """Two helper threads around Redis, so that the selector loop never waits on it.

    The reader thread listens on the room's channel and reconnects with
    backoff; the writer thread runs, in order, the jobs the loop hands it
    (a turn's batch to publish, nickname claims, lookups). Both hand their
    results to the loop through ``inbox`` and a byte on a socket pair that
    the loop's selector watches. A failed job is never retried: a message
    may be lost while Redis is away, but it is never delivered twice.
    """

    def __init__(self, url: str, room: str, ttl: float = DEFAULT_REDIS_TTL) -> None:
        self.url = url
        self.where = re.sub(r"//[^@/]*@", "//", url)  # no password in the log
        self.ttl_ms = max(int(ttl * 1000), 1)
        self.instance = os.urandom(INSTANCE_SIZE // 2).hex().encode("ascii")
        self.channel = "selchat:%s" % room
        self.prefix = "selchat:%s:" % room
        self.who_key = self.prefix + "who"
        self.history_key = self.prefix + "history"
        self.topic_key = self.prefix + "topic"
        self.bans_key = self.prefix + "bans"
        # The room's topic and bans, as Redis keeps them (read by connect()).
        self.topic: tuple[str, str, float] | None = None
        self.bans: list[Ban] = []
        self.inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self.wakeup = socket.socketpair()
        for sock in self.wakeup:
            sock.setblocking(False)
        self._jobs: collections.deque[tuple[Callable[[Any], Any], Any, int]] = collections.deque()
        self._jobs_ready = threading.Condition()
        self._backlog = 0
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._redis: Any = None
        self._client: Any = None  # the writer's
        self._pubsub: Any = None  # the reader's
        self._errors: tuple[type[BaseException], ...] = (OSError, ValueError)
        self._claim: Any = None
        self._release: Any = None
        self._who: Any = None
        self._expire: Any = None
        self._count: Any = None

    # -- in the main thread --------------------------------------------------

    def connect(self, history: int) -> list[bytes]:
        """Reach Redis, subscribe, and return the stored history; raises when it cannot."""
        import redis

        self._redis = redis
        self._errors = (redis.RedisError, OSError, ValueError)
        self._client = client = self._new_client()
        client.ping()
        self._claim = client.register_script(_CLAIM_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)
        self._who = client.register_script(_WHO_SCRIPT)
        self._expire = client.register_script(_EXPIRE_SCRIPT)
        self._count = client.register_script(_COUNT_SCRIPT)
        # The history before the subscription: a message published in between
        # may be missing from it, but is never in it twice.
        frames: list[bytes] = client.lrange(self.history_key, -history, -1) if history else []
        self._load_room(client)
        self._pubsub = self._subscribe()
        return frames

    def _load_room(self, client: Any) -> None:
        raw = client.get(self.topic_key)
        if raw:
            fields = raw.decode("utf-8", "replace").split("\0")
            if len(fields) == 3:
                self.topic = (fields[0], fields[1], _float(fields[2]))
        now = time.time()
        ended = []
        for key, value in (client.hgetall(self.bans_key) or {}).items():
            network = parse_network(key.decode("utf-8", "replace"))
            fields = value.decode("utf-8", "replace").split("\0")
            if network is None or len(fields) != 5:
                continue
            until = _float(fields[0]) if fields[0] else None
            if until is None or until > now:
                self.bans.append(
                    Ban(network, until, fields[2], fields[3], fields[1], _float(fields[4]))
                )
            else:
                ended.append(key)
        if ended:  # the hash does not keep what is over
            client.hdel(self.bans_key, *ended)

    def start(self) -> None:
        for target, name in ((self._read, "redis-reader"), (self._write, "redis-writer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, job: Callable[[Any], Any], done: Any = None, size: int = 0) -> bool:
        """Queue ``job(client)`` for the writer; ``done(result)`` then runs in the loop."""
        with self._jobs_ready:
            if size and self._backlog + size > REDIS_MAX_BACKLOG:
                return False
            self._backlog += size
            self._jobs.append((job, done, size))
            self._jobs_ready.notify()
        return True

    def stop(self, timeout: float) -> None:
        """Let the writer finish what is queued (for ``timeout`` at most), then stop both."""
        self._stopped.set()
        with self._jobs_ready:
            self._jobs_ready.notify()
        # Only the writer has something to finish; the reader (a daemon) sees
        # the flag within a second, or goes with the process.
        for thread in self._threads[1:]:
            thread.join(timeout)
        for sock in self.wakeup:
            sock.close()

    # -- in the helper threads -----------------------------------------------

    def _new_client(self) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return self._redis.Redis.from_url(
            self.url,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0),  # a publish that may have gone out is not sent again
        )

    def _subscribe(self) -> Any:
        pubsub = self._new_client().pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        # Wait for the confirmation, so that nothing published after this is missed.
        deadline = time.monotonic() + REDIS_TIMEOUT
        while not pubsub.subscribed:
            if time.monotonic() > deadline:
                raise self._redis.TimeoutError("no answer to SUBSCRIBE")
            pubsub.get_message(timeout=0.1)
        return pubsub

    def _post(self, kind: str, value: Any) -> None:
        self.inbox.append((kind, value))
        try:
            self.wakeup[1].send(b"\0")
        except OSError:  # full: the loop is being woken already (or is gone)
            pass

    def _read(self) -> None:
        delay = REDIS_RETRY_FIRST
        pubsub = self._pubsub
        while not self._stopped.is_set():
            try:
                if pubsub is None:
                    pubsub = self._subscribe()
                    self._post("up", None)
                    delay = REDIS_RETRY_FIRST
                while not self._stopped.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._receive(message["data"])
            except Exception as exc:  # noqa: BLE001, PERF203 - the reader must outlive any error
                if not isinstance(exc, self._errors):
                    log("Redis: unexpected %s: %s" % (exc.__class__.__name__, exc))
                if pubsub is not None:
                    self._post("down", _reason(exc))
                    try:
                        pubsub.close()
                    except self._errors:
                        pass
                    pubsub = None
                self._stopped.wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, REDIS_RETRY_MAX)
        if pubsub is not None:
            try:
                pubsub.close()
            except self._errors:
                pass

    def _receive(self, data: bytes) -> None:
        """Check a message from another server here, off the loop, and pass it on."""
        if len(data) <= 1 + INSTANCE_SIZE or data[1 : 1 + INSTANCE_SIZE] == self.instance:
            return
        kind = data[:1]
        start = 1 + INSTANCE_SIZE
        if kind == SHARED_PRIVATE:
            start = data.find(b"\0", start) + 1
            if not start:
                return
        elif kind not in (SHARED_CHAT, SHARED_NOTICE, SHARED_CONTROL):
            return
        try:
            if split_frames(data, start) is None:
                return
        except ProtocolError:
            return
        self._post("message", data)

    def _write(self) -> None:
        failing = False
        while True:
            with self._jobs_ready:
                while not self._jobs and not self._stopped.is_set():
                    self._jobs_ready.wait()
                if not self._jobs:
                    return
                job, done, size = self._jobs.popleft()
                self._backlog -= size
            try:
                result = job(self._client)
                failing = False
            except self._errors as exc:
                if not failing:
                    log("Redis: %s" % _reason(exc))
                failing = True
                result = exc
            except Exception as exc:  # noqa: BLE001 - a dead writer would stall every join
                log("Redis: unexpected %s: %s" % (exc.__class__.__name__, exc))
                result = exc
            if done is not None:
                self._post("done", (done, result))

    # -- jobs (run by the writer) --------------------------------------------

    def nick_key(self, key: str) -> str:
        return self.prefix + "nick:" + key

    def claim(self, key: str, member: str, client: Any) -> int:
        return int(self._claim(keys=[self.nick_key(key), self.who_key], args=[member, self.ttl_ms]))

    def heartbeat(
        self, members: list[tuple[str, str]], client: Any
    ) -> tuple[list[str], int, list[str], list[str]]:
        """Refresh (or claim again) every local user, and take out the users of
        servers that stopped answering; return the lost nicknames, the room's
        size, those users, and ours that another server had announced as gone
        (this server was late: stopped, or cut off from Redis)."""
        pipe = client.pipeline(transaction=False)
        self._expire(keys=[self.who_key], client=pipe)
        for key, member in members:
            pipe.zscore(self.who_key, member)
            self._claim(
                keys=[self.nick_key(key), self.who_key], args=[member, self.ttl_ms], client=pipe
            )
        self._who(keys=[self.who_key], client=pipe)
        results = pipe.execute()
        expired, claims, listed = results[0], results[1:-1], results[-1]
        room = len(listed)
        ours = self.instance.decode("ascii")
        online = {_member_nick(raw).casefold() for raw in listed}
        gone, taken_out_here = [], set()
        for raw in expired:
            fields = raw.decode("utf-8", "replace").split("\t")
            if len(fields) != 4:
                continue
            if fields[0] == ours:  # late ourselves: claimed again just now, unannounced
                taken_out_here.add(fields[2])
            elif fields[2].casefold() not in online:  # not taken again by someone since
                gone.append(fields[2])
        lost, back = [], []
        for (key, member), score, ok in zip(members, claims[0::2], claims[1::2]):
            nick = member.split("\t")[2]
            if not ok:
                lost.append(key)
            elif score is None and nick not in taken_out_here:
                back.append(nick)  # another server found our claim run out and said so
        return lost, room, gone, back

    def who(self, client: Any) -> list[str]:
        return [member.decode("utf-8", "replace") for member in self._who(keys=[self.who_key])]

    def count(self, client: Any) -> int:
        return int(self._count(keys=[self.who_key]))

    def goodbye(self, names: list[str], client: Any) -> None:
        """Tell the other servers that this one's users left, as it stops."""
        text = "%s left the chat (%d online)" % (_names(names), self.count(client))
        message = b"".join((SHARED_NOTICE, self.instance, encode_frame(text.encode("utf-8"))))
        client.publish(self.channel, message)

    def reset(self, client: Any) -> None:
        """Drop connections that died with the last Redis (a command is never retried)."""
        client.connection_pool.disconnect()

    def publish(
        self,
        batch: list[tuple[bytes, list[Buffer]]],
        releases: list[tuple[str, str]],
        history: int,
        client: Any,
    ) -> None:
        """One turn's output in one round trip: messages, history, nicknames given up."""
        pipe = client.pipeline(transaction=False)
        remembered: list[bytes] = []
        for kind, buffers in batch:
            body = b"".join(buffers)
            pipe.publish(self.channel, b"".join((kind, self.instance, body)))
            if kind == SHARED_CHAT and history:
                starts = split_frames(body, 0) or []
                remembered.extend(body[a:b] for a, b in zip(starts, starts[1:]))
            elif kind == SHARED_CONTROL:
                self._keep_control(body, pipe)
        if remembered:
            pipe.rpush(self.history_key, *remembered[-history:])
            pipe.ltrim(self.history_key, -history, -1)
        for key, member in releases:
            self._release(keys=[self.nick_key(key), self.who_key], args=[member], client=pipe)
        pipe.execute()

    def _keep_control(self, body: bytes, pipe: Any) -> None:
        """The topic and the bans are kept in Redis too, for servers that start later."""
        starts = split_frames(body, 0) or []
        for start, stop in zip(starts, starts[1:]):
            fields = body[start + HEADER_SIZE : stop].split(b"\0")
            verb = fields[0]
            if verb == b"topic" and len(fields) == 4:
                if fields[1]:
                    pipe.set(self.topic_key, b"\0".join(fields[1:]))
                else:
                    pipe.delete(self.topic_key)
            elif verb == b"ban" and len(fields) == 7:
                pipe.hset(self.bans_key, fields[1], b"\0".join(fields[2:]))
            elif verb == b"unban" and len(fields) == 2:
                pipe.hdel(self.bans_key, fields[1])

    def to_owner(self, key: str, frame: bytes, client: Any) -> bool:
        """Send a control frame to the room if someone has the nickname ``key``
        (its server acts on it); False when nobody has it."""
        if client.get(self.nick_key(key)) is None:
            return False
        client.publish(self.channel, b"".join((SHARED_CONTROL, self.instance, frame)))
        return True

    def private(self, key: str, sender: str, text: str, client: Any) -> bytes | None:
        """Send a private message to a user on another server; None when nobody has that name."""
        owner = client.get(self.nick_key(key))
        if owner is None:
            return None
        nick = owner.decode("utf-8", "replace").split("\t")[2]
        field = "%s %s -> %s" % (PRIVATE_MARK, sender, nick)
        frame = encode_frame("\0".join((utc_stamp(), field, text)).encode("utf-8"))
        client.publish(
            self.channel,
            b"".join((SHARED_PRIVATE, self.instance, key.encode("utf-8"), b"\0", frame)),
        )
        return frame


def _member_nick(raw: bytes) -> str:
    """The nickname in a "who" entry ("instance TAB server TAB nick TAB joined")."""
    fields = raw.decode("utf-8", "replace").split("\t")
    return fields[2] if len(fields) == 4 else ""


def split_frames(data: bytes, start: int) -> list[int] | None:
    """The offsets where the frames in data[start:] begin, and its end; None if it is not frames."""
    starts = []
    end = len(data)
    while start < end:
        starts.append(start)
        if end - start < HEADER_SIZE:
            return None
        start += HEADER_SIZE + parse_header(data[start : start + HEADER_SIZE])
    if start != end:
        return None
    starts.append(end)
    return starts


class SharedChatServer(ChatServer):
    """A ChatServer whose room is shared through Redis with other servers.

    Without --redis none of this runs: the plain ChatServer's hot path is the
    same. Here every message the room sees is also queued for Redis, and sent
    once per turn of the loop by the writer thread.
    """

    def __init__(
        self,
        config: ServerConfig,
        link: RedisLink,
        history: list[bytes],
        rate: float = DEFAULT_REDIS_RATE,
        store: Store | None = None,
    ) -> None:
        super().__init__(config, store)
        self.link = link
        # What this server publishes, in bytes: at most what Redis holds for a
        # subscriber that is a little behind, at once.
        burst = min(max(2 * rate, self.max_message + HEADER_SIZE), REDIS_MAX_SHARE)
        self._publish = TokenBucket(rate, burst if rate else REDIS_MAX_SHARE, self._now)
        self.shared_up = True
        self.label = ""  # host:port, shown in /who
        self._outbox: list[tuple[bytes, list[Buffer]]] = []
        self._releases: list[tuple[str, str]] = []
        self._members: dict[str, str] = {}  # casefolded nickname -> its claim
        self._others = 0  # users on other servers, as of the last heartbeat
        self._next_heartbeat = 0.0
        self._next_count = 0.0
        self._remote_ops: dict[str, str] = {}  # operators on other servers: key -> instance
        for frame in history[-self.history_size :] if self.history_size else ():
            self.history.remember((Held(frame),))
        ChatServer.restore(self, [], link.topic, link.bans)

    def listen(self) -> tuple[str, int]:
        host, port = super().listen()
        self.label = "%s:%d" % (socket.gethostname(), port)
        return host, port

    def serve_forever(self) -> None:
        if self.listener is None:
            self.listen()
        self.selector.register(self.link.wakeup[0], selectors.EVENT_READ, self._on_inbox)
        self.link.start()
        log("sharing the room %r through Redis at %s" % (self.link.channel[8:], self.link.where))
        super().serve_forever()

    # -- what the room sees goes to Redis too ------------------------------

    def _share(self, kind: bytes, buffers: Sequence[Buffer]) -> None:
        if not self.shared_up:
            return
        outbox = self._outbox
        if outbox and outbox[-1][0] == kind and kind == SHARED_CHAT:
            outbox[-1][1].extend(buffers)
        else:
            outbox.append((kind, list(buffers)))

    def _may_relay(self, conn: Connection, size: int) -> bool:
        """What this server publishes is bounded (--redis-rate): a burst of large
        messages must not overflow what Redis holds for its subscribers, or
        Redis cuts every server off the room."""
        if not self.shared_up:
            return True
        bucket = self._publish
        if size > bucket.burst:
            self._tell(
                conn,
                "Not sent: too big to share with the room's other servers "
                "(at most %d bytes at once)" % bucket.burst,
            )
            return False
        if bucket.take(self._now, size):
            return True
        if self._now - conn.warned_at >= 1.0:
            conn.warned_at = self._now
            log("%s: not shared, over --redis-rate" % conn.name)
            self._tell(conn, "Not sent: the shared room is busy; try again in a moment")
        return False

    def _relayed(self, buffers: Sequence[Buffer]) -> None:
        super()._relayed(buffers)
        self._share(SHARED_CHAT, buffers)

    def _notice(
        self, text: str, sender: Connection | None = None, skip: set[Connection] | None = None
    ) -> None:
        frame = encode_frame(text.encode("utf-8"))
        self._broadcast((Held(frame),), sender, skip)
        self._publish.borrow(self._now, len(frame))  # counted, never refused
        self._share(SHARED_NOTICE, (frame,))

    def _online(self) -> int:
        return len(self.users) + (self._others if self.shared_up else 0)

    def _end_of_turn(self) -> None:
        super()._end_of_turn()
        if self._outbox or self._releases:
            self._flush_shared()

    def _flush_shared(self) -> None:
        outbox, self._outbox = self._outbox, []
        releases, self._releases = self._releases, []
        if not self.shared_up:  # what Redis holds for us runs out with its TTL
            return
        size = sum(len(buffer) for _, buffers in outbox for buffer in buffers)
        job = functools.partial(self.link.publish, outbox, releases, self.history_size)
        if not self.link.submit(job, size=size):
            log("Redis is not keeping up: %d bytes not shared" % size)

    def _housekeeping(self, now: float) -> None:
        super()._housekeeping(now)
        if not self.shared_up:
            return
        if now >= self._next_heartbeat:
            self._heartbeat(now)
        elif now >= self._next_count:
            self._next_count = now + REDIS_COUNT_INTERVAL
            self.link.submit(self.link.count, self._counted)

    def _counted(self, result: Any) -> None:
        if isinstance(result, int):
            self._others = max(result - len(self.users), 0)

    def _heartbeat(self, now: float) -> None:
        self._next_heartbeat = now + self.link.ttl_ms / 3000.0
        self._next_count = now + REDIS_COUNT_INTERVAL
        members = list(self._members.items())
        self.link.submit(functools.partial(self.link.heartbeat, members), self._heartbeat_done)

    def _heartbeat_done(self, result: Any) -> None:
        if isinstance(result, BaseException):
            return
        lost, room, gone, back = result
        for key in lost:
            log("%s: the nickname is in use on another server too" % key)
        self._others = max(room - len(self.users), 0)
        if gone:  # told to every server's users, once
            log("claims ran out (their server stopped answering): %s" % ", ".join(gone))
            self._notice("%s left the chat (%d online)" % (_names(gone), room))
        if back:  # the room was told they left: tell it they are here
            log(
                "claims ran out while this server was late, now claimed again: %s" % ", ".join(back)
            )
            self._notice("%s joined the chat (%d online)" % (_names(back), room))

    # -- what other servers send -----------------------------------------

    def _on_inbox(self, mask: int) -> None:
        try:
            self.link.wakeup[0].recv(65536)
        except OSError:
            pass
        inbox = self.link.inbox
        while inbox:
            kind, value = inbox.popleft()
            if kind == "message":
                self._from_other_server(value)
            elif kind == "done":
                done, result = value
                done(result)
            elif kind == "down":
                self._room_down(value)
            elif kind == "up":
                self._room_up()

    def _from_other_server(self, data: bytes) -> None:
        kind = data[:1]
        start = 1 + INSTANCE_SIZE
        if kind == SHARED_PRIVATE:
            split = data.index(b"\0", start)
            target = self.users.get(data[start:split].decode("utf-8", "replace"))
            if target is not None:
                self._deliver(target, (Held(data[split + 1 :]),))
            return
        if kind == SHARED_CONTROL:
            starts = split_frames(data, start) or []
            for first, stop in zip(starts, starts[1:]):
                fields = data[first + HEADER_SIZE : stop].decode("utf-8", "replace").split("\0")
                self._on_control(fields[0], fields[1:])
            return
        if self._joined and self._now >= self._notices_due:
            self._announce()  # ours who joined are announced first, as locally
        self._broadcast((Held(memoryview(data)[start:]),))
        if kind == SHARED_CHAT:
            if self.history_size:
                self.history.remember_run(data, start, len(data))
            if self.store is not None:
                self._to_store.append(memoryview(data)[start:])

    # -- running the room across servers ------------------------------------

    def restore(
        self, frames: list[bytes], topic: tuple[str, str, float] | None, bans: list[Ban]
    ) -> None:
        """The room's topic and bans are Redis's (read by RedisLink.connect): a
        store keeps this server's copy, which may be stale (a topic cleared, a
        ban lifted while it was stopped). Its history serves when Redis has none."""
        super().restore(frames, None, [])

    @property
    def _bans_last(self) -> bool:
        return True  # Redis keeps them for the servers that start later

    def _control(self, verb: str, *args: str) -> None:
        frame = encode_frame("\0".join((verb, *args)).encode("utf-8"))
        self._share(SHARED_CONTROL, (frame,))

    def _on_control(self, verb: str, args: list[str]) -> None:
        """A topic, ban or kick from an operator on another server."""
        if verb == "topic" and len(args) == 3:
            self._set_topic(args[0], args[1], _float(args[2]), shared=False)
        elif verb == "ban" and len(args) == 6:
            network = parse_network(args[0])
            if network is not None:
                until = _float(args[1]) if args[1] else None
                self._ban(Ban(network, until, args[3], args[4], args[2], _float(args[5])), False)
        elif verb == "unban" and len(args) == 1:
            if args[0] in self.bans:
                self._unban(args[0], shared=False)
                log("%s unbanned on another server" % args[0])
        elif verb == "kick" and len(args) == 3:
            target = self.users.get(args[0])
            if target is not None and target.state == CHATTING:
                self._kick(target, args[1], args[2])
        elif verb == "bannick" and len(args) == 4:
            target = self.users.get(args[0])
            network = host_network(target.host) if target is not None else None
            if target is not None and network is not None:
                until = _float(args[1]) if args[1] else None
                self._ban(Ban(network, until, args[2], args[3], target.nick or ""))
        elif verb == "op" and len(args) == 2:
            self._remote_ops[args[0]] = args[1]
        elif verb == "deop" and len(args) == 1:
            self._remote_ops.pop(args[0], None)

    def _opped(self, conn: Connection) -> None:
        self._control("op", conn.nick_key, self.link.instance.decode("ascii"))

    def _kick_elsewhere(self, conn: Connection, nick: str, reason: str) -> None:
        if not self.shared_up:
            super()._kick_elsewhere(conn, nick, reason)
            return
        key = nick.casefold()
        frame = encode_frame("\0".join(("kick", key, conn.nick or "", reason)).encode("utf-8"))
        self.link.submit(
            functools.partial(self.link.to_owner, key, frame),
            functools.partial(self._asked_owner, conn, _nobody(nick), ""),
        )

    def _ban_elsewhere(self, conn: Connection, nick: str, until: float | None, reason: str) -> bool:
        if not self.shared_up or check_nick(nick) is not None:
            return False
        key = nick.casefold()
        fields = ("bannick", key, "" if until is None else repr(until), conn.nick or "", reason)
        frame = encode_frame("\0".join(fields).encode("utf-8"))
        self.link.submit(
            functools.partial(self.link.to_owner, key, frame),
            functools.partial(
                self._asked_owner,
                conn,
                "Not banned: %s is neither an address nor the nickname of someone online"
                % sanitize(nick[:MAX_NICK_LENGTH]),
                "Banned the address of %s (on another server)" % nick,
            ),
        )
        return True

    def _asked_owner(self, conn: Connection, nobody: str, done: str, result: Any) -> None:
        if conn.state != CHATTING:
            return
        if result is False:
            self._tell(conn, nobody)
        elif isinstance(result, BaseException):
            self._tell(conn, "Not done: the shared room cannot be reached now")
        elif done:
            self._tell(conn, done)

    def _room_down(self, why: str) -> None:
        if not self.shared_up:
            return
        self.shared_up = False
        self._outbox = []
        log("Redis at %s lost (%s): the room is local until it is back" % (self.link.where, why))
        self._broadcast((Held(encode_frame(ROOM_DEGRADED.encode("utf-8"))),))

    def _room_up(self) -> None:
        if self.shared_up:
            return
        self.shared_up = True
        log("Redis at %s is back: the room is shared again" % self.link.where)
        self._broadcast((Held(encode_frame(ROOM_BACK.encode("utf-8"))),))
        self.link.submit(self.link.reset)
        self._heartbeat(self._now)  # claims again the nicknames taken meanwhile

    # -- nicknames are claimed in Redis before they are given --------------

    def _member(self, nick: str) -> str:
        return "%s\t%s\t%s\t%d" % (self.link.instance.decode(), self.label, nick, int(time.time()))

    def _join(self, conn: Connection, nick: str) -> bool:
        if not self.shared_up:  # claimed by the heartbeat once Redis is back
            self._members[nick.casefold()] = self._member(nick)
            joined = super()._join(conn, nick)
            self._tell(conn, ROOM_DEGRADED)
            return joined
        # Until Redis answers, what the client sends is held, not handled. The
        # nickname alone (without name_as) names it in the log, while the hot
        # path still does not know the sender.
        conn.state = CLAIMING
        conn.nick = nick
        conn.held = bytearray()
        conn.held_raw = bytearray()
        conn.handler = functools.partial(self._on_held_event, conn)
        self._want(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.writing else 0))
        member = self._member(nick)
        job = functools.partial(self.link.claim, nick.casefold(), member)
        self.link.submit(job, functools.partial(self._claimed, conn, nick, member))
        return True

    def _handle_frame(self, conn: Connection, data: Buffer, start: int, stop: int) -> bool:
        held = conn.held
        if conn.state != CLAIMING or held is None:
            return super()._handle_frame(conn, data, start, stop)
        held += frame_header(stop - start)
        held += memoryview(data)[start:stop]
        return self._held_within_limit(conn)

    def _held_within_limit(self, conn: Connection) -> bool:
        size = len(conn.held or b"") + len(conn.held_raw or b"")
        self._hold_input(conn, size + len(conn.tail) + len(conn.large or b""))
        if size <= self.max_message + RECV_SIZE:
            return True
        self._reject(
            conn,
            "Disconnected: too much sent before the nickname was accepted",
            "input over the limit while the nickname was claimed",
        )
        return False

    def _on_held_event(self, conn: Connection, mask: int) -> None:
        if conn.state == CLOSED:  # closed earlier in this turn
            return
        if mask & selectors.EVENT_WRITE:
            self._send(conn)
        if not mask & selectors.EVENT_READ or conn.state == CLOSED:
            return
        try:
            if conn.large is not None:
                self._receive_large(conn)
                return
            data = conn.sock.recv(RECV_SIZE)
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            self._lost(conn, "connection error: %s" % _reason(exc))
            return
        if not data:
            self._peer_closed(conn)
        elif not conn.closing and conn.held_raw is not None:
            conn.held_raw += data
            self._held_within_limit(conn)

    def _claimed(self, conn: Connection, nick: str, member: str, result: Any) -> None:
        held, raw = conn.held or b"", conn.held_raw or b""
        conn.held = conn.held_raw = None
        key = nick.casefold()
        granted = isinstance(result, int) and result > 0
        if conn.closing:
            if granted:
                self._releases.append((key, member))
            return
        conn.handler = functools.partial(self._on_client_event, conn)
        self._want(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0))
        if isinstance(result, BaseException):
            log("%s: nickname %s not checked with Redis (%s)" % (conn.address, nick, result))
        else:
            # Checked again: another claim may have won here meanwhile.
            reason = self._nick_refused(conn, nick) if granted else None
            if not granted or reason is not None:
                if granted:
                    self._releases.append((key, member))
                reason = reason or "%r is in use on another server" % nick
                self._reject(
                    conn,
                    'Nickname rejected: "%s" is already in use' % nick
                    if not granted
                    else "Nickname rejected: %s" % reason.replace("'", '"'),
                    "nickname rejected: %s" % reason,
                )
                return
        self._members[key] = member
        if granted:
            self._others = max(result - len(self.users) - 1, 0)
        super()._join(conn, nick)
        replay = b"".join((held, conn.tail, raw))
        conn.tail = bytearray()
        self._hold_input(conn, len(conn.large or b""))
        if replay:
            self._consume(conn, replay)
        if conn.state != CLOSED and conn.tls == TLS_ON:
            self._receive(conn)  # TLS may hold decrypted input that select() does not see

    def _leave_room(self, conn: Connection, why: str) -> None:
        if conn.nick is not None and self.users.get(conn.nick_key) is conn:
            member = self._members.pop(conn.nick_key, None)
            if member is not None:
                self._releases.append((conn.nick_key, member))
            if conn.op:
                self._control("deop", conn.nick_key)
        super()._leave_room(conn, why)

    def _rename(self, conn: Connection, old: str, new: str) -> None:
        member = self._member(new)
        if not self.shared_up:
            self._renamed(conn, old, new, member, None)
            return
        job = functools.partial(self.link.claim, new.casefold(), member)
        self.link.submit(job, functools.partial(self._renamed, conn, old, new, member))

    def _renamed(self, conn: Connection, old: str, new: str, member: str, result: Any) -> None:
        key = new.casefold()
        present = self.users.get(conn.nick_key) is conn
        taken = present and self._nick_refused(conn, new) is not None
        if not present or conn.nick != old or taken:
            if isinstance(result, int) and result > 0:
                self._releases.append((key, member))
            if present and conn.nick == old:
                self._tell(conn, 'Nickname not changed: "%s" is already in use' % new)
            return
        if result == 0:
            self._tell(conn, 'Nickname not changed: "%s" is already in use' % new)
            return
        previous = self._members.pop(conn.nick_key, None)
        if previous is not None and self.shared_up:
            self._releases.append((conn.nick_key, previous))
        self._members[key] = member
        super()._rename(conn, old, new)

    # -- commands that ask Redis -------------------------------------------

    def _who(self, conn: Connection, prefix: str) -> None:
        """/who lists the users of every server, with theirs."""
        if not self.shared_up:
            super()._who(conn, prefix)
            self._tell(conn, "(The shared room is degraded: only this server's users are listed)")
            return
        self.link.submit(self.link.who, functools.partial(self._who_done, conn, prefix))

    def _who_done(self, conn: Connection, prefix: str, result: Any) -> None:
        if self.users.get(conn.nick_key) is not conn:
            return
        if isinstance(result, BaseException):
            super()._who(conn, prefix)
            return
        now = time.time()
        users = []
        ours = self.link.instance.decode("ascii")
        for member in result:
            parts = member.split("\t")
            if len(parts) == 4 and parts[3].isdigit():
                key = parts[2].casefold()
                if parts[0] == ours:
                    local = self.users.get(key)
                    op = local is not None and local.op
                else:
                    op = self._remote_ops.get(key) == parts[0]
                users.append((key, parts[2], parts[1], now - int(parts[3]), op))
        users.sort()
        self._tell(
            conn,
            _who_text(
                [user[0] for user in users],
                lambda i: (
                    "%s (%son %s, joined %s ago)"
                    % (
                        users[i][1],
                        "operator, " if users[i][4] else "",
                        users[i][2],
                        duration(users[i][3]),
                    )
                ),
                prefix,
            ),
        )

    def _cmd_msg(self, conn: Connection, line: str) -> None:
        """/msg NICK TEXT: a private message to NICK alone"""
        parts = line.split(None, 2)
        if len(parts) < 3 or parts[1].casefold() in self.users or not self.shared_up:
            ChatServer._cmd_msg(self, conn, line)
            return
        job = functools.partial(self.link.private, parts[1].casefold(), conn.nick or "", parts[2])
        self.link.submit(job, functools.partial(self._msg_done, conn, parts[1]))

    def _msg_done(self, conn: Connection, nick: str, result: Any) -> None:
        if self.users.get(conn.nick_key) is not conn:
            return
        if isinstance(result, bytes):
            self._deliver(conn, (Held(result),))
        elif result is None:
            self._tell(
                conn,
                "Not sent: nobody called %s is online (/who lists who is)" % nick[:MAX_NICK_LENGTH],
            )
        else:
            self._tell(conn, "Not sent: the shared room cannot be reached now")

    COMMANDS: ClassVar[dict[str, Callable[[ChatServer, Connection, str], None]]] = {
        **ChatServer.COMMANDS,
        "/msg": _cmd_msg,  # type: ignore[dict-item]
    }

    # -- closing -----------------------------------------------------------

    def _shutdown(self) -> None:
        names = [conn.nick or "" for conn in self.users.values()]
        super()._shutdown()
        self._flush_shared()  # what is left, and every nickname given up
        if names and self.shared_up:
            self.link.submit(functools.partial(self.link.goodbye, names))
        self.link.stop(SHUTDOWN_GRACE)


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


# The client runs in one thread: one selector loop over the socket, the
# keyboard (the terminal in raw mode) and a socket pair that signals write to
# (SIGWINCH, SIGINT, SIGTERM, SIGHUP, SIGTSTP, SIGCONT), as smallchat's client
# does with select(). Its line editor draws the prompt and the typed text
# itself, so it always knows which rows they occupy and where the cursor is:
# to print a message it clears exactly those rows, prints, and draws them
# again. Nothing else writes to the terminal.

MAX_SHOWN = 2000  # characters of one message drawn; past it the rest is only counted
ESCAPE_WAIT = 0.05  # a lone ESC with nothing after it for this long is just ESC
HISTORY_KEPT = 1000  # lines kept in the history file
MAX_PACE = 10.0  # seconds a line may wait for the server's rate limit, whatever it says
LEAVE_WAIT = 2.0  # seconds a leaving terminal client waits for the server to close
PIPE_LEAVE_WAIT = 5.0
ZWJ = "\u200d"
VS16 = "\ufe0f"
OWN_STYLE = "\x1b[1;4m"  # bold and underlined: your own nickname on your own messages
COMMAND_NAMES = (
    "/help",
    "/who",
    "/msg",
    "/nick",
    "/me",
    "/topic",
    "/search",
    "/op",
    "/kick",
    "/ban",
    "/unban",
    "/bans",
    "/quit",
    "/exit",
)
# Lines that hold a password are never written to the history file.
SECRET_COMMANDS = ("/op",)
# "3 users online: a (joined 5 s ago), ..." (or "... online whose nickname starts with a: ...")
WHO_ANSWER = re.compile(r"(\d+ users? online(?: whose nickname starts with [^:]*)?): (.+)\Z", re.S)


def _nick_colors_256() -> tuple[str, ...]:
    """Colours of the 256-colour cube that read on dark and light themes and
    are not red: none too dark, none too pale, none where red leads."""
    colours = []
    for red, green, blue in itertools.product(range(6), repeat=3):
        if red > max(green, blue) or not 4 <= red + green + blue <= 11:
            continue
        if min(red, green, blue) >= 3 or max(red, green, blue) < 2:
            continue
        colours.append("38;5;%d" % (16 + 36 * red + 6 * green + blue))
    return tuple(colours)


NICK_COLORS_256 = _nick_colors_256()


# -- widths ---------------------------------------------------------------


def char_width(char: str) -> int:
    """Columns a terminal gives one character drawn alone: 2 for East Asian
    wide and fullwidth, 0 for combining marks, format characters (ZWJ,
    variation selectors) and controls, else 1."""
    code = ord(char)
    if 0x20 <= code < 0x7F:
        return 1
    if code == 0xAD:  # the soft hyphen: terminals draw it
        return 1
    category = unicodedata.category(char)
    if category in ("Mn", "Me", "Cf", "Cc") or 0x1160 <= code <= 0x11FF:
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def _emoji_like(char: str) -> bool:
    return unicodedata.category(char) == "So" or char_width(char) == 2


def clusters(text: str) -> list[str]:
    """``text`` cut where a terminal draws one glyph: a character with the
    zero-width ones after it, an emoji ZWJ sequence, an emoji with its skin
    tone, two regional indicators (a flag)."""
    if text.isascii():
        return list(text)
    out: list[str] = []
    after_zwj = False
    open_flag = False  # the last cluster is one regional indicator
    for char in text:
        code = ord(char)
        regional = 0x1F1E6 <= code <= 0x1F1FF
        if out and (
            (code >= 0x300 and char_width(char) == 0)
            or 0x1F3FB <= code <= 0x1F3FF  # skin tones
            or (after_zwj and _emoji_like(char))
            or (open_flag and regional)
        ):
            out[-1] += char
            open_flag = False
        else:
            out.append(char)
            open_flag = regional
        after_zwj = char == ZWJ
    return out


def cluster_width(cluster: str) -> int:
    """Columns of one cluster: an emoji presentation sequence is one wide glyph."""
    if len(cluster) == 1:
        return char_width(cluster)
    base = cluster[0]
    if (_emoji_like(base) or 0x1F1E6 <= ord(base) <= 0x1F1FF) and (
        VS16 in cluster
        or ZWJ in cluster
        or any(0x1F3FB <= ord(c) <= 0x1F3FF or 0x1F1E6 <= ord(c) <= 0x1F1FF for c in cluster[1:])
    ):
        return 2
    return sum(char_width(char) for char in cluster)


def text_width(text: str) -> int:
    """Columns ``text`` takes on a terminal (no controls in it: sanitise first)."""
    if text.isascii() and text.isprintable():
        return len(text)
    return sum(cluster_width(cluster) for cluster in clusters(text))


def _boundaries(text: str) -> list[int]:
    """Indexes in ``text`` where a cluster starts, and its length."""
    bounds = [0]
    for cluster in clusters(text):
        bounds.append(bounds[-1] + len(cluster))
    return bounds


Runs = List[Tuple[str, str]]  # (SGR style or "", text) pieces of one line


def wrap_runs(runs: Runs, width: int, indent: int = 0) -> list[str]:
    """Rows of at most ``width`` columns, broken after a space where one is
    near; rows after the first start with ``indent`` spaces (a hanging
    indent), so that no text reaches column 0 but the line's own start."""
    width = max(width, 2)
    indent = min(indent, width // 2)
    rows: list[str] = []
    row: list[str] = []
    col = 0
    for style, text in runs:
        if style:
            row.append(style)
        space_at = space_col = -1  # where the row may break, in this run
        for cluster in clusters(text):
            cols = cluster_width(cluster)
            if col + cols > width and col > indent:
                tail: list[str] = []
                if space_at >= 0 and indent + col - space_col + cols <= width:
                    tail, row = row[space_at:], row[:space_at]
                    col -= space_col
                else:
                    col = 0
                if style:
                    row.append(RESET)
                rows.append("".join(row))
                row = [" " * indent, style, *tail] if style else [" " * indent, *tail]
                col += indent
                space_at = -1
            row.append(cluster)
            col += cols
            if cluster == " ":
                space_at, space_col = len(row), col
        if style:
            row.append(RESET)
    rows.append("".join(row))
    return rows


def plain(runs: Runs) -> str:
    return "".join(text for _, text in runs)


def fold(text: str) -> str:
    """At most MAX_SHOWN characters of a message, and how many more there were."""
    if len(text) <= MAX_SHOWN:
        return text
    return text[:MAX_SHOWN] + " \u2026 (%s more characters)" % format(len(text) - MAX_SHOWN, ",")


# Letters and marks that draw nothing (Hangul fillers, Khmer inherent vowels,
# the braille blank): shown escaped in nicknames, as format characters are.
_BLANK_LETTERS = frozenset((0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0))


def shown_nick(nick: str) -> str:
    """A nickname as shown: sanitised, and invisible characters escaped too,
    so that two nicknames that look alike can be told apart."""
    nick = sanitize(fold(nick))
    if nick.isascii():
        return nick
    return "".join(
        "\\u%04x" % ord(char)
        if ord(char) in _BLANK_LETTERS
        or unicodedata.category(char) in ("Cf", "Mn", "Me", "Zs", "Zl", "Zp", "Co", "Cn")
        else char
        for char in nick
    )


def shown_text(text: str) -> str:
    """Message text as shown: tabs expanded, every other control escaped."""
    if "\t" in text:
        text = text.expandtabs(8)
    return sanitize(text)


class Formatter:
    """Turns messages into styled runs: ``[time] nick: text`` and the rest."""

    def __init__(self, color: bool, palette: Sequence[str] = NICK_COLORS) -> None:
        self.color = color
        self.palette = palette

    def nick(self, nick: str, own: bool = False) -> Runs:
        shown = shown_nick(nick)
        if not self.color:
            return [("", shown)]
        style = "\x1b[%sm" % nick_color(nick, self.palette)
        return [(style + OWN_STYLE if own else style, shown)]

    def text(self, text: str, mentions: Sequence[tuple[int, int]] = ()) -> Runs:
        if not self.color or not mentions:
            return [("", shown_text(text))]
        runs: Runs = []
        done = 0
        for start, stop in mentions:  # sanitised piece by piece: escapes never match
            runs.append(("", shown_text(text[done:start])))
            runs.append((MENTION_STYLE, shown_text(text[start:stop])))
            done = stop
        runs.append(("", shown_text(text[done:])))
        return runs

    def chat(
        self,
        stamp: str,
        field: str,
        text: str,
        mentions: Sequence[tuple[int, int]] = (),
        own: bool = False,
    ) -> tuple[Runs, Runs]:
        """(head, body) of ``[time] nick: text``, ``[time] * nick action`` or
        ``[time] [private] sender -> receiver: text``; wrapped rows of the body
        continue under its first column."""
        kind, nick, other = read_nick_field(field)
        when = "[%s] " % format_time(stamp)
        body = self.text(text, mentions)
        if kind == "action":
            return [("", when + ACTION_MARK + " "), *self.nick(nick), ("", " ")], body
        if kind == "private":
            mark = (PRIVATE_STYLE if self.color else "", PRIVATE_MARK)
            head = [("", when), mark, ("", " "), *self.nick(nick), ("", " -> ")]
            return [*head, *self.nick(other), ("", ": ")], body
        return [("", when), *self.nick(nick, own), ("", ": ")], body

    def notice(self, text: str, stamp: str = "") -> Runs:
        """A service message, bold red, after the time it arrived when ``stamp``."""
        shown = shown_text(text)
        runs: Runs = [("", stamp)] if stamp else []
        runs.append((BOLD_RED if self.color else "", shown))
        return runs


def _who_items(listing: str) -> list[str]:
    """The entries of a /who answer: split at the commas outside parentheses
    (a shared room's entries say ``alice (on chat1:9009, joined 5 s ago)``)."""
    items: list[str] = []
    depth = start = 0
    for index, char in enumerate(listing):
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(depth - 1, 0)
        elif char == "," and not depth and listing.startswith(", ", index):
            items.append(listing[start:index])
            start = index + 2
    items.append(listing[start:])
    return items


def split_notice(text: str) -> list[str]:
    """The lines a service message is shown as: the answers to /who and /help
    one item a line."""
    match = WHO_ANSWER.match(text)
    if match:
        return [match.group(1) + ":"] + ["  " + item for item in _who_items(match.group(2))]
    if text.startswith("Commands: ") and ". Start a message" in text:
        usage, _, rest = text[len("Commands: ") :].partition(". Start a message")
        items = ["  " + item for item in usage.split("; ")]
        return ["Commands:", *items, "Start a message" + rest]
    return [text]


def names_in_notice(text: str) -> tuple[list[str], list[str]]:
    """(nicknames that arrived, nicknames that left) in a service message."""
    match = WHO_ANSWER.match(text)
    if match:
        items = _who_items(match.group(2))
        found = (
            re.match(r"(\S+) \((?:operator, )?(?:on [^()]*, )?joined ", item) for item in items
        )
        return [each.group(1) for each in found if each], []
    for verb in (" joined the chat (", " left the chat ("):
        if verb in text:
            names = re.split(r", | and ", text.split(verb, 1)[0])
            names = [name for name in names if " " not in name]
            return (names, []) if "joined" in verb else ([], names)
    if " is now known as " in text:
        old, _, new = text.partition(" is now known as ")
        return [new], [old]
    return [], []


# -- keys -----------------------------------------------------------------

# What the usual escape sequences mean, and the control keys.
_SEQUENCES = {
    "[A": "up",
    "[B": "down",
    "[C": "right",
    "[D": "left",
    "[H": "home",
    "[F": "end",
    "OA": "up",
    "OB": "down",
    "OC": "right",
    "OD": "left",
    "OH": "home",
    "OF": "end",
    "[1~": "home",
    "[7~": "home",
    "[4~": "end",
    "[8~": "end",
    "[3~": "delete",
    "[1;5C": "word-right",
    "[1;5D": "word-left",
    "[1;3C": "word-right",
    "[1;3D": "word-left",
    "b": "word-left",
    "f": "word-right",
    "d": "kill-word",
    "\x7f": "rubout-word",
    "\x08": "rubout-word",
}
_CONTROLS = {
    "\x01": "home",
    "\x02": "left",
    "\x03": "interrupt",
    "\x04": "eof",
    "\x05": "end",
    "\x06": "right",
    "\x07": "cancel",
    "\x08": "backspace",
    "\x7f": "backspace",
    "\t": "complete",
    "\r": "enter",
    "\n": "enter",
    "\x0b": "kill-end",
    "\x0c": "clear",
    "\x0e": "down",
    "\x10": "up",
    "\x12": "search",
    "\x15": "kill-start",
    "\x17": "rubout-word",
    "\x19": "yank",
    "\x1a": "suspend",
}
PASTE_BEGIN = "\x1b[200~"
PASTE_END = "\x1b[201~"
Key = Tuple[str, str]  # ("text", "abc"), ("paste", "a\nb") or ("key", "left")


class KeyReader:
    """Turns the bytes typed into keys, with sequences cut anywhere between reads."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""  # an escape sequence, or a paste, not complete yet
        self.since = 0.0  # when the pending part came

    @property
    def waiting(self) -> bool:
        """Whether a lone ESC (or an unfinished sequence) waits for the rest."""
        return bool(self._pending) and not self._pending.startswith(PASTE_BEGIN)

    def feed(self, data: bytes, now: float = 0.0) -> list[Key]:
        text = self._pending + self._decoder.decode(data)
        self._pending = ""
        keys: list[Key] = []
        pos = 0
        plain_from = 0
        while pos < len(text):
            char = text[pos]
            if char != "\x1b" and char not in _CONTROLS:
                pos += 1
                continue
            if plain_from < pos:
                keys.append(("text", text[plain_from:pos]))
            if char != "\x1b":
                keys.append(("key", _CONTROLS[char]))
                pos += 1
            else:
                end = self._sequence(text, pos, keys)
                if end is None:  # incomplete: wait for the rest
                    self._pending = text[pos:]
                    self.since = now
                    return keys
                pos = end
            plain_from = pos
        if plain_from < pos:
            keys.append(("text", text[plain_from:pos]))
        return keys

    @staticmethod
    def _sequence(text: str, pos: int, keys: list[Key]) -> int | None:
        """Read the escape sequence at ``pos``: where it ends, or None when cut."""
        if text.startswith(PASTE_BEGIN, pos):
            end = text.find(PASTE_END, pos)
            if end < 0:
                return None
            keys.append(("paste", text[pos + len(PASTE_BEGIN) : end]))
            return end + len(PASTE_END)
        if PASTE_BEGIN.startswith(text[pos:]) and len(text) - pos < len(PASTE_BEGIN):
            return None
        if pos + 1 >= len(text):
            return None
        second = text[pos + 1]
        if second == "[":
            end = pos + 2
            while end < len(text) and 0x20 <= ord(text[end]) <= 0x3F:
                end += 1
            if end >= len(text):
                return None
            name = _SEQUENCES.get(text[pos + 1 : end + 1])
        elif second == "O":
            if pos + 2 >= len(text):
                return None
            end = pos + 2
            name = _SEQUENCES.get(text[pos + 1 : end + 1])
        elif second == "\x1b":
            return pos + 1  # ESC ESC: the first is a lone ESC
        else:
            end = pos + 1
            name = _SEQUENCES.get(second)
        if name is not None:
            keys.append(("key", name))
        return end + 1

    def flush(self) -> list[Key]:
        """After ESCAPE_WAIT: what waits is not a sequence; a lone ESC is dropped."""
        pending, self._pending = self._pending, ""
        rest = pending[1:] if pending.startswith("\x1b") else pending
        return self.feed(rest.encode("utf-8", "surrogatepass")) if rest else []


# -- the line editor ------------------------------------------------------


class LineEditor:
    """The line being typed: its text, the cursor, the history, the kill
    buffer, and what it drew on the terminal.

    ``render()`` returns what draws the prompt and the text from the
    region's first row and leaves the cursor where it belongs; the editor then
    knows how many rows the region has and which of them the cursor is on, so
    ``clear()`` can take exactly them away. Each row is ended by an explicit
    CR LF, also one that is exactly as wide as the terminal, so the cursor is
    never left in the terminal's pending-wrap state with its row unknown.
    """

    def __init__(self, history: list[str] | None = None) -> None:
        self.text = ""
        self.pos = 0  # index into text, always where a cluster starts
        self.kill = ""
        self.history: list[str] = history if history is not None else []
        self.browse = len(self.history)  # the history entry shown, len() for the draft
        self.draft = ""
        self.added = False  # the last line accepted went into the history
        self.search: str | None = None  # the reverse search's query, while searching
        self.found = -1  # the history entry the search shows
        self.before_search = ("", 0)
        self.cursor_row = 0  # rows from the region's first row to the cursor
        self.drawn = False

    # editing

    def insert(self, text: str) -> None:
        text = "".join(
            char for char in text.replace("\t", "    ") if char >= " " and char != "\x7f"
        )
        if self.search is not None:
            self.search += text
            self._find(len(self.history))
            return
        self.text = self.text[: self.pos] + text + self.text[self.pos :]
        self.pos += len(text)
        bounds = _boundaries(self.text)
        while self.pos not in bounds:  # the text joined a cluster after it
            self.pos += 1

    def _left(self) -> int:
        bounds = _boundaries(self.text)
        return max((b for b in bounds if b < self.pos), default=0)

    def _right(self) -> int:
        bounds = _boundaries(self.text)
        return min((b for b in bounds if b > self.pos), default=len(self.text))

    def _word_left(self) -> int:
        pos = self.pos
        while pos and not self.text[pos - 1].isalnum():
            pos -= 1
        while pos and self.text[pos - 1].isalnum():
            pos -= 1
        return pos

    def _word_right(self) -> int:
        pos = self.pos
        while pos < len(self.text) and not self.text[pos].isalnum():
            pos += 1
        while pos < len(self.text) and self.text[pos].isalnum():
            pos += 1
        return pos

    def _cut(self, start: int, stop: int) -> None:
        if stop > start:
            self.kill = self.text[start:stop]
            self.text = self.text[:start] + self.text[stop:]
            self.pos = start

    def key(self, name: str) -> str | None:
        """Apply an editing key; returns the line when it is Enter."""
        if self.search is not None and self._search_key(name):
            return None
        text, pos = self.text, self.pos
        if name == "enter":
            return self.accept()
        if name == "left":
            self.pos = self._left()
        elif name == "right":
            self.pos = self._right()
        elif name == "home":
            self.pos = 0
        elif name == "end":
            self.pos = len(text)
        elif name == "word-left":
            self.pos = self._word_left()
        elif name == "word-right":
            self.pos = self._word_right()
        elif name == "backspace":
            left = self._left()
            self.text, self.pos = text[:left] + text[pos:], left
        elif name in ("delete", "eof"):
            self.text = text[:pos] + text[self._right() :]
        elif name == "kill-end":
            self._cut(pos, len(text))
        elif name == "kill-start":
            self._cut(0, pos)
        elif name == "rubout-word":
            start = pos
            while start and text[start - 1].isspace():
                start -= 1
            while start and not text[start - 1].isspace():
                start -= 1
            self._cut(start, pos)
        elif name == "kill-word":
            self._cut(pos, self._word_right())
        elif name == "yank":
            self.insert(self.kill)
        elif name == "up":
            self._recall(self.browse - 1)
        elif name == "down":
            self._recall(self.browse + 1)
        elif name == "search":
            self.search = ""
            self.before_search = (text, pos)
            self.found = len(self.history)
        return None

    def accept(self) -> str:
        """The line is done: it goes into the history and the editor is empty."""
        line = self.text
        self.added = bool(line.strip()) and (not self.history or self.history[-1] != line)
        if self.added:
            self.history.append(line)
            del self.history[:-HISTORY_KEPT]
        self.text, self.pos, self.draft = "", 0, ""
        self.browse = len(self.history)
        return line

    def _recall(self, index: int) -> None:
        if not 0 <= index <= len(self.history) or index == self.browse:
            return
        if self.browse == len(self.history):
            self.draft = self.text
        self.browse = index
        self.text = self.history[index] if index < len(self.history) else self.draft
        self.pos = len(self.text)

    def _find(self, before: int) -> None:
        query = self.search or ""
        for index in range(min(before, len(self.history)) - 1, -1, -1):
            if query in self.history[index]:
                self.found = index
                self.text = self.history[index]
                self.pos = self.text.find(query)
                return

    def _search_key(self, name: str) -> bool:
        """A key during Ctrl+R; True when the search used it up."""
        if name == "search":
            self._find(self.found)
        elif name == "backspace":
            self.search = (self.search or "")[:-1]
            self._find(len(self.history))
        elif name in ("cancel", "interrupt"):
            self.search = None
            self.text, self.pos = self.before_search
        else:  # any other key takes the line found, then does what it does
            self.search = None
            self.browse = len(self.history)
            return False
        return True

    def complete(self, names: Sequence[str]) -> list[str]:
        """Tab: complete the word before the cursor from ``names`` (command
        names for a first word starting with /); returns the candidates when
        there is more than one and nothing more to add."""
        start = self.pos
        while start and not self.text[start - 1].isspace():
            start -= 1
        word = self.text[start : self.pos]
        first = not self.text[:start].strip()
        if first and word.startswith("/"):
            choices = sorted(name for name in COMMAND_NAMES if name.startswith(word.lower()))
        else:
            folded = word.casefold()
            choices = sorted({name for name in names if name.casefold().startswith(folded)})
        if not choices:
            return []
        if len(choices) == 1:
            end = ": " if first and not choices[0].startswith("/") else " "
            self.text = self.text[:start] + choices[0] + end + self.text[self.pos :]
            self.pos = start + len(choices[0]) + len(end)
            return []
        common = min(choices, key=len).casefold()
        while any(not choice.casefold().startswith(common) for choice in choices):
            common = common[:-1]
        if len(common) > len(word):
            self.text = self.text[:start] + choices[0][: len(common)] + self.text[self.pos :]
            self.pos = start + len(common)
            return []
        return choices

    # drawing

    def prompt_for(self, prompt: str) -> str:
        if self.search is not None:
            return "(reverse-i-search)`%s': " % sanitize(self.search)
        return prompt

    def render(self, prompt: str, width: int, style: str = "", max_rows: int = 0) -> str:
        """Draw the prompt and the text from the region's first row, with the
        cursor left where it belongs; records the cursor's row. A line taller
        than ``max_rows`` shows the rows around the cursor only: the region
        never scrolls the screen by more than it can take back."""
        width = max(width, 2)
        rows: list[list[str]] = [[style] if style else []]
        styled = bool(style)
        col = 0
        cursor: tuple[int, int] | None = None
        pieces = [(cluster, -1) for cluster in clusters(self.prompt_for(prompt))]
        index = 0
        for cluster in clusters(self.text):
            pieces.append((cluster, index))
            index += len(cluster)
        for cluster, at in pieces:
            if at == 0 and styled:
                rows[-1].append(RESET)
                styled = False
            cols = min(cluster_width(cluster), width)
            if col + cols > width:
                if styled:
                    rows[-1].append(RESET)
                rows.append([style] if styled else [])
                col = 0
            if at == self.pos and cursor is None:
                cursor = (len(rows) - 1, col)
            rows[-1].append(cluster)
            col += cols
        if styled:
            rows[-1].append(RESET)
        if col >= width:  # exactly full: go to the next row ourselves
            rows.append([])
            col = 0
        if cursor is None:
            cursor = (len(rows) - 1, col)
        first = 0
        if 0 < max_rows < len(rows):
            first = max(cursor[0] - max_rows + 1, 0)
            rows = rows[first : first + max_rows]
        row = cursor[0] - first
        out = ["\r\n".join("".join(each) for each in rows)]
        if len(rows) - 1 > row:
            out.append("\x1b[%dA" % (len(rows) - 1 - row))
        out.append("\r")
        if cursor[1]:
            out.append("\x1b[%dC" % cursor[1])
        self.cursor_row = row
        self.drawn = True
        return "".join(out)

    def clear(self) -> str:
        """What takes the region away, leaving the cursor at its first row's start."""
        if not self.drawn:
            return ""
        self.drawn = False
        up = "\x1b[%dA" % self.cursor_row if self.cursor_row else ""
        self.cursor_row = 0
        return up + "\r\x1b[J"


# -- the terminal ---------------------------------------------------------

Message = Tuple[Runs, Runs]  # (head, body): wrapped body rows continue under the body


class Terminal:
    """Everything the client writes goes through here.

    ``full``: a terminal that takes cursor movements; the editor's region (the
    prompt and the typed text, and the reconnection status above it) stays at
    the bottom and every message is printed above it. ``dumb``: the typed text
    is echoed as it is, with no cursor movement; a message that arrives while
    a line is half typed starts on a new line, and the text is echoed again
    below it. ``plain``: lines only (pipe mode, output in a file).
    Messages shown in one turn of the loop are written together by ``flush()``.
    """

    def __init__(self, mode: str, editor: LineEditor | None = None) -> None:
        self.mode = mode
        self.editor = editor if editor is not None else LineEditor()
        self.active = False  # the region is on screen (between start() and stop())
        self.prompt = ""
        self.prompt_style = ""
        self.width, self.height = 80, 24
        self.status_rows = 0  # rows of the status line directly above the region
        self._queued: list[str] = []  # rows of the messages of this turn
        self._echoed = ""  # dumb: what of the typed line is on screen
        if mode == "full":
            self.measure()

    def measure(self) -> None:
        try:
            size = os.get_terminal_size(sys.stdout.fileno())
            self.width, self.height = max(size.columns, 2), max(size.lines, 2)
        except (OSError, ValueError, AttributeError):
            pass

    @staticmethod
    def write(text: str) -> None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (OSError, ValueError):  # stdout closed (for example `| head`)
            pass

    def _rows(self, runs: Runs, indent: int = 0) -> list[str]:
        if self.mode != "full":  # the terminal wraps (or it is a file)
            return ["".join(style + text + RESET if style else text for style, text in runs)]
        return wrap_runs(runs, self.width, indent)

    def show(self, message: Message, bell: bool = False) -> None:
        head, body = message
        indent = text_width(plain(head)) if self.mode == "full" else 0
        rows = self._rows(head + body, indent)
        if bell:
            rows[-1] += BELL
        self._queued += rows
        if not self.active:
            self.flush()

    def flush(self) -> None:
        """Write the messages of this turn above the region, and the region again."""
        if not self._queued:
            return
        rows, self._queued = self._queued, []
        newline = "\n" if self.mode == "plain" else "\r\n"  # raw mode: no output processing
        text = newline.join(rows) + newline
        if self.mode == "full" and self.active:
            self.status_rows = 0
            self.write(self.editor.clear() + text + self._region())
        elif self.mode == "dumb" and self.active and self._echoed:
            self.write("\r\n" + text + self._echoed)
        else:
            self.write(text)

    def status(self, runs: Runs) -> None:
        """A line that the next status replaces, while nothing came between."""
        self.flush()
        if self.mode != "full" or not self.active:
            self.show((runs, []))
            return
        rows = wrap_runs(runs, self.width)
        up = "\x1b[%dA\r\x1b[J" % self.status_rows if self.status_rows else ""
        self.write(self.editor.clear() + up + "\r\n".join(rows) + "\r\n" + self._region())
        self.status_rows = len(rows)

    def _region(self) -> str:
        return self.editor.render(self.prompt, self.width, self.prompt_style, self.height - 1)

    def redraw(self) -> None:
        """The typed line changed: draw it again (dumb: echo what changed)."""
        if not self.active:
            return
        if self.mode == "full":
            self.write(self.editor.clear() + self._region())
        elif self.mode == "dumb":
            text = self.editor.text
            if text.startswith(self._echoed):
                self.write(text[len(self._echoed) :])
            elif self._echoed.startswith(text):  # rubbed out at the end: backspaces
                self.write("\b \b" * text_width(self._echoed[len(text) :]))
            else:  # no cursor movement: the corrected line goes on a line of its own
                self.write("\r\n" + text)
            self._echoed = text

    def line_done(self) -> None:
        """Enter was pressed: the line goes away (its sent copy is shown as a message)."""
        if self.mode == "dumb" and self.active:
            self.write("\r\n" if self._echoed else "")
            self._echoed = ""
        else:
            self.redraw()

    def resize(self) -> None:
        if self.mode != "full":
            return
        clear = self.editor.clear() if self.active else ""
        self.measure()
        self.status_rows = 0  # its rows may have changed: the next status goes below it
        if self.active:
            self.write(clear + self._region())

    def suspend(self) -> None:
        """Ctrl+Z: the line goes, the terminal is left as the shell wants it."""
        self.flush()
        if self.mode == "full" and self.active:
            self.write(self.editor.clear() + "\x1b[?2004l")

    def resume(self) -> None:
        if self.mode == "full" and self.active:
            self.measure()
            self.write(self.editor.clear() + "\x1b[?2004h" + self._region())

    def clear_screen(self) -> None:
        """Ctrl+L: what is on the screen scrolls up into the scrollback."""
        if self.mode == "full" and self.active:
            self.write(self.editor.clear() + "\n" * (self.height - 1) + "\x1b[H" + self._region())

    def set_prompt(self, prompt: str, style: str = "") -> None:
        if (prompt, style) != (self.prompt, self.prompt_style):
            self.prompt, self.prompt_style = prompt, style
            if self.mode == "full":
                self.redraw()

    def start(self) -> None:
        self.active = True
        if self.mode == "full":
            self.write("\x1b[?2004h" + self._region())

    def stop(self) -> None:
        """Take the region away (a half-typed line is not left on the screen)."""
        self.flush()
        if self.active and self.mode == "full":
            self.write(self.editor.clear() + "\x1b[?2004l")
        elif self.active and self.mode == "dumb" and self._echoed:
            self.write("\r\n")
            self._echoed = ""
        self.active = False


def history_path() -> str | None:
    """Where the typed lines are kept: $SELCHAT_HISTORY (empty: nowhere), else
    selchat/history under $XDG_STATE_HOME or ~/.local/state."""
    path = os.environ.get("SELCHAT_HISTORY")
    if path is not None:
        return path or None
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(state, "selchat", "history")


def load_history(path: str | None) -> list[str]:
    """The last HISTORY_KEPT lines of the history file; a file grown to twice
    that is cut back to them."""
    if path is None:
        return []
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = [line.rstrip("\n") for line in file]
    except OSError:
        return []
    if len(lines) > 2 * HISTORY_KEPT:
        _write_history(path, lines[-HISTORY_KEPT:])
    return lines[-HISTORY_KEPT:]


def _write_history(path: str, lines: list[str]) -> None:
    try:
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8", errors="replace") as file:
            file.writelines(line + "\n" for line in lines)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


def remember(path: str | None, line: str) -> None:
    """Add a line to the history file at once: several clients at a time each
    add theirs, and a client that is killed has kept what it sent."""
    if path is None or (line.split(None, 1) or [""])[0].lower() in SECRET_COMMANDS:
        return
    try:
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with open(fd, "w", encoding="utf-8", errors="replace") as file:
            file.write(line + "\n")
    except OSError:
        pass


# Raw mode: keys one by one, without echo, signals from keys or output processing.
def _raw_mode(fd: int) -> Any:
    import termios

    saved = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[0] &= ~(termios.ICRNL | termios.INLCR | termios.IXON)
    mode[1] &= ~termios.OPOST  # what is written is what the terminal gets: CR LF where meant
    mode[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
    mode[6][termios.VMIN] = 1
    mode[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSADRAIN, mode)
    return saved


# -- the client -----------------------------------------------------------

_LOOP_SIGNALS = ("SIGWINCH", "SIGINT", "SIGTERM", "SIGHUP", "SIGTSTP", "SIGCONT")


class ChatClient:
    """Connects, sends what the user types, shows what arrives: one selector
    loop over the socket, the keyboard and the signals.

    In a terminal it also reconnects, with backoff, when a connection it had
    joined on is lost without the server's shutdown notice; the reconnection
    runs inside the loop (a non-blocking connect and timers), so typing goes on.
    """

    def __init__(
        self,
        host: str,
        port: int,
        nick: str,
        color: bool,
        interactive: bool,
        tls_context: Any = None,
        password: str | None = None,
        reconnect: bool = False,
        bell: bool = False,
        mode: str = "plain",
        palette: Sequence[str] = NICK_COLORS,
        history_file: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.nick = nick
        self.tls_context = tls_context
        self.password = password
        self.interactive = interactive
        self.reconnect = reconnect and interactive  # pipe mode never reconnects
        self.bell = bell and interactive
        # The server's message rate, from its welcome: we keep under it.
        self.pace = TokenBucket(0.0, 1.0, 0.0)
        self.history_file = history_file
        self.editor = LineEditor(load_history(history_file) if mode != "plain" else [])
        self.screen = Terminal(mode, self.editor)
        self.formatter = Formatter(color, palette)
        self.keys = KeyReader()
        self.sock: Any = None
        self._decoder = FrameDecoder(CLIENT_MAX_FRAME)
        self._early: list[bytes] = []  # frames read with the welcome
        self.selector: selectors.BaseSelector | None = None
        # connected; after a loss: waiting (to reconnect), connecting, handshake (TLS), joining
        self.state = "connected"
        self.joined = False  # welcomed at least once
        self.welcomed = False  # welcomed on the current connection
        self.replaying = False  # between the history markers
        self._held_begin: str | None = None  # history marker, shown with the first new message
        self.seen: collections.deque[int] = collections.deque(maxlen=SEEN_MEMORY)
        self.known: dict[str, str] = {}  # nicknames seen, by casefold, for Tab
        self.last_notice = ""
        self.lines: collections.deque[str] = collections.deque()  # typed, not yet framed
        self.out: collections.deque[list[Any]] = collections.deque()  # [bytes left, own message]
        self.failures = 0
        self.retry_at = 0.0
        self.attempt_deadline = 0.0
        self.addresses: list[Any] = []
        self.leaving = False
        self.shut = False  # our side of the socket is shut: the server has it all
        self.leave_deadline = 0.0
        self.done = False
        self.status = 0
        self.failure: str | None = None
        self.stdin_fd = -1
        self.stdin_eof = False
        self.stdin_on = False
        self._line_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""
        self._console: socket.socket | None = None  # Windows: the console thread's end
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._old_handlers: dict[int, Any] = {}
        self.saved_terminal: Any = None
        self.raw = mode != "plain"

    @property
    def where(self) -> str:
        return "%s:%d" % ("[%s]" % self.host if ":" in self.host else self.host, self.port)

    # -- joining, before the loop -----------------------------------------

    def connect(self, ask: bool = True) -> None:
        """Connect (with TLS when asked), send the nickname and, when the server
        asks for one, the password (asked for on the terminal when ``ask``)."""
        sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls_context is not None:
            sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
        sock.sendall(encode_frame(self.nick.encode("utf-8", "surrogatepass")))
        decoder = FrameDecoder(CLIENT_MAX_FRAME)
        self._decoder = decoder
        frames: list[bytes] = []
        while not frames:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            frames = decoder.feed(data)
        if frames[0] == PASSWORD_REQUEST.encode():
            password = self.password
            if password is None and ask:
                password = _ask_password()
                if password is not None:
                    # A person may type for longer than the server's handshake
                    # timeout: start again on a new connection, password known.
                    self.password = password
                    sock.close()
                    self.connect(ask=False)
                    return
            if password is None:
                raise ConnectionError(
                    "the server wants a password: give --password or set SELCHAT_PASSWORD"
                )
            self.password = password  # for reconnecting, which never asks
            sock.sendall(encode_frame(password.encode("utf-8", "surrogatepass")))
            frames = frames[1:]
        self._early = frames

    def _await_welcome(self) -> bool:
        """Show what comes until the welcome (True) or the server closes (False)."""
        sock = self.sock
        frames, self._early = self._early, []
        deadline = time.monotonic() + CONNECT_TIMEOUT  # a server that trickles is no welcome
        while True:
            for index, payload in enumerate(frames):
                self._on_payload(payload)
                if self.welcomed:
                    self._early = frames[index + 1 :]
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                return False
            frames = self._decoder.feed(data)

    def join(self) -> bool:
        """Connect and join; an interactive user whose nickname is taken or whose
        password is wrong is asked again. False (and a line on stderr) on failure."""
        while True:
            try:
                self.connect()
                if self._await_welcome():
                    return True
            except (OSError, ProtocolError) as exc:
                if not self.last_notice:  # no reason from the server: it is the network's
                    self._close_socket()
                    _fail("cannot connect to %s: %s" % (self.where, _connect_reason(exc)))
                    self.status = 1
                    return False
            self._close_socket()
            if not self.interactive or not self._second_chance():
                break
        self.status = 1
        if self.last_notice:
            _fail(
                "connection to %s refused by the server: %s"
                % (self.where, sanitize(self.last_notice))
            )
        return False

    def _second_chance(self) -> bool:
        """Ask again for what the server turned down; False when the user gives up
        (or it is not something to ask again)."""
        notice = self.last_notice
        if notice.startswith("Nickname rejected"):
            what, answer = "nickname", _ask_nick(self.where)
            if answer is not None:
                self.nick = answer
        elif notice.startswith("Wrong password"):
            what, answer = "password", _ask_password()
            if answer is not None:
                self.password = answer
        else:
            return False
        self.last_notice = ""
        if answer is None:  # the reason is on the screen already: not twice
            _fail("cannot join %s: no %s given" % (self.where, what))
        return answer is not None

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        if not self.join():
            return self.status
        self._start()
        try:
            for payload in self._early:
                self._on_payload(payload)
            self._early = []
            self.screen.flush()
            while not self.done:
                self._turn()
        except KeyboardInterrupt:  # a signal before our handlers, or on Windows
            pass
        finally:
            self._finish()
        if self.failure:
            _fail("connection to %s %s" % (self.where, self.failure))
        return self.status

    def _turn(self) -> None:
        """One turn of the loop: wait for the socket, the keyboard, a signal or
        the next timer; handle what came; then the timers."""
        assert self.selector is not None
        for key, mask in self.selector.select(self._timeout()):
            key.data(mask)
            if self.done:
                return
        self._tick()

    def _start(self) -> None:
        selector = self.selector = selectors.DefaultSelector()
        self.sock.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ, self._on_socket)
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        selector.register(self._wake_r, selectors.EVENT_READ, self._on_signal)
        try:
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            for name in _LOOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._old_handlers[number] = signal.signal(number, _note_signal)
        except (ValueError, OSError):  # not the main thread
            pass
        if sys.platform == "win32" or (not self.raw and self.interactive and not _has_termios()):
            self._start_console()
        else:
            self.stdin_fd = sys.stdin.fileno()
        if self.raw:
            try:
                self.saved_terminal = _raw_mode(self.stdin_fd)
            except Exception:  # noqa: BLE001 - no termios after all: read lines
                self.raw = False
        self._stdin(True)
        self._update_prompt()
        self.screen.start()

    def _start_console(self) -> None:
        """Windows has no select() on the console: a thread reads it into a socket pair."""
        ours, theirs = socket.socketpair()
        self._console = ours

        def pump() -> None:
            try:
                while True:
                    line = sys.stdin.readline()
                    if not line:
                        break
                    theirs.sendall(line.encode("utf-8", "replace"))
            except (OSError, ValueError):
                pass
            theirs.close()

        threading.Thread(target=pump, name="console", daemon=True).start()

    def _stdin(self, on: bool) -> None:
        """Read the keyboard (or the input lines), or stop reading it for now."""
        if self.selector is None or on == self.stdin_on or (on and self.stdin_eof):
            return
        source: Any = self._console if self._console is not None else self.stdin_fd
        if on:
            self.selector.register(source, selectors.EVENT_READ, self._on_input)
        else:
            self.selector.unregister(source)
        self.stdin_on = on

    def _finish(self) -> None:
        self.screen.stop()
        if self.saved_terminal is not None:
            _restore_terminal(self.saved_terminal)
            self.saved_terminal = None
        try:
            signal.set_wakeup_fd(-1)
            for number, handler in self._old_handlers.items():
                signal.signal(number, handler)
        except (ValueError, OSError, TypeError):
            pass
        self._close_socket()
        for end in (self._wake_r, self._wake_w, self._console):
            if end is not None:
                end.close()
        if self.selector is not None:
            self.selector.close()

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = []
        if self.keys.waiting:
            deadlines.append(self.keys.since + ESCAPE_WAIT)
        if self.state == "waiting":
            left = self.retry_at - now
            deadlines.append(now + min(left, left - math.floor(left) or 1.0))
        elif self.state in ("connecting", "handshake", "joining"):
            deadlines.append(self.attempt_deadline)
        if self.lines and self.state == "connected" and self.pace.rate:
            deadlines.append(now + self.pace.wait(now))
        if self.leaving and self.leave_deadline:
            deadlines.append(self.leave_deadline)
        if sys.platform == "win32":
            deadlines.append(now + 0.5)
        return max(min(deadlines) - now, 0.0) if deadlines else None

    def _tick(self) -> None:
        """Timers, pacing and what the turn showed."""
        now = time.monotonic()
        if self.keys.waiting and now >= self.keys.since + ESCAPE_WAIT:
            self._keys(self.keys.flush())
        if self.state == "waiting" and now >= self.retry_at:
            self._attempt()
        elif self.state in ("connecting", "handshake", "joining") and now >= self.attempt_deadline:
            self._attempt_failed(socket.timeout("timed out"))
        self._pump()
        if self.leaving and not self.shut and not self.lines and not self.out:
            self._shut()
        if self.leaving and self.leave_deadline and now >= self.leave_deadline:
            self._end(0, None)
        self._stdin(not self.leaving and len(self.lines) < 256)
        self._update_prompt()
        self.screen.flush()

    def _end(self, status: int, failure: str | None) -> None:
        self.status = status
        self.failure = failure
        self.done = True

    # -- signals -----------------------------------------------------------

    def _on_signal(self, mask: int) -> None:
        assert self._wake_r is not None
        try:
            numbers = self._wake_r.recv(512)
        except OSError:
            return
        for number in numbers:
            name = _signal_name(number)
            if name == "SIGWINCH":
                self.screen.resize()
            elif name in ("SIGINT", "SIGTERM", "SIGHUP"):
                self._leave()
            elif name == "SIGTSTP":
                self._suspend()
            elif name == "SIGCONT":
                self._resume()

    def _suspend(self) -> None:
        """Ctrl+Z: give the terminal back as it was, stop; ``fg`` resumes."""
        self.screen.suspend()
        if self.saved_terminal is not None:
            _restore_terminal(self.saved_terminal)
        os.kill(os.getpid(), signal.SIGSTOP)
        self._resume()

    def _resume(self) -> None:
        """After ``fg`` (SIGCONT): raw mode again, and the line drawn again."""
        if self.raw and self.stdin_fd >= 0:
            try:
                saved = _raw_mode(self.stdin_fd)
            except Exception:  # noqa: BLE001 - the terminal has gone
                return
            if self.saved_terminal is None:
                self.saved_terminal = saved
        self.screen.resume()

    # -- the keyboard and the input lines ----------------------------------

    def _on_input(self, mask: int) -> None:
        try:
            if self._console is not None:
                data = self._console.recv(65536)
            else:
                data = os.read(self.stdin_fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.stdin_eof = True
            self._stdin(False)
        if self.raw:
            if data:
                self._keys(self.keys.feed(data, time.monotonic()))
            else:
                self._leave()
            return
        text = self._partial + self._line_decoder.decode(data, not data)
        lines = text.split("\n")
        self._partial = lines.pop()  # not ended yet
        if not data and self._partial:  # the last line, without its newline
            lines.append(self._partial)
            self._partial = ""
        for line in lines:
            if self.leaving:
                return
            self._submit(line.rstrip("\r"))
        if not data:
            self._leave()

    def _keys(self, keys: list[Key]) -> None:
        editor = self.editor
        for kind, value in keys:
            if self.leaving:
                return
            if kind == "text":
                editor.insert(value)
            elif kind == "paste":
                self._paste(value)
                continue
            elif (value == "interrupt" and editor.search is None) or (
                value == "eof" and not editor.text
            ):
                self._leave()
                return
            elif value == "suspend":
                self._suspend()
                continue
            elif value == "clear":
                self.screen.clear_screen()
                continue
            elif value == "complete":
                choices = editor.complete(list(self.known.values()))
                if choices:
                    self.screen.show(([("", "  ".join(shown_nick(c) for c in choices))], []))
            else:
                line = editor.key(value)
                if line is not None:
                    self.screen.line_done()
                    self._entered(line)
                    continue
            self.screen.redraw()

    def _paste(self, text: str) -> None:
        """A paste: every line but the last is sent, in order; the last stays typed."""
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if len(lines) == 1:
            self.editor.insert(lines[0])
            self.screen.redraw()
            return
        self.editor.insert(lines[0])
        first = self.editor.accept()
        self.screen.line_done()
        self._entered(first)
        for line in lines[1:-1]:
            self._submit(line)
        self.editor.insert(lines[-1])
        self.screen.redraw()

    def _entered(self, line: str) -> None:
        """A line entered at the keyboard: into the history file, then sent."""
        if self.editor.added:
            remember(self.history_file, line)
        self._submit(line)

    def _submit(self, line: str) -> None:
        """A line typed (or read): leave, or send it when connected."""
        if line.strip() in (QUIT_COMMAND, "/quit", "/exit"):
            self._leave()
            return
        if not line.strip():
            return
        if self.state != "connected":
            self.screen.show(
                self._notice("Not sent: not connected. Type %s to leave." % QUIT_COMMAND)
            )
            return
        self.lines.append(line)
        self._pump()

    def _leave(self) -> None:
        """Leave: what was typed goes out, the server closes, the client exits."""
        if self.leaving:
            return
        self.leaving = True
        self._stdin(False)
        self.screen.stop()
        if self.state != "connected":
            self._end(0, None)
        elif self.interactive:  # a person leaving waits this long at most, sent or not
            self.leave_deadline = time.monotonic() + LEAVE_WAIT

    def _shut(self) -> None:
        self.shut = True
        if not self.leave_deadline:  # pipe mode: once all is sent, for the server to close
            self.leave_deadline = time.monotonic() + PIPE_LEAVE_WAIT
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except (OSError, AttributeError):
            self._end(0, None)

    # -- sending -----------------------------------------------------------

    def _learn_limit(self, welcome: str) -> None:
        welcome = welcome.split(" Topic: ", 1)[0]  # the topic is anyone's text
        match = re.search(r"Limit: ([0-9.]+) messages a second, bursts of ([0-9]+)", welcome)
        if not match:
            return
        try:
            rate, burst = float(match.group(1)), float(match.group(2))
        except ValueError:  # "1.2.3": a server that cannot count gets no pacing
            return
        # A little under the server's figures, for the clocks' sake; and never
        # so slow that a line waits for more than MAX_PACE seconds.
        self.pace = TokenBucket(
            max(rate * 0.9, 1.0 / MAX_PACE) if rate else 0.0,
            min(max(burst * 0.9, 1.0), 1e6),
            time.monotonic(),
        )

    def _pump(self) -> None:
        """Frame the lines the server's rate allows now (a paste or a piped
        file is sent a little slower rather than dropped), and send."""
        if self.state != "connected":
            return
        now = time.monotonic()
        while self.lines and self.pace.take(now):
            self.out.append(self._frame(self.lines.popleft()))
        self._send()

    def _frame(self, line: str) -> list[Any]:
        """A line as a frame: a command when it starts with one /, else a chat
        message (``//text`` sends ``/text``), with the message to show once sent."""
        if line.startswith("/") and not line.startswith("//"):
            return [encode_frame(line.encode("utf-8", "surrogatepass")), None]
        text = line[1:] if line.startswith("//") else line
        stamp = now_stamp()
        payload = "\0".join((stamp, self.nick, text)).encode("utf-8", "surrogatepass")
        if self.reconnect:
            self.seen.append(hash(payload))
        return [encode_frame(payload), (stamp, text)]

    def _send(self) -> None:
        sock = self.sock
        while self.out and sock is not None:
            item = self.out[0]
            try:
                sent = sock.send(item[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.__class__.__name__ in ("SSLWantWriteError", "SSLWantReadError"):
                    break
                self._lost(_reason(exc))
                return
            item[0] = item[0][sent:]
            if item[0]:
                break
            self.out.popleft()
            if item[1] is not None and not self.done:  # our own message, handed over
                stamp, text = item[1]
                self.screen.show(self.formatter.chat(stamp, self.nick, fold(text), own=True))
        self._watch(bool(self.out))

    def _watch(self, write: bool) -> None:
        if self.selector is None or self.sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            if self.selector.get_key(self.sock).events != events:
                self.selector.modify(self.sock, events, self._on_socket)
        except (KeyError, ValueError):
            pass

    # -- receiving ---------------------------------------------------------

    def _on_socket(self, mask: int) -> None:
        if self.state == "connecting":
            self._connected()
            return
        if self.state == "handshake":
            self._handshake()
            return
        if mask & selectors.EVENT_WRITE:
            self._send()
        if mask & selectors.EVENT_READ:
            self._receive()

    def _receive(self) -> None:
        sock = self.sock
        for _ in range(16):  # at most 1 MiB a turn: the keyboard gets its turn too
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.__class__.__name__ == "SSLWantReadError":
                    return
                if exc.__class__.__name__ == "SSLEOFError":
                    data = b""
                else:
                    self._lost(_reason(exc))
                    return
            if not data:
                self._lost("the server closed the connection")
                return
            try:
                for payload in self._decoder.feed(data):
                    self._on_payload(payload)
                    if self.sock is not sock or self.done:
                        return
            except ProtocolError as exc:
                self._lost("protocol error: %s" % exc)
                return
            if len(data) < 65536 and not (hasattr(sock, "pending") and sock.pending()):
                return

    def _notice(self, text: str, more: bool = False) -> Message:
        """A service message with the time it arrived (``more``: a line after
        the first of one, under it)."""
        stamp = "[%s] " % time.strftime("%H:%M:%S") if self.screen.mode != "plain" else ""
        if more:
            stamp = " " * len(stamp)
        runs = self.formatter.notice(text, stamp)
        return runs[:-1], runs[-1:]  # wrapped rows continue under the text

    def _on_payload(self, payload: bytes) -> None:
        if self.state == "joining" and payload == PASSWORD_REQUEST.encode():
            if self.password is None:
                self._attempt_failed(ConnectionError("the server wants a password"))
            else:
                self._queue_first(self.password)
            return
        stamp, field, text = unpack_message(payload)
        if stamp is None or field is None:
            self._on_notice(text)
            return
        if self.reconnect:
            key = hash(payload)
            if self.replaying and key in self.seen:
                return  # shown before the connection was lost
            self.seen.append(key)
        if self._held_begin is not None:
            self.screen.show(self._notice(self._held_begin))
            self._held_begin = None
        kind, nick, other = read_nick_field(field)
        for name in (nick, other):
            if name and name.casefold() != self.nick.casefold():
                self.known[name.casefold()] = name
        mine = nick.casefold() == self.nick.casefold()
        shown = fold(text)
        mentions = [] if mine else find_mentions(shown, self.nick)
        ring = (
            self.bell and not self.replaying and bool(mentions or (kind == "private" and not mine))
        )
        self.screen.show(self.formatter.chat(stamp, field, shown, mentions), bell=ring)

    def _on_notice(self, text: str) -> None:
        if not self.welcomed and QUIT_COMMAND in text:  # the welcome says how to leave
            self.joined = self.welcomed = True
            self.failures = 0
            if self.state == "joining":
                self.state = "connected"
                self.screen.status_rows = 0  # the last status stays, as a record
            self._learn_limit(text)
        elif not self.replaying and _is_history_begin(text):
            # Held back until a message follows it: after a reconnect every
            # replayed message may have been shown already.
            self.replaying = True
            self._held_begin = text
            return
        elif self.replaying and text == HISTORY_END:
            self.replaying = False
            held, self._held_begin = self._held_begin, None
            if held is not None:
                return
        elif text.startswith(RENAMED):
            self.nick = text[len(RENAMED) :]
        arrived, left = names_in_notice(text)
        for name in arrived:
            if name.casefold() != self.nick.casefold():
                self.known[name.casefold()] = name
        for name in left:
            self.known.pop(name.casefold(), None)
        self.last_notice = text
        lines = split_notice(fold(text)) if self.screen.mode != "plain" else [fold(text)]
        for index, line in enumerate(lines):
            self.screen.show(self._notice(line, more=index > 0))
        if text == SHUTDOWN_NOTICE:  # nothing more is shown after the goodbye
            self._goodbye()

    def _goodbye(self) -> None:
        unsent = len(self.lines) + sum(1 for item in self.out if item[1] is not None)
        if not self.interactive and not self.stdin_eof:
            unsent += self._unread_lines()
        self.lines.clear()
        self.out.clear()
        if unsent:
            _fail(
                "the server at %s said goodbye before %s went out"
                % (self.where, plural(unsent, "line"))
            )
        self._end(1 if unsent and not self.interactive else 0, None)

    def _unread_lines(self) -> int:
        """Pipe mode: how many lines already waiting on stdin will never be sent."""
        count = 1 if self._partial.strip() else 0
        try:
            while select.select([self.stdin_fd], [], [], 0)[0]:
                data = os.read(self.stdin_fd, 65536)
                if not data:
                    break
                count += sum(1 for line in data.split(b"\n") if line.strip())
        except (OSError, ValueError):
            pass
        return count

    # -- losing the connection, and reconnecting -------------------------

    def _lost(self, reason: str) -> None:
        self._close_socket()
        unsent = len(self.lines) + sum(1 for item in self.out if item[1] is not None)
        self.lines.clear()
        self.out.clear()
        if self.leaving and self.state == "connected":
            self._end(0, None)
            return
        if not self.reconnect:
            self._end(1, "lost: %s" % reason)
            return
        if unsent:
            self.screen.show(
                self._notice("Not sent: the connection was lost (%s)" % plural(unsent, "line"))
            )
        if self.state == "connected" and self.welcomed:
            self.failures = 0
            why = "Connection to %s lost: %s." % (self.where, reason)
        else:
            self.failures += 1
            why = "Cannot rejoin %s: %s." % (self.where, reason)
        self._wait(why)

    def _wait(self, why: str) -> None:
        delay = min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** min(self.failures, 16))
        delay *= random.uniform(0.8, 1.2)  # a restarted server is not hit by all at once
        self.state = "waiting"
        self.welcomed = False
        self.retry_at = time.monotonic() + delay
        self.screen.status(
            self.formatter.notice(
                "%s Reconnecting in %.1f s; type %s to leave." % (why, delay, QUIT_COMMAND)
            )
        )

    def _attempt(self) -> None:
        """Start connecting again, without waiting for it."""
        self.state = "connecting"
        self.attempt_deadline = time.monotonic() + CONNECT_TIMEOUT
        try:
            if not self.addresses:
                self.addresses = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = self.addresses[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            error = sock.connect_ex(address)
        except OSError as exc:
            self._attempt_failed(exc)
            return
        self.sock = sock
        if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._attempt_failed(OSError(error, os.strerror(error)))
            return
        assert self.selector is not None
        self.selector.register(sock, selectors.EVENT_WRITE, self._on_socket)

    def _connected(self) -> None:
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._attempt_failed(OSError(error, os.strerror(error)))
            return
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls_context is None:
            self._joining()
            return
        assert self.selector is not None
        self.selector.unregister(self.sock)
        self.sock = self.tls_context.wrap_socket(
            self.sock, server_hostname=self.host, do_handshake_on_connect=False
        )
        self.selector.register(self.sock, selectors.EVENT_READ, self._on_socket)
        self.state = "handshake"
        self._handshake()

    def _handshake(self) -> None:
        try:
            self.sock.do_handshake()
        except OSError as exc:
            name = exc.__class__.__name__
            if name in ("SSLWantReadError", "SSLWantWriteError"):
                self._watch(name == "SSLWantWriteError")
                return
            self._attempt_failed(exc)
            return
        self._joining()

    def _joining(self) -> None:
        self.state = "joining"
        self._decoder = FrameDecoder(CLIENT_MAX_FRAME)
        self.last_notice = ""
        self._queue_first(self.nick)

    def _queue_first(self, text: str) -> None:
        self.out.appendleft([encode_frame(text.encode("utf-8", "surrogatepass")), None])
        self._send()

    def _attempt_failed(self, exc: BaseException) -> None:
        self._close_socket()
        self.out.clear()
        self.failures += 1
        self._wait("Cannot reconnect to %s: %s." % (self.where, _connect_reason(exc)))

    def _close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if self.selector is not None:
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _update_prompt(self) -> None:
        """Your nickname and the state of the connection, drawn in place."""
        state = self.state
        if state == "waiting":
            label = " (reconnecting in %d s)" % math.ceil(max(self.retry_at - time.monotonic(), 0))
        elif state != "connected":
            label = " (connecting)"
        else:
            label = ""
        style = "\x1b[1m" if self.formatter.color else ""
        self.screen.set_prompt(shown_nick(self.nick) + label + "> ", style)


def _note_signal(signum: int, frame: Any) -> None:
    """The loop learns of signals from the wake-up socket; nothing to do here."""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return ""


def _has_termios() -> bool:
    try:
        import termios  # noqa: F401
    except ImportError:
        return False
    return True


def _is_history_begin(text: str) -> bool:
    prefix, suffix = HISTORY_BEGIN.split("%s")
    return text.startswith(prefix) and text.endswith(suffix)


def _ask_password() -> str | None:
    """Ask on the terminal without echo; None when there is no terminal to ask on."""
    if not sys.stdin.isatty():
        return None
    import getpass

    try:
        return getpass.getpass("Password: ")
    except (EOFError, KeyboardInterrupt):
        return None


# What OpenSSL says when the other end answers a TLS handshake in plain text.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}


def _connect_reason(exc: BaseException) -> str:
    """Why the client could not connect."""
    if getattr(exc, "reason", None) in _NOT_TLS:
        return "the server does not speak TLS (connect without --tls)"
    return _reason(exc)


def _reason(exc: BaseException) -> str:
    verify = getattr(exc, "verify_message", None)  # ssl.SSLCertVerificationError
    if verify:
        return "certificate verify failed: %s" % verify
    if isinstance(exc, socket.gaierror):
        return "cannot resolve host name (%s)" % exc.strerror
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or exc.__class__.__name__


def _fail(message: str) -> None:
    try:
        sys.stderr.write("selchat: %s\n" % message)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # closed or replaced
        return False


def _can_redraw() -> bool:
    """Whether stdout is a terminal that understands cursor movements."""
    return _isatty(sys.stdout) and os.environ.get("TERM", "") != "dumb"


def use_color(no_color_flag: bool, stream: Any = None) -> bool:
    """Colour rules: NO_COLOR and --no-color win, FORCE_COLOR forces, else a
    terminal that is not dumb."""
    if no_color_flag or os.environ.get("NO_COLOR"):
        return False
    force = os.environ.get("FORCE_COLOR", "")
    if force and force != "0":
        return True
    stream = stream or sys.stdout
    return bool(stream.isatty()) and os.environ.get("TERM", "") != "dumb"


def color_palette() -> Sequence[str]:
    """256 nickname colours where the terminal says it has them, else 15."""
    if "256color" in os.environ.get("TERM", "") or os.environ.get("COLORTERM"):
        return NICK_COLORS_256
    return NICK_COLORS


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


_Number = TypeVar("_Number", int, float)


def _convert(text: str, convert: Callable[[str], _Number], what: str) -> _Number:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not %s" % (text, what)) from None


def _port(text: str) -> int:
    port = _convert(text, int, "a port number")
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("port must be 0 to 65535")
    return port


def _non_negative(text: str) -> int:
    value = _convert(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if not value:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    value = _convert(text, float, "a number")
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _seconds(text: str) -> float:
    value = _convert(text, float, "a number of seconds")
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    env_host = os.environ.get("SELCHAT_HOST")
    env_port = os.environ.get("SELCHAT_PORT")
    # "selchat" when started as the command that `pip install` makes.
    installed = os.path.basename(sys.argv[0]).lower() in ("selchat", "selchat.exe")
    parser = argparse.ArgumentParser(
        prog="selchat" if installed else "selchat.py",
        formatter_class=_HelpFormatter,
        description="A console chat: one file that is both the server and the client.",
        epilog="examples:\n  python selchat.py server\n"
        "  python selchat.py client --nick alice\n\n"
        "SELCHAT_HOST and SELCHAT_PORT, when set, replace the default host and port.",
    )
    parser.add_argument("--version", action="version", version="selchat " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="{server,client}")
    commands.required = True

    server = commands.add_parser(
        "server",
        formatter_class=_HelpFormatter,
        help="run the chat server",
        description="Run the chat server until Ctrl+C or SIGTERM.",
        epilog="example:\n  python selchat.py server --port 9009\n"
        "  python selchat.py server --host 127.0.0.1 --port 0   # any free port\n"
        "  python selchat.py server --redis redis://redis-host:6379/0   # one room, many servers",
    )
    server.add_argument(
        "--host",
        default=env_host if env_host is not None else DEFAULT_HOST,
        help="address to listen on (default: all interfaces; $SELCHAT_HOST)",
    )
    server.add_argument(
        "--port",
        type=_port,
        default=env_port or DEFAULT_PORT,
        help="port to listen on, 0 for any free one (default: %d; $SELCHAT_PORT)" % DEFAULT_PORT,
    )
    server.add_argument(
        "--max-message",
        type=_non_negative,
        default=DEFAULT_MAX_MESSAGE,
        metavar="BYTES",
        help="longest accepted message payload, 0 for no limit but the "
        "header's (default: %d)" % DEFAULT_MAX_MESSAGE,
    )
    server.add_argument(
        "--max-queue",
        type=_non_negative,
        default=0,
        metavar="BYTES",
        help="unsent output held for one client before it is disconnected "
        "(default: %d or twice --max-message, whichever is larger)" % DEFAULT_MAX_QUEUE,
    )
    server.add_argument(
        "--max-clients",
        type=_non_negative,
        default=DEFAULT_MAX_CLIENTS,
        metavar="N",
        help="connections at once, 0 for no limit but the open-file limit (default: %d)"
        % DEFAULT_MAX_CLIENTS,
    )
    server.add_argument(
        "--handshake-timeout",
        type=_seconds,
        metavar="SECONDS",
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        help="time a new connection has to send its nickname "
        "(and password) (default: %g)" % DEFAULT_HANDSHAKE_TIMEOUT,
    )
    server.add_argument(
        "--rate",
        type=_non_negative_float,
        default=DEFAULT_RATE,
        metavar="MSGS_PER_SECOND",
        help="messages a second one client may send, 0 for no limit; "
        "more is not relayed, and a client that keeps flooding is "
        "disconnected (default: %g)" % DEFAULT_RATE,
    )
    server.add_argument(
        "--burst",
        type=_positive,
        default=DEFAULT_BURST,
        metavar="N",
        help="messages a client may send at once before --rate applies "
        "(default: %d)" % DEFAULT_BURST,
    )
    server.add_argument(
        "--max-per-address",
        type=_non_negative,
        default=None,
        metavar="N",
        help="connections from one address, 0 for no limit (default: %d, "
        "loopback exempt)" % DEFAULT_MAX_PER_ADDRESS,
    )
    server.add_argument(
        "--max-pending",
        type=_non_negative,
        default=DEFAULT_MAX_PENDING,
        metavar="BYTES",
        help="memory for large messages still arriving, all clients "
        "together; past it new ones are refused for a while "
        "(default: %d)" % DEFAULT_MAX_PENDING,
    )
    server.add_argument(
        "--max-memory",
        type=_non_negative,
        default=DEFAULT_MAX_MEMORY,
        metavar="BYTES",
        help="everything held for peers (queued output, unfinished input, the "
        "history), all together; past it the connection holding the most is "
        "cut off, 0 for no limit (default: %d)" % DEFAULT_MAX_MEMORY,
    )
    server.add_argument(
        "--max-address-memory",
        type=_non_negative,
        default=None,
        metavar="BYTES",
        help="the same, for the connections of one address together, 0 for no "
        "limit (default: --max-memory / %d, at least twice --max-queue)" % ADDRESS_MEMORY_SHARE,
    )
    server.add_argument(
        "--byte-rate",
        type=_non_negative_float,
        default=None,
        metavar="BYTES_PER_SECOND",
        help="bytes a second one user may send, 0 for no limit (default: %d, "
        "or 0 with --rate 0)" % DEFAULT_BYTE_RATE,
    )
    server.add_argument(
        "--byte-burst",
        type=_positive,
        default=DEFAULT_BYTE_BURST,
        metavar="BYTES",
        help="bytes a user may send at once before --byte-rate applies, at least "
        "one --max-message (default: %d)" % DEFAULT_BYTE_BURST,
    )
    server.add_argument(
        "--address-rate",
        type=_non_negative_float,
        default=None,
        metavar="MSGS_PER_SECOND",
        help="messages a second from one address, all its users together, 0 for "
        "no limit; its burst is %d times --burst (default: %d times --rate)"
        % (ADDRESS_RATE_FACTOR, ADDRESS_RATE_FACTOR),
    )
    server.add_argument(
        "--address-byte-rate",
        type=_non_negative_float,
        default=None,
        metavar="BYTES_PER_SECOND",
        help="bytes a second from one address, 0 for no limit; its burst is %d "
        "times --byte-burst (default: %d times --byte-rate)"
        % (ADDRESS_RATE_FACTOR, ADDRESS_RATE_FACTOR),
    )
    server.add_argument(
        "--join-rate",
        type=_non_negative_float,
        default=DEFAULT_JOIN_RATE,
        metavar="JOINS_PER_SECOND",
        help="users a second that one address may bring into the room, 0 for no "
        "limit (default: %g)" % DEFAULT_JOIN_RATE,
    )
    server.add_argument(
        "--join-burst",
        type=_positive,
        default=DEFAULT_JOIN_BURST,
        metavar="N",
        help="users one address may bring in at once before --join-rate applies "
        "(default: %d)" % DEFAULT_JOIN_BURST,
    )
    server.add_argument(
        "--frame-timeout",
        type=_non_negative_float,
        default=DEFAULT_FRAME_TIMEOUT,
        metavar="SECONDS",
        help="a message that stops arriving for this long is dropped and its "
        "memory freed, 0 for never (default: %g)" % DEFAULT_FRAME_TIMEOUT,
    )
    server.add_argument(
        "--password-tries",
        type=_positive,
        default=DEFAULT_PASSWORD_TRIES,
        metavar="N",
        help="wrong passwords from one address before it is locked out; the "
        "lockout starts at 1 s and doubles with every further wrong one, up to "
        "%g s (default: %d)" % (PASSWORD_LOCKOUT_MAX, DEFAULT_PASSWORD_TRIES),
    )
    server.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve TLS with this certificate (PEM; may hold the key too)",
    )
    server.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    server.add_argument(
        "--password",
        default=os.environ.get("SELCHAT_PASSWORD"),
        help="password every client must give ($SELCHAT_PASSWORD; "
        "--password-file keeps it out of ps)",
    )
    server.add_argument(
        "--password-file", metavar="FILE", help="read the password from the first line of FILE"
    )
    server.add_argument(
        "--ops-password",
        default=os.environ.get("SELCHAT_OPS_PASSWORD"),
        help="password that makes a user an operator with /op PASSWORD: /kick, /ban, "
        "/unban, /bans and /topic TEXT ($SELCHAT_OPS_PASSWORD; --ops-password-file "
        "keeps it out of ps)",
    )
    server.add_argument(
        "--ops-password-file",
        metavar="FILE",
        help="read the operators' password from the first line of FILE",
    )
    server.add_argument(
        "--store",
        metavar="PATH",
        help="keep the history (chat and actions, never private messages), the topic "
        "and the bans in this SQLite database, so that a restart keeps them and "
        "/search finds old messages (created when missing)",
    )
    server.add_argument(
        "--keep",
        type=_non_negative_float,
        default=DEFAULT_KEEP_DAYS,
        metavar="DAYS",
        help="with --store: days a message is kept, 0 for ever (default: %g)" % DEFAULT_KEEP_DAYS,
    )
    server.add_argument(
        "--history",
        type=_non_negative,
        default=DEFAULT_HISTORY,
        metavar="N",
        help="chat messages replayed to a newcomer, 0 for none (default: %d)" % DEFAULT_HISTORY,
    )
    server.add_argument(
        "--redis",
        metavar="URL",
        help="share the room with every server started with the same Redis "
        "(redis://HOST:6379/0) and --room; needs the redis package",
    )
    server.add_argument(
        "--room",
        default=DEFAULT_ROOM,
        metavar="NAME",
        help="with --redis: the shared room's name (default: %s)" % DEFAULT_ROOM,
    )
    server.add_argument(
        "--redis-ttl",
        type=_seconds,
        default=DEFAULT_REDIS_TTL,
        metavar="SECONDS",
        help="with --redis: how long the nicknames of a server that died stay "
        "taken (default: %g)" % DEFAULT_REDIS_TTL,
    )
    server.add_argument(
        "--redis-rate",
        type=_non_negative_float,
        default=DEFAULT_REDIS_RATE,
        metavar="BYTES_PER_SECOND",
        help="with --redis: chat bytes a second this server shares with the room; "
        "more is refused with a notice, so that no burst makes Redis cut the room "
        "off (default: %d; 0: no rate, but at most %d bytes at once)"
        % (DEFAULT_REDIS_RATE, REDIS_MAX_SHARE),
    )

    client = commands.add_parser(
        "client",
        formatter_class=_HelpFormatter,
        help="join a chat server",
        description="Join a chat. Type a line and press Enter to send it; "
        "type %s, press Ctrl+D or Ctrl+C to leave.\nA line that starts with / "
        "is a command (/help lists them); // sends a single /." % QUIT_COMMAND,
        epilog="example:\n  python selchat.py client --host 192.0.2.7 --nick alice\n"
        "  echo 'build finished' | python selchat.py client --nick ci",
    )
    client.add_argument(
        "--host",
        default=env_host or DEFAULT_CLIENT_HOST,
        help="server to connect to (default: %s; $SELCHAT_HOST)" % DEFAULT_CLIENT_HOST,
    )
    client.add_argument(
        "--port",
        type=_port,
        default=env_port or DEFAULT_PORT,
        help="server port (default: %d; $SELCHAT_PORT)" % DEFAULT_PORT,
    )
    client.add_argument("--nick", help="your nickname (asked for when missing)")
    client.add_argument(
        "--no-color",
        action="store_true",
        help="no colours (also when NO_COLOR is set or output is not a terminal)",
    )
    client.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, checking the server's certificate and name "
        "against the system's trusted authorities",
    )
    client.add_argument(
        "--cafile",
        metavar="FILE",
        help="trust the certificates in FILE (PEM), for example a "
        "self-signed server's; implies --tls",
    )
    client.add_argument(
        "--password",
        default=os.environ.get("SELCHAT_PASSWORD"),
        help="the server's password ($SELCHAT_PASSWORD; asked for "
        "without echo when the server wants one)",
    )
    client.add_argument(
        "--bell",
        action="store_true",
        help="ring the terminal bell when someone mentions your nickname "
        "or sends you a private message",
    )
    client.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="exit when the connection is lost instead of reconnecting "
        "(pipe mode never reconnects)",
    )
    return parser


def run_server(args: argparse.Namespace) -> int:
    try:
        return _run_server(args)
    finally:
        flush_log(LOG_EXIT_WAIT)


def _read_secret(path: str, what: str) -> str | None:
    """The first line of a password file; None after saying why there is none."""
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        log("cannot read the %s file %s: %s" % (what, path, _reason(exc)))
        return None
    if not secret:
        log("the %s file %s is empty" % (what, path))
        return None
    return secret


def _run_server(args: argparse.Namespace) -> int:
    password = args.password
    if args.password_file:
        password = _read_secret(args.password_file, "password")
        if password is None:
            return 1
    ops_password = args.ops_password
    if args.ops_password_file:
        ops_password = _read_secret(args.ops_password_file, "operators' password")
        if ops_password is None:
            return 1
    if args.tls_key and not args.tls_cert:
        log("--tls-key needs --tls-cert")
        return 1
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_message=args.max_message,
        max_queue=args.max_queue,
        max_clients=args.max_clients,
        handshake_timeout=args.handshake_timeout,
        rate=args.rate,
        burst=args.burst,
        max_per_address=args.max_per_address,
        max_pending=args.max_pending,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        password=password or None,
        history=args.history,
        max_memory=args.max_memory,
        max_address_memory=args.max_address_memory,
        byte_rate=args.byte_rate,
        byte_burst=args.byte_burst,
        address_rate=args.address_rate,
        address_byte_rate=args.address_byte_rate,
        join_rate=args.join_rate,
        join_burst=args.join_burst,
        frame_timeout=args.frame_timeout,
        password_tries=args.password_tries,
        ops_password=ops_password or None,
    )
    store = None
    if args.store:
        store = Store(args.store, args.keep)
        try:
            stored = store.open(args.history)
        except StoreError as exc:
            log("cannot open the store %s: %s" % (args.store, exc))
            return 1
    server = ChatServer(config, store)
    if args.redis:
        shared = _connect_redis(args, config, store)
        if shared is None:
            return 1
        server = shared
    if store is not None:
        server.restore(*stored)
    try:
        server.listen()
    except OSError as exc:
        log("cannot listen on %s:%d: %s" % (args.host or "*", args.port, _reason(exc)))
        return 1
    server.serve_forever()
    return 0


def _connect_redis(
    args: argparse.Namespace, config: ServerConfig, store: Store | None = None
) -> SharedChatServer | None:
    """The server of a room shared through Redis, or None after saying why it cannot be."""
    try:
        import redis
    except ImportError:
        log("--redis needs the redis package: pip install redis (or: pip install 'selchat[redis]')")
        return None
    link = RedisLink(args.redis, args.room, args.redis_ttl)
    try:
        history = link.connect(args.history)
    except (redis.RedisError, OSError, ValueError) as exc:
        log("cannot use Redis at %s: %s" % (link.where, _reason(exc)))
        return None
    return SharedChatServer(config, link, history, args.redis_rate, store)


def _ask_nick(where: str) -> str | None:
    """Ask for a nickname on the terminal, or read it from the first line of input."""
    interactive = sys.stdin.isatty()
    while True:
        try:
            nick = input("Nickname: ") if interactive else _first_line()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                sys.stdout.write("\n")
            return None
        nick = nick.strip()
        if not interactive and not nick:
            _fail(
                "cannot join %s: no nickname (give --nick NICK, or the nickname as the "
                "first line of input)" % where
            )
            return None
        reason = check_nick(nick)
        if reason is None:
            return nick
        if not interactive:
            _fail("cannot join %s: invalid nickname %r: %s" % (where, nick, reason))
            return None
        sys.stdout.write("A nickname %s.\n" % reason)


def _first_line() -> str:
    """The first line of input, read byte by byte: what follows it is read by
    the client's loop straight from the file descriptor, past Python's buffer."""
    data = bytearray()
    while not data.endswith(b"\n"):
        byte = os.read(sys.stdin.fileno(), 1)
        if not byte:
            break
        data += byte
    return data.decode("utf-8", "replace")


def run_client(args: argparse.Namespace) -> int:
    for stream in (sys.stdout, sys.stdin):
        # Never die on a character the terminal's encoding lacks.
        reconfigure = getattr(stream, "reconfigure", None)  # absent on a replaced stream
        if reconfigure is not None:
            reconfigure(errors="replace")
    host = args.host
    if host.startswith("[") and host.endswith("]"):  # an IPv6 literal as in a URL
        host = host[1:-1]
    nick = args.nick
    if nick is None:
        nick = _ask_nick("%s:%d" % ("[%s]" % host if ":" in host else host, args.port))
        if nick is None:
            return 1 if not sys.stdin.isatty() else 0
    interactive = sys.stdin.isatty()
    color = interactive and use_color(args.no_color)
    # The line editor needs a terminal in raw mode on stdin; it moves the
    # cursor only where stdout is a terminal that is not dumb.
    mode = "plain"
    if interactive and sys.platform != "win32" and _has_termios():
        mode = "full" if _can_redraw() else "dumb" if _isatty(sys.stdout) else "plain"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tls_context = None
    if args.tls or args.cafile:
        import ssl

        try:
            tls_context = ssl.create_default_context(cafile=args.cafile)
        except (OSError, ValueError) as exc:
            _fail("cannot use the CA file %s: %s" % (args.cafile, _reason(exc)))
            return 1
    client = ChatClient(
        host,
        args.port,
        nick,
        color,
        interactive,
        tls_context,
        args.password,
        args.reconnect,
        args.bell,
        mode=mode,
        palette=color_palette(),
        history_file=history_path() if mode != "plain" else None,
    )
    try:
        return client.run()
    finally:
        _restore_terminal(client.saved_terminal)


def _restore_terminal(saved: Any) -> None:
    if saved is None:
        return
    try:
        import termios

        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    except Exception:  # noqa: BLE001 - a terminal gone away cannot be restored
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "server":
            return run_server(args)
        return run_client(args)
    except KeyboardInterrupt:  # Ctrl+C outside the places that expect it
        return 0


if __name__ == "__main__":
    sys.exit(main())
