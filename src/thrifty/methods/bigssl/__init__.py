"""BigSSL recipe: Conformer ASR with wav2vec 2.0 / w2v-BERT pre-training, CTC fine-tuning and noisy-student training
(Zhang et al., *BigSSL*, arXiv 2109.13226)."""
