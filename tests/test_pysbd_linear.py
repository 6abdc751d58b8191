"""The linear-time pysbd steps (rsd_engine/pipeline/pysbd_linear.py) split every text as pysbd 0.3.4 does."""
import random

import pytest

pysbd = pytest.importorskip("pysbd")

from pysbd.lists_item_replacer import ListItemReplacer  # noqa: E402

from rsd_engine.pipeline import pysbd_linear  # noqa: E402

pytestmark = pytest.mark.skipif(pysbd.__version__ != pysbd_linear.PYSBD_VERSION,
                                reason="the linear steps replace pysbd 0.3.4's only")

# Pieces a reasoning trace is made of, with what pysbd treats specially: numbered and lettered lists
# (their numbers out of order too), abbreviations, decimals, ellipses, quotes, parentheses, LaTeX,
# repeated sentences (a sentence found many times in the text), self-overlapping ones ("a. a. a."),
# and whitespace of every kind (a sentence's trailing whitespace belongs to it).
PIECES = [
    "Let $x$ be the number of apples.", "Then $2x + 3 = 11$, so $x = 4$.", "We check: 2*4+3 = 11.",
    "1. First, note that the sum is even.", "2. Next, since 12 * 12 = 144, we get 100.", "3. Done.",
    "7. Out of order.", "10. Ten.", "9. Nine.", "0. Zero.", "1) one", "2) two", "4) four", "(a) first",
    "(b) second", "a. alpha", "b. beta", "i. roman", "ii. roman two", "(iv) Four", "- 1. dash item",
    "Wait, let me reconsider.", "Wait, let me reconsider.", "Hmm...", "Hmm, that seems wrong... Actually",
    "e.g. the case n = 3 works.", "Dr. Smith said so.", "The U.S. rate is 1.5%.", "It costs $5. Then $3.",
    '"Is it?" he asked.', "Yes!", "No?!", "(This is an aside.)", "\\boxed{42}.", "$$x = 1.$$",
    "a. a. a.", "aa. aa.", "ab ab ab.", "x", "Step 2. Compute.", "Answer: 12.", "See Fig. 3.",
    "so the value is x.", "and y.", "take n.", "c) third", "(c) Third", "(C) upper", "A. upper", "I. roman",
    "(ii) two", "iii) three", "v. five", "x) ten", "b) again", "(a)(b) joined", "e.", "(x)", "d.e. f.",
    "**Step 1: Compute.**", "**Answer**", "**Check.**", '"So."', "$x$.", "aa.aa.", "---",
]
SPACES = [" ", " ", " ", "  ", "\n", "\n\n", "\t", "\u00a0", "\u2003", "\r\n", " \n ", "\x1c", ""]


def reference_segment(text):
    """pysbd 0.3.4 as it is: its Segmenter and its own scan_lists."""
    pysbd_linear.segmenter_class()  # the patch in place, so that the original is known
    saved = {name: getattr(ListItemReplacer, name) for name in pysbd_linear.ORIGINAL}
    for name, method in pysbd_linear.ORIGINAL.items():
        setattr(ListItemReplacer, name, method)
    try:
        return pysbd.Segmenter(language="en", clean=False).segment(text)
    finally:
        for name, method in saved.items():
            setattr(ListItemReplacer, name, method)


def linear_segment(text):
    return pysbd_linear.segmenter_class()(language="en", clean=False).segment(text)


def test_patch_replaces_scan_lists():
    pysbd_linear.segmenter_class()
    assert ListItemReplacer.scan_lists is pysbd_linear._scan_lists
    assert ListItemReplacer.iterate_alphabet_array is pysbd_linear._iterate_alphabet_array
    assert set(pysbd_linear.ORIGINAL) == {"scan_lists", "iterate_alphabet_array"}
    assert pysbd_linear.ORIGINAL["scan_lists"] is not pysbd_linear._scan_lists


