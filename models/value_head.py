"""The built-in verifier's value head: the seed's confidence MLP on the verifier's final hidden state.

    value = sigmoid(W2 gelu(W1 h + b1) + b2)    h: the verifier's hidden state after its final norm, at the
                                                last token of a candidate step (models/candidates.py)

A value near 1 says the verifier believes the step is correct. The verifier stays frozen: its hidden states
are computed once per example and only the MLP (nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, 1),
nn.Sigmoid()) is trained, with binary cross-entropy on correct (1) vs wrong (0) candidates from the training
stream: synthetic corruptions and real speculator samples. specreason-export puts the head inside the
verifier's ONNX graph (output `value`).

File format: safetensors with the Sequential's tensors (`net.0.weight` [hidden, d_model], `net.0.bias`,
`net.2.weight` [1, hidden], `net.2.bias`) and metadata {"format": FORMAT, "d_model", "hidden", "report": JSON
of the recipe and the held-out measurements}, so one file carries what the bundle manifest records.

Usage: python -m specreason_models.value_head --out models/builtin/verifier [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import builtin_path
from .candidates import Example, make_examples, speculator_examples
from .task import heldout_split, train_stream

FORMAT = "specreason-value-head"
FILE_NAME = "value_head.safetensors"
REPORT_NAME = "value_head.json"
COMMAND = "python -m specreason_models.value_head --out models/builtin/verifier --seed 0"
# The v2 speculator gets about 1% of its sampled steps wrong at temperature 0.7 (9 of 1000 held-out samples),
# 1.5% at 1.0, 3.5% at 1.5 and 11% at 2.0 (400 held-out problems): too few negatives to learn or measure a
# head at the usual temperatures. Sampling at 2.0 gives it the mistakes a head must learn to flag.
SAMPLE_TEMPERATURE = 2.0


class ValueHead(nn.Module):
    def __init__(self, *, d_model: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, 1), nn.Sigmoid())

    @property
    def d_model(self) -> int:
        return self.net[0].in_features

    @property
    def hidden(self) -> int:
        return self.net[0].out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)  # h: [..., d_model] -> [...] in [0, 1]

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        # Training uses the pre-sigmoid value with BCE-with-logits, which is stable where sigmoid saturates.
        return self.net[:-1](h).squeeze(-1)


def save_value_head(*, head: ValueHead, path: Path, report: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "d_model": str(head.d_model), "hidden": str(head.hidden), "report": json.dumps(report)}
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path), metadata=meta)


def load_value_head(path: str | Path) -> tuple[ValueHead, dict[str, Any]]:
    """The head and its report; ValueError with the reason when the file is not a value head."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for unreadable files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a value head (metadata format {meta.get('format')!r}, expected {FORMAT!r}); "
                         "train one with python -m specreason_models.value_head")
    head = ValueHead(d_model=int(meta["d_model"]), hidden=int(meta["hidden"]))
    try:
        head.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not match the recorded sizes ({str(e).splitlines()[0]})") from e
    return head.eval(), json.loads(meta.get("report", "{}"))


@torch.no_grad()
def features(*, verifier: Any, examples: list[Example], batch: int = 256) -> torch.Tensor:
    """The verifier's final-norm hidden state at each candidate's last token: [examples, d_model]."""
    verifier.eval()
    rows = []
    for start in range(0, len(examples), batch):
        seqs = [e.context + e.candidate for e in examples[start:start + batch]]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)  # [rows, width], right-padded
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        hidden = verifier.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [rows, width, d_model]
        last = torch.tensor([len(s) - 1 for s in seqs])
        rows.append(hidden[torch.arange(len(seqs)), last])
    return torch.cat(rows)


