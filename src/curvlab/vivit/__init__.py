"""ViViT: the GGN's low-rank structure (MISSION.md, C5; Dangel et al., 2022).

``ggn_eigh`` gives the top-``k`` GGN eigenpairs from the Gram matrix of the GGN's square-root
factor; ``directional_derivatives`` the per-sample first- and second-order derivatives along
them; ``damped_newton_step`` a damped Newton step in their span. See ``docs/vivit.md``.
"""

from curvlab.vivit.directional import (
    DirectionalDerivatives,
    curvature_projections,
    directional_derivatives,
    gradient_projections,
)
from curvlab.vivit.eigh import ggn_eigh
from curvlab.vivit.newton import constant_damping, damped_newton_step

__all__ = [
    "DirectionalDerivatives",
    "constant_damping",
    "curvature_projections",
    "damped_newton_step",
    "directional_derivatives",
    "ggn_eigh",
    "gradient_projections",
]
