"""benchmarks/results/: one folder per benchmark script, every file named in the index README."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return [Path(p) for p in out if Path(p).name != "README.md"]


def test_every_result_lives_in_the_folder_of_an_existing_script():
    files = _tracked()
    assert files
    for f in files:
        rel = f.relative_to("benchmarks/results")
        assert len(rel.parts) == 2, f"{f}: results go in benchmarks/results/<script>/<file>"
        assert (ROOT / "benchmarks" / f"{rel.parts[0]}.py").is_file(), f"{f}: no benchmarks/{rel.parts[0]}.py"


def test_index_lists_every_result_file_under_its_folder():
    index = (RESULTS / "README.md").read_text()
    sections = dict(re.findall(r"^## (\w+) .*?\n(.*?)(?=^## |\Z)", index, re.M | re.S))
    for f in _tracked():
        folder, name = f.parts[-2], f.name
        assert folder in sections, f"index has no section for {folder}/"
        stem, ext = name.rsplit(".", 1)
        # a PNG beside its JSON is listed as "`stem.json`, `.png`"
        listed = f"`{name}`" in sections[folder] or (ext == "png" and f"`{stem}.json`, `.png`" in sections[folder])
        assert listed, f"{f} is not in benchmarks/results/README.md"

