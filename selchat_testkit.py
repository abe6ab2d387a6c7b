"""What the test files share: a raw wire-protocol peer, the server and the client
as processes, and the constants and small helpers around them.

The raw peer speaks the wire protocol by itself (it never uses selchat's own
framing code, so a bug there cannot hide itself). Every wait has a deadline:
socket timeouts, waits on a condition that the threads draining a process's
output signal, process exits. The pytest fixtures that start these and stop
them at the end of each test, even when it fails, are in conftest.py.
"""

import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

try:
    import pexpect
except ImportError:  # pragma: no cover - pexpect is in the test requirements
    pexpect = None

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "selchat.py"
TIMEOUT = 10.0  # generous upper bound for any single expected event
UTC = timezone.utc
SHUTDOWN_NOTICE = "Server is shutting down. Goodbye!"
PASSWORD_REQUIRED = "Password required"
HISTORY_END = "--- end of earlier messages ---"
# The welcome ends with the server's rate limit (defaults), which clients use to pace.
LIMIT_NOTE = " Limit: 100 messages a second, bursts of 1000."

needs_pty = pytest.mark.skipif(
    pexpect is None or not hasattr(os, "openpty"), reason="needs pexpect and a pty"
)


# ---------------------------------------------------------------------------
# The wire protocol, written independently of selchat.py
# ---------------------------------------------------------------------------


def frame(payload):
    """Encode one frame the way the spec writes it (left-aligned header)."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return str(len(payload)).encode("ascii").ljust(10) + payload


def chat_payload(text, nick="x", stamp=None):
    """`time\\0nick\\0text`, stamped now unless a stamp is given."""
    if stamp is None:
        stamp = datetime.now(UTC).replace(microsecond=0).isoformat()
    return "\0".join((stamp, nick, text)).encode("utf-8")


# How a client shows the time of a message stamped a moment ago: [HH:MM:SS],
# or with the date when that day ended (in the reader's zone) before the client
# showed it. Which form "today" takes is for the tests that give format_time
# its `now`; the others accept either, so that they pass at any hour.
SHOWN_NOW = rb"\[(?:\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d\]"


def shown_times(moment, zone, since):
    """The forms a client in ``zone`` may show for a message written at
    ``moment`` (aware) and shown at some time from ``since`` (aware) to a
    TIMEOUT from now: the time alone while it is that day there, with the date
    on any other day. Both when the day changes in between."""
    local = moment.astimezone(zone)
    first = since.astimezone(zone).date()
    last = (datetime.now(UTC) + timedelta(seconds=TIMEOUT)).astimezone(zone).date()
    forms = []
    if first <= local.date() <= last:
        forms.append(local.strftime("%H:%M:%S"))
    if not first == last == local.date():
        forms.append(local.strftime("%Y-%m-%d %H:%M:%S"))
    return forms


def welcome_text(nick, online, limit_note=LIMIT_NOTE):
    """The exact welcome; limit_note="" for a server started with --rate 0."""
    users = "1 user online" if online == 1 else f"{online} users online"
    return f"Welcome to selchat, {nick}! {users}. Type <quit< to leave.{limit_note}"


def history_begin(count):
    return "--- %d message%s from before you joined ---" % (count, "" if count == 1 else "s")


class PeerClosed(Exception):
    """The server closed (or reset) the connection."""


class Peer:
    """A TCP (optionally TLS) client that frames and parses by itself.

    host may be a name or an IPv6 address; source binds the local end to that
    address; rcvbuf sets SO_RCVBUF before connecting; tls is a client
    SSLContext, checked against hostname.
    """

    def __init__(
        self, port, host="127.0.0.1", *, tls=None, source=None, rcvbuf=None, hostname="localhost"
    ):
        sock = self._connect(host, port, source, rcvbuf)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=hostname)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False

    @staticmethod
    def _connect(host, port, source, rcvbuf):
        """Each address of host in turn, as socket.create_connection() does, but
        with SO_RCVBUF set before connecting (it sets the window scale)."""
        error = None
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            try:
                if rcvbuf is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                if source is not None:
                    sock.bind((source, 0))
                sock.settimeout(TIMEOUT)
                sock.connect(address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error

    # -- sending ----------------------------------------------------------
    def send_raw(self, data):
        self.sock.sendall(data)

    def send_frame(self, payload):
        self.sock.sendall(frame(payload))

    def send_chat(self, text, nick="x", stamp=None):
        self.send_frame(chat_payload(text, nick, stamp))

    def register(self, nick, password=None):
        """Send the nickname (and the password when asked); return the welcome."""
        self.send_frame(nick)
        first = self.recv_service()
        if password is not None:
            assert first == PASSWORD_REQUIRED, first
            self.send_frame(password)
            first = self.recv_service()
        assert first.startswith(f"Welcome to selchat, {nick}!"), first
        return first

    # -- receiving --------------------------------------------------------
    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame from the server in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            raise TimeoutError("no frame from the server in time") from None
        except (ConnectionResetError, ConnectionAbortedError, ssl.SSLError) as exc:
            self.eof = True
            raise PeerClosed(str(exc)) from None
        if not data:
            self.eof = True
            raise PeerClosed("end of stream")
        self.buffer += data

    def recv_frame(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buffer) >= 10:
                header = bytes(self.buffer[:10])
                # Readers accept any padding; the server writes left-aligned.
                assert re.fullmatch(rb"[0-9]+ *", header), f"server sent a bad header {header!r}"
                size = int(header)
                if len(self.buffer) >= 10 + size:
                    payload = bytes(self.buffer[10 : 10 + size])
                    del self.buffer[: 10 + size]
                    return payload
            if self.eof:
                raise PeerClosed("end of stream")
            self._fill(deadline)

    def recv_service(self, timeout=TIMEOUT):
        payload = self.recv_frame(timeout)
        assert b"\0" not in payload, f"expected a service message, got {payload[:200]!r}"
        return payload.decode("utf-8")

    def recv_chat(self, timeout=TIMEOUT):
        payload = self.recv_frame(timeout)
        assert payload.count(b"\0") >= 2, f"expected a chat message, got {payload[:200]!r}"
        return tuple(payload.decode("utf-8").split("\0", 2))

    def recv_chat_skipping_notices(self, timeout=TIMEOUT):
        """The next chat message; service messages (joins, leaves) before it are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            payload = self.recv_frame(deadline - time.monotonic())
            if b"\0" in payload:
                assert payload.count(b"\0") >= 2, f"not a chat message: {payload[:200]!r}"
                return tuple(payload.decode("utf-8").split("\0", 2))

    def recv_until_closed(self, timeout=TIMEOUT):
        """Read frames until the server closes; return them all (decoded)."""
        deadline = time.monotonic() + timeout
        frames = []
        while True:
            try:
                frames.append(
                    self.recv_frame(deadline - time.monotonic()).decode("utf-8", "replace")
                )
            except PeerClosed:
                return frames

    def sync(self, other):
        """Prove that nothing is pending for self: other (a User) sends a marker,
        self's next frame is it."""
        marker = "sync %f" % time.monotonic()
        other.peer.send_chat(marker, nick=other.nick)
        assert self.recv_chat()[1:] == (other.nick, marker)

    # -- closing ----------------------------------------------------------
    def reset(self):
        """Close with SO_LINGER 0: the server gets a RST."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def wait_service(user, pattern, timeout=TIMEOUT):
    """Read until a service message matching pattern; return it and the frames before it."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    before = []
    while True:
        payload = user.recv_frame(max(deadline - time.monotonic(), 0.01))
        if b"\0" not in payload and regex.search(payload.decode("utf-8")):
            return payload.decode("utf-8"), before
        before.append(payload)


