"""The interactive client: its width function, keys, line editor, and what a
person sees on the screen.

The screen tests run the real client in a pseudo-terminal of a fixed size and
feed everything it writes to a terminal emulator (pyte), then check what is on
the screen and in its scrollback: every message that arrived present exactly
once and in order, the typed line intact, the cursor where it was. They wait
for events with deadlines, never with bare sleeps.
"""

import io
import os
import re
import signal
import socket
import sys
import threading
import time
import unicodedata

import pyte
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wcwidth import wcwidth

import selchat
from selchat_testkit import (
    HERE,
    SCRIPT,
    SHUTDOWN_NOTICE,
    TIMEOUT,
    clean_env,
    frame,
    free_port,
    needs_pty,
    pexpect,
)
from test_features import start_on
from test_hostile import make_cert, tls_args  # noqa: F401 - make_cert: a fixture used here too

ROWS, COLS = 12, 40
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man ZWJ woman ZWJ girl
THUMBS = "\U0001f44d\ufe0f"  # a wide emoji with the emoji presentation selector
FLAG = "\U0001f1eb\U0001f1f7"  # two regional indicators
ACUTE = "e\u0301"  # e and a combining acute accent


# ---------------------------------------------------------------------------
# A terminal emulator that draws emoji sequences as one wide glyph
# ---------------------------------------------------------------------------


class ModernScreen(pyte.HistoryScreen):
    """pyte with what current terminals do and pyte does not: zero-width
    characters (ZWJ, variation selectors, format characters) join the glyph
    before them, and so do the emoji after a ZWJ, skin tones and the second of
    two regional indicators (pyte alone stops drawing at the first
    zero-width character that is not a combining mark)."""

    def __init__(self, columns, lines):
        super().__init__(columns, lines, history=5000, ratio=0.5)
        self._after_zwj = False
        self._open_flag = False

    def _previous_cell(self):
        y, x = self.cursor.y, min(self.cursor.x, self.columns) - 1
        if x < 0:
            return None
        if x > 0 and self.buffer[y][x].data == "" and wcwidth(self.buffer[y][x - 1].data[:1]) == 2:
            x -= 1
        return y, x

    def draw(self, data):
        for char in data:
            code = ord(char)
            width = wcwidth(char)
            regional = 0x1F1E6 <= code <= 0x1F1FF
            joins = (
                width <= 0
                or unicodedata.category(char) in ("Mn", "Me", "Cf")
                or 0x1F3FB <= code <= 0x1F3FF
                or (self._after_zwj and width == 2)
                or (self._open_flag and regional)
            )
            cell = self._previous_cell() if joins else None
            if cell is not None:
                y, x = cell
                self.buffer[y][x] = self.buffer[y][x]._replace(data=self.buffer[y][x].data + char)
                self._open_flag = False
            else:
                super().draw(char)
                self._open_flag = regional
            self._after_zwj = char == "\u200d"

    def rows(self):
        """Every row, the scrollback's first, as text with trailing blanks removed."""
        out = []
        for line in [*self.history.top, *(self.buffer[y] for y in range(self.lines))]:
            out.append("".join(line[x].data for x in range(self.columns)).rstrip())
        return out

    def display_rows(self):
        return [
            "".join(self.buffer[y][x].data for x in range(self.columns)) for y in range(self.lines)
        ]


class Term:
    """The real client in a pseudo-terminal, its output fed to a ModernScreen."""

    def __init__(self, child, rows=ROWS, cols=COLS):
        self.child = child
        self.screen = ModernScreen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()

    def pump(self, timeout=0.02):
        """Feed what the client wrote so far; True when something came."""
        try:
            data = self.child.read_nonblocking(65536, timeout=timeout)
        except pexpect.TIMEOUT:
            return False
        except pexpect.EOF:
            return False
        self.raw += data
        self.stream.feed(data)
        return True

    def wait(self, condition, what, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if condition():
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what} did not happen; screen:\n" + "\n".join(self.screen.rows()[-40:])
                )

    def settle(self, quiet=0.15):
        """Feed until the client has written nothing for ``quiet`` seconds."""
        while self.pump(quiet):
            pass

    def wait_text(self, text, timeout=TIMEOUT):
        self.wait(lambda: any(text in row for row in self.screen.rows()), repr(text), timeout)

    def send(self, data):
        self.child.send(data)

    def cursor(self):
        return self.screen.cursor.y, self.screen.cursor.x

    def resize(self, rows, cols):
        self.settle()
        self.screen.resize(rows, cols)
        self.child.setwinsize(rows, cols)

    def exit_status(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while self.child.isalive() and time.monotonic() < deadline:
            self.pump(0.05)
        self.settle(0.05)
        self.child.close()
        return self.child.exitstatus


@pytest.fixture
def term(tmp_path):
    """Factory: the client in a pseudo-terminal of rows x cols, as a Term."""
    terms = []

    def spawn(port, nick="alice", *extra, rows=ROWS, cols=COLS, **env_overrides):
        overrides = {
            "NO_COLOR": "1",
            "TERM": "xterm",
            "TZ": "UTC",
            "SELCHAT_HISTORY": str(tmp_path / "history"),
        }
        overrides.update(env_overrides)
        args = [str(SCRIPT), "client", "--host", "127.0.0.1", "--port", str(port)]
        if nick is not None:
            args += ["--nick", nick]
        child = pexpect.spawn(
            sys.executable,
            [*args, *extra],
            env=clean_env(**overrides),
            cwd=str(HERE),
            timeout=TIMEOUT,
            dimensions=(rows, cols),
        )
        child.logfile_read = io.BytesIO()
        terms.append(Term(child, rows, cols))
        return terms[-1]

    yield spawn
    for each in terms:
        child = each.child
        if child.isalive():
            child.kill(signal.SIGTERM)
            child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=3)
        if child.isalive():
            child.terminate(force=True)
        child.close(force=True)
        print("--- screen ---\n" + "\n".join(each.screen.rows()[-60:]))


def joined_term(term, server, nick="alice", online=2, **options):
    screen = term(server.port, nick, **options)
    screen.wait_text(f"Welcome to selchat, {nick}!")
    screen.wait(
        lambda: screen.screen.display_rows()[screen.cursor()[0]].startswith(nick + "> "), "prompt"
    )
    return screen


