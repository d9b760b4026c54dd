r"""Figure 4's measurements during training: the NTK's drift from init and the blocks' CKA.

The ``ntk-cka`` experiment trains like the others (:mod:`curvlab.experiments.runner`) and, at
every evaluation, measures on a fixed probe of training images (the first ``ntk_probe`` of the
phase's training set, the same for every optimizer of a seed):

* the empirical NTK :math:`\Theta_t` (:func:`~curvlab.diagnostics.empirical_ntk`, ``mode``
  ``"full"`` ``[N, N, C, C]``, ``"trace"`` ``[N, N]`` or ``"diagonal"`` ``[N, C, C]``), and from
  it the similarity :math:`S(\Theta_0, \Theta_t)` and relative change
  :math:`\lVert\Theta_t - \Theta_0\rVert_F / \lVert\Theta_0\rVert_F` to the initial kernel and
  the rate of change since the previous evaluation, per update;
* the linear CKA of the first, middle and last reversible blocks' outputs to their outputs at
  initialization (:func:`~curvlab.diagnostics.linear_cka`).

The initial kernel, the initial representations and the previous kernel are part of the run's
checkpoint (:meth:`KernelTracker.state_dict`), so a resumed run compares against the very tensors
the uninterrupted run measured.
"""

from __future__ import annotations

from torch import Tensor

from curvlab.diagnostics import (
    empirical_ntk,
    linear_cka,
    ntk_change,
    ntk_rate_of_change,
    ntk_similarity,
)
from curvlab.diagnostics.cka import record_representations
from curvlab.nn import RevMLP

#: The blocks compared by CKA, in record-field order (``cka_first``, ``cka_middle``, ``cka_last``).
ROLES = ("first", "middle", "last")
#: The fields every ``eval`` record of an ``ntk-cka`` run adds.
FIELDS = ("ntk_similarity", "ntk_change", "ntk_rate") + tuple(f"cka_{role}" for role in ROLES)


def block_roles(model: RevMLP) -> dict[str, str]:
    """Module names of the first, middle (index ``L // 2``) and last of the ``L`` blocks.

    The same blocks as :func:`curvlab.diagnostics.first_middle_last`; with fewer than three
    blocks some roles name the same block.
    """
    count = len(model.body.blocks)
    indices = {"first": 0, "middle": count // 2, "last": count - 1}
    return {role: f"body.blocks.{indices[role]}" for role in ROLES}


class KernelTracker:
    """The NTK and block representations of a probe, against their values at initialization.

    Args:
        probe: ``[N, D]`` fixed probe inputs.
        mode: ``"full"``, ``"trace"`` or ``"diagonal"``: which kernel is compared.

    Attributes:
        initial: The kernel at initialization (``None`` until :meth:`start` or
            :meth:`load_state_dict`).
        previous: The kernel at the last measurement, and ``previous_step`` the updates applied
            then (the rate's reference).
        representations: ``{module name: [N, D_b]}`` the blocks' outputs at initialization.
    """

    def __init__(self, probe: Tensor, mode: str = "full") -> None:
        self.probe = probe
        self.mode = mode
        self.initial: Tensor | None = None
        self.previous: Tensor | None = None
        self.previous_step = 0
        self.representations: dict[str, Tensor] = {}

    def kernel(self, model: RevMLP) -> Tensor:
        """The model's empirical NTK on the probe (the structured form for a RevMLP)."""
        return empirical_ntk(model, self.probe, mode=self.mode).detach()

    def start(self, model: RevMLP) -> None:
        """Record the initial kernel and representations of ``model`` (at initialization)."""
        self.initial = self.previous = self.kernel(model)
        self.previous_step = 0
        names = sorted(set(block_roles(model).values()))
        self.representations = record_representations(model, self.probe, names)

    def measure(self, model: RevMLP, step: int) -> dict[str, float | None]:
        """The record fields (:data:`FIELDS`) of ``model`` after ``step`` updates.

        ``ntk_rate`` is :func:`~curvlab.diagnostics.ntk_rate_of_change` from the previous
        measurement per update (``None`` at the first one). The measurement becomes the next
        one's reference.
        """
        if self.initial is None or self.previous is None:
            raise RuntimeError("KernelTracker.measure before start or load_state_dict")
        kernel = self.kernel(model)
        roles = block_roles(model)
        now = record_representations(model, self.probe, sorted(set(roles.values())))
        interval = step - self.previous_step
        rate = float(ntk_rate_of_change(self.previous, kernel, interval)) if interval > 0 else None
        fields: dict[str, float | None] = {
            "ntk_similarity": float(ntk_similarity(self.initial, kernel)),
            "ntk_change": float(ntk_change(self.initial, kernel)),
            "ntk_rate": rate,
        }
        for role, name in roles.items():
            fields[f"cka_{role}"] = float(linear_cka(self.representations[name], now[name]))
        self.previous, self.previous_step = kernel, step
        return fields

    def state_dict(self) -> dict:
        """Tensors and the step that :meth:`load_state_dict` restores (checkpoint key ``ntk``)."""
        return {
            "initial": self.initial,
            "previous": self.previous,
            "previous_step": self.previous_step,
            "representations": dict(self.representations),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (tensors moved to the probe's device)."""
        device = self.probe.device
        self.initial = state["initial"].to(device)
        self.previous = state["previous"].to(device)
        self.previous_step = int(state["previous_step"])
        self.representations = {k: v.to(device) for k, v in state["representations"].items()}
