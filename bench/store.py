#!/usr/bin/env python3
"""What a --store commit costs on this machine's disk, per batch of one loop turn.

selchat's server (--store) hands each selector loop turn's chat frames to a
writer thread, which writes them in one transaction (WAL mode). The other way
would be one short transaction per turn made on the loop itself. This script
times, with selchat's own Store (its schema, its PRAGMAs, its ``_commit``), what
such a transaction takes for batches of the size one turn carries: 1, 10, 100
and 1000 chat frames of about 60 bytes, 100 of 140 bytes (bench.py's size), and 1
and 4 frames of about 4 KB. That
is how long the loop would stall each turn; handing the batch to the writer
(``Store.write``: a lock, a list append, a notify) is timed beside it. Each is
run with synchronous=NORMAL (what selchat uses: in WAL mode only checkpoints
sync) and FULL (every commit syncs the WAL), for reference.

When the full-text index is kept by a trigger on every insert, the same
commits are timed again without that trigger (storing alone); when selchat
builds the index while the writer is idle (``Store._index``), the time of each
index chunk is timed instead. The database goes in --dir (default: the
temporary directory), a fresh one per configuration, deleted afterwards with
its -wal and -shm files. Standard library only.

    python bench/store.py                      # the selchat.py of this checkout
    python bench/store.py --selchat OTHER.py --dir /var/tmp --commits 500
"""

import argparse
import importlib.util
import os
import random
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STAMP = b"2026-01-01T00:00:00+00:00"
LETTERS = "etaoinshrdlucmfwypvbgkjqxz"  # by frequency in English


def vocabulary(rng, size=2000):
    """Made-up words of 2-9 letters, and Zipf weights to draw them by (rank 1 most often)."""
    words = [
        "".join(rng.choices(LETTERS, weights=range(26, 0, -1), k=rng.randint(2, 9)))
        for _ in range(size)
    ]
    return words, [1 / rank for rank in range(1, size + 1)]


