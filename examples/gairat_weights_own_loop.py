"""GAIRAT's weights in your own loop: weigh each adversarial loss by how hard the sample was to attack.

    python examples/gairat_weights_own_loop.py                # scikit-learn's 8x8 digits (bundled)
    python examples/gairat_weights_own_loop.py --cifar DIR    # a cifar-10-batches-py folder (first 1,000 images)

The PGD kernel counts, per sample, how many of its K iterates were still classified correctly
(kappa): samples near the decision boundary have a small kappa and get a large weight. This is
what ``iaat.GAIRAT`` does inside; here the loss is your own.
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import iaat

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cifar", metavar="DIR", help="CIFAR-10 folder (default: the digits)")
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--burn-in", type=int, default=2, help="epochs of plain PGD-AT before the weights start")
args = parser.parse_args()
torch.manual_seed(0)

ds = iaat.data.load_dataset("cifar10" if args.cifar else "digits", args.cifar, download=False)
n = 1000 if args.cifar else len(ds.train)
loader = DataLoader(TensorDataset(ds.train.x[:n].float() / 255, ds.train.y[:n]), batch_size=64, shuffle=True)
eps, steps = (8 / 255 if args.cifar else 32 / 255), 5
net = nn.Sequential(nn.Conv2d(ds.train.x.shape[1], 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, ds.num_classes))
model = iaat.NormalizedModel(net, ds.mean, ds.std)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

for epoch in range(args.epochs):
    model.train()
    for x, y in loader:
        adv = iaat.pgd(model, x, y, eps, steps=steps, step_size=eps / 4, final_check=False)  # eval mode inside
        losses = F.cross_entropy(model(adv.x_adv), y, reduction="none")
        if epoch >= args.burn_in:  # weights normalised to mean 1 in the batch
            losses = losses * iaat.gair_weights(adv.kappa, steps, lam=-1.0)
        loss = losses.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1}: last loss {loss.item():.3f}, mean kappa {adv.kappa.float().mean():.2f} of {steps}")

x_test, y_test = ds.test.x[:300].float() / 255, ds.test.y[:300]
result = iaat.evaluate(model, x_test, y_test, attacks=["pgd:steps=20"], eps=eps)
print(f"test: clean {result['clean']:.3f}, PGD-20 at {iaat.format_size(eps)}: {result['worst_case']['accuracy']:.3f}")
