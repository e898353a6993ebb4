"""Generate examples/arithmetic.jsonl: the verifiable task of grpo.py's default job (sums of two digits; the rewards
check the completion's number, and that the reply is the number alone).

    python examples/make_arithmetic.py     # rewrites examples/arithmetic.jsonl (deterministic)

Held-out prompts (examples/arithmetic_prompts.txt) are sums that never appear here.
"""
import json
import os
import random

ASK = ["What is {a} + {b}? Reply with only the number.", "Compute {a} + {b}. Answer with just the number.",
       "{a} + {b} = ? Give only the number.", "Add {a} and {b}. Reply with the number only."]
HELD_OUT = {(7, 8), (3, 9), (6, 4), (5, 2)}


def main():
    rng = random.Random(0)
    pairs = sorted({(a, b) for a in range(1, 10) for b in range(1, 10)} - HELD_OUT)
    rng.shuffle(pairs)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "arithmetic.jsonl"), "w") as f:
        for i, (a, b) in enumerate(pairs):
            f.write(json.dumps({"prompt": ASK[i % len(ASK)].format(a=a, b=b), "answer": str(a + b)}) + "\n")
    with open(os.path.join(here, "arithmetic_prompts.txt"), "w") as f:
        for i, (a, b) in enumerate(sorted(HELD_OUT)):
            f.write(ASK[i % len(ASK)].format(a=a, b=b) + "\n")


if __name__ == "__main__":
    main()
