"""Named evaluation protocols and sweep defaults (no torch import: the CLI's --help reads them)."""

from __future__ import annotations

#: Named attack sets. Attacks without their own eps run at the evaluation's radius.
PROTOCOLS: dict[str, list[str]] = {
    # Table 1 of the IAAT paper: PGD-10 x5, PGD-100 x5, PGD-1000 x2 (plus transfer and corruptions when given).
    "paper": ["pgd:steps=10,restarts=5", "pgd:steps=100,restarts=5", "pgd:steps=1000,restarts=2"],
    "quick": ["pgd:steps=20", "cw"],
}
PROTOCOLS["full"] = PROTOCOLS["paper"] + ["cw", "mifgsm", "deepfool", "pgd:steps=100,targeted=true",
                                          "autoattack:version=standard"]
PROTOCOL_HELP = {
    "paper": "PGD-10 x5, PGD-100 x5, PGD-1000 x2 (IAAT Table 1), eps sweep 0-16/255 (L2: 0-2x eps), steps sweep "
             "1-1000",
    "quick": "PGD-20 and CW-40",
    "full": "paper + CW-40, MI-FGSM, DeepFool, targeted PGD-100, AutoAttack standard",
}
DEFAULT_EPS_SWEEP = tuple(i / 255 for i in range(0, 17, 2))
#: The default PGD step's rule: 2 = 2.5 * eps / steps up to 10 steps and eps / 4 beyond (1: 2.5 * eps / steps at any
#: length). Part of a sweep's evaluation key, so that results of the old rule are not reused as the new one's.
STEP_RULE = 2
DEFAULT_STEPS_SWEEP = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
