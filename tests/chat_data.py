"""The offline chat data recipes/tiny_chat.yaml trains on: two-turn arithmetic
conversations in two formats (messages and ShareGPT), so a mixture of both is one run.

    python tests/chat_data.py outputs/tiny_chat/data     # writes messages.jsonl, sharegpt.jsonl, eval.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(0, 50), rng.randint(0, 50), rng.randint(1, 9)
        out.append(
            [
                {"role": "system", "content": "You add numbers."},
                {"role": "user", "content": f"{a}+{b}?"},
                {"role": "assistant", "content": str(a + b)},
                {"role": "user", "content": f"and +{c}?"},
                {"role": "assistant", "content": str(a + b + c)},
            ]
        )
    return out


def write(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "messages": [{"messages": m} for m in conversations(24, seed=0)],
        "sharegpt": [
            {"conversations": [{"from": SHAREGPT_ROLE[t["role"]], "value": t["content"]} for t in m]}
            for m in conversations(16, seed=1)
        ],
        "eval": [{"messages": m} for m in conversations(8, seed=2)],
    }
    paths = {}
    for name, examples in files.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in examples))
    return paths


if __name__ == "__main__":
    print(
        "\n".join(str(p) for p in write(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/tiny_chat/data")).values())
    )
