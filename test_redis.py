"""Tests for a room shared by several selchat servers through Redis (issue 7).

Every test runs real `selchat.py server --redis` processes against a real
redis-server on loopback: the one in SELCHAT_TEST_REDIS, or (when the
redis-server binary is installed) one this module starts on a free port. The
servers are driven over real sockets by raw peers that speak the wire protocol
themselves (selchat_testkit.py; the fixtures are in conftest.py, this file's
start_server over the shared one). Every test uses a room of its own; every
wait has a deadline.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from selchat_testkit import (
    HERE,
    TIMEOUT,
    Peer,
    PeerClosed,
    chat_payload,
    first_answer,
    frame,
    free_port,
    history_begin,
    run_server_briefly,
    wait_service,
)

REDIS_SERVER = shutil.which("redis-server")
DEGRADED = "The shared room is degraded"
BACK = "The shared room is back"

pytestmark = pytest.mark.skipif(
    not REDIS_SERVER and not os.environ.get("SELCHAT_TEST_REDIS"),
    reason="needs a Redis: install redis-server or set SELCHAT_TEST_REDIS=redis://HOST:PORT/0",
)
needs_redis_binary = pytest.mark.skipif(
    not REDIS_SERVER, reason="needs the redis-server binary to stop and start a Redis"
)

try:
    import redis
except ImportError:  # pragma: no cover - in requirements-dev.txt
    redis = None
    pytestmark = pytest.mark.skip(reason="needs the redis package (requirements-dev.txt)")


class RedisProcess:
    """redis-server on loopback, in the foreground of a child process, saving nothing."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.url = "redis://127.0.0.1:%d/0" % self.port
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)


@pytest.fixture(scope="session")
def redis_url():
    """The Redis in SELCHAT_TEST_REDIS (as .ci/run gives), else one of our own."""
    if os.environ.get("SELCHAT_TEST_REDIS"):
        yield os.environ["SELCHAT_TEST_REDIS"]
    else:
        server = RedisProcess()
        yield server.url
        server.kill()


def forget_room(url, room):
    """Delete what a test's room left in a shared Redis (its history, mostly)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        keys = list(client.scan_iter("selchat:%s:*" % room))
        if keys:
            client.delete(*keys)
    except redis.RedisError:  # a Redis the test stopped on purpose
        pass


@pytest.fixture
def room():
    return "test-%s" % uuid.uuid4().hex[:12]


@pytest.fixture
def start_server(start_server, room):
    """Factory: the shared one's server, with `--redis URL --room ROOM`; the
    room's keys are deleted once its servers have stopped."""
    servers = []

    def start(url, *args):
        server = start_server("--redis", url, "--room", room, *args)
        server.redis_url = url
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    for url in {server.redis_url for server in servers}:
        forget_room(url, room)


def next_chat(user, timeout=TIMEOUT):
    """The next chat message for user, skipping service messages (notices)."""
    return user.recv_chat_skipping_notices(timeout)


