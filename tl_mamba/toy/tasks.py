"""Generators of the three synthetic tasks the toy models are trained on.

Every generator is deterministic given its seed, has a training and a held-out
split that never overlap, and returns :class:`Prompt` objects whose answer is one
word (one token) that follows the prompt's last word. Prompts are words joined by
single spaces (punctuation is a word of its own), so the ``i``-th word of
``prompt.text`` is token ``i + 1`` of the tokenized prompt (token 0 is the BOS).
Every span in ``prompt.spans`` is a sorted list of such token positions.

Tasks
-----
``facts``
    Factual recall about invented entities with 2-3 word names ("Kor Mav Vor", "Zin Nim"),
    :data:`N_ENTITIES` of them, six relations (capital, language, color, element,
    animal, instrument), each an attribute word out of eight. The facts themselves are
    fixed (the same for every seed): ``fact(entity, relation)``. Training prompts
    state every fact with the training paraphrases; held-out prompts ask the SAME
    facts with paraphrases never used for that relation in training.
    Spans: ``subject``, ``subject_first``, ``subject_last``, ``relation`` (the words
    naming the relation; it can include the last position, as in "{S} has the
    capital"), ``non_subject`` (every position after the BOS and before the last that
    is not the subject: the "relation" group of knockout studies), ``last``,
    ``first``, ``context`` (positions before the last in neither subject nor
    relation), ``bos``. Spans may overlap (``first`` is often a subject token).
    Corrupted: the same paraphrase about another entity with as many name words and
    a different attribute (``corrupted_answer``).
``ioi``
    "When Mary and John went to the store , John gave a drink to" -> "Mary"; 24
    templates in ABBA and BABA order, 80 names. The held-out split is every
    (name pair, template) combination outside training: four templates and a fifth
    of the (unordered) name pairs are never used for training.
    Spans: ``IO``, ``S1``, ``S2``, ``S1_plus_1``, ``names``, ``end``, ``last``,
    ``first``, ``context``, ``bos``.
    Corrupted (``corruption="ABC"``, the standard one): S2 replaced by a third name
    C, same length, ``corrupted_answer`` None (ambiguous); ``meta["wrong_answer"]``
    is the subject, for logit differences. ``corruption="S2_IO"`` replaces S2 by
    the indirect object instead, so the corrupted answer is the subject.
``needle``
    Key-value recall in a haystack: ``... key zal is 7 . <filler> key mor is 3 .
    <filler> what is key zal ? it is`` -> "7". ``length`` is the exact token count
    (BOS included, 13 to 4096), ``depth`` in [0, 1] where the queried pair sits in
    the haystack, ``n_pairs`` pairs (the needle and its distractors, distinct keys
    and values). The split is decided by the ordered keys of a prompt, so no
    held-out prompt can appear in training.
    Spans: ``needle`` (key and value of the queried pair), ``needle_key``,
    ``needle_value``, ``needle_statement``, ``query``, ``query_key``,
    ``distractors`` (their keys and values), ``distractor_values``, ``last``,
    ``first``, ``context``, ``bos``.
    Corrupted: the needle's value replaced by a value that is nowhere in the
    prompt (``corrupted_answer``).

Entry points: :func:`make_dataset`, :func:`make_facts`, :func:`make_ioi`,
:func:`make_needle`, :func:`mixed_training_stream`, :func:`training_batch`,
:func:`encode_prompts`, :func:`evaluate` and :func:`needle_accuracy_by_length`.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tl_mamba.errors import NotAnIndexError, OutOfRangeError
from tl_mamba.toy import vocab as V

TASKS: Tuple[str, ...] = ("facts", "ioi", "needle")
SPLITS: Tuple[str, ...] = ("train", "heldout")
_TASK_ALIASES = {"facts": "facts", "fact": "facts", "factual": "facts", "ioi": "ioi",
                 "needle": "needle", "kv": "needle", "niah": "needle"}
_SPLIT_ALIASES = {"train": "train", "heldout": "heldout", "held_out": "heldout", "test": "heldout",
                  "val": "heldout", "eval": "heldout"}

#: Number of invented entities of the factual-recall world.
N_ENTITIES = 256
#: Default share of each task in the mixed training stream.
DEFAULT_WEIGHTS: Dict[str, float] = {"facts": 0.4, "ioi": 0.3, "needle": 0.3}
#: Fewest tokens a needle prompt can have (BOS + one pair + the query).
NEEDLE_MIN_LENGTH = 1 + len(V.PAIR_TEMPLATE) + len(V.QUERY_TEMPLATE)
NEEDLE_MAX_LENGTH = 4096

SeedOrRng = Union[int, random.Random, None]


@dataclass
class Prompt:
    """One task example.

    ``text`` holds no BOS; ``spans`` are token positions in the tokenized prompt with
    the BOS at position 0 (so word ``i`` of ``text`` is position ``i + 1``); the
    ``answer`` is one word, the token to predict after the prompt's last token (the
    ``tl_mamba.experiments`` tools also take its token id).
    """

    text: str
    answer: Union[str, int]
    task: str
    spans: Dict[str, List[int]]
    corrupted: Optional[str] = None
    corrupted_answer: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def words(self) -> List[str]:
        return self.text.split(" ")

    @property
    def n_tokens(self) -> int:
        """Token count of the prompt, BOS included."""
        return self.text.count(" ") + 2

    def str_tokens(self) -> List[str]:
        """The tokens as strings, BOS first (what ``spans`` index)."""
        return [V.BOS] + self.words

    def token_ids(self, vocab: Optional[Mapping[str, int]] = None) -> List[int]:
        """Ids of the prompt's tokens, BOS first (``vocab`` defaults to the toy vocabulary)."""
        return _encode_words(self.text, _vocab(vocab))


