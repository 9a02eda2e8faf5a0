"""The annotation web app (`ppo-rlhf annotate`): answers and shown orders, the SQLite store
(assignment, reservations, restarts), the JSON API (every kind of bad input, tokens, paths),
concurrent annotators, SIGKILL of a real server process and restart with nothing acknowledged
lost, agreement statistics against hand-computed values, export, the CLI, and a reward model
trained from an export. The real-browser test is tests/test_annotate_browser.py."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from ppo_rlhf.data import PairwiseRecord, RankingRecord, RatingRecord, read_records
from ppo_rlhf.errors import UsageError
from ppo_rlhf.feedback.annotate.agreement import annotator_agreement, krippendorff_alpha, pairwise_agreement, units_for
from ppo_rlhf.feedback.annotate.answers import Answer, AnswerError, parse_answer, shown_order, to_original
from ppo_rlhf.feedback.annotate.export import agreement_stats, export_records, format_stats
from ppo_rlhf.feedback.annotate.server import AnnotateServer
from ppo_rlhf.feedback.annotate.store import Store
from tests.helpers import ROOT, assert_one_line_error, cli

CLI_MODULE = "ppo_rlhf"  # `python -m ppo_rlhf` is `ppo-rlhf` (as tests.helpers.cli runs it)
PROMPTS = [f"prompt {i}: say something nice" for i in range(6)]


def responses_of(prompt: str, k: int) -> list[str]:
    return [f"{prompt} / answer {j}" for j in range(k)]


def make_store(path: Path, mode: str = "choose", k: int = 2, scale: int = 7,
               prompts: list[str] = PROMPTS, salt: str | None = None) -> Store:
    store = Store.create(path, mode=mode, k=k, scale=scale, salt=salt)
    store.add_items((p, responses_of(p, k)) for p in prompts)
    return store


def write_responses(path: Path, prompts: list[str] = PROMPTS, k: int = 2) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "responses": responses_of(p, k)}) + "\n"
                            for p in prompts))
    return path


@contextmanager
def serving(store: Store, **kw):
    server = AnnotateServer(store, **kw)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def request(port: int, method: str, path: str, body: object = None, *, raw: bytes | None = None,
            headers: dict | None = None, host: str = "127.0.0.1") -> tuple[int, dict, dict]:
    """(status, decoded JSON or {}, response headers) of one request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    decoded = json.loads(payload) if ctype.startswith("application/json") else {}
    return resp.status, decoded, dict(resp.getheaders())


