"""Log-derivatives against finite differences; the SR solvers against each other."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from pipeline import sr

from conftest import randomized, system_for


def test_log_derivatives_equal_finite_differences(attention: str) -> None:
    system = system_for(**{"model.attention": attention})
    params = randomized(system.init_params(0), jax.random.PRNGKey(2), 0.1)
    s = np.array([[1, -1] * 8, [1, 1, -1, -1] * 4], np.int8)
    O = np.asarray(sr.log_derivatives(system.logpsi, params, jnp.asarray(s)))
    flat, unravel = ravel_pytree(params)
    eps = 1e-6
    for k in np.random.default_rng(0).choice(flat.size, 25, replace=False):
        e = jnp.zeros_like(flat).at[k].set(eps)
        fd = (system.logpsi(unravel(flat + e), s) - system.logpsi(unravel(flat - e), s)) / (2 * eps)
        np.testing.assert_allclose(O[:, k], fd, rtol=1e-6, atol=1e-7)


def _random_problem(n=64, P=40, seed=0):
    rng = np.random.default_rng(seed)
    O = rng.normal(size=(n, P)) + 1j * rng.normal(size=(n, P))
    E = rng.normal(size=n) + 1j * rng.normal(size=n)
    return jnp.asarray(O), jnp.asarray(E)


def _kernel_directions(X, e, zeta, n: int, previous, momentum: float,
                       gram_dtype: str = "float64") -> dict[str, tuple]:
    """The kernel direction (shift 1e-3) by each path of `sr.direction`: the kernel T built and
    solved inside jit (as off CPU), built inside jit and solved on the host by LAPACK (CPU,
    optimizer.gram_build=xla), built by host BLAS syrk and solved by LAPACK (gram_build=blas);
    the Gram read from X or from its float32 copy."""
    G = X.astype(jnp.float32) if gram_dtype == "float32" else X
    T = jax.jit(sr._kernel_matrix, static_argnums=(1, 2))(G, n, False)
    jitted = sr.Rows(X, e, zeta, None, T)
    host = sr.Rows(X, e, zeta, G if gram_dtype == "float32" else None, None)

    def on_host(r: sr.Rows):
        return sr.host_kernel_solve(sr.host_kernel_matrix(r, n), zeta, 1e-3)

    paths = {"xla": (jitted, None), "xla, host solve": (jitted, on_host(jitted)),
             "blas, host solve": (host, on_host(host))}
    return {name: sr.solve_rows(r, solved, n, jnp.asarray(1e-3), "kernel", 1e-12, 2000, previous,
                                jnp.asarray(momentum))
            for name, (r, solved) in paths.items()}


@pytest.mark.parametrize("momentum,kappa", [(0.0, 1.0), (0.9, 1.0), (0.0, 3.0), (0.9, 3.0)])
@pytest.mark.parametrize("n,P", [(64, 40), (32, 100)])
def test_solvers_agree(n: int, P: int, momentum: float, kappa: float) -> None:
    O, E = _random_problem(n, P)
    previous = jnp.asarray(np.random.default_rng(1).normal(size=P))
    X, e = sr.centred_rows(O, E, n, kappa)
    shift = jnp.asarray(1e-3)
    sols, metric = {}, {}
    for name in ("dense", "cg"):
        x, info = sr.solve(X, e, n, shift, name, 1e-12, 2000, previous, momentum)
        sols[name], metric[name] = np.asarray(x), float(info.metric_norm)
    # the kernel system by every path of `direction`; X phi enters through the Jacobian's rows
    zeta = sr._kernel_rhs(e, (X @ previous).reshape(2, n), n, momentum)
    for name, (x, info) in _kernel_directions(X, e, zeta, n, previous, momentum).items():
        sols[name], metric[name] = np.asarray(x), float(info.metric_norm)
        assert float(info.residual) < 1e-10, (name, float(info.residual))
    # Reference: S and F written out from the formulas of science.md; with momentum, SPRING in
    # its sample-space form phi = Y^T (Y Y^T + lambda)^{-1} (eps - mu Y phi_prev) + mu phi_prev,
    # Y = [Re dO; Im dO] / sqrt(n), eps = [Re dE; Im dE] / sqrt(n). The phase scale kappa
    # multiplies the phase equations' right-hand side: Im dE -> kappa Im dE.
    dO, dE = np.asarray(O - O.mean(0)), np.asarray(E - E.mean())
    dE = dE.real + 1j * kappa * dE.imag
    S = (dO.conj().T @ dO).real / n
    F = (dO.conj().T @ dE).real / n
    if momentum == 0.0:
        ref = np.linalg.solve(S + 1e-3 * np.eye(P), F)
    else:
        Y = np.concatenate([dO.real, dO.imag]) / np.sqrt(n)
        eps = np.concatenate([dE.real, dE.imag]) / np.sqrt(n)
        prev = np.asarray(previous)
        zeta = eps - momentum * Y @ prev
        ref = Y.T @ np.linalg.solve(Y @ Y.T + 1e-3 * np.eye(2 * n), zeta) + momentum * prev
    for name, x in sols.items():
        np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-8, err_msg=name)
        # the trust region's measure of the step: d^T S d with S written out as above
        np.testing.assert_allclose(metric[name], ref @ S @ ref, rtol=1e-6, err_msg=name)


def _update(max_step: float, lr_scale: float = 1.0):
    """One SR update of a random 4x4 state on random Sz = 0 samples and local energies, with
    the trust region at `max_step` (0: none): (parameters before, after, info)."""
    system = system_for(**{"model.d": 8, "optimizer.warmup": 0, "optimizer.momentum": 0.0,
                           "optimizer.max_step": max_step})
    params = randomized(system.init_params(0), jax.random.PRNGKey(1), 0.1)
    rng = np.random.default_rng(0)
    s = jnp.asarray(np.array([rng.permutation([1, -1] * 8) for _ in range(64)], np.int8))
    eloc = jnp.asarray(rng.normal(size=64) + 1j * rng.normal(size=64))
    pre = sr.Preconditioner(system.cfg.optimizer, 10, system.n_params(params), 64)
    new, _, info = pre.update(system.logpsi, params, s, eloc, pre.init(params), 3, lr_scale)
    return ravel_pytree(params)[0], ravel_pytree(new)[0], info


def test_trust_region_shortens_the_step_and_keeps_its_direction() -> None:
    """A limit below the step's Fubini-Study length lr sqrt(d^T S d) scales the update down to
    that length (same direction, learning rate scaled alike); a limit above it changes nothing."""
    before, free, info = _update(0.0, lr_scale=0.5)
    assert info["step_length"] > 0
    limit = info["step_length"] / 4
    _, short, short_info = _update(limit, lr_scale=0.5)
    np.testing.assert_allclose(short - before, (free - before) / 4, rtol=1e-9, atol=1e-14)
    assert short_info["step_length"] == pytest.approx(limit, rel=1e-12)
    assert short_info["lr"] == pytest.approx(info["lr"] / 4, rel=1e-12)
    _, loose, loose_info = _update(2 * info["step_length"], lr_scale=0.5)
    np.testing.assert_array_equal(loose, free)
    assert loose_info["lr"] == info["lr"] and loose_info["step_length"] == info["step_length"]


def test_float32_gram_gives_the_float64_direction_to_single_precision() -> None:
    """optimizer.gram_dtype=float32: X X^T accumulated in float32 from a float32 copy of X
    (inside jit, or by BLAS ssyrk on the host), the system solved in float64. On every path the
    direction equals the float64 one to float32 round-off, and not to float64 round-off (the
    accumulation really is in float32)."""
    n, P = 32, 100
    O, E = _random_problem(n, P)
    previous = jnp.asarray(np.random.default_rng(1).normal(size=P))
    X, e = sr.centred_rows(O, E, n, 3.0)
    zeta = sr._kernel_rhs(e, (X @ previous).reshape(2, n), n, 0.9)
    sols = {dtype: _kernel_directions(X, e, zeta, n, previous, 0.9, dtype)
            for dtype in ("float64", "float32")}
    for path, (x64, _) in sols["float64"].items():
        x32, info = sols["float32"][path]
        assert float(info.residual) < 1e-10  # the float64 solve of the (float32-built) system
        error = np.linalg.norm(x32 - x64) / np.linalg.norm(x64)
        assert 1e-12 < error < 1e-5, (path, error)


def test_first_stage_returns_the_kernel_or_the_rows_blas_reads() -> None:
    """`sr.rows` for the kernel solver: with gram_build=xla the kernel T = X X^T / N (float64,
    or accumulated in float32 with gram_dtype=float32: equal to single, not double, precision),
    with gram_build=blas no T and, in float32, the exact float32 copy of X that the host's
    syrk reads; X itself is the same float64 matrix on every path, and the dense solver gets
    neither."""
    system = system_for(**{"model.d": 8})
    params = randomized(system.init_params(0), jax.random.PRNGKey(1), 0.1)
    rng = np.random.default_rng(0)
    s = jnp.asarray(np.array([rng.permutation([1, -1] * 8) for _ in range(16)], np.int8))
    eloc = jnp.asarray(rng.normal(size=16) + 1j * rng.normal(size=16))
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    out = {(solver, dtype, build): sr.rows(system.logpsi, params, s, eloc, 16, jnp.asarray(1.0),
                                           solver, 4, zero, jnp.asarray(0.9), dtype, build)
           for solver in ("kernel", "dense") for dtype in ("float64", "float32")
           for build in ("xla", "blas")}
    X = np.asarray(out["kernel", "float64", "blas"].X)
    for r in out.values():
        np.testing.assert_array_equal(r.X, X)
    T = X @ X.T / 16
    np.testing.assert_allclose(out["kernel", "float64", "xla"].T, T, rtol=1e-12, atol=1e-14)
    T32 = np.asarray(out["kernel", "float32", "xla"].T)
    assert T32.dtype == np.float64 and 1e-12 < np.abs(T32 - T).max() / np.abs(T).max() < 1e-5
    np.testing.assert_array_equal(out["kernel", "float32", "blas"].X_gram, X.astype(np.float32))
    assert out["kernel", "float64", "blas"].X_gram is None
    assert all(out["kernel", d, "blas"].T is None and out["kernel", d, "xla"].X_gram is None
               for d in ("float64", "float32"))
    assert all(r.T is None and r.X_gram is None and r.zeta is None
               for (solver, _, _), r in out.items() if solver == "dense")


@pytest.mark.parametrize("rows,blocks", [(74, 8), (74, 3), (9, 1), (5, 4), (5, 8)])
def test_symmetric_gram_equals_full_product(rows: int, blocks: int) -> None:
    X = jnp.asarray(np.random.default_rng(rows).normal(size=(rows, 23)))
    np.testing.assert_allclose(sr.gram_blocks(X, blocks), X @ X.T, rtol=1e-13, atol=1e-13)


def test_host_kernel_solve_falls_back_to_the_eigen_solve_when_not_positive_definite() -> None:
    """A negative shift makes X X^T / n + lambda I indefinite: the host solve then gives the
    clipped eigen-solve of `_spd_solve`, not a failed Cholesky."""
    X = jnp.asarray(np.random.default_rng(3).normal(size=(12, 30)))
    zeta = jnp.asarray(np.random.default_rng(4).normal(size=12))
    T = np.asarray(X) @ np.asarray(X).T / 5 - 5.0 * np.eye(12)
    assert np.linalg.eigvalsh(T).min() < 0
    y, _ = sr.host_kernel_solve(sr.host_kernel_matrix(sr.Rows(X, zeta, zeta, None, None), 5),
                                zeta, -5.0)
    np.testing.assert_allclose(y, sr._spd_solve(jnp.asarray(T), zeta), rtol=1e-10, atol=1e-12)


def test_dense_solver_falls_back_when_not_positive_definite() -> None:
    A = jnp.diag(jnp.array([2.0, 1.0, -1e-3]))
    x = sr._spd_solve(A, jnp.array([2.0, 3.0, 0.0]))
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(x[:2], [1.0, 3.0])


def test_auto_solver_choice() -> None:
    assert sr.choose_solver("auto", 500, 1024)[0] == "dense"
    solver, why = sr.choose_solver("auto", 3368, 1024)
    assert solver == "kernel" and "P=3368 > 2 N_tot=2048" in why
    assert sr.choose_solver("auto", 50000, 8192)[0] == "cg"
    assert sr.choose_solver("cg", 500, 1024) == ("cg", "optimizer.solver=cg")
