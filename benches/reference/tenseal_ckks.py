# TenSEAL reference for docs/benchmarks.md (CKKS section), same parameters as
# fedcore-he's default. Not part of any build or test:
#   python3 -m venv /tmp/ts && /tmp/ts/bin/pip install tenseal==0.3.18
#   /tmp/ts/bin/python benches/reference/tenseal_ckks.py
import time, statistics, tenseal as ts, random
ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
ctx.global_scale = 2**40
ctx.generate_galois_keys()
random.seed(0)
def med(f, n=200):
    t = []
    for _ in range(n):
        s = time.perf_counter(); f(); t.append(time.perf_counter() - s)
    return statistics.median(t) * 1e3
v = [random.uniform(-1, 1) for _ in range(4096)]
a = ts.ckks_vector(ctx, v); b = ts.ckks_vector(ctx, v)
print("encrypt 4096 (ms)", med(lambda: ts.ckks_vector(ctx, v), 50))
print("add 4096 (ms)", med(lambda: a + b))
print("mul plain vector 4096 incl. encoding (ms)", med(lambda: a * v))
print("mul plain scalar (ms)", med(lambda: a * 0.25))
print("decrypt 4096 (ms)", med(lambda: a.decrypt(), 50))
head = [random.uniform(-1, 1) for _ in range(14350)]
h = ts.ckks_vector(ctx, head)
print("head ciphertexts serialized (bytes, default)", len(h.serialize()))
ctx2 = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
ctx2.global_scale = 2**40
h2 = ts.ckks_vector(ctx2, head)
print("head, context without galois keys (bytes)", len(h2.serialize()))
print("weighted sum 3 clients head (ms)", med(lambda: h2 * 0.2 + h2 * 0.3 + h2 * 0.5, 20))