def region_text(screen, prompt="alice> "):
    """The rows from the prompt's down, joined: what the editor shows."""
    rows = screen.screen.display_rows()
    starts = [y for y, row in enumerate(rows) if row.startswith(prompt)]
    assert len(starts) == 1, rows
    return starts[0], rows[starts[0] :]


def assert_once_in_order(screen, texts):
    rows = screen.screen.rows()
    at = []
    for text in texts:
        hits = [y for y, row in enumerate(rows) if row.endswith(text)]
        assert len(hits) == 1, f"{text!r} shown {len(hits)} times:\n" + "\n".join(rows)
        at.append(hits[0])
    assert at == sorted(at), f"out of order: {at}"


def layout(text, width, prompt="alice> "):
    """An independent layout of prompt+text: rows of cells (clusters), and where
    each character index of text lands (row, col). Wide glyphs that do not
    fit go to the next row; a full last row is followed by an empty one."""
    rows, row, col, where = [], [], 0, {}
    units = [(c, None) for c in prompt]
    index = 0
    for cluster in selchat_clusters(text):
        units.append((cluster, index))
        index += len(cluster)
    for cluster, at in units:
        w = cluster_cols(cluster)
        if col + w > width:
            rows.append(row)
            row, col = [], 0
        if at is not None:
            where[at] = (len(rows), col)
        row.append(cluster)
        col += w
    if col >= width:
        rows.append(row)
        row, col = [], 0
    where[len(text)] = (len(rows), col)
    rows.append(row)
    return ["".join(r) for r in rows], where


def selchat_clusters(text):
    # The test's own idea of the clusters in the strings it uses.
    out = []
    for char in text:
        if out and (
            wcwidth(char) <= 0
            or unicodedata.category(char) in ("Mn", "Cf")
            or out[-1].endswith("\u200d")
            or (
                0x1F1E6 <= ord(char) <= 0x1F1FF
                and len(out[-1]) == 1
                and 0x1F1E6 <= ord(out[-1]) <= 0x1F1FF
            )
        ):
            out[-1] += char
        else:
            out.append(char)
    return out


def cluster_cols(cluster):
    return 2 if any(wcwidth(c) == 2 for c in cluster) else max(wcwidth(cluster[0]), 0)


def check_region(screen, typed, pos, cols=COLS, prompt="alice> "):
    """The typed line is shown whole below the prompt, and the cursor is at pos."""
    top, region = region_text(screen, prompt)
    expected, where = layout(typed, cols, prompt)
    shown = [row.rstrip() for row in region]
    assert shown[: len(expected)] == [row.rstrip() for row in expected], shown
    assert not any(shown[len(expected) :]), shown
    assert screen.cursor() == (top + where[pos][0], where[pos][1]), (
        screen.cursor(),
        top,
        where[pos],
    )


def type_line(screen, typed, moves=b"", pos=None, prompt="alice> "):
    screen.send(typed.encode())
    if moves:
        screen.send(moves)
    pos = len(typed) if pos is None else pos

    def shown():
        try:
            check_region(screen, typed, pos, screen.screen.columns, prompt)
        except AssertionError:
            return False
        return True

    screen.wait(shown, f"{typed!r} typed with the cursor at {pos}")


def flood(screen, bob, count, prefix="m"):
    texts = [f"{prefix}{i:02d}" for i in range(count)]
    for text in texts:
        bob.send_chat(text, nick="bob")
    screen.wait_text(f"bob: {texts[-1]}")
    screen.settle()
    return ["bob: " + text for text in texts]


# ---------------------------------------------------------------------------
# Screen tests: the real client in a pseudo-terminal
# ---------------------------------------------------------------------------

LONG = "the quick brown fox jumps over the lazy dog and keeps on running far"


@needs_pty
@pytest.mark.parametrize(
    "moves, pos",
    [(b"\x01", 0), (b"\x1b[D" * 30, len(LONG) - 30), (b"", len(LONG))],
    ids=["start", "middle", "end"],
)
def test_arrivals_above_a_wrapped_line_are_all_kept_and_the_line_and_cursor_stay(
    server, connect, term, moves, pos
):
    bob = connect(server.port, "bob", online=1)
    screen = joined_term(term, server)
    type_line(screen, LONG, moves, pos)
    shown = flood(screen, bob, 30)
    assert_once_in_order(screen, shown)
    check_region(screen, LONG, pos)


@needs_pty
@pytest.mark.parametrize(
    "length", [COLS - 7, 2 * COLS - 7, COLS - 8], ids=["one-row", "two-rows", "one-short"]
)
def test_a_line_exactly_as_wide_as_the_terminal_leaves_no_copy_of_the_prompt(
    server, connect, term, length
):
    bob = connect(server.port, "bob", online=1)
    screen = joined_term(term, server)
    typed = ("abcdefghij" * 10)[:length]
    type_line(screen, typed)
    shown = flood(screen, bob, 20)
    assert_once_in_order(screen, shown)
    check_region(screen, typed, len(typed))
    assert sum(row.startswith("alice>") for row in screen.screen.rows()) == 1
    screen.send(b"\x1b[D\x1b[D")
    check_region_eventually(screen, typed, len(typed) - 2)
    flood(screen, bob, 5, "n")
    check_region(screen, typed, len(typed) - 2)


def check_region_eventually(screen, typed, pos, prompt="alice> "):
    def shown():
        try:
            check_region(screen, typed, pos, screen.screen.columns, prompt)
        except AssertionError:
            return False
        return True

    screen.wait(shown, f"cursor at {pos}")
    check_region(screen, typed, pos, screen.screen.columns, prompt)


@needs_pty
def test_wide_and_zero_width_characters_are_measured_as_the_terminal_draws_them(
    server, connect, term
):
    bob = connect(server.port, "bob", online=1)
    screen = joined_term(term, server)
    typed = "中文" + THUMBS + " " + FAMILY + " caf" + ACUTE + " " + FLAG + " 漢字かな" * 4
    type_line(screen, typed)
    shown = flood(screen, bob, 15)
    check_region(screen, typed, len(typed))
    screen.send(b"\x01" + b"\x1b[C" * 3)  # after 中, 文 and the thumbs up
    pos = len("中文" + THUMBS)
    check_region_eventually(screen, typed, pos)
    shown += flood(screen, bob, 15, "n")
    assert_once_in_order(screen, shown)
    check_region(screen, typed, pos)
    screen.send(b"\r")
    assert bob.recv_chat_skipping_notices()[1:] == ("alice", typed)


