"""The labelling tool: answer parsing, the loop driven through streams and through a real
subprocess's stdin (including SIGKILL mid-session and a resume), torn-line repair, the CLI's
exit codes, and once in a real terminal (tmux)."""

from __future__ import annotations

import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ppo_rlhf.data import (
    DataError,
    PairwiseRecord,
    RankingRecord,
    RatingRecord,
    ResponsesRecord,
    read_records,
    write_records,
)
from ppo_rlhf.errors import UsageError
from ppo_rlhf.feedback.samplers import ResponsesFileSampler
from ppo_rlhf.feedback.terminal import (
    Answer,
    AnswerError,
    parse_answer,
    read_done_prompts,
    run_labelling,
    skip_path_for,
)

REPO = Path(__file__).resolve().parents[1]


class ListSampler:
    """Deterministic responses "<prompt> #i"; records every call."""

    def __init__(self):
        self.calls = []

    def sample(self, prompts, k):
        self.calls.append((list(prompts), k))
        return [[f"{p} #{i}" for i in range(k)] for p in prompts]


def run(prompts, answers, out, **kw):
    out_stream = io.StringIO()
    kw.setdefault("shuffle", False)
    summary = run_labelling(prompts, ListSampler(), out, input=io.StringIO(answers),
                            output=out_stream, **kw)
    return summary, out_stream.getvalue()


# ---- parsing -------------------------------------------------------------------------------

def test_parse_choose():
    assert parse_answer(" 2\n", "choose", 2) == Answer("label", 1)
    assert parse_answer("T", "choose", 2) == Answer("label", "tie")
    assert parse_answer("s", "choose", 2).action == "skip"
    assert parse_answer("q", "choose", 2).action == "quit"
    assert parse_answer("?", "choose", 2).action == "help"
    for bad in ("3", "0", "12", "", "yes"):
        with pytest.raises(AnswerError):
            parse_answer(bad, "choose", 2)


def test_parse_rank():
    assert parse_answer("3 1 2", "rank", 3).value == ((2,), (0,), (1,))
    assert parse_answer("312", "rank", 3).value == ((2,), (0,), (1,))
    assert parse_answer("3>1, 2", "rank", 3).value == ((2,), (0,), (1,))
    assert parse_answer("2 1=3", "rank", 3).value == ((1,), (0, 2))
    assert parse_answer("t", "rank", 3).value == ((0, 1, 2),)
    assert parse_answer("10 1 2 3 4 5 6 7 8 9", "rank", 10).value[0] == (9,)
    with pytest.raises(AnswerError, match="appears twice"):
        parse_answer("1 1 2", "rank", 3)
    with pytest.raises(AnswerError, match="not ranked"):
        parse_answer("1 2", "rank", 3)
    with pytest.raises(AnswerError, match="no response 4"):
        parse_answer("1 2 4", "rank", 3)
    with pytest.raises(AnswerError):
        parse_answer("a b c", "rank", 3)


def test_parse_rate():
    assert parse_answer("5 2", "rate", 2, scale=7).value == (5, 2)
    assert parse_answer("52", "rate", 2, scale=7).value == (5, 2)
    assert parse_answer("7", "rate", 1, scale=7).value == (7,)
    with pytest.raises(AnswerError, match="outside the scale"):
        parse_answer("8 1", "rate", 2, scale=7)
    with pytest.raises(AnswerError, match="no ties"):
        parse_answer("t", "rate", 2)
    with pytest.raises(AnswerError, match="give 2 whole numbers"):
        parse_answer("3", "rate", 2)
    with pytest.raises(AnswerError):
        parse_answer("2.5 3", "rate", 2)


# ---- the loop ------------------------------------------------------------------------------

