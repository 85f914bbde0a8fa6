"""Patient-level splits: train / val / test, or k folds, stratified and deterministic from a seed.

A patient's studies never end up in two splits (what leaks between splits when one patient has
several studies). Used by the ``dataset`` stage and by k-fold training in ``train_classifier``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from medpipe.errors import StageError


def split_patients(
    strata: dict[str, int], *, val: float, test: float, seed: int, stratify: bool = True,
    folds: int | None = None, fold: int = 0,
) -> dict[str, list[str]]:
    """Assign patients to ``train`` / ``val`` / ``test``; deterministic from ``seed``.

    ``strata``: patient -> stratum (e.g. class). Patients are put in a random order in which every
    stratum is spread evenly (each stratum's shuffled members at evenly spaced, randomly offset
    positions), so any leading block holds the strata in proportion. The first
    ``round(test * n)`` patients form the test split, the next ``round(val * n)`` the validation
    split (each at least one when its fraction is above 0), the rest train. With ``folds`` = k the
    non-test patients, in the same order, are dealt into k folds and fold ``fold`` is validation.
    """
    rng = np.random.default_rng([seed, 0x5B117])
    patients = sorted(strata)
    n = len(patients)
    groups: dict[int, list[str]] = defaultdict(list)
    for p in patients:
        groups[strata[p] if stratify else 0].append(p)
    position: dict[str, float] = {}
    for g in sorted(groups):
        members = [groups[g][i] for i in rng.permutation(len(groups[g]))]
        offset = float(rng.random())
        for j, p in enumerate(members):
            position[p] = (j + offset) / len(members)
    order = sorted(patients, key=lambda p: (position[p], strata[p] if stratify else 0, p))

    def count(fraction: float) -> int:
        return max(1, round(fraction * n)) if fraction > 0 else 0

    n_test = count(test)
    rest = order[n_test:]
    if folds is not None:
        if len(rest) < folds:
            raise StageError(f"{len(rest)} patients outside the test split cannot form {folds} folds")
        fold_of = {p: j % folds for j, p in enumerate(rest)}
        split = {"train": [p for p in rest if fold_of[p] != fold], "val": [p for p in rest if fold_of[p] == fold]}
    else:
        n_val = count(val)
        split = {"train": rest[n_val:], "val": rest[:n_val]}
    if not split["train"]:
        raise StageError(f"{n} patient(s) are too few for val={val}, test={test}"
                         + (f", {folds} folds" if folds else "") + ": no patient is left for training")
    split["test"] = order[:n_test]
    return {k: sorted(split[k]) for k in ("train", "val", "test")}
