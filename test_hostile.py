"""Hostile peers, overload and faults (issue 4): every limit, TLS, the password,
and a property-based fuzz test, against a real server process over real sockets.

Each limit test checks three things: the peer concerned gets the clear notice,
the server logs it, and the other users carry on unaffected.

The raw peers (selchat_testkit.py, shared by every test file) speak the wire
protocol themselves (they never use selchat's framing code), and every wait is
on an event with a deadline: a socket timeout, a log line, a process exit.
Every process a test starts is stopped by a fixture (conftest.py, and this
file's start_server over it), even when the test fails.
"""

import itertools
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import selchat_testkit
from selchat_testkit import (
    HERE,
    PASSWORD_REQUIRED,
    SCRIPT,
    SHUTDOWN_NOTICE,
    TIMEOUT,
    UTC,
    Peer,
    PeerClosed,
    ServerProcess,
    clean_env,
    frame,
    needs_pty,
    pexpect,
    shown_times,
)

OUT_OF_RESOURCES = "Server is out of resources; try again later"
BUSY = "Not sent: the server is busy receiving other large messages; try again later"
PLAIN_TO_TLS = "Protocol error: this server speaks TLS; connect with the client's --tls option"


# ---------------------------------------------------------------------------
# What this file adds to the shared helpers (selchat_testkit.py, conftest.py)
# ---------------------------------------------------------------------------

# The frames this file builds (the fuzz's templates among them) are the same
# bytes on every run: one fixed time stamp. It is a day long gone: a client
# shows it with its date, so no test may expect it shown as today's.
STAMP = "2026-11-27T07:37:12+00:00"


def chat_payload(text, nick="x", stamp=STAMP):
    return selchat_testkit.chat_payload(text, nick, stamp)


@pytest.fixture
def start_server(start_server):
    """The shared factory, with `--history 0` unless a test gives --history (no
    replay for newcomers unless a test wants it); every server it starts must
    end with exit status 0."""
    servers = []

    def start(*args, **options):
        args = tuple(map(str, args))
        if "--history" not in args:
            args += ("--history", "0")
        servers.append(start_server(*args, **options))
        return servers[-1]

    yield start
    statuses = [server.stop() for server in servers]
    for server, status in zip(servers, statuses):
        assert status == 0, f"the server's exit status was {status}:\n{server.log}"


def _make_cert_openssl(cert, key, name, san):
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName={san}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _make_cert_cryptography(cert, key, name, san):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    names = []
    for entry in san.split(","):
        kind, value = entry.split(":", 1)
        names.append(
            x509.DNSName(value) if kind == "DNS" else x509.IPAddress(ipaddress.ip_address(value))
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="session")
def make_cert(tmp_path_factory):
    """Factory: a self-signed certificate and key (openssl, else `cryptography`)."""
    folder = tmp_path_factory.mktemp("tls")
    made = {}

    def make(name, san):
        if (name, san) not in made:
            cert = folder / f"{name}-{len(made)}.pem"
            key = folder / f"{name}-{len(made)}.key"
            try:
                if shutil.which("openssl") is None:
                    raise FileNotFoundError("openssl")
                _make_cert_openssl(cert, key, name, san)
            except (OSError, subprocess.CalledProcessError):
                try:
                    _make_cert_cryptography(cert, key, name, san)
                except ImportError:
                    pytest.skip("needs openssl or the cryptography package to make a certificate")
            made[name, san] = (cert, key)
        return made[name, san]

    return make


@pytest.fixture(scope="session")
def cert(make_cert):
    """(cert, key) for localhost and 127.0.0.1."""
    return make_cert("localhost", "DNS:localhost,IP:127.0.0.1")


@pytest.fixture
def tls_context(cert):
    """A client context that trusts the test certificate, with hostname checking."""
    return ssl.create_default_context(cafile=str(cert[0]))


def tls_args(cert):
    return ("--tls-cert", cert[0], "--tls-key", cert[1])


def drain_notices(peer, *expected):
    """The next frames are exactly these service messages."""
    for text in expected:
        assert peer.recv_service() == text


# ---------------------------------------------------------------------------
# --max-queue: a reader that stops reading
# ---------------------------------------------------------------------------


def test_max_queue_cuts_off_a_reader_that_stops_and_a_healthy_reader_gets_everything(
    start_server, connect
):
    server = start_server("--max-queue", 200_000, "--rate", 0)
    alice = connect(server.port, "alice")
    bob = connect(server.port, "bob")
    stalled = connect(server.port, "stalled", rcvbuf=4096)
    drain_notices(alice, "bob joined the chat (2 online)", "stalled joined the chat (3 online)")
    drain_notices(bob, "stalled joined the chat (3 online)")

    got, failure, bob_done = [], [], threading.Event()
    arrived = threading.Condition()

    def bob_reads():
        try:
            while len(got) < count:
                payload = bob.recv_frame()
                if b"\0" in payload:
                    with arrived:
                        got.append(payload.split(b"\0", 2)[2][:12].decode())
                        arrived.notify_all()
        except Exception as exc:  # reported below
            failure.append(repr(exc))
        finally:
            bob_done.set()
            with arrived:
                arrived.notify_all()

    stalled_frames = []

    def stalled_reads_once_cut_off():
        # It must read soon after it is cut off: the server gives a client it
        # has cut off a couple of seconds to take the notice, no more.
        try:
            server.wait_for_log(
                r"stalled \(127\.0\.0\.1:\d+\) disconnected: "
                r"output queue over --max-queue",
                timeout=30,
            )
            stalled_frames.extend(stalled.recv_until_closed())
        except Exception as exc:  # reported below
            failure.append(repr(exc))

    count, filler = 400, "q" * 20_000  # 8 MB, 40 times the limit
    reader = threading.Thread(target=bob_reads, daemon=True)
    reader.start()
    cut = threading.Thread(target=stalled_reads_once_cut_off, daemon=True)
    cut.start()
    sent = []
    deadline = time.monotonic() + 30
    for i in range(count):
        # alice keeps at most 3 messages ahead of bob: bob is a healthy reader
        with arrived:
            while len(got) < len(sent) - 3 and not bob_done.is_set():
                assert arrived.wait(deadline - time.monotonic()), "bob stopped receiving"
        label = f"msg {i:08d}"
        alice.send_chat(label + filler, nick="alice")
        sent.append(label)
    assert bob_done.wait(30), "bob stopped receiving"
    reader.join(TIMEOUT)
    cut.join(30)
    assert not failure, failure
    assert got == sent  # the healthy reader lost nothing, in order
    assert alice.recv_service() == "stalled left the chat (2 online)"
    frames = stalled_frames
    assert frames and frames[-1] == (
        "Disconnected: you were not reading and over 200000 bytes were waiting for you"
    ), frames[-1][:80]
    assert all("\0" in text for text in frames[:-1])  # whole chat frames, then the notice
    bob.send_chat("still here", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "still here")


