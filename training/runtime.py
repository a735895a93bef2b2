"""What every training stage shares: its config file, processes, seeds, schedule, checkpoints, logs and caches.

A stage is a short script around these pieces::

    config = load_stage_config(StageConfig, args)           # YAML/JSON file, then command-line overrides
    with distributed(config.device) as dist_ctx:             # torchrun -> DDP (NCCL on GPU, gloo on CPU)
        seed_everything(config.seed, dist_ctx.rank)
        state = resume(run / CHECKPOINT_FILE, config)        # None on a fresh run; refuses another config
        log = RunLog(run, total_steps, enabled=dist_ctx.is_main)
        save = lambda: save_checkpoint(run / CHECKPOINT_FILE, {...}, config)  # the config travels inside, as data
        loop = StepLoop(dist_ctx, log, total_steps, save=save, ...)  # validation, log lines, saves, time limit
        while step < total_steps:
            ...                                              # one optimiser step; step += 1; log.update(...)
            if loop.end_step(step):                          # out of time
                break
        loop.finish()                                        # the last save

The same command runs on one CPU, one GPU or under ``torchrun`` on several GPUs or nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import time
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from tqdm import tqdm

from prima.config import config_from_dict
from prima.distributed import DistributedContext, distributed  # noqa: F401  (the stages' entry point)
from prima.errors import ConfigError

CHECKPOINT_FILE = "last.pt"
LOG_FILE = "log.jsonl"
ConfigT = TypeVar("ConfigT")


# ---------------------------------------------------------------------------------------------------------
# Stage configs: a dataclass per stage, a file that sets it, command-line flags that override the file.

def _flag_type(hint: Any) -> tuple[type, int | str | None]:
    """(element type, argparse ``nargs``) of a config field: None for one value, n for a fixed-length
    tuple, "+" for a list or a variable-length tuple."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and Ellipsis not in args:
        return args[0], len(args)
    if origin in (tuple, list):
        return args[0], "+"
    return hint, None


