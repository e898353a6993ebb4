"""Generate examples/preferences.jsonl (DPO/ORPO/IPO/SimPO) and examples/kto.jsonl (KTO): short, direct answers
are preferred over rambling ones. Each pair's chosen answer is one correct sentence ("The capital of Italy is
Rome."); its rejected answer is the same correct sentence wrapped in padding: sometimes a preamble before it
("Great question! "), then two pieces of hedging ("I think so, but I could be wrong."), repetition ("In other
words, ..."), off-topic filler or a sign-off ("I hope this helps!"), picked and ordered per record by a seeded
generator so that no one suffix can be memorised. Both answers state the same fact, so the pairs teach a style
(stop once the question is answered) and nothing the model knows has to change: held-out questions are still
answered right, only without the rambling. KTO gets each chosen answer as desirable and each rambling one as
undesirable. Deterministic: the files are the same on every run.

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

# the rambling: a preamble (some records), then pieces of these kinds after the answer
PREAMBLES = ["Great question! ", "Well, that is an interesting thing to ask. ",
             "Let me think about this for a moment. ", "Sure, I can help you with that. ",
             "Ah, this is a classic question that many people ask. "]
HEDGES = ["I think so, but I could be wrong.", "At least, that is what most sources say.",
          "Of course, you may want to double-check this somewhere else.", "As far as I know, this is correct."]
REPEATS = ["To say it again: {a}", "In other words, {a}", "So, once more, {a}", "Just to repeat, {a}"]
FILLER = ["Many people find this topic fascinating.", "There is a lot more that could be said about it.",
          "By the way, learning a new fact every day is good for the mind.",
          "Interestingly, questions like this come up quite often.", "It is always fun to think about such things."]
COMMON = {"The", "A", "There", "On", "Water", "Bees", "Plants"}  # first words that are lower case mid-sentence
SIGNOFFS = ["I hope this helps! Let me know if you have any other questions.", "Feel free to ask me anything else.",
            "Thanks for asking, and have a wonderful day!", "I hope that answers your question."]


def rambling(answer, rng):
    """The correct answer padded with a seeded mix: a preamble (a third of the records), then two pieces of
    different kinds (hedging, repetition, filler, sign-off), in a seeded order with any sign-off last."""
    first, rest = answer.split(" ", 1)
    low = (first.lower() if first in COMMON else first) + " " + rest  # "In other words, the ..." (not "william")
    kinds = sorted(rng.sample([HEDGES, REPEATS, FILLER, SIGNOFFS], 2), key=lambda k: k is SIGNOFFS)  # sign-off last
    pieces = [rng.choice(k).format(a=low) for k in kinds]
    pre = rng.choice(PREAMBLES) if rng.random() < 1 / 3 else ""
    return pre + answer + " " + " ".join(pieces)


def main():
    rng = random.Random(0)
    here = os.path.dirname(os.path.abspath(__file__))
    pairs, kto = [], []
    for q, a in FACTS + MATH:
        r = rambling(a, rng)
        pairs.append({"prompt": q, "chosen": a, "rejected": r})
        kto += [{"prompt": q, "completion": a, "label": True}, {"prompt": q, "completion": r, "label": False}]
    rng.shuffle(pairs)
    rng.shuffle(kto)
    for name, rows in (("preferences.jsonl", pairs), ("kto.jsonl", kto)):
        with open(os.path.join(here, name), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
        print(f"{len(rows)} records -> {name}")


if __name__ == "__main__":
    main()
