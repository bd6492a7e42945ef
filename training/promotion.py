"""`train --promote-if-better METRIC`: the run's challenger against the bundle that serves its kind,
on the validation rows the serving bundle never trained on, scored by the selection run (which
never trained on them either); promoted only if it wins beyond the noise (the 95% paired-bootstrap
interval of the difference, anime_udf.comparison), else production stays as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from anime_udf.comparison import ComparisonError, challenge, wins
from anime_udf.registry import PRODUCTION, read_aliases, resolve, resolve_models_dir, set_production
from anime_udf.udf import LazyScorer


class Challenge:
    """What serves ``kind`` before the run (read before training: the new bundle will be the newest),
    and the selection run's validation scores once the trainer hands them over (``on_validated``)."""

    def __init__(self, kind: str, metric: str, out: Path, models_dir: Path):
        root = resolve_models_dir(models_dir)
        if out.resolve().parent != root.resolve():
            raise ComparisonError(f"--promote-if-better promotes a bundle of the models directory {root}; "
                                  f"--out {out} is elsewhere")
        self.kind, self.metric, self.out, self.models_dir = kind, metric, out, models_dir
        self.alias = read_aliases(models_dir).production.get(kind)  # what the promotion swaps (compare and swap)
        self.incumbent = resolve(kind, models_dir)
        self.valid_scores: np.ndarray | None = None

    def on_validated(self, scores: np.ndarray) -> None:
        self.valid_scores = scores

    def decide(self, valid: pl.DataFrame, log: Callable[[str], None]) -> bool:
        """Promote the new bundle, or say why not; where nothing was promoted, the incumbent (until now
        the newest) is pinned as production, so that the new bundle does not serve by being newest."""
        name = self.out.name
        if self.incumbent is None:
            set_production(self.kind, name, self.alias, "promote", self.models_dir)
            log(f"promoted {name}: no {self.kind} bundle served before")
            return True
        try:
            rows, metrics, intervals = challenge(valid, self.valid_scores, LazyScorer(self.incumbent))
        except ComparisonError as exc:
            return self.refuse(f"not promoted: {exc}", None, log)
        interval = intervals[self.metric]
        figures = (f"{self.metric} {metrics['challenger'][self.metric]:.4f} against {self.incumbent.name}'s "
                   f"{metrics['incumbent'][self.metric]:.4f} (difference {interval['difference']:+.4f}, 95% "
                   f"interval [{interval['lo']:+.4f}, {interval['hi']:+.4f}]) on {rows} validation rows "
                   f"{self.incumbent.name} never trained on")
        record = {"metric": self.metric, "rows": rows, **{role: metrics[role][self.metric] for role in metrics},
                  **interval}
        if wins(self.metric, interval):
            set_production(self.kind, name, self.alias, "promote", self.models_dir, **self.decision(True, record))
            log(f"promoted {name}: {figures}")
            return True
        return self.refuse(f"not promoted: {figures}: not better beyond the noise", record, log)

    def decision(self, promoted: bool, record: dict | None, why: str | None = None) -> dict:
        """What the aliases history keeps of the decision (``models`` shows it beside the challenger)."""
        return {"challenger": self.out.name, "incumbent": self.incumbent.name, "promoted": promoted,
                **({"comparison": record} if record else {"refused": (why or "").removeprefix("not promoted: ")})}

    def refuse(self, why: str, record: dict | None, log: Callable[[str], None]) -> bool:
        log(why)
        if self.alias is None:  # the incumbent served as the newest: the new bundle is newer
            set_production(self.kind, self.incumbent.name, None, "promote", self.models_dir,
                           **self.decision(False, record, why))
            log(f"{self.kind} {PRODUCTION}: unset -> {self.incumbent.name} (pinned, so that {self.out.name} "
                "does not serve by being the newest)")
        else:  # the alias is kept as it is, the refusal recorded beside it
            set_production(self.kind, self.alias, self.alias, "refuse", self.models_dir,
                           **self.decision(False, record, why))
            log(f"{self.kind} {PRODUCTION} stays {self.alias}")
        return False
