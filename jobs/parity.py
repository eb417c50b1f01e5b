"""Parity harness (issue #21): our models against anomalib 2.7.0's torch models, number by number.

    .venv/bin/python jobs/parity.py --out runs/parity [--models padim dfm ...] [--anomalib-venv /work/anomalib_venv]
        [--no-create-venv] [--markdown docs/parity.md]

Our side runs here (raylib_ad, no anomalib); anomalib's side runs jobs/parity_anomalib_side.py with the
anomalib venv's python (created from PyPI when missing: torch 2.14.1 / torchvision 0.29.1, then
anomalib 2.7.0). Writes OUT/parity.json (rows: model, quantity, max_abs_diff, max_rel_diff, tolerance,
holds, note), and with --markdown the table between the markers of that file. Exit status 0 when every
compared row holds, 1 otherwise (models without a case count as not holding), 2 when the venv is missing.
See docs/parity.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylib_ad.parity.compare import markdown_table  # noqa: E402
from raylib_ad.parity.harness import ALL_MODELS, run  # noqa: E402
from raylib_ad.parity.venv import DEFAULT_VENV, AnomalibVenvError, ensure_venv  # noqa: E402

BEGIN, END = "<!-- parity:begin -->", "<!-- parity:end -->"


def write_markdown(path: Path, result: dict) -> None:
    s = result["summary"]
    table = (f"{BEGIN}\n{markdown_table(result['rows'])}\n{s['rows_holding']} of {s['rows']} rows hold; models "
             f"holding on every row: {', '.join(s['models_holding']) or 'none'}. Harness time: "
             f"{result['timings']['total_seconds']} s on {result['inputs']['threads']} threads.\n{END}")
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Parity with anomalib 2.7.0\n\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=list(ALL_MODELS))
    parser.add_argument("--anomalib-venv", default=str(DEFAULT_VENV))
    parser.add_argument("--no-create-venv", action="store_true", help="fail instead of creating a missing venv")
    parser.add_argument("--markdown", default=None, help="write the table into this file (docs/parity.md)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for anomalib's side")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    python, venv_error, venv_info = None, None, {}
    try:
        python, venv_info = ensure_venv(Path(args.anomalib_venv), create=not args.no_create_venv)
        print(f"[parity] anomalib venv: {venv_info}", file=sys.stderr)
    except AnomalibVenvError as error:
        venv_error = str(error)
        print(f"[parity] CANNOT RUN anomalib's side: {error}", file=sys.stderr)
    result = run(Path(args.out), args.models, python, venv_error, args.threads, args.timeout,
                 log=lambda line: print(line, file=sys.stderr, flush=True))
    result["venv"] = venv_info
    result["timings"]["with_venv_seconds"] = round(time.perf_counter() - start, 2)
    import json

    (Path(args.out) / "parity.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        write_markdown(Path(args.markdown), result)
    s = result["summary"]
    print(f"[parity] {s['rows_holding']}/{s['rows']} rows hold; failing models: {s['models_failing']}; "
          f"{result['timings']['with_venv_seconds']} s", file=sys.stderr)
    if python is None:
        return 2
    return 0 if s["rows_holding"] == s["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
