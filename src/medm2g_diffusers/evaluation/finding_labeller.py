"""A rule-based finding labeller for radiology report text, with NegEx-style negation handling.

It reads a report the way a checker of generated text must: without the phrase templates the phantoms were
written from (so it also reads free text a model invents, or a real report) and without being told the
anatomy. The finding types are the keys of ``FINDING_VOCABULARY`` (:data:`FINDING_TYPES`).

Protocol (``LABELLER_PROTOCOL``):

1. Lower-case the text and split it into clauses at ``.`` (not a decimal point), ``;``, ``:``, ``!``, ``?``
   and line breaks; a clause is the widest negation scope.
2. Mask pseudo-negations that contain a cue but negate nothing ("no change in", "not excluded", "cannot be
   ruled out", "unchanged").
3. Cut each clause further at scope terminators ("but", "however", "although", "except", "apart from",
   "aside from", "other than", ", there is"): a cue before a terminator does not reach past it.
4. Find mentions with synonym rules per finding type (below). A mention is *negated* when a pre-negation
   cue ("no", "not", "without", "no evidence of", "negative for", "absence of", "free of", "neither",
   "nor", "resolution of") starts before the end of the mention in the same scope (a cue inside the
   mention counts: "the heart is *not* enlarged"), or a post-negation cue ("is not seen", "not
   identified", "absent", "has resolved", "excluded", "ruled out") follows it in the same scope. A mention
   is *hypothetical* when a hypothetical cue ("if", "consider", "to identify / exclude / evaluate / assess /
   rule out", "evaluate(d) for", "assess for") precedes it in the same scope: "further evaluation with CT
   to identify a small nodule" raises no nodule.
5. The labels are the types with at least one mention that is neither negated nor hypothetical. Hedged
   mentions ("possible", "may represent", "cannot be excluded") count as present (CheXpert's "uncertain as
   positive" policy): a report that raises a finding has said something about it.

Synonyms (a reader's list, not the phantom templates): pleural effusion = effusion(s) other than
pericardial or joint, pleural fluid, hydrothorax; cardiomegaly = cardiomegaly, cardiac enlargement, an
enlarged heart / cardiac silhouette / cardiac shadow, heart size increased (an enlarged *cardiomediastinal*
silhouette is mediastinal widening, not counted); nodule = nodule(s), micronodule(s), nodular opacity /
density; pneumothorax = pneumothorax, pneumothoraces, hydropneumothorax (also an effusion); consolidation =
consolidation / consolidative / consolidated, airspace opacity / disease / process, alveolar opacity
(pneumonia is a diagnosis, not counted by itself); pacemaker = pacemaker, pacer, pacing lead / wire /
generator, cardiac device, cardiac lead(s), AICD / ICD, defibrillator, pulse generator; haemorrhage =
haemorrhage / hemorrhage (any ending), haematoma / hematoma, bleed; midline shift = "midline shift",
"shift of the midline", "subfalcine shift / herniation", or "midline" and "shift" in one clause (so "the
midline is maintained without shift" is a negated mention; a chest report's "rightward shift of the
trachea" is not a midline shift).

``mass`` and ``tumour``: a space-occupying lesion is written "mass" in both a chest and a head report (the
phantom head reports say "rim-enhancing mass in the left frontal lobe"), so one rule finds "mass(es)",
"tumour / tumor", "neoplasm", "glioma", "glioblastoma", "meningioma", "enhancing lesion", "space-occupying
lesion" (never "mass effect"), and the *context* decides the type: ``tumour`` when its clause names the brain
(intracranial, brain, cerebral, frontal / parietal / temporal / occipital, basal ganglia, vasogenic,
FLAIR, ...), ``mass`` when it names the chest (lung, pulmonary, upper / middle / lower lobe, hilum,
mediastinum, pleura, ...); a clause naming neither takes the anatomy the whole report names more often;
a report naming neither gives ``mass`` for "mass" and ``tumour`` for the tumour words. A nodule is never a
mass (size is not read).

Measured (``scripts/check_finding_labeller.py``): micro and macro F1 = 1.0 and exact match 1.0 on all 4,000
reports of the tiny phantom dataset; on the 3,927 IU X-ray reports with text, micro F1 0.87 against the
collection's MeSH annotation on the six types it names (recall 0.94; most disagreements are hedged mentions
MeSH leaves out, e.g. "could represent a small effusion").

Known limits: granuloma, atelectasis, pneumonia, infiltrate and an enlarged cardiomediastinal silhouette are
not any of the types; "no large effusion" is a negated effusion (NegEx's reading, though a small one may be
present); a comma list after a cue is all in scope ("no pneumothorax, small effusion" negates both — write
"; " or ". " between them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from ..data.phantoms import FINDING_VOCABULARY

__all__ = [
    "FINDING_TYPES",
    "LABELLER_PROTOCOL",
    "FindingMention",
    "find_mentions",
    "finding_f1",
    "finding_types",
    "label_report",
    "label_report_with_attributes",
]

FINDING_TYPES: tuple[str, ...] = tuple(FINDING_VOCABULARY)

LABELLER_PROTOCOL = (
    "rule-based labeller (medm2g_diffusers.evaluation.finding_labeller): synonym rules per finding type, "
    "NegEx-style pre/post negation and hypothetical cues scoped to the clause, pseudo-negations masked, hedged "
    "mentions positive; "
    "'mass' typed as tumour or mass from the clause's (else the report's) anatomy words"
)

_CLAUSE_SPLIT = re.compile(r"(?<!\d)\.|\.(?!\d)|[;:!?\n]")
# Phrases that contain a negation cue but negate nothing; masked before cues are searched.
_PSEUDO_NEGATION = re.compile(
    r"\b(?:no|without)\s+(?:significant\s+)?(?:interval\s+)?(?:change|increase|decrease)\b"
    r"|\bnot\s+(?:significantly\s+)?changed\b|\bunchanged\b|\bnot\s+only\b|\bnot\s+necessarily\b"
    r"|\b(?:can\s*not|could\s+not|not)\s+(?:be\s+)?(?:excluded|exclude|ruled\s+out|rule\s+out)\b"
)
_TERMINATOR = re.compile(
    r"\b(?:but|however|although|though|whereas|except|apart\s+from|aside\s+from|other\s+than)\b|,\s*there\s+(?:is|are)\b"
)
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|none|neither|nor|negative\s+for|absence\s+of|absent|free\s+of|free\s+from|clear\s+of|"
    r"resolution\s+of)\b|n't\b"
)
_HYPOTHETICAL = re.compile(
    r"\b(?:if|consider|to\s+(?:identify|exclude|evaluate|assess|rule\s+out)|evaluat(?:e|ed|ion)\s+for|assess\s+for)\b"
)
_POST_NEGATION = re.compile(
    r"\b(?:not|no\s+longer)\s+(?:be\s+)?(?:seen|identified|present|visuali[sz]ed|demonstrated|appreciated|evident|"
    r"noted|detected|shown|apparent|enlarged)\b|\babsent\b|\bresolved\b|\bexcluded\b|\bruled\s+out\b"
)

# Gap between a subject and its predicate inside one phrase: no clause punctuation, a few words at most.
_GAP = r"[^.;,]{0,30}?"
_FINDING_PATTERNS: dict[str, re.Pattern[str]] = {
    "pleural_effusion": re.compile(
        r"(?<!pericardial )(?<!joint )\beffusions?\b|\bpleural\s+fluid\b|\bhydrothorax\b|\bhydropneumothorax\b"
    ),
    "cardiomegaly": re.compile(
        r"\bcardiomegaly\b|\bcardiac\s+enlargement\b"
        r"|\b(?:enlarged|enlargement\s+of\s+the|increased)\s+(?:heart|cardiac\s+(?:silhouette|shadow|size))\b"
        rf"|\b(?:heart|cardiac\s+silhouette|cardiac\s+shadow|cardiac\s+size|heart\s+size)\b{_GAP}"
        r"\b(?:enlarged|increased|enlargement)\b"
    ),
    "nodule": re.compile(r"\b(?:micro)?nodules?\b|\bnodular\s+(?:opacit(?:y|ies)|densit(?:y|ies))\b"),
    "pneumothorax": re.compile(r"\b(?:hydro)?pneumothora(?:x|ces)\b"),
    "consolidation": re.compile(
        r"\bconsolidat(?:ion|ions|ive|ed)\b"
        r"|\bair[\s-]?space\s+(?:opacit(?:y|ies)|opacification|disease|process)\b"
        r"|\balveolar\s+(?:opacit(?:y|ies)|consolidation)\b"
    ),
    "pacemaker": re.compile(
        r"\bpace\s?makers?\b|\bpacers?\b|\bpacing\s+(?:leads?|wires?|generator|device)\b|\bcardiac\s+(?:devices?|leads?)\b"
        r"|\ba?icds?\b|\bdefibrillators?\b|\bpulse\s+generator\b"
    ),
    "haemorrhage": re.compile(r"\bha?emorrhag\w*|\bha?ematomas?\b|\bbleeds?\b|\bbleeding\b"),
    "midline_shift": re.compile(
        r"\bmidline\s+shift\b|\bshift\s+of\s+the\s+midline\b|\bsubfalcine\s+(?:shift|herniation)\b"
        r"|\bmidline\b[^.;]{0,40}?\bshift(?:ed)?\b|\bshift(?:ed)?\b[^.;]{0,30}?\bmidline\b"
    ),
}
# One rule for space-occupying lesions; the anatomy words around it decide between mass and tumour.
_NEOPLASM = re.compile(
    r"\bmass(?:es)?\b(?![\s-]+effect)|\btumou?rs?\b|\bneoplasms?\b|\bglioma\b|\bglioblastoma\b|\bmeningioma\b"
    r"|\b(?:ring|rim)?[\s-]?enhancing\s+lesions?\b|\bspace[\s-]occupying\s+lesions?\b"
)
_TUMOUR_WORDS = re.compile(r"\btumou?rs?\b|\bneoplasms?\b|\bglioma\b|\bglioblastoma\b|\bmeningioma\b")
_HEAD_WORDS = re.compile(
    r"\b(?:intracranial|intra-axial|extra-axial|brain|cerebral|cerebellar|cerebellum|frontal|parietal|temporal|"
    r"occipital|basal\s+ganglia|thalamic|thalamus|vasogenic|perilesional|flair|supratentorial|infratentorial|"
    r"posterior\s+fossa|brainstem|calvarium|calvarial|skull|falx|subfalcine|midline\s+shift|grey[\s-]white|"
    r"gray[\s-]white|ventricles)\b"
)
_CHEST_WORDS = re.compile(
    r"\b(?:lungs?|pulmonary|(?:upper|middle|lower)\s+lobes?|lingula\w*|hil(?:um|ar|a)|perihilar|mediastin\w*|"
    r"chest|thorax|thoracic|pleura\w*|costophrenic|bronch\w*|ribs?|cardiopulmonary|breast|axilla\w*)\b"
)


@dataclass(frozen=True)
class FindingMention:
    """One mention of a finding type in a report.

    Attributes:
        finding (`str`): one of :data:`FINDING_TYPES`.
        phrase (`str`): the matched words (lower case).
        clause (`str`): the negation scope it was found in (lower case, pseudo-negations masked).
        negated (`bool`): whether a negation cue covers it.
        hypothetical (`bool`): whether a hypothetical cue ("if", "to exclude", ...) precedes it.
    """

    finding: str
    phrase: str
    clause: str
    negated: bool
    hypothetical: bool = False

    @property
    def affirmed(self) -> bool:
        """The report says the finding is there (possibly hedged)."""
        return not (self.negated or self.hypothetical)


def _anatomy_votes(text: str) -> int:
    """> 0 when ``text`` names the head more often than the chest, < 0 for the chest, 0 for a tie."""
    return len(_HEAD_WORDS.findall(text)) - len(_CHEST_WORDS.findall(text))


def _neoplasm_type(phrase: str, clause: str, report_votes: int) -> str:
    votes = _anatomy_votes(clause) or report_votes
    if votes:
        return "tumour" if votes > 0 else "mass"
    return "tumour" if _TUMOUR_WORDS.search(phrase) else "mass"


def _is_negated(scope: str, start: int, end: int) -> bool:
    if any(cue.start() < end for cue in _PRE_NEGATION.finditer(scope)):
        return True
    return any(cue.start() >= start for cue in _POST_NEGATION.finditer(scope))


def _mention(finding: str, match: re.Match[str], clause: str, scope: str) -> FindingMention:
    negated = _is_negated(scope, match.start(), match.end())
    hypothetical = any(cue.start() < match.start() for cue in _HYPOTHETICAL.finditer(scope))
    return FindingMention(finding, match.group(0), clause, negated, hypothetical)


def _scopes(text: str) -> list[tuple[str, str]]:
    """(clause, scope) pairs: the clause for anatomy context, the scope for negation."""
    pairs = []
    for clause in _CLAUSE_SPLIT.split(text.lower()):
        clause = " ".join(_PSEUDO_NEGATION.sub(" _ ", clause).split())
        if not clause:
            continue
        bounds = [0, *(m.start() for m in _TERMINATOR.finditer(clause)), len(clause)]
        pairs += [(clause, clause[a:b]) for a, b in pairwise(bounds) if clause[a:b].strip()]
    return pairs


def find_mentions(text: str) -> list[FindingMention]:
    """Every mention of a finding type in ``text``, clause by clause, each marked negated / hypothetical or not.

    Args:
        text (`str`): a radiology report (any case, any sections).

    Returns:
        `list[FindingMention]`.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a report string; got {type(text).__name__}")
    report_votes = _anatomy_votes(text.lower())
    mentions = []
    for clause, scope in _scopes(text):
        for finding, pattern in _FINDING_PATTERNS.items():
            for m in pattern.finditer(scope):
                mentions.append(_mention(finding, m, clause, scope))
        for m in _NEOPLASM.finditer(scope):
            mentions.append(_mention(_neoplasm_type(m.group(0), clause, report_votes), m, clause, scope))
    return mentions


