"""The README's API tour runs as written."""

import runpy
from pathlib import Path


def test_api_tour_runs(capsys):
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "api_tour.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "largest composite gain" in out