def first_answer(port, nick, source):
    """What a new connection from source that sends nick is told first (a
    welcome, or why it is refused); the connection is closed after it."""
    peer = Peer(port, source=source)
    try:
        peer.send_frame(nick)
        return peer.recv_service()
    finally:
        peer.close()


class User:
    """A registered peer and its nickname."""

    def __init__(self, peer, nick):
        self.peer = peer
        self.nick = nick

    def __getattr__(self, name):
        return getattr(self.peer, name)

    def sync(self, other):
        self.peer.sync(other)


# ---------------------------------------------------------------------------
# The server and the client as processes
# ---------------------------------------------------------------------------


def clean_env(**overrides):
    """The test process's environment without anything selchat reads, plus overrides.

    An override of None removes the variable.
    """
    drop = {
        "NO_COLOR",
        "FORCE_COLOR",
        "CLICOLOR_FORCE",
        "TERM",
        "TZ",
        "SELCHAT_HOST",
        "SELCHAT_PORT",
        "SELCHAT_PASSWORD",
        "SELCHAT_HISTORY",
        "COLUMNS",
        "LINES",
        "PYTHONSTARTUP",
        "PYTHONINSPECT",
        "INPUTRC",
    }
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env["LC_ALL"] = "C.UTF-8"
    env["TZ"] = "UTC"
    env["SELCHAT_HISTORY"] = ""  # no history file unless a test names one (never the user's)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# Runs the server under a file descriptor limit (soft and hard) without a
# preexec_fn, which is not safe in a process that has threads.
LIMITED = (
    "import os, resource, sys; what, n = getattr(resource, sys.argv[1]), int(sys.argv[2]); "
    "resource.setrlimit(what, (n, n)); "
    "os.execv(sys.executable, [sys.executable] + sys.argv[3:])"
)