def label_report(text: str) -> set[str]:
    """The finding types a report affirms (mentioned, neither negated nor hypothetical).

    Args:
        text (`str`): a radiology report.

    Returns:
        `set[str]`: a subset of :data:`FINDING_TYPES`; empty for a normal report.

    Example:
        >>> sorted(label_report("Small left pleural effusion. No pneumothorax. The heart is not enlarged."))
        ['pleural_effusion']
    """
    return {m.finding for m in find_mentions(text) if m.affirmed}


_SIDE_WORDS = re.compile(r"\b(?:left|right|bilateral)\b")
_CHEST_LOBE = re.compile(r"\b(left|right)\s+(upper|middle|lower)\s+lobe\b")
_BRAIN_LOBE = re.compile(r"\b(frontal|parietal|temporal|occipital)\b")


def _clause_attribute(pattern: re.Pattern[str], clause: str, group=lambda m: m.group(0)) -> str | None:
    """The one value ``pattern`` finds in ``clause``; ``None`` when it finds none or several different ones."""
    values = {group(m) for m in pattern.finditer(clause)}
    return values.pop() if len(values) == 1 else None


def label_report_with_attributes(text: str) -> frozenset[tuple[str, str | None, str | None]]:
    """The affirmed findings of a report as a set of ``(type, side, lobe)``, read from the text alone.

    The attributes follow :data:`FINDING_VOCABULARY`: ``side`` ("left", "right", "bilateral") only for the
    types that have one, ``lobe`` (chest "RUL".."LLL", head "frontal".."occipital") only for those that have
    one; each is read from the mention's clause and is ``None`` when the clause names none or several
    different values ("left effusion and right pneumothorax" in one clause leaves both sides ``None``).
    The result has the shape of the ground-truth identity used for finding agreement, so it can group
    reports that say the same thing (the alignment stage's ``soft_targets``) on real text as on phantoms.

    Example:
        >>> sorted(label_report_with_attributes("Small left pleural effusion. Consolidation in the right lower lobe."))
        [('consolidation', 'right', 'RLL'), ('pleural_effusion', 'left', None)]
    """
    labels = set()
    for mention in find_mentions(text):
        if not mention.affirmed:
            continue
        spec = FINDING_VOCABULARY[mention.finding]
        side = _clause_attribute(_SIDE_WORDS, mention.clause) if "side" in spec else None
        lobe = None
        if "lobe" in spec:
            if spec["anatomy"] == "chest":
                lobe = _clause_attribute(_CHEST_LOBE, mention.clause, lambda m: f"{m.group(1)[0]}{m.group(2)[0]}L".upper())
            else:
                lobe = _clause_attribute(_BRAIN_LOBE, mention.clause)
        labels.add((mention.finding, side, lobe))
    return frozenset(labels)


