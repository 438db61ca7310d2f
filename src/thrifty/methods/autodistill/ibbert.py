"""An in-domain IB-BERT-style teacher, pre-trained with MLM on the distillation corpus (AutoDistill, arXiv
2201.08539; MobileBERT, arXiv 2004.02984).

MobileBERT and AutoDistill distil from IB-BERT: a BERT whose blocks are *inverted* bottlenecks (a narrow
feature map between blocks, wider attention and FFN inside) and which was itself pre-trained with MLM. Layer-wise
transfer matches the narrow inter-block maps, so the students' width is the teacher's ``dim``. The miniature
scales it down (``teacher.dim`` 256 between blocks, ``intra_dim`` 512 inside, against 512 and 1024 for
IB-BERT-large) and pre-trains it here:

1. a WordPiece tokenizer (lower-cased BERT normalisation, ``[PAD] [UNK] [CLS] [SEP] [MASK]``) is trained on the
   distill-train documents only, with ``teacher.vocab_size`` entries;
2. ``teacher.steps`` MLM steps on packed ``[CLS] … [SEP]`` sequences of ``data.seq_len`` tokens from the same
   documents, 15% masking (80/10/10) drawn afresh for every step, AdamW with linear warm-up and decay;
   the loss and the logits are computed at the masked positions only;
3. the model (``MobileBertForMaskedLM``: MobileBERT's block with ``intra_bottleneck_size > hidden_size``,
   LayerNorm and GELU as in BERT, key/query from a shared bottleneck as in MobileBERT, 128-wide trigram
   embeddings as the students'), its tokenizer and ``teacher.json`` (settings, cost, loss curve) are written to
   a directory under the data directory named by the digest of the settings and the corpus, so it is trained
   once and reloaded by every later run; the directory is a plain Hugging Face model directory
   (``AutoModelForMaskedLM.from_pretrained``).

Deviations from IB-BERT: 4 layers and 256/512 widths instead of 24 and 512/1024; no next-sentence objective; a
corpus tokenizer of 4,096 entries instead of BERT's 30,522.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from thrifty.core.run import autocast, progress, write_json
from thrifty.data.text import Document
from thrifty.methods.autodistill.data import MaskedBatches, mask_tokens, masked_batches, sample_sequences
from thrifty.methods.autodistill.schedule import lr_at

log = logging.getLogger(__name__)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_tokenizer(docs: list[Document], *, vocab_size: int) -> Any:
    """A lower-casing WordPiece ``BertTokenizerFast`` trained on ``docs`` (its vocabulary has ``vocab_size``
    entries at most, the five special tokens first)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"teacher.vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator((d.text for d in docs), trainer)
    # the trainer numbers "##" pieces in hash-map order (huggingface/tokenizers#1794): renumber the vocabulary
    # in a fixed order (special tokens, then sorted), so equal training text gives equal ids on every machine
    learned = sorted(t for t in tok.get_vocab() if t not in SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *learned])}
    tok.model = models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", do_lower_case=True, model_max_length=512,
    )  # fmt: skip


