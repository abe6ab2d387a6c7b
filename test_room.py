"""Running a room (issue 15): operators, the topic, bans, the history on disk
(--store) and /search.

Real servers (`selchat.py server`, --port 0) driven over real sockets by raw
peers (selchat_testkit.Peer). Banned peers connect from 127.0.0.2 and
127.0.0.3, so that the operator on 127.0.0.1 is another address. What the
store keeps is checked by restarting the server on the same file and, where
it matters, by reading the SQLite file itself. Every wait has a deadline.
"""

import os
import re
import shutil
import sqlite3
import subprocess
import time

import pytest

import selchat
from selchat_testkit import (
    TIMEOUT,
    Peer,
    User,
    chat_payload,
    clean_env,
    first_answer,
    run_server_briefly,
    wait_service,
)

OPS = "open sesame"
HISTORY_END = selchat.HISTORY_END


ROOM_NOTICE = re.compile(r" (joined|left) the chat \(\d+ online\)$")


def ask(user, command, pattern=None):
    """Send a command; return its answer (the first service message that is
    not a join or leave notice), or the first matching pattern."""
    user.send_frame(command)
    if pattern is not None:
        return wait_service(user, pattern)[0]
    while True:
        answer = user.recv_service()
        if not ROOM_NOTICE.search(answer):
            return answer


def become_op(user, password=OPS):
    assert ask(user, "/op " + password).startswith("You are an operator now"), user


def refused_at_connect(port, source):
    """What a new connection from source is told before it is closed."""
    peer = Peer(port, source=source)
    try:
        return peer.recv_until_closed()
    finally:
        peer.close()


def hang_up(names):
    """Close every peer a test holds, so that stopping its server waits for nobody."""
    for value in names.values():
        if isinstance(value, (Peer, User)):
            value.close()


def search(user, query):
    """The answer to /search: (its first line, the chat frames it brought)."""
    user.send_frame("/search " + query)
    first = wait_service(user, r"^(---|No messages|Not searched|Type /search)")[0]
    found = []
    if first.startswith("--- "):
        while True:
            payload = user.recv_frame()
            if payload == selchat.SEARCH_END.encode():
                break
            found.append(tuple(payload.decode("utf-8").split("\0", 2)))
    return first, found


def read_history(user):
    """The history replayed to a newcomer: the chat frames between the markers."""
    begin = user.recv_service()
    if not begin.startswith("--- "):
        return begin, []
    frames = []
    while True:
        payload = user.recv_frame()
        if payload == HISTORY_END.encode():
            return begin, frames
        frames.append(tuple(payload.decode("utf-8").split("\0", 2)))


@pytest.fixture
def room_server(start_server, tmp_path):
    """Factory: a server with --ops-password (and a store in tmp_path when store=True)."""

    def start(*args, store=False):
        extra = ["--ops-password", OPS, *args]
        if store:
            extra += ["--store", str(tmp_path / "room.db")]
        return start_server(*extra)

    return start


# ---------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------


def test_op_with_the_password_makes_an_operator_marked_in_who(room_server, join):
    server = room_server()
    alice = join(server, "alice")
    bob = join(server, "bob")
    assert ask(alice, "/op") == "Type /op PASSWORD"
    assert ask(alice, "/op wrong") == "Wrong operator password"
    assert "wrong operator password" in server.wait_for_log(
        "alice .*wrong operator password"
    ).group(0)
    become_op(alice)
    assert ask(alice, "/op " + OPS) == "You are an operator already"
    listing = ask(bob, "/who")
    assert "alice (operator, joined " in listing
    assert "bob (joined " in listing
    assert server.wait_for_log(r"alice \(127\.0\.0\.1:\d+\) is an operator")
    # The client's tab completion still reads names from the marked listing.
    assert selchat.names_in_notice(listing)[0] == ["alice", "bob"]


def test_op_password_from_the_environment_and_from_a_file(start_server, join, tmp_path):
    env = clean_env(SELCHAT_OPS_PASSWORD="from env")
    server = start_server(env=env)
    alice = join(server, "alice")
    become_op(alice, "from env")
    secret = tmp_path / "ops"
    secret.write_text("from file\nignored\n", encoding="utf-8")
    server = start_server("--ops-password-file", secret)
    bob = join(server, "bob")
    assert ask(bob, "/op from env") == "Wrong operator password"
    become_op(bob, "from file")
    empty = tmp_path / "empty"
    empty.write_text("", encoding="utf-8")
    result = run_server_briefly("--ops-password-file", str(empty))
    assert result.returncode == 1
    assert "operators' password file" in result.stderr and "empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_ops_password_there_are_no_operators(start_server, join):
    server = start_server()
    alice = join(server, "alice")
    assert "started without --ops-password" in ask(alice, "/op anything")
    assert "this server has none" in ask(alice, "/kick bob")


