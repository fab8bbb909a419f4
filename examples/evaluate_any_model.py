"""Attack and evaluate any model: a classifier trained elsewhere, wrapped so that it takes [0, 1] images.

    python examples/evaluate_any_model.py                # a small CNN trained here on scikit-learn's digits
    python examples/evaluate_any_model.py --cifar DIR    # ... on the first 1,000 images of a CIFAR-10 folder

Only images classified correctly when clean are attacked; a sample is robust only if no iterate of
any restart of any attack fooled the model; the sanity checks say when numbers should not be trusted.
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

import iaat

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cifar", metavar="DIR", help="CIFAR-10 folder (default: the digits)")
args = parser.parse_args()
torch.manual_seed(0)
ds = iaat.data.load_dataset("cifar10" if args.cifar else "digits", args.cifar, download=False)
n = 1000 if args.cifar else len(ds.train)
x, y = ds.train.x[:n].float() / 255, ds.train.y[:n]

# "Any model": here a plain CNN, trained without any attack by a few lines of ordinary PyTorch.
net = nn.Sequential(nn.Conv2d(x.shape[1], 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(64, ds.num_classes))
model = iaat.NormalizedModel(net, ds.mean, ds.std)  # normalisation inside: inputs are [0, 1] images
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(8):  # epochs
    for idx in torch.randperm(n).split(64):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
model.eval()

x_test, y_test = ds.test.x[:300].float() / 255, ds.test.y[:300]
eps = 4 / 255 if args.cifar else 16 / 255
x_adv = iaat.PGD(model, eps=eps, steps=20, step_size=eps / 4)(x_test, y_test)  # one attack, by hand
with torch.no_grad():
    print(f"clean {(model(x_test).argmax(1) == y_test).float().mean():.3f}, "
          f"PGD-20 at {iaat.format_size(eps)} {(model(x_adv).argmax(1) == y_test).float().mean():.3f}")

result = iaat.evaluate(model, x_test, y_test, eps=[eps, 2 * eps], eps_sweep=[0, eps / 2, eps, 2 * eps],
                       attacks=["pgd:steps=50,restarts=2", "cw", "mifgsm", "deepfool"], steps_sweep=[1, 10, 50])
for label, entry in result["attacks"].items():
    print(f"  {label:<24} {entry['accuracy']:.3f}")
print(f"  worst case at {iaat.format_size(eps)}: {result['worst_case']['accuracy']:.3f}; sanity checks "
      f"{'FAILED: ' + '; '.join(result['suspicious_reasons']) if result['suspicious'] else 'passed'}")
with open("evaluation.json", "w") as f:
    json.dump(result, f, indent=2)  # plain numbers, sizes in [0, 1] units