def until(check, timeout=TIMEOUT, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


def who(user):
    user.send_frame("/who")
    return wait_service(user, r"online: ")[0]


# ---------------------------------------------------------------------------
# One room on several servers
# ---------------------------------------------------------------------------


def test_messages_cross_every_server_in_each_senders_order(redis_url, start_server, join):
    servers = [start_server(redis_url) for _ in range(3)]
    alice = join(servers[0], "alice")
    bob = join(servers[1], "bob")
    carol = join(servers[2], "carol")
    wait_service(alice, r"^carol joined the chat \(3 online\)")
    for number in range(30):
        alice.send_chat("from alice %d" % number, nick="alice")
        carol.send_chat("from carol %d" % number, nick="carol")
    for reader, senders in ((bob, ("alice", "carol")), (alice, ("carol",)), (carol, ("alice",))):
        got = {sender: [] for sender in senders}
        while sum(map(len, got.values())) < 30 * len(senders):
            _, nick, text = next_chat(reader)
            got[nick].append(text)
        for sender in senders:
            assert got[sender] == ["from %s %d" % (sender, n) for n in range(30)]
    # Nobody gets their own messages back, on their server or through Redis.
    bob.send_chat("marker", nick="bob")
    assert next_chat(alice)[1:] == ("bob", "marker")
    assert next_chat(carol)[1:] == ("bob", "marker")


def test_join_leave_and_rename_notices_reach_every_server(redis_url, start_server, join):
    first, second = start_server(redis_url), start_server(redis_url)
    alice = join(first, "alice")
    bob = join(second, "bob")
    assert wait_service(alice, r"joined")[0] == "bob joined the chat (2 online)"
    bob.send_frame("/nick robert")
    assert bob.recv_service() == "You are now known as robert"
    assert wait_service(alice, r"known as")[0] == "bob is now known as robert"
    bob.close()
    assert wait_service(alice, r"left")[0] == "robert left the chat (1 online)"


def test_a_nickname_is_unique_across_servers(redis_url, start_server, join):
    first, second = start_server(redis_url), start_server(redis_url)
    alice = join(first, "alice")
    clash = Peer(second.port)
    clash.send_frame("ALICE")
    assert clash.recv_service() == 'Nickname rejected: "ALICE" is already in use'
    with pytest.raises(PeerClosed):
        clash.recv_frame()
    clash.close()
    bob = join(second, "bob")
    bob.send_frame("/nick Alice")
    assert bob.recv_service() == 'Nickname not changed: "Alice" is already in use'
    # Once alice leaves, her nickname is free on every server at once.
    alice.close()
    wait_service(bob, r"^alice left")
    again = join(second, "alice")
    bob.send_chat("hi", nick="bob")
    assert next_chat(again)[1:] == ("bob", "hi")


def test_who_lists_everyone_with_their_server(redis_url, start_server, join):
    first, second = start_server(redis_url), start_server(redis_url)
    alice = join(first, "alice")
    join(second, "bob")
    join(second, "carol")
    host = socket.gethostname()
    answer = who(alice)
    assert answer.startswith("3 users online: "), answer
    pattern = r"alice \(on %s:%d, joined \d+ s ago\)" % (re.escape(host), first.port)
    assert re.search(pattern, answer), answer
    assert "bob (on %s:%d, joined" % (host, second.port) in answer
    assert "carol (on %s:%d, joined" % (host, second.port) in answer


def test_private_messages_reach_a_user_on_another_server(redis_url, start_server, join):
    first, second = start_server(redis_url), start_server(redis_url)
    alice = join(first, "alice")
    bob = join(second, "bob")
    carol = join(second, "carol")
    alice.send_frame("/msg BOB psst")
    _stamp, field, text = next_chat(bob)
    assert (field, text) == ("[private] alice -> bob", "psst")
    assert next_chat(alice)[1:] == ("[private] alice -> bob", "psst")
    alice.send_frame("/msg nobody hello")
    assert wait_service(alice, r"^Not sent")[0].startswith("Not sent: nobody called nobody")
    # carol saw none of it.
    bob.send_chat("public", nick="bob")
    assert next_chat(carol)[1:] == ("bob", "public")


def test_history_comes_from_redis_after_every_server_restarts(redis_url, start_server, join):
    first, second = start_server(redis_url), start_server(redis_url)
    alice = join(first, "alice")
    bob = join(second, "bob")
    for number in range(3):
        alice.send_chat("early %d" % number, nick="alice")
    for number in range(3):
        assert next_chat(bob)[1:] == ("alice", "early %d" % number)
    bob.send_frame("/me waves")
    assert next_chat(bob)[1:] == ("* bob", "waves")
    assert next_chat(alice)[1:] == ("* bob", "waves")
    alice.close()
    bob.close()
    first.stop()
    second.stop()
    third = start_server(redis_url)
    late = Peer(third.port)
    late.send_frame("late")
    assert late.recv_service().startswith("Welcome to selchat, late!")
    assert late.recv_service() == history_begin(4)
    got = [tuple(late.recv_frame().decode().split("\0")[1:]) for _ in range(4)]
    assert got == [("alice", "early %d" % n) for n in range(3)] + [("* bob", "waves")]
    assert late.recv_service() == "--- end of earlier messages ---"
    late.close()


def test_what_a_client_sends_with_its_nickname_waits_for_the_claim(redis_url, start_server, join):
    first, second = start_server(redis_url), start_server(redis_url)
    bob = join(second, "bob")
    eager = Peer(first.port)
    eager.sock.sendall(
        frame("eager")
        + b"".join(frame(chat_payload("line %d" % n, "eager")) for n in range(5))
        + frame("/who")
    )
    assert eager.recv_service().startswith("Welcome to selchat, eager!")
    assert wait_service(eager, r"online: ")[0].startswith("2 users online: bob (on ")
    assert [next_chat(bob)[1:] for _ in range(5)] == [("eager", "line %d" % n) for n in range(5)]
    eager.close()


def test_a_large_message_sent_with_the_nickname_waits_for_the_claim(redis_url, start_server, join):
    first, second = start_server(redis_url), start_server(redis_url)
    bob = join(second, "bob")
    text = "y" * 900_000
    eager = Peer(first.port)
    eager.sock.sendall(frame("eager") + frame(chat_payload(text, "eager")))
    assert eager.recv_service().startswith("Welcome to selchat, eager!")
    assert next_chat(bob)[1:] == ("eager", text)
    eager.close()


def test_a_password_and_a_shared_room_go_together(redis_url, start_server, join):
    first = start_server(redis_url, "--password", "sesame")
    second = start_server(redis_url, "--password", "sesame")
    bob = Peer(second.port)
    bob.sock.sendall(frame("bob") + frame("sesame"))
    assert bob.recv_service() == "Password required"
    assert bob.recv_service().startswith("Welcome to selchat, bob!")
    eager = Peer(first.port)
    eager.send_frame("eager")
    assert eager.recv_service() == "Password required"
    eager.sock.sendall(frame("sesame") + frame(chat_payload("hi all", "eager")))
    assert eager.recv_service().startswith("Welcome to selchat, eager!")
    assert next_chat(bob)[1:] == ("eager", "hi all")
    late = Peer(second.port)
    late.send_frame("EAGER")
    assert late.recv_service() == "Password required"
    late.send_frame("sesame")
    assert late.recv_service() == 'Nickname rejected: "EAGER" is already in use'
    for peer in (late, eager, bob):
        peer.close()


def test_a_server_that_stops_says_goodbye_for_its_users(redis_url, start_server, join):
    first, second = start_server(redis_url), start_server(redis_url)
    join(first, "alice")
    bob = join(second, "bob")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=TIMEOUT) == 0
    assert wait_service(bob, r"left")[0] == "alice left the chat (1 online)"
    assert who(bob).startswith("1 user online: bob")
    join(second, "alice")


