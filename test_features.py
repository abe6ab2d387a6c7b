"""Tests for what selchat offers beyond the seed (issue 5), read as its specification.

Commands (/help, /who, /msg, /nick, /me), history for late joiners, a client
that highlights mentions, rings, recalls lines and reconnects, IPv6 and host
names, and the `selchat` command that `pip install .` makes.

Servers run as real processes driven over real sockets by raw peers that speak
the wire protocol themselves (so they are also "seed clients": they know only
the nickname frame and `time\\0nick\\0text`); the client runs in a real
pseudo-terminal (pexpect) or with pipes. Every wait is on an event with a
deadline; every process a test starts is stopped by a fixture. The shared
helpers are in selchat_testkit.py, the shared fixtures in conftest.py.
"""

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

import selchat
from selchat_testkit import (
    HERE,
    HISTORY_END,
    SCRIPT,
    SHOWN_NOW,
    TIMEOUT,
    UTC,
    Peer,
    chat_payload,
    clean_env,
    frame,
    free_port,
    history_begin,
    needs_pty,
    pty_output,
    wait_pty_exit,
)


def _dual_stack():
    if not socket.has_ipv6 or not socket.has_dualstack_ipv6():
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _dual_stack(), reason="needs IPv6 with dual-stack sockets")

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


# ---------------------------------------------------------------------------
# Helpers of this file: the pty client's join, a proxy that cuts connections
# ---------------------------------------------------------------------------


def joined(child, nick="alice"):
    child.expect_exact(f"Welcome to selchat, {nick}!".encode())
    child.expect_exact(b"> ")


