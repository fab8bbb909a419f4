"""Your own training method: write prepare(), and iaat's trainer runs it (checkpoints, resume, EMA, AWP, eval).

    python examples/own_method.py                # scikit-learn's 8x8 digits (bundled, no download)
    python examples/own_method.py --cifar DIR    # a cifar-10-batches-py folder (first 1,000 images)
    iaat train --method own_method:MixedAT --set method.clean_weight=0.3 ...   # with examples/ as the folder

A method is a dataclass: its fields are its config keys (--set method.KEY=VALUE), and prepare() attacks
the batch with the shared PGD kernel and returns the loss as a function of the weights (AWP calls it at
perturbed weights too). Used as module:Class, the module must import from the folder you run in or the path.
"""
import argparse
from dataclasses import dataclass

import torch.nn.functional as F

import iaat
from iaat.cli import main
from iaat.methods import StepOutput


@dataclass(eq=False, kw_only=True)
class MixedAT(iaat.Method):
    """Goodfellow et al. (2015): clean_weight * CE(f(x), y) + (1 - clean_weight) * CE(f(x_adv), y).

    Args:
        clean_weight: the clean loss's share (0.5).
    """

    name = "mixed_at"
    clean_weight: float = 0.5

    def prepare(self, model, x, y, index):
        x_adv = self.attack_batch(model, x, y, final_check=False).x_adv  # eps, steps, ... from the config

        def objective(net):
            logits = net(x_adv)
            clean = F.cross_entropy(net(x), y)
            return StepOutput(self.clean_weight * clean + (1 - self.clean_weight) * F.cross_entropy(logits, y), logits)
        return objective


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", metavar="DIR", help="CIFAR-10 folder (default: the digits)")
    parser.add_argument("--out", default="runs/own_method", help="the run folder to create (default %(default)s)")
    args = parser.parse_args()
    data = (["--dataset", "cifar10", "--data-dir", args.cifar, "--train-subset", "1000", "--eps", "8"] if args.cifar
            else ["--dataset", "digits", "--eps", "32", "--set", "attack.step_size=8"])
    code = main(["train", "--method", "own_method:MixedAT", "--set", "method.clean_weight=0.3", "--model", "small_cnn",
                 "--epochs", "4", "--set", "attack.steps=5", "--no-progress", "--set", "data.val_size=200",
                 "--out", args.out, *data])
    if code == 0:
        print(f"trained {args.out}: evaluate it with iaat eval {args.out}, load it with iaat.load_model")
    raise SystemExit(code)
