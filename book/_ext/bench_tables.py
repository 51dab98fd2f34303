"""The `bench-table` directive: a recorded benchmark run, rendered from its JSON at build time.

The engineering notes cite runs that `python -m minikernels.bench` wrote to `book/data/bench/*.json`.
Typing those numbers into a page would let the page and the data drift apart, so a page names the
file and the rows it wants, and the table is built from the data every time the book is built:

    ```{bench-table} ssd.json
    :where: pass=fwd+bwd, dtype=bfloat16
    :columns: impl, pass, shape, ms, Mtokps
    :caption: Forward and backward of one training step
    ```

`:where:` keeps the rows whose fields equal every `key=value` (compared as text); `:columns:` picks
and orders the columns (default: every field that a kept row has). Floats print with 4 significant
digits. A line above the table says where and when the run was recorded.
"""

import json
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

BENCH_DIR = Path(__file__).resolve().parents[1] / "data" / "bench"


def _cell_text(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


def _parse_where(text):
    conditions = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"`:where:` takes key=value pairs separated by commas, got {item.strip()!r}")
        conditions[key.strip()] = value.strip()
    return conditions


def provenance(record):
    """One line: which GPU, when, with which versions, and the ceilings measured in the same run."""
    ceilings = record.get("ceilings", {})
    parts = [f"Recorded on {record.get('gpu', 'an unknown GPU')}, {record.get('date', 'undated')}",
             f"torch {record.get('torch', '?')}", f"triton {record.get('triton', '?')}"]
    line = ", ".join(parts)
    measured = []
    if "copy_GBps" in ceilings:
        measured.append(f"copy {ceilings['copy_GBps']:.0f} GB/s")
    if "matmul_bf16_TFLOPs" in ceilings:
        measured.append(f"bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    return line + ("; measured ceilings: " + ", ".join(measured) if measured else "") + "."


def select_rows(record, where):
    return [row for row in record["rows"] if all(str(row.get(k)) == v for k, v in where.items())]


class BenchTable(SphinxDirective):
    required_arguments = 1
    has_content = False
    option_spec = {"where": directives.unchanged, "columns": directives.unchanged,
                   "caption": directives.unchanged}

    def run(self):
        path = BENCH_DIR / self.arguments[0]
        self.env.note_dependency(str(path))
        try:
            record = json.loads(path.read_text())
            where = _parse_where(self.options.get("where"))
        except (OSError, ValueError) as err:
            raise self.error(f"bench-table {self.arguments[0]}: {err}") from err
        rows = select_rows(record, where)
        if not rows:
            raise self.error(f"bench-table {self.arguments[0]}: no row matches {where}")
        if "columns" in self.options:
            columns = [c.strip() for c in self.options["columns"].split(",") if c.strip()]
        else:
            columns = []
            for row in rows:
                columns += [k for k in row if k not in columns]
        missing = [c for c in columns if all(c not in row for row in rows)]
        if missing:
            raise self.error(f"bench-table {self.arguments[0]}: no kept row has the columns {missing}")

        table = nodes.table(classes=["bench-table"])
        if "caption" in self.options:
            table += nodes.title(text=self.options["caption"])
        group = nodes.tgroup(cols=len(columns))
        table += group
        group.extend(nodes.colspec(colwidth=1) for _ in columns)
        head = nodes.thead()
        head += self._row(columns)
        body = nodes.tbody()
        body.extend(self._row([_cell_text(row.get(c)) for c in columns]) for row in rows)
        group += head
        group += body
        note = nodes.paragraph(text=provenance(record) + f" Source: book/data/bench/{self.arguments[0]}.")
        return [note, table]

    @staticmethod
    def _row(texts):
        row = nodes.row()
        for text in texts:
            entry = nodes.entry()
            entry += nodes.paragraph(text=text)
            row += entry
        return row


def setup(app):
    app.add_directive("bench-table", BenchTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
