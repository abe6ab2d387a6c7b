"""The interactive client: its width function, keys, line editor, and what a
person sees on the screen.

The screen tests run the real client in a pseudo-terminal of a fixed size and
feed everything it writes to a terminal emulator (pyte), then check what is on
the screen and in its scrollback: every message that arrived present exactly
once and in order, the typed line intact, the cursor where it was. They wait
for events with deadlines, never with bare sleeps.
"""

import io
import signal
import sys
import time
import unicodedata

import pyte
import pytest
from wcwidth import wcwidth

from selchat_testkit import HERE, SCRIPT, TIMEOUT, clean_env, needs_pty, pexpect

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
