"""PPO-ptx (Ouyang et al. 2022, eq. 2): a pretraining loss on the stage-1 corpus mixed into the policy's objective,
so RLHF does not erase what pretraining taught (the "alignment tax").

Documents are read in a seeded order (each process takes every world-th one), tokenised with EOS between them and
packed into blocks of `ppo.ptx_seq_len`; the stream's position is checkpointed for exact resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from pipeline.data.records import read_records
from pipeline.errors import UserError
from pipeline.modeling import lm_logits
from pipeline.ppo.roles import POLICY, Roles, hidden_states, use_adapter


def load_corpus_texts(source: str | Path) -> list[str]:
    """The `text` of every document of the corpus: the web-text stage's final/ (its train/ parquet shards), or a
    file, directory or Hub id read like any other records."""
    path = Path(source)
    if (path / "train").is_dir():
        path = path / "train"
    texts = []
    for _, row in read_records(path if path.exists() else source, "ppo.ptx_dataset"):
        if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
            texts.append(row["text"])
    if not texts:
        raise UserError(f"ppo.ptx_dataset: {source} holds no documents with a 'text' field")
    return texts


class PtxStream:
    """Packed blocks of corpus tokens for this process, in a reproducible order."""

    def __init__(
        self, texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int, rank: int, world: int
    ):
        self.texts, self.tokenizer, self.seq_len, self.seed = texts, tokenizer, seq_len, seed
        self.rank, self.world = rank, world
        self.epoch, self.doc, self.buffer = 0, 0, []

    def _order(self) -> list[int]:
        order = torch.randperm(
            len(self.texts), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        mine = order[self.rank :: self.world]
        return mine or order  # fewer documents than processes: every process reads all of them

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """[batch_size, seq_len] token ids."""
        need = batch_size * self.seq_len
        order = self._order()
        while len(self.buffer) < need:
            if self.doc >= len(order):
                self.epoch, self.doc = self.epoch + 1, 0
                order = self._order()
            text = self.texts[order[self.doc]]
            self.buffer += self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            self.doc += 1
        block, self.buffer = self.buffer[:need], self.buffer[need:]
        return torch.tensor(block, dtype=torch.long).view(batch_size, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "doc": self.doc, "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.doc, self.buffer = state["epoch"], state["doc"], list(state["buffer"])


def pretraining_loss(roles: Roles, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the policy (adapter on) over packed corpus blocks."""
    mask = torch.ones_like(input_ids)
    with use_adapter(roles.model, POLICY), roles.numerics():
        states = hidden_states(roles.model, input_ids, mask)[:, :-1]
        logits = lm_logits(roles.model.get_base_model(), states).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