def ibbert_config(tcfg: Any, vocab_size: int) -> Any:
    """The ``MobileBertConfig`` of the IB-BERT teacher (``tcfg`` is a ``TeacherConfig``)."""
    from transformers import MobileBertConfig

    cfg = MobileBertConfig(
        vocab_size=vocab_size,
        num_hidden_layers=tcfg.num_layers,
        hidden_size=tcfg.dim,
        embedding_size=tcfg.embedding_size,
        intra_bottleneck_size=tcfg.intra_dim,
        true_hidden_size=tcfg.intra_dim,
        num_attention_heads=tcfg.num_heads,
        intermediate_size=tcfg.intermediate_size,
        num_feedforward_networks=1,
        hidden_act="gelu",
        normalization_type="layer_norm",
        max_position_embeddings=512,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return cfg


def masked_logits(model: Any, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MLM logits (M, V) of ``MobileBertForMaskedLM``/``BertForMaskedLM`` at the ``keep`` positions only."""
    base = getattr(model, model.base_model_prefix)
    h = base(input_ids=ids).last_hidden_state
    return model.cls(h[keep])


@torch.inference_mode()
def masked_accuracy(model: Any, batches: MaskedBatches) -> float:
    """Top-1 accuracy of an MLM model at the masked positions of ``batches``."""
    was_training = model.training
    model.eval()
    hit = total = 0
    for ids, labels in zip(batches.ids, batches.labels):
        keep = labels != -100
        hit += int((masked_logits(model, ids, keep).argmax(-1) == labels[keep]).sum())
        total += int(keep.sum())
    model.train(was_training)
    return hit / max(1, total)


def pretrain(
    tcfg: Any,
    docs: list[Document],
    tokenizer: Any,
    *,
    seq_len: int,
    mask_prob: float,
    progress_bar: bool,
    val: MaskedBatches | None = None,
    eval_every: int = 200,
) -> tuple[Any, dict[str, Any]]:
    """MLM pre-training of a fresh IB-BERT teacher on ``docs``; returns (``MobileBertForMaskedLM`` in eval mode,
    a record with the loss curve, validation accuracy every ``eval_every`` steps when ``val`` is given, and the
    cost)."""
    from transformers import MobileBertForMaskedLM

    torch.manual_seed(tcfg.seed)
    model = MobileBertForMaskedLM(ibbert_config(tcfg, len(tokenizer)))
    t0 = time.perf_counter()
    seqs = sample_sequences(docs, tokenizer, num=tcfg.steps * tcfg.batch_size, seq_len=seq_len, seed=tcfg.seed)
    sample_seconds = time.perf_counter() - t0
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "embeddings" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=tcfg.lr
    )
    model.train()
    curve: list[dict[str, float]] = []
    window: list[float] = []
    with progress(tcfg.steps, "pre-training the IB-BERT teacher (MLM)", enabled=progress_bar) as advance:
        for step in range(tcfg.steps):
            batch = seqs[step * tcfg.batch_size : (step + 1) * tcfg.batch_size]
            ids, labels = mask_tokens(
                batch, special_ids=special, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                prob=mask_prob, seed=tcfg.seed * 1_000_003 + step,
            )  # fmt: skip
            keep = labels != -100
            with autocast(ids.device.type, tcfg.precision):
                logits = masked_logits(model, ids, keep)
            loss = F.cross_entropy(logits.float(), labels[keep])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tcfg.steps, lr=tcfg.lr, end_lr=0.0, warmup_frac=tcfg.warmup_frac)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            window.append(float(loss.detach()))
            done = step + 1
            evaluate = val is not None and (done % eval_every == 0 or done == tcfg.steps)
            if done % 50 == 0 or done == tcfg.steps or evaluate:
                point = {"step": done, "loss": sum(window) / len(window)}
                if evaluate:
                    point["val_acc"] = masked_accuracy(model, val)
                    log.info("teacher step %d: val masked-token accuracy %.4f", done, point["val_acc"])
                curve.append(point)
                window = []
            advance(loss=f"{float(loss.detach()):.3f}")
    model.eval().requires_grad_(False)
    record = {
        "steps": tcfg.steps,
        "tokens_seen": tcfg.steps * tcfg.batch_size * seq_len,
        "params": sum(p.numel() for p in model.parameters()),
        "sample_seconds": sample_seconds,
        "train_seconds": time.perf_counter() - t0 - sample_seconds,
        "loss_curve": curve,
    }
    return model, record


def teacher_settings(tcfg: Any, data_cfg: Any) -> dict[str, Any]:
    """What the pre-trained teacher depends on besides the corpus (its cache key). ``precision`` enters only when it
    is not fp32, so teachers pre-trained before the key existed keep their keys."""
    keep = ("vocab_size", "num_layers", "dim", "intra_dim", "num_heads", "intermediate_size", "embedding_size",
            "steps", "batch_size", "lr", "warmup_frac", "weight_decay", "seed")  # fmt: skip
    teacher = {k: getattr(tcfg, k) for k in keep}
    if tcfg.precision != "fp32":
        teacher["precision"] = tcfg.precision
    return {
        "teacher": teacher,
        "data": {"seq_len": data_cfg.seq_len, "mask_prob": data_cfg.mask_prob, "holdout": data_cfg.holdout},
        "version": 1,
    }


def ensure_teacher(
    root: Path, tcfg: Any, data_cfg: Any, docs: list[Document], *, progress_bar: bool,
    val_docs: list[Document] | None = None,
) -> Path:  # fmt: skip
    """The teacher directory ``root`` (a Hugging Face ``MobileBertForMaskedLM`` with its tokenizer), pre-training
    it first when it is not complete there (tracking masked-token accuracy on 8 batches of ``val_docs``, the
    flash-validation documents, when given). Returns ``root``."""
    marker = root / "teacher.json"
    if marker.is_file() and (root / "config.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(docs, vocab_size=tcfg.vocab_size)
    tok_seconds = time.perf_counter() - t0
    log.info("pre-training the IB-BERT teacher once (cached in %s)", root)
    val = None
    if val_docs:
        val = masked_batches(
            val_docs, tokenizer, num_batches=8, batch_size=tcfg.batch_size, seq_len=data_cfg.seq_len,
            prob=data_cfg.mask_prob, seed=tcfg.seed + 77,
        )  # fmt: skip
    model, record = pretrain(
        tcfg, docs, tokenizer, seq_len=data_cfg.seq_len, mask_prob=data_cfg.mask_prob, progress_bar=progress_bar,
        val=val,
    )  # fmt: skip
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    info = {
        "name": f"thrifty IB-BERT teacher {root.name}",
        "settings": teacher_settings(tcfg, data_cfg),
        "tokenizer_seconds": tok_seconds,
        "vocab_size": len(tokenizer),
        **record,
        "total_seconds": time.perf_counter() - t0,
    }
    write_json(marker, info)
    return root


def read_teacher_info(root: Path) -> dict[str, Any]:
    path = root / "teacher.json"
    return json.loads(path.read_text()) if path.is_file() else {}
