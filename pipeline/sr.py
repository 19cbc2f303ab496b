"""Stochastic reconfiguration for real parameters and complex log psi, distributed over ranks.

With O_k = d log psi / d theta_k, centred dO = O - <O>, dE = E_loc - <E_loc> (means over all
ranks' samples) and X the (2n x P) real matrix whose rows are Re dO of every sample, then Im dO
(the Jacobian is built as (2, n, P), so it is X without a copy):
  S = X^T X / N_tot,  F = X^T e / N_tot,  direction = (S + lambda I)^{-1} F,
with e the matching rows Re dE, Im dE. The update is theta <- theta - lr * direction (the
optimizer applies lr). Every formula is invariant under a common permutation of the rows.

Momentum (SPRING, Goldshmidt et al. 2024) with coefficient mu and the previous direction phi:
  direction = (S + lambda I)^{-1} (F + mu lambda phi)
            = X^T (X X^T / N_tot + lambda I)^{-1} (e - mu X phi) / N_tot + mu phi   (kernel form).
Where the samples resolve S the update is plain SR; in the directions they do not resolve (all but
2 N_tot of them when P > 2 N_tot) the previous direction is carried on with weight mu, so
information accumulates over steps instead of being forgotten. mu = 0 is plain SR / minSR.

Phase scale kappa: SR fits one imaginary-time step, Re d log psi = -tau Re dE for the amplitudes
and Im d log psi = -tau Im dE for the phases (the rows of X). kappa > 1 takes a longer step for the
phases: e = [Re dE; kappa Im dE]. At a real state with the signs of a sign rule, Im dE vanishes and
plain SR leaves it only through slowly growing phase fluctuations; a longer phase step speeds that
up. Its stationary points are energy minima only for kappa = 1, hence the decay to
optimizer.phase_scale_final.

Solvers (all give the same direction up to round-off or the CG tolerance):
  dense   partial sums of S and F all-reduced, Cholesky (eigen-decomposition if not positive
          definite); P^2 memory and communication.
  cg      matrix-free conjugate gradient, one all-reduce of a P-vector per iteration.
  kernel  minSR, (X X^T / N_tot + lambda I) y = e - mu X phi, direction = X^T y / N_tot + mu phi.
          X X^T is built from its upper block triangle inside the first jitted stage
          (optimizer.gram_build=xla), or on CPU by BLAS syrk between the two stages (=blas);
          in float64, or with optimizer.gram_dtype=float32 from a float32 copy of the centred
          X with float32 accumulation. On CPU the system is solved between the stages by
          LAPACK, elsewhere inside the second stage, in float64 either way. On K ranks X is never
          gathered: an all-to-all re-shards it so that each rank holds all 2 N_tot rows of its
          block of P/K columns, X^(r); each rank forms X^(r) X^(r)^T, the sum over ranks (an
          all-reduce) is the kernel, every rank solves the small system, computes its block of the
          direction X^(r)^T y, and an all-gather assembles it. X per rank: 2 N_tot P / K numbers.
  kernel_gather  the same system with every rank's rows of X all-gathered onto every rank (2 N_tot
          P numbers per rank whatever K); kept as the reference for the distributed form and
          for the memory benchmark.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
from jax.flatten_util import ravel_pytree

from . import dist
from .budget import GRAM_BLOCKS_MAX_BYTES, choose_solver, rows_per_chunk
from .config import OptimizerConfig

GRAM_BLOCKS = 8  # row blocks of X for the kernel X X^T: 36 of 64 block products are computed


class SRInfo(NamedTuple):
    cg_iterations: jax.Array
    residual: jax.Array  # relative residual of the solved system: parameter space (dense, cg),
    # or the kernel system |(T + lambda) y - zeta| / |zeta| (kernel solvers)
    metric_norm: jax.Array  # d^T S d: the squared Fubini-Study length of the direction d per
    # unit learning rate, |X d|^2 / N_tot over all ranks' samples


def bytes_per_step(solver: str, n_params: int, n_total: int, cg_iterations: int = 0,
                   n_ranks: int = 2) -> int:
    """Bytes each rank receives from collectives for one SR solve (float64), for the logs."""
    P, m, K = n_params, 2 * n_total, n_ranks
    body = {"dense": 2 * P + P * P + P,  # <O>, F, S, residual
            "cg": 2 * P + P * (1 + cg_iterations),
            # all-to-all of X, kernel, zeta, direction blocks
            "kernel": m * P * (K - 1) // (K * K) + m * m + m + P,
            # <O>, X gathered, kernel row blocks, zeta, direction
            "kernel_gather": 2 * P + m * P + m * m + m + P}[solver]
    return 8 * body


def _jacobian_of_chunk(logpsi: Callable, params) -> tuple[jax.Array, Callable]:
    """(flat parameters, f) with f(flat, s) -> (2, c, P): d Re log psi and d Im log psi of a
    chunk of c samples (the rows of X of that chunk: no copy is needed to stack them)."""
    flat, unravel = ravel_pytree(params)

    def re_im(p, x):
        lp = logpsi(unravel(p), x[None])[0]
        return jnp.stack([lp.real, lp.imag])

    return flat, jax.vmap(jax.jacrev(re_im), in_axes=(None, 0), out_axes=1)


def _jacobian_and_sum(logpsi: Callable, params, s: jax.Array, chunk: int,
                      phi: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The Jacobian (2, n, P) (see `jacobian`), its sum over this rank's samples (2, 1, P) and,
    given phi (P,), its product with phi (2, n), all inside the loop that builds it: read
    afterwards, XLA would copy the buffer or pass over it once more."""
    flat, jac = _jacobian_of_chunk(logpsi, params)
    n, want = s.shape[0], phi is not None
    c = rows_per_chunk(n, chunk)

    def body(i, carry):
        buf, total, prod = carry
        J = jac(flat, jax.lax.dynamic_slice_in_dim(s, i * c, c))
        if want:
            prod = jax.lax.dynamic_update_slice(prod, J @ phi, (0, i * c))
        return (jax.lax.dynamic_update_slice(buf, J, (0, i * c, 0)),
                total + J.sum(1, keepdims=True), prod)

    zero = (jnp.zeros((2, n, flat.size), flat.dtype), jnp.zeros((2, 1, flat.size), flat.dtype),
            jnp.zeros((2, n if want else 0), flat.dtype))
    J, total, prod = (body(0, zero) if c == n else
                      jax.lax.fori_loop(0, n // c, body, zero))
    return J, total, prod if want else None


def jacobian(logpsi: Callable, params, s: jax.Array, chunk: int = 0) -> jax.Array:
    """(2, n, P) real: d Re log psi / d theta and d Im log psi / d theta of each sample,
    parameters flattened by ravel_pytree. Built `chunk` samples at a time (the largest divisor of
    n not above it; 0: all at once) into one buffer, so the activations of only one chunk are
    alive and the rows are never copied."""
    return _jacobian_and_sum(logpsi, params, s, chunk)[0]


def log_derivatives(logpsi: Callable, params, s: jax.Array, chunk: int = 0) -> jax.Array:
    """(n, P) complex O_k(s) = d log psi(s) / d theta_k."""
    J = jacobian(logpsi, params, s, chunk)
    return J[0] + 1j * J[1]


def _rows(eloc: jax.Array, n_total: int, phase_scale: jax.Array | float) -> jax.Array:
    """e: the rows Re dE of all samples, then kappa Im dE, matching X."""
    dE = eloc - dist.allreduce_sum(eloc.sum()) / n_total
    return jnp.concatenate([dE.real, phase_scale * dE.imag])


def _subtract_in_place(buf: jax.Array, mean: jax.Array, axis: int, chunk: int) -> jax.Array:
    """buf - mean, `chunk` rows along `axis` at a time inside a loop: XLA then updates the
    buffer in place instead of allocating a second one of the size of X."""
    c = rows_per_chunk(buf.shape[axis], chunk)

    def body(i, b):
        block = jax.lax.dynamic_slice_in_dim(b, i * c, c, axis)
        return jax.lax.dynamic_update_slice_in_dim(b, block - mean, i * c, axis)

    return jax.lax.fori_loop(0, buf.shape[axis] // c, body, buf)


def centred_jacobian(J: jax.Array, total: jax.Array, n_total: int, chunk: int = 0) -> jax.Array:
    """X (2n x P) from the Jacobian (2, n, P) and its sum over this rank's samples: centred over
    all ranks' samples, in place, and reshaped for free (no second copy of X)."""
    mean = dist.allreduce_sum(total) / n_total
    return _subtract_in_place(J, mean, 1, chunk).reshape(-1, J.shape[-1])


def centred_rows(O: jax.Array, eloc: jax.Array, n_total: int,
                 phase_scale: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """X and e from complex log-derivatives O (n, P) (kappa: the phase time step relative to the
    amplitude one; 1 for plain SR)."""
    J = jnp.stack([O.real, O.imag])
    return centred_jacobian(J, J.sum(1, keepdims=True), n_total), _rows(eloc, n_total, phase_scale)


def _eigen_solve(w, V, b, xp):
    """V diag(1/w) V^T b from an eigen-decomposition, eigenvalues below 1e-12 max|w| dropped (a
    clipped pseudo-inverse); xp: numpy or jax.numpy."""
    cutoff = 1e-12 * xp.max(xp.abs(w))
    return V @ (xp.where(w > cutoff, 1.0 / xp.where(w > cutoff, w, 1.0), 0.0) * (V.T @ b))


def _spd_solve(A: jax.Array, b: jax.Array) -> jax.Array:
    """Cholesky solve; if A is not numerically positive definite, a clipped eigen-solve."""
    L = jnp.linalg.cholesky(A)
    ok = jnp.all(jnp.isfinite(L))

    def chol(_):
        return jax.scipy.linalg.cho_solve((L, True), b)

    def eig(_):
        return _eigen_solve(*jnp.linalg.eigh(A), b, jnp)

    return jax.lax.cond(ok, chol, eig, None)


def _cg(matvec: Callable, b: jax.Array, tol: float, maxiter: int) -> tuple[jax.Array, jax.Array]:
    """Conjugate gradient from x0 = 0; every rank runs identical iterations (inputs all-reduced)."""
    bb = b @ b

    def cond(c):
        _, r, _, rr, k = c
        return (k < maxiter) & (rr > tol * tol * bb)

    def body(c):
        x, r, p, rr, k = c
        Ap = matvec(p)
        a = rr / (p @ Ap)
        x, r = x + a * p, r - a * Ap
        rr_new = r @ r
        return x, r, r + (rr_new / rr) * p, rr_new, k + 1

    x, _, _, _, k = jax.lax.while_loop(cond, body, (jnp.zeros_like(b), b, b, bb, 0))
    return x, k


def host_gram(X: jax.Array, n_total: int) -> np.ndarray:
    """The upper triangle of X X^T / N_tot (column-major, float64) by BLAS syrk, reading the
    concrete, row-major X in place through its transpose: dsyrk for a float64 X, ssyrk (float32
    accumulation, twice the speed) for a float32 one."""
    A = np.asarray(X)
    syrk = scipy.linalg.blas.ssyrk if A.dtype == np.float32 else scipy.linalg.blas.dsyrk
    return np.asarray(syrk(1.0 / n_total, A.T, trans=1), np.float64)


def host_kernel_matrix(r: "Rows", n_total: int) -> np.ndarray:
    """The kernel X X^T / N_tot over all ranks, as a writable host array of which the upper
    triangle is read: the first stage's T, or (optimizer.gram_build=blas) built here by
    `host_gram` from this rank's Gram rows and summed over ranks (the distributed kernel's
    column blocks; at one rank the sum is the identity)."""
    if r.T is not None:  # symmetric: its transpose is the column-major copy, without a transposition
        return np.array(r.T).T
    return dist.host_allreduce_sum(host_gram(r.gram, n_total))


def host_kernel_solve(A: np.ndarray, zeta: jax.Array, diag_shift: float
                      ) -> tuple[jax.Array, jax.Array]:
    """y = (A + lambda I)^{-1} zeta and the relative residual of that system for the kernel A
    (`host_kernel_matrix`, overwritten by A + lambda I), on the host by LAPACK on CPU (between
    the two jitted stages of `direction`): a Cholesky factorization, or, if the system is not
    numerically positive definite, the clipped eigen-solve of `_spd_solve`. For 2048 x 2048 on
    the 2-core machine 0.08 s where XLA's Cholesky took 0.15 s."""
    A[np.diag_indices_from(A)] += diag_shift
    b = np.asarray(zeta)
    factor, info = scipy.linalg.lapack.dpotrf(A, lower=0, clean=0, overwrite_a=0)
    if info == 0:
        y, info = scipy.linalg.lapack.dpotrs(factor, b, lower=0)
    if info != 0:
        y = _eigen_solve(*scipy.linalg.eigh(A, lower=False), b, np)
    r = scipy.linalg.blas.dsymv(1.0, A, y, lower=0) - b
    return jnp.asarray(y), jnp.asarray(np.linalg.norm(r) / max(np.linalg.norm(b), 1e-300))


def _product(A: jax.Array, B: jax.Array) -> jax.Array:
    """A B^T in float64, accumulated in the dtype of A and B: in float32 at full float32
    precision (no TF32 or bfloat16 passes on accelerators that would take them by default)."""
    return jnp.matmul(A, B.T, precision=jax.lax.Precision.HIGHEST).astype(jnp.float64)


def gram_blocks(X: jax.Array, blocks: int = GRAM_BLOCKS) -> jax.Array:
    """X X^T (float64) inside jit, using the symmetry that XLA's matmul does not: the blocks on
    and above the diagonal, the rest mirrored, (k + 1) / 2k of the work (k row blocks; the last
    may be short). The row blocks are copies of X, so beyond GRAM_BLOCKS_MAX_BYTES the plain
    product is taken (twice the work, no copy). A float32 X is accumulated in float32."""
    if X.size * X.dtype.itemsize > GRAM_BLOCKS_MAX_BYTES:
        return _product(X, X)
    edges = [round(i * X.shape[0] / blocks) for i in range(blocks + 1)]
    B = [X[a:b] for a, b in zip(edges[:-1], edges[1:])]
    upper = {(i, j): _product(B[i], B[j]) for i in range(blocks) for j in range(i, blocks)}
    return jnp.block([[upper[i, j] if j >= i else upper[j, i].T for j in range(blocks)]
                      for i in range(blocks)])


def solve(X: jax.Array, e: jax.Array, n_total: int, diag_shift: jax.Array, solver: str,
          cg_tol: float, cg_maxiter: int, previous: jax.Array,
          momentum: jax.Array | float) -> tuple[jax.Array, SRInfo]:
    """The SR direction (S + lambda I)^{-1} (F + mu lambda phi) in parameter space (dense, cg)
    from this rank's rows X, e and the previous direction phi (see module doc; mu = 0 is plain
    SR), with the relative residual of these equations. (The kernel solvers: `solve_rows`.)
    Products with X^T are written v @ X: XLA would materialize X.T for X.T @ v."""
    F = dist.allreduce_sum(e @ X) / n_total
    rhs = F + momentum * diag_shift * previous
    iters = jnp.zeros((), jnp.int32)
    if solver == "dense":
        S = dist.allreduce_sum(X.T @ X) / n_total
        x = _spd_solve(S + diag_shift * jnp.eye(S.shape[0]), rhs)
    elif solver == "cg":
        def matvec(v):
            return dist.allreduce_sum((X @ v) @ X) / n_total + diag_shift * v
        x, iters = _cg(matvec, rhs, cg_tol, cg_maxiter)
    else:
        raise ValueError(f"not a concrete solver: {solver!r}")
    # Residual of the regularized normal equations, as a check on the solve (one more matvec).
    Xx = X @ x
    r = dist.allreduce_sum(Xx @ X) / n_total + diag_shift * x - rhs
    return x, SRInfo(iters, _relative(jnp.sum(r * r), jnp.sum(rhs * rhs)),
                     _metric_norm(Xx, n_total, False))


def _metric_norm(Xd: jax.Array, n_total: int, all_rows: bool) -> jax.Array:
    """d^T S d = |X d|^2 / N_tot from the products X d: of all ranks' rows (`all_rows`, as the
    kernel solver distributed by parameter blocks has them) or of this rank's own rows."""
    square = jnp.sum(Xd * Xd)
    return (square if all_rows else dist.allreduce_sum(square)) / n_total


def _relative(r2: jax.Array, b2: jax.Array) -> jax.Array:
    return jnp.sqrt(r2) / jnp.maximum(jnp.sqrt(b2), 1e-300)


def columns_by_rank(logpsi: Callable, params, s: jax.Array, n_total: int, chunk: int,
                    phi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """This rank's block of columns of the centred X, with the rows of *all* ranks' samples:
    (K * 2 * n_local, ceil(P / K)), rows ordered (rank, Re/Im, sample), columns zero-padded at
    the end; and the uncentred product of this rank's own rows with phi (2, n_local).

    The Jacobian is built `chunk` samples at a time and each chunk's rows are sent to the ranks
    that own their columns at once (an all-to-all per chunk), so this rank never holds all P
    columns of its own rows: the peak for X is its block (2 N_tot P / K numbers) plus one chunk.
    Centring is local: every rank has all samples of its columns."""
    K = dist.size()
    flat, jac = _jacobian_of_chunk(logpsi, params)
    P, n = flat.size, s.shape[0]
    Pb = -(-P // K)
    c = rows_per_chunk(n, chunk)

    def body(i, carry):
        buf, total, prod = carry
        J = jac(flat, jax.lax.dynamic_slice_in_dim(s, i * c, c))  # (2, c, P)
        prod = jax.lax.dynamic_update_slice(prod, J @ phi, (0, i * c))
        J = jnp.pad(J, ((0, 0), (0, 0), (0, K * Pb - P))).reshape(2, c, K, Pb)
        got = dist.alltoall(J.transpose(2, 0, 1, 3))  # (K, 2, c, Pb): every rank's chunk i
        return (jax.lax.dynamic_update_slice(buf, got, (0, 0, i * c, 0)),
                total + got.sum(axis=(0, 2), keepdims=True), prod)

    buf, total, prod = jax.lax.fori_loop(
        0, n // c, body, (jnp.zeros((K, 2, n, Pb), flat.dtype),
                          jnp.zeros((1, 2, 1, Pb), flat.dtype), jnp.zeros((2, n), flat.dtype)))
    # Re and Im rows centred apart, over all ranks' samples (every rank has all of its columns).
    return _subtract_in_place(buf, total / n_total, 2, c).reshape(K * 2 * n, Pb), prod


def _kernel_rhs(e: jax.Array, Xphi: jax.Array, n_total: int,
                momentum: jax.Array | float) -> jax.Array:
    """zeta = e - mu X phi over all ranks' rows (rank-major, the row order of the kernel), from
    this rank's e and the uncentred product of its own Jacobian rows with phi (2, n): centring
    X phi is subtracting its mean (linear in X), so no pass over the centred X is needed."""
    Xphi = Xphi - dist.allreduce_sum(Xphi.sum(1, keepdims=True)) / n_total
    return dist.allgather(e - momentum * Xphi.reshape(-1)).reshape(-1)


def _kernel_matrix(X: jax.Array, n_total: int, blocks: bool) -> jax.Array:
    """T = X X^T / N_tot over all ranks' rows, inside jit: from this rank's column block
    (`blocks`, summed over ranks), from its rows on one rank, or from its rows against all
    gathered rows (kernel_gather on K ranks). X is the Gram's copy of X (float32 with
    optimizer.gram_dtype=float32: accumulated in float32, returned in float64)."""
    if blocks:
        return dist.allreduce_sum(gram_blocks(X)) / n_total
    if dist.size() == 1:
        return gram_blocks(X) / n_total
    Xg = dist.allgather(X).reshape(-1, X.shape[1])
    return dist.allgather(_product(X, Xg)).reshape(Xg.shape[0], Xg.shape[0]) / n_total


def _kernel_system(T: jax.Array, zeta: jax.Array, diag_shift: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """y = (T + lambda I)^{-1} zeta and the relative residual |(T + lambda I) y - zeta| / |zeta|."""
    A = T + diag_shift * jnp.eye(T.shape[0])
    y = _spd_solve(A, zeta)
    r = A @ y - zeta
    return y, _relative(jnp.sum(r * r), jnp.sum(zeta * zeta))


def _kernel_update(X: jax.Array, y: jax.Array, n_total: int, phi: jax.Array,
                   momentum: jax.Array | float, blocks: bool) -> jax.Array:
    """The direction X^T y / N_tot + mu phi: from this rank's column block (`blocks`, its block
    of the direction, all-gathered) or from its own rows (the ranks' partial products summed)."""
    if blocks:
        x_r = y @ X / n_total + momentum * _block_of(phi, X.shape[1])
        return dist.allgather(x_r).reshape(-1)[:phi.size]
    mine = jax.lax.dynamic_slice_in_dim(y, dist.rank() * X.shape[0], X.shape[0])
    return dist.allreduce_sum(mine @ X) / n_total + momentum * phi


def _block_of(v: jax.Array, Pb: int) -> jax.Array:
    """This rank's block of Pb entries of a parameter vector (zero-padded to K Pb)."""
    return jax.lax.dynamic_slice_in_dim(jnp.pad(v, (0, dist.size() * Pb - v.size)),
                                        dist.rank() * Pb, Pb)


def host_solve_used(solver: str) -> bool:
    """Whether `direction` solves the kernel system on the host (`host_kernel_solve`): on CPU,
    for the kernel solvers."""
    return jax.default_backend() == "cpu" and _is_kernel(solver)


def host_gram_used(solver: str, gram_build: str) -> bool:
    """Whether the host builds the kernel X X^T by BLAS (`host_kernel_matrix`): asked for
    (optimizer.gram_build=blas), on CPU, where the Gram is of this rank's X (the kernel solver
    on any number of ranks, kernel_gather on one; on K ranks it multiplies gathered rows)."""
    return gram_build == "blas" and host_solve_used(solver) and (
        solver == "kernel" or dist.size() == 1)


def _is_kernel(solver: str) -> bool:
    return solver in ("kernel", "kernel_gather")


class Rows(NamedTuple):
    """The first stage's output: X (this rank's rows, or its column block of all ranks' rows),
    e, and for the kernel solvers the right-hand side zeta and either the kernel T = X X^T /
    N_tot over all ranks' rows, built inside jit, or, where the host builds it by BLAS, the
    float32 copy of X that it reads (optimizer.gram_dtype=float32; float64: X itself). Fields
    that do not apply are None."""

    X: jax.Array
    e: jax.Array
    zeta: jax.Array | None
    X_gram: jax.Array | None
    T: jax.Array | None

    @property
    def gram(self) -> jax.Array:
        """The matrix whose X X^T the host builds."""
        return self.X if self.X_gram is None else self.X_gram


@partial(jax.jit, static_argnames=("logpsi", "n_total", "solver", "chunk", "gram_dtype",
                                   "gram_build"))
def rows(logpsi: Callable, params, s: jax.Array, eloc: jax.Array, n_total: int,
         phase_scale: jax.Array, solver: str, chunk: int, previous,
         momentum: jax.Array | float, gram_dtype: str = "float64",
         gram_build: str = "blas") -> Rows:
    """The first stage of `direction`: X (this rank's rows; for the kernel solver on K ranks its
    column block of all ranks' rows, `columns_by_rank`), e, and for the kernel solvers the
    right-hand side zeta (X phi accumulated while the Jacobian is built) and the kernel T, or
    the float32 copy of the centred X that the host's BLAS reads (one conversion after the
    centring loop: written inside the loop as a second carry, XLA copied it every iteration)."""
    e = _rows(eloc, n_total, phase_scale)
    phi = ravel_pytree(previous)[0] if _is_kernel(solver) else None
    blocks = solver == "kernel" and dist.size() > 1
    if blocks:
        X, Xphi = columns_by_rank(logpsi, params, s, n_total, chunk, phi)
    else:
        J, total, Xphi = _jacobian_and_sum(logpsi, params, s, chunk, phi)
        X = centred_jacobian(J, total, n_total, chunk)
    if phi is None:
        return Rows(X, e, None, None, None)
    zeta = _kernel_rhs(e, Xphi, n_total, momentum)
    X32 = X.astype(jnp.float32) if gram_dtype == "float32" else None
    if host_gram_used(solver, gram_build):
        return Rows(X, e, zeta, X32, None)
    return Rows(X, e, zeta, None, _kernel_matrix(X if X32 is None else X32, n_total, blocks))


@partial(jax.jit, static_argnames=("n_total", "solver", "cg_maxiter"))
def solve_rows(r: Rows, solved: tuple[jax.Array, jax.Array] | None, n_total: int,
               diag_shift: jax.Array, solver: str, cg_tol: float, cg_maxiter: int, previous,
               momentum: jax.Array | float):
    """The second stage of `direction`: the direction as a parameter pytree (the structure of
    `previous`) and the solve diagnostics, from the first stage's rows, for the kernel solvers
    with the kernel system's solution and its residual if the host solved it (`solved`; None:
    here, from r.T)."""
    phi, unravel = ravel_pytree(previous)
    X = r.X
    if not _is_kernel(solver):
        x, info = solve(X, r.e, n_total, diag_shift, solver, cg_tol, cg_maxiter, phi, momentum)
        return unravel(x), info
    blocks = solver == "kernel" and dist.size() > 1
    y, residual = solved or _kernel_system(r.T, r.zeta, diag_shift)
    x = _kernel_update(X, y, n_total, phi, momentum, blocks)
    Xd = dist.allreduce_sum(X @ _block_of(x, X.shape[1])) if blocks else X @ x
    return unravel(x), SRInfo(jnp.zeros((), jnp.int32), residual, _metric_norm(Xd, n_total, blocks))


def direction(logpsi: Callable, params, s: jax.Array, eloc: jax.Array, n_total: int,
              diag_shift: jax.Array, phase_scale: jax.Array, solver: str, chunk: int,
              cg_tol: float, cg_maxiter: int, previous, momentum: jax.Array | float,
              gram_dtype: str = "float64", gram_build: str = "blas"):
    """The SR direction as a parameter pytree (`previous`: the last one, for momentum), with
    solve diagnostics. Two jitted stages (`rows`, `solve_rows`); X stays in one buffer between
    them, and on CPU the kernel system is solved there by LAPACK (`host_kernel_solve`). The
    kernel solvers pass over X three times after building it: centring, X X^T, X^T y (with
    gram_dtype=float32 a fourth makes the float32 copy that X X^T reads)."""
    r = rows(logpsi, params, s, eloc, n_total, phase_scale, solver, chunk, previous, momentum,
             gram_dtype, gram_build)
    solved = None
    if host_solve_used(solver):
        solved = host_kernel_solve(host_kernel_matrix(r, n_total), r.zeta, float(diag_shift))
        r = r._replace(X_gram=None, T=None)  # freed before the second stage
    return solve_rows(r, solved, n_total, diag_shift, solver, cg_tol, cg_maxiter, previous,
                      momentum)


class SRState(NamedTuple):
    """What the preconditioner carries from step to step (and checkpoints hold)."""

    optax_state: Any  # the optimizer's state (its step count drives the learning-rate schedule)
    previous: Any  # the last SR direction, a parameter pytree (SPRING momentum)


def geometric_schedule(start: float, end: float, n_iter: int) -> optax.Schedule:
    """start * (end / start) ** (step / n_iter), constant at `end` after n_iter."""
    return optax.exponential_decay(start, max(n_iter, 1), end / start, end_value=end)


@partial(jax.jit, static_argnums=0)
def _init_state(optimizer: optax.GradientTransformation, params) -> SRState:
    """The optimizer's initial state and a zero previous direction, as one compiled program."""
    return SRState(optimizer.init(params), jax.tree_util.tree_map(jnp.zeros_like, params))


class Preconditioner:
    """SR as an optimizer: the solver, the schedules (optax) of learning rate, diagonal shift and
    phase scale, and the momentum state. `update` maps (parameters, samples, local energies) to
    new parameters; every rank computes the identical update."""

    def __init__(self, o: OptimizerConfig, n_iter: int, n_params: int, n_total: int,
                 chunk: int = 0) -> None:
        self.config, self.n_total, self.chunk = o, n_total, chunk
        self.solver, self.reason = choose_solver(o.solver, n_params, n_total, dist.size())
        self.n_params = n_params
        self.set_horizon(n_iter)

    def set_horizon(self, n_iter: int) -> None:
        """The schedules (learning rate, diagonal shift, phase scale) end at step `n_iter`. The
        optimizer state (a step count) does not depend on it, so a run may move its horizon."""
        o = self.config
        self.lr = optax.warmup_cosine_decay_schedule(o.lr / 10, o.lr, o.warmup,
                                                     max(n_iter, o.warmup + 1), o.lr_final)
        self.diag_shift = geometric_schedule(o.diag_shift, o.diag_shift_final, n_iter)
        self.phase_scale = geometric_schedule(o.phase_scale, o.phase_scale_final, n_iter)
        self.optimizer = optax.sgd(self.lr)
        # compiled once per horizon: run eagerly, the schedules and the update are some forty
        # small executables to compile or load at the start of every job
        self._schedules = jax.jit(lambda step: (self.lr(step), self.diag_shift(step),
                                                self.phase_scale(step)))
        self._apply = jax.jit(self._apply_direction)

    def _apply_direction(self, params, d, optax_state, lr_scale: jax.Array):
        """The optimizer's step along the SR direction d scaled by lr_scale."""
        scaled = jax.tree_util.tree_map(lambda g: g * lr_scale, d)
        updates, optax_state = self.optimizer.update(scaled, optax_state, params)
        return optax.apply_updates(params, updates), optax_state

    def init(self, params) -> SRState:
        return _init_state(self.optimizer, params)

    def update(self, logpsi: Callable, params, s: jax.Array, eloc: jax.Array, state: SRState,
               step: int, lr_scale: float) -> tuple[Any, SRState, dict[str, float]]:
        """One SR update at `step`; the learning rate is scaled by `lr_scale` (rollbacks), and
        shortened further where the step would be longer than optimizer.max_step in the
        Fubini-Study metric (lr sqrt(d^T S d), the distance the state moves as the samples see
        it): a trust region against the single large step that throws a run off (J2 = 0.8 on 4x4
        went from E/N = -0.578 to NaN in 9 steps without it)."""
        o = self.config
        lr, shift, kappa = (float(x) for x in self._schedules(step))
        d, info = direction(logpsi, params, s, eloc, self.n_total, jnp.asarray(shift),
                            jnp.asarray(kappa), self.solver, self.chunk, o.cg_tol, o.cg_maxiter,
                            state.previous, jnp.asarray(o.momentum), str(o.gram_dtype),
                            str(o.gram_build))
        lr *= lr_scale
        length = lr * math.sqrt(float(info.metric_norm))  # NaN on a blown-up step: no cap
        if o.max_step > 0 and length > o.max_step:  # trust region: shorten, keep the direction
            lr_scale *= o.max_step / length
            lr, length = lr * o.max_step / length, o.max_step
        params, optax_state = self._apply(params, d, state.optax_state, jnp.asarray(lr_scale))
        cg_iters = int(info.cg_iterations)
        return params, SRState(optax_state, d), {
            "lr": lr, "step_length": length, "diag_shift": shift, "phase_scale": kappa,
            "cg_iterations": cg_iters, "sr_residual": float(info.residual),
            "bytes_comm": bytes_per_step(self.solver, self.n_params, self.n_total, cg_iters,
                                         dist.size()) if dist.size() > 1 else 0}
