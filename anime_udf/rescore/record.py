"""The run record: what ``rescore`` returns, ``--json`` prints, and the one screen an
operator reads (``format_summary``)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb

from anime_udf.rescore.run import Run, now
from anime_udf.rescore.sql import catalog_fingerprint

QUANTILES = ("p05", "p25", "p50", "p75", "p95")
# Why a run scored with its bundle (ModelChoice.alias), as the summary says it.
SERVED_AS = {"production": "the production alias", "newest": "the newest: no production alias is set",
             None: "named by --model"}
# Columns of rescore_runs that are the same for every model of a run: reported once.
RUN_WIDE_COLUMNS = ("started_at", "finished_at", "seconds", "catalog_fingerprint", "rows_seen", "rows_imputed",
                    "level")


@dataclass
class RunRecord:
    run_id: str
    status: str  # "ok" or "dry-run"
    store: str
    catalog: str
    key: str
    started_at: str
    finished_at: str
    seconds: float
    catalog_fingerprint: str
    rows_seen: int
    rows_imputed: int
    level: float | None  # the level of the intervals the run stores; None: it computed none
    models: list[dict[str, Any]] = field(default_factory=list)
    export: str | None = None
    export_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _about(run: Run) -> dict[str, Any]:
    """What every run record says of its run."""
    return {"run_id": run.id, "store": str(run.store), "catalog": run.catalog, "key": run.key,
            "started_at": run.started.isoformat(timespec="seconds"),
            "finished_at": now().isoformat(timespec="seconds"), "seconds": run.seconds(), "level": run.level}


def run_record(run: Run, records: list[dict[str, Any]], **export: Any) -> RunRecord:
    """The record of a finished run, from its rows of rescore_runs (one per model)."""
    first = records[0]
    return RunRecord(
        **_about(run), status="ok", catalog_fingerprint=first["catalog_fingerprint"], rows_seen=first["rows_seen"],
        rows_imputed=first["rows_imputed"],
        models=[{k: v for k, v in r.items() if k not in RUN_WIDE_COLUMNS} for r in records],
        **export,
    )


def dry_run_record(con: duckdb.DuckDBPyConnection, run: Run) -> RunRecord:
    """The record of a dry run, from its planned counts (rescore_counts)."""
    counts = con.sql("SELECT * FROM rescore_counts ORDER BY model_kind").pl().to_dicts()
    return RunRecord(
        **_about(run), status="dry-run", catalog_fingerprint=catalog_fingerprint(con),
        rows_seen=counts[0]["rows_seen"] if counts else 0, rows_imputed=counts[0]["rows_imputed"] if counts else 0,
        models=[{k: v for k, v in c.items() if k not in ("rows_seen", "rows_imputed")} for c in counts],
    )


# --- the summary --------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ".3f", signed: bool = False) -> str:
    if value is None:
        return "-"
    return format(value, ("+" if signed else "") + fmt)


def format_summary(record: RunRecord) -> str:
    """One screen for the operator: what was read, scored, reused, removed, and how the
    score distribution moved against the previous run."""
    dry = record.status == "dry-run"
    lines = [
        f"rescore {record.run_id}: " + ("dry run, nothing scored or written" if dry else "ok")
        + f" in {record.seconds:.1f} s",
        (f"catalog  {record.catalog}: {record.rows_seen} rows, {record.rows_imputed} with imputed inputs, "
         f"fingerprint {record.catalog_fingerprint}"),
        f"store    {record.store} (keyed by {record.key})"
        + (f", with each score's {record.level:.0%} interval" if record.level is not None else ""),
    ]
    verbs = ("would score", "reuse", "remove", "supersede") if dry else ("scored", "reused", "removed", "superseded")
    head = f"{'model':9} {'model id':22} " + " ".join(f"{v:>11}" for v in verbs)
    width = len(head)
    if not dry:
        head += "  " + " ".join(f"{c:>6}" for c in ("mean", *QUANTILES))
    lines.append(head)
    for m in record.models:
        counts = (m["rows_scored"], m["rows_reused"], m["rows_removed"], m["rows_superseded"])
        line = f"{m['model_kind']:9} {m['model_id']:22} " + " ".join(f"{c:>11}" for c in counts)
        bundle = f"{'':9} bundle {m['bundle']} ({SERVED_AS[m['alias']]})"
        if m["rows_superseded"]:  # the store keeps one model a kind: a model it held before is scored again
            bundle += (f"; {'replaces' if dry else 'replaced'} another {m['model_kind']} model's "
                       f"{m['rows_superseded']} rows (the store keeps one model of each kind: one that served "
                       "before, as after a rollback, is scored again)")
        if dry:
            lines += [line, bundle]
            continue
        figures = [m["score_mean"], *(m["score_" + q] for q in QUANTILES)]
        lines += [line + "  " + " ".join(f"{_num(v, '.2f'):>6}" for v in figures), bundle]
        if m["width_mean"] is not None:
            lines.append(f"{'':9} {record.level:.0%} intervals: mean width {m['width_mean']:.2f}")
        if m.get("prev_run_id"):
            same = m["prev_model_id"] == m["model_id"]
            label = f"{'':9} shift vs run {m['prev_run_id']} ({'same model' if same else m['prev_model_id']})"
            shifts = [m["shift_mean"], *(m["shift_" + q] for q in QUANTILES)]
            lines.append(f"{label:{width}}  " + " ".join(f"{_num(v, '.2f', True):>6}" for v in shifts))
        else:
            lines.append(f"{'':9} first run of this kind: no shift to show")
    if record.export:
        lines.append(f"export   {record.export}: {record.export_rows} rows")
    return "\n".join(lines)
