"""explain_score / explain_score_fusion: exact Shapley parts of a score (anime_udf/explain.py).
Efficiency (base + parts = the score), dummy, symmetry and additivity, on the real fixture
models and on small hand-built heads; old bundles say to retrain."""

from __future__ import annotations

import json
import math
import shutil

import duckdb
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anime_udf
from anime_udf.bundle import MANIFEST, REFERENCE_FILE, BundleError, file_sha256
from anime_udf.explain import (GROUPS, Reference, blended_coalitions, coalition_values,
                               explanation, fields)
from anime_udf.features import EPISODE_COLUMNS, GENRE_COLUMNS
from anime_udf.models import BaselineNet, FusionHead
from anime_udf.scoring import Rows, lexical_input, load_scorer
from tests.conftest import HOLDOUT
from tests.test_properties import register_batch, rows  # generated rows, NULLs and odd values

HOLDOUT_ROWS = {c: list(v) for c, v in zip(("synopsis", "genres", "studio", "episodes"), zip(*duckdb.sql(
    f"SELECT synopsis, genres, studio, episodes FROM read_csv('{HOLDOUT}') LIMIT 30").fetchall()))}


EXPLAIN = {"baseline": "explain_score", "fusion": "explain_score_fusion"}
PREDICT = {"baseline": "predict_score", "fusion": "predict_score_fusion"}


@pytest.fixture(scope="module")
def con(baseline_bundle, fusion_bundle):
    con = duckdb.connect()
    anime_udf.register(con, baseline=baseline_bundle, fusion=fusion_bundle)
    con.execute(f"CREATE TABLE holdout AS SELECT * FROM read_csv('{HOLDOUT}')")
    return con


