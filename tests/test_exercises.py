"""Every otter-grader exercise is proven: `otter assign` builds it (running the solution against its
tests), the solution scores full marks, the blank student version scores 0, and the committed wrong
submissions (`wrong_*.ipynb`: plausible mistakes, or right answers by a method a question forbids) score
exactly what their JSON files say, so that every question is shown to take points from a wrong answer.
The settings the instructor's guide promises hold, the autograder pins what CI grades with, and the
handout and batch-grading tools work. Grading one notebook is time-limited."""

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = sorted(p for p in (ROOT / "exercises").iterdir() if (p / f"{p.name}.ipynb").exists())
GRADE_TIMEOUT_S = 300  # the time limit for grading one notebook
OTTER = [sys.executable, "-m", "otter"]


def _otter(*args, cwd):
    return subprocess.run([*OTTER, *args], cwd=cwd, capture_output=True, text=True, timeout=GRADE_TIMEOUT_S)


@pytest.fixture(scope="module", params=EXERCISES, ids=lambda p: p.name)
def assigned(request, tmp_path_factory):
    exercise = request.param
    out = tmp_path_factory.mktemp(exercise.name) / "dist"
    result = _otter("assign", str(exercise / f"{exercise.name}.ipynb"), str(out), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    zips = list((out / "autograder").glob("*.zip"))
    assert len(zips) == 1, f"expected one autograder zip, found {zips}"
    return exercise, out, zips[0]


def grade(autograder_zip: Path, submission: Path, workdir: Path) -> dict:
    """Grade one notebook with `otter run`; returns {question: (score, max_score)}."""
    workdir.mkdir(parents=True, exist_ok=True)
    local = workdir / submission.name
    shutil.copy(submission, local)
    result = _otter("run", "-a", str(autograder_zip), "-o", str(workdir), str(local), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = json.loads((workdir / "results.json").read_text())["tests"]
    return {t["name"]: (t["score"], t["max_score"]) for t in tests if "score" in t}


def test_solution_scores_full_marks(assigned, tmp_path):
    exercise, out, zip_path = assigned
    scores = grade(zip_path, out / "autograder" / f"{exercise.name}.ipynb", tmp_path)
    assert scores, "no graded questions"
    for q, (score, max_score) in scores.items():
        assert max_score > 0 and score == max_score, f"{q}: {score}/{max_score}"


def test_blank_student_version_scores_zero(assigned, tmp_path):
    exercise, out, zip_path = assigned
    scores = grade(zip_path, out / "student" / f"{exercise.name}.ipynb", tmp_path)
    assert scores and all(score == 0 for score, _ in scores.values()), scores


def wrong_submissions(exercise: Path) -> list[Path]:
    return sorted(exercise.glob("wrong_*.ipynb"))


def test_wrong_submissions_score_what_they_say(assigned, tmp_path):
    """Each committed wrong submission (plausible mistakes, or right answers by a method a question
    forbids) scores exactly what its JSON says, question by question; together they make every question
    lose points, and each still earns some."""
    exercise, _, zip_path = assigned
    wrongs = wrong_submissions(exercise)
    assert wrongs, f"{exercise.name} has no wrong_*.ipynb"
    lost, questions = set(), set()
    for wrong in wrongs:
        expected = json.loads(wrong.with_suffix(".json").read_text())
        scores = grade(zip_path, wrong, tmp_path / wrong.stem)
        got = {q: score for q, (score, _) in scores.items()}
        assert got == {q: v for q, v in expected.items() if q != "why"}, (wrong.name, got, expected["why"])
        assert 0 < sum(got.values()) < sum(m for _, m in scores.values()), f"{wrong.name} earns partial marks"
        lost |= {q for q, (score, max_score) in scores.items() if score < max_score}
        questions |= set(scores)
    assert lost == questions, f"questions no wrong submission makes lose points: {sorted(questions - lost)}"


def test_student_version_hides_solutions_and_hidden_tests(assigned):
    exercise, out, _ = assigned
    student = (out / "student" / f"{exercise.name}.ipynb").read_text()
    assert "BEGIN SOLUTION" not in student and "# HIDDEN" not in student and "hidden: true" not in student
    assert "holds the solutions" not in student  # the master's notice is for instructors


def test_master_settings(assigned):
    """What the instructor's guide promises: hidden tests hidden, a check-all cell, a submission zip
    with its log, Python pinned, the master marked as holding solutions."""
    exercise, out, _ = assigned
    master = json.loads((exercise / f"{exercise.name}.ipynb").read_text())
    config = yaml.safe_load("".join(master["cells"][0]["source"]).split("\n", 1)[1])
    assert config["generate"]["show_hidden"] is False
    assert config["check_all_cell"] is True and config["export_cell"] not in (False, None)
    assert str(config["python_version"]) == "3.11" and config["requirements"] == "requirements.txt"
    assert "holds the solutions" in "".join(master["cells"][1]["source"])
    student = json.loads((out / "student" / f"{exercise.name}.ipynb").read_text())
    sources = ["".join(c["source"]) for c in student["cells"]]
    assert any("grader.check_all()" in s for s in sources) and any("grader.export(" in s for s in sources)


def test_autograder_pins_the_cpu_build(assigned):
    """Gradescope builds exactly what CI grades with: Python 3.11 and pinned versions, torch's CPU build
    (with a python_version, otter puts the requirements in the autograder's environment.yml)."""
    _, _, zip_path = assigned
    with zipfile.ZipFile(zip_path) as zf:
        env = yaml.safe_load(zf.read("environment.yml"))
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    pins = dict(line.split("==") for line in pip if "==" in line)
    import torch
    import triton

    assert pins["torch"] == torch.__version__ and "+cpu" in pins["torch"]
    assert pins["triton"] == triton.__version__ and "otter-grader" in pins
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pip


def test_handouts_and_batch_grading(assigned, tmp_path):
    """`make handouts` writes each student notebook and zip; `tools/grade_batch.py` grades a folder
    (the solution and the blank student notebook) into a CSV with the right totals."""
    exercise, out, zip_path = assigned
    subs = tmp_path / "submissions"
    subs.mkdir()
    shutil.copy(out / "autograder" / f"{exercise.name}.ipynb", subs / "solution.ipynb")
    shutil.copy(out / "student" / f"{exercise.name}.ipynb", subs / "blank.ipynb")
    csv_path = tmp_path / "scores.csv"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "grade_batch.py"), str(zip_path), str(subs),
                             str(csv_path)], capture_output=True, text=True, timeout=2 * GRADE_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["submission"]: r for r in csv.DictReader(csv_path.open())}
    solution, blank = rows["solution.ipynb"], rows["blank.ipynb"]
    assert float(solution["total"]) == float(solution["out_of"]) > 0 and not solution["error"]
    assert float(blank["total"]) == 0 and not blank["error"]


def test_handouts_tool_writes_every_student_notebook(tmp_path):
    spec = importlib.util.spec_from_file_location("handouts_tool", ROOT / "tools" / "handouts.py")
    handouts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handouts)
    written = handouts.build(tmp_path, with_zips=True)
    assert sorted(p.stem for p in written) == [e.name for e in EXERCISES]
    for path in written:
        text = path.read_text()
        assert "BEGIN SOLUTION" not in text and "holds the solutions" not in text
        assert (tmp_path / f"{path.stem}.zip").exists()
        assert (tmp_path / "autograder" / f"{path.stem}-autograder.zip").exists()
