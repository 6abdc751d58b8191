"""The shared token space of a teacher and a student (DESIGN.md §4).

Traces live in the student's token space. An id is *shared* when both tokenizers give it the same
token string and both models have an embedding row for it; only shared ids may be proposed by the
teacher. A student-only added token (Qwen3's ``<think>`` against a Qwen2.5-based teacher, say, which
Qwen3's tokenizer marks ``special: false``) is *mapped* to the teacher's own tokenisation of its text,
which the teacher consumes as several tokens; the student may write shared and mapped ids. A mapped token
the teacher reads as one token of its own at another id (R1-Distill-Qwen's ``<think>`` against Qwen3's) is that
token: the teacher proposes it too, its logits read in the student's ids (``TokenSpace.align_teacher``). Every
other id is excluded, and the tokens either side cannot use are named in a warning.

A mapping is kept only when the teacher reads exactly the token's text: no unknown-token piece, and
the pieces decode, after other text, to that text (a sentencepiece teacher's dummy-prefix space is
stripped where the pieces can be found without it). The space ends at the first id either model lacks
a row for (the samplers read both models' logits over ids 0..V-1), so a student-only token past the
teacher's last row cannot be written; ``TokenSpace.unmapped`` says why each unmapped added token is.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch


@dataclass
class TokenSpace:
    size: int  # V: candidate ids are 0 .. V-1
    proposal_mask: torch.Tensor  # [V] bool: ids the teacher may propose (shared, and mapped to one teacher token)
    fallback_mask: torch.Tensor  # [V] bool: ids the student may write
    teacher_pieces: dict[int, tuple[int, ...]] = field(default_factory=dict)  # mapped student id -> teacher ids
    num_shared: int = 0
    unmapped: dict[int, str] = field(default_factory=dict)  # student id outside the space -> why
    # A mapped token the teacher reads as one token of its own is that token at another id (R1-Distill-Qwen's
    # <think> is its id 151648, Qwen3's 151667): the teacher proposes it, with that token's logit (align_teacher).
    teacher_columns: dict[int, int] = field(default_factory=dict)  # such a student id -> its teacher id

    def __post_init__(self):
        # The host's copy of the shared ids: prompts are translated id by id, and reading a mask that lives on
        # the GPU one id at a time is a blocking sync per prompt token. A mapped id is not shared.
        self._shared = self.proposal_mask.tolist()
        for i in self.teacher_pieces:
            self._shared[i] = False
        dst, src = _column_permutation(self.teacher_columns)
        self._columns = (torch.tensor(dst), torch.tensor(src)) if dst else None

    def align_teacher(self, logits: torch.Tensor) -> torch.Tensor:
        """The teacher's logits [..., Vt] read in the student's ids, in place: a token mapped to one teacher token
        takes that token's logit (the columns are permuted, so every softmax over the row is unchanged)."""
        if self._columns is not None:
            dst, src = self._columns
            logits[..., dst] = logits[..., src]  # (the right side is gathered first)
        return logits

    def is_shared(self, tok: int) -> bool:
        """Whether student id ``tok`` means the same token to the teacher (a host lookup, no device read)."""
        return 0 <= tok < self.size and self._shared[tok]

    def to_teacher(self, student_ids, *, what: str = "prompt") -> list[int]:
        """Translate student-space ids into the teacher ids that carry the same text."""
        out: list[int] = []
        for pos, tok in enumerate(student_ids):
            if tok in self.teacher_pieces:
                out.extend(self.teacher_pieces[tok])
            elif self.is_shared(tok):
                out.append(tok)
            else:
                why = self.unmapped.get(tok, "it is neither shared by both tokenizers nor a mapped student-only token")
                raise ValueError(f"{what} token {pos} (id {tok}) has no equivalent in the teacher's token space: {why}")
        return out

    def sampler_masks(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(proposal, fallback) masks for the samplers: padded with absent ids to a multiple of 16, at most
        `rows` (the narrower logits). The same law for every backend; for the compiled Triton kernels a length
        they specialise as divisible by 16, so their masked loads of the logits are vector loads (at Qwen3's
        151,669 ids each one is a scalar load, and the radix rounds take more registers and spill)."""
        width = min(max(rows, self.size), -(-self.size // 16) * 16)
        pad = width - self.size
        return tuple(torch.nn.functional.pad(m, (0, pad)) if pad > 0 else m
                     for m in (self.proposal_mask, self.fallback_mask))

    def to(self, device) -> "TokenSpace":
        self.proposal_mask = self.proposal_mask.to(device)
        self.fallback_mask = self.fallback_mask.to(device)
        if self._columns is not None:
            self._columns = tuple(c.to(device) for c in self._columns)
        return self


def _teacher_columns(teacher_pieces: dict[int, tuple[int, ...]], shared: list[bool]) -> dict[int, int]:
    """The mapped student ids the teacher reads as one token of its own, each to that teacher id. A teacher id
    already shared (the student has its token twice) or read by an earlier student id keeps its column."""
    columns: dict[int, int] = {}
    for s, pieces in sorted(teacher_pieces.items()):
        t = pieces[0]
        if len(pieces) == 1 and not (t < len(shared) and shared[t]) and t not in columns.values():
            columns[s] = t
    return columns


def _column_permutation(columns: dict[int, int]) -> tuple[list[int], list[int]]:
    """(dst, src) with aligned[dst] = logits[src]: column s takes columns[s], and the columns left behind take the
    displaced ones in id order, so a row's values are only permuted."""
    taken = {s: t for s, t in columns.items() if s != t}
    moved = sorted(set(taken) | set(taken.values()))
    # The ids that take a column no mapped id takes, and the columns no mapped id takes, paired in order.
    rest = iter(sorted(set(moved) - set(taken.values())))
    source = {i: taken[i] if i in taken else next(rest) for i in moved}
    return moved, [source[i] for i in moved]


# Which ids the teacher proposes, as outputs record it where the rule matters for a pair (2: a mapped token it reads
# as one token of its own at another id, from TokenSpace.teacher_columns; 1 before, never such a token).
PROPOSAL_RULES = 2


def proposal_rules(teacher, student) -> int | None:
    """PROPOSAL_RULES for a teacher and student folder whose token space has teacher columns (the rule changed
    their law), else None: read from the tokenizers and configs, before any weights."""
    from .models.loader import load_config

    with warnings.catch_warnings():  # what the folders or the space lack is said by the engine that samples
        warnings.simplefilter("ignore")
        teacher_config, student_config = load_config(teacher), load_config(student)
        space = align_token_spaces(load_tokenizer(teacher), load_tokenizer(student),
                                   teacher_rows=teacher_config.vocab_size, student_rows=student_config.vocab_size)
    return PROPOSAL_RULES if space.teacher_columns else None


def id_to_token_table(tokenizer) -> list[str | None]:
    """``table[i]`` is the token string of id i (None for ids without one)."""
    vocab = tokenizer.get_vocab()
    table: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for tok, i in vocab.items():
        table[i] = tok
    return table


def align_token_spaces(teacher_tokenizer, student_tokenizer, *, teacher_rows: int, student_rows: int,
                       token_map: dict[str, str] | None = None, min_shared_fraction: float = 0.9) -> TokenSpace:
    """Compare the tokenizers id by id. ``*_rows`` are the models' embedding rows (ids beyond a
    tokenizer's length are padding rows and never sampled). ``token_map`` maps student-only token
    strings to the text the teacher should read instead (an error if the teacher cannot read it); by
    default every student-only added token (special or not) maps to its own text where the teacher
    can read that text, and is left out otherwise (``TokenSpace.unmapped`` says why)."""
    teacher_table = id_to_token_table(teacher_tokenizer)
    student_table = id_to_token_table(student_tokenizer)
    size = min(teacher_rows, student_rows, len(student_table))
    shared = [i < len(teacher_table) and student_table[i] is not None and student_table[i] == teacher_table[i]
              for i in range(size)]
    num_shared = sum(shared)
    student_real = sum(t is not None for t in student_table)
    if num_shared < min_shared_fraction * student_real:
        # Searched over the whole student tokenizer: one that extends the teacher's differs past `size` only.
        mismatches = [_mismatch(i, teacher_table, student_table, teacher_rows, student_rows)
                      for i in range(len(student_table))
                      if (i < size and not shared[i]) or (i >= size and student_table[i] is not None)][:5]
        raise ValueError(
            f"teacher and student tokenizers share only {num_shared} of the student's {student_real} token ids "
            f"(need at least {min_shared_fraction:.0%}); RSD needs models over one token space. First mismatches: "
            + "; ".join(mismatches))

    student_ids = {tok: i for i, tok in enumerate(student_table) if tok is not None}
    wanted = dict(token_map or {})
    for tok in wanted:  # names the token map cannot mean, each a clear error
        i = student_ids.get(tok)
        if i is None:
            why = "which is not a token of the student's tokenizer"
        elif i < size and shared[i]:
            why = f"which both tokenizers have at id {i} (only student-only tokens are mapped)"
        elif i >= size:
            why = "whose " + _past_rows(i, teacher_rows, student_rows, len(student_table))
        else:
            continue
        raise ValueError(f"token_map names {tok!r}, {why}; token_map keys must be student tokens whose id differs "
                         f"in the teacher and that both models have a row for")

    pieces_of = _TeacherReader(teacher_tokenizer, min(teacher_rows, len(teacher_table)))
    added = sorted(i for i in student_tokenizer.added_tokens_decoder if 0 <= i < len(student_table))
    teacher_pieces: dict[int, tuple[int, ...]] = {}
    unmapped: dict[int, str] = {}
    for i in sorted(set(added) | {student_ids[tok] for tok in wanted}):
        tok = student_table[i]
        if tok is None or (i < size and shared[i]):
            continue
        if i >= size:
            unmapped[i] = _past_rows(i, teacher_rows, student_rows, len(student_table))
            continue
        pieces, why = pieces_of(wanted.get(tok, tok))
        if pieces is None:
            if tok in wanted:
                raise ValueError(f"token_map maps {tok!r} (student id {i}) to {wanted[tok]!r}, which the teacher "
                                 f"cannot read: {why}")
            unmapped[i] = f"student-only token {tok!r} is not mapped: {why}"
            continue
        teacher_pieces[i] = pieces

    # Ordinary (not added) tokens at an id where the teacher has another token: only added tokens are mapped, so
    # the student can never write these (a prompt or completion holding one is refused). Said once, not silently.
    differing = [i for i in range(size) if not shared[i] and student_table[i] is not None and i not in teacher_pieces
                 and i not in unmapped]
    for i in differing:
        unmapped[i] = (f"the student's token {student_table[i]!r} is at an id where the teacher has "
                       f"{teacher_table[i] if i < len(teacher_table) else None!r}; only added tokens are mapped")
    if differing:
        first = "; ".join(_mismatch(i, teacher_table, student_table, teacher_rows, student_rows) for i in differing[:3])
        warnings.warn(f"{len(differing)} of the student's ordinary tokens sit at ids where the teacher has other "
                      f"tokens ({first}): the student can never write them, and prompts holding them are refused; "
                      f"tokenizers that differ only in added tokens avoid this", stacklevel=2)
    # Past the space (the teacher's last row), ordinary tokens the same; and added tokens not mapped, said too.
    added_set = set(added)
    for i in range(size, len(student_table)):
        if student_table[i] is not None and i not in unmapped and i not in added_set:
            unmapped[i] = _past_rows(i, teacher_rows, student_rows, len(student_table))
    said = set(differing)
    outside = sorted(i for i in unmapped if i not in said)
    if outside:
        named = ", ".join(f"{student_table[i]!r} (id {i})" for i in outside[:5]) + (", ..." if len(outside) > 5 else "")
        warnings.warn(f"{len(outside)} of the student's tokens are outside the token space both models share, so the "
                      f"student can never write them and prompts holding them are refused: {named} (id {outside[0]}: "
                      f"{unmapped[outside[0]]})", stacklevel=2)

    fallback_mask = torch.tensor(shared, dtype=torch.bool)
    fallback_mask[list(teacher_pieces)] = True
    # The teacher proposes a mapped token it reads as one token of its own (TokenSpace.align_teacher).
    columns = _teacher_columns(teacher_pieces, shared)
    _warn_teacher_only(teacher_tokenizer, teacher_table, min(teacher_rows, len(teacher_table)), shared, columns)
    proposal_mask = torch.tensor(shared, dtype=torch.bool)
    proposal_mask[list(columns)] = True
    return TokenSpace(size, proposal_mask, fallback_mask, teacher_pieces, num_shared, unmapped, columns)


def _warn_teacher_only(teacher_tokenizer, teacher_table, rows: int, shared: list[bool], columns: dict[int, int]):
    """Name the teacher's tokens outside the space (Qwen3's <think> against a Qwen2.5 student, an R1 distill's
    EOS): the teacher can never propose them, and its probability on them goes to the tokens it can propose."""
    reached = set(columns.values())
    only = [t for t in range(rows) if teacher_table[t] is not None and not (t < len(shared) and shared[t])
            and t not in reached]
    if not only:
        return
    eos = teacher_tokenizer.eos_token_id
    ending = (f"; its EOS token {teacher_table[eos]!r} is one of them: the teacher never proposes to end a trace, "
              f"the student ends it" if eos in only else "")
    first = ", ".join(f"{teacher_table[t]!r} (id {t})" for t in (([eos] if eos in only else []) +
                                                                [t for t in only if t != eos])[:5])
    warnings.warn(f"{len(only)} of the teacher's tokens are outside the token space both models share ({first}"
                  f"{', ...' if len(only) > 5 else ''}): the teacher can never propose them, and its probability "
                  f"on them goes to the tokens it can propose{ending}", stacklevel=3)


def _past_rows(i: int, teacher_rows: int, student_rows: int, student_len: int) -> str:
    """Why student id ``i`` (>= the space's size) is outside the token space."""
    if i >= teacher_rows:
        return (f"student id {i} is past the teacher's last embedding row (it has {teacher_rows}): the token space "
                f"ends there, since both models' logits are read over ids 0..V-1, so the student cannot write it "
                f"(a teacher with padding rows up to id {i} would map it)")
    return f"student id {i} is past the student's last embedding row (it has {student_rows} for {student_len} tokens)"


def _mismatch(i: int, teacher_table, student_table, teacher_rows: int, student_rows: int) -> str:
    if i >= min(teacher_rows, student_rows):
        return f"id {i}: student {student_table[i]!r} past the {'teacher' if i >= teacher_rows else 'student'}'s rows"
    return f"id {i}: teacher {teacher_table[i] if i < len(teacher_table) else None!r} vs student {student_table[i]!r}"


class _TeacherReader:
    """The teacher ids that read a text exactly, or None and why not.

    The text is checked in context: after a plain piece of text, the pieces must decode to exactly the
    text, with no unknown token and no id past the teacher's rows. A sentencepiece (Metaspace) teacher
    encodes a text alone with a dummy-prefix space (``'a<think>'`` would read ``'a <think>'``); then the
    text is encoded after an anchor and the anchor's own ids are dropped, and that candidate is checked
    the same way. Whatever is kept is verified, so a tokenizer no candidate suits is refused, never
    mis-mapped."""

    ANCHORS = ("\n", "a", "0", ".")

    def __init__(self, tokenizer, rows: int):
        self.tokenizer, self.rows = tokenizer, rows
        self.unk = tokenizer.unk_token_id
        self.context = self._encode("a")
        self.context_text = self._decode(self.context)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _problem(self, text: str, pieces: list[int]) -> str:
        """'' when ``pieces`` read exactly ``text``, else what is wrong with them."""
        if not pieces:
            return "the teacher's tokenizer gives no tokens for it"
        if self.unk is not None and self.unk in pieces:
            return (f"the teacher's tokenisation {self.tokenizer.convert_ids_to_tokens(pieces)} holds its unknown "
                    f"token {self.tokenizer.unk_token!r} (id {self.unk})")
        if max(pieces) >= self.rows or min(pieces) < 0:
            return f"the teacher's tokenisation {pieces} holds ids past its {self.rows} rows"
        read = self._decode(self.context + pieces)
        if read != self.context_text + text:
            shown = read[len(self.context_text):] if read.startswith(self.context_text) else read
            return (f"the teacher's tokenisation {self.tokenizer.convert_ids_to_tokens(pieces)} reads {shown!r} "
                    f"after other text, not {text!r}")
        return ""

    def __call__(self, text: str) -> tuple[tuple[int, ...] | None, str]:
        pieces = self._encode(text)
        first = self._problem(text, pieces)
        if not first:
            return tuple(pieces), ""
        for anchor in self.ANCHORS:
            head, ids = self._encode(anchor), self._encode(anchor + text)
            if ids[:len(head)] == head and not self._problem(text, ids[len(head):]):
                return tuple(ids[len(head):]), ""
        return None, first


def load_tokenizer(folder, revision: str | None = None):
    """The HF tokenizer saved in a model folder (or the Hub snapshot an id names, see models/hub.py);
    read from disk, never running the folder's code. A tokenizer_config.json that names such code (auto_map,
    or a tokenizer_class transformers lacks) gets the built-in tokenizer its files describe, with a warning,
    as config.json's auto_map does (models/config.py)."""
    from transformers import AutoTokenizer

    from .models.hub import resolve_model

    folder = resolve_model(folder, revision)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json (and tokenizer_config.json) "
                                f"next to config.json")
    if (folder / "config.json").is_file():
        from .models.loader import load_config

        load_config(folder)  # a broken or unsupported config.json: our one-line error, not transformers' traceback
    custom = _custom_tokenizer_code(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except ValueError as err:
        if "trust_remote_code" in str(err) or "remote code" in str(err):  # a tokenizer that needs the folder's code
            raise ValueError(f"cannot load the tokenizer in {folder} without running the folder's own code, "
                             f"which rsd-engine never does: {err}") from None
        raise ValueError(f"cannot load the tokenizer in {folder}: {err}") from None
    except (OSError, KeyError, TypeError, AttributeError) as err:  # a tokenizer file transformers cannot read
        raise ValueError(f"cannot load the tokenizer in {folder} ({type(err).__name__}: {err}); its tokenizer.json "
                         f"or tokenizer_config.json is damaged or not a Hugging Face tokenizer") from None
    except _StrictDataclassError as err:  # transformers' config refuses a config.json field ours does not read
        raise ValueError(f"{folder / 'config.json'}: {' '.join(str(err).split())}") from None
    if custom:
        source = "from tokenizer.json as is" if (folder / "tokenizer.json").is_file() else "from its files"
        warnings.warn(f"{folder / 'tokenizer_config.json'} has {custom} (custom tokenizer code, never run here): the "
                      f"tokenizer is read {source}, by the built-in {type(tokenizer).__name__}; if its own code "
                      f"tokenizes otherwise, so will this")  # here, not the caller: said once a folder
    return tokenizer


try:  # transformers 5's configs are huggingface_hub strict dataclasses: a field of the wrong type raises this (an
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError  # Exception, not a ValueError)
except ImportError:  # an older huggingface_hub, without them: nothing to catch
    _StrictDataclassError = ()


def _custom_tokenizer_code(folder) -> str:
    """What the folder's tokenizer_config.json names of its own code, read as transformers reads it (an auto_map
    AutoTokenizer entry, or the older list form; a tokenizer_class transformers does not provide), or ""."""
    from .models.hub import read_json_object

    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return ""
    config = read_json_object(path)
    auto_map = config.get("auto_map")
    entry = auto_map if isinstance(auto_map, (list, tuple)) else (
        auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None)
    entry = [name for name in entry if name] if isinstance(entry, (list, tuple)) else [entry] if entry else []
    named = [f"auto_map (AutoTokenizer: {', '.join(map(str, entry))})"] if entry else []
    declared = config.get("tokenizer_class")
    if isinstance(declared, str) and declared:
        try:
            from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
        except ImportError:  # another transformers: only auto_map is named
            tokenizer_class_from_name = None
        if tokenizer_class_from_name is not None and tokenizer_class_from_name(declared) is None:
            named.append(f"tokenizer_class {declared!r}, which transformers does not provide")
    return " and ".join(named)
