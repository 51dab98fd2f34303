"""Every otter-grader exercise is proven: `otter assign` builds it (running the solution against its
tests), the solution scores full marks, the blank student version scores 0, and the committed wrong
submissions score exactly what their JSON files say: wrong_submission (wrong answers) and, where a
question asks for a method, wrong_method (right answers by the forbidden method). Grading one notebook
is time-limited."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("kind", ["wrong_submission", "wrong_method"])
def test_wrong_submission_scores_what_it_says(assigned, kind, tmp_path):
    # wrong_submission: wrong answers; wrong_method: right answers computed the way a question forbids
    # (a loop where it asks for none, say), which its hidden tests must catch
    exercise, _, zip_path = assigned
    if not (exercise / f"{kind}.ipynb").exists():
        pytest.skip(f"{exercise.name} has no {kind} (none of its questions asks for a method)")
    expected = json.loads((exercise / f"{kind}.json").read_text())
    scores = grade(zip_path, exercise / f"{kind}.ipynb", tmp_path)
    got = {q: score for q, (score, _) in scores.items()}
    assert got == {q: v for q, v in expected.items() if q != "why"}, (got, expected["why"])
    assert 0 < sum(got.values()) < sum(m for _, m in scores.values()), "a wrong submission earns partial marks"


def test_student_version_hides_solutions_and_hidden_tests(assigned):
    exercise, out, _ = assigned
    student = (out / "student" / f"{exercise.name}.ipynb").read_text()
    assert "BEGIN SOLUTION" not in student and "# HIDDEN" not in student
