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
from typing import NamedTuple

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


class Kernel(NamedTuple):
    """Rows of the table: in the record of ``op``, the implementation ``ours`` against every anchor there."""

    op: str
    label: str  # what the rows stand for (markdown)
    ours: str = OURS
    # implementations that are studies, not anchors (our other ones, named "minikernels ..." or "mk. ...",
    # never are anchors either)
    studies: tuple[str, ...] = ()
    # where the comparison is with something that is not an anchor (our own kernel on one GPU): the only
    # implementations compared with, and the name each goes by in the table
    anchors: dict[str, str] | None = None


KERNELS = (
    Kernel("softmax", "`mk.softmax`"),
    Kernel("flash", "`mk.flash_attention`"),
    Kernel("decode", "`mk.decode_attention`"),
    Kernel("sparse", "`mk.block_sparse_attention`", studies=("xattention-estimate",)),
    Kernel("linear", "`mk.linear_attention`", studies=("sdpa-cudnn (softmax, causal)",)),
    Kernel("ssd", "`mk.ssd`"),
    Kernel("selective_scan", "`mk.selective_scan`", studies=("exponentials alone", "exponentials alone, polynomial")),
    Kernel("paged_decode", "`mk.decode_attention`, paged (16-token pages)", ours="minikernels paged16"),
    Kernel("paged_decode", "`mk.decode_attention`, int8 cache", ours="minikernels int8"),
    Kernel("varlen", "`mk.flash_attention_varlen`"),
    Kernel("distributed", "`mk.distributed.ring_attention`, a group of one GPU", ours="ring (P=1, nccl)",
           anchors={OURS: "`mk.flash_attention` (no group)"}),
    Kernel("distributed", "`mk.distributed.ulysses_attention`, a group of one GPU", ours="ulysses (P=1, nccl)",
           anchors={OURS: "`mk.flash_attention` (no group)"}),
    Kernel("lm", "the book's model on `mk.flash_attention`", studies=("block-sparse", "linear")),
    Kernel("hf", "`\"minikernels\"` in a 125M Llama (`transformers`)"),
)
# Fields that are not part of the problem measured: the measurements, and how an implementation ran it
# (an int8 cache holds the same keys and values as a 16-bit one).
MEASURES = {"impl", "ms", "ms_rounds", "Mtokps", "ktokps", "TFLOPs", "GBps", "frac_of_copy", "timing",
            "speedup_over_dense_causal", "ideal_speedup", "fraction_of_ideal", "relative_to_sparse_attention",
            "flop_ratio", "sparse_attention_ms", "one_call_ms", "sparse_attention_one_call_ms", "blockmask_build_ms",
            "speed_vs_dense", "speed_vs_bf16", "speed_vs_flashinfer", "speed_vs_best_anchor", "tokens", "cache",
            "copy_ms_kv", "copy_GBps_kv", "nvlink_ms_predicted", "hidden_predicted"}


def _case(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items() if k not in MEASURES))


def _is_ours(impl: str) -> bool:
    return impl == OURS or impl.startswith((OURS + " ", "mk."))


def compare(record: dict, studies: tuple = (), ours: str = OURS, anchors: dict | None = None) -> list[dict]:
    """Per pass: at each shape where ``ours`` and an anchor both ran, the fastest anchor there; the
    anchors that were fastest somewhere (most often first) and the range of anchor time / ours.
    ``anchors``: the only implementations compared with, and their names in the result (default: every
    implementation that is not ours, nor one of ours, nor a study)."""
    def is_anchor(impl):
        return impl in anchors if anchors is not None else not _is_ours(impl) and impl not in studies

    out = []
    for direction in dict.fromkeys(r["pass"] for r in record["rows"]):
        rows = [r for r in record["rows"] if r["pass"] == direction]
        mine = {_case(r): r["ms"] for r in rows if r["impl"] == ours}
        best = {}  # case -> (anchor, ms) of the fastest anchor there
        for r in rows:
            case = _case(r)
            if is_anchor(r["impl"]) and case in mine and (case not in best or r["ms"] < best[case][1]):
                best[case] = ((anchors or {}).get(r["impl"], r["impl"]), r["ms"])
        if not best:
            continue
        wins = {}
        for anchor, _ in best.values():
            wins[anchor] = wins.get(anchor, 0) + 1
        ratios = [ms / mine[case] for case, (_, ms) in best.items()]
        out.append({"pass": direction, "anchors": sorted(wins, key=lambda a: -wins[a]), "low": min(ratios),
                    "high": max(ratios), "shapes": len(ratios)})
    return out


def table(json_dir: str | os.PathLike | None = None) -> str:
    """The markdown table of every recorded kernel against its strongest anchor."""
    json_dir = recorded_dir(json_dir)
    lines = ["| kernel | pass | strongest anchor | anchor time / ours | shapes | GPU, date |",
             "|---|---|---|---|---|---|"]
    for kernel in KERNELS:
        path = Path(json_dir) / f"{kernel.op}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        for c in compare(record, kernel.studies, kernel.ours, kernel.anchors):
            ratio = f"{c['low']:.2f}x" if f"{c['low']:.2f}" == f"{c['high']:.2f}" else \
                f"{c['low']:.2f}-{c['high']:.2f}x"
            lines.append(f"| {kernel.label} | {c['pass']} | {' or '.join(c['anchors'])} | {ratio} | {c['shapes']} | "
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