@needs_pty
def test_after_a_resize_the_line_is_drawn_again_for_the_new_width(server, connect, term):
    bob = connect(server.port, "bob", online=1)
    screen = joined_term(term, server)
    type_line(screen, LONG, b"\x1b[D" * 10, len(LONG) - 10)
    shown = flood(screen, bob, 5)
    screen.resize(ROWS, 30)
    check_region_eventually(screen, LONG, len(LONG) - 10)
    shown += flood(screen, bob, 20, "n")
    check_region(screen, LONG, len(LONG) - 10, cols=30)
    assert_once_in_order(screen, shown)
    screen.resize(ROWS + 3, 50)
    check_region_eventually(screen, LONG, len(LONG) - 10)
    shown += flood(screen, bob, 5, "o")
    check_region(screen, LONG, len(LONG) - 10, cols=50)
    assert_once_in_order(screen, shown)


@needs_pty
def test_a_bracketed_paste_during_a_flood_sends_every_line_in_order_and_loses_nothing(
    server, connect, term, piped_client
):
    bob = connect(server.port, "bob", online=1)
    screen = joined_term(term, server)
    type_line(screen, "half typed")
    bot = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "bot")
    screen.wait_text("bot joined the chat")
    flood_lines = [f"f{i:03d}" for i in range(150)]
    bot.write("".join(line + "\n" for line in flood_lines[:75]))
    pasted = [f"p{i:02d}" for i in range(25)]
    screen.send(b"\x1b[200~" + "\n".join(pasted).encode() + b"\n\x1b[201~")
    bot.write("".join(line + "\n" for line in flood_lines[75:]))
    screen.wait_text("bot: f149")
    screen.wait_text("alice: p24")
    screen.settle()
    assert_once_in_order(screen, ["bot: " + line for line in flood_lines])
    sent = ["half typed" + pasted[0], *pasted[1:]]
    assert_once_in_order(screen, ["alice: " + line for line in sent])
    received = []
    while len(received) < len(pasted):
        _stamp, nick, text = bob.recv_chat_skipping_notices()
        if nick == "alice":
            received.append(text)
    assert received == sent
    check_region(screen, "", 0)
    assert sum(row.startswith("alice>") for row in screen.screen.rows()) == 1


@needs_pty
@pytest.mark.parametrize("how", ["ctrl-c", "shutdown", "sigterm"])
def test_leaving_takes_a_wrapped_half_typed_line_off_the_screen(server, connect, term, how):
    screen = joined_term(term, server, online=1)
    type_line(screen, LONG, b"\x01", 0)
    if how == "ctrl-c":
        screen.send(b"\x03")
    elif how == "shutdown":
        server.proc.send_signal(signal.SIGINT)
    else:
        screen.child.kill(signal.SIGTERM)
    assert screen.exit_status() == 0
    rows = screen.screen.rows()
    assert not any("quick brown" in row or "running far" in row for row in rows), rows
    if how == "shutdown":
        assert any(row.endswith("Goodbye!") for row in rows)


def prompt_row(screen):
    """The row that holds the prompt (the one the region starts with)."""
    rows = screen.screen.display_rows()
    found = [row for row in rows if re.match(r"alice( \([^)]*\))?> ", row)]
    return found[0] if len(found) == 1 else None


@needs_pty
def test_the_prompt_shows_the_state_and_each_attempt_replaces_the_last_notice(start_server, term):
    port = free_port()
    first = start_on(start_server, port)
    screen = term(port, cols=80, rows=16)
    screen.wait_text("Welcome to selchat, alice!")
    type_line(screen, "a draft")
    first.proc.kill()
    screen.wait(lambda: (prompt_row(screen) or "").startswith("alice (reconnecting in "), "state")
    waits = []

    def third_try():
        rows = screen.screen.rows()
        waits[:] = [
            float(w) for row in rows for w in re.findall(r"Reconnecting in (\d+\.\d) s", row)
        ]
        return bool(waits) and waits[-1] >= 0.7

    screen.wait(third_try, "a failed attempt")
    rows = screen.screen.rows()
    assert len(waits) == 1, rows  # one status row, replaced at each attempt
    assert not any("lost:" in row for row in rows), rows
    row = prompt_row(screen)
    prompt = row[: row.index("> ") + 2]
    check_region(screen, "a draft", 7, 80, prompt)
    second = start_on(start_server, port)
    screen.wait_text("Welcome to selchat, alice! 1 user online.")
    screen.wait(lambda: (prompt_row(screen) or "").startswith("alice> "), "connected prompt")
    check_region(screen, "a draft", 7, 80)
    screen.send(b"\r")
    screen.wait_text("alice: a draft")
    assert second.alive


@needs_pty
def test_a_taken_nickname_is_asked_again_and_giving_up_exits_one(server, connect, term):
    connect(server.port, "alice", online=1)
    screen = term(server.port, cols=80)
    screen.wait_text('Nickname rejected: "alice" is already in use')
    screen.wait_text("Nickname:")
    screen.send(b"\x04")
    assert screen.exit_status() == 1
    rows = screen.screen.rows()
    assert sum("Nickname rejected" in row for row in rows) == 1
    assert any(row.startswith("selchat: cannot join 127.0.0.1") for row in rows), rows


@needs_pty
def test_a_wrong_password_is_asked_again(start_server, connect, term):
    server = start_server("--password", "sesame")
    screen = term(server.port, "alice", "--password", "wrong", cols=80)
    screen.wait_text("Wrong password")
    screen.wait_text("Password:")
    screen.send(b"sesame\r")
    screen.wait_text("Welcome to selchat, alice!")
    assert sum("Wrong password" in row for row in screen.screen.rows()) == 1


@needs_pty
def test_ctrl_z_suspends_and_fg_gives_the_line_back(server, term):
    screen = joined_term(term, server, online=1)
    type_line(screen, "before")
    screen.send(b"\x1a")
    pid = screen.child.pid

    def stopped():
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("T")

    screen.wait(stopped, "the client stopped")
    screen.settle()
    assert prompt_row(screen) is None  # the line was taken off for the shell
    os.kill(pid, signal.SIGCONT)
    screen.wait(lambda: prompt_row(screen) is not None, "the line drawn again")
    screen.send(b" and after")
    check_region_eventually(screen, "before and after", 16)
    screen.send(b"\r")
    screen.wait_text("alice: before and after")


