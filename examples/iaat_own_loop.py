"""IAAT in your own training loop: your model, a plain DataLoader, a radius per training sample.

    python examples/iaat_own_loop.py                # scikit-learn's 8x8 digits (bundled, no download)
    python examples/iaat_own_loop.py --cifar DIR    # a cifar-10-batches-py folder (first 1,000 images)
"""
import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import iaat

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cifar", metavar="DIR", help="CIFAR-10 folder (default: the digits)")
parser.add_argument("--epochs", type=int, default=6)
args = parser.parse_args()
torch.manual_seed(0)

# Any data as float images in [0, 1]; here through iaat's loader, which reads both sets offline.
ds = iaat.data.load_dataset("cifar10" if args.cifar else "digits", args.cifar, download=False)
n = 1000 if args.cifar else len(ds.train)
train = TensorDataset(ds.train.x[:n].float() / 255, ds.train.y[:n])
x_test, y_test = ds.test.x[:300].float() / 255, ds.test.y[:300]
eps = 8 / 255 if args.cifar else 32 / 255  # [0, 1] units; the digits have only 17 grey levels

# Your own network; the normalisation goes inside, so attacks work on [0, 1] pixels.
channels = train[0][0].shape[0]
net = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, ds.num_classes))
model = iaat.NormalizedModel(net, ds.mean, ds.std)

# IAAT keeps one radius per training sample: the loader must say which samples a batch holds.
method = iaat.IAAT(num_train=len(train), epochs=args.epochs, eps=eps, step_size=eps / 4, steps=5,
                   gamma=eps / 4, warmup_epochs=2)
loader = DataLoader(iaat.IndexedDataset(train), batch_size=64, shuffle=True)  # yields (x, y, index)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

for epoch in range(args.epochs):
    method.start_epoch(epoch)
    model.train()
    for x, y, index in loader:
        loss = method.loss(model, x, y, index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    radius = method.end_epoch()["radius_mean"]
    print(f"epoch {epoch + 1}: last loss {loss.item():.3f}, mean radius {iaat.format_size(radius)}")

torch.save({"model": model.state_dict(), "iaat": method.state_dict()}, "iaat_own_loop.pt")  # radii included
result = iaat.evaluate(model, x_test, y_test, attacks=["pgd:steps=20"], eps=eps)
print(f"test: clean {result['clean']:.3f}, PGD-20 at {iaat.format_size(eps)}: {result['worst_case']['accuracy']:.3f}")
