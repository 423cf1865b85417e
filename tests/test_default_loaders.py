"""The real embedded default (SmolLM2 from its GGUF wheel, BBC News, Dirichlet split) and local files."""

import json

import numpy as np
import pytest
import torch

from deca_flower.config import DecaConfig
from deca_flower.core.blocks import partition_blocks
from deca_flower.data.partition import build_partitioner, train_test
from deca_flower.data.sources import DataError, load_corpus
from deca_flower.models import byte_tokenizer, load_model, prepare_default_model, resolve_model_source, tiny_random_model
from deca_flower.runtime import build_runtime


def test_bbc_news_and_dirichlet_split():
    corpus = load_corpus("bbc-news")
    # 2,225 files, 100 of them exact repeats of another article: dropped so test never leaks into train
    assert len(corpus) == 2125 and corpus.features["label"].names == ["business", "entertainment", "politics", "sports", "tech"]
    train, test = train_test(corpus, 0.2, seed=0)
    assert len(test) == 425 and not set(train["text"]) & set(test["text"])
    partitioner = build_partitioner(train, "dirichlet", 4, alpha=0.25, shards_per_node=2, seed=0)
    sizes = [len(partitioner.load_partition(i)) for i in range(4)]
    assert sum(sizes) == len(train)
    label_shares = [np.bincount(partitioner.load_partition(i)["label"], minlength=5) / sizes[i] for i in range(4)]
    assert max(share.max() for share in label_shares) > 0.4  # alpha=0.25 is clearly non-IID


@pytest.mark.slow
def test_smollm2_conversion_and_one_deca_step():
    path = prepare_default_model()
    assert (path / "model.safetensors").is_file() and not hasattr(
        __import__("transformers").AutoConfig.from_pretrained(path), "quantization_config")
    model, tokenizer = load_model("smollm2-135m-instruct", torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(partition_blocks(model, 2)) == 16  # embed (tied lm_head) + 15 blocks of 2 layers
    assert [len(tokenizer.encode(" " + t, add_special_tokens=False)) for t in ("business", "tech")] == [1, 1]
    del model
    cfg = DecaConfig(num_nodes=4, eval_samples=16, max_text_tokens=32, batch_size=2)
    runtime = build_runtime(cfg, 0)
    metrics = runtime.evaluate()
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_examples"] == 16
    runtime.node.start_block(len(runtime.blocks) - 1)
    loss, half = runtime.node.local_step()
    assert np.isfinite(loss) and set(half) == set(runtime.blocks[-1].param_names)


def test_local_model_dir_and_local_data_file(tmp_path):
    model_dir = tmp_path / "my-model"
    tiny_random_model(0).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    assert resolve_model_source(str(model_dir)) == str(model_dir)
    model, tokenizer = load_model(str(model_dir), torch.device("cpu"))
    assert model.config.num_hidden_layers == 4 and tokenizer.pad_token is not None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source("./no/such/model")
    rows = [{"text": f"note {i} about {'cardio' if i % 2 else 'oncology'}", "label": "cardio" if i % 2 else "onco"}
            for i in range(40)]
    data = tmp_path / "site.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(str(data))
    assert len(corpus) == 40 and corpus.features["label"].names == ["cardio", "onco"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x", "label": 1}))
    with pytest.raises(DataError, match="lacks column"):
        load_corpus(str(tmp_path / "bad.jsonl"))
