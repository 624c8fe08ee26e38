"""One definition per op: from an op's name, schema, reference, per-backend kernel adapters, dtype
table and one forward/backward pair, :class:`OpDefinition` builds everything else:

- the backends' reasons (``mtlfast.backends.reasons(name, ...)``): a backend without an adapter,
  whose adapter cannot be imported, or whose dtype table lacks the input's dtype says why;
- the custom ops ``mtlfast::<name>`` and ``mtlfast::<name>_backward`` with fake kernels and
  autograd: what ``torch.compile(fullgraph=True)`` sees, one opaque node each way;
- the eager fast path, one ``torch.autograd.Function`` over the same forward/backward (a custom op
  costs ~60 µs more host time per call than an autograd.Function, more than a small GPU kernel
  runs), whose backward differentiates the reference instead when a graph of the gradient is asked
  for (``create_graph=True``, torch.func, gradcheck's batched gradients; see common.py).

An op's public entry point validates its arguments (mtlfast/_checks.py), picks a backend with
:meth:`OpDefinition.select`, runs the reference when that is the choice, and otherwise calls the
definition with the backend's name: ``MASKED_LINEAR(backend, x2d, weight, mask, bias)``.

The forward/backward pair is written once against the family's kernel interface (what
``ops/<family>_<backend>.py`` implements):

- ``forward(k, args, save) -> (outputs, saved, cache)``: ``k`` the backend's adapter module,
  ``args`` the op's arguments in schema order; ``outputs`` the op's tensors, ``saved`` extra
  tensors backward needs (a fixed number: they are outputs of the custom op too), ``cache``
  anything else backward may reuse in eager mode (None, or e.g. packed masks; the custom op
  path does not keep it, so backward must recompute what it holds). ``save`` is False when no
  input needs a gradient.
- ``backward(k, args, saved, cache, needs, grads) -> grads of args``: ``needs[i]`` whether
  argument i needs a gradient; return None (or anything) where it does not. Gradients are cast
  to their argument's dtype here, and two arguments never receive the same gradient tensor
  (autograd may keep a returned gradient as ``.grad`` itself; shared, later accumulations
  would count twice).
- ``fake(args) -> (outputs, saved)``: empty tensors of the right shapes and dtypes.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from mtlfast import _checks, backends
from mtlfast.ops import common

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)      # tl.dot has no float64
FLOAT_DTYPES = _checks.FLOAT_DTYPES

# (atol, rtol) of a backend's result in a dtype against the reference computed in float64 from the
# same inputs. Low precision is dominated by rounding the fp32 accumulator to the output dtype
# (fp16 ε = 9.8e-4, bf16 ε = 7.8e-3): a few ε above that. Ops may override entries.
DEFAULT_TOLERANCES: Mapping[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

Forward = Callable[[object, tuple, bool], Tuple[tuple, tuple, object]]
Backward = Callable[[object, tuple, tuple, object, tuple, tuple], Sequence[Optional[torch.Tensor]]]
Fake = Callable[[tuple], Tuple[tuple, tuple]]

_DEFINITIONS: Dict[str, "OpDefinition"] = {}


def definitions() -> Dict[str, "OpDefinition"]:
    """Every op definition by name (the ops register on import of mtlfast.functional)."""
    return dict(_DEFINITIONS)


def _parse(schema: str) -> Tuple[Tuple[str, str], ...]:
    """'(Tensor x, Tensor? bias, int n)' -> (('Tensor', 'x'), ('Tensor?', 'bias'), ('int', 'n'))."""
    inner = schema.strip()
    if not (inner.startswith("(") and inner.endswith(")")):
        raise ValueError(f"schema must look like '(Tensor x, int n)', got {schema!r}")
    return tuple(tuple(part.strip().rsplit(" ", 1)) for part in inner[1:-1].split(","))


class OpDefinition:
    """An op and all its registrations; see the module docstring."""

    def __init__(self, name: str, schema: str, *, reference: Callable[..., object],
                 adapters: Mapping[str, str], dtypes: Mapping[str, Sequence[torch.dtype]],
                 forward: Forward, backward: Backward, fake: Fake, num_outputs: int, num_saved: int = 0,
                 grad_reference: Optional[Callable[..., object]] = None,
                 no_kernel: Optional[Mapping[str, str]] = None,
                 tolerances: Optional[Mapping[torch.dtype, Tuple[float, float]]] = None) -> None:
        """
        Args:
            name: the op's public name (``mtlfast.backends.reasons(name, ...)``, ``mtlfast::name``).
            schema: its arguments after validation, as a torch schema: '(Tensor x, Tensor? b, int n)'.
            reference: pure PyTorch, same arguments; the ``reference`` backend and the test oracle.
            adapters: backend -> module of its kernel adapter (``mtlfast.ops.<family>_<backend>``).
            dtypes: backend -> the input dtypes its kernels take.
            forward, backward, fake: see the module docstring.
            num_outputs, num_saved: how many tensors ``forward`` returns in each tuple.
            grad_reference: the function whose gradient is the op's (default: ``reference``; a
                straight-through sample differentiates its soft value).
            no_kernel: backend -> why it has no kernel for this op (shown as its reason).
            tolerances: overrides of :data:`DEFAULT_TOLERANCES`.
        """
        self.name = name
        self.reference = reference
        self.grad_reference = grad_reference or reference
        self.adapters = dict(adapters)
        self._adapter_modules: Dict[str, object] = {}
        self.dtypes = {b: tuple(d) for b, d in dtypes.items()}
        self.forward, self.backward, self.fake = forward, backward, fake
        self.num_outputs, self.num_saved = num_outputs, num_saved
        self.no_kernel = dict(no_kernel or {})
        self.tolerances = {**DEFAULT_TOLERANCES, **(tolerances or {})}
        self.params = _parse(schema)
        # which arguments are tensors (or None in a Tensor? slot): saved through save_for_backward
        self.tensor_slots = tuple(i for i, (kind, _) in enumerate(self.params) if kind.startswith("Tensor"))
        self.constant_slots = tuple(i for i in range(len(self.params)) if i not in self.tensor_slots)
        self.dispatch = backends.register_op(backends.Op(
            name, device_of=_first_tensor_device, selection_key=_first_tensor_key,
            checks={b: self._check_for(b) for b in backends.BACKENDS}))
        self._register_custom_ops(schema)
        _DEFINITIONS[name] = self

    # -- dispatch ---------------------------------------------------------------------------

    def adapter(self, backend: str):
        """The kernel adapter module of ``backend``, imported on first use (Triton is slow to
        import and absent on some machines; its availability is the backend's device reason)."""
        try:
            return self._adapter_modules[backend]
        except KeyError:
            module = self._adapter_modules[backend] = importlib.import_module(self.adapters[backend])
            return module

    def _check_for(self, backend: str) -> Callable[..., backends.Reason]:
        if backend == "reference":
            return lambda *args: None
        if backend not in self.adapters:
            reason = self.no_kernel.get(backend, f"{backend} has no {self.name} kernel")
            return lambda *args: reason
        dtypes = self.dtypes.get(backend, FLOAT_DTYPES)
        names = ", ".join(_checks._dtype_name(d) for d in dtypes)

        def check(*args) -> backends.Reason:
            first = next(a for a in args if isinstance(a, torch.Tensor))
            if first.dtype not in dtypes:
                return f"{backend} {self.name} takes {names}, got {_checks._dtype_name(first.dtype)}"
            return None
        return check

    def reasons(self, *args) -> Dict[str, backends.Reason]:
        return self.dispatch.reasons(*args)

    def select(self, *args) -> str:
        """The backend to run ``args`` (raises when a forced one cannot); "reference" also while a
        torch.func transform traces the call (the kernels cannot see through its tensors)."""
        backend = self.dispatch.select(*args)
        return "reference" if common.transforms_active() else backend

    def tolerance(self, dtype: torch.dtype) -> Tuple[float, float]:
        """(atol, rtol) for a result in ``dtype`` against the float64 reference."""
        return self.tolerances[dtype]

    # -- running ----------------------------------------------------------------------------

    def __call__(self, backend: str, *args):
        """Runs the op's kernels on ``backend`` (not "reference"): the custom op while torch.compile
        traces, else the eager autograd Function. One tensor, or a tuple of ``num_outputs``."""
        _checks.local_tensors(self.name, self.params, args)
        if torch.compiler.is_compiling():
            outs = getattr(torch.ops.mtlfast, self.name)(*args, backend)
            if self.num_outputs + self.num_saved == 1:
                return outs
            return outs[0] if self.num_outputs == 1 else tuple(outs[:self.num_outputs])
        if not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            # nothing to differentiate: the kernels without an autograd node (a Function's apply
            # costs about 15 µs a call, as much as a small op's kernel)
            outs, _, _ = self.forward(self.adapter(backend), args, False)
            return outs[0] if self.num_outputs == 1 else tuple(outs)
        return _Eager.apply(self, backend, *args)

    def _backward_grads(self, backend: str, args: tuple, saved: tuple, cache: object, needs: Sequence[bool],
                        grads: Sequence[Optional[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], ...]:
        raw = self.backward(self.adapter(backend), args, saved, cache, tuple(needs), grads)
        out, seen = [], set()
        for arg, need, g in zip(args, needs, raw):
            if not need or g is None:
                out.append(None)
                continue
            g = g.to(arg.dtype)
            if id(g) in seen:       # never one tensor for two arguments
                g = g.clone()
            seen.add(id(g))
            out.append(g)
        return tuple(out)

    # -- the custom ops torch.compile sees --------------------------------------------------

    def _register_custom_ops(self, schema: str) -> None:
        n_args = len(self.params)
        returns = ", ".join(["Tensor"] * (self.num_outputs + self.num_saved))
        returns = returns if self.num_outputs + self.num_saved == 1 else f"({returns})"
        forward_schema = f"{schema[:-1]}, str backend) -> {returns}"
        backward_schema = f"(Tensor[] grads, {schema[1:-1]}, Tensor[] saved, bool[] needs, str backend) -> Tensor[]"

        def forward_impl(*inputs):
            *args, backend = inputs
            outs, saved, _ = self.forward(self.adapter(backend), tuple(args), True)
            result = tuple(t.contiguous() for t in (*outs, *saved))
            return result[0] if len(result) == 1 else result

        def forward_fake(*inputs):
            outs, saved = self.fake(tuple(inputs[:-1]))
            result = (*outs, *saved)
            return result[0] if len(result) == 1 else result

        def backward_impl(grads, *rest):
            args, saved, needs, backend = rest[:n_args], rest[n_args], rest[n_args + 1], rest[n_args + 2]
            result = self._backward_grads(backend, tuple(args), tuple(saved), None, needs, grads)
            return [_or_empty(g, grads[0]) for g in result]

        def backward_fake(grads, *rest):
            args, needs = rest[:n_args], rest[n_args + 1]
            return [a.new_empty(a.shape) if need and isinstance(a, torch.Tensor) else grads[0].new_empty((0,))
                    for a, need in zip(args, needs)]

        forward_op = torch.library.custom_op(f"mtlfast::{self.name}", forward_impl, mutates_args=(),
                                             schema=forward_schema)
        forward_op.register_fake(forward_fake)
        backward_op = torch.library.custom_op(f"mtlfast::{self.name}_backward", backward_impl, mutates_args=(),
                                              schema=backward_schema)
        backward_op.register_fake(backward_fake)

        def setup_context(ctx, inputs, output):
            *args, backend = inputs
            output = output if isinstance(output, tuple) else (output,)
            _save_args(ctx, self, args, output[self.num_outputs:])
            ctx.backend = backend

        def autograd(ctx, *grads):
            # outputs' gradients are materialised (zeros for unused outputs) as in autograd.Function
            args, saved = _saved_args(ctx, self)
            needs = list(ctx.needs_input_grad[:n_args])
            result = getattr(torch.ops.mtlfast, f"{self.name}_backward")(
                list(grads[:self.num_outputs]), *args, list(saved), needs, ctx.backend)
            return (*(g if need else None for g, need in zip(result, needs)), None)

        forward_op.register_autograd(autograd, setup_context=setup_context)


def _or_empty(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: a gradient not asked for is an empty (0,) tensor."""
    return g.contiguous() if g is not None else like.new_empty((0,))


def _first_tensor_device(*args) -> torch.device:
    return next(a for a in args if isinstance(a, torch.Tensor)).device


def _first_tensor_key(*args) -> object:
    first = next(a for a in args if isinstance(a, torch.Tensor))
    return first.device, first.dtype


def _save_args(ctx, op: "OpDefinition", args: Sequence[object], saved: Sequence[torch.Tensor]) -> None:
    """Tensor arguments (and None) through save_for_backward (so in-place changes are caught), the
    rest on ctx."""
    if op.constant_slots:
        ctx.save_for_backward(*[args[i] for i in op.tensor_slots], *saved)
        ctx.constants = [args[i] for i in op.constant_slots]
    else:
        ctx.save_for_backward(*args, *saved)
        ctx.constants = ()


def _saved_args(ctx, op: "OpDefinition") -> Tuple[tuple, tuple]:
    stored = ctx.saved_tensors
    n = len(op.tensor_slots)
    args = [None] * len(op.params)
    for i, t in zip(op.tensor_slots, stored):
        args[i] = t
    for i, c in zip(op.constant_slots, ctx.constants):
        args[i] = c
    return tuple(args), tuple(stored[n:])


class _Eager(torch.autograd.Function):
    """The eager path of every op definition (see the module docstring)."""

    @staticmethod
    def forward(ctx, op: OpDefinition, backend: str, *args):
        outs, saved, ctx.cache = op.forward(op.adapter(backend), args, any(ctx.needs_input_grad))
        _save_args(ctx, op, args, saved)
        ctx.op, ctx.backend = op, backend
        return outs[0] if op.num_outputs == 1 else outs

    @staticmethod
    def backward(ctx, *grads):
        op: OpDefinition = ctx.op
        args, saved = _saved_args(ctx, op)
        needs = ctx.needs_input_grad[2:]
        if common.differentiable_backward(*grads):     # a graph of the gradient: differentiate the reference
            return (None, None, *common.reference_grads(op.grad_reference, args, needs, grads))
        return (None, None, *op._backward_grads(ctx.backend, args, saved, ctx.cache, needs, grads))