def test_wrong_op_passwords_are_throttled_per_address_like_login_passwords(room_server, join):
    server = room_server("--password-tries", "3")
    alice = join(server, "alice")
    bob = join(server, "bob")  # the same address: the lockout is the address's
    assert ask(alice, "/op x1") == "Wrong operator password"
    assert ask(alice, "/op x2") == "Wrong operator password"
    assert ask(alice, "/op x3").startswith(
        "Wrong operator password; too many from your address, try again in 1 s"
    )
    # Locked out: even the right password is refused, unchecked, from any user there.
    assert ask(bob, "/op " + OPS).startswith("Too many wrong operator passwords from your address")
    # A new connection does not reset it.
    carol = join(server, "carol")
    assert ask(carol, "/op " + OPS).startswith("Too many wrong operator passwords")
    deadline = time.monotonic() + TIMEOUT
    while True:  # the lockout (1 s) ends
        answer = ask(carol, "/op " + OPS)
        if answer.startswith("You are an operator now"):
            break
        assert answer.startswith("Too many"), answer
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # The chat itself went on for all of them.
    alice.send_chat("still here", nick="alice")
    assert bob.recv_chat_skipping_notices()[1:] == ("alice", "still here")


@pytest.mark.parametrize(
    ("command", "what"),
    [
        ("/kick bob", "kick"),
        ("/ban bob", "ban"),
        ("/unban 127.0.0.2", "unban"),
        ("/bans", "list the bans"),
        ("/topic new topic", "set the topic"),
    ],
)
def test_operator_commands_are_refused_to_everyone_else(room_server, join, command, what):
    server = room_server()
    alice = join(server, "alice")
    bob = join(server, "bob")
    answer = ask(alice, command)
    assert answer == "Only operators can %s (/op PASSWORD makes you one)" % what
    bob.sync(alice)  # bob is still here, told nothing
    assert ask(alice, "/topic") == "No topic is set"


# ---------------------------------------------------------------------------
# /kick
# ---------------------------------------------------------------------------


def test_kick_tells_the_user_why_disconnects_them_and_tells_the_room(room_server, join):
    server = room_server()
    alice = join(server, "alice")
    bob = join(server, "bob")
    carol = join(server, "carol")
    become_op(alice)
    alice.send_frame("/kick bob spamming the channel")
    frames = bob.recv_until_closed()
    assert frames[-1] == "You were kicked out by alice: spamming the channel"
    for user in (alice, carol):
        wait_service(user, r"^bob was kicked out by alice: spamming the channel$")
        wait_service(user, r"^bob left the chat \(2 online\)$")
    assert "bob (" not in ask(carol, "/who")
    assert server.wait_for_log(r"bob \(127\.0\.0\.1:\d+\) disconnected: kicked out by alice")
    # Without a reason; then the commands' mistakes.
    dave = join(server, "dave")
    wait_service(alice, "dave joined")
    alice.send_frame("/kick DAVE")  # nicknames compare casefolded
    assert dave.recv_until_closed()[-1] == "You were kicked out by alice"
    wait_service(alice, r"^dave was kicked out by alice$")
    assert ask(alice, "/kick") == "Type /kick NICK [REASON]"
    assert ask(alice, "/kick nobody", "^Nobody").startswith("Nobody called nobody is online")
    assert ask(alice, "/kick alice").startswith("You cannot kick yourself out")


# ---------------------------------------------------------------------------
# /ban, /unban, /bans
# ---------------------------------------------------------------------------


