"""Initial values depend on (seed, name) alone: any slice, any thread count, the same numbers."""
import torch
from torch import nn

from moe_dist.model.init import BLOCK, fill_normal_


def _fill(shape, offsets, local_shape, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p = nn.Parameter(torch.empty(local_shape))  # a parameter, as init_weights fills them (grad mode on)
        indices = [torch.arange(o, o + n) for o, n in zip(offsets, local_shape)]  # each dim's global indices
        fill_normal_(p, shape, indices, 0.02, "1234:layers.0.ffn.experts.gate_up_proj")
        return p.detach()
    finally:
        torch.set_num_threads(before)


def test_blocks_fill_the_same_values_on_one_thread_and_several():
    shape = [4, 3 * BLOCK // 1024 // 4 + 5, 1024]  # several blocks, the last one short
    one, two = _fill(shape, [0, 0, 0], shape, 1), _fill(shape, [0, 0, 0], shape, 2)
    assert torch.equal(one, two)
    assert 0.019 < one.std().item() < 0.021


def test_a_slice_gets_the_whole_tensors_values():
    shape = [4, 3 * BLOCK // 1024 // 4 + 5, 1024]
    whole = _fill(shape, [0, 0, 0], shape, 2)
    part = _fill(shape, [2, 100, 256], [2, shape[1] - 100, 512], 2)  # an expert-parallel and column shard
    assert torch.equal(part, whole[2:, 100:, 256:768])
