"""Student notebooks of the exercises, for handing out: `python tools/handouts.py OUT [--zip]`.

For each exercise master `exercises/<name>/<name>.ipynb`, `otter assign` writes the student version
(no solutions, no hidden tests, no instructor notice) and the autograder; this copies the student
notebook to `OUT/<name>.ipynb` and, with `--zip`, packs `OUT/<name>.zip` with it (what a student
downloads), and the autograder zip to `OUT/autograder/<name>-autograder.zip` (what Gradescope takes).
The tests of each master are not run here (`make test` runs them); building all five takes seconds.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "exercises"


def masters() -> list[Path]:
    return sorted(d / f"{d.name}.ipynb" for d in EXERCISES.iterdir() if (d / f"{d.name}.ipynb").exists())


def build(out: Path, with_zips: bool = False) -> list[Path]:
    """Write every student notebook (and, with_zips, the zips) under `out`; returns the notebooks."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for master in masters():
        name = master.stem
        with tempfile.TemporaryDirectory() as tmp:
            dist = Path(tmp) / "dist"
            result = subprocess.run([sys.executable, "-m", "otter", "assign", "--no-run-tests", "--no-pdfs",
                                     str(master), str(dist)], cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"otter assign failed for {name}:\n{result.stdout}\n{result.stderr}")
            student = out / f"{name}.ipynb"
            shutil.copy(dist / "student" / f"{name}.ipynb", student)
            written.append(student)
            if with_zips:
                with zipfile.ZipFile(out / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                    zf.write(student, f"{name}/{name}.ipynb")
                (out / "autograder").mkdir(exist_ok=True)
                (autograder,) = (dist / "autograder").glob("*.zip")
                shutil.copy(autograder, out / "autograder" / f"{name}-autograder.zip")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the student notebooks into")
    parser.add_argument("--zip", action="store_true", help="also a zip per chapter, and the autograder zips")
    args = parser.parse_args()
    for path in build(args.out, with_zips=args.zip):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