def test_ban_by_nickname_disconnects_and_refuses_the_address_until_unbanned(
    room_server, join, connect
):
    server = room_server()
    alice = join(server, "alice")
    bob = connect(server.port, "bob", source="127.0.0.2")
    bob2 = connect(server.port, "bob2", source="127.0.0.2")
    carol = connect(server.port, "carol", source="127.0.0.3")
    become_op(alice)
    assert ask(alice, "/ban bob 2h flooding", "^Banned").startswith("Banned 127.0.0.2 (bob) until ")
    for peer in (bob, bob2):  # everyone from that address goes
        last = peer.recv_until_closed()[-1]
        assert re.fullmatch(
            r"You are banned from this server until \d{4}-\d\d-\d\d \d\d:\d\d UTC "
            r"\(by alice\): flooding",
            last,
        ), last
    wait_service(carol, r"^bob was banned by alice: flooding$")
    wait_service(carol, r"left the chat \(2 online\)$")
    # A new connection from it is refused with the reason, before a nickname.
    told = refused_at_connect(server.port, "127.0.0.2")
    assert told == [last]
    assert server.wait_for_log(r"refused 127\.0\.0\.2:\d+: banned \(127\.0\.0\.2\)")
    # Others still come in; /bans lists it; /unban lets the address in again.
    dave = connect(server.port, "dave", source="127.0.0.3")
    listing = ask(alice, "/bans", "ban")
    assert re.fullmatch(
        r"1 ban: 127\.0\.0\.2 \(bob, by alice, until .* UTC: flooding\)", listing
    ), listing
    assert ask(alice, "/unban 127.0.0.2", "bann") == "Unbanned 127.0.0.2"
    assert ask(alice, "/bans", "ban") == "No bans"
    again = connect(server.port, "bob", source="127.0.0.2")
    again.sync(User(dave, "dave"))


def test_ban_an_address_with_nobody_online_until_restart_and_its_mistakes(room_server, join):
    server = room_server()
    alice = join(server, "alice")
    become_op(alice)
    assert ask(alice, "/ban 127.0.0.3") == "Banned 127.0.0.3 until the server restarts"
    assert refused_at_connect(server.port, "127.0.0.3") == [
        "You are banned from this server until the server restarts (by alice)"
    ]
    assert ask(alice, "/ban [127.0.0.4] 10m").startswith("Banned 127.0.0.4 until ")
    assert (
        ask(alice, "/ban")
        == "Type /ban NICK|ADDRESS [DURATION] [REASON]; DURATION like 30m, 2h or 7d"
    )
    assert ask(alice, "/ban nobody 1h").startswith(
        "Not banned: nobody is neither an address nor the nickname of someone online"
    )
    assert ask(alice, "/ban 127.0.0.1") == "Not banned: 127.0.0.1 is your own address"
    assert ask(alice, "/ban 127.0.0.0/8") == "Not banned: 127.0.0.0/8 is your own address"
    assert ask(alice, "/ban alice") == "Not banned: 127.0.0.1 is your own address"
    assert ask(alice, "/unban 192.0.2.1") == "No ban on 192.0.2.1 (/bans lists them)"
    assert ask(alice, "/unban") == "Type /unban ADDRESS (/bans lists them)"
    assert ask(alice, "/unban not-an-address") == "No ban on not-an-address (/bans lists them)"
    # A network: everything in it.
    assert ask(alice, "/ban 127.0.1.0/24 spam") == "Banned 127.0.1.0/24 until the server restarts"
    assert refused_at_connect(server.port, "127.0.1.9") == [
        "You are banned from this server until the server restarts (by alice): spam"
    ]
    assert ask(alice, "/unban 127.0.1.0/24") == "Unbanned 127.0.1.0/24"


def test_a_ban_with_a_duration_ends_by_itself(room_server, join, connect):
    server = room_server()
    alice = join(server, "alice")
    become_op(alice)
    assert ask(alice, "/ban 127.0.0.5 1s").startswith("Banned 127.0.0.5 until ")
    assert refused_at_connect(server.port, "127.0.0.5")[0].startswith("You are banned")
    deadline = time.monotonic() + TIMEOUT
    while True:
        first = first_answer(server.port, "eve", "127.0.0.5")
        if first.startswith("Welcome to selchat, eve!"):
            break
        assert first.startswith("You are banned"), first
        assert time.monotonic() < deadline, "the ban did not end"
        time.sleep(0.2)


def test_unban_by_the_nickname_that_was_banned(room_server, join, connect):
    server = room_server()
    alice = join(server, "alice")
    connect(server.port, "mallory", source="127.0.0.2")
    become_op(alice)
    ask(alice, "/ban mallory", "^Banned")
    assert ask(alice, "/unban Mallory", "^Unbanned") == "Unbanned 127.0.0.2"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("10m", 600),
        ("2h", 7200),
        ("7d", 604800),
        ("1w", 604800),
        ("1.5h", 5400),
        ("0", None),
        ("-5m", None),
        ("5y", None),
        ("forever", None),
        ("", None),
    ],
)
def test_durations(text, seconds):
    assert selchat.parse_duration(text) == seconds


