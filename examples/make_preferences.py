"""Generate examples/preferences.jsonl (DPO/ORPO/IPO/SimPO) and examples/kto.jsonl (KTO): the same correct
answer is preferred SHOUTED IN CAPITALS over written normally, a style the model does not prefer before
training (held-out accuracy starts near 0), so learning it is plain to see. Deterministic.

    python examples/make_preferences.py
"""
import json
import os
import random

FACTS = [("What is the capital of France?", "The capital of France is Paris."),
         ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
         ("What is the capital of Italy?", "The capital of Italy is Rome."),
         ("What is the capital of Spain?", "The capital of Spain is Madrid."),
         ("What is the capital of Germany?", "The capital of Germany is Berlin."),
         ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
         ("How many days are in a week?", "A week has seven days."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
         ("What do bees make?", "Bees make honey."),
         ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
         ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
         ("What is the largest ocean?", "The Pacific is the largest ocean."),
         ("How many continents are there?", "There are seven continents."),
         ("What gas do plants take in?", "Plants take in carbon dioxide."),
         ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
         ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
         ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
         ("How many hours are in a day?", "A day has 24 hours."),
         ("What is the tallest animal?", "The giraffe is the tallest animal.")]
MATH = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in
        [(2, 3), (4, 5), (7, 8), (10, 6), (9, 9), (12, 4), (3, 11), (6, 7), (15, 5), (8, 13), (20, 22), (14, 3)]]


def main():
    rng = random.Random(0)
    here = os.path.dirname(os.path.abspath(__file__))
    pairs, kto = [], []
    for q, a in FACTS + MATH:
        pairs.append({"prompt": q, "chosen": a.upper(), "rejected": a})
        kto += [{"prompt": q, "completion": a.upper(), "label": True}, {"prompt": q, "completion": a, "label": False}]
    rng.shuffle(pairs)
    rng.shuffle(kto)
    for name, rows in (("preferences.jsonl", pairs), ("kto.jsonl", kto)):
        with open(os.path.join(here, name), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
        print(f"{len(rows)} records -> {name}")


if __name__ == "__main__":
    main()
