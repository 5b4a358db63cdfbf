"""Launch programs: the host work of a Triton call recorded once per call signature, replayed.

Why. Everything the host does before a Triton call's launches (checks, kernel configs, split
counts, scratch sizes, strides, each launch's argument list) depends only on the call's
signature: the shapes, strides and dtypes of its tensors, which optional ones are present, the
feature maps, eps, the pre-attention settings and the planning switches (plan.settings).
Done afresh it costs 28 µs per relu forward and 80 µs per Hedgehog forward on the 2-core CPU,
45 and 147 µs per backward (benchmarks/test_overhead.py; several times an H200's work at small
shapes); replayed, 16 and 19 µs, 25 and 48 µs. So the first call of
a signature runs the planning code with a recorder attached, and later calls replay what it did.

What is recorded. The planning code touches tensors only through torch calls and kernel
launches (common.launch). During the first call a TorchFunctionMode sees every torch call:
metadata queries (shape, stride, dtype, ...) pass unrecorded, since the signature fixes their
answers; every other call (allocating scratch, views such as the backward's
``split_with_sizes``, ``zero_``, ``copy_``, the NaN poisoning of alloc.empty) becomes a step of the program, its tensor arguments
named by slot: the call's own tensors, or a tensor an earlier step returned. Launches become
steps the same way. The steps are compiled into one generated function (Program); replaying
calls it with the new call's tensors in the slots. Launches still go through common.launch, so
capture_launches sees them.

What makes a signature unrecordable (it is then planned afresh on every call, never replayed;
``stats()`` counts it): a torch call reading tensor values or memory addresses (``item``,
``data_ptr``, ``storage_offset`` ...; the host code reads none today, and a value-dependent plan
could not be replayed), a torch call returning a Python value the recorder cannot name, or a
tensor argument that is neither a call tensor nor a step's result.

Switches: LINATTN_TRITON_REPLAY=0 in the environment (read at import) or ``disabled()`` plan
every call afresh (tests compare the two paths). Recording is per thread; programs are shared.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

from ...backends.base import MapCall
from ...ops import alloc
from . import common, plan

#: Programs kept per process; the oldest is dropped beyond this (a model has a few signatures
#: per layer shape; a sweep over many shapes must not grow memory without bound).
MAX_PROGRAMS = 1024

_enabled = os.environ.get("LINATTN_TRITON_REPLAY", "1") != "0"
_programs: dict = {}
_unrecordable: dict = {}     # signature -> why (planned afresh every call)
_counts = {"recorded": 0, "replayed": 0, "unrecordable": 0, "planned": 0}
_lock = threading.Lock()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, every Triton call is planned afresh (nothing recorded or replayed)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def clear() -> None:
    """Forget every recorded program and reset the counts (tests; a config table reloaded by
    hand)."""
    with _lock:
        _programs.clear()
        _unrecordable.clear()
        for name in _counts:
            _counts[name] = 0


def stats() -> dict:
    """Counts of calls recorded, replayed, planned afresh as unrecordable and planned afresh for
    another aliasing than their program's, the number of programs, and the reasons."""
    return dict(_counts, programs=len(_programs), reasons=sorted(set(_unrecordable.values())))


# ----------------------------------------------------------------------------- signatures


def signature(entry: str, args: Sequence[Any]) -> tuple[tuple, list]:
    """(key, tensors) of a call: the key names everything planning depends on; tensors are
    the call's tensors in a fixed order (the slots a program refers to).

    Tuples (MapCall, PreCall, NormCall, RopeCall: NamedTuples) are walked; a tensor contributes
    its shape, strides and dtype (the device once: a call's tensors share it, the op checks);
    other values (names, eps, flags, ints) themselves."""
    tensors: list = []
    parts: list = [entry, plan.settings(), alloc.poisoning()]
    _flatten(args, tensors, parts, [None])
    if tensors:
        parts.append(tensors[0].device)
    return tuple(parts), tensors


def aliasing(tensors: list) -> Optional[tuple]:
    """None when the call's tensors are distinct objects, else which slot each one repeats.

    Not part of the key: a program recorded from distinct tensors is right for any call (a
    repeated tensor fills its slots alike), so only one recorded from a call with a repeated
    tensor (it names that tensor by its first slot) checks it, at replay."""
    ids = list(map(id, tensors))
    if len(set(ids)) == len(ids):
        return None
    return tuple(map(ids.index, ids))


