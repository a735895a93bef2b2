"""The diagnosis, referral and priority vocabulary (docs/design.md §5), read from ``data/labels.json``.

The clinical mapping is data so that a site can change it without touching code; every other
module (synthetic engine, heads, app) derives priority tiers and referrals through these functions.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable, Mapping


@dataclass(frozen=True)
class Diagnosis:
    key: str  # stable machine name, e.g. "tumor_adult_meningioma" (reference spelling kept)
    name: str  # display name shown to people, e.g. "Meningioma"
    tier: str  # priority tier this finding implies: "low", "medium" or "high"
    referrals: tuple[str, ...]  # referral keys this finding implies


@dataclass(frozen=True)
class LabelSpace:
    diagnoses: tuple[Diagnosis, ...]  # in model output order
    referral_keys: tuple[str, ...]  # in model output order
    referral_names: tuple[str, ...]  # display names, aligned with referral_keys
    priority_tiers: tuple[str, ...]  # ordered from least to most urgent

    @property
    def diagnosis_keys(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.diagnoses)

    def diagnosis(self, key: str) -> Diagnosis:
        for d in self.diagnoses:
            if d.key == key:
                return d
        raise KeyError(f"unknown diagnosis key {key!r}")

    def priority_of(self, positive_keys: Iterable[str]) -> str:
        """Highest tier among the positive diagnoses; the lowest tier when there are none."""
        rank = {t: i for i, t in enumerate(self.priority_tiers)}
        tiers = [self.diagnosis(k).tier for k in positive_keys]
        return max(tiers, key=rank.__getitem__, default=self.priority_tiers[0])

    def referrals_of(self, positive_keys: Iterable[str]) -> list[str]:
        """Referral keys implied by the positive diagnoses, in referral output order."""
        wanted = {r for k in positive_keys for r in self.diagnosis(k).referrals}
        return [r for r in self.referral_keys if r in wanted]

    def positives(self, labels: Mapping[str, int]) -> list[str]:
        """Keys whose value is truthy in a 52-key label dict (unknown keys raise ``KeyError``)."""
        for k in labels:
            self.diagnosis(k)
        return [k for k in self.diagnosis_keys if labels.get(k)]


def _parse(doc: dict) -> LabelSpace:
    tiers = tuple(doc["priority_tiers"])
    referral_keys = tuple(r["key"] for r in doc["referrals"])
    diagnoses = []
    for row in doc["diagnoses"]:
        if row["tier"] not in tiers:
            raise ValueError(f"diagnosis {row['key']!r} has unknown tier {row['tier']!r}")
        unknown = set(row["referrals"]) - set(referral_keys)
        if unknown:
            raise ValueError(f"diagnosis {row['key']!r} names unknown referrals {sorted(unknown)}")
        diagnoses.append(Diagnosis(row["key"], row["name"], row["tier"], tuple(row["referrals"])))
    return LabelSpace(tuple(diagnoses), referral_keys, tuple(r["name"] for r in doc["referrals"]), tiers)


@lru_cache(maxsize=1)
def _shipped_labels() -> dict:
    doc = json.loads(resources.files("prima").joinpath("data/labels.json").read_text(encoding="utf-8"))
    doc.pop("_comment", None)
    return doc


def default_labels_dict() -> dict:
    """The shipped ``prima/data/labels.json`` as a dict (the form a model config stores); a fresh copy."""
    return copy.deepcopy(_shipped_labels())


@lru_cache(maxsize=1)
def default_label_space() -> LabelSpace:
    """The project's 52-diagnosis label space shipped in ``prima/data/labels.json``."""
    return _parse(_shipped_labels())


def label_space_from_dict(doc: dict) -> LabelSpace:
    """A label space from a dict of the ``labels.json`` form (e.g. stored in a release config)."""
    return _parse(doc)
