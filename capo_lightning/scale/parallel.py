"""FSDP2 for the policy: ``fully_shard`` per decoder layer over every rank, from one GPU to many
nodes.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` with the mesh fixed to pure data
parallelism (``data_parallel_size`` = world size, no tensor parallelism) and the sharding recipe
here, applied by ``CAPOModule.configure_model`` through :meth:`FSDP2Strategy.shard`: each decoder
layer is its own FSDP unit (all-gathered for its forward and backward, then freed), the embeddings,
final norm and LM head form the root unit. Mixed precision is FSDP2's ``MixedPrecisionPolicy`` (bf16
compute and all-gathers, fp32 gradient reduction, fp32 sharded master weights), so the trainer's
precision stays ``32-true``.

Why ``ModelParallelStrategy`` rather than Lightning's ``FSDPStrategy``: the latter wraps FSDP1
(``FullyShardedDataParallel``, flat parameters), whose parameters are views into flat buffers the
selector and the vLLM weight sync cannot address by name, and which PyTorch is retiring; FSDP2 keeps
one ``DTensor`` per parameter, so :func:`full_tensor` gathers exactly one weight at a time.

:func:`no_sync_for` serves DDP and FSDP2 alike: the context in which a micro-batch's backward keeps
its gradient on its rank, so that an optimizer step reduces its accumulated gradient over ranks
once, on its last backward, instead of once per micro-batch (reduction is linear: reducing the sum
once is reducing each part).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capo_lightning.models.lora import transformers_model
from capo_lightning.models.policy import parse_dtype


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded parameter (an all-gather every rank must join); others as
    they are."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a causal LM (``model.model.layers`` in transformers'
    decoders; a PEFT model's inside its wrapped model)."""
    model = transformers_model(model)
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        module: Any = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList) and len(module):
            return list(module)
    raise ValueError(
        f"FSDP2Strategy cannot find the decoder layers of {type(model).__name__} (looked for "
        "model.layers, transformer.h, model.decoder.layers, gpt_neox.layers)"
    )


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) of the policy over every rank of every node.

    Args:
        param_dtype: dtype of the all-gathered weights and the compute ("bfloat16", "float16",
            "float32").
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 keeps small gradients).
        reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3; False
            keeps them until the backward, ZeRO-2-like: faster, more memory).
        save_distributed_checkpoint: each rank writes its shard (a checkpoint folder); False gathers
            one file on rank 0.
        process_group_backend: "nccl" on GPUs, "gloo" on CPUs; None picks by device.
        timeout: collective timeout.
        accumulate_unsharded: keep the gradient unsharded on each rank through an optimizer step's
            micro-batches and reduce-scatter it once, on the step's last backward, instead of once
            per micro-batch. It costs one whole gradient in ``reduce_dtype`` per rank while the
            step runs (4 bytes a parameter in fp32: ~30 GB at 7B), where the default holds only
            this rank's shard; it pays when a step has many micro-batches and reduce-scatters are
            slow (several nodes), and only if that memory is free.
        rank0_loading: with several ranks, build the model on the meta device everywhere and let
            rank 0 alone read the weights and hand out the shards (:mod:`.scale.loading`): host
            memory of one whole model on rank 0 and a shard on the others, instead of a whole model
            (two with a KL reference) on every rank. False: every rank loads it all.
    """

    def __init__(
        self,
        param_dtype: str = "bfloat16",
        reduce_dtype: str = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        accumulate_unsharded: bool = False,
        rank0_loading: bool = True,
    ) -> None:
        dtypes = (
            parse_dtype(param_dtype, "FSDP2Strategy.param_dtype"),
            parse_dtype(reduce_dtype, "FSDP2Strategy.reduce_dtype"),
        )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.param_dtype, self.reduce_dtype = dtypes
        self.reshard_after_forward = reshard_after_forward
        self.accumulate_unsharded = accumulate_unsharded
        self.rank0_loading = rank0_loading

    def setup_environment(self) -> None:
        """Every rank of every node is one data-parallel shard."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, model: nn.Module) -> nn.Module:
        """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head).
        Idempotent.

        A PEFT (LoRA) model's root unit is the transformers model it wraps: PEFT's ``generate``
        calls that model directly, so a root on the wrapper would never gather the embeddings for
        generation (its forward reaches the wrapped model through ``__call__`` too, so training sees
        the same units)."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        root = transformers_model(model)
        if isinstance(root, FSDPModule):
            return model
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        for layer in decoder_layers(model):
            fully_shard(
                layer, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward
            )
        fully_shard(
            root, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward
        )
        return model


def no_sync_for(strategy: Any, policy: nn.Module) -> Callable[[], AbstractContextManager[Any]]:
    """The context in which a backward of ``policy`` under ``strategy`` keeps its gradient on this
    rank, adding it to what earlier backwards left there; the next backward outside it reduces the
    sum over ranks.

    DDP: its ``no_sync`` (always: a DDP rank holds the whole gradient anyway). FSDP2 with
    ``accumulate_unsharded``: the root unit's gradient sync switched off (its units keep unsharded
    gradients). Otherwise nothing is paused: one process, or FSDP2's default of sharded gradients,
    reduce-scattered by every backward."""
    model = getattr(strategy, "model", None)
    if isinstance(model, DistributedDataParallel):
        return model.no_sync
    if isinstance(strategy, FSDP2Strategy) and strategy.accumulate_unsharded:
        return partial(_unsharded_gradients, transformers_model(policy))
    return nullcontext


@contextmanager
def _unsharded_gradients(root: nn.Module) -> Iterator[None]:
    """FSDP2's ``no_sync``: every unit under ``root`` accumulates its unsharded gradient, no
    reduce-scatter, until the context ends."""
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)