_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})


def _flatten(values, tensors: list, parts: list, last_params: list) -> None:
    # Hot: runs on every call. `type(x) in` a set is a few times cheaper than isinstance on
    # torch.Tensor (its metaclass hooks instance checks); subclasses take the slower test.
    for value in values:
        cls = type(value)
        if cls in _PLAIN_TENSORS or (cls not in _PLAIN_VALUES and isinstance(value, torch.Tensor)):
            tensors.append(value)
            parts.append((value.shape, value.stride(), value.dtype))
        elif cls is MapCall:
            params = value.params
            if not params:
                parts.append(value)        # a builtin map: ("relu", ()) is its own key
                continue
            parts.append(value.name)
            previous = last_params[0]
            if previous is not None and len(previous) == len(params) and all(
                    a is b for a, b in zip(previous, params)):
                # k's map holding q's map's tensors (one Hedgehog for both): said once, so
                # the call's tensors stay distinct (no aliasing check on every replay).
                parts.append("same parameters")
                continue
            last_params[0] = params
            parts.append(len(params))
            for t in params:
                tensors.append(t)
                parts.append((t.shape, t.stride(), t.dtype))
        elif isinstance(value, tuple):
            parts.append(len(value))       # keeps (a, (b,)) apart from ((a, b),)
            if value:
                _flatten(value, tensors, parts, last_params)
        else:
            parts.append(value)


_PLAIN_VALUES = frozenset({type(None), float, int, bool, str})


# ----------------------------------------------------------------------------- programs


class _Step:
    """One torch call, with the slots of its tensor arguments and of its result(s)."""

    __slots__ = ("func", "args", "kwargs", "fills", "kwarg_fills", "outputs")

    def __init__(self, func, args: list, kwargs: dict, fills: tuple, kwarg_fills: tuple,
                 outputs: tuple):
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.fills = fills              # (position, slot) of every tensor argument
        self.kwarg_fills = kwarg_fills  # (name, slot)
        self.outputs = outputs          # the slots its result fills (one per returned tensor)

    def arguments(self, slots: list) -> tuple[list, dict]:
        args = self.args.copy()
        for position, slot in self.fills:
            args[position] = slots[slot]
        kwargs = self.kwargs
        if self.kwarg_fills:
            kwargs = dict(kwargs)
            for name, slot in self.kwarg_fills:
                kwargs[name] = slots[slot]
        return args, kwargs

    def run(self, slots: list) -> None:
        args, kwargs = self.arguments(slots)
        out = self.func(*args, **kwargs)
        outputs = self.outputs
        if len(outputs) == 1:
            slots[outputs[0]] = out
        else:
            for slot, tensor in zip(outputs, out):
                slots[slot] = tensor


class _Launch(_Step):
    """One kernel launch: through common.launch, so an outer capture_launches sees it."""

    __slots__ = ("grid",)

    def __init__(self, kernel, grid: tuple, args: list, kwargs: dict, fills: tuple,
                 kwarg_fills: tuple):
        super().__init__(kernel, args, kwargs, fills, kwarg_fills, ())
        self.grid = grid

    def run(self, slots: list) -> None:
        args = self.args.copy()
        for position, slot in self.fills:
            args[position] = slots[slot]
        common.launch(self.func, self.grid, *args, **self.kwargs)


class Program:
    """The steps of one signature, compiled into one Python function of the call's tensors.

    Why compiled: stepping through _Step objects costs ~1 µs per step in argument copying and
    attribute lookups; the generated function is what the planning code would be if written
    out for this signature, so a replay costs its torch calls and launches and little else.
    The steps stay for reading (``program.steps``) and run the same way (``run_steps``)."""

    __slots__ = ("steps", "n_slots", "aliasing", "run")

    def __init__(self, steps: list, n_slots: int, aliasing: Optional[tuple], n_inputs: int):
        self.steps = steps
        self.n_slots = n_slots
        self.aliasing = aliasing        # the recording call's repeated tensors (aliasing())
        self.run = _compile(steps, n_inputs)

    def run_steps(self, tensors: list) -> None:
        """What ``run`` does, one _Step at a time (the reference the tests compare)."""
        slots = tensors + [None] * (self.n_slots - len(tensors))
        for step in self.steps:
            step.run(slots)


