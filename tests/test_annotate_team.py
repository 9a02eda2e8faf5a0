"""The annotation app at team scale (issue: feedback you can trust): the --per-item quota enforced
when an answer is stored, O(log n) counters that agree with a count from scratch, schema-1 files
migrated, every bad request a JSON 400/405/413 with the security headers, tokens refused and
counted, undo, damaged databases reported in one line, read-only commands that write nothing."""

from __future__ import annotations

import random
import sqlite3

import pytest

from ppo_rlhf.feedback.annotate.answers import Answer, AnswerError
from ppo_rlhf.feedback.annotate.store import _SCHEMA, Store
from tests.helpers import assert_one_line_error, cli
from tests.test_annotate import PROMPTS, get_next, label, make_store, n_answers, raw_request, request, serving

# ---- --per-item enforced when an answer is stored ------------------------------------------------

def test_an_item_never_served_cannot_take_a_reserved_last_slot(tmp_path):
    store = make_store(tmp_path / "db.sqlite", prompts=PROMPTS[:2])
    with serving(store, per_item=1) as server:
        port = server.server_port
        item = get_next(port, "alice")["item_id"]
        status, obj = label(port, "bob", item, choice=0)  # bob was never served it
        assert status == 400 and "not open to bob" in obj["error"], obj
        assert label(port, "alice", item, choice=1)[0] == 200
        status, obj = label(port, "bob", item, choice=0)  # and now it is full
        assert status == 400 and "not open to bob" in obj["error"], obj
        # an open slot (nobody reserved or answered item 2) can be answered straight away
        assert label(port, "bob", 2, choice=0)[0] == 200
    assert n_answers(tmp_path / "db.sqlite") == 2


def test_an_expired_reservation_handed_on_is_not_answered_twice_over_http(tmp_path):
    import time

    store = make_store(tmp_path / "db.sqlite", prompts=PROMPTS[:1])
    with serving(store, per_item=1, reserve_s=0.3) as server:
        port = server.server_port
        item = get_next(port, "alice")["item_id"]
        time.sleep(0.5)  # alice's reservation expires ...
        assert get_next(port, "bob")["item_id"] == item  # ... and the slot goes to bob
        status, obj = label(port, "alice", item, choice=0)
        assert status == 400 and "not open to alice" in obj["error"], obj
        assert label(port, "bob", item, choice=1)[0] == 200
    out = [(a.annotator, a.skipped) for a in store.answers()]
    assert out == [("bob", False)]


def test_an_expired_reservation_does_not_let_two_annotators_fill_one_slot(tmp_path):
    store = make_store(tmp_path / "db.sqlite", prompts=PROMPTS[:1])
    t = 1000.0
    assert store.next_item("alice", per_item=1, reserve_s=1, now=t).id == 1
    assert store.next_item("bob", per_item=1, reserve_s=1, now=t + 2).id == 1  # alice's expired
    with pytest.raises(AnswerError, match="not open to alice"):
        store.record(1, "alice", Answer(False, 0), per_item=1, now=t + 2.5)
    store.record(1, "bob", Answer(False, 1), per_item=1, now=t + 2.6)
    with pytest.raises(AnswerError, match="not open to alice"):  # full now
        store.record(1, "alice", Answer(False, 0), per_item=1, now=t + 3)
    store.record(1, "alice", Answer(True), per_item=1, now=t + 3)  # a skip takes no slot
    assert [(a.annotator, a.skipped) for a in store.answers()] == [("bob", False), ("alice", True)]


# ---- counters: the O(log n) answers equal a count from scratch ---------------------------------

def _from_scratch(db, annotator, per_item, now):
    """next_item's and progress's answers by the schema-1 definition, with plain SQL."""
    answers = db.execute("SELECT item_id, annotator, skipped FROM answers").fetchall()
    res = db.execute("SELECT item_id, annotator FROM reservations WHERE expires > ?", (now,)).fetchall()
    items = [i for (i,) in db.execute("SELECT id FROM items ORDER BY id")]
    mine = {i for i, a, _ in answers if a == annotator}
    counted = {i: sum(1 for j, _, s in answers if j == i and not s) for i in items}
    done = sum(1 for i, a, s in answers if a == annotator and not s)
    skipped = sum(1 for i, a, s in answers if a == annotator and s)
    open_ = sum(1 for i in items if i not in mine and counted[i] < per_item)
    own = sorted(i for i, a in res if a == annotator and i not in mine)
    if own:
        nxt = own[0]
    else:
        others = {i: sum(1 for j, a in res if j == i and a != annotator) for i in items}
        free = [i for i in items if i not in mine and counted[i] + others[i] < per_item]
        nxt = free[0] if free else None
    return nxt, {"done": done, "skipped": skipped, "total": done + open_}


