"""Makes fedcore/tests/fixtures/densenet_tiny*.safetensors, once, with torchvision.

The Rust test `densenet_matches_torchvision` loads these files and must
reproduce the logits to 1e-5 with no Python at test time. Rerun only when the
fixture must change:

    python -m venv /tmp/fixvenv
    /tmp/fixvenv/bin/pip install torch==2.13.0 torchvision==0.28.0 safetensors
    /tmp/fixvenv/bin/python scripts/make_densenet_fixture.py
"""

import pathlib

import torch
import torchvision
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "fedcore/tests/fixtures"

torch.manual_seed(20261121)
# torchvision's own DenseNet class, tiny: growth 4, two blocks of two layers,
# 8 initial features, bottleneck 2x, 3 outputs. Same code path as densenet121.
model = torchvision.models.DenseNet(
    growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3
)
# Give every BatchNorm non-trivial affine parameters and running statistics,
# so that a wrong use of any of them changes the logits.
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
        if isinstance(m, torch.nn.Linear):
            m.bias.uniform_(-0.5, 0.5)

x = torch.randn(2, 3, 20, 20)
# The state dict as it is now: the training-mode forward below updates the
# running statistics.
state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
model.eval()
with torch.no_grad():
    logits_eval = model(x)
# Training mode: BatchNorm uses the batch statistics.
model.train()
with torch.no_grad():
    logits_train = model(x)

OUT.mkdir(parents=True, exist_ok=True)
save_file(state, OUT / "densenet_tiny.safetensors")
save_file({"input": x, "logits_eval": logits_eval, "logits_train": logits_train},
          OUT / "densenet_tiny_io.safetensors")
print("torch", torch.__version__, "torchvision", torchvision.__version__)
print("eval logits", logits_eval)
print("train logits", logits_train)