# ------------------------------------------------------------------------ helpers
def _rng(seed: SeedOrRng, *salt: Any) -> random.Random:
    if isinstance(seed, random.Random):
        return seed
    if seed is None:
        seed = 0
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(0, 2**62))
    return random.Random("/".join(str(s) for s in (*salt, int(seed))))


def _norm_task(task: str) -> str:
    try:
        return _TASK_ALIASES[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}") from None


def _norm_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}") from None


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


@lru_cache(maxsize=1)
def _default_vocab() -> Dict[str, int]:
    return V.vocabulary()


_VOCAB_CACHE: Dict[int, Tuple[Any, Dict[str, int]]] = {}


def _vocab(tokenizer_or_vocab: Any = None) -> Dict[str, int]:
    """``word -> id`` of a tokenizer (``tokenizers`` or transformers), a mapping, or the toy default."""
    if tokenizer_or_vocab is None:
        return _default_vocab()
    if isinstance(tokenizer_or_vocab, Mapping):
        return dict(tokenizer_or_vocab)
    key = id(tokenizer_or_vocab)
    cached = _VOCAB_CACHE.get(key)
    if cached is not None and cached[0] is tokenizer_or_vocab:
        return cached[1]
    vocab = dict(tokenizer_or_vocab.get_vocab())
    _VOCAB_CACHE[key] = (tokenizer_or_vocab, vocab)
    return vocab


def _encode_words(text: str, vocab: Mapping[str, int], bos: bool = True) -> List[int]:
    unk = vocab.get(V.UNK, 3)
    ids = [vocab.get(w, unk) for w in text.split(" ")]
    return [vocab[V.BOS]] + ids if bos else ids


def _fill(template: str, slots: Mapping[str, Sequence[str]]) -> Tuple[List[str], Dict[str, List[int]]]:
    """Expand a template into words; returns the words and, per slot name, the word indices it filled.

    ``^word`` words are recorded under the slot name ``"^"``.
    """
    words: List[str] = []
    where: Dict[str, List[int]] = {}
    for item in template.split(" "):
        if item.startswith("{") and item.endswith("}"):
            name = item[1:-1]
            for w in slots[name]:
                where.setdefault(name, []).append(len(words))
                words.append(w)
        elif item.startswith("^"):
            where.setdefault("^", []).append(len(words))
            words.append(item[1:])
        else:
            words.append(item)
    return words, where


def _pos(word_indices: Sequence[int]) -> List[int]:
    """Word indices -> token positions (BOS is position 0)."""
    return sorted(i + 1 for i in word_indices)


def _context(n_words: int, *taken: Sequence[int]) -> List[int]:
    """Positions 1 .. last-1 not in any of ``taken`` (token positions)."""
    used = set()
    for span in taken:
        used.update(span)
    return [p for p in range(1, n_words) if p not in used]


# ----------------------------------------------------------------- factual recall
@dataclass(frozen=True)
class Entity:
    name: str
    words: Tuple[str, ...]
    attributes: Tuple[Tuple[str, str], ...]  # (relation, attribute) in RELATIONS order

    def attribute(self, relation: str) -> str:
        return dict(self.attributes)[relation]


@lru_cache(maxsize=1)
def entities() -> Tuple[Entity, ...]:
    """The fixed invented world: :data:`N_ENTITIES` entities with their attributes.

    Names have 2 or 3 syllable-words, are unique, and no name is the start of
    another. The same on every call, machine and seed.
    """
    rng = random.Random("tl_mamba.toy.world/v1")
    names: List[Tuple[str, ...]] = []
    seen = set()
    prefixes = set()
    while len(names) < N_ENTITIES:
        size = 2 if rng.random() < 0.5 else 3
        words = tuple(rng.sample(V.SYLLABLES, size))
        if words in seen or words in prefixes or any(words[:k] in seen for k in range(2, size)):
            continue
        seen.add(words)
        prefixes.update(words[:k] for k in range(2, size))
        names.append(words)
    out = []
    for words in names:
        attrs = tuple((rel, rng.choice(values)) for rel, (_noun, values) in V.RELATIONS.items())
        out.append(Entity(name=" ".join(words), words=words, attributes=attrs))
    return tuple(out)