@pytest.mark.parametrize("quota", [1, 2, 3, "1-3"])
def test_counters_agree_with_a_count_from_scratch(tmp_path, quota):
    """Random sessions (answers, skips, undos, walk-aways whose reservations expire); "1-3": the
    quota changes between calls, as when a server restarts with another --per-item."""
    rng = random.Random(str(quota))
    store = make_store(tmp_path / "db.sqlite", prompts=[f"p{i}" for i in range(60)])
    names = ["ann", "bob", "cy", "dee", "eve"]
    last: dict[str, int] = {}
    undone = 0
    t = 1000.0
    for step in range(300):
        t += rng.choice([0.5, 1, 5])
        who = rng.choice(names)
        per_item = rng.choice([1, 2, 3]) if quota == "1-3" else quota
        check = sqlite3.connect(tmp_path / "db.sqlite")
        expected_next, expected_progress = _from_scratch(check, who, per_item, t)
        check.close()
        assert store.progress(who, per_item=per_item) == expected_progress, step
        item = store.next_item(who, per_item=per_item, reserve_s=8, now=t)
        assert (item and item.id) == expected_next, step
        if item is None:
            continue
        roll = rng.random()
        if roll < 0.6:
            store.record(item.id, who, Answer(False, rng.choice([0, 1, "tie"])), per_item=per_item, now=t)
            last[who] = item.id
        elif roll < 0.75:
            store.record(item.id, who, Answer(True), per_item=per_item, now=t)
            last[who] = item.id
        elif roll < 0.85 and who in last:
            try:
                store.undo(last.pop(who), who, per_item=per_item, reserve_s=8, now=t)
                undone += 1
            except AnswerError:
                pass  # a skipped item meanwhile full
        # else: walk away (the reservation expires)
    assert sum(1 for a in store.answers() if not a.skipped) > 40 and undone > 3


def test_a_schema_1_database_is_migrated(tmp_path):
    db = tmp_path / "old.sqlite"
    c = sqlite3.connect(db)
    c.executescript(_SCHEMA)
    c.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "1"), ("mode", "choose"),
                                                     ("k", "2"), ("scale", "7"), ("salt", "ab"),
                                                     ("created", "0")])
    c.executemany("INSERT INTO items (prompt, responses) VALUES (?, ?)",
                  [(f"p{i}", '["a", "b"]') for i in range(3)])
    c.execute("INSERT INTO answers (item_id, annotator, skipped, value, shown, time) "
              "VALUES (1, 'ann', 0, '0', '[0, 1]', 1.0)")
    c.commit()
    c.close()
    with Store(db, readonly=True) as ro:  # read-only commands read it as it is
        assert [a.annotator for a in ro.answers()] == ["ann"]
        assert ro._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
    with Store(db) as store:
        assert store.meta["schema_version"] == "2"
        assert store.progress("ann", per_item=1) == {"done": 1, "skipped": 0, "total": 3}
        assert store.next_item("bob", per_item=1, reserve_s=60).id == 2
        assert store.next_item("cy", per_item=1, reserve_s=60).id == 3


# ---- bad requests: JSON, the security headers, never a 500 ---------------------------------------

@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE", "PUT", "DELETE", "PATCH", "BREW"])
@pytest.mark.parametrize("path,allow", [("/", "GET"), ("/api/next?annotator=a", "GET"),
                                        ("/api/label", "POST"), ("/api/undo", "POST")])
def test_other_methods_get_405_with_allow_and_the_security_headers(tmp_path, method, path, allow):
    store = make_store(tmp_path / "db.sqlite")
    with serving(store) as server:
        status, body, headers = raw_request(server.server_port, method, path)
    assert status == 405 and headers["Allow"] == allow
    assert headers["Content-Type"].startswith("application/json")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    assert body == b"" if method == "HEAD" else b"use " + allow.encode() in body


