"""Texts are cut to text_char_bound() characters before tokenising: the tokens kept are those of the
whole text (the embedded data with the embedded and the test tokenizer), and a huge row costs the
tokenizer no more than the bound."""

import pytest

from deca_flower import instruct as instruct_prompt
from deca_flower import task as task_prompt
from deca_flower.data.instructions import load_instructions
from deca_flower.data.sources import load_corpus
from deca_flower.instruct import InstructionTask
from deca_flower.models import DEFAULT_MODEL, byte_tokenizer, resolve_model_source
from deca_flower.task import ClassificationTask, text_char_bound


def whole_text_ids(tokenizer, texts, max_tokens):
    """Each whole text tokenised, its first max_tokens tokens kept: what the tasks gave before the cut."""
    return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]


def assert_same_tokens_as_whole_texts(tokenizer, max_text_tokens, max_response_tokens):
    """Classification prompts (BBC News) and instruction prompts and responses (chatterbot) against the
    whole-text encoding; returns how many texts the bound actually cut."""
    corpus, pairs = load_corpus("bbc-news"), load_instructions("chatterbot-english")
    texts, questions, answers = list(corpus["text"]), list(pairs["text"]), list(pairs["response"])
    article, topic, question, answer = (tokenizer.encode(text, add_special_tokens=False) for text in
                                        (task_prompt.PROMPT_HEAD, task_prompt.PROMPT_TAIL,
                                         instruct_prompt.PROMPT_HEAD, instruct_prompt.PROMPT_TAIL))
    task = ClassificationTask(tokenizer, corpus.features["label"].names, max_text_tokens)
    assert task.encode_dataset(corpus).prompts == \
        [article + ids + topic for ids in whole_text_ids(tokenizer, texts, max_text_tokens)]
    instruct = InstructionTask(tokenizer, max_text_tokens, max_response_tokens)
    encoded = instruct.encode_dataset(pairs)
    assert encoded.prompts == [question + ids + answer for ids in whole_text_ids(tokenizer, questions, max_text_tokens)]
    assert encoded.responses == [ids + [tokenizer.eos_token_id]
                                 for ids in whole_text_ids(tokenizer, [" " + r for r in answers], max_response_tokens)]
    cut_texts = [t for t in texts + questions if len(t) > task.max_text_chars]
    cut_answers = [r for r in answers if len(r) > instruct.max_response_chars]
    return len(cut_texts) + len(cut_answers)


@pytest.mark.slow
@pytest.mark.parametrize(("max_text_tokens", "max_response_tokens"), [(64, 48), (16, 2)],
                         ids=["defaults", "small bounds that cut many texts"])
def test_the_embedded_tokenizer_keeps_the_same_tokens_of_the_embedded_data(max_text_tokens, max_response_tokens):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(DEFAULT_MODEL))
    cut = assert_same_tokens_as_whole_texts(tokenizer, max_text_tokens, max_response_tokens)
    assert cut > 0  # the bound did cut texts (1 in 3 BBC articles at 16 tokens), without changing a token


def test_the_test_tokenizer_keeps_the_same_tokens_of_the_embedded_data():
    cut = assert_same_tokens_as_whole_texts(byte_tokenizer(), 16, 24)
    assert cut > 2000  # byte tokens: every BBC article is cut at 2 x 17 x 4 characters


class RecordingTokenizer:
    """The tokenizer, noting the longest text it was handed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest] + [len(t) for t in texts])
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_row_reaches_the_tokenizer_cut_to_the_bound():
    from datasets import Dataset

    tokenizer = RecordingTokenizer(byte_tokenizer())
    huge = "word " * 4_000_000  # 20 MB: whole, the byte tokenizer would hold 20 M tokens and gigabytes
    classify = ClassificationTask(tokenizer, ["a", "b"], max_text_tokens=16)
    encoded = classify.encode([huge, "short"], [0, 1])
    assert tokenizer.longest == classify.max_text_chars == text_char_bound(byte_tokenizer(), 16) == 136
    assert encoded.prompts[0] == classify.encode(["word " * 10], [0]).prompts[0]  # 50 characters hold the 16 tokens
    tokenizer.longest = 0
    instruct = InstructionTask(tokenizer, max_text_tokens=16, max_response_tokens=24)
    pairs = instruct.encode_dataset(Dataset.from_dict({"text": [huge], "response": [huge], "label": [0]}))
    assert tokenizer.longest == instruct.max_response_chars + 1  # " " + the cut response
    assert pairs.responses[0] == instruct.encode_dataset(
        Dataset.from_dict({"text": ["q"], "response": ["word " * 10], "label": [0]})).responses[0]
