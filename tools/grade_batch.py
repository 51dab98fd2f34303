"""Grade a folder of submissions without Docker, as Gradescope would:
`python tools/grade_batch.py AUTOGRADER_ZIP SUBMISSIONS_DIR OUT.csv`.

Each `*.ipynb` in SUBMISSIONS_DIR (or the notebook inside each `*.zip` a student's export cell wrote)
is graded with `otter run` against the autograder zip (`make handouts` writes them to
`_build/handouts/autograder/`), each in a fresh folder with a time limit, and one CSV row is written per
submission: the file, each question's score, the total, the points available, and an error column for a submission that
could not be graded (it scores nothing then, and says why).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TIMEOUT_S = 300


def notebook_of(path: Path, workdir: Path) -> Path:
    if path.suffix == ".zip":  # an otter export: the notebook is inside
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".ipynb") and "/." not in n]
            if not names:
                raise ValueError("no notebook in the zip")
            zf.extract(names[0], workdir)
            return workdir / names[0]
    local = workdir / path.name
    shutil.copy(path, local)
    return local


def grade_one(autograder: Path, submission: Path) -> tuple[dict[str, float], float]:
    """({question: score}, the points available) for one submission."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        notebook = notebook_of(submission, work)
        (work / "out").mkdir()
        result = subprocess.run([sys.executable, "-m", "otter", "run", "-a", str(autograder.resolve()), "-o",
                                 str(work / "out"), str(notebook)], cwd=work, capture_output=True, text=True,
                                timeout=TIMEOUT_S)
        results = work / "out" / "results.json"
        if result.returncode != 0 or not results.exists():
            raise RuntimeError((result.stderr or result.stdout).strip().splitlines()[-1:] or "otter run failed")
        tests = [t for t in json.loads(results.read_text())["tests"] if "score" in t]
        return {t["name"]: float(t["score"]) for t in tests}, sum(float(t["max_score"]) for t in tests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("autograder", type=Path)
    parser.add_argument("submissions", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    rows, questions, available = [], [], 0.0
    for path in sorted(p for p in args.submissions.iterdir() if p.suffix in (".ipynb", ".zip")):
        try:
            (scores, points), error = grade_one(args.autograder, path), ""
            available = max(available, points)
        except Exception as exc:  # one bad submission must not stop the batch
            scores, error = {}, f"{type(exc).__name__}: {exc}"
        questions += [q for q in scores if q not in questions]
        rows.append((path.name, scores, error))
        print(f"{path.name}: {sum(scores.values()):g}" + (f"  ({error})" if error else ""))
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", *questions, "total", "out_of", "error"])
        for name, scores, error in rows:
            writer.writerow([name, *(scores.get(q, 0.0) for q in questions), sum(scores.values()), available, error])
    print(f"wrote {args.out} ({len(rows)} submissions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
