"""Run hpad's tensor paths "on CUDA" on a machine without a GPU.

`fake_cuda(backbone)` enters torch's ``FakeTensorMode`` (tensors carry a device, shape and dtype but no data)
with a copy of the model whose every parameter and buffer is a fake tensor on ``cuda:0``. Any op that mixes a
``cuda`` and a ``cpu`` tensor then raises ``FakeTensorDeviceMismatchError``, as it would on a real GPU.

FakeTensorMode does not know which dtypes a CUDA kernel supports, nor does it refuse host syncs. The
`CudaKernelGuard` dispatch mode, stacked on top, fills that gap for what hpad could get wrong: it refuses the
kernels PyTorch has no CUDA implementation for with a given dtype (antialiased or bicubic resampling of
integer tensors: ``aten/src/ATen/native/cuda/UpSampleBilinear2d.cu`` dispatches float, half and bfloat16
only), and counts device -> host syncs (``.item()``, ``float(t)``, ``if t:``), which the hot paths must not do.

Data-dependent Python (``float(t)``, ``.numpy()``) cannot run on fake tensors at all: tests drive the tensor
stages and stop where a real run would copy results to the host.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from hpad.backbone import Backbone

CUDA = torch.device("cuda", 0)
_FLOATING = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
# resampling kernels whose CUDA implementation has no integer dtypes
_FLOAT_ONLY_ON_CUDA = {
    "aten._upsample_bilinear2d_aa.default",
    "aten._upsample_bicubic2d_aa.default",
    "aten.upsample_bicubic2d.default",
    "aten.upsample_bilinear2d.default",
    "aten.upsample_bilinear2d.vec",
}
_HOST_SYNC = {"aten._local_scalar_dense.default", "aten.item.default"}


class CudaKernelError(RuntimeError):
    """An op that has no CUDA kernel for its dtype (it would fail on a real GPU)."""


def _cuda_tensors(args: object) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    stack = [args]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.device.type == "cuda":
                found.append(item)
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


@dataclass
class CudaKernelGuard(TorchDispatchMode):
    """Refuse integer resampling on cuda; count device -> host syncs (``syncs``) and ops seen per device."""

    syncs: int = 0
    ops: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        on_cuda = _cuda_tensors((args, kwargs))
        if on_cuda:
            self.ops[name] = self.ops.get(name, 0) + 1
            if name in _FLOAT_ONLY_ON_CUDA and on_cuda[0].dtype not in _FLOATING:
                raise CudaKernelError(f"{name} has no CUDA kernel for {on_cuda[0].dtype}")
            if name in _HOST_SYNC:
                self.syncs += 1
        return func(*args, **kwargs)


def fake_module(module: torch.nn.Module, mode: FakeTensorMode, device: torch.device = CUDA) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are fake tensors on ``device``."""
    with unset_fake_temporarily():
        clone = copy.deepcopy(module)  # real tensors: copied before any of them becomes fake
    with mode:
        _fake_tensors_of(clone, mode, device)
    return clone


def _fake_tensors_of(clone: torch.nn.Module, mode: FakeTensorMode, device: torch.device) -> None:
    for sub in clone.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                fake = mode.from_tensor(param).to(device)
                sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = mode.from_tensor(buf).to(device)


@dataclass
class FakeCuda:
    """What `fake_cuda` yields: the fake-CUDA backbone, the fake mode and the kernel guard."""

    backbone: Backbone
    mode: FakeTensorMode
    guard: CudaKernelGuard


@contextmanager
def fake_cuda(backbone: Backbone) -> Iterator[FakeCuda]:
    """Inside: ``backbone`` copied onto a fake ``cuda:0``; device mixing and CUDA-less kernels raise."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_module(backbone.model, mode)
    fake = dataclasses.replace(backbone, model=model, device=CUDA)
    guard = CudaKernelGuard()
    with mode, guard:
        yield FakeCuda(fake, mode, guard)


def is_fake_cuda(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, FakeTensor) and tensor.device.type == "cuda"
