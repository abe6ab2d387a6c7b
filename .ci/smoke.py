"""Smoke test of the lone selchat.py on the running Python, standard library only.

Copies the file into an empty folder, starts a server from it with `python -S`
and a --store, has a pipe-mode client send two lines to a second pipe-mode
client, stops the server with SIGINT and checks every exit status; then starts
it again on the same store and finds the first line with /search. Usage:
python -S smoke.py selchat.py
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time


def main() -> int:
    source = os.path.abspath(sys.argv[1])
    version = "%d.%d" % sys.version_info[:2]
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "selchat.py")
        shutil.copy(source, script)
        run = [sys.executable, "-S", script]
        out = subprocess.run([*run, "--version"], stdout=subprocess.PIPE, timeout=30)
        assert out.returncode == 0 and out.stdout.startswith(b"selchat "), out
        server, port = start_server(run, folder)
        env = dict(os.environ, TZ="UTC")
        try:
            # The reader sends nothing until it has seen the writer's messages.
            reader = subprocess.Popen(
                [*run, "client", "--port", port, "--nick", "reader"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                universal_newlines=True,
            )
            assert reader.stdout is not None and reader.stdin is not None
            assert "Welcome" in reader.stdout.readline()
            writer = subprocess.run(
                [*run, "client", "--port", port, "--nick", "writer"],
                input="hello from %s\n\nsecond line\n" % version,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                timeout=30,
            )
            assert writer.returncode == 0, writer
            seen = []
            while len(seen) < 2:
                line = reader.stdout.readline()
                assert line, "reader's output ended early: %r" % seen
                if " writer: " in line:
                    seen.append(line.split(" writer: ", 1)[1].rstrip("\n"))
            assert seen == ["hello from %s" % version, "second line"], seen
            server.send_signal(signal.SIGINT)
            assert server.wait(timeout=10) == 0, "server exit status %s" % server.returncode
            rest, _ = reader.communicate(timeout=10)
            assert "shutting down" in rest, rest
            assert reader.returncode == 0, "reader exit status %s" % reader.returncode
        finally:
            if server.poll() is None:
                server.kill()
        # The store kept it: a restarted server finds it.
        server, port = start_server(run, folder)
        try:
            searcher = subprocess.run(
                [*run, "client", "--port", port, "--nick", "searcher"],
                input="/search hello\n",
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                timeout=30,
            )
            assert "writer: hello from %s" % version in searcher.stdout, searcher.stdout
            server.send_signal(signal.SIGINT)
            assert server.wait(timeout=10) == 0, "server exit status %s" % server.returncode
        finally:
            if server.poll() is None:
                server.kill()
    print("smoke ok: Python %s" % sys.version.split()[0])
    return 0


def start_server(run: "list[str]", folder: str) -> "tuple[subprocess.Popen[str], str]":
    """A server from the folder's copy, with a store in it; and its port."""
    server = subprocess.Popen(
        [*run, "server", "--host", "127.0.0.1", "--port", "0", "--store", "room.db"],
        stderr=subprocess.PIPE,
        universal_newlines=True,
        cwd=folder,
    )
    port = None
    deadline = time.monotonic() + 20
    while port is None and time.monotonic() < deadline:
        line = server.stderr.readline()
        if not line:
            break
        match = re.search(r"listening on \S*:(\d+)", line)
        if match:
            port = match.group(1)
    if not port:
        server.kill()
        raise AssertionError("server printed no 'listening on' line")
    threading.Thread(target=server.stderr.read, daemon=True).start()
    return server, port


if __name__ == "__main__":
    sys.exit(main())
