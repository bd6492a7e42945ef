"""The two networks (docs/DESIGN.md, "The two models"). Both predict a standardised score."""

from __future__ import annotations

import torch
from torch import nn

from anime_udf.text import pool


class TabularInput(nn.Module):
    """concat(scaled episodes + missing flag, genres multi-hot, studio): the studio as a learned
    embedding of ``studio_dim`` values or, with ``studio_dim`` 0, one-hot (measured better on new
    titles: a studio's own weights, not a position shared with similar studios)."""

    def __init__(self, n_dense: int, n_studios: int, studio_dim: int):
        super().__init__()
        self.n_studios = n_studios
        self.studio = nn.Embedding(n_studios, studio_dim) if studio_dim else None
        self.width = n_dense + (studio_dim or n_studios)

    def studio_features(self, studio: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The studio index as the network reads it: its one-hot or its embedding."""
        if self.studio is None:
            return nn.functional.one_hot(studio, self.n_studios).to(dtype)
        return self.studio(studio)


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

    # The first layer reads one block per input (text, dense, studio[, lexical]), in this order of them.
    block_order: tuple[int, ...] = (0, 1, 2)

    def forward(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor) -> torch.Tensor:
        return self.after_first_layer(self.first_layer(text, dense, studio))

    def input_blocks(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor) -> list[torch.Tensor]:
        """The first layer's input, one 2-D block per input, in the inputs' order."""
        return [text, dense, self.tabular.studio_features(studio, dense.dtype)]

    def first_layer(self, *inputs: torch.Tensor) -> torch.Tensor:
        blocks = self.input_blocks(*inputs)
        return self.mlp[0](torch.cat([blocks[i] for i in self.block_order], dim=1))

    def first_layer_share(self, index: int, *inputs: torch.Tensor) -> torch.Tensor:
        """Input ``index``'s share of the first layer's output: the layer is linear, so its output
        is the bias plus every input's share. Explaining (anime_udf.explain) recomputes only the
        share of the input it changes."""
        blocks = self.input_blocks(*inputs)
        weights = self.mlp[0].weight.split([blocks[i].shape[1] for i in self.block_order], dim=1)
        return blocks[index] @ weights[self.block_order.index(index)].T

    def after_first_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp[1:](hidden).squeeze(-1)


class FusionHead(BaselineNet):
    """Three views fused by the baseline's network: concat(text, lexical score, tabular) -> Dense 256
    ReLU -> Dropout -> Dense 128 ReLU -> Dense 1.

    The lexical input is the TF-IDF ridge score of the synopsis (anime_udf.lexical), one number
    a row. On titles newer than any trained on, this head measured better than the founding
    report's (a tabular MLP branch and one hidden layer): README, "Accuracy"."""

    def __init__(self, text_dim: int, n_dense: int, n_studios: int, studio_dim: int = 0, dropout: float = 0.5):
        super().__init__(text_dim + 1, n_dense, n_studios, studio_dim, dropout)

    block_order = (0, 3, 1, 2)  # text, lexical, dense, studio

    def forward(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor,
                lexical: torch.Tensor) -> torch.Tensor:
        return self.after_first_layer(self.first_layer(text, dense, studio, lexical))

    def input_blocks(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor,
                     lexical: torch.Tensor) -> list[torch.Tensor]:
        return [*super().input_blocks(text, dense, studio), lexical.unsqueeze(1)]


class SeedEnsemble(nn.Module):
    """The mean prediction of several copies of one network trained with different seeds."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(*inputs) for m in self.members]).mean(0)


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
