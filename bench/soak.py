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

then stops the server with SIGINT and prints: messages sent, delivered, lost
(must be 0 for the honest readers), hostile inputs tried, disconnects by
reason (from the server's log lines "... disconnected: REASON"), refusals,
the server's peak memory (VmHWM) and its exit status. Exits 1 if an honest
message was lost, duplicated or reordered, an honest chatter was cut off, the
server logged a traceback or did not exit with status 0.

Standard library only; nothing leaves the loopback interface (it binds source
addresses in 127.0.0.0/8 to have several "addresses"). Stops by itself.

    python3 bench/soak.py --seconds 60
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
LIMITS = {
    "--max-message": 262144,
    "--max-queue": 1 << 20,
    "--max-clients": 150,
    "--handshake-timeout": 2,
    "--rate": 50,
    "--burst": 100,
    "--max-per-address": 40,  # given explicitly, so it applies to loopback too
    "--max-pending": 600000,
}

# Each kind of client comes from its own loopback address, so that only the
# churn trips --max-per-address.
HONEST_ADDRESS = "127.0.0.2"
SLOW_ADDRESS = "127.0.0.3"
FLOOD_ADDRESS = "127.0.0.4"
GARBAGE_ADDRESS = "127.0.0.5"
LARGE_ADDRESS = "127.0.0.6"
CHURN_ADDRESS = "127.0.0.7"
SILENT_ADDRESSES = ["127.0.1.%d" % i for i in range(1, 9)]

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


def register(port, source, nick, rcvbuf=None, timeout=5.0):
    """Connect and register; return (sock, reader) or None when refused."""
    try:
        sock = open_socket(port, source, rcvbuf)
    except OSError:
        return None
    reader = Reader(sock)
    try:
        sock.sendall(frame(nick))
        welcome = reader.frame(timeout)
    except (OSError, Closed):
        sock.close()
        return None
    if not welcome.startswith(b"Welcome to selchat"):
        sock.close()
        return None
    return sock, reader


# ---------------------------------------------------------------------------
# Honest chatters
# ---------------------------------------------------------------------------


def honest(index, count, port, start_at, stop_at, size, pace, ready, results):
    """Send at a human pace, read everything, check every other honest chatter's
    messages arrive once and in order; report what was sent and received."""
    nick = "honest%d" % index
    report = {"index": index, "sent": 0, "received": {}, "errors": [], "latencies": []}
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
                    continue
                sender = parts[1].decode("utf-8", "replace")
                if sender not in honest_nicks:
                    continue  # a hostile client's message that passed the checks
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
                if len(report["latencies"]) < 100000:
                    report["latencies"].append(time.time() - float(match.group(3)))
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
                    sock.sendall(frame("c%d" % rng.randrange(10**6)))
                elif action == "nick-reset":
                    sock.sendall(frame("c%d" % rng.randrange(10**6)))
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
}


# ---------------------------------------------------------------------------
# The server and the run
# ---------------------------------------------------------------------------


