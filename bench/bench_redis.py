#!/usr/bin/env python3
"""Benchmark: one selchat server, and two sharing one room through Redis.

Runs, in one invocation and on 127.0.0.1 only:

  single   one selchat server; 1000 receivers and 4 senders on it
  redis    two selchat servers with --redis on one redis-server; the 1000
           receivers and the 4 senders split evenly between them

Each sender sends --rate chat messages a second (100-byte texts, each stamped
with the sending moment) for --duration seconds. Receivers count what
arrives; one in --sample of them also reads every message's stamp for the
latency from send to arrival (p50, p99, max). Deliveries/s is what reached the
receivers divided by the time from the first send to the last arrival; a
message that never arrived counts in "delivered %", not in the latency.

Standard library only, plus the redis package to check the Redis before the
run. A redis-server is started on a free port unless --redis URL is given.
Every wait is bounded; the servers are stopped with SIGINT at the end.

    python bench/bench_redis.py                     # both setups, about a minute
    python bench/bench_redis.py --rate 200 --duration 10
"""

import argparse
import multiprocessing as mp
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, os.pardir, "selchat.py")
HOST = "127.0.0.1"
STAMP = b"2026-01-01T00:00:00+00:00"
TEXT_SIZE = 100
RECEIVERS = 1000
SENDERS = 4
WORKERS = 4  # receiver processes
SETUP_TIMEOUT = 60.0
QUIET = 0.5  # no bytes for this long: the join notices are through
DRAIN_TIMEOUT = 15.0  # after the senders stop, while messages still arrive
TEXT_RE = re.compile(rb"S(\d+)-(\d{9})\|T(\d{20})\|")


def frame(payload):
    return b"%-10d" % len(payload) + payload


def chat(sender, seq):
    head = b"S%d-%09d|T%020d|" % (sender, seq, time.monotonic_ns())
    return frame(STAMP + b"\0S%d\0" % sender + head + b"x" * (TEXT_SIZE - len(head)))


FRAME_SIZE = len(chat(1, 0))


