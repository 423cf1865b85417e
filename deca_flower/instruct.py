"""Instruction tuning: prompt -> response, loss on the response tokens only.

    prompt  = "Question: <instruction, truncated to max_text_tokens tokens>\nAnswer:"
    target  = " <response, truncated to max_response_tokens tokens>" + end-of-sequence

Training uses the same label-position loss as classification (the LM head runs only where a
response token is predicted). Evaluation reports the held-out response loss per token and its
perplexity; `samples` answers a few held-out prompts greedily, for people to read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deca_flower.task import ClassificationTask, collate_pairs, text_char_bound

PROMPT_HEAD = "Question: "
PROMPT_TAIL = "\nAnswer:"


@dataclass
class EncodedPairs:
    prompts: list[list[int]]
    responses: list[list[int]]
    labels: np.ndarray  # the category, for label counts and the non-IID split

    def __len__(self) -> int:
        return len(self.prompts)


class InstructionTask:
    loss = staticmethod(ClassificationTask.loss)

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_text_tokens: int, max_response_tokens: int) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("instruction tuning needs a tokenizer with an end-of-sequence token")
        self.tokenizer = tokenizer
        self.max_text_tokens, self.max_response_tokens = max_text_tokens, max_response_tokens
        # cut before tokenising, as in classification: same tokens kept, bounded memory
        self.max_text_chars = text_char_bound(tokenizer, max_text_tokens)
        self.max_response_chars = text_char_bound(tokenizer, max_response_tokens)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._head = tokenizer.encode(PROMPT_HEAD, add_special_tokens=False)
        self._tail = tokenizer.encode(PROMPT_TAIL, add_special_tokens=False)

    def encode_dataset(self, data: Dataset) -> EncodedPairs:
        kwargs = {"add_special_tokens": False, "truncation": True}
        prompts = self.tokenizer([t[:self.max_text_chars] for t in data["text"]], max_length=self.max_text_tokens,
                                 **kwargs)["input_ids"]
        answers = self.tokenizer([" " + r[:self.max_response_chars] for r in data["response"]],
                                 max_length=self.max_response_tokens, **kwargs)
        return EncodedPairs([self._head + p + self._tail for p in prompts],
                            [a + [self.tokenizer.eos_token_id] for a in answers["input_ids"]],
                            np.asarray(data["label"], dtype=np.int64))

    def collate(self, data: EncodedPairs, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompt + response tokens, the response tokens as targets."""
        return collate_pairs([(data.prompts[i], data.responses[i]) for i in indices], self.pad_id, device)

    @torch.no_grad()
    def evaluate(self, model: PreTrainedModel, data: EncodedPairs, batch_size: int, device: torch.device) -> dict[str, float]:
        """Response loss per token over the held-out pairs (token-weighted), and its perplexity."""
        total, tokens = 0.0, 0
        for start in range(0, len(data), batch_size):
            batch = self.collate(data, list(range(start, min(start + batch_size, len(data)))), device)
            count = len(batch["targets"])
            total += float(self.loss(model, batch)) * count
            tokens += count
        loss = total / tokens
        return {"response_loss": loss, "perplexity": math.exp(loss), "num_examples": float(len(data))}

    @torch.no_grad()
    def samples(self, model: PreTrainedModel, data: EncodedPairs, count: int, device: torch.device) -> list[str]:
        """Greedy answers to the first `count` held-out prompts (same prompts on every node)."""
        out = []
        for i in range(min(count, len(data))):
            ids = torch.tensor([data.prompts[i]], device=device)
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_response_tokens,
                                       do_sample=False, use_cache=True, pad_token_id=self.pad_id)
            out.append(self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return out

    def prompt_text(self, data: EncodedPairs, i: int) -> str:
        return self.tokenizer.decode(data.prompts[i])
