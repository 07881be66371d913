"""The training corpus of the embedded model: a fixed, listed set of CPython standard-library files.

``corpus_files.txt`` (package data) lists one file per line: ``<split> <path relative to the stdlib root>
<sha256>``, split ``train`` or ``heldout`` (whole files are held out). The listing was written from
CPython 3.11.7; another Python version has different files, which ``read_split`` reports.
"""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LISTING = Path(__file__).with_name("corpus_files.txt")
SPLITS = ("train", "heldout")
# Files skipped when the listing is (re)generated: joke modules and a test fixture, not representative code.
_EXCLUDED = ("this.py", "antigravity.py", "__phello__.foo.py")
_HELDOUT_STRIDE, _HELDOUT_OFFSET = 16, 5


@dataclass(frozen=True)
class CorpusFile:
    split: str
    path: str
    sha256: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def generate_listing(out: Path = LISTING) -> list[CorpusFile]:
    """Write the listing from this interpreter's stdlib: top-level ``*.py`` files, every 16th held out."""
    root = stdlib_root()
    names = sorted(p.name for p in root.glob("*.py") if p.name not in _EXCLUDED)
    files = []
    for i, name in enumerate(names):
        split = "heldout" if i % _HELDOUT_STRIDE == _HELDOUT_OFFSET else "train"
        files.append(CorpusFile(split, name, hashlib.sha256((root / name).read_bytes()).hexdigest()))
    out.write_text("# split path sha256 (CPython standard library, paths relative to its root)\n"
                   + "".join(f"{f.split} {f.path} {f.sha256}\n" for f in files))
    return files


def load_listing(path: Path = LISTING) -> list[CorpusFile]:
    files = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        split, rel, sha = line.split()
        if split not in SPLITS:
            raise ValueError(f"{path}: unknown split {split!r} in line {line!r}")
        files.append(CorpusFile(split, rel, sha))
    return files


def read_split(split: str, *, limit: int | None = None, strict: bool = False) -> list[str]:
    """Texts of the listed files of ``split`` (listing order), at most ``limit`` files.

    strict: raise ``ValueError`` when a file's content differs from the listed sha256 (another Python
    version); otherwise log one warning with the count. A missing file always raises.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = stdlib_root()
    texts, changed = [], []
    for f in [f for f in load_listing() if f.split == split][:limit]:
        p = root / f.path
        if not p.is_file():
            raise FileNotFoundError(f"corpus file {p} is missing: the listing was made from CPython 3.11; "
                                    "use Python 3.11 or regenerate it with corpus.generate_listing()")
        data = p.read_bytes()
        if hashlib.sha256(data).hexdigest() != f.sha256:
            changed.append(f.path)
        texts.append(data.decode("utf-8", errors="replace"))
    if changed:
        msg = (f"{len(changed)} {split} corpus files differ from the listing (e.g. {changed[0]}); "
               "numbers will not match the recorded ones exactly")
        if strict:
            raise ValueError(msg)
        logger.warning(msg)
    return texts