def explained(cur, kind: str, table: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({field: values}, predict's scores) of every row of ``table``, in its order."""
    rows = cur.sql(f"SELECT {EXPLAIN[kind]}(synopsis, genres, studio, episodes) AS e, "
                   f"{PREDICT[kind]}(synopsis, genres, studio, episodes) AS p FROM {table} ORDER BY i").fetchall()
    return {f: np.array([e[f] for e, _ in rows]) for f in fields(kind)}, np.array([p for _, p in rows])


def assert_efficient(parts: dict[str, np.ndarray], scores: np.ndarray, kind: str) -> None:
    total = parts["base"] + sum(parts[g] for g in GROUPS[kind])
    assert np.abs(total - parts["unclamped"]).max() <= 1e-5
    assert np.abs(np.clip(parts["unclamped"], 1, 10) - parts["score"]).max() <= 1e-12
    assert np.abs(parts["score"] - scores).max() <= 1e-5  # the score predict_score returns


def test_parts_add_up_to_the_score_on_fixture_rows(con, kind):
    cur = con.cursor()
    cur.execute("CREATE TEMP TABLE t AS SELECT row_number() OVER () AS i, * FROM holdout")
    parts, scores = explained(cur, kind, "t")
    assert len(scores) == cur.execute("SELECT count(*) FROM holdout").fetchone()[0]
    assert_efficient(parts, scores, kind)
    # Every group moves some scores: an explanation that credits nothing would pass the sum.
    for group in GROUPS[kind]:
        assert np.abs(parts[group]).mean() > 1e-3, group
    # The base is one number, the model's score with every group at its reference.
    assert np.ptp(parts["base"]) <= 1e-5


def test_the_struct_has_the_documented_fields(con):
    types = con.execute("SELECT typeof(explain_score(NULL, NULL, NULL, NULL)), "
                        "typeof(explain_score_fusion(NULL, NULL, NULL, NULL))").fetchone()
    assert types[0] == ("STRUCT(base DOUBLE, synopsis DOUBLE, genres DOUBLE, studio DOUBLE, episodes DOUBLE, "
                        "unclamped DOUBLE, score DOUBLE)")
    assert types[1] == ("STRUCT(base DOUBLE, synopsis DOUBLE, genres DOUBLE, studio DOUBLE, episodes DOUBLE, "
                        "lexical DOUBLE, unclamped DOUBLE, score DOUBLE)")


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(rows, min_size=40, max_size=40))
def test_parts_add_up_to_the_score_on_generated_rows(con, batch):
    cur = con.cursor()
    register_batch(cur, batch)
    for kind in GROUPS:
        parts, scores = explained(cur, kind, "batch")
        assert all(np.isfinite(v).all() for v in parts.values())
        assert_efficient(parts, scores, kind)


def test_an_unknown_or_null_studio_gets_no_part(con, kind):
    """The studio's reference is the unknown studio: a title from a studio the model does not
    know is explained without one (the dummy property, through SQL)."""
    parts = con.execute(f"SELECT {EXPLAIN[kind]}(synopsis, genres, s, episodes) FROM holdout, "
                        "(VALUES (NULL), ('A Studio Nobody Heard Of'), ('')) AS t(s)").fetchall()
    assert all(abs(p["studio"]) <= 1e-9 for (p,) in parts)
    assert max(abs(p["genres"]) for (p,) in parts) > 1e-3


@pytest.fixture(scope="module")
def blended(baseline_bundle, fusion_bundle, tmp_path_factory) -> dict:
    """The fixture models with a blend after the head (as `train --blend` writes one): {kind: bundle}."""
    bundles = {}
    for kind, bundle in (("baseline", baseline_bundle), ("fusion", fusion_bundle)):
        copy = shutil.copytree(bundle, tmp_path_factory.mktemp("blended") / kind)
        manifest = json.loads((copy / MANIFEST).read_text())
        manifest["blend"] = {"head": 0.8, "lexical": 0.3 if kind == "fusion" else 0.0, "constant": 0.1}
        (copy / MANIFEST).write_text(json.dumps(manifest))
        bundles[kind] = copy
    return bundles


def test_a_blended_model_is_explained_as_it_scores(con, blended, kind):
    """The parts add up to the blended score; the head's parts are scaled by the blend's head
    weight (the lexical part also holds the lexical score's direct share)."""
    with_blend = duckdb.connect()
    anime_udf.register(with_blend, **blended)
    parts = {}
    for name, connection in (("head", con.cursor()), ("blended", with_blend)):
        connection.execute(f"CREATE TEMP TABLE t AS SELECT row_number() OVER () AS i, * FROM read_csv('{HOLDOUT}')")
        parts[name], scores = explained(connection, kind, "t")
    assert_efficient(parts["blended"], scores, kind)
    for group in ("synopsis", "genres", "studio", "episodes"):
        np.testing.assert_allclose(parts["blended"][group], 0.8 * parts["head"][group], atol=1e-6)
    if kind == "fusion":
        assert np.abs(parts["blended"]["lexical"] - 0.8 * parts["head"]["lexical"]).max() > 1e-3


def test_a_group_at_its_reference_gets_no_part(blended, kind):
    """Dummy: rows holding a group's reference (on the real model, with a blend after its head)
    get 0 for it, the rest unchanged."""
    bundle = blended[kind]
    scorer = load_scorer(bundle)
    reference = Reference.load(bundle, scorer.manifest, scorer.manifest["model"]["text_dim"],
                               scorer.features.n_tabular)
    synopsis, genres, studio, episodes = (HOLDOUT_ROWS[c] for c in ("synopsis", "genres", "studio", "episodes"))
    with torch.inference_mode():
        rows = scorer.head_inputs(Rows(synopsis, genres, studio, episodes))
        at_reference = [x.clone() for x in rows]
        at_reference[0][:] = reference.text  # synopsis at its reference
        at_reference[1][:, GENRE_COLUMNS] = reference.dense[GENRE_COLUMNS]  # genres at theirs
        if kind == "fusion":
            at_reference[3][:] = reference.lexical  # and the lexical score, which the blend also adds
        values = coalition_values(scorer.net.members, at_reference, reference, GROUPS[kind])
    values = blended_coalitions(values, scorer.blend, GROUPS[kind], lexical_input(at_reference), reference)
    parts = explanation(values, GROUPS[kind], scorer.target_mean, scorer.target_std, (1, 10))
    assert np.abs(parts["synopsis"]).max() <= 1e-6 and np.abs(parts["genres"]).max() <= 1e-6
    assert kind == "baseline" or np.abs(parts["lexical"]).max() <= 1e-6
    assert np.abs(parts["episodes"]).max() > 1e-3


# --- small hand-built heads -------------------------------------------------------------------

TEXT_DIM, N_GENRES, N_STUDIOS = 3, 2, 4


def hand_built(kind: str, seed: int, hidden_group_of: list[str] | None = None):
    """A head of the fixture models' shape with small random weights; with ``hidden_group_of``,
    first-layer unit u sees only that group's inputs and the later layers keep units apart
    (the head is then a sum of one function per group)."""
    torch.manual_seed(seed)
    head_class = FusionHead if kind == "fusion" else BaselineNet
    head = head_class(TEXT_DIM, 2 + N_GENRES, N_STUDIOS).eval()
    if hidden_group_of:
        columns = input_columns(kind)
        with torch.no_grad():
            first, second = head.mlp[0], head.mlp[3]
            mask = torch.zeros_like(first.weight)
            for unit in range(first.out_features):
                mask[unit, columns[hidden_group_of[unit % len(hidden_group_of)]]] = 1
            first.weight *= mask
            second.weight.zero_()
            second.weight[:, :second.out_features] = torch.eye(second.out_features)  # unit u -> unit u
            second.bias.zero_()
    return head


def input_columns(kind: str) -> dict[str, list[int]]:
    """Where each group sits in the first layer's input: text(, lexical), dense, studio one-hot."""
    text = list(range(TEXT_DIM))
    lexical = [TEXT_DIM] if kind == "fusion" else []
    dense = TEXT_DIM + len(lexical)
    episodes = [dense + c for c in range(2 + N_GENRES)[EPISODE_COLUMNS]]
    genres = [dense + c for c in range(2 + N_GENRES)[GENRE_COLUMNS]]
    studio = list(range(dense + 2 + N_GENRES, dense + 2 + N_GENRES + N_STUDIOS))
    return {"synopsis": text, "lexical": lexical, "episodes": episodes, "genres": genres, "studio": studio}


def random_rows(kind: str, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, TEXT_DIM, generator=g), torch.randn(n, 2 + N_GENRES, generator=g),
            torch.randint(0, N_STUDIOS, (n,), generator=g)]
    return rows + ([torch.randn(n, generator=g)] if kind == "fusion" else [])


