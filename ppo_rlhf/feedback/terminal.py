"""The terminal labelling tool (`ppo-rlhf label`, whose command line is `ppo_rlhf.app.label`):
collect human feedback in the terminal.

For each prompt the tool gets K responses from a sampler (a policy, or a file of pre-generated
responses), shows them numbered 1..K in a shuffled order (so that position carries no
information), and records the person's answer:

  --mode choose  (K = 2)  which response is better: `1` or `2`; `t` = tie.
                          Writes one pairwise record {"prompt", "chosen", "rejected"}
                          (a tie: {"prompt", "chosen", "rejected", "tie": true}, in shown order).
  --mode rank    (K >= 2) the responses from best to worst, e.g. `2 3 1` (or `231` when K <= 9;
                          `>` or `,` may separate too); `=` ties, e.g. `2 1=3`; `t` = all tied.
                          Writes one ranking record {"prompt", "responses", "ranking"} with
                          `responses` in shown order and 0-based indices (see ppo_rlhf.data).
  --mode rate    (K >= 1) one integer rating 1..N per response, in shown order, e.g. `5 2`.
                          Writes K rating records {"prompt", "response", "rating"}.

Everywhere: `s` skip, `q` quit, `?` help. Invalid input re-asks with a hint; end of input quits.

Crash safety and resuming: each answer is appended to the out file as JSONL in one write call,
flushed and `os.fsync`ed before the next prompt is shown, so a crash loses at most the answer
being typed. (A rate-mode answer is K lines in that one write; a crash inside it may keep the
first of them, which is harmless: ratings stand alone.) A restarted session skips every prompt
that already has a record in the out file.
Skipped prompts are recorded as {"prompt", "responses"} lines in a side file next to it
(`labels.jsonl` -> `labels.skipped.jsonl`), which keeps the out file a clean preference file;
a restart does not ask them again unless `--redo-skipped` is given. If the last line of either
file is torn (a crash in the middle of a write), it is removed with a warning -- or, if it is a
complete record that only lacks its newline, kept and completed. A bad line anywhere else is an
error naming the file and line: the tool never rewrites data it did not just write. An exclusive
lock on the out file stops two sessions from writing to it at once (where the OS supports it).

Duplicate prompts in the input are asked once (prompts are identified by their text).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from ppo_rlhf.data import (
    JsonlWriter,
    PairwiseRecord,
    RankingRecord,
    RatingRecord,
    Record,
    ResponsesRecord,
    fsync_dir,
    record_from_dict,
)
from ppo_rlhf.errors import DataError, UsageError
from ppo_rlhf.feedback.samplers import ResponseSampler, check_sampled

__all__ = ["MODES", "LabelSummary", "run_labelling", "check_mode", "skip_path_for", "read_done_prompts",
           "parse_answer", "Answer"]

MODES = ("choose", "rank", "rate")


# ---- answers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """A parsed reply: `action` is "label", "skip", "quit" or "help"; `value` holds the label
    (choose: 0-based index of the winner or "tie"; rank: the ranking as 0-based tiers;
    rate: one rating per response)."""

    action: str
    value: Any = None


class AnswerError(ValueError):
    """The reply could not be understood; the message is the hint shown to the person."""


def usage_line(mode: str, k: int, scale: int) -> str:
    if mode == "choose":
        return "Which is better? 1 or 2 | t tie | s skip | q quit | ? help"
    if mode == "rank":
        ex = " ".join(str(i) for i in range(min(k, 3), 0, -1))
        return f"Rank best to worst (e.g. {ex}; = ties) | t all tied | s skip | q quit | ? help"
    ex = " ".join(str(min(scale, i + 2)) for i in range(k))
    return f"Rate each 1-{scale} (e.g. {ex}) | s skip | q quit | ? help"


def help_text(mode: str, k: int, scale: int) -> str:
    common = ("  s   skip this prompt (recorded; not asked again)\n"
              "  q   quit (everything answered so far is saved)\n"
              "  ?   show this help")
    if mode == "choose":
        body = ("  1   response 1 is better\n"
                "  2   response 2 is better\n"
                "  t   tie: both equally good (or equally bad)")
    elif mode == "rank":
        body = (f"  list all {k} response numbers from best to worst, separated by spaces, commas\n"
                f"  or '>' (or written together when there are at most 9), e.g. "
                f"{' '.join(str(i) for i in range(k, 0, -1))}\n"
                f"  join tied responses with '=', e.g. 2 1=3 (1 and 3 equally good)\n"
                f"  t   all responses equally good")
    else:
        body = (f"  give one whole number from 1 (worst) to {scale} (best) per response, in the\n"
                f"  order shown, separated by spaces or commas")
    return body + "\n" + common


_COMMANDS = {"s": "skip", "skip": "skip", "q": "quit", "quit": "quit", "exit": "quit",
             "?": "help", "h": "help", "help": "help"}


def parse_answer(text: str, mode: str, k: int, scale: int = 7) -> Answer:
    """Parse one reply. Raises `AnswerError` with a hint if it is not valid for the mode."""
    s = text.strip().lower()
    if not s:
        raise AnswerError("please type an answer (? for help)")
    if s in _COMMANDS:
        return Answer(_COMMANDS[s])
    if mode == "choose":
        if s in ("t", "tie"):
            return Answer("label", "tie")
        if s in ("1", "2"):
            return Answer("label", int(s) - 1)
        raise AnswerError("type 1 or 2 for the better response, t for a tie (? for help)")
    if mode == "rank":
        if s in ("t", "tie"):
            return Answer("label", (tuple(range(k)),))
        return Answer("label", _parse_ranking(s, k))
    if mode == "rate":
        if s in ("t", "tie"):
            raise AnswerError(f"there are no ties when rating: give {k} number(s) 1-{scale}")
        parts = [p for p in re.split(r"[\s,]+", s) if p]
        if len(parts) == 1 and k > 1 and re.fullmatch(r"[1-9]+", s) and len(s) == k and scale <= 9:
            parts = list(s)
        if len(parts) != k or not all(re.fullmatch(r"\d+", p) for p in parts):
            raise AnswerError(f"give {k} whole number{'s' if k > 1 else ''} from 1 to {scale}, "
                              f"one per response (? for help)")
        vals = [int(p) for p in parts]
        bad = [v for v in vals if not 1 <= v <= scale]
        if bad:
            raise AnswerError(f"{bad[0]} is outside the scale 1-{scale}")
        return Answer("label", tuple(vals))
    raise ValueError(f"mode={mode!r} is invalid: allowed {', '.join(MODES)}")


def _parse_ranking(s: str, k: int) -> tuple[tuple[int, ...], ...]:
    hint = (f"list all {k} responses best first, e.g. {' '.join(str(i) for i in range(k, 0, -1))}"
            f" (ties: 2 1=3; ? for help)")
    if k <= 9 and re.fullmatch(r"[1-9]+", s) and len(s) == k:
        tokens = list(s)
    else:
        tokens = [t for t in re.split(r"[\s,>]+", s) if t]
    tiers: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for tok in tokens:
        group = []
        for part in tok.split("="):
            if not re.fullmatch(r"\d+", part):
                raise AnswerError(hint)
            i = int(part)
            if not 1 <= i <= k:
                raise AnswerError(f"there is no response {i}; they are numbered 1-{k}")
            if i in seen:
                raise AnswerError(f"response {i} appears twice; {hint}")
            seen.add(i)
            group.append(i - 1)
        tiers.append(tuple(group))
    if len(seen) != k:
        missing = ", ".join(str(i) for i in range(1, k + 1) if i not in seen)
        raise AnswerError(f"response{'s' if len(seen) < k - 1 else ''} {missing} not ranked; {hint}")
    return tuple(tiers)


def records_for(mode: str, prompt: str, responses: Sequence[str], value: Any) -> list[Record]:
    """The records that store one answer (`responses` in the order shown)."""
    if mode == "choose":
        if value == "tie":
            return [PairwiseRecord(prompt, responses[0], responses[1], tie=True)]
        return [PairwiseRecord(prompt, responses[value], responses[1 - value])]
    if mode == "rank":
        ranking = tuple(t[0] if len(t) == 1 else t for t in value)
        return [RankingRecord(prompt, tuple(responses), ranking)]
    return [RatingRecord(prompt, r, float(v)) for r, v in zip(responses, value)]


# ---- the out file --------------------------------------------------------------------------

def skip_path_for(out_path: str | os.PathLike[str]) -> Path:
    """Where skipped prompts are recorded: `x.jsonl` -> `x.skipped.jsonl`, `x` -> `x.skipped.jsonl`."""
    p = Path(out_path)
    stem = p.name[:-len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(stem + ".skipped.jsonl")


def read_done_prompts(path: str | os.PathLike[str], *, warn: TextIO | None = None) -> list[str]:
    """The prompts recorded in a JSONL file written by this tool (in file order, with repeats),
    repairing a torn last line first (see the module docstring). A missing file has none."""
    path = Path(path)
    if not path.exists():
        return []
    prompts: list[str] = []
    torn: tuple[int, int, bytes] | None = None  # (line number, offset, bytes) of a torn last line
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.endswith(b"\n"):
                torn = (lineno, start, raw)
                break
            if not raw.strip():
                continue
            prompts.append(_prompt_of_line(raw, path, lineno))
    if torn is not None:
        lineno, start, raw = torn
        try:
            prompt = _prompt_of_line(raw, path, lineno)
        except DataError:
            with open(path, "r+b") as f:
                f.truncate(start)
                f.flush()
                os.fsync(f.fileno())
            _warn(warn, f"warning: {path}:{lineno}: removed an incomplete last line "
                        f"({len(raw)} bytes; an interrupted write)")
        else:
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            prompts.append(prompt)
            _warn(warn, f"warning: {path}:{lineno}: the last line lacked its newline; completed it")
    return prompts


def _prompt_of_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        obj = json.loads(raw.decode("utf-8"))
        return record_from_dict(obj).prompt
    except (UnicodeDecodeError, ValueError) as e:  # DataError and JSONDecodeError are ValueErrors
        reason = e.reason if isinstance(e, DataError) else f"invalid JSON: {e}"
        raise DataError(reason, path=path, line=lineno) from None


def _warn(stream: TextIO | None, msg: str) -> None:
    print(msg, file=stream if stream is not None else sys.stderr, flush=True)


class _FileLock:
    """An exclusive advisory lock on `path` (no-op where fcntl does not exist)."""

    def __init__(self, path: Path):
        self.path, self._f = path, None

    def __enter__(self) -> "_FileLock":
        try:
            import fcntl
        except ImportError:
            return self
        created = not self.path.exists()
        self._f = open(self.path, "a")
        if created:
            fsync_dir(self.path.parent)  # the new file's name survives a crash too
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise UsageError(f"{self.path} is being written by another labelling session") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._f is not None:
            self._f.close()  # closing releases the lock


def check_mode(mode: str, k: int, scale: int) -> None:
    """Raise `UsageError` unless mode, k and scale go together."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"--k must be a positive integer, got {k!r}")
    if mode == "choose" and k != 2:
        raise UsageError(f"--mode choose compares 2 responses (got --k {k}); use --mode rank "
                         f"for more")
    if mode == "rank" and k < 2:
        raise UsageError(f"--mode rank needs --k >= 2, got {k}")
    if mode == "rate" and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 2):
        raise UsageError(f"--scale must be an integer >= 2, got {scale!r}")


