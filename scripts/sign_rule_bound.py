"""The sign-rule bound on small lattices: the lowest energy per site of any state with exactly the
Marshall signs (`exact.sign_rule_bound`), against the exact ground state, for each J2. A network
whose phases stay at zero (`/history/minority_sign` = 0) cannot go below it.

usage: python scripts/sign_rule_bound.py [--size 4] [--j2 0,0.3,0.45,0.5,0.55,0.6,0.8]
"""
from __future__ import annotations

import argparse

import numpy as np

from pipeline import exact
from pipeline.hamiltonian import Hamiltonian
from pipeline.lattice import Lattice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4)
    ap.add_argument("--j2", default="0,0.3,0.45,0.5,0.55,0.6,0.8")
    args = ap.parse_args()
    print(f"{args.size}x{args.size}, Sz = 0, energies per site in S.S units")
    print("| J2 | exact E/N | sign-rule bound E/N | relative error of the bound "
          "| ground-state weight off the sign rule | amplitudes zero at the bound |")
    print("|---|---|---|---|---|---|")
    for j2 in (float(x) for x in args.j2.split(",")):
        ham = Hamiltonian.build(Lattice(args.size, 2), 1.0, j2, True)
        h, _ = exact.sparse_hamiltonian(ham)
        e0, v = exact.lowest_state(h, ham.n_sites)
        bound, x = exact.sign_rule_bound(h, v, ham.n_sites)
        off = exact.off_sign_rule_weight(v)
        zeros = float(np.mean(x < 1e-12))
        print(f"| {j2:g} | {e0:.8f} | {bound:.8f} | {abs((bound - e0) / e0):.2e} | {off:.2e} "
              f"| {zeros:.3f} |", flush=True)


if __name__ == "__main__":
    main()