def test_choose_session_writes_labels_skips_and_stops_at_quit(tmp_path):
    out = tmp_path / "labels.jsonl"
    prompts = ["a", "b", "c", "d", "e"]
    summary, shown = run(prompts, "oops\n?\n2\nt\ns\nq\n", out)
    assert "?? type 1 or 2" in shown and "tie: both equally good" in shown  # hint, then help
    assert (summary.labelled, summary.skipped, summary.remaining, summary.quit) == (2, 1, 2, True)
    assert list(read_records(out)) == [PairwiseRecord("a", "a #1", "a #0"),
                                       PairwiseRecord("b", "b #0", "b #1", tie=True)]
    assert skip_path_for(out) == tmp_path / "labels.skipped.jsonl"
    assert list(read_records(skip_path_for(out))) == [ResponsesRecord("c", ("c #0", "c #1"))]
    # a restart asks only d and e; end of input stops cleanly
    summary, shown = run(prompts, "1\n", out)
    assert "resuming: 3 of 5" in shown and "(1/2) PROMPT:\n    d" in shown
    assert (summary.labelled, summary.already_done, summary.remaining) == (1, 3, 1)
    assert [r.prompt for r in read_records(out)] == ["a", "b", "d"]
    # --redo-skipped asks c again
    summary, shown = run(prompts, "1\n1\n", out, redo_skipped=True)
    assert [r.prompt for r in read_records(out)] == ["a", "b", "d", "c", "e"]
    summary, shown = run(prompts, "", out)
    assert "nothing to label" in shown and summary.remaining == 0


def test_rank_and_rate_modes(tmp_path):
    out = tmp_path / "rank.jsonl"
    run(["p", "q"], "2 3=1\n t\n", out, mode="rank", k=3)
    assert list(read_records(out)) == [
        RankingRecord("p", ("p #0", "p #1", "p #2"), (1, (2, 0))),
        RankingRecord("q", ("q #0", "q #1", "q #2"), ((0, 1, 2),))]
    out = tmp_path / "rate.jsonl"
    run(["p"], "9 1\n7 1\n", out, mode="rate", k=2, scale=7)
    assert list(read_records(out)) == [RatingRecord("p", "p #0", 7), RatingRecord("p", "p #1", 1)]


def test_shuffled_display_is_recorded_in_display_order(tmp_path):
    out = tmp_path / "o.jsonl"
    shown_orders = []
    for seed in range(8):
        path = tmp_path / f"o{seed}.jsonl"
        run(["p"], "1 2 3 4\n", path, mode="rank", k=4, shuffle=True, seed=seed)
        (rec,) = read_records(path)
        assert rec.ranking == (0, 1, 2, 3) and sorted(rec.responses) == ["p #0", "p #1", "p #2", "p #3"]
        shown_orders.append(rec.responses)
    assert len(set(shown_orders)) > 1  # the order shown is shuffled...
    run(["p"], "1 2 3 4\n", out, mode="rank", k=4, shuffle=True, seed=3)
    assert next(read_records(out)).responses == shown_orders[3]  # ...reproducibly


def test_duplicate_prompts_are_asked_once_and_sampling_is_batched(tmp_path):
    sampler = ListSampler()
    run_labelling(["a", "b", "a", "c"], sampler, tmp_path / "o.jsonl", input=io.StringIO("1\n" * 3),
                  output=io.StringIO(), batch_size=2)
    assert sampler.calls == [(["a", "b"], 2), (["c"], 2)]


def test_bad_modes_are_usage_errors(tmp_path):
    for kw in ({"mode": "choose", "k": 3}, {"mode": "rank", "k": 1}, {"mode": "vote"},
               {"mode": "rate", "k": 1, "scale": 1}):
        with pytest.raises(UsageError):
            run(["p"], "", tmp_path / "o.jsonl", **kw)


def test_a_sampler_returning_the_wrong_shape_is_refused(tmp_path):
    class Bad:
        def sample(self, prompts, k):
            return [["only one"] for _ in prompts]

    with pytest.raises(ValueError, match="2 strings per prompt"):
        run_labelling(["p"], Bad(), tmp_path / "o.jsonl", input=io.StringIO("1\n"),
                      output=io.StringIO())


# ---- torn lines ----------------------------------------------------------------------------

def test_torn_last_line_is_removed_with_a_warning(tmp_path):
    out = tmp_path / "o.jsonl"
    write_records(out, [PairwiseRecord("a", "x", "y")])
    with open(out, "ab") as f:
        f.write(b'{"prompt": "b", "chosen": "x", "rej')  # a crash mid-write
    summary, shown = run(["a", "b"], "2\n", out)
    assert f"warning: {out}:2: removed an incomplete last line" in shown
    assert summary.already_done == 1 and summary.labelled == 1
    assert list(read_records(out)) == [PairwiseRecord("a", "x", "y"), PairwiseRecord("b", "b #1", "b #0")]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}')
    warn = io.StringIO()
    assert read_done_prompts(out, warn=warn) == ["a"]
    assert "completed it" in warn.getvalue()
    assert out.read_text().endswith("}\n")


