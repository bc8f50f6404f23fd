"""What a check finds: one :class:`Finding` per broken rule, and per check a :class:`CheckRecord` (ran,
passed, failed, skipped) so the report says what was looked at, not only what went wrong."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ERROR = "error"
WARNING = "warning"


@dataclass
class Finding:
    """One broken rule. ``message`` is one line and names the file; ``line()`` adds the rule id."""

    check: str  #: the check that found it ("index", "config", "finite", ...)
    rule: str  #: short rule id within the check ("unreferenced-shard", "vocab-rows", ...)
    file: str  #: the file (or folder) the rule is about
    message: str  #: one line, starting with the file
    severity: str = ERROR

    def line(self) -> str:
        text = " ".join(self.message.split())
        return f"{text} [rule {self.check}/{self.rule}]"

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["line"] = self.line()
        return doc


@dataclass
class CheckRecord:
    """The outcome of one check: ``passed``, ``failed`` (an error finding), ``warned`` or ``skipped``."""

    name: str
    status: str = "passed"
    detail: str = ""
    findings: list[Finding] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "findings": [f.to_json() for f in self.findings]}


class Findings:
    """Collects findings check by check."""

    def __init__(self) -> None:
        self.records: list[CheckRecord] = []
        self._current: CheckRecord | None = None

    def start(self, name: str, detail: str = "") -> CheckRecord:
        rec = CheckRecord(name, detail=detail)
        self.records.append(rec)
        self._current = rec
        return rec

    def skip(self, name: str, why: str) -> CheckRecord:
        rec = CheckRecord(name, status="skipped", detail=why)
        self.records.append(rec)
        return rec

    def add(self, rule: str, file: Any, message: str, *, severity: str = ERROR, check: str | None = None) -> Finding:
        rec = self._current
        if check is not None and (rec is None or rec.name != check):
            rec = next((r for r in self.records if r.name == check), None) or self.start(check)
        assert rec is not None, "start() a check before adding findings"
        f = Finding(rec.name, rule, str(file), message, severity)
        rec.findings.append(f)
        if severity == ERROR:
            rec.status = "failed"
        elif rec.status == "passed":
            rec.status = "warned"
        return f

    @property
    def all(self) -> list[Finding]:
        return [f for r in self.records for f in r.findings]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.all if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.all if f.severity == WARNING]
