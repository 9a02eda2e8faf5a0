"""The built-in demo task: the gold reward's orderings and hack resistance, the corpus's
statistics, the prompt split, the preference data, the tokenizer, and the task registry."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ppo_rlhf.errors import UsageError
from ppo_rlhf.tasks import Task, get_task, register_task, task_names
from ppo_rlhf.tasks import reviews as R

P = "review of the phone:"


def gold(response: str, prompt: str = P) -> float:
    return R.gold_reward([prompt], [response])[0]


# ---- the gold reward -----------------------------------------------------------------------

def test_gold_orders_positive_above_neutral_above_negative_above_garbage():
    very_positive = "the phone is great. the design is excellent. i love this phone."
    positive = "the phone is great."
    neutral = "the phone is okay. i bought the phone last week."
    negative = "the phone is terrible."
    very_negative = "the phone is awful. the price is bad. i hate this phone."
    garbage = "phone the is great"
    scores = [gold(x) for x in (very_positive, positive, neutral, negative, very_negative, garbage)]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores), scores
    assert gold(positive) == pytest.approx(math.tanh(0.5))
    assert gold(neutral) == 0.0
    assert gold(garbage) == -1.0


@pytest.mark.parametrize("hack", [
    "great great great great great great.",
    "great. great. great. great.",
    "good excellent amazing perfect lovely wonderful great solid.",
    "the phone is great great.",
    "",
    "love love love love love love love love love love love love love love love love love love.",
])
def test_positive_word_salad_scores_minus_one(hack):
    assert gold(hack) == -1.0


def test_repeating_a_good_sentence_lowers_the_score():
    once = gold("the phone is great.")
    assert gold("the phone is great. the phone is great.") < once
    assert gold("the phone is great. the phone is great. the phone is great.") < 0
    # repeating a sentiment word in a new sentence adds nothing
    assert gold("the phone is great. the price is great.") == pytest.approx(once)


def test_ill_formed_and_off_topic_text_is_penalised():
    base = gold("the phone is great. i love it.")
    assert gold("the phone is great. i love it") < base  # unfinished: no final period
    assert gold("the phone is great. i love it. the weather is great today.") < base  # off topic
    assert gold("the laptop is great. i love it.") < base  # the wrong item
    assert gold("the laptop is great. i love it.", prompt="review of the laptop:") == base
    assert gold("the is great. i love it.") < base  # a dropped word
    long = " ".join(f"the {a} is {w}." for a, w in zip(R.ASPECTS, R.POSITIVE_ADJ))
    details = R.gold_details(P, long)
    assert all(details["well_formed"]) and details["f"] < 1  # too long: penalised


def test_sentiment_modifiers():
    assert gold("the price is very good.") > gold("the price is good.")
    assert 0 < gold("the price is not bad.") < gold("the price is good.")
    assert gold("i would not recommend it.") < 0 < gold("i would recommend it.")


def test_gold_is_case_and_spacing_insensitive_and_bounded():
    assert gold("The Phone is GREAT .") == gold("the phone is great.")
    rng = np.random.default_rng(0)
    words = R.vocabulary()
    junk = [" ".join(rng.choice(words, size=rng.integers(0, 30))) for _ in range(500)]
    scores = np.array(R.gold_reward([P] * 500, junk))
    assert np.all((scores >= -1) & (scores < 1))
    with pytest.raises(ValueError, match="2 prompts but 1"):
        R.gold_reward([P, P], ["x"])


def test_random_token_strings_score_about_minus_one():
    rng = np.random.default_rng(1)
    words = R.vocabulary()
    junk = [" ".join(rng.choice(words, size=rng.integers(3, 24))) for _ in range(2000)]
    assert np.mean(R.gold_reward([P] * 2000, junk)) < -0.99


# ---- corpus and prompts --------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    return R.generate_corpus(4000, seed=0)


def test_corpus_starts_mediocre_with_room_to_improve(corpus):
    scores = np.array(R.gold_reward([p for p, _ in corpus], [r for _, r in corpus]))
    assert 0.35 < (scores > 0).mean() < 0.55  # roughly half positive
    assert -0.15 < scores.mean() < 0.15
    assert scores.max() > 0.8 and scores.min() == -1.0
    details = [R.gold_details(p, r) for p, r in corpus]
    well = np.mean([d["f"] == 1.0 for d in details])
    assert 0.8 < well < 0.95  # mostly well formed, with some noise


def test_noise_free_corpus_is_entirely_grammatical():
    for p, r in R.generate_corpus(1000, seed=3, noise=0.0):
        d = R.gold_details(p, r)
        assert d["f"] == 1.0 and not d["unfinished"], (p, r, d)


def test_corpus_is_seeded_and_short(corpus):
    assert R.generate_corpus(50, seed=0) == corpus[:50]
    assert R.generate_corpus(50, seed=1) != corpus[:50]
    assert max(len(R.tokenize(r)) for _, r in corpus) <= R.MAX_RESPONSE_TOKENS - 4
    assert max(len(R.tokenize(p)) for p in R.all_prompts()) <= R.MAX_PROMPT_TOKENS
    assert R.corpus_texts(3, seed=0) == [f"{p} {r}" for p, r in corpus[:3]]
    assert {p for p, _ in corpus} == set(R.all_prompts())


def test_prompt_split():
    train, held_out = R.train_prompts(), R.eval_prompts()
    assert len(train) == 72 and len(held_out) == 24 and not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(R.all_prompts())
    assert {R.prompt_item(p) for p in train} == set(R.ITEMS)
    s = R.sample_prompts(100, seed=4)
    assert s == R.sample_prompts(100, seed=4) and set(s) <= set(train)
    assert set(R.sample_prompts(100, seed=4, split="eval")) <= set(held_out)
    with pytest.raises(ValueError, match="split"):
        R.sample_prompts(1, split="test")


def test_preference_data():
    lp = R.preference_data(600, seed=0)
    assert len(lp.records) == 600 and 0.75 < lp.noise_ceiling < 0.95
    assert lp.records == R.preference_data(600, seed=0).records
    train = set(R.train_prompts())
    assert all(r.prompt in train for r in lp.records)
    gold_better = np.mean([r.extra["meta"]["gold_chosen"] >= r.extra["meta"]["gold_rejected"]
                           for r in lp.records])
    sd = math.sqrt(lp.noise_ceiling * (1 - lp.noise_ceiling) / 600)
    assert abs(gold_better - lp.noise_ceiling) < 4 * sd + 0.5 * np.mean(lp.gold_a == lp.gold_b)
    lr = R.preference_data(20, kind="ranking", k=3, seed=0)
    assert len(lr.records) == 20 and all(len(r.responses) == 3 for r in lr.records)


# ---- tokenizer -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("tok")
    R.build_tokenizer(out)
    return out


def test_tokenizer_directory_loads_offline_with_transformers(tokenizer_dir, corpus):
    pytest.importorskip("transformers")
    code = (
        "import sys; from transformers import AutoTokenizer, PreTrainedTokenizerFast\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "assert isinstance(t, PreTrainedTokenizerFast), type(t)\n"
        "assert (t.pad_token_id, t.bos_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2, 3)\n"
        "ids = t('review of the phone: the price is very good.')['input_ids']\n"
        "assert t.decode(ids) == 'review of the phone: the price is very good.', t.decode(ids)\n"
        "assert 3 not in ids and len(ids) == 11, ids\n"
        "print(len(t))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(tokenizer_dir)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) <= 512


def test_tokenizer_covers_the_corpus_and_round_trips(tokenizer_dir, corpus):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    assert tok.get_vocab_size() < 200
    for p, r in corpus[:500]:
        ids_p, ids_r = tok.encode(p).ids, tok.encode(r).ids
        assert tok.encode(f"{p} {r}").ids == ids_p + ids_r  # prompt and response tokenize apart
        assert 3 not in ids_p + ids_r
        assert tok.decode(ids_r) == r and tok.decode(ids_p) == p
        assert len(ids_r) <= R.MAX_RESPONSE_TOKENS - 4 and len(ids_p) <= R.MAX_PROMPT_TOKENS
    assert tok.encode("zebra").ids == [3]


def test_tokenizer_is_deterministic(tokenizer_dir, tmp_path):
    R.build_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (tokenizer_dir / "tokenizer.json").read_text()


# ---- registry ------------------------------------------------------------------------------

def test_task_registry():
    task = get_task("reviews")
    assert task is R.TASK and task.gold_reward is R.gold_reward
    assert "reviews" in task_names()
    assert get_task("ppo_rlhf.tasks.reviews:TASK") is R.TASK
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(UsageError, match="not a ppo_rlhf.tasks.Task"):
        get_task("ppo_rlhf.tasks.reviews:gold_reward")
    with pytest.raises(ValueError, match="exists already"):
        register_task(R.TASK)
    import dataclasses

    mine = dataclasses.replace(R.TASK, name="test-only-task")
    register_task(mine)
    assert get_task("test-only-task") is mine and isinstance(mine, Task)


def test_the_task_answers_for_its_demo_model_and_well_formed_text():
    """The pipelines ask the `Task` (no module lookup): the reviews task's `well_formed` is its
    gold's f == 1, the share the pretraining report prints; a task without it falls back to
    gold > -1, and one without `demo_model_config` cannot pretrain from scratch."""
    import dataclasses

    from ppo_rlhf.app.pipelines import _demo_config, _well_formed_frac

    task = get_task("reviews")
    good, unfinished = "the phone is great. i love it.", "the phone is great. i love it"
    assert task.well_formed(P, good) and not task.well_formed(P, unfinished)
    assert _well_formed_frac(task, [P] * 4, [good, good, good, unfinished]) == 0.75
    bare = dataclasses.replace(task, well_formed=None, demo_model_config=None)
    gold_frac = np.mean([g > -1 for g in task.gold_reward([P, P], [good, unfinished])])
    assert _well_formed_frac(bare, [P, P], [good, unfinished]) == gold_frac
    assert _demo_config(task, "tiny", 120)["vocab_size"] == 120
    with pytest.raises(UsageError, match="defines no demo_model_config"):
        _demo_config(bare, "tiny", 120)
