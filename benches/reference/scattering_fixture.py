"""Reference scattering coefficients from Kymatio for fedcore's test.

fedcore::models::Scattering follows Kymatio's Scattering2D (filters and
algorithm); fedcore/tests/fixtures/scattering_kymatio.json holds what
Kymatio 0.3.0 (numpy backend) computes on small deterministic images, and
`the_scattering_transform_equals_kymatio` in fedcore/tests/models.rs checks
against it. Regenerate with

    python3 -m venv /tmp/kym && /tmp/kym/bin/pip install kymatio==0.3.0 numpy 'scipy<1.15'
    /tmp/kym/bin/python benches/reference/scattering_fixture.py > fedcore/tests/fixtures/scattering_kymatio.json
"""
import json

import numpy as np
import kymatio
from kymatio.numpy import Scattering2D


def image(c, h, w):
    # Exact in float32 and easy to rebuild in Rust: ((3 i + 5 k + 7 ch) mod 11) / 11.
    i, k = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([((3 * i + 5 * k + 7 * ch) % 11) / 11.0 for ch in range(c)]).astype(np.float32)


cases = []
for (c, h, w), J, L in [((1, 28, 28), 2, 8), ((1, 20, 24), 3, 4), ((2, 9, 10), 1, 8)]:
    x = image(c, h, w)
    s = Scattering2D(J=J, shape=(h, w), L=L, max_order=2)(x)  # [C, K, h', w']
    cases.append({
        "shape": [c, h, w], "J": J, "L": L,
        "out_shape": [int(s.shape[0] * s.shape[1]), int(s.shape[2]), int(s.shape[3])],
        "values": [float(f"{v:.8g}") for v in s.reshape(-1)],
    })
print(json.dumps({"kymatio": kymatio.__version__, "cases": cases}))