# ---------------------------------------------------------------------------
# --max-clients
# ---------------------------------------------------------------------------


def test_max_clients_refuses_the_one_over_with_a_notice_and_frees_the_slot(start_server, connect):
    server = start_server("--max-clients", 3)
    alice = connect(server.port, "alice")
    bob = connect(server.port, "bob")
    drain_notices(alice, "bob joined the chat (2 online)")
    silent = connect(server.port)  # a connection in its handshake counts too
    server.wait_for_log(r"connection from 127\.0\.0\.1:%d" % silent.sock.getsockname()[1])
    extra = connect(server.port)
    extra.send_frame("carol")
    assert extra.recv_until_closed() == ["Server is full (3 clients); try again later"]
    server.wait_for_log(r"refused 127\.0\.0\.1:\d+: server full \(3 clients\)")
    bob.send_chat("unaffected", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "unaffected")
    silent_port = silent.sock.getsockname()[1]
    silent.close()
    server.wait_for_log(r"127\.0\.0\.1:%d disconnected: closed the connection" % silent_port)
    connect(server.port, "carol")
    assert alice.recv_service() == "carol joined the chat (3 online)"


def test_max_clients_counts_no_connection_the_server_has_already_refused(start_server, connect):
    server = start_server("--max-clients", 2, "--handshake-timeout", 1)
    alice = connect(server.port, "alice")
    silent = connect(server.port)
    # Refused at the timeout, it stays open on its side: in its grace time the
    # server still holds the socket, but a newcomer takes its place.
    assert silent.recv_frame() == b"No nickname received within 1 second"
    server.wait_for_log("disconnected: handshake timeout")
    connect(server.port, "fred")
    assert alice.recv_service() == "fred joined the chat (2 online)"
    # Two real users: the next one is turned away, with the count in words.
    extra = connect(server.port)
    assert extra.recv_until_closed() == ["Server is full (2 clients); try again later"]


def test_max_clients_zero_means_no_limit(start_server, connect):
    server = start_server("--max-clients", 0)
    peers = [connect(server.port, f"u{i}") for i in range(5)]
    drain_notices(peers[0], *(f"u{i} joined the chat ({i + 1} online)" for i in range(1, 5)))
    assert "server full" not in server.log


# ---------------------------------------------------------------------------
# --handshake-timeout
# ---------------------------------------------------------------------------


def test_handshake_timeout_closes_silent_half_sent_and_passwordless_connections(
    start_server, connect
):
    server = start_server("--handshake-timeout", 1, "--password", "s3cret")
    alice = connect(server.port, "alice", password="s3cret")
    bob = connect(server.port, "bob", password="s3cret")
    drain_notices(alice, "bob joined the chat (2 online)")
    started = time.monotonic()
    silent = connect(server.port)
    partial = connect(server.port)
    partial.send_raw(b"5         al")  # a nickname frame that never ends
    no_password = connect(server.port)
    no_password.send_frame("mallory")
    assert no_password.recv_service() == PASSWORD_REQUIRED
    # The chat goes on meanwhile, at once.
    for i in range(5):
        bob.send_chat(f"during the handshakes {i}", nick="bob")
        assert alice.recv_chat(timeout=0.9)[1:] == ("bob", f"during the handshakes {i}")
    for peer in (silent, partial):
        assert peer.recv_until_closed() == ["No nickname received within 1 second"]
    assert no_password.recv_until_closed() == ["No password received within 1 second"]
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed <= 4.0, elapsed
    assert server.wait_for_count("disconnected: handshake timeout", 3) == 3, server.log
    # The others saw no join or leave for them: the next thing alice gets is bob's.
    bob.send_chat("after", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "after")


# ---------------------------------------------------------------------------
# --rate / --burst
# ---------------------------------------------------------------------------


def test_rate_over_the_burst_is_not_relayed_and_the_sender_is_told_once(start_server, connect):
    server = start_server("--rate", 2, "--burst", 3)
    alice = connect(server.port, "alice")
    hasty = connect(server.port, "hasty")
    drain_notices(alice, "hasty joined the chat (2 online)")
    hasty.send_raw(b"".join(frame(chat_payload(f"burst {i}", "hasty")) for i in range(8)))
    for i in range(3):
        assert alice.recv_chat()[1:] == ("hasty", f"burst {i}")
    assert hasty.recv_service() == (
        "Slow down: at most 2 messages a second, bursts of 3; messages over that are not sent"
    )
    # Nothing more of the burst reaches alice: the next thing she gets is bob.
    bob = connect(server.port, "bob")
    assert alice.recv_service() == "bob joined the chat (3 online)"
    bob.send_chat("other users see no delay", nick="bob")
    assert alice.recv_chat(timeout=1.0)[1:] == ("bob", "other users see no delay")
    # hasty is still connected, and once a token has come back (2 a second;
    # commands count too) it is heard again.
    assert hasty.recv_service() == "bob joined the chat (3 online)"
    assert hasty.recv_chat()[1:] == ("bob", "other users see no delay")
    deadline = time.monotonic() + TIMEOUT
    while True:
        hasty.send_frame("/who")
        try:
            assert hasty.recv_service(timeout=0.4).startswith("3 users online: alice")
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "hasty was never heard again"
    assert server.alive()