@pytest.mark.parametrize("seed", range(40))
def test_same_sentences_as_pysbd(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(PIECES) + rng.choice(SPACES) for _ in range(rng.randint(1, 120)))
    if seed % 4 == 0:
        text = rng.choice(SPACES) + text  # leading whitespace
    try:
        expected = reference_segment(text)
    except ValueError:  # pysbd's int(" 2") of a list item after whitespace int() keeps, such as "\x1c"
        assert "\x1c" in text
        expected = reference_segment(text.replace("\x1c", " "))
        assert len(linear_segment(text)) == len(expected)
        return
    assert linear_segment(text) == expected


@pytest.mark.parametrize("text", [
    "", " ", "a", "a. a. a. a. a.", "1. a 2. b 3. c 2. d 1. e", "1) a\n2) b\n3) c\n1) d",
    "x.  x.  x.\n\nx.", "Wait. Wait. Wait.  Wait.", "9. nine 0. zero 9. nine", "aaa. aaa. aa. a.",
])
def test_same_sentences_on_edge_texts(text):
    assert linear_segment(text) == reference_segment(text)


@pytest.mark.parametrize("seed", range(20))
def test_span_finder_is_pysbds_scan(seed):
    """_first_span_after (str.find, no pattern compiled per sentence) against pysbd's own scan: the first of the
    non-overlapping matches of re.escape(sent) + r"\\s*" from the text's start that ends past prior_end, on texts of
    a tiny alphabet (occurrences overlap: "aa" in "aaa") with Unicode whitespace and regex metacharacters."""
    import re
    rng = random.Random(seed)
    alphabet = ["a", "a", "b", ".", " ", "\n", "\u2003", "\x1c", "*", "("]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        start = rng.randint(0, len(text))
        sent = text[start:start + rng.randint(0, 5)] if rng.random() < 0.8 else rng.choice(["a", "ab", " a", "x"])
        prior_end = rng.randint(0, len(text))
        pattern = re.compile(re.escape(sent) + r"\s*")
        expected = next(((m.start(), m.end()) for m in pattern.finditer(text) if m.end() > prior_end), None)
        assert pysbd_linear._first_span_after(text, sent, prior_end) == expected, (text, sent, prior_end)


def test_list_items_are_marked_in_one_pass():
    """A text of many numbered items: the marks are pysbd's, with one rewrite of the text (pysbd made one per
    marked item)."""
    calls = []
    text = " ".join(f"{k % 12 + 1}. An item." for k in range(60))
    import re
    real_sub = re.sub

    def counting_sub(*args, **kwargs):
        calls.append(args[0])
        return real_sub(*args, **kwargs)

    pysbd_linear.segmenter_class()
    replacer = ListItemReplacer(text)
    pysbd_linear.re.sub = counting_sub
    try:
        replacer.replace_periods_in_numbered_list()
    finally:
        pysbd_linear.re.sub = real_sub
    original = ListItemReplacer(text)
    pysbd_linear.ORIGINAL["scan_lists"](original, ListItemReplacer.NUMBERED_LIST_REGEX_1,
                                     ListItemReplacer.NUMBERED_LIST_REGEX_2, "♨", strip=True)
    assert replacer.text == original.text and "♨" in replacer.text
    assert len(calls) == 1


def champ_text() -> str:
    """The champ package's problems and solutions (model-written solutions among them), joined."""
    champ = pytest.importorskip("champ_dataset")
    import json
    from pathlib import Path
    data = json.loads((Path(champ.__file__).parent / "dataset_files" / "v0.json").read_text())
    texts = []

    def walk(node):
        if isinstance(node, str) and len(node) > 80:
            texts.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data)
    return "\n\n".join(texts)


def test_same_sentences_on_math_text():
    """Windows of real competition-maths text (1,500 of them gave no difference when this was written)."""
    corpus = champ_text()
    rng = random.Random(0)
    for _ in range(40):
        size = rng.randint(50, 4000)
        start = rng.randrange(len(corpus) - size)
        text = corpus[start:start + size]
        assert linear_segment(text) == reference_segment(text), (start, size)