def field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` written after each field of a dataclass, by field name."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--config FILE`` plus one ``--field-name`` flag per field of the stage config ``cls`` (default:
    keep the file's value). The help text of each flag is the field's comment in the dataclass."""
    parser.add_argument("--config", type=Path, default=None, help="stage config file (.yaml/.yml or .json)")
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for item in fields(cls):
        element, nargs = _flag_type(hints[item.name])
        flag = "--" + item.name.replace("_", "-")
        help_text = comments.get(item.name, "").replace("%", "%%")  # argparse %-formats help texts
        if element is bool:
            parser.add_argument(flag, dest=item.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=item.name, default=None, type=element, nargs=nargs, help=help_text)


def read_config_file(path: str | Path) -> dict:
    """A stage config file as a dict: YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(doc).__name__}")
    return doc


def load_stage_config(cls: type[ConfigT], args: argparse.Namespace) -> ConfigT:
    """The stage config: the dataclass defaults, then ``args.config``'s file, then every flag given."""
    doc = read_config_file(args.config) if getattr(args, "config", None) else {}
    for item in fields(cls):
        value = getattr(args, item.name, None)
        if value is not None:
            doc[item.name] = value
    try:
        return config_from_dict(cls, doc, str(args.config) if getattr(args, "config", None) else cls.__name__)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {exc}; set it in the config file or with its flag") from exc


def parse_stage_args(cls: type[ConfigT], argv: list[str] | None, doc: str | None) -> ConfigT:
    """A stage's command line: ``--config FILE`` and one flag per field of ``cls``; the first line of the
    stage module's docstring ``doc`` describes the command."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    add_config_arguments(parser, cls)
    return load_stage_config(cls, parser.parse_args(argv))


def print_on_main(path: Path) -> None:
    """Print a stage's output path once (the main process under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)


def config_dict(config: Any) -> dict:
    """A stage config as plain JSON-ready data (what checkpoints and logs record)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# ---------------------------------------------------------------------------------------------------------
# Processes (prima.distributed: one process, or DDP under torchrun) and seeds.

def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; ranks get distinct streams (``seed + rank``) for their own draws."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


# ---------------------------------------------------------------------------------------------------------
# Schedule, checkpoints, logs.

def warmup_cosine(step: int, total_steps: int, warmup: int, peak: float, floor_fraction: float = 0.1) -> float:
    """Learning rate at ``step``: linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to
    ``floor_fraction * peak`` at ``total_steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (floor_fraction + (1 - floor_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def save_checkpoint(path: Path, state: dict, config: Any) -> None:
    """Write ``state`` plus the stage config (as data) and the RNG states, atomically (tmp file + rename)."""
    payload = {**state, "config": config_dict(config), "rng": rng_states()}
    partial = path.with_suffix(".tmp")
    torch.save(payload, partial)
    partial.replace(path)


def resume(path: Path, config: Any, device: torch.device | str = "cpu",
           may_differ: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint at ``path`` with its RNG states restored, or None when there is none.

    Raises:
        ConfigError: the checkpoint was written with another config (fields in ``may_differ``,
            e.g. the total number of steps or a time limit, may change between runs).
    """
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    saved, current = checkpoint["config"], config_dict(config)
    changed = sorted(key for key in set(saved) | set(current)
                     if key not in may_differ and saved.get(key) != current.get(key))
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise ConfigError(f"{path} was written with another config ({details}); use a new run folder")
    restore_rng_states(checkpoint["rng"])
    return checkpoint


ATTENTION_KERNELS = ("auto", "torch", "math")


def check_attention_kernel(choice: str) -> None:
    """Raise ValueError unless ``choice`` is one of ``ATTENTION_KERNELS`` (before a run does any work)."""
    if choice not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {choice!r}")


def attention_kernel(choice: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The scaled-dot-product-attention kernel a training forward (and so its backward) runs in.

    ``"torch"`` leaves the choice to torch (flash attention on a CPU); ``"math"`` is the explicit
    softmax(QK^T)V; ``"auto"`` is math on a CPU and torch's choice elsewhere. At the lite model's lengths
    (<= 129 tokens a series) torch 2.13's CPU flash-attention backward takes about 2.5x the math path's
    time, and a whole CLIP step is 1.6x faster with math (docs/training.md). The kernels round
    differently, so a run continues only with the kernel it began with.
    """
    check_attention_kernel(choice)
    if choice == "math" or (choice == "auto" and torch.device(device).type == "cpu"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def finished_run(checkpoint: dict | None, steps: int, *outputs: Path) -> bool:
    """Whether ``checkpoint`` is of a run that completed its ``steps`` and left every one of ``outputs``:
    running it again would only rewrite them, and a summary rewritten by a run that trained nothing
    would lose the validation history, the seconds and the commit of the run that did the training."""
    return checkpoint is not None and checkpoint["step"] >= steps and all(Path(p).exists() for p in outputs)


@contextlib.contextmanager
def stop_on_terminate() -> typing.Iterator[None]:
    """Within the block, SIGTERM (``kill``, a scheduler's stop) exits this process through ``SystemExit``
    (status 128 + 15) instead of killing it outright, so ``finally`` blocks run as they do for Ctrl-C: a
    release stage keeps the seconds it ran. A child process forked inside the block (synthesis workers)
    dies of the signal as before."""
    owner = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RunLog:
    """A progress bar on stderr and a ``log.jsonl`` line per logging interval (main process only).

    Each line holds the step, the running means of the values given to ``update`` since the last line,
    the seconds per step and the throughput in ``unit`` per second.
    """

    def __init__(self, folder: Path, total_steps: int, start_step: int = 0, unit: str = "samples",
                 enabled: bool = True, description: str = "training") -> None:
        self.enabled = enabled
        self.unit = unit
        self._last: dict = {}
        self._sums: dict[str, float] = {}
        self._count = 0
        self._items = 0
        self._since = time.perf_counter()
        self._file = (folder / LOG_FILE).open("a", encoding="utf-8") if enabled else None
        self._bar = tqdm(total=total_steps, initial=start_step, desc=description, unit="step", disable=not enabled)

    def update(self, items: int, **values: float) -> None:
        """One step done on ``items`` samples (this process's share times the world size, or per process)."""
        self._bar.update()
        self._count += 1
        self._items += items
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)

    def write(self, step: int, **extra: Any) -> dict | None:
        """Flush the running means as one log line (and on the bar); returns the record."""
        if not self.enabled or not self._count:
            return None
        elapsed = time.perf_counter() - self._since
        record = {"step": step, **{k: v / self._count for k, v in self._sums.items()},
                  "step_s": elapsed / self._count, f"{self.unit}_per_s": self._items / max(elapsed, 1e-9), **extra}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if isinstance(v, float)}, refresh=False)
        self._sums, self._count, self._items, self._since = {}, 0, 0, time.perf_counter()
        self._last = record
        return record

    def latest(self, key: str, default: Any = None) -> Any:
        """``key`` of the last line written, or ``default`` before the first line (e.g. the value a resumed
        run's checkpoint holds) and on a disabled log."""
        return self._last.get(key, default)

    def close(self) -> None:
        self._bar.close()
        if self._file is not None:
            self._file.close()


class StepLoop:
    """The end of every optimiser step, the same in every training stage: the time limit, validation, log
    lines, checkpoints, and the last checkpoint once the loop is over. A stage's loop::

        loop = StepLoop(context, log, config.steps, log_every=config.log_every, save=checkpoint_now,
                        checkpoint_every=config.checkpoint_every, eval_every=config.eval_every,
                        evaluate=validate, time_limit_min=config.time_limit_min)
        while step < config.steps:
            ...                                   # one optimiser step
            step += 1
            log.update(batch_size, loss=loss)
            if loop.end_step(step):               # out of time
                break
        loop.finish()                             # the last checkpoint; the log is closed

    After step ``step``, :meth:`end_step` does, in this order:

    1. out of time: whether any process has run more than ``time_limit_min`` minutes since ``started``
       (a collective, so every process calls ``end_step`` at every step and all stop at the same one);
    2. ``evaluate()`` at every ``eval_every``-th step, at the last step (``steps``) and, with
       ``evaluate_at_time_limit``, when out of time;
    3. a log line at every ``log_every``-th step, at the last step, when out of time and with every
       evaluation, holding the fields ``evaluate`` returned;
    4. ``save()`` at every ``checkpoint_every``-th step;
    5. when out of time, "time limit reached at step N" from the main process, and True.

    Args:
        context: the run's processes.
        log: the run's log (``end_step`` writes its lines; the stage calls ``log.update`` once a step).
        steps: the run's total number of steps.
        log_every: steps between log lines.
        checkpoint_every: steps between checkpoints.
        save: writes the checkpoint; called on every process (a stage writes on the main one).
        eval_every: steps between evaluations; None: no evaluation.
        evaluate: called on every process when an evaluation is due; returns the log line's extra fields
            (empty on a process that does not validate). Needed when ``eval_every`` is set.
        evaluate_at_time_limit: whether the step the time limit stops at is evaluated too.
        time_limit_min: stop after this many minutes; None: no limit.
        started: the ``time.perf_counter()`` the time limit counts from; None: now.

    Raises:
        ValueError: ``steps`` below 0, ``log_every``, ``checkpoint_every`` or ``eval_every`` below 1, a
            ``time_limit_min`` that is not positive, or ``eval_every`` without ``evaluate``.
    """

    def __init__(self, context: DistributedContext, log: RunLog, steps: int, *, log_every: int,
                 checkpoint_every: int, save: typing.Callable[[], None], eval_every: int | None = None,
                 evaluate: typing.Callable[[], dict[str, Any]] | None = None, evaluate_at_time_limit: bool = True,
                 time_limit_min: float | None = None, started: float | None = None) -> None:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        for name, every in (("log_every", log_every), ("checkpoint_every", checkpoint_every),
                            ("eval_every", 1 if eval_every is None else eval_every)):
            if every < 1:
                raise ValueError(f"{name} must be >= 1, got {every}")
        if eval_every is not None and evaluate is None:
            raise ValueError("eval_every needs an evaluate function")
        if time_limit_min is not None and time_limit_min <= 0:
            raise ValueError(f"time_limit_min must be > 0 or None, got {time_limit_min}")
        self.context, self.log, self.steps = context, log, steps
        self.log_every, self.checkpoint_every, self.save = log_every, checkpoint_every, save
        self.eval_every, self.evaluate, self.evaluate_at_time_limit = eval_every, evaluate, evaluate_at_time_limit
        self.time_limit_min = time_limit_min
        self.started = time.perf_counter() if started is None else started

    def end_step(self, step: int) -> bool:
        """Evaluate, log and save as due after step ``step`` (counted from 1); True when the run is out of
        time and must stop."""
        out_of_time = self.context.any(self.time_limit_min is not None
                                       and time.perf_counter() - self.started > 60 * self.time_limit_min)
        evaluating = self.eval_every is not None and (
            step % self.eval_every == 0 or step == self.steps or (out_of_time and self.evaluate_at_time_limit))
        fields = self.evaluate() if evaluating else {}
        if step % self.log_every == 0 or step == self.steps or out_of_time or evaluating:
            self.log.write(step, **fields)
        if step % self.checkpoint_every == 0:
            self.save()
        if out_of_time and self.context.is_main:
            print(f"time limit reached at step {step}", flush=True)
        return out_of_time

    def finish(self) -> None:
        """After the loop: the last checkpoint (also when no step was left to run), and the log closed."""
        self.save()
        self.log.close()


# ---------------------------------------------------------------------------------------------------------
# Caches: keyed by everything they were built from, so a stale cache is never reused.

def cache_key(**parts: Any) -> str:
    """A short stable hash of JSON-ready ``parts`` (manifest digest, configs, weight digests, versions)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (e.g. weights a cache was built with)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensors and metadata, independent of how the file orders them (its
    header is not byte-stable: safetensors writes a metadata map in hash order)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as weights:
        digest.update(json.dumps(weights.metadata() or {}, sort_keys=True).encode("utf-8"))
        for key in sorted(weights.keys()):
            tensor = weights.get_tensor(key)
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode("utf-8"))
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def git_commit(folder: str | Path | None = None, ignore: tuple[str | Path, ...] = ()) -> str | None:
    """The commit of the code that runs (``<sha>`` or ``<sha>-dirty``), None outside a git checkout.

    Changes to tracked files under ``ignore`` (e.g. the release folder being written, which the repository
    ships) do not count as dirty: they are the run's output, not its code."""
    cwd = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip())
        excluded = [f":(top,exclude){Path(path).resolve().relative_to(top).as_posix()}" for path in ignore
                    if Path(path).resolve().is_relative_to(top)]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excluded],
                               cwd=cwd, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


# The CPU instruction sets (Linux /proc/cpuinfo flags) that bf16 and fp16 kernels are chosen by: two CPUs that
# differ here run different bf16 kernels, whose results differ in the last bits.
HALF_PRECISION_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


def machine_description(device: torch.device | str = "cpu") -> dict:
    """What a figure was computed on. A bf16 result reproduces bit for bit only where the bf16 kernels are
    the same (an AMX CPU and an AVX512-BF16-only one give predictions that differ in the last bits, and
    evaluation figures that differ in the third decimal), so the provenance of an evaluation records them."""
    from prima.precision import cpu_capability, describe_cpu_bf16

    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    except OSError:
        pass
    machine = {"cpu": model, "cpu_capability": cpu_capability(), "cpu_half_precision_flags": sorted(
        flags & set(HALF_PRECISION_CPU_FLAGS)), "cpu_bf16": describe_cpu_bf16(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__}
    if torch.device(device).type == "cuda":
        machine["cuda"] = torch.cuda.get_device_name(torch.device(device))
    return machine
