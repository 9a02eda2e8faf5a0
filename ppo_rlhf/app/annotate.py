"""`ppo-rlhf annotate serve | export | stats`: the command line of the annotation web app
(`ppo_rlhf.feedback.annotate` is the app: store, server, page, export, agreement)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from ppo_rlhf.app.backends import BACKENDS, load_policy_sampler
from ppo_rlhf.data import load_prompts
from ppo_rlhf.errors import UsageError
from ppo_rlhf.feedback.samplers import ResponsesFileSampler, check_sampled
from ppo_rlhf.feedback.terminal import MODES, check_mode

__all__ = ["add_parser", "run_serve", "run_export", "run_stats"]

TOKEN_ENV = "PPO_RLHF_ANNOTATE_TOKEN"
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~-]{16,}")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "annotate", help="a local web app for labelling by a team (serve / export / stats)",
        description="Human feedback from a team: `serve` a page where annotators label items in "
                    "their browsers (answers are committed to an SQLite database before the next "
                    "item is shown), `export` the answers as training data, `stats` for counts "
                    "and inter-annotator agreement.")
    cmds = p.add_subparsers(dest="annotate_command", metavar="{serve,export,stats}", required=True)

    s = cmds.add_parser(
        "serve", help="serve the annotation page and its JSON API",
        description="Serve the annotation page at http://HOST:PORT/. The first run creates --db "
                    "from --responses or --policy/--prompts; later runs continue it (new prompts "
                    "are added; --db alone serves what it holds).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="API: GET /api/next?annotator=NAME, POST /api/label, POST /api/undo (see README).\n"
               "Off loopback, --token is required (or $" + TOKEN_ENV + "); open "
               "http://HOST:PORT/?token=T.")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--responses", metavar="FILE",
                     help='pre-generated responses: JSONL of {"prompt", "responses": [...]}')
    src.add_argument("--policy", metavar="DIR", help="sample responses from this policy")
    s.add_argument("--prompts", metavar="FILE",
                   help="prompts (JSONL or text); required with --policy; with --responses, "
                        "defaults to that file's prompts")
    s.add_argument("--db", metavar="FILE", required=True,
                   help="the SQLite database (labels.sqlite)")
    s.add_argument("--mode", choices=MODES, help="choose | rank | rate (default: choose; an "
                                                 "existing database keeps its own)")
    s.add_argument("--k", type=int, help="responses per item (default: 2)")
    s.add_argument("--scale", type=int, metavar="N", help="rate mode: ratings 1..N (default: 7)")
    s.add_argument("--per-item", type=int, default=1, metavar="N",
                   help="annotators per item, to measure agreement (default: 1); enforced when an "
                        "answer is stored")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 = any free one)")
    s.add_argument("--token", help=f"secret every request must carry (16+ URL-safe characters; "
                                   f"default: ${TOKEN_ENV}); required off loopback")
    s.add_argument("--reserve", type=float, default=600.0, metavar="S",
                   help="seconds an item handed out stays reserved for its annotator "
                        "(default: 600)")
    s.add_argument("--backend", choices=BACKENDS, default="jax",
                   help="--policy: generation backend")
    s.add_argument("--max-new-tokens", type=int, default=64, help="--policy: response length limit")
    s.add_argument("--temperature", type=float, default=1.0, help="--policy: sampling temperature")
    s.add_argument("--seed", type=int, default=0, help="--policy: sampling seed")
    s.set_defaults(func=run_serve)

    e = cmds.add_parser("export", help="write the answers as pairwise / ranking / rating JSONL",
                        description="Write the answers as the records `ppo-rlhf train-rm` reads "
                                    "(with annotator, time and item_id fields). Opens --db "
                                    "read-only.")
    e.add_argument("--db", metavar="FILE", required=True)
    e.add_argument("--out", metavar="FILE.jsonl", required=True)
    e.add_argument("--resolve", choices=("all", "majority"), default="all",
                   help="all: one record per answer; majority: one per item (default: all)")
    e.add_argument("--ties", choices=("keep", "drop"), default="keep",
                   help="keep tie records (train-rm drops them unless --ties keep) or drop them")
    e.set_defaults(func=run_export)

    t = cmds.add_parser("stats", help="answers per annotator and inter-annotator agreement",
                        description="Answers and skips per annotator; agreement: the pairwise rate, "
                                    "Krippendorff's alpha, Fleiss' kappa and Cohen's kappa per pair "
                                    "of annotators. Opens --db read-only.")
    t.add_argument("--db", metavar="FILE", required=True)
    t.add_argument("--json", action="store_true", help="print the numbers as JSON")
    t.set_defaults(func=run_stats)


# ---- serve -----------------------------------------------------------------------------------
def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"{name} must be positive, got {value}")


def _open_or_create(args: argparse.Namespace) -> tuple[Any, int]:
    """The store of --db (created when missing) with the source's new items added; returns
    (store, number of items added). A new database is created only once its items are ready."""
    from ppo_rlhf.feedback.annotate.store import Store

    db = Path(args.db)
    if db.exists():
        store = Store(db)
        try:
            given = {"mode": args.mode, "k": args.k, "scale": args.scale}
            held = {"mode": store.mode, "k": store.k, "scale": store.scale}
            for key, value in given.items():
                if value is not None and value != held[key]:
                    raise UsageError(f"{db} was created with --{key} {held[key]}, not {value}")
            return store, store.add_items(_new_items(args, store.k, store.prompts()))
        except BaseException:
            store.close()
            raise
    if args.responses is None and args.policy is None:
        raise UsageError(f"{db} does not exist: give --responses FILE or --policy DIR "
                         f"--prompts FILE to create it")
    if not db.parent.is_dir():
        raise UsageError(f"the directory of --db {db} does not exist")
    mode = args.mode or "choose"
    k = 2 if args.k is None else args.k
    scale = 7 if args.scale is None else args.scale
    check_mode(mode, k, scale)
    items = _new_items(args, k, set())
    store = Store.create(db, mode=mode, k=k, scale=scale)
    return store, store.add_items(items)


def _new_items(args: argparse.Namespace, k: int, have: set[str]) -> list[tuple[str, list[str]]]:
    """(prompt, K responses) for the source's prompts that are not in `have` yet."""
    if args.policy is not None:
        if args.prompts is None:
            raise UsageError("--policy needs --prompts FILE")
        todo = [p for p in dict.fromkeys(load_prompts(args.prompts)) if p not in have]
        if not todo:
            return []
        print(f"sampling {k} responses for each of {len(todo)} prompts from {args.policy} ...",
              flush=True)
        sampler = load_policy_sampler(args.backend, args.policy, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, seed=args.seed)
        out: list[tuple[str, list[str]]] = []
        for start in range(0, len(todo), 16):
            chunk = todo[start:start + 16]
            out += zip(chunk, check_sampled(chunk, k, sampler.sample(chunk, k)))
        return out
    if args.responses is None:
        return []
    sampler = ResponsesFileSampler(args.responses)
    prompts = load_prompts(args.prompts) if args.prompts else sampler.prompts
    todo = [p for p in dict.fromkeys(prompts) if p not in have]
    missing = [p for p in todo if p not in sampler.responses]
    if missing:
        raise UsageError(f"{args.responses} has no responses for {len(missing)} of the prompts, "
                         f"e.g. {missing[0]!r:.80}")
    few = [p for p in todo if len(sampler.responses[p]) < k]
    if few:
        raise UsageError(f"{args.responses}: {len(few)} prompts have fewer than --k {k} "
                         f"responses, e.g. {few[0]!r:.80}")
    return [(p, sampler.responses[p][:k]) for p in todo]


