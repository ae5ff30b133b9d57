"""Deterministic cost counts of a `generate()` decode step: host syncs, aten ops and (on CUDA) kernel launches.

At batch 1 an eager decode step of a 7B model on a GPU is bound by what the host issues, not by arithmetic: every
operator dispatched costs host time and usually a kernel launch, and every host sync stalls the launch queue until
the GPU drains. These are counted with `torch.profiler`; they do not vary from run to run, so tests can pin them
(timings belong in benchmarks):

* `syncs`: operators that read a device value on the host: `.item()`, `int(t)`, `bool(t)` (all through
  `aten::_local_scalar_dense`) and `nonzero` (which boolean-mask indexing calls). Device independent.
* `ops`: aten operators dispatched from Python (top-level profiler events, views included). Device independent.
* `kernels`, `device_syncs`: CUDA kernel launches and CUDA runtime synchronisations (stream, device or event
  synchronise calls), counted only when the work runs on a CUDA device (else None).

A decode step is measured as one iteration of `generate`'s loop: the counts of generating `n + 1` tokens minus
those of generating `n`, so generate's own per-token work is in both the patched and the stock figure.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile


SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero"})
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch")
DEVICE_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclass(frozen=True)
class OpCounts:
    """Host syncs and aten ops of some work, and its CUDA kernel launches and synchronisations (None off CUDA)."""

    syncs: int
    ops: int
    kernels: int | None = None
    device_syncs: int | None = None

    def __sub__(self, other: "OpCounts") -> "OpCounts":
        def minus(mine, theirs):
            return None if mine is None or theirs is None else mine - theirs

        return OpCounts(
            self.syncs - other.syncs,
            self.ops - other.ops,
            minus(self.kernels, other.kernels),
            minus(self.device_syncs, other.device_syncs),
        )


def count_ops(work: Callable[[], object], cuda: bool = False) -> OpCounts:
    """Run `work()` under the profiler and count its operators (and, with `cuda=True`, its CUDA runtime calls)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        work()
        if cuda:
            torch.cuda.synchronize()
    events = profiler.events()
    aten = [event for event in events if event.name.startswith("aten::")]
    top = [event for event in aten if event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")]
    counts = {"syncs": sum(event.name in SYNC_OPS for event in aten), "ops": len(top)}
    if cuda:
        names = [event.name for event in events]
        counts["kernels"] = sum(name.startswith(KERNEL_LAUNCHES) for name in names)
        # The synchronize that closes the profiled region is ours, not the work's.
        counts["device_syncs"] = sum(name.startswith(DEVICE_SYNCS) for name in names) - 1
    return OpCounts(**counts)


def decode_step_counts(model: torch.nn.Module, inputs: dict, tokens: int = 3, **generate_kwargs) -> OpCounts:
    """The counts of one decode step of `model.generate(**inputs)` (greedy unless `generate_kwargs` say otherwise).

    Measured as the difference between generating `tokens + 1` and `tokens` new tokens (`min_new_tokens` keeps
    an end-of-sequence token from stopping either early).

    Raises:
        ValueError: if `tokens < 2` (the first decode steps also set up the cache).
    """
    if tokens < 2:
        raise ValueError(f"`tokens={tokens}` must be >= 2: the first decode steps are not yet steady.")
    generate_kwargs.setdefault("do_sample", False)
    cuda = model.device.type == "cuda"

    def generate(count: int) -> Callable[[], object]:
        return lambda: model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, **generate_kwargs)

    with torch.no_grad():
        generate(tokens)()  # warm-up: lazy initialisation must not land in either count
        return count_ops(generate(tokens + 1), cuda) - count_ops(generate(tokens), cuda)
