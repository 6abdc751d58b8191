"""The shared token space of a teacher and a student (DESIGN.md §4).

Traces live in the student's token space. An id is *shared* when both tokenizers give it the same
token string and both models have an embedding row for it; only shared ids may be proposed by the
teacher. A student-only special token (Qwen3's ``<think>`` against a Qwen2.5-based teacher, say) is
*mapped* to the teacher's own tokenisation of its text, which the teacher consumes as several tokens;
the student may write shared and mapped ids. Every other id is excluded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenSpace:
    size: int  # V: candidate ids are 0 .. V-1
    proposal_mask: torch.Tensor  # [V] bool: ids the teacher may propose
    fallback_mask: torch.Tensor  # [V] bool: ids the student may write
    teacher_pieces: dict[int, tuple[int, ...]] = field(default_factory=dict)  # mapped student id -> teacher ids
    num_shared: int = 0

    def __post_init__(self):
        # The host's copy of the proposal mask: prompts are translated id by id, and reading a mask that
        # lives on the GPU one id at a time is a blocking sync per prompt token.
        self._shared = self.proposal_mask.tolist()

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
                raise ValueError(f"{what} token {pos} (id {tok}) has no equivalent in the teacher's token space: "
                                 f"it is neither shared by both tokenizers nor a mapped special token")
        return out

    def to(self, device) -> "TokenSpace":
        self.proposal_mask = self.proposal_mask.to(device)
        self.fallback_mask = self.fallback_mask.to(device)
        return self


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
    strings to the text the teacher should read instead; by default every student-only special token
    maps to its own text."""
    teacher_table = id_to_token_table(teacher_tokenizer)
    student_table = id_to_token_table(student_tokenizer)
    size = min(teacher_rows, student_rows, len(student_table))
    shared = [i < len(teacher_table) and student_table[i] is not None and student_table[i] == teacher_table[i]
              for i in range(size)]
    num_shared = sum(shared)
    student_real = sum(t is not None for t in student_table)
    if num_shared < min_shared_fraction * student_real:
        mismatches = [f"id {i}: teacher {teacher_table[i] if i < len(teacher_table) else None!r} vs "
                      f"student {student_table[i]!r}" for i in range(size) if not shared[i]][:5]
        raise ValueError(
            f"teacher and student tokenizers share only {num_shared} of the student's {student_real} token ids "
            f"(need at least {min_shared_fraction:.0%}); RSD needs models over one token space. First mismatches: "
            + "; ".join(mismatches))

    specials = {t.content for t in student_tokenizer.added_tokens_decoder.values() if t.special}
    wanted = dict(token_map or {})
    teacher_pieces: dict[int, tuple[int, ...]] = {}
    for i in range(size):
        tok = student_table[i]
        if shared[i] or tok is None or (tok not in wanted and tok not in specials):
            continue
        text = wanted.get(tok, tok)
        pieces = tuple(teacher_tokenizer.encode(text, add_special_tokens=False))
        if pieces and all(p < min(teacher_rows, len(teacher_table)) for p in pieces):
            teacher_pieces[i] = pieces
    unknown = set(wanted) - {student_table[i] for i in teacher_pieces}
    if unknown:
        raise ValueError(f"token_map names {sorted(unknown)}, which are not student-only tokens the teacher can "
                         f"read; token_map keys must be student tokens whose id differs in the teacher")

    proposal_mask = torch.tensor(shared, dtype=torch.bool)
    fallback_mask = proposal_mask.clone()
    for i in teacher_pieces:
        fallback_mask[i] = True
    return TokenSpace(size, proposal_mask, fallback_mask, teacher_pieces, num_shared)


def load_tokenizer(folder, revision: str | None = None):
    """The HF tokenizer saved in a model folder (or the Hub snapshot an id names, see models/hub.py);
    read from disk, never running the folder's code."""
    from transformers import AutoTokenizer

    from .models.hub import resolve_model

    folder = resolve_model(folder, revision)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json (and tokenizer_config.json) "
                                f"next to config.json")
    if (folder / "config.json").is_file():
        from .models.loader import load_config

        load_config(folder)  # a broken or unsupported config.json: our one-line error, not transformers' traceback
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except ValueError as err:
        if "trust_remote_code" in str(err) or "remote code" in str(err):  # a tokenizer that needs the folder's code
            raise ValueError(f"cannot load the tokenizer in {folder} without running the folder's own code, "
                             f"which rsd-engine never does: {err}") from None
        raise ValueError(f"cannot load the tokenizer in {folder}: {err}") from None
    except (OSError, KeyError, TypeError, AttributeError) as err:  # a tokenizer file transformers cannot read
        raise ValueError(f"cannot load the tokenizer in {folder} ({type(err).__name__}: {err}); its tokenizer.json "
                         f"or tokenizer_config.json is damaged or not a Hugging Face tokenizer") from None