def _token(args: argparse.Namespace) -> str | None:
    from ppo_rlhf.feedback.annotate.server import is_loopback

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and not _TOKEN_RE.fullmatch(token):
        raise UsageError("--token must be at least 16 characters from A-Z a-z 0-9 . _ ~ - (e.g. "
                         "python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    if token is None and not is_loopback(args.host):
        raise UsageError(f"--host {args.host} is reachable from other machines: give --token "
                         f"(or ${TOKEN_ENV}) so that only your team can read and write labels")
    return token


def run_serve(args: argparse.Namespace) -> int:
    from ppo_rlhf.feedback.annotate.server import AnnotateServer, is_unspecified

    if args.per_item < 1:
        raise UsageError(f"--per-item must be >= 1, got {args.per_item}")
    _check_positive("--reserve", args.reserve)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    token = _token(args)
    if args.policy is not None and not Path(args.policy).is_dir():
        raise UsageError(f"--policy {args.policy}: not a directory")
    store, added = _open_or_create(args)
    try:
        n = store.num_items()
        if n == 0:
            raise UsageError(f"{args.db} holds no items: give --responses or --policy/--prompts")
        try:
            server = AnnotateServer(store, host=args.host, port=args.port, per_item=args.per_item,
                                    reserve_s=args.reserve, token=token)
        except OSError as e:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: "
                             f"{e.strerror or e}") from None
        url = server.url + (f"?token={token}" if token else "")
        if is_unspecified(args.host):  # 0.0.0.0 / ::: others reach it by this machine's name
            url = url.replace(f"//{args.host.strip('[]')}", f"//{socket.gethostname()}", 1)
        print(f"{n} items ({added} new), mode {store.mode}, K={store.k}, {args.per_item} "
              f"annotator(s) per item; database {args.db}", flush=True)
        print(f"annotation page: {url}  (Ctrl-C stops)", flush=True)

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            print("stopped; every acknowledged answer is in the database", flush=True)
        finally:
            server.server_close()
    finally:
        store.close()
    return 0


# ---- export / stats ----------------------------------------------------------------------------
def run_export(args: argparse.Namespace) -> int:
    from ppo_rlhf.feedback.annotate.export import write_export
    from ppo_rlhf.feedback.annotate.store import Store

    with Store(args.db, readonly=True) as store:
        n = write_export(store, args.out, args.resolve, args.ties)
        kind = {"choose": "pairwise", "rank": "ranking", "rate": "rating"}[store.mode]
    print(f"{n} {kind} records ({args.resolve}) -> {args.out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from ppo_rlhf.feedback.annotate.export import agreement_stats, format_stats
    from ppo_rlhf.feedback.annotate.store import Store

    with Store(args.db, readonly=True) as store:
        s = agreement_stats(store)
    print(json.dumps(s, indent=2) if args.json else format_stats(s, args.db))
    sys.stdout.flush()
    return 0
