"""Which GPU a process takes under each way Slurm or torchrun can bind GPUs (no GPU needed: the
environment a bound task sees is given as a mapping, the way `make_accelerator` passes os.environ)."""

from __future__ import annotations

import pytest

from dist_gru.runtime import LaunchError, cuda_device_index


@pytest.mark.parametrize(
    ("local_rank", "device_count", "env", "expected"),
    [
        (0, 1, {}, 0),  # one process on a one-GPU machine
        (3, 4, {}, 3),  # torchrun, or --gpus-per-node: every process sees the node's GPUs
        (1, 4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 1),
        (1, 1, {"CUDA_VISIBLE_DEVICES": "1", "SLURM_GPUS_PER_TASK": "1"}, 0),  # --gpus-per-task=1
        (7, 1, {"CUDA_VISIBLE_DEVICES": "GPU-5f0c3b2e"}, 0),  # --gpu-bind=map_gpu:..., by UUID
    ],
)
def test_device_for_each_binding(local_rank, device_count, env, expected):
    assert cuda_device_index(local_rank, device_count, env) == expected


def test_a_task_with_several_gpus_but_none_for_its_local_rank_is_refused_naming_the_binding():
    env = {"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_GPUS_PER_TASK": "2", "SLURM_LOCALID": "1"}
    with pytest.raises(LaunchError) as err:
        cuda_device_index(2, 2, env)
    assert str(err.value) == (
        "LOCAL_RANK=2 but this process sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=2,3, SLURM_GPUS_PER_TASK=2): "
        "give every process of a node all its GPUs (e.g. --gpus-per-node) so rank uses cuda:LOCAL_RANK, "
        "or exactly one GPU per task (--gpus-per-task=1)"
    )


def test_more_processes_than_gpus_without_a_binding_is_refused():
    with pytest.raises(LaunchError, match=r"^LOCAL_RANK=1 but this process sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES unset\)"):
        cuda_device_index(1, 1, {})