def train_head(*, x: torch.Tensor, y: torch.Tensor, seed: int, hidden: int, epochs: int, lr: float = 3e-3,
               batch: int = 256) -> ValueHead:
    """Minibatch AdamW on frozen features x [n, d_model] with labels y [n] in {0, 1}."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = ValueHead(d_model=x.shape[1], hidden=hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            loss = loss_fn(head.logit(x[idx]), y[idx].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def roc_auc(*, scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties count 1/2."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], np.sort(scores[~labels])
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("ROC-AUC needs both positive and negative examples")
    below = np.searchsorted(neg, pos, side="left")  # [positives]: negatives scored strictly lower
    tied = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * tied).sum() / (len(pos) * len(neg)))


def measure(*, scores: np.ndarray, labels: np.ndarray, kinds: list[str] | None = None) -> dict[str, Any]:
    """accuracy at threshold 0.5, ROC-AUC, counts; per kind the share judged as labelled."""
    labels = np.asarray(labels)
    correct = (np.asarray(scores) >= 0.5) == labels.astype(bool)
    out: dict[str, Any] = {"n": len(labels), "positives": int(labels.sum()), "accuracy": float(correct.mean()),
                           "auc": roc_auc(scores=scores, labels=labels)}
    if kinds is not None:
        out["accuracy_by_kind"] = {k: float(correct[[i for i, kk in enumerate(kinds) if kk == k]].mean())
                                   for k in sorted(set(kinds))}
    return out


def main(argv: list[str] | None = None) -> None:
    from transformers import LlamaForCausalLM

    from .evaluate import load

    parser = argparse.ArgumentParser(prog="python -m specreason_models.value_head",
                                     description="Train the built-in verifier's value head (CPU, seeded).")
    parser.add_argument("--out", required=True, type=Path, help=f"folder for {FILE_NAME} and {REPORT_NAME}")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data stream, the corruptions and the head")
    parser.add_argument("--synthetic", type=int, default=16000, help="training candidates: correct / corrupted")
    parser.add_argument("--sampled", type=int, default=16000, help="training candidates sampled from the speculator")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out problems per measurement")
    parser.add_argument("--hidden", type=int, default=64, help="the head's hidden width")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--temperature", type=float, default=SAMPLE_TEMPERATURE,
                        help="the speculator's sampling temperature for the sampled candidates (training and held-out)"
                             f"; default {SAMPLE_TEMPERATURE}, hot enough that the v2 speculator gets steps wrong")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    verifier = LlamaForCausalLM.from_pretrained(builtin_path("verifier"), dtype=torch.float32).eval()
    speculator, tok = load(builtin_path("speculator"))
    rng = np.random.default_rng([args.seed, 7])  # 7: this recipe's own stream, apart from the pair's training

    # 1. Training candidates from the training stream (never the held-out split).
    stream = train_stream(seed=args.seed + 1000)  # problems the pair's seed-0 training did not start with
    train = make_examples(tok=tok, problems=[next(stream) for _ in range(args.synthetic)], rng=rng)
    train += speculator_examples(speculator=speculator, tok=tok, problems=[next(stream) for _ in range(args.sampled)],
                                 rng=rng, temperature=args.temperature)
    # 2. Frozen verifier features, then the head.
    x = features(verifier=verifier, examples=train)
    y = torch.tensor([e.label for e in train])
    head = train_head(x=x, y=y, seed=args.seed, hidden=args.hidden, epochs=args.epochs)
    train_seconds = time.perf_counter() - start

    # 3. Held-out measurements: synthetic corruptions, and the speculator's own samples (same temperature).
    heldout = heldout_split(n=args.heldout)
    eval_rng = np.random.default_rng([args.seed, 8])
    report: dict[str, Any] = {
        "recipe": {"command": " ".join([COMMAND.split(" --")[0], *(argv if argv is not None else sys.argv[1:])]),
                   "seed": args.seed, "synthetic": args.synthetic, "sampled": args.sampled,
                   "train_positives": int(y.sum()), "hidden": args.hidden, "epochs": args.epochs,
                   "optimizer": "AdamW lr 3e-3, wd 0.01, batch 256", "speculator_temperature": args.temperature,
                   "threads": args.threads, "train_seconds": round(train_seconds, 1)},
        "verifier": "models/builtin/verifier/model.safetensors",
    }
    with torch.no_grad():
        for name, examples in (
            ("heldout_synthetic", make_examples(tok=tok, problems=heldout, rng=eval_rng)),
            ("heldout_speculator", speculator_examples(speculator=speculator, tok=tok, problems=heldout,
                                                       rng=eval_rng, temperature=args.temperature)),
        ):
            scores = head(features(verifier=verifier, examples=examples)).numpy()
            report[name] = measure(scores=scores, labels=np.array([e.label for e in examples]),
                                   kinds=[e.kind for e in examples])
            print(name, json.dumps(report[name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_value_head(head=head, path=args.out / FILE_NAME, report=report)
    (args.out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out / FILE_NAME} after {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
