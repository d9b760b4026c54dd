"""ExactGN against dense float64 references built from the full Jacobian (tests/reference.py)."""

import pytest
import torch
import torch.nn.functional as F

from curvlab.nn import RevMLP
from curvlab.optim import ExactGN, NoExactRightInverseError
from curvlab.optim.exact_gn import DEFAULT_CE_OUTPUT_DAMPING
from curvlab.optim.function_space import as_targets, loss_value, newton_step
from tests.reference import jacobian, loss_hessian_wrt_output

K = 4


def make_problem(n, d, h, depth, bias=True, norm=False, seed=0):
    torch.manual_seed(seed)
    model = RevMLP(d, K, h, depth, bias=bias, norm=norm).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, K, (n,))
    return model, x, y


def flat_direction(model, directions):
    return torch.cat([directions[name].reshape(-1) for name, _ in model.named_parameters()])


def dense_output_change(model, x, directions, loss):
    """J D from the dense Jacobian; CE: per-sample constant removed (the softmax's null direction)."""
    moved = (jacobian(model, x) @ flat_direction(model, directions)).reshape(x.shape[0], K)
    return moved - moved.mean(1, keepdim=True) if loss == "ce" else moved


def function_space_step(model, x, y, loss, output_damping=None):
    """The step ExactGN(loss=loss) takes by default (CE: damped by DEFAULT_CE_OUTPUT_DAMPING)."""
    if output_damping is None:
        output_damping = DEFAULT_CE_OUTPUT_DAMPING if loss == "ce" else 0.0
    with torch.no_grad():
        out = model(x)
    return newton_step(out, as_targets(y, K, loss, out), loss, output_damping=output_damping)