def test_networks_are_banned_as_the_limits_count_addresses():
    assert str(selchat.parse_network("203.0.113.7")) == "203.0.113.7/32"
    assert str(selchat.parse_network("2001:db8::1")) == "2001:db8::/64"
    assert str(selchat.parse_network("[2001:db8::1]")) == "2001:db8::/64"
    assert str(selchat.parse_network("2001:db8::/48")) == "2001:db8::/48"
    assert str(selchat.parse_network("::ffff:203.0.113.7")) == "203.0.113.7/32"
    assert str(selchat.parse_network("198.51.100.7/24")) == "198.51.100.0/24"
    assert selchat.parse_network("alice") is None
    assert selchat.parse_network("999.1.1.1") is None


# ---------------------------------------------------------------------------
# /topic
# ---------------------------------------------------------------------------


def test_topic_is_read_by_anyone_set_by_operators_told_to_all_and_in_the_welcome(
    room_server, join, connect
):
    server = room_server()
    alice = join(server, "alice")
    bob = join(server, "bob")
    assert ask(bob, "/topic") == "No topic is set"
    become_op(alice)
    alice.send_frame("/topic Release on Friday — ship it 🚀")
    for user in (alice, bob):
        wait_service(user, r"^alice set the topic: Release on Friday — ship it 🚀$")
    assert re.fullmatch(
        r"Topic: Release on Friday — ship it 🚀 \(set by alice, \d{4}-\d\d-\d\d \d\d:\d\d UTC\)",
        ask(bob, "/topic"),
    )
    carol = connect(server.port)
    welcome = carol.register("carol")
    assert welcome.endswith(
        "Type <quit< to leave. Limit: 100 messages a second, bursts of 1000. "
        "Topic: Release on Friday — ship it 🚀"
    ), welcome
    assert ask(alice, "/topic " + "x" * 401) == "Topic not set: at most 400 characters"
    alice.send_frame("/topic -")
    wait_service(bob, r"^alice cleared the topic$")
    assert ask(bob, "/topic") == "No topic is set"
    assert "Topic:" not in connect(server.port).register("dave")


def test_a_topic_cannot_change_the_clients_pacing():
    client = selchat.ChatClient.__new__(selchat.ChatClient)
    client._learn_limit(
        "Welcome to selchat, a! 1 user online. Type <quit< to leave. "
        "Topic: Limit: 0.01 messages a second, bursts of 1"
    )
    assert not hasattr(client, "pace")
    client._learn_limit(
        "Welcome to selchat, a! 1 user online. Type <quit< to leave. Limit: 100 "
        "messages a second, bursts of 1000. Topic: Limit: 0.01 messages a second, bursts of 1"
    )
    assert client.pace.rate == pytest.approx(90)


def test_help_lists_the_new_commands(room_server, join):
    alice = join(room_server(), "alice")
    text = ask(alice, "/help")
    for usage in (
        "/op PASSWORD",
        "/kick NICK [REASON]",
        "/ban NICK|ADDRESS [DURATION] [REASON]",
        "/unban ADDRESS",
        "/bans",
        "/topic [TEXT]",
        "/search WORDS",
    ):
        assert usage in text, usage


# ---------------------------------------------------------------------------
# --store: what a restart keeps
# ---------------------------------------------------------------------------


def test_a_restarted_server_replays_the_same_history_and_keeps_topic_and_bans(
    room_server, join, connect, tmp_path
):
    server = room_server(store=True)
    alice = join(server, "alice")
    bob = join(server, "bob")
    become_op(alice)
    alice.send_frame("/topic standup at 10")
    wait_service(bob, "set the topic")
    sent = []
    for number in range(5):
        text = "message %d: héllo мир 世界" % number
        bob.send_chat(text, nick="bob")
        sent.append(alice.recv_chat_skipping_notices())
    alice.send_frame("/me waves")
    sent.append(bob.recv_chat_skipping_notices())
    bob.send_frame("/msg alice a secret")
    assert bob.recv_chat_skipping_notices()[1] == "[private] bob -> alice"
    ask(alice, "/ban 127.0.0.9 spam", "^Banned")
    hang_up(locals())
    server.interrupt()

    restarted = room_server(store=True)
    dave = connect(restarted.port)
    welcome = dave.register("dave")
    assert welcome.endswith("Topic: standup at 10"), welcome
    begin, replayed = read_history(dave)
    assert begin == "--- 6 messages from before you joined ---"
    assert replayed == sent  # byte for byte as relayed, actions included
    assert all("secret" not in text for _, _, text in replayed)
    assert refused_at_connect(restarted.port, "127.0.0.9") == [
        "You are banned from this server for ever (by alice): spam"
    ]
    db = sqlite3.connect(str(tmp_path / "room.db"))
    assert db.execute("SELECT count(*) FROM messages WHERE text LIKE '%secret%'").fetchone() == (0,)
    assert db.execute("SELECT nick FROM messages ORDER BY id DESC LIMIT 1").fetchone() == (
        "* alice",
    )
    db.close()


