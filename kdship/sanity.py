"""Results that look wrong, caught where they appear: a classifier at or below what always answering the most
frequent class scores (a collapsed model), agreement with the teacher below that, and a student above its teacher
(the teacher may be undertrained). Training warns after each evaluation and marks the record; `kdship eval`
marks eval.json; `kdship gate` fails a collapsed run; a pipeline stops at a collapsed stage."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

LIKELY_CAUSES = ("likely causes: a learning rate too high or too low for this student, too few steps for a "
                 "randomly initialised student, feature losses outweighing the prediction losses, or a stage that "
                 "reset the classifier; see the README's 'When a student collapses'")


@dataclass(frozen=True)
class Baseline:
    """What a classifier that learned nothing scores on one eval set."""

    majority_rate: float  # always answering the most frequent class
    majority_label: str
    chance: float  # answering uniformly at random

    @property
    def floor(self) -> float:
        return max(self.majority_rate, self.chance)

    @staticmethod
    def of(labels: Sequence[int], label_names: Sequence[str]) -> "Baseline | None":
        if not labels:
            return None
        label, count = Counter(labels).most_common(1)[0]
        return Baseline(count / len(labels), str(label_names[label]), 1.0 / len(label_names))


def top_prediction_share(top: Any) -> float:
    """The share of the most predicted class among top choices (a tensor of class ids): 1.0 is one answer for all."""
    return top.bincount().max().item() / max(len(top), 1)


def findings(metrics: dict[str, Any], baseline: Baseline | None) -> list[str]:
    """Why these classification metrics look collapsed (empty when they do not)."""
    if baseline is None or "accuracy" not in metrics:
        return []
    found = []
    floor = f"the majority-class rate {baseline.floor:.1%} (always '{baseline.majority_label}')"
    if metrics["accuracy"] <= baseline.floor + 1e-6:
        found.append(f"accuracy {metrics['accuracy']:.1%} is at or below {floor}")
    if "agreement" in metrics and metrics["agreement"] <= baseline.floor + 1e-6:
        found.append(f"agreement with the teacher {metrics['agreement']:.1%} is at or below {floor}")
    if metrics.get("top_prediction_share", 0.0) >= 0.999:
        found.append("it predicts one class for every example")
    return found


def checks_record(metrics: dict[str, Any], baseline: Baseline | None) -> dict[str, Any]:
    """What a record says about its metrics: collapsed or not, why, and against which baseline."""
    if baseline is None or "accuracy" not in metrics:
        return {}
    found = findings(metrics, baseline)
    return {"collapsed": bool(found), "findings": found, "baseline": asdict(baseline)}


def retention_note(retention: float) -> str | None:
    if retention > 1.0 + 1e-9:
        return (f"the student retains {retention:.1%} of its teacher: the teacher may be undertrained (train it "
                "longer, or check it on this data) rather than the student better")
    return None


def warn(what: str, found: list[str]) -> None:
    """One warning line (rank 0 only): what collapsed, why it looks so, and the likely causes."""
    from kdship.runtime import is_main_process
    from kdship.ui import console

    if found and is_main_process():
        console().print(f"[yellow]warning:[/] {what} looks collapsed: {'; '.join(found)}; {LIKELY_CAUSES}")
