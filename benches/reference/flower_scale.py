"""Flower's simulation engine on the task of `examples/scale`.

N virtual MNIST clients (equal shares, each client's digit mix drawn from
a Dirichlet(alpha), as fedcore's `dirichlet_label_split`), K sampled
per round, FedAvg, local SGD (lr 0.05, batch 8, one epoch) of the compact
CNN of fedcore's `SmallCnn::compact` in PyTorch (Opacus' MNIST network,
26,010 parameters), no evaluation on the clients. Flower's Ray backend,
one CPU per client actor. Prints each round's time and the final test
accuracy; `rss_tree.py` measures the memory of the whole process tree
(Ray starts several processes).

    python flower_scale.py --data ../shared/data/mnist --clients 10000 \
        --per-round 100 --rounds 20

Needs `flwr[simulation]` and `torch` (a reference for docs/benchmarks.md;
nothing in fedcore imports it).
"""

import argparse
import gzip
import json
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import flwr
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

ARGS = None


def parse():
    """The settings: from the command line in the driver, from the
    environment in Ray's worker processes (the driver exports them)."""
    if os.environ.get("FLOWER_SCALE"):
        return argparse.Namespace(**json.loads(os.environ["FLOWER_SCALE"]))
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/mnist")
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    return p.parse_args()


def idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data, split):
    prefix = "train" if split == "train" else "t10k"
    find = lambda stem: next(
        os.path.join(data, f) for f in os.listdir(data) if f.startswith(f"{prefix}-{stem}")
    )
    x = idx(find("images")).astype(np.float32) / 255.0
    x = (x - 0.1307) / 0.3081
    return x[:, None, :, :], idx(find("labels")).astype(np.int64)


def dirichlet(labels, clients, alpha, seed):
    """fedcore's dirichlet_label_split: equal shares (60,000 / clients
    images), client c's digits drawn from q_c ~ Dirichlet(alpha), an
    exhausted digit left out of later draws (same scheme, numpy's RNG)."""
    rng = np.random.default_rng(seed)
    per = len(labels) // clients
    pools = [list(rng.permutation(np.flatnonzero(labels == d))) for d in range(10)]
    shares = []
    for _ in range(clients):
        q = rng.dirichlet(np.full(10, alpha))
        items = []
        for _ in range(per):
            w = np.array([q[k] if pools[k] else 0.0 for k in range(10)])
            if not w.sum() > 0:
                w = np.array([1.0 if pools[k] else 0.0 for k in range(10)])
            k = rng.choice(10, p=w / w.sum())
            items.append(pools[k].pop())
        shares.append(sorted(items))
    return shares


class Net(nn.Module):
    """fedcore's SmallCnn::compact."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2, 1)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2, 1)
        x = torch.tanh(self.fc1(x.flatten(1)))
        return self.fc2(x)


def get(net):
    return [v.detach().cpu().numpy() for v in net.state_dict().values()]


def put(net, values):
    net.load_state_dict({k: torch.tensor(v) for k, v in zip(net.state_dict(), values)})


def data():
    """The images and the split, once per process. Flower pickles the
    client app by value (this script is `__main__`), so a module-level
    cache would arrive empty with every task and each fit would load and
    split MNIST again: the cache lives on the `builtins` module instead,
    which every process has once."""
    import builtins

    cached = getattr(builtins, "_flower_scale_data", None)
    if cached is None:
        a = ARGS or parse()
        x, y = load(a.data, "train")
        cached = {"x": x, "y": y, "shares": dirichlet(y, a.clients, a.alpha, a.seed)}
        builtins._flower_scale_data = cached
    return cached


class MnistClient(NumPyClient):
    def __init__(self, cid):
        self.cid = cid
        self.net = Net()

    def fit(self, parameters, config):
        torch.set_num_threads(1)
        d = data()
        share = np.asarray(d["shares"][self.cid])
        x, y = torch.from_numpy(d["x"][share]), torch.from_numpy(d["y"][share])
        put(self.net, parameters)
        opt = torch.optim.SGD(self.net.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(int(config.get("round", 0)) * 100003 + self.cid)
        order = torch.randperm(len(share), generator=g)
        for i in range(0, len(share), 8):
            b = order[i:i + 8]
            opt.zero_grad()
            F.cross_entropy(self.net(x[b]), y[b]).backward()
            opt.step()
        return get(self.net), len(share), {}


def client_fn(context: Context):
    return MnistClient(int(context.node_config["partition-id"])).to_client()


ROUND_TIMES = []


def server_fn(context: Context):
    a = ARGS or parse()
    x, y = load(a.data, "test")
    test_x, test_y = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(a.seed)
    start = {"t": time.time()}

    def evaluate(rnd, values, cfg):
        now = time.time()
        if rnd > 0:
            ROUND_TIMES.append(now - start["t"])
        acc = float("nan")
        if rnd == a.rounds:
            net = Net()
            put(net, values)
            with torch.no_grad():
                acc = (net(test_x).argmax(1) == test_y).float().mean().item()
        print(f"round {rnd:>3}: {ROUND_TIMES[-1] if rnd else 0:.2f} s, test accuracy {acc * 100:.2f} %",
              flush=True)
        start["t"] = time.time()
        return 0.0, {"accuracy": acc}

    strategy = FedAvg(
        fraction_fit=a.per_round / a.clients,
        min_fit_clients=a.per_round,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
        min_available_clients=a.clients,
        initial_parameters=ndarrays_to_parameters(get(Net())),
        evaluate_fn=evaluate,
        on_fit_config_fn=lambda rnd: {"round": rnd},
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=a.rounds))


def main():
    global ARGS
    ARGS = parse()
    os.environ["FLOWER_SCALE"] = json.dumps(vars(ARGS))
    t = time.time()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=ARGS.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": ARGS.workers, "include_dashboard": False},
        },
    )
    total = time.time() - t
    print(f"flwr {flwr.__version__}, torch {torch.__version__}: {ARGS.clients} clients, "
          f"{ARGS.per_round} per round, {ARGS.rounds} rounds in {total:.1f} s", flush=True)


if __name__ == "__main__":
    main()
