import pytest
import torch

from deca_flower.core.blocks import ActiveBlock, partition_blocks
from deca_flower.core.optimizer import BlockAdam
from deca_flower.models import tiny_random_model


def test_blocks_cover_every_parameter_once_with_tied_head():
    model = tiny_random_model(0, num_layers=5)
    blocks = partition_blocks(model, layers_per_block=2)
    assert [b.name for b in blocks] == ["embed", "layers.0-1", "layers.2-3", "layers.4-4"]
    names = [n for b in blocks for n in b.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    assert "model.norm.weight" in blocks[-1].param_names  # final norm trains with the top layers
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one block holds it


def test_frozen_embeddings_are_in_no_block():
    blocks = partition_blocks(tiny_random_model(0), layers_per_block=2, embeddings="frozen")
    assert [b.name for b in blocks] == ["layers.0-1", "layers.2-3"]


@pytest.mark.parametrize(("k", "message"), [(5, "exceeds the model's 4 layers"), (0, ">= 1")])
def test_bad_block_size(k, message):
    with pytest.raises(ValueError, match=message):
        partition_blocks(tiny_random_model(0), layers_per_block=k)


def test_a_second_layer_stack_is_refused_not_merged_by_index():
    model = tiny_random_model(0)
    model.vision_layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])  # named vision_layers.0.*: no match
    partition_blocks(model, layers_per_block=2)
    model.tower = torch.nn.Module()
    model.tower.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])  # tower.layers.0.* beside model.layers.0.*
    with pytest.raises(ValueError, match="several layer stacks"):
        partition_blocks(model, layers_per_block=2)


def test_only_active_block_has_grads_and_state_and_lower_layers_get_no_backward():
    model = tiny_random_model(0)
    blocks = partition_blocks(model, layers_per_block=2)
    top = ActiveBlock(model, blocks[-1])
    optimizer = BlockAdam(top.masters, lr=1e-3)
    backward_calls = []
    for i, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(lambda *_, i=i: backward_calls.append(i))
    ids = torch.randint(0, 256, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    active = set(blocks[-1].param_names)
    for name, param in model.named_parameters():
        assert param.requires_grad == (name in active), name
        assert param.grad is None  # active grads were consumed and cleared by the step
    assert set(optimizer.adam.state) == {p for n, p in model.named_parameters() if n in active}
    assert sorted(set(backward_calls)) == [2, 3]  # layers 0-1 sit below the active block


def test_release_freezes_and_frees():
    model = tiny_random_model(0)
    active = ActiveBlock(model, partition_blocks(model, 2)[1])
    active.release()
    assert not any(p.requires_grad for p in model.parameters()) and active.masters == []


def test_bf16_model_gets_fp32_master_copy():
    model = tiny_random_model(0).to(torch.bfloat16)
    active = ActiveBlock(model, partition_blocks(model, 2)[1])
    assert active.has_copy and all(m.dtype == torch.float32 for m in active.masters)
    with torch.no_grad():
        active.masters[0].add_(1.0)
    active.master_to_model()
    assert torch.equal(active.params[0], active.masters[0].to(torch.bfloat16))
