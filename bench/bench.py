#!/usr/bin/env python3
"""Benchmark for selchat's server: a load generator and scenario runner.

Starts each server itself on 127.0.0.1 (a free port), drives it with client
processes that speak the wire protocol, stops it with SIGINT and checks that it
exited with status 0. Standard library only; matplotlib, when installed, is
used for the optional chart.

Servers (``--servers``):
  selchat   ../selchat.py server (the thing being measured)
  selchat-before
            another selchat.py given with --before FILE (e.g. the code before a
            change), run exactly like selchat: same scenarios, same options
            (only those its ``server --help`` lists), cases interleaved with
            selchat's, so that both see the same machine
  selchat-store
            the same selchat.py as selchat, started with --store on a fresh
            SQLite database for each case (in --store-dir, deleted afterwards
            with its -wal and -shm files): what keeping the history on disk
            costs, in the same run (target: within 10 % of selchat). The table
            shows how many messages each case stored and the database's size
  selchat-nagle
            the same server run through bench/nagle.py, which leaves Nagle's
            algorithm on (selchat sets TCP_NODELAY): fan-out and latency only,
            to measure that decision both ways
  asyncio   bench/ref_server.py: the idiomatic asyncio-streams server a Python
            programmer would write instead (same protocol and texts)
  ncat      ``ncat --chat`` (nmap's ncat, C, line protocol), when installed;
            only the scenarios a line protocol can do (fan-out, latency,
            overload)

Scenarios (``--scenarios``):
  fanout    4 senders -> 100 receivers and 2 senders -> 1000 receivers,
            pipelined 100-byte texts for --duration seconds. Deliveries/s and
            per receiver lost / duplicated / reordered / misattributed counts.
            Senders keep at most --inflight deliveries in flight beyond what
            the slowest receiver has got, so the relay runs at its sustainable rate
            instead of piling up queues until something gets disconnected.
  latency   one sender paced at 500 and at 2000 messages/s to 100 receivers,
            p50/p99/max from send to arrival; each again with one more client
            that registers and then never reads. Undelivered messages count as
            infinitely late. Each case runs --repeat times (3), alternating
            without and with that client; the run with the median p99 is shown.
  overload  paced overload: 10,000 messages a second in all from 4 senders
            (each sends, every millisecond, what is due from the time elapsed)
            to 100 receivers for --duration seconds: deliveries/s, p50/p99/max
            from send to arrival, undelivered, sequence gaps, duplicated,
            reordered. Latency is taken at the --overload-timed (10) receivers
            that join last (selchat serves them after the other 90 in each
            turn, its users being in join order), read at once by a
            process of their own; the other 90 are read every 5 ms and only
            counted and checked: one core of Python cannot read 100 sockets a
            few thousand times a second each, and timing them all measured the
            generator (p99 11-12 ms where the sample gives 3 ms). Runs --repeat
            times, servers taking turns; the median p99 run is shown.
  capacity  10,000 clients each register a nickname: time until all got their
            welcome, server memory per connected client, join notices, and
            whether every client's last count of users online is right once
            the notices settle, then again after 10 % leave.
  joins     --joins clients (10,000) join one by one, each connecting once the
            one before has its welcome, from one process that reads every
            connection all along: time until all joined, the server's CPU time
            for it (/proc/PID/stat), each newcomer's wait from connect() to its
            welcome, then, once the notices settle, how many clients were last
            told the right number online (from the welcome "N users online" and
            every "(N online)" notice); then 10 % leave at once and the counts
            are checked again. Cut short after --joins-timeout s (a server cut
            short is not run again). Not for ncat (no nicknames, no counts) nor
            selchat-nagle.
  big       one 50 MB message to 10 receivers: time until all have it, and the
            server's peak memory (VmHWM) above its idle VmRSS.

By default the server is pinned to CPU 1 and the whole load generator to CPU 0
(``--no-pin`` to let the kernel place them). The table shows the CPU each used
during the measurement: a server near 100 % is the bottleneck; a generator near
100 % with the server well below means the figure is the generator's limit (a
lower bound for the server). Loopback TCP work done in softirq is charged to
whichever process was running, mostly the sender of the data. "Other processes"
should be near 0: anything else running on the machine distorts the figures.
Every wait is bounded in time; nothing leaves 127.0.0.1.

Options a selchat server gets: --max-message 64 MiB (8 with --quick), and
where its ``server --help`` lists them --max-clients, --handshake-timeout 300,
--rate 0 (which turns the byte rates off too), --join-rate 0 (every client
joins from 127.0.0.1, and fan-out to 1000, capacity and joins bring in more
than one --join-burst) and --max-address-memory 0 (every client shares
127.0.0.1's budget; --max-memory keeps its default). So no limit changes a
figure. --server-option OPT[=VALUE] (repeatable) adds an option to every
selchat server whose ``server --help`` lists OPT (so a new option reaches the
new server and not selchat-before); given later, it wins over the above.

--rounds N runs every fan-out case N times, the servers taking turns, and
shows the run with the median deliveries/s (and every run's figure); latency
cases take turns between servers too, --repeat times each.

--realtime runs the server and the load generator of every latency and
overload case with SCHED_FIFO (root only): on a machine shared with other
work, a server pinned to its core still waited 20-40 ms at a time on the run
queue behind other processes (seen in /proc/PID/schedstat), which made p99
the other work's figure, not the server's. The kernel keeps 5 % of each core
for everything else.

BENCH_PROFILE=DIR runs every load generator process under cProfile and saves
the statistics in DIR (to check that the generator is not the bottleneck).
BENCH_SERVER_PROFILE=DIR runs every selchat server (not selchat-nagle) under
cProfile, one file per case in DIR (SERVER-PID-N.prof): cProfile slows the
server a lot, so compare the profiles, not the figures of such a run. It sees
the main thread only: not selchat-store's writer thread.

    python bench/bench.py                       # everything, ~12 minutes on 2 cores
    python bench/bench.py --quick               # smoke run, ~1 minute
    python bench/bench.py --servers selchat,asyncio --scenarios joins,overload
    python bench/bench.py --servers selchat,asyncio --scenarios fanout
    python bench/bench.py --chart bench.png --json results.json
    python bench/bench.py --servers selchat,selchat-before --before OLD.py \
        --scenarios fanout,latency --rounds 3     # a change against the code before it
    python bench/bench.py --servers selchat,selchat-store \
        --scenarios fanout,latency --rounds 3     # what --store costs
"""

import argparse
import array
import errno
import json
import multiprocessing as mp
import os
import re
import resource
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"
STAMP = b"2026-01-01T00:00:00+00:00"
TEXT_SIZE = 100  # bytes of chat text per benchmark message
RECV_SIZE = 256 * 1024
# Connections waiting for their welcome, all processes together: two thirds of
# the server's listen backlog (asyncio's default is 100, ncat's 10, selchat's
# larger), at most 1024, so no SYN is dropped and no client waits a second for
# a retransmission, while a server with a deep backlog is not throttled.
MAX_HANDSHAKES = 1024
SETUP_TIMEOUT = 90.0  # receivers registering
QUIET_TIME = 0.3  # no bytes for this long = join notices are through
QUIET_TIMEOUT = 30.0
DRAIN_TIMEOUT = 5.0  # after the senders stop, while deliveries still progress
STOP_TIMEOUT = 15.0  # SIGINT to exit
REALTIME_PRIORITY = 10  # SCHED_FIFO priority with --realtime
BIG_TIMEOUT = 120.0

# What a relayed benchmark message looks like. Sender i registers as "S<i>" and
# sends texts "S<i>-<seq:09d>|...", so a receiver can check the stamped nick,
# the sender and the order. Latency texts add "T<monotonic_ns:020d>|".
TEXT_RE = re.compile(rb"S(\d+)-(\d{9})\|(?:T(\d{20})\|)?")
NCAT_PREFIX_RE = re.compile(rb"<user\d+> ")
RUN_RE = re.compile(rb"(.)\1*", re.S)
GOODBYE = b"Server is shutting down"
JOINED = b"joined the chat"
LEFT = b"left the chat"


