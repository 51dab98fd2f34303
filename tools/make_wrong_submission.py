"""Fill the student version of each exercise with plausible wrong answers, committed as
exercises/<name>/wrong_submission.ipynb, and (where a question asks for a method) with right answers by
the forbidden method, exercises/<name>/wrong_method.ipynb; CI grades both and expects the scores in
their JSON files.

    make exercises && python tools/make_wrong_submission.py
"""

import json

import nbformat

# the body of one round of the scan in exercise 4 (right: the mistake there is in combine)
HILLIS_STEELE_ROUND = '''        a_new, b_new = combine((a[..., :-shift], b[..., :-shift]),
                               (a[..., shift:], b[..., shift:]))
        a = torch.cat([a[..., :shift], a_new], dim=-1)
        b = torch.cat([b[..., :shift], b_new], dim=-1)'''

# the body of one step of exercise 3's recurrent form (right in both submissions)
RECURRENT_STEP = '''        state = torch.exp(g[t]) * state + torch.outer(k[t], v[t])
        out.append(q[t] @ state)'''

# exercise -> (replacements: (marker in the student cell, code that replaces its "..." body), expected, why)
WRONG = {
    "ch00_softmax": (
        [("def naive_softmax_bytes", None, '''def naive_softmax_bytes(M, N, b):
    reads = M * N + (M * N + M) + M * N + M * N + (M * N + M)
    writes = M + M * N + M * N + M + M * N
    return (reads + writes) * b


def fused_softmax_bytes(M, N, b):
    return 2 * M * N * b'''),
         # padding lanes load 0.0 instead of -inf: exp(0 - max) leaks into the sum of every row whose
         # length is not a power of two; rows of 16 or 32 still come out right
         ("def softmax_row_kernel", "    mask = cols < N\n    ...", '''    mask = cols < N
    x = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * stride_row + cols, y, mask=mask)''')],
        {"q1": 1.0, "q2": 2.0},
        "q1 right; q2 pads with 0.0 instead of -inf: passes the power-of-two tests (2 of 3), fails the row of 17",
    ),
    "ch01_flashattention": (
        [("def merge", "    (m1, l1, o1), (m2, l2, o2) = a, b\n    ...", '''    (m1, l1, o1), (m2, l2, o2) = a, b
    m = torch.maximum(m1, m2)
    w1 = torch.exp(m1 - m) * l1 if l1 > 0 else torch.zeros_like(l1)
    w2 = torch.exp(m2 - m) * l2 if l2 > 0 else torch.zeros_like(l2)
    return m, w1 + w2, (w1 * o1 + w2 * o2) / (w1 + w2)'''),
         # floor instead of ceiling: the partial last query block is not counted
         ("def tiled_forward_traffic", None, '''def tiled_forward_traffic(n, d, b_r, b_c):
    return n * d + (n // b_r) * 2 * n * d + n * d'''),
         # forgets to rescale the accumulated output when the maximum grows
         ("def tiled_attention", "            ...", '''            m_new = torch.maximum(m, s.max(1).values)
            alpha = torch.exp(m - m_new)
            p = torch.exp(s - m_new[:, None])
            l = l * alpha + p.sum(1)
            acc = acc + p @ v[c0:c0 + b_c]
            m = m_new''')],
        {"q1": 2.0, "q2": 0.5, "q3": 0.0},
        "q1 right; q2 floors the number of query blocks (public test passes, hidden fails); q3 never "
        "rescales acc by exp(m_old - m_new)",
    ),
    "ch02_sparse_masks": (
        [("def sliding_window_blocks", "    kb = torch.arange(nb)[None, :]\n    ...",
          '''    kb = torch.arange(nb)[None, :]
    first_row, last_row = qb * block, torch.clamp((qb + 1) * block - 1, max=n - 1)
    first_col, last_col = kb * block, torch.clamp((kb + 1) * block - 1, max=n - 1)
    return (first_col <= last_row) & (last_col > first_row - window)'''),
         # off by one: keeps key i - window too
         ("def tile_mask", None, '''def tile_mask(qb, kb, block, window):
    i = qb * block + torch.arange(block)[:, None]
    j = kb * block + torch.arange(block)[None, :]
    return (j <= i) & (j >= i - window)'''),
         # sums the patches' main diagonals instead of their antidiagonals
         ("def antidiagonal_score", None, '''def antidiagonal_score(s_tile, stride):
    total = 0.0
    for r in range(stride):
        total = total + s_tile[r::stride, r::stride].sum()
    return total''')],
        {"q1": 2.0, "q2": 0.0, "q3": 0.0},
        "q1 right; q2 keeps key i - window (off by one); q3 adds the main diagonals of the patches",
    ),
    "ch03_linear_attention": (
        [("def recurrent", "        ...", RECURRENT_STEP),
         # forgets to decay the incoming state: right from an empty state (public test), wrong after
         ("def chunk_state_update", None, '''def chunk_state_update(state, k, v, g):
    b = g.cumsum(0)
    return state + (k * torch.exp(b[-1] - b)[:, None]).T @ v''')],
        {"q1": 2.0, "q2": 1.0},
        "q1 right; q2 does not decay the incoming state: passes from an empty state (public), fails the hidden test",
    ),
    "ch04_state_space_models": (
        [("def zoh", None, '''def zoh(A, B, step):
    A_bar = torch.linalg.matrix_exp(step * A)
    return A_bar, torch.linalg.solve(A, (A_bar - torch.eye(A.shape[0], dtype=A.dtype)) @ B)'''),
         # composes the two maps in the wrong order: h -> a2 h + b2 first, then a1 h + b1
         ("def combine", "    (a1, b1), (a2, b2) = first, second\n    ...", '''    (a1, b1), (a2, b2) = first, second
    return a1 * a2, a1 * b2 + b1'''),
         ("def scan", "        ...", HILLIS_STEELE_ROUND)],
        {"q1": 2.0, "q2": 0.0},
        "q1 right; q2 composes the affine maps in the wrong order (second, then first)",
    ),
}