def test_rate_slow_down_notice_comes_at_most_once_a_second(start_server, connect):
    server = start_server("--rate", 3, "--burst", 1)
    alice = connect(server.port, "alice")
    hasty = connect(server.port, "hasty")
    drain_notices(alice, "hasty joined the chat (2 online)")
    notices, errors = [], []

    def hasty_reads():
        try:
            while True:
                text = hasty.recv_service()
                notices.append((time.monotonic(), text))
                if "users online" in text:  # the answer to the last /who
                    return
        except (PeerClosed, TimeoutError):
            pass
        except Exception as exc:
            errors.append(repr(exc))

    reader = threading.Thread(target=hasty_reads, daemon=True)
    reader.start()
    started = time.monotonic()
    sent = 20
    for i in range(sent):  # 12.5 a second, four times the rate, for 1.6 s
        hasty.send_chat(f"m{i:02d}", nick="hasty")
        time.sleep(0.08)  # the test's own pace, not a synchronisation
    duration = time.monotonic() - started
    # Its answer marks the end of hasty's input (once a token has come back).
    while not any("users online" in text for _, text in notices):
        assert time.monotonic() - started < TIMEOUT, notices
        hasty.send_frame("/who")
        reader.join(0.5)
    relayed = []
    bob = connect(server.port, "bob")
    while True:
        payload = alice.recv_frame()
        if payload == b"bob joined the chat (3 online)":
            break
        relayed.append(payload.split(b"\0")[2].decode())
    bob.close()
    reader.join(TIMEOUT)
    assert not errors, errors
    slow_downs = [
        t for t, text in notices if text.startswith("Slow down: at most 3 messages a second")
    ]
    assert 2 <= len(slow_downs) <= int(duration) + 1, notices
    assert all(b - a >= 0.5 for a, b in zip(slow_downs, slow_downs[1:])), slow_downs
    # what got through is a part of what was sent, in order, about the rate
    assert relayed == sorted(relayed) and set(relayed) <= {f"m{i:02d}" for i in range(sent)}
    assert 3 <= len(relayed) <= 1 + 3 * duration + 2, relayed
    assert "Disconnected" not in "".join(text for _, text in notices)


def test_rate_a_client_that_keeps_flooding_is_disconnected(start_server, connect):
    server = start_server("--rate", 1, "--burst", 2)
    alice = connect(server.port, "alice")
    bob = connect(server.port, "bob")
    flood = connect(server.port, "flood")
    drain_notices(alice, "bob joined the chat (2 online)", "flood joined the chat (3 online)")
    drain_notices(bob, "flood joined the chat (3 online)")
    # max(rate * 10, burst) = 10 dropped in 10 s is tolerated; the 11th is not.
    flood.send_raw(b"".join(frame(chat_payload(f"f{i}", "flood")) for i in range(2 + 11)))
    assert flood.recv_until_closed() == [
        "Slow down: at most 1 messages a second, bursts of 2; messages over that are not sent",
        "Disconnected: flooding (far over 1 messages a second)",
    ]
    server.wait_for_log(r"flood \(127\.0\.0\.1:\d+\) disconnected: flooding")
    assert alice.recv_chat()[1:] == ("flood", "f0")
    assert alice.recv_chat()[1:] == ("flood", "f1")
    assert alice.recv_service() == "flood left the chat (2 online)"
    bob.send_chat("unaffected", nick="bob")
    assert alice.recv_chat(timeout=1.0)[1:] == ("bob", "unaffected")


def test_rate_ten_drops_are_tolerated(start_server, connect):
    server = start_server("--rate", 1, "--burst", 2)
    alice = connect(server.port, "alice")
    edge = connect(server.port, "edge")
    drain_notices(alice, "edge joined the chat (2 online)")
    edge.send_raw(b"".join(frame(chat_payload(f"e{i}", "edge")) for i in range(2 + 10)))
    assert edge.recv_service().startswith("Slow down: ")
    assert [alice.recv_chat()[2] for _ in range(2)] == ["e0", "e1"]
    alice.send_chat("are you still there?", nick="alice")
    assert edge.recv_chat()[1:] == ("alice", "are you still there?")  # still in the room
    connect(server.port, "bob")
    assert edge.recv_service() == "bob joined the chat (3 online)"
    assert alice.recv_service() == "bob joined the chat (3 online)"  # no "edge left" before it
    assert "flooding" not in server.log


# ---------------------------------------------------------------------------
# --max-per-address
# ---------------------------------------------------------------------------


def test_max_per_address_refuses_the_extra_connection_from_one_address(start_server, connect):
    server = start_server("--max-per-address", 2)  # given explicitly: loopback counts
    alice = connect(server.port, "alice", source="127.0.0.2")
    bob = connect(server.port, "bob", source="127.0.0.2")
    drain_notices(alice, "bob joined the chat (2 online)")
    third = connect(server.port, source="127.0.0.2")
    assert third.recv_until_closed() == [
        "Too many connections from your address (2); try again later"
    ]
    server.wait_for_log(r"refused 127\.0\.0\.2:\d+: 2 connections from that address")
    # another address is not affected, nor is the chat
    connect(server.port, "carol", source="127.0.0.3")
    assert alice.recv_service() == "carol joined the chat (3 online)"
    bob.send_chat("unaffected", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "unaffected")
    # when one from that address leaves, the next one gets in
    bob.close()
    assert alice.recv_service() == "bob left the chat (2 online)"
    connect(server.port, "dave", source="127.0.0.2")
    assert alice.recv_service() == "dave joined the chat (3 online)"


def test_max_per_address_default_exempts_loopback(start_server, connect):
    server = start_server()
    peers = [connect(server.port) for _ in range(300)]  # over the default of 256
    for i, peer in enumerate(peers):
        peer.send_frame(f"u{i}")
    for i, peer in enumerate(peers):
        welcome = peer.recv_service()
        assert welcome.startswith(f"Welcome to selchat, u{i}!"), welcome
    assert "connections from that address" not in server.log


# ---------------------------------------------------------------------------
# --max-pending: memory for large frames still arriving
# ---------------------------------------------------------------------------


def test_max_pending_refuses_a_new_large_message_and_recovers_by_itself(start_server, connect):
    server = start_server("--max-pending", 200_000, "--rate", 0)
    alice = connect(server.port, "alice")
    big = connect(server.port, "big")
    other = connect(server.port, "other")
    drain_notices(alice, "big joined the chat (2 online)", "other joined the chat (3 online)")
    drain_notices(big, "other joined the chat (3 online)")

    first = frame(chat_payload("A" * 150_000, "big"))
    big.send_raw(first[:1000])  # 150 kB announced, only the start sent
    # A round trip through the server: by its answer big's start has been read.
    alice.send_frame("/who")
    assert alice.recv_service().startswith("3 users online")

    second = frame(chat_payload("B" * 100_000, "other"))
    other.send_raw(second[:1000])  # 150 kB + 100 kB > 200 kB
    assert other.recv_service() == BUSY
    server.wait_for_log(
        r"other \(127\.0\.0\.1:\d+\): large message refused, 150\d\d\d bytes already arriving"
    )
    other.send_raw(second[1000:])  # read and thrown away; the connection stays
    other.send_chat("small one", nick="other")
    assert alice.recv_chat()[1:] == ("other", "small one")  # and not the refused one

    big.send_raw(first[1000:])
    _, nick, text = alice.recv_chat()
    assert (nick, len(text), set(text)) == ("big", 150_000, {"A"})
    # with the first one complete there is room again
    other.send_raw(second)
    _, nick, text = alice.recv_chat()
    assert (nick, len(text), set(text)) == ("other", 100_000, {"B"})
    assert server.log.count("large message refused") == 1


