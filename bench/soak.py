#!/usr/bin/env python3
"""A bounded soak run of selchat's server under hostile load (issue 4).

Starts ``selchat.py server`` on 127.0.0.1 (a free port) with limits small
enough that hostile behaviour trips them, then for ``--seconds`` runs, each in
its own process so that the server, not the load generator, is what is tested:

  honest     chatters that send at a human pace (one of them large messages)
             and check that every message from every other honest chatter
             arrives, once, in order
  slow       readers that register and never read (cut off at --max-queue)
  flood      clients that send far over --rate (told to slow down, then cut off)
  garbage    random and mutated frames: bad headers, huge lengths, invalid
             UTF-8, random NUL placement, random cuts, resets (SO_LINGER 0)
  large      large frames begun and abandoned (--max-pending), and whole ones
  churn      connect/disconnect bursts from one address (--max-per-address),
             silent connections (--handshake-timeout, --max-clients), resets

and the attacks of issue 12, each from addresses of its own:

  pin        senders within the rates whose writes put a small message and the
             start of a large frame in one read (a relayed slice of that read
             would pin all of it), and never-reading receivers of their own
  who        never-reading users asking /who, in a room made bigger by their
             own long nicknames (replies the server writes itself)
  bytes      one user sending --max-message messages as fast as it can
             (--byte-rate); it comes back under the same nickname when cut
  reconnect  fresh nicknames from one address, a burst of --burst messages
             each (--address-rate: reconnecting refills nothing)
  guess      wrong passwords from one address (--password-tries, lockout)
  stall      users whose large frames (--max-pending) and small frames stop
             arriving, and headers that stop half-way (--frame-timeout); a
             bystander on another address sends a large message every 2 s and
             counts how many were refused
  selfmsg    many never-reading users /msg-ing themselves, from 12 addresses
             (--max-queue, --max-address-memory, --max-memory)
  churnjoin  join/leave churn from one address (--join-rate)
  nick       nicknames with invisible characters and lookalikes of the honest
             users' (and /nick to them): every one must be refused

The server runs with --password: every client that registers gives it (nick
and password frames in one write), so the guesses hit the server that the
honest users are on. The honest chatters talk alone for --calm seconds first,
then the hostile clients run for --seconds: the honest latency (send to
arrival at every other honest chatter) is reported for both phases.

Then it stops the server with SIGINT and prints: messages sent, delivered,
lost (must be 0 for the honest readers), latency without and with the
attacks, hostile inputs tried, what the attackers got through (measured at an
honest reader), disconnects by reason (from the server's log lines "...
disconnected: REASON"), refusals, cuts by a memory budget, the server's peak
memory (VmHWM) against --max-memory and its exit status; --markdown FILE also
writes that as a table. Exits 1 if an honest message was lost, duplicated or
reordered, an honest chatter was cut off, a lookalike nickname was accepted,
the server logged a traceback or did not exit with status 0.

Standard library only; nothing leaves the loopback interface (it binds source
addresses in 127.0.0.0/8 to have several "addresses"). Stops by itself.

    python3 bench/soak.py --seconds 60
    python3 bench/soak.py --seconds 60 --calm 15 --markdown /tmp/soak_table.md
"""

import argparse
import collections
import json
import multiprocessing as mp
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "selchat.py")
HOST = "127.0.0.1"
STAMP = "2026-11-27T07:37:12+00:00"

# The server's limits for the run: small, so that the hostile clients trip them.
# Every per-address limit applies to loopback too: each kind of client has
# addresses of its own, and the honest chatters share one.
LIMITS = {
    "--max-message": 262144,
    "--max-queue": 1 << 20,
    "--max-clients": 400,
    "--handshake-timeout": 2,
    "--rate": 50,
    "--burst": 100,
    "--max-per-address": 40,  # given explicitly, so it applies to loopback too
    "--max-pending": 600000,
    "--max-memory": 32 << 20,  # what is held for peers; the interpreter itself is ~30 MiB
    "--max-address-memory": 8 << 20,
    "--byte-rate": 512 << 10,
    "--byte-burst": 1 << 20,
    "--address-rate": 200,
    "--address-byte-rate": 2 << 20,
    "--join-rate": 5,
    "--join-burst": 20,
    "--frame-timeout": 3,
    "--password-tries": 5,
}
PASSWORD = "soak-password"

# Each kind of client comes from its own loopback address, so that only the
# churn trips --max-per-address.
HONEST_ADDRESS = "127.0.0.2"
SLOW_ADDRESS = "127.0.0.3"
FLOOD_ADDRESS = "127.0.0.4"
GARBAGE_ADDRESS = "127.0.0.5"
LARGE_ADDRESS = "127.0.0.6"
CHURN_ADDRESS = "127.0.0.7"
SILENT_ADDRESSES = ["127.0.1.%d" % i for i in range(1, 9)]
PIN_SEND_ADDRESS = "127.0.2.1"
PIN_READ_ADDRESS = "127.0.2.2"
WHO_ADDRESSES = ["127.0.3.1", "127.0.3.2"]
BYTES_ADDRESS = "127.0.4.1"
RECONNECT_ADDRESS = "127.0.5.1"
GUESS_ADDRESS = "127.0.6.1"
STALL_ADDRESSES = ["127.0.7.1", "127.0.7.2"]
STALL_PROBE_ADDRESS = "127.0.7.9"
SELFMSG_ADDRESSES = ["127.0.8.%d" % i for i in range(1, 13)]
CHURNJOIN_ADDRESS = "127.0.9.1"
NICK_ADDRESS = "127.0.10.1"

HONEST_TEXT = re.compile(r"\AH(\d+):(\d+):(\d+\.\d+):")
END_GRACE = 20.0  # after the run, for the honest chatters' last messages
STOP_TIMEOUT = 15.0  # SIGINT to exit


# ---------------------------------------------------------------------------
# Wire helpers (independent of selchat.py)
# ---------------------------------------------------------------------------


def frame(payload):
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return b"%-10d" % len(payload) + payload


def chat(text, nick="x"):
    return frame("\0".join((STAMP, nick, text)))


class Closed(Exception):
    pass


