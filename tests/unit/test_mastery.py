"""The knowledge-tracing update (snaplearn_recommender.mastery): direction, range, determinism."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from snaplearn_offline.knowledge_tracing import roc_auc
from snaplearn_recommender.mastery import (
    FEATURES,
    Elo,
    MasteryModel,
    MasteryOptions,
    PractiseWeights,
    head_keys,
    practise_next,
)


def _curriculum(students: int, seed: int) -> list[list[tuple[str, bool]]]:
    """Students practise skills s0..s4 in order; success grows with ability and right answers."""
    rng = np.random.default_rng(seed)
    difficulty = {f"s{i}": 0.3 * i for i in range(5)}
    sequences = []
    for _ in range(students):
        ability = rng.normal(0.0, 1.0)
        attempts = []
        for skill, hardness in difficulty.items():
            right = 0
            for _ in range(6):
                p = 1 / (1 + math.exp(-(ability - hardness + 0.4 * right - 0.5)))
                correct = bool(rng.random() < p)
                right += correct
                attempts.append((skill, correct))
        sequences.append(attempts)
    return sequences


@pytest.fixture(scope="module")
def fitted() -> MasteryModel:
    return MasteryModel().fit(_curriculum(200, seed=1))


def test_elo_right_answers_raise_and_wrong_lower_the_estimate() -> None:
    elo = Elo(learning_rate=0.4)
    before = elo.mastery("ann", "fractions")
    assert before == pytest.approx(0.5)
    assert elo.learn("ann", "fractions", True) == pytest.approx(0.5)  # the prediction made before
    raised = elo.mastery("ann", "fractions")
    assert raised > before
    elo.learn("ann", "fractions", False)
    assert elo.mastery("ann", "fractions") < raised
    assert elo.difficulty["fractions"] != 0.0  # the item moved the other way


def test_right_answers_raise_and_wrong_lower_the_estimate_after_every_attempt(fitted: MasteryModel) -> None:
    start = fitted.mastery("bo", "s1")
    assert 0.0 < start < 1.0
    level = start
    outcomes = [True, False, True, True, *[False] * 15, *[True] * 30]
    for step, correct in enumerate(outcomes):
        prediction = fitted.learn("bo", "s1", correct)
        assert 0.0 < prediction < 1.0
        now = fitted.mastery("bo", "s1")
        assert 0.0 < now < 1.0
        # Never the wrong way; strictly the right way while the evidence is fresh (a long run of
        # one outcome saturates the recent-answer features).
        assert (now >= level) if correct else (now <= level), (step, correct, level, now)
        if step < 5:
            assert now != level, (step, correct)
        level = now
    assert fitted.mastery("bo", "s1") > start
    # A student's state is theirs alone, and forgetting it starts them fresh.
    assert fitted.mastery("cy", "s1") == pytest.approx(start)
    fitted.forget("bo")
    assert fitted.mastery("bo", "s1") == pytest.approx(start)


def test_a_wrong_first_answer_never_raises_a_new_concept(fitted: MasteryModel) -> None:
    before = fitted.mastery("di", "s3")
    fitted.learn("di", "s3", False)
    assert fitted.mastery("di", "s3") < before
    first_right = fitted.mastery("fay", "s3")
    fitted.learn("fay", "s3", True)
    assert fitted.mastery("fay", "s3") > first_right


def test_fit_is_deterministic_and_learns_a_harder_skill_is_harder() -> None:
    data = _curriculum(120, seed=2)
    first, second = MasteryModel().fit(data), MasteryModel().fit(data)
    np.testing.assert_array_equal(first.dense, second.dense)
    assert first.item_bias == second.item_bias
    predictions = [[m.learn("dee", skill, correct) for skill, correct in data[0]] for m in (first, second)]
    assert predictions[0] == predictions[1]
    fresh = MasteryModel().fit(data)
    assert fresh.mastery("new", "s0") > fresh.mastery("new", "s4")


def test_concepts_group_items_for_the_per_concept_state() -> None:
    concept_of = {"q1": "forces", "q2": "forces", "q3": "moments"}
    data = [[("q1", True), ("q2", True), ("q3", False)] * 3 for _ in range(30)]
    model = MasteryModel(concept_of).fit(data)
    model.learn("eve", "q1", True)
    state = model.students["eve"]
    assert set(state.concepts) == {"forces"}
    model.learn("eve", "q2", False)
    assert (state.concepts["forces"].correct, state.concepts["forces"].wrong) == (1, 1)


def test_bad_learning_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        Elo(learning_rate=0.0)


def test_practise_next_with_heavy_weights_orders_the_head_by_readiness_then_band_and_says_why() -> None:
    success = {"frac-2": 0.7, "frac-3": 0.7, "dec-1": 0.95, "dec-2": 0.3, "geo-1": 0.6}
    mastery_of = {"frac-1": 0.9, "frac-2": 0.4, "dec-1": 0.8}
    prerequisites = {"frac-2": ["frac-1"], "frac-3": ["frac-2"], "dec-2": ["dec-1"]}
    titles = {"frac-1": "fractions 1", "frac-2": "fractions 2", "dec-1": "decimals 1"}
    ranked = ["frac-3", "dec-1", "dec-2", "frac-2", "geo-1"]
    shaped = practise_next(
        ranked,
        success.__getitem__,
        lambda item: mastery_of.get(item, 0.0),
        lambda item: prerequisites.get(item, []),
        band=(0.55, 0.85),
        mastered=0.6,
        window=4,
        title=lambda item: titles.get(item, item),
        weights=PractiseWeights(readiness=100.0, band=10.0),  # groups: ready, then in band
    )
    assert [s.item for s in shaped] == ["frac-2", "dec-1", "dec-2", "frac-3", "geo-1"]
    reasons = {s.item: s.reason for s in shaped}
    assert reasons["frac-2"] == "you have mastered fractions 1; this is the next step"
    assert reasons["frac-3"] == "first master fractions 2"
    assert reasons["dec-1"] == "you will probably find this easy: good for review"
    assert reasons["dec-2"].startswith("a stretch")
    assert reasons["geo-1"] == "a good next challenge for you"  # past the window: order kept
    assert [(s.ready, s.in_band) for s in shaped[:2]] == [(True, True), (True, False)]
    with pytest.raises(ValueError, match="band"):
        practise_next(ranked, success.__getitem__, success.__getitem__, lambda _: [], band=(0.9, 0.5))


def test_practise_next_blends_the_ranking_score_with_readiness() -> None:
    """z(score) + readiness x share of prerequisites mastered: a ready item overtakes one ranked a
    little above it, not one the ranking puts far ahead; without readiness the ranking stands."""
    ranked = ["far", "near", "ready", "half"]
    scores = [3.0, 1.1, 1.0, 0.9]
    prerequisites = {"far": ["x"], "near": ["x"], "half": ["x", "y"]}
    mastery_of = {"x": 0.2, "y": 0.9}

    def order(weights: PractiseWeights) -> list[str]:
        shaped = practise_next(
            ranked,
            lambda _: 0.7,
            lambda item: mastery_of.get(item, 0.0),
            lambda item: prerequisites.get(item, []),
            scores=scores,
            weights=weights,
        )
        return [s.item for s in shaped]

    assert order(PractiseWeights(readiness=1.0, band=0.0)) == ["far", "ready", "half", "near"]
    assert order(PractiseWeights(readiness=0.0, band=0.0)) == ranked
    shaped = practise_next(ranked, lambda _: 0.7, mastery_of.__getitem__, lambda i: prerequisites.get(i, []))
    assert {s.item: s.readiness for s in shaped} == {"far": 0.0, "near": 0.0, "ready": 1.0, "half": 0.5}
    # The keys are one vectorised function: two students at once give each one's own keys.
    both = head_keys(
        [[3.0, 1.0], [1.0, 3.0]], [[0.0, 1.0], [0.0, 0.0]], [[False, False]] * 2, PractiseWeights()
    )
    assert both[0, 1] > both[1, 0] and both[0, 0] == both[1, 1]


def test_online_learned_weights_predict_a_stream_better_than_fixed_defaults() -> None:
    """The recommender's mastery model starts unfitted and learns its weights from the attempts
    it sees: on a later stretch of the same kind of stream it predicts better than the defaults."""
    stream = _curriculum(600, seed=5)
    fixed = MasteryModel()
    online = MasteryModel(options=MasteryOptions(online_rate=0.003))
    scores: dict[str, list[tuple[bool, float]]] = {"fixed": [], "online": []}
    for index, attempts in enumerate(stream):
        for item, correct in attempts:
            for name, model in (("fixed", fixed), ("online", online)):
                p = model.learn(index, item, correct)
                if index >= 400:
                    scores[name].append((correct, p))
    auc = {name: roc_auc([y for y, _ in pairs], [p for _, p in pairs]) for name, pairs in scores.items()}
    loss = {
        name: -float(np.mean([np.log(p if y else 1 - p) for y, p in pairs])) for name, pairs in scores.items()
    }
    assert auc["online"] > auc["fixed"] + 0.01, auc
    assert loss["online"] < loss["fixed"], loss
    assert not np.array_equal(online.dense, fixed.dense)
    assert online.options.online_rate > 0 and online.item_bias  # the per-item terms learned too
    # The fit's signs hold online: a right answer never lowers a prediction.
    for name in ("ability", "concept_correct", "concept_recent", "last"):
        assert online.dense[FEATURES.index(name)] >= 0.0
    for name in ("concept_wrong", "total_wrong"):
        assert online.dense[FEATURES.index(name)] <= 0.0
    restored = pickle.loads(pickle.dumps(online))  # checkpointed with the model
    assert np.array_equal(restored.dense, online.dense) and restored.item_bias == online.item_bias


def test_the_model_and_its_students_survive_a_checkpoint(fitted: MasteryModel) -> None:
    fitted.learn("gus", "s2", True)
    restored = pickle.loads(pickle.dumps(fitted))
    assert restored.mastery("gus", "s2") == fitted.mastery("gus", "s2")
    assert restored.learn("gus", "s2", False) == fitted.learn("gus", "s2", False)


def test_an_unfitted_model_is_a_per_concept_elo() -> None:
    model = MasteryModel({"q1": "forces", "q2": "moments"})
    assert model.mastery("hal", "forces") == pytest.approx(0.5)
    for _ in range(3):
        model.learn("hal", "q1", True)
    model.learn("hal", "q2", False)
    assert model.mastery("hal", "forces") > model.mastery("hal", "moments")
    assert 0.5 < model.predict("hal", "q1") < 1.0