# ---------------------------------------------------------------------------
# Out of file descriptors
# ---------------------------------------------------------------------------


def test_out_of_descriptors_refuses_with_a_reason_keeps_serving_and_recovers(start_server, connect):
    server = start_server(nofile=40)
    users, refused = [], []
    for i in range(60):
        peer = connect(server.port)
        try:
            peer.send_frame(f"u{i}")
            frames = [peer.recv_service()]
        except PeerClosed:
            frames = []
        if frames and frames[0].startswith("Welcome"):
            users.append(peer)
            assert not refused, "a connection got in after the server ran out of descriptors"
        else:
            # told why, or at worst refused outright; never left hanging
            assert frames in ([OUT_OF_RESOURCES], []), frames
            if frames:
                assert peer.recv_until_closed() == []
            refused.append(frames)
            peer.close()
    assert 10 <= len(users) < 40, len(users)
    assert len(refused) == 60 - len(users)
    assert refused.count([OUT_OF_RESOURCES]) >= 1, refused
    server.wait_for_log(r"accept failed: .*Too many open files; refusing new connections")
    # the registered users carry on
    users[0].send_chat("still serving", nick="u0")
    assert users[-1].recv_chat_skipping_notices()[1:] == ("u0", "still serving")
    # some leave; new ones get in again without help
    for peer in users[-3:]:
        peer.close()
    deadline = time.monotonic() + TIMEOUT
    while True:
        newcomer = connect(server.port)
        try:
            newcomer.send_frame("newcomer")
            if newcomer.recv_service().startswith("Welcome to selchat, newcomer!"):
                break
        except PeerClosed:
            pass
        newcomer.close()
        assert time.monotonic() < deadline, "the server never accepted again"
    newcomer.send_chat("back to normal", nick="newcomer")
    assert users[0].recv_chat_skipping_notices()[1:] == ("newcomer", "back to normal")
    for peer in [*users, newcomer]:
        peer.close()
    assert server.interrupt() == 0


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------


def test_tls_clients_chat(start_server, connect, cert, tls_context):
    server = start_server(*tls_args(cert))
    server.wait_for_log(r"listening on 127\.0\.0\.1:\d+ \(TLS\)")
    alice = connect(server.port, "alice", tls=tls_context)
    bob = connect(server.port, "bob", tls=tls_context, hostname="127.0.0.1")
    drain_notices(alice, "bob joined the chat (2 online)")
    bob.send_chat("over TLS", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "over TLS")
    big = "é" * 300_000  # a large frame through TLS records, both ways
    alice.send_chat(big, nick="alice")
    assert bob.recv_chat()[1:] == ("alice", big)
    bob.close()
    assert alice.recv_service() == "bob left the chat (1 online)"
    server.proc.send_signal(signal.SIGINT)
    assert alice.recv_until_closed() == [SHUTDOWN_NOTICE]
    alice.close()
    assert server.wait_exit() == 0


def test_tls_plain_and_silent_clients_stall_nobody(start_server, connect, cert, tls_context):
    server = start_server(*tls_args(cert), "--handshake-timeout", 1)
    alice = connect(server.port, "alice", tls=tls_context)
    bob = connect(server.port, "bob", tls=tls_context)
    drain_notices(alice, "bob joined the chat (2 online)")
    started = time.monotonic()
    silent = connect(server.port)  # connects, says nothing
    stalled = connect(server.port)  # half a ClientHello, then nothing
    stalled.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    tls_silent = connect(server.port, tls=tls_context)  # TLS, but no nickname
    plain = connect(server.port)  # the seed protocol, no TLS
    plain.send_frame("plainbob")
    assert plain.recv_until_closed() == [PLAIN_TO_TLS]
    server.wait_for_log(r"disconnected: plain TCP to a TLS server")
    # the chat is not stalled while they hang there
    rounds = 0
    while time.monotonic() - started < 0.8:
        sent = time.monotonic()
        alice.send_chat(f"ping {rounds}", nick="alice")
        # well under the 1 s a server waiting on one of them would take
        assert bob.recv_chat(timeout=0.9)[1:] == ("alice", f"ping {rounds}")
        bob.send_chat(f"pong {rounds}", nick="bob")
        assert alice.recv_chat(timeout=0.9)[1:] == ("bob", f"pong {rounds}")
        assert time.monotonic() - sent < 0.9
        rounds += 1
        time.sleep(0.05)  # a chat's pace, well under the rate limit
    assert rounds >= 3
    # and they are closed at the handshake timeout
    assert tls_silent.recv_until_closed() == ["No nickname received within 1 second"]
    for peer in (silent, stalled):
        frames = peer.recv_until_closed()  # nothing can be said in TLS before the handshake
        assert all(text.startswith("No nickname received") for text in frames), frames
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed <= 1 + 2 + 2, elapsed
    assert server.wait_for_count("disconnected: handshake timeout", 3) == 3, server.log
    bob.send_chat("after", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "after")


def test_tls_reader_cut_off_at_max_queue_gets_the_notice_and_the_server_survives(cert, tls_context):
    # Its own server, not the fixture's: when the bug bites, the server is busy
    # shutting down (and its traceback comes later), which is not this test's
    # teardown's business.
    server = ServerProcess(
        [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *map(str, tls_args(cert)),
            "--max-queue",
            "65536",
            "--rate",
            "0",
        ]
    )
    peers = []
    try:
        alice = Peer(server.port, tls=tls_context)
        peers.append(alice)
        alice.register("alice")
        slowpoke = Peer(server.port, tls=tls_context, rcvbuf=4096)
        peers.append(slowpoke)
        slowpoke.register("slowpoke")
        assert alice.recv_service() == "slowpoke joined the chat (2 online)"
        for i in range(200):  # 6 MB: far more than the kernel's buffers and --max-queue
            alice.send_chat(f"{i} " + "x" * 30_000, nick="alice")
        server.wait_for_log(
            r"slowpoke \(127\.0\.0\.1:\d+\) disconnected: output queue over --max-queue"
        )
        frames = slowpoke.recv_until_closed()  # it reads again, within the grace period
        assert alice.recv_service() == "slowpoke left the chat (1 online)"
        # the server is still serving (with the bug: "Server is shutting down. Goodbye!")
        bob = Peer(server.port, tls=tls_context)
        peers.append(bob)
        bob.send_frame("bob")
        assert bob.recv_service().startswith("Welcome to selchat, bob!")
        assert alice.recv_service() == "bob joined the chat (2 online)"
        assert server.alive() and "Traceback" not in server.log, server.log
        # and the reader was told why, after whole frames
        assert frames and frames[-1].startswith("Disconnected: you were not reading"), frames[-1][
            :60
        ]
    finally:
        for peer in peers:
            peer.close()
        server.stop()


