"""app.charts: the figures and badges built from a prediction."""

from __future__ import annotations

import dataclasses

import pytest

from app.charts import (TOP_DIAGNOSES, category, change_chart, contribution_chart, diagnosis_chart, priority_badge,
                        probability_text, referral_chart, zero_shot_markdown)
from prima.explain import ZeroShot
from prima.labels import default_label_space
from prima.predict import priority_score


def _bars(figure):
    return [name for trace in figure.data if trace.type == "bar" for name in trace.y]


def test_diagnosis_chart_ranks_the_top_ten_and_marks_thresholds(normal_session):
    prediction = normal_session.prediction
    figure = diagnosis_chart(prediction)
    names = _bars(figure)
    assert sorted(names) == sorted(d.name for d in prediction.differential[:TOP_DIAGNOSES])
    assert figure.layout.yaxis.categoryarray[-1] == prediction.differential[0].name  # top of the chart
    threshold = next(trace for trace in figure.data if trace.name == "threshold")
    assert len(threshold.x) == TOP_DIAGNOSES
    assert len(_bars(diagnosis_chart(prediction, show_all=True))) == 52


def test_positives_are_solid_and_outlined(normal_session):
    figure = diagnosis_chart(normal_session.prediction, show_all=True)
    positive = {d.name for d in normal_session.prediction.positives}
    for trace in figure.data:
        if trace.type == "bar":
            for name, opacity, width in zip(trace.y, trace.marker.opacity, trace.marker.line.width):
                assert (opacity == 1.0 and width == 2) == (name in positive)


def test_probabilities_read_on_a_plain_axis_with_their_values(normal_session):
    prediction = normal_session.prediction
    for figure, scores in ((diagnosis_chart(prediction, show_all=True), prediction.diagnoses),
                           (referral_chart(prediction), prediction.referrals)):
        assert figure.layout.xaxis.type == "linear" and tuple(figure.layout.xaxis.range) == (0.0, 1.0)
        written = {name: text for trace in figure.data if trace.type == "bar" for name, text in zip(trace.y, trace.text)}
        assert written == {score.name: probability_text(score.prob) for score in scores}


def test_probability_text():
    assert [probability_text(p) for p in (0.0, 0.004, 0.056, 0.5, 0.996, 1.0)] == ["<1%", "<1%", "6%", "50%", "100%",
                                                                                   "100%"]


def test_category_comes_from_the_key():
    assert category("tumor_adult_meningioma") == "Tumour"
    assert category("vascular_aneurysm") == "Vascular"


def test_priority_badge_names_the_tier(normal_session):
    badge = priority_badge(normal_session.prediction)
    tier = normal_session.prediction.priority.worklist_tier
    assert f'data-tier="{tier}"' in badge and tier.upper() in badge


def test_priority_badge_warns_when_a_positive_finding_raised_the_tier(normal_session):
    prediction = normal_session.prediction
    space = default_label_space()
    urgent = next(d for d in space.diagnoses if d.tier == "high")
    diagnoses = [dataclasses.replace(d, positive=d.key == urgent.key) for d in prediction.diagnoses]
    raised = dataclasses.replace(prediction, diagnoses=diagnoses,
                                 priority=priority_score([0.8, 0.15, 0.05], diagnoses, space))
    badge = priority_badge(raised)
    assert 'data-tier="high"' in badge and 'data-head-tier="low"' in badge and "Priority: HIGH" in badge
    assert 'id="priority-conflict"' in badge and urgent.name in badge and "head reads LOW" in badge
    calm = dataclasses.replace(prediction, diagnoses=[dataclasses.replace(d, positive=False) for d in diagnoses],
                               priority=priority_score([0.8, 0.15, 0.05], [], space))
    assert "priority-conflict" not in priority_badge(calm) and 'data-tier="low"' in priority_badge(calm)


def test_referral_and_contribution_charts(normal_session):
    assert len(_bars(referral_chart(normal_session.prediction))) == len(normal_session.prediction.referrals)
    key = normal_session.prediction.differential[0].key
    figure = contribution_chart(normal_session.contribution, key, "x")
    assert list(figure.data[0].x) == normal_session.series_names


def test_change_chart_lists_the_largest_changes_first(normal_session, lite_release):
    import copy

    post = copy.deepcopy(normal_session.prediction)
    post.diagnoses[3].logit += 5.0
    post.diagnoses[7].logit -= 2.0
    figure = change_chart(normal_session.prediction, post, top=2)
    names = [d.name for d in post.diagnoses]
    assert list(figure.data[0].y) == [names[7], names[3]]  # drawn bottom-up: the largest change on top
    assert list(figure.data[0].x) == pytest.approx([-2.0, 5.0])


def test_zero_shot_markdown_escapes_the_text():
    text = zero_shot_markdown(ZeroShot("<b>mass</b>", 0.1, 1.0, [{"key": "k", "name": "Mass", "similarity": 0.5}]))
    assert "<b>" not in text and "&lt;b&gt;" in text and "| Mass | 0.500 |" in text