def _cycle(step, length=12000):
    unit = b"".join(bytes([48 + d]) * step for d in range(10))
    return (unit * (length // len(unit) + 2))[: length + len(unit)]


CYCLES = (_cycle(1), _cycle(10))  # what units and tens digit columns of consecutive numbers read
MAX_FAST_RUN = 10000


def encode_frame(payload):
    return b"%-10d" % len(payload) + payload


def chat_text(sender, seq, stamp_ns=None):
    head = b"S%d-%09d|" % (sender, seq)
    if stamp_ns is not None:
        head += b"T%020d|" % stamp_ns
    return head + b"x" * (TEXT_SIZE - len(head))


def wire_message(mode, sender, text):
    """What a sender writes for one chat message."""
    if mode == "line":
        return text + b"\n"
    return encode_frame(STAMP + b"\0S%d\0" % sender + text)


def count_frames(blob):
    """How many frames (10-byte length header, payload) are end to end in blob."""
    count = pos = 0
    while pos + 10 <= len(blob):
        pos += 10 + int(blob[pos : pos + 10])
        count += 1
    return count


class Layout:
    """Fixed byte offsets of one relayed fan-out message, for the fast checker.

    In steady state every relayed message has the same length, so the receive
    buffer is a run of equal records: columns (every L-th byte) are sliced out
    in C and compared as a whole instead of parsing record by record.
    """

    def __init__(self, mode, timed=False):
        sample = chat_text(7, 0, 0 if timed else None)
        if mode == "line":
            record = sample + b"\n"
            self.sid_off, self.sid2_off, base = 1, None, 0
        else:
            record = encode_frame(STAMP + b"\0S7\0" + sample)
            base = record.index(b"\0S7\0") + 4
            self.sid_off, self.sid2_off = base - 2, base + 1  # stamped nick, text
        self.length = len(record)
        self.seq_off = base + 3
        # Enough fixed bytes to prove the buffer is tiled by such records:
        # header digits and padding, the NULs around the nick, the text's "|".
        fixed = [0, 2, 3, 9, base - 4, base - 1] if mode == "frame" else [self.length - 1, 0]
        fixed += [base + 12]
        self.ts_off = None
        if timed:  # "T" + 20 digits of time.monotonic_ns() + "|"
            self.ts_off = base + 14
            fixed += [base + 13, base + 34]
        self.checks = [(off, record[off : off + 1]) for off in fixed]


# --------------------------------------------------------------------------
# One client connection on the receiving side
# --------------------------------------------------------------------------


class Conn:
    __slots__ = (
        "bad",
        "big_done_ns",
        "big_head",
        "big_left",
        "big_size",
        "big_start",
        "big_tail",
        "count",
        "delivered",
        "dup",
        "eof",
        "exp",
        "goodbye",
        "join_notes",
        "joined",
        "joined_ns",
        "last_chat_ns",
        "left_notes",
        "lost_far",
        "missing",
        "nick",
        "rejected",
        "reord",
        "services",
        "sock",
        "tail",
        "welcome_text",
    )

    def __init__(self, sock, nick, nsenders):
        self.sock = sock
        self.nick = nick
        self.tail = b""
        self.joined = False
        self.joined_ns = 0
        self.rejected = None
        self.eof = False
        self.exp = [0] * nsenders
        self.missing = [set() for _ in range(nsenders)]
        self.lost_far = self.dup = self.reord = self.bad = self.delivered = 0
        self.services = 0
        self.last_chat_ns = 0
        self.goodbye = False
        self.join_notes = self.left_notes = 0
        self.big_left = None
        self.big_head = self.big_start = self.big_tail = b""
        self.big_size = 0
        self.big_done_ns = 0
        self.welcome_text = b""
        self.count = -1  # the last number online it was told (capacity)

    def account(self, s, seq):
        expected = self.exp[s]
        if seq == expected:
            self.exp[s] = seq + 1
            self.delivered += 1
        elif seq > expected:
            if seq - expected <= 1_000_000:
                self.missing[s].update(range(expected, seq))
            else:
                self.lost_far += seq - expected
            self.exp[s] = seq + 1
            self.delivered += 1
        elif seq in self.missing[s]:
            self.missing[s].discard(seq)
            self.reord += 1
            self.delivered += 1
        else:
            self.dup += 1


class Worker:
    """A process holding many client connections, driven over a pipe.

    kind: "fanout" (count and check order), "latency" (collect send-to-arrival
    times), "capacity" (register, then count notices), "big" (one huge frame).
    """

    def __init__(self, pipe, spec):
        self.pipe = pipe
        self.mode = spec["mode"]
        self.kind = spec["kind"]
        self.port = spec["port"]
        self.ns = spec.get("nsenders", 1)
        self.widx = spec.get("widx", 0)
        self.progress = spec.get("progress")
        self.pending = list(spec["nicks"])
        self.layout = (
            Layout(self.mode, self.kind == "latency")
            if self.kind in ("fanout", "latency")
            else None
        )
        self.sel = selectors.DefaultSelector()
        self.conns = []
        self.handshaking = 0
        self.failed = 0
        self.fail_reason = ""
        self.last_rx_ns = 0
        self.rx_bytes = 0
        self.latencies = array.array("q")
        self.running = True
        self.bigbuf = None
        self.rbuf = bytearray(2 * RECV_SIZE)
        self.max_handshakes = spec["handshakes"]
        self.n_joined = self.n_rejected = self.n_eof = self.n_big_done = 0
        self.last_join_ns = 0
        self.reject_text = b""
        self.stats = {"recvs": 0, "fast_chunks": 0, "runs": 0, "fast_msgs": 0, "slow_msgs": 0}
        # Latency receivers that only count and check (collect False) may read
        # every `lazy` s instead of at once: one recv() for many messages.
        self.collect = spec.get("collect", True)
        self.lazy = spec.get("lazy", 0.0)

    # -- main loop ---------------------------------------------------------
    def run(self):
        self.sel.register(self.pipe.fileno(), selectors.EVENT_READ, None)
        next_publish = 0.0
        while self.running:
            self.connect_more()
            if self.lazy and not self.pending and not self.handshaking:
                time.sleep(self.lazy)
            for key, mask in self.sel.select(0.005):
                if not self.running:
                    break  # "quit" closed every socket
                if key.data is None:
                    self.command(self.pipe.recv())
                elif conn_closed(key.data):
                    continue  # dropped earlier in this same batch
                elif mask & selectors.EVENT_WRITE:
                    self.connected(key.data)
                else:
                    self.readable(key.data)
            if self.progress is not None:
                now = time.monotonic()
                if now >= next_publish:
                    next_publish = now + 0.003
                    self.publish()

    def publish(self):
        live = [c for c in self.conns if c.joined and not c.eof]
        base = self.widx * self.ns
        for s in range(self.ns):
            self.progress[base + s] = min((c.exp[s] for c in live), default=1 << 62)

    def connect_more(self):
        while self.pending and self.handshaking < self.max_handshakes:
            nick = self.pending.pop(0)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex((HOST, self.port))
            if err not in (0, errno.EINPROGRESS):
                self.failed += 1
                self.fail_reason = os.strerror(err)
                sock.close()
                continue
            conn = Conn(sock, nick, self.ns)
            self.conns.append(conn)
            self.handshaking += 1
            self.sel.register(sock, selectors.EVENT_WRITE, conn)

    def connected(self, conn):
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.failed += 1
            self.fail_reason = os.strerror(err)
            self.drop(conn)
            return
        if self.mode == "frame":
            conn.sock.send(encode_frame(conn.nick.encode()))
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def drop(self, conn):
        if not conn.eof:
            if conn.joined:
                self.n_eof += 1
            else:
                self.handshaking -= 1
        conn.eof = True
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def readable(self, conn):
        if conn.big_left is not None:
            return self.read_big(conn)
        # Received into one reused buffer, after the unfinished tail of the
        # last read: no fresh 256 KB object (and its page faults) per recv().
        buf, kept = self.rbuf, len(conn.tail)
        if kept > RECV_SIZE:
            buf = bytearray(kept + RECV_SIZE)
        if kept:
            buf[:kept] = conn.tail
        try:
            n = conn.sock.recv_into(memoryview(buf)[kept : kept + RECV_SIZE])
        except (ConnectionError, OSError):
            n = 0
        now = time.monotonic_ns()
        if not n:
            self.drop(conn)
            return
        self.last_rx_ns = now
        self.rx_bytes += n
        self.stats["recvs"] += 1
        end = kept + n
        if conn.joined and self.layout is not None and self.mode == "frame":
            m = self.fast(conn, buf, now, end)
            if m is not None:
                conn.tail = bytes(buf[m:end])
                return
        data = bytes(buf[:end])
        if not conn.joined:
            data = self.handshake(conn, data, now)
            if not conn.joined:
                conn.tail = data
                return
        if self.kind == "capacity":
            self.count_notices(conn, data)
        elif self.mode == "frame":
            conn.tail = self.walk_frames(conn, data, now)
        else:
            cut = data.rfind(b"\n") + 1
            conn.tail = data[cut:]
            body = NCAT_PREFIX_RE.sub(b"", data[:cut])
            if self.layout is None or self.fast(conn, body, now, len(body)) != len(body):
                self.walk_lines(conn, body, now)

    def handshake(self, conn, data, now):
        """Wait for the first frame (welcome) or, for ncat, the first announce."""
        if self.mode == "line":
            if b"<announce>" not in data:
                return data
            ready = True
        else:
            if len(data) < 10:
                return data
            try:
                length = int(data[:10])
            except ValueError:
                length = -1
            if length < 0:
                conn.rejected = data[:60]
                self.n_rejected += 1
                self.reject_text = self.reject_text or conn.rejected
                self.drop(conn)
                return b""
            if len(data) < 10 + length:
                return data
            first = data[10 : 10 + length]
            ready = first.startswith(b"Welcome")
            if not ready:
                conn.rejected = first[:100]
            conn.welcome_text = first[:100]
            said = COUNT_RE.search(first)
            if said:
                conn.count = int(said.group(1).replace(b",", b""))
            data = data[10 + length :]
        self.handshaking -= 1
        if ready:
            conn.joined = True
            conn.joined_ns = self.last_join_ns = now
            self.n_joined += 1
        else:
            self.n_rejected += 1
            self.reject_text = self.reject_text or conn.rejected
            conn.eof = True
            self.sel.unregister(conn.sock)
            conn.sock.close()
        if self.mode == "line":
            return b""  # ncat announces are not counted
        return data

    # -- parsing -------------------------------------------------------------
    def walk_frames(self, conn, data, now):
        pos, end = 0, len(data)
        while end - pos >= 10:
            try:
                length = int(data[pos : pos + 10])
            except ValueError:
                conn.bad += 1
                return b""
            stop = pos + 10 + length
            if stop > end:
                break
            payload = data[pos + 10 : stop]
            pos = stop
            if b"\0" not in payload:
                self.service(conn, payload)
                continue
            _, nick, text = payload.split(b"\0", 2)
            self.chat(conn, nick, text, now)
        return data[pos:]

    def walk_lines(self, conn, body, now):
        for line in body.split(b"\n")[:-1]:
            if line.startswith(b"<announce>"):
                self.service(conn, line)
            else:
                self.chat(conn, None, line, now)

    def service(self, conn, payload):
        conn.services += 1
        if payload.startswith(GOODBYE):
            conn.goodbye = True
            self.drop(conn)  # as selchat's client does: it leaves by itself

    def chat(self, conn, nick, text, now):
        m = TEXT_RE.match(text)
        if m is None or (nick is not None and nick != b"S" + m.group(1)):
            conn.bad += 1
            return
        s = int(m.group(1))
        if s >= self.ns:
            conn.bad += 1
            return
        conn.last_chat_ns = now
        self.stats["slow_msgs"] += 1
        if m.group(3) is not None and self.collect:
            self.latencies.append(now - int(m.group(3)))
        conn.account(s, int(m.group(2)))

    def fast(self, conn, data, now, end):
        """Check a whole buffer of equal-length relayed messages at C speed.

        Returns how many bytes it consumed, or None when data[:end] is not a run of
        benchmark messages (a notice in between, a misaligned frame): the caller
        then walks it message by message. Within a run of messages from one
        sender the first and last sequence numbers, the count and the units and
        tens digit columns must all fit consecutive numbers; anything else is
        re-checked one message at a time.
        """
        lay = self.layout
        size = lay.length
        k = end // size
        if k == 0:
            return 0
        m = k * size
        for off, ch in lay.checks:
            if data[off:m:size] != ch * k:
                return None
        sid = data[lay.sid_off : m : size]
        if lay.sid2_off is not None and data[lay.sid2_off : m : size] != sid:
            return None
        seq_off = lay.seq_off
        stats = self.stats
        stats["fast_chunks"] += 1
        stats["fast_msgs"] += k
        for run in RUN_RE.finditer(sid):
            stats["runs"] += 1
            i, j = run.span()
            count = j - i
            s = sid[i] - 48
            a = i * size + seq_off
            b = (j - 1) * size + seq_off
            if 0 <= s < self.ns and count <= MAX_FAST_RUN:
                first = int(data[a : a + 9])
                if (
                    first == conn.exp[s]
                    and int(data[b : b + 9]) == first + count - 1
                    and (
                        count < 3
                        or (
                            data[a + 8 : b + 9 : size] == CYCLES[0][first % 10 : first % 10 + count]
                            and data[a + 7 : b + 8 : size]
                            == CYCLES[1][first % 100 : first % 100 + count]
                        )
                    )
                ):
                    conn.exp[s] = first + count
                    conn.delivered += count
                    continue
            if not 0 <= s < self.ns:
                conn.bad += count
                continue
            for f in range(i, j):
                o = f * size + seq_off
                conn.account(s, int(data[o : o + 9]))
        conn.last_chat_ns = now
        if lay.ts_off is not None and self.collect:
            self.latencies.extend([now - int(data[o : o + 20]) for o in range(lay.ts_off, m, size)])
        return m

    def count_notices(self, conn, data):
        # Counted in the raw bytes: a notice split across two reads is missed,
        # which can only undercount.
        conn.join_notes += data.count(JOINED)
        conn.left_notes += data.count(LEFT)
        if GOODBYE in data:
            conn.goodbye = True
            self.drop(conn)
        # The last "(N online)" it was told, as JoinClients.read keeps it.
        buf = conn.tail + data if conn.tail else data
        last = None
        for last in COUNT_RE.finditer(buf):  # noqa: B007 - the last one is wanted
            pass
        start = len(buf) - COUNT_TAIL
        if last is not None:
            conn.count = int(last.group(1).replace(b",", b""))
            start = max(start, last.end())
        conn.tail = buf[start:] if start > 0 else buf

    def read_big(self, conn):
        """Stream frames through one reused buffer; only their ends are looked at."""
        try:
            n = conn.sock.recv_into(self.bigbuf)
        except (ConnectionError, OSError):
            n = 0
        now = time.monotonic_ns()
        if n == 0:
            self.drop(conn)
            return
        self.last_rx_ns = now
        self.rx_bytes += n
        view = memoryview(self.bigbuf)[:n]
        while view:
            if conn.big_left == 0:  # a header, perhaps split across reads
                need = 10 - len(conn.big_head)
                conn.big_head += bytes(view[:need])
                view = view[need:]
                if len(conn.big_head) < 10:
                    return
                conn.big_left = conn.big_size = int(conn.big_head)
                conn.big_head = conn.big_start = conn.big_tail = b""
                continue
            take = min(conn.big_left, len(view))
            chunk = view[:take]
            if len(conn.big_start) < 64:
                conn.big_start += bytes(chunk[: 64 - len(conn.big_start)])
            conn.big_tail = (conn.big_tail + bytes(chunk[-4:]))[-4:]
            conn.big_left -= take
            view = view[take:]
            if conn.big_left:
                continue
            if conn.big_start.startswith(GOODBYE):
                self.drop(conn)
                return
            if conn.big_size > 1000:
                if conn.big_tail == b"|END" and b"BIG|" in conn.big_start:
                    conn.big_done_ns = now
                    conn.delivered += 1
                    self.n_big_done += 1
                else:
                    conn.bad += 1

    # -- commands from the scenario runner ------------------------------------
    def command(self, msg):
        op = msg[0]
        if op == "status":  # cheap: asked many times a second
            self.pipe.send(
                {
                    "joined": self.n_joined,
                    "pending": len(self.pending) + self.handshaking,
                    "failed": self.failed,
                    "fail_reason": self.fail_reason,
                    "rejected": self.n_rejected,
                    "reject_text": self.reject_text,
                    "eof": self.n_eof,
                    "last_rx_ns": self.last_rx_ns,
                    "last_join_ns": self.last_join_ns,
                    "rx_bytes": self.rx_bytes,
                    "big_done": self.n_big_done,
                    "received": len(self.latencies),
                    "delivered": sum(c.delivered for c in self.conns),
                }
            )
        elif op == "notes":
            joined = [c for c in self.conns if c.joined]
            self.pipe.send(
                {
                    "with_join_note": sum(1 for c in joined if c.join_notes),
                    "join_notes": sum(c.join_notes for c in joined),
                    "with_left_note": sum(1 for c in joined if not c.eof and c.left_notes),
                    "live": sum(1 for c in joined if not c.eof),
                    "delivered": sum(c.delivered for c in joined),
                    "goodbye": sum(1 for c in joined if c.goodbye),
                    "right": sum(
                        1 for c in joined if not c.eof and len(msg) > 1 and c.count == msg[1]
                    ),
                }
            )
        elif op == "leave":
            live = [c for c in self.conns if c.joined and not c.eof]
            for c in live[len(live) - msg[1] :]:
                self.drop(c)
            for c in self.conns:
                c.left_notes = 0
            self.pipe.send("ok")
        elif op == "big":
            self.bigbuf = bytearray(4 << 20)
            for c in self.conns:
                if c.joined and not c.eof:
                    c.big_left = 0
            self.pipe.send("ok")
        elif op == "results":
            joined = [c for c in self.conns if c.joined]
            self.pipe.send(
                {
                    "receivers": len(joined),
                    "eof": sum(1 for c in joined if c.eof),
                    "exp": [[c.exp[s] for s in range(self.ns)] for c in joined],
                    "missing": sum(len(ms) for c in joined for ms in c.missing)
                    + sum(c.lost_far for c in joined),
                    "dup": sum(c.dup for c in joined),
                    "reord": sum(c.reord for c in joined),
                    "bad": sum(c.bad for c in joined),
                    "delivered": sum(c.delivered for c in joined),
                    "last_chat_ns": max((c.last_chat_ns for c in joined), default=0),
                    "latencies": self.latencies.tobytes(),
                    "big_done": [c.big_done_ns for c in joined],
                    "stats": self.stats,
                }
            )
        elif op == "quit":
            for c in self.conns:
                if not c.eof:
                    if msg[1]:  # reset instead of FIN: leaves no TIME_WAIT behind
                        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    c.sock.close()
            self.pipe.send("bye")
            self.running = False


def conn_closed(conn):
    return conn.eof or conn.sock.fileno() < 0


def worker_main(pipe, spec):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    profiled(Worker(pipe, spec).run, "worker-%s-%d" % (spec["kind"], spec.get("widx", 0)))


def profiled(fn, name):
    """Run fn; with BENCH_PROFILE=DIR set, under cProfile, stats saved in DIR."""
    where = os.environ.get("BENCH_PROFILE")
    if not where:
        return fn()
    import cProfile

    prof = cProfile.Profile()
    try:
        return prof.runcall(fn)
    finally:
        prof.dump_stats(os.path.join(where, "%s-%d.prof" % (name, os.getpid())))


# --------------------------------------------------------------------------
# Senders
# --------------------------------------------------------------------------


def register(port, mode, nick, timeout=60.0, rcvbuf=0):
    """Connect, send the nickname, read the welcome; returns a blocking socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connecting, so the advertised window is small too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    deadline = time.monotonic() + timeout
    data = b""
    if mode == "frame":
        sock.sendall(encode_frame(nick))
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed during registration")
        data += chunk
        if mode == "line" and b"<announce>" in data:
            break
        if mode == "frame" and len(data) >= 10 and len(data) >= 10 + int(data[:10]):
            if not data[10:].startswith(b"Welcome"):
                raise ConnectionError(data[10:100].decode("utf-8", "replace"))
            break
    return sock


def sender_main(pipe, spec):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    profiled(lambda: sender_run(pipe, spec), "sender-%s-%d" % (spec["kind"], spec["sender"]))


def sender_run(pipe, spec):
    """One sender: windowed pipelined (fanout), paced (latency) or one big message."""
    mode, s, kind = spec["mode"], spec["sender"], spec["kind"]
    try:
        sock = register(spec["port"], mode, b"S%d" % s)
    except (OSError, ValueError) as exc:
        pipe.send(("error", str(exc)))
        return
    big = None
    if kind == "big":
        text = b"BIG|" + b"x" * (spec["size"] - 8) + b"|END"
        big = wire_message(mode, s, text)
    sock.setblocking(False)
    pipe.send(("ready",))
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(pipe.fileno(), selectors.EVENT_READ, "pipe")
    go = None
    while go is None:  # keep reading notices until told to go
        for key, _ in sel.select(0.05):
            if key.data == "pipe":
                go = pipe.recv()
            else:
                discard(sock)
    if go[0] == "quit":
        return
    _, t_start, t_end = go
    while time.monotonic() < t_start:
        time.sleep(min(0.01, max(0.0, t_start - time.monotonic())))
    if kind == "fanout":
        sent = send_windowed(sock, sel, spec, t_end)
    elif kind == "latency":
        sent = send_paced(sock, sel, spec, t_start, t_end)
    else:
        t0 = time.monotonic_ns()
        sock.setblocking(True)
        sock.sendall(big)
        sock.setblocking(False)
        sent = t0
    pipe.send(("done", sent))
    while True:  # go on reading until the runner says quit
        for key, _ in sel.select(0.05):
            if key.data == "pipe":
                pipe.recv()
                sock.close()
                return
            if not discard(sock):
                sel.unregister(sock)
                sock.close()


def discard(sock):
    """Read and drop what is there; False once the server closed or said goodbye."""
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data or GOODBYE in data:
                return False
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False


def send_windowed(sock, sel, spec, t_end):
    mode, s = spec["mode"], spec["sender"]
    progress, nworkers, ns = spec["progress"], spec["nworkers"], spec["nsenders"]
    window, batch = spec["window"], spec["batch"]
    sample = wire_message(mode, s, chat_text(s, 0))
    size = len(sample)
    pre, post = sample.split(b"000000000", 1)
    seq = 0
    written = 0
    out = memoryview(b"")
    hard_end = t_end + DRAIN_TIMEOUT
    while True:
        now = time.monotonic()
        if now >= hard_end or (now >= t_end and not out):
            break
        if not out and now < t_end:
            low = min(progress[w * ns + s] for w in range(nworkers))
            n = min(batch, low + window - seq)
            if n > 0:
                out = memoryview(b"".join([pre + b"%09d" % q + post for q in range(seq, seq + n)]))
                seq += n
        if out:
            try:
                sent = sock.send(out)
                written += sent
                out = out[sent:]
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                break
            if out:
                waitfor(sock, 0.002, write=True)
            discard(sock)
        else:
            waitfor(sock, 0.0005)
            discard(sock)
    return written // size


def waitfor(sock, timeout, write=False):
    try:
        select.select([sock], [sock] if write else [], [], timeout)
    except OSError:
        pass


def send_paced(sock, sel, spec, t_start, t_end):
    """Send what is due from the time elapsed, at most once every spec["tick"] s
    (0: as soon as each message is due), each message stamped with the time its
    batch was handed to the kernel."""
    mode, s, rate, tick = spec["mode"], spec["sender"], spec["rate"], spec.get("tick", 0.0)
    seq = 0
    out = b""
    last_batch = 0.0
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        due = min(int((now - t_start) * rate) + 1, int((t_end - t_start) * rate))
        if due > seq and now - last_batch >= tick:
            last_batch = now
            stamp = time.monotonic_ns()
            out += b"".join(wire_message(mode, s, chat_text(s, q, stamp)) for q in range(seq, due))
            seq = due
        if out:
            try:
                out = out[sock.send(out) :]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                break
        discard(sock)
        nxt = max(t_start + seq / rate, last_batch + tick)
        delay = nxt - time.monotonic()
        if delay > 0:
            waitfor(sock, min(delay, 0.005))
    hard_end = t_end + DRAIN_TIMEOUT
    while out and time.monotonic() < hard_end:
        try:
            out = out[sock.send(out) :]
        except (BlockingIOError, InterruptedError):
            waitfor(sock, 0.005, write=True)
        except OSError:
            break
        discard(sock)
    return seq


# --------------------------------------------------------------------------
# One-by-one joins
# --------------------------------------------------------------------------

# How many are online, as the welcome ("Welcome to selchat, NICK! 12 users
# online.") and the join and leave notices ("... joined the chat (12 online)",
# "(12,000 online)" read too) say it.
COUNT_RE = re.compile(rb"(?:\(|! )(\d[\d,]*) (?:users? )?online")
COUNT_TAIL = 48  # longer than any COUNT_RE match: what is kept of a read for the next one
JOINS_DRAIN = 0.1  # seconds between two reads of every connection while clients join
LAZY_READ = 0.005  # seconds between two reads of the overload receivers not timed


class JoinClients:
    """Clients that join one after another, all held open by one process.

    Client i connects only once client i-1 has its welcome. Every connection is
    read all the time (a client that stops reading would be cut at the server's
    --max-queue), and for each the last count of users online that it was told
    is kept: from its welcome, then from every join or leave notice.
    """

    def __init__(self, spec):
        self.addr = (HOST, spec["port"])
        self.server_pid = spec["server_pid"]
        self.ep = select.epoll()  # every client with its welcome
        self.ep_new = select.epoll()  # the newcomer, waiting for its welcome
        self.new = -1
        self.socks = []  # client number -> socket (None once closed)
        self.by_fd = {}
        self.count = []  # the last "N online" each client was told, -1: none yet
        self.notes = []  # counts each client was told, its welcome's included
        self.tail = []
        self.welcomed = []  # monotonic_ns of its welcome, 0: not yet
        self.started = []  # monotonic_ns of its connect()
        self.live = 0  # welcomed and not closed
        self.cut = self.rejected = self.failed = 0
        self.why = ""
        self.rx_bytes = 0
        self.last_rx = time.monotonic()

    def close(self, i, reset=False):
        sock = self.socks[i]
        if sock is None:
            return
        if reset:  # no TIME_WAIT left behind
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        (self.ep_new if i == self.new else self.ep).unregister(sock.fileno())
        del self.by_fd[sock.fileno()]
        sock.close()
        self.socks[i] = None
        if self.welcomed[i]:
            self.live -= 1

    def read(self, i):
        try:
            data = self.socks[i].recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if self.welcomed[i]:
                self.cut += 1
            else:
                self.failed += 1
                self.why = self.why or "closed before its welcome"
            self.close(i)
            return
        self.last_rx = time.monotonic()
        self.rx_bytes += len(data)
        buf = self.tail[i] + data if self.tail[i] else data
        if not self.welcomed[i]:
            length = int(buf[:10]) if len(buf) >= 10 and buf[:10].strip().isdigit() else None
            if length is None or len(buf) < 10 + length:
                if len(buf) >= 10 and length is None:
                    self.reject(i, buf[:60])
                else:
                    self.tail[i] = buf
                return
            if not buf.startswith(b"Welcome", 10):
                self.reject(i, buf[10 : 10 + min(length, 100)])
                return
            self.welcomed[i] = time.monotonic_ns()
            self.live += 1
        last, seen = None, 0
        for last in COUNT_RE.finditer(buf):  # noqa: B007 - the last one is wanted
            seen += 1
        if last is not None:
            self.count[i] = int(last.group(1).replace(b",", b""))
            self.notes[i] += seen
            start = max(last.end(), len(buf) - COUNT_TAIL)
        else:
            start = len(buf) - COUNT_TAIL
        self.tail[i] = buf[start:] if start > 0 else buf

    def reject(self, i, text):
        self.rejected += 1
        self.why = self.why or text.decode("utf-8", "replace")
        self.close(i)

    def serve(self, events):
        by_fd = self.by_fd
        for fd, _ in events:
            i = by_fd.get(fd, -1)
            if i >= 0 and self.socks[i] is not None:
                self.read(i)

    def join_all(self, n, timeout):
        """Connect n clients one by one; returns the time of the last welcome.

        The newcomer is watched on its own; everyone else is read every
        JOINS_DRAIN s (between two joins when the welcomes come fast), so that
        the generator's cost per notice is that of one recv() for several
        notices and the figure is the server's, not the generator's.
        """
        deadline = time.monotonic() + timeout
        next_drain = time.monotonic() + JOINS_DRAIN
        last = 0
        for i in range(n):
            now = time.monotonic()
            if now >= next_drain:
                next_drain = now + JOINS_DRAIN
                self.drain()
            if now >= deadline or self.failed + self.rejected >= 10:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, min(10.0, deadline - now)))
            self.started.append(time.monotonic_ns())
            self.count.append(-1)
            self.notes.append(0)
            self.tail.append(b"")
            self.welcomed.append(0)
            try:
                sock.connect(self.addr)
                sock.setblocking(False)
                sock.send(encode_frame(b"j%d" % i))
            except OSError as exc:
                self.failed += 1
                self.why = self.why or "connect: %s" % exc
                sock.close()
                self.socks.append(None)
                continue
            self.socks.append(sock)
            self.by_fd[sock.fileno()] = i
            self.new = i
            self.ep_new.register(sock.fileno(), select.EPOLLIN)
            while not self.welcomed[i] and self.socks[i] is not None:
                now = time.monotonic()
                if now >= deadline:
                    return last
                if now >= next_drain:
                    next_drain = now + JOINS_DRAIN
                    self.drain()
                if self.ep_new.poll(min(0.05, max(0.0, next_drain - now)), 1):
                    self.read(i)
            self.new = -1
            if self.socks[i] is not None:
                self.ep_new.unregister(sock.fileno())
                self.ep.register(sock.fileno(), select.EPOLLIN)
            if self.welcomed[i]:
                last = self.welcomed[i]
        return last

    def drain(self):
        """One read of every connection that has something."""
        self.serve(self.ep.poll(0, len(self.by_fd) + 1))

    def right(self):
        """How many connected clients were last told the number connected."""
        live = self.live
        return sum(1 for i, c in enumerate(self.count) if c == live and self.socks[i] is not None)

    def settle(self, quiet, timeout):
        """Read until every client's last count is right, or nothing arrives for
        `quiet` s (notices may be held back for a while), or for `timeout` s.
        Returns the seconds it took for all to be right (None: never)."""
        start = time.monotonic()
        check = 0.0
        while True:
            self.serve(self.ep.poll(0.02, 1024))
            now = time.monotonic()
            if now >= check:
                check = now + 0.05
                if self.right() == self.live:
                    return now - start
            if now - self.last_rx >= quiet or now - start >= timeout:
                return None

    def leave(self, k):
        """The last k connected clients close their connections at once."""
        gone = 0
        for i in range(len(self.socks) - 1, -1, -1):
            if gone == k:
                break
            if self.socks[i] is not None and self.welcomed[i]:
                self.close(i)
                gone += 1
        return gone


def joins_main(pipe, spec):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gen = JoinClients(spec)
    result = {}
    try:
        profiled(lambda: joins_run(gen, spec, result), "joins")
    except Exception as exc:  # reported, not lost
        result["error"] = "%s: %s" % (type(exc).__name__, exc)
    pipe.send(result)
    pipe.recv()  # "quit", once the server is stopped
    for i in range(len(gen.socks)):
        gen.close(i, reset=True)
    pipe.send("bye")


def joins_run(gen, spec, result):
    n, pid = spec["clients"], spec["server_pid"]
    cpu0, me0, busy0 = proc_cpu(pid), os.times(), machine_busy()
    t0 = time.monotonic_ns()
    last = gen.join_all(n, spec["timeout"])
    cpu1, me1, busy1 = proc_cpu(pid), os.times(), machine_busy()
    wall = max(1e-9, (time.monotonic_ns() - t0) / 1e9)
    joined = sum(1 for w in gen.welcomed if w)
    server = sum(cpu1) - sum(cpu0)
    mine = sum(me1[:2]) - sum(me0[:2])
    result.update(
        clients=n,
        joined=joined,
        join_time=(last - t0) / 1e9 if joined else float("nan"),
        failed=gen.failed,
        rejected=gen.rejected,
        reason=gen.why,
        server_cpu_s=server,
        server_cpu=server / wall,
        gen_cpu=mine / wall,
        other_cpu=max(0.0, (busy1 - busy0) - server - mine) / wall,
    )
    # Each newcomer's wait: from connect() to its welcome.
    lat = sorted(w - c for w, c in zip(gen.welcomed, gen.started) if w)
    result.update(
        welcome_p50=percentile(lat, len(lat), 0.5),
        welcome_p99=percentile(lat, len(lat), 0.99),
        welcome_max=lat[-1] / 1e6 if lat else float("nan"),
    )
    settle = gen.settle(spec["quiet"], spec["settle"])
    cpu2 = proc_cpu(pid)
    result.update(
        settle_time=settle,
        live=gen.live,
        right=gen.right(),
        cut=gen.cut,
        server_cpu_settled=sum(cpu2) - sum(cpu0),
        notices=(sum(gen.notes) - joined) / max(1, joined),
    )
    if joined == n and spec["leave"]:
        left = gen.leave(max(1, n * spec["leave"] // 100))
        settle = gen.settle(spec["quiet"], spec["settle"])
        result.update(left=left, leave_settle=settle, leave_live=gen.live, leave_right=gen.right())


# --------------------------------------------------------------------------
# Servers under test
# --------------------------------------------------------------------------


def proc_status(pid):
    values = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    key, value = line.split(":")
                    values[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return values


CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    """(user, system) CPU seconds of a process so far."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLOCK_TICK, int(fields[12]) / CLOCK_TICK
    except (OSError, IndexError):
        return 0.0, 0.0


class Server:
    def __init__(self, name, opts):
        self.name = name
        self.opts = opts
        self.mode = "line" if name == "ncat" else "frame"
        self.proc = None
        self.port = None
        self.log = None
        self.exit_note = None
        self.store_dir = None  # selchat-store: the directory of this start's database
        self.store_note = None  # what the database held once the server stopped

    def command(self, max_clients):
        py = sys.executable
        if self.name in SELCHATS:
            path = self.opts.before if self.name == "selchat-before" else self.opts.selchat
            cmd = [py, os.path.join(HERE, "nagle.py")] if self.name == "selchat-nagle" else [py]
            profile_dir = os.environ.get("BENCH_SERVER_PROFILE")
            if profile_dir and self.name != "selchat-nagle":
                os.makedirs(profile_dir, exist_ok=True)
                out = os.path.join(
                    profile_dir, "%s-%d-%d.prof" % (self.name, os.getpid(), next(_PROFILE_COUNT))
                )
                cmd += ["-m", "cProfile", "-o", out]
            cmd += [
                path,
                "server",
                "--host",
                HOST,
                "--port",
                "0",
                "--max-message",
                str(self.opts.max_message),
            ]
            extra = selchat_options(path)
            chosen = []
            for option in self.opts.server_option:  # the caller's, where this server knows them
                if option.split("=", 1)[0] in extra:
                    chosen.append(option)
            if "--max-clients" in extra:
                cmd += ["--max-clients", str(max_clients)]
            if "--handshake-timeout" in extra:
                cmd += ["--handshake-timeout", "300"]
            if "--rate" in extra:
                cmd += ["--rate", "0"]  # and with it --byte-rate and the address rates
            if "--join-rate" in extra:
                cmd += ["--join-rate", "0"]  # every client joins from 127.0.0.1
            if "--max-address-memory" in extra:
                cmd += ["--max-address-memory", "0"]  # the same: one address for all
            if self.name == "selchat-store":
                if "--store" not in extra:
                    raise RuntimeError("%s has no --store option" % path)
                cmd += ["--store", self.store_path()]
            return cmd + chosen
        if self.name == "asyncio":
            return [
                py,
                os.path.join(HERE, "ref_server.py"),
                "--host",
                HOST,
                "--port",
                "0",
                "--max-message",
                str(self.opts.max_message),
            ]
        self.port = free_port()
        return ["ncat", "--chat", "-l", HOST, str(self.port), "--max-conns", str(max_clients)]

    def store_path(self):
        """A fresh database for this start (selchat-store), in a directory of its own."""
        self.remove_store()
        self.store_dir = tempfile.mkdtemp(prefix="selchat-store-", dir=self.opts.store_dir)
        return os.path.join(self.store_dir, "bench.db")

    def remove_store(self):
        """Note what the database held, then delete it with its -wal and -shm files."""
        if self.store_dir is None:
            return
        path = os.path.join(self.store_dir, "bench.db")
        try:
            size = sum(
                os.path.getsize(path + suffix)
                for suffix in ("", "-wal", "-shm")
                if os.path.exists(path + suffix)
            )
            if os.path.exists(path):
                db = sqlite3.connect(path, timeout=5)
                try:
                    rows = db.execute("SELECT count(*) FROM messages").fetchone()[0]
                    # What came in a flood is kept as turns, split when the server is quiet.
                    for (blob,) in db.execute("SELECT frames FROM turns"):
                        rows += count_frames(bytes(blob))
                finally:
                    db.close()
                self.store_note = {"stored": rows, "db_bytes": size}
        except Exception as exc:  # a figure lost, not the case
            self.store_note = {"stored_error": "%s: %s" % (type(exc).__name__, exc)}
        shutil.rmtree(self.store_dir, ignore_errors=True)
        self.store_dir = None

    def start(self, max_clients=15000):
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the server's life
        self.exit_note = None
        self.backlog = None
        self.proc = subprocess.Popen(
            self.command(max_clients), stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log
        )
        if self.opts.server_cpu is not None:
            os.sched_setaffinity(self.proc.pid, {self.opts.server_cpu})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited at start: %s" % (self.name, self.output()))
            if self.mode == "frame":
                m = re.search(r"listening on \S*:(\d+)", self.output())
                if m:
                    self.port = int(m.group(1))
                    return self.port
            else:
                try:
                    socket.create_connection((HOST, self.port), timeout=1).close()
                    time.sleep(0.1)
                    return self.port
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("%s did not start listening" % self.name)

    def handshakes(self):
        """How many clients may be connecting at once (see MAX_HANDSHAKES)."""
        if self.backlog is None:
            self.backlog = 64
            try:
                out = subprocess.run(
                    ["ss", "-ltnH", "sport = :%d" % self.port],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.backlog = int(out.split()[2])
            except (OSError, IndexError, ValueError, subprocess.SubprocessError):
                pass
        return max(1, min(MAX_HANDSHAKES, self.backlog * 2 // 3))

    def output(self):
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def memory(self):
        return proc_status(self.proc.pid)

    def cpu(self):
        return proc_cpu(self.proc.pid)

    def stop(self):
        """SIGINT, wait, and note anything but a clean exit with status 0; then
        delete selchat-store's database."""
        try:
            return self._stop()
        finally:
            self.remove_store()

    def _stop(self):
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            self.exit_note = "exited early (status %s)" % rc
            return self.exit_note
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(STOP_TIMEOUT)
            took = self.stop_time = time.monotonic() - started
            if rc == -signal.SIGINT and self.name == "ncat":
                pass  # ncat has no SIGINT handler: dying of it is its normal exit
            elif rc != 0:
                self.exit_note = "exit status %s after SIGINT" % rc
            elif took > 5:
                self.exit_note = "took %.1f s to exit after SIGINT" % took
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit_note = "did not exit within %d s of SIGINT (killed)" % STOP_TIMEOUT
        return self.exit_note


_SELCHAT_HELP = {}


SELCHATS = ("selchat", "selchat-before", "selchat-store", "selchat-nagle")
_PROFILE_COUNT = iter(range(1, 1 << 30))


def selchat_options(path):
    if path not in _SELCHAT_HELP:
        out = subprocess.run(
            [sys.executable, path, "server", "--help"], capture_output=True, text=True, timeout=30
        ).stdout
        _SELCHAT_HELP[path] = set(re.findall(r"--[a-z][a-z-]*", out))
    return _SELCHAT_HELP[path]


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Scenario plumbing
# --------------------------------------------------------------------------


class Run:
    """Worker and sender processes of one scenario against one started server."""

    def __init__(self, server):
        self.server = server
        self.workers = []  # (process, pipe)
        self.senders = []

    def spawn(self, target, spec):
        parent, child = mp.Pipe()
        proc = mp.Process(target=target, args=(child, spec), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def add_workers(self, kind, nicks, nprocs, **extra):
        nprocs = max(1, min(nprocs, len(nicks)))
        handshakes = max(1, self.server.handshakes() // nprocs)
        for w in range(nprocs):
            spec = dict(
                mode=self.server.mode,
                kind=kind,
                port=self.server.port,
                nicks=nicks[w::nprocs],
                widx=w,
                handshakes=handshakes,
                **extra,
            )
            self.workers.append(self.spawn(worker_main, spec))

    def add_senders(self, kind, count, **extra):
        for s in range(count):
            spec = dict(mode=self.server.mode, kind=kind, port=self.server.port, sender=s, **extra)
            self.senders.append(self.spawn(sender_main, spec))
        for _proc, pipe in self.senders:
            if not pipe.poll(60):
                raise RuntimeError("sender did not register within 60 s")
            reply = pipe.recv()
            if reply[0] != "ready":
                raise RuntimeError("sender failed: %s" % (reply[1:],))

    def ask(self, op, *args):
        for _, pipe in self.workers:
            pipe.send((op, *args))
        replies = []
        for _, pipe in self.workers:
            if not pipe.poll(30):
                raise RuntimeError("load generator worker did not answer %r" % op)
            replies.append(pipe.recv())
        return replies

    def status(self, op="status", *args):
        st = self.ask(op, *args)
        total = {k: sum(r[k] for r in st) for k in st[0] if isinstance(st[0][k], int)}
        if op == "status":
            total["fail_reason"] = next((r["fail_reason"] for r in st if r["fail_reason"]), "")
            total["reject_text"] = next((r["reject_text"] for r in st if r["reject_text"]), b"")
            total["last_rx_ns"] = max(r["last_rx_ns"] for r in st)
            total["last_join_ns"] = max(r["last_join_ns"] for r in st)
        return total

    def wait_joined(self, count, timeout):
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["joined"] >= count or st["pending"] == 0:
                return st
            if time.monotonic() >= deadline:
                return st
            time.sleep(0.1)

    def wait_quiet(self, timeout=QUIET_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if time.monotonic_ns() - st["last_rx_ns"] > QUIET_TIME * 1e9:
                return True
            time.sleep(0.05)
        return False

    def go(self, t_start, t_end):
        for _, pipe in self.senders:
            pipe.send(("go", t_start, t_end))

    def sender_results(self, timeout):
        out = []
        for _, pipe in self.senders:
            if pipe.poll(timeout):
                out.append(pipe.recv()[1])
            else:
                out.append(None)
        return out

    def gen_pids(self):
        return [p.pid for p, _ in self.workers + self.senders]

    def close(self, reset=False):
        for _proc, pipe in self.workers:
            try:
                pipe.send(("quit", reset))
            except OSError:
                pass
        for _proc, pipe in self.senders:
            try:
                pipe.send(("quit",))
            except OSError:
                pass
        for proc, _ in self.workers + self.senders:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)


def machine_busy():
    """CPU seconds all processors have been busy since boot (/proc/stat; no steal).

    With tick-based accounting (no CONFIG_IRQ_TIME_ACCOUNTING) the softirq work
    of loopback TCP is charged to the process that was running, so "busy minus
    server minus generator" is what everything else on the machine used.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:7]) - idle) / CLOCK_TICK


def gen_cpu(pids):
    return sum(sum(proc_cpu(p)) for p in pids) + sum(os.times()[:2])


def note(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


def scenario_fanout(server, opts, nsenders, nreceivers):
    server.start(nreceivers + nsenders + 100)
    run = Run(server)
    result = {}
    try:
        nworkers = max(1, min(opts.procs, nreceivers))
        progress = mp.RawArray("q", nworkers * nsenders)
        for i in range(len(progress)):
            progress[i] = 1 << 62
        run.add_workers(
            "fanout",
            ["r%d" % i for i in range(nreceivers)],
            nworkers,
            nsenders=nsenders,
            progress=progress,
        )
        st = run.wait_joined(nreceivers, SETUP_TIMEOUT)
        if st["joined"] < nreceivers:
            return {
                "error": "only %d of %d receivers registered (%s)"
                % (st["joined"], nreceivers, st["fail_reason"] or st["reject_text"])
            }
        # The window is in deliveries, so a slow server is not left with minutes
        # of backlog when the senders stop.
        window = max(opts.batch, opts.inflight // (nsenders * nreceivers))
        run.add_senders(
            "fanout",
            nsenders,
            progress=progress,
            nworkers=nworkers,
            nsenders=nsenders,
            window=window,
            batch=opts.batch,
        )
        run.wait_quiet()
        s_cpu0, g_cpu0, m_cpu0 = server.cpu(), gen_cpu(run.gen_pids()), machine_busy()
        t_start = time.monotonic() + 0.2
        t_end = t_start + opts.duration
        run.go(t_start, t_end)
        time.sleep(max(0.0, t_end - time.monotonic()))
        sent = run.sender_results(DRAIN_TIMEOUT + 10)
        if None in sent:
            return {"error": "a sender did not finish"}
        # wait until every receiver has everything, progress stops, or time is up
        last_change, last_seen = time.monotonic(), None
        cutoff = time.monotonic() + max(DRAIN_TIMEOUT, opts.duration)
        while time.monotonic() < cutoff:
            low = [
                min(progress[w * nsenders + s] for w in range(nworkers)) for s in range(nsenders)
            ]
            if all(low[s] >= sent[s] for s in range(nsenders)):
                break
            if low != last_seen:
                last_seen, last_change = low, time.monotonic()
            if time.monotonic() - last_change > DRAIN_TIMEOUT:
                break
            time.sleep(0.01)
        s_cpu1, g_cpu1, m_cpu1 = server.cpu(), gen_cpu(run.gen_pids()), machine_busy()
        res = run.ask("results")
        delivered = sum(r["delivered"] for r in res)
        last_ns = max(r["last_chat_ns"] for r in res)
        elapsed = max(1e-9, last_ns / 1e9 - t_start)
        unreceived = sum(
            max(0, sent[s] - exp[s]) for r in res for exp in r["exp"] for s in range(nsenders)
        )
        eof = sum(r["eof"] for r in res)
        wall = max(1e-9, time.monotonic() - t_start)
        stats = {k: sum(r["stats"][k] for r in res) for k in res[0]["stats"]}
        result = {
            "sent": sum(sent),
            "delivered": delivered,
            "gen_stats": "%d recv() of %.0f messages on average; %d checked in runs of %.0f, "
            "%d one by one"
            % (
                stats["recvs"],
                delivered / max(1, stats["recvs"]),
                stats["fast_msgs"],
                stats["fast_msgs"] / max(1, stats["runs"]),
                stats["slow_msgs"],
            ),
            "expected": sum(sent) * nreceivers,
            "rate": delivered / elapsed,
            "elapsed": elapsed,
            "lost": sum(r["missing"] for r in res),
            "undelivered": unreceived,
            "dup": sum(r["dup"] for r in res),
            "reord": sum(r["reord"] for r in res),
            "bad": sum(r["bad"] for r in res),
            "disconnected": eof,
            "server_user": s_cpu1[0] - s_cpu0[0],
            "server_sys": s_cpu1[1] - s_cpu0[1],
            "gen_cpu": g_cpu1 - g_cpu0,
            "other_cpu": max(
                0.0, (m_cpu1 - m_cpu0) - (g_cpu1 - g_cpu0) - sum(s_cpu1) + sum(s_cpu0)
            ),
            "wall": wall,
        }
        return result
    finally:
        result["stop"] = server.stop()
        run.close()


def scenario_latency(server, opts, rate, nreceivers, stalled, nsenders=1, tick=0.0, timed=0):
    """rate messages a second in all, spread over nsenders paced senders.

    With `timed` (fewer than nreceivers), latency is taken at the `timed`
    receivers that join last, read at once by a process of their own; the
    others are read every LAZY_READ s and only counted and checked, so that the
    load generator's one core keeps up (see the overload scenario).
    """
    server.start(nreceivers + nsenders + 100)
    run = Run(server)
    result = {}
    stall = None
    timed = timed if 0 < timed < nreceivers else nreceivers
    try:
        if timed < nreceivers:
            run.add_workers(
                "latency",
                ["r%d" % i for i in range(nreceivers - timed)],
                opts.latency_procs,
                nsenders=nsenders,
                collect=False,
                lazy=LAZY_READ,
            )
            st = run.wait_joined(nreceivers - timed, SETUP_TIMEOUT)
        run.add_workers(
            "latency",
            ["t%d" % i for i in range(timed)],
            1 if timed < nreceivers else opts.latency_procs,
            nsenders=nsenders,
        )
        st = run.wait_joined(nreceivers, SETUP_TIMEOUT)
        if st["joined"] < nreceivers:
            return {"error": "only %d of %d receivers registered" % (st["joined"], nreceivers)}
        run.add_senders("latency", nsenders, rate=rate / nsenders, tick=tick)
        if stalled:
            # Its small receive buffer fills within a second: from then on the
            # server has to hold (or drop) what this client is owed.
            stall = register(server.port, server.mode, b"stalled", rcvbuf=4096)
        run.wait_quiet()
        w0, s_cpu0, g_cpu0, m_cpu0 = (
            time.monotonic(),
            server.cpu(),
            gen_cpu(run.gen_pids()),
            machine_busy(),
        )
        t_start = time.monotonic() + 0.2
        t_end = t_start + opts.duration
        run.go(t_start, t_end)
        time.sleep(max(0.0, t_end - time.monotonic()))
        counts = run.sender_results(DRAIN_TIMEOUT + 10)
        if None in counts:
            return {"error": "a sender did not finish"}
        sent = sum(counts)
        # until everything arrived, or for DRAIN_TIMEOUT with no progress
        last, last_change = None, time.monotonic()
        while time.monotonic() - last_change < DRAIN_TIMEOUT:
            got = run.status()["delivered"]
            if got >= sent * nreceivers:
                break
            if got != last:
                last, last_change = got, time.monotonic()
            time.sleep(0.05)
        s_cpu1, g_cpu1, m_cpu1 = server.cpu(), gen_cpu(run.gen_pids()), machine_busy()
        wall = time.monotonic() - w0
        res = run.ask("results")
        lat = array.array("q")
        for r in res:
            lat.frombytes(r["latencies"])
        expected = sent * timed  # latencies: at the timed receivers
        lat = sorted(lat)
        missing = max(0, expected - len(lat))
        last_ns = max(r["last_chat_ns"] for r in res)
        delivered = sum(r["delivered"] for r in res)
        result = {
            "sent": sent,
            "expected": expected,
            "timed": timed,
            "received": len(lat),
            "delivered": delivered,
            "rate": delivered / max(1e-9, last_ns / 1e9 - t_start),
            "lost": max(0, sent * nreceivers - delivered),
            "gaps": sum(r["missing"] for r in res),
            "dup": sum(r["dup"] for r in res),
            "reord": sum(r["reord"] for r in res),
            "bad": sum(r["bad"] for r in res),
            "p50": percentile(lat, expected, 0.50),
            "p99": percentile(lat, expected, 0.99),
            "max": lat[-1] / 1e6 if lat and not missing else float("inf"),
            "server_cpu": (sum(s_cpu1) - sum(s_cpu0)) / wall,
            "gen_cpu": (g_cpu1 - g_cpu0) / wall,
            "other_cpu": max(0.0, (m_cpu1 - m_cpu0) - (g_cpu1 - g_cpu0) - sum(s_cpu1) + sum(s_cpu0))
            / wall,
        }
        return result
    finally:
        if stall is not None:
            stall.close()
        result["stop"] = server.stop()
        run.close()


def percentile(sorted_ns, total, q):
    """q-quantile in ms over `total` messages; those never received count as infinite."""
    if total == 0:
        return float("nan")
    index = int(q * (total - 1) + 0.5)
    if index >= len(sorted_ns):
        return float("inf")
    return sorted_ns[index] / 1e6


def scenario_capacity(server, opts, clients):
    server.start(clients + 1000)
    run = Run(server)
    result = {}
    try:
        time.sleep(0.3)
        idle = server.memory().get("VmRSS", 0)
        s_cpu0, m_cpu0 = server.cpu(), machine_busy()
        t0 = time.monotonic_ns()
        run.add_workers("capacity", ["c%d" % i for i in range(clients)], opts.procs)
        st = run.wait_joined(clients, opts.capacity_timeout)
        s_cpu1, m_cpu1, wall = server.cpu(), machine_busy(), time.monotonic_ns() / 1e9 - t0 / 1e9
        g_cpu = sum(sum(proc_cpu(p)) for p in run.gen_pids())
        result.update(
            server_cpu=(sum(s_cpu1) - sum(s_cpu0)) / wall,
            gen_cpu=g_cpu / wall,
            other_cpu=max(0.0, (m_cpu1 - m_cpu0) - g_cpu - sum(s_cpu1) + sum(s_cpu0)) / wall,
        )
        joined = st["joined"]
        join_time = (st["last_join_ns"] - t0) / 1e9 if joined else float("nan")
        result.update(
            joined=joined,
            clients=clients,
            join_time=join_time,
            failed=st["failed"],
            rejected=st["rejected"],
            reason=st["fail_reason"] or st["reject_text"].decode("utf-8", "replace"),
        )
        quiet = run.wait_quiet(20 if joined == clients else 2)
        mem = server.memory()
        # Until every client was last told the number online (a server may
        # gather join notices over a while), or --joins-settle s.
        t1 = time.monotonic()
        while True:
            st = run.status("notes", joined)
            waited = time.monotonic() - t1
            if st["right"] >= st["live"] or waited >= (opts.joins_settle if quiet else 2):
                break
            time.sleep(0.05)
        result.update(
            settled=quiet,
            rss_idle=idle,
            rss=mem.get("VmRSS", 0),
            per_client=(mem.get("VmRSS", 0) - idle) / max(1, joined),
            with_join_note=st["with_join_note"],
            join_notes=st["join_notes"],
            join_right=st["right"],
            join_live=st["live"],
            join_settle=waited if st["right"] >= st["live"] else None,
        )
        if joined == clients and quiet:
            leavers = max(1, clients // 10)
            per_worker = leavers // len(run.workers)
            run.ask("leave", per_worker)
            t1 = time.monotonic()
            remaining = clients - per_worker * len(run.workers)
            while time.monotonic() - t1 < max(20, opts.joins_settle):
                st = run.status("notes", remaining)
                if st["right"] >= st["live"]:
                    break
                time.sleep(0.05)
            result.update(
                leave_time=time.monotonic() - t1,
                left=per_worker * len(run.workers),
                with_left_note=st["with_left_note"],
                leave_right=st["right"],
                remaining=remaining,
            )
        return result
    finally:
        result["stop"] = server.stop()
        run.close(reset=True)


def scenario_joins(server, opts, clients):
    """Clients join one by one (see JoinClients), then 10 % leave at once."""
    server.start(clients + 1000)
    result = {}
    parent, child = mp.Pipe()
    spec = {
        "port": server.port,
        "server_pid": server.proc.pid,
        "clients": clients,
        "timeout": opts.joins_timeout,
        "quiet": opts.joins_quiet,
        "settle": opts.joins_settle,
        "leave": 10,
    }
    proc = mp.Process(target=joins_main, args=(child, spec), daemon=True)
    try:
        time.sleep(0.3)
        proc.start()
        child.close()
        # joining, settling, leaving, settling again; the generator bounds each
        if parent.poll(opts.joins_timeout + 2 * opts.joins_settle + 60):
            result = parent.recv()
        else:
            result = {"error": "the load generator did not finish"}
        return result
    finally:
        result["stop"] = server.stop()
        try:
            parent.send("quit")
            parent.poll(30)
        except OSError:
            pass
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(2)


def scenario_big(server, opts, size, nreceivers):
    server.start(100)
    run = Run(server)
    result = {}
    try:
        run.add_senders("big", 1, size=size)
        run.add_workers("big", ["r%d" % i for i in range(nreceivers)], 1)
        st = run.wait_joined(nreceivers, SETUP_TIMEOUT)
        if st["joined"] < nreceivers:
            return {"error": "only %d of %d receivers registered" % (st["joined"], nreceivers)}
        run.wait_quiet()
        run.ask("big")
        time.sleep(0.3)
        idle = server.memory()
        s_cpu0 = server.cpu()
        t_start = time.monotonic() + 0.1
        run.go(t_start, t_start)
        t0 = run.sender_results(BIG_TIMEOUT)[0]
        deadline = time.monotonic() + BIG_TIMEOUT
        while time.monotonic() < deadline:
            st = run.status()
            if st["big_done"] >= nreceivers or st["eof"] >= nreceivers:
                break
            time.sleep(0.01)
        mem = server.memory()
        s_cpu1 = server.cpu()
        res = run.ask("results")
        done = [d for r in res for d in r["big_done"] if d]
        result = {
            "size": size,
            "receivers": nreceivers,
            "complete": len(done),
            "time": (max(done) - t0) / 1e9 if t0 and len(done) == nreceivers else float("inf"),
            "rss_idle": idle.get("VmRSS", 0),
            "hwm": mem.get("VmHWM", 0),
            "growth": mem.get("VmHWM", 0) - idle.get("VmRSS", 0),
            "server_cpu": sum(s_cpu1) - sum(s_cpu0),
            "bad": sum(r["bad"] for r in res),
        }
        return result
    finally:
        result["stop"] = server.stop()
        run.close()


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def fmt_rate(x):
    return "%.0f" % x if x < 1000 else f"{x:,.0f}"


def fmt_ms(x):
    if x != x:
        return "n/a"
    if x == float("inf"):
        return "inf"
    return "%.1f" % x if x >= 10 else "%.2f" % x


def median_run(runs):
    """The run with the median p99 (a failed run counts as the worst), with every p99."""
    ranked = sorted(runs, key=lambda r: r.get("p99", float("inf")))
    median = dict(ranked[(len(ranked) - 1) // 2])
    if len(runs) > 1:
        median["p99_runs"] = [r.get("p99", float("inf")) for r in runs]
    return median


def joins_complete(r):
    return "joined" in r and r["joined"] == r["clients"]


def median_joins(runs):
    """The joins run with the median time for all to join (one cut short or
    failed counts as the slowest), with every run's time and server CPU."""
    ranked = sorted(runs, key=lambda r: r["join_time"] if joins_complete(r) else float("inf"))
    median = dict(ranked[(len(ranked) - 1) // 2])
    if len(runs) > 1:
        median["time_runs"] = [r["join_time"] if joins_complete(r) else float("inf") for r in runs]
        median["cpu_runs"] = [r.get("server_cpu_s", float("nan")) for r in runs]
    return median


def median_rate(runs):
    """The fan-out run with the median deliveries/s among those that did not fail
    (the lower middle one of an even count), with every run's rate (failed: nan)."""
    done = sorted((r for r in runs if "rate" in r), key=lambda r: r["rate"])
    median = dict(done[(len(done) - 1) // 2] if done else runs[-1])
    if len(runs) > 1:
        median["rate_runs"] = [r.get("rate", float("nan")) for r in runs]
        median["cpu_runs"] = [cpu_per_delivery(r) for r in runs]
    return median


def cpu_per_delivery(r):
    """Server CPU (user + system) in microseconds per delivery; nan for a failed run."""
    if "delivered" not in r or not r["delivered"]:
        return float("nan")
    return (r["server_user"] + r["server_sys"]) * 1e6 / r["delivered"]


def median_of(values):
    done = sorted(x for x in values if x == x)
    return done[(len(done) - 1) // 2] if done else float("nan")


def cell(results, key, render):
    r = results.get(key)
    if r is None:
        return "n/a"
    if "error" in r:
        return "FAILED"
    try:
        return render(r)
    except (KeyError, ZeroDivisionError, TypeError):
        return "?"


def build_rows(results, servers, sizes):
    rows = []

    def row(label, key, render):
        rows.append([label] + [cell(results[s], key, render) for s in servers])

    def stored_row(key):  # selchat-store's database, once the server stopped
        if any("stored" in results[s].get(key, {}) for s in servers):
            row(
                "  messages stored of sent / database MB",
                key,
                lambda r: (
                    "{:,} of {:,} / {:.1f}".format(r["stored"], r["sent"], r["db_bytes"] / 1e6)
                    if "stored" in r
                    else ""
                ),
            )

    for ns, nr in sizes["fanout"]:
        key = "fanout_%dx%d" % (ns, nr)
        if not any(key in results[s] for s in servers):
            continue
        rows.append(["fan-out %d senders -> %d receivers" % (ns, nr)] + [""] * len(servers))
        row("  deliveries/s", key, lambda r: fmt_rate(r["rate"]))
        if any("rate_runs" in results[s].get(key, {}) for s in servers):
            row(
                "  deliveries/s of each round (median shown)",
                key,
                lambda r: " ".join(fmt_rate(x) if x == x else "FAILED" for x in r["rate_runs"]),
            )
        row(
            "  lost/dup/reordered/bad",
            key,
            lambda r: "%d/%d/%d/%d" % (r["lost"], r["dup"], r["reord"], r["bad"]),
        )
        row("  undelivered at cut-off", key, lambda r: "{:,}".format(r["undelivered"]))
        row("  messages sent (x receivers)", key, lambda r: "{:,}".format(r["sent"]))
        stored_row(key)
        row(
            "  server CPU us/delivery",
            key,
            lambda r: "%.3f" % cpu_per_delivery(r),
        )
        if any("cpu_runs" in results[s].get(key, {}) for s in servers):
            row(
                "  server CPU us/delivery of each round (median)",
                key,
                lambda r: (
                    "%s (%.3f)"
                    % (" ".join("%.3f" % x for x in r["cpu_runs"]), median_of(r["cpu_runs"]))
                ),
            )
        row(
            "  server CPU % (user+sys)",
            key,
            lambda r: (
                "%.0f (%.0f+%.0f)"
                % (
                    100 * (r["server_user"] + r["server_sys"]) / r["wall"],
                    100 * r["server_user"] / r["wall"],
                    100 * r["server_sys"] / r["wall"],
                )
            ),
        )
        row("  load generator CPU %", key, lambda r: "%.0f" % (100 * r["gen_cpu"] / r["wall"]))
        row(
            "  other processes CPU % (should be ~0)",
            key,
            lambda r: "%.0f" % (100 * r["other_cpu"] / r["wall"]),
        )
    for rate, nr in sizes["latency"]:
        for stalled in (False, True):
            key = "latency_%d%s" % (rate, "_stalled" if stalled else "")
            if not any(key in results[s] for s in servers):
                continue
            rows.append(
                [
                    "latency %d msg/s -> %d receivers%s"
                    % (rate, nr, " + 1 never reading" if stalled else "")
                ]
                + [""] * len(servers)
            )
            row(
                "  p50 / p99 / max ms",
                key,
                lambda r: "%s / %s / %s" % (fmt_ms(r["p50"]), fmt_ms(r["p99"]), fmt_ms(r["max"])),
            )
            if any("p99_runs" in results[s].get(key, {}) for s in servers):
                row(
                    "  p99 of each run ms (median shown)",
                    key,
                    lambda r: " ".join(fmt_ms(x) for x in r["p99_runs"]),
                )
            row(
                "  undelivered / dup / bad",
                key,
                lambda r: "%d/%d/%d" % (r["lost"], r["dup"], r["bad"]),
            )
            stored_row(key)
            row(
                "  CPU %: server / generator / other",
                key,
                lambda r: (
                    "%.0f / %.0f / %.0f"
                    % (100 * r["server_cpu"], 100 * r["gen_cpu"], 100 * r["other_cpu"])
                ),
            )
    for clients in sizes["capacity"]:
        key = "capacity_%d" % clients
        if not any(key in results[s] for s in servers):
            continue
        rows.append(["capacity %d clients register" % clients] + [""] * len(servers))
        row(
            "  all joined in s",
            key,
            lambda r: (
                "%.2f" % r["join_time"]
                if r["joined"] == r["clients"]
                else "no: %d joined in %.0f s" % (r["joined"], opts_cap_timeout)
            ),
        )
        row(
            "  CPU %: server / generator / other",
            key,
            lambda r: (
                "%.0f / %.0f / %.0f"
                % (100 * r["server_cpu"], 100 * r["gen_cpu"], 100 * r["other_cpu"])
            ),
        )
        row("  server memory per client KB", key, lambda r: "%.1f" % (r["per_client"] / 1024))
        row(
            "  join notice frames / clients with one",
            key,
            lambda r: "{:,} / {:,}".format(r["join_notes"], r["with_join_note"]),
        )
        row(
            "  final count right / connected (counts right after s)",
            key,
            lambda r: "{:,} / {:,} ({})".format(
                r["join_right"],
                r["join_live"],
                "%.2f" % r["join_settle"] if r["join_settle"] is not None else "never",
            ),
        )
        row(
            "  10 % leave: count right / connected (after s)",
            key,
            lambda r: (
                "{:,} / {:,} ({:.2f})".format(r["leave_right"], r["remaining"], r["leave_time"])
                if "leave_time" in r
                else "not run"
            ),
        )
        row(
            "  leave: clients with a leave notice",
            key,
            lambda r: "{:,}".format(r["with_left_note"]) if "leave_time" in r else "not run",
        )
    for rate, nsenders, nr in sizes.get("overload", []):
        key = "overload_%dx%d" % (rate, nsenders)
        if not any(key in results[s] for s in servers):
            continue
        rows.append(
            ["paced overload %d msg/s from %d senders -> %d receivers" % (rate, nsenders, nr)]
            + [""] * len(servers)
        )
        row("  deliveries/s", key, lambda r: fmt_rate(r["rate"]))
        row(
            "  p50 / p99 / max ms",
            key,
            lambda r: "%s / %s / %s" % (fmt_ms(r["p50"]), fmt_ms(r["p99"]), fmt_ms(r["max"])),
        )
        if any("p99_runs" in results[s].get(key, {}) for s in servers):
            row(
                "  p99 of each run ms (median shown)",
                key,
                lambda r: " ".join(fmt_ms(x) for x in r["p99_runs"]),
            )
        row(
            "  undelivered / gaps / dup / reordered / bad",
            key,
            lambda r: "%d/%d/%d/%d/%d" % (r["lost"], r["gaps"], r["dup"], r["reord"], r["bad"]),
        )
        row("  messages sent (x receivers)", key, lambda r: "{:,}".format(r["sent"]))
        stored_row(key)
        row(
            "  CPU %: server / generator / other",
            key,
            lambda r: (
                "%.0f / %.0f / %.0f"
                % (100 * r["server_cpu"], 100 * r["gen_cpu"], 100 * r["other_cpu"])
            ),
        )
    for clients in sizes.get("joins", []):
        key = "joins_%d" % clients
        if not any(key in results[s] for s in servers):
            continue
        rows.append(
            ["%d clients join one by one (each after the welcome of the one before)" % clients]
            + [""] * len(servers)
        )
        row(
            "  all joined in s",
            key,
            lambda r: (
                "%.2f" % r["join_time"]
                if joins_complete(r)
                else "no: %d joined in %.0f s%s"
                % (r["joined"], opts_joins_timeout, " (%s)" % r["reason"] if r["reason"] else "")
            ),
        )
        if any("time_runs" in results[s].get(key, {}) for s in servers):
            row(
                "  all joined in s, each run (median shown)",
                key,
                lambda r: (
                    " ".join("%.2f" % x if x != float("inf") else "cut" for x in r["time_runs"])
                    if "time_runs" in r
                    else "cut short: run once"
                ),
            )
        row(
            "  server CPU s: joining / until counts settled",
            key,
            lambda r: "%.2f / %.2f" % (r["server_cpu_s"], r["server_cpu_settled"]),
        )
        row(
            "  CPU % while joining: server / generator / other",
            key,
            lambda r: (
                "%.0f / %.0f / %.0f"
                % (100 * r["server_cpu"], 100 * r["gen_cpu"], 100 * r["other_cpu"])
            ),
        )
        row(
            "  connect to welcome p50 / p99 / max ms",
            key,
            lambda r: (
                "%s / %s / %s"
                % (fmt_ms(r["welcome_p50"]), fmt_ms(r["welcome_p99"]), fmt_ms(r["welcome_max"]))
            ),
        )
        row(
            "  final count right / connected (counts right after s)",
            key,
            lambda r: "{:,} / {:,} ({})".format(
                r["right"],
                r["live"],
                "%.2f" % r["settle_time"] if r["settle_time"] is not None else "never",
            ),
        )
        row("  count notices per client", key, lambda r: "%.1f" % r["notices"])
        row(
            "  10 % leave at once: count right / connected (after s)",
            key,
            lambda r: (
                "{:,} / {:,} ({})".format(
                    r["leave_right"],
                    r["leave_live"],
                    "%.2f" % r["leave_settle"] if r["leave_settle"] is not None else "never",
                )
                if "leave_right" in r
                else "not run"
            ),
        )
        row("  clients cut by the server", key, lambda r: "%d" % r["cut"])
    for size, nr in sizes["big"]:
        key = "big_%d" % size
        if not any(key in results[s] for s in servers):
            continue
        rows.append(["one %d MB message -> %d receivers" % (size >> 20, nr)] + [""] * len(servers))
        row(
            "  time s",
            key,
            lambda r: (
                "%.3f" % r["time"]
                if r["time"] != float("inf")
                else "incomplete (%d of %d)" % (r["complete"], r["receivers"])
            ),
        )
        row(
            "  peak memory growth MB (x size)",
            key,
            lambda r: "%.0f (%.2fx)" % (r["growth"] / 2**20, r["growth"] / r["size"]),
        )
    return rows


opts_cap_timeout = 60.0
opts_joins_timeout = 60.0


def print_table(rows, servers, out=sys.stdout):
    header = ["scenario / figure", *servers]
    widths = [max(len(str(r[i])) for r in [*rows, header]) for i in range(len(header))]
    line = "  ".join(
        h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header)
    )
    print(line, file=out)
    print("-" * len(line), file=out)
    for r in rows:
        print(
            "  ".join(
                str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
                for i, c in enumerate(r)
            ),
            file=out,
        )


def target_lines(results, sizes):
    sel, ref, nc = results.get("selchat", {}), results.get("asyncio", {}), results.get("ncat", {})
    lines = []

    def ok(flag):
        return "met" if flag else "MISSED"

    for ns, nr in sizes["fanout"]:
        key = "fanout_%dx%d" % (ns, nr)
        a, b = sel.get(key), ref.get(key)
        if a and b and "rate" in a and "rate" in b:
            ratio = a["rate"] / b["rate"]
            clean = a["lost"] == a["dup"] == a["reord"] == a["bad"] == a["undelivered"] == 0
            lines.append(
                "fan-out %dx%d: selchat %.1fx the asyncio reference (target >= 5x), "
                "%s: %s"
                % (
                    ns,
                    nr,
                    ratio,
                    "nothing lost/duplicated/reordered" if clean else "ERRORS",
                    ok(ratio >= 5 and clean),
                )
            )
    for rate, _nr in sizes["latency"]:
        key = "latency_%d" % rate
        a, c = sel.get(key), nc.get(key)
        if rate == max(r for r, _ in sizes["latency"]) and a and c and "p99" in a and "p99" in c:
            lines.append(
                "latency %d/s: selchat p99 %s ms vs ncat --chat %s ms (target: no worse): %s"
                % (rate, fmt_ms(a["p99"]), fmt_ms(c["p99"]), ok(a["p99"] <= c["p99"]))
            )
        b = sel.get(key + "_stalled")
        if a and b and "p99" in a and "p99" in b:
            change = b["p99"] / a["p99"] - 1 if a["p99"] else float("inf")
            lines.append(
                "latency %d/s: a never-reading client changes selchat's p99 by %+.0f%% "
                "(target within 20%%): %s" % (rate, 100 * change, ok(abs(change) <= 0.2))
            )
    before = results.get("selchat-before", {})
    for key in ["fanout_%dx%d" % k for k in sizes["fanout"]]:
        a, b = sel.get(key), before.get(key)
        if a and b and "rate" in a and "rate" in b:
            change = a["rate"] / b["rate"] - 1
            lines.append(
                "%s: selchat %s deliveries/s, selchat-before %s (%+.1f%%; target: within 10%%): %s"
                % (key, fmt_rate(a["rate"]), fmt_rate(b["rate"]), 100 * change, ok(change >= -0.1))
            )
            ca = median_of(a.get("cpu_runs", [cpu_per_delivery(a)]))
            cb = median_of(b.get("cpu_runs", [cpu_per_delivery(b)]))
            if ca == ca and cb == cb and cb:
                lines.append(
                    "%s: server CPU per delivery (median of rounds) selchat %.3f us, "
                    "selchat-before %.3f us (%+.1f%%)" % (key, ca, cb, 100 * (ca / cb - 1))
                )
    for rate, _nr in sizes["latency"]:
        for suffix in ("", "_stalled"):
            key = "latency_%d%s" % (rate, suffix)
            a, b = sel.get(key), before.get(key)
            if a and b and "p99" in a and "p99" in b:
                lines.append(
                    "%s: p50/p99 %s/%s ms selchat, %s/%s ms selchat-before"
                    % (key, fmt_ms(a["p50"]), fmt_ms(a["p99"]), fmt_ms(b["p50"]), fmt_ms(b["p99"]))
                )
    store = results.get("selchat-store", {})
    for key in ["fanout_%dx%d" % k for k in sizes["fanout"]]:
        a, b = store.get(key), sel.get(key)
        if a and b and "rate" in a and "rate" in b:
            change = a["rate"] / b["rate"] - 1
            lines.append(
                "%s: selchat-store %s deliveries/s vs selchat %s (%+.1f%%; same run; "
                "target: within 10%%): %s"
                % (key, fmt_rate(a["rate"]), fmt_rate(b["rate"]), 100 * change, ok(change >= -0.1))
            )
            ca = median_of(a.get("cpu_runs", [cpu_per_delivery(a)]))
            cb = median_of(b.get("cpu_runs", [cpu_per_delivery(b)]))
            if ca == ca and cb == cb and cb:
                lines.append(
                    "%s: server CPU per delivery (median of rounds) selchat-store %.3f us, "
                    "selchat %.3f us (%+.1f%%)" % (key, ca, cb, 100 * (ca / cb - 1))
                )
    for rate, _nr in sizes["latency"]:
        for suffix in ("", "_stalled"):
            key = "latency_%d%s" % (rate, suffix)
            a, b = store.get(key), sel.get(key)
            if a and b and "p99" in a and "p99" in b:
                changes = [
                    a[q] / b[q] - 1 if b[q] else (0.0 if a[q] == b[q] else float("inf"))
                    for q in ("p50", "p99")
                ]
                lines.append(
                    "%s: p50/p99 selchat-store %s/%s ms vs selchat %s/%s ms (%+.0f%%/%+.0f%%; "
                    "same run; target: within 10%%): %s"
                    % (
                        key,
                        fmt_ms(a["p50"]),
                        fmt_ms(a["p99"]),
                        fmt_ms(b["p50"]),
                        fmt_ms(b["p99"]),
                        100 * changes[0],
                        100 * changes[1],
                        ok(all(c <= 0.1 for c in changes)),
                    )
                )
    nagle = results.get("selchat-nagle", {})
    for key in ["fanout_%dx%d" % k for k in sizes["fanout"]]:
        a, b = sel.get(key), nagle.get(key)
        if a and b and "rate" in a and "rate" in b:
            lines.append(
                "TCP_NODELAY, %s: %s deliveries/s with it, %s with Nagle on (%+.0f%%)"
                % (key, fmt_rate(a["rate"]), fmt_rate(b["rate"]), 100 * (a["rate"] / b["rate"] - 1))
            )
    for rate, _nr in sizes["latency"]:
        key = "latency_%d" % rate
        a, b = sel.get(key), nagle.get(key)
        if a and b and "p99" in a and "p99" in b:
            lines.append(
                "TCP_NODELAY, %s: p50/p99 %s/%s ms with it, %s/%s ms with Nagle on"
                % (key, fmt_ms(a["p50"]), fmt_ms(a["p99"]), fmt_ms(b["p50"]), fmt_ms(b["p99"]))
            )
    for clients in sizes["capacity"]:
        key = "capacity_%d" % clients
        a, b = sel.get(key), ref.get(key)
        if a and "joined" in a:
            all_in = a["joined"] == clients and a["join_time"] < 30
            notes = (
                a.get("join_right", -1) == clients
                and a.get("leave_right", -1) == a.get("remaining", -2)
                and a["with_join_note"] > 0
            )
            lines.append(
                "capacity %d: selchat all joined in %.1f s (target < 30 s), counts after "
                "the joins and after 10 %% left %s: %s"
                % (
                    clients,
                    a["join_time"],
                    "right for everyone" if notes else "WRONG for some",
                    ok(all_in and notes),
                )
            )
            if b and "per_client" in b and b["per_client"] > 0:
                ratio = a["per_client"] / b["per_client"]
                lines.append(
                    "capacity %d: memory per client %.1f KB vs reference %.1f KB = %.2fx "
                    "(target <= 0.5x): %s"
                    % (
                        clients,
                        a["per_client"] / 1024,
                        b["per_client"] / 1024,
                        ratio,
                        ok(ratio <= 0.5),
                    )
                )
    for rate, nsenders, _nr in sizes.get("overload", []):
        key = "overload_%dx%d" % (rate, nsenders)
        a = sel.get(key)
        if a and "p99" in a:
            clean = a["lost"] == a["gaps"] == a["dup"] == a["reord"] == a["bad"] == 0
            lines.append(
                "paced overload %d msg/s from %d senders: selchat p99 %s ms (target <= 10 ms), "
                "%s deliveries/s, %s: %s"
                % (
                    rate,
                    nsenders,
                    fmt_ms(a["p99"]),
                    fmt_rate(a["rate"]),
                    "nothing lost/duplicated/reordered" if clean else "ERRORS",
                    ok(a["p99"] <= 10 and clean),
                )
            )
    for clients in sizes.get("joins", []):
        key = "joins_%d" % clients
        a = sel.get(key)
        if a and "joined" in a:
            fast = joins_complete(a) and a["join_time"] <= 10
            right = a["right"] == a["live"] == clients
            lines.append(
                "joins %d one by one: selchat %s (target <= 10 s), final counts right for "
                "%d of %d connected: %s"
                % (
                    clients,
                    "all joined in %.2f s" % a["join_time"]
                    if joins_complete(a)
                    else "%d joined in %.0f s" % (a["joined"], opts_joins_timeout),
                    a["right"],
                    a["live"],
                    ok(fast and right),
                )
            )
    for size, _nr in sizes["big"]:
        key = "big_%d" % size
        a, b = sel.get(key), ref.get(key)
        if a and b and "time" in a and "time" in b:
            speed = b["time"] / a["time"] if a["time"] else 0
            grow = a["growth"] / size
            lines.append(
                "big %d MB: selchat %.1fx faster than the reference (target >= 3x), peak "
                "growth %.2fx the message (target <= 1.5x): %s"
                % (size >> 20, speed, grow, ok(speed >= 3 and grow <= 1.5))
            )
    return lines


def write_chart(path, results, servers, sizes):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("matplotlib is not installed: no chart written")
        return False
    fan = ["fanout_%dx%d" % k for k in sizes["fanout"]]
    lat = ["latency_%d" % r for r, _ in sizes["latency"]]
    lat += ["latency_%d_stalled" % r for r, _ in sizes["latency"]]
    lat_labels = ["%d/s" % r for r, _ in sizes["latency"]]
    lat_labels += ["%d/s+stalled" % r for r, _ in sizes["latency"]]
    for rate, nsenders, _nr in sizes.get("overload", []):
        lat.append("overload_%dx%d" % (rate, nsenders))
        lat_labels.append("%d/s from %d\n(overload)" % (rate, nsenders))
    joins = ["joins_%d" % n for n in sizes.get("joins", [])]
    fig, (ax1, ax2, ax3) = plt.subplots(
        1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [2, 3, 2]}
    )
    width = 0.8 / max(1, len(servers))
    for i, s in enumerate(servers):
        vals = [results[s].get(k, {}).get("rate", 0) for k in fan]
        xs = [j + i * width for j in range(len(fan))]
        ax1.bar(xs, vals, width, label=s)
        vals = [results[s].get(k, {}).get("p99", float("nan")) for k in lat]
        vals = [v if v != float("inf") else 1e5 for v in vals]
        xs = [j + i * width for j in range(len(lat))]
        ax2.bar(xs, vals, width, label=s)
        for j, k in enumerate(joins):
            r = results[s].get(k)
            if not r or "joined" not in r:
                ax3.text(j + i * width, 0, "n/a" if not r else "failed", ha="center", fontsize=7)
                continue
            done = joins_complete(r)
            x = j + i * width
            height = r["join_time"] if done else opts_joins_timeout
            ax3.bar(x, height, width, color="C%d" % i, label=s, hatch=None if done else "//")
            ax3.text(
                x,
                height,
                "%.1f s" % height if done else "%d joined\nin %.0f s" % (r["joined"], height),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax1.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(fan))])
    ax1.set_xticklabels(["%d -> %d" % k for k in sizes["fanout"]])
    ax1.set_yscale("log")
    ax1.set_ylabel("deliveries / s (log)")
    ax1.set_title("fan-out throughput (higher is better)")
    ax1.legend(fontsize=8)
    ax2.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(lat))])
    ax2.set_xticklabels(lat_labels, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 latency, ms (log; undelivered = 1e5)")
    ax2.set_title("latency to %d receivers (lower is better)" % sizes["latency"][0][1])
    ax2.legend(fontsize=8)
    ax3.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(joins))])
    ax3.set_xticklabels(["%d clients" % n for n in sizes.get("joins", [])])
    ax3.set_ylabel("seconds until all joined (hatched: cut short)")
    ax3.set_title("one-by-one joins (lower is better)")
    if joins:
        ax3.axhline(10, color="grey", linestyle=":", linewidth=1)
        ax3.set_ylim(0, max(12.0, ax3.get_ylim()[1] * 1.25))  # room for the labels
        ax3.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main():
    global opts_cap_timeout, opts_joins_timeout
    parser = argparse.ArgumentParser(
        description="Benchmark selchat's server against an asyncio reference and ncat --chat.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--servers", default="selchat,selchat-nagle,asyncio,ncat")
    parser.add_argument("--scenarios", default="fanout,latency,overload,capacity,joins,big")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of traffic per fan-out and latency case (default 5, quick 1)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--chart", metavar="FILE.png")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--selchat", default=os.path.join(HERE, os.pardir, "selchat.py"))
    parser.add_argument(
        "--before",
        metavar="FILE",
        help="the selchat.py that server selchat-before runs (e.g. the code before a change)",
    )
    parser.add_argument(
        "--store-dir",
        metavar="DIR",
        default=None,
        help="where server selchat-store's databases go, one fresh one per case, "
        "deleted afterwards (default: the temporary directory, %s)" % tempfile.gettempdir(),
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each fan-out case, servers taking turns; the median is shown (default 1)",
    )
    parser.add_argument(
        "--procs",
        type=int,
        default=4,
        help="receiver processes for fan-out and capacity (default 4)",
    )
    parser.add_argument(
        "--latency-procs", type=int, default=2, help="receiver processes for latency (default 2)"
    )
    parser.add_argument(
        "--inflight",
        type=int,
        default=200000,
        help="fan-out deliveries that may be in flight beyond what the "
        "slowest receiver has got (default 200000)",
    )
    parser.add_argument("--batch", type=int, default=50, help="messages per fan-out send")
    parser.add_argument("--capacity-timeout", type=float, default=60.0)
    parser.add_argument(
        "--joins",
        type=int,
        default=None,
        help="clients of the one-by-one joins scenario (default 10000, quick 1000)",
    )
    parser.add_argument(
        "--joins-timeout",
        type=float,
        default=None,
        help="seconds the one-by-one joins may take before they are cut short "
        "(default 60, quick 30); a server that needs more is not run again",
    )
    parser.add_argument(
        "--joins-quiet",
        type=float,
        default=8.0,
        help="after the joins, seconds without a byte after which the counts are "
        "taken as final, if they are not all right before (default 8: longer than "
        "selchat's longest notice window, 5 s)",
    )
    parser.add_argument(
        "--joins-settle",
        type=float,
        default=30.0,
        help="at most this long for the counts to come right (default 30)",
    )
    parser.add_argument(
        "--overload",
        metavar="RATExSENDERS",
        default=None,
        help="paced overload: messages a second in all x senders, to 100 receivers "
        "(default 10000x4)",
    )
    parser.add_argument(
        "--overload-timed",
        type=int,
        default=10,
        help="overload receivers at which latency is taken: those that join last, read "
        "at once; the others are read every 5 ms and only checked (default 10; 0: all)",
    )
    parser.add_argument(
        "--server-option",
        action="append",
        default=[],
        metavar="OPT[=VALUE]",
        help="an option for every selchat server whose `server --help` lists it "
        "(repeatable), e.g. --server-option=--history=0",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs of each latency case, alternating without and with the "
        "never-reading client; the run with the median p99 is shown (default 3, quick 1)",
    )
    parser.add_argument(
        "--fanout",
        metavar="SxR,...",
        help="fan-out cases as senders x receivers (default 4x100,2x1000)",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="latency and overload cases: run the server and the load generator with "
        "SCHED_FIFO (as root), so that other work on the machine does not hold them "
        "up on their cores (the kernel still keeps 5 %% of each core for the rest)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the server to CPU 1 and the load generator to CPU 0",
    )
    opts = parser.parse_args()
    opts_cap_timeout = opts.capacity_timeout
    if opts.joins is None:
        opts.joins = 1000 if opts.quick else 10000
    if opts.joins_timeout is None:
        opts.joins_timeout = 30.0 if opts.quick else 60.0
    opts_joins_timeout = opts.joins_timeout
    opts.selchat = os.path.abspath(opts.selchat)
    opts.before = os.path.abspath(opts.before) if opts.before else None
    opts.rounds = max(1, opts.rounds)
    if opts.duration is None:
        opts.duration = 1.0 if opts.quick else 5.0
    if opts.repeat is None:
        opts.repeat = 1 if opts.quick else 3
    opts.repeat = max(1, opts.repeat)
    if opts.quick:
        sizes = {
            "fanout": [(4, 20), (2, 100)],
            "latency": [(2000, 20)],
            "capacity": [500],
            "big": [(5 << 20, 10)],
            "overload": [(10000, 4, 20)],
        }
        opts.inflight = min(opts.inflight, 20000)
    else:
        sizes = {
            "fanout": [(4, 100), (2, 1000)],
            "latency": [(500, 100), (2000, 100)],
            "capacity": [10000],
            "big": [(50 << 20, 10)],
            "overload": [(10000, 4, 100)],
        }
    opts.max_message = 64 << 20 if not opts.quick else 8 << 20
    sizes["joins"] = [opts.joins]
    if opts.overload:
        rate, nsenders = (int(x) for x in opts.overload.split("x"))
        sizes["overload"] = [(rate, nsenders, sizes["overload"][0][2])]
    if opts.fanout:
        sizes["fanout"] = [
            tuple(int(x) for x in case.split("x")) for case in opts.fanout.split(",")
        ]

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    opts.server_cpu = None
    cpus = sorted(os.sched_getaffinity(0))
    if not opts.no_pin and len(cpus) >= 2:
        opts.server_cpu = cpus[1]
        os.sched_setaffinity(0, {cpus[0]})

    servers = []
    for name in opts.servers.split(","):
        name = name.strip()
        if name == "ncat" and shutil.which("ncat") is None:
            note("ncat is not installed: skipped (apt-get install ncat)")
            continue
        if name not in (*SELCHATS, "asyncio", "ncat"):
            parser.error("unknown server %r" % name)
        if name == "selchat-before" and not opts.before:
            parser.error("server selchat-before needs --before FILE")
        path = opts.before if name == "selchat-before" else opts.selchat
        if name in SELCHATS and not os.path.exists(path):
            note("%s not found: %s skipped" % (path, name))
            continue
        servers.append(name)
    scenarios = [s.strip() for s in opts.scenarios.split(",")]
    for s in scenarios:
        if s not in ("fanout", "latency", "overload", "capacity", "joins", "big"):
            parser.error("unknown scenario %r" % s)

    note(
        "selchat bench: servers %s, scenarios %s, %s, server on CPU %s, generator on CPU %s, "
        "RLIMIT_NOFILE %d"
        % (
            ",".join(servers),
            ",".join(scenarios),
            "quick" if opts.quick else "full",
            opts.server_cpu,
            "any" if opts.server_cpu is None else cpus[0],
            hard,
        )
    )
    load = os.getloadavg()
    if load[0] > 0.5:
        note(
            "warning: load average %.2f before the run: other work on this machine will "
            "distort the figures" % load[0]
        )
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # Started in the background by a shell: SIGINT is ignored, and the
        # servers would inherit that (ncat has no handler of its own to undo it).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    mp.set_start_method("fork")
    results = {s: {} for s in servers}
    exits = []
    started = time.monotonic()

    def record(name, key, fn, *args):
        server = Server(name, opts)
        t = time.monotonic()
        # --realtime: the server and every generator process inherit SCHED_FIFO
        realtime = opts.realtime and fn is scenario_latency
        try:
            if realtime:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
            try:
                r = fn(server, opts, *args)
            finally:
                if realtime:
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except Exception as exc:  # one failed case must not lose the others
            r = {"error": "%s: %s" % (type(exc).__name__, exc)}
            try:
                r["stop"] = server.stop()
            except Exception:
                pass
        if server.store_note:
            r.update(server.store_note)
        results[name][key] = r
        if r.get("stop"):
            exits.append("%s %s: %s" % (name, key, r["stop"]))
        summary = r.get("error") or ", ".join(
            "%s=%s" % (k, ("%.4g" % v) if isinstance(v, float) else v)
            for k, v in r.items()
            if k
            in (
                "rate",
                "lost",
                "p50",
                "p99",
                "join_time",
                "joined",
                "per_client",
                "time",
                "growth",
                "gen_stats",
                "server_cpu_s",
                "welcome_p99",
                "right",
                "live",
                "settle_time",
                "leave_right",
                "gaps",
                "reason",
                "stored",
                "stored_error",
            )
        )
        note(
            "  %-14s %-22s %5.1fs (stop %.1fs)  %s"
            % (name, key, time.monotonic() - t, getattr(server, "stop_time", 0), summary)
        )

    for scenario in scenarios:
        # Fan-out and latency cases take turns between the servers (and, for
        # latency, between without and with the never-reading client), so that
        # whatever else the machine does falls on all of them alike; the median
        # run of each is kept.
        if scenario == "fanout":
            for ns, nr in sizes["fanout"]:
                key = "fanout_%dx%d" % (ns, nr)
                runs = {name: [] for name in servers}
                for _ in range(opts.rounds):
                    for name in servers:
                        record(name, key, scenario_fanout, ns, nr)
                        runs[name].append(results[name][key])
                for name in servers:
                    results[name][key] = median_rate(runs[name])
            continue
        if scenario == "latency":
            for rate, nr in sizes["latency"]:
                keys = ["latency_%d%s" % (rate, s) for s in ("", "_stalled")]
                runs = {(name, key): [] for name in servers for key in keys}
                for _ in range(opts.repeat):
                    for name in servers:
                        for key, stalled in zip(keys, (False, True)):
                            record(name, key, scenario_latency, rate, nr, stalled)
                            runs[name, key].append(results[name][key])
                for (name, key), done in runs.items():
                    results[name][key] = median_run(done)
            continue
        if scenario == "overload":
            for rate, nsenders, nr in sizes["overload"]:
                key = "overload_%dx%d" % (rate, nsenders)
                runs = {name: [] for name in servers}
                for _ in range(opts.repeat):
                    for name in servers:
                        record(
                            name,
                            key,
                            scenario_latency,
                            rate,
                            nr,
                            False,
                            nsenders,
                            0.001,
                            opts.overload_timed,
                        )
                        runs[name].append(results[name][key])
                for name, done in runs.items():
                    results[name][key] = median_run(done)
            continue
        if scenario == "joins":
            for clients in sizes["joins"]:
                key = "joins_%d" % clients
                names = [n for n in servers if n not in ("ncat", "selchat-nagle")]
                runs = {name: [] for name in names}
                for _ in range(opts.repeat):
                    for name in names:
                        if runs[name] and not joins_complete(runs[name][-1]):
                            continue  # cut short by --joins-timeout: once is enough
                        record(name, key, scenario_joins, clients)
                        runs[name].append(results[name][key])
                for name, done in runs.items():
                    results[name][key] = median_joins(done)
            continue
        for name in servers:
            if name == "ncat":
                continue  # a line protocol without nicknames or framing
            elif name == "selchat-nagle":
                continue  # Nagle only matters to small writes: fan-out and latency
            elif scenario == "capacity":
                for clients in sizes["capacity"]:
                    record(name, "capacity_%d" % clients, scenario_capacity, clients)
            elif scenario == "big":
                for size, nr in sizes["big"]:
                    record(name, "big_%d" % size, scenario_big, size, nr)

    print()
    print(
        "selchat bench (%s run, %.0f s): %s"
        % ("quick" if opts.quick else "full", time.monotonic() - started, " ".join(sys.argv))
    )
    print(
        "python %s, %d CPUs, server pinned to CPU %s, load generator to CPU %s, "
        "load average %.2f before / %.2f after"
        % (
            sys.version.split()[0],
            os.cpu_count(),
            opts.server_cpu,
            "any" if opts.server_cpu is None else cpus[0],
            load[0],
            os.getloadavg()[0],
        )
    )
    print()
    rows = build_rows(results, servers, sizes)
    print_table(rows, servers)
    errors = [
        "%s %s: %s" % (s, k, r["error"])
        for s in servers
        for k, r in results[s].items()
        if "error" in r
    ]
    lines = target_lines(results, sizes)
    if lines:
        print()
        print(
            "targets (selchat against the asyncio reference, ncat or selchat-before, "
            "selchat-store against selchat, same run%s):"
            % ("; quick sizes, not the issue's" if opts.quick else "")
        )
        for line in lines:
            print("  " + line)
    if errors or exits:
        print()
        for line in errors + ["exit: " + e for e in exits]:
            print("  " + line)
    else:
        print()
        print("every server exited with status 0 on SIGINT after every case")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(
                {"argv": sys.argv, "sizes": sizes, "results": results}, f, indent=1, default=str
            )
    if opts.chart and write_chart(opts.chart, results, servers, sizes):
        print("chart written to %s" % opts.chart)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