def test_a_bad_line_in_the_middle_is_an_error_not_a_repair(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\nnot json\n'
                   '{"prompt": "b", "chosen": "x", "rejected": "y"}\n')
    before = out.read_bytes()
    with pytest.raises(DataError, match=rf"^{out}:2: invalid JSON"):
        run(["a"], "1\n", out)
    assert out.read_bytes() == before


def test_a_second_session_on_the_same_file_is_refused(tmp_path):
    pytest.importorskip("fcntl")
    from ppo_rlhf.feedback.terminal import _FileLock

    out = tmp_path / "o.jsonl"
    with _FileLock(out):
        with pytest.raises(UsageError, match="another labelling session"):
            run(["a"], "1\n", out)
    run(["a"], "1\n", out)  # released
    assert [r.prompt for r in read_records(out)] == ["a"]


def test_responses_file_sampler(tmp_path):
    path = tmp_path / "r.jsonl"
    write_records(path, [ResponsesRecord("p", ("1", "2")), ResponsesRecord("q", ("3",)),
                         ResponsesRecord("p", ("4",))])
    s = ResponsesFileSampler(path)
    assert s.prompts == ["p", "q"] and s.min_responses() == 1
    assert s.sample(["p"], 3) == [["1", "2", "4"]]
    with pytest.raises(UsageError, match="has 1 responses"):
        s.sample(["q"], 2)
    with pytest.raises(UsageError, match="no responses for"):
        s.sample(["r"], 1)


# ---- the CLI in a subprocess ---------------------------------------------------------------

def cli(*args):
    return [sys.executable, "-m", "ppo_rlhf", "label", *map(str, args)]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def make_responses(tmp_path, n=5):
    path = tmp_path / "responses.jsonl"
    write_records(path, [ResponsesRecord(f"prompt {i}", (f"good {i}", f"bad {i}"))
                         for i in range(n)])
    return path