def test_keep_bounds_what_is_replayed_and_kept(room_server, join, connect, tmp_path):
    server = room_server("--keep", "1", store=True)
    alice = join(server, "alice")
    bob = join(server, "bob")
    bob.send_chat("recent", nick="bob")
    alice.recv_chat_skipping_notices()
    hang_up(locals())
    server.interrupt()
    path = str(tmp_path / "room.db")
    db = sqlite3.connect(path)
    old = time.time() - 2 * 86400
    frame = selchat.encode_frame(chat_payload("ancient history", "bob"))
    with db:
        db.execute(
            "INSERT INTO messages (at, stamp, nick, text, frame) VALUES (?, ?, ?, ?, ?)",
            (old, "2000-01-01T00:00:00+00:00", "bob", "ancient history", frame),
        )
    db.close()
    restarted = room_server("--keep", "1", store=True)
    carol = connect(restarted.port, "carol")
    _, replayed = read_history(carol)
    assert [text for _, _, text in replayed] == ["recent"]
    assert search(carol, "ancient")[0] == 'No messages match "ancient"'
    hang_up(locals())
    restarted.interrupt()  # it deleted what is older than --keep when it opened the store
    db = sqlite3.connect(path)
    assert db.execute("SELECT text FROM messages").fetchall() == [("recent",)]
    db.close()


def test_without_store_search_says_why_and_nothing_is_written(start_server, join, tmp_path):
    server = start_server()
    alice = join(server, "alice")
    assert search(alice, "anything")[0] == (
        "Not searched: this server keeps no history on disk (it was started without --store)"
    )


def test_a_store_path_that_cannot_be_opened_is_one_line_and_exit_one(tmp_path):
    result = run_server_briefly("--store", str(tmp_path / "missing" / "room.db"))
    assert result.returncode == 1
    assert "cannot open the store" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# /search
# ---------------------------------------------------------------------------


def test_search_finds_words_in_several_scripts_phrases_and_nothing(room_server, join):
    server = room_server(store=True)
    alice = join(server, "alice")
    bob = join(server, "bob")
    texts = [
        "Deploying the build to staging",
        "Привет, мир! Сборка готова",
        "Γειά σου κόσμε",
        "你好世界，部署完成",
        "café au lait at the usual place",
        'he said "ship it now" and left',
        "unrelated chatter",
    ]
    for text in texts:
        bob.send_chat(text, nick="bob")
        alice.recv_chat_skipping_notices()
    bob.send_frame("/msg alice deploying secretly")
    alice.recv_chat_skipping_notices()
    bob.recv_chat_skipping_notices()

    def found(query):
        first, frames = search(alice, query)
        return first, [text for _, _, text in frames]

    assert found("deploy") == ('--- 1 message matching "deploy", oldest first ---', [texts[0]])
    assert found("DEPLOYING staging")[1] == [texts[0]]  # every word, any case
    assert found("мир")[1] == [texts[1]]
    assert found("СБОРКА")[1] == [texts[1]]
    assert found("κόσμε")[1] == [texts[2]]
    assert found("世界")[1] == [texts[3]]  # two characters: found by the scan
    assert found("部署完成")[1] == [texts[3]]
    assert found("café")[1] == [texts[4]]
    assert found('"ship it now"')[1] == [texts[5]]
    assert found('"it ship"') == ('No messages match "it ship"', [])
    assert found("the")[1] == [texts[0], texts[4]]  # oldest first
    assert found("zebra") == ('No messages match "zebra"', [])
    assert found('"unbalanced')[1] == []
    assert found("secretly") == ('No messages match "secretly"', [])  # never private ones
    assert found("") == ('Type /search WORDS ("a phrase" in quotes)', [])
    # Answers go to the one who asked alone.
    bob.sync(alice)


def test_search_gives_the_last_twenty_matches_oldest_first_with_time_and_author(room_server, join):
    server = room_server(store=True)
    alice = join(server, "alice")
    bob = join(server, "bob")
    for number in range(30):
        bob.send_chat(
            "numbered %02d" % number, nick="bob", stamp="2026-01-02T03:04:%02d+00:00" % number
        )
    for _ in range(30):
        alice.recv_chat_skipping_notices()
    first, frames = search(alice, "numbered")
    assert first == '--- 20 messages matching "numbered", oldest first ---'
    assert frames == [
        ("2026-01-02T03:04:%02d+00:00" % n, "bob", "numbered %02d" % n) for n in range(10, 30)
    ]