def free_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Process:
    """A server process whose stderr is drained by a thread."""

    def __init__(self, argv, listening=None):
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.lines = []
        self.port = None
        found = threading.Event()

        def drain():
            for raw in iter(self.proc.stderr.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                self.lines.append(line)
                match = listening and re.search(r"listening on \S*:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if listening:
            found.wait(SETUP_TIMEOUT)
            if self.port is None:
                raise SystemExit("server did not start:\n" + "\n".join(self.lines))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_redis():
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no redis-server found: install it or give --redis URL")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, "redis://%s:%d/0" % (HOST, port)


def check_redis(url):
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                raise SystemExit("cannot reach Redis at %s: %s" % (url, exc)) from None
            time.sleep(0.05)


def settle(sock_list, selector, deadline):
    """Read and discard until every socket has been quiet for QUIET seconds."""
    last = time.monotonic()
    while time.monotonic() - last < QUIET:
        if time.monotonic() > deadline:
            raise TimeoutError("the room did not settle")
        for key, _ in selector.select(0.05):
            if key.fileobj.recv(1 << 18):
                last = time.monotonic()


def connect(port, nick):
    sock = socket.create_connection((HOST, port), timeout=SETUP_TIMEOUT)
    sock.sendall(frame(nick.encode()))
    sock.setblocking(False)
    return sock


def receiver_worker(ports, first, sample, ready, go, stop, results):
    selector = selectors.DefaultSelector()
    socks = []
    for index, port in enumerate(ports, first):
        sock = connect(port, "r%d" % index)
        sampled = index % sample == 0
        selector.register(sock, selectors.EVENT_READ, (sampled, bytearray()))
        socks.append(sock)
    settle(socks, selector, time.monotonic() + SETUP_TIMEOUT)
    ready.put(True)
    go.wait()
    received = 0
    latencies = []
    last = time.monotonic()
    while True:
        now = time.monotonic()
        if stop.is_set() and (now - last > 1.0 or now - stop.when > DRAIN_TIMEOUT):
            break
        for key, _ in selector.select(0.1):
            data = key.fileobj.recv(1 << 18)
            if not data:
                continue
            arrived = time.monotonic_ns()
            last = time.monotonic()
            received += data.count(b"|T")  # once per chat message; notices have none
            sampled, buffer = key.data
            if sampled:
                buffer += data
                whole = len(buffer) - len(buffer) % FRAME_SIZE
                for match in TEXT_RE.finditer(buffer, 0, whole):
                    latencies.append((arrived - int(match.group(3))) / 1e6)
                del buffer[:whole]
    results.put((received, last, latencies))
    for sock in socks:
        sock.close()


class Stop:
    """An mp.Event that also knows, in each process, when it was first seen set."""

    def __init__(self, event):
        self.event = event
        self.when = None

    def is_set(self):
        if self.when is None and self.event.is_set():
            self.when = time.monotonic()
        return self.when is not None


def sender_worker(port, index, rate, duration, ready, go, results):
    sock = socket.create_connection((HOST, port), timeout=SETUP_TIMEOUT)
    sock.sendall(frame(b"S%d" % index))
    threading.Thread(
        target=lambda: [None for _ in iter(lambda: sock.recv(1 << 18), b"")], daemon=True
    ).start()
    ready.put(True)
    go.wait()
    start = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= duration:
            break
        due = min(int(elapsed * rate) + 1, int(duration * rate))
        if due > sent:
            sock.sendall(b"".join(chat(index, seq) for seq in range(sent, due)))
            sent = due
        time.sleep(0.002)
    results.put(sent)
    time.sleep(DRAIN_TIMEOUT)  # keep the connection until the receivers are done
    sock.close()


def run(ports, args):
    """One measurement: receivers and senders spread over the given server ports."""
    ctx = mp.get_context("fork")
    ready, results, sent_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    go, stop_event = ctx.Event(), ctx.Event()
    per = RECEIVERS // WORKERS
    workers = []
    for w in range(WORKERS):
        wports = [ports[i % len(ports)] for i in range(w * per, (w + 1) * per)]
        proc = ctx.Process(
            target=receiver_worker,
            args=(wports, w * per, args.sample, ready, go, Stop(stop_event), results),
            daemon=True,
        )
        proc.start()
        workers.append(proc)
    for _ in range(WORKERS):
        ready.get(timeout=SETUP_TIMEOUT)
    senders = []
    for s in range(SENDERS):
        proc = ctx.Process(
            target=sender_worker,
            args=(ports[s % len(ports)], s + 1, args.rate, args.duration, ready, go, sent_q),
            daemon=True,
        )
        proc.start()
        senders.append(proc)
    for _ in range(SENDERS):
        ready.get(timeout=SETUP_TIMEOUT)
    time.sleep(1.0)  # the senders' join notices go by before the clock starts
    go.set()
    started = time.monotonic()
    sent = sum(sent_q.get(timeout=args.duration + SETUP_TIMEOUT) for _ in range(SENDERS))
    stop_event.set()
    received, last, latencies = 0, started, []
    for _ in range(WORKERS):
        got, when, lat = results.get(timeout=DRAIN_TIMEOUT + 30)
        received += got
        last = max(last, when)
        latencies.extend(lat)
    for proc in workers + senders:
        proc.terminate()
        proc.join(5)
    delivered = received
    latencies.sort()

    def pick(q):
        return (
            latencies[min(int(q * len(latencies)), len(latencies) - 1)]
            if latencies
            else float("nan")
        )

    return {
        "sent": sent,
        "delivered": delivered,
        "percent": 100.0 * delivered / max(sent * RECEIVERS, 1),
        "per_second": delivered / max(last - started, 1e-9),
        "p50": pick(0.50),
        "p99": pick(0.99),
        "max": latencies[-1] if latencies else float("nan"),
    }


def selchat(*extra):
    return Process(
        [sys.executable, SCRIPT, "server", "--host", HOST, "--port", "0", "--rate", "0", *extra],
        listening=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rate",
        default="25,100",
        help="messages a second per sender; a comma-separated list runs each (default: 25,100)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of sending")
    parser.add_argument("--sample", type=int, default=20, help="one receiver in N measures latency")
    parser.add_argument("--redis", metavar="URL", help="use this Redis instead of starting one")
    args = parser.parse_args()
    rates = [float(rate) for rate in args.rate.split(",")]
    rows = []
    redis_proc = None
    url = args.redis
    if url is None:
        redis_proc, url = start_redis()
    try:
        check_redis(url)
        for rate in rates:
            args.rate = rate
            server = selchat()
            try:
                rows.append(("1 server", rate, run([server.port], args)))
            finally:
                server.stop()
            room = "bench-%d-%g" % (os.getpid(), rate)
            servers = [selchat("--redis", url, "--room", room) for _ in range(2)]
            try:
                rows.append(("2 servers + Redis", rate, run([s.port for s in servers], args)))
            finally:
                for s in servers:
                    s.stop()
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    print(
        "\n%d receivers, %d senders, %g s of sending, %d-byte texts, %d CPUs\n"
        % (RECEIVERS, SENDERS, args.duration, TEXT_SIZE, os.cpu_count() or 0)
    )
    print("| setup | msg/s each | sent | delivered % | deliveries/s | p50 ms | p99 ms | max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rate, r in rows:
        print(
            "| %s | %g | %d | %.1f | %.0f | %.1f | %.1f | %.1f |"
            % (name, rate, r["sent"], r["percent"], r["per_second"], r["p50"], r["p99"], r["max"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
