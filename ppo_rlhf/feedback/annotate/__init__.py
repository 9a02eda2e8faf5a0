"""`ppo-rlhf annotate`: a local web app in which a team labels responses in their browsers.

  store.py      the SQLite database (schema in its docstring): items, answers, reservations,
                counters; the --per-item quota; undo
  answers.py    the answer payloads of the JSON API: validation and each annotator's shown order
  server.py     the HTTP server: the page (static/), the JSON API, the token
  agreement.py  inter-annotator agreement: pairwise agreement rate, Krippendorff's alpha,
                Fleiss' and Cohen's kappa
  export.py     answers -> pairwise / ranking / rating JSONL (`--resolve all|majority`), stats
  (the command line, `ppo-rlhf annotate serve | export | stats`, is ppo_rlhf/app/annotate.py)

The standard library only (http.server, sqlite3): nothing to install to run it.
"""
