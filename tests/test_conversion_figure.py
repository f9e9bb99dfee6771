"""Every text that says how long the one-time SmolLM2 conversion takes quotes one measured figure,
``SMOLLM2_CONVERSION_S`` (issue 28: the README, the demo and the converter's log said ~50 s, ~30 s and
about a minute); a line that names Gemma quotes ``GEMMA3_CONVERSION_S`` (issue 29)."""

from __future__ import annotations

import re
from pathlib import Path

from chainserve.runtime.models import GEMMA3_CONVERSION_S, SMOLLM2_CONVERSION_S

ROOT = Path(__file__).resolve().parents[1]
#: The wording of the conversion, then what a line says after it.
WORDING = re.compile(r"(?:conver(?:ts?|ted|ting|sion)|dequantis\w*)\b(?P<rest>.*)", re.IGNORECASE)
DURATION = re.compile(r"~?\s?\d+(?:\.\d+)?\s?(?:s|sec|seconds?|min|minutes?)\b|\ba(?:bout a)? minute\b")


def conversion_figures() -> dict[str, tuple[list[str], str]]:
    """``file:line`` → the durations a line quotes after the conversion's wording, and the line."""
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md")]
    files += [p for d in ("src", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]
    found = {}
    for path in files:
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            match = WORDING.search(line)
            if match and (durations := DURATION.findall(match["rest"])):
                found[f"{path.relative_to(ROOT)}:{number}"] = (durations, line)
    return found


def test_every_text_quotes_the_one_measured_conversion_time() -> None:
    found = conversion_figures()
    assert any(where.startswith("README.md:") for where in found)  # the newcomer's first read names it
    assert any("gemma" in line.lower() for _, line in found.values())
    wrong = {
        where: figures
        for where, (figures, line) in found.items()
        if figures != [f"~{GEMMA3_CONVERSION_S if 'gemma' in line.lower() else SMOLLM2_CONVERSION_S} s"]
    }
    assert not wrong, (
        f"conversion figures other than ~{SMOLLM2_CONVERSION_S} s (~{GEMMA3_CONVERSION_S} s for Gemma): {wrong}"
    )