@needs_pty
def test_tab_completes_nicknames_from_notices_and_command_names(server, connect, term):
    screen = joined_term(term, server, online=1)
    connect(server.port, "bobby", online=2)
    screen.wait_text("bobby joined the chat")
    screen.send(b"b\t")
    check_region_eventually(screen, "bobby: ", 7)
    screen.send(b"\x15/wh\t")
    check_region_eventually(screen, "/who ", 5)
    screen.send(b"\r")
    screen.wait_text("  bobby (joined")
    screen.wait_text("  alice (joined")


@needs_pty
def test_typed_lines_are_kept_in_the_history_file_between_runs(server, term, tmp_path):
    screen = joined_term(term, server, online=1)
    type_line(screen, "remember me")
    screen.send(b"\r")
    screen.wait_text("alice: remember me")
    screen.send(b"/quit\r")
    assert screen.exit_status() == 0
    assert (tmp_path / "history").read_text() == "remember me\n/quit\n"
    again = joined_term(term, server, online=1)
    again.send(b"\x1b[A\x1b[A")
    check_region_eventually(again, "remember me", 11)


@needs_pty
def test_a_one_megabyte_message_is_folded_and_the_line_stays(server, connect, term):
    bob = connect(server.port, "bob", online=1)
    screen = joined_term(term, server, cols=80, rows=24)
    type_line(screen, "typing on")
    bob.send_chat("z" * 1_000_000, nick="bob")
    bob.send_chat("after the big one", nick="bob")
    screen.wait_text("bob: after the big one")
    screen.settle()
    rows = screen.screen.rows()
    assert any(row.endswith("(998,000 more characters)") for row in rows), rows[-30:]
    assert sum(row.count("z") for row in rows) == selchat.MAX_SHOWN
    check_region(screen, "typing on", 9, 80)