def _compile(steps: list, n_inputs: int) -> Callable[[list], None]:
    """A function f(tensors) running `steps`: slots become local variables s<i>, constants
    are bound by name (a literal only for ints, bools and None, whose repr is exact)."""
    names: dict = {"launch": common.launch}
    lines = []

    def constant(value) -> str:
        if value is None or type(value) in (int, bool):
            return repr(value)
        name = f"c{len(names)}"
        names[name] = value
        return name

    def arguments(step: _Step) -> str:
        filled = dict(step.fills)
        parts = [f"s{filled[i]}" if i in filled else constant(a)
                 for i, a in enumerate(step.args)]
        kw_filled = dict(step.kwarg_fills)
        parts += [f"{k}=s{kw_filled[k]}" if k in kw_filled else f"{k}={constant(v)}"
                  for k, v in step.kwargs.items()]
        return ", ".join(parts)

    for i, step in enumerate(steps):
        func = f"f{i}"
        names[func] = step.func
        if isinstance(step, _Launch):
            names[f"g{i}"] = step.grid
            call = f"launch({func}, g{i}, {arguments(step)})"
            lines.append(call)
        else:
            targets = ", ".join(f"s{slot}" for slot in step.outputs)
            if len(step.outputs) == 1:
                lines.append(f"{targets} = {func}({arguments(step)})")
            else:
                lines.append(f"({targets},) = {func}({arguments(step)})")
    header = (f"    {', '.join(f's{i}' for i in range(n_inputs))}, = tensors\n"
              if n_inputs else "")
    body = "".join(f"    {line}\n" for line in lines) or "    pass\n"
    source = f"def program(tensors):\n{header}{body}"
    exec(compile(source, "<linattn replay program>", "exec"), names)  # noqa: S102
    program = names["program"]
    program.source = source     # for reading: what a replay of this signature runs
    return program


class _Unrecordable(Exception):
    pass


def _functions(*names: str) -> frozenset:
    """Tensor methods and attribute getters by name, as a TorchFunctionMode receives them (a
    getter arrives as its descriptor's __get__, a method-wrapper that compares equal)."""
    found = set()
    for name in names:
        attribute = torch.Tensor.__dict__.get(name)
        if attribute is None:
            attribute = getattr(torch._C.TensorBase, name)
        found.add(attribute.__get__ if hasattr(attribute, "__set__") or
                  type(attribute).__name__ == "getset_descriptor" else attribute)
    return frozenset(found)


#: Answered by the signature: passed through unrecorded.
_METADATA = _functions(
    "shape", "dtype", "device", "layout", "ndim", "is_cuda", "is_meta", "requires_grad",
    "is_sparse", "itemsize", "nbytes", "stride", "size", "dim", "numel", "nelement",
    "element_size", "is_contiguous", "is_floating_point", "is_complex", "__len__")
#: Reads of values or addresses: a plan depending on them cannot be replayed.
_VALUE_READS = _functions(
    "item", "tolist", "data_ptr", "storage_offset", "untyped_storage", "__bool__", "__int__",
    "__float__", "__index__", "numpy")


