"""A tiny random BERT teacher and a teacher cache built from it, so unit tests never load the real one."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from thrifty.methods.autodistill.data import MaskedBatches, mask_tokens
from thrifty.methods.autodistill.teacher import MLMHead, build_cache

VOCAB = 120
SPECIAL = [0, 1, 2, 3]  # pad, cls, sep, mask


@pytest.fixture(scope="module")
def teacher() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    model = BertModel(cfg, add_pooling_layer=False).eval()
    model.requires_grad_(False)
    return model


def random_batches(num: int, batch: int, seq: int, seed: int) -> MaskedBatches:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (num * batch, seq), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    masked, labels = mask_tokens(ids, special_ids=SPECIAL, mask_id=3, vocab_size=VOCAB, prob=0.2, seed=seed)
    return MaskedBatches(masked.view(num, batch, seq), labels.view(num, batch, seq))


@pytest.fixture(scope="module")
def head(teacher: BertModel) -> MLMHead:
    return MLMHead(embedding=teacher.get_input_embeddings().weight).eval()


@pytest.fixture(scope="module")
def cache(teacher: BertModel, head: MLMHead):
    return build_cache(teacher, head, random_batches(4, 3, 16, seed=1), progress_bar=False)