class Server:
    LISTENING = re.compile(r"listening on \S*:(\d+)")
    DISCONNECTED = re.compile(r" disconnected: (.*)$")
    REFUSED = re.compile(r"selchat: refused \S+: (.*)$")

    def __init__(self, python):
        args = [python, SCRIPT, "server", "--host", HOST, "--port", "0"]
        for option, value in LIMITS.items():
            args += [option, str(value)]
        self.args = args
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.reasons = collections.Counter()
        self.refusals = collections.Counter()
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
            match = self.REFUSED.search(line)
            if match:
                self.refusals[normalise(match.group(1))] += 1
            elif "large message refused" in line:
                self.refusals["large message refused (--max-pending)"] += 1
            elif "accept failed" in line:
                self.refusals["accept failed"] += 1
        self.listening.set()

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    parser.add_argument(
        "--honest", type=int, default=5, help="honest chatters (default 5, plus 1 large)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the hostile clients")
    parser.add_argument("--python", default=sys.executable, help="the server's interpreter")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(10**6)

    server = Server(args.python)
    port = server.port
    print(
        "soak: server pid %d on %s:%d, %g s, seed %d"
        % (server.proc.pid, HOST, port, args.seconds, seed),
        flush=True,
    )
    print(
        "soak: server limits: %s" % " ".join("%s %s" % item for item in LIMITS.items()), flush=True
    )
    context = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    results = context.Queue()
    count = args.honest + 1
    ready = context.Barrier(count + 1)
    start_at = time.monotonic()
    stop_at = start_at + args.seconds
    processes = []
    for index in range(count):
        size, pace = (32000, 10.0) if index == count - 1 else (100, 10.0)  # the last one is large
        processes.append(
            context.Process(
                target=honest,
                args=(index, count, port, start_at, stop_at, size, pace, ready, results),
            )
        )
    hostiles = ["slow", "flood", "flood", "garbage", "garbage", "large", "churn"]
    for number, kind in enumerate(hostiles):
        processes.append(
            context.Process(target=hostile, args=(kind, port, stop_at, seed + number, results))
        )
    for process in processes[:count]:
        process.start()
    ready.wait(60)  # the honest chatters are in; now the hostile ones come
    for process in processes[count:]:
        process.start()

    reports, tried, problems = [], collections.Counter(), []
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
            if item.get("error"):
                problems.append("%s client failed: %s" % (item["kind"], item["error"]))
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            problems.append("a client process had to be killed")

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

    # One count per hostile act: a flood message, a garbage piece, a connection
    # opened to churn, sit silent or read slowly, a large frame begun or sent.
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
        )
    )
    figures = {
        "seconds": args.seconds,
        "seed": seed,
        "command": " ".join(["python3", "bench/soak.py", *sys.argv[1:]]),
        "server": " ".join(server.args[1:]),
        "honest chatters": count,
        "messages sent (honest)": sum(sent.values()),
        "deliveries expected (to the other honest chatters)": expected,
        "deliveries made": delivered,
        "lost": lost,
        "latency p50/p99/max ms": [
            round(1000 * percentile(latencies, 0.5), 1),
            round(1000 * percentile(latencies, 0.99), 1),
            round(1000 * max(latencies), 1) if latencies else None,
        ],
        "hostile inputs tried": dict(sorted(tried.items())),
        "hostile inputs total": hostile_total,
        "disconnects by reason": dict(server.reasons.most_common()),
        "refusals": dict(server.refusals.most_common()),
        "server log lines": server.lines,
        "server peak memory (VmHWM)": memory.get("VmHWM", "unknown"),
        "server memory at the end (VmRSS)": memory.get("VmRSS", "unknown"),
        "server exit status": status,
        "problems": problems,
    }
    print_figures(figures)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 1 if problems else 0


def print_figures(figures):
    print()
    print("selchat soak: %g s, seed %d" % (figures["seconds"], figures["seed"]))
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
        "  latency p50/p99/max:        %s / %s / %s ms" % tuple(figures["latency p50/p99/max ms"])
    )
    print("  hostile inputs tried:       %d" % figures["hostile inputs total"])
    for key, n in figures["hostile inputs tried"].items():
        print("    %-34s %d" % (key, n))
    print("  disconnects by reason:")
    for key, n in figures["disconnects by reason"].items():
        print("    %-60s %d" % (key, n))
    print("  refusals:")
    for key, n in figures["refusals"].items():
        print("    %-60s %d" % (key, n))
    print("  server peak memory (VmHWM): %s" % figures["server peak memory (VmHWM)"])
    print("  server exit status:         %s" % figures["server exit status"])
    if figures["problems"]:
        print("PROBLEMS:")
        for problem in figures["problems"]:
            print("  - %s" % problem)
    else:
        print("OK: nothing honest was lost and the server exited 0")


if __name__ == "__main__":
    sys.exit(main())