class CuttingProxy:
    """A TCP forwarder in front of a server, whose connections a test can cut.

    Cutting closes both sides, as a network failure that the server notices would:
    the client sees its connection end without the shutdown notice.
    """

    def __init__(self, target_port):
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        self.accepted = 0
        self.changed = threading.Condition()
        self.gate = threading.Event()  # cleared: new connections wait before going through
        self.gate.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.changed:
                self.sockets.append(client)
                self.accepted += 1
                self.changed.notify_all()
            self.gate.wait()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=TIMEOUT)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.changed:
                self.sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:
            pass

    def stop_listening(self):
        """From now on connections to the proxy's port are refused."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()

    def wait_for_connections(self, count):
        deadline = time.monotonic() + TIMEOUT
        with self.changed:
            while self.accepted < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"only {self.accepted} connections through the proxy"
                self.changed.wait(remaining)

    def cut(self):
        with self.changed:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        self.gate.set()
        self.stop_listening()
        self.cut()


@pytest.fixture
def proxy():
    proxies = []

    def start(port):
        proxies.append(CuttingProxy(port))
        return proxies[-1]

    yield start
    for each in proxies:
        each.close()


# ---------------------------------------------------------------------------
# Unit: the helpers behind the features
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, reading",
    [
        ("alice", ("chat", "alice", "")),
        ("* alice", ("action", "alice", "")),
        ("[private] alice -> bob", ("private", "alice", "bob")),
        ("*", ("chat", "*", "")),
        ("* two words", ("chat", "* two words", "")),
        ("[private] alice bob", ("chat", "[private] alice bob", "")),
    ],
)
def test_read_nick_field_tells_chat_actions_and_private_messages_apart(field, reading):
    assert selchat.read_nick_field(field) == reading


@pytest.mark.parametrize(
    "text, spans",
    [
        ("hi alice", [(3, 8)]),
        ("ALICE: look", [(0, 5)]),
        ("@alice, alice!", [(1, 6), (8, 13)]),
        ("malice aforethought", []),
        ("alice_smith is here", []),
        ("alice2", []),
    ],
)
def test_find_mentions_finds_the_nick_as_a_word_in_any_case(text, spans):
    assert selchat.find_mentions(text, "alice") == spans


def test_find_mentions_handles_nicks_with_punctuation():
    assert selchat.find_mentions("ping *bob* and [x]", "*bob*") == [(5, 10)]
    assert selchat.find_mentions("ping [x]!", "[x]") == [(5, 8)]


@pytest.mark.parametrize(
    "seconds, shown",
    [
        (0, "0 s"),
        (59.9, "59 s"),
        (60, "1 min"),
        (3599, "59 min"),
        (3600, "1 h 0 min"),
        (3 * 3600 + 5 * 60, "3 h 5 min"),
        (86400 + 3600, "1 d 1 h"),
    ],
)
def test_duration_is_short_and_rounded_down(seconds, shown):
    assert selchat.duration(seconds) == shown


# ---------------------------------------------------------------------------
# Commands, over real sockets
# ---------------------------------------------------------------------------


def test_help_lists_every_command_and_how_to_send_a_leading_slash(server, join):
    alice = join(server.port, "alice")
    alice.send_frame("/help")
    text = alice.recv_service()
    for command in ("/help", "/who", "/msg NICK TEXT", "/nick NEW", "/me ACTION", "//", "<quit<"):
        assert command in text, text


def test_who_lists_everyone_online_with_how_long_ago_they_joined(server, join):
    alice = join(server.port, "alice")
    join(server.port, "Bob")
    assert alice.recv_service() == "Bob joined the chat (2 online)"
    alice.send_frame("/who")
    text = alice.recv_service()
    assert re.fullmatch(
        r"2 users online: alice \(joined \d+ s ago\), Bob \(joined \d+ s ago\)", text
    ), text


def test_msg_reaches_only_its_receiver_and_comes_back_to_the_sender_marked_private(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    carol = join(server.port, "carol")
    alice.recv_service(), alice.recv_service(), bob.recv_service()
    before = datetime.now(UTC).replace(microsecond=0)
    alice.send_frame("/msg bob meet me  at noon ")
    for peer in (bob, alice):
        stamp, field, text = peer.recv_chat()
        assert (field, text) == ("[private] alice -> bob", "meet me  at noon ")
        assert STAMP.fullmatch(stamp) and datetime.fromisoformat(stamp) >= before, stamp
    carol.sync(bob)  # carol's next frame is bob's public message, not the private one
    alice.recv_chat()


def test_msg_finds_the_receiver_whatever_the_case_of_the_nick(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "Bob")
    alice.recv_service()
    alice.send_frame("/msg BOB hi")
    assert bob.recv_chat()[1:] == ("[private] alice -> Bob", "hi")


def test_msg_to_oneself_arrives_once(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_frame("/msg alice note to self")
    assert alice.recv_chat()[1:] == ("[private] alice -> alice", "note to self")
    alice.sync(bob)


def test_msg_to_an_unknown_nick_is_a_clear_error_and_reaches_nobody(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_frame("/msg carol are you there")
    assert alice.recv_service() == "Not sent: nobody called carol is online (/who lists who is)"
    bob.sync(alice)


@pytest.mark.parametrize("line", ["/msg", "/msg bob", "/msg bob   "])
def test_msg_without_text_says_how_to_use_it(server, join, line):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_frame(line)
    assert alice.recv_service() == "Not sent: type /msg NICK TEXT"
    bob.sync(alice)


def test_nick_renames_tells_everyone_and_stamps_later_messages_with_the_new_name(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_frame("/nick alicia")
    assert alice.recv_service() == "You are now known as alicia"
    assert bob.recv_service() == "alice is now known as alicia"
    alice.send_chat("still me", nick="alicia")
    assert bob.recv_chat()[1:] == ("alicia", "still me")
    alice.send_chat("old name in the field", nick="alice")
    assert bob.recv_chat()[1:] == ("alicia", "old name in the field")
    bob.send_frame("/msg alicia hello")
    assert alice.recv_chat()[1:] == ("[private] bob -> alicia", "hello")
    assert server.wait_for_log(r"alice \(127\.0\.0\.1:\d+\) is now known as alicia")


@pytest.mark.parametrize("split", ["one send", "byte by byte"])
def test_messages_after_a_nick_in_the_same_read_carry_the_new_name(server, join, split):
    # A paste or a script: /nick and the next messages arrive together, the
    # messages still carrying the old name in their field (the client has not
    # yet heard of the rename). Whatever the reads, the server stamps the name
    # registered when each message is handled: the new one, and so does history.
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    data = (
        frame("/nick alicia")
        + frame(chat_payload("first after", nick="alice"))
        + frame(chat_payload("second after", nick="alice"))
        + frame(chat_payload("third, new field", nick="alicia"))
    )
    if split == "one send":
        alice.send_raw(data)
    else:
        for index in range(len(data)):
            alice.send_raw(data[index : index + 1])
    assert alice.recv_service() == "You are now known as alicia"
    assert bob.recv_service() == "alice is now known as alicia"
    texts = ["first after", "second after", "third, new field"]
    assert [bob.recv_chat()[1:] for _ in texts] == [("alicia", text) for text in texts]
    carol = join(server.port, "carol")
    assert carol.recv_service() == history_begin(3)
    assert [carol.recv_chat()[1:] for _ in texts] == [("alicia", text) for text in texts]
    assert carol.recv_service() == HISTORY_END


def test_old_nick_is_free_after_a_rename_and_the_new_one_is_taken(server, join):
    alice = join(server.port, "alice")
    alice.send_frame("/nick alicia")
    assert alice.recv_service() == "You are now known as alicia"
    join(server.port, "alice")
    late = Peer(server.port)
    try:
        late.send_frame("ALICIA")
        assert "already in use" in late.recv_service()
    finally:
        late.close()


@pytest.mark.parametrize(
    "line, reason",
    [
        ("/nick BOB", 'Nickname not changed: "BOB" is already in use'),
        ("/nick " + "x" * 33, "Nickname not changed: must be 1 to 32 characters"),
        (
            "/nick bad\u200bnick",
            "Nickname not changed: must not contain whitespace, control or format characters",
        ),
        (
            "/nick two words",
            "Nickname not changed: must not contain whitespace, control or format characters",
        ),
        (
            "/nick tab\tbed",
            "Nickname not changed: must not contain whitespace, control or format characters",
        ),
        ("/nick", "Nickname not changed: type /nick NEW"),
        ("/nick   ", "Nickname not changed: type /nick NEW"),
        ("/nick alice", "Nickname not changed: you are alice already"),
    ],
)
def test_nick_applies_the_login_checks(server, join, line, reason):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_frame(line)
    assert alice.recv_service() == reason
    bob.sync(alice)  # no rename notice reached bob
    alice.send_chat("same name", nick="alice")
    assert bob.recv_chat()[1:] == ("alice", "same name")


def test_nick_may_change_only_the_case(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_frame("/nick Alice")
    assert alice.recv_service() == "You are now known as Alice"
    assert bob.recv_service() == "alice is now known as Alice"


def test_me_shows_an_action_to_everyone_including_the_sender(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_frame("/me waves at everyone")
    for peer in (alice, bob):
        stamp, field, text = peer.recv_chat()
        assert (field, text) == ("* alice", "waves at everyone")
        assert STAMP.fullmatch(stamp), stamp
    alice.send_frame("/me")
    assert alice.recv_service() == "Not sent: type /me ACTION"


def test_unknown_command_is_an_error_and_never_reaches_the_room(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_frame("/frobnicate the room")
    assert alice.recv_service() == "Unknown command /frobnicate; /help lists the commands"
    bob.sync(alice)


def test_commands_are_found_whatever_their_case(server, join):
    alice = join(server.port, "alice")
    alice.send_frame("/WHO")
    assert alice.recv_service().startswith("1 user online: alice (joined ")


def test_a_chat_message_starting_with_a_slash_is_relayed_as_chat(server, join):
    # What a client sends for a typed "//shrug": a chat message, never a command.
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_chat("/shrug", nick="alice")
    assert bob.recv_chat()[1:] == ("alice", "/shrug")


# ---------------------------------------------------------------------------
# History for late joiners
# ---------------------------------------------------------------------------


def read_history(peer):
    """The replay after the welcome: the begin marker's count and the payloads in between."""
    begin = peer.recv_service()
    match = re.fullmatch(r"--- (\d+) messages? from before you joined ---", begin)
    assert match, begin
    payloads = []
    while True:
        payload = peer.recv_frame()
        if payload == HISTORY_END.encode():
            return int(match.group(1)), payloads
        payloads.append(payload)