# ---- the loop ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelSummary:
    """What a session did. `already_done`: prompts skipped because the out (or skip) file had
    them; `remaining`: prompts neither labelled nor skipped when the session ended."""

    labelled: int
    skipped: int
    already_done: int
    remaining: int
    quit: bool


def run_labelling(prompts: Sequence[str], sampler: ResponseSampler,
                  out_path: str | os.PathLike[str], *, mode: str = "choose", k: int = 2,
                  scale: int = 7, input: TextIO | None = None, output: TextIO | None = None,
                  shuffle: bool = True, seed: int = 0, batch_size: int = 8,
                  redo_skipped: bool = False) -> LabelSummary:
    """Ask a person to label `prompts`, appending each answer durably to `out_path`.

    `sampler.sample(prompts, k)` is called for up to `batch_size` prompts at a time, just before
    they are shown. Replies are read line by line from `input` (default stdin); everything is
    shown on `output` (default stdout). See the module docstring for modes, files and resuming.
    """
    input = sys.stdin if input is None else input
    output = sys.stdout if output is None else output
    check_mode(mode, k, scale)
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")

    out_path = Path(out_path)
    skip_path = skip_path_for(out_path)
    if not out_path.parent.exists():
        raise UsageError(f"the directory of --out {out_path} does not exist")

    with _FileLock(out_path):
        done = set(read_done_prompts(out_path, warn=output))
        skipped_before = set(read_done_prompts(skip_path, warn=output))
        if not redo_skipped:
            done |= skipped_before
        unique = list(dict.fromkeys(prompts))
        if len(unique) < len(prompts):
            print(f"note: {len(prompts) - len(unique)} duplicate prompt(s) will be asked once",
                  file=output)
        todo = [p for p in unique if p not in done]
        already = len(unique) - len(todo)
        if already:
            print(f"resuming: {already} of {len(unique)} prompts already labelled or skipped "
                  f"in {out_path}", file=output)
        if not todo:
            print("nothing to label.", file=output, flush=True)
            return LabelSummary(0, 0, already, 0, False)

        rng = random.Random(seed)
        labelled = skipped = 0
        quit_ = False
        with JsonlWriter(out_path, append=True, durable=True) as out, \
                JsonlWriter(skip_path, append=True, durable=True) as skips:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                sampled = check_sampled(chunk, k, sampler.sample(list(chunk), k))
                for j, (prompt, responses) in enumerate(zip(chunk, sampled)):
                    if shuffle:
                        rng.shuffle(responses)
                    _show(output, start + j + 1, len(todo), prompt, responses)
                    answer = _ask(input, output, mode, k, scale)
                    if answer.action == "quit":
                        quit_ = True
                        break
                    if answer.action == "skip":
                        skips.write(ResponsesRecord(prompt, tuple(responses)))
                        skipped += 1
                        print("skipped.", file=output, flush=True)
                        continue
                    out.write(*records_for(mode, prompt, responses, answer.value))
                    labelled += 1
                    print("saved.", file=output, flush=True)
                if quit_:
                    break
        remaining = len(todo) - labelled - skipped
        print(f"\n{labelled} labelled, {skipped} skipped this session; {remaining} left. "
              f"Labels: {out_path}", file=output, flush=True)
        return LabelSummary(labelled, skipped, already, remaining, quit_)


