"""The report encoder: a GPT-2 built from a config and this project's own byte-level BPE tokenizer.

Nothing is downloaded: the tokenizer is trained on the project's report corpus with
``train_report_tokenizer`` and saved as one ``tokenizer.json``; the GPT-2 weights start random and are
pre-trained by ``training/``. A report's embedding is the final hidden state of its end-of-text
token (GPT-2 is causal, so that is the only position that has seen the whole report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn

from prima.config import TextConfig

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class ReportTokenizer:
    """Byte-level BPE with an end-of-text token appended to every report.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` holding ``EOS_TOKEN`` and ``PAD_TOKEN``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in (EOS_TOKEN, PAD_TOKEN) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, texts: Sequence[str], context_length: int) -> tuple[Tensor, Tensor]:
        """Token ids of reports, each cut to ``context_length - 1`` tokens then ended by EOS.

        Returns:
            ids (N, L) int64 padded with the pad id and mask (N, L) bool, L <= context_length.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        rows = [enc.ids[: context_length - 1] + [self.eos_id] for enc in self.tokenizer.encode_batch(list(texts))]
        length = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "ReportTokenizer":
        return cls(Tokenizer.from_file(str(path)))


def train_report_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> ReportTokenizer:
    """Train a byte-level BPE on a corpus; every byte is in the alphabet, so nothing is out of vocabulary.

    Args:
        texts: the corpus (e.g. the training reports).
        vocab_size: final vocabulary size, the 256 bytes and the two special tokens included.
        min_frequency: a merge needs at least this many occurrences.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + 2 special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return ReportTokenizer(tokenizer)


class TextTower(nn.Module):
    """GPT-2 report encoder.

    Args:
        config: vocabulary size, context length, width, depth, heads and dropout.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
        # imported here: loading transformers' GPT-2 takes seconds, and `import prima` should not
        from transformers import GPT2Config, GPT2Model

        self.config = config
        gpt2_config = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.context_length,
            n_embd=config.width,
            n_layer=config.depth,
            n_head=config.heads,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            bos_token_id=None,  # GPT-2's defaults (50256) point outside our own vocabulary
            eos_token_id=None,
            attn_implementation="sdpa",
        )
        self.gpt2 = GPT2Model(gpt2_config)

    def hidden_states(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (N, L) from ``ReportTokenizer``. Returns the last layer's states (N, L, width)."""
        if ids.shape[-1] > self.config.context_length:
            raise ValueError(f"{ids.shape[-1]} tokens exceed context_length={self.config.context_length}")
        return self.gpt2(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Report embeddings (N, width): the state at each report's last real (EOS) token."""
        states = self.hidden_states(ids, mask)
        last = mask.long().sum(-1).clamp(min=1) - 1
        return states[torch.arange(states.shape[0], device=states.device), last]

    def lm_logits(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Next-token logits (N, L, vocab) with the output layer tied to the token embedding."""
        return self.hidden_states(ids, mask) @ self.gpt2.wte.weight.T
