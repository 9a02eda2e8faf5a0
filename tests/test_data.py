"""Data formats: every kind round-trips, readers stream and name the file:line of a bad record,
conversions to pairs are complete and correct, and the `datasets` bridge round-trips."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppo_rlhf.data import (
    DataError,
    JsonlWriter,
    PairwiseRecord,
    PromptRecord,
    RankingRecord,
    RatingRecord,
    ResponsesRecord,
    detect_kind,
    from_hf_dataset,
    load_prompts,
    ranking_to_pairs,
    ratings_to_pairs,
    read_pairwise,
    read_prompts,
    read_rankings,
    read_ratings,
    read_records,
    record_from_dict,
    record_to_dict,
    to_hf_dataset,
    to_pairs,
    write_prompts_text,
    write_records,
)
from ppo_rlhf.errors import UsageError

EXAMPLES = {
    "prompt": [PromptRecord("review of the phone:"),
               PromptRecord("naïve ☃ prompt\nwith a newline", extra={"id": 7})],
    "responses": [ResponsesRecord("p", ("a", "b", "")),
                  ResponsesRecord("q", ("only one",), extra={"meta": {"model": "x"}})],
    "pairwise": [PairwiseRecord("p", "good", "bad"),
                 PairwiseRecord("p", "same", "same-ish", tie=True, extra={"meta": {"who": "ann"}}),
                 PairwiseRecord("p", "", "empty chosen is allowed")],
    "ranking": [RankingRecord("p", ("a", "b", "c"), (2, 0, 1)),
                RankingRecord("p", ("a", "b", "c", "d"), (2, (0, 3), 1), extra={"src": "x"}),
                RankingRecord("p", ("a", "b"), ((0, 1),))],
    "rating": [RatingRecord("p", "r", 5), RatingRecord("p", "r2", -0.25, extra={"scale": [1, 7]})],
}


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_every_kind_round_trips(tmp_path, kind):
    path = tmp_path / f"{kind}.jsonl"
    assert write_records(path, EXAMPLES[kind]) == len(EXAMPLES[kind])
    assert list(read_records(path, kind)) == EXAMPLES[kind]
    assert list(read_records(path)) == EXAMPLES[kind]  # kind detected from the keys
    # and the dict form round-trips too
    for rec in EXAMPLES[kind]:
        assert record_from_dict(json.loads(json.dumps(record_to_dict(rec)))) == rec


def test_json_layout_is_exactly_as_documented(tmp_path):
    path = tmp_path / "x.jsonl"
    write_records(path, [EXAMPLES["pairwise"][0], EXAMPLES["pairwise"][1],
                         EXAMPLES["ranking"][1], EXAMPLES["rating"][0]])
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"prompt": "p", "chosen": "good", "rejected": "bad"}  # no "tie": false
    assert lines[1] == {"prompt": "p", "chosen": "same", "rejected": "same-ish", "tie": True,
                        "meta": {"who": "ann"}}
    assert lines[2] == {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1],
                        "src": "x"}
    assert lines[3] == {"prompt": "p", "response": "r", "rating": 5.0}


def test_ranking_normalises_singleton_groups_and_exposes_tiers():
    a = RankingRecord("p", ("a", "b", "c", "d"), ([2], [0, 3], [1]))
    b = RankingRecord("p", ["a", "b", "c", "d"], [2, (0, 3), 1])
    assert a == b and a.ranking == (2, (0, 3), 1)
    assert a.tiers == ((2,), (0, 3), (1,)) and a.has_ties
    assert not RankingRecord("p", ("a", "b"), (1, 0)).has_ties


def test_prompts_plain_text_and_jsonl(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_bytes(b"\xef\xbb\xbffirst prompt\r\n\n   \n second keeps its spaces \nlast")
    assert load_prompts(txt) == ["first prompt", " second keeps its spaces ", "last"]
    jl = tmp_path / "prompts.jsonl"
    jl.write_text('{"prompt": "a"}\n\n{"prompt": "b", "meta": {"x": 1}}\n')
    recs = list(read_prompts(jl))
    assert [r.prompt for r in recs] == ["a", "b"] and recs[1].extra == {"meta": {"x": 1}}
    # a preference file is also a prompt file: its other keys go to `extra`
    pw = tmp_path / "pw.jsonl"
    write_records(pw, EXAMPLES["pairwise"])
    assert load_prompts(pw) == ["p"] * 3
    # writing plain text refuses what it cannot represent
    assert write_prompts_text(tmp_path / "out.txt", ["x", "y"]) == 2
    assert load_prompts(tmp_path / "out.txt") == ["x", "y"]
    with pytest.raises(DataError, match="line break"):
        write_prompts_text(tmp_path / "bad.txt", ["a\nb"])


@pytest.mark.parametrize("name,content", [("empty.txt", b""), ("blank.txt", b"\n  \n\n"),
                                          ("empty.jsonl", b""), ("blank.jsonl", b"\n\n")])
def test_an_empty_prompt_file_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match="no prompt") as e:
        load_prompts(path)
    assert str(e.value).startswith(f"{path}: ")
    assert isinstance(e.value, UsageError)
    assert list(read_prompts(path, allow_empty=True)) == []


def test_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="cannot read"):
        list(read_pairwise(tmp_path / "nope.jsonl"))


BAD_LINES = [
    ("pairwise", b'{"prompt": "p", "chosen": "a", "rejected": "b"', "invalid JSON"),
    ("pairwise", b'["prompt", "chosen"]', "expected a JSON object, got an array"),
    ("pairwise", b'{"prompt": "p", "chosen": "a"}', 'lacks the field "rejected"'),
    ("pairwise", b'{"prompt": "", "chosen": "a", "rejected": "b"}', '"prompt" is empty'),
    ("pairwise", b'{"prompt": 3, "chosen": "a", "rejected": "b"}', '"prompt" must be a string'),
    ("pairwise", b'{"prompt": "p", "chosen": "a", "rejected": "b", "tie": "yes"}', '"tie" must be'),
    ("pairwise", b'{"prompt": "p", "chosen": "a", "rejected": "b", "x": NaN}', "NaN is not a valid"),
    ("pairwise", b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}', "not valid UTF-8"),
    ("ranking", b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}', "lists response 0 twice"),
    ("ranking", b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0]}', "missing [1]"),
    ("ranking", b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}', "out of range"),
    ("ranking", b'{"prompt": "p", "responses": ["a", "b"], "ranking": [1, true]}', "must hold indices"),
    ("ranking", b'{"prompt": "p", "responses": ["a", "b"], "ranking": [[], 0, 1]}', "empty group"),
    ("ranking", b'{"prompt": "p", "responses": ["a"], "ranking": [0]}', "at least 2"),
    ("ranking", b'{"prompt": "p", "responses": "ab", "ranking": [0, 1]}', "array of strings"),
    ("rating", b'{"prompt": "p", "response": "r", "rating": "5"}', '"rating" must be a finite number'),
    ("rating", b'{"prompt": "p", "response": "r", "rating": true}', '"rating" must be a finite number'),
    ("rating", b'{"prompt": "p", "response": "r", "rating": Infinity}', "Infinity is not a valid"),
    (None, b'{"prompt": "p", "chosen": "a", "rejected": "b", "rating": 1}', "several kinds"),
]


@pytest.mark.parametrize("kind,line,message", BAD_LINES)
def test_a_malformed_line_names_file_and_line(tmp_path, kind, line, message):
    good = {"pairwise": EXAMPLES["pairwise"][0], "ranking": EXAMPLES["ranking"][0],
            "rating": EXAMPLES["rating"][0], None: EXAMPLES["pairwise"][0]}[kind]
    path = tmp_path / "data.jsonl"
    write_records(path, [good])
    with open(path, "ab") as f:
        f.write(b"\n" + line + b"\n")  # the bad record is on line 3, after a blank line
    reader = read_records(path, kind)
    assert next(reader) == good  # the good record streams out before the bad one is read
    with pytest.raises(DataError) as e:
        next(reader)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value), str(e.value)
    assert e.value.line == 3 and e.value.path == path


def test_kind_specific_readers_refuse_other_kinds(tmp_path):
    path = tmp_path / "r.jsonl"
    write_records(path, EXAMPLES["rating"])
    assert list(read_ratings(path)) == EXAMPLES["rating"]
    with pytest.raises(DataError, match=r":1: pairwise record lacks the fields"):
        list(read_pairwise(path))
    with pytest.raises(DataError, match=r":1: ranking record lacks"):
        list(read_rankings(path))


def test_detect_kind():
    assert detect_kind({"prompt": "p"}) == "prompt"
    assert detect_kind({"prompt": "p", "responses": []}) == "responses"
    assert detect_kind({"prompt": "p", "responses": [], "ranking": []}) == "ranking"
    assert detect_kind({"chosen": "a"}) == "pairwise"
    assert detect_kind({"rating": 1}) == "rating"


def test_records_validate_when_built_in_code():
    with pytest.raises(DataError, match="extra may not hold"):
        PairwiseRecord("p", "a", "b", extra={"chosen": "x"})
    with pytest.raises(DataError):
        RatingRecord("p", "r", float("nan"))
    assert hash(PairwiseRecord("p", "a", "b", extra={"m": [1]})) == hash(PairwiseRecord("p", "a", "b"))


def test_writer_appends_several_records_in_one_line_each(tmp_path):
    path = tmp_path / "w.jsonl"
    with JsonlWriter(path, durable=True) as w:
        w.write(*EXAMPLES["rating"])
    with JsonlWriter(path, append=True) as w:
        w.write(EXAMPLES["rating"][0])
    assert path.read_text(encoding="utf-8").count("\n") == 3
    assert list(read_ratings(path)) == EXAMPLES["rating"] + EXAMPLES["rating"][:1]


# ---- conversion to pairs -------------------------------------------------------------------

def test_ranking_to_pairs_strict():
    rec = RankingRecord("p", ("a", "b", "c", "d"), (2, 0, 3, 1))
    pairs = ranking_to_pairs(rec)
    assert len(pairs) == 4 * 3 // 2
    assert [(x.chosen, x.rejected) for x in pairs] == [
        ("c", "a"), ("c", "d"), ("c", "b"), ("a", "d"), ("a", "b"), ("d", "b")]


def test_ranking_to_pairs_with_ties():
    rec = RankingRecord("p", ("a", "b", "c", "d"), (2, (3, 0), 1), extra={"m": 1})
    dropped = ranking_to_pairs(rec)
    assert {(x.chosen, x.rejected) for x in dropped} == {("c", "d"), ("c", "a"), ("c", "b"),
                                                         ("d", "b"), ("a", "b")}
    kept = ranking_to_pairs(rec, ties="keep")
    assert len(kept) == 6
    ties = [x for x in kept if x.tie]
    assert [(x.chosen, x.rejected) for x in ties] == [("a", "d")]  # lower index first
    assert all(x.extra == {"m": 1} for x in kept)
    with pytest.raises(ValueError, match="ties="):
        ranking_to_pairs(rec, ties="half")


@st.composite
def rankings(draw):
    k = draw(st.integers(2, 7))
    perm = draw(st.permutations(list(range(k))))
    cuts = draw(st.lists(st.booleans(), min_size=k - 1, max_size=k - 1))
    tiers, cur = [], [perm[0]]
    for idx, cut in zip(perm[1:], cuts):
        if cut:
            tiers.append(cur)
            cur = []
        cur.append(idx)
    tiers.append(cur)
    return RankingRecord("p", tuple(f"r{i}" for i in range(k)), tuple(tiers))


@settings(max_examples=200, deadline=None)
@given(rankings())
def test_ranking_to_pairs_property(rec):
    """Every unordered pair appears exactly once (ties kept), oriented better -> worse."""
    k = len(rec.responses)
    place = {i: t for t, tier in enumerate(rec.tiers) for i in tier}
    kept = ranking_to_pairs(rec, ties="keep")
    assert len(kept) == k * (k - 1) // 2
    seen = set()
    for x in kept:
        i, j = int(x.chosen[1:]), int(x.rejected[1:])
        seen.add(frozenset((i, j)))
        assert (place[i] == place[j]) if x.tie else (place[i] < place[j])
    assert seen == {frozenset(c) for c in itertools.combinations(range(k), 2)}
    n_tied = sum(len(t) * (len(t) - 1) // 2 for t in rec.tiers)
    assert len(ranking_to_pairs(rec)) == k * (k - 1) // 2 - n_tied


def test_ratings_to_pairs():
    ratings = [RatingRecord("p", "a", 3), RatingRecord("q", "x", 1), RatingRecord("p", "b", 5),
               RatingRecord("p", "c", 3), RatingRecord("q", "y", 2), RatingRecord("p", "a", 4)]
    pairs = list(ratings_to_pairs(ratings))
    assert [(x.prompt, x.chosen, x.rejected) for x in pairs] == [
        ("p", "b", "a"), ("p", "b", "c"), ("p", "b", "a"), ("p", "a", "c"), ("q", "y", "x")]
    # the two ratings of "a" never pair with each other; "a"(3) = "c"(3) is a tie
    kept = list(ratings_to_pairs(ratings, ties="keep"))
    assert [(x.chosen, x.rejected) for x in kept if x.tie] == [("a", "c")]


def test_to_pairs_mixes_kinds_and_refuses_unlabelled_records():
    recs = EXAMPLES["pairwise"] + EXAMPLES["ranking"] + [RatingRecord("p", "a", 1),
                                                         RatingRecord("p", "b", 2)]
    pairs = list(to_pairs(recs))
    assert not any(x.tie for x in pairs)
    assert len(pairs) == 2 + 3 + 5 + 0 + 1
    assert pairs[-1] == PairwiseRecord("p", "b", "a")
    assert len(list(to_pairs(recs, ties="keep"))) == 3 + 3 + 6 + 1 + 1
    with pytest.raises(TypeError, match="holds no preference"):
        list(to_pairs([PromptRecord("p")]))


# ---- datasets ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_hf_dataset_round_trip(tmp_path, kind):
    pytest.importorskip("datasets")
    path = tmp_path / f"{kind}.jsonl"
    write_records(path, EXAMPLES[kind])
    ds = to_hf_dataset(path, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == len(EXAMPLES[kind])
    assert list(from_hf_dataset(ds, kind)) == EXAMPLES[kind]


def test_hf_dataset_sees_an_edited_file_and_plain_columns(tmp_path):
    pytest.importorskip("datasets")
    import datasets

    path = tmp_path / "pw.jsonl"
    write_records(path, EXAMPLES["pairwise"][:1])
    assert to_hf_dataset(path, "pairwise", cache_dir=str(tmp_path / "c"))[0]["chosen"] == "good"
    write_records(path, [PairwiseRecord("p", "edited", "bad")] * 2)
    ds = to_hf_dataset(path, "pairwise", cache_dir=str(tmp_path / "c"))
    assert len(ds) == 2 and ds[0]["chosen"] == "edited"  # not served from a stale cache
    # a Hub-style dataset: plain columns, an extra column, no tie / extra columns
    hub = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"],
                                      "source": ["hh"]})
    assert list(from_hf_dataset(hub, "pairwise")) == [
        PairwiseRecord("p", "a", "b", extra={"source": "hh"})]
    with pytest.raises(DataError, match="dataset row 0: .*lacks"):
        list(from_hf_dataset(hub, "rating"))


def test_missing_datasets_library_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    write_records(path, EXAMPLES["prompt"])
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        to_hf_dataset(path)
