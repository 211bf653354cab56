"""Training and serving cut long texts identically: modelprep's head+tail truncation == the gateway's encoder."""

from __future__ import annotations

import pytest

from service.gateway.model import TextEncoder
from tests.helpers.gateway import base_tokenizer_json

pytest.importorskip("transformers")


@pytest.mark.parametrize("max_length", [16, 64, 128])
def test_gateway_head_tail_matches_training(max_length):
    from transformers import PreTrainedTokenizerFast

    from service.modelprep.publish import head_tokens_of
    from service.modelprep.tokens import encode

    path = base_tokenizer_json()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    texts = [
        " ".join(f"word{i}" for i in range(300)),
        "A short one.",
        " ".join(["long documents often conclude at the end"] * 40),
    ]
    trained = encode(hf, texts, max_length, truncation="head_tail", tensors="np")
    encoder = TextEncoder(path, max_length, truncation="head_tail", head_tokens=head_tokens_of(path, max_length))
    served = encoder.encode(texts)
    for i, row in enumerate(served):
        n = int(trained["attention_mask"][i].sum())
        assert row.tolist() == trained["input_ids"][i][:n].tolist(), i
