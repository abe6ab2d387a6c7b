"""Unit tests of what the server's budgets are built from (issue 12): the
token bucket, the charge of a buffer, the output queue and the history. The
outcomes under attack are in test_budgets.py; these pin the arithmetic."""

import selchat
from selchat import Budget, Held, History, OutputQueue, TokenBucket, encode_frame


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(10.0, 5, now=0.0)
    assert all(bucket.take(0.0) for _ in range(5))
    assert not bucket.take(0.0)
    assert bucket.wait(0.0) == 0.1
    assert bucket.take(0.1)  # one token came back
    assert not bucket.take(0.1)
    assert bucket.take(100.0, 5) and not bucket.take(100.0)  # never more than the burst
    assert not bucket.full(100.0) and bucket.full(100.5)


def test_a_token_bucket_lends_one_more_burst_and_no_more():
    bucket = TokenBucket(1.0, 3, now=0.0)
    assert bucket.take(0.0, 3)
    assert bucket.borrow(0.0, 2) and bucket.borrow(0.0, 1)  # down to -burst
    assert not bucket.borrow(0.0, 1)
    assert bucket.wait(0.0) == 4.0


def test_a_rate_of_zero_is_no_limit():
    bucket = TokenBucket(0.0, 1, now=0.0)
    assert all(bucket.take(0.0, 10**9) for _ in range(3))
    assert bucket.full(0.0) and bucket.light() and bucket.wait(0.0) == 0.0


def test_a_buffer_is_charged_what_it_keeps_alive():
    read = bytes(256 * 1024)
    small = Held(memoryview(read)[:100])  # would pin the whole read: copied out
    assert isinstance(small.buffer, bytes) and small.size == 100
    most = Held(memoryview(read)[1000:])  # most of it: kept, charged whole
    assert isinstance(most.buffer, memoryview) and most.size == len(read)
    assert Held(b"abc").size == 3


def test_the_queue_charges_itself_its_address_and_the_server_once_per_buffer():
    memory, one, other = Budget(0), Budget(0), Budget(0)
    first, second = OutputQueue(one, memory), OutputQueue(other, memory)
    shared = Held(b"x" * 1000)
    for queue in (first, second):
        queue.push(shared)
        queue.push(Held(b"y" * 10))
    assert (first.size, one.held, other.held) == (1010, 1010, 1010)
    assert memory.held == 1020  # the shared buffer once
    assert first.advance(500)  # half of the shared buffer went out
    assert first.buffers(10)[0] == b"x" * 500
    assert first.advance(510) is False and first.size == 0 and one.held == 0
    assert memory.held == 1010  # second still holds the shared buffer
    second.clear(keep=b"tail")
    assert (second.size, other.held, memory.held) == (4, 4, 4)


def test_the_history_holds_its_frames_like_a_queue_and_keeps_to_its_limits():
    memory = Budget(0)
    history = History(count=3, limit=10_000, memory=memory)
    frames = [Held(encode_frame(b"%d" % n * 100)) for n in range(5)]
    for held in frames:
        history.remember((held,))
    assert len(history) == 3 and memory.held == sum(h.size for h in frames[2:])
    replay = history.replay()
    assert replay[1:-1] == frames[2:]
    assert replay[0].buffer.endswith(b"--- 3 messages from before you joined ---")
    small = History(count=50, limit=250, memory=Budget(0))
    for held in frames:
        small.remember((held,))
    assert small.size <= 250 and len(small) == 2


def test_nicknames_that_hide_or_pose_are_refused():
    for nick in ("alice\ufe0f", "a\u2800b", "\u3164", "x\u115fy", "a\u034fb", "\u0301a"):
        assert selchat.check_nick(nick) is not None, nick
    for nick in ("alice", "Ñandú", "李华", "Zoë", "o'brien"):
        assert selchat.check_nick(nick) is None, nick
    skeleton = selchat.nick_skeleton
    assert skeleton("alice") == skeleton("ALICE") == skeleton("AIice") == skeleton("аlice")
    assert skeleton("bob") == skeleton("b0b") == skeleton("bоb")  # digit zero, Cyrillic o
    assert skeleton("modem") == skeleton("rnodern")
    assert skeleton("alice") != skeleton("alicia")


def test_capitals_that_casefold_away_from_their_look_are_lookalikes_too():
    skeleton = selchat.nick_skeleton
    for online, lookalike in [
        ("Hugo", "\u0397ugo"),  # Greek capital eta
        ("Mallory", "\u039callory"),  # Greek capital mu
        ("Nick", "\u039dick"),  # Greek capital nu
        ("Yuri", "\u03a5uri"),  # Greek capital upsilon
        ("alice", "al\u0131ce"),  # dotless i
        ("amy", "\u0251my"),  # Latin alpha
        ("COPE", "\u0421\u041e\u0420\u0415"),  # all Cyrillic
    ]:
        assert skeleton(online) == skeleton(lookalike), (online, lookalike)


def test_an_address_with_wrong_passwords_is_remembered_long_enough_for_its_lockout_to_grow():
    config = selchat.ServerConfig()
    account = selchat.Account("192.0.2.1", 0, config, now=0.0)
    assert account.forgettable(0.0)
    for lockout in (account.password, account.ops):
        for when in range(91, 101):
            lockout.fail(float(when), 10)
        assert lockout.locked_until == 101.0
        assert not account.forgettable(102.0)  # the lockout is over, the count is not
        assert account.forgettable(100.0 + selchat.PASSWORD_LOCKOUT_MAX)
        lockout.failures = 0
