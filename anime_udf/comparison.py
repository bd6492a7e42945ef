"""What `anime-udf compare` measures: a challenger bundle against the bundle it would replace,
scored through the SQL functions on the catalog rows that neither was trained on, the figures
from sql/metrics.sql, paired-bootstrap intervals of their differences and the rows that move.

A row is "trained on" when its inputs hash as a row of the model's training did: each bundle
records those hashes (``bundle.TRAINING_ROWS_FILE``, written by the trainers with
``row_hashes``), the first 128 bits of ``rescore_input_hash_v1`` (sql/rescore.sql) of the inputs
(blank text as NULL), so a training row is recognised under any key or title.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from anime_udf.bundle import read_manifest, training_row_hashes
from anime_udf.catalog import add_catalog
from anime_udf.columns import DEFAULT_KEY, INPUT_COLUMNS
from anime_udf.errors import AnimeUdfError, OptionError
from anime_udf.metrics import metrics_table
from anime_udf.registry import get_model, resolve
from anime_udf.rescore import sql_sections
from anime_udf.sqlutil import quote_ident
from anime_udf.udf import FUNCTION_NAMES, LazyScorer, register_scorer

if TYPE_CHECKING:
    from anime_udf.catalog import DatabaseTable

# The v1 hash: the one bundles have recorded since they record their rows (sql/rescore.sql).
ROW_HASH_SQL = "substr(rescore_input_hash_v1(synopsis, genres, studio, episodes), 1, 32)"
ROLES = ("challenger", "incumbent")
METRICS = ("mae", "rmse", "spearman")
LOWER_IS_BETTER = {"mae": True, "rmse": True, "spearman": False}
MOVES = (0.5, 1.0)  # a row "moves" when the challenger's score differs from the incumbent's by more
NEWEST_SHARE = 0.15  # the newest years holding at least this share of the compared rows (as training validates)


class ComparisonError(AnimeUdfError):
    """The bundles cannot be compared (no record of their training rows), or no row is left to compare on."""


def input_hashes(rows: pl.DataFrame) -> list[str]:
    """Each of ``rows``' content hash (read by ``read_catalog``), in hex, in row order."""
    con = duckdb.connect()
    try:
        con.execute(sql_sections()["macros"])
        con.register("hashed_rows", rows.select(INPUT_COLUMNS))
        return [h for (h,) in con.sql(f"SELECT {ROW_HASH_SQL} FROM hashed_rows").fetchall()]
    finally:
        con.close()


def row_hashes(rows: pl.DataFrame) -> np.ndarray:
    """The sorted, distinct content hashes ((n, 16) uint8) of ``rows``' inputs: a bundle's record."""
    distinct = sorted(set(input_hashes(rows)))
    return np.frombuffer(bytes.fromhex("".join(distinct)), dtype=np.uint8).reshape(-1, 16).copy()


def trained_on(bundle: Any) -> set[str]:
    """The hex content hashes of the rows ``bundle``'s training saw; an error where it does not record them."""
    hashes = training_row_hashes(bundle)
    if hashes is None:
        raise ComparisonError(f"{bundle}: records no training rows (trained before bundles did), so the rows it "
                              "was trained on cannot be left out; retrain it to compare it")
    return {row.tobytes().hex() for row in hashes}


def challenge(rows: pl.DataFrame, challenger_scores: np.ndarray, incumbent: LazyScorer, *, resamples: int = 1000,
              level: float = 0.95, seed: int = 0) -> tuple[int, dict, dict]:
    """Scores a challenger gave ``rows`` without having trained on them (a selection run's, on its
    validation rows) against ``incumbent``'s, through its SQL function, on the rows with a score
    that the incumbent never trained on. Returns (those rows, both models' figures, the intervals
    of the differences), as ``compare``; no row left is an error."""
    trained = trained_on(incumbent.path)
    keep = [h not in trained for h in input_hashes(rows)]
    left = rows.with_columns(challenger=pl.Series(challenger_scores, dtype=pl.Float64)).filter(
        pl.Series(keep) & pl.col("score").is_not_null())
    if left.is_empty():
        raise ComparisonError(f"nothing to compare on: {incumbent.path.name} was trained on every validation row")
    con = duckdb.connect()
    try:
        fn = register_scorer(con, incumbent, f"{FUNCTION_NAMES[incumbent.kind]}_incumbent")
        con.register("challenged", left.select(*INPUT_COLUMNS, "score", "challenger"))
        con.execute(f"CREATE TEMP TABLE compared AS SELECT score::DOUBLE AS y, challenger, "
                    f"{fn}(synopsis, genres, studio, episodes) AS incumbent FROM challenged")
        metrics, intervals = measure(con, "true", resamples, level, seed)
    finally:
        con.close()
    return left.height, metrics, intervals