def fact(entity: Union[int, str, Entity], relation: str) -> str:
    """The attribute word of ``entity`` (index, name or Entity) for ``relation``."""
    if isinstance(entity, int):
        entity = entities()[entity]
    elif isinstance(entity, str):
        entity = _entity_by_name()[entity]
    return entity.attribute(relation)


@lru_cache(maxsize=1)
def _entity_by_name() -> Dict[str, Entity]:
    return {e.name: e for e in entities()}


@lru_cache(maxsize=1)
def facts_templates() -> Dict[str, Dict[str, Tuple[str, ...]]]:
    """``{relation: {"train": templates, "heldout": templates}}`` (``{S}`` subject, ``^`` relation words)."""
    out: Dict[str, Dict[str, Tuple[str, ...]]] = {}
    for r, (relation, (noun, _values)) in enumerate(V.RELATIONS.items()):
        held = set(V.HELDOUT_FRAMES_OF[r])
        generic = [frame.replace("{R}", "^" + noun) for frame in V.GENERIC_FRAMES]
        train = [t for i, t in enumerate(generic) if i not in held] + list(V.SPECIFIC_TEMPLATES[relation])
        heldout = [t for i, t in enumerate(generic) if i in held]
        out[relation] = {"train": tuple(train), "heldout": tuple(heldout)}
    return out


@lru_cache(maxsize=1)
def _entities_by_size() -> Dict[int, Tuple[int, ...]]:
    by: Dict[int, List[int]] = {}
    for i, e in enumerate(entities()):
        by.setdefault(len(e.words), []).append(i)
    return {k: tuple(v) for k, v in by.items()}


def _facts_prompt(entity_index: int, relation: str, template_index: int, split: str,
                  rng: random.Random) -> Prompt:
    ents = entities()
    entity = ents[entity_index]
    template = facts_templates()[relation][split][template_index]
    words, where = _fill(template, {"S": entity.words})
    n = len(words)
    subject = _pos(where["S"])
    relation_span = _pos(where.get("^", []))
    last = [n]
    # corrupted: same template, another entity with as many name words and another attribute
    answer = entity.attribute(relation)
    candidates = _entities_by_size()[len(entity.words)]
    while True:
        other = ents[candidates[rng.randrange(len(candidates))]]
        if other.attribute(relation) != answer:
            break
    corrupted_words, _ = _fill(template, {"S": other.words})
    spans = {
        "bos": [0],
        "first": [1],
        "subject": subject,
        "subject_first": [subject[0]],
        "subject_last": [subject[-1]],
        "relation": relation_span,
        "last": last,
        "non_subject": _context(n, subject),
        "context": _context(n, subject, relation_span),
    }
    return Prompt(
        text=" ".join(words), answer=answer, task="facts", spans=spans,
        corrupted=" ".join(corrupted_words), corrupted_answer=other.attribute(relation),
        meta={"entity": entity.name, "entity_index": entity_index, "relation": relation,
              "template": template, "template_index": template_index, "split": split,
              "corrupted_entity": other.name},
    )


def make_facts(n: int, seed: SeedOrRng = 0, split: str = "train", *, n_entities: Optional[int] = None,
               relations: Optional[Sequence[str]] = None) -> List[Prompt]:
    """``n`` factual-recall prompts.

    Facts are drawn in epochs: every (entity, relation) fact once, in a seeded
    order, before any repeats, each with a random paraphrase of the split
    (``"train"``: the training paraphrases; ``"heldout"``: paraphrases never used
    for that relation in training). ``n_entities`` keeps the first entities only;
    ``relations`` a subset of :data:`tl_mamba.toy.vocab.RELATIONS`.
    """
    split = _norm_split(split)
    rng = _rng(seed, "facts", split)
    rels = list(V.RELATIONS) if relations is None else list(relations)
    for r in rels:
        if r not in V.RELATIONS:
            raise ValueError(f"unknown relation {r!r}: expected some of {', '.join(V.RELATIONS)}")
    count = N_ENTITIES if n_entities is None else int(n_entities)
    if not 1 <= count <= N_ENTITIES:
        raise ValueError(f"n_entities must be in [1, {N_ENTITIES}], got {n_entities}")
    templates = facts_templates()
    pairs = [(e, r) for e in range(count) for r in rels]
    out: List[Prompt] = []
    while len(out) < n:
        order = pairs[:]
        rng.shuffle(order)
        for e, r in order[: n - len(out)]:
            t = rng.randrange(len(templates[r][split]))
            out.append(_facts_prompt(e, r, t, split, rng))
    return out


def _sample_fact(rng: random.Random, split: str) -> Prompt:
    e = rng.randrange(N_ENTITIES)
    r = rng.choice(tuple(V.RELATIONS))
    t = rng.randrange(len(facts_templates()[r][split]))
    return _facts_prompt(e, r, t, split, rng)