class ServerProcess:
    """`selchat.py server` as a subprocess; stderr is drained by a thread.

    The port (and address) come from its `listening on HOST:PORT` line; nofile
    runs it under that file descriptor limit, fsize under that file size limit
    (a write past it fails as on a full disk: Python ignores SIGXFSZ).
    """

    LISTENING = re.compile(r"listening on (\S*):(\d+)")

    def __init__(self, args, env=None, nofile=None, fsize=None):
        argv = [sys.executable, str(SCRIPT), "server", *map(str, args)]
        for name, limit in (("RLIMIT_NOFILE", nofile), ("RLIMIT_FSIZE", fsize)):
            if limit is not None:
                argv = [sys.executable, "-c", LIMITED, name, str(limit), *argv[1:]]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env if env is not None else clean_env(),
            cwd=str(HERE),
        )
        self.lines = []
        self.stderr_closed = False
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        try:
            match = self.wait_for_log(self.LISTENING)
        except BaseException:
            self.stop()  # no fixture knows of it yet
            raise
        self.address = match.group(1)
        self.port = int(match.group(2))
        assert self.port != 0

    def _drain(self):
        for raw in iter(self.proc.stderr.readline, b""):
            with self.changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.stderr_closed = True
            self.changed.notify_all()

    def wait_for_log(self, pattern, timeout=TIMEOUT, start=0):
        """Wait for a stderr line (from line `start` on) matching pattern; return the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        checked = start
        with self.changed:
            while True:
                for line in self.lines[checked:]:
                    match = regex.search(line)
                    if match:
                        return match
                checked = len(self.lines)
                if self.stderr_closed:
                    raise AssertionError(
                        f"server stderr closed without a line matching {regex.pattern!r}:\n"
                        f"{self.log}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no server log line matching {regex.pattern!r} in {timeout} s:\n{self.log}"
                    )
                self.changed.wait(remaining)

    def wait_for_count(self, text, count, timeout=TIMEOUT):
        """Wait until ``text`` is in ``count`` stderr lines; return how many have it."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = sum(text in line for line in self.lines)
                remaining = deadline - time.monotonic()
                if found >= count or self.stderr_closed or remaining <= 0:
                    return found
                self.changed.wait(remaining)

    @property
    def log(self):
        with self.changed:
            return "\n".join(self.lines)

    def alive(self):
        return self.proc.poll() is None

    def interrupt(self, timeout=TIMEOUT):
        """SIGINT, as Ctrl+C does; return the exit status."""
        self.proc.send_signal(signal.SIGINT)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout=TIMEOUT):
        status = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=TIMEOUT)
        return status

    def stop(self):
        """Stop it as Ctrl+C does (the server shuts down at once when its peers
        are gone, and exiting normally lets coverage save what it ran), killing
        it only if it will not go; return its exit status. Stopping twice is fine."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        status = self.proc.wait(timeout=TIMEOUT)
        self.reader.join(timeout=TIMEOUT)
        self.proc.stderr.close()
        return status


def run_server_briefly(*args, timeout=TIMEOUT):
    """`selchat.py server` on 127.0.0.1 and a free port, for one that should not start."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "server", "--host", "127.0.0.1", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=clean_env(),
        cwd=str(HERE),
        timeout=timeout,
        text=True,
    )


class PipedClient:
    """`selchat.py client` with stdin/stdout/stderr as pipes; output drained by threads."""

    def __init__(self, args, env):
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "client", *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(HERE),
        )
        self.out = bytearray()
        self.err = bytearray()
        self.changed = threading.Condition()
        self.threads = [
            threading.Thread(target=self._drain, args=(stream, sink), daemon=True)
            for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for thread in self.threads:
            thread.start()

    def _drain(self, stream, sink):
        for chunk in iter(lambda: stream.read1(65536), b""):
            with self.changed:
                sink += chunk
                self.changed.notify_all()

    def write(self, text):
        self.proc.stdin.write(text.encode("utf-8"))
        self.proc.stdin.flush()

    def close_stdin(self):
        self.proc.stdin.close()

    def wait_for_output(self, needle, timeout=TIMEOUT):
        """Wait until needle (bytes, or text) is in the client's stdout."""
        if isinstance(needle, str):
            needle = needle.encode("utf-8")
        deadline = time.monotonic() + timeout
        with self.changed:
            while needle not in self.out:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{needle!r} not in client output in time: {bytes(self.out)!r}"
                    )
                self.changed.wait(remaining)

    def wait_exit(self, timeout=TIMEOUT):
        rc = self.proc.wait(timeout=timeout)
        for thread in self.threads:
            thread.join(timeout=TIMEOUT)
        return rc

    def finish(self, timeout=TIMEOUT):
        """Close stdin, wait for the exit; return (status, stdout, stderr) as text."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        status = self.wait_exit(timeout)
        return status, self.out.decode("utf-8", "replace"), self.err.decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the client leaves cleanly
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        for thread in self.threads:
            thread.join(timeout=TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


def pty_output(child):
    """All that a pty client (see the pty_client fixture) has written so far."""
    return child.logfile_read.getvalue()


def wait_pty_exit(child, timeout=TIMEOUT):
    """Wait for the child to exit; return its exit status (None if killed by a signal)."""
    child.expect(pexpect.EOF, timeout=timeout)
    child.wait()
    return child.exitstatus


def free_port():
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