# exercise -> the same, for right answers computed the way a question forbids: its hidden tests must
# catch the method, so the public test passes and the hidden one fails (half the question's points)
WRONG_METHOD = {
    "ch02_sparse_masks": (
        [("def sliding_window_blocks", None, '''def sliding_window_blocks(n, window, block):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    dense = (j <= i) & (j > i - window)
    nb = math.ceil(n / block)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:n, :n] = dense
    return padded.view(nb, block, nb, block).any(3).any(1)''')],
        {"q1": 1.0, "q2": 0.0, "q3": 0.0},
        "q1 builds the n x n mask (right values; the hidden test sees an n x n tensor made); q2, q3 blank",
    ),
    "ch03_linear_attention": (
        [("def recurrent", "        ...", RECURRENT_STEP),
         ("def chunk_state_update", None, '''def chunk_state_update(state, k, v, g):
    for t in range(k.shape[0]):
        state = torch.exp(g[t]) * state + torch.outer(k[t], v[t])
    return state''')],
        {"q1": 2.0, "q2": 1.0},
        "q1 right; q2 loops over the steps (right values; the hidden test counts operations at two lengths)",
    ),
    "ch04_state_space_models": (
        [("def scan", None, '''def combine(first, second):
    (a1, b1), (a2, b2) = first, second
    return a1 * a2, a2 * b1 + b2


def scan(a, b):
    h, out = torch.zeros(a.shape[:-1], dtype=a.dtype), []
    for t in range(a.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out.append(h)
    return torch.stack(out, dim=-1)''')],
        {"q1": 0.0, "q2": 1.0},
        "q2's scan walks the steps one by one (right values; the hidden test counts operations); q1 blank",
    ),
}

for kind, table in (("wrong_submission", WRONG), ("wrong_method", WRONG_METHOD)):
    for name, (replacements, expected, why) in table.items():
        nb = nbformat.read(f"_build/exercises/{name}/student/{name}.ipynb", 4)
        for marker, old, new in replacements:
            (cell,) = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
            if old is None:  # replace the whole cell
                cell.source = new
            else:
                assert old in cell.source, (name, marker)
                cell.source = cell.source.replace(old, new, 1)
        nbformat.write(nb, f"exercises/{name}/{kind}.ipynb")
        with open(f"exercises/{name}/{kind}.json", "w") as f:
            json.dump({**expected, "why": why}, f, indent=1)
            f.write("\n")
        print("wrote", f"exercises/{name}/{kind}.ipynb")
