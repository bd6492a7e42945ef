"""Scoring: a bundle in, float64 scores in [1, 10] out, for any batch of rows."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from anime_udf.bundle import HEAD_WEIGHTS, LEXICAL_WEIGHTS_FILE, BundleError, load_weights, read_manifest
from anime_udf.cache import EmbeddingCache
from anime_udf.explain import GROUPS, Reference, blended_coalitions, coalition_values, explanation, fields
from anime_udf.features import TabularEncoder, clean_text, distinct_values
from anime_udf.columns import SCORE_MAX, SCORE_MIN
from anime_udf.intervals import Calibration, check_levels, scale_features
from anime_udf.lexical import LexicalModel
from anime_udf.models import BaselineNet, Blend, FusionHead, SeedEnsemble
from anime_udf.text import FrozenTextEncoder, text_encoder_dirs



class Rows:
    """A batch of the four inputs. What several models derive from them the same way is derived
    once and kept for the others: the cleaned synopses (for every text encoder and the
    intervals' word count), the sentence embeddings per text encoder (each synopsis hashed,
    read from the cache or encoded), the tabular features per TabularEncoder (the two models
    trained on one catalog encode them alike)."""

    def __init__(self, synopsis: Sequence[Any], genres: Sequence[Any], studio: Sequence[Any],
                 episodes: Sequence[Any]):
        if not (len(genres) == len(studio) == len(episodes) == len(synopsis)):
            raise ValueError("synopsis, genres, studio and episodes must have the same length")
        self.synopsis, self.genres, self.studio, self.episodes = synopsis, genres, studio, episodes
        self._embeddings: dict[str, np.ndarray] = {}  # by encoder id
        self._features: dict[TabularEncoder, tuple[np.ndarray, np.ndarray]] = {}
        self._cleaned: list[str] | None = None

    def __len__(self) -> int:
        return len(self.synopsis)

    def embedding(self, encoder: FrozenTextEncoder) -> np.ndarray:
        """The rows' sentence embeddings by ``encoder``, float32 [n, dim]."""
        if encoder.encoder_id not in self._embeddings:
            self._embeddings[encoder.encoder_id] = sentence_embedding(
                encoder.embed(self.cleaned_synopsis(), already_clean=True))
        return self._embeddings[encoder.encoder_id]

    def cleaned_synopsis(self) -> list[str]:
        """Each row's synopsis as the text encoders see it (``clean_text``), each distinct one cleaned once."""
        if self._cleaned is None:
            values, value_of_row = distinct_values(self.synopsis)
            cleaned = [clean_text(v) for v in values]
            self._cleaned = [cleaned[i] for i in value_of_row]
        return self._cleaned

    def features(self, encoder: TabularEncoder) -> tuple[np.ndarray, np.ndarray]:
        """The rows' (dense features, studio index) by ``encoder`` (``TabularEncoder.encode``)."""
        if encoder not in self._features:
            self._features[encoder] = encoder.encode(self.genres, self.studio, self.episodes)
        return self._features[encoder]


