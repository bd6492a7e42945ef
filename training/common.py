"""What both trainers share: data splits, target scaling, the head-fitting loop."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from anime_udf.catalog import CatalogError, DatabaseTable, fingerprint, read_catalog
from anime_udf.columns import EPISODES, GENRES, INPUT_COLUMNS, SCORE_COLUMN, STUDIO, SYNOPSIS
from anime_udf.comparison import row_hashes
from anime_udf.features import TabularEncoder
from anime_udf.metrics import compute_metrics
from anime_udf.models import Blend, SeedEnsemble
from anime_udf.scoring import SCORE_MAX, SCORE_MIN, sentence_embedding
from anime_udf.text import FrozenTextEncoder


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class DataSplit:
    """The rows of a training run: the selection run fits on ``fit`` and is validated on
    ``valid`` (it chooses epochs); the final model is then refitted on ``refit``, every row of
    the training catalog, with what was chosen. ``selection`` says how ``valid`` was chosen
    (recorded in the manifest)."""

    fit: pl.DataFrame
    valid: pl.DataFrame
    refit: pl.DataFrame
    selection: dict = field(default_factory=dict)


# Catalog columns that date a title: when one is there, the selection run validates on the newest
# titles, as the nightly job scores titles newer than any it trained on. They choose rows only:
# no model reads them.
TIME_COLUMNS = ("year", "premiered")
TIME_VALID_SHARE = 0.15  # the newest years holding at least this share of the rows validate
DEFAULT_VALID_FRACTION = 0.2  # a random split's share, for a catalog without dates


def load_split(data, valid=None, valid_fraction: float | None = None, seed: int = 42,
               valid_where: str | None = None, default_fraction: float = DEFAULT_VALID_FRACTION) -> DataSplit:
    """Training and validation rows, chosen (first that applies) by: an explicit ``valid``
    catalog; the SQL predicate ``valid_where`` over ``data``'s columns; ``valid_fraction``, a
    seeded random share; time (the newest years, when ``data`` has a ``year`` or ``premiered``
    column); a random ``default_fraction``."""
    label = data if isinstance(data, (str, Path, DatabaseTable)) else "the training catalog"
    train = read_catalog(data, require_score=True, name=str(label))
    if train.height < 2:
        raise CatalogError(f"{label}: {train.height} rows; training needs at least 2")
    if valid is not None:
        valid_rows = read_catalog(valid, require_score=True)
        if valid_rows.height == 0:
            raise CatalogError(f"{valid}: no rows to validate on")
        return DataSplit(train, valid_rows, train, {"how": "catalog", "valid": str(valid)})
    if valid_where is not None:
        return where_split(label, train, valid_where, "where")
    if valid_fraction is None and (by_time := newest_years(train)) is not None:
        return where_split(label, train, by_time, "time")
    return random_split(label, train, default_fraction if valid_fraction is None else valid_fraction, seed)


def where_split(label, train: pl.DataFrame, predicate: str, how: str) -> DataSplit:
    is_valid = rows_where(train, predicate)
    n_valid = int(is_valid.sum())
    if n_valid == 0 or train.height - n_valid < 2:
        raise CatalogError(f"--valid-where {predicate!r} selects {n_valid} of {label}'s {train.height} rows; "
                           f"it must leave at least 1 row to validate on and 2 to train on")
    return DataSplit(train.filter(~is_valid), train.filter(is_valid), train,
                     {"how": how, "where": predicate, "rows": n_valid})


def random_split(label, train: pl.DataFrame, valid_fraction: float, seed: int) -> DataSplit:
    if not 0.0 < valid_fraction < 1.0:
        raise CatalogError(f"--valid-fraction must be between 0 and 1, got {valid_fraction}")
    order = np.random.default_rng(seed).permutation(train.height)
    n_valid = max(1, round(train.height * valid_fraction))
    if train.height - n_valid < 2:
        raise CatalogError(f"{label}: {train.height} rows are too few to split into training and validation")
    return DataSplit(train[order[n_valid:]], train[order[:n_valid]], train,
                     {"how": "random", "fraction": valid_fraction, "seed": seed, "rows": int(n_valid)})


def rows_where(train: pl.DataFrame, predicate: str) -> pl.Series:
    """Which rows satisfy the SQL ``predicate`` (NULL counts as false), evaluated by DuckDB. As
    ``eval --where``: one expression, which reads no file."""
    import duckdb

    from anime_udf.sqlutil import NotOneExpressionError, one_expression, quote_ident

    try:
        condition = one_expression(predicate)
    except NotOneExpressionError as exc:
        raise CatalogError(f"--valid-where {exc}") from None
    row = "__row" + "_" * max((len(c) for c in train.columns), default=0)  # longer than any column: no collision
    con = duckdb.connect(config={"enable_external_access": False})
    con.register("catalog", train.with_row_index(row))
    try:
        chosen = con.sql(f"SELECT {quote_ident(row)} FROM catalog WHERE {condition}").pl()[row]
    except duckdb.Error as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CatalogError(f"--valid-where {predicate!r}: {first_line} (columns: {', '.join(train.columns)})") from None
    finally:
        con.close()
    return pl.Series(np.isin(np.arange(train.height), chosen.to_numpy()))


def newest_years(train: pl.DataFrame) -> str | None:
    """A predicate selecting the newest years that hold at least ``TIME_VALID_SHARE`` of the rows,
    or None when the catalog has no dates (or too few distinct years to split on). A numeric
    ``year`` is taken as it is (negative, not whole, any number of digits); other columns give
    their first run of four digits ("Spring 2019"). The cut is computed from the very values
    the predicate compares, so the rows it selects are the share counted here."""
    from anime_udf.sqlutil import quote_ident

    for column in TIME_COLUMNS:
        if column not in train.columns:
            continue
        if column == "year" and train[column].dtype.is_numeric():
            values, year = train[column].cast(pl.Float64), quote_ident(column)
        else:
            values = train[column].cast(pl.String).str.extract(r"([0-9]{4})").cast(pl.Float64)
            year = f"TRY_CAST(regexp_extract({quote_ident(column)}::VARCHAR, '([0-9]{{4}})', 1) AS INTEGER)"
        years = values.filter(values.is_finite()).sort(descending=True)
        newest = math.ceil(TIME_VALID_SHARE * train.height)
        if years.n_unique() < 2 or len(years) < newest:
            continue
        cut = years[newest - 1]
        if (years < cut).sum() < 2:  # the newest share reaches back to (nearly) the oldest year: too few to fit on
            continue
        return f"{year} >= {int(cut) if cut.is_integer() else cut!r}"
    return None


def embed_frozen(encoder: FrozenTextEncoder, frames: list[pl.DataFrame], progress: bool) -> list[np.ndarray]:
    """Sentence embeddings of each frame's synopses, every distinct text encoded once (cached by content)."""
    texts = [t for df in frames for t in df[SYNOPSIS].to_list()]
    emb = sentence_embedding(encoder.embed(texts, progress=progress))
    bounds = np.cumsum([0] + [df.height for df in frames])
    return [emb[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class TargetScaler:
    mean: float
    std: float

    @classmethod
    def fit(cls, y: np.ndarray) -> "TargetScaler":
        return cls(float(np.mean(y)), float(np.std(y)) or 1.0)

    def scale(self, y: np.ndarray) -> np.ndarray:
        return ((y - self.mean) / self.std).astype(np.float32)

    def unscale(self, z: np.ndarray) -> np.ndarray:
        return np.clip(z.astype(np.float64) * self.std + self.mean, SCORE_MIN, SCORE_MAX)


@dataclass
class Tabular:
    """The tabular side of a training run: feature vocabularies and the target scaler, fitted
    on the rows a model trains on (the selection run's, or the final model's)."""

    features: TabularEncoder
    scaler: TargetScaler

    @classmethod
    def fit(cls, rows: pl.DataFrame, min_studio_count: int) -> "Tabular":
        features = TabularEncoder.fit(rows[GENRES].to_list(), rows[STUDIO].to_list(),
                                      rows[EPISODES].to_list(), min_studio_count)
        return cls(features, TargetScaler.fit(rows[SCORE_COLUMN].to_numpy()))

    def shape(self) -> tuple[int, int]:
        """(dense feature width, number of studio indices): what a network's tabular input needs."""
        return self.features.n_tabular, self.features.n_studios

    def inputs(self, df: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(dense features, studio index) of ``df``."""
        return self.features.encode(df[GENRES].to_list(), df[STUDIO].to_list(), df[EPISODES].to_list())

    def target(self, df: pl.DataFrame) -> np.ndarray:
        return self.scaler.scale(df[SCORE_COLUMN].to_numpy())


def training_record(split: DataSplit, settings: dict, **extra) -> dict:
    return {
        "data_fingerprint": fingerprint(split.refit),
        "valid_fingerprint": fingerprint(split.valid),
        "rows_train": split.refit.height,
        "rows_selection_fit": split.fit.height,
        "rows_valid": split.valid.height,
        "validation": split.selection,
        "settings": settings,
        **extra,
    }


def training_rows_state(split: DataSplit) -> dict[str, torch.Tensor]:
    """The bundle's record of the rows training saw (fitted on, chose epochs on, refitted on), as
    content hashes: `anime-udf compare` leaves them out (a model judged on its own training rows
    wins unfairly)."""
    rows = pl.concat([split.refit.select(INPUT_COLUMNS), split.valid.select(INPUT_COLUMNS)], how="vertical_relaxed")
    return {"hashes": torch.from_numpy(row_hashes(rows))}


Inputs = tuple[np.ndarray, ...]


def fit_on_features(
    net: nn.Module,
    inputs: Inputs,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    grad_clip: float = 5.0,
    device: torch.device = torch.device("cpu"),
    bar: tqdm | None = None,
) -> None:
    """Train a network on fixed inputs (text features, dense tabular, studio index, ...):
    AdamW, cosine annealing over ``epochs``, MSE, gradient clipping. The network ends on
    the CPU in eval mode."""
    torch.manual_seed(seed)
    net.to(device)
    x = [torch.from_numpy(a).to(device) for a in inputs]
    target = torch.from_numpy(y).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(target) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(target), generator=generator).split(batch_size):
            idx = idx.to(device)
            loss = nn.functional.mse_loss(net(*(a[idx] for a in x)), target[idx])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
        if bar is not None:
            bar.update(1)
    net.to("cpu").eval()


@dataclass
class HeadTraining:
    """How a head is fitted on fixed features (both trainers)."""

    epochs: int  # the longest schedule tried
    batch_size: int
    lr: float
    weight_decay: float
    seeds: int

    def schedule_lengths(self) -> list[int]:
        """The schedules the selection run compares: a quarter, half, three quarters and all of ``epochs``."""
        return sorted({max(1, round(self.epochs * k / 4)) for k in (1, 2, 3, 4)})


@dataclass
class Selection:
    """What the selection run chose, and the validation predictions that chose it."""

    best_epochs: int
    valid_predictions: np.ndarray  # standardised, the chosen ensemble's
    valid_members: np.ndarray  # standardised, each seed's [seeds, rows] (their mean is valid_predictions)
    history: list[dict]  # validation RMSE (standardised) of each schedule tried


def select_epochs(make_net: Callable[[], nn.Module], train_inputs: Inputs, y_train: np.ndarray,
                  valid_inputs: Inputs, y_valid: np.ndarray, how: HeadTraining, seed: int,
                  device: torch.device, progress: bool) -> Selection:
    """The selection run: for each schedule length, the ensemble that would ship is trained
    on the fit rows and validated at the schedule's end; the best validation RMSE wins.
    Whole schedules and whole ensembles, because that is what ships: cosine annealing makes
    a schedule's end unlike its middle, and averaging seeds tolerates longer training
    than one network does."""
    history, best = [], None
    lengths = how.schedule_lengths()
    with tqdm(total=how.seeds * sum(lengths), desc=f"choosing epochs of {lengths}", unit="epoch",
              disable=not progress) as bar:
        for epochs in lengths:
            members = predict_members(fit_ensemble(make_net, train_inputs, y_train, epochs, how, seed, device, bar),
                                      valid_inputs)
            pred = members.mean(0).numpy()
            rmse = float(np.sqrt(np.mean((pred - y_valid) ** 2)))
            history.append({"epochs": epochs, "valid_rmse_std": round(rmse, 5)})
            bar.set_postfix(valid_rmse=f"{rmse:.4f}")
            if best is None or rmse < best[0]:
                best = (rmse, epochs, pred, members.numpy())
    return Selection(best[1], best[2], best[3], history)


# The blend's least squares is shrunk toward the head alone as if by this many rows: a few
# validation rows (a small catalog) leave the head as it is; the real catalog's 1,700 barely move it.
BLEND_PRIOR_ROWS = 20.0


def fit_blend(head: np.ndarray, y: np.ndarray, lexical: np.ndarray | None = None) -> dict:
    """The blend after the head (anime_udf.models.Blend): least squares of the validation
    targets ``y`` on [head, lexical score (fusion), 1], all standardised, from the selection
    run's predictions on its validation rows. Returns the manifest's ``blend`` entry."""
    columns = [head, *([lexical] if lexical is not None else []), np.ones_like(head)]
    a = np.stack(columns, axis=1).astype(np.float64)
    prior = np.zeros(a.shape[1])
    prior[0] = 1.0
    ridge = BLEND_PRIOR_ROWS * np.eye(a.shape[1])
    weights = np.linalg.solve(a.T @ a + ridge, a.T @ y.astype(np.float64) + BLEND_PRIOR_ROWS * prior)
    return {"head": float(weights[0]), "lexical": float(weights[1]) if lexical is not None else 0.0,
            "constant": float(weights[-1]), "fitted_on_rows": len(y)}


def blend_and_validate(enabled: bool, selection: Selection, y_valid: np.ndarray, valid_scores: np.ndarray,
                       scaler: TargetScaler, log: Callable[[str], None],
                       lexical: np.ndarray | None = None) -> tuple[dict | None, dict, np.ndarray]:
    """Both trainers' last use of the selection run: with ``enabled`` (train --blend) the blend
    is fitted (``fit_blend``) and logged. Returns it (None: the head alone), the validation
    metrics of the model as it ships: the selection run's ensemble, blended, on rows it never
    trained on (the refitted final model has seen them; the blend's few numbers were fitted on them),
    and those scores, one per validation row (what ``train --promote-if-better`` compares)."""
    blend = fit_blend(selection.valid_predictions, y_valid, lexical) if enabled else None
    if blend:
        lexical_term = f" + {blend['lexical']:.3f} x lexical score" if lexical is not None else ""
        log(f"blend after the head: {blend['head']:.3f} x head{lexical_term} {blend['constant']:+.3f} "
            f"(least squares on {blend['fitted_on_rows']} validation rows)")
    scores = scaler.unscale(Blend.of(blend).apply(selection.valid_predictions, lexical))
    return blend, compute_metrics(valid_scores, scores), scores


def predict_members(ensemble: SeedEnsemble, inputs: Inputs) -> torch.Tensor:
    """Each seed's predictions, [seeds, rows] (the ensemble's are their mean)."""
    with torch.inference_mode():
        return ensemble.eval().member_predictions(*(torch.from_numpy(a) for a in inputs))


def fit_ensemble(make_net: Callable[[], nn.Module], inputs: Inputs, y: np.ndarray, epochs: int,
                 how: HeadTraining, seed: int, device: torch.device, bar: tqdm | None = None) -> SeedEnsemble:
    """``how.seeds`` copies of a network, seeds ``seed``, ``seed + 1``, …, each trained for
    ``epochs`` (a whole cosine schedule) on ``inputs``, the unknown studio weighing nothing
    (``BaselineNet.drop_unknown_studio``); their mean is the model."""
    members = []
    for i in range(how.seeds):
        torch.manual_seed(seed + i)
        net = make_net()
        net.drop_unknown_studio()
        fit_on_features(net, inputs, y, epochs=epochs, batch_size=how.batch_size, lr=how.lr,
                        weight_decay=how.weight_decay, seed=seed + i, device=device, bar=bar)
        members.append(net)
    return SeedEnsemble(members).eval()


def refit_ensemble(make_net: Callable[[], nn.Module], inputs: Inputs, y: np.ndarray, epochs: int,
                   how: HeadTraining, seed: int, device: torch.device, progress: bool) -> SeedEnsemble:
    """The final model: the chosen ensemble trained on the final rows, with a progress bar."""
    with tqdm(total=how.seeds * epochs, desc="final model", unit="epoch", disable=not progress) as bar:
        return fit_ensemble(make_net, inputs, y, epochs, how, seed, device, bar)
