"""Reference epsilons for fedcore-dp's PLD accountant, from Google's
dp_accounting (PyPI `dp-accounting`).

    python -m venv /tmp/dpa && /tmp/dpa/bin/pip install dp-accounting
    /tmp/dpa/bin/python benches/reference/pld_reference.py > fedcore-dp/tests/data/pld_reference.json

For each (sigma, q, steps) on the grid, the Poisson-sampled Gaussian with
noise multiplier sigma and sampling rate q composed `steps` times:
epsilon at delta = 1e-5 from dp_accounting's PLDAccountant (its defaults:
value discretization 1e-4, pessimistic estimate, both adjacencies) and from
its RDPAccountant (default orders), for comparison.
"""
import json
import sys

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

DELTA = 1e-5
# DP-SGD's range: small sampling rates over many steps; the full batch
# (q = 1) only for one step (composed, it leaves any useful epsilon). The
# last two: Abadi et al.'s MNIST point and Opacus' MNIST example (batch 256
# of 60,000, 60 epochs).
GRID = (
    [
        (sigma, q, steps)
        for sigma in (0.8, 1.0, 2.0)
        for q in (0.01, 0.1)
        for steps in (1, 100, 1000)
    ]
    + [(sigma, 1.0, 1) for sigma in (0.8, 1.0, 2.0)]
    + [(4.0, 0.01, 10_000), (1.1, 256 / 60_000, 60 * 234)]
)


def event(sigma, q, steps):
    e = dp_event.GaussianDpEvent(sigma)
    if q < 1.0:
        e = dp_event.PoissonSampledDpEvent(q, e)
    return dp_event.SelfComposedDpEvent(e, steps)


rows = []
for sigma, q, steps in GRID:
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(event(sigma, q, steps))
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event(sigma, q, steps))
    rows.append(
        {
            "sigma": sigma,
            "q": q,
            "steps": steps,
            "delta": DELTA,
            "pld_epsilon": pld.get_epsilon(DELTA),
            "rdp_epsilon": rdp.get_epsilon(DELTA),
        }
    )
    print(rows[-1], file=sys.stderr)

json.dump(
    {"source": "dp_accounting (PyPI dp-accounting), benches/reference/pld_reference.py", "rows": rows},
    sys.stdout,
    indent=1,
)
print()