def test_tls_failed_handshake_is_logged_and_harms_nobody(start_server, connect, cert, tls_context):
    server = start_server(*tls_args(cert))
    alice = connect(server.port, "alice", tls=tls_context)
    untrusting = ssl.create_default_context()  # the system store: does not know our cert
    with pytest.raises(ssl.SSLCertVerificationError):
        Peer(server.port, tls=untrusting)
    server.wait_for_log(r"disconnected: TLS handshake failed")
    for junk in (
        b"\x16\x03\x01\x00\x10" + b"\xff" * 16,  # a whole record of nonsense
        b"\x16\xee\xee\x00\x10" + b"\x00" * 16,
    ):  # no TLS version at all
        garbage = connect(server.port)
        garbage.send_raw(junk)  # starts like TLS, is not
        assert garbage.recv_until_closed() == []
    bob = connect(server.port, "bob", tls=tls_context)
    assert alice.recv_service() == "bob joined the chat (2 online)"
    bob.send_chat("fine", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "fine")


def test_tls_selchat_client_with_cafile_chats(
    start_server, connect, cert, tls_context, piped_client
):
    server = start_server(*tls_args(cert))
    alice = connect(server.port, "alice", tls=tls_context)
    carol = piped_client(
        "--host", "127.0.0.1", "--port", server.port, "--nick", "carol", "--cafile", cert[0]
    )
    carol.wait_for_output("Welcome to selchat, carol!")
    assert alice.recv_service() == "carol joined the chat (2 online)"
    # A message written now shows its time alone (the date too, only if the
    # day ends meanwhile); the client's zone is UTC (clean_env).
    written = datetime.now(UTC).replace(microsecond=0)
    alice.send_chat("hello carol", nick="alice", stamp=written.isoformat())
    carol.wait_for_output("] alice: hello carol\n")
    forms = shown_times(written, UTC, since=written)
    shown = bytes(carol.out).decode("utf-8")
    assert any(f"\n[{form}] alice: hello carol\n" in shown for form in forms), (forms, shown)
    carol.write("hello alice\n")
    assert alice.recv_chat()[1:] == ("carol", "hello alice")
    status, _out, err = carol.finish()
    assert (status, err) == (0, "")
    assert alice.recv_service() == "carol left the chat (1 online)"


def test_tls_selchat_client_without_cafile_fails_in_one_clear_line(
    start_server, cert, piped_client
):
    server = start_server(*tls_args(cert))
    dave = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "dave", "--tls")
    status, _out, err = dave.finish()
    assert status == 1
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"selchat: cannot connect to 127.0.0.1:{server.port}: "), err
    assert "certificate verify failed" in err and "Traceback" not in err, err


def test_tls_selchat_client_checks_the_host_name(start_server, make_cert, piped_client):
    other = make_cert("chat.example.org", "DNS:chat.example.org")
    server = start_server(*tls_args(other))
    eve = piped_client(
        "--host", "127.0.0.1", "--port", server.port, "--nick", "eve", "--cafile", other[0]
    )
    status, _out, err = eve.finish()
    assert status == 1 and err.count("\n") == 1, err
    assert "certificate verify failed" in err and "mismatch" in err.lower(), err


def test_plain_selchat_client_against_a_tls_server_is_told_why(start_server, cert, piped_client):
    server = start_server(*tls_args(cert))
    plain = piped_client("--port", server.port, "--nick", "plain")
    status, out, err = plain.finish()
    assert status == 1
    assert PLAIN_TO_TLS in out + err, (out, err)


def test_tls_selchat_client_against_a_plain_server_is_told_why(start_server, piped_client):
    server = start_server()
    dave = piped_client("--port", server.port, "--nick", "dave", "--tls")
    status, _out, err = dave.finish()
    assert status == 1
    assert err == (
        f"selchat: cannot connect to 127.0.0.1:{server.port}: "
        "the server does not speak TLS (connect without --tls)\n"
    ), err


# ---------------------------------------------------------------------------
# The password
# ---------------------------------------------------------------------------


def test_password_right_one_gets_in(start_server, connect):
    server = start_server("--password", "s3cret")
    alice = connect(server.port, "alice", password="s3cret")
    assert "s3cret" not in server.log  # never logged
    # nickname and password in one write are taken in order too
    bob = connect(server.port)
    bob.send_raw(frame("bob") + frame("s3cret"))
    assert bob.recv_service() == PASSWORD_REQUIRED
    assert bob.recv_service().startswith("Welcome to selchat, bob! 2 users online.")
    assert alice.recv_service() == "bob joined the chat (2 online)"
    bob.send_chat("in", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "in")


def test_password_wrong_ones_are_refused_before_seeing_or_sending_anything(start_server, connect):
    server = start_server("--password", "s3cret")
    alice = connect(server.port, "alice", password="s3cret")
    attempts = ["wrong", "s3cre", "s3cret ", "S3CRET", "", "s3cret\0", chat_payload("hi", "m")]
    for i, attempt in enumerate(attempts):
        mallory = connect(server.port)
        mallory.send_frame(f"mallory{i}")
        assert mallory.recv_service() == PASSWORD_REQUIRED
        alice.send_chat("not for mallory", nick="alice")  # while mallory is at the door
        mallory.send_frame(attempt)
        assert mallory.recv_until_closed() == ["Wrong password"], attempt
    assert server.wait_for_count("disconnected: wrong password", len(attempts)) == len(attempts)
    bob = connect(server.port, "bob", password="s3cret")
    # alice never heard of any mallory
    assert alice.recv_service() == "bob joined the chat (2 online)"
    bob.send_chat("hi", nick="bob")
    assert alice.recv_chat()[1:] == ("bob", "hi")


def test_password_comes_before_any_word_on_the_nickname(start_server, connect):
    # Without the password a peer learns nothing: not who is online, not even
    # whether its nickname would do.
    server = start_server("--password", "s3cret")
    connect(server.port, "alice", password="s3cret")
    for nick in ("ALICE", "two words", "x" * 40):
        mallory = connect(server.port)
        mallory.send_frame(nick)
        assert mallory.recv_service() == PASSWORD_REQUIRED, nick
        mallory.send_frame("wrong")
        assert mallory.recv_until_closed() == ["Wrong password"], nick
    # With the right one, the nickname is checked as ever.
    taken = connect(server.port)
    taken.send_frame("ALICE")
    assert taken.recv_service() == PASSWORD_REQUIRED
    taken.send_frame("s3cret")
    assert taken.recv_until_closed() == ['Nickname rejected: "ALICE" is already in use']


