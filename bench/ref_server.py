#!/usr/bin/env python3
"""Reference chat server for the benchmark: selchat's protocol on asyncio streams.

This is the server a competent Python programmer would write instead of a
hand-made selector loop: one coroutine per client, ``readexactly`` for the
10-byte header and the payload, and a broadcast that writes the frame to every
other client and then awaits ``drain()`` on each. It speaks the same wire
protocol and sends the same service texts as selchat (nickname first, welcome,
join and leave notices, nick stamping, ``--max-message``), so the load
generator in ``bench.py`` can drive both unchanged.

It is deliberately plain, neither handicapped nor tuned: no shared buffers, no
write coalescing, no notice coalescing. It is not part of selchat and is only
used by the benchmark.

    python bench/ref_server.py --host 127.0.0.1 --port 0 [--max-message BYTES]
"""

import argparse
import asyncio
import signal
import sys
import time
import unicodedata

HEADER_SIZE = 10
DEFAULT_MAX_MESSAGE = 1 << 20
GOODBYE = "Server is shutting down. Goodbye!"


class ProtocolError(ValueError):
    pass


def encode_frame(payload: bytes) -> bytes:
    return f"{len(payload):<{HEADER_SIZE}}".encode("ascii") + payload


def parse_header(header: bytes) -> int:
    text = header.strip(b" ")
    if not text or not text.isdigit():  # bytes.isdigit() is ASCII-only
        raise ProtocolError(f"bad frame header {header!r}")
    return int(text)


def check_nick(nick: str):
    if not 1 <= len(nick) <= 32:
        return "must be 1 to 32 characters"
    for ch in nick:
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return "must not contain whitespace or control characters"
    return None


def log(text: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S"), text, file=sys.stderr, flush=True)


class Client:
    def __init__(self, nick: str, writer: asyncio.StreamWriter) -> None:
        self.nick = nick
        self.writer = writer


class ChatServer:
    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self.clients = {}  # casefolded nick -> Client
        self.closing = False

    async def send(self, writer: asyncio.StreamWriter, text: str) -> None:
        writer.write(encode_frame(text.encode("utf-8")))
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def broadcast(self, frame: bytes, exclude=None) -> None:
        receivers = [c for c in self.clients.values() if c is not exclude]
        for client in receivers:
            client.writer.write(frame)
        for client in receivers:
            try:
                await client.writer.drain()
            except (ConnectionError, OSError):
                pass  # its own handler notices and cleans up

    async def read_frame(self, reader: asyncio.StreamReader) -> bytes:
        length = parse_header(await reader.readexactly(HEADER_SIZE))
        if self.max_message and length > self.max_message:
            raise OverflowError(length)
        return await reader.readexactly(length)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = None
        try:
            nick = (await self.read_frame(reader)).decode("utf-8")
            reason = check_nick(nick)
            if reason is None and nick.casefold() in self.clients:
                reason = f'"{nick}" is already in use'
            if reason is not None:
                await self.send(writer, f"Nickname rejected: {reason}")
                return
            client = Client(nick, writer)
            self.clients[nick.casefold()] = client
            online = len(self.clients)
            log(f"{peer} joined as {nick}")
            users = "1 user" if online == 1 else f"{online} users"
            await self.send(
                writer, f"Welcome to selchat, {nick}! {users} online. Type <quit< to leave."
            )
            await self.broadcast(
                encode_frame(f"{nick} joined the chat ({online} online)".encode()), client
            )
            while True:
                payload = (await self.read_frame(reader)).decode("utf-8")
                parts = payload.split("\0", 2)
                if len(parts) == 3:
                    stamp, _, text = parts
                    await self.broadcast(encode_frame(f"{stamp}\0{nick}\0{text}".encode()), client)
                elif payload.startswith("/"):
                    await self.send(writer, f"Unknown command: {payload.split()[0]}")
                else:
                    await self.send(writer, "Not sent: a message needs time, nick and text parts")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except OverflowError as exc:
            await self.send(
                writer, f"Message too long: {exc.args[0]} bytes (limit {self.max_message} bytes)"
            )
        except (ProtocolError, UnicodeDecodeError) as exc:
            await self.send(writer, f"Protocol error: {exc}")
        finally:
            if (
                client is not None
                and not self.closing
                and self.clients.get(client.nick.casefold()) is client
            ):
                del self.clients[client.nick.casefold()]
                log(f"{client.nick} left")
                await self.broadcast(
                    encode_frame(
                        f"{client.nick} left the chat ({len(self.clients)} online)".encode()
                    )
                )
            writer.close()

    async def shutdown(self) -> None:
        self.closing = True  # no leave notices while everyone is being let go
        frame = encode_frame(GOODBYE.encode("utf-8"))
        writers = [c.writer for c in self.clients.values()]
        self.clients.clear()
        for writer in writers:
            writer.write(frame)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.drain() for w in writers), return_exceptions=True), 2
            )
        except asyncio.TimeoutError:
            pass
        for writer in writers:
            writer.close()


async def main_async(args: argparse.Namespace) -> None:
    chat = ChatServer(args.max_message)
    server = await asyncio.start_server(chat.handle, args.host or None, args.port)
    host, port = server.sockets[0].getsockname()[:2]
    log(f"listening on {host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    await chat.shutdown()
    log("stopped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="")
    parser.add_argument("--port", type=int, default=9009)
    parser.add_argument("--max-message", type=int, default=DEFAULT_MAX_MESSAGE)
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
