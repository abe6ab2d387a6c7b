"""The fixtures every test file shares: servers, raw peers and clients.

Each is a factory; whatever a test starts with it is stopped at the end of the
test, even when the test fails: servers with SIGINT and clients with SIGTERM
first (exiting normally, they let coverage save what they ran), killed only if
they will not go. The classes behind them are in selchat_testkit.py; a test
file may wrap a fixture here in one of its own of the same name.
"""

import io
import re
import signal
import sys

import pytest

from selchat_testkit import (
    HERE,
    HISTORY_END,
    SCRIPT,
    TIMEOUT,
    Peer,
    PipedClient,
    ServerProcess,
    User,
    clean_env,
    pexpect,
    welcome_text,
)


@pytest.fixture
def start_server():
    """Factory: a server on 127.0.0.1 and a free port (`--port 0`), with extra
    arguments; address=False leaves --host and --port to them. env replaces
    clean_env(); nofile sets its file descriptor limit, fsize its file size limit."""
    servers = []

    def start(*args, env=None, nofile=None, fsize=None, address=True):
        argv = [str(arg) for arg in args]
        if address:
            argv = ["--host", "127.0.0.1", "--port", "0", *argv]
        server = ServerProcess(argv, env=env, nofile=nofile, fsize=fsize)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        print(f"--- server log (port {server.port}) ---\n{server.log}")
    for server in servers:
        assert "Traceback" not in server.log, f"the server logged a traceback:\n{server.log}"


@pytest.fixture
def server(start_server):
    return start_server()


@pytest.fixture
def connect():
    """Factory: a raw peer (options go to Peer); with nick= it also registers,
    giving password= when the server asks, and checks the welcome, with online=
    up to the number of users online."""
    peers = []

    def open_peer(port, nick=None, online=None, password=None, **options):
        peer = Peer(port, **options)
        peers.append(peer)
        if nick is not None:
            welcome = peer.register(nick, password)
            if online is not None:
                # the limit note depends on the server's options; the exact
                # text is checked by test_welcome_is_the_first_frame_and_names_quit
                assert welcome.startswith(welcome_text(nick, online, limit_note="")), welcome
        return peer

    yield open_peer
    for peer in peers:
        peer.close()


@pytest.fixture
def join(connect):
    """Factory: a User, a raw peer registered as nick on a port (or a started
    server); with history=True it also reads the history the server replays."""

    def open_user(port, nick, host="127.0.0.1", history=False):
        peer = connect(getattr(port, "port", port), nick, host=host)
        if history:
            assert re.fullmatch(
                r"--- \d+ messages? from before you joined ---", peer.recv_service()
            )
            while True:
                payload = peer.recv_frame()
                if payload == HISTORY_END.encode():
                    break
        return User(peer, nick)

    return open_user


@pytest.fixture
def piped_client():
    """Factory: the real client with pipes (stdin not a terminal)."""
    clients = []

    def start(*args, env=None):
        client = PipedClient(args, env if env is not None else clean_env())
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.stop()


@pytest.fixture
def pty_client():
    """Factory: the client in a real pseudo-terminal (pexpect, bytes mode).

    port or nick None leaves that option out; extra arguments follow; keyword
    arguments override the environment (None removes a variable).
    """
    children = []

    def spawn(port, nick="alice", *extra, tz="UTC", **env_overrides):
        overrides = {"NO_COLOR": "1", "TERM": "xterm", "TZ": tz}
        overrides.update(env_overrides)
        env = clean_env(**overrides)
        args = [str(SCRIPT), "client", "--host", "127.0.0.1"]
        if port is not None:
            args += ["--port", str(port)]
        if nick is not None:
            args += ["--nick", nick]
        args += list(extra)
        child = pexpect.spawn(
            sys.executable, args, env=env, cwd=str(HERE), timeout=TIMEOUT, dimensions=(40, 220)
        )
        child.logfile_read = io.BytesIO()
        children.append(child)
        return child

    yield spawn
    for child in children:
        if child.isalive():
            # SIGTERM first: the client leaves cleanly (and coverage keeps what it ran).
            child.kill(signal.SIGTERM)
            child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=3)
        if child.isalive():
            child.terminate(force=True)
        try:
            child.close(force=True)
        except Exception:  # noqa: BLE001 - whatever pexpect raises, the next child is stopped too
            pass
        print("--- pty output ---")
        print(child.logfile_read.getvalue().decode("utf-8", "replace"))
