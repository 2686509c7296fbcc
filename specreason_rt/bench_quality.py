"""How close a quantized model stays to its fp32 source, measured the same way for ours and the peers.

Terms (used in the JSON, BENCHMARKS.md and the manifest's validation.quality):

- reference trajectory: for each of the QUALITY_PROMPTS (chat template applied), the fp32 reference model's
  `new_tokens` greedy tokens.
- greedy agreement: the prompt + reference trajectory is fed to a model (teacher forcing); the share of the
  trajectory's positions where that model's argmax is the reference token. 1.0 = the same greedy text.
- identical prefix: per prompt, the trajectory tokens before the first disagreement, i.e. how long the model's
  own greedy text stays identical to the reference's (up to the first difference, teacher forcing and free
  running are the same computation); reported as the mean over prompts.
- perplexity: exp of the mean negative log-likelihood of PERPLEXITY_TEXT's tokens (each given the ones before,
  no chat template). Its ratio to the fp32 reference's perplexity is what quantization costs.

These are not timings: they are valid on any machine, loaded or not.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .manifest import MANIFEST_NAME, load_manifest
from .tokenizer import Tokenizer

QUALITY_PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "List three tips for staying focused while studying.",
    "What is 17 times 23? Show your steps.",
    "Summarize the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "Give me a recipe for a simple tomato soup.",
    "What are the main differences between a cat and a dog as pets?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Why do leaves change color in autumn?",
    "Write a Python function that reverses a string.",
    "What causes the seasons on Earth?",
    "Describe the water cycle for a ten-year-old.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a prime number is, with examples.",
    "Who was Marie Curie and what is she known for?",
    "How can I improve my sleep?",
    "What is the difference between weather and climate?",
    "Tell me a fun fact about octopuses.",
    "How do airplanes stay in the air?",
    "Write a polite email declining a meeting invitation.",
    "If a train travels 60 km in 45 minutes, what is its average speed in km/h?",
    "What is photosynthesis?",
)

# Written for this project (no external source), plain expository English of the kind small chat models see.
PERPLEXITY_TEXT = (
    "The town library opens at nine in the morning, but on most days a small group of readers is already waiting "
    "on the steps. Some come for the newspapers, which arrive early and are read in a quiet room at the back. "
    "Others bring laptops and stay until lunch, working at the long wooden tables under the windows. Children "
    "arrive in the afternoon, after school, and the reading corner fills with picture books and questions.\n\n"
    "The building itself is more than a hundred years old. It was paid for by a local merchant who believed that "
    "everyone in the town should be able to borrow books for free. Over the years the roof was replaced twice, "
    "the heating was modernised, and a ramp was added at the entrance so that people in wheelchairs could come in "
    "without help. The shelves, however, are the original ones, and the librarians say they are still the best "
    "shelves in the region.\n\n"
    "Running a library today means much more than lending books. The staff teach older residents how to use "
    "email and video calls, help students find reliable sources for their homework, and organise talks on "
    "gardening, local history and personal finance. In winter, when the evenings are long, the library hosts a "
    "weekly film night, and the small hall is usually full.\n\n"
    "Funding is a constant concern. The town council pays for the building and the salaries, but new books, "
    "computers and events depend on donations and on a yearly book sale. During the sale, volunteers sort "
    "thousands of donated books by subject, and the prices are kept low so that nobody leaves empty-handed. "
    "The money raised is small, but it keeps the collection fresh, and many visitors say the sale is the best "
    "day of the year."
)


def quality_inputs(*, tokenizer: Tokenizer) -> tuple[list[list[int]], list[int]]:
    """The prompts' token ids (chat template applied) and the perplexity text's ids."""
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in QUALITY_PROMPTS]
    return prompts, tokenizer.encode(PERPLEXITY_TEXT, add_special_tokens=False)


def agreement(*, argmax: Sequence[int], start: int, trajectory: Sequence[int]) -> tuple[int, int]:
    """(agreeing positions, identical prefix) of a teacher-forced pass over prompt + trajectory.

    argmax[i] is the model's choice for token i + 1; the trajectory starts at token `start` (= prompt length),
    so argmax[start - 1 + j] is compared with trajectory[j].
    """
    chosen = argmax[start - 1:start - 1 + len(trajectory)]
    same = [int(a == t) for a, t in zip(chosen, trajectory, strict=True)]
    prefix = same.index(0) if 0 in same else len(same)
    return sum(same), prefix


def perplexity(logprob: Sequence[float]) -> float:
    return math.exp(-statistics.fmean(logprob))


def summarise_quality(*, trajectories: list[list[int]], prompts: list[list[int]],
                      scores: list[dict[str, Any]], text_logprob: Sequence[float],
                      reference_perplexity: float) -> dict[str, Any]:
    """One model's quality figures from its score answers on every prompt + trajectory and on the text."""
    agree = total = 0
    prefixes = []
    for prompt, trajectory, score in zip(prompts, trajectories, scores, strict=True):
        a, prefix = agreement(argmax=score["argmax"], start=len(prompt), trajectory=trajectory)
        agree, total = agree + a, total + len(trajectory)
        prefixes.append(prefix)
    ppl = perplexity(text_logprob)
    return {"greedy_agreement": round(agree / total, 4), "positions": total, "prompts": len(prompts),
            "identical_prefix_mean": round(statistics.fmean(prefixes), 2),
            "prompts_fully_identical": sum(p == len(t) for p, t in zip(prefixes, trajectories, strict=True)),
            "perplexity": round(ppl, 4), "perplexity_over_reference": round(ppl / reference_perplexity, 4)}


def record_quality(*, bundle: str | Path, role: str, quality: dict[str, Any]) -> None:
    """Write quality into the bundle's manifest at models[role].validation.quality (a free-form dict the
    runtime does not read), atomically: a temporary file renamed over manifest.json."""
    load_manifest(bundle)  # refuse a broken bundle before touching it
    path = Path(bundle) / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["models"][role]["validation"]["quality"] = quality
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