@dataclass
class Comparison:
    bundles: dict[str, str]  # role -> bundle name
    selected_rows: int  # catalog rows the selection holds
    trained_rows: dict[str, int]  # role -> selected rows that role's training saw
    compared_rows: int  # selected rows neither saw
    scored_rows: int  # of those, rows with a score (the metrics' rows)
    metrics: dict[str, dict[str, float]]  # role -> n, mae, rmse, spearman, r2 (sql/metrics.sql)
    intervals: dict[str, dict[str, float]]  # metric -> difference (challenger - incumbent), lo, hi
    level: float
    resamples: int
    moved: dict[float, int]  # threshold -> compared rows whose score moves by more
    distribution: dict[str, dict[str, float]]  # role -> mean, std, p10, p50, p90 over the compared rows
    movers: list[dict[str, Any]]  # the largest moves: key, title, score, incumbent, challenger, change
    newest: dict[str, Any] = field(default_factory=dict)  # where dated: years, metrics, intervals

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "moved": {str(k): v for k, v in self.moved.items()}}


def wins(metric: str, interval: dict[str, float]) -> bool:
    """Whether the challenger wins on ``metric`` beyond the noise: its whole interval on the good side of 0."""
    return interval["hi"] < 0 if LOWER_IS_BETTER[metric] else interval["lo"] > 0


def compare_bundles(challenger: str, data: Path | DatabaseTable, condition: str = "true", *,
                    against: str = "production", models_dir: Path | str | None = None, device: str = "auto",
                    precision: str = "auto", resamples: int = 1000, seed: int = 0, top: int = 10) -> Comparison:
    """``anime-udf compare``: the bundle ``challenger`` (a name or directory) against ``against``, the
    bundle that serves its kind (``production``) or one named, on the catalog ``data``'s rows that
    satisfy SQL ``condition``; the bundles are checked before anything is read."""
    challenger_path = get_model(challenger, models_dir)
    kind = read_manifest(challenger_path, verify=False)["kind"]
    incumbent_path = resolve(kind, models_dir) if against == "production" else get_model(against, models_dir)
    if incumbent_path is None:
        raise OptionError(f"no {kind} bundle serves in {models_dir} to compare with; name one", "--against")
    if read_manifest(incumbent_path, verify=False)["kind"] != kind:
        raise OptionError(f"{incumbent_path} is not a {kind} bundle, as {challenger_path} is", "--against")
    if incumbent_path.resolve() == challenger_path.resolve():
        raise OptionError(f"{challenger_path.name} is the bundle it would be compared with", "--against")
    scorers = {role: LazyScorer(path, device, precision) for role, path in
               (("challenger", challenger_path), ("incumbent", incumbent_path))}
    con = duckdb.connect()
    add_catalog(con, data, require_score=True, allow_missing_scores=True)
    return compare(con, "catalog", condition, scorers, resamples=resamples, seed=seed, top=top)


def format_comparison(result: Comparison, against: str) -> str:
    """compare's screen: counts, figures side by side with the intervals, moves, distributions, movers."""
    names = result.bundles
    incumbent = f"{names['incumbent']}" + (" (production)" if against == "production" else "")
    either = result.selected_rows - result.compared_rows
    lines = [f"challenger {names['challenger']} against {incumbent}",
             f"rows: {result.selected_rows} selected; trained on by the challenger {result.trained_rows['challenger']}, "
             f"by the incumbent {result.trained_rows['incumbent']}, by either {either}; compared on the "
             f"{result.compared_rows} left ({result.scored_rows} with a score)"]

    def table(title: str, metrics: dict, intervals: dict) -> None:
        percent = f"{result.level:.0%}"
        lines.extend(["", f"{title:12} {'challenger':>11} {'incumbent':>11} {'difference':>11}  "
                          f"{percent} interval ({result.resamples} paired resamples)",
                      f"{'n':12} {metrics['challenger']['n']:>11} {metrics['incumbent']['n']:>11}"])
        for m in ("mae", "rmse", "spearman"):
            i = intervals[m]
            lines.append(f"{m:12} {metrics['challenger'][m]:>11.4f} {metrics['incumbent'][m]:>11.4f} "
                         f"{i['difference']:>+11.4f}  [{i['lo']:+.4f}, {i['hi']:+.4f}]"
                         + ("  challenger better" if wins(m, i) else ""))

    table("all rows", result.metrics, result.intervals)
    if result.newest:
        table(result.newest["years"], result.newest["metrics"], result.newest["intervals"])
    n = result.compared_rows
    lines.extend(["", "moved: " + "; ".join(f"by more than {t}: {k} of {n} rows ({k / n:.1%})"
                                             for t, k in result.moved.items()),
                  f"scores {'mean':>8} {'std':>7} {'p10':>7} {'p50':>7} {'p90':>7}"])
    for role, d in result.distribution.items():
        lines.append(f"{role[:10]:10}" + "".join(f" {d[k]:>7.3f}" for k in ("mean", "std", "p10", "p50", "p90")))
    if result.movers:
        lines.extend(["", f"largest movers {'key':>10}  {'title':40} {'score':>6} {'incumbent':>9} "
                          f"{'challenger':>10} {'change':>7}"])
        for r in result.movers:
            score = "" if r["score"] is None else f"{r['score']:.2f}"
            lines.append(f"{'':14} {r['key']:>10}  {(r['title'] or '')[:40]:40} {score:>6} {r['incumbent']:>9.3f} "
                         f"{r['challenger']:>10.3f} {r['change']:>+7.3f}")
    return "\n".join(lines)


