"""Fusion: a transformer encoder fine-tuned end to end + tabular branch.

Two stages, both recorded as settings in the bundle:
1. the head is fitted on the frozen encoder's pooled features (cached by content
   hash, so this is quick), which gives the encoder a sensible head to learn with;
2. encoder and head are fine-tuned together: AdamW with two learning rates,
   linear warm-up then cosine decay, MSE on the standardised score, gradient
   clipping, length-bucketed batches. The model with the best validation RMSE is
   kept, stage 1's included: fine-tuning has to beat it.

Stage 2 checkpoints every ``checkpoint_every`` steps and at each epoch's end into
``.OUT.checkpoint/`` beside the bundle; ``resume=True`` continues from there. Ctrl-C saves a
checkpoint first. The bundle is written (atomically) only at the end.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from anime_udf.bundle import save_state, write_bundle
from anime_udf.cache import EmbeddingCache
from anime_udf.features import clean_text
from anime_udf.metrics import compute_metrics
from anime_udf.models import FusionHead, FusionNet
from anime_udf.scoring import fusion_forward
from anime_udf.text import (DEFAULT_ENCODER_NAME, POOLINGS, FrozenTextEncoder, default_encoder_path,
                            load_encoder, load_tokenizer, weights_checksum)
from training.common import TabularSplit, fit_on_features, seed_everything, training_record


class ResumeError(ValueError):
    """A checkpoint cannot be resumed with these settings."""


@dataclass
class FusionSettings:
    backbone: str = ""  # local Hugging Face encoder directory; "" = the packaged all-MiniLM-L6-v2
    pooling: str = "mean"
    max_length: int = 256
    epochs: int = 3  # end-to-end fine-tuning epochs
    batch_size: int = 32
    lr_encoder: float = 1e-5
    lr_head: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    grad_clip: float = 1.0
    head_epochs: int = 30  # stage 1: the head on frozen pooled features
    head_lr: float = 1e-3
    dropout: float = 0.4  # in the head
    # Dropout inside the encoder while fine-tuning a regressor shifts its activations
    # between training and inference; off by default (it also scored better).
    encoder_dropout: float = 0.0
    studio_dim: int = 16
    min_studio_count: int = 2
    checkpoint_every: int = 100
    seed: int = 42


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


def train_fusion(
    train: pl.DataFrame,
    valid: pl.DataFrame,
    out: Path,
    settings: FusionSettings | None = None,
    *,
    resume: bool = False,
    name: str | None = None,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Fit the fusion model and write its bundle to ``out``; return the manifest."""
    settings = settings or FusionSettings()
    if settings.pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {settings.pooling!r}")
    seed_everything(settings.seed)
    started = time.perf_counter()
    backbone = Path(settings.backbone) if settings.backbone else default_encoder_path()
    backbone_name = DEFAULT_ENCODER_NAME if not settings.backbone else backbone.name
    tokenizer = load_tokenizer(backbone)
    encoder = load_encoder(backbone, dropout=settings.encoder_dropout)
    checkpoint = Checkpoint(out)
    if resume and not checkpoint.exists():
        log(f"no checkpoint at {checkpoint.dir}; starting from the beginning")
        resume = False

    tab = TabularSplit.fit(train, valid, settings.min_studio_count)
    features, scaler, y_train, y_valid = tab.features, tab.scaler, tab.y_train, tab.y_valid
    (tr_dense, tr_studio), (va_dense, va_studio) = tab.train, tab.valid
    head = FusionHead(encoder.config.hidden_size, features.n_tabular, features.n_studios,
                      settings.studio_dim, settings.dropout)
    net = FusionNet(encoder, head, settings.pooling)

    if not resume:  # stage 1: the head on frozen features
        frozen = FrozenTextEncoder(backbone, pooling=settings.pooling, max_length=settings.max_length,
                                   cache=cache if cache is not None else EmbeddingCache())
        log(f"stage 1: pooled {backbone_name} features for {train.height + valid.height} synopses (cached)")
        pooled = frozen.embed(train["synopsis"].to_list() + valid["synopsis"].to_list(), progress=progress)
        fit_on_features(head, (pooled[: train.height], tr_dense, tr_studio), y_train,
                        (pooled[train.height :], va_dense, va_studio), y_valid,
                        epochs=settings.head_epochs, batch_size=64, lr=settings.head_lr,
                        weight_decay=settings.weight_decay, seed=settings.seed, progress=progress)
    stage1_seconds = time.perf_counter() - started

    # Stage 2: everything, end to end.
    train_texts = [clean_text(t) for t in train["synopsis"].to_list()]
    valid_texts = [clean_text(t) for t in valid["synopsis"].to_list()]
    token_ids = tokenizer(train_texts, truncation=True, max_length=settings.max_length)["input_ids"]
    lengths = np.array([len(x) for x in token_ids])
    steps_per_epoch = math.ceil(len(token_ids) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(
        [{"params": encoder.parameters(), "lr": settings.lr_encoder},
         {"params": head.parameters(), "lr": settings.lr_head}],
        weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, max(1, round(total_steps * settings.warmup_fraction))))

    state = {"step": 0, "best_rmse": math.inf, "best_epoch": 0, "history": [], "settings": asdict(settings)}
    best_state: dict | None = None
    if resume:
        if json.loads((checkpoint.dir / "state.json").read_text())["settings"] != asdict(settings):
            raise ResumeError(f"{checkpoint.dir}: was made with other settings; rerun without --resume "
                             "or with the same settings")
        state = checkpoint.load(net, optimizer, scheduler)
        best_state = checkpoint.best()
        log(f"resuming from {checkpoint.dir} at step {state['step']} of {total_steps}")

    def validate() -> float:
        net.eval()
        with torch.inference_mode():
            pred = fusion_forward(net, tokenizer, valid_texts, va_dense, va_studio, settings.max_length, 64)
        return float(np.sqrt(np.mean((pred - y_valid) ** 2)))

    if not resume:
        # Stage 1's model is the first candidate ("epoch 0"): fine-tuning must beat it to be kept.
        state["best_rmse"] = state["stage1_valid_rmse"] = validate() * scaler.std
        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        log(f"stage 1 done: validation RMSE {state['stage1_valid_rmse']:.4f}")
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
                pred = net(batch["input_ids"], batch["attention_mask"],
                           torch.from_numpy(tr_dense[rows]), torch.from_numpy(tr_studio[rows]))
                loss = nn.functional.mse_loss(pred, torch.from_numpy(y_train[rows]))
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
            rmse = validate() * scaler.std
            state["history"].append({"epoch": epoch + 1, "step": state["step"], "valid_rmse": rmse,
                                     "train_mse_std": loss_sum / max(loss_n, 1),
                                     "elapsed_s": round(time.perf_counter() - started, 1)})
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
    with torch.inference_mode():
        pred = fusion_forward(net, tokenizer, valid_texts, va_dense, va_studio, settings.max_length, 64)
    metrics = compute_metrics(valid["score"].to_numpy(), scaler.unscale(pred))
    manifest = {
        "kind": "fusion",
        "name": name or Path(out).name,
        "features": features.to_manifest(),
        "text_model": {"name": backbone_name, "base_checksum": weights_checksum(str(backbone)),
                       "architecture": encoder.config.model_type},
        "model": {"pooling": settings.pooling, "max_length": settings.max_length,
                  "studio_dim": settings.studio_dim, "dropout": settings.dropout},
        "target": {"mean": scaler.mean, "std": scaler.std},
        "training": training_record(
            train, valid, asdict(settings), best_epoch=state["best_epoch"], steps=state["step"],
            stage1_valid_rmse=state.get("stage1_valid_rmse"), stage1_seconds=round(stage1_seconds, 1),
            seconds=round(time.perf_counter() - started, 1), history=state["history"]),
        "metrics": {"valid": metrics},
    }
    with tempfile.TemporaryDirectory() as side:
        encoder.config.save_pretrained(Path(side) / "encoder")
        tokenizer.save_pretrained(str(Path(side) / "tokenizer"))
        write_bundle(out, manifest,
                     {"head.safetensors": head.state_dict(), "encoder/model.safetensors": encoder.state_dict()},
                     extra_dirs={"encoder": Path(side) / "encoder", "tokenizer": Path(side) / "tokenizer"})
    checkpoint.remove()
    return manifest