def test_a_malformed_request_line_is_json_with_the_security_headers(tmp_path):
    import socket

    store = make_store(tmp_path / "db.sqlite")
    with serving(store) as server:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
            s.sendall(b"GET / x HTTP/1.1\r\n\r\n")
            reply = s.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0]
    assert b"Content-Security-Policy" in head and b"application/json" in head and b'"error"' in body


def test_bearer_is_case_insensitive_and_refusals_are_counted_and_logged_without_the_token(tmp_path, capfd):
    token = "s3cret-token-0123456789"
    store = make_store(tmp_path / "db.sqlite")
    with serving(store, token=token) as server:
        port = server.server_port
        for scheme in ("Bearer", "bearer", "BEARER"):
            status, _, _ = request(port, "GET", "/api/next?annotator=ann",
                                   headers={"Authorization": f"{scheme} {token}"})
            assert status == 200, scheme
        wrong = "wrong-token-9876543210"
        for headers in ({"Authorization": f"Bearer {wrong}"}, {}, {"Authorization": f"Basic {wrong}"}):
            assert request(port, "GET", "/api/next?annotator=ann", headers=headers)[0] == 403
        assert request(port, "GET", f"/?token={wrong}")[0] == 403
        assert server.refused == 4
    err = capfd.readouterr().err
    assert err.count("refused a request with a missing or wrong token from 127.0.0.1") == 4
    assert "(4 so far)" in err and wrong not in err and token not in err


# ---- undo ------------------------------------------------------------------------------------

def test_undo_takes_back_the_latest_answer_or_skip_only(tmp_path):
    store = make_store(tmp_path / "db.sqlite", prompts=PROMPTS[:3])
    with serving(store, per_item=1) as server:
        port = server.server_port
        first = get_next(port, "ann")["item_id"]
        assert label(port, "ann", first, choice=0)[0] == 200
        second = get_next(port, "ann")["item_id"]
        status, obj, _ = request(port, "POST", "/api/label", {"item_id": second, "annotator": "ann",
                                                              "skip": True})
        assert status == 200 and obj["progress"] == {"done": 1, "skipped": 1, "total": 2}
        status, obj, _ = request(port, "POST", "/api/undo", {"item_id": first, "annotator": "ann"})
        assert status == 400 and "latest" in obj["error"]  # not the latest any more
        status, obj, _ = request(port, "POST", "/api/undo", {"item_id": second, "annotator": "ann"})
        assert status == 200 and obj["progress"] == {"done": 1, "skipped": 0, "total": 3}
        assert get_next(port, "ann")["item_id"] == second  # it comes back next
        assert label(port, "ann", second, choice=1)[0] == 200
        status, obj, _ = request(port, "POST", "/api/undo", {"item_id": second, "annotator": "ann"})
        assert status == 200
        assert get_next(port, "bob")["item_id"] == 3  # the undone item stays ann's reservation
        assert request(port, "POST", "/api/undo", {"item_id": second, "annotator": "bob"})[0] == 400
        assert request(port, "POST", "/api/undo", {"item_id": 1, "annotator": "ann", "x": 1})[0] == 400
    assert [(a.item_id, a.skipped) for a in store.answers()] == [(first, False)]


# ---- damaged and read-only ---------------------------------------------------------------------

def _answered_db(tmp_path):
    db = tmp_path / "labels.sqlite"
    store = make_store(db, prompts=[f"a longer prompt number {i} " * 8 for i in range(400)])
    for i in range(1, 401):
        store.record(i, "ann", Answer(False, i % 2), per_item=1)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return db


@pytest.mark.parametrize("command", [["export", "--out", "x.jsonl"], ["stats"], ["serve", "--port", "0"]])
def test_a_truncated_database_is_one_line_naming_the_file(tmp_path, command):
    db = _answered_db(tmp_path)
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)
    if command[0] == "export":
        command = ["export", "--out", str(tmp_path / "x.jsonl")]
    proc = cli("annotate", command[0], "--db", db, *command[1:], check=False, timeout=60)
    assert_one_line_error(proc, 2, str(db), "damaged")


