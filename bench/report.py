"""``python -m bench.report``: the table and plot of a results file, or two files compared.

    python -m bench.report bench/out/results.jsonl [--md REPORT.md] [--png REPORT.png]
    python -m bench.report --compare A.jsonl B.jsonl [--md COMPARE.md]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import compare, plot, records, table


def write(results: Sequence[Mapping[str, Any]], md_path: Path | str | None,
          png_path: Path | str | None) -> str:
    """Render the markdown table (returned, and saved at ``md_path``) and the plot at ``png_path``."""
    text = table.markdown(results)
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(text + "\n")
    if png_path:
        plot.plot(results, png_path)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", type=Path, help="results JSONL file")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="put two results files side by side")
    parser.add_argument("--md", type=Path, help="also save the markdown here")
    parser.add_argument("--png", type=Path, help="plot path (default: FILE with .png)")
    ns = parser.parse_args(argv)
    if (ns.file is None) == (ns.compare is None):
        parser.error("give a results file or --compare A B")
    if ns.compare:
        a, b = ns.compare
        text = compare.markdown(records.read_jsonl(a), records.read_jsonl(b), (str(a), str(b)))
        if ns.md:
            ns.md.write_text(text + "\n")
    else:
        text = write(records.read_jsonl(ns.file), ns.md, ns.png or ns.file.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