class Scorer:
    """What both kinds share: tabular features, the text encoder (frozen, cached by content
    hash), a seed ensemble of heads, the blend after it, target scaling and clamping."""

    kind: str

    def __init__(self, bundle: Path | str, manifest: dict[str, Any], cache: EmbeddingCache | None = None,
                 device: str | torch.device = "auto", precision: str = "auto"):
        self.path = Path(bundle)
        self.manifest = manifest
        self.name = manifest.get("name", self.path.name)
        self.features = TabularEncoder.from_manifest(manifest["features"])
        self.target_mean = float(manifest["target"]["mean"])
        self.target_std = float(manifest["target"]["std"])
        encoder_dir, tokenizer_dir = text_encoder_dirs(self.path, manifest)
        text = manifest["text_model"]
        self.text_encoder = FrozenTextEncoder(encoder_dir, tokenizer_path=tokenizer_dir, pooling=text["pooling"],
                                              max_length=text["max_length"], cache=cache, device=device,
                                              precision=precision)
        cfg = manifest["model"]
        self.net = SeedEnsemble([self._member(cfg) for _ in range(int(cfg["seeds"]))])
        _load_state(self.net, self.path, HEAD_WEIGHTS[self.kind])
        self.blend = Blend.of(manifest.get("blend"))
        # DuckDB calls UDFs from several threads; one forward pass at a time keeps
        # tokenizers and lazily loaded state safe (torch uses all cores inside a pass).
        self._lock = threading.Lock()
        self._reference: Reference | None = None  # loaded by the first explain()
        self._calibration: Calibration | None = None  # loaded by the first predict_interval()

    def predict(self, synopsis: Sequence[Any], genres: Sequence[Any], studio: Sequence[Any],
                episodes: Sequence[Any]) -> np.ndarray:
        """float64 scores in [1, 10] of a batch of rows, one per row."""
        return self.predict_rows(Rows(synopsis, genres, studio, episodes))

    def predict_rows(self, rows: Rows) -> np.ndarray:
        """``predict`` of a ``Rows``: models that share a text encoder and score the same Rows
        (a rescore chunk) clean, hash and look up each synopsis once."""
        if not len(rows):
            return np.zeros(0, dtype=np.float64)
        return self.score_of(self.standardised(rows)[1])

    def predict_interval(self, synopsis: Sequence[Any], genres: Sequence[Any], studio: Sequence[Any],
                         episodes: Sequence[Any], level: Sequence[Any]) -> dict[str, np.ndarray]:
        """{"lo", "hi"}: float64 bounds in [1, 10] of each row's interval at its ``level`` in (0, 1)
        around its ``predict`` score, computed in the same pass (anime_udf.intervals)."""
        _, lo, hi = self.predict_rows_with_interval(Rows(synopsis, genres, studio, episodes), level)
        return {"lo": lo, "hi": hi}

    def predict_rows_with_interval(self, rows: Rows, level: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score, lo, hi) of each row of a ``Rows``: its ``predict`` score and its interval at its
        ``level``, from one pass (what a rescore run with a level stores)."""
        levels = check_levels(level)
        calibration = self.calibration()
        if not len(rows):
            return np.zeros(0), np.zeros(0), np.zeros(0)
        members, standardised, inputs = self.standardised(rows)
        score = self.score_of(standardised)
        features = scale_features(members, standardised, *rows.features(self.features), rows.cleaned_synopsis(),
                                  lexical_input(inputs))
        return (score, *calibration.bounds(score, features, levels))

    def calibration(self) -> Calibration:
        """The bundle's calibration (loaded once); a bundle without one: NoCalibrationError."""
        if self._calibration is None:
            self._calibration = Calibration.load(self.path, self.manifest)
        return self._calibration

    def standardised(self, rows: Rows) -> tuple[np.ndarray, np.ndarray, tuple[torch.Tensor, ...]]:
        """(each seed's head [seeds, rows], the point after the blend, float64 [rows], the head's
        inputs), all standardised: what a score and its interval are computed from."""
        with self._lock, torch.inference_mode():
            inputs = self.head_inputs(rows)
            members = self.net.member_predictions(*inputs)
            head = members.mean(0).numpy()  # the ensemble's forward
        return members.numpy(), self.blend.apply(head, lexical_input(inputs)), inputs

    def score_of(self, standardised: np.ndarray) -> np.ndarray:
        return np.clip(standardised * self.target_std + self.target_mean, SCORE_MIN, SCORE_MAX)

    def explain(self, synopsis: Sequence[Any], genres: Sequence[Any], studio: Sequence[Any],
                episodes: Sequence[Any]) -> dict[str, np.ndarray]:
        """Exact Shapley values of the input groups (anime_udf.explain): {field: float64 [n]} for
        ``explain.fields(kind)``; base + parts = unclamped, and score is ``predict``'s."""
        if self._reference is None:
            self._reference = Reference.load(self.path, self.manifest, int(self.manifest["model"]["text_dim"]),
                                             self.features.n_tabular)
        groups = GROUPS[self.kind]
        if not len(synopsis):
            return {name: np.zeros(0) for name in fields(self.kind)}
        with self._lock, torch.inference_mode():
            rows = self.head_inputs(Rows(synopsis, genres, studio, episodes))
            values = coalition_values(self.net.members, rows, self._reference, groups)
        values = blended_coalitions(values, self.blend, groups, lexical_input(rows), self._reference)
        return explanation(values, groups, self.target_mean, self.target_std, (SCORE_MIN, SCORE_MAX))

    def head_inputs(self, rows: Rows) -> tuple[torch.Tensor, ...]:
        """The head's inputs (text embedding, dense, studio index[, lexical]): the text encoded
        once, through the cache. Called holding the lock."""
        dense, studio_index = rows.features(self.features)
        emb = rows.embedding(self.text_encoder)
        return tuple(torch.from_numpy(a) for a in (emb, dense, studio_index, *self._extra_inputs(rows.synopsis)))

    def _member(self, cfg: dict[str, Any]) -> torch.nn.Module:
        raise NotImplementedError

    def _extra_inputs(self, synopsis: Sequence[Any]) -> tuple[np.ndarray, ...]:
        return ()


