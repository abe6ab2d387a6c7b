"""Run selchat's server with Nagle's algorithm left on (for bench.py's "selchat-nagle").

selchat turns TCP_NODELAY on for every client socket. This wrapper makes that one
setsockopt call a no-op and then runs selchat unchanged, so the benchmark can
measure the decision both ways without a knob in the product:

    python bench/nagle.py ../selchat.py server --port 0
"""

import runpy
import socket
import sys

_setsockopt = socket.socket.setsockopt


def _setsockopt_keep_nagle(self, level, option, *value):
    if level == socket.IPPROTO_TCP and option == socket.TCP_NODELAY:
        return None  # leave Nagle's algorithm on
    return _setsockopt(self, level, option, *value)


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: nagle.py PATH/TO/selchat.py server [OPTIONS]")
    path = sys.argv[1]
    sys.argv = sys.argv[1:]
    socket.socket.setsockopt = _setsockopt_keep_nagle
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
    main()