# ----------------------------------------------------------------------------- IOI
def ioi_pair_is_heldout(name1: str, name2: str) -> bool:
    """Whether the unordered name pair is one of the pairs kept out of training (a fifth of them)."""
    a, b = sorted((name1, name2))
    return _crc(f"ioi-pair/{a}/{b}") % 5 == 0


def ioi_template_is_heldout(template_index: int) -> bool:
    return template_index in V.IOI_HELDOUT_TEMPLATES


def ioi_combination_split(io: str, s: str, template_index: int) -> str:
    """``"train"`` if the (name pair, template) combination is used for training, else ``"heldout"``."""
    if ioi_template_is_heldout(template_index) or ioi_pair_is_heldout(io, s):
        return "heldout"
    return "train"


def _ioi_prompt(io: str, s: str, c: str, template_index: int, order: str, place: str, obj: str,
                corruption: str, split: str) -> Prompt:
    template = V.IOI_TEMPLATES[template_index]
    first_two = (io, s) if order == "ABBA" else (s, io)
    slots = {"A": [first_two[0]], "B": [first_two[1]], "S": [s], "P": [place], "O": [obj]}
    words, where = _fill(template, slots)
    a_pos, b_pos, s2_pos = where["A"][0] + 1, where["B"][0] + 1, where["S"][0] + 1
    io_pos, s1_pos = (a_pos, b_pos) if order == "ABBA" else (b_pos, a_pos)
    n = len(words)
    corrupted_words = list(words)
    if corruption == "ABC":
        corrupted_words[s2_pos - 1] = c
        corrupted_answer = None
    elif corruption == "S2_IO":
        corrupted_words[s2_pos - 1] = io
        corrupted_answer = s
    else:
        raise ValueError(f"unknown corruption {corruption!r}: expected 'ABC' or 'S2_IO'")
    names = sorted((io_pos, s1_pos, s2_pos))
    spans = {
        "bos": [0],
        "first": [1],
        "IO": [io_pos],
        "S1": [s1_pos],
        "S2": [s2_pos],
        "S1_plus_1": [s1_pos + 1],
        "names": names,
        "end": [n],
        "last": [n],
        "context": _context(n, names),
    }
    return Prompt(
        text=" ".join(words), answer=io, task="ioi", spans=spans,
        corrupted=" ".join(corrupted_words), corrupted_answer=corrupted_answer,
        meta={"IO": io, "S": s, "C": c, "order": order, "template_index": template_index,
              "template": template, "place": place, "object": obj, "corruption": corruption,
              "wrong_answer": s, "split": split,
              "heldout_template": ioi_template_is_heldout(template_index),
              "heldout_pair": ioi_pair_is_heldout(io, s)},
    )


def _sample_ioi(rng: random.Random, split: str, corruption: str = "ABC",
                heldout_kind: str = "any") -> Prompt:
    names = V.NAMES
    n_templates = len(V.IOI_TEMPLATES)
    while True:
        io, s, c = rng.sample(names, 3)
        t = rng.randrange(n_templates)
        if split == "train":
            if ioi_combination_split(io, s, t) != "train":
                continue
        else:
            held_t, held_p = ioi_template_is_heldout(t), ioi_pair_is_heldout(io, s)
            if heldout_kind == "any" and not (held_t or held_p):
                continue
            if heldout_kind == "template" and not held_t:
                continue
            if heldout_kind == "pair" and not (held_p and not held_t):
                continue
        order = "ABBA" if rng.random() < 0.5 else "BABA"
        place = rng.choice(V.PLACES)
        obj = rng.choice(V.OBJECTS)
        return _ioi_prompt(io, s, c, t, order, place, obj, corruption, split)


def make_ioi(n: int, seed: SeedOrRng = 0, split: str = "train", *, corruption: str = "ABC",
             heldout_kind: str = "any") -> List[Prompt]:
    """``n`` IOI prompts (answer: the indirect object), each with its corrupted counterpart.

    ``split="train"`` uses only training (name pair, template) combinations;
    ``"heldout"`` only the others. ``heldout_kind`` narrows the held-out split:
    ``"template"`` (held-out templates), ``"pair"`` (held-out name pairs in training
    templates) or ``"any"``.
    """
    split = _norm_split(split)
    if heldout_kind not in ("any", "template", "pair"):
        raise ValueError(f"heldout_kind must be 'any', 'template' or 'pair', got {heldout_kind!r}")
    if corruption not in ("ABC", "S2_IO"):
        raise ValueError(f"unknown corruption {corruption!r}: expected 'ABC' or 'S2_IO'")
    rng = _rng(seed, "ioi", split)
    return [_sample_ioi(rng, split, corruption, heldout_kind) for _ in range(n)]


# -------------------------------------------------------------------------- needle
_FILLER_CORPUS_WORDS = 40_000