def test_a_plain_server_does_not_import_redis():
    code = (
        "import sys, selchat; server = selchat.ChatServer(selchat.ServerConfig("
        "host='127.0.0.1', port=0)); server.listen(); "
        "assert 'redis' not in sys.modules, 'redis imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=str(HERE), capture_output=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------
# When Redis or a server goes away
# ---------------------------------------------------------------------------


@needs_redis_binary
def test_redis_restarted_mid_conversation(start_server, join):
    own = RedisProcess()
    try:
        first, second = start_server(own.url), start_server(own.url)
        alice = join(first, "alice")
        carol = join(first, "carol")
        bob = join(second, "bob")
        wait_service(alice, r"^bob joined")
        alice.send_chat("before", nick="alice")
        assert next_chat(bob)[1:] == ("alice", "before")
        own.kill()
        for user in (alice, bob, carol):
            wait_service(user, DEGRADED)
        # The local room keeps working, and a newcomer is told how things are.
        alice.send_chat("while down", nick="alice")
        assert next_chat(carol)[1:] == ("alice", "while down")
        dave = join(second, "dave")
        wait_service(dave, DEGRADED)
        # /who and /msg know only this server's users meanwhile; /nick still works.
        dave.send_frame("/who")
        assert wait_service(dave, r"online: ")[0].startswith("2 users online: bob (joined")
        assert dave.recv_service().startswith("(The shared room is degraded")
        dave.send_frame("/msg alice hello")
        assert wait_service(dave, r"^Not sent")[0].startswith("Not sent: nobody called alice")
        dave.send_frame("/nick david")
        assert dave.recv_service() == "You are now known as david"
        dave.nick = "david"
        own.start()
        for user in (alice, bob, carol, dave):
            _, before = wait_service(user, BACK, timeout=20)
            assert not [p for p in before if DEGRADED.encode() in p], "degraded told twice"
        alice.send_chat("after", nick="alice")
        bob.send_chat("bob after", nick="bob")
        assert next_chat(bob)[1:] == ("alice", "after")
        assert next_chat(alice)[1:] == ("bob", "bob after")
        assert next_chat(carol)[1:] == ("alice", "after")
        assert next_chat(carol)[1:] == ("bob", "bob after")
        # Nothing came twice: each one's next message is a fresh marker.
        bob.send_chat("end", nick="bob")
        for user in (alice, carol):
            assert next_chat(user)[1:] == ("bob", "end")
        alice.send_chat("end", nick="alice")
        assert next_chat(bob)[1:] == ("alice", "end")
        # /who works again across servers, with the nicknames claimed again.
        until(lambda: "4 users online" in who(bob), timeout=TIMEOUT)
    finally:
        own.kill()


def test_users_of_a_killed_server_vanish_within_the_ttl(redis_url, start_server, join):
    first = start_server(redis_url, "--redis-ttl", "1.5")
    second = start_server(redis_url, "--redis-ttl", "1.5")
    third = start_server(redis_url, "--redis-ttl", "1.5")
    join(first, "alice")
    bob = join(second, "bob")
    carol = join(third, "carol")
    # alice's notice can cross Redis after bob joined (a known race of the
    # shared room, left for later): skip it.
    assert wait_service(bob, r"^carol joined")[0] == "carol joined the chat (3 online)"
    killed_at = time.monotonic()
    first.proc.send_signal(signal.SIGKILL)
    # The first heartbeat after alice's claim ran out takes her out of the room
    # and tells every server's users, once.
    for user in (bob, carol):
        # Before it, at most the join notices still crossing Redis from the start.
        notice = user.recv_service(timeout=5)
        while " joined the chat (" in notice:
            notice = user.recv_service(timeout=5)
        assert notice == "alice left the chat (2 online)"
    for user in (bob, carol):  # the next frame is the answer: no second notice
        user.send_frame("/who")
        assert user.recv_service().startswith("2 users online: ")
    taken = Peer(second.port)
    taken.send_frame("alice")
    assert taken.recv_service().startswith("Welcome to selchat, alice!")
    assert time.monotonic() - killed_at < 5
    taken.close()


def test_users_of_a_server_that_was_stopped_past_the_ttl_are_announced_back(
    redis_url, start_server, join
):
    first = start_server(redis_url, "--redis-ttl", "1.5")
    second = start_server(redis_url, "--redis-ttl", "1.5")
    alice = join(first, "alice")
    bob = join(second, "bob")
    assert alice.recv_service() == "bob joined the chat (2 online)"
    first.proc.send_signal(signal.SIGSTOP)  # a server that hangs, not one that dies
    try:
        assert bob.recv_service(timeout=5) == "alice left the chat (1 online)"
    finally:
        first.proc.send_signal(signal.SIGCONT)
    # Its next heartbeat claims alice again, and the room is told she is here.
    assert bob.recv_service(timeout=5) == "alice joined the chat (2 online)"
    # alice hears the same story, and bob's words as before.
    bob.send_chat("welcome back", nick="bob")
    heard = []
    while True:
        payload = alice.recv_frame()
        if b"\0" in payload:
            break
        heard.append(payload.decode())
    assert sorted(heard) == ["alice joined the chat (2 online)", "alice left the chat (1 online)"]
    assert payload.decode().split("\0")[1:] == ["bob", "welcome back"]
    assert who(bob).startswith("2 users online: ")


@pytest.mark.parametrize(
    "url, reason",
    [
        ("redis://127.0.0.1:%d/0" % free_port(), "refused"),
        ("http://127.0.0.1:6379/0", "redis://"),
    ],
)
def test_an_unusable_redis_url_is_one_line_and_status_1(url, reason):
    result = run_server_briefly("--redis", url, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot use Redis at %s" % url in lines[0]
    assert reason in lines[0].lower() or reason in lines[0]
    assert "listening" not in result.stderr


def test_what_comes_from_redis_is_checked_before_it_reaches_the_loop():
    import selchat

    link = selchat.RedisLink("redis://127.0.0.1:1/0", "unit")
    other = b"0123456789abcdef"
    good = frame("a notice")
    try:
        for data in (
            b"N" + link.instance + good,  # our own, back from Redis
            b"N" + other,  # nothing in it
            b"X" + other + good,  # an unknown kind
            b"N" + other + good[:-1],  # a frame cut short
            b"N" + other + b"abc",  # not frames at all
            b"C" + other + b"-1        x",  # a bad header
            b"P" + other + good,  # a private message without its addressee
        ):
            link._receive(data)
        assert not link.inbox
        for data in (b"N" + other + good, b"P" + other + b"bob\0" + good):
            link._receive(data)
        assert [kind for kind, _ in link.inbox] == ["message", "message"]
    finally:
        for sock in link.wakeup:
            sock.close()
    assert selchat.split_frames(good + good, 0) == [0, len(good), 2 * len(good)]
    assert selchat.split_frames(good + b"12", 0) is None


# ---------------------------------------------------------------------------
# What one server publishes is bounded (issue 12)
# ---------------------------------------------------------------------------


def test_a_burst_of_large_messages_never_cuts_the_room_off_redis(redis_url, start_server, join):
    # With no per-user rate (--rate 0 turns the byte rate off too), one user
    # sends 120 messages of 1 MB at once: more than Redis holds for a pub/sub
    # subscriber (32 MB) before it cuts the subscriber off, which would cut
    # every server off the room. --redis-rate refuses what is over it with a
    # notice to the sender; the room stays shared and honest messages cross.
    first = start_server(redis_url, "--rate", "0")
    second = start_server(redis_url, "--rate", "0")
    alice = join(first, "alice")
    mallory = join(first, "mallory")
    bob = join(second, "bob")
    wait_service(alice, r"^bob joined the chat \(3 online\)")
    size = (1 << 20) - 100  # a payload of about 1 MB, within --max-message
    big = frame(chat_payload("M" * size, "mallory"))
    mallory.send_raw(big * 120)
    busy, _ = wait_service(mallory, r"^Not sent: the shared room is busy")
    assert busy == "Not sent: the shared room is busy; try again in a moment"
    for number in range(100):
        alice.send_chat("honest %d" % number, nick="alice")
    got = []
    while len(got) < 100:
        payload = bob.recv_frame()
        assert DEGRADED.encode() not in payload
        if b"\0" in payload:
            _, nick, text = payload.decode("utf-8").split("\0")
            if nick == "alice":
                got.append(text)
            else:
                assert (nick, len(text)) == ("mallory", size)
    assert got == ["honest %d" % n for n in range(100)]
    assert " lost (" not in first.log + second.log  # the room was never degraded
    # And a message over what may be published at once is refused, not sent.
    huge = start_server(redis_url, "--rate", "0", "--max-message", str(16 << 20))
    carol = join(huge, "carol")
    carol.send_raw(frame(chat_payload("H" * (12 << 20), "carol")))
    assert wait_service(carol, r"^Not sent: too big to share")[0] == (
        "Not sent: too big to share with the room's other servers (at most %d bytes at once)"
        % (8 << 20)
    )
    carol.send_chat("small", nick="carol")
    assert next_chat(bob)[1:] == ("carol", "small")


# ---------------------------------------------------------------------------
# Running the room (issue 15): topic, kicks, bans and operators reach every server
# ---------------------------------------------------------------------------

OPS = "open sesame"


def test_the_topic_reaches_every_server_and_servers_started_later(
    redis_url, start_server, join, connect
):
    first = start_server(redis_url, "--ops-password", OPS)
    second = start_server(redis_url)
    alice = join(first, "alice")
    bob = join(second, "bob")
    wait_service(alice, r"^bob joined")
    alice.send_frame("/op " + OPS)
    wait_service(alice, r"^You are an operator now")
    alice.send_frame("/topic shared topic ✓")
    wait_service(bob, r"^alice set the topic: shared topic ✓$")
    bob.send_frame("/topic")
    assert wait_service(bob, r"^Topic: ")[0].startswith("Topic: shared topic ✓ (set by alice, ")
    assert connect(second.port).register("carol").endswith("Topic: shared topic ✓")
    third = start_server(redis_url)
    assert connect(third.port).register("dave").endswith("Topic: shared topic ✓")


def test_kicks_and_bans_reach_the_server_that_has_the_user(redis_url, start_server, join, connect):
    first = start_server(redis_url, "--ops-password", OPS)
    second = start_server(redis_url)
    alice = join(first, "alice")
    mallory = connect(second.port, "mallory", source="127.0.0.2")
    trudy = connect(second.port, "trudy", source="127.0.0.3")
    wait_service(alice, r"^trudy joined")
    alice.send_frame("/op " + OPS)
    wait_service(alice, r"^You are an operator now")
    # /who on the other server marks the operator, once the word has crossed Redis.
    listing = until(lambda: re.search(r"alice \(operator, on [^,]+, joined ", who(trudy)))
    assert re.search(r"mallory \(on [^,]+, joined ", listing.string), listing.string

    alice.send_frame("/kick trudy off topic")
    assert trudy.recv_until_closed()[-1] == "You were kicked out by alice: off topic"
    wait_service(alice, r"^trudy was kicked out by alice: off topic$")
    alice.send_frame("/kick nobody")
    assert wait_service(alice, r"^Nobody")[0].startswith("Nobody called nobody is online")

    alice.send_frame("/ban mallory 1h spam")
    assert wait_service(alice, r"^Banned")[0] == "Banned the address of mallory (on another server)"
    told = mallory.recv_until_closed()[-1]
    assert re.fullmatch(r"You are banned from this server until .* UTC \(by alice\): spam", told)
    wait_service(alice, r"^mallory was banned by alice: spam$")
    for server in (first, second, start_server(redis_url)):  # and one started after it
        peer = Peer(server.port, source="127.0.0.2")
        assert peer.recv_until_closed() == [told], server.port
        peer.close()
    alice.send_frame("/bans")
    assert re.fullmatch(
        r"1 ban: 127\.0\.0\.2 \(mallory, by alice, until .*: spam\)",
        wait_service(alice, r"ban")[0],
    )
    alice.send_frame("/unban 127.0.0.2")
    assert wait_service(alice, r"^Unbanned")[0] == "Unbanned 127.0.0.2"
    deadline = time.monotonic() + TIMEOUT
    while True:  # the unban reaches the other server through Redis
        first_frame = first_answer(second.port, "mallory", "127.0.0.2")
        if first_frame.startswith("Welcome"):
            break
        assert time.monotonic() < deadline, first_frame
        time.sleep(0.05)
