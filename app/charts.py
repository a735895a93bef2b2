"""Charts and badges of a prediction: pure functions from ``prima`` results to plotly figures and HTML."""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from prima.explain import SeriesContribution, ZeroShot
from prima.predict import LabelScore, Prediction

TOP_DIAGNOSES = 10  # the diagnosis chart's default length; "show all" lists all of them
TOP_CHANGES = 15  # the compare tab's change chart lists the largest changes
PRIORITY_COLOURS = {"low": "#2e7d32", "medium": "#ef6c00", "high": "#c62828"}
CATEGORY_NAMES = {
    "cyst": "Cyst", "developmental": "Developmental", "infectious": "Infectious", "inflammatory": "Inflammatory",
    "sellar": "Sellar", "spine": "Spine", "structural": "Structural", "surgical": "Post-surgical",
    "trauma": "Trauma", "tumor": "Tumour", "vascular": "Vascular", "ventricular": "Ventricular",
}


def category(key: str) -> str:
    """A diagnosis' category: the first part of its key (``tumor_adult_meningioma`` -> Tumour)."""
    prefix = key.split("_", 1)[0]
    return CATEGORY_NAMES.get(prefix, prefix.capitalize())


def _sigmoid(logit: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * logit))


def probability_text(probability: float) -> str:
    """A bar's label: the probability in percent, "<1%" below one percent."""
    return "<1%" if probability < 0.01 else f"{probability:.0%}"


# The probabilities are calibrated (docs/training.md, "Task heads"), so they read on a plain 0-1 axis; the
# shipped thresholds are >= 0.05, so a positive bar is at least a twentieth of the axis, and every bar is
# labelled with its probability (the right margin leaves room for a label at 100%).
PROBABILITY_AXIS = dict(type="linear", range=[0.0, 1.0], tickformat=".0%", title="probability")


def category_colours(keys: list[str]) -> dict[str, str]:
    palette = qualitative.Safe + qualitative.Vivid
    names = sorted({category(key) for key in keys})
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def diagnosis_chart(prediction: Prediction, show_all: bool = False) -> go.Figure:
    """Diagnoses ranked by how far they exceed their operating threshold (``Prediction.differential``):
    a bar per label at its probability (``PROBABILITY_AXIS``, the probability written at the bar's end), the
    threshold marked, positives solid and outlined, colour by category."""
    ranked = prediction.differential if show_all else prediction.differential[:TOP_DIAGNOSES]
    ranked = ranked[::-1]  # plotly draws the first bar at the bottom
    colours = category_colours([d.key for d in prediction.diagnoses])
    figure = go.Figure()
    for name in sorted({category(d.key) for d in ranked}):
        rows = [d for d in ranked if category(d.key) == name]
        figure.add_trace(go.Bar(
            x=[d.prob for d in rows], y=[d.name for d in rows], orientation="h", name=name,
            text=[probability_text(d.prob) for d in rows], textposition="outside", cliponaxis=False,
            marker=dict(color=colours[name], opacity=[1.0 if d.positive else 0.45 for d in rows],
                        line=dict(color="black", width=[2 if d.positive else 0 for d in rows])),
            customdata=[[d.key, _sigmoid(d.threshold), "positive" if d.positive else "negative"] for d in rows],
            hovertemplate="%{y}: p=%{x:.3g} (threshold %{customdata[1]:.3g}, %{customdata[2]})<extra></extra>"))
    figure.add_trace(go.Scatter(
        x=[_sigmoid(d.threshold) for d in ranked], y=[d.name for d in ranked], mode="markers", name="threshold",
        marker=dict(symbol="line-ns-open", size=16, color="black", line=dict(width=2)),
        hovertemplate="threshold %{x:.3g}<extra></extra>"))
    figure.update_layout(barmode="overlay", height=max(320, 26 * len(ranked) + 110), margin=dict(l=10, r=40, t=40, b=70),
                         title=dict(text="Diagnoses (solid, outlined: above the operating threshold)", font=dict(size=13)),
                         xaxis=PROBABILITY_AXIS,
                         yaxis=dict(categoryorder="array", categoryarray=[d.name for d in ranked]),
                         legend=dict(orientation="h", yanchor="top", y=-0.2))
    return figure


