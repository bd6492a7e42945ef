"""The two networks (DESIGN.md, "The two models"). Both predict a standardised score."""

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

    def forward(self, dense: torch.Tensor, studio: torch.Tensor) -> torch.Tensor:
        if self.studio is None:
            return torch.cat([dense, nn.functional.one_hot(studio, self.n_studios).to(dense.dtype)], dim=1)
        return torch.cat([dense, self.studio(studio)], dim=1)


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

    def forward(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor) -> torch.Tensor:
        return self.after_first_layer(self.first_layer(text, dense, studio))

    def first_layer(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor) -> torch.Tensor:
        """The first Dense layer's output: linear in each input (a studio's one-hot or embedding
        row included), so explaining (anime_udf.explain) combines inputs here, cheaply."""
        return self.mlp[0](torch.cat([text, self.tabular(dense, studio)], dim=1))

    def after_first_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp[1:](hidden).squeeze(-1)


class FusionHead(BaselineNet):
    """Three views fused by the baseline's network: concat(text, tabular, lexical score) -> Dense 256
    ReLU -> Dropout -> Dense 128 ReLU -> Dense 1.

    The lexical input is the TF-IDF ridge score of the synopsis (anime_udf.lexical), one number
    a row. On titles newer than any trained on, this head measured better than the founding
    report's (a tabular MLP branch and one hidden layer): README, "Accuracy"."""

    def __init__(self, text_dim: int, n_dense: int, n_studios: int, studio_dim: int = 0, dropout: float = 0.5):
        super().__init__(text_dim + 1, n_dense, n_studios, studio_dim, dropout)

    def forward(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor,
                lexical: torch.Tensor) -> torch.Tensor:
        return self.after_first_layer(self.first_layer(text, dense, studio, lexical))

    def first_layer(self, text: torch.Tensor, dense: torch.Tensor, studio: torch.Tensor,
                    lexical: torch.Tensor) -> torch.Tensor:
        return super().first_layer(torch.cat([text, lexical.unsqueeze(1)], dim=1), dense, studio)


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
