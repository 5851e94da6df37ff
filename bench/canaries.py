"""Pick canary facts: CounterFact records whose true answer the base model already predicts.

    python -m bench.canaries --data ../shared/data/counterfact/train.json --n 16 \
        --out workers/editing/data/canaries.json

Records come from the end of the file (the tests and benchmarks edit records from its start),
one per subject, and only those whose ground truth is the model's top-1 next token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workers.editing.health import Canary, canaries_correct
from workers.editing.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = json.loads(args.data.read_text())[::-1]
    lm = load_model()
    picked: list[Canary] = []
    seen: set[str] = set()
    for start in range(0, len(records), 128):
        chunk = [r for r in records[start : start + 128] if r["subject"] not in seen]
        candidates = [
            Canary(r["prompt"].replace("{}", r["subject"]), r["ground_truth"]) for r in chunk
        ]
        for rec, canary, ok in zip(
            chunk, candidates, canaries_correct(lm.model, lm.tokenizer, candidates), strict=True
        ):
            if ok and rec["subject"] not in seen:
                seen.add(rec["subject"])
                picked.append(canary)
        if len(picked) >= args.n:
            break
    items = [{"prompt": c.prompt, "answer": c.answer} for c in picked[: args.n]]
    args.out.write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(items)} canaries written to {args.out}")


if __name__ == "__main__":
    main()