def raw_request(port: int, method: str, path: str, headers: dict | None = None,
                body: bytes | None = None) -> tuple[int, bytes, dict]:
    """(status, body bytes, headers) of one request, whatever it answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, payload, dict(resp.getheaders())


def get_next(port: int, name: str, **kw) -> dict:
    from urllib.parse import quote

    status, obj, _ = request(port, "GET", f"/api/next?annotator={quote(name)}", **kw)
    assert status == 200, obj
    return obj


def label(port: int, name: str, item_id: int, **answer) -> tuple[int, dict]:
    status, obj, _ = request(port, "POST", "/api/label",
                             {"item_id": item_id, "annotator": name, **answer})
    return status, obj


def n_answers(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


# ---- answers and shown orders ------------------------------------------------------------------

def test_shown_order_is_a_stable_per_annotator_permutation():
    orders = {name: [shown_order("salt", i, name, 4) for i in range(20)] for name in ("ann", "bob")}
    for name, per_item in orders.items():
        assert all(sorted(o) == [0, 1, 2, 3] for o in per_item)
        assert per_item == [shown_order("salt", i, name, 4) for i in range(20)]  # deterministic
        assert len({tuple(o) for o in per_item}) > 5  # really shuffled
    assert orders["ann"] != orders["bob"]
    # the same in a fresh interpreter (string seeding does not depend on PYTHONHASHSEED)
    code = ("from ppo_rlhf.feedback.annotate.answers import shown_order as s; "
            "print(s('salt', 3, 'ann', 4))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "123"}, check=True).stdout
    assert json.loads(out) == orders["ann"][3]


def test_answers_map_back_to_original_indices():
    order = [2, 0, 1]  # shown position j holds original response order[j]
    assert to_original("choose", 1, [1, 0]) == 0 and to_original("choose", "tie", [1, 0]) == "tie"
    assert to_original("rank", ((1,), (0, 2)), order) == [[0], [1, 2]]
    assert to_original("rate", (5, 1, 3), order) == [1, 3, 5]


@pytest.mark.parametrize("mode,k,body,fragment", [
    ("choose", 2, {"choice": 2}, "index 0..1"),
    ("choose", 2, {"choice": -1}, "index 0..1"),
    ("choose", 2, {"choice": True}, "index 0..1"),
    ("choose", 2, {"choice": "1"}, "index 0..1"),
    ("choose", 2, {}, "the answer is missing"),
    ("choose", 2, {"ranking": [0, 1]}, "--mode choose"),
    ("choose", 2, {"choice": 0, "skip": True}, "not both"),
    ("choose", 2, {"skip": False}, '"skip" must be true'),
    ("choose", 2, {"choice": 0, "extra": 1}, 'unknown field "extra"'),
    ("rank", 3, {"ranking": [0, 1]}, "missing [2]"),
    ("rank", 3, {"ranking": [0, 1, 1]}, "twice"),
    ("rank", 3, {"ranking": [0, 1, 3]}, "0..2"),
    ("rank", 3, {"ranking": [0, [], 1, 2]}, "empty group"),
    ("rank", 3, {"ranking": "0 1 2"}, "list"),
    ("rank", 3, {"ranking": [0, 1, 2.0]}, "0..2"),
    ("rate", 2, {"ratings": [1]}, "list of 2"),
    ("rate", 2, {"ratings": [1, 8]}, "1..7"),
    ("rate", 2, {"ratings": [0, 3]}, "1..7"),
    ("rate", 2, {"ratings": [1.5, 3]}, "1..7"),
    ("rate", 2, {"ratings": [True, 3]}, "1..7"),
])
def test_bad_answers_are_refused_with_one_line(mode, k, body, fragment):
    with pytest.raises(AnswerError) as e:
        parse_answer({"item_id": 1, "annotator": "a", **body}, mode, k, 7)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_good_answers_parse():
    assert parse_answer({"choice": "tie"}, "choose", 2, 7) == Answer(False, "tie")
    assert parse_answer({"skip": True}, "rank", 3, 7) == Answer(True)
    assert parse_answer({"ranking": [2, [0, 1]]}, "rank", 3, 7).value == ((2,), (0, 1))
    assert parse_answer({"ratings": [7, 1]}, "rate", 2, 7).value == (7, 1)


# ---- the store ---------------------------------------------------------------------------------

def test_assignment_reservations_and_per_item_quota(tmp_path):
    store = make_store(tmp_path / "db.sqlite", prompts=PROMPTS[:3])
    t = 1000.0
    a = store.next_item("ann", per_item=1, reserve_s=60, now=t)
    b = store.next_item("bob", per_item=1, reserve_s=60, now=t)
    assert (a.id, b.id) == (1, 2)  # N = 1: bob does not get ann's reserved item
    assert store.next_item("ann", per_item=1, reserve_s=60, now=t + 1).id == 1  # a reload
    assert store.next_item("cy", per_item=1, reserve_s=60, now=t).id == 3
    assert store.next_item("dee", per_item=1, reserve_s=60, now=t) is None  # all reserved
    assert store.next_item("dee", per_item=1, reserve_s=60, now=t + 61).id == 1  # expired
    store.record(2, "bob", Answer(False, 0), now=t + 62)
    assert store.next_item("bob", per_item=1, reserve_s=60, now=t + 62).id == 3  # 1 is dee's
    assert store.progress("bob", per_item=1) == {"done": 1, "skipped": 0, "total": 3}
    # N = 2: a second annotator is given the same item; a skip does not count towards N
    assert store.next_item("eve", per_item=2, reserve_s=60, now=t + 100).id == 1
    store.record(1, "eve", Answer(True), now=t)
    assert store.next_item("eve", per_item=2, reserve_s=60, now=t + 100).id == 2  # not 1 again
    assert store.next_item("fay", per_item=2, reserve_s=60, now=t + 200).id == 1
    # N = 1, everything expired: item 1 has only eve's skip, so it is still open
    assert store.next_item("hal", per_item=1, reserve_s=60, now=t + 300).id == 1


def test_a_second_answer_and_an_unknown_item_store_nothing(tmp_path):
    store = make_store(tmp_path / "db.sqlite")
    store.record(1, "ann", Answer(False, 1))
    with pytest.raises(AnswerError, match="ann has already answered item 1"):
        store.record(1, "ann", Answer(False, 0))
    with pytest.raises(AnswerError, match="already answered"):
        store.record(1, "ann", Answer(True))
    with pytest.raises(AnswerError, match="unknown item 99"):
        store.record(99, "ann", Answer(False, 0))
    assert [(a.item_id, a.annotator) for a in store.answers()] == [(1, "ann")]


def test_restart_keeps_answers_reservations_and_orders(tmp_path):
    db = tmp_path / "db.sqlite"
    store = make_store(db, mode="rank", k=3)
    first = store.next_item("ann", per_item=1, reserve_s=600)
    store.record(first.id, "ann", Answer(False, ((0,), (1,), (2,))))
    held = store.next_item("ann", per_item=1, reserve_s=600)
    store.close()
    store = Store(db)
    assert (store.mode, store.k) == ("rank", 3)
    again = store.next_item("ann", per_item=1, reserve_s=600)
    assert again == held  # same item, same shown order
    [answer] = store.answers()
    assert answer.value == [[first.order[0]], [first.order[1]], [first.order[2]]]


def test_store_refuses_what_is_not_its_database(tmp_path):
    with pytest.raises(UsageError, match="no such annotation database"):
        Store(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_text("not a database at all, just text" * 50)
    with pytest.raises(UsageError, match="not an SQLite database"):
        Store(tmp_path / "junk.sqlite")
    sqlite3.connect(tmp_path / "other.sqlite").execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(UsageError, match="not an annotation database"):
        Store(tmp_path / "other.sqlite")


def test_database_is_wal_and_answers_commit_with_full_sync(tmp_path):
    store = make_store(tmp_path / "db.sqlite")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    statements = []
    store._db.set_trace_callback(statements.append)
    store.next_item("ann", per_item=1, reserve_s=60)
    assert "PRAGMA synchronous=FULL" not in statements  # a reservation: no fsync
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    statements.clear()
    store.record(1, "ann", Answer(False, 0), per_item=1)
    # the answer's COMMIT runs under FULL (its WAL frames fsynced before it returns)
    full, commit = statements.index("PRAGMA synchronous=FULL"), statements.index("COMMIT")
    assert full < commit and "PRAGMA synchronous=NORMAL" not in statements[full:commit]


# ---- the API -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,k,answer,expected", [
    ("choose", 2, {"choice": 0}, "order[0]"),
    ("choose", 2, {"choice": "tie"}, "tie"),
    ("rank", 3, {"ranking": [2, [0, 1]]}, "rank"),
    ("rate", 3, {"ratings": [7, 1, 4]}, "rate"),
])
def test_api_round_trip_maps_the_shown_order_back(tmp_path, mode, k, answer, expected):
    # a salt under which no response of ann's first item is shown in its own place, so that
    # an answer stored without mapping it back could not pass
    salt = next(f"s{i}" for i in range(100)
                if all(o != j for j, o in enumerate(shown_order(f"s{i}", 1, "ann", k))))
    store = make_store(tmp_path / "db.sqlite", mode=mode, k=k, salt=salt)
    with serving(store) as server:
        item = get_next(server.server_port, "ann")
        assert set(item) == {"item_id", "prompt", "responses", "mode", "k", "scale", "progress"}
        assert (item["mode"], item["k"], item["progress"]) == (mode, k, {"done": 0, "skipped": 0, "total": 6})
        prompt, original = store.items()[item["item_id"]]
        order = [original.index(r) for r in item["responses"]]
        assert item["prompt"] == prompt and sorted(order) == list(range(k))
        status, obj = label(server.server_port, "ann", item["item_id"], **answer)
        assert status == 200 and obj == {"ok": True, "progress": {"done": 1, "skipped": 0, "total": 6}}
    [stored] = store.answers()
    if expected == "order[0]":
        assert stored.value == order[0]
    elif expected == "tie":
        assert stored.value == "tie"
    elif expected == "rank":
        assert stored.value == [[order[2]], sorted([order[0], order[1]])]
    else:
        assert stored.value == [dict(zip(order, [7, 1, 4]))[i] for i in range(3)]


def test_api_says_done_when_nothing_is_left(tmp_path):
    store = make_store(tmp_path / "db.sqlite", prompts=PROMPTS[:1])
    with serving(store, per_item=1) as server:
        item = get_next(server.server_port, "ann")
        assert label(server.server_port, "ann", item["item_id"], skip=True)[0] == 200
        obj = get_next(server.server_port, "ann")
        assert obj["done"] is True and obj["progress"] == {"done": 0, "skipped": 1, "total": 0}


BAD_REQUESTS = {
    "malformed JSON": dict(raw=b'{"item_id": 1, "annotator": '),
    "not an object": dict(body=[1, 2]),
    "NaN": dict(raw=b'{"item_id": 1, "annotator": "ann", "choice": NaN}'),
    "not UTF-8": dict(raw=b'{"item_id": 1, "annotator": "\xff"}'),
    "no item_id": dict(body={"annotator": "ann", "choice": 0}),
    "item_id a string": dict(body={"item_id": "1", "annotator": "ann", "choice": 0}),
    "unknown item": dict(body={"item_id": 999, "annotator": "ann", "choice": 0}),
    "no annotator": dict(body={"item_id": 1, "choice": 0}),
    "empty annotator": dict(body={"item_id": 1, "annotator": "", "choice": 0}),
    "annotator with a newline": dict(body={"item_id": 1, "annotator": "a\nb", "choice": 0}),
    "annotator too long": dict(body={"item_id": 1, "annotator": "x" * 65, "choice": 0}),
    "choice out of range": dict(body={"item_id": 1, "annotator": "ann", "choice": 2}),
    "ranking in choose mode": dict(body={"item_id": 1, "annotator": "ann", "ranking": [0, 1]}),
    "no answer": dict(body={"item_id": 1, "annotator": "ann"}),
    "form content type": dict(body={"item_id": 1, "annotator": "ann", "choice": 0},
                              headers={"Content-Type": "application/x-www-form-urlencoded"}),
    "too large": dict(raw=b'{"item_id": 1, "annotator": "ann", "choice": 0, "pad": "'
                      + b"x" * 70000 + b'"}'),
    "far too large": dict(raw=b"x" * 900_000),
}


BAD_REQUESTS.update({
    "item_id past 64 bits": dict(body={"item_id": 99999999999999999999999, "annotator": "ann",
                                       "choice": 0}),
    "item_id negative": dict(body={"item_id": -(2 ** 70), "annotator": "ann", "choice": 0}),
    "30000 nested [": dict(raw=b"[" * 30000),
    "12000 nested {": dict(raw=b'{"a":' * 12000),
})


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_label_requests_get_400_one_line_and_store_nothing(tmp_path, case):
    store = make_store(tmp_path / "db.sqlite")
    with serving(store) as server:
        status, obj, headers = request(server.server_port, "POST", "/api/label", **BAD_REQUESTS[case])
    assert status == (413 if "too large" in case else 400), obj
    assert headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    assert set(obj) == {"error"} and obj["error"] and "\n" not in obj["error"], obj
    assert n_answers(tmp_path / "db.sqlite") == 0


def test_bad_rankings_and_a_second_answer_get_400(tmp_path):
    store = make_store(tmp_path / "db.sqlite", mode="rank", k=3)
    with serving(store) as server:
        port = server.server_port
        for ranking in ([0, 1], [0, 0, 1], [0, 1, 3], [[0, 1, 2], 0], []):
            status, obj = label(port, "ann", 1, ranking=ranking)
            assert status == 400 and "ranking" in obj["error"], (ranking, obj)
        assert n_answers(tmp_path / "db.sqlite") == 0
        assert label(port, "ann", 1, ranking=[[0, 1, 2]])[0] == 200
        status, obj = label(port, "ann", 1, ranking=[0, 1, 2])
        assert (status, obj) == (400, {"error": "ann has already answered item 1"})
    assert [a.value for a in store.answers()] == [[[0, 1, 2]]]


def test_bad_next_requests(tmp_path):
    store = make_store(tmp_path / "db.sqlite")
    with serving(store) as server:
        port = server.server_port
        for path in ("/api/next", "/api/next?annotator=", "/api/next?annotator=a&annotator=b",
                     "/api/next?annotator=%20ann"):
            status, obj, _ = request(port, "GET", path)
            assert status == 400 and "annotator" in obj["error"], (path, obj)
        assert request(port, "POST", "/api/next?annotator=ann", {})[0] == 405
        assert request(port, "GET", "/api/label")[0] == 405
        for path in ("/nope", "/api", "/../store.py", "/static/app.js", "/app.js/..",
                     "/%2e%2e/%2e%2e/etc/passwd", "/answers.py"):
            status, obj, _ = request(port, "GET", path)
            assert status == 404 and set(obj) == {"error"}, path


def test_page_is_served_with_a_strict_content_security_policy(tmp_path):
    store = make_store(tmp_path / "db.sqlite")
    with serving(store) as server:
        for path, ctype in (("/", "text/html"), ("/app.js", "text/javascript"),
                            ("/app.css", "text/css")):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read().decode()
            assert resp.status == 200 and resp.getheader("Content-Type").startswith(ctype)
            csp = resp.getheader("Content-Security-Policy")
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            assert resp.getheader("X-Content-Type-Options") == "nosniff"
            if path == "/":
                assert '<script src="app.js"></script>' in body and "onclick" not in body
            if path == "/app.js":  # data only ever goes in as text
                assert "innerHTML" not in body and "insertAdjacentHTML" not in body


def test_without_a_token_only_loopback_host_names_are_served(tmp_path):
    store = make_store(tmp_path / "db.sqlite")
    with serving(store) as server:
        port = server.server_port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            assert request(port, "GET", "/", headers={"Host": host})[0] == 200
        for host in (f"evil.example:{port}", "192.168.1.5", ""):  # DNS rebinding
            status, obj, _ = request(port, "GET", "/api/next?annotator=ann",
                                     headers={"Host": host})
            assert status == 403, host


def test_with_a_token_every_request_must_carry_it(tmp_path):
    token = "s3cret-token-0123456789"
    store = make_store(tmp_path / "db.sqlite")
    with serving(store, token=token) as server:
        port = server.server_port
        for path in ("/api/next?annotator=ann", "/nope"):
            status, obj, _ = request(port, "GET", path)
            assert status == 403 and obj == {"error": "missing or wrong token"}, path
        for path in ("/", "/app.js"):  # the page's paths: a sentence saying what to do
            status, body, headers = raw_request(port, "GET", path)
            assert status == 403 and b"needs its token" in body and b"?token=" in body
            assert headers["Content-Type"].startswith("text/html") and headers["Content-Security-Policy"]
        assert request(port, "GET", "/?token=wrong-token-0123456789")[0] == 403
        assert request(port, "GET", "/", headers={"Authorization": "Bearer nope"})[0] == 403
        status, obj = label(port, "ann", 1, choice=0)
        assert status == 403 and n_answers(tmp_path / "db.sqlite") == 0
        # the page opened with ?token= gets an HttpOnly SameSite cookie; the API takes any form
        status, _, headers = request(port, "GET", f"/?token={token}")
        cookie = headers["Set-Cookie"]
        assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert request(port, "GET", "/app.js", headers={"Cookie": cookie.split(";")[0]})[0] == 200
        auth = {"Authorization": f"Bearer {token}"}
        item = get_next(port, "ann", headers=auth)
        status, _, _ = request(port, "POST", "/api/label", headers=auth,
                               body={"item_id": item["item_id"], "annotator": "ann", "choice": 0})
        assert status == 200 and n_answers(tmp_path / "db.sqlite") == 1
        # a token server answers any Host (it is meant to be reached from other machines)
        assert request(port, "GET", "/", headers={"Host": "annotate.lan", **auth})[0] == 200


def test_text_is_stored_and_returned_verbatim_never_interpreted(tmp_path):
    nasty = ["<script>alert(1)</script>", "'; DROP TABLE answers; --", "é\u202e\x00 nul"]
    store = Store.create(tmp_path / "db.sqlite", mode="choose", k=2, scale=7)
    store.add_items([("<b>prompt</b>", nasty[:2]), ("p2", [nasty[2], "x"])])
    with serving(store) as server:
        item = get_next(server.server_port, "<img src=x onerror=alert(1)>")
        assert item["prompt"] == "<b>prompt</b>" and sorted(item["responses"]) == sorted(nasty[:2])
        status, _ = label(server.server_port, "<img src=x onerror=alert(1)>", item["item_id"],
                          choice=0)
        assert status == 200
    assert store.items()[2][1][0] == nasty[2] and n_answers(tmp_path / "db.sqlite") == 1


# ---- concurrency -------------------------------------------------------------------------------

def test_concurrent_annotators_fill_each_item_exactly_per_item_times(tmp_path):
    prompts = [f"p{i}" for i in range(12)]
    store = make_store(tmp_path / "db.sqlite", prompts=prompts)
    names = ["ann", "bob", "cy", "dee"]
    acknowledged: dict[str, list[int]] = {n: [] for n in names}
    errors: list[str] = []
    with serving(store, per_item=2) as server:
        port = server.server_port
        barrier = threading.Barrier(len(names))

        def annotate(name: str) -> None:
            rng = random.Random(name)
            barrier.wait()
            while True:
                item = get_next(port, name)
                if item.get("done"):
                    return
                status, obj = label(port, name, item["item_id"], choice=rng.choice([0, 1, "tie"]))
                if status != 200:
                    errors.append(f"{name}: {obj}")
                    return
                acknowledged[name].append(item["item_id"])

        threads = [threading.Thread(target=annotate, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    answers = list(store.answers())
    per_item: dict[int, list[str]] = {}
    for a in answers:
        per_item.setdefault(a.item_id, []).append(a.annotator)
    assert sorted(per_item) == list(range(1, 13))
    assert all(len(who) == 2 == len(set(who)) for who in per_item.values()), per_item
    assert sorted((a.annotator, a.item_id) for a in answers) == sorted(
        (n, i) for n, ids in acknowledged.items() for i in ids)


def test_concurrent_next_with_one_per_item_hands_out_distinct_items(tmp_path):
    store = make_store(tmp_path / "db.sqlite")
    got: list[int] = []
    with serving(store, per_item=1) as server:
        barrier = threading.Barrier(6)

        def ask(name: str) -> None:
            barrier.wait()
            got.append(get_next(server.server_port, name)["item_id"])

        threads = [threading.Thread(target=ask, args=(f"a{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]


# ---- SIGKILL of the server process, and restart --------------------------------------------------

def start_server(args: list, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", CLI_MODULE, "annotate", "serve", *map(str, args),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                      **(env or {})})
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "annotation page: http://" in line:
            port = int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
            return proc, port
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()}")


def test_sigkill_loses_no_acknowledged_answer_and_a_restart_continues(tmp_path):
    """Four annotators answer as fast as they can (per item 2, 60 items); the server process is
    SIGKILLed three times, each at a random moment once a random number of answers went through,
    and restarted on the same database. Every answer the API acknowledged is in the database
    after each kill, none twice; the annotators go on where they were, and all 120 answers are
    there at the end."""
    prompts = [f"prompt {i}" for i in range(60)]
    responses = write_responses(tmp_path / "responses.jsonl", prompts)
    db = tmp_path / "labels.sqlite"
    names = ["ann", "bob", "cy", "dee"]
    acked: set[tuple[str, int]] = set()
    unacked: set[tuple[str, int]] = set()  # stored, never acknowledged (earlier rounds)
    lock = threading.Lock()
    rng = random.Random(0)
    errors: list[str] = []
    for round_ in range(4):
        last = round_ == 3
        proc, port = start_server(["--responses", responses, "--db", db, "--per-item", 2])

        def annotate(name: str, port: int) -> None:
            while True:
                try:
                    item = get_next(port, name)
                    if item.get("done"):
                        return
                    status, obj = label(port, name, item["item_id"], choice=rng.choice([0, 1]))
                except (OSError, http.client.HTTPException):
                    return  # the server is gone
                if status != 200:  # never: items go only to those who have not answered them
                    errors.append(f"{name}: {obj}")
                    return
                with lock:
                    acked.add((name, item["item_id"]))

        threads = [threading.Thread(target=annotate, args=(n, port)) for n in names]
        for t in threads:
            t.start()
        if not last:
            target = rng.randint(10 + 30 * round_, 30 + 30 * round_)
            deadline = time.time() + 60
            while len(acked) < target and time.time() < deadline:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.005))  # anywhere inside the requests then in flight
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
        for t in threads:
            t.join(120)
        if last:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()
        assert not errors
        with sqlite3.connect(db) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = set(c.execute("SELECT annotator, item_id FROM answers"))
        missing = acked - stored
        assert not missing, f"round {round_}: acknowledged but lost: {sorted(missing)[:5]}"
        # committed but not acknowledged (the reply died with the server): at most one per
        # annotator per kill -- each has one request in flight -- and none in the last round (no
        # kill). They stay unacknowledged in later rounds (the annotator never gets that item again).
        new = (stored - acked) - unacked
        per_annotator = [name for name, _ in new]
        assert all(per_annotator.count(n) <= (0 if last else 1) for n in names), f"round {round_}: {sorted(new)}"
        unacked |= new
        if not last:
            assert len(stored) < 120, "the kill came after everything was done; not a real test"
    assert len(stored) == 120
    with Store(db) as store:
        counts: dict[int, int] = {}
        for a in store.answers():
            counts[a.item_id] = counts.get(a.item_id, 0) + 1
    assert counts == {i: 2 for i in range(1, 61)}


# ---- agreement ---------------------------------------------------------------------------------

def test_alpha_and_agreement_on_a_hand_computed_example():
    """Two annotators, three items: (a, a), (a, b), (b, b). Coincidences: o_aa = o_bb = 2,
    o_ab = o_ba = 1; n_a = n_b = 3, n = 6. D_o = 2/6; D_e = 2 * 3 * 3 / (6 * 5) = 0.6;
    alpha = 1 - (1/3) / 0.6 = 4/9. Pairwise agreement: 2 of 3 pairs."""
    units = {1: {"x": "a", "y": "a"}, 2: {"x": "a", "y": "b"}, 3: {"x": "b", "y": "b"},
             4: {"x": "a"}}  # a unit with one value is not pairable
    assert krippendorff_alpha(units) == pytest.approx(4 / 9, abs=1e-12)
    assert pairwise_agreement(units) == (2, 3)
    assert annotator_agreement(units) == {"x": (2, 3), "y": (2, 3)}


def test_alpha_matches_krippendorffs_published_example():
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 observers x 12
    units example with missing values: nominal 0.743, ordinal 0.815, interval 0.849."""
    n = None
    rows = {"A": [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n], "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
            "C": [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n], "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]}
    units = {u: {c: v[u] for c, v in rows.items() if v[u] is not None} for u in range(12)}
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_alpha_edge_cases():
    assert krippendorff_alpha({1: {"x": 1, "y": 1}, 2: {"x": 1, "y": 1}}) is None  # no variation
    assert krippendorff_alpha({1: {"x": 1}}) is None
    assert krippendorff_alpha({1: {"x": 1, "y": 1}, 2: {"x": 2, "y": 2}}) == 1.0
    assert krippendorff_alpha({1: {"x": 1, "y": 2}, 2: {"x": 2, "y": 1}}) < 0
    with pytest.raises(ValueError):
        krippendorff_alpha({}, "ratio")


def test_units_of_rank_and_rate_answers():
    from ppo_rlhf.feedback.annotate.store import StoredAnswer

    rank = [StoredAnswer(1, "x", False, [[2], [0, 1]], 0),
            StoredAnswer(1, "y", False, [[0], [1], [2]], 0), StoredAnswer(1, "z", True, None, 0)]
    assert units_for("rank", rank) == {(1, 0, 1): {"x": "tie", "y": "0"},
                                       (1, 0, 2): {"x": "2", "y": "0"},
                                       (1, 1, 2): {"x": "2", "y": "1"}}
    rate = [StoredAnswer(3, "x", False, [5, 1], 0), StoredAnswer(3, "y", False, [4, 1], 0)]
    assert units_for("rate", rate) == {(3, 0): {"x": 5, "y": 4}, (3, 1): {"x": 1, "y": 1}}


# ---- export and stats --------------------------------------------------------------------------

def answered_store(path: Path, mode: str, k: int, answers: dict[str, list]) -> Store:
    """A store whose item i (1-based) got answers[name][i-1] (original indices; None: not
    answered; "skip": skipped), recorded with the identity order."""
    store = make_store(path, mode=mode, k=k, prompts=PROMPTS[:3])
    identity = list(range(k))
    for name, values in answers.items():
        for i, v in enumerate(values, 1):
            if v is None:
                continue
            shown = [store._item(i, name).order.index(j) for j in identity]
            if v == "skip":
                store.record(i, name, Answer(True), now=1.7e9 + i)
            elif mode == "choose":
                store.record(i, name, Answer(False, v if v == "tie" else shown[v]), now=1.7e9 + i)
            elif mode == "rank":
                store.record(i, name, Answer(False, tuple(tuple(shown[j] for j in t) for t in v)),
                             now=1.7e9 + i)
            else:
                ratings = [0] * k
                for j, r in enumerate(v):
                    ratings[shown[j]] = r
                store.record(i, name, Answer(False, tuple(ratings)), now=1.7e9 + i)
    return store


def test_export_all_and_majority_choose(tmp_path):
    store = answered_store(tmp_path / "db.sqlite", "choose", 2,
                           {"ann": [0, 1, "tie"], "bob": [0, 0, "skip"], "cy": [1, None, None]})
    recs = export_records(store, "all")
    assert all(isinstance(r, PairwiseRecord) for r in recs) and len(recs) == 6
    first = recs[0]
    assert (first.prompt, first.chosen, first.rejected) == (PROMPTS[0],
                                                            *responses_of(PROMPTS[0], 2))
    assert first.extra == {"annotator": "ann", "time": "2023-11-14T22:13:21Z", "item_id": 1}
    assert [r.tie for r in recs] == [False] * 5 + [True]
    maj = export_records(store, "majority")
    assert [(r.extra["item_id"], r.chosen[-1], r.tie) for r in maj] == [
        (1, "0", False), (2, "0", True), (3, "0", True)]
    assert maj[0].extra["annotator"] == ["ann", "bob", "cy"] and maj[0].extra["votes"] == 3
    assert [r.extra["item_id"] for r in export_records(store, "majority", ties="drop")] == [1]
    assert len(export_records(store, "all", ties="drop")) == 5


def test_export_rank_majority_is_by_mean_place(tmp_path):
    store = answered_store(tmp_path / "db.sqlite", "rank", 3,
                           {"ann": [[[2], [0], [1]]], "bob": [[[0], [2], [1]]],
                            "cy": [[[2], [0, 1]]]})
    recs = export_records(store, "all")
    assert all(isinstance(r, RankingRecord) for r in recs)
    assert [r.ranking for r in recs] == [(2, 0, 1), (0, 2, 1), (2, (0, 1))]
    assert recs[0].responses == tuple(responses_of(PROMPTS[0], 3))
    # mean places: 0 -> (1 + 0 + 1.5) / 3, 1 -> (2 + 2 + 1.5) / 3, 2 -> (0 + 1 + 0) / 3
    [maj] = export_records(store, "majority")
    assert maj.ranking == (2, 0, 1)
    tied = answered_store(tmp_path / "t.sqlite", "rank", 3,
                          {"ann": [[[0], [1], [2]]], "bob": [[[1], [0], [2]]]})
    assert export_records(tied, "majority")[0].ranking == ((0, 1), 2)
    all_tied = answered_store(tmp_path / "a.sqlite", "rank", 3, {"ann": [[[0, 1, 2]]]})
    assert export_records(all_tied, "majority", ties="drop") == []


def test_export_rate_majority_is_the_median(tmp_path):
    store = answered_store(tmp_path / "db.sqlite", "rate", 2,
                           {"ann": [[7, 1]], "bob": [[5, 2]], "cy": [[6, 6]]})
    recs = export_records(store, "all")
    assert len(recs) == 6 and all(isinstance(r, RatingRecord) for r in recs)
    assert [(r.response[-1], r.rating) for r in recs[:2]] == [("0", 7.0), ("1", 1.0)]
    maj = export_records(store, "majority")
    assert [(r.response[-1], r.rating) for r in maj] == [("0", 6.0), ("1", 2.0)]


def test_stats_count_answers_and_measure_agreement(tmp_path):
    store = answered_store(tmp_path / "db.sqlite", "choose", 2,
                           {"ann": [0, 0, 1], "bob": [0, 1, 1], "cy": ["skip", None, None]})
    s = agreement_stats(store)
    assert s["annotators"] == {"ann": {"answered": 3, "skipped": 0, "agree": 2, "pairs": 3},
                               "bob": {"answered": 3, "skipped": 0, "agree": 2, "pairs": 3},
                               "cy": {"answered": 0, "skipped": 1, "agree": 0, "pairs": 0}}
    assert s["agreement"] == {"agree": 2, "pairs": 3, "rate": pytest.approx(2 / 3)}
    assert s["alpha"]["nominal"] == pytest.approx(4 / 9)  # the hand-computed example above
    text = format_stats(s, "db.sqlite")
    assert "pairwise agreement: 0.667 (2 of 3 annotator pairs agree" in text
    assert "Krippendorff's alpha (nominal): 0.444" in text
    rate = answered_store(tmp_path / "r.sqlite", "rate", 2, {"ann": [[7, 1]], "bob": [[6, 1]]})
    assert set(agreement_stats(rate)["alpha"]) == {"interval", "ordinal"}


# ---- the CLI -----------------------------------------------------------------------------------

def test_cli_export_and_stats(tmp_path):
    store = answered_store(tmp_path / "db.sqlite", "choose", 2,
                           {"ann": [0, 1, 0], "bob": [0, 0, 0]})
    store.close()
    out = tmp_path / "prefs.jsonl"
    proc = cli("annotate", "export", "--db", tmp_path / "db.sqlite", "--out", out,
               "--resolve", "majority")
    assert "3 pairwise records (majority)" in proc.stdout
    recs = list(read_records(out))
    assert len(recs) == 3 and recs[1].tie and recs[0].extra["annotator"] == ["ann", "bob"]
    proc = cli("annotate", "stats", "--db", tmp_path / "db.sqlite")
    assert "ann" in proc.stdout and "Krippendorff's alpha (nominal)" in proc.stdout
    s = json.loads(cli("annotate", "stats", "--db", tmp_path / "db.sqlite", "--json").stdout)
    assert s["agreement"]["pairs"] == 3 and s["agreement"]["agree"] == 2


@pytest.mark.parametrize("case", ["no-source", "public-host", "short-token", "other-mode",
                                  "too-few-responses", "per-item", "export-missing-db",
                                  "export-empty", "stats-not-a-db"])
def test_cli_bad_input_is_a_one_line_error(tmp_path, case):
    responses = write_responses(tmp_path / "r.jsonl")
    db = tmp_path / "labels.sqlite"
    args, expected = {
        "no-source": (["serve", "--db", db], "does not exist: give --responses"),
        "public-host": (["serve", "--responses", responses, "--db", db, "--host", "0.0.0.0"],
                        "give --token"),
        "short-token": (["serve", "--responses", responses, "--db", db, "--token", "abc"],
                        "at least 16 characters"),
        "other-mode": (["serve", "--db", db, "--mode", "rank", "--k", "2"],
                       "was created with --mode choose"),
        "too-few-responses": (["serve", "--responses", responses, "--db", db, "--mode", "rank",
                               "--k", "3"], "fewer than --k 3"),
        "per-item": (["serve", "--responses", responses, "--db", db, "--per-item", "0"],
                     "--per-item must be >= 1"),
        "export-missing-db": (["export", "--db", db, "--out", tmp_path / "o.jsonl"],
                              "no such annotation database"),
        "export-empty": (["export", "--db", db, "--out", tmp_path / "o.jsonl"], "no answers"),
        "stats-not-a-db": (["stats", "--db", responses], "not an SQLite database"),
    }[case]
    if case in ("other-mode", "export-empty"):
        make_store(db).close()
    proc = cli("annotate", *args, check=False, env={"PPO_RLHF_ANNOTATE_TOKEN": ""})
    assert_one_line_error(proc, 2, expected)
    if case in ("no-source", "public-host", "short-token", "too-few-responses", "per-item"):
        assert not db.exists()  # nothing is created before the input is known to be good


def test_cli_serve_adds_new_prompts_on_restart_and_stops_on_sigterm(tmp_path):
    db = tmp_path / "labels.sqlite"
    proc, port = start_server(["--responses", write_responses(tmp_path / "a.jsonl", PROMPTS[:2]),
                               "--db", db])
    item = get_next(port, "ann")
    assert label(port, "ann", item["item_id"], choice=1)[0] == 200
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "stopped" in out and err == ""
    proc, port = start_server(["--responses", write_responses(tmp_path / "b.jsonl", PROMPTS[:4]),
                               "--db", db])
    assert get_next(port, "ann")["progress"] == {"done": 1, "skipped": 0, "total": 4}
    proc.kill()
    proc.communicate()
    proc, port = start_server(["--db", db], env={"PPO_RLHF_ANNOTATE_TOKEN": "t" * 20})
    assert request(port, "GET", "/api/next?annotator=ann")[0] == 403
    proc.kill()
    proc.communicate()


def test_cli_serve_samples_from_a_policy_once(tmp_path, tiny_checkpoint):
    """--policy DIR --prompts FILE: K responses per prompt are sampled once, when the database
    is created; a restart serves them as stored."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\nbrown fox\n")
    db = tmp_path / "labels.sqlite"
    proc, port = start_server(["--policy", tiny_checkpoint("gpt2"), "--prompts", prompts,
                               "--backend", "torch", "--max-new-tokens", "4", "--db", db,
                               "--mode", "rank", "--k", "3"])
    item = get_next(port, "ann")
    assert item["prompt"] == "the quick" and len(item["responses"]) == 3
    assert item["progress"] == {"done": 0, "skipped": 0, "total": 2}
    proc.kill()
    proc.communicate()
    with Store(db) as store:
        before = store.items()
    proc, port = start_server(["--db", db])
    assert get_next(port, "bob")["progress"]["total"] == 2
    proc.kill()
    proc.communicate()
    with Store(db) as store:
        assert store.items() == before


# ---- from the browser's labels to a reward model -------------------------------------------------

def test_reward_model_trains_from_an_export(tmp_path, tiny_checkpoint):
    """Two annotators label 12 items through the API (they prefer the response with "good");
    the export is `train-rm` data as it is, and the trained model ranks the preferred higher."""
    prompts = [f"review {i}:" for i in range(12)]
    store = Store.create(tmp_path / "db.sqlite", mode="choose", k=2, scale=7)
    store.add_items((p, [f"{p} a good answer", f"{p} the bad one"]) for p in prompts)
    with serving(store, per_item=2) as server:
        for name in ("ann", "bob"):
            while not (item := get_next(server.server_port, name)).get("done"):
                good = next(j for j, r in enumerate(item["responses"]) if "good" in r)
                assert label(server.server_port, name, item["item_id"], choice=good)[0] == 200
    store.close()
    out = tmp_path / "prefs.jsonl"
    cli("annotate", "export", "--db", tmp_path / "db.sqlite", "--out", out)
    recs = list(read_records(out))
    assert len(recs) == 24 and all("good" in r.chosen for r in recs)
    rm = tmp_path / "rm"
    from ppo_rlhf.app.cli import main  # in this process: torch is imported already

    assert main(["train-rm", "--backend", "torch", "--model", str(tiny_checkpoint("gpt2")),
                 "--data", str(out), "--out", str(rm), "--epochs", "3", "--batch-size", "8",
                 "--max-length", "32", "--lr", "3e-3", "--eval-fraction", "0",
                 "--no-progress"]) == 0
    m = json.loads((rm / "metrics.json").read_text())
    assert m["num_train"] == 24 and m["train_accuracy"] >= 0.9, m