def random_reference(kind: str, seed: int) -> Reference:
    g = torch.Generator().manual_seed(seed)
    lexical = torch.randn(1, generator=g) if kind == "fusion" else None
    return Reference(torch.randn(TEXT_DIM, generator=g), torch.rand(2 + N_GENRES, generator=g), lexical)


def explain_head(head, rows, reference, kind, mean=0.0, std=1.0) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        values = coalition_values([head], rows, reference, GROUPS[kind])
    return explanation(values, GROUPS[kind], mean, std, (1, 10))


def with_groups_from(rows, reference: Reference, groups: set[str], kind: str) -> list[torch.Tensor]:
    """The reference's inputs with ``groups`` taken from ``rows`` (built here by hand)."""
    n = len(rows[0])
    mixed = [reference.text.expand(n, -1).clone(), reference.dense.expand(n, -1).clone(),
             torch.zeros(n, dtype=torch.int64)] + ([reference.lexical.expand(n).clone()] if kind == "fusion" else [])
    if "synopsis" in groups:
        mixed[0] = rows[0]
    if "genres" in groups:
        mixed[1][:, GENRE_COLUMNS] = rows[1][:, GENRE_COLUMNS]
    if "episodes" in groups:
        mixed[1][:, EPISODE_COLUMNS] = rows[1][:, EPISODE_COLUMNS]
    if "studio" in groups:
        mixed[2] = rows[2]
    if "lexical" in groups:
        mixed[3] = rows[3]
    return mixed


def test_an_additive_head_gives_each_group_its_own_effect(kind):
    """Additivity: on f = sum of one function per group, a group's part is f(the row's group,
    the rest at the reference) - f(all at the reference), computed by the head's own forward."""
    groups = GROUPS[kind]
    head = hand_built(kind, 1, hidden_group_of=list(groups))
    rows, reference = random_rows(kind, 50, 2), random_reference(kind, 3)
    parts = explain_head(head, rows, reference, kind)
    with torch.inference_mode():
        base = head(*with_groups_from(rows, reference, set(), kind)).double().numpy()
        for group in groups:
            own = head(*with_groups_from(rows, reference, {group}, kind)).double().numpy() - base
            assert np.abs(parts[group] - own).max() <= 1e-5, group
            assert np.abs(own).max() > 1e-3, group
        full = head(*rows).double().numpy()
    assert np.abs(parts["base"] - base).max() <= 1e-6
    assert np.abs(parts["unclamped"] - full).max() <= 1e-5


