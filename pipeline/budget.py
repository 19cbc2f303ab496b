"""Memory a run needs per rank, estimated from the config alone (nothing is built or allocated),
so that a run that cannot fit is refused in a second with one line instead of failing after
minutes of allocation.

The estimate counts the large float64 arrays a step holds at once (`per_rank`): the SR terms (the
Jacobian X or the S matrix, the kernel, one chunk of Jacobian rows: `sr_bytes`, which
`scripts/bench_memory` checks against measured resident memory), the activations of one batch of
local-energy evaluations, and the runtime's base. It is a lower bound of the peak, so it refuses
only runs that surely do not fit.
"""
from __future__ import annotations

import os

from .config import Attention, Config, Solver, Symmetry
from .errors import ConfigError

BASE_BYTES = 0.8e9  # Python, JAX runtime, MPI and compiled code: RSS of the smallest runs here
GRAM_BLOCKS_MAX_BYTES = 2 ** 30  # above this size of X the Gram block copies cost more than they save
DENSE_MAX_PARAMS = 4096
KERNEL_MAX_ROWS = 8192
FORWARD_BYTES = 2 ** 28  # accelerators: activations of one forward chunk under model.chunk_size=0
MIN_CHUNK = 256  # accelerators: the smallest automatic forward chunk
# CPU: chunks whose working set stays in cache. Measured on the 2-core machine (docs/benchmarks.md):
# forward passes of 16384 configurations ran 2.6-3.5x slower per configuration than of 64-256, and
# Jacobians of 1024 samples at once 2x slower than 16-32 samples at a time; local energies and
# sampler sweeps were fastest with about 3 MiB of activations per chunk (256 configurations on
# 6x6, 512 on 4x4 at d = 32), smaller chunks lose to the loop's overhead.
CACHE_FORWARD_BYTES = 3 * 2 ** 20  # activations of one forward chunk
MAX_CPU_CHUNK = 512  # 1024 was slower again on 4x4 (local energies 0.265 against 0.214 s)
CACHE_JACOBIAN_BYTES = 2 ** 23  # Jacobian rows (2P float64 each) and activations of one chunk
MIN_CPU_CHUNK = 32


def choose_solver(solver: Solver | str, n_params: int, n_total: int,
                  n_ranks: int = 1) -> tuple[str, str]:
    """The concrete solver and why: 'auto' takes dense for small P, the kernel form when
    parameters outnumber the 2 N_tot rows of X (and its 2N_tot x 2N_tot system is small enough),
    CG otherwise. On K > 1 ranks the kernel form is distributed by parameter blocks."""
    if solver != Solver.auto:
        return str(solver), f"optimizer.solver={solver}"
    rows = 2 * n_total
    if n_params <= min(DENSE_MAX_PARAMS, rows):
        return "dense", f"auto: P={n_params} <= min({DENSE_MAX_PARAMS}, 2 N_tot={rows})"
    if n_params > rows and rows <= KERNEL_MAX_ROWS:
        where = (f", X split by parameter blocks over {n_ranks} ranks ({n_params // n_ranks} "
                 "columns each)" if n_ranks > 1 else "")
        return "kernel", f"auto: P={n_params} > 2 N_tot={rows} <= {KERNEL_MAX_ROWS}{where}"
    return "cg", f"auto: P={n_params}, 2 N_tot={rows}: neither dense nor kernel fits"