class BaselineScorer(Scorer):
    kind = "baseline"

    def _member(self, cfg):
        return BaselineNet(cfg["text_dim"], self.features.n_tabular, self.features.n_studios,
                           cfg["studio_dim"], cfg["dropout"])


class FusionScorer(Scorer):
    kind = "fusion"

    def __init__(self, bundle, manifest, cache=None, device="auto", precision="auto"):
        super().__init__(bundle, manifest, cache, device, precision)
        try:
            weights = load_weights(self.path, LEXICAL_WEIGHTS_FILE)
            self.lexical = LexicalModel.load(self.path, manifest["lexical"], weights)
        except OSError as exc:
            raise BundleError(f"{self.path / 'lexical'}: cannot load the lexical model: {exc}") from exc
        except ValueError as exc:
            raise BundleError(str(exc)) from exc

    def _member(self, cfg):
        return FusionHead(cfg["text_dim"], self.features.n_tabular, self.features.n_studios,
                          cfg["studio_dim"], cfg["dropout"])

    def _extra_inputs(self, synopsis):
        # Cleaning whitespace changes no token (tokens are runs of word characters), so the raw
        # synopsis (str or NULL) scores as its clean_text would.
        return (self.lexical.predict(synopsis),)


def lexical_input(inputs: tuple[torch.Tensor, ...]) -> np.ndarray | None:
    """The lexical score among the head's inputs (fusion's fourth), or None (the baseline)."""
    return inputs[3].numpy() if len(inputs) > 3 else None


def sentence_embedding(pooled: np.ndarray) -> np.ndarray:
    """The sentence-transformers embedding: mean-pooled and L2-normalised."""
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def _load_state(module: torch.nn.Module, bundle: Path, name: str) -> None:
    state = load_weights(bundle, name)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{bundle / name}: weights do not match the manifest: {exc}") from exc
    module.eval()


def load_scorer(bundle: Path | str, *, cache: EmbeddingCache | None = None, device: str = "auto",
                precision: str = "auto", manifest: dict[str, Any] | None = None) -> Scorer:
    """Load a bundle of either kind, checking every file first (unless its checked
    ``manifest`` is given). ``precision`` is the transformer's: auto, fp32 or bf16."""
    manifest = manifest if manifest is not None else read_manifest(bundle)
    scorer = BaselineScorer if manifest["kind"] == "baseline" else FusionScorer
    return scorer(bundle, manifest, cache if cache is not None else EmbeddingCache(), device, precision)
