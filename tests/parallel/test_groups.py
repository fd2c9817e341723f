"""ProcessGroupManager: rank layout, groups, validation errors, and the world of one."""
import pytest
import torch.distributed as dist

from dist_helper import run_workers
from moe_dist.config import ConfigError, ParallelConfig
from moe_dist.parallel import ProcessGroupManager, check_layout


def test_world_of_one_needs_no_torch_distributed(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    pgm = ProcessGroupManager(ParallelConfig(), n_experts=8)
    assert not dist.is_initialized()
    assert (pgm.world_size, pgm.rank, pgm.dp, pgm.tp, pgm.ep, pgm.edp) == (1, 0, 1, 1, 1, 1)
    assert (pgm.dp_rank, pgm.tp_rank, pgm.ep_rank, pgm.edp_rank) == (0, 0, 0, 0)
    assert pgm.dp_group is pgm.tp_group is pgm.ep_group is pgm.edp_group is None and not pgm.distributed
    assert list(pgm.local_experts(8)) == list(range(8))


def test_world_of_one_with_a_process_group(monkeypatch):
    # zero_stage > 0 in a plain `python` process: FSDP2 and DeepSpeed need a process group, of one
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    pgm = ProcessGroupManager(ParallelConfig(), n_experts=8, device="cpu", process_group=True)
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1 and pgm.distributed
        assert (pgm.world_size, pgm.rank, pgm.dp, pgm.edp) == (1, 0, 1, 1)
        assert pgm.dense_mesh.shape == (1, 1) and pgm.expert_mesh.shape == (1, 1)
        assert dist.get_process_group_ranks(pgm.dp_group) == [0]
    finally:
        pgm.destroy()
    assert not dist.is_initialized()


@pytest.mark.parametrize("args, field", [
    (dict(world=6, tp=4, ep=1), "parallel.tp"),
    (dict(world=8, tp=2, ep=1, dp=2), "parallel.dp"),
    (dict(world=6, tp=1, ep=4), "parallel.ep"),
    (dict(world=8, tp=1, ep=4, n_experts=6), "moe.n_experts=6"),
    (dict(world=1, tp=1, ep=2), "parallel.ep"),
])
def test_bad_layouts_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_layout(**args)


def test_good_layout_returns_dp():
    assert check_layout(8, tp=2, ep=4, n_experts=8) == 4


def _layout(rank):
    pgm = ProcessGroupManager(ParallelConfig(tp=2, ep=4), n_experts=8)
    ranks = dist.get_process_group_ranks
    return dict(coords=(pgm.dp_rank, pgm.tp_rank, pgm.ep_rank, pgm.edp_rank), sizes=(pgm.dp, pgm.tp, pgm.ep, pgm.edp),
                dp=ranks(pgm.dp_group), tp=ranks(pgm.tp_group), ep=ranks(pgm.ep_group), edp=ranks(pgm.edp_group),
                experts=list(pgm.local_experts(8)), backend=dist.get_backend())


def test_layout_world_8_tp_2_ep_4():
    """The table in groups.py: tp fastest in the dense layout, ep fastest in the expert layout."""
    got = run_workers(_layout, 8)
    for rank, r in enumerate(got):
        assert r["sizes"] == (4, 2, 4, 2)
        assert r["coords"] == (rank // 2, rank % 2, rank % 4, rank // 4)
        assert r["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert r["dp"] == [rank % 2 + 2 * i for i in range(4)]
        assert r["ep"] == [4 * (rank // 4) + i for i in range(4)]
        assert r["edp"] == [rank % 4, rank % 4 + 4]
        assert r["experts"] == [2 * (rank % 4), 2 * (rank % 4) + 1]
        assert r["backend"] == "gloo"


def _pp_layout(rank):
    pgm = ProcessGroupManager(ParallelConfig(pp=2, ep=2), n_experts=4)
    ranks = dist.get_process_group_ranks
    return dict(coords=(pgm.pp_rank, pgm.dp_rank, pgm.ep_rank, pgm.edp_rank), sizes=(pgm.pp, pgm.dp, pgm.ep, pgm.edp),
                pp=ranks(pgm.pp_group), dp=ranks(pgm.dp_group), ep=ranks(pgm.ep_group), edp=ranks(pgm.edp_group),
                ep_ranks=pgm.ep_ranks())


def test_layout_world_8_pp_2_ep_2():
    """The pipeline table in groups.py: pp slowest; every dp, ep and edp group within one stage."""
    got = run_workers(_pp_layout, 8)
    for rank, r in enumerate(got):
        stage = 4 * (rank // 4)
        assert r["sizes"] == (2, 4, 2, 2)
        assert r["coords"] == (rank // 4, rank % 4, rank % 2, (rank % 4) // 2)
        assert r["pp"] == [rank % 4, rank % 4 + 4]
        assert r["dp"] == [stage + i for i in range(4)]
        assert r["ep"] == r["ep_ranks"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert r["edp"] == [stage + rank % 2, stage + rank % 2 + 2]
