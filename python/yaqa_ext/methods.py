"""Quantization methods as registered objects: which Kronecker factors a method rounds with (``H_in`` and / or
``H_out`` feedback), which collections it reads them from, and the experiment names it runs under. The library
(``quantize``), the pipeline and the CLI read every method from :data:`METHODS`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from .datafree import find_partners, proxy_factors
from .arch import TargetModule
from .hessians import HessianFactors

__all__ = ["METHODS", "LayerFactors", "Method", "get_method", "pipeline_methods", "register_method"]

LayerFactors = Callable[[str, object], tuple[Tensor | None, Tensor | None]]
"""(layer name, device) -> the layer's unnormalised ``(H_in, H_out)`` (None: not available)."""


@dataclass(frozen=True)
class Method:
    """A rounding rule over Kronecker factors ``H_out (x) H_I``.

    feedback: whether the input side (``H_in``) and the output side (``H_out``) feed the rounding error back
    (neither: round to nearest). sketches: the collections (``collect_hessians`` sketches) whose factors it
    rounds with; empty: it needs no calibration data. default_sketch: what ``quantize`` collects when given
    data. variants: experiment names (``yaqa run --methods``) and the sketch each one collects.
    """

    name: str
    description: str
    feedback: tuple[bool, bool]
    sketches: tuple[str, ...] = ()
    default_sketch: str | None = None
    variants: dict[str, str | None] = field(default_factory=dict)
    own_factors: bool = False
    """True: the method makes its own factors from the weights (its ``layer_factors`` ignores a collection)."""
    column_scale: bool = False
    """True: ``QuantConfig.datafree_transform`` applies (the input-column scale search for factorless layers)."""

    @property
    def needs_data(self) -> bool:
        return bool(self.sketches)

    def layer_factors(self, model: nn.Module, targets: Sequence[TargetModule],
                      collection: HessianFactors | None) -> LayerFactors:
        """Where each layer's factors come from: the collection (if any)."""
        if collection is None:
            return lambda name, device: (None, None)
        return collection.load


@dataclass(frozen=True)
class DataFreeMethod(Method):
    """Proxy factors from partner layers' weights (see :mod:`yaqa_ext.datafree`)."""

    def layer_factors(self, model: nn.Module, targets: Sequence[TargetModule],
                      collection: HessianFactors | None) -> LayerFactors:
        partners = find_partners(model, targets)
        return lambda name, device: proxy_factors(model, name, partners.get(name))


METHODS: dict[str, Method] = {}
"""Registered methods by name (``QuantConfig(method=name)``)."""


def register_method(method: Method) -> Method:
    """Make ``method`` available to ``QuantConfig(method=...)``, the pipeline and the CLI."""
    if method.name in METHODS and METHODS[method.name] != method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if method.needs_data and method.default_sketch not in method.sketches:
        raise ValueError(f"method {method.name!r}: default_sketch {method.default_sketch!r} is not one of its "
                         f"sketches {method.sketches}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


def pipeline_methods() -> dict[str, tuple[str, str | None]]:
    """Experiment name -> (method, sketch it collects), over every registered method's variants."""
    return {variant: (m.name, sketch) for m in METHODS.values() for variant, sketch in m.variants.items()}


register_method(Method("rtn", "round to nearest; no data", (False, False), variants={"rtn": None}))
register_method(DataFreeMethod("datafree", "no data: proxy factors from partner layers' weights", (True, True),
                               variants={"datafree": None}, own_factors=True, column_scale=True))
register_method(Method("ldlq", "one-sided LDLQ with H_in (= GPTQ); any collection, input moments suffice",
                       (True, False), ("input", "A", "B", "B-lw"), "input", {"ldlq": "input"}))
register_method(Method("yaqa", "YAQA: two-sided LDLQ with H_in and H_out (a Sketch A or B collection)", (True, True),
                       ("A", "B", "B-lw"), "B", {"yaqa-A": "A", "yaqa-B": "B", "yaqa-B-lw": "B-lw"}))
