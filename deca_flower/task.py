"""Classification as generation: prompt -> " <label>", loss on the label tokens only.

    prompt  = "Article: <text truncated to max_text_tokens tokens>\nTopic:"
    target  = " business" (the label's own tokens; one token each for SmolLM2 on BBC News)

Training runs the decoder over prompt+label and applies the LM head ONLY at the positions that
predict label tokens ([B, L, H] hidden -> [N_label_tokens, V] logits). Evaluation scores every
label by its log-likelihood and predicts the best (accuracy, macro-F1).

Texts are cut to text_char_bound() characters before they are tokenised: a fast tokenizer holds
hundreds of bytes per character of its input, so one huge row would exhaust memory for 64 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from sklearn.metrics import f1_score
from transformers import PreTrainedModel, PreTrainedTokenizerBase

PROMPT_HEAD = "Article: "
PROMPT_TAIL = "\nTopic:"


@dataclass
class Encoded:
    """Tokenised examples: prompt ids per example and the class index."""

    prompts: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.prompts)


def text_char_bound(tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> int:
    """Characters of a text worth tokenising when only its first max_tokens tokens are kept:
    2 * (max_tokens + 1) * the longest token of the vocabulary, in characters.

    No token covers more characters than its vocabulary entry has (byte-level BPE: one entry
    character per byte), so the kept tokens end within max_tokens * longest characters; the rest is
    margin for the word the cut falls in, so the tokens kept are those of the whole text unless that
    word is longer than the margin (SmolLM2: 81-character tokens, 64 tokens -> 10,530 characters)."""
    longest = max(len(token) for token in tokenizer.get_vocab())
    return 2 * (max_tokens + 1) * longest


def pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded prompt+target ids and, flattened, the positions predicting the target tokens
    (the LM head then runs only there: see ClassificationTask.loss)."""
    seqs, rows, cols, targets = [], [], [], []
    for row, (prompt, target) in enumerate(pairs):
        seqs.append(prompt + target)
        rows += [row] * len(target)
        cols += range(len(prompt) - 1, len(prompt) - 1 + len(target))
        targets += target
    input_ids, attention = pad(seqs, pad_id, device)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": input_ids, "attention_mask": attention,
            "rows": as_long(rows), "cols": as_long(cols), "targets": as_long(targets)}


class ClassificationTask:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, label_names: list[str], max_text_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.max_text_tokens = max_text_tokens
        self.max_text_chars = text_char_bound(tokenizer, max_text_tokens)
        self.pad_id = tokenizer.pad_token_id
        self.label_ids = [self._ids(" " + name) for name in self.label_names]
        if len({tuple(ids) for ids in self.label_ids}) != len(self.label_ids):
            raise ValueError(f"labels {self.label_names} are not distinct after tokenisation")
        self._head, self._tail = self._ids(PROMPT_HEAD), self._ids(PROMPT_TAIL)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_dataset(self, data: Dataset) -> Encoded:
        return self.encode(list(data["text"]), list(data["label"]))

    def encode(self, texts: list[str], labels: list[int]) -> Encoded:
        texts = [text[:self.max_text_chars] for text in texts]  # the tokens kept are the same (text_char_bound)
        batch = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_text_tokens)
        prompts = [self._head + ids + self._tail for ids in batch["input_ids"]]
        return Encoded(prompts, np.asarray(labels, dtype=np.int64))

    # -- training ----------------------------------------------------------------------

    def collate(self, data: Encoded, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompt + label tokens, the label tokens as targets."""
        return collate_pairs([(data.prompts[i], self.label_ids[int(data.labels[i])]) for i in indices],
                             self.pad_id, device)

    @staticmethod
    def loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over label tokens; the LM head runs only where it is needed."""
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        picked = hidden[batch["rows"], batch["cols"]]                # [N, H]
        logits = model.get_output_embeddings()(picked).float()       # [N, V]
        return F.cross_entropy(logits, batch["targets"])

    # -- evaluation --------------------------------------------------------------------

    @torch.no_grad()
    def scores(self, model: PreTrainedModel, data: Encoded, batch_size: int, device: torch.device) -> np.ndarray:
        """[N, C] log-likelihood of each label given each prompt."""
        out = np.zeros((len(data), len(self.label_ids)))
        single = all(len(ids) == 1 for ids in self.label_ids)
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            if single:  # one forward: the next-token distribution after the prompt
                ids, mask = pad([data.prompts[i] for i in idx], self.pad_id, device)
                hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(idx), device=device), mask.sum(1) - 1]
                logp = model.get_output_embeddings()(last).float().log_softmax(-1)
                out[idx] = logp[:, [ids_[0] for ids_ in self.label_ids]].cpu().numpy()
                continue
            for c in range(len(self.label_ids)):  # one forward per label
                batch = self.collate(_with_label(data, idx, c), list(range(len(idx))), device)
                hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                logp = model.get_output_embeddings()(hidden[batch["rows"], batch["cols"]]).float().log_softmax(-1)
                token_logp = logp.gather(1, batch["targets"][:, None]).squeeze(1)
                out[idx, c] = torch.zeros(len(idx), device=device).index_add_(0, batch["rows"], token_logp).cpu().numpy()
        return out

    def evaluate(self, model: PreTrainedModel, data: Encoded, batch_size: int, device: torch.device) -> dict[str, float]:
        predictions = self.scores(model, data, batch_size, device).argmax(1)
        return {
            "accuracy": float((predictions == data.labels).mean()),
            "macro_f1": float(f1_score(data.labels, predictions, average="macro",
                                       labels=list(range(len(self.label_names))), zero_division=0)),
            "num_examples": float(len(data)),
        }


def _with_label(data: Encoded, indices: list[int], label: int) -> Encoded:
    return Encoded([data.prompts[i] for i in indices], np.full(len(indices), label))