class Reader:
    """Frames from a blocking socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()

    def frame(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buffer) >= 10:
                size = int(self.buffer[:10])
                if len(self.buffer) >= 10 + size:
                    payload = bytes(self.buffer[10 : 10 + size])
                    del self.buffer[: 10 + size]
                    return payload
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("no frame in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
                raise Closed(str(exc)) from None
            if not data:
                raise Closed("end of stream")
            self.buffer += data


def open_socket(port, source, rcvbuf=None, timeout=5.0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    try:
        sock.connect((HOST, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def reset(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def register(port, source, nick, rcvbuf=None, timeout=5.0, password=PASSWORD):
    """Connect and register; return (sock, reader) or None when refused."""
    joined, _reply = register_reply(port, source, nick, rcvbuf, timeout, password)
    return joined


def register_reply(port, source, nick, rcvbuf=None, timeout=5.0, password=PASSWORD):
    """Connect, send the nickname and password in one write; return
    ((sock, reader) or None when refused, the server's reply)."""
    try:
        sock = open_socket(port, source, rcvbuf)
    except OSError as exc:
        return None, "connect failed: %s" % exc
    reader = Reader(sock)
    try:
        sock.sendall(frame(nick) + frame(password))
        reply = reader.frame(timeout)
        if reply == b"Password required":
            reply = reader.frame(timeout)
    except (OSError, Closed) as exc:
        sock.close()
        return None, "closed: %s" % exc
    if not reply.startswith(b"Welcome to selchat"):
        sock.close()
        return None, reply.decode("utf-8", "replace")
    return (sock, reader), reply.decode("utf-8", "replace")


def drain(sock, counter=None):
    """Read and throw away everything (a thread), so that a user is not cut
    for what it is owed; count "Not sent"/"Slow down" notices in ``counter``."""

    def run():
        reader = Reader(sock)
        try:
            while True:
                payload = reader.frame(3600)
                if counter is not None and b"\0" not in payload:
                    text = payload[:40].decode("utf-8", "replace")
                    if text.startswith(("Not sent", "Slow down", "Disconnected")):
                        counter[text.split(":")[0]] += 1
        except (OSError, Closed, ValueError):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------
# Honest chatters
# ---------------------------------------------------------------------------


def honest(index, count, port, start_at, attack_wall, stop_at, size, pace, ready, results):
    """Send at a human pace, read everything, check every other honest chatter's
    messages arrive once and in order; report what was sent and received.

    Latencies are kept apart by when the message was sent: before the attacks
    began (``attack_wall``, wall clock) or after. What came from anyone else
    once the attacks began is counted by the sender's nickname's letters
    (messages and bytes), and so are the join and leave notices."""
    nick = "honest%d" % index
    report = {
        "index": index,
        "sent": 0,
        "received": {},
        "errors": [],
        "latencies": [],
        "latencies_calm": [],
        "others": {},
        "notice_frames": 0,
    }
    joined = register(port, HONEST_ADDRESS, nick, timeout=30)
    if joined is None:
        report["errors"].append("could not register")
        ready.wait()
        results.put(report)
        return
    sock, reader = joined
    ready.wait()  # every honest chatter is in before anyone speaks
    expected = {i: 0 for i in range(count) if i != index}
    honest_nicks = {"honest%d" % i for i in expected}
    ended = set()
    done = threading.Event()

    def read():
        try:
            while len(ended) < len(expected):
                payload = reader.frame(stop_at - time.monotonic() + END_GRACE)
                parts = payload.split(b"\0", 2)
                if len(parts) < 3:
                    text = payload.decode("utf-8", "replace")
                    if text.startswith(("Disconnected", "Server is shutting down")):
                        report["errors"].append("%s was told: %s" % (nick, text))
                        return
                    if time.time() >= attack_wall and (
                        "joined the chat" in text or "left the chat" in text
                    ):
                        report["notice_frames"] += 1
                    continue
                sender = parts[1].decode("utf-8", "replace")
                if sender not in honest_nicks:
                    # a hostile client's message that passed the checks
                    if time.time() >= attack_wall:
                        kind = re.match(r"[^\d]*", sender).group(0)[:12]
                        got = report["others"].setdefault(kind, [0, 0])
                        got[0] += 1
                        got[1] += len(payload) + 10
                    continue
                text = parts[2][:60].decode("utf-8", "replace")
                match = HONEST_TEXT.match(text)
                if text.startswith("END:"):
                    who = int(text[4:].split(":")[0])
                    if report["received"].get(who, 0) != int(text.split(":")[2]):
                        report["errors"].append(
                            "%s: END of honest%d after %d of %s messages"
                            % (nick, who, report["received"].get(who, 0), text.split(":")[2])
                        )
                    ended.add(who)
                    continue
                if match is None or sender != "honest%s" % match.group(1):
                    report["errors"].append("%s: unexpected %r from %s" % (nick, text, sender))
                    continue
                who, seq = int(match.group(1)), int(match.group(2))
                if seq != expected.get(who):
                    report["errors"].append(
                        "%s: from honest%d got #%d, expected #%s"
                        % (nick, who, seq, expected.get(who))
                    )
                expected[who] = seq + 1
                report["received"][who] = report["received"].get(who, 0) + 1
                sent_at = float(match.group(3))
                phase = "latencies" if sent_at >= attack_wall else "latencies_calm"
                if len(report[phase]) < 100000:
                    report[phase].append(time.time() - sent_at)
        except (OSError, Closed, ValueError) as exc:
            report["errors"].append("%s stopped reading: %r" % (nick, exc))
        finally:
            done.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    pad = "p" * size
    rng = random.Random(index)
    next_at = max(time.monotonic(), start_at)
    try:
        while time.monotonic() < stop_at and not done.is_set():
            text = "H%d:%d:%.6f:%s" % (index, report["sent"], time.time(), pad)
            sock.sendall(chat(text, nick))
            report["sent"] += 1
            next_at += rng.uniform(0.5, 1.5) / pace
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sock.sendall(chat("END:%d:%d" % (index, report["sent"]), nick))
    except OSError as exc:
        report["errors"].append("%s could not send: %r" % (nick, exc))
    thread.join(stop_at - time.monotonic() + END_GRACE + 5)
    if thread.is_alive():
        report["errors"].append("%s: the others' END markers never all arrived" % nick)
    sock.close()
    results.put(report)


# ---------------------------------------------------------------------------
# Hostile clients: each returns a Counter of what it tried
# ---------------------------------------------------------------------------


def slow_readers(port, stop_at, seed):
    """Register with a tiny receive buffer and never read; each is replaced after
    20 to 40 s (by then the server has usually cut it off at --max-queue)."""
    tried = collections.Counter()
    rng = random.Random(seed)
    held = collections.deque()  # (sock, replace at)
    while time.monotonic() < stop_at:
        while held and held[0][1] <= time.monotonic():
            held.popleft()[0].close()
        if len(held) < 3:
            joined = register(port, SLOW_ADDRESS, "slow%d" % rng.randrange(10**6), rcvbuf=4096)
            tried["slow reader connections"] += 1
            if joined is not None:
                held.append((joined[0], time.monotonic() + rng.uniform(20, 40)))
                continue
        time.sleep(0.5)
    for sock, _ in held:
        sock.close()
    return tried


def flooders(port, stop_at, seed):
    """Register, then send far over the rate until cut off; again."""
    tried = collections.Counter()
    rng = random.Random(seed)
    message = chat("flood " + "f" * 50, "x")
    while time.monotonic() < stop_at:
        joined = register(port, FLOOD_ADDRESS, "flood%d" % rng.randrange(10**6))
        if joined is None:
            time.sleep(0.2)
            continue
        sock, _reader = joined
        tried["flood connections"] += 1
        sock.settimeout(2)
        try:
            while time.monotonic() < stop_at:
                sock.sendall(message * 50)
                tried["flood messages"] += 50
                time.sleep(0.01)
        except OSError:
            pass
        sock.close()
    return tried


BAD_HEADERS = [
    b"-5        ",
    b"+5        ",
    b"1_0       ",
    b"5 5       ",
    b"          ",
    "\u0665".encode().ljust(10),
    b"0x10      ",
    b"\x005        ",
    b"9999999999",
    b"4294967296",
    b"0000262145",
]


GARBAGE_KINDS = (
    "random",
    "nul",
    "bad header",
    "huge",
    "bad utf8",
    "mutated",
    "command",
    "empty",
    "noise",
)


def garbage_stream(rng):
    """A nickname (usually valid) then random and mutated frames."""
    parts = [
        frame("g%d" % rng.randrange(10**6))
        if rng.random() < 0.8
        else rng.choice([frame(os.urandom(rng.randrange(1, 40))), os.urandom(10), b""])
    ]
    if rng.random() < 0.9:  # the password, mostly right: garbage is for the registered
        parts.append(frame(PASSWORD))
    kinds = collections.Counter()
    for _ in range(rng.randrange(1, 12)):
        kind = rng.choice(GARBAGE_KINDS)
        kinds[kind] += 1
        if kind == "random":
            parts.append(frame(os.urandom(rng.randrange(0, 300))))
        elif kind == "nul":
            tokens = [b"\0", b"a", "\u00e9".encode(), b"/", b" "]
            parts.append(frame(b"".join(rng.choice(tokens) for _ in range(rng.randrange(40)))))
        elif kind == "bad header":
            parts.append(rng.choice(BAD_HEADERS) + os.urandom(rng.randrange(20)))
        elif kind == "huge":
            parts.append(b"%-10d" % rng.randrange(LIMITS["--max-message"] + 1, 10**10))
        elif kind == "bad utf8":
            parts.append(
                frame(STAMP.encode() + b"\0x\0" + rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80"]))
            )
        elif kind == "mutated":
            data = bytearray(chat("a perfectly good message", "x"))
            for _ in range(rng.randrange(1, 4)):
                where = rng.randrange(len(data))
                data[where] = rng.randrange(256)
            parts.append(bytes(data))
        elif kind == "command":
            parts.append(frame(rng.choice(["/who", "/help", "/nope", "/" + "x" * 500])))
        elif kind == "empty":
            parts.append(frame(b""))
        else:
            parts.append(os.urandom(rng.randrange(1, 64)))
    return b"".join(parts), kinds


def garbage(port, stop_at, seed):
    tried = collections.Counter()
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        stream, kinds = garbage_stream(rng)
        tried.update({"garbage " + kind: n for kind, n in kinds.items()})
        tried["garbage connections"] += 1
        try:
            sock = open_socket(port, GARBAGE_ADDRESS)
        except OSError:
            time.sleep(0.1)
            continue
        try:
            sock.settimeout(2)
            cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randrange(4)))
            last = 0
            for cut in [*cuts, len(stream)]:
                if cut > last:
                    sock.sendall(stream[last:cut])
                    last = cut
                    tried["garbage sends"] += 1
        except OSError:
            pass
        end = rng.choice(["close", "reset", "half"])
        tried["garbage end: " + end] += 1
        if end == "reset":
            reset(sock)
        else:
            if end == "half":
                try:
                    sock.shutdown(socket.SHUT_WR)
                    reader = Reader(sock)
                    while True:
                        reader.frame(3)
                except (OSError, Closed):
                    pass
            sock.close()
        time.sleep(rng.uniform(0, 0.02))
    return tried