def test_two_groups_that_enter_identically_get_equal_parts(kind):
    """Symmetry: synopsis (one text column) and episodes (the scaled count) share first-layer
    weights and differ from their references by the same amount: equal parts, though the head
    is not additive."""
    head = hand_built(kind, 4)
    columns = input_columns(kind)
    with torch.no_grad():
        weight = head.mlp[0].weight
        weight[:, columns["synopsis"][1:]] = 0
        weight[:, columns["episodes"][1]] = 0  # the missing flag
        weight[:, columns["episodes"][0]] = weight[:, columns["synopsis"][0]]
    rows, reference = random_rows(kind, 50, 5), random_reference(kind, 6)
    rows[1][:, 0] = rows[0][:, 0] - reference.text[0] + reference.dense[0]  # the same distance from the reference
    parts = explain_head(head, rows, reference, kind)
    assert np.abs(parts["synopsis"] - parts["episodes"]).max() <= 1e-5
    assert np.abs(parts["synopsis"]).max() > 1e-3
    # not additive: the pair's joint effect differs from the sum of their own effects somewhere
    with torch.inference_mode():
        f = {g: head(*with_groups_from(rows, reference, g, kind)).double().numpy()
             for g in (frozenset(), frozenset({"synopsis"}), frozenset({"episodes"}), frozenset({"synopsis", "episodes"}))}
    interaction = f[frozenset({"synopsis", "episodes"})] - f[frozenset({"synopsis"})] - f[frozenset({"episodes"})] + f[frozenset()]
    assert np.abs(interaction).max() > 1e-3


def test_a_clamped_score_keeps_its_unclamped_parts():
    """Scores are clamped to [1, 10]; the parts add up to the unclamped score, reported beside it."""
    head = hand_built("baseline", 7)
    rows, reference = random_rows("baseline", 20, 8), random_reference("baseline", 9)
    parts = explain_head(head, rows, reference, "baseline", mean=9.3, std=20.0)
    assert (parts["unclamped"] > 10).any() and (parts["unclamped"] < 10).any()
    total = parts["base"] + sum(parts[g] for g in GROUPS["baseline"])
    assert np.abs(total - parts["unclamped"]).max() <= 1e-5
    assert np.array_equal(parts["score"], np.clip(parts["unclamped"], 1, 10))


# --- bundles ----------------------------------------------------------------------------------

def test_a_bundle_without_references_says_to_retrain_and_still_scores(unexplainable_baseline):
    con = duckdb.connect()
    anime_udf.register(con, baseline=unexplainable_baseline)
    assert 1 <= con.execute("SELECT predict_score('A story.', 'Action', NULL, 12)").fetchone()[0] <= 10
    with pytest.raises(duckdb.Error, match="retrain the model to explain"):
        con.execute("SELECT explain_score('A story.', 'Action', NULL, 12)").fetchone()


@pytest.mark.parametrize("state, message", [
    ({"text": torch.zeros(5), "dense": torch.zeros(2)}, r"text has shape \(5,\); expected \(384,\)"),
    ({"text": torch.full((384,), math.nan), "dense": torch.zeros(2)}, "weights 'text' hold NaN or infinite values"),
])
def test_broken_references_name_the_file(baseline_bundle, tmp_path, state, message):
    """References rewritten (checksum updated to match): refused at the first explanation, by name."""
    assert_refused(with_references(baseline_bundle, tmp_path, state), message)


@pytest.mark.parametrize("tensor, change, message", [
    ("text", lambda t: t.half(), "text is float16; expected float32"),
    ("dense", lambda t: t.long(), "dense is int64; expected float32"),
    ("text", lambda t: t + 1e30, r"text holds 1e\+30; a reference is a mean of features, within ±10"),
    ("lexical", lambda t: t - 1e30, r"lexical holds -1e\+30; a reference is a mean of features, within ±10"),
])
def test_references_of_another_type_or_far_off_are_refused_by_name(baseline_bundle, fusion_bundle, tmp_path,
                                                                   tensor, change, message):
    """fp16 or integer references would fail in torch; finite but huge ones (1e30) would swamp
    float32 sums, and the parts would no longer add up to the score."""
    from safetensors.torch import load_file

    bundle = fusion_bundle if tensor == "lexical" else baseline_bundle
    state = load_file(str(bundle / REFERENCE_FILE))
    state[tensor] = change(state[tensor])
    assert_refused(with_references(bundle, tmp_path, state), message)


def with_references(bundle, tmp_path, state):
    """A copy of ``bundle`` with these references (its checksum updated to match)."""
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    save_file(state, str(broken / REFERENCE_FILE))
    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["files"][REFERENCE_FILE] = file_sha256(broken / REFERENCE_FILE)
    (broken / MANIFEST).write_text(json.dumps(manifest))
    return broken


def assert_refused(bundle, message):
    scorer = load_scorer(bundle)
    assert 1 <= scorer.predict(["x"], [None], [None], [None])[0] <= 10  # scoring does not read them
    with pytest.raises(BundleError, match=rf"{REFERENCE_FILE}: {message}"):
        scorer.explain(["x"], [None], [None], [None])