def n_patches(c: Config) -> int:
    """Patch tokens n of the ViT: (L / b)^2."""
    return (c.lattice.L // c.lattice.patch) ** 2


def n_params(c: Config) -> int:
    """The ViT's parameter count (as `models.n_params` of its initialized parameters)."""
    m, b = c.model, c.lattice.patch
    n, d = n_patches(c), m.d
    if m.attention == Attention.factored:
        attention = 2 * d * d + m.heads * (n if m.translation_invariant else n * n)
    else:
        attention = 4 * d * d + m.heads * n
    layer = 8 * d * d + 9 * d + attention  # 2 LayerNorms, attention, d -> 4d -> d MLP
    return b * b * d + d + m.layers * layer + 2 * d + 2 * (d * d + d)


def group_size(c: Config) -> int:
    """Images per configuration under the symmetry projection (models.symmetry.group)."""
    b = c.lattice.patch
    return {Symmetry.none: 1, Symmetry.translations: b * b, Symmetry.full: 16 * b * b}[
        c.model.symmetry]


def per_config_bytes(c: Config, backward: bool = False) -> float:
    """Activation bytes of one configuration's pass (all its symmetry images): the n x 4d MLP
    hidden layer, and the heads x n x n attention maps of standard attention. A per-sample
    gradient (`backward`, a Jacobian row) holds them for every layer, and also the gradient of
    factored attention's gathered alpha_ij before it is summed onto alpha(r)."""
    n, m = n_patches(c), c.model
    maps = backward or m.attention == Attention.standard
    per = (n * 4 * m.d + (m.heads * n * n if maps else 0)) * (m.layers if backward else 1)
    return 8.0 * per * group_size(c)


def _power_of_two(fit: float, least: int) -> int:
    """The largest power of two not above `fit`, at least `least`."""
    return max(least, 1 << max(int(fit), 1).bit_length() - 1)


def forward_chunk(c: Config, platform: str) -> int:
    """Configurations per forward pass (sampler sweeps, local energies, measurements):
    model.chunk_size, or for 0 the largest power of two whose activations fit in cache on CPU
    (CACHE_FORWARD_BYTES, from MIN_CPU_CHUNK to MAX_CPU_CHUNK) or in FORWARD_BYTES on an
    accelerator (at least MIN_CHUNK), where large batches keep it busy."""
    if c.model.chunk_size:
        return c.model.chunk_size
    if platform == "cpu":
        fit = min(CACHE_FORWARD_BYTES / per_config_bytes(c), MAX_CPU_CHUNK)
        return _power_of_two(fit, MIN_CPU_CHUNK)
    return _power_of_two(FORWARD_BYTES / per_config_bytes(c), MIN_CHUNK)


def jacobian_chunk(c: Config, platform: str) -> int:
    """Samples per Jacobian chunk: model.chunk_size, or for 0 on CPU the largest power of two
    whose Jacobian rows and backward activations fit CACHE_JACOBIAN_BYTES, on an accelerator 0
    (all of a rank's samples at once)."""
    if c.model.chunk_size:
        return c.model.chunk_size
    if platform != "cpu":
        return 0
    per_sample = 16.0 * n_params(c) + per_config_bytes(c, backward=True)
    return _power_of_two(CACHE_JACOBIAN_BYTES / per_sample, 1)


def rows_per_chunk(n: int, chunk: int) -> int:
    """The largest divisor of n not above `chunk` (0: all n at once), so n rows split evenly."""
    k = chunk if chunk > 0 else n
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def sr_bytes(P: int, n_total: int, K: int, path: str, chunk: int,
             platform: str = "cpu", gram_dtype: str = "float64",
             gram_build: str = "blas") -> dict[str, float]:
    """Bytes per rank (float64) that the SR solve holds at its peak, by term.
    Kernel forms: X: 'kernel' holds its column block of all rows, 2 N_tot ceil(P/K) (one rank:
    all of X, built and centred in place); 'kernel_gather' holds its own rows and all gathered
    rows, 2 N_tot P (1 + 1/K) on K > 1 ranks; where XLA builds the Gram (off CPU, or
    gram_build xla) and that block is at most GRAM_BLOCKS_MAX_BYTES, the symmetric Gram build
    copies it once more (BLAS reads it in place); chunk: the Jacobian rows of one chunk with their
    activations and re-sharded copy, 4 chunk P; kernel: T, T + lambda I and its Cholesky factor,
    3 (2 N_tot)^2. With gram_dtype float32 the Gram reads a float32 copy of what it multiplies
    (half its float64 size; off CPU the block copies are of that copy). 'dense': S, its shifted
    copy and factor, 3 P^2, plus the local rows of X; 'cg': the local rows of X and their
    products."""
    m, local = 2 * n_total, 2 * n_total // K
    if path == "dense":
        return {"X": 8.0 * local * P, "S": 8.0 * 3 * P * P}
    if path == "cg":
        return {"X": 8.0 * 2 * local * P}
    if K == 1:
        x = gram = m * P
    elif path == "kernel":
        x = gram = m * -(-P // K)
    else:
        x, gram = m * P * (1 + 1 / K), m * P / K  # the gather path builds row blocks, no Gram
    if gram_dtype == "float32":  # the float32 copy of this rank's X (gather: of its own rows,
        gram /= 2  # which are gathered in float32 instead of float64)
        x += gram - (m * P / 2 if K > 1 and path != "kernel" else 0)
    blocks = (platform != "cpu" or gram_build == "xla") and 8 * gram <= GRAM_BLOCKS_MAX_BYTES
    x += gram if blocks and (K == 1 or path == "kernel") else 0
    return {"X": 8.0 * x, "chunk": 8.0 * 4 * chunk * P, "kernel": 8.0 * 3 * m * m}


def per_rank(c: Config, K: int, platform: str = "cpu") -> dict[str, float]:
    """Estimated peak bytes per rank by term, and their 'total' (with the runtime's base). The
    CPU chunks are the smaller ones, so where the platform is not known (a SLURM submission) the
    default keeps the estimate a lower bound."""
    P, N = n_params(c), c.sampler.n_samples
    solver, _ = choose_solver(c.optimizer.solver, P, N, K)
    # chunk 0: X is built in one piece; a chunk beyond this rank's samples is one piece too
    jac = jacobian_chunk(c, platform)
    rows = min(jac or N // K, N // K)
    o = c.optimizer
    terms = sr_bytes(P, N, K, solver, rows if jac else 0, platform, str(o.gram_dtype),
                     str(o.gram_build))
    terms["jacobian_activations"] = rows * per_config_bytes(c, backward=True)
    # every layer's position-only heads x n x n weights (factored alpha_ij, standard attention's
    # relative bias), gathered once per pass whatever the chunk
    m = c.model
    terms["attention_weights"] = 8.0 * m.layers * m.heads * n_patches(c) ** 2
    # the largest forward batch: one chunk of a sampler sweep over this rank's chains or of the
    # local energies of a step's or the final measurement's samples (about half of the 2N (4N
    # with J2) bonds anti-aligned)
    connected = (max(N, c.sampler.n_samples_final) // K) * c.lattice.L ** 2
    batch = min(max(connected, c.sampler.n_chains // K), forward_chunk(c, platform))
    terms["activations"] = batch * per_config_bytes(c)
    return terms | {"total": sum(terms.values()) + BASE_BYTES}


def check(c: Config, K: int, available: float, where: str, platform: str = "cpu") -> None:
    """ConfigError (one line) when the estimate exceeds `available` bytes per rank."""
    need = per_rank(c, K, platform)
    if need["total"] > available:
        big = max((k for k in need if k != "total"), key=need.__getitem__)
        raise ConfigError(
            f"the run needs at least {need['total'] / 1e9:.3g} GB per rank ({big}: "
            f"{need[big] / 1e9:.3g} GB; P = {n_params(c)}, sampler.n_samples = "
            f"{c.sampler.n_samples}, lattice.L = {c.lattice.L}, model.d = {c.model.d}, "
            f"model.chunk_size = {c.model.chunk_size}) but {where} has {available / 1e9:.3g} GB: "
            "use smaller values, a chunk size, or more ranks")


def machine_bytes(ranks_here: int) -> tuple[float, str]:
    """(bytes one rank may use on this machine, a description): the accelerator's memory when
    JAX has one, else the physical memory shared by the ranks on this node."""
    import jax

    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{dev.device_kind} memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / max(ranks_here, 1), f"this machine's memory / {ranks_here} rank(s) on it"


def slurm_bytes(c: Config) -> tuple[float, str]:
    """(bytes per rank, description) from launcher.mem_gb (per node) and tasks per node."""
    la = c.launcher
    return la.mem_gb * 1e9 / la.tasks_per_node, (
        f"launcher.mem_gb={la.mem_gb} / {la.tasks_per_node} task(s) per node")


