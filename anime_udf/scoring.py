"""Scoring: a bundle in, float64 scores in [1, 10] out, for any batch of rows."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from anime_udf.bundle import BundleError, load_weights, read_manifest
from anime_udf.cache import EmbeddingCache
from anime_udf.features import TabularEncoder, clean_text
from anime_udf.models import BaselineNet, FusionHead, FusionNet
from anime_udf.text import FrozenTextEncoder, default_encoder_path, length_sorted_batches, load_tokenizer

SCORE_MIN, SCORE_MAX = 1.0, 10.0


class Scorer:
    """What both kinds share: the manifest, tabular features, target scaling, clamping."""

    kind: str

    def __init__(self, bundle: Path | str, manifest: dict[str, Any]):
        self.path = Path(bundle)
        self.manifest = manifest
        self.name = manifest.get("name", self.path.name)
        self.features = TabularEncoder.from_manifest(manifest["features"])
        self.target_mean = float(manifest["target"]["mean"])
        self.target_std = float(manifest["target"]["std"])
        # DuckDB calls UDFs from several threads; one forward pass at a time keeps
        # tokenizers and lazily loaded state safe (torch uses all cores inside a pass).
        self._lock = threading.Lock()

    def predict(
        self,
        synopsis: Sequence[Any],
        genres: Sequence[Any],
        studio: Sequence[Any],
        episodes: Sequence[Any],
    ) -> np.ndarray:
        n = len(synopsis)
        if not (len(genres) == len(studio) == len(episodes) == n):
            raise ValueError("synopsis, genres, studio and episodes must have the same length")
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        dense, studio_index = self.features.encode(genres, studio, episodes)
        with self._lock, torch.inference_mode():
            standardised = self._forward([clean_text(s) for s in synopsis], dense, studio_index)
        scores = standardised.astype(np.float64) * self.target_std + self.target_mean
        return np.clip(scores, SCORE_MIN, SCORE_MAX)

    def _forward(self, texts: list[str], dense: np.ndarray, studio: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class BaselineScorer(Scorer):
    kind = "baseline"

    def __init__(self, bundle: Path | str, manifest: dict[str, Any], cache: EmbeddingCache | None = None):
        super().__init__(bundle, manifest)
        text = manifest["text_model"]
        self.text_encoder = FrozenTextEncoder(
            default_encoder_path(), pooling=text["pooling"], max_length=text["max_length"], cache=cache
        )
        if self.text_encoder.checksum != text["checksum"]:
            raise BundleError(
                f"{self.path / 'manifest.json'}: trained with text encoder {text['name']} "
                f"({text['checksum'][:19]}…), but the installed one is {self.text_encoder.checksum[:19]}…"
            )
        cfg = manifest["model"]
        self.net = BaselineNet(cfg["text_dim"], self.features.n_tabular, self.features.n_studios,
                               cfg["studio_dim"], cfg["dropout"])
        _load_state(self.net, self.path, "model.safetensors")

    def text_embeddings(self, texts: Sequence[str | None], progress: bool = False) -> np.ndarray:
        return sentence_embedding(self.text_encoder.embed(texts, progress=progress))

    def _forward(self, texts, dense, studio):
        emb = self.text_embeddings(texts)
        return self.net(torch.from_numpy(emb), torch.from_numpy(dense), torch.from_numpy(studio)).numpy()


def sentence_embedding(pooled: np.ndarray) -> np.ndarray:
    """The sentence-transformers embedding: mean-pooled and L2-normalised."""
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


class FusionScorer(Scorer):
    kind = "fusion"

    def __init__(self, bundle: Path | str, manifest: dict[str, Any], batch_size: int = 64):
        super().__init__(bundle, manifest)
        from transformers import AutoConfig, AutoModel

        cfg = manifest["model"]
        self.max_length = int(cfg["max_length"])
        self.batch_size = batch_size
        encoder_dir = self.path / "encoder"
        try:
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(encoder_dir)))
            self.tokenizer = load_tokenizer(self.path / "tokenizer")
        except (OSError, ValueError) as exc:
            raise BundleError(f"{encoder_dir}: cannot load the encoder or tokenizer: {exc}") from exc
        _load_state(encoder, self.path, "encoder/model.safetensors")
        head = FusionHead(encoder.config.hidden_size, self.features.n_tabular, self.features.n_studios,
                          cfg["studio_dim"], cfg["dropout"])
        _load_state(head, self.path, "head.safetensors")
        self.net = FusionNet(encoder, head, cfg["pooling"])

    def _forward(self, texts, dense, studio):
        return fusion_forward(self.net, self.tokenizer, texts, dense, studio, self.max_length, self.batch_size)


def fusion_forward(net: FusionNet, tokenizer, texts: list[str], dense: np.ndarray, studio: np.ndarray,
                   max_length: int, batch_size: int) -> np.ndarray:
    """Standardised fusion predictions, tokenised once and run in length-sorted sub-batches."""
    out = np.zeros(len(texts), dtype=np.float32)
    for rows, batch in length_sorted_batches(tokenizer, texts, max_length, batch_size):
        pred = net(batch["input_ids"], batch["attention_mask"],
                   torch.from_numpy(dense[rows]), torch.from_numpy(studio[rows]))
        out[rows] = pred.float().numpy()
    return out


def _load_state(module: torch.nn.Module, bundle: Path, name: str) -> None:
    state = load_weights(bundle, name)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{bundle / name}: weights do not match the manifest: {exc}") from exc
    module.eval()


def load_scorer(bundle: Path | str, **kwargs) -> Scorer:
    """Load a bundle of either kind, checking every file first."""
    manifest = read_manifest(bundle)
    if manifest["kind"] == "baseline":
        kwargs.setdefault("cache", EmbeddingCache())
        return BaselineScorer(bundle, manifest, **kwargs)
    return FusionScorer(bundle, manifest, **kwargs)