def test_late_joiner_gets_the_last_messages_after_the_welcome_with_their_original_times(
    server, join
):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    sent = [
        chat_payload("morning", "alice", "2026-11-27T07:37:12+03:00"),
        chat_payload("hi, alice", "bob", "2026-11-27T04:37:20Z"),
        chat_payload("with \0 inside", "alice", "2026-11-27T07:38:00-05:30"),
    ]
    for payload, sender, reader in zip(sent, (alice, bob, alice), (bob, alice, bob)):
        sender.send_frame(payload)
        assert reader.recv_frame() == payload
    carol = Peer(server.port)
    try:
        carol.send_frame("carol")
        assert carol.recv_service().startswith("Welcome to selchat, carol!")
        assert read_history(carol) == (3, sent)
        alice.send_chat("live now", nick="alice")
        assert carol.recv_chat()[1:] == ("alice", "live now")
    finally:
        carol.close()


def test_history_keeps_only_the_last_n_messages(start_server, join):
    server = start_server("--history", "3")
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    for number in range(5):
        alice.send_chat("message %d" % number, nick="alice")
        bob.recv_chat()
    carol = Peer(server.port)
    try:
        carol.send_frame("carol")
        carol.recv_service()
        count, payloads = read_history(carol)
        texts = [payload.decode().split("\0")[2] for payload in payloads]
        assert (count, texts) == (3, ["message 2", "message 3", "message 4"])
    finally:
        carol.close()


def test_history_default_is_the_last_fifty_messages(server, join):
    alice = join(server.port, "alice")
    alice.sock.sendall(b"".join(frame(chat_payload("m%d" % n, "alice")) for n in range(55)))
    alice.send_frame("/who")  # answered after all 55 are handled
    alice.recv_service()
    carol = join(server.port, "carol")
    count, payloads = read_history(carol.peer)
    assert count == 50 and [p.decode().split("\0")[2] for p in payloads] == [
        "m%d" % n for n in range(5, 55)
    ]


def test_history_zero_replays_nothing(start_server, join):
    server = start_server("--history", "0")
    alice = join(server.port, "alice")
    alice.send_chat("nobody will see this later", nick="alice")
    alice.send_frame("/who")
    alice.recv_service()
    carol = join(server.port, "carol")
    assert alice.recv_service() == "carol joined the chat (2 online)"
    alice.send_chat("first thing carol sees", nick="alice")
    assert carol.recv_chat()[1:] == ("alice", "first thing carol sees")


