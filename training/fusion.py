"""Fusion: three views of an anime fused by one head -- the synopsis through a transformer
encoder, the tabular fields through an MLP, and the synopsis's words through a TF-IDF
ridge (the lexical view: rare words, names and franchise terms the sentence embedding
blurs).

Every choice below is a setting recorded in the bundle:
1. the lexical view is fitted with scikit-learn; the head trains on its out-of-fold
   scores (training/lexical.py), the bundle keeps a model fitted on every row;
2. stage 1 fits the head on the frozen encoder's pooled features (cached by content
   hash, shared with the baseline) and chooses its epochs on the validation rows;
3. stage 2 (``epochs`` > 0) fine-tunes encoder and head end to end: AdamW with two
   learning rates (and optional layer-wise decay), linear warm-up then cosine decay,
   MSE, gradient clipping, length-bucketed batches. An epoch is kept only if it beats
   stage 1 on validation RMSE; on a 2-core CPU none has, so the default is 0;
4. the final head is a seed ensemble refitted on every training row, on the features
   of the chosen encoder, for the chosen number of epochs.

Stage 2 checkpoints every ``checkpoint_every`` steps and at each epoch's end into
``.OUT.checkpoint/`` beside the bundle; ``resume=True`` continues from there (stages 1
and the lexical fits are deterministic and quick, so they are rerun). Ctrl-C saves a
checkpoint first. The bundle is written (atomically) only at the end.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from anime_udf.bundle import POOLINGS, check_out, save_state, write_bundle
from anime_udf.cache import EmbeddingCache
from anime_udf.catalog import fingerprint
from anime_udf.devices import resolve_device
from anime_udf.explain import REFERENCE_FILE, reference_manifest, reference_state
from anime_udf.features import clean_text
from anime_udf.lexical import WEIGHTS_FILE as LEXICAL_WEIGHTS
from anime_udf.lexical import LexicalSettings
from anime_udf.metrics import compute_metrics
from anime_udf.models import FusionHead, FusionNet
from anime_udf.text import (DEFAULT_ENCODER_NAME, FrozenTextEncoder, default_encoder_path,
                            length_sorted_batches, load_encoder, load_tokenizer, weights_checksum)
from training.common import (DataSplit, HeadTraining, Tabular, embed_frozen, fit_ensemble, refit_ensemble,
                             seed_everything, select_epochs, training_record)
from training.lexical import fit_lexical, out_of_fold


class ResumeError(ValueError):
    """A checkpoint cannot be resumed with these settings."""


@dataclass
class FusionSettings:
    backbone: str = ""  # local Hugging Face encoder directory; "" = the packaged all-MiniLM-L6-v2
    pooling: str = "mean"
    max_length: int = 256
    epochs: int = 0  # end-to-end fine-tuning epochs: none paid on a CPU (README); a GPU setting to sweep
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


class Checkpoint:
    """``.OUT.checkpoint/``: model, optimizer, scheduler, RNG and progress, replaced atomically."""

    def __init__(self, out: Path):
        out = Path(out).resolve()
        self.dir = out.parent / f".{out.name}.checkpoint"  # hidden: not listed as a bundle

    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def save(self, net: nn.Module, optimizer, scheduler, state: dict, best: dict | None) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{self.dir.name}.", dir=self.dir.parent))
        opt = optimizer.state_dict()
        tensors = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
        tensors["rng"] = torch.get_rng_state()
        save_state(net.state_dict(), tmp / "model.safetensors")
        save_state(tensors, tmp / "optimizer.safetensors")
        if best is not None:
            save_state(best, tmp / "best.safetensors")
        elif (self.dir / "best.safetensors").exists():
            shutil.copy2(self.dir / "best.safetensors", tmp / "best.safetensors")
        extra = {"param_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps({**state, **extra}, indent=1))
        old = self.dir.with_name(self.dir.name + ".old")
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, net: nn.Module, optimizer, scheduler) -> dict:
        state = json.loads((self.dir / "state.json").read_text())
        net.load_state_dict(load_file(str(self.dir / "model.safetensors")))
        tensors = load_file(str(self.dir / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("rng"))
        opt_state: dict = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            opt_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
        scheduler.load_state_dict(state.pop("scheduler"))
        return state

    def best(self) -> dict[str, torch.Tensor] | None:
        path = self.dir / "best.safetensors"
        return load_file(str(path)) if path.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Length-bucketed batches, a pure function of (seed, epoch) so a resumed run replays the same order:
    shuffle, sort by length within windows of 50 batches, then shuffle the batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def encoder_param_groups(encoder: nn.Module, lr: float, decay: float) -> list[dict]:
    """Layer-wise learning rates: the embeddings learn slowest, the top layer at ``lr``
    (BERT's ``encoder.layer.K.``, DistilBERT's ``transformer.layer.K.``)."""
    def depth(name: str) -> int:
        found = re.search(r"\.layer\.(\d+)\.", f".{name}")
        return int(found.group(1)) + 1 if found else (0 if "embeddings" in name else -1)

    params = list(encoder.named_parameters())
    top = max(depth(n) for n, _ in params) + 1
    groups: dict[int, list] = {}
    for name, param in params:
        d = depth(name)
        groups.setdefault(top if d < 0 else d, []).append(param)  # above the layers (pooler): full rate
    return [{"params": ps, "lr": lr * decay ** (top - d)} for d, ps in sorted(groups.items())]


def tuned_predictions(net: FusionNet, tokenizer, texts: list[str], dense: np.ndarray, studio: np.ndarray,
                      lexical: np.ndarray, max_length: int, device: torch.device) -> np.ndarray:
    """Standardised predictions of the end-to-end network, in length-sorted batches."""
    out = np.zeros(len(texts), dtype=np.float32)
    net.eval()
    with torch.inference_mode():
        for rows, batch in length_sorted_batches(tokenizer, texts, max_length, 64):
            extra = (torch.from_numpy(a[rows]).to(device) for a in (dense, studio, lexical))
            out[rows] = net(batch["input_ids"].to(device), batch["attention_mask"].to(device), *extra).float().cpu().numpy()
    return out


def fine_tune(net: FusionNet, tokenizer, texts: dict[str, list[str]], inputs: dict[str, tuple],
              y: dict[str, np.ndarray], settings: FusionSettings, checkpoint: Checkpoint, resume: bool,
              data_fingerprint: str, device: torch.device, std: float, progress: bool,
              log: Callable[[str], None], on_step: Callable[[int], None] | None) -> dict:
    """Stage 2 on the fit rows. ``net`` ends holding the best state, stage 1's included
    ("epoch 0"); returns the run's record (best epoch 0 = fine-tuning did not pay)."""
    encoder, head = net.encoder, net.head
    tr_dense, tr_studio, tr_lex = inputs["fit"]
    token_ids = tokenizer(texts["fit"], truncation=True, max_length=settings.max_length)["input_ids"]
    lengths = np.array([len(x) for x in token_ids])
    steps_per_epoch = math.ceil(len(token_ids) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(
        [*encoder_param_groups(encoder, settings.lr_encoder, settings.layer_decay),
         {"params": head.parameters(), "lr": settings.lr_head}],
        weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, max(1, round(total_steps * settings.warmup_fraction))))

    def validate() -> float:
        pred = tuned_predictions(net, tokenizer, texts["valid"], *inputs["valid"], settings.max_length, device)
        return float(np.sqrt(np.mean((pred - y["valid"]) ** 2))) * std

    state = {"step": 0, "best_rmse": math.inf, "best_epoch": 0, "history": [], "settings": asdict(settings),
             "data": data_fingerprint}
    if resume:
        saved = json.loads((checkpoint.dir / "state.json").read_text())
        for key, what in (("settings", "settings"), ("data", "training data (--data, --valid, split)")):
            if saved.get(key) != state[key]:
                raise ResumeError(f"{checkpoint.dir}: was made with other {what}; rerun without --resume "
                                  f"or with the same {what}")
        state = checkpoint.load(net, optimizer, scheduler)
        best_state = checkpoint.best()
        log(f"resuming from {checkpoint.dir} at step {state['step']} of {total_steps}")
    else:
        # Stage 1's model is the first candidate ("epoch 0"): fine-tuning must beat it to be kept.
        state["best_rmse"] = state["stage1_valid_rmse"] = validate()
        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        checkpoint.save(net, optimizer, scheduler, state, best=best_state)

    bar = tqdm(total=total_steps, initial=state["step"], desc="fine-tuning", unit="step", disable=not progress)
    loss_sum, loss_n = 0.0, 0
    try:
        while len(state["history"]) < settings.epochs:
            epoch = len(state["history"])
            offset = state["step"] - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
            batches = epoch_batches(lengths, settings.batch_size, settings.seed, epoch)
            net.train()
            for rows in batches[offset:]:
                batch = tokenizer.pad({"input_ids": [token_ids[i] for i in rows]}, return_tensors="pt")
                extra = (torch.from_numpy(a[rows]).to(device) for a in (tr_dense, tr_studio, tr_lex))
                pred = net(batch["input_ids"].to(device), batch["attention_mask"].to(device), *extra)
                loss = nn.functional.mse_loss(pred, torch.from_numpy(y["fit"][rows]).to(device))
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), settings.grad_clip)
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / loss_n:.4f}")
                if on_step:
                    on_step(state["step"])
                if state["step"] % settings.checkpoint_every == 0 and state["step"] % steps_per_epoch:
                    checkpoint.save(net, optimizer, scheduler, state, best=None)
            rmse = validate()
            state["history"].append({"epoch": epoch + 1, "step": state["step"], "valid_rmse": rmse,
                                     "train_mse_std": loss_sum / max(loss_n, 1)})
            loss_sum, loss_n = 0.0, 0
            improved = rmse < state["best_rmse"]
            if improved:
                state["best_rmse"], state["best_epoch"] = rmse, epoch + 1
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            log(f"epoch {epoch + 1}/{settings.epochs}: validation RMSE {rmse:.4f}"
                + (" (best so far)" if improved else ""))
            checkpoint.save(net, optimizer, scheduler, state, best=best_state if improved else None)
    except KeyboardInterrupt:
        checkpoint.save(net, optimizer, scheduler, state, best=None)
        bar.close()
        raise
    bar.close()
    net.load_state_dict(best_state)
    net.eval()
    return {k: state[k] for k in ("step", "best_epoch", "best_rmse", "history") if k in state} | {
        "stage1_valid_rmse": state.get("stage1_valid_rmse")}


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
) -> dict:
    """Fit the fusion model and write its bundle to ``out``; return the manifest. An existing
    ``out`` is refused before any work, unless ``force`` and it is a fusion bundle."""
    check_out(out, "fusion", force=force)
    settings = settings or FusionSettings()
    if settings.pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {settings.pooling!r}")
    device = resolve_device(settings.device)
    cache = cache if cache is not None else EmbeddingCache()
    seed_everything(settings.seed)
    started = time.perf_counter()
    backbone = Path(settings.backbone) if settings.backbone else default_encoder_path()
    backbone_name = DEFAULT_ENCODER_NAME if not settings.backbone else backbone.name
    checkpoint = Checkpoint(out)
    if resume and not checkpoint.exists():
        log(f"no checkpoint at {checkpoint.dir}; starting from the beginning")
        resume = False

    parts = {"fit": split.fit, "valid": split.valid, "refit": split.refit if settings.refit else split.fit}
    # The selection run knows only its own rows' studios and genres (as baseline.py).
    sel_tab = Tabular.fit(parts["fit"], settings.min_studio_count)
    tab = Tabular.fit(parts["refit"], settings.min_studio_count)
    tabs = {"fit": sel_tab, "valid": sel_tab, "refit": tab}
    texts = {k: [clean_text(t) for t in df["synopsis"].to_list()] for k, df in parts.items()}
    y = {k: tabs[k].target(df) for k, df in parts.items()}

    lexical_settings = settings.lexical()
    log(f"lexical view: TF-IDF 1-{settings.lexical_ngram_max}-grams + ridge, "
        f"{settings.lexical_folds}-fold out-of-fold scores for the rows the head trains on")
    lexical_fit = fit_lexical(texts["fit"], y["fit"], lexical_settings)
    lex = {"fit": out_of_fold(texts["fit"], y["fit"], lexical_settings, settings.seed),
           "valid": lexical_fit.predict(texts["valid"])}
    if settings.refit:
        lexical = fit_lexical(texts["refit"], y["refit"], lexical_settings)
        lex["refit"] = out_of_fold(texts["refit"], y["refit"], lexical_settings, settings.seed)
    else:
        lexical, lex["refit"] = lexical_fit, lex["fit"]
    tabular = {k: (*tabs[k].inputs(df), lex[k]) for k, df in parts.items()}  # (dense, studio, lexical)
    lexical_seconds = time.perf_counter() - started

    how = settings.head_training()

    def select_head(text_encoder: FrozenTextEncoder):
        """Pooled features of every part, and the head's epochs chosen on them; returns
        the head's factory for a Tabular's vocabularies, the inputs and the selection."""
        embedded = dict(zip(parts, embed_frozen(text_encoder, list(parts.values()), progress)))

        def make_head(t: Tabular):
            return partial(FusionHead, embedded["fit"].shape[1], *t.shape(), settings.studio_dim, settings.dropout)

        x = {k: (embedded[k], *tabular[k]) for k in parts}
        selection = select_epochs(make_head(sel_tab), x["fit"], y["fit"], x["valid"], y["valid"], how, settings.seed,
                                  device, progress)
        return make_head, x, selection

    log(f"stage 1: {backbone_name} frozen, pooled features (cached) for the head; "
        f"selection on {split.fit.height} rows, validation on {split.valid.height}")
    frozen = FrozenTextEncoder(backbone, pooling=settings.pooling, max_length=settings.max_length, cache=cache,
                               device=device, precision=settings.precision)
    make_head, x, selection = select_head(frozen)
    stage1_seconds = time.perf_counter() - started
    best_rmse = min(h["valid_rmse_std"] for h in selection.history) * sel_tab.scaler.std
    log(f"stage 1 done: the head's best schedule is {selection.best_epochs} epochs, validation RMSE {best_rmse:.4f}")

    tokenizer = load_tokenizer(backbone)
    encoder = load_encoder(backbone, dropout=settings.encoder_dropout)
    fine_tuning = None
    with tempfile.TemporaryDirectory() as side:
        side = Path(side)
        if settings.epochs > 0:
            # One head, trained as chosen on the fit rows, to fine-tune the encoder with.
            head = fit_ensemble(make_head(sel_tab), x["fit"], y["fit"], selection.best_epochs, replace(how, seeds=1),
                                settings.seed, device).members[0]
            net = FusionNet(encoder, head, settings.pooling).to(device)
            data = f"{fingerprint(split.fit)} {fingerprint(split.valid)}"
            fine_tuning = fine_tune(net, tokenizer, texts, {k: tabular[k] for k in ("fit", "valid")}, y, settings,
                                    checkpoint, resume, data, device, sel_tab.scaler.std, progress, log, on_step)
            net.to("cpu")
        tuned = bool(fine_tuning and fine_tuning["best_epoch"] > 0)
        in_bundle = tuned or bool(settings.backbone)  # else: the packaged encoder, referenced by checksum
        if in_bundle:
            encoder.save_pretrained(side / "encoder", safe_serialization=True)
            tokenizer.save_pretrained(str(side / "tokenizer"))
        if tuned:  # the tuned encoder's embeddings are cached under its own checksum
            log(f"fine-tuning won (epoch {fine_tuning['best_epoch']}): choosing the head's epochs on its features")
            frozen = FrozenTextEncoder(side / "encoder", tokenizer_path=side / "tokenizer",
                                       pooling=settings.pooling, max_length=settings.max_length, cache=cache,
                                       device=device, precision=settings.precision)
            make_head, x, selection = select_head(frozen)
        metrics = compute_metrics(split.valid["score"].to_numpy(), sel_tab.scaler.unscale(selection.valid_predictions))
        log(f"final head: {settings.seeds} seed(s) x {selection.best_epochs} epochs on {parts['refit'].height} rows")
        ensemble = refit_ensemble(make_head(tab), x["refit"], y["refit"], selection.best_epochs, how, settings.seed,
                                  device, progress)

        checksum = weights_checksum(str(side / "encoder")) if in_bundle else frozen.checksum
        text_model = {"name": backbone_name, "checksum": checksum, "in_bundle": in_bundle,
                      "base_checksum": weights_checksum(str(backbone)), "architecture": encoder.config.model_type,
                      "fine_tuned": tuned, "pooling": settings.pooling, "max_length": settings.max_length,
                      "normalize": True}
        manifest = {
            "kind": "fusion",
            "name": name or Path(out).name,
            "features": tab.features.to_manifest(),
            "text_model": text_model,
            "lexical": {"kind": "tfidf-ridge", **asdict(lexical_settings), "vocabulary_size": len(lexical.index),
                        "sublinear_tf": True, "smooth_idf": True, "norm": "l2", "out_of_fold": True},
            "model": {"text_dim": int(x["fit"][0].shape[1]), "studio_dim": settings.studio_dim,
                      "dropout": settings.dropout, "seeds": settings.seeds},
            "target": {"mean": tab.scaler.mean, "std": tab.scaler.std},
            "training": training_record(
                split, asdict(settings), epochs=selection.best_epochs, final_rows=parts["refit"].height,
                embedding_precision=frozen.precision, lexical_seconds=round(lexical_seconds, 1), stage1_seconds=round(stage1_seconds, 1),
                fine_tuning=fine_tuning, seconds=round(time.perf_counter() - started, 1), history=selection.history),
            # The selection run's ensemble on rows it never trained on (the refitted final model has seen them).
            "metrics": {"valid": metrics},
            "explain": reference_manifest("fusion"),
        }
        lexical.save(side)
        weights = {"head.safetensors": ensemble.state_dict(), REFERENCE_FILE: reference_state(x["refit"]),
                   LEXICAL_WEIGHTS: {k: torch.from_numpy(v) for k, v in lexical.state().items()}}
        extra = {"lexical": side / "lexical"} | (
            {"encoder": side / "encoder", "tokenizer": side / "tokenizer"} if in_bundle else {})
        write_bundle(out, manifest, weights, extra_dirs=extra, force=force)
    checkpoint.remove()
    return manifest
