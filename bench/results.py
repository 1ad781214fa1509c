"""Measurements and how they are reported: a markdown table plus raw JSON.

Each row is one (scenario, case, link delay, tool) with every run's wall time
kept, the median shown, and the ratio against the *best peer* of the same
(scenario, case, delay) group: below 1.0 means we are faster than the best
other tool. Skipped rows stay in the table with the reason, so a reader sees
what was not measured and why instead of a silently shorter table.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

OURS, PEER, REFERENCE = "ours", "peer", "reference"


@dataclass
class Measurement:
    """Wall times of one tool doing one case of one scenario over one link."""

    scenario: str
    case: str
    tool: str
    delay_ms: float
    role: str = PEER
    runs: List[float] = field(default_factory=list)
    note: str = ""
    skipped: str = ""

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.runs) if self.runs and not self.skipped else None

    @property
    def group(self) -> Tuple[str, str, float]:
        return (self.scenario, self.case, self.delay_ms)


@dataclass
class Report:
    """Everything one bench run measured, with the facts needed to read it."""

    started: str
    machine: Dict[str, str]
    settings: Dict[str, object]
    measurements: List[Measurement] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, items: List[Measurement]) -> None:
        """Append measurements."""
        self.measurements.extend(items)

    def best_peer(self, group: Tuple[str, str, float]) -> Optional[Measurement]:
        """Return the fastest measured peer of *group*."""
        peers = [m for m in self.measurements if m.group == group and m.role == PEER and m.median is not None]
        return min(peers, key=lambda m: m.median) if peers else None  # type: ignore[arg-type,return-value]

    def ratio(self, m: Measurement) -> Optional[float]:
        """Return m's median divided by the best peer's median in its group."""
        best = self.best_peer(m.group)
        if best is None or m.median is None or not best.median:
            return None
        return m.median / best.median

    def skipped(self) -> List[Measurement]:
        return [m for m in self.measurements if m.skipped]

    def to_markdown(self) -> str:
        """Render the report as markdown tables, one per scenario."""
        out = [f"# remote_runner benchmark, {self.started}", ""]
        out.append("## Machine")
        out += [f"- {k}: {v}" for k, v in self.machine.items()]
        out += ["", "## Settings"]
        out += [f"- {k}: {v}" for k, v in self.settings.items()]
        out += ["", "Times are wall-clock seconds, median of the listed runs. "
                "`x best peer` = median / fastest peer's median in the same case and delay "
                "(below 1.0: faster than every peer). Delay is added in each direction, so "
                "a round trip pays twice it.", ""]
        scenarios: List[str] = []
        for m in self.measurements:
            if m.scenario not in scenarios:
                scenarios.append(m.scenario)
        for scenario in scenarios:
            out += [f"## {scenario}", "",
                    "| case | delay (ms each way) | tool | median (s) | runs (s) | x best peer | note |",
                    "|---|---|---|---|---|---|---|"]
            for m in (x for x in self.measurements if x.scenario == scenario):
                med = _num(m.median)
                runs = ", ".join(_num(r) for r in m.runs) if m.runs else "-"
                ratio_s = _num(self.ratio(m))
                tool = f"**{m.tool}**" if m.role == OURS else (f"{m.tool} (reference)" if m.role == REFERENCE else m.tool)
                note = f"skipped: {_short(m.skipped)}" if m.skipped else m.note
                out.append(f"| {m.case} | {m.delay_ms:g} | {tool} | {med} | {runs} | {ratio_s} | "
                           f"{note.replace('|', '/')} |")
            out.append("")
        skipped = self.skipped()
        out += ["## Skipped", ""]
        out += [f"- {m.scenario} / {m.case} / {m.tool} @ {m.delay_ms:g} ms: {_short(m.skipped)}"
                for m in skipped] or ["- nothing"]
        if self.notes:
            out += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def to_json(self) -> str:
        """Return the raw data (every run) as JSON."""
        data = {"started": self.started, "machine": self.machine, "settings": self.settings,
                "notes": self.notes,
                "measurements": [dict(asdict(m), median=m.median, ratio_vs_best_peer=self.ratio(m))
                                 for m in self.measurements]}
        return json.dumps(data, indent=1)

    def write(self, directory: str) -> Tuple[str, str]:
        """Write results-<stamp>.md/.json and latest.md/.json into *directory*; return the .md and .json paths."""
        os.makedirs(directory, exist_ok=True)
        stamp = self.started.replace(":", "").replace("-", "").replace(" ", "-")
        paths = []
        for ext, text in (("md", self.to_markdown()), ("json", self.to_json())):
            path = os.path.join(directory, f"results-{stamp}.{ext}")
            with open(path, "w") as handle:
                handle.write(text)
            shutil.copyfile(path, os.path.join(directory, f"latest.{ext}"))
            paths.append(path)
        return paths[0], paths[1]


def _num(value: Optional[float]) -> str:
    """Format seconds or ratios: 2 decimals, 3 below 1."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _short(text: str, limit: int = 300) -> str:
    """Return *text* cut to *limit* characters for the table (the JSON keeps it whole)."""
    return text if len(text) <= limit else text[:limit] + " …"


def _first_line(argv: List[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine_facts() -> Dict[str, str]:
    """Return the facts a reader needs to compare results across machines."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as handle:
            mem = f"{int(handle.readline().split()[1]) // 1024} MiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "kernel": platform.release(),
        "cpu": f"{cpu} x {os.cpu_count()}",
        "memory": mem,
        "python": platform.python_version(),
        "openssh": _first_line(["ssh", "-V"]),
        "rsync": _first_line(["rsync", "--version"]),
        "sshfs": _first_line(["sshfs", "--version"]),
        "ffmpeg": _first_line(["ffmpeg", "-version"]),
        "git": _first_line(["git", "--version"]),
        "parallel-ssh": _first_line(["parallel-ssh", "--version"]),
        "checkout": _first_line(["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "describe", "--always", "--dirty"]),
        "load average at start": " ".join(open("/proc/loadavg").read().split()[:3]),
        "hosts": "lab hosts on this machine (network + mount namespaces, own sshd); "
                 "local and remote share the same 2 cores",
    }