def compare(con: duckdb.DuckDBPyConnection, catalog: str, condition: str, scorers: dict[str, LazyScorer], *,
            resamples: int = 1000, level: float = 0.95, seed: int = 0, top: int = 10) -> Comparison:
    """Compare ``scorers['challenger']`` with ``scorers['incumbent']`` on the rows of view ``catalog``
    satisfying SQL ``condition`` that neither bundle's training saw."""
    hashes = {role: trained_on(scorer.path) for role, scorer in scorers.items()}
    functions = {role: register_scorer(con, scorer, f"{FUNCTION_NAMES[scorer.kind]}_{role}")
                 for role, scorer in scorers.items()}
    con.execute(sql_sections()["macros"])
    con.register("trained_rows", pa.table({"role": [role for role, h in hashes.items() for _ in h],
                                           "h": [h for role_hashes in hashes.values() for h in role_hashes]}))
    columns = [row[0] for row in con.execute(f"DESCRIBE {quote_ident(catalog)}").fetchall()]
    key = quote_ident(DEFAULT_KEY) if DEFAULT_KEY in columns else "row_number() OVER ()"
    title = "title::VARCHAR" if "title" in columns else "NULL::VARCHAR"
    year = "TRY_CAST(year AS INTEGER)" if "year" in columns else "NULL::INTEGER"
    con.execute(f"CREATE OR REPLACE TEMP TABLE selected_rows AS SELECT {key}::VARCHAR AS key, {title} AS title, "
                f"{year} AS year, score::DOUBLE AS y, synopsis, genres, studio, episodes, {ROW_HASH_SQL} AS h "
                f"FROM {quote_ident(catalog)} WHERE {condition}")
    selected = con.execute("SELECT count(*) FROM selected_rows").fetchall()[0][0]
    trained_rows = dict(con.execute("SELECT t.role, count(*) FROM selected_rows s JOIN (SELECT DISTINCT role, h FROM "
                                    "trained_rows) t USING (h) GROUP BY t.role").fetchall())
    calls = ", ".join(f"{fn}(synopsis, genres, studio, episodes) AS {role}" for role, fn in functions.items())
    con.execute(f"CREATE OR REPLACE TEMP TABLE compared AS SELECT key, title, year, y, {calls} FROM selected_rows "
                "WHERE h NOT IN (SELECT h FROM trained_rows)")
    compared, scored = con.execute("SELECT count(*), count(y) FROM compared").fetchall()[0]
    if scored == 0:
        raise ComparisonError("nothing to compare on: " + (
            f"the bundles were trained on all {selected} selected rows" if compared == 0 else
            f"none of the {compared} selected rows that neither bundle was trained on has a score"))
    metrics, intervals = measure(con, "true", resamples, level, seed)
    newest = {}
    if (years := newest_years(con)) is not None:
        newest_metrics, newest_intervals = measure(con, f"year >= {years}", resamples, level, seed)
        newest = {"years": f"year >= {years}", "metrics": newest_metrics, "intervals": newest_intervals}
    moved = {t: con.execute(f"SELECT count(*) FROM compared WHERE abs(challenger - incumbent) > {t}").fetchall()[0][0]
             for t in MOVES}
    distribution = {role: dict(zip(("mean", "std", "p10", "p50", "p90"), con.execute(
        f"SELECT avg({role}), stddev_pop({role}), quantile_cont({role}, 0.1), median({role}), "
        f"quantile_cont({role}, 0.9) FROM compared").fetchall()[0])) for role in ROLES}
    movers = con.sql(f"SELECT key, title, y AS score, incumbent, challenger, challenger - incumbent AS change "
                     f"FROM compared ORDER BY abs(challenger - incumbent) DESC, key LIMIT {int(top)}").pl()
    return Comparison(
        bundles={role: scorer.path.name for role, scorer in scorers.items()}, selected_rows=selected,
        trained_rows={role: trained_rows.get(role, 0) for role in ROLES}, compared_rows=compared,
        scored_rows=scored, metrics=metrics, intervals=intervals, level=level, resamples=resamples, moved=moved,
        distribution=distribution, movers=movers.to_dicts(), newest=newest)


