"""Devices and process groups (moekit/parallel/launch.py); joining a real group is tested where the
processes are started (test_expert_parallel.py, tests/apps/test_train_cli.py)."""

import pytest
import torch
import torch.distributed as dist

from moekit.parallel import device_name, init_distributed, parallel_mesh, resolve_device


def test_device_names_are_checked():
    assert [device_name(d) for d in ("auto", "cpu", "cuda", "cuda:1", torch.device("cpu"))] == \
        ["auto", "cpu", "cuda", "cuda:1", "cpu"]
    for bad in ("gpu", "cuda:", "CPU", 0, None):
        with pytest.raises(ValueError, match=r"device must be one of auto, cpu, cuda or cuda:N, got"):
            device_name(bad)


def test_auto_is_cuda_where_there_is_a_gpu_and_the_cpu_elsewhere():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error where there is no GPU")
def test_cuda_where_there_is_none_is_a_one_line_error():
    for name in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"device '(cuda|cuda:0)': CUDA is not available here \(torch .*, 0 GPUs "
                                             r"visible\); use the device 'cpu' or 'auto'"):
            resolve_device(name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_is_a_gpu_of_this_process(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda") == torch.device("cuda:0")
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"only {n} GPUs are visible"):
        resolve_device(f"cuda:{n}")


def test_outside_torchrun_there_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == (0, 1) and not dist.is_initialized()
    with pytest.raises(RuntimeError, match="parallel_mesh needs a process group"):
        parallel_mesh(2, "cpu")