def _show(output: TextIO, i: int, n: int, prompt: str, responses: Sequence[str]) -> None:
    lines = ["", "=" * 72, f"({i}/{n}) PROMPT:", _indent(prompt, "    "), ""]
    for j, r in enumerate(responses, 1):
        lines.append(_indent(r if r else "(empty response)", f"  [{j}] "))
    print("\n".join(lines) + "\n", file=output, end="", flush=True)


def _indent(text: str, first: str) -> str:
    """`text` with `first` before its first line and as many spaces before the others."""
    pad = " " * len(first)
    return "\n".join((first if j == 0 else pad) + line
                     for j, line in enumerate(text.splitlines() or [""]))


def _ask(input: TextIO, output: TextIO, mode: str, k: int, scale: int) -> Answer:
    """Read replies until one is a label, a skip or a quit (end of input counts as quit)."""
    print(usage_line(mode, k, scale), file=output, flush=True)
    while True:
        print("> ", end="", file=output, flush=True)
        line = input.readline()
        if line == "":
            print("\n(end of input: stopping)", file=output, flush=True)
            return Answer("quit")
        try:
            answer = parse_answer(line, mode, k, scale)
        except AnswerError as e:
            print(f"?? {e}", file=output, flush=True)
            continue
        if answer.action == "help":
            print(help_text(mode, k, scale), file=output, flush=True)
            continue
        return answer