def finding_types(findings: str | Iterable[Any]) -> set[str]:
    """Finding types of structured findings: a JSON string or list of ``{"type": ...}`` dicts (the phantom
    datasets' ``findings`` column), or an iterable of type names.

    Raises:
        ValueError: on a type that is not one of :data:`FINDING_TYPES`.
    """
    if isinstance(findings, str):
        findings = json.loads(findings)
    types = {item["type"] if isinstance(item, dict) else item for item in findings}
    unknown = sorted(str(t) for t in types - set(FINDING_TYPES))
    if unknown:
        raise ValueError(f"finding types must be a subset of {list(FINDING_TYPES)}; got {unknown}")
    return types


def _as_sets(items: Sequence[Any], parameter: str) -> list[set[str]]:
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise ValueError(f"{parameter} must be a list of reports or of finding sets; got {type(items).__name__}")
    sets = []
    for i, item in enumerate(list(items)):
        if isinstance(item, str):
            sets.append(label_report(item))
        elif isinstance(item, Iterable):
            try:
                sets.append(finding_types(item))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{parameter}[{i}]: {error}") from error
        else:
            raise ValueError(f"{parameter}[{i}] must be a report string or a set of finding types; got {type(item).__name__}")
    return sets


def _ratio(numerator: int, denominator: int, empty: float) -> float:
    return numerator / denominator if denominator else empty


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    # 0/0 reads as perfect only when there was nothing to get wrong (no errors of the other kind either).
    return {
        "precision": _ratio(tp, tp + fp, 1.0 if fn == 0 else 0.0),
        "recall": _ratio(tp, tp + fn, 1.0 if fp == 0 else 0.0),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
    }