def test_cli_usage_errors_exit_2_with_one_line(tmp_path):
    responses = make_responses(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": "q", "responses": "x"}\n')
    for args, message in [
        (("--responses", bad, "--out", tmp_path / "o.jsonl"), f"{bad}:2: "),
        (("--responses", responses, "--out", tmp_path / "o.jsonl", "--k", "3", "--mode", "rank"),
         "fewer than --k 3"),
        (("--responses", responses, "--out", tmp_path / "o.jsonl", "--k", "3"), "compares 2"),
        (("--responses", responses, "--out", tmp_path / "no" / "o.jsonl"), "does not exist"),
        (("--policy", tmp_path, "--out", tmp_path / "o.jsonl"), "needs --prompts"),
    ]:
        r = subprocess.run(cli(*args), capture_output=True, text=True, env=ENV, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    r = subprocess.run(cli("--out", "x"), capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2 and "--policy" in r.stderr  # argparse: one of the sources required


class Session:
    """A `ppo-rlhf label` subprocess fed through a pipe; output collected by a thread."""

    def __init__(self, args):
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=ENV)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def send(self, text):
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait_for(self, needle, count=1, timeout=30.0):
        deadline = time.monotonic() + timeout
        while self.seen.count(needle) < count:
            try:
                self.seen += self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {needle!r} x{count} within {timeout}s; got:\n{self.seen}")


def test_cli_kill_mid_session_then_resume(tmp_path):
    responses = make_responses(tmp_path, n=5)
    out = tmp_path / "labels.jsonl"
    args = cli("--responses", responses, "--out", out, "--no-shuffle")
    s = Session(args)
    s.wait_for("(1/5) PROMPT")
    s.send("1\n")
    s.wait_for("saved.")
    s.send("s\n")
    s.wait_for("skipped.")
    s.send("2\n")
    s.wait_for("saved.", count=2)
    s.wait_for("(4/5) PROMPT")  # the 4th prompt is on screen, waiting for an answer
    s.proc.send_signal(signal.SIGKILL)  # a crash: no chance to clean up
    s.proc.wait(timeout=30)
    assert [r.prompt for r in read_records(out)] == ["prompt 0", "prompt 2"]
    # simulate a crash in the middle of a write, too
    with open(out, "ab") as f:
        f.write(b'{"prompt": "prompt 3", "cho')

    r = subprocess.run(args, input="1\n2\n", capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "resuming: 3 of 5" in r.stdout and "removed an incomplete last line" in r.stdout
    assert "prompt 0" not in r.stdout and "prompt 1" not in r.stdout  # done / skipped: not asked
    records = list(read_records(out))
    assert records == [PairwiseRecord("prompt 0", "good 0", "bad 0"),
                       PairwiseRecord("prompt 2", "bad 2", "good 2"),
                       PairwiseRecord("prompt 3", "good 3", "bad 3"),
                       PairwiseRecord("prompt 4", "bad 4", "good 4")]
    assert [r.prompt for r in read_records(skip_path_for(out))] == ["prompt 1"]
    # every line of the out file is complete JSON
    assert all(json.loads(x) for x in out.read_text().splitlines())


def test_cli_prompts_subset_and_rank_mode(tmp_path):
    responses = tmp_path / "r.jsonl"
    write_records(responses, [ResponsesRecord(f"p{i}", ("a", "b", "c")) for i in range(3)])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("p2\np0\n")
    out = tmp_path / "o.jsonl"
    r = subprocess.run(cli("--responses", responses, "--prompts", prompts, "--out", out,
                           "--mode", "rank", "--k", "3", "--no-shuffle"),
                       input="321\n1=2 3\n", capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert list(read_records(out)) == [RankingRecord("p2", ("a", "b", "c"), (2, 1, 0)),
                                       RankingRecord("p0", ("a", "b", "c"), ((0, 1), 2))]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_in_a_real_terminal_with_tmux(tmp_path):
    responses = make_responses(tmp_path, n=3)
    out = tmp_path / "labels.jsonl"
    socket = f"ppo-rlhf-test-{uuid.uuid4().hex[:8]}"  # a private tmux server
    command = " ".join(f"'{a}'" for a in cli("--responses", responses, "--out", out,
                                             "--no-shuffle"))
    tmux = ["tmux", "-L", socket, "-f", os.devnull]

    def screen():
        return subprocess.run(tmux + ["capture-pane", "-p", "-t", "label", "-S", "-200"],
                              capture_output=True, text=True).stdout

    def wait_screen(needle, count=1, timeout=30.0):
        deadline = time.monotonic() + timeout
        while screen().count(needle) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not on screen:\n{screen()}")
            time.sleep(0.1)

    env = {**ENV, "TERM": "xterm"}
    subprocess.run(tmux + ["new-session", "-d", "-s", "label", "-x", "100", "-y", "50",
                           f"{command}; echo EXIT=$?; sleep 30"], check=True, env=env)
    try:
        wait_screen("(1/3) PROMPT")
        for keys in ("x", "1"):  # an invalid answer first: re-asked with a hint
            subprocess.run(tmux + ["send-keys", "-t", "label", keys, "Enter"], check=True)
            time.sleep(0.2)
        wait_screen("saved.")
        assert "?? type 1 or 2" in screen()
        subprocess.run(tmux + ["send-keys", "-t", "label", "2", "Enter"], check=True)
        wait_screen("saved.", count=2)
        subprocess.run(tmux + ["send-keys", "-t", "label", "q", "Enter"], check=True)
        wait_screen("EXIT=0")
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)
    assert list(read_records(out)) == [PairwiseRecord("prompt 0", "good 0", "bad 0"),
                                       PairwiseRecord("prompt 1", "bad 1", "good 1")]


def test_neutral_modules_import_neither_backend():
    code = ("import sys, ppo_rlhf.app.cli, ppo_rlhf.data, ppo_rlhf.feedback.labeller, ppo_rlhf.feedback.terminal, "
            "ppo_rlhf.feedback.samplers, ppo_rlhf.tasks.reviews; ppo_rlhf.app.cli.build_parser(); "
            "bad = [m for m in ('jax', 'torch', 'transformers', 'tokenizers', 'datasets') "
            "if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode == 0, r.stderr
