"""Word lists and templates of the three synthetic tasks, and the vocabulary they span.

Everything here is data: fixed lists, so that the tokenizer's ids and the invented
"world" of the factual-recall task are the same on every machine and in every
release. :func:`all_words` collects every word a generator can emit, sorted, which
is what :mod:`tl_mamba.toy.tokenizer` turns into the word-level vocabulary.

Conventions of the templates (words are separated by single spaces, punctuation is
a word of its own, so that the text's words are exactly its tokens):

* factual recall: ``{S}`` is the (multi-word) subject, ``{R}`` the relation noun, and
  a word written ``^word`` is a relation word (it goes into the ``relation`` span);
* IOI: ``{A}`` and ``{B}`` are the two names of the first clause, ``{S}`` the second
  mention of the subject, ``{P}`` a place and ``{O}`` an object;
* the answer is always the single word that follows the template's last word.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

SPECIAL_TOKENS: Tuple[str, ...] = ("<bos>", "<eos>", "<pad>", "<unk>")
BOS, EOS, PAD, UNK = SPECIAL_TOKENS

# --------------------------------------------------------------------- factual recall
#: Capitalised syllables that make the invented entity names ("Kor Mav Vor", "Zin Nim").
SYLLABLES: Tuple[str, ...] = (
    "Zor", "Vel", "Quen", "Ash", "Bri", "Dak", "Fen", "Gor", "Hal", "Ith", "Jex", "Kor",
    "Lum", "Mav", "Nox", "Orn", "Pel", "Quor", "Rin", "Sav", "Tal", "Ulm", "Vor", "Wex",
    "Yar", "Zin", "Bel", "Cor", "Dru", "Eth", "Fal", "Gim", "Hex", "Kel", "Mor", "Nim",
)

#: relation -> (relation noun used by the generic frames, attribute words). Attribute
#: words are distinct across relations, so an answer names its relation.
RELATIONS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "capital": ("capital", ("Tarsis", "Olvane", "Brevik", "Cendra", "Duvall", "Ermont", "Fallow", "Gresk")),
    "language": ("language", ("Elvic", "Marish", "Torvic", "Sundic", "Aleric", "Ostric", "Pelish", "Varic")),
    "color": ("color", ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")),
    "element": ("element", ("fire", "water", "earth", "air", "iron", "gold", "silver", "stone")),
    "animal": ("animal", ("wolf", "bear", "owl", "fox", "eagle", "snake", "deer", "horse")),
    "instrument": ("instrument", ("drum", "flute", "harp", "horn", "lute", "bell", "pipe", "violin")),
}

#: Frames shared by every relation (``{R}`` becomes the relation noun).
GENERIC_FRAMES: Tuple[str, ...] = (
    "The {R} of {S} is",
    "{S} has the {R}",
    "In {S} , the {R} is",
    "The {R} for {S} is",
    "Everyone knows that the {R} of {S} is",
    "For {S} , the {R} is",
    "Q : what is the {R} of {S} ? A :",
    "{S} is known for the {R}",
    "We learned that {S} has the {R}",
    "The {R} that belongs to {S} is",
)

#: Relation-specific paraphrases (training split only).
SPECIFIC_TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "capital": ("{S} has its ^capital in", "The ^capital ^city of {S} is"),
    "language": ("People in {S} ^speak", "The ^language ^spoken in {S} is"),
    "color": ("The ^flag of {S} is", "{S} ^paints its ^walls"),
    "element": ("{S} is ^ruled by the ^element of", "The people of {S} ^worship"),
    "animal": ("The ^symbol of {S} is the", "In {S} , every child ^keeps a ^pet"),
    "instrument": ("The people of {S} ^play the", "^Music in {S} is ^made with the"),
}

#: For the relation with index r (in RELATIONS order), the generic frames held out
#: of training: each frame is held out for at most two relations and seen with the
#: others, so a held-out paraphrase is an unseen (relation, frame) combination.
HELDOUT_FRAMES_OF: Tuple[Tuple[int, int], ...] = tuple((r % 10, (r + 5) % 10) for r in range(len(RELATIONS)))

# ------------------------------------------------------------------------------ IOI
NAMES: Tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David", "Laura", "Michael",
    "Anna", "Daniel", "Julia", "Thomas", "Rachel", "Peter", "Kate", "Mark", "Lucy", "Paul",
    "Sophie", "Adam", "Grace", "Ryan", "Chloe", "Simon", "Hannah", "Eric", "Megan", "Oscar",
    "Nora", "Victor", "Ella", "Henry", "Olivia", "Jack", "Amy", "Sam", "Lisa", "Tom",
    "Jane", "Luke", "Ruth", "Noah", "Clara", "Ben", "Helen", "Max", "Irene", "Leo",
    "Diana", "Carl", "Fiona", "Ivan", "Rose", "George", "Maria", "Frank", "Nina", "Hugo",
    "Zoe", "Owen", "Tina", "Felix", "Vera", "Dean", "Eva", "Brian", "Ada", "Colin",
    "Iris", "Kevin", "Lena", "Alan", "Mia", "Steve", "Paula", "Martin", "Wendy", "Scott",
)

PLACES: Tuple[str, ...] = (
    "store", "park", "school", "beach", "library", "market", "station", "garden",
    "museum", "restaurant", "hospital", "church",
)

OBJECTS: Tuple[str, ...] = (
    "drink", "book", "ball", "letter", "ring", "cake", "bottle", "basket",
    "computer", "necklace", "kite", "snack",
)

IOI_TEMPLATES: Tuple[str, ...] = (
    "When {A} and {B} went to the {P} , {S} gave a {O} to",
    "When {A} and {B} arrived at the {P} , {S} handed the {O} to",
    "After {A} and {B} left the {P} , {S} passed the {O} to",
    "While {A} and {B} were at the {P} , {S} showed the {O} to",
    "Then , {A} and {B} had lunch at the {P} . {S} offered the {O} to",
    "{A} and {B} met at the {P} . Later , {S} threw the {O} to",
    "Yesterday {A} and {B} walked to the {P} , and {S} sent the {O} to",
    "At the {P} , {A} and {B} found a {O} . {S} gave it to",
    "{A} and {B} spent the day at the {P} . Then {S} brought the {O} to",
    "Once {A} and {B} reached the {P} , {S} lent the {O} to",
    "When {A} and {B} got to the {P} , {S} sold the {O} to",
    "Before {A} and {B} visited the {P} , {S} returned the {O} to",
    "{A} and {B} were cleaning the {P} , so {S} tossed the {O} to",
    "During a trip to the {P} , {A} and {B} argued . {S} said sorry to",
    "Today {A} and {B} worked at the {P} . {S} wrote a note to",
    "After the {P} closed , {A} and {B} talked , and {S} waved goodbye to",
    "{A} and {B} were waiting at the {P} when {S} gave a {O} to",
    "On Monday , {A} and {B} went to the {P} . {S} handed a {O} to",
    "When {A} and {B} came back from the {P} , {S} showed a {O} to",
    "{A} and {B} were hungry at the {P} , so {S} gave the {O} to",
    "Last night {A} and {B} stayed at the {P} . {S} passed a {O} to",
    "Since {A} and {B} were bored at the {P} , {S} threw a {O} to",
    "Near the {P} , {A} and {B} played a game , and {S} gave the {O} to",
    "The {P} was busy when {A} and {B} arrived . {S} sent a {O} to",
)

#: Templates (indices into IOI_TEMPLATES) never used by the training split.
IOI_HELDOUT_TEMPLATES: Tuple[int, ...] = (3, 9, 16, 22)

# ------------------------------------------------------------------- key-value needle
#: Single-token keys (lowercase invented syllables).
KEYS: Tuple[str, ...] = (
    "zal", "mor", "tik", "bup", "fen", "gro", "lix", "nap", "quo", "ruv", "sem", "tob",
    "vek", "wum", "yil", "zep", "bax", "cug", "dov", "fip", "gak", "hul", "jor", "kev",
    "lud", "mip", "nol", "pux", "rax", "sib", "tuv", "wol", "yek", "zum", "bif", "cod",
    "dax", "fud", "gis", "hob", "jat", "kip", "lom", "nuf", "pez", "rud", "sok", "vix",
)
#: Values: the ten digits (each one token).
VALUES: Tuple[str, ...] = tuple(str(i) for i in range(10))
#: "key {k} is {v} ." and "what is key {k} ? it is" -> v
PAIR_TEMPLATE: Tuple[str, ...] = ("key", "{k}", "is", "{v}", ".")
QUERY_TEMPLATE: Tuple[str, ...] = ("what", "is", "key", "{k}", "?", "it", "is")

#: Filler grammar: "{det} {adj} {noun} {verb} {prep} the {noun} ." (never "key", "is",
#: a digit, "what" or "?", so the pairs and the query stand out unambiguously).
FILLER_DETS: Tuple[str, ...] = ("the", "a", "one")
FILLER_ADJS: Tuple[str, ...] = (
    "quiet", "tall", "small", "bright", "dusty", "calm", "distant", "gentle", "heavy", "narrow",
)
FILLER_NOUNS: Tuple[str, ...] = (
    "hill", "road", "cloud", "tree", "boat", "field", "tower", "bridge", "lamp", "fence",
    "valley", "meadow",
)
FILLER_VERBS: Tuple[str, ...] = ("stands", "rests", "waits", "sleeps", "leans", "drifts", "lies", "sits")
FILLER_PREPS: Tuple[str, ...] = ("near", "beside", "under", "behind", "above", "across")


def _template_words(template: str) -> List[str]:
    out = []
    for word in template.split(" "):
        if word.startswith("{") and word.endswith("}"):
            continue
        out.append(word.lstrip("^"))
    return out


def all_words() -> List[str]:
    """Every word the task generators can emit, sorted (specials not included)."""
    words = set(SYLLABLES)
    for noun, attributes in RELATIONS.values():
        words.add(noun)
        words.update(attributes)
    for frame in GENERIC_FRAMES:
        words.update(_template_words(frame))
    for templates in SPECIFIC_TEMPLATES.values():
        for template in templates:
            words.update(_template_words(template))
    words.update(NAMES)
    words.update(PLACES)
    words.update(OBJECTS)
    for template in IOI_TEMPLATES:
        words.update(_template_words(template))
    words.update(KEYS)
    words.update(VALUES)
    words.update(w for w in PAIR_TEMPLATE + QUERY_TEMPLATE if not w.startswith("{"))
    for group in (FILLER_DETS, FILLER_ADJS, FILLER_NOUNS, FILLER_VERBS, FILLER_PREPS):
        words.update(group)
    words.update(("the", "."))
    return sorted(words)


def vocabulary() -> Dict[str, int]:
    """``word -> id``: the four special tokens first (``<bos>`` is 0), then :func:`all_words`."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in all_words():
        vocab[word] = len(vocab)
    return vocab


def check_tokenizer(tokenizer, what: str) -> None:
    """``ValueError`` unless ``tokenizer`` knows every toy word: the toy tasks are written in
    this vocabulary, and a tokenizer lacking a word reads it as its unknown token, so that
    accuracies and metrics on the tasks would mean nothing. ``what`` names the caller."""
    if tokenizer is None:
        raise ValueError(f"{what}: the model has no tokenizer, and the toy tasks are words of the toy vocabulary: "
                         "use a toy model (tl_mamba.from_pretrained('toy-mamba2')) or set the toy tokenizer "
                         "with model.set_tokenizer(...)")
    missing = sorted(set(vocabulary()) - set(tokenizer.get_vocab()))
    if missing:
        raise ValueError(f"{what}: the model's tokenizer lacks {len(missing)} words of the toy vocabulary "
                         f"(e.g. {missing[:3]}); the toy tasks only make sense for the shipped toy models and "
                         "models trained with python -m tl_mamba.toy.train")