@lru_cache(maxsize=1)
def filler_corpus() -> Tuple[str, ...]:
    """A fixed stream of filler words (sentences of the filler grammar) that haystacks are cut from."""
    rng = random.Random("tl_mamba.toy.filler/v1")
    words: List[str] = []
    while len(words) < _FILLER_CORPUS_WORDS:
        words += [rng.choice(V.FILLER_DETS), rng.choice(V.FILLER_ADJS), rng.choice(V.FILLER_NOUNS),
                  rng.choice(V.FILLER_VERBS), rng.choice(V.FILLER_PREPS), "the",
                  rng.choice(V.FILLER_NOUNS), "."]
    return tuple(words)


def needle_split_of(keys: Sequence[str]) -> str:
    """The split a needle prompt belongs to, decided by its keys in the order they appear."""
    return "heldout" if _crc("needle/" + " ".join(keys)) % 2 else "train"


def default_n_pairs(length: int, max_pairs: int = 6) -> int:
    """Pairs (needle + distractors) a prompt of ``length`` tokens gets by default: one more per 24 tokens."""
    room = (length - NEEDLE_MIN_LENGTH) // len(V.PAIR_TEMPLATE) + 1
    return max(1, min(max_pairs, 1 + (length - NEEDLE_MIN_LENGTH) // 24, room))


def _needle_prompt(rng: random.Random, split: str, length: int, depth: Optional[float],
                   n_pairs: Optional[int], max_pairs: int) -> Prompt:
    if not NEEDLE_MIN_LENGTH <= length <= NEEDLE_MAX_LENGTH:
        raise ValueError(f"needle length must be in [{NEEDLE_MIN_LENGTH}, {NEEDLE_MAX_LENGTH}], got {length}")
    pairs = default_n_pairs(length, max_pairs) if n_pairs is None else int(n_pairs)
    pair_len, query_len = len(V.PAIR_TEMPLATE), len(V.QUERY_TEMPLATE)
    if pairs < 1 or pairs > len(V.VALUES) - 1 or 1 + query_len + pair_len * pairs > length:
        raise ValueError(f"{pairs} key-value pairs do not fit in {length} tokens (or exceed {len(V.VALUES) - 1})")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    while True:
        keys = rng.sample(V.KEYS, pairs)
        # the needle is chosen among the pairs below; the split looks at the keys' order
        order_keys = list(keys)
        filler_len = length - 1 - query_len - pair_len * pairs
        d = rng.random() if depth is None else float(depth)
        needle_offset = int(round(d * filler_len))
        offsets = [needle_offset] + [rng.randint(0, filler_len) for _ in range(pairs - 1)]
        ties = [rng.random() for _ in range(pairs)]
        arrangement = sorted(range(pairs), key=lambda j: (offsets[j], ties[j]))
        appearance = [order_keys[j] for j in arrangement]
        if needle_split_of(appearance) == split:
            break
    values = rng.sample(V.VALUES, pairs + 1)
    spare_value = values.pop()
    corpus = filler_corpus()
    start = rng.randrange(len(corpus) - filler_len) if filler_len else 0
    filler = corpus[start:start + filler_len]
    words: List[str] = []
    pair_pos: Dict[int, int] = {}  # pair index -> word index of its "key" word
    cursor = 0
    for j in arrangement:
        words.extend(filler[cursor:offsets[j]])
        cursor = offsets[j]
        pair_pos[j] = len(words)
        words.extend(("key", keys[j], "is", values[j], "."))
    words.extend(filler[cursor:])
    query_start = len(words)
    words.extend(("what", "is", "key", keys[0], "?", "it", "is"))
    n = len(words)
    assert n + 1 == length, (n, length)
    # token positions
    needle_start = pair_pos[0] + 1
    needle_key, needle_value = needle_start + 1, needle_start + 3
    distractor_keys = sorted(pair_pos[j] + 2 for j in range(1, pairs))
    distractor_values = sorted(pair_pos[j] + 4 for j in range(1, pairs))
    query = list(range(query_start + 1, n + 1))
    spans = {
        "bos": [0],
        "first": [1],
        "needle": [needle_key, needle_value],
        "needle_key": [needle_key],
        "needle_value": [needle_value],
        "needle_statement": list(range(needle_start, needle_start + pair_len)),
        "query": query,
        "query_key": [query_start + 4],
        "distractors": sorted(distractor_keys + distractor_values),
        "distractor_values": distractor_values,
        "last": [n],
    }
    spans["context"] = _context(n, spans["needle"], spans["query"], spans["distractors"])
    corrupted_words = list(words)
    corrupted_words[needle_value - 1] = spare_value
    haystack = max(1, length - 1 - query_len - pair_len)
    return Prompt(
        text=" ".join(words), answer=values[0], task="needle", spans=spans,
        corrupted=" ".join(corrupted_words), corrupted_answer=spare_value,
        meta={"length": length, "depth": d, "needle_depth": (needle_start - 1) / haystack,
              "n_pairs": pairs, "key": keys[0], "value": values[0],
              "pairs": {keys[j]: values[j] for j in range(pairs)}, "split": split},
    )


def _pick_length(rng: random.Random, length: Union[int, Tuple[int, int], Sequence[int]]) -> int:
    if isinstance(length, (int, np.integer)):
        return int(length)
    lo, hi = length
    return rng.randint(int(lo), int(hi))


def check_needle_length(length) -> Union[int, Tuple[int, int]]:
    """``length`` of :func:`make_needle` checked: an int, or an inclusive ``(lo, hi)`` range
    with lo <= hi, within [:data:`NEEDLE_MIN_LENGTH`, :data:`NEEDLE_MAX_LENGTH`]. ``ValueError``
    naming the problem otherwise (a list of several lengths included)."""
    def check(value) -> int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(f"needle length must be an int or a (lo, hi) range of ints, got {length!r}")
        if not NEEDLE_MIN_LENGTH <= int(value) <= NEEDLE_MAX_LENGTH:
            raise ValueError(f"needle length {int(value)} is outside [{NEEDLE_MIN_LENGTH}, {NEEDLE_MAX_LENGTH}]")
        return int(value)

    if isinstance(length, (Sequence, np.ndarray)) and not isinstance(length, str):
        if len(length) != 2:
            raise ValueError(f"length is one int or a (lo, hi) range, got {length!r}; for several fixed lengths, "
                             "make one set of prompts per length")
        lo, hi = check(length[0]), check(length[1])
        if lo > hi:
            raise ValueError(f"length range (lo, hi) needs lo <= hi, got {length!r}")
        return lo, hi
    return check(length)


def make_needle(n: int, seed: SeedOrRng = 0, length: Union[int, Tuple[int, int]] = 128, *,
                depth: Optional[float] = None, n_pairs: Optional[int] = None, split: str = "train",
                max_pairs: int = 6) -> List[Prompt]:
    """``n`` key-value (needle-in-a-haystack) prompts of exactly ``length`` tokens (BOS included).

    ``length`` may be a ``(lo, hi)`` range (a uniform draw per prompt). ``depth`` in
    [0, 1] puts the queried pair at that fraction of the haystack (random when
    ``None``). ``n_pairs`` counts the needle and its distractors (default
    :func:`default_n_pairs`: one more pair per 24 tokens, up to ``max_pairs``).
    """
    length = check_needle_length(length)
    split = _norm_split(split)
    rng = _rng(seed, "needle", split)
    return [_needle_prompt(rng, split, _pick_length(rng, length), depth, n_pairs, max_pairs) for _ in range(n)]


# ------------------------------------------------------------------- entry points
def make_dataset(task: str, split: str = "train", n: int = 100, seed: SeedOrRng = 0, **kw) -> List[Prompt]:
    """``n`` prompts of ``task`` (``"facts"``, ``"ioi"`` or ``"needle"``) from ``split``.

    Keyword arguments go to :func:`make_facts`, :func:`make_ioi` or :func:`make_needle`
    (e.g. ``length=256, depth=0.5`` for the needle).
    """
    task = _norm_task(task)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    maker = {"facts": make_facts, "ioi": make_ioi, "needle": make_needle}[task]
    return maker(n, seed, split=split, **kw)


def mixed_training_stream(seed: SeedOrRng = 0, *, weights: Optional[Mapping[str, float]] = None,
                          needle_length: Union[int, Tuple[int, int]] = (24, 256),
                          split: str = "train", **needle_kw) -> Iterator[Prompt]:
    """An endless, seeded stream of training prompts mixing the three tasks.

    ``weights`` maps task -> share (default :data:`DEFAULT_WEIGHTS`; a task left
    out is never drawn); needle prompts draw their length from ``needle_length``
    (an int or an inclusive ``(lo, hi)`` range).
    """
    rng = _rng(seed, "stream", split)
    yield from _stream(rng, _norm_split(split), weights, needle_length, needle_kw)


def _stream(rng: random.Random, split: str, weights, needle_length, needle_kw) -> Iterator[Prompt]:
    tasks, cum = _weights(weights)
    while True:
        yield _sample_task(rng, tasks[_bisect(cum, rng.random())], split, needle_length, needle_kw)


def _weights(weights: Optional[Mapping[str, float]]) -> Tuple[List[str], List[float]]:
    w = DEFAULT_WEIGHTS if weights is None else {_norm_task(k): float(v) for k, v in weights.items()}
    tasks = [t for t in TASKS if w.get(t, 0) > 0]
    if not tasks:
        raise ValueError("weights give no task a positive share")
    total = sum(w[t] for t in tasks)
    cum, acc = [], 0.0
    for t in tasks:
        acc += w[t] / total
        cum.append(acc)
    cum[-1] = 1.0
    return tasks, cum


def _bisect(cum: List[float], x: float) -> int:
    for i, c in enumerate(cum):
        if x < c:
            return i
    return len(cum) - 1


def _sample_task(rng: random.Random, task: str, split: str, needle_length, needle_kw) -> Prompt:
    if task == "facts":
        return _sample_fact(rng, split)
    if task == "ioi":
        return _sample_ioi(rng, split)
    kw = {"depth": None, "n_pairs": None, "max_pairs": 6}
    unknown = set(needle_kw) - set(kw)
    if unknown:
        raise TypeError(f"unknown needle options {sorted(unknown)}: expected depth, n_pairs, max_pairs")
    kw.update(needle_kw)
    return _needle_prompt(rng, split, _pick_length(rng, needle_length), kw["depth"], kw["n_pairs"],
                          kw["max_pairs"])


# -------------------------------------------------------------------- tokenization
def _answer_token(answer: Union[str, int], vocab: Mapping[str, int], unk: int, size: int) -> int:
    """A prompt's answer in the toy encoding: its word's id (``unk`` for a word the vocabulary
    lacks), or the id itself when given as one."""
    if isinstance(answer, str):
        return vocab.get(answer, unk)
    if isinstance(answer, bool) or not hasattr(answer, "__index__"):
        raise NotAnIndexError(f"a prompt's answer is a word or a token id, got {answer!r}")
    if not 0 <= int(answer) < size:
        raise OutOfRangeError(f"answer token id {int(answer)} is outside the vocabulary [0, {size})")
    return int(answer)


def encode_prompts(prompts: Sequence[Prompt], tokenizer: Any = None, *, padding_side: str = "left",
                   include_answer: bool = False, mode: str = "answer", return_tensors: str = "pt",
                   pad_to_multiple_of: Optional[int] = None) -> Dict[str, Any]:
    """Tokenize prompts into a padded batch (BOS first; pure Python/NumPy, no tokenizer call).

    Returns ``tokens [b, p]``, ``attention_mask [b, p]`` (1 = real token),
    ``answers [b]`` (answer ids), ``answer_pos [b]`` (position of the last prompt
    token, whose next-token prediction is the answer), ``targets [b, p]`` (the next
    token at each position; the answer at ``answer_pos``; -100 where nothing is
    predicted) and ``loss_mask [b, p]`` (bool): with ``mode="answer"`` only the
    answer position, with ``mode="full"`` every real position (the next word of the
    text, then the answer). With ``include_answer`` the answer token is appended to
    the sequence (then ``answer_pos`` is one before it). ``tokenizer`` may be a
    ``tokenizers.Tokenizer``, a transformers tokenizer, a ``word -> id`` mapping or
    ``None`` (the toy vocabulary). ``return_tensors``: ``"pt"`` or ``"np"``.
    """
    if mode not in ("answer", "full"):
        raise ValueError(f"mode must be 'answer' or 'full', got {mode!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    vocab = _vocab(tokenizer)
    pad = vocab.get(V.PAD, 0)
    unk = vocab.get(V.UNK, 3)
    seqs = [_encode_words(p.text, vocab) for p in prompts]
    size = max(vocab.values()) + 1
    answers = np.array([_answer_token(p.answer, vocab, unk, size) for p in prompts], dtype=np.int64)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    extra = 1 if include_answer else 0
    width = int(lens.max()) + extra
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    b = len(seqs)
    tokens = np.full((b, width), pad, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    targets = np.full((b, width), -100, dtype=np.int64)
    loss_mask = np.zeros((b, width), dtype=bool)
    answer_pos = np.zeros(b, dtype=np.int64)
    for row, (seq, length, ans) in enumerate(zip(seqs, lens, answers)):
        full = seq + [int(ans)] if include_answer else seq
        start = width - len(full) if padding_side == "left" else 0
        end = start + len(full)
        tokens[row, start:end] = full
        mask[row, start:end] = 1
        last = start + int(length) - 1
        answer_pos[row] = last
        targets[row, start:last] = seq[1:]
        targets[row, last] = ans
        if mode == "full":
            loss_mask[row, start:last + 1] = True
        else:
            loss_mask[row, last] = True
    out: Dict[str, Any] = {"tokens": tokens, "attention_mask": mask, "answers": answers,
                           "answer_pos": answer_pos, "targets": targets, "loss_mask": loss_mask,
                           "lengths": lens}
    if return_tensors == "pt":
        import torch

        out = {k: torch.from_numpy(v) for k, v in out.items()}
    elif return_tensors != "np":
        raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
    out["tasks"] = [p.task for p in prompts]
    return out


def training_batch(tokenizer: Any, batch_size: int, seed_or_rng: SeedOrRng, *,
                   task: Optional[str] = None, weights: Optional[Mapping[str, float]] = None,
                   needle_max_len: int = 256, needle_min_len: int = 24, mode: str = "answer",
                   include_answer: bool = False, padding_side: str = "left", return_tensors: str = "pt",
                   return_prompts: bool = False, **needle_kw) -> Dict[str, Any]:
    """One tokenized batch of training prompts (see :func:`encode_prompts` for the keys).

    ``task=None`` mixes the tasks by ``weights`` row by row; a task name fills the
    batch with that task (which wastes no padding on needle batches). Needle
    lengths are drawn uniformly from ``[needle_min_len, needle_max_len]``.
    ``seed_or_rng`` is a ``random.Random`` (advanced in place: pass the same one on
    every call for a stream of batches) or an int seed (the same seed gives the same
    batch). Left padding by default, so every row's answer is
    predicted at the last column; ``loss_mask`` selects the answer position
    (``mode="answer"``) or every real position (``mode="full"``).
    """
    rng = seed_or_rng if isinstance(seed_or_rng, random.Random) else _rng(seed_or_rng, "batch")
    lo = max(NEEDLE_MIN_LENGTH, min(needle_min_len, needle_max_len))
    needle_length = (lo, max(lo, needle_max_len))
    if task is not None:
        task = _norm_task(task)
        prompts = [_sample_task(rng, task, "train", needle_length, needle_kw) for _ in range(batch_size)]
    else:
        tasks, cum = _weights(weights)
        prompts = [_sample_task(rng, tasks[_bisect(cum, rng.random())], "train", needle_length, needle_kw)
                   for _ in range(batch_size)]
    batch = encode_prompts(prompts, tokenizer, padding_side=padding_side, include_answer=include_answer,
                           mode=mode, return_tensors=return_tensors)
    if return_prompts:
        batch["prompts"] = prompts
    return batch


# ---------------------------------------------------------------------- evaluation
def evaluate(model: Any, prompts: Sequence[Prompt], batch_size: int = 64, *, tokenizer: Any = None,
             progress: bool = True, return_details: bool = False, desc: str = "evaluate"):
    """Accuracy of ``model`` on ``prompts``: argmax at the last prompt token == the answer token.

    Runs ``model(tokens, attention_mask=mask)`` (a ``HookedMamba`` or ``HookedMamba2``,
    or anything returning logits ``[b, p, v]``) on left-padded batches of prompts
    sorted by length, under ``torch.no_grad``, with a tqdm progress bar.
    ``tokenizer`` defaults to ``model.tokenizer``, then to the toy vocabulary.
    Returns the accuracy in [0, 1]; with ``return_details`` a dict with
    ``accuracy``, ``n``, ``correct`` (per prompt, in the given order),
    ``predictions`` (predicted words), ``by_task`` and ``by_length`` (accuracy per
    prompt token count, the needle's accuracy against length).
    """
    import torch
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    vocab = _vocab(tokenizer)
    inverse = {i: w for w, i in vocab.items()}
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].n_tokens)
    correct = [False] * len(prompts)
    predictions: List[Optional[str]] = [None] * len(prompts)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
                idx = order[start:start + batch_size]
                batch = encode_prompts([prompts[i] for i in idx], vocab, padding_side="left")
                tokens = batch["tokens"].to(device)
                mask = batch["attention_mask"]
                mask = None if bool(mask.all()) else mask.to(device)
                logits = model(tokens, attention_mask=mask)
                pred = logits[:, -1].argmax(-1).cpu()
                hits = (pred == batch["answers"]).tolist()
                for row, i in enumerate(idx):
                    correct[i] = bool(hits[row])
                    predictions[i] = inverse.get(int(pred[row]), str(int(pred[row])))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    accuracy = sum(correct) / len(prompts)
    if not return_details:
        return accuracy
    by_task: Dict[str, List[bool]] = {}
    by_length: Dict[int, List[bool]] = {}
    for p, ok in zip(prompts, correct):
        by_task.setdefault(p.task, []).append(ok)
        by_length.setdefault(p.n_tokens, []).append(ok)
    return {
        "accuracy": accuracy,
        "n": len(prompts),
        "correct": correct,
        "predictions": predictions,
        "by_task": {k: sum(v) / len(v) for k, v in by_task.items()},
        "by_length": {k: sum(v) / len(v) for k, v in sorted(by_length.items())},
    }


def needle_accuracy_by_length(model: Any, lengths: Sequence[int] = (64, 128, 256, 384, 512), n: int = 100,
                              seed: int = 0, *, split: str = "heldout", batch_size: int = 32,
                              progress: bool = True, **needle_kw) -> Dict[int, float]:
    """Needle accuracy against prompt length: ``{length: accuracy}`` on ``n`` prompts per length."""
    out: Dict[int, float] = {}
    for length in lengths:
        prompts = make_needle(n, seed, length=int(length), split=split, **needle_kw)
        out[int(length)] = evaluate(model, prompts, batch_size=batch_size, progress=progress,
                                    desc=f"needle {length}")
    return out
