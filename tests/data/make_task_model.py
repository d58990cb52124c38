"""Fine-tune a small 3UTRBERT sequence classifier on real labelled 3'UTR windows, for the tests.

    .venv/bin/python tests/data/make_task_model.py        # about a minute on 2 CPU cores, seeded

The data are the 3,276 labelled 100-nt windows of the 3UTRBERT fine-tuning example shipped in
`calibration/data/utrbert_dev_100nt.tsv` (binary labels). A seeded 80/20 split trains a 3-layer, 128-wide
`UtrBertForSequencePrediction` (k=3, from scratch: no pre-trained weights can be downloaded here) with
multimolecule itself, and writes `utrbert-3mer-dev-classifier/` beside this script: `config.json` and
`model.safetensors` as `save_pretrained` writes them, and `metrics.json` with the held-out rows and AUROC.
Its weights are trained, so precision losses measured on it mean more than on random weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).parent / "utrbert-3mer-dev-classifier"
SEED, HELD_OUT, EPOCHS, BATCH, LR = 0, 0.2, 4, 32, 5e-4
SIZE = dict(nmers=3, hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512)


def labelled_windows() -> tuple[list[str], np.ndarray]:
    """The shipped windows and their 0/1 labels, in file order."""
    import csv

    from utr_calibration import DATA

    with open(DATA / "utrbert_dev_100nt.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [row["sequence"] for row in rows], np.array([int(row["label"]) for row in rows])


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices, from SEED."""
    order = np.random.default_rng(SEED).permutation(n)
    cut = int(round(n * HELD_OUT))
    return np.sort(order[cut:]), np.sort(order[:cut])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels)))


def main() -> None:
    import multimolecule as mm

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    sequences, labels = labelled_windows()
    train, held_out = split(len(sequences))
    tokenizer = mm.RnaTokenizer(nmers=SIZE["nmers"])
    config = mm.UtrBertConfig(**SIZE, problem_type="binary", num_labels=1, id2label={0: "negative", 1: "positive"})
    model = mm.UtrBertForSequencePrediction(config)
    encoded = tokenizer([sequences[i] for i in range(len(sequences))], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        for batch in order.split(BATCH):
            out = model(encoded["input_ids"][batch], attention_mask=encoded["attention_mask"][batch], labels=torch.from_numpy(labels[batch]).float()[:, None])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        score = evaluate(model, encoded, labels, held_out)
        print(f"epoch {epoch + 1}: loss {out.loss.item():.3f}, held-out AUROC {score:.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    OUT.mkdir(exist_ok=True)
    model.save_pretrained(OUT)
    metrics = {
        "data": "calibration/data/utrbert_dev_100nt.tsv (3UTRBERT example dev windows, MIT)",
        "model": {**SIZE, "class": "UtrBertForSequencePrediction", "problem_type": "binary"},
        "training": {"seed": SEED, "epochs": EPOCHS, "batch": BATCH, "lr": LR, "train_rows": len(train), "seconds": round(time.perf_counter() - start)},
        "held_out_rows": held_out.tolist(),
        "held_out_auroc_pytorch": round(evaluate(model, encoded, labels, held_out), 6),
    }
    (OUT / "metrics.json").write_text(json.dumps(metrics) + "\n")
    print(f"written to {OUT}: held-out AUROC {metrics['held_out_auroc_pytorch']:.4f}")


def evaluate(model, encoded, labels: np.ndarray, rows: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(encoded["input_ids"][rows], attention_mask=encoded["attention_mask"][rows]).logits[:, 0]
    return auroc(logits.numpy(), labels[rows])


if __name__ == "__main__":
    main()