def test_password_from_the_environment_and_from_a_file(
    start_server, connect, piped_client, tmp_path
):
    by_env = start_server(env=clean_env(SELCHAT_PASSWORD="from env"))
    alice = connect(by_env.port)
    alice.send_frame("alice")
    assert alice.recv_service() == PASSWORD_REQUIRED
    alice.send_frame("from env")
    assert alice.recv_service().startswith("Welcome to selchat, alice!")
    # the client takes SELCHAT_PASSWORD too
    bob = piped_client(
        "--port", by_env.port, "--nick", "bob", env=clean_env(SELCHAT_PASSWORD="from env")
    )
    bob.write("hello via env\n")
    assert alice.recv_service() == "bob joined the chat (2 online)"
    assert alice.recv_chat()[1:] == ("bob", "hello via env")
    assert bob.finish()[:3:2] == (0, "")

    secret = tmp_path / "password.txt"
    secret.write_text("from a file\nsecond line is not part of it\n", encoding="utf-8")
    by_file = start_server("--password-file", secret)
    assert "from a file" not in " ".join(by_file.proc.args)  # out of ps
    connect(by_file.port, "carol", password="from a file")
    wrong = connect(by_file.port)
    wrong.send_raw(frame("dave") + frame("from a file\nsecond line is not part of it"))
    assert wrong.recv_until_closed() == [PASSWORD_REQUIRED, "Wrong password"]
    carol_client = piped_client(
        "--port", by_file.port, "--nick", "erin", "--password", "from a file"
    )
    carol_client.write("via --password\n")
    status, out, err = carol_client.finish()
    assert (status, err) == (0, ""), err
    assert "Welcome to selchat, erin!" in out


def test_password_selchat_client_wrong_or_missing_fails_in_one_line(start_server, piped_client):
    server = start_server("--password", "s3cret")
    wrong = piped_client("--port", server.port, "--nick", "wrong", "--password", "nope")
    status, _out, err = wrong.finish()
    assert status == 1 and err.count("\n") == 1, err
    assert "Wrong password" in err and "Traceback" not in err, err
    # pipe mode without a password: it cannot ask, so it says what to do
    missing = piped_client("--port", server.port, "--nick", "missing")
    status, _out, err = missing.finish()
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith(f"selchat: cannot connect to 127.0.0.1:{server.port}: "), err
    assert "password" in err and "Traceback" not in err, err


def test_no_password_anywhere_is_the_seed_protocol(start_server, connect, piped_client):
    server = start_server()
    alice = connect(server.port)
    alice.send_frame("alice")
    assert alice.recv_service().startswith("Welcome to selchat, alice!")  # not asked
    bob = piped_client("--port", server.port, "--nick", "bob")
    bob.write("plain old chat\n")
    assert alice.recv_service() == "bob joined the chat (2 online)"
    assert alice.recv_chat()[1:] == ("bob", "plain old chat")
    status, _out, err = bob.finish()
    assert (status, err) == (0, "")


@pytest.mark.parametrize("password", [None, "s3cret"], ids=["no-password", "password"])
def test_a_newcomers_first_message_comes_after_its_join_notice(start_server, connect, password):
    # Nickname (and password) and a first message in one write: the others must
    # hear that bob joined before they hear bob (the real client sends the
    # password and its first line without waiting in between).
    server = start_server(*(("--password", password) if password else ()))
    alice = connect(server.port, "alice", password=password)
    bob = connect(server.port)
    bob.send_raw(
        frame("bob")
        + (frame(password) if password else b"")
        + frame(chat_payload("first words", "bob"))
    )
    assert alice.recv_frame() == b"bob joined the chat (2 online)"
    assert alice.recv_chat()[1:] == ("bob", "first words")


@needs_pty
@pytest.mark.parametrize("slower_than_the_timeout", [False, True], ids=["prompt", "slow typist"])
def test_password_is_asked_on_a_terminal_without_echo(
    start_server, connect, slower_than_the_timeout
):
    timeout = ("--handshake-timeout", 1) if slower_than_the_timeout else ()
    server = start_server("--password", "typed secret", *timeout)
    alice = connect(server.port, "alice", password="typed secret")
    child = pexpect.spawn(
        sys.executable,
        [str(SCRIPT), "client", "--port", str(server.port), "--nick", "tty"],
        env=clean_env(NO_COLOR="1", TERM="xterm"),
        timeout=TIMEOUT,
    )
    try:
        child.expect("Password: ")
        if slower_than_the_timeout:
            # The person is still typing when the server gives up on that
            # connection: the client joins afresh with what was typed.
            server.wait_for_log("disconnected: handshake timeout")
        child.sendline("typed secret")
        child.expect("Welcome to selchat, tty!")
        assert b"typed secret" not in child.before
        assert alice.recv_service() == "tty joined the chat (2 online)"
        child.sendline("<quit<")
        child.expect(pexpect.EOF)
        child.wait()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


# ---------------------------------------------------------------------------
# Property-based fuzz: hostile peers while two honest users chat
# ---------------------------------------------------------------------------

HONEST_MESSAGES = 12
FUZZ_MAX_MESSAGE = 200_000
TEMPLATE = frame(chat_payload("a template chat message", "someone"))
FLOOD = frame(chat_payload("flood", "f"))

_bytes_pool = [
    b"\0",
    b"\0\0",
    b"a",
    b"/",
    b"/who",
    b"/help",
    b" ",
    b"\n",
    b"\xff",
    b"\xc3",
    b"\xe2\x80\xae",
    b"\xed\xa0\x80",
    "é".encode(),
    "\u0665".encode(),
    b"\x1b[2J",
    b"9",
]
payload_st = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(_bytes_pool), max_size=40).map(b"".join),  # random \0 placement
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(st.text(max_size=30), st.text(max_size=20), st.text(max_size=60)).map(
        lambda parts: "\0".join(parts).encode("utf-8", "surrogatepass")
    ),
)
header_st = st.one_of(
    st.binary(min_size=10, max_size=10),
    st.integers(0, 10**10 - 1).map(lambda n: str(n).encode().ljust(10)),  # huge lengths too
    st.integers(0, 10**10 - 1).map(lambda n: str(n).encode().rjust(10, b"0")),
    st.sampled_from(
        [
            b"-5        ",
            b"+5        ",
            b"1_0       ",
            b"5 5       ",
            b"          ",
            "\u0665".encode().ljust(10),
            b"0x10      ",
            b"\x005        ",
            b"5\t        "[:10],
        ]
    ),
)


