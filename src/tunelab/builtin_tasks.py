"""Generated tasks, for multi-task and continual runs, comparisons and benchmarks: nothing is downloaded,
and the same seed gives the same rows.

- ``triage`` (prompt/completion): a support ticket -> ``{"category": ..., "priority": ...}`` (the demo's task,
  tunelab.demo);
- ``sentiment`` (classification): a product review -> positive, negative or neutral;
- ``extraction`` (prompt/completion): a shipping message -> ``{"order": "#12345", "date": "2026-03-14"}``, the
  date rewritten from the many ways people write one;
- ``translation`` (prompt/completion): a short English sentence -> French (the guide's translation use case);
- ``summaries`` (prompt/completion): a long customer email -> a one-sentence summary (content generation).

Each is learnable from a few hundred rows by a small instruct model. The metrics follow the rows' shape
(tunelab.metrics): exact match and per-field accuracy for the JSON answers (triage, extraction), accuracy and
macro-F1 for the labels (sentiment), chrF, BLEU and ROUGE-L for the sentences (translation, summaries).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.demo import make_tickets, write_jsonl

PRODUCTS = ["headphones", "coffee maker", "backpack", "desk lamp", "phone case", "blender", "keyboard", "kettle"]
SENTIMENT = {
    "positive": [
        "The {p} works perfectly and arrived a day early.",
        "Absolutely love this {p}, great value for the price.",
        "Best {p} I have owned, I would buy it again.",
        "The {p} exceeded my expectations, the quality is excellent.",
    ],
    "negative": [
        "The {p} stopped working after two days, very disappointed.",
        "Terrible {p}: it feels cheap and the seller never answered.",
        "I returned the {p}, it broke the first time I used it.",
        "Waste of money, this {p} is much worse than the photos.",
    ],
    "neutral": [
        "The {p} is fine, nothing special but it does the job.",
        "It is an ordinary {p}; it works as described.",
        "The {p} arrived on time. I have not used it much yet.",
        "Average {p}, similar to the one I had before.",
    ],
}
OPENERS = ["", "Update: ", "Review: ", "Honestly, ", "So far: "]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
MESSAGES = [
    "Hi, my order {order} still has not arrived. It was supposed to come on {date}.",
    "Could you confirm that order {order} will be delivered on {date}? Thanks.",
    "The courier says {order} is scheduled for {date}, but nobody called me.",
    "Order {order}: I will not be home on {date}, can you hold the parcel?",
    "Please move the delivery of {order} to {date} if possible.",
]
EXTRACT = (
    "Extract the order number and the delivery date from this message. Reply with JSON only: "
    '{"order": "#NNNNN", "date": "YYYY-MM-DD"}.\n\nMessage:\n'
)


def make_sentiment(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` classification rows (``text``, ``label``), balanced over the three labels."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(SENTIMENT)[i % len(SENTIMENT)]
        opener, body = rng.choice(OPENERS), rng.choice(SENTIMENT[label]).format(p=rng.choice(PRODUCTS))
        text = opener + (body[0].lower() + body[1:] if opener and not body.startswith("I ") else body)
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def _date_forms(rng: random.Random) -> tuple[str, str]:
    """A date as people write it, and as ISO 8601."""
    year, month, day = 2026, rng.randint(1, 10), rng.randint(1, 28)
    iso = f"{year}-{month:02d}-{day:02d}"
    written = rng.choice(
        [
            f"{MONTHS[month - 1]} {day}",
            f"{day} {MONTHS[month - 1]} {year}",
            f"{day:02d}/{month:02d}/{year}",
            iso,
            f"{MONTHS[month - 1][:3]} {day}, {year}",
        ]
    )
    return written, iso


def make_extraction(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` prompt/completion rows: a message -> its order number and ISO delivery date as JSON."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        order = f"#{rng.randint(10000, 99999)}"
        written, iso = _date_forms(rng)
        message = rng.choice(MESSAGES).format(order=order, date=written)
        rows.append({"prompt": EXTRACT + message, "completion": json.dumps({"order": order, "date": iso})})
    return rows


# translation: English -> French, with gender agreement of article and colour (noun: French, gender)
NOUNS = {
    "car": ("voiture", "f"), "house": ("maison", "f"), "book": ("livre", "m"), "dog": ("chien", "m"),
    "table": ("table", "f"), "bicycle": ("vélo", "m"), "window": ("fenêtre", "f"), "cat": ("chat", "m"),
    "bag": ("sac", "m"), "chair": ("chaise", "f"),
}  # fmt: skip
COLOURS = {"red": ("rouge", "rouge"), "green": ("vert", "verte"), "black": ("noir", "noire"),
           "white": ("blanc", "blanche"), "blue": ("bleu", "bleue"), "grey": ("gris", "grise")}  # fmt: skip
ARTICLES = {"the": ("le", "la"), "a": ("un", "une"), "my": ("mon", "ma")}
PLACES = {"kitchen": "la cuisine", "garden": "le jardin", "street": "la rue", "garage": "le garage",
          "bedroom": "la chambre"}  # fmt: skip
TRANSLATE = "Translate into French:\n\n"


def make_translation(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` prompt/completion rows: a short English sentence -> its French translation (articles and
    colours agree with the noun's gender). Scored by chrF, BLEU and ROUGE-L (tunelab.metrics)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        art, noun, colour = rng.choice(list(ARTICLES)), rng.choice(list(NOUNS)), rng.choice(list(COLOURS))
        fr_noun, gender = NOUNS[noun]
        g = 0 if gender == "m" else 1
        fr = f"{ARTICLES[art][g]} {fr_noun} {COLOURS[colour][g]}"
        if rng.random() < 0.5:
            place = rng.choice(list(PLACES))
            en, out = (
                f"{art.capitalize()} {colour} {noun} is in the {place}.",
                f"{fr.capitalize()} est dans {PLACES[place]}.",
            )
        else:
            en, out = f"I see {art} {colour} {noun}.", f"Je vois {fr}."
        rows.append({"prompt": TRANSLATE + en, "completion": out})
    return rows


NAMES = ["Ana", "Ben", "Chloé", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon"]
CITIES = ["Lyon", "Leeds", "Porto", "Graz", "Turin", "Ghent", "Cork", "Bergen"]
PROBLEMS = {"cracked": "arrived cracked", "late": "arrived two weeks late", "wrong": "was the wrong colour",
            "dead": "does not switch on"}  # fmt: skip
REMEDIES = {"refund": "a full refund", "replacement": "a replacement", "repair": "a free repair"}
FILLER = [
    "I have been a customer for years and usually everything goes well.",
    "The delivery driver was friendly and the box looked fine from the outside.",
    "I tried the steps in the manual twice before writing to you.",
    "My neighbour bought the same model last month and is very happy with it.",
    "I attach the order confirmation in case you need it.",
    "Please let me know if you need photos.",
]
SUMMARISE = "Summarise this customer email in one sentence: who, what went wrong, what they want.\n\n"


def make_summaries(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` prompt/completion rows: a long customer email (with sentences that do not matter) -> a one-sentence
    summary of who wrote, what went wrong and what they ask for. Scored by ROUGE-L and chrF."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, city, product = rng.choice(NAMES), rng.choice(CITIES), rng.choice(PRODUCTS)
        problem, remedy = rng.choice(list(PROBLEMS)), rng.choice(list(REMEDIES))
        filler = rng.sample(FILLER, 3)
        email = (
            f"Hello, this is {name} from {city}. {filler[0]} I ordered a {product} from your shop. {filler[1]} "
            f"Unfortunately the {product} {PROBLEMS[problem]}. {filler[2]} I would like {REMEDIES[remedy]}. "
            f"Best regards, {name}"
        )
        summary = f"{name} from {city} says the {product} {PROBLEMS[problem]} and asks for {REMEDIES[remedy]}."
        rows.append({"prompt": SUMMARISE + email, "completion": summary})
    return rows


MAKERS = {
    "triage": make_tickets,
    "sentiment": make_sentiment,
    "extraction": make_extraction,
    "translation": make_translation,
    "summaries": make_summaries,
}


def write_tasks(data_dir: Path, *, train_rows: int, eval_rows: int, names=tuple(MAKERS)) -> list[dict]:
    """Write each task's train and eval files (different seeds) under ``data_dir``; returns the ``tasks:``
    entries of a run config."""
    tasks = []
    for name in names:
        make = MAKERS[name]
        train = write_jsonl(make(train_rows, seed=1), data_dir / f"{name}-train.jsonl")
        evaluation = write_jsonl(make(eval_rows, seed=2), data_dir / f"{name}-eval.jsonl")
        tasks.append({"name": name, "train": str(train), "eval": str(evaluation)})
    return tasks
