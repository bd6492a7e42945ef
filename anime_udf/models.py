"""The two networks (docs/training.md, "The two models"). Both predict a standardised score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from anime_udf.text import pool


class TabularInput(nn.Module):
    """concat(scaled episodes + missing flag, genres multi-hot, studio): the studio as a learned
    embedding of ``studio_dim`` values or, with ``studio_dim`` 0, one-hot (measured better on new
    titles: a studio's own weights, not a position shared with similar studios)."""

    def __init__(self, n_dense: int, n_studios: int, studio_dim: int):
        super().__init__()
        self.studio = nn.Embedding(n_studios, studio_dim) if studio_dim else None
        self.studio_width = studio_dim or n_studios
        self.width = n_dense + self.studio_width


class BaselineNet(nn.Module):
    """Frozen sentence embedding + tabular -> Dense 256 ReLU -> Dropout -> Dense 128 ReLU -> Dense 1."""

    def __init__(self, text_dim: int, n_dense: int, n_studios: int, studio_dim: int = 0, dropout: float = 0.5):
        super().__init__()
        self.tabular = TabularInput(n_dense, n_studios, studio_dim)
        self.mlp = nn.Sequential(
            nn.Linear(text_dim + self.tabular.width, 256),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, 1),
        )

    # The inputs, by index: text, dense, studio index[, lexical]. The first layer's weight holds
    # one block of columns per input, in this order of them.
    block_order: tuple[int, ...] = (0, 1, 2)
    STUDIO = 2

    def forward(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor) -> torch.Tensor:
        return self.after_first_layer(self.first_layer(text, dense, studio))

    def first_layer(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The first linear layer: its bias plus every input's share."""
        return self.mlp[0].bias + sum(self.first_layer_share(i, *inputs) for i in self.block_order)

    def first_layer_share(self, index: int, *inputs: torch.Tensor) -> torch.Tensor:
        """Input ``index``'s share of the first layer's output ([rows, 256]). The layer is linear,
        so explaining (anime_udf.explain) recomputes only the share of the input it changes."""
        widths = [self.tabular.studio_width if i == self.STUDIO else inputs[i].shape[1] if inputs[i].ndim == 2 else 1
                  for i in self.block_order]  # the lexical score is one number a row
        weight = self.mlp[0].weight.split(widths, dim=1)[self.block_order.index(index)]
        x = inputs[index]
        if index == self.STUDIO:
            if self.tabular.studio is None:
                # A one-hot times the weight is a column of it: gather the column, no multiplication
                # by hundreds of zeros (a third of the layer's work at scoring time).
                return weight.T[x]
            x = self.tabular.studio(x)
        return (x if x.ndim == 2 else x.unsqueeze(1)) @ weight.T

    def after_first_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp[1:](hidden).squeeze(-1)

    def drop_unknown_studio(self) -> None:
        """Make the unknown studio (index 0: a rare studio, NULL, or one never seen) weigh nothing,
        now and through training: its weights zeroed, their gradient too (training calls this).
        A learned weight gave studios newer than the training rows the weight of the rare ones:
        on new titles 0.006 worse MAE and Spearman (benchmarks/reference_fusion.py). The layout
        is unchanged, so bundles with a learned weight load and score as they did."""
        if self.tabular.studio is not None:  # an embedding: its row 0
            weight, dim, index = self.tabular.studio.weight, 0, 0
        else:  # one-hot: the first column of the studio block, the first layer's last
            weight, dim, index = self.mlp[0].weight, 1, self.mlp[0].in_features - self.tabular.studio_width
        with torch.no_grad():
            weight.select(dim, index).zero_()
        weight.register_hook(lambda grad: grad.index_fill(dim, torch.tensor([index], device=grad.device), 0.0))


class FusionHead(BaselineNet):
    """Three views fused by the baseline's network: concat(text, lexical score, tabular) -> Dense 256
    ReLU -> Dropout -> Dense 128 ReLU -> Dense 1.

    The lexical input is the TF-IDF ridge score of the synopsis (anime_udf.lexical), one number
    a row. On titles newer than any trained on, this head measured better than the founding
    report's (a tabular MLP branch and one hidden layer): docs/experiments.md, "What each choice
    changed on new titles"."""

    def __init__(self, text_dim: int, n_dense: int, n_studios: int, studio_dim: int = 0, dropout: float = 0.5):
        super().__init__(text_dim + 1, n_dense, n_studios, studio_dim, dropout)

    block_order = (0, 3, 1, 2)  # text, lexical, dense, studio

    def forward(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor,
                lexical: torch.Tensor) -> torch.Tensor:
        return self.after_first_layer(self.first_layer(text, dense, studio, lexical))


class SeedEnsemble(nn.Module):
    """The mean prediction of several copies of one network trained with different seeds."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.member_predictions(*inputs).mean(0)

    def member_predictions(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Each member's prediction, [members, rows] (``forward`` is their mean; their spread
        widens an interval, anime_udf.intervals), computed for all of them at once (they are
        BaselineNet or FusionHead networks of one shape): their first layers side by side, one
        [rows, inputs] x [inputs, members x 256] product, then the later layers as batched
        products. A pass per member cost a fifth more on a rescore chunk of 4,096 rows."""
        first = self.members[0]
        studio_width = first.tabular.studio_width  # the studio block is the first layer's last
        weights = torch.cat([m.mlp[0].weight for m in self.members])  # [members x 256, inputs]
        if first.tabular.studio is None:  # one-hot: the rows' columns of the studio block, gathered
            studio = weights[:, -studio_width:].T[inputs[first.STUDIO]]
        else:
            studio = torch.cat([m.first_layer_share(first.STUDIO, *inputs) for m in self.members], dim=1)
        other = torch.cat([inputs[i] if inputs[i].ndim == 2 else inputs[i].unsqueeze(1)
                           for i in first.block_order if i != first.STUDIO], dim=1)
        bias = torch.cat([m.mlp[0].bias for m in self.members])
        hidden = torch.addmm(studio.add_(bias), other, weights[:, :-studio_width].T).relu_()
        # [rows, members x 256] -> [members, rows, 256]: each member's later layers on its own block
        hidden = hidden.view(len(other), len(self.members), -1).transpose(0, 1)
        for at in (3, 5):  # Linear 256 -> 128, ReLU, Linear 128 -> 1 (mlp[1], mlp[2]: ReLU and Dropout)
            layer = [m.mlp[at] for m in self.members]
            hidden = torch.baddbmm(torch.stack([x.bias for x in layer]).unsqueeze(1), hidden,
                                   torch.stack([x.weight for x in layer]).transpose(1, 2))
            hidden = hidden.relu_() if at == 3 else hidden
        return hidden.squeeze(-1)


class FusionNet(nn.Module):
    """A transformer encoder fine-tuned end to end, pooled, fused with the tabular and lexical inputs."""

    def __init__(self, encoder: nn.Module, head: FusionHead, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.pooling = pooling

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled and L2-normalised, as the frozen path's sentence_embedding (scoring) computes them."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(pool(hidden, attention_mask, self.pooling), dim=1, eps=1e-12)

    def forward(self, input_ids, attention_mask, dense, studio, lexical) -> torch.Tensor:
        return self.head(self.text_features(input_ids, attention_mask), dense, studio, lexical)


@dataclass(frozen=True)
class Blend:
    """What follows the head (standardised units): head x ``head`` + lexical score x ``lexical``
    (fusion) + ``constant``. ``train --blend`` fits it by least squares on the selection run's
    validation rows, the newest titles by default: a calibration for titles newer than those
    trained on (docs/performance.md, "The blend is a trade"). A bundle without one (the default):
    the head alone."""

    head: float = 1.0
    lexical: float = 0.0
    constant: float = 0.0

    @classmethod
    def of(cls, entry: dict[str, Any] | None) -> "Blend":
        """From the manifest's ``blend`` entry (training.common.fit_blend's); None: the head alone."""
        return cls(entry["head"], entry["lexical"], entry["constant"]) if entry else cls()

    def apply(self, head: np.ndarray, lexical: np.ndarray | None = None) -> np.ndarray:
        """float64 blended predictions; ``lexical`` (fusion) broadcasts against ``head``."""
        out = self.head * np.asarray(head, dtype=np.float64) + self.constant
        return out if lexical is None else out + self.lexical * np.asarray(lexical, dtype=np.float64)