@st.composite
def mutated_st(draw):
    """The template chat frame with a byte flipped, bytes inserted or a slice cut out."""
    data = bytearray(TEMPLATE)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "flip" and where < len(data):
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[where : where + draw(st.integers(1, 12))]
    return bytes(data)


@st.composite
def large_st(draw):
    """A large frame (the --max-pending path), sent whole or only in part."""
    size = draw(st.integers(64 * 1024, FUZZ_MAX_MESSAGE + 1000))
    sent = draw(st.integers(0, size))
    return str(size).encode().ljust(10) + b"L" * sent


piece_st = st.one_of(
    payload_st.map(frame),  # well framed, any payload
    payload_st.map(frame),
    st.integers(10, 300).map(lambda n: FLOOD * n),  # over --burst
    st.tuples(header_st, payload_st).map(lambda hp: hp[0] + hp[1]),  # a lying header
    mutated_st(),
    large_st(),
    st.binary(min_size=1, max_size=64),  # plain garbage
)
valid_nick_st = st.from_regex(r"\Ah[a-z0-9]{1,8}\Z").map(frame)  # gets past the door
nick_st = st.one_of(
    valid_nick_st,
    valid_nick_st,
    valid_nick_st,
    payload_st.map(frame),
    header_st,
    st.just(b""),
)


@st.composite
def hostile_st(draw):
    stream = draw(nick_st) + b"".join(draw(st.lists(piece_st, max_size=8)))
    cuts = sorted(set(draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=6))))
    pieces, last = [], 0
    for cut in [*cuts, len(stream)]:
        if cut > last:
            pieces.append(stream[last:cut])
            last = cut
    end = draw(st.sampled_from(["close", "reset", "half-close", "stay"]))
    return pieces, end


# Hostile peers connect from here, honest users from 127.0.0.1.
HOSTILE_ADDRESS = "127.0.0.2"


def run_hostile(port, pieces, end, sent_all, stop, errors):
    """One hostile peer: send the pieces, then end as told; sent_all is set once
    it has sent everything (or been cut off). It connects from an address of
    its own, as an attacker on the network does: the limits of one address
    (rates, joins, memory) are its own, not its neighbours'."""
    try:
        peer = Peer(port, source=HOSTILE_ADDRESS)
    except OSError as exc:  # refused? the server must keep accepting
        errors.append(f"hostile could not connect: {exc!r}")
        sent_all.set()
        return
    try:
        peer.sock.settimeout(3)
        for piece in pieces:
            peer.sock.sendall(piece)
        sent_all.set()
        if end == "half-close":
            peer.sock.shutdown(socket.SHUT_WR)
            peer.recv_until_closed(timeout=5)
        elif end == "stay":
            stop.wait(TIMEOUT)
    except (OSError, PeerClosed, TimeoutError):
        pass  # the server cut it off: fine
    finally:
        sent_all.set()
        if end == "reset":
            peer.reset()
        else:
            peer.close()


def test_fuzz_hostile_peers_never_cost_honest_users_a_message(start_server, connect):
    # Small limits, so that hostile peers trip them, but a queue no honest user
    # can fill; the history is on (its default), so that it is fuzzed too.
    limits = "--max-message 200000 --max-pending 150000 --max-queue 67108864"
    limits += " --rate 20 --burst 30 --handshake-timeout 2 --history 50"
    # Honest users, new ones for every example, all from 127.0.0.1, send far
    # more together than one address may: that limit has tests of its own.
    limits += " --address-rate 0"
    server = start_server(*limits.split())
    counter = itertools.count()

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(hostiles=st.lists(hostile_st(), min_size=1, max_size=4))
    # Every run covers these paths, whatever Hypothesis draws besides.
    @example(hostiles=[([frame("hflood"), FLOOD * 300], "stay")])  # --rate, flooding
    @example(
        hostiles=[([frame(f"hcrowd{i}"), frame(chat_payload("hi", "x"))], "stay") for i in range(4)]
    )  # a crowd that stays
    @example(
        hostiles=[
            ([frame("hbig"), b"180000    " + b"L" * 5000], "reset"),  # over --max-pending
            ([frame("hhalf"), b"100000    " + b"L" * 50000], "reset"),  # reset mid-frame
            ([frame("hhuge"), b"9999999999"], "stay"),
        ]
    )  # over --max-message
    @example(
        hostiles=[
            ([frame("hutf"), frame(b"T\0hutf\0\xff\xfe")], "close"),  # invalid UTF-8
            (
                [frame("hnul"), frame(b"\0\0\0"), frame(b"\0"), frame(b""), frame(b"/x\0")],
                "half-close",
            ),
            ([b"5         ", b"hc", b"ut", b"1" * 3, b"0         ", b"ab"], "reset"),
            ([b"-1        hello"], "stay"),
        ]
    )
    def run_example(hostiles):
        n = next(counter)
        ann, ben = f"ann·{n}", f"ben·{n}"
        a = connect(server.port, ann)
        b = connect(server.port, ben)
        stop, errors = threading.Event(), []
        sent_all = [threading.Event() for _ in hostiles]
        threads = [
            threading.Thread(
                target=run_hostile, daemon=True, args=(server.port, pieces, end, done, stop, errors)
            )
            for (pieces, end), done in zip(hostiles, sent_all)
        ]
        for thread in threads:
            thread.start()
        try:
            # Half while the hostile peers send, half once they have sent
            # everything (those that stay are still connected then).
            for i in range(HONEST_MESSAGES):
                if i == HONEST_MESSAGES // 2:
                    for done in sent_all:
                        assert done.wait(TIMEOUT), "a hostile peer could not send (server stuck?)"
                a.send_chat(f"{n} a{i}", nick=ann)
                b.send_chat(f"{n} b{i}", nick=ben)
                time.sleep(0.002)  # interleave with the hostile threads
            for me, other, prefix in ((a, ben, "b"), (b, ann, "a")):
                got = []
                while len(got) < HONEST_MESSAGES:
                    _, nick, text = me.recv_chat_skipping_notices()
                    if nick == other:
                        got.append(text)
                assert got == [f"{n} {prefix}{i}" for i in range(HONEST_MESSAGES)]
        finally:
            stop.set()
            for thread in threads:
                thread.join(TIMEOUT)
            a.close()
            b.close()
        assert not errors, errors
        assert server.alive(), server.log[-3000:]
        assert "Traceback" not in server.log, server.log
        probe = connect(server.port, f"probe·{n}")
        probe.send_frame("/help")  # answered, after whatever history it is replayed
        while not probe.recv_frame().startswith(b"Commands: "):
            pass
        probe.close()

    run_example()
    assert server.interrupt() == 0
    assert "Traceback" not in server.log