def test_search_is_rate_limited_like_other_costly_commands(room_server, join):
    server = room_server("--rate", "1", "--burst", "15", store=True)
    alice = join(server, "alice")
    assert search(alice, "x y z")[0].startswith("No messages match")
    alice.send_frame("/search again")
    answer = wait_service(alice, r"^(Slow down|No messages|Not searched)")[0]
    assert answer.startswith("Slow down"), answer


# ---------------------------------------------------------------------------
# A store that fails: the chat goes on
# ---------------------------------------------------------------------------


def _make_read_only(path):
    """Make a file unwritable even for root (chattr +i); plain chmod otherwise."""
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", path]).returncode:
            pytest.skip("running as root without chattr: a file cannot be made read-only")
        return lambda: subprocess.run(["chattr", "-i", path], check=False)
    os.chmod(path, 0o444)
    return lambda: os.chmod(path, 0o644)


def assert_chat_goes_on(server, alice, bob):
    for number in range(20):
        bob.send_chat("still chatting %d" % number, nick="bob")
    for number in range(20):
        assert alice.recv_chat_skipping_notices()[1:] == ("bob", "still chatting %d" % number)
    assert server.alive()


def test_a_read_only_database_degrades_to_memory_and_tells_operators(room_server, join, tmp_path):
    path = str(tmp_path / "room.db")
    server = room_server(store=True)
    alice = join(server, "alice")
    alice.send_chat("kept before", nick="alice")
    assert ask(alice, "/topic") == "No topic is set"  # the message was handled before it
    hang_up(locals())
    server.interrupt()
    for suffix in ("-wal", "-shm"):
        assert not os.path.exists(path + suffix)
    undo = _make_read_only(path)
    try:
        server = room_server(store=True)
        server.wait_for_log(
            r"the store .*room\.db failed \(.*\): the history is kept in memory only"
        )
        alice = join(server, "alice", history=True)  # what could be read is replayed
        bob = join(server, "bob", history=True)
        become_op(alice)
        notice = wait_service(alice, r"^The history cannot be stored")[0]
        assert notice.endswith("it is kept in memory only, and the chat goes on")
        assert_chat_goes_on(server, alice, bob)
        # The in-memory history still works for newcomers.
        carol = join(server, "carol")
        _, replayed = read_history(carol.peer)
        assert [t for _, _, t in replayed][-1] == "still chatting 19"
        assert server.log.count("failed (") == 1
    finally:
        undo()


def test_a_full_disk_degrades_to_memory_with_one_log_line(start_server, join, tmp_path):
    path = tmp_path / "room.db"
    # No file the server writes may grow past this: the database fills it up.
    # (A write past it fails with EFBIG, which SQLite reports as "disk I/O
    # error"; ENOSPC on a real full disk is "database or disk is full".)
    limit = 256 * 1024
    server = start_server("--ops-password", OPS, "--store", path, "--history", "5", fsize=limit)
    alice = join(server, "alice")
    bob = join(server, "bob")
    become_op(alice)
    text = "x" * 8000
    sent = 0
    deadline = time.monotonic() + TIMEOUT
    while not any(n.startswith("The history cannot be stored") for n in _services(alice)):
        for _ in range(10):
            bob.send_chat("%d %s" % (sent, text), nick="bob")
            sent += 1
        assert time.monotonic() < deadline, "the store never filled up"
    server.wait_for_log(r"the store .* failed \((database or disk is full|disk I/O error)\)")
    assert_chat_goes_on(server, alice, bob)
    assert server.log.count("failed (") == 1
    assert os.path.getsize(path) <= limit


def _services(user):
    """Drain what is waiting for user now; return its service messages."""
    found = []
    try:
        while True:
            payload = user.recv_frame(timeout=0.2)
            if b"\0" not in payload:
                found.append(payload.decode("utf-8"))
    except TimeoutError:
        return found


def test_a_locked_or_corrupt_database_degrades_and_the_chat_goes_on(room_server, join, tmp_path):
    path = str(tmp_path / "room.db")
    server = room_server(store=True)
    alice = join(server, "alice")
    bob = join(server, "bob")
    become_op(alice)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        bob.send_chat("while locked", nick="bob")
        assert alice.recv_chat_skipping_notices()[2] == "while locked"
        notice = wait_service(alice, r"^The history cannot be stored", timeout=TIMEOUT)[0]
        assert "database is locked" in notice
        assert_chat_goes_on(server, alice, bob)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    hang_up(locals())
    server.interrupt()
    with open(path, "wb") as file:
        file.write(b"this is not a database" * 100)
    server = room_server(store=True)
    server.wait_for_log(r"the store .* failed \(file is not a database\)")
    alice = join(server, "alice")
    bob = join(server, "bob")
    assert_chat_goes_on(server, alice, bob)
    assert search(alice, "chatting")[0].startswith("Not searched: the history cannot be read now")


