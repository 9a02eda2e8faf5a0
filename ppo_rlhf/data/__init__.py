"""Data formats for prompts and human feedback: records, streaming readers, writers, converters.

Every format is JSON Lines (one JSON object per line, UTF-8); prompts may also be plain text.
Blank lines are skipped everywhere. Keys not listed below are kept, unvalidated, in the record's
`extra` dict and written back as they were (so `"meta": {...}`, `"id"`, `"source"` survive a
round trip). Numbers must be finite: `NaN`/`Infinity` are refused.

prompt     {"prompt": str}                                   `PromptRecord`
           or a plain-text file with one prompt per line (the line ending is stripped, nothing
           else; blank lines are skipped; use JSONL for prompts that hold a newline).
responses  {"prompt": str, "responses": [str, ...]}           `ResponsesRecord`
           unlabelled samples, e.g. pre-generated for `ppo-rlhf label --responses`.
pairwise   {"prompt": str, "chosen": str, "rejected": str}    `PairwiseRecord`
           (HH-RLHF style) with optional `"tie": true` -- the person judged the two equally good;
           then the order of chosen/rejected carries no meaning.
ranking    {"prompt": str, "responses": [str, ...], "ranking": [...]}   `RankingRecord`
           `ranking` lists indices into `responses` (0-based) from BEST to WORST; every index
           appears exactly once. An element may be a list of indices instead of one index: those
           responses are TIED at that place. `[2, [0, 3], 1]` reads "2 is best, then 0 and 3
           (equally good), then 1". K >= 2 responses.
rating     {"prompt": str, "response": str, "rating": number}  `RatingRecord`
           higher is better; the scale is the user's (e.g. 1..7); `rating` is a float.

Prompts must be non-empty strings; responses may be empty (a policy can emit EOS at once).

Readers (`read_prompts`, `read_records`, ...) are generators: they stream the file line by line
and validate each record as it is read. A bad record raises `DataError` whose message starts
with `path:line:`. A file with no records is an error too unless `allow_empty=True` -- since the
readers are lazy, that error comes when the iteration ends.

For Bradley-Terry reward-model training everything converts to pairs: `ranking_to_pairs` (all
K(K-1)/2 pairs of a ranking), `ratings_to_pairs` (responses to the same prompt with different
ratings) and `to_pairs` (any mix). Ties are dropped unless `ties="keep"`.

`to_hf_dataset` / `from_hf_dataset` move the same records through the `datasets` library
(imported lazily; `pip install datasets`).
"""

from ppo_rlhf.data.convert import from_hf_dataset, ranking_to_pairs, ratings_to_pairs, to_hf_dataset, to_pairs
from ppo_rlhf.data.jsonl import (
                                   JsonlWriter,
                                   fsync_dir,
                                   iter_jsonl,
                                   load_prompts,
                                   read_pairwise,
                                   read_prompts,
                                   read_rankings,
                                   read_ratings,
                                   read_records,
                                   read_responses,
                                   write_prompts_text,
                                   write_records,
)
from ppo_rlhf.data.records import (
                                   KINDS,
                                   PairwiseRecord,
                                   PromptRecord,
                                   RankingRecord,
                                   RatingRecord,
                                   Record,
                                   ResponsesRecord,
                                   detect_kind,
                                   dumps_record,
                                   record_from_dict,
                                   record_to_dict,
)
from ppo_rlhf.errors import DataError

__all__ = [
    "DataError", "PromptRecord", "ResponsesRecord", "PairwiseRecord", "RankingRecord",
    "RatingRecord", "Record", "KINDS", "detect_kind", "record_from_dict", "record_to_dict",
    "iter_jsonl", "read_records", "read_prompts", "load_prompts", "read_responses",
    "read_pairwise", "read_rankings", "read_ratings", "write_records", "JsonlWriter",
    "ranking_to_pairs", "ratings_to_pairs", "to_pairs", "to_hf_dataset", "from_hf_dataset",
    "dumps_record", "write_prompts_text", "fsync_dir",
]