def large(port, stop_at, seed):
    """Large frames begun from several connections at once and abandoned (over
    --max-pending together), and now and then a whole one (relayed to all)."""
    tried = collections.Counter()
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        socks = []
        for _ in range(4):
            joined = register(port, LARGE_ADDRESS, "big%d" % rng.randrange(10**6))
            if joined is None:
                continue
            sock = joined[0]
            size = rng.randrange(150000, LIMITS["--max-message"])
            try:
                sock.sendall(b"%-10d" % size + b"L" * (size // 2))
                tried["large frames begun"] += 1
            except OSError:
                pass
            socks.append(sock)
        if rng.random() < 0.5:
            whole = register(port, LARGE_ADDRESS, "whole%d" % rng.randrange(10**6))
            if whole is not None:
                try:
                    whole[0].sendall(chat("W" * rng.randrange(70000, 200000), "x"))
                    tried["large messages whole"] += 1
                except OSError:
                    pass
                whole[0].close()
        time.sleep(rng.uniform(0.3, 1.0))
        for sock in socks:
            if rng.random() < 0.5:
                reset(sock)
                tried["large frames reset"] += 1
            else:
                sock.close()
                tried["large frames cut"] += 1
    return tried


def churn(port, stop_at, seed):
    """Connection bursts from one address, quick leaves, resets, silent sockets."""
    tried = collections.Counter()
    rng = random.Random(seed)
    silent = collections.deque()
    while time.monotonic() < stop_at:
        burst = []
        for _ in range(rng.randrange(5, 60)):  # sometimes over --max-per-address (40)
            try:
                burst.append(open_socket(port, CHURN_ADDRESS))
                tried["churn connections"] += 1
            except OSError:
                tried["churn connect failed"] += 1
        for sock in burst:
            action = rng.choice(["join-leave", "close", "reset", "nick-reset", "half-frame"])
            tried["churn " + action] += 1
            try:
                if action == "join-leave":
                    sock.sendall(frame("c%d" % rng.randrange(10**6)) + frame(PASSWORD))
                elif action == "nick-reset":
                    sock.sendall(frame("c%d" % rng.randrange(10**6)) + frame(PASSWORD))
                    reset(sock)
                    continue
                elif action == "half-frame":
                    sock.sendall(b"100       half")
                elif action == "reset":
                    reset(sock)
                    continue
            except OSError:
                pass
            sock.close()
        # Silent connections from several addresses: cut at --handshake-timeout;
        # together with everyone else they pass --max-clients now and then.
        for _ in range(rng.randrange(0, 30)):
            try:
                silent.append(open_socket(port, rng.choice(SILENT_ADDRESSES)))
                tried["silent connections"] += 1
            except OSError:
                tried["silent connect failed"] += 1
        while len(silent) > 120:
            silent.popleft().close()
        time.sleep(rng.uniform(0.05, 0.3))
    for sock in silent:
        sock.close()
    return tried


# -- the attacks of issue 12 ----------------------------------------------------


class NeverReading:
    """Never-reading connections kept open until replaced (or the run ends)."""

    def __init__(self):
        self.socks = collections.deque()  # (sock, replace at)

    def expire(self, now):
        while self.socks and self.socks[0][1] <= now:
            self.socks.popleft()[0].close()

    def add(self, sock, until):
        self.socks.append((sock, until))

    def close(self):
        for sock, _ in self.socks:
            sock.close()
        self.socks.clear()

    def __len__(self):
        return len(self.socks)


def pin(port, stop_at, seed):
    """Two senders within the rates: each write is a small chat message and the
    first part of a 200 KB one, so that one server read holds both; the rest
    follows. Never-reading receivers from another address of theirs hold
    what is relayed (each cut at --max-queue, and replaced)."""
    tried = collections.Counter()
    rng = random.Random(seed)
    receivers = NeverReading()
    senders = []
    size = 200000
    next_send = time.monotonic()
    while time.monotonic() < stop_at:
        now = time.monotonic()
        receivers.expire(now)
        if len(receivers) < 3:
            joined = register(port, PIN_READ_ADDRESS, "pr%d" % rng.randrange(10**6), rcvbuf=4096)
            tried["pin never-reading receivers"] += 1
            if joined is not None:
                receivers.add(joined[0], now + 10)
        senders = [s for s in senders if s[1].is_alive()]
        while len(senders) < 2:
            nick = "pin%d" % rng.randrange(10**6)
            joined = register(port, PIN_SEND_ADDRESS, nick)
            tried["pin sender connections"] += 1
            if joined is None:
                time.sleep(0.5)
                break
            senders.append((joined[0], drain(joined[0]), nick))
        if now < next_send:
            time.sleep(min(0.1, next_send - now))
            continue
        next_send = now + 0.5  # two 200 KB messages a second: within --byte-rate
        for sock, _thread, nick in senders:
            big = chat("P" * (size - len(STAMP) - len(nick) - 2), nick)
            small = chat("pin small %d" % tried["pin small messages"], nick)
            cut = 120000
            try:
                sock.sendall(small + big[:cut])
                tried["pin small messages"] += 1
                tried["pin large frames begun with one"] += 1
                time.sleep(0.02)
                sock.sendall(big[cut:])
            except OSError:
                sock.close()
    receivers.close()
    for sock, _thread, _nick in senders:
        sock.close()
    return tried


class Pusher:
    """A never-reading user's socket, written without blocking: what the
    socket does not take now waits here (at most ``limit`` bytes, so that the
    frames stay whole), and only a real error (the server cut it) ends it."""

    def __init__(self, sock, message, limit=1 << 16):
        sock.setblocking(False)
        self.sock = sock
        self.message = message
        self.limit = limit
        self.pending = bytearray()

    def push(self, times):
        """Queue the message ``times`` times (as room allows) and send what
        the socket takes; return how many were queued, or None when cut."""
        queued = 0
        while queued < times and len(self.pending) < self.limit:
            self.pending += self.message
            queued += 1
        try:
            sent = self.sock.send(self.pending)
            del self.pending[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.sock.close()
            return None
        return queued


def who(port, stop_at, seed):
    """Never-reading users with long nicknames ask /who, 40 times a second each."""
    tried = collections.Counter()
    rng = random.Random(seed)
    conns = []
    ask = frame("/who")
    while time.monotonic() < stop_at:
        while len(conns) < 20:
            address = WHO_ADDRESSES[len(conns) % len(WHO_ADDRESSES)]
            nick = "who%029d" % rng.randrange(10**29)  # 32 characters, the longest
            joined = register(port, address, nick, rcvbuf=4096)
            tried["who connections"] += 1
            if joined is None:
                tried["who refused"] += 1
                time.sleep(0.5)
                break
            conns.append(Pusher(joined[0], ask))
        for pusher in list(conns):
            queued = pusher.push(10)
            if queued is None:
                tried["who cut"] += 1
                conns.remove(pusher)
            else:
                tried["who asked"] += queued
        time.sleep(0.25)
    for pusher in conns:
        pusher.sock.close()
    return tried


def bytes_hog(port, stop_at, seed):
    """One user sends --max-message messages as fast as it can; when it is cut
    it comes back under the same nickname (the user's rates are kept)."""
    tried = collections.Counter()
    nick = "bytes"
    payload = chat("B" * (LIMITS["--max-message"] - len(STAMP) - len(nick) - 2), nick)
    while time.monotonic() < stop_at:
        joined, reply = register_reply(port, BYTES_ADDRESS, nick)
        if joined is None:
            tried["bytes refused: " + reply[:30]] += 1
            time.sleep(0.5)
            continue
        sock = joined[0]
        tried["bytes connections"] += 1
        notices = collections.Counter()
        thread = drain(sock, notices)
        sock.settimeout(2)
        try:
            while time.monotonic() < stop_at and thread.is_alive():
                sock.sendall(payload)
                tried["bytes messages of --max-message"] += 1
        except OSError:
            pass
        sock.close()
        thread.join(1)
        tried.update({"bytes told: " + k: n for k, n in notices.items()})
    return tried


def reconnect(port, stop_at, seed):
    """From one address: a fresh nickname, a burst of --burst messages, gone."""
    tried = collections.Counter()
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        nick = "rc%d" % rng.randrange(10**6)
        joined, _reply = register_reply(port, RECONNECT_ADDRESS, nick)
        if joined is None:
            tried["reconnect refused"] += 1
            time.sleep(0.05)
            continue
        sock = joined[0]
        tried["reconnect connections"] += 1
        try:
            sock.sendall(b"".join(chat("rc %d" % i, nick) for i in range(LIMITS["--burst"])))
            tried["reconnect messages"] += LIMITS["--burst"]
        except OSError:
            pass
        sock.close()
    return tried


def guess(port, stop_at, seed):
    """Wrong passwords from one address, as fast as the server answers."""
    tried = collections.Counter()
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        joined, reply = register_reply(
            port, GUESS_ADDRESS, "gs%d" % rng.randrange(10**6), password="guess%d" % rng.random()
        )
        tried["guess passwords tried"] += 1
        if joined is not None:
            tried["guess ACCEPTED"] += 1
            joined[0].close()
        elif reply.startswith("Wrong password;"):
            tried["guess answered: wrong, now locked out"] += 1
        elif reply.startswith("Wrong password"):
            tried["guess answered: wrong"] += 1
        elif reply.startswith("Too many wrong passwords"):
            tried["guess answered: locked out"] += 1
        else:
            tried["guess answered: other"] += 1
    return tried


def stall(port, stop_at, seed):
    """Registered users whose frames stop arriving: two large ones (together
    two thirds of --max-pending), small ones and half headers; held past
    --frame-timeout. A bystander on another address sends a 100 KB message
    every 2 s and counts the ones refused."""
    tried = collections.Counter()
    rng = random.Random(seed)
    timeout = LIMITS["--frame-timeout"]
    probe = register(port, STALL_PROBE_ADDRESS, "probe")
    notices = collections.Counter()
    if probe is not None:
        drain(probe[0], notices)
    next_probe = time.monotonic()
    while time.monotonic() < stop_at:
        conns = []
        for number, kind in enumerate(["large", "large", "small", "small", "small", "header"]):
            address = STALL_ADDRESSES[number % len(STALL_ADDRESSES)]
            joined = register(port, address, "st%d" % rng.randrange(10**6))
            if joined is None:
                tried["stall refused"] += 1
                continue
            sock, reader = joined
            try:
                if kind == "large":
                    sock.sendall(b"%-10d" % 200000 + b"L" * 100000)
                elif kind == "small":
                    sock.sendall(b"%-10d" % 5000 + b"s" * 100)
                else:
                    sock.sendall(b"12")
                tried["stall %s frames" % kind] += 1
            except OSError:
                pass
            conns.append((sock, reader, kind))
        until = time.monotonic() + timeout + 2
        while time.monotonic() < until:
            if probe is not None and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + 2
                try:
                    probe[0].sendall(chat("Q" * 100000, "probe"))
                    tried["stall probe large messages sent"] += 1
                except OSError:
                    probe = None
            time.sleep(0.1)
        for sock, reader, kind in conns:
            try:
                while True:
                    text = reader.frame(0.05)
                    if text.startswith(b"Not sent: your message stopped arriving"):
                        tried["stall %s frames dropped with a notice" % kind] += 1
                    elif text.startswith(b"Disconnected: a frame header stopped"):
                        tried["stall %s frames cut with a notice" % kind] += 1
            except (OSError, Closed, ValueError):
                pass
            sock.close()
    if probe is not None:
        probe[0].close()
    tried["stall probe large messages refused"] = notices.get("Not sent", 0)
    return tried


def selfmsg(port, stop_at, seed):
    """Never-reading users, 15 on each of 12 addresses, /msg-ing themselves 8 KB
    twenty times a second each: each address could hold more than
    --max-address-memory, all of them together more than --max-memory."""
    tried = collections.Counter()
    rng = random.Random(seed)
    conns = []  # (sock, message)
    text = "s" * 8000
    want = 15 * len(SELFMSG_ADDRESSES)
    while time.monotonic() < stop_at:
        refused = 0
        while len(conns) < want and refused < 3:
            address = SELFMSG_ADDRESSES[rng.randrange(len(SELFMSG_ADDRESSES))]
            nick = "sm%d" % rng.randrange(10**6)
            joined = register(port, address, nick, rcvbuf=4096)
            tried["selfmsg connections"] += 1
            if joined is None:
                refused += 1
                continue
            conns.append(Pusher(joined[0], frame("/msg %s %s" % (nick, text))))
        for pusher in list(conns):
            queued = pusher.push(4)
            if queued is None:
                tried["selfmsg cut"] += 1
                conns.remove(pusher)
            else:
                tried["selfmsg messages"] += queued
        time.sleep(0.2)
    for pusher in conns:
        pusher.sock.close()
    return tried


def churnjoin(port, stop_at, seed):
    """Join and leave from one address as fast as the server lets in."""
    tried = collections.Counter()
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        joined, reply = register_reply(port, CHURNJOIN_ADDRESS, "cj%d" % rng.randrange(10**6))
        if joined is not None:
            tried["churnjoin joined"] += 1
            joined[0].close()
        elif reply.startswith("Too many users joined"):
            tried["churnjoin refused: --join-rate"] += 1
        else:
            tried["churnjoin refused: other"] += 1
    return tried


def lookalikes():
    """Nicknames that must be refused while the honest users are online."""
    names = []
    for target in ("honest0", "honest1", "honest2"):
        names += [
            target + "\ufe04",  # a variation selector: same colour, same look
            target + "\u200b",  # zero width space
            target[:3] + "\u2800" + target[3:],  # blank braille
            "\u3164" + target,  # Hangul filler
            "\u115f" + target,  # Hangul choseong filler
            target.replace("o", "\u043e"),  # Cyrillic o
            target.replace("e", "\u0435"),  # Cyrillic e
            target.replace("o", "\u03bf"),  # Greek omicron
            "\uff48" + target[1:],  # fullwidth h (NFKC)
            target.upper(),  # the same nickname, casefolded
            target + "\u00ad",  # soft hyphen
            target + "\u2060",  # word joiner
        ]
    names.append("[private]\u2800honest0\u2800->\u2800honest1")
    return names


def nick(port, stop_at, seed):
    """Lookalikes of the honest users' nicknames, at joining and with /nick.
    Any that is accepted is reported as a problem."""
    tried = collections.Counter()
    rng = random.Random(seed)
    names = lookalikes()
    while time.monotonic() < stop_at:
        for name in names:
            if time.monotonic() >= stop_at:
                break
            joined, reply = register_reply(port, NICK_ADDRESS, name)
            tried["nick lookalikes tried at joining"] += 1
            if joined is not None:
                tried["nick ACCEPTED %r" % name] += 1
                joined[0].close()
            time.sleep(0.02)
        plain = "nk%d" % rng.randrange(10**6)
        joined = register(port, NICK_ADDRESS, plain)
        if joined is None:
            time.sleep(0.5)
            continue
        sock, reader = joined
        for name in names:
            if time.monotonic() >= stop_at:
                break
            try:
                sock.sendall(frame("/nick " + name))
                tried["nick lookalikes tried with /nick"] += 1
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    try:
                        reply = reader.frame(max(0.01, deadline - time.monotonic()))
                    except socket.timeout:
                        tried["nick /nick unanswered"] += 1
                        break
                    if b"\0" in reply:
                        continue  # chat
                    if reply.startswith(b"You are now known as"):
                        tried["nick ACCEPTED by /nick %r" % name] += 1
                        sock.sendall(frame("/nick " + plain))
                        break
                    if (
                        reply.startswith(
                            (b"Nickname", b"Not", b"Slow down", b"That", b"Disconnected")
                        )
                        or name.encode() in reply
                    ):
                        break
            except (OSError, Closed, ValueError):
                break
            time.sleep(0.25)  # a /nick costs 10 messages of --rate
        sock.close()
    return tried


def hostile(kind, port, stop_at, seed, results):
    try:
        tried = KINDS[kind](port, stop_at, seed)
        results.put({"kind": kind, "tried": dict(tried)})
    except Exception as exc:  # report, never hang the run
        results.put({"kind": kind, "tried": {}, "error": repr(exc)})


KINDS = {
    "slow": slow_readers,
    "flood": flooders,
    "garbage": garbage,
    "large": large,
    "churn": churn,
    "pin": pin,
    "who": who,
    "bytes": bytes_hog,
    "reconnect": reconnect,
    "guess": guess,
    "stall": stall,
    "selfmsg": selfmsg,
    "churnjoin": churnjoin,
    "nick": nick,
}


# ---------------------------------------------------------------------------
# The server and the run
# ---------------------------------------------------------------------------


class Server:
    LISTENING = re.compile(r"listening on \S*:(\d+)")
    DISCONNECTED = re.compile(r" disconnected: (.*)$")
    REFUSED = re.compile(r"selchat: refused \S+: (.*)$")
    BUDGET_CUT = re.compile(r" holds \d+ bytes, the most: cut \((the server|its address) over")
    OVER_RATE = re.compile(r": over the rate \((.*)\), told to slow down")

    def __init__(self, python):
        args = [python, SCRIPT, "server", "--host", HOST, "--port", "0"]
        for option, value in LIMITS.items():
            args += [option, str(value)]
        args += ["--password", PASSWORD]
        self.args = args
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.reasons = collections.Counter()
        self.refusals = collections.Counter()
        self.events = collections.Counter()  # budget cuts, rate warnings, dropped frames
        self.lines = 0
        self.tracebacks = []
        self.tail = collections.deque(maxlen=40)
        self.port = None
        self.listening = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()
        if not self.listening.wait(20) or self.port is None:
            self.proc.kill()
            raise SystemExit("soak: the server did not start:\n" + "\n".join(self.tail))

    def _drain(self):
        in_traceback = False
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines += 1
            self.tail.append(line)
            if self.port is None:
                match = self.LISTENING.search(line)
                if match:
                    self.port = int(match.group(1))
                    self.listening.set()
            if line.startswith("Traceback") or in_traceback:
                in_traceback = True
                self.tracebacks.append(line)
                continue
            match = self.DISCONNECTED.search(line)
            if match:
                self.reasons[normalise(match.group(1))] += 1
                continue
            match = self.BUDGET_CUT.search(line)
            if match:
                level = "--max-memory" if match.group(1) == "the server" else "--max-address-memory"
                self.events["cut by " + level] += 1
                continue
            match = self.OVER_RATE.search(line)
            if match:
                self.events["told to slow down: " + normalise(match.group(1))] += 1
                continue
            if "unfinished message dropped after" in line:
                self.events["unfinished message dropped (--frame-timeout)"] += 1
                continue
            match = self.REFUSED.search(line)
            if match:
                self.refusals[normalise(match.group(1))] += 1
            elif "large message refused" in line:
                self.refusals["large message refused (--max-pending)"] += 1
            elif "accept failed" in line:
                self.refusals["accept failed"] += 1
        self.listening.set()

    def sample_memory(self, stop):
        """VmRSS every 0.2 s (a thread): the largest, and when."""
        self.rss_max = (0, 0.0)
        while not stop.wait(0.2):
            rss = dict(self.peak_memory()).get("VmRSS")
            if rss is None:
                continue
            kb = int(rss.split()[0])
            if kb > self.rss_max[0]:
                self.rss_max = (kb, time.monotonic())

    def cpu_seconds(self):
        """User + system CPU the server has used so far."""
        try:
            with open("/proc/%d/stat" % self.proc.pid) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def rss_kb(self):
        try:
            return int(dict(self.peak_memory()).get("VmRSS", "0 kB").split()[0])
        except ValueError:
            return 0

    def peak_memory(self):
        try:
            with open("/proc/%d/status" % self.proc.pid) as status:
                for line in status:
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        yield line.split(":")[0], line.split(":")[1].strip()
        except OSError:
            return


def normalise(reason):
    reason = re.sub(r"bad frame header .*", "bad frame header", reason)
    reason = re.sub(r"(?<![\w-])\d+", "N", reason)  # counts and sizes, not "UTF-8"
    return reason


def percentile(values, fraction):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


HOSTILES = [
    "slow",
    "flood",
    "flood",
    "garbage",
    "garbage",
    "large",
    "churn",
    "pin",
    "who",
    "bytes",
    "reconnect",
    "guess",
    "stall",
    "selfmsg",
    "churnjoin",
    "nick",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="how long the attacks run (default 60)"
    )
    parser.add_argument(
        "--calm",
        type=float,
        default=15.0,
        help="seconds the honest chatters talk alone before the attacks (default 15)",
    )
    parser.add_argument(
        "--honest", type=int, default=5, help="honest chatters (default 5, plus 1 large)"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(dict.fromkeys(HOSTILES)),
        help="hostile kinds to run (default all: %s)" % ",".join(dict.fromkeys(HOSTILES)),
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the hostile clients")
    parser.add_argument("--python", default=sys.executable, help="the server's interpreter")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--markdown", metavar="FILE", help="also write the figures as a Markdown table"
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for kind in kinds:
        if kind not in KINDS:
            parser.error("unknown kind %r" % kind)
    hostiles = [k for k in HOSTILES if k in kinds]

    server = Server(args.python)
    port = server.port
    print(
        "soak: server pid %d on %s:%d, %g s calm then %g s of attacks, seed %d"
        % (server.proc.pid, HOST, port, args.calm, args.seconds, seed),
        flush=True,
    )
    print("soak: server: %s" % " ".join(server.args[2:]), flush=True)
    context = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    results = context.Queue()
    count = args.honest + 1
    ready = context.Barrier(count + 1)
    start_at = time.monotonic() + 1.0
    attack_at = start_at + args.calm
    attack_wall = time.time() + (attack_at - time.monotonic())
    stop_at = attack_at + args.seconds
    sampling = threading.Event()
    sampler = threading.Thread(target=server.sample_memory, args=(sampling,), daemon=True)
    sampler.start()
    processes = []
    for index in range(count):
        size, pace = (32000, 10.0) if index == count - 1 else (100, 10.0)  # the last one is large
        processes.append(
            context.Process(
                target=honest,
                args=(
                    index,
                    count,
                    port,
                    start_at,
                    attack_wall,
                    stop_at,
                    size,
                    pace,
                    ready,
                    results,
                ),
            )
        )
    for number, kind in enumerate(hostiles):
        processes.append(
            context.Process(target=hostile, args=(kind, port, stop_at, seed + number, results))
        )
    for process in processes[:count]:
        process.start()
    ready.wait(60)  # the honest chatters are in; they talk alone for --calm seconds
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu_start = server.cpu_seconds()
    time.sleep(max(0.0, attack_at - time.monotonic()))
    cpu_calm = server.cpu_seconds()
    rss_calm = server.rss_kb()
    print("soak: attacks begin: %s" % " ".join(hostiles), flush=True)
    for process in processes[count:]:
        process.start()

    reports, tried, problems = [], collections.Counter(), []
    by_kind = {}
    deadline = stop_at + END_GRACE + 30
    while len(reports) < len(processes) and time.monotonic() < deadline:
        try:
            item = results.get(timeout=1.0)
        except Exception:  # queue.Empty
            if server.proc.poll() is not None:
                problems.append(
                    "the server exited during the run with status %s" % server.proc.returncode
                )
                break
            continue
        reports.append(item)
        if "tried" in item:
            tried.update(item["tried"])
            by_kind.setdefault(item["kind"], collections.Counter()).update(item["tried"])
            if item.get("error"):
                problems.append("%s client failed: %s" % (item["kind"], item["error"]))
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            problems.append("a client process had to be killed")

    cpu_end = server.cpu_seconds()
    sampling.set()
    sampler.join(2)
    memory = dict(server.peak_memory())
    alive = server.proc.poll() is None
    if alive:
        server.proc.send_signal(signal.SIGINT)
    try:
        status = server.proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        status = "killed after %g s" % STOP_TIMEOUT
    server.thread.join(5)

    honest_reports = [r for r in reports if "sent" in r]
    sent = {r["index"]: r["sent"] for r in honest_reports}
    delivered = sum(sum(r["received"].values()) for r in honest_reports)
    expected = sum(sent[j] for r in honest_reports for j in sent if j != r["index"])
    lost = expected - delivered
    latencies = [x for r in honest_reports for x in r["latencies"]]
    calm = [x for r in honest_reports for x in r["latencies_calm"]]
    for r in honest_reports:
        problems.extend(r["errors"][:10])
    if len(honest_reports) < count:
        problems.append("only %d of %d honest chatters reported" % (len(honest_reports), count))
    if lost:
        problems.append("%d honest messages lost" % lost)
    if server.tracebacks:
        problems.append("the server logged a traceback:\n" + "\n".join(server.tracebacks[:30]))
    if status != 0:
        problems.append("the server's exit status was %s" % status)
    accepted = [k for k in tried if k.startswith("nick ACCEPTED") or k == "guess ACCEPTED"]
    for key in accepted:
        problems.append("%s (%d times)" % (key, tried[key]))

    # One count per hostile act: a flood message, a garbage piece, a connection
    # opened to churn, sit silent or read slowly, a large frame begun or sent,
    # a message, command, password, join or nickname of the attacks of issue 12.
    hostile_total = sum(
        n
        for key, n in tried.items()
        if key == "flood messages"
        or (key.startswith("garbage ") and key[8:] in GARBAGE_KINDS)
        or key
        in (
            "churn connections",
            "silent connections",
            "slow reader connections",
            "large frames begun",
            "large messages whole",
            "pin small messages",
            "pin never-reading receivers",
            "who asked",
            "bytes messages of --max-message",
            "reconnect messages",
            "guess passwords tried",
            "stall large frames",
            "stall small frames",
            "stall header frames",
            "selfmsg messages",
            "churnjoin joined",
            "churnjoin refused: --join-rate",
            "nick lookalikes tried at joining",
            "nick lookalikes tried with /nick",
        )
    )
    # What the attackers got through to an honest screen, once they began.
    first = min(honest_reports, key=lambda r: r["index"]) if honest_reports else None
    window = max(1e-9, args.seconds)
    got = {}
    if first is not None:
        for kind, (messages, nbytes) in sorted(first["others"].items()):
            got[kind] = {
                "messages": messages,
                "bytes": nbytes,
                "messages/s": round(messages / window, 1),
                "KiB/s": round(nbytes / window / 1024, 1),
            }
        got["join/leave notice frames"] = {
            "messages": first["notice_frames"],
            "messages/s": round(first["notice_frames"] / window, 1),
        }
    max_memory = LIMITS.get("--max-memory", 0)
    figures = {
        "seconds": args.seconds,
        "calm seconds": args.calm,
        "seed": seed,
        "command": " ".join(["python3", "bench/soak.py", *sys.argv[1:]]),
        "server": " ".join(server.args[2:]),
        "hostile kinds": hostiles,
        "honest chatters": count,
        "messages sent (honest)": sum(sent.values()),
        "deliveries expected (to the other honest chatters)": expected,
        "deliveries made": delivered,
        "lost": lost,
        "latency calm p50/p99/max ms": stats_ms(calm),
        "latency calm count": len(calm),
        "latency p50/p99/max ms": stats_ms(latencies),
        "latency attack count": len(latencies),
        "hostile inputs tried": dict(sorted(tried.items())),
        "hostile inputs by kind": {k: dict(sorted(v.items())) for k, v in by_kind.items()},
        "hostile inputs total": hostile_total,
        "received by an honest chatter from the others (attack phase)": got,
        "disconnects by reason": dict(server.reasons.most_common()),
        "refusals": dict(server.refusals.most_common()),
        "budget cuts, rate warnings, dropped frames": dict(server.events.most_common()),
        "server log lines": server.lines,
        "server peak memory (VmHWM)": memory.get("VmHWM", "unknown"),
        "server VmRSS when the attacks began": "%d kB" % rss_calm,
        "server CPU % calm / with the attacks": [
            round(100 * (cpu_calm - cpu_start) / max(1e-9, args.calm)),
            round(100 * (cpu_end - cpu_calm) / max(1e-9, time.monotonic() - attack_at)),
        ],
        "server largest VmRSS sampled": "%d kB" % server.rss_max[0],
        "server memory at the end (VmRSS)": memory.get("VmRSS", "unknown"),
        "--max-memory": max_memory,
        "server exit status": status,
        "problems": problems,
    }
    print_figures(figures)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(figures))
        print("table written to %s" % args.markdown)
    return 1 if problems else 0


def stats_ms(values):
    return [
        round(1000 * percentile(values, 0.5), 1),
        round(1000 * percentile(values, 0.99), 1),
        round(1000 * max(values), 1) if values else None,
    ]


def mib(text):
    """'123456 kB' -> '120.6 MiB'"""
    try:
        return "%.1f MiB" % (int(text.split()[0]) / 1024)
    except (ValueError, IndexError, AttributeError):
        return str(text)


def growth(figures):
    try:
        return "%.1f MiB" % (
            (
                int(figures["server peak memory (VmHWM)"].split()[0])
                - int(figures["server VmRSS when the attacks began"].split()[0])
            )
            / 1024
        )
    except (ValueError, IndexError, AttributeError):
        return "?"


def print_figures(figures):
    print()
    print(
        "selchat soak: %g s calm, then %g s of attacks, seed %d"
        % (figures["calm seconds"], figures["seconds"], figures["seed"])
    )
    print("  server: %s" % figures["server"])
    print("  honest chatters:            %d" % figures["honest chatters"])
    print("  messages sent (honest):     %d" % figures["messages sent (honest)"])
    print(
        "  deliveries expected:        %d"
        % figures["deliveries expected (to the other honest chatters)"]
    )
    print("  deliveries made:            %d" % figures["deliveries made"])
    print("  lost:                       %d" % figures["lost"])
    print(
        "  latency p50/p99/max, calm:  %s / %s / %s ms"
        % tuple(figures["latency calm p50/p99/max ms"])
    )
    print(
        "  latency p50/p99/max, under attack: %s / %s / %s ms"
        % tuple(figures["latency p50/p99/max ms"])
    )
    print("  hostile inputs tried:       %d" % figures["hostile inputs total"])
    for kind, items in figures["hostile inputs by kind"].items():
        print("   %s:" % kind)
        for key, n in items.items():
            print("    %-50s %d" % (key, n))
    print("  received by honest0 from others during the attacks:")
    for kind, item in figures[
        "received by an honest chatter from the others (attack phase)"
    ].items():
        print("    %-30s %s" % (kind, item))
    print("  disconnects by reason:")
    for key, n in figures["disconnects by reason"].items():
        print("    %-60s %d" % (key, n))
    print("  refusals:")
    for key, n in figures["refusals"].items():
        print("    %-60s %d" % (key, n))
    print("  budget cuts, rate warnings, dropped frames:")
    for key, n in figures["budget cuts, rate warnings, dropped frames"].items():
        print("    %-60s %d" % (key, n))
    print(
        "  server peak memory (VmHWM): %s (%s, %s above its VmRSS when the attacks began) "
        "against --max-memory %.0f MiB"
        % (
            figures["server peak memory (VmHWM)"],
            mib(figures["server peak memory (VmHWM)"]),
            growth(figures),
            figures["--max-memory"] / 2**20,
        )
    )
    print(
        "  server VmRSS when the attacks began: %s"
        % mib(figures["server VmRSS when the attacks began"])
    )
    print(
        "  server CPU %% calm / with the attacks: %s / %s"
        % tuple(figures["server CPU % calm / with the attacks"])
    )
    print("  server exit status:         %s" % figures["server exit status"])
    if figures["problems"]:
        print("PROBLEMS:")
        for problem in figures["problems"]:
            print("  - %s" % problem)
    else:
        print("OK: nothing honest was lost, no lookalike got in, and the server exited 0")


def markdown(figures):
    """The run as a table: one row per figure."""
    tried = figures["hostile inputs tried"]
    kinds = figures["hostile inputs by kind"]
    got = figures["received by an honest chatter from the others (attack phase)"]
    events = figures["budget cuts, rate warnings, dropped frames"]
    reasons = figures["disconnects by reason"]
    refusals = figures["refusals"]

    def n(key):
        return f"{tried.get(key, 0):,}"

    def rate(kind, unit):
        item = got.get(kind)
        return "%s %s" % (item[unit], unit) if item else "0 %s" % unit

    def top(counter, limit=12):
        return ", ".join("%s %s" % (k, f"{v:,}") for k, v in list(counter.items())[:limit])

    memory = figures["--max-memory"]
    rows = [
        (
            "run",
            "%g s honest only, then %g s with the attacks (seed %d)"
            % (figures["calm seconds"], figures["seconds"], figures["seed"]),
        ),
        (
            "honest messages sent / deliveries expected / made / **lost**",
            "%s / %s / %s / **%d**"
            % (
                "{:,}".format(figures["messages sent (honest)"]),
                "{:,}".format(figures["deliveries expected (to the other honest chatters)"]),
                "{:,}".format(figures["deliveries made"]),
                figures["lost"],
            ),
        ),
        (
            "honest latency p50 / **p99** / max, without attacks",
            "%s / **%s** / %s ms" % tuple(figures["latency calm p50/p99/max ms"]),
        ),
        (
            "honest latency p50 / **p99** / max, with the attacks",
            "%s / **%s** / %s ms" % tuple(figures["latency p50/p99/max ms"]),
        ),
        (
            "server peak memory (VmHWM) against `--max-memory`",
            "**%s** = %s when the attacks began + **%s**, against %.0f MiB"
            % (
                mib(figures["server peak memory (VmHWM)"]),
                mib(figures["server VmRSS when the attacks began"]),
                growth(figures),
                memory / 2**20,
            ),
        ),
        (
            "server CPU, without / with the attacks",
            "%s %% / %s %%" % tuple(figures["server CPU % calm / with the attacks"]),
        ),
        (
            "cut by a memory budget",
            "--max-address-memory %s, --max-memory %s"
            % (events.get("cut by --max-address-memory", 0), events.get("cut by --max-memory", 0)),
        ),
        (
            "hostile inputs tried",
            "{:,}".format(figures["hostile inputs total"]),
        ),
    ]
    if "pin" in kinds:
        rows.append(
            (
                "pin: a small message and the start of a 200 KB one in one read, "
                "never-reading receivers",
                "%s such reads, %s receivers (cut at --max-queue, all kinds together: %s)"
                % (
                    n("pin small messages"),
                    n("pin never-reading receivers"),
                    reasons.get("output queue over --max-queue", 0),
                ),
            )
        )
    if "who" in kinds:
        rows.append(
            (
                "who: never-reading users asking /who",
                "%s asked on %s connections; %s of them cut"
                % (n("who asked"), n("who connections"), n("who cut")),
            )
        )
    if "bytes" in kinds:
        rows.append(
            (
                "bytes: one user sending %d-byte messages as fast as it can"
                % LIMITS["--max-message"],
                "%s sent; relayed to an honest user: %s (--byte-rate %d KiB/s)"
                % (
                    n("bytes messages of --max-message"),
                    rate("bytes", "KiB/s"),
                    LIMITS["--byte-rate"] >> 10,
                ),
            )
        )
    if "reconnect" in kinds:
        rows.append(
            (
                "reconnect: fresh nicknames from one address, %d messages each" % LIMITS["--burst"],
                "%s sent on %s connections; relayed: %s (--address-rate %d)"
                % (
                    n("reconnect messages"),
                    n("reconnect connections"),
                    rate("rc", "messages/s"),
                    LIMITS["--address-rate"],
                ),
            )
        )
    if "guess" in kinds:
        checked = tried.get("guess answered: wrong", 0) + tried.get(
            "guess answered: wrong, now locked out", 0
        )
        rows.append(
            (
                "guess: wrong passwords from one address",
                "%s tried, %d checked (%.1f a second), %s refused as locked out, %s accepted"
                % (
                    n("guess passwords tried"),
                    checked,
                    checked / max(1e-9, figures["seconds"]),
                    n("guess answered: locked out"),
                    n("guess ACCEPTED"),
                ),
            )
        )
    if "stall" in kinds:
        rows.append(
            (
                "stall: frames that stop arriving (large / small / half header)",
                "%s / %s / %s; dropped after --frame-timeout: %s; bystander's 100 KB "
                "messages refused: %s of %s"
                % (
                    n("stall large frames"),
                    n("stall small frames"),
                    n("stall header frames"),
                    events.get("unfinished message dropped (--frame-timeout)", 0),
                    n("stall probe large messages refused"),
                    n("stall probe large messages sent"),
                ),
            )
        )
    if "selfmsg" in kinds:
        rows.append(
            (
                "selfmsg: never-reading users /msg-ing themselves 8 KB, %d addresses"
                % len(SELFMSG_ADDRESSES),
                "%s messages on %s connections; %s of them cut"
                % (n("selfmsg messages"), n("selfmsg connections"), n("selfmsg cut")),
            )
        )
    if "churnjoin" in kinds:
        rows.append(
            (
                "churnjoin: join and leave from one address",
                "%s joined, %s refused by --join-rate; join/leave notices on an honest "
                "screen: %s"
                % (
                    n("churnjoin joined"),
                    n("churnjoin refused: --join-rate"),
                    rate("join/leave notice frames", "messages/s"),
                ),
            )
        )
    if "nick" in kinds:
        rows.append(
            (
                "nick: invisible characters and lookalikes of the honest users' nicknames",
                "%s tried at joining, %s with /nick: **%d accepted**"
                % (
                    n("nick lookalikes tried at joining"),
                    n("nick lookalikes tried with /nick"),
                    sum(v for k, v in tried.items() if k.startswith("nick ACCEPTED")),
                ),
            )
        )
    rows += [
        ("disconnects by reason", top(reasons)),
        ("refused", top(refusals)),
        (
            "told to slow down, frames dropped",
            top({k: v for k, v in events.items() if not k.startswith("cut by")}),
        ),
        ("server exit status", str(figures["server exit status"])),
        ("problems", "; ".join(figures["problems"]) or "none"),
    ]
    lines = [
        "`%s` (server: `selchat.py %s`)" % (figures["command"], figures["server"]),
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    for name, value in rows:
        lines.append("| %s | %s |" % (name, str(value).replace("|", "\\|")))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
