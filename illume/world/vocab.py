"""The synthetic world's closed vocabulary: attribute values, nouns, relations and numbers.

Contract: everything here is a constant (or a pure function of constants). The generator, the
grammar behind the fact critic and the tokenizer training all read the same lists, so a word the
world can show is a word the critic can parse. Canonical values are what scene graphs store
(``colour`` spelt the British way, ``large`` not ``big``); synonyms only live in ``SYNONYMS`` and
are accepted by the critic, never produced by the gold templates, so the hand-written critic tests
can check paraphrases the generator never emits.
"""

from __future__ import annotations

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")

# The attribute an adjective or noun sets, keyed by the canonical word.
ATTRIBUTE_KEYS: tuple[str, ...] = ("shape", "colour", "size")

# RGB fill of each colour: far apart in hue so a 16 px patch is never ambiguous.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
BACKGROUND_RGB: tuple[int, int, int] = (236, 236, 236)

# Spatial relations, named by the feature key the grammar uses; the inverse of each.
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left_of": "right_of",
    "right_of": "left_of",
    "above": "below",
    "below": "above",
}
# How the generator words each relation (the critic also accepts the variants in the grammar).
RELATION_TEXT: dict[str, str] = {
    "left_of": "left of",
    "right_of": "right of",
    "above": "above",
    "below": "below",
}

GENERIC_NOUNS: tuple[str, ...] = ("object", "shape", "thing", "one")
LOCATION_NOUNS: tuple[str, ...] = ("picture", "image", "scene")

NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

# Words the critic maps onto canonical ones. Never produced by the generator's gold templates.
SYNONYMS: dict[str, str] = {
    "color": "colour",
    "colors": "colours",
    "big": "large",
    "little": "small",
    "bigger": "larger",
    "under": "below",
    "beneath": "below",
    "photo": "picture",
}


def plural(noun: str) -> str:
    """Plural of a world noun (all regular)."""
    return noun + "s"


def number_word(n: int) -> str:
    """The English word for a small count (digits beyond the table)."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def article(word: str) -> str:
    """'a' or 'an' for the next word (the world's words need no exceptions)."""
    return "an" if word[:1] in "aeiou" else "a"


def key_of(value: str) -> str | None:
    """Which attribute a canonical value belongs to (None for a word that is no attribute value)."""
    if value in COLOURS:
        return "colour"
    if value in SHAPES:
        return "shape"
    if value in SIZES:
        return "size"
    return None


# Function words of the grammar, listed so tokenizers see every word the critic can parse.
FUNCTION_WORDS: tuple[str, ...] = (
    "a", "an", "the", "there", "is", "are", "not", "no", "none", "of", "only", "exactly", "just",
    "single", "all", "every", "each", "both", "and", "but", "while", "whereas", "because", "since",
    "as", "so", "also", "too", "well", "in", "that", "which", "to", "left", "right", "above",
    "below", "than", "larger", "smaller", "same", "different", "from", "has", "have", "shows",
    "contains", "can", "see", "i", "you", "we", "does", "show", "contain", "any", "on", "some",
    "what", "how", "many", "colour", "colours", "size", "sizes", "shapes", "yes", "seeing", "?", ",",
)  # fmt: skip


def lexicon() -> list[str]:
    """Every word the world's grammar knows, canonical and synonym, sorted and unique."""
    words: set[str] = set(FUNCTION_WORDS) | set(COLOURS) | set(SIZES) | set(LOCATION_NOUNS)
    for noun in (*SHAPES, *GENERIC_NOUNS):
        words.update((noun, plural(noun)))
    words.update(NUMBER_WORDS[:7])
    words.update(str(i) for i in range(10))
    words.update(SYNONYMS)
    return sorted(words)