def test_no_markers_when_there_is_no_history_yet(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    assert alice.recv_service() == "bob joined the chat (2 online)"
    alice.send_chat("hello bob", nick="alice")
    assert bob.recv_chat()[1:] == ("alice", "hello bob")


def test_private_messages_are_never_replayed_but_actions_and_messages_are(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    alice.send_frame("/msg bob secret")
    bob.recv_chat(), alice.recv_chat()
    alice.send_frame("/me waves")
    bob.recv_chat(), alice.recv_chat()
    bob.send_chat("public", nick="bob")
    alice.recv_chat()
    carol = Peer(server.port)
    try:
        carol.send_frame("carol")
        carol.recv_service()
        count, payloads = read_history(carol)
        fields = [payload.decode().split("\0")[1:] for payload in payloads]
        assert (count, fields) == (2, [["* alice", "waves"], ["bob", "public"]])
    finally:
        carol.close()


def test_history_records_each_frame_of_a_run_received_in_one_read(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    payloads = [
        chat_payload(text, "alice")
        for text in ("short", "x" * 1000, "\0", "é" * 300, "/not a command", "last")
    ]
    frames = [frame(payload) for payload in payloads]
    frames[2] = b"%010d" % len(payloads[2]) + payloads[2]  # zero-padded: relayed as it came
    restamped = b"\0nobody\0ends the run"
    alice.sock.sendall(b"".join(frames) + frame(restamped) + frame(payloads[0]))
    for payload in payloads:
        assert bob.recv_frame() == payload
    assert bob.recv_frame() == b"\0alice\0ends the run"
    assert bob.recv_frame() == payloads[0]
    carol = Peer(server.port)
    try:
        carol.send_frame("carol")
        carol.recv_service()
        assert read_history(carol) == (8, [*payloads, b"\x00alice\x00ends the run", payloads[0]])
    finally:
        carol.close()


def test_history_holds_a_large_message_and_a_restamped_one(server, join):
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    big = "".join(chr(0x41 + n % 26) for n in range(300_000))
    alice.send_chat(big, nick="alice", stamp="2026-01-01T00:00:00+00:00")
    alice.send_chat("forged", nick="mallory", stamp="2026-01-01T00:00:01+00:00")
    assert bob.recv_chat() == ("2026-01-01T00:00:00+00:00", "alice", big)
    assert bob.recv_chat() == ("2026-01-01T00:00:01+00:00", "alice", "forged")
    carol = Peer(server.port)
    try:
        carol.send_frame("carol")
        carol.recv_service()
        count, replayed = read_history(carol)
        assert count == 2
        assert replayed == [
            chat_payload(big, "alice", "2026-01-01T00:00:00+00:00"),
            chat_payload("forged", "alice", "2026-01-01T00:00:01+00:00"),
        ]
    finally:
        carol.close()


def test_history_never_holds_more_than_half_the_output_queue(start_server, join):
    # Replayed whole, it must fit a newcomer's queue: with --max-queue 1 MiB at
    # most 512 KiB of it is kept, so of three 300 kB messages only the last.
    server = start_server("--max-queue", str(1 << 20), "--max-message", str(400_000))
    alice = join(server.port, "alice")
    bob = join(server.port, "bob")
    alice.recv_service()
    for letter in "abc":
        alice.send_chat(letter * 300_000, nick="alice")
        assert bob.recv_chat()[2][:1] == letter
    carol = Peer(server.port)
    try:
        carol.send_frame("carol")
        carol.recv_service()
        count, replayed = read_history(carol)
        assert count == 1 and replayed[0].endswith(b"c" * 300_000)
    finally:
        carol.close()


# ---------------------------------------------------------------------------
# A client that knows only the seed's protocol keeps working
# ---------------------------------------------------------------------------


def test_seed_protocol_client_gets_only_frames_it_understands(server, join):
    alice = join(server.port, "alice")
    alice.send_chat("before the old client came", nick="alice")
    alice.send_frame("/who")
    alice.recv_service()
    old = Peer(server.port)  # sends the nickname, then time\0nick\0text frames; nothing else
    try:
        old.send_frame("oldtimer")
        assert old.recv_service().startswith("Welcome to selchat, oldtimer!")
        alice.recv_service()
        alice.send_frame("/me waves")
        alice.send_frame("/msg oldtimer psst")
        alice.send_frame("/nick alicia")
        assert alice.recv_chat()[1:] == ("* alice", "waves")
        assert alice.recv_chat()[1:] == ("[private] alice -> oldtimer", "psst")
        assert alice.recv_service() == "You are now known as alicia"
        old.send_chat("hello everyone", nick="oldtimer")
        assert alice.recv_chat()[1:] == ("oldtimer", "hello everyone")
        alice.send_chat("done", nick="alicia")
        seen = []
        while not seen or seen[-1] != ("alicia", "done"):
            payload = old.recv_frame()
            parts = payload.decode("utf-8").split("\0", 2)
            assert len(parts) in (1, 3), payload
            if len(parts) == 3:
                assert STAMP.fullmatch(parts[0]) and parts[1] and parts[2], payload
                seen.append(tuple(parts[1:]))
            else:
                seen.append(parts[0])
        assert seen == [
            history_begin(1),
            ("alice", "before the old client came"),
            HISTORY_END,
            ("* alice", "waves"),
            ("[private] alice -> oldtimer", "psst"),
            "alice is now known as alicia",
            ("alicia", "done"),
        ]
    finally:
        old.close()


# ---------------------------------------------------------------------------
# The client: commands, private messages, actions, mentions, history, the up arrow
# ---------------------------------------------------------------------------


@needs_pty
def test_client_sends_a_slash_line_as_a_command_and_shows_the_answer(server, join, pty_client):
    bob = join(server.port, "bob")
    child = pty_client(server.port, "alice")
    joined(child)
    bob.recv_service()
    child.sendline(b"/who")  # one user a line
    child.expect(
        rb"2 users online:\r\n.*  alice \(joined \d+ s ago\)\r\n.*  bob \(joined \d+ s ago\)"
    )
    child.sendline(b"/frobnicate")
    child.expect_exact(b"Unknown command /frobnicate; /help lists the commands")
    child.sendline(b"after the commands")
    assert bob.recv_chat()[1:] == ("alice", "after the commands")  # nothing came before it


@needs_pty
def test_client_double_slash_sends_a_chat_message_with_one_slash(server, join, pty_client):
    bob = join(server.port, "bob")
    child = pty_client(server.port, "alice")
    joined(child)
    bob.recv_service()
    child.sendline(b"//shrug \xc2\xaf\\_(\xe3\x83\x84)_/\xc2\xaf")
    assert bob.recv_chat()[1:] == ("alice", "/shrug \u00af\\_(\u30c4)_/\u00af")
    child.expect(rb"\] alice: /shrug ")


@needs_pty
def test_client_shows_private_messages_and_actions_distinctly(server, join, pty_client):
    bob = join(server.port, "bob")
    child = pty_client(server.port, "alice")
    joined(child)
    bob.recv_service()
    bob.send_frame("/msg alice just between us")
    child.expect(SHOWN_NOW + rb" \[private\] bob -> alice: just between us")
    bob.send_frame("/me waves")
    child.expect(SHOWN_NOW + rb" \* bob waves")
    child.sendline(b"/msg bob likewise")
    assert bob.recv_chat()[1:] == ("[private] bob -> alice", "just between us")
    assert bob.recv_chat()[1:] == ("* bob", "waves")
    assert bob.recv_chat()[1:] == ("[private] alice -> bob", "likewise")
    child.expect(SHOWN_NOW + rb" \[private\] alice -> bob: likewise")
    child.sendline(b"/me nods")
    child.expect(SHOWN_NOW + rb" \* alice nods")
    assert bob.recv_chat()[1:] == ("* alice", "nods")


@needs_pty
def test_client_colours_the_private_mark_and_both_nicks(server, join, pty_client):
    bob = join(server.port, "bob")
    child = pty_client(server.port, "alice", NO_COLOR=None, FORCE_COLOR="1")
    joined(child)
    bob.recv_service()
    bob.send_frame("/msg alice psst")
    bob_, alice_ = (
        ("\x1b[%sm%s\x1b[0m" % (selchat.nick_color(name), name)).encode()
        for name in ("bob", "alice")
    )
    child.expect_exact(b"\x1b[1;35m[private]\x1b[0m " + bob_ + b" -> " + alice_ + b": psst")


@needs_pty
def test_client_highlights_mentions_of_its_nick_and_rings_the_bell_with_bell(
    server, join, pty_client
):
    bob = join(server.port, "bob")
    child = pty_client(server.port, "alice", "--bell", NO_COLOR=None, FORCE_COLOR="1")
    joined(child)
    bob.recv_service()
    bob.send_chat("hey ALICE, look", nick="bob")
    child.expect_exact(b"hey \x1b[1;7mALICE\x1b[0m, look\x07")
    bob.send_chat("malice is not a mention", nick="bob")
    child.expect_exact(b"malice is not a mention")
    bob.send_frame("/msg alice no name in here")
    child.expect_exact(b"no name in here\x07")
    assert bob.recv_chat()[1:] == ("[private] bob -> alice", "no name in here")
    child.sendline(b"I am alice")  # one's own name is no mention
    assert bob.recv_chat()[1:] == ("alice", "I am alice")
    child.expect_exact(b"alice\x1b[0m: I am alice")
    bob.send_chat("end", nick="bob")
    child.expect_exact(b"bob\x1b[0m: end")
    shown = pty_output(child)
    assert shown.count(b"\x07") == 2, shown
    assert b"\x1b[1;7m" not in shown.split(b"malice is not")[1], shown


@needs_pty
def test_client_without_bell_highlights_but_never_rings(server, join, pty_client):
    bob = join(server.port, "bob")
    child = pty_client(server.port, "alice", NO_COLOR=None, FORCE_COLOR="1")
    joined(child)
    bob.recv_service()
    bob.send_chat("alice: ping", nick="bob")
    child.expect_exact(b"\x1b[1;7malice\x1b[0m: ping")
    bob.send_frame("/msg alice private ping")
    child.expect_exact(b"private ping")
    assert b"\x07" not in pty_output(child)


@needs_pty
def test_client_mentions_without_colour_are_plain_text(server, join, pty_client):
    bob = join(server.port, "bob")
    child = pty_client(server.port, "alice", "--bell")
    joined(child)
    bob.recv_service()
    bob.send_chat("alice: ping", nick="bob")
    child.expect_exact(b"bob: alice: ping\x07")
    assert b"\x1b[1;7m" not in pty_output(child)


@needs_pty
def test_client_follows_its_own_rename(server, join, pty_client):
    bob = join(server.port, "bob")
    child = pty_client(server.port, "alice")
    joined(child)
    bob.recv_service()
    child.sendline(b"/nick alicia")
    child.expect_exact(b"You are now known as alicia")
    assert bob.recv_service() == "alice is now known as alicia"
    child.sendline(b"renamed")
    assert bob.recv_chat()[1:] == ("alicia", "renamed")
    child.expect(rb"\] alicia: renamed")


@needs_pty
def test_client_shows_replayed_history_between_markers(server, join, pty_client):
    bob = join(server.port, "bob")
    bob.send_chat("said before alice came", nick="bob", stamp="2020-02-29T23:30:00+05:30")
    bob.send_frame("/me left a note")
    bob.recv_chat()
    child = pty_client(server.port, "alice")
    child.expect_exact(b"Welcome to selchat, alice!")
    child.expect_exact(history_begin(2).encode())
    child.expect_exact(b"[2020-02-29 18:00:00] bob: said before alice came")  # in UTC
    child.expect(rb"\* bob left a note")
    child.expect_exact(HISTORY_END.encode())
    bob.send_chat("live", nick="bob")
    child.expect_exact(b"bob: live")


@needs_pty
def test_client_recalls_earlier_lines_with_the_up_arrow(server, join, pty_client):
    bob = join(server.port, "bob")
    child = pty_client(server.port, "alice")
    joined(child)
    bob.recv_service()
    child.sendline(b"first line")
    assert bob.recv_chat()[1:] == ("alice", "first line")
    child.expect_exact(b"alice: first line")
    child.expect_exact(b"> ")
    child.sendline(b"second line")
    assert bob.recv_chat()[1:] == ("alice", "second line")
    child.expect_exact(b"alice: second line")
    child.expect_exact(b"> ")  # the prompt is back
    child.send(b"\x1b[A\x1b[A")  # up, up: back to the first line
    child.expect_exact(b"first line")  # the editor draws the recalled line whole
    child.send(b"\r")
    assert bob.recv_chat()[1:] == ("alice", "first line")


# ---------------------------------------------------------------------------
# The client reconnects
# ---------------------------------------------------------------------------


def start_on(start_server, port, *args):
    """A server on a given port; retried while the previous one's port is being freed."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return start_server("--host", "127.0.0.1", "--port", str(port), *args, address=False)
        except AssertionError:
            if time.monotonic() > deadline:
                raise


@needs_pty
def test_client_reconnects_after_the_server_restarts_and_joins_under_the_same_nick(
    start_server, join, pty_client
):
    port = free_port()
    first = start_on(start_server, port)
    child = pty_client(port, "alice")
    joined(child)
    first.proc.kill()
    child.expect(
        rb"Connection to 127\.0\.0\.1:%d lost: [^.]+\. Reconnecting in \d+\.\d s; "
        rb"type <quit< to leave\." % port,
        timeout=5,
    )
    child.sendline(b"typed while away")
    child.expect_exact(b"Not sent: not connected. Type <quit< to leave.")
    second = start_on(start_server, port)
    child.expect_exact(b"Welcome to selchat, alice! 1 user online.")
    bob = join(second.port, "bob")
    child.expect_exact(b"bob joined the chat (2 online)")
    bob.send_chat("welcome back", nick="bob")
    child.expect_exact(b"bob: welcome back")
    child.sendline(b"glad to be back")
    assert bob.recv_chat()[1:] == ("alice", "glad to be back")
    assert child.isalive()


@needs_pty
def test_client_keeps_trying_with_longer_waits_while_the_server_is_away(
    start_server, pty_client, proxy
):
    server = start_server()
    relay = proxy(server.port)
    child = pty_client(relay.port, "alice")
    joined(child)
    relay.stop_listening()  # every try is refused from now on
    relay.cut()
    child.expect(rb"lost: .*Reconnecting in (\d+\.\d) s", timeout=5)
    waits = [float(child.match.group(1))]
    for _ in range(2):
        child.expect(
            rb"Cannot reconnect to 127\.0\.0\.1:\d+: connection refused\. "
            rb"Reconnecting in (\d+\.\d) s",
            timeout=5,
        )
        waits.append(float(child.match.group(1)))
    assert 0.3 <= waits[0] <= 0.7 and 0.7 <= waits[1] <= 1.3 and 1.5 <= waits[2] <= 2.5, waits
    child.sendline(b"<quit<")
    assert wait_pty_exit(child, timeout=5) == 0
    assert b"Traceback" not in pty_output(child)


@needs_pty
def test_client_after_reconnect_shows_only_the_history_it_missed(
    start_server, join, pty_client, proxy
):
    server = start_server()
    relay = proxy(server.port)
    bob = join(server.port, "bob")
    child = pty_client(relay.port, "alice")
    joined(child)
    bob.recv_service()
    bob.send_chat("seen before the cut", nick="bob")
    child.expect_exact(b"bob: seen before the cut")
    child.sendline(b"my own words")
    assert bob.recv_chat()[1:] == ("alice", "my own words")
    relay.cut()
    assert bob.recv_service() == "alice left the chat (1 online)"
    bob.send_chat("missed while away", nick="bob")
    child.expect_exact(b"Reconnecting in")
    assert bob.recv_service() == "alice joined the chat (2 online)"
    child.expect_exact(b"Welcome to selchat, alice!")
    child.expect_exact(history_begin(3).encode())
    child.expect_exact(b"bob: missed while away")
    child.expect_exact(HISTORY_END.encode())
    after = pty_output(child).split(b"Welcome to selchat, alice!")[-1]
    assert b"seen before the cut" not in after and b"my own words" not in after, after


@needs_pty
def test_client_keeps_trying_while_its_nick_is_still_taken(start_server, join, pty_client, proxy):
    server = start_server()
    relay = proxy(server.port)
    child = pty_client(relay.port, "alice")
    joined(child)
    relay.gate.clear()  # the client's next connection waits in the proxy
    relay.cut()
    server.wait_for_log(r"alice \(.*\) disconnected")
    relay.wait_for_connections(2)
    squatter = join(server.port, "alice")
    relay.gate.set()
    child.expect_exact(b'Nickname rejected: "alice" is already in use')
    child.expect(
        rb"Cannot rejoin 127\.0\.0\.1:\d+: the server closed the connection\. "
        rb"Reconnecting in"
    )
    squatter.close()
    child.expect_exact(b"Welcome to selchat, alice!")
    assert child.isalive()


@needs_pty
@pytest.mark.parametrize("keys", [b"<quit<\r", b"\x03"], ids=["quit", "ctrl-c"])
def test_client_leaves_with_status_zero_while_reconnecting(start_server, pty_client, proxy, keys):
    server = start_server()
    relay = proxy(server.port)
    child = pty_client(relay.port, "alice")
    joined(child)
    relay.stop_listening()
    relay.cut()
    child.expect_exact(b"Reconnecting in")
    child.send(keys)
    assert wait_pty_exit(child, timeout=5) == 0
    assert b"Traceback" not in pty_output(child)


@needs_pty
def test_client_does_not_reconnect_after_the_shutdown_notice(server, pty_client):
    child = pty_client(server.port, "alice")
    joined(child)
    server.proc.send_signal(signal.SIGINT)
    child.expect_exact(b"Server is shutting down. Goodbye!")
    assert wait_pty_exit(child, timeout=5) == 0
    assert b"Reconnecting" not in pty_output(child)


@needs_pty
def test_client_with_no_reconnect_exits_one_when_the_connection_is_lost(server, pty_client):
    child = pty_client(server.port, "alice", "--no-reconnect")
    joined(child)
    server.proc.kill()
    child.expect(rb"selchat: connection to 127\.0\.0\.1:%d lost" % server.port, timeout=5)
    assert wait_pty_exit(child, timeout=5) == 1
    assert b"Reconnecting" not in pty_output(child)


def test_clients_turned_away_at_once_exit_one_without_a_traceback(server, join, piped_client):
    # The refusal can arrive at once, before the client's loop has started.
    join(server.port, "alice")
    clients = [piped_client("--port", server.port, "--nick", "ALICE") for _ in range(6)]
    for client in clients:
        assert client.wait_exit() == 1
        assert b'Nickname rejected: "ALICE" is already in use' in client.out
        assert b"Traceback" not in client.err, bytes(client.err)
        assert client.err.startswith(
            b"selchat: connection to 127.0.0.1:%d refused by the server: " % server.port
        ), bytes(client.err)


def test_pipe_mode_never_reconnects(server, piped_client):
    client = piped_client("--port", server.port, "--nick", "ci")
    client.wait_for_output(b"Welcome to selchat, ci!")
    server.proc.kill()
    assert client.wait_exit(timeout=5) == 1
    assert b"lost" in client.err and b"Reconnecting" not in client.out + client.err


def test_pipe_mode_sends_commands_and_double_slash_lines(server, join, piped_client):
    bob = join(server.port, "bob")
    client = piped_client("--port", server.port, "--nick", "ci")
    assert bob.recv_service() == "ci joined the chat (2 online)"
    client.write("/msg bob build finished\n//etc/passwd is not a command\n/who\n")
    client.wait_for_output(b"2 users online")
    client.write("<quit<\n")
    assert client.wait_exit() == 0
    assert bob.recv_chat()[1:] == ("[private] ci -> bob", "build finished")
    assert bob.recv_chat()[1:] == ("ci", "/etc/passwd is not a command")
    assert b"[private] ci -> bob: build finished" in client.out


# ---------------------------------------------------------------------------
# Networks: IPv4 and IPv6 together, IPv6 literals and host names
# ---------------------------------------------------------------------------


@needs_ipv6
def test_server_default_host_listens_on_ipv4_and_ipv6_together(start_server, join):
    server = start_server("--port", "0", address=False)
    assert server.address == "[::]"
    v4 = join(server.port, "four", host="127.0.0.1")
    v6 = join(server.port, "six", host="::1")
    assert v4.recv_service() == "six joined the chat (2 online)"
    v6.send_chat("over IPv6", nick="six")
    assert v4.recv_chat()[1:] == ("six", "over IPv6")
    server.wait_for_log(r"connection from 127\.0\.0\.1:\d+")
    server.wait_for_log(r"connection from \[::1\]:\d+")


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]", "localhost"])
def test_client_takes_ipv6_literals_and_host_names(start_server, join, piped_client, host):
    server = start_server("--port", "0", address=False)
    bob = join(server.port, "bob")
    client = piped_client("--host", host, "--port", server.port, "--nick", "ci")
    client.wait_for_output(b"Welcome")
    assert bob.recv_service() == "ci joined the chat (2 online)"
    client.write("via %s\n" % host)
    client.proc.stdin.close()
    assert client.wait_exit() == 0
    assert bob.recv_chat()[1:] == ("ci", "via %s" % host)


def test_client_names_an_ipv6_server_in_brackets_when_it_cannot_connect(piped_client):
    with socket.socket(socket.AF_INET6 if _dual_stack() else socket.AF_INET) as unused:
        unused.bind(("::1" if _dual_stack() else "127.0.0.1", 0))
        port = unused.getsockname()[1]
        client = piped_client("--host", "::1", "--port", port, "--nick", "ci")
        assert client.wait_exit() == 1
    assert re.search(rb"selchat: cannot connect to \[::1\]:%d: " % port, client.err), client.err


# ---------------------------------------------------------------------------
# Installation: `pip install .` gives a `selchat` command; the lone file still runs
# ---------------------------------------------------------------------------


def _can_build_wheels():
    try:
        import setuptools.command.bdist_wheel  # noqa: F401  (setuptools 70.1 and later)

        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _can_build_wheels(), reason="needs setuptools>=70.1 to build offline")
def test_pip_install_gives_a_selchat_command_with_a_tz_extra(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("selchat.py", "pyproject.toml", "README.md"):
        shutil.copy(HERE / name, source / name)
    target = tmp_path / "installed"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
            "install",
            "--no-build-isolation",
            "--no-index",
            "--no-deps",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    (info,) = target.glob("selchat-*.dist-info")
    metadata = (info / "METADATA").read_text()
    assert "Version: %s" % selchat.__version__ in metadata
    assert "Provides-Extra: tz" in metadata
    assert 'Requires-Dist: pytz; extra == "tz"' in metadata, metadata
    assert 'Requires-Dist: tzlocal; extra == "tz"' in metadata, metadata
    assert (target / "selchat.py").read_bytes() == SCRIPT.read_bytes()
    env = clean_env(PYTHONPATH=str(target))
    command = target / "bin" / "selchat"
    out = subprocess.run(
        [str(command), "--version"], stdout=subprocess.PIPE, env=env, cwd=str(tmp_path), timeout=30
    )
    assert (out.returncode, out.stdout) == (0, b"selchat %s\n" % selchat.__version__.encode())
    out = subprocess.run(
        [str(command), "client", "-h"],
        stdout=subprocess.PIPE,
        env=env,
        cwd=str(tmp_path),
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout.startswith(b"usage: selchat client"), out.stdout


def test_the_copied_file_alone_runs_as_before(tmp_path):
    shutil.copy(SCRIPT, tmp_path / "selchat.py")
    out = subprocess.run(
        [sys.executable, "-S", "selchat.py", "server", "-h"],
        stdout=subprocess.PIPE,
        cwd=str(tmp_path),
        env=clean_env(),
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout.startswith(b"usage: selchat.py server")
    assert b"--history N" in out.stdout