# ---------------------------------------------------------------------------
# The log never stops the server: stderr unread, or its terminal stopped
# ---------------------------------------------------------------------------


def _relays(port):
    """Whether a message from one new user reaches another: the server is not stuck."""
    a, b = Peer(port), Peer(port)
    try:
        a.register("ann")
        b.register("ben")
        a.send_chat("still here", nick="ann")
        return b.recv_chat_skipping_notices()[1:] == ("ann", "still here")
    finally:
        a.close()
        b.close()


def test_a_stderr_pipe_nobody_reads_never_stops_the_server_and_no_log_line_is_lost():
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "server", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=write_end,
        env=clean_env(),
    )
    os.close(write_end)
    chunks = []
    try:
        start = b""
        while b"listening on" not in start or not start.endswith(b"\n"):
            piece = os.read(read_end, 4096)
            assert piece, "the server exited at start"
            start += piece
        port = int(re.search(rb"listening on \S+:(\d+)", start).group(1))
        # From here on nobody reads the pipe. 800 users coming and going write
        # far more log than the pipe holds (64 KiB on Linux).
        users = 800
        for i in range(users):
            peer = Peer(port)
            peer.register(f"u{i}")
            peer.close()
        assert _relays(port)
        proc.send_signal(signal.SIGINT)
        reader = threading.Thread(
            target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b""))
        )
        reader.start()
        assert proc.wait(TIMEOUT) == 0
        reader.join(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    os.close(read_end)
    log = (start + b"".join(chunks)).decode()
    assert "Traceback" not in log
    assert sum(f" as u{i}\n" in log for i in range(users)) == users, log[-2000:]
    assert "joined as ben" in log and "dropped" not in log
    assert log.rstrip().endswith("stopped")


@pytest.mark.skipif(pexpect is None, reason="needs pexpect and a pty")
def test_a_terminal_stopped_with_ctrl_s_never_stops_the_server():
    child = pexpect.spawn(
        sys.executable, [str(SCRIPT), "server", "--port", "0"], env=clean_env(), timeout=TIMEOUT
    )
    try:
        child.expect(r"listening on \S+:(\d+)")
        port = int(child.match.group(1))
        child.sendcontrol("s")  # XOFF: the terminal takes no more output
        # Ctrl+S goes through the terminal's line discipline, which stops output
        # at once; the server's next log line is the first to meet it.
        assert _relays(port)
        child.sendcontrol("q")  # XON: what was held comes out, in order
        child.expect("joined as ann")
        child.expect("joined as ben")
        child.sendintr()
        child.expect("stopped")
        child.expect(pexpect.EOF)
        child.wait()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


def test_log_holds_what_stderr_cannot_take_and_counts_what_it_drops(monkeypatch, capsys):
    sys.path.insert(0, str(HERE))
    import selchat

    ready = False
    monkeypatch.setattr(selchat, "_stderr_ready", lambda timeout: ready)
    monkeypatch.setattr(selchat, "LOG_HELD", 100)
    for i in range(105):
        selchat.log(f"line {i}")
    selchat.flush_log()
    assert capsys.readouterr().err == ""  # nothing written, nothing blocked
    ready = True
    selchat.log("line 105")  # held behind the others, never ahead of them
    assert capsys.readouterr().err == ""
    selchat.flush_log()
    lines = capsys.readouterr().err.splitlines()
    assert "(6 log lines dropped: stderr took nothing for a while)" in lines[0]
    assert [line.split("selchat: ")[1] for line in lines[1:]] == [
        f"line {i}" for i in range(6, 106)
    ]
    assert not selchat._log_held


def _own_address():
    """This machine's own non-loopback IPv4 address, or None (nothing is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # picks the address a route would use
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.skipif(_own_address() is None, reason="needs a non-loopback IPv4 address")
def test_max_per_address_default_limits_a_non_loopback_address_to_256(start_server, connect):
    address = _own_address()
    server = start_server("--host", address)  # its own address: the peer is not loopback
    first = connect(server.port, "first", host=address)
    for _ in range(255):
        connect(server.port, host=address)
    over = connect(server.port, host=address)
    assert over.recv_until_closed() == [
        "Too many connections from your address (256); try again later"
    ]
    server.wait_for_log(r"refused %s:\d+: 256 connections from that address" % re.escape(address))
    first.close()
    server.wait_for_log(r"first .*disconnected")
    connect(server.port, "again", host=address)  # the slot is free again


# ---------------------------------------------------------------------------
# The loop's own bookkeeping, driven in-process over socket pairs
# ---------------------------------------------------------------------------


@pytest.fixture
def loop(capsys):
    """A ChatServer that is never started: its connections are socket pairs."""
    sys.path.insert(0, str(HERE))
    import selchat

    server = selchat.ChatServer(selchat.ServerConfig(host="127.0.0.1", port=0, max_clients=2))
    server._now = time.monotonic()
    peers = []

    def add():
        ours, theirs = socket.socketpair()
        peers.append(theirs)
        before = set(server.connections)
        server._add_connection(ours, ("127.0.0.1", 40000 + len(peers)))
        (conn,) = set(server.connections) - before or (None,)
        return conn, theirs

    server.add = add
    yield server
    for conn in list(server.connections):
        server._destroy(conn)
    server.selector.close()
    for sock in peers:
        sock.close()


def test_a_connection_reclaimed_for_a_newcomer_ignores_its_events_of_the_same_turn(loop):
    import selectors

    closing, _ = loop.add()
    loop.add()
    loop._close_when_done(closing, "Disconnected: bye")
    # Its notice is stuck (as with a peer that does not read): it waits for
    # EVENT_WRITE, which the same select() may report with the newcomer.
    closing.writing = True
    loop.selector.modify(
        closing.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, closing.handler
    )
    newcomer, _ = loop.add()
    assert newcomer is not None and closing not in loop.connections
    closing.handler(selectors.EVENT_READ | selectors.EVENT_WRITE)  # must not touch its socket
    loop._end_of_turn()
    assert newcomer in loop.connections and closing not in loop.connections
    assert len(loop.connections) == 2


def test_a_connection_lost_in_the_turn_it_overflowed_is_not_revived(loop):
    conn, _ = loop.add()
    loop._overflowed.append(conn)  # its queue went over --max-queue in a broadcast
    loop._destroy(conn)  # and then its own read failed, in the same turn
    loop._end_of_turn()
    assert conn not in loop._waiting and conn not in loop._closing
    other, _ = loop.add()
    assert other is not None and len(loop.connections) == 1
