"""Why a score: exact Shapley values of a model's input groups (``explain_score``,
``explain_score_fusion``).

The groups are a model's inputs as an analyst names them: ``synopsis`` (the text
embedding), ``genres``, ``studio``, ``episodes`` and, for fusion, ``lexical`` (the TF-IDF
ridge score of the synopsis, apart from the encoder's share). A group is *absent* when it
holds its reference, stored in the bundle at training time (``REFERENCE_FILE``):

- synopsis: the mean text embedding of the rows the model was fitted on;
- genres: their mean genre multi-hot (each genre's share of the titles);
- episodes: their mean scaled log episode count (0) and share of missing counts;
- studio: the unknown studio (a studio the model never saw, or NULL);
- lexical: the mean lexical score the head was fitted on.

With 4 or 5 groups every coalition (16 or 32) is evaluated: the Shapley values are exact.
The blend after the head (``anime_udf.models.Blend``) is linear: each coalition's value is
blended as the score is, with the lexical score the row's where the lexical group is present
and its reference where it is absent. The head's parts are scaled by the blend's head weight,
and the lexical part also holds the lexical score's direct share.

Text is encoded once (by the scorer, through its embedding cache); the head's first layer is
linear, so each group's share of it is computed once (for the row and for the reference), and a
coalition's first-layer output is the reference's plus the shares of its groups. Only the layers
after it run per coalition.

torch is imported where tensors are made: registering the SQL functions (``fields``,
``arrow_struct``) stays light, as ``anime_udf.udf`` promises.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import factorial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

from anime_udf.bundle import REFERENCE_FILE, BundleError, load_weights, shape_mismatch
from anime_udf.columns import EPISODES, GENRES, INPUT_COLUMNS, STUDIO, SYNOPSIS
from anime_udf.features import EPISODE_COLUMNS, GENRE_COLUMNS

if TYPE_CHECKING:
    import torch

    from anime_udf.models import Blend

GROUPS = {"baseline": INPUT_COLUMNS, "fusion": (*INPUT_COLUMNS, "lexical")}
# Which head input (text, dense, studio index, lexical) and which of its columns each group is.
GROUP_INPUTS = {SYNOPSIS: (0, slice(None)), GENRES: (1, GENRE_COLUMNS), STUDIO: (2, slice(None)),
                EPISODES: (1, EPISODE_COLUMNS), "lexical": (3, slice(None))}
ROWS_PER_PASS = 256  # rows x coalitions x 256 hidden units a pass: 8 MB for fusion
# References are means of unit-length text embeddings, of 0/1 flags and standardised episode
# counts, and of standardised lexical scores: within about 1. Far larger values are damage: the
# first layer's float32 sums lose the rows' share to rounding (measured: parts off predict_score
# by 1e-6 at 10, 1e-5 at 100, 0.08 at 1e6).
REFERENCE_BOUND = 10.0


def fields(kind: str) -> tuple[str, ...]:
    """The explanation's fields, in order: base, one part per group, unclamped, score."""
    return ("base", *GROUPS[kind], "unclamped", "score")


def arrow_struct(explained: dict[str, np.ndarray]) -> pa.StructArray:
    """An explanation as the SQL functions return it: one STRUCT of DOUBLEs a row."""
    return pa.StructArray.from_arrays([pa.array(v, type=pa.float64()) for v in explained.values()],
                                      names=list(explained))