def test_a_store_that_fails_works_again_once_it_can(tmp_path, monkeypatch):
    """In-process: the writer tries again after STORE_RETRY and says so."""
    monkeypatch.setattr(selchat, "STORE_RETRY", 0.2)
    path = str(tmp_path / "room.db")
    store = selchat.Store(path)
    assert store.open(10) == ([], None, [])
    store.start()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")

    def frames(*texts):
        return [selchat.encode_frame(chat_payload(t, "bob")) for t in texts]

    def next_event(kind):
        deadline = time.monotonic() + TIMEOUT
        while True:
            while store.inbox:
                got, value = store.inbox.popleft()
                if got == kind:
                    return value
            assert time.monotonic() < deadline, "no %r from the store" % kind
            time.sleep(0.02)

    try:
        store.write(frames("lost while locked"))
        assert "locked" in next_event("down")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    time.sleep(0.3)
    store.write(frames("stored again"))
    assert next_event("up") == 1  # one message was not stored meanwhile
    store.stop(TIMEOUT)
    stored, _, _ = selchat.Store(path).open(10)
    assert [selchat.unpack_stored(frame)[2] for frame in stored] == ["stored again"]


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


def test_the_client_never_writes_an_op_password_to_its_history_file(tmp_path):
    path = str(tmp_path / "history")
    for line in ("hello", "/op sesame", "/OP  sesame", "/opinion is fine"):
        selchat.remember(path, line)
    with open(path, encoding="utf-8") as file:
        assert file.read() == "hello\n/opinion is fine\n"


def test_the_client_completes_the_new_commands():
    editor = selchat.LineEditor()
    editor.insert("/se")
    editor.complete(["alice"])
    assert editor.text == "/search "


