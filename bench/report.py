"""The peer-comparison section of docs/benchmarks.md: render it, and replace it in the file.

The section sits between ``<!-- bench:peers:start -->`` and ``<!-- bench:peers:end -->``,
right after its ``## `` title, and only that is replaced, so the other sections (the
failover one of bench/failover.py) stay as they are. The title comes before the start
marker: bench/failover.py replaces its own section up to the next ``## `` title, so a
marker placed above this title would be taken with it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path

from bench.scenarios import Section, Table, Target

TITLE = "## gdpm and its peers: supervisord, circus, PM2"
START = "<!-- bench:peers:start -->"
END = "<!-- bench:peers:end -->"

INTRO = """# Benchmarks

Each section below is written by a script in `bench/`, which replaces its own section
when run again and leaves the others. A section names the machine it ran on and the
exact command, so that a figure can be reproduced and compared.
"""


def debian_version() -> str:
    try:
        return Path("/etc/debian_version").read_text().strip()
    except OSError:
        return "not Debian"


def tool_version(arguments: list[str]) -> str | None:
    try:
        completed = subprocess.run(arguments, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (completed.stdout or completed.stderr).strip().splitlines()
    return text[0] if text else None


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def render_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(table.header) + " |", "| " + " | ".join("---" for _ in table.header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
    return lines


def _verdict(target: Target) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[target.met]


def render_section(sections: list[Section], machine: list[tuple[str, str]], command: str, duration: float,
                   commands: list[str], notes: list[str]) -> str:
    lines = [
        TITLE,
        START,
        "",
        "Method: `bench/` (`python -m bench`) measures gdpm and its peers on the same machine in the same "
        "run, the managers taking turns, and reports each figure as the median, min and max of the "
        "repetitions. Every process it starts listens on 127.0.0.1 or a unix socket and is stopped by its pid.",
        "",
        f"Command: `{command}`, run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({duration / 60:.1f} minutes).",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in machine),
        "",
    ]
    targets = [(section, target) for section in sections for target in section.targets]
    if targets:
        lines += ["| target | measured (medians) | |", "| --- | --- | --- |"]
        lines += [f"| {target.text} | {target.measured} | {_verdict(target)} |" for _, target in targets]
        lines.append("")
    for note in notes:
        lines += [note, ""]
    for section in sections:
        lines += [f"### {section.title}", "", section.method, ""]
        for table in section.tables:
            lines += render_table(table)
            lines.append("")
        for note in section.notes:
            lines += [note, ""]
    if commands:
        lines += ["### Commands and settings", ""]
        lines += [f"- {item}" for item in commands]
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(output: Path, section: str) -> None:
    """Replace the peers section of ``output`` (title and markers included), or append it."""
    text = output.read_text() if output.exists() else INTRO
    pattern = re.compile(rf"(^## [^\n]*\n)?{re.escape(START)}\n.*?{re.escape(END)}\n?", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text.rstrip("\n") + "\n")


def machine_rows(base: list[tuple[str, str]], extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    rows = list(base)
    # After the kernel row: the distribution.
    index = next((position + 1 for position, (name, _) in enumerate(rows) if name == "kernel"), len(rows))
    rows.insert(index, ("Debian", debian_version()))
    rows.insert(index + 1, ("architecture", platform.machine()))
    return rows + extra