def priority_badge(prediction: Prediction) -> str:
    """HTML: the worklist tier as a coloured badge, every tier's probability from the priority head, and, when a
    positive finding's own tier raised the worklist tier above the head's, which findings did and a warning."""
    priority = prediction.priority
    tier = priority.worklist_tier
    probs = " · ".join(f"{html.escape(t)} {p:.0%}" for t, p in priority.probs.items())
    badge = (f'<div id="priority-badge" data-tier="{html.escape(tier)}" data-head-tier="{html.escape(priority.tier)}" '
             f'style="display:flex;gap:12px;align-items:center;flex-wrap:wrap">'
             f'<span style="background:{PRIORITY_COLOURS.get(tier, "#555")};color:white;padding:6px 14px;'
             f'border-radius:14px;font-weight:700">Priority: {html.escape(tier.upper())}</span>'
             f'<span>priority head: {probs}</span>')
    if priority.raised_by:
        names = ", ".join(map(html.escape, prediction.raised_by_names))
        badge += (f'<span id="priority-conflict" style="color:#8a4b00;font-weight:600">Outputs disagree: the priority '
                  f'head reads {html.escape(priority.tier.upper())}, but {names} (a {html.escape(tier)}-priority '
                  f'finding) is called positive, so the worklist tier is raised to {html.escape(tier.upper())}. '
                  f'Check the finding.</span>')
    return badge + "</div>"


def referral_chart(prediction: Prediction) -> go.Figure:
    """Referrals by probability, the operating threshold marked, recommended ones solid."""
    rows: list[LabelScore] = sorted(prediction.referrals, key=lambda r: r.logit - r.threshold)
    figure = go.Figure(go.Bar(
        x=[r.prob for r in rows], y=[r.name for r in rows], orientation="h", name="referral",
        text=[probability_text(r.prob) for r in rows], textposition="outside", cliponaxis=False,
        marker=dict(color=["#1565c0" if r.positive else "#90a4ae" for r in rows]),
        hovertemplate="%{y}: p=%{x:.3g}<extra></extra>"))
    figure.add_trace(go.Scatter(x=[_sigmoid(r.threshold) for r in rows], y=[r.name for r in rows], mode="markers",
                                name="threshold", marker=dict(symbol="line-ns-open", size=14, color="black")))
    figure.update_layout(height=max(260, 24 * len(rows) + 90), margin=dict(l=10, r=40, t=40, b=30), showlegend=False,
                         title=dict(text="Referrals (solid: recommended)", font=dict(size=13)),
                         xaxis=PROBABILITY_AXIS)
    return figure


def contribution_chart(contribution: SeriesContribution, key: str, name: str) -> go.Figure:
    """For one diagnosis: how much its logit drops when each series is left out (positive: the series
    supports the diagnosis)."""
    column = contribution.diagnosis_keys.index(key)
    deltas = contribution.deltas[:, column]
    figure = go.Figure(go.Bar(x=contribution.series, y=deltas, marker_color=np.where(deltas >= 0, "#c62828", "#1565c0"),
                              hovertemplate="%{x}: %{y:+.3f}<extra></extra>"))
    figure.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10),
                         title=dict(text=f"Series contribution to {html.escape(name)} (logit with all series "
                                         "minus without this one)", font=dict(size=13)),
                         yaxis_title="logit change")
    return figure


def change_chart(pre: Prediction, post: Prediction, top: int = TOP_CHANGES) -> go.Figure:
    """Post minus pre logit of every diagnosis; the ``top`` largest changes by size, largest first."""
    pre_logits = {d.key: d.logit for d in pre.diagnoses}
    changes = sorted(((d.name, d.logit - pre_logits[d.key]) for d in post.diagnoses if d.key in pre_logits),
                     key=lambda item: abs(item[1]), reverse=True)[:top][::-1]
    values = [value for _, value in changes]
    figure = go.Figure(go.Bar(x=values, y=[name for name, _ in changes], orientation="h",
                              marker_color=["#c62828" if v > 0 else "#1565c0" for v in values],
                              hovertemplate="%{y}: %{x:+.3f}<extra></extra>"))
    figure.update_layout(height=max(320, 26 * len(changes) + 100), margin=dict(l=10, r=10, t=40, b=40),
                         title=dict(text="Logit change per diagnosis (post minus pre; red: more likely after)",
                                    font=dict(size=13)), xaxis_title="post − pre logit")
    return figure


def zero_shot_markdown(result: ZeroShot) -> str:
    rows = "\n".join(f"| {html.escape(n['name'])} | {n['similarity']:.3f} |" for n in result.nearest)
    return (f"**“{html.escape(result.text)}”** — similarity to this study: cosine **{result.cosine:+.3f}** "
            f"(CLIP logit {result.logit:+.2f}).\n\nNearest diagnoses by text:\n\n| Diagnosis | cosine |\n|---|---|\n{rows}")