def finding_f1(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, Any]:
    """Finding-level agreement of predicted reports with references.

    Each item of either list is a report string (labelled with :func:`label_report`) or structured findings
    (a set / list of type names, or of ``{"type": ...}`` dicts; see :func:`finding_types`).

    Args:
        predictions (`list`): generated reports (or their finding sets), one per example.
        references (`list`): the reference reports or ground-truth finding sets, aligned with ``predictions``.

    Returns:
        `dict`: ``micro_precision``, ``micro_recall``, ``micro_f1`` (pooled over every (example, type) pair);
        ``macro_precision``, ``macro_recall``, ``macro_f1`` (mean over the types present in at least one
        reference); ``exact_match`` (fraction of examples whose predicted set equals the reference set);
        ``per_type`` (``{type: {precision, recall, f1, support}}`` for every type in references or
        predictions); ``n``; ``types`` (the macro-averaged types); ``protocol``. A ratio with a zero
        denominator is 1.0 when there was nothing to get wrong, else 0.0.

    Example:
        >>> finding_f1(["No effusion. Cardiomegaly."], [{"cardiomegaly"}])["micro_f1"]
        1.0
    """
    predicted = _as_sets(predictions, "predictions")
    reference = _as_sets(references, "references")
    if len(predicted) != len(reference):
        raise ValueError(f"predictions and references must have equal lengths; got {len(predicted)} and {len(reference)}")
    if not reference:
        raise ValueError("references must not be empty")
    counts = {t: [0, 0, 0, 0] for t in FINDING_TYPES}  # tp, fp, fn, support
    for p, r in zip(predicted, reference):
        for t in FINDING_TYPES:
            counts[t][0] += t in p and t in r
            counts[t][1] += t in p and t not in r
            counts[t][2] += t in r and t not in p
            counts[t][3] += t in r
    per_type = {t: {**_prf(*c[:3]), "support": c[3]} for t, c in counts.items() if c[0] + c[1] + c[2] > 0}
    micro = _prf(*(sum(c[i] for c in counts.values()) for i in range(3)))
    present = [t for t in FINDING_TYPES if counts[t][3] > 0]
    macro = {k: sum(per_type[t][k] for t in present) / len(present) if present else micro[k] for k in micro}
    return {
        **{f"micro_{k}": v for k, v in micro.items()},
        **{f"macro_{k}": v for k, v in macro.items()},
        "exact_match": sum(p == r for p, r in zip(predicted, reference)) / len(reference),
        "per_type": per_type,
        "n": len(reference),
        "types": present,
        "protocol": LABELLER_PROTOCOL,
    }