def newest_years(con: duckdb.DuckDBPyConnection) -> int | None:
    """The first of the newest years holding at least ``NEWEST_SHARE`` of the compared rows with a
    score (None: undated rows, or a single year)."""
    counts = con.execute("SELECT year, count(*) FROM compared WHERE year IS NOT NULL AND y IS NOT NULL "
                         "GROUP BY year ORDER BY year DESC").fetchall()
    total, running = sum(n for _, n in counts), 0
    for year, n in counts[:-1]:  # never every year
        running += n
        if running >= NEWEST_SHARE * total:
            return year
    return None


def measure(con: duckdb.DuckDBPyConnection, condition: str, resamples: int, level: float, seed: int
            ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Both models' figures (sql/metrics.sql) on the compared rows with a score satisfying ``condition``,
    and the paired-bootstrap intervals of their differences."""
    con.execute("CREATE OR REPLACE TEMP VIEW compared_pairs AS "
                + " UNION ALL ".join(f"SELECT '{role}' AS model, y, {role} AS yhat FROM compared "
                                     f"WHERE y IS NOT NULL AND {condition}" for role in ROLES))
    table = metrics_table(con, "compared_pairs")
    metrics = {row.pop("model"): row for row in table.to_dicts()}
    y, challenger, incumbent = (np.asarray(column, dtype=float) for column in con.execute(
        f"SELECT y, challenger, incumbent FROM compared WHERE y IS NOT NULL AND {condition}").fetchnumpy().values())
    differences = paired_bootstrap(y, challenger, incumbent, resamples, seed)
    tail = (1 - level) / 2 * 100
    intervals = {m: {"difference": metrics["challenger"][m] - metrics["incumbent"][m],
                     "lo": float(np.percentile(differences[m], tail)),
                     "hi": float(np.percentile(differences[m], 100 - tail))} for m in METRICS}
    return metrics, intervals


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: int, seed: int,
                     chunk: int = 100) -> dict[str, np.ndarray]:
    """MAE, RMSE and Spearman of ``a`` minus those of ``b``, on ``resamples`` resamples of the rows
    (the same rows for both: paired). A resample is a count per row (multinomial), so each figure is
    a weighted one; Spearman ranks a row's ties, repeats included, by their average rank."""
    rng = np.random.default_rng(seed)
    n = len(y)
    chunks = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        draws = rng.integers(0, n, size=(size, n)) + np.arange(size)[:, None] * n
        chunks.append(resampled_differences(np.bincount(draws.ravel(), minlength=size * n).reshape(size, n), y, a, b))
    return {m: np.concatenate([c[m] for c in chunks]) for m in METRICS}


def resampled_differences(counts: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The differences of MAE, RMSE and Spearman (``a`` minus ``b``) in each resample, a row of
    ``counts`` (how often each row was drawn)."""
    w = counts.astype(float)
    n = w.sum(axis=1)
    ranks_y, ranks_a, ranks_b = (weighted_average_ranks(w, *tie_groups(v)) for v in (y, a, b))
    return {
        "mae": (w @ np.abs(y - a) - w @ np.abs(y - b)) / n,
        "rmse": np.sqrt(w @ (y - a) ** 2 / n) - np.sqrt(w @ (y - b) ** 2 / n),
        "spearman": weighted_corr(w, ranks_y, ranks_a) - weighted_corr(w, ranks_y, ranks_b),
    }


def tie_groups(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by value, where each group of equal values starts, and each row's group."""
    order = np.argsort(v, kind="stable")
    starts = np.flatnonzero(np.r_[True, v[order][1:] != v[order][:-1]])
    group = np.empty(len(v), dtype=np.int64)
    group[order] = np.cumsum(np.r_[True, v[order][1:] != v[order][:-1]]) - 1
    return order, starts, group


def weighted_average_ranks(w: np.ndarray, order: np.ndarray, starts: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Each row's average rank in each resample (rows of ``w``: how often each row was drawn)."""
    weight = np.add.reduceat(w[:, order], starts, axis=1)  # resampled rows per group of equal values
    below = np.cumsum(weight, axis=1) - weight
    return (below + (weight + 1) / 2)[:, group]


def weighted_corr(w: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    total = w.sum(axis=1, keepdims=True)
    x = x - (w * x).sum(axis=1, keepdims=True) / total
    z = z - (w * z).sum(axis=1, keepdims=True) / total
    return (w * x * z).sum(axis=1) / np.sqrt((w * x * x).sum(axis=1) * (w * z * z).sum(axis=1))