class _Recorder(TorchFunctionMode):
    """Records the torch calls and launches of one planning run (module docstring)."""

    def __init__(self, tensors: list):
        super().__init__()
        self.slot_of = {}
        for i, t in enumerate(tensors):
            self.slot_of.setdefault(id(t), i)
        self.n_slots = len(tensors)
        # Every tensor the run touched stays referenced until recording ends: an id is unique
        # only while its object lives.
        self.alive: list = list(tensors)
        self.steps: list = []
        self.failure: Optional[str] = None
        self.thread = threading.get_ident()

    # -- torch calls
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.failure is not None:
            return out
        if func in _VALUE_READS:
            return self._fail(f"{_name(func)} reads tensor values or addresses", out)
        try:
            step_args, fills = self._template(args)
            step_kwargs, kwarg_fills = self._kw_template(kwargs)
            outputs = self._register(out, func)
        except _Unrecordable as why:
            return self._fail(str(why), out)
        self.steps.append(_Step(func, step_args, step_kwargs, fills, kwarg_fills, outputs))
        return out

    # -- launches (common.launch's observer while recording)
    def launch(self, previous, kernel, grid, args, kwargs) -> None:
        if self.failure is None:
            try:
                step_args, fills = self._template(args)
                step_kwargs, kwarg_fills = self._kw_template(kwargs)
                if kwarg_fills:
                    raise _Unrecordable("a launch took a tensor as a keyword argument")
                self.steps.append(_Launch(kernel, tuple(grid), step_args, step_kwargs, fills,
                                          kwarg_fills))
            except _Unrecordable as why:
                self._fail(str(why))
        # What the launch does otherwise (run, or an outer capture_launches), unseen by the
        # recorder: Triton's own launcher touches the tensors too.
        with torch._C.DisableTorchFunction():
            if previous is not None:
                previous(kernel, grid, args, kwargs)
            else:
                kernel[grid](*args, **kwargs)

    def _fail(self, why: str, value=None):
        if self.failure is None:
            self.failure = why
        return value

    def _slot(self, t: torch.Tensor) -> int:
        slot = self.slot_of.get(id(t))
        if slot is None:
            raise _Unrecordable(f"a tensor argument of shape {tuple(t.shape)} is neither a call "
                                f"tensor nor the result of a recorded step")
        return slot

    def _template(self, args) -> tuple[list, tuple]:
        values, fills = list(args), []
        for i, a in enumerate(values):
            if isinstance(a, torch.Tensor):
                fills.append((i, self._slot(a)))
                values[i] = None
            elif isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
                raise _Unrecordable("a torch call took a sequence of tensors")
        return values, tuple(fills)

    def _kw_template(self, kwargs) -> tuple[dict, tuple]:
        values, fills = dict(kwargs), []
        for name, a in kwargs.items():
            if isinstance(a, torch.Tensor):
                fills.append((name, self._slot(a)))
                values[name] = None
            elif isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
                raise _Unrecordable("a torch call took a sequence of tensors")
        return values, tuple(fills)

    def _register(self, out, func) -> tuple:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if not all(isinstance(t, torch.Tensor) for t in outs):
            raise _Unrecordable(f"{_name(func)} returned a value that is not a tensor")
        slots = []
        for t in outs:
            self.slot_of[id(t)] = self.n_slots   # an in-place call's result: the same tensor,
            slots.append(self.n_slots)           # now also in a new slot (replay matches)
            self.n_slots += 1
            self.alive.append(t)
        return tuple(slots)


def _name(func) -> str:
    owner = getattr(func, "__self__", None)        # a getter: the attribute's descriptor
    if owner is not None and hasattr(owner, "__objclass__"):
        return f"Tensor.{owner.__name__}"
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


# ----------------------------------------------------------------------------- entry point


def call(entry: str, impl: Callable[..., None], args: Sequence[Any]) -> None:
    """impl(*args), replayed from the program of this call's signature when there is one."""
    if not _enabled:
        impl(*args)
        return
    key, tensors = signature(entry, args)
    program = _programs.get(key)
    if program is not None:
        if program.aliasing is None or program.aliasing == aliasing(tensors):
            _counts["replayed"] += 1
            program.run(tensors)
            return
        # Recorded with a tensor repeated that this call passes as two: plan this one afresh.
        _counts["planned"] += 1
        impl(*args)
        return
    if key in _unrecordable:
        _counts["unrecordable"] += 1
        impl(*args)
        return
    _record(key, tensors, impl, args)


def _record(key: tuple, tensors: list, impl, args) -> None:
    recorder = _Recorder(tensors)
    previous = common.launch_observer()

    def observe(kernel, grid, launch_args, launch_kwargs):
        if threading.get_ident() == recorder.thread:
            recorder.launch(previous, kernel, grid, launch_args, launch_kwargs)
        elif previous is not None:
            previous(kernel, grid, launch_args, launch_kwargs)
        else:
            kernel[grid](*launch_args, **launch_kwargs)

    with common.observe_launches(observe), recorder:
        impl(*args)   # an exception leaves nothing recorded: the next call plans again
    with _lock:
        if recorder.failure is not None:
            if len(_unrecordable) >= MAX_PROGRAMS:
                _unrecordable.pop(next(iter(_unrecordable)))
            _unrecordable[key] = recorder.failure
            _counts["unrecordable"] += 1
            return
        if len(_programs) >= MAX_PROGRAMS:
            _programs.pop(next(iter(_programs)))
        _programs[key] = Program(recorder.steps, recorder.n_slots, aliasing(tensors),
                                 len(tensors))
        _counts["recorded"] += 1


__all__ = ["call", "disabled", "clear", "stats", "signature", "Program", "MAX_PROGRAMS"]
