"""The recorded results in one table: ``python -m minikernels.results``.

Reads the JSON that ``python -m minikernels.bench`` wrote on the GPU (``book/data/bench/<op>.json``,
or ``--json-dir``) and prints, for each kernel and pass, our time against its strongest anchor: at
every recorded shape, the fastest implementation that is not ours (where that differs from shape to
shape, the table names each, most often fastest first); over the shapes, the range of the ratio
anchor time / our time (above 1: ours is faster). The README's results table is this
command's output, and a test keeps the two equal. Needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The recorded runs belong to the book (book/data/bench/ in the repository), not to the package: an
# installed minikernels has no copy of them. So they are found at an explicit place: the `json_dir`
# argument, else $MINIKERNELS_BENCH_DIR, else the repository this module sits in, when it sits in one.
ENV_VAR = "MINIKERNELS_BENCH_DIR"
_CHECKOUT_DIR = Path(__file__).resolve().parents[1] / "book" / "data" / "bench"


def recorded_dir(json_dir: str | os.PathLike | None = None, *, source_checkout: Path | None = _CHECKOUT_DIR) -> Path:
    """Where the recorded ``<op>.json`` files are (see the comment above for the order searched);
    ``source_checkout``: the folder looked in last (default: ``book/data/bench`` beside the package,
    present in a source checkout, absent in an installed package; None skips it)."""
    if json_dir is not None:
        return Path(json_dir)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    if source_checkout is not None and Path(source_checkout).is_dir():
        return Path(source_checkout)
    raise FileNotFoundError(f"no recorded benchmarks: pass json_dir, or set ${ENV_VAR} to a folder of "
                            "<op>.json files (the repository keeps them in book/data/bench/)")


def recorded(op: str, json_dir: str | os.PathLike | None = None) -> dict:
    """The results of an earlier ``python -m minikernels.bench --op <op>`` run: what the notebooks
    plot on a machine without a GPU."""
    path = recorded_dir(json_dir) / f"{op}.json"
    if not path.exists():
        raise FileNotFoundError(f"no recorded benchmark for {op!r}: {path} is missing")
    return json.loads(path.read_text())

OURS = "minikernels"
# op -> (what the row stands for, kernel name, implementations that are studies, not anchors)
KERNELS = {
    "softmax": ("mk.softmax", ()),
    "flash": ("mk.flash_attention", ()),
    "decode": ("mk.decode_attention", ()),
    "sparse": ("mk.block_sparse_attention", ("xattention-estimate",)),
    "linear": ("mk.linear_attention", ("sdpa-cudnn (softmax, causal)",)),
    "ssd": ("mk.ssd", ()),
    "selective_scan": ("mk.selective_scan", ("exponentials alone", "exponentials alone, polynomial")),
}
# Fields that are measurements, not part of what was measured.
MEASURES = {"impl", "ms", "Mtokps", "TFLOPs", "GBps", "frac_of_copy", "timing", "speedup_over_dense_causal",
            "ideal_speedup", "fraction_of_ideal", "relative_to_sparse_attention", "flop_ratio",
            "sparse_attention_ms", "one_call_ms", "sparse_attention_one_call_ms", "blockmask_build_ms"}


def _case(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items() if k not in MEASURES))


def compare(record: dict, studies: tuple = ()) -> list[dict]:
    """Per pass: at each shape where ours and an anchor both ran, the fastest anchor there; the
    anchors that were fastest somewhere (most often first) and the range of anchor time / ours."""
    out = []
    for direction in dict.fromkeys(r["pass"] for r in record["rows"]):
        rows = [r for r in record["rows"] if r["pass"] == direction and r["impl"] not in studies]
        ours = {_case(r): r["ms"] for r in rows if r["impl"] == OURS}
        best = {}  # case -> (anchor, ms) of the fastest anchor there
        for r in rows:
            case = _case(r)
            if r["impl"] != OURS and case in ours and (case not in best or r["ms"] < best[case][1]):
                best[case] = (r["impl"], r["ms"])
        if not best:
            continue
        wins = {}
        for anchor, _ in best.values():
            wins[anchor] = wins.get(anchor, 0) + 1
        ratios = [ms / ours[case] for case, (_, ms) in best.items()]
        out.append({"pass": direction, "anchors": sorted(wins, key=lambda a: -wins[a]), "low": min(ratios),
                    "high": max(ratios), "shapes": len(ratios)})
    return out


def table(json_dir: str | os.PathLike | None = None) -> str:
    """The markdown table of every recorded kernel against its strongest anchor."""
    json_dir = recorded_dir(json_dir)
    lines = ["| kernel | pass | strongest anchor | anchor time / ours | shapes | GPU, date |",
             "|---|---|---|---|---|---|"]
    for op, (kernel, studies) in KERNELS.items():
        path = Path(json_dir) / f"{op}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        for c in compare(record, studies):
            ratio = f"{c['low']:.2f}x" if f"{c['low']:.2f}" == f"{c['high']:.2f}" else \
                f"{c['low']:.2f}-{c['high']:.2f}x"
            lines.append(f"| `{kernel}` | {c['pass']} | {' or '.join(c['anchors'])} | {ratio} | {c['shapes']} | "
                         f"{record['gpu']}, {record['date']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minikernels.results", description=__doc__.splitlines()[0])
    parser.add_argument("--json-dir", default=None,
                        help=f"where the recorded <op>.json files are (default: ${ENV_VAR}, else book/data/bench)")
    args = parser.parse_args(argv)
    print(table(args.json_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
