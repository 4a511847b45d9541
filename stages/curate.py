"""curate: filter the pairs; every drop counted by reason and kept in quarantine.

    python -m stages.curate --params params.yaml --pairs data/pairs --out data/curate \
        --metrics metrics/curate.json

Each filter is a small function of one pair (and the filter's state) that returns
None to keep it or a reason string to drop it; the first reason wins. Outputs:
curated.parquet (records.PAIR_SCHEMA), quarantine.parquet (the same columns plus
`reason`), manifest.json. Counts reconcile: pairs in = kept + quarantined.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from stages.lib import cli, lineage, params, records, toytask
from stages.lib.io import atomic_dir, read_rows, write_json, write_table
from stages.lib.params import check

log = logging.getLogger("curate")


@dataclass(frozen=True)
class CurateParams:
    """params.yaml `curate`."""

    drop_duplicates: bool  # same prompt, chosen and rejected text as an earlier pair
    drop_empty_chosen: bool
    drop_empty_rejected: bool
    drop_truncated_chosen: bool  # the teacher hit max_new_tokens
    drop_truncated_rejected: bool  # the student hit max_new_tokens (often useful signal)
    max_chosen_tokens: int
    max_rejected_tokens: int
    require_correct_chosen: bool  # where a reference answer exists (the toy task)

    def __post_init__(self) -> None:
        check(self.max_chosen_tokens >= 1, "max_chosen_tokens", "must be >= 1")
        check(self.max_rejected_tokens >= 1, "max_rejected_tokens", "must be >= 1")


SECTIONS: dict[str, Any] = {"curate": CurateParams}
PARAMS = tuple(SECTIONS)

Filter = Callable[[dict[str, Any]], "str | None"]


def filters(p: CurateParams) -> list[Filter]:
    """The enabled filters, in order. Each returns None (keep) or a drop reason."""
    seen: set[tuple[str, str, str]] = set()

    def duplicate(pair: dict[str, Any]) -> str | None:
        key = (pair["prompt_id"], pair["chosen"], pair["rejected"])
        if key in seen:
            return "duplicate_pair"
        seen.add(key)
        return None

    out: list[Filter] = []
    if p.drop_empty_chosen:
        out.append(lambda x: "empty_chosen" if not x["chosen"].strip() else None)
    if p.drop_empty_rejected:
        out.append(lambda x: "empty_rejected" if not x["rejected"].strip() else None)
    if p.drop_truncated_chosen:
        out.append(lambda x: "truncated_chosen" if x["chosen_finish_reason"] == "length" else None)
    if p.drop_truncated_rejected:
        out.append(lambda x: "truncated_rejected" if x["rejected_finish_reason"] == "length" else None)
    out.append(lambda x: "chosen_too_long" if x["chosen_tokens"] > p.max_chosen_tokens else None)
    out.append(lambda x: "rejected_too_long" if x["rejected_tokens"] > p.max_rejected_tokens else None)
    if p.require_correct_chosen:
        out.append(lambda x: "chosen_incorrect" if x["reference"] is not None and not toytask.is_correct(x["chosen"], x["reference"]) else None)
    if p.drop_duplicates:
        out.append(duplicate)  # last: a pair dropped for another reason does not mask a later copy
    return out


def run(p: CurateParams, pairs: list[dict[str, Any]]) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(kept, quarantined with `reason`, counts)."""
    active = filters(p)
    kept: list[dict] = []
    quarantine: list[dict] = []
    reasons: Counter[str] = Counter()
    for pair in pairs:
        reason = next((r for f in active if (r := f(pair)) is not None), None)
        if reason is None:
            kept.append(pair)
        else:
            reasons[reason] += 1
            quarantine.append({**pair, "reason": reason})
    if len(kept) + len(quarantine) != len(pairs):  # the reconciliation the metrics promise
        raise AssertionError("curate: counts do not reconcile")
    counts = {"pairs_in": len(pairs), "kept": len(kept), "quarantined": len(quarantine), "dropped_by_reason": dict(sorted(reasons.items()))}
    return kept, quarantine, counts


def main() -> None:
    args = cli.parse_paths(__doc__, "pairs", "out", "metrics")
    used = params.load_sections(args.params, SECTIONS)
    src = args.pairs / "pairs.parquet"
    kept, quarantine, counts = run(used["curate"], read_rows(src, records.PAIR_SCHEMA))
    if not kept:
        raise ValueError(f"curate: every one of the {counts['pairs_in']} pairs was dropped ({counts['dropped_by_reason']}); nothing to train on; relax params.yaml `curate` or fix the generations upstream")
    with atomic_dir(args.out) as tmp:
        outputs = {
            "curated.parquet": write_table(tmp / "curated.parquet", kept, records.PAIR_SCHEMA),
            "quarantine.parquet": write_table(tmp / "quarantine.parquet", quarantine, records.PAIR_QUARANTINE_SCHEMA),
        }
        lineage.write_manifest(tmp, "curate", used, inputs={"pairs": src}, outputs=outputs, counts=counts)
    write_json(args.metrics, counts)
    log.info("curate: kept %d of %d pairs; dropped %s", counts["kept"], counts["pairs_in"], counts["dropped_by_reason"])


if __name__ == "__main__":
    main()