def reference_state(inputs: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """What a trainer stores in ``REFERENCE_FILE``, from the head's inputs (text, dense, studio
    index[, lexical]) of the rows the final model is fitted on."""
    import torch

    text, dense, _studio, *lexical = inputs  # the studio's reference is the unknown studio: nothing to store
    state = {"text": np.mean(text, axis=0), "dense": np.mean(dense, axis=0)}
    if lexical:
        state["lexical"] = np.mean(lexical[0], keepdims=True)
    return {name: torch.from_numpy(np.asarray(v, dtype=np.float32)) for name, v in state.items()}


def reference_manifest(kind: str) -> dict[str, Any]:
    """The manifest's ``explain`` entry."""
    return {"reference": REFERENCE_FILE, "groups": list(GROUPS[kind])}


def has_references(manifest: dict[str, Any]) -> bool:
    """Whether a bundle can explain its scores (bundles trained before references were stored cannot)."""
    return "explain" in manifest


@dataclass(frozen=True)
class Reference:
    """Each group's "absent" value, as the head takes it: text embedding [text_dim], dense
    features [n_dense], lexical score [1] (fusion); the studio's is the unknown studio."""

    text: torch.Tensor
    dense: torch.Tensor
    lexical: torch.Tensor | None = None

    @classmethod
    def load(cls, bundle: Path | str, manifest: dict[str, Any], text_dim: int, n_dense: int) -> "Reference":
        """A bundle's references, checked against its model; a bundle trained before they were
        stored is an error that says to retrain."""
        path = Path(bundle) / REFERENCE_FILE
        if not has_references(manifest):
            raise BundleError(f"{bundle}: holds no explanation references (it was trained before anime-udf "
                              f"could explain scores); retrain the model to explain its scores")
        state = load_weights(bundle, REFERENCE_FILE)
        expected = {"text": (text_dim,), "dense": (n_dense,)} | ({"lexical": (1,)} if manifest["kind"] == "fusion"
                                                                 else {})
        bad = shape_mismatch(state, expected) or unlike_references(state, expected)
        if bad:
            raise BundleError(f"{path}: {bad}")
        return cls(state["text"], state["dense"], state.get("lexical"))

    def inputs(self, n: int) -> list[torch.Tensor]:
        """The head's inputs for ``n`` rows of references."""
        import torch

        inputs = [self.text.expand(n, -1), self.dense.expand(n, -1), torch.zeros(n, dtype=torch.int64)]
        return inputs + ([self.lexical.expand(n)] if self.lexical is not None else [])


def unlike_references(state: dict[str, torch.Tensor], names: Sequence[str]) -> str | None:
    """What is wrong with the first of ``names`` that is not float32, as the heads are, or holds
    a value beyond ``REFERENCE_BOUND``; None when all are fine."""
    import torch

    for name in names:
        tensor = state[name]
        if tensor.dtype != torch.float32:
            return f"{name} is {str(tensor.dtype).removeprefix('torch.')}; expected float32"
        farthest = tensor.flatten()[tensor.abs().argmax()].item()
        if abs(farthest) > REFERENCE_BOUND:
            return f"{name} holds {farthest:.3g}; a reference is a mean of features, within ±{REFERENCE_BOUND:g}"
    return None


def shapley_weights(k: int) -> np.ndarray:
    """[2**k, k]: values of the coalitions (bit i of a coalition's index: group i present) times
    this matrix are the Shapley values, sum over S without i of |S|!(k-|S|-1)!/k! (v(S+i) - v(S))."""
    def weight(size: int) -> float:
        return factorial(size) * factorial(k - size - 1) / factorial(k)

    masks = coalition_masks(k)
    matrix = np.zeros(masks.shape)
    for s, members in enumerate(masks):
        size = int(members.sum())
        for i, present in enumerate(members):
            # S holding i adds v(S) as v(S' + i), S' = S - i; S without i subtracts v(S)
            matrix[s, i] = weight(size - 1) if present else -weight(size)
    return matrix


def coalition_masks(k: int) -> np.ndarray:
    """[2**k, k] 0/1: row S holds the groups of coalition S."""
    return (np.arange(2 ** k)[:, None] >> np.arange(k)) & 1


def coalition_values(members: Sequence[torch.nn.Module], rows: Sequence[torch.Tensor], reference: Reference,
                     groups: Sequence[str]) -> np.ndarray:
    """[n, 2**k] float64: the ensemble's standardised prediction for every row and coalition of
    ``groups`` (those present from ``rows``, the others at their reference)."""
    import torch

    n = len(rows[0])
    masks = torch.from_numpy(coalition_masks(len(groups))).float()
    values = np.zeros((n, len(masks)))
    one = reference.inputs(1)
    # Each member's first layer at the reference, and each group's share of it: once per member.
    at_reference = [(member.first_layer(*one), [member.first_layer_share(GROUP_INPUTS[g][0], *one) for g in groups])
                    for member in members]
    for start in range(0, n, ROWS_PER_PASS):
        chunk = [x[start:start + ROWS_PER_PASS] for x in rows]
        base = reference.inputs(len(chunk[0]))
        mixed = [with_group(base, chunk, g) for g in groups]  # once per chunk, for every member
        for member, (hidden_reference, reference_shares) in zip(members, at_reference):
            # A group changes one input: only that input's share of the first layer moves.
            deltas = torch.stack([member.first_layer_share(GROUP_INPUTS[g][0], *inputs) - share
                                  for g, inputs, share in zip(groups, mixed, reference_shares)])  # [k, rows, hidden]
            hidden = hidden_reference + torch.einsum("sk,knh->snh", masks, deltas)
            values[start:start + len(chunk[0])] += member.after_first_layer(hidden).T.double().numpy()
    return values / len(members)


def blended_coalitions(values: np.ndarray, blend: Blend, groups: Sequence[str], lexical: np.ndarray | None,
                       reference: Reference) -> np.ndarray:
    """Coalition values [n, 2**k] of the head -> of the model: ``blend`` applied to each, with
    the lexical score (fusion) the row's in coalitions holding the lexical group, else its reference."""
    if lexical is None:
        return blend.apply(values)
    present = coalition_masks(len(groups))[:, groups.index("lexical")].astype(bool)
    return blend.apply(values, np.where(present, lexical[:, None], reference.lexical.item()))


def with_group(reference: list[torch.Tensor], rows: Sequence[torch.Tensor], group: str) -> list[torch.Tensor]:
    """The reference inputs with ``group`` taken from ``rows``."""
    index, columns = GROUP_INPUTS[group]
    mixed = list(reference)
    mixed[index] = mixed[index].clone()
    mixed[index][..., columns] = rows[index][..., columns]
    return mixed


def explanation(values: np.ndarray, groups: Sequence[str], target_mean: float, target_std: float,
                score_range: tuple[float, float]) -> dict[str, np.ndarray]:
    """Coalition values [n, 2**k] (standardised) -> {field: float64 [n]} in score units: ``base``
    (every group at its reference) plus the parts is ``unclamped``; ``score`` is it clamped."""
    parts = values @ shapley_weights(len(groups)) * target_std
    out = {"base": values[:, 0] * target_std + target_mean}
    out |= {g: parts[:, i] for i, g in enumerate(groups)}
    out["unclamped"] = values[:, -1] * target_std + target_mean
    out["score"] = np.clip(out["unclamped"], *score_range)
    return out