@pytest.mark.parametrize("command", ["stats", "export"])
def test_read_only_commands_write_nothing(tmp_path, command):
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    extra = ["--out", str(tmp_path / "x.jsonl")] if command == "export" else []
    proc = cli("annotate", command, "--db", empty, *extra, check=False, timeout=60)
    assert_one_line_error(proc, 2, str(empty), "not an annotation database")
    assert empty.stat().st_size == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite"]
    db = _answered_db(tmp_path)
    before = db.read_bytes()
    proc = cli("annotate", command, "--db", db, *extra, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert db.read_bytes() == before


# ---- Fleiss' and Cohen's kappa, against hand computation -----------------------------------------

HAND_UNITS = {  # four items judged by a, b, c (two categories); one judged by a alone (ignored)
    1: {"a": 0, "b": 0, "c": 0},
    2: {"a": 0, "b": 1, "c": 1},
    3: {"a": 1, "b": 1, "c": 1},
    4: {"a": 0, "b": 0, "c": 1},
    5: {"a": 1},
}


def test_fleiss_kappa_by_hand():
    from ppo_rlhf.feedback.annotate.agreement import fleiss_kappa

    # P_u = 1, 1/3, 1, 1/3 -> P_o = 2/3; p_0 = p_1 = 6/12 -> P_e = 1/2; kappa = (2/3 - 1/2) / (1/2)
    assert fleiss_kappa(HAND_UNITS) == pytest.approx(1 / 3)
    # units with different numbers of annotators: {0,0}: P=1; {0,1,1}: P=1/3 -> P_o = 2/3;
    # p_0 = 3/5, p_1 = 2/5 -> P_e = 13/25; kappa = (2/3 - 13/25) / (12/25) = 11/36
    assert fleiss_kappa({1: {"a": 0, "b": 0}, 2: {"a": 0, "b": 1, "c": 1}}) == pytest.approx(11 / 36)
    assert fleiss_kappa({1: {"a": 0, "b": 0}}) is None  # one category throughout
    assert fleiss_kappa({1: {"a": 0}}) is None


def test_cohen_kappa_per_pair_by_hand():
    from ppo_rlhf.feedback.annotate.agreement import cohen_kappas

    k = cohen_kappas(HAND_UNITS)
    assert set(k) == {("a", "b"), ("a", "c"), ("b", "c")}
    # a = 0 0 1 0, b = 0 1 1 0: p_o = 3/4, p_e = 3/4 * 1/2 + 1/4 * 1/2 = 1/2 -> 1/2
    assert k["a", "b"] == (pytest.approx(0.5), 4)
    # a vs c = 0 1 1 1: p_o = 1/2, p_e = 3/4 * 1/4 + 1/4 * 3/4 = 3/8 -> (1/8) / (5/8) = 1/5
    assert k["a", "c"] == (pytest.approx(0.2), 4)
    # b vs c: p_o = 3/4, p_e = 1/2 * 1/4 + 1/2 * 3/4 = 1/2 -> 1/2
    assert k["b", "c"] == (pytest.approx(0.5), 4)


def test_stats_prints_the_kappas(tmp_path):
    from ppo_rlhf.feedback.annotate.export import agreement_stats, format_stats

    store = make_store(tmp_path / "db.sqlite", prompts=PROMPTS[:5])
    for item, values in HAND_UNITS.items():
        for name, v in values.items():
            shown = store._item(item, name).order.index(v)  # the answer in original index v
            store.record(item, name, Answer(False, shown))
    s = agreement_stats(store)
    assert s["fleiss_kappa"] == pytest.approx(1 / 3)
    assert s["cohen_kappa"][1] == {"annotators": ["a", "c"], "kappa": pytest.approx(0.2), "units": 4}
    text = format_stats(s, "db.sqlite")
    assert "Fleiss' kappa: 0.333" in text and "Cohen's kappa a / c: 0.200 (4 items)" in text


def test_the_listen_backlog_holds_a_team_connecting_at_once(tmp_path):
    """60 connections arrive before the server accepts any: with socketserver's default backlog
    of 5 the kernel drops the SYNs past it (the clients stall ~1 s and retry); with 128 every
    connection completes at once."""
    import socket

    from ppo_rlhf.feedback.annotate.server import AnnotateServer

    store = make_store(tmp_path / "db.sqlite")
    server = AnnotateServer(store)  # listening, not accepting yet
    socks = []
    try:
        for _ in range(60):
            s = socket.socket()
            s.settimeout(0.5)
            s.connect(("127.0.0.1", server.server_port))  # times out past a full backlog
            socks.append(s)
    finally:
        for s in socks:
            s.close()
        server.server_close()
    assert len(socks) == 60