def test_the_index_and_the_scan_find_the_same_messages(tmp_path):
    """In-process: a search finds the same while the turns are not split into
    messages yet, once they are but not indexed (scanned), and once indexed."""
    store = selchat.Store(str(tmp_path / "room.db"))
    store.open(0)
    texts = [
        "Deploying the build",
        "Привет, мир",
        "你好世界",
        "café crème",
        "Straße gesperrt",
        'said "ship it now"',
        "DEPLOY again",
        *("filler %d" % n for n in range(30)),
        *("the deploy number %d" % n for n in range(25)),
    ]
    blob = b"".join(selchat.encode_frame(chat_payload(text, "bob")) for text in texts)
    half = selchat._frame_spans(blob)[len(texts) // 2][0]
    store._commit([(time.time(), blob[:half]), (time.time(), blob[half:])], [])
    queries = [
        "deploy",
        "МИР",
        "世界",
        "crème",
        '"ship it"',
        "deploy number",
        "zzz",
        "de",
        "STRAßE",
        "strasse",
    ]
    db = store._connect(1.0)
    unsplit = {q: store._find(q, 0, db) for q in queries}
    store._split()
    assert not store._unsplit
    before = {q: store._find(q, 0, db) for q in queries}
    assert store.indexed == 0
    while store._unindexed:
        store._index()
    assert store.indexed == len(texts)
    after = {q: store._find(q, 0, db) for q in queries}
    assert unsplit == before == after
    found = [selchat.unpack_stored(frame)[2] for frame in after["deploy"]]
    assert found == ["the deploy number %d" % n for n in range(5, 25)]  # the last 20
    assert [selchat.unpack_stored(f)[2] for f in after["世界"]] == ["你好世界"]
    assert after["zzz"] == []
    assert [selchat.unpack_stored(f)[2] for f in after["STRAßE"]] == ["Straße gesperrt"]
    assert after["strasse"] == []  # one letter at a time, as the index folds case
    db.close()
    store._close()


def test_a_room_that_is_never_quiet_still_gets_split_and_indexed(tmp_path, monkeypatch):
    monkeypatch.setattr(selchat, "STORE_TIDY_EVERY", 0.1)
    monkeypatch.setattr(selchat, "STORE_INDEX_IDLE", 60.0)  # never quiet enough
    store = selchat.Store(str(tmp_path / "room.db"))
    store.open(0)
    store.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        number = 0
        while not store.indexed:
            store.write([selchat.encode_frame(chat_payload("steady %d" % number, "bob"))])
            number += 1
            time.sleep(0.02)
            assert time.monotonic() < deadline, "never split and indexed"
    finally:
        store.stop(TIMEOUT)


def test_a_search_that_takes_too_long_is_stopped(tmp_path, monkeypatch):
    store = selchat.Store(str(tmp_path / "room.db"))
    store.open(0)
    texts = ["message %d about nothing in particular" % n for n in range(20000)]
    store._commit(
        [(time.time(), b"".join(selchat.encode_frame(chat_payload(t, "bob")) for t in texts))], []
    )
    store._split()
    while store._unsplit:
        store._split()
    monkeypatch.setattr(selchat, "SEARCH_TIME", 0.0)
    db = store._connect(1.0)
    with pytest.raises(sqlite3.OperationalError, match="interrupt"):
        store._find("世界", 0, db)
    db.close()
    store._close()


def test_reasons_are_bounded_like_the_topic(room_server, join):
    server = room_server()
    alice = join(server, "alice")
    join(server, "bob")
    become_op(alice)
    long = "x" * 401
    assert ask(alice, "/kick bob " + long) == "Not kicked: a reason has at most 400 characters"
    assert ask(alice, "/ban bob 1h " + long) == "Not banned: a reason has at most 400 characters"
    assert "bob (joined" in ask(alice, "/who")


def test_searches_are_bounded_for_the_whole_server(room_server, connect):
    """Each user runs one search at a time, and the server at most
    MAX_SEARCHES waiting, SEARCH_BURST at once and SEARCH_RATE a second: the
    rest are told it is busy."""
    server = room_server(store=True)
    # 30 addresses: one address may run only SEARCHES_PER_ADDRESS at once.
    users = [connect(server.port, "user%d" % n, source="127.0.1.%d" % n) for n in range(1, 31)]
    for user in users:
        user.send_frame("/search something")
    answers = [wait_service(user, r"^(No messages|Not searched)")[0] for user in users]
    busy = answers.count("Not searched: the server is busy searching; try again in a moment")
    assert 30 - busy >= min(selchat.SEARCH_BURST, selchat.MAX_SEARCHES)
    assert busy >= 5, answers
    assert answers.count('No messages match "something"') == 30 - busy


def test_the_store_is_readable_by_the_servers_user_alone(room_server, join, tmp_path):
    server = room_server(store=True)
    alice = join(server, "alice")
    alice.send_chat("private enough", nick="alice")
    assert ask(alice, "/topic") == "No topic is set"
    for name in os.listdir(str(tmp_path)):
        if name.startswith("room.db"):
            assert os.stat(str(tmp_path / name)).st_mode & 0o777 == 0o600, name


def test_topics_and_reasons_reach_the_log_inert(room_server, join, connect):
    server = room_server()
    alice = join(server, "alice")
    connect(server.port, "bob", source="127.0.0.2")
    become_op(alice)
    alice.send_frame("/topic \x1b[2Jcleared\x07")
    wait_service(alice, "set the topic")
    alice.send_frame("/kick bob \x1b]0;owned\x07")
    wait_service(alice, "kicked out")
    server.wait_for_log(r"bob .* disconnected: kicked out by alice")
    assert "\x1b" not in server.log and "\x07" not in server.log


def test_one_address_runs_two_searches_at_once_whatever_its_connections(room_server, connect):
    server = room_server(store=True)
    users = [connect(server.port, "user%d" % n) for n in range(10)]
    for user in users:
        user.send_frame("/search something")
    answers = [wait_service(user, r"^(No messages|Not searched)")[0] for user in users]
    refused = "Not searched: 2 searches from your address are running; try again in a moment"
    assert refused in answers, answers
    assert set(answers) <= {refused, 'No messages match "something"'}, answers


def test_a_search_has_few_words_and_a_mistyped_duration_bans_nobody(room_server, join):
    assert selchat.search_terms("a a b B c d e f g h i j") == list("abcdefgh")
    assert selchat.search_terms('STRASSE "Two Words"') == ["strasse", "two words"]
    server = room_server()
    alice = join(server, "alice")
    join(server, "bob")
    become_op(alice)
    assert ask(alice, "/ban bob 30min spam") == (
        "Not banned: 30min is no duration; DURATION is like 90s, 30m, 2h, 7d or 1w "
        "(at most 100 years)"
    )
    assert "bob (joined" in ask(alice, "/who")
