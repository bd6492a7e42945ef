"""Stage 2 of fusion training: fine-tuning the encoder and the head end to end, with
checkpoints a run can resume from.

AdamW with two learning rates (and optional layer-wise decay), linear warm-up then cosine
decay, MSE, gradient clipping, length-bucketed batches. Checkpoints every
``checkpoint_every`` steps and at each epoch's end into ``.OUT.checkpoint/`` beside the
bundle; Ctrl-C saves one first. An epoch is kept only if it beats stage 1 on validation RMSE.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from anime_udf.bundle import save_state
from anime_udf.errors import AnimeUdfError
from anime_udf.models import FusionNet
from anime_udf.text import length_sorted_batches


class ResumeError(AnimeUdfError, ValueError):
    """A checkpoint cannot be resumed with these settings."""


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
              y: dict[str, np.ndarray], settings, checkpoint: Checkpoint, resume: bool,
              data_fingerprint: str, device: torch.device, std: float, progress: bool,
              log: Callable[[str], None], on_step: Callable[[int], None] | None) -> dict:
    """Stage 2 on the fit rows, as ``settings`` (training.fusion's FusionSettings, recorded in the
    checkpoint: a resumed run must have the same) say. ``net`` ends holding the best state, stage
    1's included ("epoch 0"); returns the run's record (best epoch 0 = fine-tuning did not pay)."""
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
