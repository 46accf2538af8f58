"""How close a task is to what the model already knows: a linear probe on frozen features.

The pretrained encoder, untouched, turns a few hundred texts into features (the mean of
its last hidden states over each text's tokens); a logistic regression on them (full
batch, L-BFGS, L2) is trained on some rows and scored on others. Its accuracy, against
the majority baseline, says how much of the task the pretrained features already solve
(Peters, Ruder and Smith 2019, "To tune or not to tune?": how well frozen features do
tells whether to adapt the encoder or only a head on it). Runs anywhere torch does, in
seconds for a small encoder on a CPU; ``tune_jobs.probe`` decides what to do with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def frozen_features(
    path: str,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
    trust_remote_code: bool = False,
) -> torch.Tensor:
    """``[len(texts), hidden]`` features: the frozen encoder's last hidden states, averaged
    over each text's tokens (padding excluded)."""
    from transformers import AutoModel

    from trainers.model import build_tokenizer

    tokenizer = build_tokenizer(path, trust_remote_code)
    model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).float()


#: the L2 strengths the probe chooses from, by cross-validation on its fitting rows
L2_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)


def linear_probe(
    train_x: torch.Tensor,
    train_y: Sequence[int],
    test_x: torch.Tensor,
    test_y: Sequence[int],
    folds: int = 3,
) -> tuple[float, float]:
    """Balanced accuracy on ``test`` of a logistic regression fit on ``train``, and the L2
    strength used: the one of ``L2_GRID`` with the best ``folds``-fold cross-validated score on
    the training rows (a few hundred rows and hundreds of features: unregularized, it
    fits noise; measured, the right strength moved a sentiment probe from 0.63 to 0.73)."""
    y = list(train_y)
    n = len(y)
    scores = {}
    for l2 in L2_GRID:
        hits = 0
        for k in range(folds):
            held = set(range(k, n, folds))
            fit = [i for i in range(n) if i not in held]
            out = sorted(held)
            hits += _fit_and_score(
                train_x[fit], [y[i] for i in fit], train_x[out], [y[i] for i in out], l2
            ) * len(out)
        scores[l2] = hits / n
    best = max(L2_GRID, key=lambda l2: (scores[l2], l2))  # ties: the stronger prior
    return _fit_and_score(train_x, y, test_x, list(test_y), best), best


def _fit_and_score(
    train_x: torch.Tensor,
    train_y: list[int],
    test_x: torch.Tensor,
    test_y: list[int],
    l2: float,
    steps: int = 100,
) -> float:
    """Standardize with the training rows, fit by full-batch L-BFGS, score on test
    (balanced accuracy)."""
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    x, tx = (train_x - mean) / std, (test_x - mean) / std
    y = torch.tensor(train_y)
    classes = int(max(max(train_y), max(test_y))) + 1
    layer = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        predicted = layer(tx).argmax(-1)
    return balanced_accuracy(predicted.tolist(), test_y)


def balanced_accuracy(predicted: Sequence[int], labels: Sequence[int]) -> float:
    """The mean over classes of the share of each class's rows predicted right: chance is
    1 / classes whatever the class balance (a probe on a 93%-majority task scores no
    better than guessing by predicting the majority)."""
    recalls = []
    for c in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == c]
        recalls.append(sum(predicted[i] == c for i in rows) / len(rows))
    return sum(recalls) / len(recalls)


def encoder_blocks(path: str, trust_remote_code: bool = False) -> int:
    """The model's transformer blocks, from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise ValueError(f"{path}: no block count in its config")