def load_selchat(path):
    spec = importlib.util.spec_from_file_location("selchat", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["selchat"] = module  # dataclasses and the like look it up by name
    spec.loader.exec_module(module)
    return module


def chat_frame(selchat, rng, vocab, size):
    """One relayed chat frame (header, stamp, nick, text) of about ``size`` bytes."""
    nick = b"user%d" % rng.randrange(100)
    text = []
    length = len(STAMP) + len(nick) + 2 + selchat.HEADER_SIZE
    while length < size:
        word = rng.choices(*vocab)[0]
        text.append(word)
        length += len(word) + 1
    return selchat.encode_frame(STAMP + b"\0" + nick + b"\0" + " ".join(text).encode())


def quantiles(times):
    times = sorted(times)
    n = len(times)
    return {
        "p50": times[(n - 1) // 2],
        "p99": times[min(n - 1, int(0.99 * (n - 1) + 0.5))],
        "max": times[-1],
    }


def filesystem(path):
    """The file system type and device of ``path`` (from /proc/mounts)."""
    best = ("?", "?", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if os.path.realpath(path).startswith(mount) and len(mount) >= len(best[2]):
                    best = (fstype, device, mount)
    except OSError:
        pass
    return "%s on %s" % (best[0], best[1])


def fresh_store(selchat, directory, synchronous, index_trigger):
    workdir = tempfile.mkdtemp(prefix="selchat-store-", dir=directory)
    store = selchat.Store(os.path.join(workdir, "store.db"))
    store.open(0)
    db = store._db
    db.execute("PRAGMA synchronous = %s" % synchronous)
    has_trigger = (
        db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' "
            "AND name = 'messages_fts_insert'"
        ).fetchone()[0]
        > 0
    )
    if has_trigger and not index_trigger:
        db.execute("DROP TRIGGER messages_fts_insert")
    return store, workdir, has_trigger


def close_store(store, workdir):
    store._close()
    for sock in store.wakeup:
        sock.close()
    shutil.rmtree(workdir, ignore_errors=True)


def time_commits(store, blobs, commits):
    """Milliseconds of each of ``commits`` calls of Store._commit, one turn's batch each."""
    times = []
    for i in range(commits):
        blob = blobs[i % len(blobs)]
        t0 = time.perf_counter()
        store._commit([(time.time(), blob)], [])
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_searches(selchat, store, words):
    """Milliseconds of Store._find for a few kinds of query, once everything is indexed."""
    db = store._connect(5.0)
    common = words[0]
    queries = [
        (common, "a common word: the index"),
        ("%s %s" % (common, words[1]), "two words: the index"),
        ("zqzq", "a word nobody wrote: the index"),
        (common[:2], "two letters: a scan, SQLite's lower()"),
        ("qx", "two letters nobody wrote: all scanned"),
        ("мир", "Cyrillic nobody wrote: the index"),
        ("世界", "two CJK characters: a scan, Python's lower()"),
    ]
    results = []
    try:
        for query, how in queries:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                store._find(query, 0, db)
                best = min(best, (time.perf_counter() - t0) * 1e3)
            results.append((query, how, best))
    finally:
        db.close()
    return results


def time_handoffs(store, blobs, count):
    """Milliseconds of Store.write (what the loop pays with the writer thread),
    no thread started: the list is emptied as the writer would empty it."""
    times = []
    for i in range(count):
        blob = blobs[i % len(blobs)]
        t0 = time.perf_counter()
        store.write([blob])  # a turn's buffers, joined by write() itself
        times.append((time.perf_counter() - t0) * 1e3)
        if i % 64 == 63:
            with store._ready:
                store._writes = []
                store._backlog = 0
    return times


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--selchat", default=os.path.join(HERE, os.pardir, "selchat.py"))
    parser.add_argument("--dir", default=None, help="where the databases go (default: %(default)s)")
    parser.add_argument(
        "--commits",
        type=int,
        default=1000,
        help="commits per batch size and configuration, 200 000 frames' worth at "
        "most (default 1000)",
    )
    parser.add_argument("--seed", type=int, default=1)
    opts = parser.parse_args()
    selchat = load_selchat(os.path.abspath(opts.selchat))
    directory = opts.dir or tempfile.gettempdir()
    rng = random.Random(opts.seed)
    import sqlite3

    print(
        "selchat --store commit cost: %s, SQLite %s, Python %s"
        % (os.path.abspath(opts.selchat), sqlite3.sqlite_version, sys.version.split()[0])
    )
    print("databases in %s (%s), load average %s" % (directory, filesystem(directory), load()))
    # (label, frames per turn, bytes per frame)
    batches = [
        ("1 x 60 B", 1, 60),
        ("10 x 60 B", 10, 60),
        ("100 x 60 B", 100, 60),
        ("1000 x 60 B", 1000, 60),
        ("100 x 140 B", 100, 140),  # the size of bench.py's messages (100-byte texts)
        ("1 x 4 KB", 1, 4096),
        ("4 x 4 KB", 4, 4096),
    ]
    vocab = vocabulary(rng)
    blobs = {}
    for label, count, size in batches:
        blobs[label] = [
            b"".join(chat_frame(selchat, rng, vocab, size) for _ in range(count)) for _ in range(16)
        ]
    # Does this selchat index on insert (a trigger) or when idle (Store._index)?
    probe, workdir, trigger = fresh_store(selchat, directory, "NORMAL", True)
    close_store(probe, workdir)
    idle_index = hasattr(selchat.Store, "_index")
    if trigger:
        print("full-text index: kept by a trigger inside every commit (timed with and without)")
    elif idle_index:
        print("full-text index: built by Store._index when the writer is idle (timed below)")
    else:
        print("full-text index: none (no FTS5 trigram here, or none in this selchat)")
    configs = [("NORMAL", True, "NORMAL (as selchat)"), ("FULL", True, "FULL")]
    if trigger:
        configs.insert(1, ("NORMAL", False, "NORMAL, no index trigger"))
    print()
    header = "%-12s %-26s %8s %8s %8s %9s %9s" % (
        "turn batch",
        "synchronous",
        "p50 ms",
        "p99 ms",
        "max ms",
        "us/frame",
        "commits",
    )
    print(header)
    print("-" * len(header))
    index_times = []
    search_times = []
    split_times = []
    for label, count, _size in batches:
        # 200 000 frames at most per configuration (the WAL is checkpointed
        # every ~4 MB, so checkpoints fall inside every timing).
        commits = min(opts.commits, max(50, 200_000 // count))
        for synchronous, keep_trigger, name in configs:
            store, workdir, _ = fresh_store(selchat, directory, synchronous, keep_trigger)
            try:
                times = time_commits(store, blobs[label], commits)
                q = quantiles(times)
                print(
                    "%-12s %-26s %8.3f %8.3f %8.2f %9.1f %9d"
                    % (
                        label,
                        name,
                        q["p50"],
                        q["p99"],
                        q["max"],
                        1e3 * q["p50"] / count,
                        commits,
                    )
                )
                if idle_index and synchronous == "NORMAL" and label == "1000 x 60 B":
                    while getattr(store, "_unsplit", False):  # turns into messages
                        t0 = time.perf_counter()
                        store._split()
                        split_times.append((time.perf_counter() - t0) * 1e3)
                    while store._unindexed:
                        t0 = time.perf_counter()
                        store._index()
                        index_times.append((time.perf_counter() - t0) * 1e3)
                    search_times = time_searches(selchat, store, vocab[0])
            finally:
                close_store(store, workdir)
        store, workdir, _ = fresh_store(selchat, directory, "NORMAL", True)
        try:
            q = quantiles(time_handoffs(store, blobs[label], 10_000))
        finally:
            close_store(store, workdir)
        print(
            "%-12s %-26s %8.4f %8.4f %8.3f %9s %9d"
            % (label, "hand to writer thread", q["p50"], q["p99"], q["max"], "", 10_000)
        )
    # What the writer does with the GIL held: split the turn's bytes into
    # frames and decode each (sqlite3 releases the GIL inside SQLite only).
    blob = blobs["1000 x 60 B"][0]
    t0 = time.perf_counter()
    for _ in range(20):
        rows = []
        for start, stop in selchat._frame_spans(blob):
            frame = blob[start:stop]
            parts = selchat.unpack_stored(frame)
            rows.append((0.0, parts[0], parts[1], parts[2], frame))
    python_us = (time.perf_counter() - t0) * 1e6 / 20_000
    print()
    print(
        "of which Python in the writer (GIL held: frames split and decoded): %.1f us per frame"
        % python_us
    )
    if split_times:
        q = quantiles(split_times)
        chunk = getattr(selchat, "STORE_SPLIT_CHUNK", 1)
        print()
        print(
            "Store._split (the writer, when idle), %d chunks of %d 60-byte messages: "
            "p50 %.2f ms, p99 %.2f ms, max %.2f ms (%.1f us per message)"
            % (
                len(split_times),
                chunk,
                q["p50"],
                q["p99"],
                q["max"],
                1e3 * q["p50"] / chunk,
            )
        )
    if index_times:
        q = quantiles(index_times)
        chunk = getattr(selchat, "STORE_INDEX_CHUNK", 0)
        print()
        print(
            "Store._index (the writer, when idle), %d chunks of %d 60-byte messages: "
            "p50 %.2f ms, p99 %.2f ms, max %.2f ms (%.1f us per message)"
            % (len(index_times), chunk, q["p50"], q["p99"], q["max"], 1e3 * q["p50"] / chunk)
        )
    if search_times:
        print()
        print("/search in those messages (the search thread's time, best of 3):")
        for query, how, ms in search_times:
            print("  %-24s %-44s %8.1f ms" % (query, how, ms))
    print()
    print(
        "A transaction per turn on the loop would hold the loop for the commit's time "
        "(p99 and max above) every turn that relays chat; with the writer thread the "
        "loop pays only the hand-over, and the commit's CPU is spent beside it (the "
        "GIL is released while SQLite works)."
    )
    return 0


def load():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
