"""Fusion: three views of an anime fused by one head -- the synopsis through a transformer
encoder, the tabular fields through an MLP, and the synopsis's words through a TF-IDF
ridge (the lexical view: rare words, names and franchise terms the sentence embedding
blurs).

``FusionTrainer.train()`` runs the phases in order, each a method, every choice a setting
recorded in the bundle:

1. ``fit_lexical_view``: the lexical view is fitted with scikit-learn; the head trains on
   its out-of-fold scores (training/lexical.py), the bundle keeps a model fitted on every row;
2. ``train_head_on_frozen_encoder`` (stage 1): the head on the frozen encoder's pooled features
   (cached by content hash, shared with the baseline), its epochs chosen on the validation rows;
3. ``fine_tune_encoder`` (stage 2, ``epochs`` > 0): encoder and head end to end
   (training/fine_tune.py). An epoch is kept only if it beats stage 1 on validation RMSE;
   on a 2-core CPU none has, so the default is 0;
4. ``choose_blend`` (``blend``): what follows the head, head x a + lexical score x b + c, fitted
   on the selection run's validation predictions (anime_udf.models.Blend); then the intervals'
   calibration on the same rows (training/calibration.py);
5. ``refit_head``: the final head, a seed ensemble refitted on every training row, on the
   features of the chosen encoder, for the chosen number of epochs;
6. ``write_bundle``: the manifest and the files, written atomically.

Stage 2 checkpoints into ``.OUT.checkpoint/`` beside the bundle; ``resume=True`` continues
from there (stage 1 and the lexical fits are deterministic and quick, so they are rerun).
The bundle is written only at the end.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from anime_udf.bundle import (CALIBRATION_FILE, ENCODER_DIR, HEAD_WEIGHTS, LEXICAL_WEIGHTS_FILE, POOLINGS,
                              REFERENCE_FILE, TOKENIZER_DIR, TRAINING_ROWS_FILE, check_out, write_bundle)
from anime_udf.cache import EmbeddingCache
from anime_udf.catalog import fingerprint
from anime_udf.columns import SCORE_COLUMN, SYNOPSIS
from anime_udf.devices import resolve_device
from anime_udf.explain import reference_manifest, reference_state
from anime_udf.features import clean_text
from anime_udf.models import FusionHead, FusionNet, SeedEnsemble
from anime_udf.text import (DEFAULT_ENCODER_NAME, FrozenTextEncoder, check_model_type, default_encoder_path,
                            load_encoder, load_tokenizer, weights_checksum)
from training.calibration import calibrate
from training.common import (DataSplit, HeadTraining, Tabular, blend_and_validate, embed_frozen, fit_ensemble,
                             refit_ensemble, seed_everything, select_epochs, training_record, training_rows_state)
from training.fine_tune import Checkpoint, fine_tune
from training.lexical import LexicalSettings, fit_lexical, out_of_fold

PARTS = ("fit", "valid", "refit")  # the selection run's rows, its validation rows, the final model's rows


@dataclass
class FusionSettings:
    backbone: str = ""  # local Hugging Face encoder directory; "" = the packaged all-MiniLM-L6-v2
    pooling: str = "mean"
    max_length: int = 256
    epochs: int = 0  # end-to-end fine-tuning: none paid on a CPU (docs/experiments.md, "Fine-tuning")
    batch_size: int = 32
    lr_encoder: float = 1e-5
    lr_head: float = 1e-4
    layer_decay: float = 1.0  # encoder layer k of L learns at lr_encoder * layer_decay ** (L - k)
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    grad_clip: float = 1.0
    head_epochs: int = 120  # the most for the head on fixed features; validation chooses how many
    head_lr: float = 1e-3
    head_batch_size: int = 64
    dropout: float = 0.5  # in the head
    # Dropout inside the encoder while fine-tuning a regressor shifts its activations
    # between training and inference; off by default (it also scored better).
    encoder_dropout: float = 0.0
    studio_dim: int = 0  # one-hot studios (as the baseline)
    min_studio_count: int = 3
    seeds: int = 3
    refit: bool = True
    blend: bool = False  # better on newer titles, worse on others (docs/performance.md, "The blend is a trade")
    lexical_ngram_max: int = 2
    lexical_min_df: int = 2
    lexical_alpha: float = 1.0
    lexical_folds: int = 5
    checkpoint_every: int = 100
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"  # the frozen encoder's features (bf16 measured 0.001 MAE worse); fine-tuning: fp32

    def lexical(self) -> LexicalSettings:
        return LexicalSettings(self.lexical_ngram_max, self.lexical_min_df, self.lexical_alpha, self.lexical_folds)

    def head_training(self) -> HeadTraining:
        return HeadTraining(self.head_epochs, self.head_batch_size, self.head_lr, self.weight_decay, self.seeds)


class FusionTrainer:
    """One fusion training run, phase by phase (the module docstring); ``train()`` runs them all.

    What a phase hands on is kept on the trainer: per part of the rows (``PARTS``) the
    cleaned synopses ``texts``, standardised targets ``y`` and tabular inputs ``tabular``
    (dense, studio index, lexical score); the head's inputs ``x`` (text features first) and
    the ``selection`` that chose its epochs; the ``text_encoder`` they came from and how the
    bundle records it (``text_model``); ``timings`` for the manifest."""

    def __init__(self, split: DataSplit, settings: FusionSettings, *, cache: EmbeddingCache | None = None,
                 progress: bool = True, log: Callable[[str], None] = print,
                 on_step: Callable[[int], None] | None = None,
                 on_validated: Callable[[np.ndarray], None] | None = None):
        if settings.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {settings.pooling!r}")
        seed_everything(settings.seed)
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.split, self.settings, self.progress, self.log, self.on_step = split, settings, progress, log, on_step
        self.on_validated = on_validated  # given the selection run's scores of split.valid, as the model ships
        self.device = resolve_device(settings.device)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.how = settings.head_training()
        self.backbone = Path(settings.backbone) if settings.backbone else default_encoder_path()
        self.backbone_name = DEFAULT_ENCODER_NAME if not settings.backbone else self.backbone.name
        self.rows = dict(zip(PARTS, (split.fit, split.valid, split.refit if settings.refit else split.fit)))
        # The selection run knows only its own rows' studios and genres (as baseline.py).
        self.selection_tab = Tabular.fit(self.rows["fit"], settings.min_studio_count)
        self.tab = Tabular.fit(self.rows["refit"], settings.min_studio_count)
        self.tabs = {"fit": self.selection_tab, "valid": self.selection_tab, "refit": self.tab}
        self.texts = {k: [clean_text(t) for t in df[SYNOPSIS].to_list()] for k, df in self.rows.items()}
        self.y = {k: self.tabs[k].target(df) for k, df in self.rows.items()}

    def train(self, out: Path, *, resume: bool = False, name: str | None = None, force: bool = False) -> dict:
        """Every phase in order; writes the bundle to ``out`` and returns its manifest."""
        checkpoint = Checkpoint(out)
        if resume and not checkpoint.exists():
            self.log(f"no checkpoint at {checkpoint.dir}; starting from the beginning")
            resume = False
        self.fit_lexical_view()
        self.train_head_on_frozen_encoder()
        with tempfile.TemporaryDirectory() as side:  # the encoder and lexical files, until the bundle is written
            side = Path(side)
            self.fine_tune_encoder(side, checkpoint, resume)
            self.choose_blend()
            ensemble = self.refit_head()
            manifest = self.manifest(name or Path(out).name)
            self.write_bundle(out, side, manifest, ensemble, force)
        checkpoint.remove()
        return manifest

    def fit_lexical_view(self) -> None:
        """The TF-IDF ridge: out-of-fold scores for the rows a head trains on, the selection
        run's model for the validation rows, and the model the bundle keeps (every final row)."""
        s, texts, y = self.settings, self.texts, self.y
        lexical_settings = s.lexical()
        self.log(f"lexical view: TF-IDF 1-{s.lexical_ngram_max}-grams + ridge, "
                 f"{s.lexical_folds}-fold out-of-fold scores for the rows the head trains on")
        selection_model = fit_lexical(texts["fit"], y["fit"], lexical_settings)
        scores = {"fit": out_of_fold(texts["fit"], y["fit"], lexical_settings, s.seed),
                  "valid": selection_model.predict(texts["valid"])}
        if s.refit:
            self.lexical = fit_lexical(texts["refit"], y["refit"], lexical_settings)
            scores["refit"] = out_of_fold(texts["refit"], y["refit"], lexical_settings, s.seed)
        else:
            self.lexical, scores["refit"] = selection_model, scores["fit"]
        self.tabular = {k: (*self.tabs[k].inputs(df), scores[k]) for k, df in self.rows.items()}
        self.timings["lexical_seconds"] = time.perf_counter() - self.started

    def train_head_on_frozen_encoder(self) -> None:
        """Stage 1: the backbone frozen, its pooled features (cached) for the head, whose epochs
        the selection run chooses."""
        self.log(f"stage 1: {self.backbone_name} frozen, pooled features (cached) for the head; "
                 f"selection on {self.split.fit.height} rows, validation on {self.split.valid.height}")
        self.choose_head_epochs(self.frozen_encoder(self.backbone))
        self.timings["stage1_seconds"] = time.perf_counter() - self.started
        best_rmse = min(h["valid_rmse_std"] for h in self.selection.history) * self.selection_tab.scaler.std
        self.log(f"stage 1 done: the head's best schedule is {self.selection.best_epochs} epochs, "
                 f"validation RMSE {best_rmse:.4f}")

    def fine_tune_encoder(self, side: Path, checkpoint: Checkpoint, resume: bool) -> None:
        """Stage 2 (``epochs`` > 0): one head, trained as stage 1 chose on the fit rows, is
        fine-tuned with the encoder (training/fine_tune.py). A tuned encoder that won is saved
        in ``side`` (as is any encoder but the packaged one) and the head's epochs are chosen
        again on its features."""
        s = self.settings
        self.fine_tuning = None
        # The weights are loaded only to fine-tune them or to ship an encoder other than the
        # packaged one (which the bundle references by checksum).
        if s.epochs > 0 or s.backbone:
            tokenizer = load_tokenizer(self.backbone)
            encoder = load_encoder(self.backbone, dropout=s.encoder_dropout)
        if s.epochs > 0:
            head = fit_ensemble(self.make_head(self.selection_tab), self.x["fit"], self.y["fit"],
                                self.selection.best_epochs, replace(self.how, seeds=1), s.seed,
                                self.device).members[0]
            net = FusionNet(encoder, head, s.pooling).to(self.device)
            data = f"{fingerprint(self.split.fit)} {fingerprint(self.split.valid)}"
            self.fine_tuning = fine_tune(net, tokenizer, self.texts, {k: self.tabular[k] for k in ("fit", "valid")},
                                         self.y, s, checkpoint, resume, data, self.device,
                                         self.selection_tab.scaler.std, self.progress, self.log, self.on_step)
            net.to("cpu")
        tuned = bool(self.fine_tuning and self.fine_tuning["best_epoch"] > 0)
        self.encoder_in_bundle = tuned or bool(s.backbone)  # else: the packaged encoder, referenced by checksum
        if self.encoder_in_bundle:
            encoder.save_pretrained(side / ENCODER_DIR, safe_serialization=True)
            tokenizer.save_pretrained(str(side / TOKENIZER_DIR))
        if tuned:  # the tuned encoder's embeddings are cached under its own checksum
            self.log(f"fine-tuning won (epoch {self.fine_tuning['best_epoch']}): "
                     "choosing the head's epochs on its features")
            self.choose_head_epochs(self.frozen_encoder(side / ENCODER_DIR, tokenizer_path=side / TOKENIZER_DIR))
        checksum = weights_checksum(str(side / ENCODER_DIR)) if self.encoder_in_bundle else self.text_encoder.checksum
        self.text_model = {"name": self.backbone_name, "checksum": checksum, "in_bundle": self.encoder_in_bundle,
                           "base_checksum": weights_checksum(str(self.backbone)),
                           "architecture": check_model_type(self.backbone), "fine_tuned": tuned, "pooling": s.pooling,
                           "max_length": s.max_length, "normalize": True}

    def choose_blend(self) -> None:
        """head x a + lexical score x b + c, least squares on the selection run's validation
        rows (training.common.fit_blend); ``blend`` off: the head alone. Also the validation
        metrics of the model as it ships, and the intervals' calibration on those rows."""
        scores, (_, studio, lexical) = self.split.valid[SCORE_COLUMN].to_numpy(), self.tabular["valid"]
        self.blend, self.valid_metrics, valid_scores = blend_and_validate(
            self.settings.blend, self.selection, self.y["valid"], scores, self.selection_tab.scaler, self.log,
            lexical=lexical)
        if self.on_validated:
            self.on_validated(valid_scores)
        self.calibration, self.calibration_state = calibrate(
            self.selection, self.blend, self.selection_tab.scaler, scores, self.tab.inputs(self.rows["valid"])[0],
            studio, self.tab.features.genres, self.texts["valid"], lexical, self.split.selection, self.settings.seed,
            self.log)

    def refit_head(self) -> SeedEnsemble:
        """The final head: the seed ensemble, the chosen epochs, every final row."""
        s, epochs = self.settings, self.selection.best_epochs
        self.log(f"final head: {s.seeds} seed(s) x {epochs} epochs on {self.rows['refit'].height} rows")
        return refit_ensemble(self.make_head(self.tab), self.x["refit"], self.y["refit"], epochs, self.how, s.seed,
                              self.device, self.progress)

    def manifest(self, name: str) -> dict:
        s = self.settings
        timings = {k: round(v, 1) for k, v in self.timings.items()}
        return {
            "kind": "fusion",
            "name": name,
            "features": self.tab.features.to_manifest(),
            "text_model": self.text_model,
            "lexical": {"kind": "tfidf-ridge", **asdict(s.lexical()), "vocabulary_size": len(self.lexical.index),
                        "sublinear_tf": True, "smooth_idf": True, "norm": "l2", "out_of_fold": True},
            "model": {"text_dim": int(self.x["fit"][0].shape[1]), "studio_dim": s.studio_dim,
                      "dropout": s.dropout, "seeds": s.seeds},
            "target": {"mean": self.tab.scaler.mean, "std": self.tab.scaler.std},
            **({"blend": self.blend} if self.blend else {}),
            "training": training_record(
                self.split, asdict(s), epochs=self.selection.best_epochs, final_rows=self.rows["refit"].height,
                embedding_precision=self.text_encoder.precision, **timings, fine_tuning=self.fine_tuning,
                seconds=round(time.perf_counter() - self.started, 1), history=self.selection.history),
            "metrics": {"valid": self.valid_metrics},
            "explain": reference_manifest("fusion"),
            "calibration": self.calibration,
        }

    def write_bundle(self, out: Path, side: Path, manifest: dict, ensemble: SeedEnsemble, force: bool) -> None:
        """The bundle: the heads, the explanation references, the calibration, the lexical view
        and, where it is in the bundle, the encoder and tokenizer saved in ``side``."""
        self.lexical.save(side)
        weights = {HEAD_WEIGHTS["fusion"]: ensemble.state_dict(), REFERENCE_FILE: reference_state(self.x["refit"]),
                   LEXICAL_WEIGHTS_FILE: {k: torch.from_numpy(v) for k, v in self.lexical.state().items()},
                   CALIBRATION_FILE: self.calibration_state, TRAINING_ROWS_FILE: training_rows_state(self.split)}
        extra = {"lexical": side / "lexical"} | (
            {ENCODER_DIR: side / ENCODER_DIR, TOKENIZER_DIR: side / TOKENIZER_DIR} if self.encoder_in_bundle else {})
        write_bundle(out, manifest, weights, extra_dirs=extra, force=force)

    # --- what the phases share ---

    def frozen_encoder(self, path: Path, **kwargs) -> FrozenTextEncoder:
        s = self.settings
        return FrozenTextEncoder(path, pooling=s.pooling, max_length=s.max_length, cache=self.cache,
                                 device=self.device, precision=s.precision, **kwargs)

    def choose_head_epochs(self, text_encoder: FrozenTextEncoder) -> None:
        """The pooled features of every part through ``text_encoder`` (cached), and the head's
        epochs chosen on them."""
        self.text_encoder = text_encoder
        embedded = dict(zip(PARTS, embed_frozen(text_encoder, list(self.rows.values()), self.progress)))
        self.x = {k: (embedded[k], *self.tabular[k]) for k in PARTS}
        self.selection = select_epochs(self.make_head(self.selection_tab), self.x["fit"], self.y["fit"],
                                       self.x["valid"], self.y["valid"], self.how, self.settings.seed,
                                       self.device, self.progress)

    def make_head(self, tab: Tabular) -> Callable[[], FusionHead]:
        """A factory of fresh heads for ``tab``'s vocabularies, on the current text features."""
        s = self.settings
        return partial(FusionHead, self.x["fit"][0].shape[1], *tab.shape(), s.studio_dim, s.dropout)


def train_fusion(
    split: DataSplit,
    out: Path,
    settings: FusionSettings | None = None,
    *,
    resume: bool = False,
    name: str | None = None,
    force: bool = False,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
    on_validated: Callable[[np.ndarray], None] | None = None,
) -> dict:
    """Fit the fusion model and write its bundle to ``out``; return the manifest. An existing
    ``out`` is refused before any work, unless ``force`` and it is a fusion bundle. ``on_validated``
    is given the selection run's scores of ``split.valid``'s rows, as the model ships them."""
    check_out(out, "fusion", force=force)
    trainer = FusionTrainer(split, settings or FusionSettings(), cache=cache, progress=progress, log=log,
                            on_step=on_step, on_validated=on_validated)
    return trainer.train(out, resume=resume, name=name, force=force)
