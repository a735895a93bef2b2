"""Labels from free-text radiology reports: a keyword prefilter, then a pluggable yes/no judge.

The Prima paper labels real reports with an LLM in two steps: a cheap keyword prefilter per diagnosis
(does the report mention anything related to it?), then a yes/no judge per (report, diagnosis) pair the
prefilter kept. ``ReportLabeler`` runs the same two steps with any ``Judge``; the shipped ``RuleJudge``
is rule-based and negation-aware (NegEx-style), so the pipeline runs offline. Policy and how to plug in
another judge: ``docs/labeler.md``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Mapping, Protocol

from prima.labels import default_label_space
from prima.manifest import StudyEntry


class Judge(Protocol):
    """Decides whether one diagnosis is positive in one report."""

    def __call__(self, report: str, key: str, mentions: list[str]) -> bool:
        """Whether diagnosis ``key`` is positive in ``report``.

        Args:
            report: the whole report text.
            key: a diagnosis key of ``prima.labels.default_label_space()``.
            mentions: the report's items/sentences the prefilter found mentioning ``key`` (never empty).
        """
        ...


_HEM = r"ha?emorrhages?"

# Lowercase regex fragments per diagnosis, matched as whole words (``\w*`` for word stems). Specific
# keys keep their own terms out of the general ones (lookbehinds), as the label space separates them:
# a brainstem glioma or pilocytic astrocytoma is its own pediatric key, not the adult glioma, and a
# subarachnoid, intraventricular or subdural bleed is not the (parenchymal or epidural) intracranial hemorrhage.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "cyst_arachnoid_cyst": (r"arachnoid cysts?",),
    "cyst_colloid_cyst": (r"colloid cysts?",),
    "developmental_dandy_walker_malformation": (r"dandy[- ]walker",),
    "developmental_dysgenesis_corpus_callosum": (
        r"(?:a|dys|hypo)genesis of the corpus callosum", r"corpus callosum (?:a|dys|hypo)genesis",
        r"callosal (?:a|dys|hypo)genesis", r"absen(?:t|ce of)(?: the)?(?: \w+)? corpus callosum"),
    "developmental_heterotopia": (r"heterotopi\w*",),
    "infectious_brain_abscess": (r"abscess(?:es)?",),
    "infectious_viral_encephalitis": (r"(?:meningo)?encephalitis", r"herpes", r"hsv"),
    "inflammatory_multiple_sclerosis": (r"multiple sclerosis", r"ms (?:plaques?|lesions?)", r"demyelinat\w*",
                                        r"dawson'?s? fingers?"),
    "inflammatory_neurosarcoid": (r"(?:neuro-?)?sarcoid\w*",),
    "sellar_craniopharyngioma": (r"craniopharyngiomas?",),
    "sellar_pituitary_adenoma": (r"pituitary (?:macro|micro)?adenomas?", r"(?:macro|micro)adenomas?",
                                 r"pituitary (?:tumou?r|neoplasm)s?"),
    "sellar_rathkes_cleft_cyst": (r"rathke'?s?(?: cleft)? cysts?", r"rathke'?s? cleft"),
    "spine_syrinx": (r"syrinx", r"syring\w*", r"hydromyelia"),
    "structural_brain_herniation": (
        r"(?:brain|cerebral|subfalcine|transtentorial|uncal|tonsillar|tentorial|transforaminal|central|"
        r"transcalvarial|upward|downward)\)? herniation",),
    "structural_cephaloceles": (r"(?:meningo)?(?:en)?cephaloceles?", r"meningoceles?"),
    "structural_cerebral_atrophy": (r"atroph\w*", r"volume loss"),
    "structural_chiari_malformation": (r"chiari", r"tonsillar (?:ectopia|descent)"),
    "structural_edema": (r"o?edema",),
    "structural_encephalomalacia": (r"encephalomalaci\w*", r"porencephal\w*"),
    "structural_mass_effect": (r"mass effect",),
    "structural_midline_shift": (r"midline shift", r"shift of the midline", r"(?:left|right)ward shift"),
    "surgical_catheter": (r"catheters?", r"shunts?", r"ventriculostomy", r"external ventricular drain", r"evd"),
    "surgical_craniotomy": (r"craniotom\w*", r"craniectom\w*", r"burr[- ]holes?", r"cranioplasty"),
    "surgical_resection_cavity": (r"resection (?:cavity|bed)", r"(?:surgical|post-?operative) (?:resection )?cavity"),
    "trauma_brain_contusion": (r"contusions?",),
    "trauma_diffuse_axonal_injury": (r"diffuse axonal injury", r"(?:traumatic )?axonal injury", r"dai",
                                     r"shear(?:ing)? injur\w*"),
    "trauma_subdural_hematoma": (r"subdural", r"sdh"),
    "tumor_adult_brain_metastasis": (r"metasta\w*", r"mets"),
    "tumor_adult_glioma": (
        r"(?<!brainstem )(?<!brain stem )(?<!pontine )(?<!midline )gliomas?", r"glial neoplasm",
        r"(?<!pilocytic )astrocytomas?", r"oligodendrogliomas?", r"glioblastomas?", r"gbm"),
    "tumor_adult_high_grade_glioma": (r"high[- ]grade gliomas?", r"glioblastomas?", r"gbm",
                                      r"grade (?:3|4|iii|iv) (?:astrocytoma|glioma)s?", r"anaplastic astrocytomas?"),
    "tumor_adult_low_grade_glioma": (r"low[- ]grade gliomas?", r"grade (?:2|ii) (?:astrocytoma|glioma)s?",
                                     r"diffuse astrocytomas?"),
    "tumor_adult_lymphoma": (r"lymphomas?", r"pcnsl"),
    "tumor_adult_meningioma": (r"meningiomas?",),
    "tumor_adult_pineal_tumor": (r"pineal (?:region )?(?:tumou?r|mass|neoplasm)s?", r"pineoblastomas?",
                                 r"pineocytomas?"),
    "tumor_adult_schwannoma": (r"schwannomas?", r"acoustic neuromas?"),
    "tumor_pediatric_brainstem_glioma": (r"brain ?stem gliomas?", r"pontine gliomas?", r"dipg",
                                         r"diffuse midline gliomas?"),
    "tumor_pediatric_ependymoma": (r"ependymomas?",),
    "tumor_pediatric_germ_cell_tumor": (r"germ cell tumou?rs?", r"germinomas?", r"teratomas?"),
    "tumor_pediatric_medulloblastoma": (r"medulloblastomas?",),
    "tumor_pediatric_pilocytic_astrocytoma": (r"pilocytic astrocytomas?", r"pilocytic", r"jpa"),
    "vascular_hemorrhagic_intracranial_hemorrhage": (
        rf"(?<!subarachnoid )(?<!intraventricular )(?<!subdural ){_HEM}",
        r"(?:intracerebral|intraparenchymal|parenchymal|epidural|extradural) hematomas?", r"ich"),
    "vascular_hemorrhagic_intraventricular_hemorrhage": (rf"intraventricular (?:{_HEM}|blood|hematoma)", r"ivh"),
    "vascular_hemorrhagic_subarachnoid_hemorrahage": (rf"subarachnoid (?:{_HEM}|blood|bleed\w*)", r"sah"),
    "vascular_ischemic_lacunar_stroke": (r"lacun\w*",),
    "vascular_ischemic_large_vessel_stroke": (
        r"large vessel", r"(?:artery|mca|aca|pca|ica) territory", r"territorial (?:infarct\w*|stroke)",
        r"(?:mca|aca|pca) (?:infarct\w*|stroke)",
        r"(?<!small )(?<!lacunar )(?<!watershed )(?<!small acute )(?<!small chronic )(?<!small subacute )"
        r"(?:infarct(?:s|ion)?|stroke)"),
    "vascular_ischemic_moyamoya": (r"moya-?moya", r"puff of smoke"),
    "vascular_ischemic_small_vessel_disease": (
        r"small vessel", r"microvascular", r"microangiopath\w*", r"leukoaraiosis", r"fazekas",
        r"white matter hyperintensities of presumed vascular origin"),
    "vascular_malformation_arteriovenous_malformation": (r"arteriovenous malformations?", r"avms?"),
    "vascular_malformation_cavernoma": (r"cavernomas?", r"cavernous (?:malformation|angioma|hemangioma)s?"),
    "vascular_malformation_cerebral_aneurysm": (r"aneurysm\w*",),
    "ventricular_intracranial_hypotension": (r"intracranial hypotension", r"brain sag\w*",
                                             r"sagging of the brain\w*", r"csf leak\w*"),
    "ventricular_ventriculomegaly": (r"ventriculomegaly", r"hydrocephal\w*"),
}

# A positive first key makes each of the others positive: a graded glioma is a glioma, and a
# resection cavity needs a craniotomy (the synthetic engine's ``pathology.IMPLIES`` agrees).
IMPLIES: dict[str, tuple[str, ...]] = {
    "tumor_adult_high_grade_glioma": ("tumor_adult_glioma",),
    "tumor_adult_low_grade_glioma": ("tumor_adult_glioma",),
    "surgical_resection_cavity": ("surgical_craniotomy",),
}

_NUMBERED = re.compile(r"^\s*\d+[.)]\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Negation and its kin do not reach past a clause boundary. A "compatible with"-style phrase after a
# comma starts a new clause too: it asserts the diagnosis the preceding description builds up to
# ("without restricted diffusion, consistent with an arachnoid cyst").
_CLAUSE_BOUNDARY = re.compile(
    r"[.;:!?](?=\s|$)|\b(?:but|however|although|though|whereas|except|aside from|apart from|which)\b"
    r"|,(?=\s*(?:compatible with|consistent with|in keeping with|(?:most )?suggestive of|likely representing"
    r"|concerning for|suspicious for|favou?ring)\b)", re.I)

# Triggers before the term (``_PRE``) or after it (``_POST``), in the clause of the term.
_UNCERTAIN_PRE = re.compile(
    r"\b(?:can ?not (?:exclude|rule out)|possibl[ey]|questionabl[ey]|may (?:represent|reflect|be)|"
    r"could (?:represent|reflect|be)|might (?:represent|be)|equivocal|indeterminate|concerning for|"
    r"suspicious for|differential (?:diagnosis )?(?:includes|considerations?)|versus|vs)\b", re.I)
_UNCERTAIN_POST = re.compile(
    r"\b(?:can ?not be (?:excluded|ruled out)|(?:is|are) not (?:excluded|ruled out)|(?:is|are) (?:possible|"
    r"questionable|not excluded)|versus|vs)\b", re.I)
_RESOLVED_PRE = re.compile(r"\b(?:resolved|(?:interval )?resolution of)\b", re.I)
_RESOLVED_POST = re.compile(
    r"\b(?:(?:has|have) (?:since )?resolved|resolved|no longer (?:seen|present|visible|visualized|evident|"
    r"identified|demonstrated)|(?:is|are) no longer)\b", re.I)
# An indication ("rule out stroke", "evaluate for hemorrhage") asks a question; it asserts nothing.
_NEGATED_PRE = re.compile(
    r"\b(?:no(?! longer)|without|negative for|free of|absence of|absent|not|never|ruled out|rules? out|r/o|"
    r"evaluat(?:e|ion) for|to exclude)(?!\w)", re.I)
# NegEx pseudo-triggers: negation words that do not negate the finding ("no change in the meningioma").
_PSEUDO_NEGATION = re.compile(
    r"\b(?:no|without) (?:significant |appreciable |interval |definite )?(?:change|increase|decrease|growth|"
    r"progression|enlargement)\b|\bnot only\b", re.I)
_NEGATED_POST = re.compile(
    r"\b(?:(?:is|are|was|were) )?(?:not (?:seen|present|identified|visualized|demonstrated|evident|appreciated)|"
    r"absent|ruled out|excluded)\b", re.I)

POSITIVE, NEGATED, RESOLVED, UNCERTAIN = "positive", "negated", "resolved", "uncertain"


@lru_cache(maxsize=None)
def _compiled(fragments: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(fragments) + r")\b", re.I)


def _check_keywords(keywords: Mapping[str, tuple[str, ...]]) -> None:
    known = set(default_label_space().diagnosis_keys)
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise ValueError(f"keywords name unknown diagnosis keys {unknown}")
    empty = sorted(key for key, fragments in keywords.items() if not fragments)
    if empty:
        raise ValueError(f"keywords of {empty} are empty")


def report_mentions(report: str) -> list[str]:
    """The report split into mentions: numbered items ("1. ...", wrapped lines joined), else sentences.

    Paragraphs are separated by blank lines; prose outside numbered items is split into sentences.
    """
    mentions: list[str] = []
    for block in re.split(r"\n\s*\n", report):
        prose: list[str] = []  # lines before the block's first numbered item
        items: list[list[str]] = []  # lines of each numbered item; later lines continue the last one
        for line in block.splitlines():
            if _NUMBERED.match(line):
                items.append([_NUMBERED.sub("", line)])
            elif items:
                items[-1].append(line)
            else:
                prose.append(line)
        mentions += _SENTENCE_END.split(" ".join(prose).strip())
        mentions += [" ".join(item) for item in items]
    return [" ".join(m.split()) for m in mentions if m.strip()]


def keyword_prefilter(report: str, keys: Iterable[str] | None = None,
                      keywords: Mapping[str, tuple[str, ...]] = KEYWORDS) -> dict[str, list[str]]:
    """Per diagnosis, the report's items/sentences that mention one of its keywords.

    Args:
        report: free-text report.
        keys: the diagnoses to look for (default: every key of ``keywords``).
        keywords: diagnosis key -> regex fragments (``KEYWORDS`` form).

    Returns:
        key -> its mentions, in report order; keys without a mention are left out.

    Raises:
        ValueError: ``keys`` names a diagnosis without keywords.
    """
    wanted = list(keywords) if keys is None else list(keys)
    missing = [key for key in wanted if key not in keywords]
    if missing:
        raise ValueError(f"no keywords for {missing}")
    mentions = report_mentions(report)
    found: dict[str, list[str]] = {}
    for key in wanted:
        pattern = _compiled(tuple(keywords[key]))
        hits = [mention for mention in mentions if pattern.search(mention)]
        if hits:
            found[key] = hits
    return found


def _clause_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    """(start, end) of the clause of ``text`` holding the span ``start:end``."""
    left, right = 0, len(text)
    for boundary in _CLAUSE_BOUNDARY.finditer(text):
        if boundary.end() <= start:
            left = boundary.end()
        elif boundary.start() >= end:
            right = boundary.start()
            break
    return left, right


class RuleJudge:
    """The shipped ``Judge``: NegEx-style assertion of each keyword occurrence in its clause.

    An occurrence is uncertain ("cannot exclude", "possible", "may represent", ...), else resolved
    ("resolved", "interval resolution of", "no longer seen"), else negated ("no", "without", "negative
    for", "free of", "ruled out", ...), else positive; triggers count only inside the occurrence's clause
    (it ends at "but", "however", ";", "." and similar). A diagnosis is positive when one of its
    occurrences is positive, or uncertain under ``uncertain_positive``.
    """

    def __init__(self, keywords: Mapping[str, tuple[str, ...]] = KEYWORDS, uncertain_positive: bool = True) -> None:
        """
        Args:
            keywords: diagnosis key -> regex fragments locating the diagnosis in a mention.
            uncertain_positive: count uncertain mentions as positive (the usual choice when labelling
                for screening: a finding the radiologist could not exclude should be looked at).
        """
        _check_keywords(keywords)
        self.keywords = dict(keywords)
        self.uncertain_positive = uncertain_positive

    def assertions(self, mention: str, key: str) -> list[str]:
        """The assertion (``POSITIVE``, ``NEGATED``, ``RESOLVED`` or ``UNCERTAIN``) of each occurrence of
        ``key``'s keywords in ``mention``, in order.

        Raises:
            ValueError: ``key`` has no keywords.
        """
        if key not in self.keywords:
            raise ValueError(f"no keywords for {key!r}")
        out = []
        for match in _compiled(tuple(self.keywords[key])).finditer(mention):
            left, right = _clause_bounds(mention, match.start(), match.end())
            before = _PSEUDO_NEGATION.sub(" ", mention[left:match.start()])
            after = _PSEUDO_NEGATION.sub(" ", mention[match.end():right])
            if _UNCERTAIN_PRE.search(before) or _UNCERTAIN_POST.search(after):
                out.append(UNCERTAIN)
            elif _RESOLVED_PRE.search(before) or _RESOLVED_POST.search(after):
                out.append(RESOLVED)
            elif _NEGATED_PRE.search(before) or _NEGATED_POST.search(after):
                out.append(NEGATED)
            else:
                out.append(POSITIVE)
        return out

    def __call__(self, report: str, key: str, mentions: list[str]) -> bool:
        accepted = {POSITIVE, UNCERTAIN} if self.uncertain_positive else {POSITIVE}
        return any(a in accepted for mention in mentions for a in self.assertions(mention, key))


class ReportLabeler:
    """Report -> 0/1 per diagnosis: the keyword prefilter, then the judge on the keys it found.

    The judge is asked only about the diagnoses a report mentions (an LLM judge is expensive);
    ``implies`` then adds the diagnoses the positive ones imply.
    """

    def __init__(self, judge: Judge | None = None, keywords: Mapping[str, tuple[str, ...]] = KEYWORDS,
                 implies: Mapping[str, tuple[str, ...]] = IMPLIES) -> None:
        """
        Args:
            judge: decides each prefiltered (report, key) pair; ``RuleJudge(keywords)`` by default.
            keywords: diagnosis key -> regex fragments; keys left out are never positive.
            implies: key -> keys a positive key makes positive too.

        Raises:
            ValueError: ``keywords`` or ``implies`` name an unknown diagnosis, or a key's keywords are empty.
        """
        _check_keywords(keywords)
        self.space = default_label_space()
        unknown = sorted({k for key, keys in implies.items() for k in (key, *keys)} - set(self.space.diagnosis_keys))
        if unknown:
            raise ValueError(f"implies names unknown diagnosis keys {unknown}")
        self.keywords = dict(keywords)
        self.implies = dict(implies)
        self.judge: Judge = judge if judge is not None else RuleJudge(self.keywords)

    def label(self, report: str) -> dict[str, int]:
        """All diagnosis keys of the label space -> 0/1 for ``report``."""
        positive = {key for key, mentions in keyword_prefilter(report, keywords=self.keywords).items()
                    if self.judge(report, key, mentions)}
        todo = list(positive)
        while todo:
            for implied in self.implies.get(todo.pop(), ()):
                if implied not in positive:
                    positive.add(implied)
                    todo.append(implied)
        return {key: int(key in positive) for key in self.space.diagnosis_keys}

    def label_many(self, reports: Iterable[str]) -> list[dict[str, int]]:
        """``label`` of each report, in order."""
        return [self.label(report) for report in reports]


def labels_for(entry: StudyEntry, labeler: ReportLabeler) -> dict[str, int]:
    """A study's labels: its manifest labels when it has them (synthetic or curated), else its report's.

    Args:
        entry: a manifest study.
        labeler: labels ``entry.report`` when ``entry.labels`` is empty.

    Returns:
        Diagnosis key -> 0/1.
    """
    return dict(entry.labels) if entry.labels else labeler.label(entry.report)