# (n, d, h, depth): first block full rank when d/2 >= n (+bias); rank-deficient otherwise.
SHAPES = [(8, 20, 24, 1), (8, 12, 20, 3), (16, 12, 40, 2), (24, 18, 64, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize(("bias", "norm"), [(True, False), (False, False), (True, True)])
def test_right_inverse_meets_the_function_space_step(shape, loss, bias, norm):
    model, x, y = make_problem(*shape, bias=bias, norm=norm)
    if shape[3] == 1 and shape[1] // 2 + bias < shape[0]:
        pytest.skip("single rank-deficient block")
    directions = ExactGN(model, lr=1.0, loss=loss).directions(x, y)
    step = function_space_step(model, x, y, loss)
    moved = dense_output_change(model, x, directions, loss)
    assert torch.allclose(moved, step, atol=1e-9 * step.abs().max(), rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_pinv_equals_dense_pseudo_inverse(shape, loss):
    model, x, y = make_problem(*shape, norm=True)
    directions = ExactGN(model, lr=1.0, loss=loss, scheme="pinv").directions(x, y)
    step = function_space_step(model, x, y, loss)
    reference = torch.linalg.pinv(jacobian(model, x)) @ step.reshape(-1)
    ours = flat_direction(model, directions)
    assert torch.allclose(ours, reference, atol=1e-8 * reference.abs().max(), rtol=0)


def test_pinv_with_a_batch_that_does_not_split_evenly_into_ntk_tiles():
    model, x, y = make_problem(13, 12, 40, 2)
    directions = ExactGN(model, lr=1.0, scheme="pinv").directions(x, y)
    step = function_space_step(model, x, y, "mse")
    reference = torch.linalg.pinv(jacobian(model, x)) @ step.reshape(-1)
    ours = flat_direction(model, directions)
    assert torch.allclose(ours, reference, atol=1e-8 * reference.abs().max(), rtol=0)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_pinv_without_inverted_bottleneck_equals_dense_pseudo_inverse(loss):
    torch.manual_seed(0)
    model = RevMLP(12, K, 40, 2, inverted_bottleneck=False).double()
    x, y = torch.randn(16, 12, dtype=torch.float64), torch.randint(0, K, (16,))
    directions = ExactGN(model, lr=1.0, loss=loss, scheme="pinv").directions(x, y)
    step = function_space_step(model, x, y, loss)
    reference = torch.linalg.pinv(jacobian(model, x)) @ step.reshape(-1)
    ours = flat_direction(model, directions)
    assert torch.allclose(ours, reference, atol=1e-8 * reference.abs().max(), rtol=0)


@pytest.mark.parametrize("scheme", ["right-inverse", "paper"])
def test_batched_block_solves_equal_the_sequential_path(scheme):
    """Tiny damping forces the sequential path (actual A_F dW_F); it must match the batched one."""
    model, x, y = make_problem(8, 20, 24, 3)  # every block full rank
    batched = flat_direction(model, ExactGN(model, lr=1.0, scheme=scheme).directions(x, y))
    opt = ExactGN(model, lr=1.0, scheme=scheme, damping=1e-12)
    sequential = flat_direction(model, opt.directions(x, y))
    assert torch.allclose(sequential, batched, atol=1e-7 * batched.abs().max(), rtol=0)


@pytest.mark.parametrize("scheme", ["right-inverse", "pinv"])
def test_smooth_nonlinearity_meets_the_function_space_step(scheme):
    torch.manual_seed(0)
    model = RevMLP(12, K, 40, 3, nonlinearity="tanh").double()
    x, y = torch.randn(16, 12, dtype=torch.float64), torch.randint(0, K, (16,))
    directions = ExactGN(model, lr=1.0, loss="ce", scheme=scheme).directions(x, y)
    step = function_space_step(model, x, y, "ce")
    moved = dense_output_change(model, x, directions, "ce")
    assert torch.allclose(moved, step, atol=1e-9 * step.abs().max(), rtol=0)


def test_pinv_is_minimum_norm_among_exact_schemes():
    model, x, y = make_problem(16, 12, 40, 3)
    norms = {
        scheme: flat_direction(model, ExactGN(model, lr=1.0, scheme=scheme).directions(x, y)).norm()
        for scheme in ("pinv", "right-inverse")
    }
    assert norms["pinv"] < norms["right-inverse"]


def test_right_inverse_uses_only_full_rank_blocks():
    model, x, y = make_problem(24, 18, 64, 4)  # first block: rank <= 10 < 24
    opt = ExactGN(model, lr=0.1)
    opt.step(x, y)
    assert opt.last_info.blocks_used == [1, 2, 3]


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_paper_scheme_is_exact_when_every_block_is_full_rank(loss):
    model, x, y = make_problem(8, 20, 24, 3)
    directions = ExactGN(model, lr=1.0, loss=loss, scheme="paper").directions(x, y)
    step = function_space_step(model, x, y, loss)
    assert torch.allclose(dense_output_change(model, x, directions, loss), step, atol=1e-9, rtol=0)


def test_paper_scheme_raw_scale_is_2L_for_mse():
    model, x, y = make_problem(8, 20, 24, 3)
    opt = ExactGN(model, lr=1e-6, scheme="paper", normalize=False, track_residual=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(x, y)
    directions = {n: (before[n] - p.detach()) / 1e-6 for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    step = function_space_step(model, x, y, "mse")
    assert torch.allclose(
        dense_output_change(model, x, directions, "mse"), 6 * step, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_tracked_residual_of_the_raw_paper_step_is_zero_where_every_block_is_exact(loss):
    """normalize=False scales the step by 2L (MSE) or L (CE); the residual is measured against
    the scaled step, so an exact step reports 0, not 2L - 1."""
    model, x, y = make_problem(8, 20, 24, 3)  # every block full rank
    opt = ExactGN(model, lr=1e-3, loss=loss, scheme="paper", normalize=False, track_residual=True)
    opt.step(x, y)
    assert opt.last_info.residual < 1e-10


def test_paper_scheme_residual_is_reported_when_first_block_is_rank_deficient():
    model, x, y = make_problem(24, 18, 64, 4)
    step = function_space_step(model, x, y, "mse")
    opt = ExactGN(model, lr=1e-3, scheme="paper", track_residual=True)
    directions = opt.directions(x, y)
    dense = ((dense_output_change(model, x, directions, "mse") - step).norm() / step.norm()).item()
    opt.step(x, y)
    assert dense > 0.05 and opt.last_info.residual == pytest.approx(dense, rel=1e-8)


@pytest.mark.parametrize("scheme", ["right-inverse", "pinv"])
def test_tracked_residual_of_exact_schemes_is_round_off(scheme):
    model, x, y = make_problem(16, 12, 40, 3)
    opt = ExactGN(model, lr=0.1, loss="ce", scheme=scheme, track_residual=True)
    opt.step(x, y)
    assert opt.last_info.residual < 1e-10


def test_theorem_4_3_two_right_inverses_agree_to_second_order():
    """Losses after one step of two different right inverses differ by O(alpha^2)."""
    model, x, y = make_problem(16, 12, 40, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    targets = as_targets(y, K, "mse", model(x))

    def loss_after(scheme, alpha):
        model.load_state_dict(state)
        ExactGN(model, lr=alpha, scheme=scheme).step(x, y)
        with torch.no_grad():
            return loss_value(model(x), targets, "mse").item()

    alphas = (2.5e-4, 6.25e-5, 1.5625e-5)
    gaps = [abs(loss_after("right-inverse", a) - loss_after("pinv", a)) for a in alphas]
    scaled = torch.tensor([gap / a**2 for gap, a in zip(gaps, alphas)])
    # gap = c alpha^2: gap / alpha^2 is constant (O(alpha) would make it grow 4x per row).
    assert scaled.max() / scaled.min() < 1.05, (gaps, scaled)


@pytest.mark.parametrize("scheme", ["right-inverse", "pinv"])
def test_mse_loss_decreases_at_the_gauss_newton_rate(scheme):
    """J D = f - y means L(alpha) = (1 - alpha)^2 L0 to first order: dL/dalpha = -2 L0."""
    model, x, y = make_problem(16, 12, 40, 3)
    targets = F.one_hot(y, K).double()
    alpha = 1e-6
    before = ExactGN(model, lr=alpha, scheme=scheme).step(x, y)
    with torch.no_grad():
        after = F.mse_loss(model(x), targets).item()
    assert (after - before) / alpha == pytest.approx(-2 * before, rel=1e-4)


@pytest.mark.parametrize("scheme", ["right-inverse", "pinv", "paper"])
def test_step_moves_the_parameters_by_minus_lr_times_the_directions(scheme):
    model, x, y = make_problem(24, 18, 64, 4)  # first block rank-deficient: it does not move
    opt = ExactGN(model, lr=0.3, loss="ce", scheme=scheme)
    expected = flat_direction(model, opt.directions(x, y)).mul(-0.3)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt.step(x, y)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(after - before, expected, atol=1e-12 * expected.abs().max(), rtol=0)


def test_step_returns_the_loss_before_the_step():
    model, x, y = make_problem(16, 12, 40, 3)
    with torch.no_grad():
        expected = F.mse_loss(model(x), F.one_hot(y, K).double()).item()
    assert ExactGN(model, lr=0.01).step(x, y) == pytest.approx(expected, rel=1e-12)


def test_ce_newton_step_solves_the_per_sample_hessian_system():
    torch.manual_seed(1)
    f = torch.randn(5, K, dtype=torch.float64)
    y = torch.randint(0, K, (5,))
    s = newton_step(f, F.one_hot(y, K).double(), "ce")
    hess = loss_hessian_wrt_output(lambda o, t: F.cross_entropy(o, t, reduction="sum"), f, y)
    grad = torch.softmax(f, -1) - F.one_hot(y, K)
    assert torch.allclose((hess @ s.reshape(-1)).reshape(5, K), grad, atol=1e-10)
    assert torch.allclose(s.sum(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("damping", [1e-3, 0.1, 10.0])
def test_damped_ce_step_solves_the_damped_hessian_system(damping):
    torch.manual_seed(2)
    f = 3 * torch.randn(6, K, dtype=torch.float64)
    y = torch.randint(0, K, (6,))
    s = newton_step(f, F.one_hot(y, K).double(), "ce", output_damping=damping)
    hess = loss_hessian_wrt_output(lambda o, t: F.cross_entropy(o, t, reduction="sum"), f, y)
    grad = (torch.softmax(f, -1) - F.one_hot(y, K)).reshape(-1)
    reference = torch.linalg.solve(hess + damping * torch.eye(6 * K, dtype=f.dtype), grad)
    assert torch.allclose(s.reshape(-1), reference, atol=1e-10 * reference.abs().max(), rtol=0)


def test_damped_ce_step_tends_to_the_newton_step_and_stays_bounded():
    f = torch.tensor([[8.0, 0.0, -2.0, 1.0]], dtype=torch.float64)  # confidently wrong
    y = F.one_hot(torch.tensor([2]), K).double()
    newton = newton_step(f, y, "ce")
    gaps = []
    for damping in (1e-4, 1e-6, 1e-8):
        s = newton_step(f, y, "ce", output_damping=damping)
        gaps.append(float((s - s.mean() - newton).norm() / newton.norm()))
        assert float(s.norm()) <= float((torch.softmax(f, -1) - y).norm()) / damping * (1 + 1e-12)
    assert gaps[2] < gaps[1] < gaps[0] and gaps[2] < 1e-3
    assert float(newton.norm()) > 1e3  # the undamped step grows like 1/p_y


def test_exact_gn_with_output_damping_meets_the_damped_step():
    model, x, y = make_problem(16, 12, 40, 2)
    damping = 0.05
    directions = ExactGN(model, lr=1.0, loss="ce", output_damping=damping).directions(x, y)
    with torch.no_grad():
        out = model(x)
    step = newton_step(out, as_targets(y, K, "ce", out), "ce", output_damping=damping)
    moved = (jacobian(model, x) @ flat_direction(model, directions)).reshape(x.shape[0], K)
    assert torch.allclose(moved, step, atol=1e-9 * step.abs().max(), rtol=0)


def test_identity_hessian_step_is_softmax_minus_target():
    f = torch.randn(3, K, dtype=torch.float64)
    y = F.one_hot(torch.tensor([0, 1, 3]), K).double()
    assert torch.allclose(newton_step(f, y, "ce", identity_hessian=True), torch.softmax(f, -1) - y)


def test_narrow_network_has_no_exact_right_inverse_and_says_what_to_do():
    model, x, y = make_problem(16, 12, 6, 2)
    with pytest.raises(NoExactRightInverseError, match="solver='damped'"):
        ExactGN(model, lr=0.1).step(x, y)


def test_pinv_and_damped_work_at_any_width():
    model, x, y = make_problem(16, 12, 6, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = {}
    for kwargs in ({"scheme": "pinv"}, {"solver": "damped", "damping": 1e-3}):
        model.load_state_dict(state)
        opt = ExactGN(model, lr=0.05, **kwargs)
        losses[str(kwargs)] = (opt.step(x, y), opt.step(x, y))
    assert all(after < before for before, after in losses.values())


@pytest.mark.parametrize("solver", ["eigh", "svd"])
def test_solvers_agree_with_cholesky(solver):
    model, x, y = make_problem(24, 18, 64, 4)
    reference = flat_direction(model, ExactGN(model, lr=1.0).directions(x, y))
    ours = flat_direction(model, ExactGN(model, lr=1.0, solver=solver).directions(x, y))
    assert torch.allclose(ours, reference, atol=1e-8 * reference.abs().max(), rtol=0)


def test_float32_right_inverse_is_accurate():
    torch.manual_seed(0)
    model = RevMLP(64, 10, 256, 3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt = ExactGN(model, lr=0.1, loss="ce", track_residual=True)
    opt.step(x, y)
    assert opt.last_info.residual < 1e-3


def test_is_a_torch_optimizer_with_scheduler_and_state_dict():
    model, x, y = make_problem(16, 12, 40, 2)
    opt = ExactGN(model, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(x, y)
    scheduler.step()
    restored = ExactGN(model, lr=1.0)
    restored.load_state_dict(opt.state_dict())
    assert restored.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"loss": "hinge"}, ValueError, "hinge"),
        ({"scheme": "magic"}, ValueError, "magic"),
        ({"solver": "qr"}, ValueError, "qr"),
        ({"solver": "damped"}, ValueError, "damping > 0"),
        ({"identity_hessian": True}, ValueError, "ce"),
        ({"output_damping": 0.1}, ValueError, "true Hessian"),
        ({"lr": -1.0}, ValueError, "positive"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    model, _, _ = make_problem(8, 12, 20, 1)
    with pytest.raises(error, match=message):
        ExactGN(model, **{"lr": 0.1, **kwargs})


def test_rejects_models_that_are_not_reversible():
    with pytest.raises(TypeError, match="RevMLP"):
        ExactGN(torch.nn.Linear(3, 2), lr=0.1)


def test_bad_labels_are_named():
    model, x, _ = make_problem(8, 12, 20, 2)
    with pytest.raises(ValueError, match="class labels"):
        ExactGN(model, lr=0.1).step(x, torch.full((8,), 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ce_newton_step_stays_finite_for_vanishing_probabilities(dtype):
    """y / p is clamped in log space: 0 * exp(huge) must not turn into NaN."""
    f = torch.tensor([[0.0, 9e5, -9e5, 1.0]], dtype=dtype)
    y = F.one_hot(torch.tensor([2]), K).to(dtype)
    assert torch.isfinite(newton_step(f, y, "ce")).all()
