"""Where a run runs and whether it fits: the device a config names (:func:`resolve_device`), the memory free there
and the floor a step needs (:func:`check_memory`, :func:`check_run_memory`), and the checks that depend on the
number of processes (:func:`check_parallel`). Every check is a one-line ConfigError before anything is allocated."""

from __future__ import annotations

import functools
import json
import os

import torch

from gnlm import distributed as dist
from gnlm.config import ConfigError, to_dict
from gnlm.model import ModelConfig, model_shapes
from gnlm.runconfig import RunConfig


def resolve_device(name: str, what: str = "train.device", fix: str = "train.device=cpu") -> torch.device:
    """The device ``name`` (auto, cpu, cuda, cuda:N, mps) stands for; a one-line ConfigError naming ``what`` (the
    config key or flag it came from) and ``fix`` when it is not a device or not on this machine."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"{what} is {name!r}, not a device gnlm runs on; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} is {name!r} but CUDA is not available; use {fix}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{what} is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{what} is {name!r} but MPS is not available; use {fix}")
    if device.type == "cuda" and dist.world_size() > 1:  # one GPU per process, chosen by torchrun's LOCAL_RANK
        device = torch.device("cuda", dist.local_rank())
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the system's available memory on CPU
    (Linux ``MemAvailable``, else the free pages); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@functools.lru_cache(maxsize=64)
def _model_bytes(model_json: str, dtype: str) -> int:
    """Bytes of a model's parameters and buffers in ``dtype``, counted on the meta device (nothing allocated)."""
    model = model_shapes(ModelConfig(**json.loads(model_json))).to(dtype=getattr(torch, dtype))
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def check_memory(cfg: RunConfig, sequences: int, device: torch.device, what: str, batch_knob: str,
                 sharded: bool = False) -> None:
    """Refuse, before anything is allocated, a step over ``sequences`` sequences that cannot fit in the memory free
    on ``device``: a one-line ConfigError naming ``what`` (the run, the probe) and what to lower (``batch_knob`` or
    the model). The need counted is a floor (the parameters and buffers, and the parameters' gradients unless
    ``sharded`` by FSDP; the batch's logits and their gradient or log-softmax): activations and optimizer state
    come on top, so a step that fits is never refused."""
    free = available_memory(device)
    if free is None:
        return
    copies = 1 if sharded else 2  # FSDP: each device holds the whole model once (built before sharding)
    weights = copies * _model_bytes(json.dumps(to_dict(cfg.model), sort_keys=True), cfg.train.dtype)
    itemsize = torch.empty(0, dtype=getattr(torch, cfg.train.dtype)).element_size()
    logits = 2 * sequences * cfg.data.seq_len * cfg.model.vocab_size * itemsize
    if weights + logits <= free:
        return
    fix = f"lower {batch_knob}" if logits >= weights else "choose a smaller model (model.*)"
    held = "parameters" if sharded else "parameters and gradients"
    raise ConfigError(f"{what} needs at least {_gib(weights + logits)} of memory on {device} ({held} "
                      f"{_gib(weights)}, two logit tensors of {sequences:,} sequences of {cfg.data.seq_len} tokens "
                      f"{_gib(logits)}) but {_gib(free)} are free; {fix}")


def check_run_memory(cfg: RunConfig, device: torch.device, world_size: int = 1) -> None:
    """:func:`check_memory` for one process of a training run: its largest batch (a training step's, or an
    evaluation chunk's) and the config key that sets it."""
    if cfg.method == "gn":
        step, knob = cfg.gn.inner_batch_size // world_size, "gn.inner_batch_size"
    else:
        local = cfg.train.batch_size // world_size
        step, knob = min(cfg.train.micro_batch_size or local, local), "train.batch_size (or train.micro_batch_size)"
    evaluation = min(cfg.train.eval_batch_size, max(1, cfg.data.eval_sequences // world_size))
    if evaluation > step:
        step, knob = evaluation, "train.eval_batch_size"
    check_memory(cfg, step, device, f"the run {cfg.out_dir}", knob,
                 sharded=cfg.train.parallel == "fsdp" and world_size > 1)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_parallel(cfg: RunConfig, world_size: int) -> None:
    """Config checks that depend on the number of processes; one-line ConfigErrors before any compute."""
    if cfg.method == "gn":
        gn = cfg.gn
        if gn.inner_batch_size % world_size:
            raise ConfigError(f"gn.inner_batch_size ({gn.inner_batch_size}) is not divisible by the number of "
                              f"processes ({world_size}); the global batch is split evenly over the processes")
        return
    b = cfg.train.batch_size
    if b % world_size:
        raise ConfigError(f"train.batch_size ({b}) is not divisible by the number of processes ({world_size}); "
                          f"the global batch is split evenly over the processes")
    local = b // world_size
    micro = cfg.train.micro_batch_size
    if micro is not None and micro < local and local % micro:
        raise ConfigError(f"train.micro_batch_size ({micro}) must divide the per-process batch "
                          f"({b} / {world_size} processes = {local})")
    if cfg.train.parallel == "fsdp" and world_size > 1 and cfg.optim.name == "soap":
        raise ConfigError("optim.name=soap does not run on FSDP-sharded (DTensor) parameters "
                          "(pytorch_optimizer.SOAP mixes DTensors and tensors); use train.parallel=ddp for SOAP")
