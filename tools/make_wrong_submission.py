"""Fill the student version of an exercise with a plausible wrong answer, to be committed as
exercises/<name>/wrong_submission.ipynb (CI grades it and expects the score in wrong_submission.json).

    python tools/make_wrong_submission.py   # after `make exercises`
"""
import json

import nbformat

STUDENT = "_build/exercises/ch00_softmax/student/ch00_softmax.ipynb"
OUT = "exercises/ch00_softmax/wrong_submission.ipynb"

q1_answer = '''def naive_softmax_bytes(M, N, b):
    reads = M * N + (M * N + M) + M * N + M * N + (M * N + M)
    writes = M + M * N + M * N + M + M * N
    return (reads + writes) * b


def fused_softmax_bytes(M, N, b):
    return 2 * M * N * b'''

# The classic mistake: padding lanes load 0.0 instead of -inf, so exp(0 - max) leaks into the sum of
# every row whose length is not a power of two. Rows of 16 or 32 elements still come out right.
q2_body = '''    x = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * stride_row + cols, y, mask=mask)'''

nb = nbformat.read(STUDENT, 4)
for cell in nb.cells:
    if cell.cell_type != "code":
        continue
    if cell.source.startswith("def naive_softmax_bytes"):
        cell.source = q1_answer
    elif "def softmax_row_kernel" in cell.source:
        cell.source = cell.source.replace("    mask = cols < N\n    ...", "    mask = cols < N\n" + q2_body)
        assert q2_body in cell.source
nbformat.write(nb, OUT)
expected = {"q1": 1.0, "q2": 2.0,
            "why": "q1 right; q2 pads with 0.0 instead of -inf: passes the power-of-two tests (2 of 3), "
                   "fails the row of 17"}
with open("exercises/ch00_softmax/wrong_submission.json", "w") as f:
    json.dump(expected, f, indent=1)
    f.write("\n")
print("wrote", OUT)
