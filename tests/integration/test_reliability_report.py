"""The renderer of docs/reliability.md works on a small sample of recorded figures."""

from __future__ import annotations

import json

from tests.helpers.reliability import SCENARIOS, main, record, render


def test_render_from_recorded_figures(tmp_path):
    path = tmp_path / "figures.json"
    record("overload", {"sent": 10, "answered": {"200": 7, "429": 3}, "lost": 0}, path=path)
    record("triton_killed", {"recovery_seconds": 4.2}, path=path)
    text = render(json.loads(path.read_text()))
    assert "| answered | 200: 7, 429: 3 |" in text and "| recovery_seconds | 4.20 |" in text
    assert text.count("_No figures recorded yet._") == len(SCENARIOS) - 2
    assert main(["--json", str(path), "--out", str(tmp_path / "doc.md")]) == 0
