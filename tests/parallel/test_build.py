"""The meta-device build: a model built on "meta", sharded there and materialised rank by rank holds
exactly (bit for bit) its slices of the one-device model, whatever the layout."""
import pytest
import torch

from dist_helper import full_model_state, run_workers
from moe_dist.config import load_config, resolve
from moe_dist.model.build import build_model, materialize
from moe_dist.parallel import ProcessGroupManager, parallelize
from moe_dist.parallel.data_parallel import apply_fsdp, local, shard_of

MODEL = ["model.d_model=32", "model.n_layer=3", "model.n_head=4", "model.n_kv_head=2", "model.d_ff=48",
         "model.first_k_dense=1", "model.vocab_size=256", "moe.n_experts=4", "moe.n_shared_experts=1",
         "model.tie_embeddings=true", "train.device=cpu"]
LAYOUTS = {"ep2": (["parallel.ep=2"], False), "zero3": ([], True), "ep2_zero3": (["parallel.ep=2"], True)}


def _sharded(overrides, fsdp, seed_offset=0):
    """The model of MODEL + overrides built on meta at world 2, sharded there and materialised."""
    cfg = resolve(load_config(None, MODEL + overrides), 2)
    pgm = ProcessGroupManager(cfg.parallel, n_experts=4)
    model = parallelize(build_model(cfg, device="meta"), cfg, pgm)
    if fsdp:
        apply_fsdp(model, pgm, bf16=False)
    materialize(model, "cpu", cfg.train.seed + seed_offset, shard_of)
    return cfg, pgm, model


def _worker(rank):
    out = {}
    for name, (overrides, fsdp) in LAYOUTS.items():
        cfg, pgm, model = _sharded(overrides, fsdp)
        out[name] = dict(full=full_model_state(model, pgm),
                         local=sum(local(p).numel() for p in model.parameters()))
    return out


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, 2)


@pytest.mark.parametrize("name", LAYOUTS)
def test_materialised_shards_are_the_one_device_model(results, name):
    one = build_model(resolve(load_config(None, MODEL), 1)).state_dict()
    total = sum(v.numel() for k, v in one.items() if k != "lm_head.weight")  # tied: one tensor
    for rank in range(2):
        got = results[rank][name]
        assert got["full"].keys() == one.keys()
        for k, v in one.items():
            assert torch.equal(got["full"][k], v), (name, rank, k)
        assert got["local"] < total  # each rank allocated a share, not the model


def _load_worker(rank, path):
    import moe_dist.interop.hf.convert as convert

    read = []
    real = convert._copy_slice
    convert._copy_slice = lambda local, *a: read.append(local.numel()) or real(local, *a)
    out = {}
    for name, (overrides, fsdp) in LAYOUTS.items():
        cfg, pgm, model = _sharded(overrides, fsdp, seed_offset=1)  # other initial values: the file must win
        read.clear()
        convert.load_weights(model, path, shard_of)
        out[name] = dict(full=full_model_state(model, pgm), read=sum(read),
                         held=sum(local(p).numel() for p in model.parameters()))
    return out


def test_init_from_reads_each_ranks_slices_of_the_weights_file(tmp_path):
    """checkpoint.init_from at ep=2 and zero_stage 3: every rank reads only the slices it holds (safetensors'
    get_slice), and together they hold the file's weights exactly."""
    from moe_dist.interop.hf import save_weights

    one = build_model(resolve(load_config(None, MODEL + ["train.seed=7"]), 1))
    save_weights(one, tmp_path / "model.safetensors")
    results = run_workers(_load_worker, 2, str(tmp_path / "model.safetensors"))
    want = one.state_dict()
    total = sum(v.numel() for k, v in want.items() if k != "lm_head.weight")
    for name in LAYOUTS:
        for r in results:
            assert r[name]["read"] == r[name]["held"] < total  # exactly what the rank holds
            for k, v in want.items():
                assert torch.equal(r[name]["full"][k], v), (name, k)