class HostileServer:
    """A server that welcomes oddly, sends a far-future time and then a frame
    that never ends, and never closes."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        self.conns.append(conn)
        conn.recv(1024)
        welcome = "Welcome \x1b[2J\x1b]0;pwned\x07 <quit< " + "w" * 3000
        conn.sendall(frame(welcome.encode()))
        conn.sendall(frame(b"--- 1 message from before you joined ---"))
        conn.sendall(frame(b"9999-12-31T23:59:59-23:59\0mallory\0from the far future"))
        conn.sendall(frame(b"--- end of earlier messages ---"))
        conn.sendall(frame("+99999-01-01T00:00:00Z\0\u202emallory\u200b\0odd time".encode()))
        conn.sendall(b"209715200 " + b"x" * 100_000)  # 200 MB announced, never all sent
        while conn.recv(65536):  # until the client leaves
            pass
        conn.close()

    def close(self):
        for conn in self.conns:
            conn.close()
        self.listener.close()


@needs_pty
def test_a_hostile_server_cannot_crash_hang_or_repaint_the_client(term):
    hostile = HostileServer()
    try:
        screen = term(hostile.port, cols=80, rows=24)
        screen.wait_text("odd time")
        type_line(screen, "still typing")
        rows = screen.screen.rows()
        assert any("mallory: from the far future" in row for row in rows), rows
        assert any("\\u202emallory\\u200b: odd time" in row for row in rows), rows
        assert b"\x1b]0;pwned" not in bytes(screen.raw) and b"\x1b[2J" not in bytes(screen.raw)
        screen.send(b"\x03")
        started = time.monotonic()
        assert screen.exit_status() == 0  # after waiting a little for the server to close
        assert time.monotonic() - started < 5
        assert b"Traceback" not in bytes(screen.raw)
    finally:
        hostile.close()


@needs_pty
def test_on_a_dumb_terminal_an_arrival_starts_on_a_new_line_without_cursor_movement(
    server, connect, term
):
    bob = connect(server.port, "bob", online=1)
    screen = term(server.port, TERM="dumb")
    screen.wait_text("Welcome to selchat, alice!")
    bob.recv_service()
    screen.send(b"half")
    screen.wait_text("half")
    bob.send_chat("in between", nick="bob")
    screen.wait_text("bob: in between")
    screen.send(b" done\r")
    assert bob.recv_chat()[1:] == ("alice", "half done")
    screen.wait_text("alice: half done")
    rows = [row for row in screen.screen.rows() if row]
    at = rows.index(next(row for row in rows if row.endswith("bob: in between")))
    assert rows[at - 1] == "half" and rows[at + 1] == "half done", rows
    assert b"\x1b[" not in bytes(screen.raw)


@needs_pty
def test_with_256_colours_nicks_get_one_of_many_and_own_messages_stand_out(server, connect, term):
    bob = connect(server.port, "bob", online=1)
    screen = term(server.port, TERM="xterm-256color", NO_COLOR=None, FORCE_COLOR="1")
    screen.wait_text("Welcome to selchat, alice!")
    bob.recv_service()
    bob.send_chat("hi", nick="bob")
    screen.wait_text("bob: hi")
    screen.send(b"hello\r")
    screen.wait_text("alice: hello")
    raw = bytes(screen.raw)
    bob_colour = selchat.nick_color("bob", selchat.NICK_COLORS_256)
    assert f"\x1b[{bob_colour}mbob\x1b[0m: hi".encode() in raw
    alice_colour = selchat.nick_color("alice", selchat.NICK_COLORS_256)
    assert f"\x1b[{alice_colour}m{selchat.OWN_STYLE}alice\x1b[0m: hello".encode() in raw
    assert re.search(
        rb"\[\d\d:\d\d:\d\d\] \x1b\[1;31mbob|\[\d\d:\d\d:\d\d\] \x1b\[1;31mWelcome", raw
    )


def test_pipe_mode_reports_lines_left_unsent_at_the_goodbye_and_shows_only_what_went(
    start_server, connect, piped_client
):
    server = start_server("--rate", "4", "--burst", "2")
    bob = connect(server.port, "bob", online=1)
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "alice")
    client.write("".join(f"line {i}\n" for i in range(40)))
    client.wait_for_output(b"alice: line 2")
    server.proc.send_signal(signal.SIGINT)
    assert client.wait_exit() == 1
    out = bytes(client.out).decode()
    err = bytes(client.err).decode()
    assert out.rstrip("\n").endswith(SHUTDOWN_NOTICE), out
    shown = re.findall(r"alice: (line \d+)$", out, re.M)
    assert shown == [f"line {i}" for i in range(len(shown))]
    unsent = int(
        re.fullmatch(
            r"selchat: the server at \S+ said goodbye before (\d+) lines went out\n", err
        ).group(1)
    )
    assert len(shown) + unsent == 40, (shown, err)
    received = []
    while True:
        payload = bob.recv_frame()
        if payload == SHUTDOWN_NOTICE.encode():
            break
        if payload.count(b"\0") == 2 and b"\0alice\0" in payload:
            received.append(payload.split(b"\0")[2].decode())
    # what the server relayed before its goodbye was all shown as sent (a line
    # handed over as the server stopped reading is shown and never relayed)
    assert received == shown[: len(received)] and len(received) >= len(shown) - 2, (out, err)


# ---------------------------------------------------------------------------
# Unit: widths
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "char, width",
    [
        ("a", 1),
        ("中", 2),
        ("Ｗ", 2),  # fullwidth
        ("\u0301", 0),  # combining acute
        ("\u20dd", 0),  # enclosing circle (Me)
        ("\u200d", 0),  # ZWJ
        ("\ufe0f", 0),  # variation selector 16
        ("\u200b", 0),  # zero-width space (Cf)
        ("\x00", 0),
        ("\u00ad", 1),  # the soft hyphen is drawn
        ("é", 1),
    ],
)
def test_char_width_gives_each_character_the_columns_a_terminal_draws(char, width):
    assert selchat.char_width(char) == width


@pytest.mark.parametrize(
    "text, width",
    [
        ("hello", 5),
        ("中文", 4),
        (ACUTE, 1),
        (THUMBS, 2),
        ("\u2764\ufe0f", 2),  # a text-default heart in emoji presentation
        (FAMILY, 2),
        (FLAG, 2),
        ("\U0001f44d\U0001f3fd", 2),  # thumbs up, medium skin tone
        ("a" + FAMILY + "b", 4),
        ("\U0001f1eb", 1),  # a lone regional indicator (narrow in Unicode's tables)
        ("a\u200db", 2),  # a ZWJ between letters joins nothing
        ("", 0),
    ],
)
def test_text_width_counts_emoji_sequences_as_one_wide_glyph(text, width):
    assert selchat.text_width(text) == width


def test_clusters_keep_each_glyph_whole():
    assert selchat.clusters("a" + FAMILY + THUMBS + FLAG + FLAG + ACUTE) == [
        "a",
        FAMILY,
        THUMBS,
        FLAG,
        FLAG,
        ACUTE,
    ]
    assert selchat.clusters("a\u200db") == ["a\u200d", "b"]


def test_wrap_runs_hangs_continuation_rows_under_the_text_so_nothing_fakes_a_line():
    head = [("", "[12:00:00] eve: ")]
    fake = "x" * 24 + "[12:00:01] admin: all is well"
    rows = selchat.wrap_runs([*head, ("", fake)], 40, selchat.text_width(head[0][1]))
    assert rows[0].startswith("[12:00:00] eve: ")
    assert all(row.startswith(" " * 16) for row in rows[1:]), rows
    assert all(selchat.text_width(row) <= 40 for row in rows)


def test_wrap_runs_breaks_after_a_space_and_keeps_styles_per_row():
    rows = selchat.wrap_runs([("", "[t] "), ("\x1b[1m", "aaa bbb ccc")], 10, 4)
    assert rows == ["[t] \x1b[1maaa \x1b[0m", "    \x1b[1mbbb \x1b[0m", "    \x1b[1mccc\x1b[0m"]


def test_a_huge_message_costs_the_client_well_under_ten_milliseconds():
    # What the client does with a 1 MB message: fold, mention search, sanitise,
    # format and wrap what is shown. Measured: the best of five runs.
    text = ("hello alice, " + "x" * 90 + "\t\x1b[2J中文 ") * 9000
    assert len(text.encode()) > 1_000_000
    formatter = selchat.Formatter(color=True)
    payload = selchat.pack_message(text, "bob")
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        stamp, field, body = selchat.unpack_message(payload)
        shown = selchat.fold(body)
        mentions = selchat.find_mentions(shown, "alice")
        head, runs = formatter.chat(stamp, field, shown, mentions)
        rows = selchat.wrap_runs(head + runs, 80, selchat.text_width(selchat.plain(head)))
        best = min(best, time.perf_counter() - started)
    print(f"a {len(payload):,}-byte message costs {best * 1000:.2f} ms")
    assert best < (0.010 if sys.gettrace() is None else 0.050), best  # coverage slows it
    words = " ".join(row.strip() for row in rows).split()
    assert words[-3:] == [f"({len(text) - selchat.MAX_SHOWN:,}", "more", "characters)"], words[-4:]
    assert "\x1b[2J" not in "".join(rows)


def test_find_mentions_is_linear_on_a_megabyte():
    text = "alicealicealice " * 70_000
    started = time.perf_counter()
    spans = selchat.find_mentions(text, "alice")
    assert time.perf_counter() - started < 0.25
    assert spans == []


def test_fold_counts_what_is_not_shown():
    assert selchat.fold("abc") == "abc"
    folded = selchat.fold("y" * (selchat.MAX_SHOWN + 1_234_567))
    assert folded.endswith(" \u2026 (1,234,567 more characters)")


def test_nicknames_are_shown_with_invisible_characters_escaped():
    assert selchat.shown_nick("bob\u200b") == "bob\\u200b"
    assert selchat.shown_nick("\u3164") == "\\u3164"
    assert selchat.shown_nick("bob\x1b[31m") == "bob\\x1b[31m"
    assert selchat.shown_nick("Zoë") == "Zoë"


def test_nick_colour_ignores_case_and_the_256_palette_has_no_red():
    assert selchat.nick_color("Alice") == selchat.nick_color("alice")
    assert selchat.nick_color("ALICE", selchat.NICK_COLORS_256) == selchat.nick_color(
        "alice", selchat.NICK_COLORS_256
    )
    assert len(selchat.NICK_COLORS_256) >= 60
    for code in selchat.NICK_COLORS_256:
        index = int(code.split(";")[2]) - 16
        red, green, blue = index // 36, index // 6 % 6, index % 6
        assert red <= max(green, blue), code
    colours = {selchat.nick_color(f"user{i}", selchat.NICK_COLORS_256) for i in range(10)}
    assert len(colours) >= 8


def test_who_and_help_answers_are_split_one_item_a_line():
    who = (
        "3 users online: alice (joined 5 s ago), bob (joined 1 min ago), "
        "carol (joined 2 h 3 min ago)"
    )
    assert selchat.split_notice(who) == [
        "3 users online:",
        "  alice (joined 5 s ago)",
        "  bob (joined 1 min ago)",
        "  carol (joined 2 h 3 min ago)",
    ]
    help_text = (
        "Commands: /help: this list; /who: who is online. Start a message with // to send "
        "it with a single /. Type <quit< to leave."
    )
    assert selchat.split_notice(help_text) == [
        "Commands:",
        "  /help: this list",
        "  /who: who is online",
        "Start a message with // to send it with a single /. Type <quit< to leave.",
    ]
    assert selchat.split_notice("bob joined the chat (2 online)") == [
        "bob joined the chat (2 online)"
    ]
    assert selchat.names_in_notice("bob, carol and dave joined the chat (4 online)") == (
        ["bob", "carol", "dave"],
        [],
    )
    assert selchat.names_in_notice("a, b and 3 others left the chat (1 online)") == ([], ["a", "b"])
    assert selchat.names_in_notice("bob is now known as robert") == (["robert"], ["bob"])
    assert selchat.names_in_notice(who)[0] == ["alice", "bob", "carol"]


# ---------------------------------------------------------------------------
# Unit: keys
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, name",
    [
        (b"\x1b[H", "home"),
        (b"\x1b[F", "end"),
        (b"\x1bOH", "home"),
        (b"\x1bOF", "end"),
        (b"\x1b[1~", "home"),
        (b"\x1b[4~", "end"),
        (b"\x1b[7~", "home"),
        (b"\x1b[8~", "end"),
        (b"\x1b[3~", "delete"),
        (b"\x1b[A", "up"),
        (b"\x1bOB", "down"),
        (b"\x1b[C", "right"),
        (b"\x1b[D", "left"),
        (b"\x1bb", "word-left"),
        (b"\x1bf", "word-right"),
        (b"\x1b[1;5D", "word-left"),
        (b"\x01", "home"),
        (b"\x05", "end"),
        (b"\x02", "left"),
        (b"\x06", "right"),
        (b"\x7f", "backspace"),
        (b"\x08", "backspace"),
        (b"\x0b", "kill-end"),
        (b"\x15", "kill-start"),
        (b"\x17", "rubout-word"),
        (b"\x19", "yank"),
        (b"\x0c", "clear"),
        (b"\x12", "search"),
        (b"\t", "complete"),
        (b"\r", "enter"),
        (b"\x03", "interrupt"),
        (b"\x04", "eof"),
        (b"\x1a", "suspend"),
    ],
)
def test_key_reader_knows_the_common_sequences_whole_and_cut_anywhere(data, name):
    assert selchat.KeyReader().feed(data) == [("key", name)]
    for cut in range(1, len(data)):
        reader = selchat.KeyReader()
        keys = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert keys == [("key", name)], (data, cut)


def test_key_reader_decodes_utf8_cut_between_reads_and_reads_pastes_whole():
    reader = selchat.KeyReader()
    assert reader.feed("中".encode()[:2]) == []
    assert reader.feed("中".encode()[2:] + b"x") == [("text", "中x")]
    paste = b"\x1b[200~one\r\ntwo\x1b[D\x1b[201~"
    for cut in range(1, len(paste)):
        reader = selchat.KeyReader()
        assert reader.feed(paste[:cut]) + reader.feed(paste[cut:]) == [
            ("paste", "one\r\ntwo\x1b[D")
        ], cut


def test_a_lone_escape_waits_briefly_then_is_dropped_and_what_follows_is_typed():
    reader = selchat.KeyReader()
    assert reader.feed(b"ab\x1b", now=5.0) == [("text", "ab")]
    assert reader.waiting and reader.since == 5.0
    assert reader.flush() == []
    assert not reader.waiting
    assert reader.feed(b"c") == [("text", "c")]
    assert reader.feed(b"\x1b\x1b[D") == [("key", "left")]


# ---------------------------------------------------------------------------
# Unit: the line editor
# ---------------------------------------------------------------------------


def editor_with(text, pos=None):
    editor = selchat.LineEditor()
    editor.insert(text)
    if pos is not None:
        editor.pos = pos
    return editor


def test_editor_moves_by_glyphs_and_words():
    editor = editor_with("a" + FAMILY + "b")
    editor.key("left")
    editor.key("left")
    assert editor.pos == 1
    editor.key("right")
    assert editor.pos == 1 + len(FAMILY)
    editor.key("backspace")
    assert editor.text == "ab"
    editor = editor_with("one two  three", 14)
    editor.key("word-left")
    assert editor.pos == 9
    editor.key("word-left")
    assert editor.pos == 4
    editor.key("word-right")
    assert editor.pos == 7
    editor.key("home")
    editor.key("delete")
    assert editor.text == "ne two  three" and editor.pos == 0
    editor.key("end")
    assert editor.pos == len(editor.text)


def test_editor_kills_and_yanks_like_readline():
    editor = editor_with("hello big world", 6)
    editor.key("kill-end")
    assert (editor.text, editor.kill) == ("hello ", "big world")
    editor.key("yank")
    assert editor.text == "hello big world" and editor.pos == 15
    editor.key("rubout-word")
    assert (editor.text, editor.kill) == ("hello big ", "world")
    editor.key("kill-start")
    assert (editor.text, editor.pos, editor.kill) == ("", 0, "hello big ")
    editor = editor_with("abc", 1)
    editor.key("eof")  # Ctrl+D on a line with text deletes forward
    assert editor.text == "ac"


def test_editor_history_recalls_lines_and_keeps_the_draft():
    editor = selchat.LineEditor(["first", "second"])
    editor.insert("draft")
    editor.key("up")
    assert editor.text == "second"
    editor.key("up")
    editor.key("up")
    assert editor.text == "first"
    editor.key("down")
    editor.key("down")
    assert editor.text == "draft"
    assert editor.key("enter") == "draft"
    assert editor.history == ["first", "second", "draft"] and editor.text == ""
    editor.insert("draft")
    assert editor.key("enter") == "draft"
    assert editor.history.count("draft") == 1


def test_editor_reverse_search_finds_older_lines_and_can_be_cancelled():
    editor = selchat.LineEditor(["say hi", "/who", "say bye", "other"])
    editor.insert("typing")
    editor.key("search")
    editor.insert("say")
    assert editor.text == "say bye"
    assert editor.prompt_for("> ") == "(reverse-i-search)`say': "
    editor.key("search")
    assert editor.text == "say hi"
    editor.key("cancel")
    assert (editor.text, editor.search) == ("typing", None)
    editor.key("search")
    editor.insert("who")
    editor.key("end")  # takes the line found, and moves
    assert editor.text == "/who" and editor.search is None and editor.pos == 4
    editor.key("search")
    editor.insert("oth")
    assert editor.key("enter") == "other"


def test_editor_completes_nicknames_and_commands_with_tab():
    editor = editor_with("al")
    assert editor.complete(["Alice", "bob"]) == []
    assert editor.text == "Alice: "
    editor = editor_with("hi b")
    assert editor.complete(["Alice", "bob", "bobby"]) == []
    assert editor.text == "hi bob"
    assert editor.complete(["Alice", "bob", "bobby"]) == ["bob", "bobby"]
    editor = editor_with("/w")
    editor.complete([])
    assert editor.text == "/who "
    editor = editor_with("/m")
    assert editor.complete([]) == ["/me", "/msg"]


def test_editor_render_knows_its_rows_at_the_exact_width_boundary():
    editor = editor_with("x" * 13)
    drawn = editor.render("alice> ", 20)
    assert drawn == "alice> " + "x" * 13 + "\r\n\r"  # full: on to the next row, explicitly
    assert editor.cursor_row == 1
    assert editor.clear() == "\x1b[1A\r\x1b[J"
    editor.key("home")
    drawn = editor.render("alice> ", 20)
    assert drawn.endswith("\r\n\x1b[1A\r\x1b[7C") and editor.cursor_row == 0
    assert editor.clear() == "\r\x1b[J"


# ---------------------------------------------------------------------------
# Property: random keystrokes and arrivals, the editor against an emulator
# ---------------------------------------------------------------------------

ACTIONS = st.one_of(
    st.tuples(st.just("type"), st.text(alphabet="ab c中文xyz", min_size=1, max_size=6)),
    st.tuples(
        st.just("key"),
        st.sampled_from(["left", "right", "home", "end", "backspace", "delete"]),
    ),
    st.tuples(st.just("arrive"), st.integers(1, 4)),
    st.tuples(st.just("enter"), st.just("")),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.sampled_from([10, 17, 24]),
    actions=st.lists(ACTIONS, min_size=1, max_size=40),
)
def test_random_keys_and_arrivals_never_lose_a_message_or_the_line(width, actions):
    height = 8
    emulator = ModernScreen(width, height)
    stream = pyte.Stream(emulator)
    terminal = selchat.Terminal("full", selchat.LineEditor())
    terminal.width, terminal.height = width, height
    terminal.write = stream.feed
    terminal.prompt = "> "
    terminal.start()
    model, cursor, arrived = [], 0, []
    for kind, value in actions:
        if kind == "type":
            terminal.editor.insert(value)
            model[cursor:cursor] = list(value)
            cursor += len(value)
            terminal.redraw()
        elif kind == "key":
            terminal.editor.key(value)
            if value == "left":
                cursor = max(cursor - 1, 0)
            elif value == "right":
                cursor = min(cursor + 1, len(model))
            elif value == "home":
                cursor = 0
            elif value == "end":
                cursor = len(model)
            elif value == "backspace" and cursor:
                del model[cursor - 1]
                cursor -= 1
            elif value == "delete" and cursor < len(model):
                del model[cursor]
            terminal.redraw()
        elif kind == "arrive":
            for _ in range(value):
                arrived.append(f"m{len(arrived)}")
                terminal.show(([("", "b: ")], [("", arrived[-1])]))
        else:
            line = terminal.editor.key("enter")
            assert line == "".join(model)
            model, cursor = [], 0
            terminal.line_done()
        terminal.flush()
        # every arrival once, in order
        rows = emulator.rows()
        at = [[y for y, row in enumerate(rows) if row == "b: " + text] for text in arrived]
        assert all(len(hits) == 1 for hits in at), rows
        assert [hits[0] for hits in at] == sorted(hits[0] for hits in at)
        # the line as the model says, the cursor where it belongs
        display = emulator.display_rows()
        starts = [y for y, row in enumerate(display) if row.startswith("> ")]
        assert len(starts) == 1, display
        expected, where = layout("".join(model), width, "> ")
        region = [row.rstrip() for row in display[starts[0] :]]
        assert region[: len(expected)] == [row.rstrip() for row in expected], (region, expected)
        assert not any(region[len(expected) :]), region
        row, col = where[cursor]
        assert (emulator.cursor.y, emulator.cursor.x) == (starts[0] + row, col)


def test_a_line_taller_than_the_screen_shows_the_rows_around_the_cursor():
    editor = editor_with("x" * 100)
    drawn = editor.render("> ", 10, max_rows=4)
    assert drawn.count("\r\n") == 3 and editor.cursor_row == 3
    editor.key("home")
    drawn = editor.render("> ", 10, max_rows=4)
    assert drawn.startswith("> xxxxxxxx\r\n") and drawn.count("\r\n") == 3
    assert drawn.endswith("\x1b[3A\r\x1b[2C") and editor.cursor_row == 0


def test_tabs_in_messages_are_expanded_and_other_controls_escaped():
    formatter = selchat.Formatter(color=False)
    _head, body = formatter.chat("2020-01-01T00:00:00+00:00", "bob", "a\tb\x07c")
    assert selchat.plain(body) == "a       b\\x07c"


def in_process_terminal(width, height, mode="full"):
    emulator = ModernScreen(width, height)
    stream = pyte.Stream(emulator)
    terminal = selchat.Terminal(mode, selchat.LineEditor())
    terminal.width, terminal.height = width, height
    terminal.write = stream.feed
    terminal.prompt = "> "
    terminal.start()
    return terminal, emulator


def test_ctrl_l_scrolls_the_screen_into_the_scrollback_and_keeps_the_line():
    terminal, emulator = in_process_terminal(20, 6)
    for i in range(3):
        terminal.show(([("", "b: ")], [("", f"m{i}")]))
    terminal.flush()
    terminal.editor.insert("typed")
    terminal.redraw()
    terminal.clear_screen()
    assert emulator.display_rows()[0].startswith("> typed")
    assert [row for row in emulator.rows() if row.startswith("b: ")] == ["b: m0", "b: m1", "b: m2"]
    assert (emulator.cursor.y, emulator.cursor.x) == (0, 7)


def test_a_dumb_terminal_rubs_out_with_backspaces():
    terminal, emulator = in_process_terminal(20, 6, mode="dumb")
    terminal.editor.insert("abc")
    terminal.redraw()
    terminal.editor.key("backspace")
    terminal.redraw()
    terminal.editor.insert("d")
    terminal.redraw()
    assert emulator.display_rows()[0].rstrip() == "abd"
    terminal.editor.key("home")
    terminal.editor.insert("x")
    terminal.redraw()  # no cursor movement: the corrected line on a line of its own
    assert emulator.display_rows()[1].rstrip() == "xabd"


def test_pipe_mode_sends_a_last_line_without_its_newline(server, connect, piped_client):
    bob = connect(server.port, "bob", online=1)
    client = piped_client("--host", "127.0.0.1", "--port", server.port, "--nick", "alice")
    client.write("first\r\nlast, no newline")
    client.close_stdin()
    assert client.wait_exit() == 0
    assert bob.recv_chat_skipping_notices()[1:] == ("alice", "first")
    assert bob.recv_chat_skipping_notices()[1:] == ("alice", "last, no newline")


@pytest.fixture
def cert(make_cert):  # noqa: F811 - the fixture imported above
    return make_cert("localhost", "DNS:localhost,IP:127.0.0.1")


@needs_pty
def test_the_client_rejoins_over_tls_with_its_password_and_typing_goes_on_meanwhile(
    start_server, term, cert
):
    port = free_port()
    options = (*tls_args(cert), "--password", "sesame")
    first = start_on(start_server, port, *options)
    screen = term(port, "alice", "--cafile", str(cert[0]), "--password", "sesame", cols=80)
    screen.wait_text("Welcome to selchat, alice!")
    first.proc.kill()
    screen.wait(lambda: "(reconnecting in" in (prompt_row(screen) or ""), "reconnecting")
    screen.send(b"typed while away")
    screen.wait(lambda: "typed while away" in (prompt_row(screen) or ""), "typing goes on")
    start_on(start_server, port, *options)
    screen.wait(lambda: (prompt_row(screen) or "").startswith("alice> typed while away"), "back")
    screen.send(b"\r")
    screen.wait_text("alice: typed while away")


@needs_pty
def test_a_lone_escape_is_ignored_and_typing_goes_on(server, term):
    screen = joined_term(term, server, online=1)
    type_line(screen, "a")
    screen.send(b"\x1b")
    screen.settle(0.2)
    screen.send(b"b")
    check_region_eventually(screen, "ab", 2)


def test_the_windows_console_path_reads_lines_through_a_socket_pair(monkeypatch):
    # Not run on Windows: this runs the same thread and socket pair on Linux.
    monkeypatch.setattr(sys, "stdin", io.StringIO("héllo\nworld\n"))
    client = selchat.ChatClient("127.0.0.1", 9, "alice", color=False, interactive=True)
    client._start_console()
    received = b""
    client._console.settimeout(TIMEOUT)
    while not received.endswith(b"world\n"):
        received += client._console.recv(100)
    assert received == "héllo\nworld\n".encode()
    assert client._console.recv(100) == b""  # the thread closed its end at the end of input
    client._console.close()


@pytest.mark.parametrize(
    "welcome, rate, burst",
    [
        ("Welcome! Limit: 100 messages a second, bursts of 1000.", 90.0, 900.0),
        ("Welcome! Limit: 1.2.3 messages a second, bursts of 5.", 0.0, 1.0),
        ("Welcome! Limit: 0.0000001 messages a second, bursts of 0.", 0.1, 1.0),
        ("Welcome! Limit: 0 messages a second, bursts of 99999999999.", 0.0, 1e6),
        ("Welcome!", 0.0, 1.0),
    ],
)
def test_the_client_learns_the_servers_rate_from_the_welcome_within_reason(welcome, rate, burst):
    client = selchat.ChatClient("127.0.0.1", 9, "alice", color=False, interactive=False)
    client._learn_limit(welcome)
    assert (client.pace.rate, client.pace.burst) == pytest.approx((rate, burst))


def test_the_history_file_takes_each_line_at_once_and_is_cut_back_when_long(tmp_path):
    path = str(tmp_path / "state" / "selchat" / "history")
    selchat.remember(path, "from one client")
    selchat.remember(path, "from another")
    assert selchat.load_history(path) == ["from one client", "from another"]
    assert os.stat(path).st_mode & 0o777 == 0o600
    for i in range(2 * selchat.HISTORY_KEPT + 1):
        selchat.remember(path, f"line {i}")
    kept = selchat.load_history(path)
    assert len(kept) == selchat.HISTORY_KEPT and kept[-1] == f"line {2 * selchat.HISTORY_KEPT}"
    with open(path) as file:
        assert len(file.readlines()) == selchat.HISTORY_KEPT
    assert selchat.load_history(None) == [] and selchat.load_history(path + ".none") == []


def test_the_history_file_is_where_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.setenv("SELCHAT_HISTORY", "")
    assert selchat.history_path() is None
    monkeypatch.delenv("SELCHAT_HISTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert selchat.history_path() == str(tmp_path / "selchat" / "history")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert selchat.history_path() == str(tmp_path / ".local" / "state" / "selchat" / "history")


def test_who_answers_of_a_shared_room_or_a_large_one_are_split_at_the_right_commas():
    shared = (
        "2 users online: alice (on chat1:9009, joined 5 min ago), "
        "bob (on chat2:9009, joined 1 s ago)"
    )
    assert selchat.split_notice(shared) == [
        "2 users online:",
        "  alice (on chat1:9009, joined 5 min ago)",
        "  bob (on chat2:9009, joined 1 s ago)",
    ]
    assert selchat.names_in_notice(shared) == (["alice", "bob"], [])
    large = (
        "120 users online whose nickname starts with al: al (joined 1 s ago), "
        "alice (joined 2 s ago), and 118 more (/who NAME lists those whose nickname "
        "starts with NAME)"
    )
    assert selchat.split_notice(large) == [
        "120 users online whose nickname starts with al:",
        "  al (joined 1 s ago)",
        "  alice (joined 2 s ago)",
        "  and 118 more (/who NAME lists those whose nickname starts with NAME)",
    ]
    assert selchat.names_in_notice(large) == (["al", "alice"], [])
    assert selchat.split_notice("0 users online") == ["0 users online"]
